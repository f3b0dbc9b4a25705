"""Re-drive: send dead-lettered or excepted records back to the input topic.

A re-driven record is the original key, value and headers (the dead letter's
``revline.errors.*`` diagnostics dropped) plus two headers the engine reads:
``revline.reentry`` (the exception id, or ``dlq:<coords>`` for a dead letter),
which makes the worker judge an input whose key ended in an exception again
instead of calling it a duplicate, and ``revline.redrive.count``. The count
travels with the record: if the retry fails again, its new dead letter carries
the headers, and a new exception's input is read back from the input topic. A
record whose count would exceed ``redrive_max`` goes to the quarantine topic
instead, with headers saying why: re-drive can never loop.

Each source record is acted on once. What was done is written to a compacted
redrive log (key: the source id), so running the same filter again does not
send a record twice; a retry that fails again is a new dead letter or exception
and is re-driven from there. Exceptions that the exception manager marked
resolved or waived (compacted exception-state topic, when present) are skipped.
Every run is an audit fact on the operations chain, and every record acted on
one on its order's chain.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from revline.core.auditlog import AuditFact, AuditLog
from revline.core.errors import InfrastructureError
from revline.core.kafka_config import client_config, producer_config
from revline.core.readback import read_compacted_json, read_topic
from revline.core.settings import Settings
from revline.operations.replay import OperationRefusedError
from revline.processors import REDRIVE_COUNT_HEADER, REENTRY_HEADER

DEADLETTER = "deadletter"
EXCEPTIONS = "exceptions"
SOURCES = (DEADLETTER, EXCEPTIONS)
REDRIVE = "redrive"
QUARANTINE = "quarantine"
ERROR_HEADER_PREFIX = "revline.errors."  # as revline.streams._outputs writes them on dead letters
QUARANTINE_HEADER_PREFIX = "revline.quarantine."
# Exception-manager states after which re-driving would reopen a settled case.
SETTLED = frozenset({"resolved", "waived"})

Progress = Callable[[str, int, int | None], None]  # (phase, done, total or None)
Headers = list[tuple[str, bytes]]


@dataclass
class Candidate:
    """One dead letter or exception, as it would be re-driven."""

    source_id: str  # exception id, or "dlq:<topic>/<partition>/<offset>"
    source_record: str  # where it sits: dead-letter or exceptions topic coords
    input_coords: str  # the original input's coords
    key: bytes | None
    value: bytes
    headers: Headers  # the original headers, diagnostics and re-drive headers dropped
    order_id: str | None
    check: str  # check id, or the dead letter's stage
    error_class: str
    reason: str
    at_ms: int  # dead-lettered / exception opened
    sort_key: tuple[str, int, int]
    count: int = 0  # re-drives before this one
    diagnostics: Headers = field(default_factory=list)  # revline.errors.* (dead letters)
    skip: str = ""  # why it is not eligible at all
    action: str = REDRIVE
    target: str | None = None  # coords of what was sent
    headers_preserved: bool = True

    @property
    def new_count(self) -> int:
        return self.count + 1

    def redriven_headers(self) -> Headers:
        return [*self.headers, (REENTRY_HEADER, self.source_id.encode()),
                (REDRIVE_COUNT_HEADER, str(self.new_count).encode())]

    def quarantine_headers(self, limit: int, run_id: str) -> Headers:
        why = (f"re-driven {self.count} time(s) already, the limit is {limit} "
               f"(REVLINE_REDRIVE_MAX); last failure {self.check}: {self.reason}")
        return [*self.headers, *self.diagnostics,
                (REDRIVE_COUNT_HEADER, str(self.count).encode()),
                (QUARANTINE_HEADER_PREFIX + "reason", why.encode()),
                (QUARANTINE_HEADER_PREFIX + "source", self.source_id.encode()),
                (QUARANTINE_HEADER_PREFIX + "input", self.input_coords.encode()),
                (QUARANTINE_HEADER_PREFIX + "run", run_id.encode())]


@dataclass(frozen=True)
class RedriveFilter:
    reasons: tuple[str, ...] = ()  # substrings of check id / stage / error class / reason
    orders: tuple[str, ...] = ()
    exception_ids: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int | None = None

    @property
    def selects_all(self) -> bool:
        return not (self.reasons or self.orders or self.exception_ids
                    or self.since_ms is not None or self.until_ms is not None)

    def matches(self, c: Candidate) -> bool:
        if self.exception_ids and c.source_id not in self.exception_ids:
            return False
        if self.orders and c.order_id not in self.orders:
            return False
        if self.since_ms is not None and c.at_ms < self.since_ms:
            return False
        if self.until_ms is not None and c.at_ms >= self.until_ms:
            return False
        if self.reasons:
            text = f"{c.check}\n{c.error_class}\n{c.reason}".lower()
            return any(r.lower() in text for r in self.reasons)
        return True

    def as_detail(self) -> dict[str, Any]:
        return {"reason": list(self.reasons), "order": list(self.orders),
                "exception_id": list(self.exception_ids), "since_ms": self.since_ms,
                "until_ms": self.until_ms, "limit": self.limit}


@dataclass
class RedriveResult:
    run_id: str
    source: str
    topic: str
    dry_run: bool
    actor: str
    scanned: int  # records read from the source topic
    matched: int  # distinct records matching the filters
    selected: list[Candidate]  # re-driven or quarantined (or would be, in a dry run)
    skipped: Counter[str]
    fact_ids: list[str]

    @property
    def redriven(self) -> list[Candidate]:
        return [c for c in self.selected if c.action == REDRIVE]

    @property
    def quarantined(self) -> list[Candidate]:
        return [c for c in self.selected if c.action == QUARANTINE]


# -- reading ---------------------------------------------------------------------------
def _pairs(msg: Message) -> Headers:
    raw = msg.headers() or []
    items: Iterable[tuple[str, Any]] = raw.items() if isinstance(raw, dict) else raw
    return [(k, v if isinstance(v, bytes) else str(v or "").encode()) for k, v in items]


def _header(pairs: Headers, name: str) -> bytes | None:
    found = None
    for key, value in pairs:
        if key == name:
            found = value  # the last one wins, as for a re-sent header
    return found


def _count(pairs: Headers) -> int:
    raw = _header(pairs, REDRIVE_COUNT_HEADER)
    try:
        return max(0, int(raw or b"0"))
    except ValueError:
        return 0


def _coords(text: str) -> tuple[str, int, int]:
    topic, partition, offset = text.rsplit("/", 2)
    return topic, int(partition), int(offset)


def _read(bootstrap: str, topic: str, progress: Progress | None = None,
          phase: str = "", timeout: float = 120.0) -> Iterator[Message]:
    """Every record of ``topic`` up to its end now; nothing if the topic does not exist."""
    report = (lambda done, total: progress(phase, done, total)) if progress else None
    return read_topic(bootstrap, topic, timeout=timeout, missing_ok=True, progress=report)


def exception_states(bootstrap: str, topic: str) -> dict[str, str]:
    """exception id -> status, from the exception manager's compacted state topic (optional)."""
    return {k: str(v.get("status", "")).lower() for k, v in
            read_compacted_json(bootstrap, topic).items()}


def _dead_letter(msg: Message) -> Candidate:
    pairs = _pairs(msg)
    errors = {k[len(ERROR_HEADER_PREFIX):]: v.decode(errors="replace")
              for k, v in pairs if k.startswith(ERROR_HEADER_PREFIX)}
    where = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
    in_topic = errors.get("topic", "")
    try:
        in_part, in_off = int(errors.get("partition", "")), int(errors.get("offset", ""))
        input_coords = f"{in_topic}/{in_part}/{in_off}"
        sort_key = (in_topic, in_part, in_off)
    except ValueError:
        input_coords = "unknown"
        sort_key = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
    key = msg.key()
    return Candidate(
        source_id=f"dlq:{where}", source_record=where, input_coords=input_coords, key=key,
        value=msg.value() or b"",
        headers=[(k, v) for k, v in pairs if not k.startswith(ERROR_HEADER_PREFIX)
                 and k not in (REENTRY_HEADER, REDRIVE_COUNT_HEADER)],
        diagnostics=[(k, v) for k, v in pairs if k.startswith(ERROR_HEADER_PREFIX)],
        order_id=key.decode(errors="replace") if key else None,
        check=errors.get("stage", ""), error_class=errors.get("exception.class", ""),
        reason=errors.get("exception.message", ""), at_ms=msg.timestamp()[1],
        sort_key=sort_key, count=_count(pairs),
    )


def _exceptions(messages: Iterable[Message]) -> Iterator[Candidate]:
    from revline.schemas import exception_codec

    codec = exception_codec()
    seen: set[str] = set()
    for msg in messages:
        try:
            rec = codec.decode(msg.value() or b"")
        except Exception:  # not ours to judge here; the exception manager reports it
            continue
        if rec["exception_id"] in seen:  # a replay re-sends the same exception
            continue
        seen.add(rec["exception_id"])
        key = msg.key()
        skip = ""
        if not rec["blocking"]:
            skip = "advisory finding (the event passed; nothing to re-judge)"
        elif rec["check_id"].startswith("sink."):
            skip = ("sink refusal (the worker validated the event and the sink will not send "
                    "it again: correct it under a new idempotency key with `revline "
                    "exceptions resolve --corrected-event`)")
        elif rec["check_id"].startswith("reconcile.") or rec["check_id"] == "reconciliation.drift":
            skip = ("reconciliation drift (nothing to re-judge: fix the ledger or ERP record, "
                    "then run `revline reconcile` again)")
        elif not rec["event"]:
            skip = ("the record was too large to keep its event bytes (its pointer names the "
                    "input): re-send the event from its source instead")
        yield Candidate(
            source_id=rec["exception_id"],
            source_record=f"{msg.topic()}/{msg.partition()}/{msg.offset()}",
            input_coords=f"{rec['input_topic']}/{rec['input_partition']}/{rec['input_offset']}",
            key=key, value=rec["event"], headers=[],
            order_id=rec["order_id"] or (key.decode(errors="replace") if key else None),
            check=rec["check_id"], error_class="", reason=rec["reason"],
            at_ms=rec["opened_at_ms"],
            sort_key=(rec["input_topic"], rec["input_partition"], rec["input_offset"]),
            skip=skip,
        )


def _attach_original_headers(bootstrap: str, candidates: Sequence[Candidate],
                             counts_by_target: Mapping[str, int]) -> None:
    """An exception record has no headers: read them (and the re-drive count) from the
    original input, when it is still on Kafka."""
    consumer = Consumer(client_config("consumer", bootstrap, {
        "group.id": f"revline-redrive-probe-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    }))
    try:
        for c in candidates:
            original = _fetch(consumer, c.input_coords)
            if original is not None and original.value() == c.value:
                pairs = _pairs(original)
                c.count = _count(pairs)
                c.headers = [(k, v) for k, v in pairs
                             if k not in (REENTRY_HEADER, REDRIVE_COUNT_HEADER)]
            else:
                # Gone (retention): the redrive log still knows the count of a retry.
                c.count = counts_by_target.get(c.input_coords, 0)
                c.headers_preserved = False
    finally:
        consumer.close()


def _fetch(consumer: Consumer, coords: str) -> Message | None:
    try:
        topic, partition, offset = _coords(coords)
        tp = TopicPartition(topic, partition)
        low, high = consumer.get_watermark_offsets(tp, timeout=10)
    except (ValueError, KafkaException):
        return None
    if not low <= offset < high:
        return None
    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is None or msg.error() is not None:
            continue
        return msg if msg.offset() == offset else None
    return None


# -- the run ---------------------------------------------------------------------------
def redrive(
    settings: Settings,
    bootstrap: str,
    source: str,
    filters: RedriveFilter,
    *,
    actor: str,
    dry_run: bool = False,
    rate: float = 0.0,
    progress: Progress | None = None,
    prepare: Callable[[RedriveResult], None] | None = None,
) -> RedriveResult:
    """Select, send (unless ``dry_run``) and audit one re-drive run."""
    if source not in SOURCES:
        raise OperationRefusedError(f"--source must be one of {', '.join(SOURCES)}")
    topic = settings.dead_letter_topic if source == DEADLETTER else settings.exceptions_topic
    run_id = uuid.uuid4().hex[:16]
    messages = list(_read(bootstrap, topic, progress, f"reading {topic}"))
    found = ([_dead_letter(m) for m in messages] if source == DEADLETTER
             else list(_exceptions(messages)))
    matched = [c for c in found if filters.matches(c)]
    done = read_compacted_json(bootstrap, settings.redrive_log_topic)
    states = exception_states(bootstrap, settings.exception_state_topic)
    skipped: Counter[str] = Counter()
    selected: list[Candidate] = []
    # The worker's outputs are at-least-once: a worker killed after sending but before
    # committing sends an input's dead letter again. One input goes back once: the first
    # of its dead letters, and none once any of them was handled.
    handled_inputs = {c.input_coords for c in found
                      if c.source_id in done and c.input_coords != "unknown"}
    taken_inputs: set[str] = set()
    for c in matched:
        repeat = source == DEADLETTER and c.input_coords != "unknown" and (
            c.input_coords in taken_inputs
            or (c.input_coords in handled_inputs and c.source_id not in done))
        if source == DEADLETTER and c.input_coords != "unknown":
            taken_inputs.add(c.input_coords)
        if c.skip:
            skipped[c.skip] += 1
        elif repeat:
            skipped["a repeat of the same input's dead letter (sent again after a restart)"] += 1
        elif c.source_id in done:
            entry = done[c.source_id]
            skipped[f"already handled ({entry.get('action', '?')}, run {entry.get('run_id')})"
                    ] += 1
        elif states.get(c.source_id) in SETTLED:
            skipped[f"exception {states[c.source_id]}"] += 1
        else:
            selected.append(c)
    selected.sort(key=lambda c: c.sort_key)  # an order's records go back in input order
    if filters.limit is not None and len(selected) > filters.limit:
        skipped["beyond --limit"] += len(selected) - filters.limit
        selected = selected[: filters.limit]
    if source == EXCEPTIONS and selected:
        counts = {str(e["target"]): int(e.get("count", 0)) for e in done.values()
                  if e.get("target")}
        _attach_original_headers(bootstrap, selected, counts)
    for c in selected:
        c.action = QUARANTINE if c.new_count > settings.redrive_max else REDRIVE
    result = RedriveResult(run_id, source, topic, dry_run, actor, len(messages), len(matched),
                           selected, skipped, [])
    if prepare is not None:
        # The caller formats what it will show before anything is sent: a failure there
        # (a reason it cannot print, say) must not leave records sent but unaudited.
        prepare(result)
    _ensure_topics(settings, bootstrap)
    producer = Producer(producer_config(settings, bootstrap))
    if not dry_run and selected:
        _send(producer, settings, result, rate, progress)
    _audit(producer, settings, result, filters)
    return result


def _ensure_topics(settings: Settings, bootstrap: str) -> None:
    from revline.core.admin import ensure_operations_topics, ensure_topics

    # The input topic with the worker's partition count, never auto-created with the
    # broker's default (the worker reads only the partitions it owns).
    ensure_topics(bootstrap, {settings.input_topic: settings.input_partitions})
    ensure_operations_topics(bootstrap, settings)  # audit facts and quarantine among them
    ensure_topics(bootstrap, {settings.redrive_log_topic: settings.input_partitions},
                  config={settings.redrive_log_topic: {"cleanup.policy": "compact"}})


def _produce(producer: Producer, topic: str, key: bytes | None, value: bytes,
             headers: Headers, on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
    wire: list[tuple[str, str | bytes | None]] = list(headers)
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=wire,
                             on_delivery=on_delivery)
            producer.poll(0)
            return
        except BufferError:
            producer.poll(0.05)  # local queue full: let deliveries drain


def _send(producer: Producer, settings: Settings, result: RedriveResult, rate: float,
          progress: Progress | None) -> None:
    failures: list[str] = []

    def delivered(c: Candidate) -> Callable[[KafkaError | None, Message], None]:
        def callback(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(f"{c.source_id}: {err.str()}")
            else:
                c.target = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
        return callback

    total = len(result.selected)
    interval = 1.0 / rate if rate > 0 else 0.0
    started = time.monotonic()
    for i, c in enumerate(result.selected):
        if interval:
            delay = started + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if c.action == QUARANTINE:
            _produce(producer, settings.quarantine_topic, c.key, c.value,
                     c.quarantine_headers(settings.redrive_max, result.run_id), delivered(c))
        else:
            _produce(producer, settings.input_topic, c.key, c.value, c.redriven_headers(),
                     delivered(c))
        if progress:
            progress("sending", i + 1, total)
    remaining = producer.flush(60)
    if failures or remaining:
        raise InfrastructureError(
            f"{len(failures) + remaining} of {total} re-driven records were not acknowledged "
            f"by Kafka (first: {failures[:1] or 'timeout'}). Nothing was written to the redrive "
            "log, so running the same command again sends them again; any that did arrive "
            "and are sent twice are recognised by the worker (judged again, or duplicates)."
        )


def _audit(producer: Producer, settings: Settings, result: RedriveResult,
           filters: RedriveFilter) -> None:
    audit = AuditLog(producer, settings.audit_facts_topic)
    now = int(time.time() * 1000)
    if not result.dry_run:
        for c in result.selected:
            detail = {
                "run_id": result.run_id,
                "action": "redriven" if c.action == REDRIVE else "quarantined",
                "source": result.source, "source_id": c.source_id,
                "source_record": c.source_record, "input": c.input_coords,
                "target": c.target, "check": c.check, "reason": c.reason[:1000],
                "redrive_count": c.new_count if c.action == REDRIVE else c.count,
                "redrive_max": settings.redrive_max, "headers_preserved": c.headers_preserved,
            }
            # Written after the records are acknowledged: the log is what stops a re-send.
            producer.produce(settings.redrive_log_topic, key=c.source_id.encode(),
                             value=orjson.dumps({**detail, "count": detail["redrive_count"],
                                                 "actor": result.actor, "at_ms": now}))
            fact = AuditFact(fact_id=f"redrive:{c.source_id}", kind="redrive",
                             actor=result.actor, order_id=c.order_id, detail=detail, at_ms=now)
            audit.record(fact)
            result.fact_ids.append(fact.fact_id)
    run = AuditFact(
        fact_id=f"redrive-run:{result.run_id}", kind="redrive", actor=result.actor,
        order_id=None, at_ms=now,
        detail={
            "run_id": result.run_id, "source": result.source, "topic": result.topic,
            "filters": filters.as_detail(), "dry_run": result.dry_run,
            "scanned": result.scanned, "matched": result.matched,
            "redriven": len(result.redriven), "quarantined": len(result.quarantined),
            "skipped": dict(result.skipped), "redrive_max": settings.redrive_max,
            "records": [{"source_id": c.source_id, "action": c.action, "target": c.target}
                        for c in result.selected[:500]],
        },
    )
    audit.record(run)
    result.fact_ids.append(run.fact_id)
    try:
        audit.flush()
    except InfrastructureError as exc:
        if result.dry_run or not result.selected:
            raise
        raise InfrastructureError(
            f"{exc}: the {len(result.selected)} records WERE sent (run {result.run_id}), but "
            "their redrive-log entries and audit facts were not acknowledged; do not re-run "
            "the same filter before Kafka answers again, or they are sent a second time"
        ) from exc
