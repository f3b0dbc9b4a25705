"""The Monday-morning operations report: what happened, what is open, what is late.

Three layers, so the arithmetic is testable with plain values:

* plain input records (``ExceptionItem``, ``OverrideItem``, ``ReconcileRun`` and
  outcome dicts as the ``Outcome`` Avro record decodes);
* pure computations (``build_report`` and the functions it calls) that turn them
  into an ``OperationsReport`` of plain values;
* ``read_inputs``, which reads the Kafka topics completely (it is a report, not a
  sample) and is the only part that talks to Kafka.

Flow figures (outcomes, QA failures, overrides, duplicates, latency) cover the
report period; open exceptions are a snapshot at the time of the report; SLA
compliance covers the exceptions opened in the period.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from revline.core.errors import ConfigurationError, InfrastructureError, RevlineError
from revline.core.money import format_money

if TYPE_CHECKING:
    from revline.core.settings import Settings

Outcome = dict[str, Any]

# -- targets the users measure (MISSION.md) ------------------------------------------
DELIVERY_TARGET_PCT = 99.5  # canonical event delivery success
DRIFT_TARGET_PCT = 0.1  # reconciliation drift per week
LATENCY_TARGET_MS = 24 * 3_600_000  # trigger-to-outcome, non-exception flows
MTTR_P1_TARGET_MS = 4 * 3_600_000  # invoice-stopping exceptions
DEFAULT_SLA_MS = {"P1": 15 * 60_000, "P2": 120 * 60_000, "P3": 2880 * 60_000}

OPEN_STATUSES = frozenset({"open", "acknowledged"})
SEVERITIES = ("P1", "P2", "P3")
OWNERS = ("revenue_ops", "finance", "integrations")
# Upper bounds (ms) of the age columns for open exceptions; the last is open-ended.
AGE_BUCKETS: tuple[tuple[int | None, str], ...] = (
    (15 * 60_000, "under 15 min"),
    (2 * 3_600_000, "15 min – 2 h"),
    (24 * 3_600_000, "2 h – 1 day"),
    (7 * 86_400_000, "1 – 7 days"),
    (None, "over 7 days"),
)
LATENCY_BUCKETS: tuple[tuple[int | None, str], ...] = (
    (100, "< 0.1 s"),
    (1_000, "0.1 – 1 s"),
    (10_000, "1 – 10 s"),
    (60_000, "10 s – 1 min"),
    (3_600_000, "1 min – 1 h"),
    (LATENCY_TARGET_MS, "1 – 24 h"),
    (None, "> 24 h"),
)
# Reason codes that say nothing: an override carrying one counts as "without reason".
EMPTY_REASONS = frozenset({"", "-", "n/a", "na", "none", "null", "tbd", "unknown", "?"})
# A dead-lettered override: the worker refused it at the door (no reason code, actor…).
_REFUSED_OVERRIDE = re.compile(r"manual_override requires (\w+)")


# -- plain inputs ----------------------------------------------------------------------
@dataclass(frozen=True)
class ExceptionItem:
    """One exception as the report needs it (from the state topic or an exception record)."""

    exception_id: str
    check_id: str
    severity: str
    owner: str
    status: str  # open | acknowledged | resolved | waived | expired
    opened_at_ms: int
    sla_deadline_ms: int
    closed_at_ms: int | None = None
    acknowledged_at_ms: int | None = None
    escalated: bool = False
    backup_owner: str | None = None
    reason_code: str | None = None
    order_id: str | None = None
    amount_minor: int | None = None
    currency: str | None = None

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def responded_at_ms(self) -> int | None:
        """First human response: acknowledged, or closed without an acknowledgement."""
        times = [t for t in (self.acknowledged_at_ms, self.closed_at_ms) if t is not None]
        return min(times) if times else None


@dataclass(frozen=True)
class OverrideItem:
    """A ``manual_override`` event from the validated topic."""

    override_id: str
    order_id: str
    target_idempotency_key: str
    check_id: str
    reason_code: str
    actor: str
    occurred_at_ms: int
    expires_at_ms: int
    note: str | None = None

    def expired(self, now_ms: int) -> bool:
        return self.expires_at_ms <= now_ms

    @property
    def reasonless(self) -> bool:
        return self.reason_code.strip().lower() in EMPTY_REASONS


@dataclass(frozen=True)
class ReconcileRun:
    """The latest ``reconcile`` audit fact."""

    at_ms: int
    actor: str
    period: str
    drift_pct: float | None
    checked: int | None
    missing: int | None
    extra: int | None
    mismatched: int | None

    @property
    def within_target(self) -> bool | None:
        return None if self.drift_pct is None else self.drift_pct <= DRIFT_TARGET_PCT


@dataclass
class ReportInputs:
    outcomes: list[Outcome] = field(default_factory=list)
    exceptions: list[ExceptionItem] = field(default_factory=list)
    exceptions_source: str = "exception state topic"
    overrides: list[OverrideItem] = field(default_factory=list)
    reconcile: ReconcileRun | None = None
    notes: list[str] = field(default_factory=list)
    # check id -> (severity, owner) from the QA rules, for checks seen only as warnings
    check_specs: Mapping[str, tuple[str, str]] = field(default_factory=dict)


# -- results ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowSummary:
    inputs: int  # distinct inputs with a final outcome in the period
    validated: int
    exceptions: int
    duplicates: int
    dead_letters: int
    held: int  # inputs that waited for a dependency before their decision
    dead_letters_by_stage: tuple[tuple[str, int], ...]

    @property
    def delivery_success_pct(self) -> float | None:
        """Inputs that were read and judged (not dead-lettered), in percent."""
        return None if not self.inputs else 100.0 * (self.inputs - self.dead_letters) / self.inputs


@dataclass(frozen=True)
class OwnerAges:
    owner: str
    by_age: tuple[int, ...]  # one count per AGE_BUCKETS entry
    by_severity: tuple[int, ...]  # one count per SEVERITIES entry
    overdue: int  # past their SLA deadline, not yet responded to
    oldest_age_ms: int

    @property
    def total(self) -> int:
        return sum(self.by_age)


@dataclass(frozen=True)
class OpenExceptions:
    total: int
    overdue: int
    escalated: int
    by_owner: tuple[OwnerAges, ...]
    by_severity: tuple[tuple[str, int], ...]
    amounts: tuple[tuple[str, int], ...]  # currency -> minor units held up by open exceptions
    oldest: tuple[ExceptionItem, ...]  # the longest-open ones, oldest first

    @property
    def oldest_age_ms(self) -> int | None:
        ages = [row.oldest_age_ms for row in self.by_owner if row.total]
        return max(ages) if ages else None


@dataclass(frozen=True)
class SlaRow:
    severity: str
    target_ms: int
    opened: int  # exceptions opened in the period
    met: int  # responded to by the deadline
    breached: int  # responded late, escalated, or still unanswered past the deadline
    pending: int  # open and not yet due
    p50_close_ms: int | None  # opened -> resolved/waived, for those closed
    p95_close_ms: int | None

    @property
    def compliance_pct(self) -> float | None:
        due = self.met + self.breached
        return None if not due else 100.0 * self.met / due


@dataclass(frozen=True)
class QaRow:
    check_id: str
    severity: str
    owner: str
    failures: int  # inputs that became an exception for this check
    warnings: int  # inputs that passed with this (advisory) finding
    rate_pct: float  # failures per judged input


@dataclass(frozen=True)
class OverridesSummary:
    items: tuple[OverrideItem, ...]  # newest first
    by_reason: tuple[tuple[str, int], ...]
    expired: int
    reasonless: int
    refused: int  # dead-lettered at the worker: reason code, actor, check or target missing
    exceptions_by_check: tuple[tuple[str, int], ...]  # override.* exceptions


@dataclass(frozen=True)
class DuplicatesSummary:
    prevented: int
    by_event_type: tuple[tuple[str, int], ...]
    conflicts: int  # same key, different body: an exception, not applied
    invoices: int  # distinct invoices validated in the period
    invoice_duplicates: int  # re-sent invoices recognised and not applied


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50_ms: int | None
    p90_ms: int | None
    p95_ms: int | None
    p99_ms: int | None
    max_ms: int | None
    within_target_pct: float | None
    histogram: tuple[tuple[str, int], ...]
    by_kind: tuple[tuple[str, int, int | None, int | None], ...]  # kind, n, p50, p95


@dataclass(frozen=True)
class OperationsReport:
    generated_at_ms: int
    since_ms: int
    flow: FlowSummary
    open_exceptions: OpenExceptions
    sla: tuple[SlaRow, ...]
    qa: tuple[QaRow, ...]
    judged: int  # inputs the QA checks ran on (validated + exception)
    overrides: OverridesSummary
    duplicates: DuplicatesSummary
    latency: LatencySummary
    reconciliation: ReconcileRun | None
    exceptions_source: str
    notes: tuple[str, ...] = ()

    @property
    def sla_compliance_pct(self) -> float | None:
        met = sum(r.met for r in self.sla)
        due = met + sum(r.breached for r in self.sla)
        return None if not due else 100.0 * met / due


# -- pure computations -----------------------------------------------------------------
def percentile(values: Sequence[int], q: float) -> int | None:
    """Nearest-rank percentile (a value that occurred), ``q`` in 0–100."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def final_outcomes(outcomes: Iterable[Outcome], since_ms: int = 0) -> list[Outcome]:
    """One final outcome per input (a replay repeats a record, never changes it)."""
    seen: dict[tuple[str, int, int], Outcome] = {}
    for o in outcomes:
        if not o["final"] or o["decided_at_ms"] < since_ms:
            continue
        seen.setdefault((o["input_topic"], o["input_partition"], o["input_offset"]), o)
    return list(seen.values())


def summarise_flow(finals: Sequence[Outcome]) -> FlowSummary:
    kinds = Counter(o["kind"] for o in finals)
    stages = Counter(o["stage"] or "unknown" for o in finals if o["kind"] == "dead_letter")
    return FlowSummary(
        inputs=len(finals), validated=kinds["validated"], exceptions=kinds["exception"],
        duplicates=kinds["duplicate"], dead_letters=kinds["dead_letter"],
        held=sum(1 for o in finals if o["held"]),
        dead_letters_by_stage=tuple(stages.most_common()),
    )


def _bucket(value: int, buckets: tuple[tuple[int | None, str], ...]) -> int:
    for i, (upper, _) in enumerate(buckets):
        if upper is None or value < upper:
            return i
    return len(buckets) - 1


def _overdue(e: ExceptionItem, now_ms: int) -> bool:
    return e.is_open and e.acknowledged_at_ms is None and now_ms > e.sla_deadline_ms


def summarise_open(items: Sequence[ExceptionItem], now_ms: int,
                   oldest_n: int = 10) -> OpenExceptions:
    open_items = [e for e in items if e.is_open]
    owners = list(OWNERS) + sorted({e.owner for e in open_items} - set(OWNERS))
    rows = []
    for owner in owners:
        mine = [e for e in open_items if e.owner == owner]
        ages = [0] * len(AGE_BUCKETS)
        sev = [0] * len(SEVERITIES)
        for e in mine:
            ages[_bucket(now_ms - e.opened_at_ms, AGE_BUCKETS)] += 1
            if e.severity in SEVERITIES:
                sev[SEVERITIES.index(e.severity)] += 1
        rows.append(OwnerAges(
            owner=owner, by_age=tuple(ages), by_severity=tuple(sev),
            overdue=sum(1 for e in mine if _overdue(e, now_ms)),
            oldest_age_ms=max((now_ms - e.opened_at_ms for e in mine), default=0),
        ))
    amounts: Counter[str] = Counter()
    for e in open_items:
        if e.amount_minor is not None and e.currency:
            amounts[e.currency] += e.amount_minor
    severities = Counter(e.severity for e in open_items)
    return OpenExceptions(
        total=len(open_items),
        overdue=sum(1 for e in open_items if _overdue(e, now_ms)),
        escalated=sum(1 for e in open_items if e.escalated),
        by_owner=tuple(rows),
        by_severity=tuple((s, severities[s]) for s in sorted(severities)),
        amounts=tuple(sorted(amounts.items())),
        oldest=tuple(sorted(open_items, key=lambda e: (e.opened_at_ms, e.exception_id))[:oldest_n]),
    )


def _sla_target(items: Sequence[ExceptionItem], severity: str) -> int:
    lengths = Counter(e.sla_deadline_ms - e.opened_at_ms for e in items)
    return lengths.most_common(1)[0][0] if lengths else DEFAULT_SLA_MS.get(severity, 0)


def sla_compliance(items: Sequence[ExceptionItem], now_ms: int, since_ms: int) -> list[SlaRow]:
    """Per severity, of the exceptions opened in the period: answered in time or not.

    The SLA is the time to a first response (acknowledged, or closed); an
    escalation happens only on a breach, so an escalated exception is breached.
    """
    period = [e for e in items if e.opened_at_ms >= since_ms]
    severities = list(SEVERITIES) + sorted({e.severity for e in period} - set(SEVERITIES))
    rows = []
    for severity in severities:
        mine = [e for e in period if e.severity == severity]
        met = breached = pending = 0
        for e in mine:
            responded = e.responded_at_ms
            if e.escalated or (responded is not None and responded > e.sla_deadline_ms):
                breached += 1
            elif responded is not None:
                met += 1
            elif now_ms > e.sla_deadline_ms:
                breached += 1
            else:
                pending += 1
        closes = [e.closed_at_ms - e.opened_at_ms for e in mine
                  if e.closed_at_ms is not None and not e.is_open]
        rows.append(SlaRow(severity=severity, target_ms=_sla_target(mine, severity),
                           opened=len(mine), met=met, breached=breached, pending=pending,
                           p50_close_ms=percentile(closes, 50),
                           p95_close_ms=percentile(closes, 95)))
    return rows


def qa_failure_rates(finals: Sequence[Outcome],
                     check_specs: Mapping[str, tuple[str, str]] | None = None,
                     ) -> tuple[list[QaRow], int]:
    """Failures and advisory warnings per check, as a share of the inputs QA judged."""
    judged = [o for o in finals if o["kind"] in ("validated", "exception")]
    failures: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    spec: dict[str, tuple[str, str]] = dict(check_specs or {})
    for o in judged:
        if o["kind"] == "exception" and o["check_id"]:
            failures[o["check_id"]] += 1
            if o["severity"] and o["owner"]:  # what the pipeline decided beats the defaults
                spec[o["check_id"]] = (o["severity"], o["owner"])
        for check_id in set(o.get("warnings") or ()):
            warnings[check_id] += 1
    rows = [
        QaRow(check_id=c, severity=spec.get(c, ("—", "—"))[0], owner=spec.get(c, ("—", "—"))[1],
              failures=failures[c], warnings=warnings[c],
              rate_pct=100.0 * failures[c] / len(judged) if judged else 0.0)
        for c in set(failures) | set(warnings)
    ]
    rows.sort(key=lambda r: (-r.failures, -r.warnings, r.check_id))
    return rows, len(judged)


def summarise_overrides(overrides: Sequence[OverrideItem], finals: Sequence[Outcome],
                        exceptions: Sequence[ExceptionItem], now_ms: int,
                        since_ms: int) -> OverridesSummary:
    """Overrides made in the period or still in force, and those refused at the door."""
    unique = {o.override_id: o for o in overrides}.values()
    items = sorted((o for o in unique if o.occurred_at_ms >= since_ms or not o.expired(now_ms)),
                   key=lambda o: (-o.occurred_at_ms, o.override_id))
    reasons = Counter(o.reason_code.strip() or "(none)" for o in items)
    refused = sum(1 for o in finals if o["kind"] == "dead_letter"
                  and _REFUSED_OVERRIDE.search(o.get("reason") or ""))
    checks = Counter(e.check_id for e in exceptions
                     if e.check_id.startswith("override.") and e.opened_at_ms >= since_ms)
    return OverridesSummary(
        items=tuple(items), by_reason=tuple(reasons.most_common()),
        expired=sum(1 for o in items if o.expired(now_ms)),
        reasonless=sum(1 for o in items if o.reasonless), refused=refused,
        exceptions_by_check=tuple(sorted(checks.items())),
    )


def summarise_duplicates(finals: Sequence[Outcome]) -> DuplicatesSummary:
    dupes = Counter(o["event_type"] or "unknown" for o in finals if o["kind"] == "duplicate")
    invoices = {o["idempotency_key"] for o in finals
                if o["kind"] == "validated" and o["event_type"] == "invoice_issued"}
    return DuplicatesSummary(
        prevented=sum(dupes.values()), by_event_type=tuple(dupes.most_common()),
        conflicts=sum(1 for o in finals
                      if o["kind"] == "exception" and o["check_id"] == "dedup.conflict"),
        invoices=len(invoices), invoice_duplicates=dupes["invoice_issued"],
    )


def summarise_latency(finals: Sequence[Outcome]) -> LatencySummary:
    """Trigger (the event's occurred_at) to outcome (the worker's decision)."""
    timed = [o for o in finals if o["occurred_at_ms"] is not None and o["kind"] != "dead_letter"]
    values = [max(0, o["decided_at_ms"] - o["occurred_at_ms"]) for o in timed]
    hist = [0] * len(LATENCY_BUCKETS)
    for v in values:
        hist[_bucket(v, LATENCY_BUCKETS)] += 1
    by_kind = []
    for kind in ("validated", "exception", "duplicate"):
        vs = [max(0, o["decided_at_ms"] - o["occurred_at_ms"]) for o in timed if o["kind"] == kind]
        if vs:
            by_kind.append((kind, len(vs), percentile(vs, 50), percentile(vs, 95)))
    # The users' target is for non-exception flows: the validated ones.
    clean = [v for o, v in zip(timed, values, strict=True) if o["kind"] == "validated"]
    return LatencySummary(
        count=len(values), p50_ms=percentile(values, 50), p90_ms=percentile(values, 90),
        p95_ms=percentile(values, 95), p99_ms=percentile(values, 99),
        max_ms=max(values) if values else None,
        within_target_pct=(100.0 * sum(1 for v in clean if v < LATENCY_TARGET_MS) / len(clean)
                           if clean else None),
        histogram=tuple((label, hist[i]) for i, (_, label) in enumerate(LATENCY_BUCKETS)),
        by_kind=tuple(by_kind),
    )


def build_report(inputs: ReportInputs, *, now_ms: int, since_ms: int) -> OperationsReport:
    finals = final_outcomes(inputs.outcomes, since_ms)
    qa, judged = qa_failure_rates(finals, inputs.check_specs)
    return OperationsReport(
        generated_at_ms=now_ms, since_ms=since_ms,
        flow=summarise_flow(finals),
        open_exceptions=summarise_open(inputs.exceptions, now_ms),
        sla=tuple(sla_compliance(inputs.exceptions, now_ms, since_ms)),
        qa=tuple(qa), judged=judged,
        overrides=summarise_overrides(inputs.overrides, finals, inputs.exceptions, now_ms,
                                      since_ms),
        duplicates=summarise_duplicates(finals),
        latency=summarise_latency(finals),
        reconciliation=inputs.reconcile,
        exceptions_source=inputs.exceptions_source,
        notes=tuple(inputs.notes),
    )


# -- parsing records into plain inputs -------------------------------------------------
def _ms(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value)


def exception_from_state(data: Mapping[str, Any]) -> ExceptionItem:
    """A value of the compacted exception state topic (JSON)."""
    try:
        amount = data.get("amount_minor")
        return ExceptionItem(
            exception_id=str(data["exception_id"]), check_id=str(data["check_id"]),
            severity=str(data["severity"]), owner=str(data["owner"]),
            status=str(data.get("status") or "open"),
            opened_at_ms=int(data["opened_at_ms"]), sla_deadline_ms=int(data["sla_deadline_ms"]),
            closed_at_ms=_ms(data.get("closed_at_ms")),
            acknowledged_at_ms=_ms(data.get("acknowledged_at_ms")),
            escalated=bool(data.get("escalated")),
            backup_owner=data.get("backup_owner"), reason_code=data.get("reason_code"),
            order_id=data.get("order_id"),
            amount_minor=int(amount) if amount is not None else None,
            currency=data.get("currency"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RevlineError(f"exception state record is not readable: {exc!r}") from exc


def exception_from_record(rec: Mapping[str, Any]) -> ExceptionItem:
    """An ``ExceptionRecord`` from the exceptions topic, without lifecycle: open."""
    return ExceptionItem(
        exception_id=rec["exception_id"], check_id=rec["check_id"], severity=rec["severity"],
        owner=rec["owner"], status="open", opened_at_ms=rec["opened_at_ms"],
        sla_deadline_ms=rec["sla_deadline_ms"], order_id=rec.get("order_id"),
    )


def override_from_event(event: Mapping[str, Any]) -> OverrideItem:
    env = event["envelope"]
    return OverrideItem(
        override_id=event["override_id"], order_id=env["order_id"],
        target_idempotency_key=event["target_idempotency_key"], check_id=event["check_id"],
        reason_code=event["reason_code"] or "", actor=event["actor"],
        occurred_at_ms=_ms(env["occurred_at"]) or 0, expires_at_ms=_ms(event["expires_at"]) or 0,
        note=event.get("note"),
    )


def _count(value: Any) -> int | None:
    """Reconcile details may give a count or the list of what was counted."""
    if value is None:
        return None
    if isinstance(value, list | tuple | dict):
        return len(value)
    return int(value)


def _period(value: Any) -> str:
    if isinstance(value, Mapping):
        parts = [str(value[k]) for k in ("from", "start", "to", "end") if value.get(k)]
        return " → ".join(parts) if parts else str(dict(value))
    if isinstance(value, list | tuple):
        return " → ".join(str(v) for v in value)
    return "" if value is None else str(value)


def reconcile_from_fact(at_ms: int, actor: str, detail: Mapping[str, Any]) -> ReconcileRun:
    drift = detail.get("drift_pct")
    return ReconcileRun(
        at_ms=at_ms, actor=actor, period=_period(detail.get("period")),
        drift_pct=float(drift) if drift is not None else None,
        checked=_count(detail.get("checked")), missing=_count(detail.get("missing")),
        extra=_count(detail.get("extra")), mismatched=_count(detail.get("mismatched")),
    )


_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|min|h|d|w)\s*$", re.I)
_UNIT_S = {"m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now_ms: int) -> int:
    """``7d``, ``36h``, ``2w``, ``90m``, or an ISO date/time (UTC when no zone) → epoch ms."""
    match = _SINCE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
        return now_ms - int(seconds * 1000)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(
            f"--since {text!r}: give a duration such as 7d, 36h, 2w, 90m, or a date such as "
            "2026-11-17 or 2026-11-17T08:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# -- reading Kafka -----------------------------------------------------------------------
@dataclass(frozen=True)
class TopicRecord:
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int


def read_all(bootstrap: str, topic: str, *, timeout_s: float = 300.0,
             progress: Callable[[int], None] | None = None) -> Iterator[TopicRecord] | None:
    """Every committed record of ``topic`` up to its end now; None if the topic is absent."""
    from confluent_kafka import Consumer, KafkaException

    from revline.core.kafka_config import client_config
    from revline.core.readback import read_topic

    probe = Consumer(client_config("consumer", bootstrap, {"group.id": "revline-report-probe"}))
    try:
        info = probe.list_topics(topic, timeout=15).topics.get(topic)
    except KafkaException as exc:
        raise InfrastructureError(f"cannot read {topic} on {bootstrap}: {exc}") from exc
    finally:
        probe.close()
    if info is None or info.error is not None or not info.partitions:
        return None
    report = (lambda done, _total: progress(done)) if progress else None
    return (TopicRecord(msg.key(), msg.value(), msg.partition() or 0, msg.offset() or 0)
            for msg in read_topic(bootstrap, topic, timeout=timeout_s, progress=report))


@dataclass(frozen=True)
class ReportTopics:
    outcomes: str
    exception_state: str
    exceptions: str
    validated: str
    audit_facts: str

    @classmethod
    def from_settings(cls, settings: Settings) -> ReportTopics:
        return cls(outcomes=settings.outcomes_topic,
                   exception_state=settings.exception_state_topic,
                   exceptions=settings.exceptions_topic, validated=settings.validated_topic,
                   audit_facts=settings.audit_facts_topic)


Progress = Callable[[str], Callable[[int], None]]
# What the computations read of an outcome; the rest is dropped to keep a week in memory.
_OUTCOME_FIELDS = ("input_topic", "input_partition", "input_offset", "kind", "final", "held",
                   "check_id", "severity", "owner", "reason", "warnings", "stage", "event_type",
                   "idempotency_key", "occurred_at_ms", "decided_at_ms")


def read_inputs(bootstrap: str, topics: ReportTopics, *, since_ms: int,
                deserializer: Any = None, progress: Progress | None = None) -> ReportInputs:
    """Read every topic the report needs, completely; notes say what was missing."""
    import orjson

    from revline.schemas import DecodeError, EventDeserializer, exception_codec, outcome_codec

    def records(topic: str, label: str) -> Iterator[TopicRecord]:
        it = read_all(bootstrap, topic, progress=progress(label) if progress else None)
        return iter(()) if it is None else it

    inputs = ReportInputs()
    notes = inputs.notes

    # Outcomes: only the period's final ones are kept (the whole topic is read).
    codec = outcome_codec()
    outs = read_all(bootstrap, topics.outcomes,
                    progress=progress("outcomes") if progress else None)
    if outs is None:
        notes.append(f"outcomes topic {topics.outcomes} does not exist: no flow figures")
    else:
        undecodable = 0
        for rec in outs:
            try:
                o = codec.decode(rec.value or b"")
            except DecodeError:
                undecodable += 1
                continue
            if o["final"] and o["decided_at_ms"] >= since_ms:
                inputs.outcomes.append({k: o[k] for k in _OUTCOME_FIELDS})
        if undecodable:
            notes.append(f"{undecodable} outcome records could not be decoded and were skipped")

    # Exceptions: lifecycle state (compacted; the last value per id wins, None deletes).
    state: dict[bytes, ExceptionItem] = {}
    bad_state = 0
    for rec in records(topics.exception_state, "exception state"):
        if rec.key is None:
            continue
        if rec.value is None:
            state.pop(rec.key, None)
            continue
        try:
            state[rec.key] = exception_from_state(orjson.loads(rec.value))
        except (orjson.JSONDecodeError, RevlineError):
            bad_state += 1
    if bad_state:
        notes.append(f"{bad_state} exception state records could not be read and were skipped")
    if state:
        inputs.exceptions = list(state.values())
        inputs.exceptions_source = f"exception state topic {topics.exception_state}"
    else:
        ecodec = exception_codec()
        items: dict[str, ExceptionItem] = {}
        for rec in records(topics.exceptions, "exceptions"):
            try:
                item = exception_from_record(ecodec.decode(rec.value or b""))
            except DecodeError:
                continue
            items.setdefault(item.exception_id, item)
        inputs.exceptions = list(items.values())
        inputs.exceptions_source = (
            f"exception records on {topics.exceptions}; no lifecycle state yet "
            f"({topics.exception_state} is empty or absent), so every exception counts as open"
        )

    # Overrides: decode only manual_override events of the validated topic.
    decode = deserializer or EventDeserializer()
    for rec in records(topics.validated, "validated events"):
        raw = rec.value or b""
        try:
            entry, _ = decode.writer_entry(raw)
            if entry.event_type == "manual_override":
                inputs.overrides.append(override_from_event(decode.decode(raw)))
        except DecodeError:
            continue

    # Reconciliation: the latest reconcile fact.
    latest: tuple[int, str, Mapping[str, Any]] | None = None
    for rec in records(topics.audit_facts, "audit facts"):
        if not rec.value or b'"reconcile"' not in rec.value:
            continue  # cheap filter: most facts are not reconciliations
        try:
            fact = orjson.loads(rec.value)
        except orjson.JSONDecodeError:
            continue
        if fact.get("kind") == "reconcile" and (latest is None or fact["at_ms"] >= latest[0]):
            latest = (int(fact["at_ms"]), str(fact.get("actor", "")), fact.get("detail") or {})
    if latest is not None:
        inputs.reconcile = reconcile_from_fact(*latest)
    return inputs


def collect(bootstrap: str, topics: ReportTopics, *, since_ms: int, now_ms: int | None = None,
            deserializer: Any = None, check_specs: Mapping[str, tuple[str, str]] | None = None,
            progress: Progress | None = None) -> OperationsReport:
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    inputs = read_inputs(bootstrap, topics, since_ms=since_ms, deserializer=deserializer,
                         progress=progress)
    inputs.check_specs = dict(check_specs or {})
    return build_report(inputs, now_ms=now, since_ms=since_ms)


# -- the read model (``revline.sinks.read_model``): counts per hour instead of the topics ---
def _bucket_percentile(counts: Sequence[tuple[int, int]], q: float, cap: int | None) -> int | None:
    """Nearest-rank percentile over (latency bucket, count), as the bucket's upper bound."""
    from revline.sinks.read_model import bucket_value

    total = sum(n for _, n in counts)
    if not total:
        return None
    rank = max(1, math.ceil(q / 100.0 * total))
    seen = 0
    for bucket, n in sorted(counts):
        seen += n
        if seen >= rank:
            value = bucket_value(bucket)
            return min(value, cap) if cap is not None else value
    return cap


def summaries_from_counts(rows: Sequence[Mapping[str, Any]],
                          check_specs: Mapping[str, tuple[str, str]] | None = None,
                          ) -> tuple[FlowSummary, list[QaRow], int, DuplicatesSummary,
                                     LatencySummary, int]:
    """What ``build_report`` computes from final outcomes, from ``outcome_hours`` rows:
    (flow, QA rows, judged, duplicates, latency, overrides refused at the door)."""
    from revline.sinks.read_model import LATENCY_EDGES

    kinds: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    dupes: Counter[str] = Counter()
    spec: dict[str, tuple[str, str]] = dict(check_specs or {})
    held = refused = conflicts = invoices = 0
    latency: dict[str, Counter[int]] = {}
    max_ms: dict[str, int] = {}
    for r in rows:
        n = int(r["count"])
        kind = r["kind"]
        if r["row_type"] == "warning":
            warnings[r["check_id"]] += n
            continue
        kinds[kind] += n
        held += n if r["held"] else 0
        if kind == "dead_letter":
            stages[r["stage"] or "unknown"] += n
            refused += n if r["refused_override"] else 0
        elif kind == "exception" and r["check_id"]:
            failures[r["check_id"]] += n
            if r["severity"] and r["owner"]:
                spec[r["check_id"]] = (r["severity"], r["owner"])
            if r["check_id"] == "dedup.conflict":
                conflicts += n
        elif kind == "duplicate":
            dupes[r["event_type"] or "unknown"] += n
        elif kind == "validated" and r["event_type"] == "invoice_issued":
            invoices += n
        if r["latency_bucket"] >= 0:
            latency.setdefault(kind, Counter())[r["latency_bucket"]] += n
            if r["max_latency_ms"] is not None:
                max_ms[kind] = max(max_ms.get(kind, 0), int(r["max_latency_ms"]))
    inputs = sum(kinds.values())
    flow = FlowSummary(
        inputs=inputs, validated=kinds["validated"], exceptions=kinds["exception"],
        duplicates=kinds["duplicate"], dead_letters=kinds["dead_letter"], held=held,
        dead_letters_by_stage=tuple(stages.most_common()))
    judged = kinds["validated"] + kinds["exception"]
    qa = [QaRow(check_id=c, severity=spec.get(c, ("—", "—"))[0],
                owner=spec.get(c, ("—", "—"))[1], failures=failures[c], warnings=warnings[c],
                rate_pct=100.0 * failures[c] / judged if judged else 0.0)
          for c in set(failures) | set(warnings)]
    qa.sort(key=lambda q: (-q.failures, -q.warnings, q.check_id))
    duplicates = DuplicatesSummary(
        prevented=sum(dupes.values()), by_event_type=tuple(dupes.most_common()),
        conflicts=conflicts, invoices=invoices, invoice_duplicates=dupes["invoice_issued"])
    every: Counter[int] = Counter()
    for per_kind in latency.values():
        every.update(per_kind)
    top = max(max_ms.values(), default=None)
    pairs = list(every.items())
    hist = [0] * len(LATENCY_BUCKETS)
    for bucket, n in pairs:
        lower = LATENCY_EDGES[bucket - 1] if bucket > 0 else 0
        hist[_bucket(lower, LATENCY_BUCKETS)] += n
    by_kind = []
    for kind in ("validated", "exception", "duplicate"):
        mine = list(latency.get(kind, Counter()).items())
        if mine:
            by_kind.append((kind, sum(n for _, n in mine),
                            _bucket_percentile(mine, 50, max_ms.get(kind)),
                            _bucket_percentile(mine, 95, max_ms.get(kind))))
    clean = latency.get("validated", Counter())
    clean_n = sum(clean.values())
    in_time = sum(n for b, n in clean.items()
                  if b < len(LATENCY_EDGES) and LATENCY_EDGES[b] <= LATENCY_TARGET_MS)
    lat = LatencySummary(
        count=sum(every.values()), p50_ms=_bucket_percentile(pairs, 50, top),
        p90_ms=_bucket_percentile(pairs, 90, top), p95_ms=_bucket_percentile(pairs, 95, top),
        p99_ms=_bucket_percentile(pairs, 99, top), max_ms=top,
        within_target_pct=100.0 * in_time / clean_n if clean_n else None,
        histogram=tuple((label, hist[i]) for i, (_, label) in enumerate(LATENCY_BUCKETS)),
        by_kind=tuple(by_kind))
    return flow, qa, judged, duplicates, lat, refused


def override_from_fact(record: Mapping[str, Any]) -> OverrideItem:
    """An ``override`` audit record (chained from the fact ``revline override`` sends)."""
    d: Mapping[str, Any] = record.get("detail") or {}
    expires = d.get("expires_at")
    try:
        expires_ms = (int(datetime.fromisoformat(str(expires).replace("Z", "+00:00"))
                          .timestamp() * 1000) if expires else 0)
    except ValueError:
        expires_ms = 0
    return OverrideItem(
        override_id=str(d.get("override_id") or record.get("fact_id")),
        order_id=str(record.get("chain")), check_id=str(d.get("check_id") or ""),
        target_idempotency_key=str(d.get("target_idempotency_key") or ""),
        reason_code=str(d.get("reason_code") or ""), actor=str(record.get("actor") or ""),
        occurred_at_ms=int(record["at_ms"]), expires_at_ms=expires_ms, note=d.get("note"))


def collect_from_read_model(model: Any, *, since_ms: int, now_ms: int,
                            check_specs: Mapping[str, tuple[str, str]] | None = None,
                            ) -> OperationsReport:
    """The report from the read model: outcomes per hour over the period, exceptions from
    the state table, overrides and the latest reconciliation from the audit records."""
    from dataclasses import replace

    rows = model.outcome_rows(since_ms)
    flow, qa, judged, duplicates, latency, refused = summaries_from_counts(rows, check_specs)
    notes: list[str] = []
    exceptions = []
    for state in model.report_states(since_ms):
        try:
            exceptions.append(exception_from_state(state))
        except RevlineError:
            notes.append("an exception state in the read model could not be read")
    facts = model.facts(["override", "reconcile"])
    overrides = [override_from_fact(f) for f in facts if f["kind"] == "override"]
    runs = [f for f in facts if f["kind"] == "reconcile"]
    reconcile = None
    if runs:
        last = max(runs, key=lambda f: int(f["at_ms"]))
        reconcile = reconcile_from_fact(int(last["at_ms"]), str(last.get("actor", "")),
                                        last.get("detail") or {})
    summary = summarise_overrides(overrides, [], exceptions, now_ms, since_ms)
    notes.append(f"from the read model: flow figures count whole hours from "
                 f"{fmt_time(since_ms - since_ms % 3_600_000)}; latency percentiles are bucket "
                 "upper bounds (1-2-5 steps); overrides are those `revline override` made")
    return OperationsReport(
        generated_at_ms=now_ms, since_ms=since_ms, flow=flow,
        open_exceptions=summarise_open(exceptions, now_ms),
        sla=tuple(sla_compliance(exceptions, now_ms, since_ms)), qa=tuple(qa), judged=judged,
        overrides=replace(summary, refused=refused), duplicates=duplicates, latency=latency,
        reconciliation=reconcile, exceptions_source="exception states in the read model",
        notes=tuple(notes))


# -- formatting shared by the terminal and the HTML report -------------------------------
def fmt_money(minor: int, currency: str) -> str:
    return format_money(minor, currency)


def fmt_duration(ms: int | None) -> str:
    """Human durations: 850 ms, 4.2 s, 12 min, 3 h 20 min, 2 d 4 h."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f} s"
    minutes = int(s // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    if value < 100.0 and float(text) >= 100.0:  # never round a shortfall up to 100 %
        text = f"{math.floor(value * 10**digits) / 10**digits:.{digits}f}"
    return f"{text} %"


def fmt_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%a %d %b %Y, %H:%M UTC")


def fmt_short(ms: int) -> str:
    """For table cells: Sat 14 Nov 08:00 (the page says times are UTC)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%a %d %b %H:%M")


def fmt_date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%d %b %Y")


def period_label(since_ms: int, until_ms: int) -> str:
    days = (until_ms - since_ms) / 86_400_000
    span = f"{days:.0f} days" if days >= 1.95 else fmt_duration(until_ms - since_ms)
    return f"{fmt_time(since_ms)} → {fmt_time(until_ms)} ({span})"


OWNER_LABELS = {"revenue_ops": "Revenue operations", "finance": "Finance",
                "integrations": "Integrations"}
SEVERITY_LABELS = {"P1": "P1 invoice-stopping", "P2": "P2 data drift", "P3": "P3 cosmetic"}


def owner_label(owner: str) -> str:
    return OWNER_LABELS.get(owner, owner)


