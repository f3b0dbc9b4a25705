"""Reconciliation: what the stream concluded vs what the ledger and the ERP hold.

The stream's side is the validated topic: every event that passed QA, decoded with
``schemas.EventDeserializer``. An effect is identified by ``(order_id, idempotency_key)``
(docs/lifecycle.md): two orders may share a key and are two facts; a second copy of
the same (order, key) on the topic is a replay, expected once. From each event this
module derives what a correct sink leaves behind, with the same rules the sink uses:

* ledger — ``sinks/ledger/postings.yaml``: a ``post`` rule makes one journal whose
  total is the sum of its debit lines (invoice: ``total_minor``; payment and refund:
  ``amount_minor``), none when that is 0; a ``reverse`` rule (cancellation) makes one
  credit note per journal of the order's earlier events of the listed types that no
  earlier cancellation reversed, and when it makes any, one journal per account it
  ``reclassify``-s holding the order's balance there (the refunds posted before it);
  every other type posts nothing. (A refund after the cancellation posts its amount
  on other accounts, ``after_reversal``: the same journal total.)
* ERP — the steps of ``sinks/erp/_mapping.py``: booking and amendment → the sale
  (its untaxed amount is checked against the order's latest booking/amendment);
  invoice → the sale and one invoice of ``total_minor``; payment → one payment move;
  refund → one credit note of ``-amount_minor`` and one refund payment, or once the
  cancellation has credited the order's invoices, the refund payment alone (it pays
  out that credit); cancellation → the sale, not cancelled behind the stream's back,
  plus one credit note per earlier invoice (``-total``) and one per earlier refund's
  credit note (``+amount``: what the refund gave back, taken back, since the invoices'
  notes give back everything).

Two comparisons, both counting every copy a system holds (never only the first per
key): per record (``compare_ledger``, ``compare_erp``: a missing, extra or mismatched
journal or document, named with its refs) and per order (``compare_orders``: the money
per order, event type and currency the stream implies vs what each system holds, so
a doubled effect, an unexplained posting or a lost one always moves an order's
totals). An order is drifted when its totals differ or a record of it is wrong; each
drifted order opens one ``reconciliation.drift`` exception (owner finance) whose id is
a function of the order and what differs, so a re-run opens nothing twice.

Drift % is over money, per currency: the sum of absolute differences over the sum
expected, both systems together; the overall figure is the worst currency's (minor
units of different currencies are never added). The record counts of before stay in
the report (``record_drift_pct``).

Everything that compares is a pure function over plain values; ``read_stream`` and
``reconcile`` do the I/O. An event the sink refused (side-effect status ``refused``)
already has an owned exception: it is listed separately and is not drift.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from revline.core.auditlog import AuditFact
from revline.core.errors import ConfigurationError, InfrastructureError
from revline.core.kafka_config import client_config
from revline.core.money import format_money
from revline.core.readback import header, read_topic
from revline.processors import exception_id_for
from revline.schemas import DecodeError, EventDeserializer, exception_codec
from revline.sinks._protocols import ErpDocument, ErpInventory, Event
from revline.sinks.erp import _mapping as m
from revline.sinks.ledger import JournalSummary, PostingRules, SideEffect, SqlLedger

LEDGER = "ledger"
ERP = "erp"
# The check of every exception reconciliation opens (revline/data/rules.yaml: P1, finance).
CHECK_DRIFT = "reconciliation.drift"
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
    reverses: tuple[str, ...] = ()  # a cancellation: keys whose journals it reverses
    # A cancellation: keys of the invoices the ERP credits: every invoice, a zero one
    # too (the ERP posts a zero invoice and credits it; the ledger posts nothing for it),
    # and of the refunds before it, whose credit notes it credits in turn.
    credits: tuple[str, ...] = ()
    # A refund after a cancellation that credited invoices: the ERP pays out that
    # credit (a refund payment, no credit note of its own).
    pays_credit: bool = False
    # A cancellation: (event key, currency, account, signed minor units) of what the
    # order's earlier events left on the accounts its rule reclassifies (refunds).
    reclass: tuple[tuple[str, str, str, int], ...] = ()
    sale_minor: int | None = None  # booking/amendment: the sale's untaxed amount
    source: Source | None = None

    @property
    def period(self) -> str:
        return period_of(self.occurred_at)

    @property
    def effect(self) -> Effect:
        return (self.order_id, self.key)


Effect = tuple[str, str]  # (order_id, idempotency_key): the identity of an effect


@dataclass
class StreamView:
    """The validated topic, read once: one record per (order, key), in topic order."""

    records: list[Expected] = field(default_factory=list)
    copies: int = 0  # records beyond the first per (order, key) (replays, redeliveries)
    conflicts: list[str] = field(default_factory=list)  # same (order, key), different effect
    undecodable: list[str] = field(default_factory=list)  # coordinates
    truncated: dict[int, int] = field(default_factory=dict)  # partition -> low watermark
    in_flight: int = 0  # records past the sink's committed offsets: not judged
    # Their (order, key): what the sink may already have written for them is not judged either.
    in_flight_effects: set[Effect] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._index()

    def _index(self) -> None:
        self._by_effect = {e.effect: e for e in self.records}
        self._orders_of_key: dict[str, list[str]] = defaultdict(list)
        for e in self.records:
            self._orders_of_key[e.key].append(e.order_id)

    @property
    def by_effect(self) -> Mapping[Effect, Expected]:
        if len(self._by_effect) != len(self.records):
            self._index()
        return self._by_effect

    @property
    def by_key(self) -> Mapping[str, Expected]:
        """Key -> its first record. A key two orders share names only the first order's:
        use ``by_effect`` to look an effect up."""
        out: dict[str, Expected] = {}
        for e in self.records:
            out.setdefault(e.key, e)
        return out

    def orders_of(self, key: str) -> list[str]:
        """The orders that have a validated event under ``key``."""
        if len(self._by_effect) != len(self.records):
            self._index()
        return self._orders_of_key.get(key, [])

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
    seen: dict[Effect, Expected] = {}
    open_journals: dict[str, list[str]] = defaultdict(list)  # order -> reversible event keys
    # order -> invoices and refunds not credited; orders whose invoices a cancellation credited
    open_invoices: dict[str, list[str]] = defaultdict(list)
    credited_orders: set[str] = set()
    moved = {r.account for rule in rules.rules for r in rule.reclassify}
    # order -> (key, currency, account, signed amount) posted on a reclassified account
    # since the order's last cancellation; (order, currency) with a credit note.
    on_moved: dict[str, list[tuple[str, str, str, int]]] = defaultdict(list)
    credited: set[tuple[str, str]] = set()
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
        credits: tuple[str, ...] = ()
        reclass: tuple[tuple[str, str, str, int], ...] = ()
        posted: list[tuple[str, str, str, int]] = []
        pays_credit = etype == "refund_issued" and order_id in credited_orders
        if rule is not None and rule.action == "post":
            debits = [_int(event.get(line.amount)) for line in rule.lines if line.side == "debit"]
            ledger_minor = sum(d or 0 for d in debits) or None
            field_currency = event.get(rule.currency)
            currency = field_currency if isinstance(field_currency, str) else currency
            lines = rule.after_reversal if (order_id, currency) in credited else ()
            for line in lines or rule.lines:
                n = _int(event.get(line.amount)) or 0
                if line.account in moved and n:
                    posted.append((key, currency, line.account, n if line.side == "debit" else -n))
        if etype in ("invoice_issued",):
            amount = _int(event.get("total_minor"))
        elif etype in ("payment_captured", "refund_issued"):
            amount = _int(event.get("amount_minor"))
        if (order_id, key) in seen:
            view.copies += 1
            first = seen[order_id, key]
            if (first.event_type, first.amount_minor) != (etype, amount):
                view.conflicts.append(key)
            continue
        if rule is not None and rule.action == "reverse":
            mine = {k: seen[order_id, k] for k in open_journals[order_id]}
            targets = [k for k, t in mine.items() if t.event_type in rule.reverses]
            open_journals[order_id] = [k for k in open_journals[order_id] if k not in targets]
            reverses = tuple(targets)
            amount = sum(mine[k].ledger_minor or 0 for k in targets) or None
            currency = next((mine[k].currency for k in targets), currency)
            credits = tuple(open_invoices.pop(order_id, []))
            if any(seen[order_id, k].event_type == "invoice_issued" for k in credits):
                credited_orders.add(order_id)
            if targets:
                cur = {mine[k].currency for k in targets}
                accounts = {r.account for r in rule.reclassify}
                reclass = tuple(x for x in on_moved[order_id] if x[1] in cur and x[2] in accounts)
                on_moved[order_id] = [x for x in on_moved[order_id] if x not in reclass]
                credited.update((order_id, c) for c in cur)
        expected = Expected(
            key=key, order_id=order_id, event_type=etype, currency=currency,
            amount_minor=amount, occurred_at=env["occurred_at"], position=position,
            ledger_minor=ledger_minor, reverses=reverses, credits=credits, reclass=reclass,
            pays_credit=pays_credit,
            sale_minor=_net(event.get("lines")) if etype in _SHAPING else None,
            source=source,
        )  # fmt: skip
        seen[order_id, key] = expected
        on_moved[order_id] += posted
        if ledger_minor:
            open_journals[order_id].append(key)
        if etype == "invoice_issued" or (etype == "refund_issued" and not pays_credit):
            open_invoices[order_id].append(key)
        view.records.append(expected)
    view._index()
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
    e: Expected, stream: StreamView, refused: Mapping[Effect, str]
) -> tuple[int, str] | None:
    """(journal total, currency) a correct ledger holds for ``e``; None: nothing."""
    if e.reverses:
        targets = _reversed(e, stream, refused)
        total = sum(t.ledger_minor or 0 for t in targets)
        total += sum(n for _, n in _reclassified(e, targets, refused))
        return (total, targets[0].currency) if total else None
    return (e.ledger_minor, e.currency) if e.ledger_minor else None


def _reclassified(
    e: Expected, targets: Sequence[Expected], refused: Mapping[Effect, str]
) -> list[tuple[str, int]]:
    """(currency, total) of each journal a cancellation posts to move a balance: per
    account and currency it credits invoices in, the order's balance there, if not 0."""
    currencies = {t.currency for t in targets}
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for key, currency, account, amount in e.reclass:
        if currency in currencies and (e.order_id, key) not in refused:
            sums[account, currency] += amount
    return [(currency, abs(n)) for (_, currency), n in sorted(sums.items()) if n]


def _reversed(e: Expected, stream: StreamView, refused: Mapping[Effect, str]) -> list[Expected]:
    """The order's earlier events a cancellation reverses, less those ``refused``."""
    return [stream.by_effect[e.order_id, k] for k in e.reverses if (e.order_id, k) not in refused]


def compare_ledger(
    stream: StreamView,
    journals: Sequence[JournalSummary],
    refused: Mapping[Effect, str],
    window: Window = ALL_TIME,
) -> SystemReport:
    """Pure: the stream's expected journals vs the ledger's, per (order, event key).

    Every journal counts: two for one effect is a doubled effect, a journal whose
    (order, key) is not a validated event is extra. ``refused``: (order, event key) ->
    reason for the ledger's "refused" side effects.
    """
    report = SystemReport(LEDGER)
    held: dict[Effect, list[JournalSummary]] = defaultdict(list)
    for j in journals:
        effect = (j.order_id, j.event_key)
        if window.contains(j.occurred_at) and effect not in stream.in_flight_effects:
            held[effect].append(j)
    for e in stream.in_window(window):
        actual = held.pop(e.effect, [])
        want = _ledger_expectation(e, stream, refused)
        if e.amount_minor is not None or want is not None:
            cell = report.cell((e.event_type, e.currency, e.period))
            cell.stream_count += 1
            cell.stream_minor += e.amount_minor or 0
            if e.reclass:  # a cancellation's journals also move the refunds posted before it
                targets = _reversed(e, stream, {})
                cell.stream_minor += sum(n for _, n in _reclassified(e, targets, {}))
        if actual:
            currency = actual[0].currency
            cell = report.cell((e.event_type, currency, e.period))
            cell.count += 1
            cell.minor += sum(j.total_minor for j in actual)
        if e.effect in refused:
            report.refused.append(_issue(LEDGER, "refused", e, want, actual, refused[e.effect]))
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
        wanted_count = 1
        if e.reverses:
            targets = _reversed(e, stream, refused)
            wanted_count = len(targets) + len(_reclassified(e, targets, refused))
        if len(actual) != wanted_count:
            problems.append(f"{len(actual)} journals, expected {wanted_count}")
        posted: dict[str, int] = defaultdict(int)
        for j in actual:
            posted[j.idempotency_key] += 1
        problems += [f"effect {k} posted {n} times" for k, n in sorted(posted.items()) if n > 1]
        if problems:
            report.mismatched.append(_issue(LEDGER, "mismatch", e, want, actual,
                                            "; ".join(problems)))
        else:
            report.matched += 1
    for (order_id, event_key), actual in sorted(held.items()):
        first = actual[0]
        got = sum(j.total_minor for j in actual)
        cell = report.cell((first.event_type, first.currency, period_of(first.occurred_at)))
        cell.count += 1
        cell.minor += got
        report.extra.append(Issue(
            LEDGER, "extra", event_key, order_id, first.event_type, first.currency,
            period_of(first.occurred_at), None, got,
            f"{len(actual)} journal(s) for {event_key} of order {order_id}, which is not a "
            "validated event on the stream (an unexplained posting)",
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
def doc_effect(d: ErpDocument, stream: StreamView) -> Effect:
    """A document's (order, key). An adapter that does not fill ``order_id`` (older
    releases): the one order that has a validated event under the key, else ""."""
    if d.order_id:
        return (d.order_id, d.idempotency_key)
    orders = set(stream.orders_of(d.idempotency_key))
    return (orders.pop() if len(orders) == 1 else "", d.idempotency_key)


def compare_erp(
    stream: StreamView,
    documents: Sequence[ErpDocument],
    refused: Mapping[Effect, str],
    partial: Mapping[Effect, str] | None = None,
    window: Window = ALL_TIME,
) -> SystemReport:
    """Pure: the ERP documents each validated event should have left, per (order, key).

    ``refused`` / ``partial``: (order, event key) -> detail of the ERP's side-effect rows
    with that status. A partial write not completed since is drift (a person must finish
    or correct it); a refusal is not (its exception is already owned).
    """
    partial = partial or {}
    report = SystemReport(ERP)
    docs: dict[Effect, dict[str, list[ErpDocument]]] = defaultdict(lambda: defaultdict(list))
    drafts: dict[Effect, list[ErpDocument]] = defaultdict(list)
    for d in documents:
        effect = doc_effect(d, stream)
        if effect in stream.in_flight_effects:
            continue
        if d.state in _ERP_DONE:
            drafts[effect].append(d)
        else:
            docs[effect][d.step].append(d)
    # The sale holds the lines of the order's latest booking/amendment the ERP took.
    shaping: dict[str, str] = {}
    cancelled_orders: set[str] = set()
    for e in stream.records:
        if e.effect in refused:
            continue
        if e.event_type in _SHAPING:
            shaping[e.order_id] = e.key
        elif e.event_type == "order_cancelled":
            cancelled_orders.add(e.order_id)
    for e in stream.in_window(window):
        steps = ERP_STEPS.get(e.event_type)
        if steps is None:
            continue
        want = _erp_expectation(e, stream, refused, shaping)
        have = docs.pop(e.effect, {})
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

        if e.effect in refused:
            report.refused.append(issue("refused", refused[e.effect]))
            continue
        report.checked += 1
        problems: list[str] = []
        for step, (count, amount) in want.items():
            found = have.get(step, [])
            if not found:
                draft = [d for d in drafts.get(e.effect, []) if d.step == step]
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
        if e.effect in partial:
            problems.append(f"partial write not completed: {partial[e.effect]}")
        if not have and e.effect not in partial:
            report.missing.append(issue("missing", "; ".join(problems)))
        elif problems:
            report.mismatched.append(issue("mismatch", "; ".join(problems)))
        else:
            report.matched += 1
    for (order_id, key), have in sorted(docs.items()):
        if (order_id, key) in stream.by_effect:
            continue  # an event outside the window, or one with no ERP step (checked above)
        found = [d for ds in have.values() for d in ds]
        if not any(window.contains(d.day) for d in found):
            continue
        money = [d for d in found if d.step in MONEY_STEPS]
        first = found[0]
        amount = sum(d.amount_minor for d in money) if money else None
        whose = f" of order {order_id}" if order_id else ""
        report.extra.append(Issue(
            ERP, "extra", key, order_id or None, _erp_event_type(have), first.currency,
            period_of(first.day), None, amount,
            f"ERP document(s) marked with {key}{whose}, which is not a validated event on "
            "the stream: " + ", ".join(f"{d.step} {d.ref}" for d in found),
            money=bool(money), refs=tuple(f"{d.step}:{d.ref}" for d in found)))  # fmt: skip
    return report


def _erp_expectation(
    e: Expected, stream: StreamView, refused: Mapping[Effect, str], shaping: Mapping[str, str]
) -> dict[str, tuple[int, int | None]]:
    """step -> (documents, amount or None: not checked) a correct ERP holds for ``e``."""
    want: dict[str, tuple[int, int | None]] = {s: (1, None) for s in ERP_STEPS[e.event_type]}
    if e.event_type == "invoice_issued":
        want[m.INVOICE] = (1, e.amount_minor)
    elif e.event_type == "payment_captured":
        want[m.PAYMENT] = (1, e.amount_minor)
    elif e.event_type == "refund_issued":
        amount = None if e.amount_minor is None else -e.amount_minor
        if e.pays_credit:
            del want[m.CREDIT_NOTE]
        else:
            want[m.CREDIT_NOTE] = (1, amount)
        want[m.REFUND_PAYMENT] = (1, amount)
    elif e.event_type == "order_cancelled":
        credited = [stream.by_effect[e.order_id, k] for k in e.credits
                    if (e.order_id, k) not in refused]
        if credited:
            want[m.CREDIT_NOTE] = (len(credited), -sum(_credited(t) for t in credited))
    elif shaping.get(e.order_id) == e.key:
        want[m.SALE] = (1, e.sale_minor)
    return want


def _credited(t: Expected) -> int:
    """What a cancellation's credit note of ``t`` gives the customer back: an invoice's
    total; a refund's credit note credited in turn takes its amount back (negative)."""
    amount = t.amount_minor or 0
    return -amount if t.event_type == "refund_issued" else amount


def _erp_event_type(have: Mapping[str, Sequence[ErpDocument]]) -> str:
    """The event type documents with no validated event stand for, from their steps."""
    for etype, step in PRIMARY_STEP.items():
        if have.get(step) and not (step == m.CREDIT_NOTE and have.get(m.REFUND_PAYMENT)):
            return etype
    return "?"


# -- per order -------------------------------------------------------------------------
@dataclass
class OrderCell:
    """The money of one (event type, currency) of one order, in minor units, and how
    many effects carry it: what each system must hold and what it holds."""

    expected_minor: int = 0  # in the ledger
    expected_count: int = 0
    ledger_minor: int = 0
    ledger_count: int = 0
    # The ERP's own expectation: it differs from the ledger's only by what either refused.
    erp_expected_minor: int = 0
    erp_expected_count: int = 0
    erp_minor: int | None = None  # None: the ERP was not read
    erp_count: int | None = None

    @property
    def ledger_diff(self) -> int:
        return abs(self.ledger_minor - self.expected_minor)

    @property
    def erp_diff(self) -> int:
        return 0 if self.erp_minor is None else abs(self.erp_minor - self.erp_expected_minor)

    @property
    def ledger_differs(self) -> bool:
        return (self.ledger_minor, self.ledger_count) != (self.expected_minor,
                                                          self.expected_count)

    @property
    def erp_differs(self) -> bool:
        return self.erp_minor is not None and (self.erp_minor, self.erp_count) != (
            self.erp_expected_minor, self.erp_expected_count)

    @property
    def differs(self) -> bool:
        return self.ledger_differs or self.erp_differs


OrderCellKey = tuple[str, str]  # event type, currency


@dataclass
class OrderDrift:
    """One order: its money per (event type, currency) on each side, and the records
    of it that are wrong. Drifted when either is not empty."""

    order_id: str
    cells: dict[OrderCellKey, OrderCell] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)

    def cell(self, key: OrderCellKey) -> OrderCell:
        return self.cells.setdefault(key, OrderCell())

    @property
    def differing(self) -> dict[OrderCellKey, OrderCell]:
        return {k: c for k, c in sorted(self.cells.items()) if c.differs}

    @property
    def drifted(self) -> bool:
        return bool(self.differing or self.issues)

    @property
    def money(self) -> bool:
        """Money is wrong (P1), not only a document such as the sale (P2)."""
        return bool(self.differing) or any(i.money for i in self.issues)

    @property
    def systems(self) -> list[str]:
        found = {i.system for i in self.issues}
        for c in self.differing.values():
            found |= {LEDGER} if c.ledger_differs else set()
            found |= {ERP} if c.erp_differs else set()
        return sorted(found)

    def signature(self) -> str:
        """What differs, as stable text: the exception id is a function of it. Per
        system that differs only, so a run that did not read the ERP (--ledger-only, the
        in-memory ERP) finds the exception a run with the ERP opened for the ledger."""
        parts = []
        for (t, c), x in self.differing.items():
            if x.ledger_differs:
                parts.append(f"{LEDGER}|{t}|{c}|{x.expected_minor}/{x.expected_count}|"
                             f"{x.ledger_minor}/{x.ledger_count}")  # fmt: skip
            if x.erp_differs:
                parts.append(f"{ERP}|{t}|{c}|{x.erp_expected_minor}/{x.erp_expected_count}|"
                             f"{x.erp_minor}/{x.erp_count}")  # fmt: skip
        parts += sorted(f"{i.system}|{i.kind}|{i.key}|{i.expected_minor}|{i.actual_minor}"
                        for i in self.issues)  # fmt: skip
        return hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()

    def findings(self) -> list[str]:
        """One line per difference: per (event type, currency), then per record."""
        out = []
        for (etype, cur), c in self.differing.items():
            text = (f"{etype} {cur}: expected {fmt_minor(c.expected_minor, cur)}"
                    f"{_n(c.expected_count)}, ledger {fmt_minor(c.ledger_minor, cur)}"
                    f"{_n(c.ledger_count)}")  # fmt: skip
            if c.erp_minor is not None:
                text += f", ERP {fmt_minor(c.erp_minor, cur)}{_n(c.erp_count or 0)}"
                if (c.erp_expected_minor, c.erp_expected_count) != (c.expected_minor,
                                                                    c.expected_count):
                    text += (f" (ERP expected {fmt_minor(c.erp_expected_minor, cur)}"
                             f"{_n(c.erp_expected_count)})")  # fmt: skip
            out.append(text)
        for i in self.issues:
            where = "the ledger" if i.system == LEDGER else "the ERP"
            out.append(f"{i.kind} in {where}: {i.event_type} {i.key}: {i.detail}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "systems": self.systems,
            "money": self.money,
            "exception_id": exception_id(self),
            "differences": [
                {"event_type": t, "currency": cur, **asdict(c),
                 "ledger_diff_minor": c.ledger_diff, "erp_diff_minor": c.erp_diff}
                for (t, cur), c in self.differing.items()
            ],
            "records": [i.to_dict() for i in self.issues],
        }  # fmt: skip


def _n(count: int) -> str:
    return "" if count == 1 else f" in {count} effects"


def compare_orders(
    stream: StreamView,
    journals: Sequence[JournalSummary],
    documents: Sequence[ErpDocument] | None,
    ledger_refused: Mapping[Effect, str],
    erp_refused: Mapping[Effect, str] | None = None,
    window: Window = ALL_TIME,
) -> dict[str, OrderDrift]:
    """Pure: per order, event type and currency, the money the validated events imply
    (docs/lifecycle.md "What the ledger posts": invoices' totals, payments, refunds, a
    cancellation's credit notes = the order's accepted invoices reversed) against the
    sum of every journal and of every ERP money document, whatever their keys.
    ``documents`` None: the ERP was not read. The ERP's money per event type is its
    primary document (invoice, payment, refund payment, credit notes of a cancellation),
    signed as the ledger posts it; the refund's own credit note is checked per record.
    """
    erp_refused = erp_refused or {}
    orders: dict[str, OrderDrift] = {}

    def cell(order_id: str, etype: str, currency: str) -> OrderCell:
        drift = orders.get(order_id)
        if drift is None:
            drift = orders[order_id] = OrderDrift(order_id)
        return drift.cell((etype, currency))

    for e in stream.in_window(window):
        for refused, ledger_side in ((ledger_refused, True), (erp_refused, False)):
            if e.effect in refused or (not ledger_side and documents is None):
                continue
            for currency, amount, count in _expected_money(e, stream, refused, ledger_side):
                c = cell(e.order_id, e.event_type, currency)
                if ledger_side:
                    c.expected_minor += amount
                    c.expected_count += count
                else:
                    c.erp_expected_minor += amount
                    c.erp_expected_count += count
    for j in journals:
        effect = (j.order_id, j.event_key)
        if window.contains(j.occurred_at) and effect not in stream.in_flight_effects:
            c = cell(j.order_id, j.event_type, j.currency)
            c.ledger_minor += j.total_minor
            c.ledger_count += 1
    if documents is not None:
        by_effect: dict[Effect, dict[str, list[ErpDocument]]] = defaultdict(
            lambda: defaultdict(list))
        for d in documents:
            effect = doc_effect(d, stream)
            if d.state not in _ERP_DONE and effect not in stream.in_flight_effects:
                by_effect[effect][d.step].append(d)
        for (order_id, key), have in by_effect.items():
            event = stream.by_effect.get((order_id, key))
            if event is not None:
                if not window.contains(event.occurred_at):
                    continue
                etype = event.event_type
            else:
                etype = _erp_event_type(have)
                if not any(window.contains(d.day) for ds in have.values() for d in ds):
                    continue
            step = PRIMARY_STEP.get(etype)
            for d in have.get(step, []) if step else []:
                c = cell(order_id or f"? {key}", etype, d.currency)
                sign = -1 if step in (m.CREDIT_NOTE, m.REFUND_PAYMENT) else 1
                c.erp_minor = (c.erp_minor or 0) + sign * d.amount_minor
                c.erp_count = (c.erp_count or 0) + 1
        for drift in orders.values():
            for c in drift.cells.values():
                if c.erp_minor is None:
                    c.erp_minor, c.erp_count = 0, 0
    return orders


def _expected_money(
    e: Expected, stream: StreamView, refused: Mapping[Effect, str], ledger: bool
) -> list[tuple[str, int, int]]:
    """(currency, minor units, effects) a system must hold for ``e``: one per currency."""
    if e.event_type == "order_cancelled":
        out: dict[str, list[int]] = {}
        targets = _reversed(e, stream, refused) if ledger else [
            stream.by_effect[e.order_id, k] for k in e.credits if (e.order_id, k) not in refused]
        for t in targets:
            row = out.setdefault(t.currency, [0, 0])
            row[0] += (t.ledger_minor or 0) if ledger else _credited(t)
            row[1] += 1
        for currency, amount in _reclassified(e, targets, refused) if ledger else []:
            row = out.setdefault(currency, [0, 0])
            row[0] += amount
            row[1] += 1
        return [(cur, amount, count) for cur, (amount, count) in out.items()]
    if e.event_type not in PRIMARY_STEP or e.amount_minor is None:
        return []
    if ledger:  # a zero journal is not posted; the ERP keeps a zero document
        return [(e.currency, e.ledger_minor, 1)] if e.ledger_minor else []
    return [(e.currency, e.amount_minor, 1)]


@dataclass
class Money:
    """One currency over the orders compared: minor units expected, held, and the sum
    of absolute differences per order and event type (so gains never offset losses)."""

    expected_minor: int = 0
    actual_minor: int = 0
    diff_minor: int = 0

    @property
    def drift_pct(self) -> float:
        return drift_pct(self.diff_minor, self.expected_minor)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drift_pct": round(self.drift_pct, 4)}


def money_by_currency(
    orders: Iterable[OrderDrift], systems: Iterable[str] = (LEDGER, ERP)
) -> dict[str, Money]:
    """Currency -> money over the given systems (an unread ERP adds nothing)."""
    out: dict[str, Money] = {}
    wanted = set(systems)
    for o in orders:
        for (_, cur), c in o.cells.items():
            money = out.setdefault(cur, Money())
            if LEDGER in wanted:
                money.expected_minor += c.expected_minor
                money.actual_minor += c.ledger_minor
                money.diff_minor += c.ledger_diff
            if ERP in wanted and c.erp_minor is not None:
                money.expected_minor += c.erp_expected_minor
                money.actual_minor += c.erp_minor
                money.diff_minor += c.erp_diff
    return dict(sorted(out.items()))


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
    # order -> its money per event type and currency (``compare_orders``).
    orders: dict[str, OrderDrift] = field(default_factory=dict)

    @property
    def reconciled(self) -> list[SystemReport]:
        return [s for s in self.systems if s.reconciled]

    @property
    def checked(self) -> int:
        return sum(s.checked for s in self.reconciled)

    @property
    def issues(self) -> list[Issue]:
        return [i for s in self.reconciled for i in s.issues]

    def order_drifts(self) -> list[OrderDrift]:
        """Every order compared, with the records of it that are wrong attached."""
        issues: dict[str, list[Issue]] = defaultdict(list)
        for i in self.issues:
            issues[i.order_id or f"? {i.key}"].append(i)
        out = {o: OrderDrift(o, d.cells, issues.pop(o, [])) for o, d in self.orders.items()}
        for o, found in issues.items():
            out[o] = OrderDrift(o, {}, found)
        return [out[o] for o in sorted(out)]

    @property
    def drifted(self) -> list[OrderDrift]:
        return [o for o in self.order_drifts() if o.drifted]

    def money(self, systems: Iterable[str] | None = None) -> dict[str, Money]:
        names = [s.system for s in self.reconciled] if systems is None else list(systems)
        return money_by_currency(self.orders.values(), names)

    @property
    def drift_pct(self) -> float:
        """Over money: the worst currency's sum of absolute differences / sum expected,
        both systems together (minor units of two currencies are never added)."""
        return max((m_.drift_pct for m_ in self.money().values()), default=0.0)

    @property
    def record_drift_pct(self) -> float:
        """(missing + extra + mismatched records) / records expected."""
        return drift_pct(len(self.issues), self.checked)

    def system(self, name: str) -> SystemReport:
        return next(s for s in self.systems if s.system == name)

    def fact_detail(self) -> dict[str, Any]:
        """What the audit fact records (the Monday report reads the latest one)."""
        drifted = self.drifted
        return {
            "period": self.window.label,
            "since": self.window.start.isoformat() if self.window.start else None,
            "until": self.window.end.isoformat() if self.window.end else None,
            "drift_pct": round(self.drift_pct, 4),
            "record_drift_pct": round(self.record_drift_pct, 4),
            "by_currency": {cur: m_.to_dict() for cur, m_ in self.money().items()},
            "orders": len(self.orders),
            "orders_drifted": len(drifted),
            "drifted_orders": [o.order_id for o in drifted[:100]],
            "checked": self.checked,
            "missing": sum(len(s.missing) for s in self.reconciled),
            "extra": sum(len(s.extra) for s in self.reconciled),
            "mismatched": sum(len(s.mismatched) for s in self.reconciled),
            "refused": sum(len(s.refused) for s in self.reconciled),
            "events": len(self.stream.in_window(self.window)),
            "exceptions_opened": self.exceptions_opened,
            **{s.system: {**s.summary(), **({"by_currency": {
                cur: m_.to_dict() for cur, m_ in self.money([s.system]).items()}}
                if s.reconciled else {})} for s in self.systems},
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.fact_detail(),
            "at_ms": self.at_ms,
            "exceptions_already_open": self.exceptions_known,
            "drifted_orders": [o.to_dict() for o in self.drifted],
            "stream": {
                "validated_events": len(self.stream.records),
                "copies_beyond_first": self.stream.copies,
                "conflicting_copies": self.stream.conflicts,
                "undecodable": self.stream.undecodable,
                "truncated_partitions": {str(p): o for p, o in self.stream.truncated.items()},
                "in_flight": self.stream.in_flight,
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
        notes.append(f"{len(stream.conflicts)} (order, key) pair(s) appear on the validated "
                     f"topic with different amounts (first key: {stream.conflicts[0]}); the "
                     "first copy counts")  # fmt: skip
    return notes


def effect_details(rows: Iterable[SideEffect], stream: StreamView) -> dict[Effect, str]:
    """(order, key) -> detail of side-effect rows. A row without an order (a ledger
    written before side effects carried one) stands for every order using its key."""
    out: dict[Effect, str] = {}
    for row in rows:
        order_id = getattr(row, "order_id", "") or ""
        key = row.idempotency_key
        for order in [order_id] if order_id else (stream.orders_of(key) or [""]):
            out[order, key] = row.detail
    return out


def compare(
    stream: StreamView,
    window: Window,
    journals: Sequence[JournalSummary],
    ledger_refused: Mapping[Effect, str],
    documents: Sequence[ErpDocument] | None = None,
    erp_refused: Mapping[Effect, str] | None = None,
    erp_partial: Mapping[Effect, str] | None = None,
    *,
    erp_note: str = "",
) -> Report:
    """Pure: the whole report from what was read. ``documents`` None: no ERP read."""
    systems = [compare_ledger(stream, journals, ledger_refused, window)]
    if documents is not None:
        systems.append(compare_erp(stream, documents, erp_refused or {}, erp_partial, window))
    else:
        systems.append(not_reconciled(ERP, erp_note or "no ERP to read"))
    orders = compare_orders(stream, journals, documents, ledger_refused, erp_refused, window)
    return Report(window, stream, systems, notes=stream_notes(stream), orders=orders)


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
    ledger_refused = effect_details(ledger.all_effects(LEDGER, statuses=("refused",)), stream)
    if erp is None:
        return compare(stream, window, journals, ledger_refused, erp_note=erp_note)
    erp_rows = ledger.all_effects(ERP, statuses=("refused", "partial"))
    refused = effect_details([e for e in erp_rows if e.status == "refused"], stream)
    partial = effect_details([e for e in erp_rows if e.status == "partial"], stream)
    return compare(stream, window, journals, ledger_refused, erp.documents(), refused, partial)


# -- exceptions ------------------------------------------------------------------------
def exception_id(drift: OrderDrift) -> str:
    """A function of the order and what differs: a re-run over the same drift finds the
    id already open; a different drift of the same order is a new exception."""
    return exception_id_for(f"reconcile|{CHECK_DRIFT}|{drift.order_id}|{drift.signature()}")


_REASON_FINDINGS = 6  # findings spelled out in the reason; all_findings has every one


def exception_records(
    drifts: Iterable[OrderDrift], *, now_ms: int, sla_minutes: Mapping[str, int],
    rules_version: str,
) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
    """Pure: (Kafka key, ExceptionRecord dict) per drifted order."""
    for drift in drifts:
        if not drift.drifted:
            continue
        severity = "P1" if drift.money else "P2"
        findings = drift.findings()
        shown = "; ".join(findings[:_REASON_FINDINGS])
        more = len(findings) - _REASON_FINDINGS
        reason = (f"order {drift.order_id} differs between the validated stream and "
                  f"{' and '.join(drift.systems)}: {shown}"
                  + (f"; and {more} more" if more > 0 else ""))  # fmt: skip
        keys = sorted({i.key for i in drift.issues})
        types = sorted({t for t, _ in drift.differing} | {i.event_type for i in drift.issues}
                       - {"?"})  # fmt: skip
        refs = sorted({r for i in drift.issues for r in i.refs})
        order_id = None if drift.order_id.startswith("? ") else drift.order_id
        yield order_id or (keys[0] if keys else drift.order_id), {
            "exception_id": exception_id(drift),
            "check_id": CHECK_DRIFT,
            "severity": severity,
            "owner": OWNER,
            "reason": reason,
            "all_findings": [{"check_id": CHECK_DRIFT, "reason": f} for f in findings],
            "blocking": True,
            "opened_at_ms": now_ms,
            "sla_deadline_ms": now_ms + int(sla_minutes.get(severity, 15)) * 60_000,
            "rules_version": rules_version,
            "event_type": types[0] if len(types) == 1 else None,
            "idempotency_key": keys[0] if len(keys) == 1 else None,
            "order_id": order_id,
            "source_system": ",".join(drift.systems) or None,
            "source_record_id": ",".join(refs) or None,
            # About an order, not one input record: no coordinates, no event to re-drive.
            "input_topic": "",
            "input_partition": -1,
            "input_offset": -1,
            "event": b"",
        }


# -- formatting ------------------------------------------------------------------------
def fmt_minor(minor: int | None, currency: str) -> str:
    """Minor units as the currency's major units: ``1,234.56 EUR``, ``1,235 JPY``."""
    if minor is None:
        return "—"
    return format_money(minor, currency).strip()


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
    in_flight_effects: set[Effect] = set()

    def events() -> Iterator[tuple[Event, Source | None]]:
        nonlocal in_flight
        for n, msg in enumerate(read_topic(bootstrap, topic, timeout=timeout), start=1):
            if progress is not None and n % 1000 == 0:
                progress(n)
            if applied_upto is not None and (msg.offset() or 0) >= applied_upto.get(
                    msg.partition() or 0, 0):
                in_flight += 1
                with contextlib.suppress(DecodeError):
                    env = decoder.decode(msg.value() or b"")["envelope"]
                    in_flight_effects.add((str(env["order_id"]), str(env["idempotency_key"])))
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
    view.in_flight_effects = in_flight_effects
    view.truncated = low_watermarks(bootstrap, topic)
    return view


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int] | None:
    """partition -> the group's committed offset on ``topic``; None if it never committed."""
    consumer = Consumer(client_config("consumer", bootstrap, {"group.id": group,
                                                              "enable.auto.commit": False}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
    finally:
        consumer.close()
    offsets = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
    return offsets or None


def _consumer(bootstrap: str) -> Consumer:
    return Consumer(client_config("consumer", bootstrap, {
        "group.id": f"revline-reconcile-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    }))


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
    """Produce one ``reconciliation.drift`` exception per drifted order not already
    opened by an earlier run, as the sink produces its exceptions (Avro
    ``ExceptionRecord``, keyed by order).

    The ids are deterministic; the ones already on the topic are skipped, so
    re-running over the same drift opens nothing new. Returns how many were opened.
    """
    drifted = report.drifted
    known = known_exception_ids(bootstrap, topic) if drifted else set()
    fresh = [d for d in drifted if exception_id(d) not in known]
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
    report.exceptions_known = len(drifted) - len(fresh)
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
