"""Backtest a rules or ownership change: the same inputs through two pure engines, compared.

Pure: no Kafka. The caller feeds recorded input records (``InputRecord``, each
partition in offset order; partitions may interleave in any way) and says which
ones are *counted* (inside the window) and which only warm up the order state
(read before the window, their decisions not reported). Each input is decoded
once and judged by two fresh ``Engine`` s, one per rules file, each with its
own order states: nothing is shared but the decoded event and the reference data.

Time is the records' own: a partition's clock is the highest record timestamp
read from it so far, and is what the engines see as "now". A hold times out when
the next record of its partition is later than its deadline (``since`` plus
``hold_timeout_seconds``), or at the end of the window, and is judged at the
deadline itself. That is when the worker times it out too (it also waits until it
has read what was on the partition by then), so a release and a timeout are ordered
as they were live, up to the worker's housekeeping interval (a few seconds).

The result is an ``Outcome`` per counted input and side, and a ``BacktestReport``
over them: the inputs whose outcome changes (kind, check id, severity, owner,
warnings), counts per check before → after, exceptions opened and closed, the
owners' workload per severity and per day against the peak day the current
rules give them, the money that changes state per currency (exact, in major
units) and hold timeouts.
"""

from __future__ import annotations

import bisect
import copy
import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from revline.core.money import format_money, to_major
from revline.processors.checks import POLICY_EVENT_TYPES, policy_agrees
from revline.processors.engine import (
    DEAD_LETTER,
    EXCEPTION,
    HELD,
    REPLAYED,
    VALIDATED,
    Decision,
    Engine,
    InputRecord,
    body_hash,
)
from revline.processors.order_state import OrderState
from revline.processors.ownership import ExceptionFacts, Ownership, event_amount
from revline.processors.reference import OWNERS, SEVERITIES, ReferenceData, Rules
from revline.schemas import EventDeserializer

PENDING = "held"  # still held when the window ends: no final decision yet


# -- the two sides -------------------------------------------------------------------------
@dataclass(frozen=True)
class Side:
    """One configuration: a rules file and an ownership file (and where they came from)."""

    label: str  # "current" | "candidate"
    rules: Rules
    ownership: Ownership
    rules_source: str = ""
    ownership_source: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "rules_file": self.rules_source,
            "rules_version": self.rules.version,
            "ownership_file": self.ownership_source,
            "ownership_version": self.ownership.version,
            "hold_timeout_seconds": self.rules.hold_timeout_seconds,
        }


def missing_checks(candidate: Rules, current: Rules) -> list[str]:
    """Check ids the current rules give a severity and owner and the candidate does not.

    The engine looks every finding's check up in the rules; a candidate without one
    would fail on the first such finding, so it is refused before any replay."""
    return sorted(set(current.checks) - set(candidate.checks))


def rules_differences(current: Rules, candidate: Rules) -> list[str]:
    """What changed between two rules files, one line each (for people)."""
    out = []
    if current.version == candidate.version:
        out.append(f"version unchanged ({current.version}): change it with every edit, every "
                   "decision carries it")
    else:
        out.append(f"version {current.version} → {candidate.version}")
    if current.price_tolerance_bps != candidate.price_tolerance_bps:
        out.append(f"price_tolerance_bps {current.price_tolerance_bps} → "
                   f"{candidate.price_tolerance_bps}")
    for label, old, new in (("families", current.discount_family_bps,
                             candidate.discount_family_bps),
                            ("skus", current.discount_sku_bps, candidate.discount_sku_bps)):
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                out.append(f"discount_tolerance_bps.{label}.{name} {old.get(name, '—')} → "
                           f"{new.get(name, '—')}")
    if current.hold_timeout_seconds != candidate.hold_timeout_seconds:
        out.append(f"hold_timeout_seconds {current.hold_timeout_seconds:g} → "
                   f"{candidate.hold_timeout_seconds:g}")
    for check_id in sorted(set(current.checks) | set(candidate.checks)):
        old_spec, new_spec = current.checks.get(check_id), candidate.checks.get(check_id)
        if old_spec != new_spec:
            before = f"{old_spec.severity}/{old_spec.owner}" if old_spec else "—"
            after = f"{new_spec.severity}/{new_spec.owner}" if new_spec else "—"
            out.append(f"checks.{check_id} {before} → {after}")
    for severity in sorted(set(current.sla_minutes) | set(candidate.sla_minutes)):
        if current.sla_minutes.get(severity) != candidate.sla_minutes.get(severity):
            out.append(f"sla_minutes.{severity} {current.sla_minutes.get(severity, '—')} → "
                       f"{candidate.sla_minutes.get(severity, '—')}")
    return out


# -- reference data as it stood ------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceTimeline:
    """Reference data over time: each snapshot applies from its time until the next.

    Before the first snapshot's time the first one applies (the oldest known)."""

    snapshots: tuple[tuple[int, ReferenceData], ...]
    notes: tuple[str, ...] = ()
    _times: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.snapshots:
            raise ValueError("a reference timeline needs at least one snapshot")
        object.__setattr__(self, "_times", tuple(t for t, _ in self.snapshots))

    @classmethod
    def fixed(cls, data: ReferenceData, note: str = "") -> ReferenceTimeline:
        return cls(((0, data),), (note,) if note else ())

    def at(self, ms: int) -> ReferenceData:
        index = bisect.bisect_right(self._times, ms) - 1
        return self.snapshots[max(index, 0)][1]

    def describe(self) -> list[dict[str, Any]]:
        return [{"from_ms": t, "version": d.version, "products": len(d.products),
                 "campaigns": len(d.campaigns), "channels": len(d.channels)}
                for t, d in self.snapshots]


META_KEY = "__meta__"


def reference_timeline(records: Iterable[tuple[str, Mapping[str, Any] | None, int, int]],
                       ) -> ReferenceTimeline | None:
    """The reference topic's loads over time, from its records ``(key, value or None for a
    tombstone, timestamp ms, offset)`` in offset order.

    Every ``__meta__`` record closes a load (``revline reference load`` writes the items,
    then the meta): the data as it stood then is every item read up to it, and it applies
    from the meta record's time. The topic is compacted, so an item rewritten later has
    lost its older values: where offsets below an item's first surviving record are
    missing, it may have existed earlier with another value, and its oldest surviving
    value stands in for it (counted in the notes). None when no load is on the topic.
    """
    items: dict[str, Mapping[str, Any]] = {}
    first_offset: dict[str, int] = {}
    first_value: dict[str, Mapping[str, Any]] = {}
    loads: list[tuple[int, int, str, dict[str, Mapping[str, Any]]]] = []
    offsets: list[int] = []
    for key, value, timestamp_ms, offset in records:
        offsets.append(offset)
        if key == META_KEY:
            if value is not None:
                loads.append((timestamp_ms, offset, str(value.get("version", "")), dict(items)))
            continue
        if value is None:
            items.pop(key, None)
            continue
        items[key] = value
        if key not in first_offset:
            first_offset[key] = offset
            first_value[key] = value
    if not loads:
        return None
    # Where compaction left a gap below an item's first surviving offset, its older
    # values are gone: it may have been there before (with another value).
    gaps_below = _gap_finder(offsets)
    snapshots: list[tuple[int, ReferenceData]] = []
    backfilled: set[str] = set()
    for timestamp_ms, offset, version, seen in loads:
        data = dict(seen)
        for key, first in first_offset.items():
            if first > offset and key not in data and gaps_below(first):
                data[key] = first_value[key]
                backfilled.add(key)
        snapshots.append((timestamp_ms, _reference_from_items(version, data)))
    notes = []
    if backfilled:
        notes.append(f"{len(backfilled)} reference item(s) were rewritten after an earlier load "
                     "and compaction removed their older values; their oldest surviving value "
                     "stands in before it was written")
    return ReferenceTimeline(tuple(snapshots), tuple(notes))


def _gap_finder(offsets: Sequence[int]) -> Callable[[int], bool]:
    """``gap(offset)``: whether any offset below a read one is missing (compacted away)."""
    ordered = sorted(offsets)
    cumulative: list[int] = []  # offsets missing below ordered[i]
    missing = expected = 0
    for value in ordered:
        missing += max(0, value - expected)
        expected = value + 1
        cumulative.append(missing)

    def gap(offset: int) -> bool:
        index = bisect.bisect_left(ordered, offset)
        return index < len(cumulative) and cumulative[index] > 0

    return gap


def _reference_from_items(version: str, items: Mapping[str, Mapping[str, Any]]) -> ReferenceData:
    products, campaigns, channels = [], [], []
    for key, value in items.items():
        if key.startswith("product:"):
            products.append(value)
        elif key.startswith("campaign:"):
            campaigns.append(value)
        elif key.startswith("channel:"):
            channels.append(value)
    return ReferenceData.from_mapping({"version": version, "products": products,
                                       "campaigns": campaigns, "channels": channels})


# -- outcomes ------------------------------------------------------------------------------
@dataclass(slots=True)  # not frozen: built per input, and frozen costs ~2x; never mutated
class InputInfo:
    """What the report says about a counted input, whatever either side decided."""

    coords: str
    partition: int
    offset: int
    timestamp_ms: int
    order_id: str | None = None
    event_type: str | None = None
    idempotency_key: str | None = None
    source_line: str | None = None
    amount_minor: int | None = None
    currency: str | None = None


# InputInfo's fields in order, as a backtest keeps them per counted input.
InputRow = tuple[str, int, int, int, str | None, str | None, str | None, str | None, int | None,
                 str | None]


@dataclass(slots=True)  # not frozen: built per decision (see InputInfo); never mutated
class Outcome:
    """An input's final outcome on one side (``held``: still waiting at the window's end).

    ``opens`` is the check of the exception the outcome opens: the primary check of a
    blocking exception, or the first finding of a validated event that passed with a
    P3 finding (an advisory exception); ``severity`` and ``owner`` are that exception's
    after the ownership rules."""

    kind: str
    check_id: str | None = None
    opens: str | None = None
    severity: str | None = None
    owner: str | None = None
    warnings: tuple[str, ...] = ()
    reason: str = ""
    released_by: str | None = None
    decided_at_ms: int = 0

    @property
    def verdict(self) -> tuple[Any, ...]:
        """What a change is judged on. A validated event's warnings are P3 findings, each
        an advisory exception; a blocking exception's other findings ride along with it."""
        warnings = tuple(sorted(self.warnings)) if self.kind == VALIDATED else ()
        return (self.kind, self.check_id, self.opens, self.severity, self.owner, warnings)

    def describe(self) -> str:
        if self.kind == EXCEPTION:
            return f"exception {self.check_id} {self.severity} {self.owner}"
        if self.kind == VALIDATED and self.opens:
            return f"validated (advisory {self.opens} {self.severity} {self.owner})"
        if self.kind == PENDING:
            return "held (pending at window end)"
        return self.kind

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "check_id": self.check_id, "opens": self.opens,
                "severity": self.severity, "owner": self.owner,
                "warnings": list(self.warnings), "reason": self.reason,
                "released_by": self.released_by, "decided_at_ms": self.decided_at_ms}


def outcome_of(decision: Decision, rules: Rules, ownership: Ownership) -> Outcome:
    """A final decision as an ``Outcome``, its exception owned as the exception manager
    would own it (the ownership rules refine the QA rules' severity and owner)."""
    if decision.kind == VALIDATED and not decision.findings:
        return Outcome(VALIDATED, decision.check_id, None, None, None, decision.warnings,
                       decision.reason, decision.released_by, decision.decided_at_ms)
    opens: str | None = None
    reason = decision.reason
    if decision.kind == EXCEPTION:
        opens = decision.check_id
    elif decision.kind == VALIDATED and decision.findings:
        opens = decision.findings[0].check_id
        reason = decision.findings[0].reason
    severity = owner = None
    if opens is not None:
        spec = rules.spec(opens)
        env = decision.envelope
        amount, currency = event_amount(decision.event)
        assignment = ownership.assign(ExceptionFacts(
            check_id=opens, severity=spec.severity, owner=spec.owner,
            event_type=env["event_type"] if env else None,
            source_system=env["source_system"] if env else None,
            amount_minor=amount, currency=currency,
        ))
        severity, owner = assignment.severity, assignment.owner
    return Outcome(kind=decision.kind, check_id=decision.check_id, opens=opens,
                   severity=severity, owner=owner, warnings=decision.warnings, reason=reason,
                   released_by=decision.released_by, decided_at_ms=decision.decided_at_ms)


class _Owners:
    """``outcome_of`` for one side, its ownership assignments remembered.

    ``Ownership.assign`` reads the facts' amount only through ``amount >= min_amount_minor``
    of each rule, so the amount's place among the rules' thresholds (``bisect_right``: how
    many are at or below it) stands for it in the key; everything else is the facts
    themselves. A week names a few hundred distinct keys for tens of thousands of
    exceptions."""

    __slots__ = ("_assigned", "_thresholds", "ownership", "rules")

    def __init__(self, rules: Rules, ownership: Ownership) -> None:
        self.rules, self.ownership = rules, ownership
        self._thresholds = sorted({r.match.min_amount_minor for r in ownership.rules
                                   if r.match.min_amount_minor is not None})
        self._assigned: dict[tuple[Any, ...], tuple[str, str]] = {}

    def outcome(self, decision: Decision) -> Outcome:
        """``outcome_of(decision, self.rules, self.ownership)``, equal field for field."""
        kind = decision.kind
        findings = decision.findings
        if kind == VALIDATED and not findings:
            return Outcome(VALIDATED, decision.check_id, None, None, None, decision.warnings,
                           decision.reason, decision.released_by, decision.decided_at_ms)
        opens: str | None = None
        reason = decision.reason
        if kind == EXCEPTION:
            opens = decision.check_id
        elif kind == VALIDATED:
            opens = findings[0].check_id
            reason = findings[0].reason
        severity = owner = None
        if opens is not None:
            severity, owner = self.assign(opens, decision.event)
        return Outcome(kind, decision.check_id, opens, severity, owner, decision.warnings,
                       reason, decision.released_by, decision.decided_at_ms)

    def assign(self, check_id: str, event: Mapping[str, Any] | None) -> tuple[str, str]:
        """(severity, owner) of an exception of ``check_id`` on ``event``."""
        amount, currency = event_amount(event)
        env = event["envelope"] if event is not None else None
        event_type = env["event_type"] if env else None
        source_system = env["source_system"] if env else None
        place = -1 if amount is None else bisect.bisect_right(self._thresholds, amount)
        key = (check_id, event_type, source_system, currency, place)
        assigned = self._assigned.get(key)
        if assigned is None:
            spec = self.rules.spec(check_id)
            a = self.ownership.assign(ExceptionFacts(
                check_id=check_id, severity=spec.severity, owner=spec.owner,
                event_type=event_type, source_system=source_system,
                amount_minor=amount, currency=currency))
            assigned = self._assigned[key] = (a.severity, a.owner)
        return assigned


class _Book:
    """One side's outcomes (per counted input) and how often its engine failed."""

    __slots__ = ("engine_errors", "outcomes", "owners", "side")

    def __init__(self, side: Side) -> None:
        self.side = side
        self.owners = _Owners(side.rules, side.ownership)
        self.outcomes: dict[str, Outcome] = {}
        self.engine_errors = 0


class _HeldInputs:
    """Held inputs as they were read, each with how many order states hold it.

    The worker rebuilds a held input that comes back (released or timed out) from the
    copy in the order's state: base64 of the record's bytes, decoded again. A backtest
    still has the record it read and the event it decoded from those same bytes; it
    keeps them while some lane's state holds the input (an order run twice holds it
    twice) and hands them back instead. One not found here is rebuilt as the worker does.
    """

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self._kept: dict[tuple[str, int, int], list[Any]] = {}  # [record, event, holders]

    def __len__(self) -> int:
        return len(self._kept)

    def hold(self, record: InputRecord, event: Mapping[str, Any]) -> None:
        where = (record.topic, record.partition, record.offset)
        kept = self._kept.get(where)
        if kept is None:
            self._kept[where] = [record, event, 1]
            return
        kept[2] += 1
        if kept[0] is not record and kept[0] != record:
            kept[0] = kept[1] = None  # two inputs read at one place: each is rebuilt

    def copied(self, state: OrderState) -> None:
        """``state``'s holds are now held twice (the state was copied)."""
        for entry in state.held:
            kept = self._kept.get((entry["topic"], entry["partition"], entry["offset"]))
            if kept is not None:
                kept[2] += 1

    def take(self, entry: Mapping[str, Any]) -> tuple[InputRecord, dict[str, Any]] | None:
        where = (entry["topic"], entry["partition"], entry["offset"])
        kept = self._kept.get(where)
        if kept is None:
            return None
        kept[2] -= 1
        if kept[2] <= 0:
            del self._kept[where]
        return None if kept[0] is None else (kept[0], kept[1])


class _Engine(Engine):
    """The worker's engine, but a held input that comes back is taken from the backtest's
    ``_HeldInputs`` (the same record and event) rather than rebuilt from the state."""

    def __init__(self, rules: Rules, reference: Callable[[], ReferenceData],
                 deserializer: EventDeserializer, held: _HeldInputs) -> None:
        super().__init__(rules=rules, reference=reference, deserializer=deserializer)
        self.held_inputs = held

    def _restore(self, entry: Mapping[str, Any]) -> tuple[InputRecord, dict[str, Any]]:
        kept = self.held_inputs.take(entry)
        return kept if kept is not None else super()._restore(entry)


class _Lane:
    """An engine and the order states it holds, driven by the records' own clocks.

    What it decides goes to its books: one side's, or both sides' for the orders the
    two sides share (see ``Backtest``)."""

    def __init__(self, rules: Rules, books: tuple[_Book, ...],
                 reference: Callable[[], ReferenceData], deserializer: EventDeserializer,
                 counted: Mapping[str, InputRow], held: _HeldInputs) -> None:
        self.engine = _Engine(rules, reference, deserializer, held)
        self.held = held
        self.books = books
        self.timeout_ms = int(rules.hold_timeout_seconds * 1000)
        self.states: dict[bytes, OrderState] = {}
        self.deadlines: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        self.counted = counted
        first = books[0].side.ownership
        # Books whose ownership rules are the first one's take its outcome as it is.
        self._own: tuple[_Book, ...] = tuple(
            b for b in books[1:] if b.side.ownership is not first and b.side.ownership != first)
        self._same: tuple[_Book, ...] = tuple(b for b in books[1:] if b not in self._own)

    def record(self, decisions: Iterable[Decision], fed: InputRecord | None = None,
               fed_coords: str = "") -> None:
        """Each final decision's outcome to the books (``fed``: the input just read, whose
        coordinates are ``fed_coords``)."""
        first = self.books[0]
        counted = self.counted
        for d in decisions:
            kind = d.kind
            if kind == HELD:
                if d.event is not None:
                    self.held.hold(d.input, d.event)
                continue
            if kind == REPLAYED:
                continue
            r = d.input
            coords = fed_coords if r is fed else f"{r.topic}/{r.partition}/{r.offset}"
            if coords not in counted:
                continue
            outcome = first.outcomes[coords] = first.owners.outcome(d)
            for book in self._same:
                book.outcomes[coords] = outcome
            for book in self._own:
                book.outcomes[coords] = (outcome if outcome.opens is None else
                                         book.owners.outcome(d))

    def _watch(self, partition: int, key: bytes, state: OrderState) -> None:
        if state.data["held"]:
            oldest = self.engine.oldest_hold_ms(state)
            assert oldest is not None
            heapq.heappush(self.deadlines[partition], (oldest + self.timeout_ms, key))

    def adopt(self, partition: int, key: bytes, state: OrderState) -> None:
        """Take over an order's state (and its holds' deadlines) from another lane."""
        self.states[key] = state
        self._watch(partition, key, state)

    def expire(self, partition: int, before_ms: int, *, inclusive: bool = False) -> None:
        """Time out the partition's holds due before ``before_ms`` (or at it, inclusive)."""
        heap = self.deadlines.get(partition)
        while heap and (heap[0][0] < before_ms or (inclusive and heap[0][0] == before_ms)):
            due, key = heapq.heappop(heap)
            state = self.states.get(key)
            if state is None:
                continue  # the order moved to other lanes, its deadlines with it
            oldest = self.engine.oldest_hold_ms(state)
            if oldest is None or oldest + self.timeout_ms != due:
                continue  # already released or timed out; its current deadline is queued
            self.record(self.engine.expire_holds(state, due))
            self._watch(partition, key, state)

    def process(self, record: InputRecord, event: Mapping[str, Any], now_ms: int,
                coords: str, digest: str | None = None) -> OrderState:
        key = record.key
        assert key is not None
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = OrderState()
            state.data["partition"] = record.partition
        try:
            decisions = self.engine.process(state, record, event, now_ms, digest=digest)
        except Exception as exc:  # the worker dead-letters an engine failure too
            for book in self.books:
                book.engine_errors += 1
            decisions = [Decision(input=record, kind=DEAD_LETTER, event=event,
                                  stage="processing", error_class=type(exc).__name__,
                                  reason=f"engine error: {exc}", decided_at_ms=now_ms,
                                  rules_version=self.engine.rules.version)]
        self.record(decisions, record, coords)
        if state.data["held"]:
            self._watch(record.partition, key, state)
        return state

    def finish(self, end_ms: int) -> None:
        for partition in list(self.deadlines):
            self.expire(partition, end_ms, inclusive=True)


# Rules fields two sides may differ in and still share an order's run while the engine
# provably decides alike (see ``Backtest``): the version and the SLA minutes only mark
# decisions (never an outcome, never the order's state), the tolerances are checked per
# input (``policy_agrees``), a different hold timeout moves an order with holds to its own
# lanes. Any other difference (a check's severity or owner...) runs every order twice.
_SHAREABLE = frozenset({"version", "sla_minutes", "price_tolerance_bps",
                        "discount_family_bps", "discount_sku_bps", "hold_timeout_seconds"})


def can_share(current: Rules, candidate: Rules) -> bool:
    """Whether orders may share one engine run while they are judged alike (see ``Backtest``)."""
    for f in fields(Rules):
        if f.name not in _SHAREABLE and getattr(current, f.name) != getattr(candidate, f.name):
            return False
    # The engine looks a severity's SLA up (a KeyError with one side's rules only).
    return set(current.sla_minutes) == set(candidate.sla_minutes)


def _clone(value: Any) -> Any:
    """A deep copy of a JSON-shaped value (an order's state)."""
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bytes)):
        return value
    return copy.deepcopy(value)


class Backtest:
    """Feed records (``feed``), then ``finish`` for the report.

    Each side has its own engine and order states. An order both sides would judge alike
    so far is run once for both instead, on one state, and its decisions go to both
    sides' books, each owning its exceptions with its own ownership rules. It stays so
    while that provably cannot change the candidate's decisions: every rules difference
    is in ``_SHAREABLE``; each input of the order, judged now or held, gets the same
    policy findings under both rules whatever the state (``policy_agrees``, against every
    reference snapshot of the timeline); with different hold timeouts, it holds nothing.
    The first input for which that is not shown moves the order to the two sides' own
    lanes before it is processed, the candidate's with a copy of the state: from then on
    it is judged twice, as without sharing. ``share=False`` judges every order twice.
    """

    def __init__(self, current: Side, candidate: Side, reference: ReferenceTimeline,
                 deserializer: EventDeserializer | None = None, *, share: bool = True) -> None:
        self.current_side, self.candidate_side = current, candidate
        self.timeline = reference
        self.deserializer = deserializer or EventDeserializer()
        # Counted inputs: InputInfo's fields as a tuple (a tuple costs a fifth of the object;
        # the report builds an InputInfo for the inputs that change).
        self.inputs: dict[str, InputRow] = {}
        self._reference = reference.at(0)
        self._timed = len(reference.snapshots) > 1
        self._snapshots = tuple(data for _, data in reference.snapshots)
        view: Callable[[], ReferenceData] = lambda: self._reference  # noqa: E731
        self.current = _Book(current)
        self.candidate = _Book(candidate)
        self.held_inputs = _HeldInputs()
        self._current_lane = _Lane(current.rules, (self.current,), view, self.deserializer,
                                   self.inputs, self.held_inputs)
        self._candidate_lane = _Lane(candidate.rules, (self.candidate,), view,
                                     self.deserializer, self.inputs, self.held_inputs)
        self._shared: _Lane | None = None
        lanes = [self._current_lane, self._candidate_lane]
        if share and can_share(current.rules, candidate.rules):
            self._shared = _Lane(current.rules, (self.current, self.candidate), view,
                                 self.deserializer, self.inputs, self.held_inputs)
            lanes.append(self._shared)
        self._lanes = tuple(lanes)
        self._fork_on_hold = (current.rules.hold_timeout_seconds
                              != candidate.rules.hold_timeout_seconds)
        a, b = current.rules, candidate.rules
        self._same_policy = (a.price_tolerance_bps == b.price_tolerance_bps
                             and a.discount_family_bps == b.discount_family_bps
                             and a.discount_sku_bps == b.discount_sku_bps)
        self._decoder = Engine(rules=current.rules, reference=view, deserializer=self.deserializer)
        self.clock: dict[int, int] = {}
        self.read = 0
        self.warmup = 0
        self.dead_letters = 0
        self.first_ms: int | None = None
        self.last_ms: int | None = None
        self.shared_inputs = 0  # judged once for both sides
        self.forked_orders = 0
        self.rejoined_orders = 0

    def _agrees(self, event: Mapping[str, Any]) -> bool:
        if self._same_policy:
            return True
        a, b = self.current_side.rules, self.candidate_side.rules
        try:
            if event["envelope"]["event_type"] not in POLICY_EVENT_TYPES:
                return True  # what policy_agrees says first
            if self._timed:
                return all(policy_agrees(event, data, a, b) for data in self._snapshots)
            return policy_agrees(event, self._reference, a, b)
        except Exception:  # an event policy() itself would fail on: judge it twice
            return False

    def _fork(self, partition: int, key: bytes) -> None:
        assert self._shared is not None
        state = self._shared.states.pop(key)
        self.forked_orders += 1
        self.held_inputs.copied(state)
        self._candidate_lane.adopt(partition, key, OrderState(_clone(state.data)))
        self._current_lane.adopt(partition, key, state)

    def _rejoin(self, key: bytes) -> None:
        """Both sides' states of a split order are equal again and hold nothing: from here
        it is judged once again, as an order that never split (every held input was shown
        to agree when it was read; here none is held, so nothing judged later skipped that)."""
        assert self._shared is not None
        self._shared.states[key] = self._current_lane.states.pop(key)
        del self._candidate_lane.states[key]
        self.rejoined_orders += 1

    def feed(self, record: InputRecord, *, counted: bool = True) -> None:
        """One input, in its partition's order. ``counted=False``: warm-up only."""
        self.read += 1
        partition = record.partition
        now = record.timestamp_ms
        clock = self.clock.get(partition, 0)
        if clock > now:
            now = clock
        else:
            self.clock[partition] = now
        if self._timed:
            self._reference = self.timeline.at(now)
        for lane in self._lanes:
            heap = lane.deadlines.get(partition)
            if heap and heap[0][0] < now:
                lane.expire(partition, now)
        if counted:
            if self.first_ms is None or now < self.first_ms:
                self.first_ms = now
            if self.last_ms is None or now > self.last_ms:
                self.last_ms = now
        else:
            self.warmup += 1
        event: Mapping[str, Any] | None = None
        dead: Decision | None = None
        if not record.value:
            dead = Decision(input=record, kind=DEAD_LETTER, stage="decode",
                            error_class="NullValue", reason="null value: no event",
                            decided_at_ms=now)
        else:
            try:
                event, dead = self._decoder.decode(record, now)
            except Exception as exc:  # a decoder bug: dead-lettered live as well
                dead = Decision(input=record, kind=DEAD_LETTER, stage="decode",
                                error_class=type(exc).__name__, reason=f"decoder error: {exc}",
                                decided_at_ms=now)
        offset = record.offset
        coords = f"{record.topic}/{partition}/{offset}"
        if counted:
            amount, currency = event_amount(event)
            line = record.header("revline-source-line")
            source_line = line.decode(errors="replace") if line else None
            if event is not None:
                env = event["envelope"]
                self.inputs[coords] = (coords, partition, offset, now, env["order_id"],
                                       env["event_type"], env["idempotency_key"], source_line,
                                       amount, currency)
            else:
                self.inputs[coords] = (coords, partition, offset, now, _text(record.key), None,
                                       None, source_line, amount, currency)
        if dead is not None:
            if counted:
                self.dead_letters += 1
                self._current_lane.record([dead], record, coords)
                self._candidate_lane.record([dead], record, coords)
            return
        assert event is not None
        shared = self._shared
        key = record.key
        if shared is not None and key not in self._current_lane.states:
            if self._agrees(event):
                self.shared_inputs += 1
                state = shared.process(record, event, now, coords)
                if self._fork_on_hold and state.data["held"]:
                    assert key is not None
                    self._fork(record.partition, key)
                return
            if key in shared.states:
                assert key is not None
                self._fork(record.partition, key)
        digest = body_hash(record.value)  # one hash for both engines
        current = self._current_lane.process(record, event, now, coords, digest)
        candidate = self._candidate_lane.process(record, event, now, coords, digest)
        # The tokens first: a small dict, and where the sides part (a booking refused on
        # one side only) they differ.
        a, b = current.data, candidate.data
        if shared is not None and not a["held"] and a["tokens"] == b["tokens"] and a == b:
            assert key is not None
            self._rejoin(key)

    def finish(self, end_ms: int | None = None, *, samples: int = 5) -> BacktestReport:
        """Time out what was due by ``end_ms`` (default: the last record's time) and compare."""
        end = end_ms if end_ms is not None else max(self.clock.values(), default=0)
        if len(self.timeline.snapshots) > 1:
            self._reference = self.timeline.at(end)
        for lane in self._lanes:
            lane.finish(end)
        return build_report(self, end, samples=samples)



def _text(raw: bytes | None) -> str | None:
    return raw.decode(errors="replace") if raw is not None else None


# -- the report ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    info: InputInfo
    before: Outcome
    after: Outcome

    @property
    def transition(self) -> tuple[str, str]:
        return self.before.describe(), self.after.describe()

    @property
    def money_move(self) -> str | None:
        """"held_back" (validated before, not now), "released" (the reverse), else None."""
        was, now = self.before.kind == VALIDATED, self.after.kind == VALIDATED
        if was == now or self.info.amount_minor is None:
            return None
        return "held_back" if was else "released"

    def as_dict(self) -> dict[str, Any]:
        i = self.info
        return {"input": i.coords, "partition": i.partition, "offset": i.offset,
                "timestamp_ms": i.timestamp_ms, "order_id": i.order_id,
                "event_type": i.event_type, "idempotency_key": i.idempotency_key,
                "source_line": i.source_line,
                "amount": _money(i.amount_minor, i.currency),
                "before": self.before.as_dict(), "after": self.after.as_dict()}


def _same_verdict(a: Outcome, b: Outcome) -> bool:
    """``a.verdict == b.verdict``, compared field by field (no tuples built, no sorting
    unless both are validated with warnings in another order)."""
    if a is b:
        return True
    if (a.kind != b.kind or a.check_id != b.check_id or a.opens != b.opens
            or a.severity != b.severity or a.owner != b.owner):
        return False
    return a.kind != VALIDATED or a.warnings == b.warnings or sorted(a.warnings) == sorted(
        b.warnings)


def _input_order(change: Change) -> tuple[int, int, int]:
    info = change.info
    return info.timestamp_ms, info.partition, info.offset


def _money(minor: int | None, currency: str | None) -> dict[str, Any] | None:
    if minor is None or currency is None:
        return None
    return {"minor": minor, "currency": currency, "major": str(to_major(minor, currency)),
            "text": format_money(minor, currency)}


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")


def _days() -> Callable[[int], str]:
    """``_day`` remembering each day it named (a report names a few days, per input)."""
    named: dict[int, str] = {}

    def day(ms: int) -> str:
        number = ms // 86_400_000
        text = named.get(number)
        if text is None:
            text = named[number] = _day(number * 86_400_000)
        return text

    return day


@dataclass
class BacktestReport:
    current: Side
    candidate: Side
    end_ms: int
    inputs: int  # counted inputs
    warmup: int
    dead_letters: int
    first_ms: int | None
    last_ms: int | None
    changes: list[Change]
    transitions: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    exceptions: dict[str, int]
    workload: list[dict[str, Any]]
    daily: list[dict[str, Any]]
    money: list[dict[str, Any]]
    holds: dict[str, Any]
    orders_affected: int
    rule_changes: list[str]
    reference: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    engine_errors: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return len(self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "current": self.current.describe(),
            "candidate": self.candidate.describe(),
            "rule_changes": self.rule_changes,
            "window": {"end_ms": self.end_ms, "first_input_ms": self.first_ms,
                       "last_input_ms": self.last_ms},
            "inputs": {"counted": self.inputs, "warmup": self.warmup,
                       "dead_letters": self.dead_letters},
            "changed": self.changed,
            "orders_affected": self.orders_affected,
            "transitions": self.transitions,
            "checks": self.checks,
            "exceptions": self.exceptions,
            "workload": self.workload,
            "daily": self.daily,
            "money": self.money,
            "holds": self.holds,
            "reference": self.reference,
            "engine_errors": self.engine_errors,
            "notes": self.notes,
            "changes": [c.as_dict() for c in self.changes],
        }


def build_report(bt: Backtest, end_ms: int, *, samples: int = 5) -> BacktestReport:
    before_all, after_all = bt.current.outcomes, bt.candidate.outcomes
    pending = Outcome(kind=PENDING)
    changes: list[Change] = []
    # One pass over the inputs: what changes, and each side's exceptions per check, per
    # owner and severity, per owner and day (the day named only for an input that opens
    # one), and what is still pending. An order both sides ran once has one outcome
    # object in both books: it cannot change.
    per_check_before: Counter[str] = Counter()
    per_check_after: Counter[str] = Counter()
    cell_before: Counter[tuple[str, str]] = Counter()
    cell_after: Counter[tuple[str, str]] = Counter()
    day_before: Counter[tuple[str, str]] = Counter()
    day_after: Counter[tuple[str, str]] = Counter()
    pending_before = pending_after = 0
    day_of = _days()
    before_of, after_of = before_all.get, after_all.get
    for coords, row in bt.inputs.items():
        before = before_of(coords, pending)
        after = after_of(coords, pending)
        if before is after and before.opens is None:  # the common case: nothing to count
            if before.kind == PENDING:
                pending_before += 1
                pending_after += 1
            continue
        if not _same_verdict(before, after):
            changes.append(Change(InputInfo(*row), before, after))
        opens = before.opens
        if opens:
            per_check_before[opens] += 1
            owner, severity = before.owner, before.severity
            if owner and severity:
                cell_before[(owner, severity)] += 1
                day_before[(owner, day_of(row[3]))] += 1  # its timestamp_ms
        elif before.kind == PENDING:
            pending_before += 1
        opens = after.opens
        if opens:
            per_check_after[opens] += 1
            owner, severity = after.owner, after.severity
            if owner and severity:
                cell_after[(owner, severity)] += 1
                day_after[(owner, day_of(row[3]))] += 1
        elif after.kind == PENDING:
            pending_after += 1
    changes.sort(key=_input_order)

    # Kinds of change, each with how many inputs and orders and a few samples.
    groups: dict[tuple[str, str], list[Change]] = defaultdict(list)
    for change in changes:
        groups[change.transition].append(change)
    transitions = [
        {"before": b, "after": a, "inputs": len(group),
         "orders": len({c.info.order_id for c in group}),
         "samples": [{"input": c.info.coords, "order_id": c.info.order_id,
                      "event_type": c.info.event_type, "source_line": c.info.source_line,
                      "reason_before": c.before.reason, "reason_after": c.after.reason}
                     for c in group[:samples]]}
        for (b, a), group in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    ]

    # Exceptions per check, opened / closed / reassigned.
    checks = [{"check_id": c, "before": per_check_before[c], "after": per_check_after[c],
               "delta": per_check_after[c] - per_check_before[c]}
              for c in sorted(set(per_check_before) | set(per_check_after))]
    opened = closed = reassigned = 0
    for change in changes:
        b, a = change.before, change.after
        if b.opens is None and a.opens is not None:
            opened += 1
        elif b.opens is not None and a.opens is None:
            closed += 1
        elif (b.opens, b.severity, b.owner) != (a.opens, a.severity, a.owner):
            reassigned += 1
    exceptions = {"before": sum(per_check_before.values()),
                  "after": sum(per_check_after.values()),
                  "opened": opened, "closed": closed, "changed": reassigned}

    # Owners' workload: per owner and severity, and per owner and day against the
    # busiest day the current rules gave them in the window (the capacity they showed).
    sla_before = bt.current_side.ownership.sla_minutes
    sla_after = bt.candidate_side.ownership.sla_minutes
    owners = sorted(set(OWNERS) | {o for o, _ in cell_before} | {o for o, _ in cell_after})
    workload = [
        {"owner": owner, "severity": sev, "before": cell_before[(owner, sev)],
         "after": cell_after[(owner, sev)],
         "delta": cell_after[(owner, sev)] - cell_before[(owner, sev)],
         "sla_minutes_before": sla_before.get(sev), "sla_minutes_after": sla_after.get(sev)}
        for owner in owners for sev in SEVERITIES
        if cell_before[(owner, sev)] or cell_after[(owner, sev)]
    ]
    capacity = {owner: max((n for (o, _), n in day_before.items() if o == owner), default=0)
                for owner in owners}
    daily = []
    for owner, day in sorted(set(day_before) | set(day_after), key=lambda k: (k[1], k[0])):
        after_n = day_after[(owner, day)]
        daily.append({"day": day, "owner": owner, "before": day_before[(owner, day)],
                      "after": after_n, "capacity": capacity[owner],
                      "over_capacity": after_n > capacity[owner]})

    # Money that changes state: validated on one side only, per currency and event type.
    money_cells: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {"held_back": 0, "released": 0, "held_back_inputs": 0, "released_inputs": 0})
    for change in changes:
        move = change.money_move
        info = change.info
        if move is None or info.currency is None or info.amount_minor is None:
            continue
        cell = money_cells[(info.currency, info.event_type or "")]
        cell[move] += info.amount_minor
        cell[f"{move}_inputs"] += 1
    money = []
    for (currency, event_type), cell in sorted(money_cells.items()):
        net = cell["released"] - cell["held_back"]
        money.append({
            "currency": currency, "event_type": event_type,
            "held_back": str(to_major(cell["held_back"], currency)),
            "released": str(to_major(cell["released"], currency)),
            "net": str(to_major(net, currency)),
            "held_back_minor": cell["held_back"], "released_minor": cell["released"],
            "held_back_inputs": cell["held_back_inputs"],
            "released_inputs": cell["released_inputs"],
        })

    holds = {
        "hold_timeout_seconds_before": bt.current_side.rules.hold_timeout_seconds,
        "hold_timeout_seconds_after": bt.candidate_side.rules.hold_timeout_seconds,
        "timeouts_before": per_check_before["hold.timeout"],
        "timeouts_after": per_check_after["hold.timeout"],
        "pending_at_end_before": pending_before,
        "pending_at_end_after": pending_after,
    }
    notes = list(bt.timeline.notes)
    if holds["pending_at_end_before"]:
        notes.append(f"{holds['pending_at_end_before']} input(s) still held at the window's end "
                     "with the current rules: their dependency is not in the window (it may "
                     "come later, or precede the warm-up: a longer --warmup reads it)")
    engine_errors = {k: v for k, v in (("current", bt.current.engine_errors),
                                       ("candidate", bt.candidate.engine_errors)) if v}
    return BacktestReport(
        current=bt.current_side, candidate=bt.candidate_side, end_ms=end_ms,
        inputs=len(bt.inputs), warmup=bt.warmup, dead_letters=bt.dead_letters,
        first_ms=bt.first_ms, last_ms=bt.last_ms, changes=changes, transitions=transitions,
        checks=checks, exceptions=exceptions, workload=workload, daily=daily, money=money,
        holds=holds, orders_affected=len({c.info.order_id for c in changes}),
        rule_changes=rules_differences(bt.current_side.rules, bt.candidate_side.rules),
        reference=bt.timeline.describe(), notes=notes, engine_errors=engine_errors,
    )


def money_total(money: Sequence[Mapping[str, Any]], field_name: str) -> dict[str, Decimal]:
    """Per currency, the sum of one money column (``held_back``, ``released``, ``net``)."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    for row in money:
        out[row["currency"]] += Decimal(row[field_name])
    return dict(sorted(out.items()))


__all__ = [
    "PENDING",
    "Backtest",
    "BacktestReport",
    "Change",
    "InputInfo",
    "Outcome",
    "ReferenceTimeline",
    "Side",
    "build_report",
    "missing_checks",
    "money_total",
    "outcome_of",
    "reference_timeline",
    "rules_differences",
]
