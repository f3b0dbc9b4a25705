"""Chart of accounts and posting rules, parsed from ``postings.yaml`` into frozen values.

Everything is checked at load time (unknown account, unknown kind, a rule with no
debit, a reversal of a non-posting rule, a typo in a key), so a bad config stops the
process at start-up with a message naming the offending entry, never mid-stream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from revline.core.config_files import read_yaml
from revline.core.errors import ConfigurationError

DEFAULT_RULES_FILE = Path(__file__).with_name("postings.yaml")

ACCOUNT_KINDS = ("asset", "liability", "equity", "revenue", "contra_revenue", "expense")
ACTIONS = ("post", "reverse", "not_applicable")

Side = Literal["debit", "credit"]
Action = Literal["post", "reverse", "not_applicable"]

_CODE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Account:
    code: str
    name: str
    kind: str


@dataclass(frozen=True)
class LineRule:
    side: Side
    account: str
    amount: str  # name of the event's integer minor-units field


@dataclass(frozen=True)
class Reclassify:
    """What a "reverse" rule also moves: the order's balance on ``account`` to ``to``."""

    account: str
    to: str


@dataclass(frozen=True)
class PostingRule:
    event_type: str
    action: Action
    description: str = ""  # str.format template over the envelope and the payload's scalars
    currency: str = "currency"  # name of the event field holding the ISO currency
    lines: tuple[LineRule, ...] = ()
    # A "post" rule: the lines used instead once the order has a credit note (a journal a
    # "reverse" rule posted) in the event's currency. Empty: ``lines`` always.
    after_reversal: tuple[LineRule, ...] = ()
    reverses: tuple[str, ...] = ()  # event types whose journals a "reverse" rule reverses
    # A "reverse" rule: balances of the order moved along with its credit notes.
    reclassify: tuple[Reclassify, ...] = ()


@dataclass(frozen=True)
class PostingRules:
    version: str
    accounts: tuple[Account, ...]
    rules: tuple[PostingRule, ...]

    def rule_for(self, event_type: str) -> PostingRule | None:
        for rule in self.rules:
            if rule.event_type == event_type:
                return rule
        return None

    def account(self, code: str) -> Account | None:
        for account in self.accounts:
            if account.code == code:
                return account
        return None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "posting rules") -> PostingRules:
        return _Parser(source).parse(data)


def load_posting_rules(path: Path | str | None = None) -> PostingRules:
    """Read and check a posting-rules file (default: the packaged ``postings.yaml``)."""
    file = Path(path) if path is not None else DEFAULT_RULES_FILE
    data = read_yaml(file, f"posting rules {file}")
    return PostingRules.from_mapping(data, source=str(file))


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ConfigurationError:
        return ConfigurationError(f"{self.source}: {where}: {message}")

    def mapping(self, value: Any, where: str, allowed: set[str] | None = None) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(where, f"must be a mapping, got {type(value).__name__}")
        if allowed is not None:
            unknown = sorted(str(k) for k in value if k not in allowed)
            if unknown:
                raise self.fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return value

    def text(self, value: Any, where: str, *, empty_ok: bool = False) -> str:
        if not isinstance(value, str) or (not value.strip() and not empty_ok):
            raise self.fail(where, f"must be a non-empty string, got {value!r}")
        return value

    def parse(self, data: Any) -> PostingRules:
        top = self.mapping(data, "top level", {"version", "accounts", "rules"})
        for required in ("version", "accounts", "rules"):
            if required not in top:
                raise self.fail("top level", f"missing {required!r}")
        version = top["version"]
        if not isinstance(version, str | int) or isinstance(version, bool):
            raise self.fail("version", f"must be a string, got {version!r}")
        accounts = self.accounts(top["accounts"])
        codes = {a.code for a in accounts}
        raw_rules = self.mapping(top["rules"], "rules")
        rules = tuple(
            self.rule(str(event_type), spec, codes) for event_type, spec in raw_rules.items()
        )
        posting = {r.event_type for r in rules if r.action == "post"}
        for rule in rules:
            for target in rule.reverses:
                if target not in posting:
                    raise self.fail(
                        f"rules.{rule.event_type}.reverses",
                        f"{target!r} has no 'post' rule, so it has no journal to reverse",
                    )
        return PostingRules(version=str(version), accounts=accounts, rules=rules)

    def accounts(self, value: Any) -> tuple[Account, ...]:
        raw = self.mapping(value, "accounts")
        if not raw:
            raise self.fail("accounts", "the chart of accounts is empty")
        out = []
        for code, spec in raw.items():
            where = f"accounts.{code}"
            if not isinstance(code, str) or not _CODE.match(code):
                raise self.fail(
                    where, "account codes are 1-64 chars of lower-case letters, digits, _ . -"
                )
            body = self.mapping(spec, where, {"name", "kind"})
            kind = body.get("kind")
            if kind not in ACCOUNT_KINDS:
                raise self.fail(where, f"kind must be one of {ACCOUNT_KINDS}, got {kind!r}")
            name = self.text(body.get("name"), f"{where}.name")
            out.append(Account(code=code, name=name, kind=str(kind)))
        return tuple(out)

    def rule(self, event_type: str, spec: Any, codes: set[str]) -> PostingRule:
        where = f"rules.{event_type}"
        body = self.mapping(spec, where)
        action = body.get("action")
        if action not in ACTIONS:
            raise self.fail(where, f"action must be one of {ACTIONS}, got {action!r}")
        description = self.text(body.get("description", ""), f"{where}.description", empty_ok=True)
        if action == "not_applicable":
            self.mapping(body, where, {"action", "description"})
            return PostingRule(event_type, "not_applicable", description)
        if action == "reverse":
            self.mapping(body, where, {"action", "description", "reverses", "reclassify"})
            targets = body.get("reverses")
            if not isinstance(targets, list) or not targets:
                raise self.fail(f"{where}.reverses", "must be a non-empty list of event types")
            reverses = tuple(self.text(t, f"{where}.reverses") for t in targets)
            reclassify = self.reclassify(body.get("reclassify", []), f"{where}.reclassify", codes)
            return PostingRule(
                event_type, "reverse", description, reverses=reverses, reclassify=reclassify
            )
        self.mapping(body, where, {"action", "description", "currency", "lines", "after_reversal"})
        currency = self.text(body.get("currency", "currency"), f"{where}.currency")
        if not _FIELD.match(currency):
            raise self.fail(f"{where}.currency", f"{currency!r} is not a field name")
        lines = self.lines(body.get("lines"), f"{where}.lines", codes)
        after: tuple[LineRule, ...] = ()
        if "after_reversal" in body:
            after = self.lines(body["after_reversal"], f"{where}.after_reversal", codes)
        return PostingRule(
            event_type, "post", description, currency=currency, lines=lines, after_reversal=after
        )

    def lines(self, raw_lines: Any, where: str, codes: set[str]) -> tuple[LineRule, ...]:
        if not isinstance(raw_lines, list) or not raw_lines:
            raise self.fail(where, "a 'post' rule needs a non-empty list of lines")
        lines = tuple(self.line(line, f"{where}[{i}]", codes) for i, line in enumerate(raw_lines))
        sides = {line.side for line in lines}
        if sides != {"debit", "credit"}:
            raise self.fail(where, "needs at least one debit and one credit line")
        return lines

    def reclassify(self, raw: Any, where: str, codes: set[str]) -> tuple[Reclassify, ...]:
        if not isinstance(raw, list):
            raise self.fail(where, "must be a list of {account: ..., to: ...}")
        out = []
        for i, spec in enumerate(raw):
            body = self.mapping(spec, f"{where}[{i}]", {"account", "to"})
            account = self.text(body.get("account"), f"{where}[{i}].account")
            to = self.text(body.get("to"), f"{where}[{i}].to")
            for code in (account, to):
                if code not in codes:
                    raise self.fail(
                        f"{where}[{i}]", f"unknown account {code!r}; the chart has {sorted(codes)}"
                    )
            if account == to:
                raise self.fail(f"{where}[{i}]", f"moves {account!r} to itself")
            out.append(Reclassify(account=account, to=to))
        return tuple(out)

    def line(self, spec: Any, where: str, codes: set[str]) -> LineRule:
        body = self.mapping(spec, where, {"debit", "credit", "amount"})
        sides = [s for s in ("debit", "credit") if s in body]
        if len(sides) != 1:
            raise self.fail(where, "name exactly one of 'debit' or 'credit' (the account)")
        side: Side = "debit" if sides[0] == "debit" else "credit"
        account = self.text(body[side], f"{where}.{side}")
        if account not in codes:
            raise self.fail(where, f"unknown account {account!r}; the chart has {sorted(codes)}")
        amount = self.text(body.get("amount"), f"{where}.amount")
        if not _FIELD.match(amount):
            raise self.fail(f"{where}.amount", f"{amount!r} is not a field name")
        return LineRule(side=side, account=account, amount=amount)
