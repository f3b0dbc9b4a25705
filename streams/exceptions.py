"""The exception manager: owned, timed exceptions as state in Kafka.

``revline exceptions run`` consumes

* the exceptions topic (Avro ``ExceptionRecord`` from the worker's QA checks
  and from the sink): a new exception id is assigned an owner, a severity, a
  backup owner and an SLA by the ownership rules and becomes ``open``; a known
  id (a replay re-sends the same one) changes nothing;
* the exception-events topic (JSON): ``ack``, ``resolve``, ``waive`` from the
  CLI, and the manager's own ``escalated`` / ``expired`` events (applied when
  raised; seen again on the topic they are no-ops, unless a crash lost the
  state write, which they then repair);

and writes each exception's current state, keyed by exception id, to the
compacted exception-state topic and, once Kafka has acknowledged it, to the read
model (``exception_states`` in the ledger's database, ``revline.sinks.read_model``). States
are paged from that table through a bounded LRU cache, not all held in memory; on
start the table is caught up from the state topic where it lags (the tail it has not
seen, by the offsets it recorded), and the timers query it by deadline. A
timer (``exception_check_interval_s``) escalates exceptions still open at
their SLA deadline, once, to the backup owner, and expires those neither
resolved nor waived by their expiry age. Every transition is an audit fact.

Ordering: for each batch, state, raised events and audit facts are produced
and flushed *before* the consumer offsets are committed, so a crash repeats
work (recognised as no-ops) and never loses it.

One active instance: the state is global (every instance would read all of
it) and timers are not partitioned, so run exactly one manager per pipeline;
a restarted one resumes from its committed offsets and the state topic. Its group
membership is static (``group.instance.id`` = <instance>-exceptions): a manager
restarted after kill -9 takes over its predecessor's place at once, and the check
for a second manager does not count that predecessor.

Liveness: every blocking Kafka call runs under a watchdog deadline (its own timeout
plus ``CALL_GRACE_S``) and each loop reports progress
(``revline_component_last_progress_timestamp_seconds{component="exceptions"}``).
Start-up checks retry transient broker errors (``revline.startup``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from revline.core.auditlog import AuditFact, AuditLog
from revline.core.errors import ConfigurationError, InfrastructureError
from revline.core.kafka_config import client_config, consumer_config, producer_config
from revline.core.metrics import ExceptionMetrics
from revline.core.readback import read_compacted_json, watermarks
from revline.core.settings import Settings
from revline.core.startup import (
    claim_instance,
    fenced_message,
    group_instance_id,
    membership_config,
    retry_startup,
    wait_for_group_coordinator,
)
from revline.core.watchdog import Watchdog
from revline.processors.exception_lifecycle import (
    ACTIVE,
    ESCALATED,
    MANAGER,
    OPEN,
    Change,
    apply_event,
    audit_kind,
    due_events,
    open_exception,
)
from revline.processors.ownership import ExceptionFacts, Ownership, event_amount
from revline.processors.reference import OWNERS, SEVERITIES
from revline.schemas import DecodeError, EventDeserializer, exception_codec
from revline.sinks.read_model import PagedStates, ReadModel, state_row

log = logging.getLogger("revline.exceptions")

COMPONENT = "exceptions"
# A Kafka call may take its own timeout plus this before the watchdog ends the process.
CALL_GRACE_S = 30.0

State = dict[str, Any]


def _now_ms() -> int:
    return int(time.time() * 1000)


class ExceptionManager:
    """Applies exception records, lifecycle events and the clock to the exceptions' state."""

    def __init__(self, settings: Settings, bootstrap: str, ownership: Ownership,
                 metrics: ExceptionMetrics, *, clock: Callable[[], int] = _now_ms,
                 deserializer: EventDeserializer | None = None,
                 producer: Producer | None = None, instance: str | None = None,
                 read_model: ReadModel | None = None) -> None:
        self.settings = settings
        self.instance = instance
        self.watchdog = Watchdog(COMPONENT, metrics.registry)
        self.bootstrap = bootstrap
        self.ownership = ownership
        self.metrics = metrics
        self.clock = clock
        self.deserializer = deserializer or EventDeserializer()
        self.codec = exception_codec()
        # The default callback also reports the audit facts' deliveries (AuditLog passes none).
        self.producer = producer or Producer({
            **producer_config(settings, bootstrap, component=COMPONENT),
            "on_delivery": self._on_delivery})
        self.audit = AuditLog(self.producer, settings.audit_facts_topic, track_delivery=False)
        # Paged from the read model when one is given; all in memory otherwise (tests).
        self.read_model = read_model
        self.states: MemoryStates | PagedStates = (
            PagedStates(read_model, STATE_CACHE_SIZE) if read_model is not None
            else MemoryStates())
        self._state_offsets: dict[tuple[str, int], int] = {}
        # Lifecycle events read before their exception (the two topics are read
        # independently): applied as soon as it opens.
        self.early: dict[str, list[Mapping[str, Any]]] = {}
        self._failures: list[str] = []
        self._failed: list[tuple[KafkaError, str, bytes | None, bytes | None, int]] = []
        self._dirty = False  # produced something since the last flush

    # -- inputs ------------------------------------------------------------------------------
    def on_exception_record(self, value: bytes) -> None:
        try:
            record = self.codec.decode(value)
        except (DecodeError, ValueError, EOFError) as exc:
            log.error("skipping an undecodable exception record: %s", exc)
            return
        exception_id = record["exception_id"]
        if not exception_id or exception_id in self.states:
            return  # a replay or a re-send: the same id is the same exception
        event = None
        with contextlib.suppress(DecodeError):  # it may be about an undecodable record
            event = self.deserializer.decode(record["event"]) if record["event"] else None
        amount, currency = event_amount(event)
        assignment = self.ownership.assign(ExceptionFacts(
            check_id=record["check_id"], severity=record["severity"], owner=record["owner"],
            event_type=record.get("event_type"), source_system=record.get("source_system"),
            amount_minor=amount, currency=currency,
        ))
        state = open_exception(record, assignment, amount_minor=amount, currency=currency)
        self._write_state(state)
        self.metrics.transitions.labels(OPEN).inc()
        log.info("opened %s %s %s owner=%s backup=%s (rule %s)", exception_id,
                 state["check_id"], state["severity"], state["owner"], state["backup_owner"],
                 assignment.rule or "defaults")
        for early in self.early.pop(exception_id, []):
            self.apply(early)

    def on_lifecycle_event(self, value: bytes) -> None:
        try:
            event = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            log.error("skipping a lifecycle event that is not JSON: %s", exc)
            return
        if not isinstance(event, dict):
            log.error("skipping a lifecycle event that is not a JSON object: %r", event)
            return
        self.apply(event)

    def apply(self, event: Mapping[str, Any]) -> Change | None:
        exception_id = str(event.get("exception_id"))
        state = self.states.get(exception_id)
        if state is None:
            # Not open yet (its record may still be on the way): keep it for then. Kept in
            # memory only; a restart before the record arrives loses it (logged).
            log.warning("lifecycle event %s for %s, not open yet: applied when it opens",
                        event.get("type"), exception_id)
            self.early.setdefault(exception_id, []).append(event)
            return None
        result = apply_event(state, event)
        if isinstance(result, str):
            # Our own events come back from the topic: already applied, not news.
            level = logging.DEBUG if event.get("actor") == MANAGER else logging.WARNING
            log.log(level, "lifecycle event %s ignored: %s", event.get("event_id"), result)
            return None
        self._write_state(result.state)
        self._record(result, event)
        return result

    # -- the clock ---------------------------------------------------------------------------
    def tick(self, now_ms: int | None = None, *, observe: bool = True) -> list[Change]:
        """Raise and apply due escalations and expiries; returns what changed.

        The due ones are queried by deadline (the read model's index), not scanned."""
        now = self.clock() if now_ms is None else now_ms
        changes = []
        for event in due_events(self.states.due(now), now):
            change = self.apply(event)
            if change is not None:
                self._produce(self.settings.exception_events_topic, event["exception_id"],
                              orjson.dumps(event))
                changes.append(change)
        if observe:
            self.observe(now)
        return changes

    def observe(self, now_ms: int) -> None:
        """Open counts and oldest ages per owner and severity (after a flush when paged)."""
        counts = {(o, s): 0 for o in OWNERS for s in SEVERITIES}
        oldest: dict[tuple[str, str], int] = {}
        for key, (count, first) in self.states.active_summary().items():
            counts[key] = count
            oldest[key] = min(now_ms, first)
        for (owner, severity), count in counts.items():
            self.metrics.open.labels(owner, severity).set(count)
            age = (now_ms - oldest[(owner, severity)]) / 1000 if (owner, severity) in oldest else 0
            self.metrics.oldest_age.labels(owner, severity).set(max(0.0, age))

    # -- outputs -----------------------------------------------------------------------------
    def _record(self, change: Change, event: Mapping[str, Any]) -> None:
        state = change.state
        m = self.metrics
        m.transitions.labels(change.transition).inc()
        if change.transition == ESCALATED:
            m.sla_breaches.labels(state["owner"], state["severity"]).inc()
            m.escalations.labels(state["backup_owner"]).inc()
        detail = {
            "exception_id": state["exception_id"], "check_id": state["check_id"],
            "severity": state["severity"], "owner": state["owner"],
            "status": state["status"], "reason_code": event.get("reason_code"),
            "note": event.get("note"), "lifecycle_event_id": event.get("event_id"),
        }
        if change.transition == ESCALATED:
            detail.update(to=state["backup_owner"], sla_deadline_ms=state["sla_deadline_ms"])
        if event.get("corrected_event_id"):
            detail["corrected_event_id"] = event["corrected_event_id"]
        self.audit.record(AuditFact(
            # Each transition happens at most once per exception (escalation once, closed
            # stays closed), so this id is the same if a crash makes the manager redo it.
            fact_id=f"{state['exception_id']}:{change.transition}",
            kind=audit_kind(change.transition), actor=change.actor,
            order_id=state.get("order_id"), detail=detail, at_ms=change.at_ms,
        ))
        self._dirty = True
        log.info("%s %s by %s%s", state["exception_id"], change.transition, change.actor,
                 f" → {state['backup_owner']}" if change.transition == ESCALATED else "")

    def _write_state(self, state: State) -> None:
        self.states[state["exception_id"]] = state
        self._produce(self.settings.exception_state_topic, state["exception_id"],
                      orjson.dumps(state))

    def _produce(self, topic: str, key: str | bytes | None, value: bytes | None,
                 attempt: int = 0) -> None:
        raw_key = key.encode() if isinstance(key, str) else key
        while True:
            try:
                self.producer.produce(topic, key=raw_key, value=value,
                                      on_delivery=self._on_delivery if not attempt else
                                      lambda err, msg: self._on_delivery(err, msg, attempt))
                break
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:  # refused by the client, e.g. above message.max.bytes
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else \
                    KafkaError(KafkaError._FAIL, str(exc))
                self._failed.append((err, topic, raw_key, value, attempt))
                break
        self.producer.poll(0)
        self._dirty = True

    def _on_delivery(self, err: KafkaError | None, msg: Message, attempt: int = 0) -> None:
        if err is not None:
            self._failed.append((err, msg.topic() or "", msg.key(), msg.value(), attempt))
        elif msg.topic() == self.settings.exception_state_topic:
            at = (msg.topic() or "", msg.partition() or 0)
            self._state_offsets[at] = max(self._state_offsets.get(at, 0), (msg.offset() or 0) + 1)

    def _recover(self) -> None:
        """Failed records: retriable ones again, too large ones shrunk (long texts cut),
        anything else an InfrastructureError as before (nothing is committed)."""
        from revline.streams._outputs import MAX_ATTEMPTS, RETRIABLE, TOO_LARGE

        while self._failed:
            failed, self._failed = self._failed, []
            for err, topic, key, value, attempt in failed:
                code = err.code()
                if err.fatal() or attempt + 1 >= MAX_ATTEMPTS:
                    self._failures.append(f"{topic}: {err.str()}")
                elif code in TOO_LARGE and value:
                    smaller = shrink_json(value)
                    if smaller is None or attempt > 0:
                        self._failures.append(f"{topic}: {err.str()} (cannot shrink it)")
                        continue
                    log.warning("record for %s too large (%d bytes); writing it with its long "
                                "texts cut", topic, len(value))
                    self._produce(topic, key, smaller, attempt + 1)
                elif err.retriable() or code in RETRIABLE:
                    time.sleep(min(2.0, 0.1 * 2 ** attempt))
                    self._produce(topic, key, value, attempt + 1)
                else:
                    self._failures.append(f"{topic}: {err.str()}")
            with self.watchdog.deadline("flush (retried records)", 30 + CALL_GRACE_S):
                self.producer.flush(30)

    def flush(self, timeout: float = 30.0) -> None:
        """Everything produced is acknowledged, or InfrastructureError (nothing is committed);
        then the acknowledged states go to the read model."""
        self._flush_kafka(timeout)
        if self._state_offsets or self.states.pending:
            offsets, self._state_offsets = self._state_offsets, {}
            try:
                with self.watchdog.deadline("read model write", 120 + CALL_GRACE_S):
                    self.states.flush(offsets)
            except Exception as exc:  # offsets are not committed: the batch comes again
                raise InfrastructureError(
                    f"exception manager cannot write the read model ({type(exc).__name__}: "
                    f"{exc}); restart the manager once the ledger database is back, it "
                    "resumes from its last committed offsets") from exc

    def _flush_kafka(self, timeout: float) -> None:
        if not self._dirty:
            return
        with self.watchdog.deadline("flush", timeout + CALL_GRACE_S):
            remaining = self.producer.flush(timeout)
        if not remaining and self._failed:
            self._recover()
        if remaining or self._failures:
            failures, self._failures = self._failures, []
            raise InfrastructureError(
                f"exception state not acknowledged by Kafka ({remaining} pending, "
                f"first failure: {failures[:1] or 'timeout'}); restart the manager, it resumes "
                "from its last committed offsets"
            )
        self._dirty = False

    # -- the loop ----------------------------------------------------------------------------
    def rebuild(self) -> int:
        topic = self.settings.exception_state_topic
        if self.read_model is None:
            states = retry_startup(lambda: read_states(self.bootstrap, topic),
                                   f"the exception state on {topic}",
                                   timeout_s=self.settings.startup_timeout_s,
                                   component=COMPONENT)
            self.states = MemoryStates(states)
            return len(states)
        model = self.read_model
        caught_up = retry_startup(lambda: catch_up_states(model, self.bootstrap, topic),
                                  f"the exception state on {topic}",
                                  timeout_s=self.settings.startup_timeout_s,
                                  component=COMPONENT)
        if caught_up:
            log.warning("exception manager: %d state records of %s were not in the read model "
                        "yet; caught up", caught_up, topic)
        self.states.forget()
        return len(self.states)

    def run(self, stop: threading.Event) -> None:
        s = self.settings
        group = f"{s.app_id}-exceptions"
        instance_id = group_instance_id(COMPONENT, self.instance)
        retry_startup(lambda: _refuse_second_manager(self.bootstrap, group, instance_id),
                      f"consumer group {group!r} (is another manager running?)",
                      timeout_s=s.startup_timeout_s, component=COMPONENT)
        count = self.rebuild()
        log.warning("exception manager: %d exceptions rebuilt from %s; ownership %s; "
                    "checking SLAs every %.1fs", count, s.exception_state_topic,
                    self.ownership.version, s.exception_check_interval_s)
        def new_consumer() -> Consumer:
            made = Consumer({
                **consumer_config(s, self.bootstrap, group, component=COMPONENT),
                **membership_config(s.session_timeout_s, COMPONENT, self.instance),
                "log_level": 3,
            })
            made.subscribe([s.exceptions_topic, s.exception_events_topic])
            return made

        consumer = new_consumer()
        replaced_at = -math.inf
        interval_ms = int(s.exception_check_interval_s * 1000)
        last_tick = 0
        caught_up = False
        poll_s = min(0.5, s.exception_check_interval_s)
        log.warning("exception manager ready: group %s as %s", group, instance_id)
        try:
            while not stop.is_set():
                with self.watchdog.deadline("consume", poll_s + CALL_GRACE_S):
                    messages = consumer.consume(500, poll_s)
                consumed = False
                for msg in messages:
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError.FENCED_INSTANCE_ID:
                            raise InfrastructureError(fenced_message(COMPONENT, instance_id))
                        if error.fatal() or error.code() == KafkaError._FATAL:
                            # The consumer is dead: librdkafka fences a static member by its
                            # own rejoin when the group coordinator moves (a broker killed).
                            # Replaced in place, once a minute at most: what was read since
                            # the last commit comes again and repeats as no-ops. Dead again
                            # within the minute means another process holds this instance's
                            # group.instance.id: stop, saying so (the chaos suite found the
                            # exit this replaces).
                            if time.monotonic() - replaced_at < _REPLACE_AT_MOST_EVERY_S:
                                raise InfrastructureError(
                                    f"exception manager consumer: {error}; failed again within "
                                    f"{_REPLACE_AT_MOST_EVERY_S:.0f}s of its replacement: "
                                    f"another process may run as {instance_id!r}")
                            replaced_at = time.monotonic()
                            log.warning("exception manager: consumer failed (%s); replacing "
                                        "it, resuming from the committed offsets", error.str())
                            with contextlib.suppress(Exception), self.watchdog.deadline(
                                    "failed consumer close", 30 + CALL_GRACE_S):
                                consumer.close()
                            consumer = new_consumer()
                            caught_up = False  # timers wait for the backlog again
                            consumed = False  # nothing to commit on the new consumer yet
                            break
                        log.warning("consumer: %s", error)
                        continue
                    consumed = True
                    value = msg.value() or b""
                    if msg.topic() == s.exceptions_topic:
                        self.on_exception_record(value)
                    else:
                        self.on_lifecycle_event(value)
                # Timers wait until the backlog is read: an exception acknowledged while
                # the manager was down must not be escalated on start.
                if not caught_up:
                    with self.watchdog.deadline("catch-up check", _CAUGHT_UP_BUDGET_S):
                        caught_up = _caught_up(consumer)
                now = self.clock()
                ticked = caught_up and now - last_tick >= interval_ms
                if ticked:
                    self.tick(now, observe=False)
                    last_tick = now
                self.flush()
                if ticked:
                    self.observe(now)  # from the table, now that the batch is in it
                if consumed:
                    try:
                        with self.watchdog.deadline("commit", 60 + CALL_GRACE_S):
                            consumer.commit(asynchronous=False)
                    except KafkaException as exc:  # e.g. a rebalance; the work repeats as no-ops
                        log.warning("offset commit failed: %s", exc)
                self.watchdog.progress()
        finally:
            self.watchdog.stop()
            try:
                self.flush()  # what is produced but uncommitted repeats as no-ops otherwise
            except InfrastructureError as exc:
                log.error("%s", exc)
            consumer.close()


def _cut(value: Any, limit: int = 2048) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}… ({len(value) - limit:,} more characters dropped)"
    if isinstance(value, list):
        return [_cut(v, limit) for v in value[:50]]
    if isinstance(value, dict):
        return {k: _cut(v, limit) for k, v in value.items()}
    return value


def shrink_json(value: bytes) -> bytes | None:
    """A JSON record (state, lifecycle event, audit fact) with its long texts cut, or None."""
    try:
        return orjson.dumps(_cut(orjson.loads(value)))
    except orjson.JSONDecodeError:
        return None


def _refuse_second_manager(bootstrap: str, group: str, instance_id: str | None = None) -> None:
    """Two managers would each fire every timer and overwrite each other's state.

    The static member ``instance_id`` is this manager's own predecessor (killed, its
    session not yet expired): it is not a second manager, and joining replaces it.
    """
    from revline.core.admin import live_members

    admin = AdminClient(client_config("admin", bootstrap, {"log_level": 3},
                                      component=COMPONENT))
    members = live_members(admin, group, except_instance=instance_id)
    if members:
        raise ConfigurationError(
            f"an exception manager is already running (group {group}: {', '.join(members)}); "
            "run one per pipeline — stop the other first, or wait for its session to expire"
        )


# Positions, committed offsets and watermarks of every assigned partition, 5 s each.
_CAUGHT_UP_BUDGET_S = 120.0 + CALL_GRACE_S
# A failed consumer is replaced in place at most this often (see ExceptionManager.run).
_REPLACE_AT_MOST_EVERY_S = 60.0


def _caught_up(consumer: Consumer) -> bool:
    """Every assigned partition is read up to its current end."""
    assignment = consumer.assignment()
    if not assignment:
        return False
    try:
        positions = consumer.position(assignment)
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in consumer.committed(assignment, timeout=5)}
        for tp in positions:
            low, high = consumer.get_watermark_offsets(tp, timeout=5)
            at = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            if max(at, low) < high:
                return False
    except KafkaException:
        return False
    return True


# -- where the states are ------------------------------------------------------------------
STATE_CACHE_SIZE = 20_000  # states kept in memory; the rest are paged from the read model


class MemoryStates(dict[str, State]):
    """Every state in memory (no read model: unit tests, tools); PagedStates' interface."""

    @property
    def pending(self) -> dict[str, State]:
        return {}

    def due(self, now_ms: int) -> list[State]:
        return [s for s in self.values() if s["status"] in ACTIVE]

    def active_summary(self) -> dict[tuple[str, str], tuple[int, int]]:
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for s in self.values():
            if s["status"] in ACTIVE:
                key = (s["owner"], s["severity"])
                count, first = out.get(key, (0, s["opened_at_ms"]))
                out[key] = (count + 1, min(first, s["opened_at_ms"]))
        return out

    def flush(self, offsets: Mapping[tuple[str, int], int] | None = None) -> None:
        return None

    def forget(self) -> None:
        return None


def catch_up_states(model: ReadModel, bootstrap: str, topic: str) -> int:
    """Bring ``exception_states`` up to the state topic's end: only the records after the
    offsets it recorded (all of them for a new table); returns how many were read."""
    from revline.core.readback import read_topic
    from revline.sinks.read_model import EXCEPTIONS

    consumer = _reader(bootstrap)
    try:
        marks = {p: watermarks(consumer, topic, p) for p in _partitions(consumer, topic)}
    finally:
        consumer.close()
    recorded = model.offsets(EXCEPTIONS)
    if any(recorded.get((topic, p), 0) > high for p, (_, high) in marks.items()):
        # The table is ahead of the topic (a recreated topic?): start it again.
        log.warning("the read model is ahead of %s: rebuilding its exception states", topic)
        with model.write() as conn:
            model.clear_states(conn)
        recorded = {}
    ranges = {p: (max(low, recorded.get((topic, p), 0)), high)
              for p, (low, high) in marks.items()
              if max(low, recorded.get((topic, p), 0)) < high}
    if not ranges:
        return 0
    read = 0
    batch: dict[str, bytes | None] = {}

    def write() -> None:
        gone = [k for k, v in batch.items() if v is None]
        rows = [state_row(orjson.loads(v), v) for v in batch.values() if v is not None]
        with model.write() as conn:
            if gone:
                model.delete_states(conn, gone)
            model.write_states(conn, rows)
        batch.clear()

    for msg in read_topic(bootstrap, topic, ranges=ranges, timeout=3600):
        read += 1
        if msg.key() is not None:
            batch[(msg.key() or b"").decode("utf-8", "replace")] = msg.value()
        if len(batch) >= 5_000:
            write()
    write()
    with model.write() as conn:
        model.set_offsets(conn, EXCEPTIONS, {(topic, p): high for p, (_, high) in marks.items()})
    return read


# -- helpers shared with the CLI -------------------------------------------------------------
def _reader(bootstrap: str) -> Consumer:
    return Consumer(client_config("consumer", bootstrap, {
        "group.id": f"revline-exceptions-read-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "log_level": 3,
    }))


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=10)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None:
        return []
    return sorted(info.partitions)


def read_states(bootstrap: str, topic: str, timeout: float = 60.0) -> dict[str, State]:
    """Every exception's current state: the compacted topic read to its end."""
    return read_compacted_json(bootstrap, topic, timeout=timeout)


def end_offsets(bootstrap: str, topic: str) -> list[TopicPartition]:
    """Where the topic ends now (to watch only what is written after)."""
    consumer = _reader(bootstrap)
    try:
        return [TopicPartition(topic, p, watermarks(consumer, topic, p)[1])
                for p in _partitions(consumer, topic)]
    finally:
        consumer.close()


def wait_for_state(bootstrap: str, topic: str, exception_id: str, start: list[TopicPartition],
                   done: Callable[[State], bool], timeout: float) -> State | None:
    """The first state of ``exception_id`` written after ``start`` that is ``done``."""
    if not start or timeout <= 0:
        return None
    consumer = _reader(bootstrap)
    try:
        consumer.assign(start)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.3):
                if msg.error() is not None or msg.value() is None:
                    continue
                if (msg.key() or b"").decode() == exception_id:
                    state: State = orjson.loads(msg.value() or b"{}")
                    if done(state):
                        return state
        return None
    finally:
        consumer.close()


def send_lifecycle_events(settings: Settings, bootstrap: str,
                          events: Iterable[Mapping[str, Any]]) -> None:
    """Publish lifecycle events (keyed by exception id: one exception's events stay ordered)."""
    producer = Producer(producer_config(settings, bootstrap))
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err.str())

    for event in events:
        producer.produce(settings.exception_events_topic, key=str(event["exception_id"]).encode(),
                         value=orjson.dumps(event), on_delivery=delivered)
    if producer.flush(30) or failures:
        raise InfrastructureError(
            f"lifecycle event not acknowledged by Kafka at {bootstrap} "
            f"({failures[:1] or 'timeout'}); nothing changed, try again"
        )


def run_manager(settings: Settings, bootstrap: str, stop: threading.Event, *,
                instance: str | None = None) -> None:
    """``revline exceptions run``: topics, metrics, then the manager until ``stop``.

    Start-up waits out a cold cluster (``REVLINE_STARTUP_TIMEOUT_S``)."""
    from revline.core.admin import ensure_operations_topics, ensure_topics
    from revline.core.kafka_config import registry_config
    from revline.processors.ownership import load_ownership
    from revline.schemas import registry_client

    ownership = load_ownership(settings.ownership_file)
    claim_instance(settings.state_dir, group_instance_id(COMPONENT, instance))
    timeout = settings.startup_timeout_s
    ensure_topics(bootstrap, {settings.exceptions_topic: settings.input_partitions},
                  startup_timeout_s=timeout)
    ensure_operations_topics(bootstrap, settings)
    wait_for_group_coordinator(bootstrap, f"{settings.app_id}-exceptions", component=COMPONENT,
                               timeout_s=timeout)
    metrics = ExceptionMetrics()
    port = metrics.serve(settings.exceptions_metrics_port, settings.metrics_host)
    log.warning("metrics on http://127.0.0.1:%d/metrics", port)
    registry = registry_config(settings)
    deserializer = (EventDeserializer(registry=registry_client(registry))
                    if registry is not None else EventDeserializer())
    ExceptionManager(settings, bootstrap, ownership, metrics, deserializer=deserializer,
                     instance=instance, read_model=ReadModel.for_settings(settings)).run(stop)
