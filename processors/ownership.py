"""Who owns an exception, how urgent it is and how long they have: versioned rules.

Pure: the parsed ``ownership.yaml`` in, an ``Assignment`` out. The QA rules
(``rules.yaml``) give every check a default severity and owner; the ownership
rules refine them by check id, event type, source system, currency and amount
(e.g. "any invoice over 100,000.00 is P1 for finance"). The first matching
rule wins; what it does not set keeps the QA rules' value. Every owner has a
backup owner, who receives the escalation when the SLA is breached.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from revline.core.errors import ConfigurationError
from revline.processors.reference import OWNERS, SEVERITIES, load_yaml

# Default SLAs (time to acknowledge, minutes) and expiry ages, when the file omits them.
DEFAULT_SLA_MINUTES = {"P1": 15.0, "P2": 120.0, "P3": 2880.0}
DEFAULT_EXPIRE_MINUTES = {"P1": 43_200.0, "P2": 43_200.0, "P3": 20_160.0}

_MATCH_KEYS = ("check_id", "event_type", "source_system", "severity", "currency",
               "min_amount_minor")
_RULE_KEYS = ("name", "match", "owner", "severity", "backup_owner")


@dataclass(frozen=True)
class ExceptionFacts:
    """What ownership can depend on: the failed check and the event it failed on."""

    check_id: str
    severity: str  # the QA rules' default
    owner: str  # the QA rules' default
    event_type: str | None = None
    source_system: str | None = None
    amount_minor: int | None = None
    currency: str | None = None


@dataclass(frozen=True)
class Match:
    check_ids: tuple[str, ...] = ()  # globs, e.g. "reconciliation.*"
    event_types: frozenset[str] = frozenset()
    source_systems: frozenset[str] = frozenset()
    severities: frozenset[str] = frozenset()
    currencies: frozenset[str] = frozenset()
    min_amount_minor: int | None = None

    def matches(self, facts: ExceptionFacts) -> bool:
        if self.check_ids and not any(fnmatchcase(facts.check_id, p) for p in self.check_ids):
            return False
        if self.event_types and facts.event_type not in self.event_types:
            return False
        if self.source_systems and facts.source_system not in self.source_systems:
            return False
        if self.severities and facts.severity not in self.severities:
            return False
        if self.currencies and facts.currency not in self.currencies:
            return False
        return self.min_amount_minor is None or (
            facts.amount_minor is not None and facts.amount_minor >= self.min_amount_minor
        )


@dataclass(frozen=True)
class OwnershipRule:
    name: str
    match: Match
    owner: str | None = None
    severity: str | None = None
    backup_owner: str | None = None


@dataclass(frozen=True)
class Assignment:
    owner: str
    severity: str
    backup_owner: str
    sla_ms: int
    expire_after_ms: int
    rule: str | None  # the rule that decided, None = the QA rules' defaults
    version: str


@dataclass(frozen=True)
class Ownership:
    version: str
    rules: tuple[OwnershipRule, ...] = ()
    backup_owners: Mapping[str, str] = field(default_factory=dict)
    sla_minutes: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SLA_MINUTES))
    expire_after_minutes: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_EXPIRE_MINUTES))

    def assign(self, facts: ExceptionFacts) -> Assignment:
        rule = next((r for r in self.rules if r.match.matches(facts)), None)
        owner = (rule.owner if rule else None) or facts.owner
        severity = (rule.severity if rule else None) or facts.severity
        if severity not in SEVERITIES:  # a record from a newer/other producer: be strict-safe
            severity = "P1"
        if owner not in OWNERS:
            owner = "integrations"  # whoever produced it; integrations owns the plumbing
        backup = (rule.backup_owner if rule else None) or self.backup_owners[owner]
        return Assignment(
            owner=owner, severity=severity, backup_owner=backup,
            sla_ms=int(self.sla_minutes[severity] * 60_000),
            expire_after_ms=int(self.expire_after_minutes[severity] * 60_000),
            rule=rule.name if rule else None, version=self.version,
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Ownership:
        try:
            version = str(data["version"])
            sla = {**DEFAULT_SLA_MINUTES, **_minutes(data.get("sla_minutes", {}), "sla_minutes")}
            expire = {**DEFAULT_EXPIRE_MINUTES,
                      **_minutes(data.get("expire_after_minutes", {}), "expire_after_minutes")}
            backups = {str(k): str(v) for k, v in (data.get("backup_owners") or {}).items()}
            rules = tuple(_rule(i, raw) for i, raw in enumerate(data.get("rules") or [], 1))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigurationError(f"ownership file is malformed: {exc!r}") from exc
        problems = []
        for owner in OWNERS:
            backup = backups.get(owner)
            if backup not in OWNERS or backup == owner:
                problems.append(f"backup_owners.{owner} must be another of {OWNERS}, "
                                f"got {backup!r}")
        for name, mapping in (("sla_minutes", sla), ("expire_after_minutes", expire)):
            for severity in mapping:
                if severity not in SEVERITIES or mapping[severity] <= 0:
                    problems.append(f"{name}.{severity}: severities are {SEVERITIES} "
                                    "and times must be > 0")
        for rule in rules:
            for label, value, allowed in (("owner", rule.owner, OWNERS),
                                          ("backup_owner", rule.backup_owner, OWNERS),
                                          ("severity", rule.severity, SEVERITIES)):
                if value is not None and value not in allowed:
                    problems.append(f"rule {rule.name}: {label} must be one of {allowed}, "
                                    f"got {value!r}")
        if problems:
            raise ConfigurationError("ownership file: " + "; ".join(problems))
        return cls(version=version, rules=rules, backup_owners=backups, sla_minutes=sla,
                   expire_after_minutes=expire)


def _minutes(raw: Any, name: str) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{name} must map severity -> minutes")
    return {str(k): float(v) for k, v in raw.items()}


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(str(v) for v in value)
    raise ValueError(f"expected a string or a list of strings, got {value!r}")


def _rule(index: int, raw: Any) -> OwnershipRule:
    if not isinstance(raw, Mapping):
        raise ValueError(f"rule {index} must be a mapping")
    name = str(raw.get("name") or f"rule-{index}")
    unknown = set(raw) - set(_RULE_KEYS)
    match = raw.get("match") or {}
    if not isinstance(match, Mapping):
        raise ValueError(f"rule {name}: match must be a mapping")
    unknown |= {f"match.{k}" for k in set(match) - set(_MATCH_KEYS)}
    if unknown:  # a typo would silently match everything: refuse it
        raise ValueError(f"rule {name}: unknown keys {sorted(unknown)} "
                         f"(rule keys {_RULE_KEYS}, match keys {_MATCH_KEYS})")
    if not any(raw.get(k) for k in ("owner", "severity", "backup_owner")):
        raise ValueError(f"rule {name}: sets none of owner, severity, backup_owner")
    amount = match.get("min_amount_minor")
    return OwnershipRule(
        name=name,
        match=Match(
            check_ids=_strings(match.get("check_id")),
            event_types=frozenset(_strings(match.get("event_type"))),
            source_systems=frozenset(_strings(match.get("source_system"))),
            severities=frozenset(_strings(match.get("severity"))),
            currencies=frozenset(_strings(match.get("currency"))),
            min_amount_minor=None if amount is None else int(amount),
        ),
        owner=raw.get("owner"), severity=raw.get("severity"),
        backup_owner=raw.get("backup_owner"),
    )


def load_ownership(path: Path) -> Ownership:
    return Ownership.from_mapping(load_yaml(path))


# Money fields by event type: what "amount" means for an ownership threshold.
_TOTAL = ("order_booked", "order_amended", "invoice_issued")
_AMOUNT = ("payment_captured", "refund_issued")


def event_amount(event: Mapping[str, Any] | None) -> tuple[int | None, str | None]:
    """The event's amount in minor units and its currency, where it has one."""
    if event is None:
        return None, None
    kind = event["envelope"]["event_type"]
    if kind in _TOTAL:
        return int(event["total_minor"]), str(event["currency"])
    if kind in _AMOUNT:
        return int(event["amount_minor"]), str(event["currency"])
    return None, None
