"""Reconciliation: what the stream concluded vs what the ledger and the ERP hold.

The stream's side is the validated topic: every event that passed QA, decoded with
``schemas.EventDeserializer``, first copy per idempotency key. From each event this
module derives what a correct sink leaves behind, with the same rules the sink uses:

* ledger — ``sinks/ledger/postings.yaml``: a ``post`` rule makes one journal whose
  total is the sum of its debit lines (invoice: ``total_minor``; payment and refund:
  ``amount_minor``), none when that is 0; a ``reverse`` rule (cancellation) makes one
  credit note per journal of the order's earlier events of the listed types that no
  earlier cancellation reversed; every other type posts nothing.
* ERP — the steps of ``sinks/erp/_mapping.py``: booking and amendment → the sale
  (its untaxed amount is checked against the order's latest booking/amendment);
  invoice → the sale and one invoice of ``total_minor``; payment → one payment move;
  refund → one credit note of ``-amount_minor`` and one refund payment; cancellation
  → the sale, not cancelled behind the stream's back, plus one credit note per
  earlier invoice.

Everything that compares is a pure function over plain values (``expected_from_events``,
``compare_ledger``, ``compare_erp``); ``read_stream`` and ``reconcile`` do the I/O.
An event the sink refused (side-effect status ``refused``) already has an owned
exception: it is listed separately and is not drift. Drift % per system =
(missing + extra + mismatched) / records expected; overall over both systems.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from processors import exception_id_for
from revline.auditlog import AuditFact
from revline.errors import ConfigurationError, InfrastructureError
from revline.readback import header, read_topic
from schemas import DecodeError, EventDeserializer, exception_codec
from sinks._protocols import ErpDocument, ErpInventory, Event
from sinks.erp import _mapping as m
from sinks.ledger import JournalSummary, PostingRules, SqlLedger

LEDGER = "ledger"
ERP = "erp"
CHECK_MISSING = "reconcile.missing"
CHECK_EXTRA = "reconcile.extra"
CHECK_MISMATCH = "reconcile.mismatch"
OWNER = "finance"
# Header on the exception records this module produces: a re-run finds the ids it
# already opened by reading headers only, without decoding every exception.
SOURCE_HEADER = "revline.source"
EXCEPTION_ID_HEADER = "revline.exception_id"
SOURCE = "reconcile"

# Event type -> ERP steps (``_mapping`` step names), consistent with ``_mapping.HANDLERS``.
ERP_STEPS: Mapping[str, tuple[str, ...]] = {
    "order_booked": (m.SALE,),
    "order_amended": (m.SALE,),
    "order_cancelled": (m.SALE,),  # + one credit note per earlier invoice
    "invoice_issued": (m.SALE, m.INVOICE),
    "payment_captured": (m.PAYMENT,),
    "refund_issued": (m.CREDIT_NOTE, m.REFUND_PAYMENT),
}
MONEY_STEPS = frozenset({m.INVOICE, m.PAYMENT, m.CREDIT_NOTE, m.REFUND_PAYMENT})
# The document whose amount stands for the event in the per-type totals (a refund's
# credit note carries the same amount again, so it is checked but not added twice).
PRIMARY_STEP: Mapping[str, str] = {
    "invoice_issued": m.INVOICE,
    "payment_captured": m.PAYMENT,
    "refund_issued": m.REFUND_PAYMENT,
    "order_cancelled": m.CREDIT_NOTE,
}
_SHAPING = ("order_booked", "order_amended")  # events that set the sale's lines
_ERP_DONE = frozenset({"draft"})  # a marked draft is a step under way, not done


# -- windows ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """[start, end) in UTC; None on a side means open."""

    label: str
    start: datetime | None = None
    end: datetime | None = None

    def contains(self, at: datetime | date | None) -> bool:
        if at is None:
            return self.start is None and self.end is None
        if not isinstance(at, datetime):
            at = datetime(at.year, at.month, at.day, tzinfo=UTC)
        elif at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return (self.start is None or at >= self.start) and (self.end is None or at < self.end)


ALL_TIME = Window("all")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_WEEK = re.compile(r"^(\d{4})-W(\d{2})$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")


def _day(text: str, what: str) -> datetime:
    if not _DAY.match(text):
        raise ConfigurationError(f"{what} {text!r}: give a date as YYYY-MM-DD")
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError as exc:
        raise ConfigurationError(f"{what} {text!r}: {exc}") from exc


def parse_window(
    period: str | None = None, since: str | None = None, until: str | None = None
) -> Window:
    """``period``: ``2026-11`` (a month), ``2026-W47`` (an ISO week) or ``2026-11-24`` (a
    day); or ``since``/``until`` dates (``until`` exclusive). Nothing: all time."""
    if period and (since or until):
        raise ConfigurationError("give either --period or --since/--until, not both")
    if period:
        if match := _MONTH.match(period):
            year, month = int(match[1]), int(match[2])
            if not 1 <= month <= 12:
                raise ConfigurationError(f"period {period!r}: month must be 01-12")
            start = datetime(year, month, 1, tzinfo=UTC)
            end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
            return Window(period, start, end)
        if match := _WEEK.match(period):
            try:
                monday = date.fromisocalendar(int(match[1]), int(match[2]), 1)
            except ValueError as exc:
                raise ConfigurationError(f"period {period!r}: {exc}") from exc
            start = datetime(monday.year, monday.month, monday.day, tzinfo=UTC)
            return Window(period, start, start + timedelta(days=7))
        if _DAY.match(period):
            start = _day(period, "period")
            return Window(period, start, start + timedelta(days=1))
        raise ConfigurationError(
            f"period {period!r}: use YYYY-MM (month), YYYY-Www (ISO week) or YYYY-MM-DD (day)"
        )
    if not since and not until:
        return ALL_TIME
    first = _day(since, "--since") if since else None
    stop = _day(until, "--until") if until else None
    if first and stop and stop <= first:
        raise ConfigurationError(f"--until {until} must be after --since {since}")
    return Window(f"{since or '…'}..{until or '…'}", first, stop)


def period_of(at: datetime | date | None) -> str:
    """The accounting month (UTC) a record is bucketed and its exception keyed by."""
    if at is None:
        return "undated"
    if isinstance(at, datetime) and at.tzinfo is not None:
        at = at.astimezone(UTC)
    return f"{at.year:04d}-{at.month:02d}"


# -- the stream's side -----------------------------------------------------------------
@dataclass
class Source:
    """Where an event was read: its exception points back at it and carries its bytes.

    Mutable on purpose: ``value`` is fetched later, only for records that need it.
    """

    topic: str  # the validated topic
    partition: int
    offset: int
    input: str | None = None  # "topic/partition/offset" of the original input (its header)
    value: bytes = b""  # filled in only for records that become exceptions


@dataclass(frozen=True)
class Expected:
    """One validated event and the effects a correct sink leaves for it."""

    key: str
    order_id: str
    event_type: str
    currency: str  # "" when the event carries none (a cancellation: its invoices')
    amount_minor: int | None  # the money it moves (a cancellation: what it reverses)
    occurred_at: datetime
    position: int  # order on the topic (per order it is the processing order)
    ledger_minor: int | None = None  # a "post" rule's journal total; None: no journal
    reverses: tuple[str, ...] = ()  # a cancellation: keys whose journals/invoices it reverses
    sale_minor: int | None = None  # booking/amendment: the sale's untaxed amount
    source: Source | None = None

    @property
    def period(self) -> str:
        return period_of(self.occurred_at)


@dataclass
class StreamView:
    """The validated topic, read once: first copy per key, in topic order."""

    records: list[Expected] = field(default_factory=list)
    copies: int = 0  # records beyond the first per key (replays, redeliveries)
    conflicts: list[str] = field(default_factory=list)  # same key, different effect
    undecodable: list[str] = field(default_factory=list)  # coordinates
    truncated: dict[int, int] = field(default_factory=dict)  # partition -> low watermark
    in_flight: int = 0  # records past the sink's committed offsets: not judged

    def __post_init__(self) -> None:
        self._by_key = {e.key: e for e in self.records}

    @property
    def by_key(self) -> Mapping[str, Expected]:
        if len(self._by_key) != len(self.records):
            self._by_key = {e.key: e for e in self.records}
        return self._by_key

    def in_window(self, window: Window) -> list[Expected]:
        return [e for e in self.records if window.contains(e.occurred_at)]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _net(lines: Any) -> int | None:
    """Untaxed amount of event lines, as ``_mapping.price_lines`` keeps it exactly."""
    if not isinstance(lines, list):
        return None
    total = 0
    for ln in lines:
        qty, unit = _int(ln.get("quantity")), _int(ln.get("unit_price_minor"))
        if qty is None or unit is None:
            return None
        total += qty * unit - (_int(ln.get("discount_minor")) or 0)
    return total


def expected_from_events(
    events: Iterable[tuple[Event, Source | None]], rules: PostingRules
) -> StreamView:
    """Pure: the expected effects of validated events given in topic order."""
    view = StreamView()
    seen: dict[str, Expected] = {}
    open_journals: dict[str, list[str]] = defaultdict(list)  # order -> reversible event keys
    by_key: dict[str, Expected] = {}
    for position, (event, source) in enumerate(events):
        env = event["envelope"]
        key = str(env["idempotency_key"])
        etype = str(env["event_type"])
        order_id = str(env["order_id"])
        rule = rules.rule_for(etype)
        currency = event.get("currency")
        currency = currency if isinstance(currency, str) else ""
        ledger_minor: int | None = None
        amount: int | None = None
        reverses: tuple[str, ...] = ()
        if rule is not None and rule.action == "post":
            debits = [_int(event.get(line.amount)) for line in rule.lines if line.side == "debit"]
            ledger_minor = sum(d or 0 for d in debits) or None
            field_currency = event.get(rule.currency)
            currency = field_currency if isinstance(field_currency, str) else currency
        if etype in ("invoice_issued",):
            amount = _int(event.get("total_minor"))
        elif etype in ("payment_captured", "refund_issued"):
            amount = _int(event.get("amount_minor"))
        if key in seen:
            view.copies += 1
            first = seen[key]
            if (first.event_type, first.amount_minor) != (etype, amount):
                view.conflicts.append(key)
            continue
        if rule is not None and rule.action == "reverse":
            targets = [k for k in open_journals[order_id] if by_key[k].event_type in rule.reverses]
            open_journals[order_id] = [k for k in open_journals[order_id] if k not in targets]
            reverses = tuple(targets)
            amount = sum(by_key[k].ledger_minor or 0 for k in targets) or None
            currency = next((by_key[k].currency for k in targets), currency)
        expected = Expected(
            key=key, order_id=order_id, event_type=etype, currency=currency,
            amount_minor=amount, occurred_at=env["occurred_at"], position=position,
            ledger_minor=ledger_minor, reverses=reverses,
            sale_minor=_net(event.get("lines")) if etype in _SHAPING else None,
            source=source,
        )  # fmt: skip
        seen[key] = by_key[key] = expected
        if ledger_minor:
            open_journals[order_id].append(key)
        view.records.append(expected)
    return view


# -- results ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Issue:
    system: str  # ledger | erp
    kind: str  # missing | extra | mismatch | refused
    key: str
    order_id: str | None
    event_type: str
    currency: str
    period: str
    expected_minor: int | None
    actual_minor: int | None
    detail: str
    money: bool = True
    refs: tuple[str, ...] = ()  # journal ids / ERP document ids involved
    source: Source | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("source")
        out["refs"] = list(self.refs)
        out["validated_record"] = (
            f"{self.source.topic}/{self.source.partition}/{self.source.offset}"
            if self.source else None
        )  # fmt: skip
        out["input"] = self.source.input if self.source else None
        return out


@dataclass
class Cell:
    """Counts and amounts of one (event type, currency, period) on the stream and a system."""

    stream_count: int = 0
    stream_minor: int = 0
    count: int = 0
    minor: int = 0


CellKey = tuple[str, str, str]  # event type, currency, period


@dataclass
class SystemReport:
    system: str
    checked: int = 0  # records the system must hold an effect for
    matched: int = 0
    missing: list[Issue] = field(default_factory=list)
    extra: list[Issue] = field(default_factory=list)
    mismatched: list[Issue] = field(default_factory=list)
    refused: list[Issue] = field(default_factory=list)  # already owned: not drift
    cells: dict[CellKey, Cell] = field(default_factory=dict)
    reconciled: bool = True
    note: str = ""

    @property
    def issues(self) -> list[Issue]:
        return [*self.missing, *self.extra, *self.mismatched]

    @property
    def drift_count(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.mismatched)

    @property
    def drift_pct(self) -> float:
        return drift_pct(self.drift_count, self.checked)

    def cell(self, key: CellKey) -> Cell:
        return self.cells.setdefault(key, Cell())

    def summary(self) -> dict[str, Any]:
        if not self.reconciled:
            return {"reconciled": False, "note": self.note}
        return {
            "reconciled": True, "checked": self.checked, "matched": self.matched,
            "missing": len(self.missing), "extra": len(self.extra),
            "mismatched": len(self.mismatched), "refused": len(self.refused),
            "drift_pct": round(self.drift_pct, 4),
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "note": self.note,
            "by_type_currency_period": [
                {"event_type": t, "currency": c, "period": p, **asdict(cell)}
                for (t, c, p), cell in sorted(self.cells.items())
            ],
            "missing_records": [i.to_dict() for i in self.missing],
            "extra_records": [i.to_dict() for i in self.extra],
            "mismatched_records": [i.to_dict() for i in self.mismatched],
            "refused_records": [i.to_dict() for i in self.refused],
        }


def drift_pct(issues: int, checked: int) -> float:
    if issues == 0:
        return 0.0
    return 100.0 * issues / checked if checked else 100.0


# -- ledger ----------------------------------------------------------------------------
def _ledger_expectation(
    e: Expected, stream: StreamView, refused: Mapping[str, str]
) -> tuple[int, str] | None:
    """(journal total, currency) a correct ledger holds for ``e``; None: nothing."""
    if e.reverses:
        targets = [stream.by_key[k] for k in e.reverses if k not in refused]
        total = sum(t.ledger_minor or 0 for t in targets)
        return (total, targets[0].currency) if total else None
    return (e.ledger_minor, e.currency) if e.ledger_minor else None


def compare_ledger(
    stream: StreamView,
    journals: Sequence[JournalSummary],
    refused: Mapping[str, str],
    window: Window = ALL_TIME,
) -> SystemReport:
    """Pure: the stream's expected journals vs the ledger's, per event key.

    ``refused``: event key -> reason for the ledger's "refused" side effects.
    """
    report = SystemReport(LEDGER)
    held: dict[str, list[JournalSummary]] = defaultdict(list)
    for j in journals:
        if window.contains(j.occurred_at):
            held[j.event_key].append(j)
    for e in stream.in_window(window):
        actual = held.pop(e.key, [])
        want = _ledger_expectation(e, stream, refused)
        if e.amount_minor is not None or want is not None:
            cell = report.cell((e.event_type, e.currency, e.period))
            cell.stream_count += 1
            cell.stream_minor += e.amount_minor or 0
        if actual:
            currency = actual[0].currency
            cell = report.cell((e.event_type, currency, e.period))
            cell.count += 1
            cell.minor += sum(j.total_minor for j in actual)
        if e.key in refused:
            report.refused.append(_issue(LEDGER, "refused", e, want, actual, refused[e.key]))
            continue
        if want is None:
            if actual:
                report.extra.append(_issue(
                    LEDGER, "extra", e, None, actual,
                    f"the ledger holds {len(actual)} journal(s) for a {e.event_type} that "
                    "posts nothing under the posting rules"))  # fmt: skip
            continue
        report.checked += 1
        total, currency = want
        if not actual:
            report.missing.append(_issue(LEDGER, "missing", e, want, actual,
                                         "no journal in the ledger"))
            continue
        got = sum(j.total_minor for j in actual)
        problems = []
        if got != total:
            problems.append(f"journal total {fmt_minor(got, currency)} ≠ "
                            f"{fmt_minor(total, currency)} on the stream")  # fmt: skip
        currencies = {j.currency for j in actual}
        if currencies != {currency}:
            problems.append(f"currency {'/'.join(sorted(currencies))} ≠ {currency}")
        types = {j.event_type for j in actual}
        if types != {e.event_type}:
            problems.append(f"journal type {'/'.join(sorted(types))} ≠ {e.event_type}")
        wanted_count = len([k for k in e.reverses if k not in refused]) if e.reverses else 1
        if len(actual) != wanted_count:
            problems.append(f"{len(actual)} journals, expected {wanted_count}")
        if problems:
            report.mismatched.append(_issue(LEDGER, "mismatch", e, want, actual,
                                            "; ".join(problems)))
        else:
            report.matched += 1
    for event_key, actual in sorted(held.items()):
        first = actual[0]
        got = sum(j.total_minor for j in actual)
        cell = report.cell((first.event_type, first.currency, period_of(first.occurred_at)))
        cell.count += 1
        cell.minor += got
        report.extra.append(Issue(
            LEDGER, "extra", event_key, first.order_id, first.event_type, first.currency,
            period_of(first.occurred_at), None, got,
            f"journal(s) for {event_key}, which is not a validated event on the stream",
            refs=tuple(j.id for j in actual)))  # fmt: skip
    return report


def _issue(
    system: str, kind: str, e: Expected, want: tuple[int, str] | None,
    actual: Sequence[JournalSummary], detail: str,
) -> Issue:  # fmt: skip
    return Issue(
        system, kind, e.key, e.order_id, e.event_type, want[1] if want else e.currency,
        e.period, want[0] if want else None,
        sum(j.total_minor for j in actual) if actual else None, detail,
        refs=tuple(j.id for j in actual), source=e.source,
    )  # fmt: skip


# -- ERP -------------------------------------------------------------------------------
def compare_erp(
    stream: StreamView,
    documents: Sequence[ErpDocument],
    refused: Mapping[str, str],
    partial: Mapping[str, str] | None = None,
    window: Window = ALL_TIME,
) -> SystemReport:
    """Pure: the ERP documents each validated event should have left, per event key.

    ``refused`` / ``partial``: event key -> detail of the ERP's side-effect rows with
    that status. A partial write not completed since is drift (a person must finish
    or correct it); a refusal is not (its exception is already owned).
    """
    partial = partial or {}
    report = SystemReport(ERP)
    docs: dict[str, dict[str, list[ErpDocument]]] = defaultdict(lambda: defaultdict(list))
    drafts: dict[str, list[ErpDocument]] = defaultdict(list)
    for d in documents:
        if d.state in _ERP_DONE:
            drafts[d.idempotency_key].append(d)
        else:
            docs[d.idempotency_key][d.step].append(d)
    # The sale holds the lines of the order's latest booking/amendment the ERP took.
    shaping: dict[str, str] = {}
    cancelled_orders: set[str] = set()
    for e in stream.records:
        if e.key in refused:
            continue
        if e.event_type in _SHAPING:
            shaping[e.order_id] = e.key
        elif e.event_type == "order_cancelled":
            cancelled_orders.add(e.order_id)
    for e in stream.in_window(window):
        steps = ERP_STEPS.get(e.event_type)
        if steps is None:
            continue
        want: dict[str, tuple[int, int | None]] = {s: (1, None) for s in steps}  # count, amount
        if e.event_type == "invoice_issued":
            want[m.INVOICE] = (1, e.amount_minor)
        elif e.event_type == "payment_captured":
            want[m.PAYMENT] = (1, e.amount_minor)
        elif e.event_type == "refund_issued":
            amount = None if e.amount_minor is None else -e.amount_minor
            want[m.CREDIT_NOTE] = (1, amount)
            want[m.REFUND_PAYMENT] = (1, amount)
        elif e.event_type == "order_cancelled":
            credited = [stream.by_key[k] for k in e.reverses if k not in refused]
            if credited:
                want[m.CREDIT_NOTE] = (len(credited), -sum(t.amount_minor or 0 for t in credited))
        elif shaping.get(e.order_id) == e.key:
            want[m.SALE] = (1, e.sale_minor)
        have = docs.pop(e.key, {})
        primary = PRIMARY_STEP.get(e.event_type)
        is_money = primary in want
        money_want = want[primary][1] if primary in want else None
        money_have = (sum(d.amount_minor for d in have[primary])
                      if primary is not None and primary in have else None)  # fmt: skip
        if is_money:
            cell = report.cell((e.event_type, e.currency, e.period))
            cell.stream_count += 1
            cell.stream_minor += abs(money_want or 0)
            if money_have is not None:
                cell.count += 1
                cell.minor += abs(money_have)
        refs = tuple(sorted({f"{d.step}:{d.ref}" for ds in have.values() for d in ds}))
        currency = e.currency or next((d.currency for ds in have.values() for d in ds), "")

        def issue(kind: str, detail: str, e: Expected = e, refs: tuple[str, ...] = refs,
                  currency: str = currency, want_: int | None = money_want,
                  have_: int | None = money_have, money: bool = is_money) -> Issue:
            return Issue(ERP, kind, e.key, e.order_id, e.event_type, currency, e.period,
                         want_, have_, detail, money=money, refs=refs, source=e.source)

        if e.key in refused:
            report.refused.append(issue("refused", refused[e.key]))
            continue
        report.checked += 1
        problems: list[str] = []
        for step, (count, amount) in want.items():
            found = have.get(step, [])
            if not found:
                draft = [d for d in drafts.get(e.key, []) if d.step == step]
                problems.append(f"no {step}" + (f" (document {draft[0].ref} is still a draft)"
                                                if draft else ""))  # fmt: skip
                continue
            if len(found) != count:
                ids = ", ".join(d.ref for d in found)
                problems.append(f"{len(found)} {step} documents ({ids}), expected {count}")
            got = sum(d.amount_minor for d in found)
            if amount is not None and got != amount:
                cur = found[0].currency
                problems.append(f"{step} {found[0].ref} amount {fmt_minor(got, cur)} ≠ "
                                f"{fmt_minor(amount, cur)} on the stream")  # fmt: skip
            currencies = {d.currency for d in found}
            if e.currency and currencies != {e.currency}:
                problems.append(f"{step} in {'/'.join(sorted(currencies))} ≠ {e.currency}")
            if step == m.SALE and e.order_id not in cancelled_orders and any(
                d.state == "cancelled" for d in found
            ):
                problems.append(f"sale {found[0].ref} is cancelled in the ERP, "
                                "but the stream never cancelled the order")  # fmt: skip
        for step in sorted(set(have) - set(want)):
            problems.append(f"unexpected {step} document(s) "
                            f"{', '.join(d.ref for d in have[step])}")  # fmt: skip
        if e.key in partial:
            problems.append(f"partial write not completed: {partial[e.key]}")
        if not have and e.key not in partial:
            report.missing.append(issue("missing", "; ".join(problems)))
        elif problems:
            report.mismatched.append(issue("mismatch", "; ".join(problems)))
        else:
            report.matched += 1
    for key, have in sorted(docs.items()):
        if key in stream.by_key:
            continue  # an event outside the window, or one with no ERP step (checked above)
        found = [d for ds in have.values() for d in ds]
        if not any(window.contains(d.day) for d in found):
            continue
        money = [d for d in found if d.step in MONEY_STEPS]
        first = found[0]
        amount = sum(d.amount_minor for d in money) if money else None
        report.extra.append(Issue(
            ERP, "extra", key, None, "?", first.currency, period_of(first.day), None, amount,
            "ERP document(s) marked with a key that is not a validated event on the stream: "
            + ", ".join(f"{d.step} {d.ref}" for d in found),
            money=bool(money), refs=tuple(f"{d.step}:{d.ref}" for d in found)))  # fmt: skip
    return report


# -- the whole report ------------------------------------------------------------------
@dataclass
class Report:
    window: Window
    stream: StreamView
    systems: list[SystemReport]
    notes: list[str] = field(default_factory=list)
    at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    exceptions_opened: int = 0
    exceptions_known: int = 0

    @property
    def reconciled(self) -> list[SystemReport]:
        return [s for s in self.systems if s.reconciled]

    @property
    def checked(self) -> int:
        return sum(s.checked for s in self.reconciled)

    @property
    def issues(self) -> list[Issue]:
        return [i for s in self.reconciled for i in s.issues]

    @property
    def drift_pct(self) -> float:
        return drift_pct(len(self.issues), self.checked)

    def system(self, name: str) -> SystemReport:
        return next(s for s in self.systems if s.system == name)

    def fact_detail(self) -> dict[str, Any]:
        """What the audit fact records (the Monday report reads the latest one)."""
        return {
            "period": self.window.label,
            "since": self.window.start.isoformat() if self.window.start else None,
            "until": self.window.end.isoformat() if self.window.end else None,
            "drift_pct": round(self.drift_pct, 4),
            "checked": self.checked,
            "missing": sum(len(s.missing) for s in self.reconciled),
            "extra": sum(len(s.extra) for s in self.reconciled),
            "mismatched": sum(len(s.mismatched) for s in self.reconciled),
            "refused": sum(len(s.refused) for s in self.reconciled),
            "events": len(self.stream.in_window(self.window)),
            "exceptions_opened": self.exceptions_opened,
            **{s.system: s.summary() for s in self.systems},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.fact_detail(),
            "at_ms": self.at_ms,
            "exceptions_already_open": self.exceptions_known,
            "stream": {
                "validated_events": len(self.stream.records),
                "copies_beyond_first": self.stream.copies,
                "conflicting_copies": self.stream.conflicts,
                "undecodable": self.stream.undecodable,
                "truncated_partitions": {str(p): o for p, o in self.stream.truncated.items()},
            },
            "notes": self.notes,
            "systems": {s.system: s.to_dict() for s in self.systems},
        }


def not_reconciled(system: str, note: str) -> SystemReport:
    return SystemReport(system, reconciled=False, note=note)


def stream_notes(stream: StreamView) -> list[str]:
    notes = []
    if stream.truncated:
        parts = ", ".join(f"{p} from offset {o}" for p, o in sorted(stream.truncated.items()))
        notes.append(
            f"the validated topic no longer holds its oldest records (retention: partition "
            f"{parts}); effects of those events show as extra"
        )
    if stream.undecodable:
        notes.append(f"{len(stream.undecodable)} undecodable record(s) on the validated topic "
                     f"(first: {stream.undecodable[0]}); the sink refused them too")  # fmt: skip
    if stream.conflicts:
        notes.append(f"{len(stream.conflicts)} key(s) appear on the validated topic with "
                     f"different amounts (first: {stream.conflicts[0]}); the first copy counts")
    return notes


def reconcile(
    stream: StreamView,
    window: Window,
    ledger: SqlLedger,
    erp: ErpInventory | None,
    *,
    erp_note: str = "",
) -> Report:
    """Read the ledger (and the ERP, when given) and compare both with the stream."""
    journals = ledger.journal_summaries(window.start, window.end)
    ledger_refused = {e.idempotency_key: e.detail
                      for e in ledger.all_effects(LEDGER, statuses=("refused",))}
    systems = [compare_ledger(stream, journals, ledger_refused, window)]
    if erp is not None:
        erp_rows = ledger.all_effects(ERP, statuses=("refused", "partial"))
        refused = {e.idempotency_key: e.detail for e in erp_rows if e.status == "refused"}
        partial = {e.idempotency_key: e.detail for e in erp_rows if e.status == "partial"}
        systems.append(compare_erp(stream, erp.documents(), refused, partial, window))
    else:
        systems.append(not_reconciled(ERP, erp_note or "no ERP to read"))
    return Report(window, stream, systems, notes=stream_notes(stream))


# -- exceptions ------------------------------------------------------------------------
def exception_id(issue: Issue) -> str:
    # The record's own period (not the run's window): re-runs over any window that
    # includes it reproduce the same id, so nothing is opened twice.
    return exception_id_for(f"reconcile|{issue.period}|{issue.system}|{issue.key}|{issue.kind}")


_CHECKS = {"missing": CHECK_MISSING, "extra": CHECK_EXTRA, "mismatch": CHECK_MISMATCH}


def exception_records(
    issues: Iterable[Issue], *, now_ms: int, sla_minutes: Mapping[str, int], rules_version: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Pure: (Kafka key, ExceptionRecord dict) per drift issue; refusals have theirs."""
    for issue in issues:
        check = _CHECKS.get(issue.kind)
        if check is None:
            continue
        severity = "P1" if issue.money else "P2"
        where = "the ledger" if issue.system == LEDGER else "the ERP"
        amounts = ""
        if issue.expected_minor is not None or issue.actual_minor is not None:
            amounts = (f" (stream {fmt_minor(issue.expected_minor, issue.currency)}, "
                       f"{issue.system} {fmt_minor(issue.actual_minor, issue.currency)})")
        reason = f"{issue.kind} in {where}: {issue.event_type} {issue.key}{amounts}: {issue.detail}"
        src = issue.source
        coords = (src.input or "").rsplit("/", 2) if src else []
        if src and len(coords) != 3:  # no input header: point at the validated record
            coords = [src.topic, str(src.partition), str(src.offset)]
        yield issue.order_id or issue.key, {
            "exception_id": exception_id(issue),
            "check_id": check,
            "severity": severity,
            "owner": OWNER,
            "reason": reason,
            "all_findings": [{"check_id": check, "reason": reason}],
            "blocking": True,
            "opened_at_ms": now_ms,
            "sla_deadline_ms": now_ms + int(sla_minutes.get(severity, 15)) * 60_000,
            "rules_version": rules_version,
            "event_type": issue.event_type if issue.event_type != "?" else None,
            "idempotency_key": issue.key,
            "order_id": issue.order_id,
            "source_system": issue.system,
            "source_record_id": ",".join(issue.refs) or None,
            # No input for an extra record: -1 says so (the ERP/ledger refs name it).
            "input_topic": coords[0] if coords else "",
            "input_partition": int(coords[1]) if coords else -1,
            "input_offset": int(coords[2]) if coords else -1,
            "event": src.value if src else b"",
        }


# -- formatting ------------------------------------------------------------------------
def fmt_minor(minor: int | None, currency: str) -> str:
    """Minor units as the currency's major units: ``1,234.56 EUR``, ``1,235 JPY``."""
    if minor is None:
        return "—"
    digits = m.currency_digits(currency) if currency else 2
    major = m.to_major(minor, digits)
    return f"{major:,.{digits}f} {currency}".strip()


# -- I/O: Kafka ------------------------------------------------------------------------
def read_stream(
    bootstrap: str,
    topic: str,
    decoder: EventDeserializer,
    rules: PostingRules,
    *,
    progress: Callable[[int], None] | None = None,
    timeout: float = 600.0,
    applied_upto: Mapping[int, int] | None = None,
) -> StreamView:
    """Read the validated topic and derive the expected effects.

    With ``applied_upto`` (partition -> the sink group's committed offset), records the
    sink has not reached yet are counted as in flight, not expected: an outage or a lag
    is not drift.
    """
    undecodable: list[str] = []
    in_flight = 0

    def events() -> Iterator[tuple[Event, Source | None]]:
        nonlocal in_flight
        for n, msg in enumerate(read_topic(bootstrap, topic, timeout=timeout), start=1):
            if progress is not None and n % 1000 == 0:
                progress(n)
            if applied_upto is not None and (msg.offset() or 0) >= applied_upto.get(
                    msg.partition() or 0, 0):
                in_flight += 1
                continue
            coords = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
            try:
                event = decoder.decode(msg.value() or b"")
            except DecodeError:
                undecodable.append(coords)
                continue
            raw = header(msg, "revline.input")
            yield event, Source(msg.topic() or topic, msg.partition() or 0, msg.offset() or 0,
                                raw.decode() if raw else None)  # fmt: skip

    view = expected_from_events(events(), rules)
    view.undecodable = undecodable
    view.in_flight = in_flight
    view.truncated = low_watermarks(bootstrap, topic)
    return view


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int] | None:
    """partition -> the group's committed offset on ``topic``; None if it never committed."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
    finally:
        consumer.close()
    offsets = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
    return offsets or None


def _consumer(bootstrap: str) -> Consumer:
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"revline-reconcile-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    })


def low_watermarks(bootstrap: str, topic: str) -> dict[int, int]:
    """Partitions whose oldest records retention already deleted: partition -> low offset."""
    consumer = _consumer(bootstrap)
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        lows = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[0]
                for p in parts}  # fmt: skip
        return {p: low for p, low in sorted(lows.items()) if low > 0}
    finally:
        consumer.close()


def fetch_values(bootstrap: str, sources: Iterable[Source], timeout: float = 30.0) -> None:
    """Fill in ``value`` (the event bytes) of the given sources, one fetch per record.

    Only the few records that become exceptions need their bytes, so the topic read
    does not keep every event's bytes in memory.
    """
    wanted = {(s.topic, s.partition, s.offset): s for s in sources if not s.value}
    if not wanted:
        return
    consumer = _consumer(bootstrap)
    deadline = time.monotonic() + timeout
    try:
        for (topic, partition, offset), src in wanted.items():
            consumer.assign([TopicPartition(topic, partition, offset)])
            while time.monotonic() < deadline:
                msg = consumer.poll(1.0)
                if msg is None or msg.error():
                    continue
                if msg.offset() == offset:
                    src.value = msg.value() or b""
                break
    finally:
        consumer.close()


def known_exception_ids(bootstrap: str, topic: str, timeout: float = 120.0) -> set[str]:
    """Ids of the reconcile exceptions already on ``topic`` (headers only, no decoding)."""
    ids: set[str] = set()
    for msg in read_topic(bootstrap, topic, timeout=timeout):
        if header(msg, SOURCE_HEADER) == SOURCE.encode():
            found = header(msg, EXCEPTION_ID_HEADER)
            if found:
                ids.add(found.decode())
    return ids


def open_exceptions(
    report: Report,
    bootstrap: str,
    producer: Producer,
    topic: str,
    *,
    sla_minutes: Mapping[str, int],
    rules_version: str,
) -> int:
    """Produce one exception per drift issue not already opened by an earlier run.

    The ids are deterministic; the ones already on the topic are skipped, so
    re-running over the same drift opens nothing new. Returns how many were opened.
    """
    issues = report.issues
    known = known_exception_ids(bootstrap, topic) if issues else set()
    fresh = [i for i in issues if exception_id(i) not in known]
    fetch_values(bootstrap, [i.source for i in fresh if i.source is not None])
    codec = exception_codec()
    opened: set[str] = set()
    for key, record in exception_records(
        fresh, now_ms=report.at_ms, sla_minutes=sla_minutes, rules_version=rules_version
    ):
        if record["exception_id"] in opened:
            continue
        opened.add(record["exception_id"])
        producer.produce(topic, key=key.encode(), value=codec.encode(record), headers=[
            (SOURCE_HEADER, SOURCE.encode()),
            (EXCEPTION_ID_HEADER, record["exception_id"].encode()),
        ])  # fmt: skip
        producer.poll(0)
    if producer.flush(30):
        raise InfrastructureError(f"reconcile exceptions not acknowledged by Kafka ({topic})")
    report.exceptions_opened = len(opened)
    report.exceptions_known = len(issues) - len(fresh)
    return len(opened)


def audit_fact(report: Report, actor: str = "reconcile") -> AuditFact:
    """The run's audit fact (operations chain): a new fact per run."""
    return AuditFact(
        fact_id=f"reconcile:{report.window.label}:{report.at_ms}",
        kind="reconcile",
        actor=actor,
        order_id=None,
        detail=report.fact_detail(),
        at_ms=report.at_ms,
    )
