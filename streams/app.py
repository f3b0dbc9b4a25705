"""Faust wiring of the stream core: thin, all decisions live in ``processors``.

Faust hosts the worker: consumer-group membership and partition assignment,
the ``orders`` table (state, recovered from its changelog on assignment),
timers and clean shutdown. The input topic itself
is read with a confluent-kafka consumer assigned to the partitions Faust gave
this worker, in batches of up to ``batch_size`` records: Faust's per-event
stream path costs more than all of Revline's own per-event work, and the
worker's correctness does not depend on consumer commits (see below).

For each batch the worker:

1. decodes each input once and asks the engine for decisions, against the
   order's state read from the ``orders`` table;
2. produces every output (validated, exception, dead-letter, outcome) and
   waits until all are acknowledged;
3. writes the touched orders' state and, per partition, the next input offset
   to the table's changelog with the same idempotent producer, and waits again;
4. only then updates the local store.

The next-offset records are the worker's source of truth for where to resume:
after a crash or a rebalance, consumption restarts exactly after the last
input whose outcome and state are durable. Replayed inputs are recognised by
their coordinates and change nothing.

Hold timeouts and retention are driven by a timer that publishes a tick for
the order to the co-partitioned ticks topic; a Faust agent on that topic
handles it like an input (it is also what makes Faust assign this worker the
matching ``orders`` partitions).

Liveness: the input loop reports progress after every batch or idle poll (also
while recovering or waiting for reference data: the loop is alive, and other alerts
say why it is not consuming), ``revline_component_last_progress_timestamp_seconds
{component="worker"}``; every blocking Kafka call of the worker's own clients runs
under a watchdog deadline (its timeout plus ``CALL_GRACE_S``), past which the
process logs one CRITICAL line and exits 75 for its supervisor. The watchdog is a
thread, so it fires even while the event loop is stuck.

Start-up waits out a cold cluster (``revline.startup``): topic creation, the group
coordinator Faust joins, and a Faust start-up that fails on a transient broker
error is retried (the process runs again) until ``REVLINE_STARTUP_TIMEOUT_S``; a
failed start says why instead of faust/mode exiting 1 silently.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, cast

import faust
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from faust.streams import _current_event

from revline.core._gc import freeze_long_lived
from revline.core.errors import InfrastructureError
from revline.core.kafka_config import client_config, faust_broker_credentials, registry_config
from revline.core.metrics import Metrics
from revline.core.settings import Settings
from revline.core.watchdog import Watchdog
from revline.processors import (
    DEAD_LETTER,
    DUPLICATE,
    EXCEPTION,
    HELD,
    REPLAYED,
    VALIDATED,
    Decision,
    Engine,
    InputRecord,
    OrderState,
    Rules,
    load_yaml,
)
from revline.schemas import EventDeserializer, registry_client
from revline.streams._outputs import NULL_VALUE_CLASS, OutputWriter
from revline.streams._reference import ReferenceView

log = logging.getLogger("revline.worker")

TICK_EXPIRE = b"expire"
_IDLE_SLEEP_MIN_S = 0.001
TICK_EVICT = b"evict"
_HELD_MARK = b'"held":[{'  # orjson writes no spaces: a cheap test before parsing


class LastSeenIndex:
    """Orders by last-seen time: a heap with lazy deletion over order -> (time, partition).

    ``touch`` and ``remove`` are O(log n); ``oldest`` pops only what it returns (and stale
    heap entries), then puts the returned ones back: they stay indexed until evicted."""

    def __init__(self) -> None:
        self.at: dict[bytes, tuple[int, int]] = {}
        self._heap: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self.at)

    def touch(self, key: bytes, last_seen_ms: int, partition: int) -> None:
        if self.at.get(key) == (last_seen_ms, partition):
            return
        self.at[key] = (last_seen_ms, partition)
        heapq.heappush(self._heap, (last_seen_ms, key))
        if len(self._heap) > 2 * len(self.at) + 1024:  # mostly stale: compact
            self._heap = [(ms, k) for k, (ms, _) in self.at.items()]
            heapq.heapify(self._heap)

    def remove(self, key: bytes) -> None:
        self.at.pop(key, None)

    def oldest(self, count: int, before_ms: int) -> list[tuple[int, bytes, int]]:
        """The ``count`` oldest orders, and all others last seen before ``before_ms``."""
        out: list[tuple[int, bytes, int]] = []
        heap = self._heap
        while heap:
            ms, key = heap[0]
            current = self.at.get(key)
            if current is None or current[0] != ms:
                heapq.heappop(heap)  # stale: touched again since, or evicted
                continue
            if len(out) >= count and ms >= before_ms:
                break
            heapq.heappop(heap)
            out.append((ms, key, current[1]))
        for ms, key, _ in out:
            heapq.heappush(heap, (ms, key))
        return out
COMPONENT = "worker"
# A Kafka call may take its own timeout plus this before the watchdog ends the process.
CALL_GRACE_S = 30.0
# OutputWriter.flush: the flush (60 s), then maybe a recovery whose first flush fails
# the batch after 60 s more.
_FLUSH_DEADLINE_S = 60.0 + 60.0 + CALL_GRACE_S


def _headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    # A null header value is forwarded empty (never as the text "None"); str headers as UTF-8.
    pairs = raw.items() if isinstance(raw, dict) else (raw or ())
    return tuple((k, v if isinstance(v, bytes) else b"" if v is None
                  else str(v).encode(errors="replace")) for k, v in pairs)


UNKNOWN_SCHEMA_LABEL = "unknown"
_MAX_DRIFT_LABELS = 50  # registry ids the registry knows: bounded by it, and by this
DRIFT_LOG_INTERVAL_S = 10.0


class _DriftLog:
    """Schema drift as a metric label that never comes from input bytes, and a warning
    at most once per interval (with how many were suppressed)."""

    def __init__(self, interval_s: float = DRIFT_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.labels: set[str] = set()
        self._last = float("-inf")
        self._suppressed = 0

    def label(self, schema_ref: str, reason: str) -> str:
        # An unknown fingerprint or an id no registry has is whatever the bytes said:
        # one label for all. An id the registry resolved (a real schema this worker does
        # not know yet) keeps its own, up to a bound.
        if schema_ref in self.labels:
            return schema_ref
        if schema_ref.startswith("schema-id:") and "is registered" in reason and \
                len(self.labels) < _MAX_DRIFT_LABELS:
            self.labels.add(schema_ref)
            return schema_ref
        return UNKNOWN_SCHEMA_LABEL

    def warn(self, reason: str, coords: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        more = (f" ({self._suppressed} more in the last {now - self._last:.0f}s not logged)"
                if self._suppressed else "")
        log.warning("schema drift: %.300s at %s%s", reason, coords, more)
        self._last, self._suppressed = now, 0


class _PartitionEvent:
    """The one thing Faust's stores read from the "current event": its partition."""

    __slots__ = ("__weakref__", "message")

    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(partition=partition)


@contextmanager
def _in_partition(partition: int) -> Iterator[None]:
    # Table stores (RocksDB) pick the partition's database from the current event.
    # faust.streams exposes the context variable but no public setter for it.
    event = _PartitionEvent(partition)
    token = _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    try:
        yield
    finally:
        _current_event.reset(token)


def _now_ms() -> int:
    return int(time.time() * 1000)


Touched = dict[bytes, tuple[int, OrderState]]


class Worker:
    """Builds the Faust app and owns the per-batch procedure."""

    def __init__(self, settings: Settings, bootstrap: str, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.watchdog = Watchdog(COMPONENT, metrics.registry)
        self.rules = Rules.from_mapping(load_yaml(settings.rules_file))
        store = "rocksdb://" if settings.store == "rocksdb" else "memory://"
        datadir = (settings.state_dir / "faust").absolute()
        datadir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            settings.app_id,
            broker=f"kafka://{bootstrap}",
            broker_credentials=faust_broker_credentials(settings),
            store=store,
            datadir=str(datadir),
            topic_partitions=settings.input_partitions,
            web_enabled=False,
            broker_commit_interval=settings.commit_interval_s,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            table_standby_replicas=0,
            stream_wait_empty=False,
            broker_session_timeout=settings.session_timeout_s,
            broker_heartbeat_interval=max(1.0, settings.session_timeout_s / 5),
        )
        self.ticks = self.app.topic(
            settings.ticks_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
            value_serializer="raw",
        )
        # key_type/value_type must be given directly: a table declared with schema=... has
        # no key_type, faust then uses the json codec for its changelog, and recovery fails
        # on every record (logging a warning only) and silently starts from empty state.
        self.orders = self.app.Table(
            settings.orders_table, default=None, partitions=settings.input_partitions,
            key_type=bytes, value_type=bytes,
        )
        # Reference data: every worker reads the whole compacted topic itself into memory.
        # (A Faust GlobalTable fed by one worker never reached the others in
        # faust-streaming 0.15.3: a second worker waited for reference data forever, and a
        # GlobalTable on a custom changelog topic hangs the assignor.)
        self.reference: dict[bytes, Any] = {}
        self.reference_consumer = Consumer(client_config("consumer", bootstrap, {
            "group.id": f"{settings.app_id}-reference",
            "enable.auto.commit": False, "log_level": 3,
        }, settings=settings, component="worker"))
        self.view = ReferenceView(self.reference)
        self.engine = Engine(rules=self.rules, reference=self.view,
                             deserializer=_deserializer(settings))
        self.writer = OutputWriter(settings, bootstrap, metrics, self.rules)
        self.drift = _DriftLog()
        self.ticker = Producer(client_config("producer", bootstrap, {
            "enable.idempotence": True, "acks": "all", "log_level": 3,
        }, settings=settings, component="worker"))
        self.consumer = Consumer(client_config("consumer", bootstrap, {
            # Offsets are committed for lag tooling only; the worker resumes from its own
            # next-offset records, which are durable together with its state.
            "group.id": f"{settings.app_id}-input",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "log_level": 3,
        }, settings=settings, component="worker"))
        self.assigned: set[int] = set()
        self.next_offset: dict[int, int] = {}
        self._lock: asyncio.Lock | None = None
        # Orders with held events: order id -> (partition, oldest since_ms, count).
        self.holding: dict[bytes, tuple[int, int, int]] = {}
        self.tick_sent: dict[bytes, int] = {}
        # A hold may time out only once the worker has read its partition up to what was
        # on it when the timeout came due, so a backlog or an outage never turns into
        # timeouts for events already waiting on the topic (a chaos run timed out a
        # payment whose invoice sat 10 offsets behind it while the broker was down).
        # order id -> (its oldest hold's since_ms, the partition's end offset at the due
        # time).
        self.due_end: dict[bytes, tuple[int, int]] = {}
        # The holds index is kept per batch; a full scan only after partitions arrive
        # (their orders were recovered from the changelog behind the index's back).
        self._scan_due = True
        # Orders by last-seen time, kept as orders are touched and evicted (rebuilt from
        # the table with the holds index): eviction reads its oldest, never every order.
        self.last_seen = LastSeenIndex()
        self._frozen = False
        self._last_retention_ms = _now_ms()
        self._register()

    @property
    def lock(self) -> asyncio.Lock:
        # Created on first use, inside the running loop: batches, ticks and revocations
        # must not interleave.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # -- wiring ------------------------------------------------------------------------
    def _register(self) -> None:
        worker = self

        @self.app.agent(self.ticks, name="ticks", concurrency=1)
        async def ticks(source: faust.StreamT[bytes]) -> None:
            stream = cast(faust.Stream[bytes], source)  # take_events is not on the protocol
            async for batch in stream.take_events(100, within=0.2):
                await worker.wait_for_reference()
                commands = [
                    (e.message.partition, e.message.key, e.message.value) for e in batch
                    if isinstance(e.message.key, bytes) and isinstance(e.message.value, bytes)
                ]
                async with worker.lock:
                    await worker.guarded(worker.process_batch([], commands))

        @self.app.task  # type: ignore[untyped-decorator]
        async def follow_reference() -> None:
            await worker.follow_reference()

        @self.app.task  # type: ignore[untyped-decorator]
        async def consume_input() -> None:
            await worker.consume_input()

        @self.app.timer(self.settings.hold_check_interval_s)  # type: ignore[untyped-decorator]
        async def housekeeping() -> None:
            worker.housekeeping()

        @self.app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def on_revoked(app: faust.App, revoked: set[Any], **_: Any) -> None:
            # Faust awaits this before handing partitions over: finish the batch in
            # flight, then stop reading the input partitions we are losing.
            async with worker.lock:
                lost = {tp.partition for tp in revoked if tp.topic == worker.settings.ticks_topic}
                if lost & worker.assigned:
                    worker.reassign(worker.assigned - lost)

    async def guarded(self, work: Any) -> None:
        try:
            await work
        except Exception:
            # Crash-only: nothing of the batch is durable, so a restart redoes it from the
            # last durable next-offset. Carrying on would skip it.
            log.critical("batch failed; exiting so the supervisor restarts the worker",
                         exc_info=True)
            logging.shutdown()
            os._exit(70)

    async def follow_reference(self) -> None:
        """Keep ``self.reference`` equal to the compacted reference topic (tombstones delete)."""
        consumer = self.reference_consumer
        consumer.assign([TopicPartition(self.settings.reference_topic, 0, OFFSET_BEGINNING)])
        while not self.app.should_stop:
            with self.watchdog.deadline("reference consume", CALL_GRACE_S):
                messages = consumer.consume(500, 0)
            if not messages:
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                key = msg.key()
                if msg.error() is not None or key is None:
                    continue
                value = msg.value()
                if value is None:
                    self.reference.pop(key, None)
                else:
                    self.reference[key] = orjson.loads(value)

    async def wait_for_reference(self) -> None:
        waited = 0.0
        while not self.view.loaded():
            if waited == 0 or waited % 30 < 0.5:
                log.warning(
                    "waiting for reference data on %s (run `revline reference load`)",
                    self.settings.reference_topic,
                )
            self.watchdog.progress()  # alive; RevlineReferenceDataMissing says why idle
            await asyncio.sleep(0.5)
            waited += 0.5
        self.metrics.reference_loaded.set(1)

    # -- input consumption -------------------------------------------------------------
    def _owned(self) -> set[int]:
        try:
            assignment = self.app.consumer.assignment()
        except Exception:  # not started yet
            return set()
        return {tp.partition for tp in assignment if tp.topic == self.settings.ticks_topic}

    def reassign(self, partitions: set[int]) -> None:
        """Read exactly these input partitions, each from its durable next offset."""
        for gone in self.assigned - partitions:
            self.next_offset.pop(gone, None)
        for new in partitions - self.assigned:
            stored = self._stored_position(new)
            self.next_offset[new] = OFFSET_BEGINNING if stored is None else stored
        topic = self.settings.input_topic
        self.consumer.assign([TopicPartition(topic, p, self.next_offset[p]) for p in partitions])
        if partitions - self.assigned:
            self._scan_due = True
            if not self._frozen:  # first assignment: recovered, about to go steady
                self._frozen = True
                freeze_long_lived()
        self.assigned = set(partitions)
        log.info("reading %s partitions %s from %s", topic, sorted(partitions),
                 {p: self.next_offset[p] for p in sorted(partitions)})

    async def consume_input(self) -> None:
        self.metrics.recovering.set(1)
        await self.wait_for_reference()
        app = self.app
        # Empty input: back off from 1 ms to batch_within_s, so an idle worker costs
        # little CPU and a busy one picks up new records within a few ms.
        idle_sleep = _IDLE_SLEEP_MIN_S
        log.warning("worker ready: reading %s", self.settings.input_topic)
        while not app.should_stop:
            self.watchdog.progress()  # a batch done, an idle poll, or recovery going on
            if app.rebalancing or app.in_recovery:
                self.metrics.recovering.set(1)
                await asyncio.sleep(0.05)
                continue
            self.metrics.recovering.set(0)
            owned = self._owned()
            if owned != self.assigned:
                async with self.lock:
                    if not (app.rebalancing or app.in_recovery):
                        self.reassign(self._owned())
                continue
            if not self.assigned:
                await asyncio.sleep(0.1)
                continue
            # Non-blocking: librdkafka prefetches in its own thread, so this takes what has
            # arrived (up to batch_size); under load batches fill up by themselves.
            with self.watchdog.deadline("input consume", CALL_GRACE_S):
                messages = self.consumer.consume(self.settings.batch_size, 0)
            if not messages:
                await asyncio.sleep(idle_sleep)
                idle_sleep = min(idle_sleep * 2, max(self.settings.batch_within_s,
                                                     _IDLE_SLEEP_MIN_S))
                continue
            idle_sleep = _IDLE_SLEEP_MIN_S
            async with self.lock:
                batch = [m for m in messages
                         if m.error() is None and m.partition() in self.assigned]
                await self.guarded(self.process_batch(batch, []))

    # -- the batch ---------------------------------------------------------------------
    async def process_batch(self, messages: Sequence[Message],
                            commands: Sequence[tuple[int, bytes, bytes]]) -> None:
        started = time.perf_counter()
        now = _now_ms()
        self.view.refresh()
        touched: Touched = {}
        evicted: dict[bytes, int] = {}
        positions: dict[int, int] = {}
        decisions: list[Decision] = []
        topic = self.settings.input_topic
        for partition, order_id, command in commands:
            if command == TICK_EVICT and order_id not in touched:
                evicted[order_id] = partition
            elif command.startswith(TICK_EXPIRE):
                # "expire:<ms>": only holds held by then, the ones whose end offset was
                # read up to; a younger hold came due later and waits for its own check.
                _, _, since = command.partition(b":")
                decisions.extend(self._expire(partition, order_id, touched, now,
                                              int(since) if since.isdigit() else None))
        for msg in messages:
            partition, offset = msg.partition() or 0, msg.offset() or 0
            value = msg.value()
            record = InputRecord(
                topic=topic, partition=partition, offset=offset, key=msg.key(),
                value=value if value is not None else b"", headers=_headers(msg.headers()),
                timestamp_ms=msg.timestamp()[1],
            )
            positions[partition] = max(positions.get(partition, 0), offset + 1)
            if value is None:  # a tombstone: nothing to decode, dead-lettered as null
                self.metrics.events_in.labels("undecodable").inc()
                decisions.append(Decision(
                    input=record, kind=DEAD_LETTER, stage="decode",
                    error_class=NULL_VALUE_CLASS,
                    reason="null value: the record has no value (a tombstone), so no event",
                    decided_at_ms=now, rules_version=self.rules.version))
                continue
            decisions.extend(self._decide(record, touched, now))
        for decision in decisions:
            self.writer.emit(decision)
        # 1. Outputs durable before the state that remembers them as decided: otherwise a
        #    crash could leave an input "replayed" whose outputs were never delivered.
        with self.watchdog.deadline("output flush", _FLUSH_DEADLINE_S):
            await self.writer.flush()
        # 2. State and next offsets durable before the next batch builds on them.
        changelog = self.orders.changelog_topic.get_topic_name()
        values: dict[bytes, tuple[int, bytes | None]] = {}
        for order_id, (partition, state) in touched.items():
            values[order_id] = (partition, orjson.dumps(state.data))
        for order_id, partition in evicted.items():
            values[order_id] = (partition, None)
        for partition, next_offset in positions.items():
            values[self._position_key(partition)] = (
                partition, orjson.dumps({"next": next_offset}))
        for key, (partition, value) in values.items():
            self.writer.write_state(changelog, partition, key, value)
        with self.watchdog.deadline("state flush", _FLUSH_DEADLINE_S):
            await self.writer.flush()
        # 3. Only now the local store (what the next batch reads).
        for key, (partition, value) in values.items():
            with _in_partition(partition):
                if value is None:
                    self.orders.data.pop(key, None)
                else:
                    self.orders.data[key] = value
        for order_id, (partition, state) in touched.items():
            self._index_holds(order_id, partition, state)
        for order_id, (partition, state) in touched.items():
            self.last_seen.touch(order_id, state.data.get("last_seen_ms", now), partition)
        for order_id in evicted:
            self.holding.pop(order_id, None)
            self.last_seen.remove(order_id)
        self.next_offset.update(positions)
        if positions:
            with self.watchdog.deadline("input commit", CALL_GRACE_S):
                self.consumer.commit(offsets=[TopicPartition(topic, p, o)
                                              for p, o in positions.items()], asynchronous=True)
        self._observe(decisions, now)
        self.metrics.processing_latency.observe(time.perf_counter() - started)
        self.metrics.last_batch.set(time.time())

    def _decide(self, record: InputRecord, touched: Touched, now: int) -> list[Decision]:
        try:
            decoded, dead = self.engine.decode(record, now)
        except InfrastructureError:
            raise  # the schema registry is away or refuses us: not the record's fault
        except Exception as exc:  # a decoder bug: route the record, never crash-loop on it
            log.exception("decoding failed on %s", record.coords)
            decoded, dead = None, Decision(
                input=record, kind=DEAD_LETTER, stage="decode",
                error_class=type(exc).__name__, reason=f"decoder error: {exc}"[:2000],
                decided_at_ms=now, rules_version=self.rules.version)
        if dead is not None:
            if dead.stage == "schema" and dead.schema_ref:
                self.metrics.schema_drift.labels(
                    self.drift.label(dead.schema_ref, dead.reason or "")).inc()
                self.drift.warn(dead.reason or "", record.coords)
            self.metrics.events_in.labels("undecodable").inc()
            return [dead]
        assert decoded is not None and record.key is not None
        state = self._state(record.partition, record.key, touched)
        # The engine changes the order's state as it goes (dedup memo, holds, tokens). If it
        # fails half-way those changes must not outlive the dead letter: the memo would make a
        # re-drive come back "duplicate", and a half-released hold could later be applied
        # beside its dead-lettered trigger. A copy costs about 1 µs (orjson, a few KB).
        before = orjson.dumps(state.data)
        try:
            return self.engine.process(state, record, decoded, now)
        except Exception as exc:  # an engine bug: route the record, never crash-loop on it
            log.exception("engine failed on %s", record.coords)
            state.data = orjson.loads(before)
            return [Decision(
                input=record, kind=DEAD_LETTER, event=decoded, stage="processing",
                error_class=type(exc).__name__, reason=f"engine error: {exc}",
                decided_at_ms=now, rules_version=self.rules.version,
            )]

    def _expire(self, partition: int, order_id: bytes, touched: Touched, now: int,
                held_since_ms: int | None) -> list[Decision]:
        state = self._state(partition, order_id, touched)
        before = orjson.dumps(state.data)
        try:
            return self.engine.expire_holds(state, now, held_since_ms=held_since_ms)
        except Exception:
            # An engine bug while expiring or releasing: exiting would crash-loop (the holds
            # come due again at once after a restart). The order's holds stay as they were,
            # visible in `revline holds`, and the next scan tries again.
            log.exception("engine failed expiring the holds of order %r", order_id)
            state.data = orjson.loads(before)
            return []

    def _state(self, partition: int, order_id: bytes, touched: Touched) -> OrderState:
        if order_id in touched:
            return touched[order_id][1]
        with _in_partition(partition):
            raw = self.orders.data.get(order_id)
        state = OrderState(orjson.loads(raw)) if raw else OrderState()
        state.data["partition"] = partition
        touched[order_id] = (partition, state)
        return state

    def _position_key(self, partition: int) -> bytes:
        return f"__position__:{self.settings.input_topic}:{partition}".encode()

    def _stored_position(self, partition: int) -> int | None:
        with _in_partition(partition):
            raw = self.orders.data.get(self._position_key(partition))
        return int(orjson.loads(raw)["next"]) if raw else None

    def _index_holds(self, order_id: bytes, partition: int, state: OrderState) -> None:
        oldest = self.engine.oldest_hold_ms(state)
        if oldest is None:
            self.holding.pop(order_id, None)
        else:
            self.holding[order_id] = (partition, oldest, len(state.held))

    def _observe(self, decisions: list[Decision], now: int) -> None:
        # Counted per batch, then one inc() per label: per-event label lookups add up.
        m = self.metrics
        counts: Counter[tuple[str, ...]] = Counter()
        seconds_now = now / 1000
        for d in decisions:
            kind = d.kind
            if kind in (REPLAYED, HELD):
                counts[(kind,)] += 1
                continue
            counts[("outcome", kind)] += 1
            if kind == EXCEPTION and d.check_id:
                counts[("qa", d.check_id, d.severity or "")] += 1
            elif kind == DEAD_LETTER:
                counts[("dead", d.stage or "")] += 1
            elif kind == VALIDATED:
                for warning in d.warnings:
                    counts[("qa", warning, self.rules.spec(warning).severity)] += 1
            if d.held and d.released_by:
                counts[("released",)] += 1
            env = d.envelope
            if env is not None:
                counts[("in", env["event_type"])] += 1
                m.end_to_end_latency.observe(max(0.0, seconds_now - env["occurred_at"].timestamp()))
        for key, n in counts.items():
            head = key[0]
            if head == REPLAYED:
                m.replayed.inc(n)
            elif head == "outcome":
                m.outcomes.labels(key[1]).inc(n)
                if key[1] == DUPLICATE:
                    m.duplicates.inc(n)
            elif head == "qa":
                m.qa_failures.labels(key[1], key[2]).inc(n)
                if key[1] == "dedup.conflict":
                    m.conflicting_duplicates.inc(n)
                elif key[1] == "hold.timeout":
                    m.hold_timeouts.inc(n)
            elif head == "dead":
                m.dead_letters.labels(key[1]).inc(n)
            elif head == "released":
                m.holds_released.inc(n)
            elif head == "in":
                m.events_in.labels(key[1]).inc(n)

    # -- housekeeping (timer) ------------------------------------------------------------
    def housekeeping(self) -> None:
        now = _now_ms()
        if self._scan_due:
            # Not periodic: scanning every order stalls the event loop (~200 ms at
            # 30k orders), which showed as the end-to-end p99.
            self._scan_due = False
            self._scan_holds()
        timeout_ms = int(self.rules.hold_timeout_seconds * 1000)
        ticks = 0
        ends: dict[int, int | None] = {}
        for order_id, (partition, oldest, _) in list(self.holding.items()):
            if now - oldest < timeout_ms or now - self.tick_sent.get(order_id, 0) <= 10_000:
                continue
            known = self.due_end.get(order_id)
            if known is None or known[0] != oldest:
                if partition not in ends:
                    ends[partition] = self._end_offset(partition)
                end = ends[partition]
                if end is None:  # cannot tell what is waiting: never time out blind
                    continue
                known = self.due_end[order_id] = (oldest, end)
            if self._read_up_to(partition) < known[1]:
                continue  # the releasing event may be in the backlog still to read
            self._send_tick(order_id, partition, TICK_EXPIRE + b":%d" % known[0])
            self.tick_sent[order_id] = now
            ticks += 1
        for order_id in [o for o in self.due_end if o not in self.holding]:
            del self.due_end[order_id]
        # A sent tick only throttles re-sends for 10 s: past that, or once the order holds
        # nothing, its entry goes (they were kept for good: one per timed-out order).
        for order_id in [o for o, at in self.tick_sent.items()
                         if now - at > 10_000 or o not in self.holding]:
            del self.tick_sent[order_id]
        retention_ms = int(self.settings.dedup_retention_days * 86_400_000)
        due = now - self._last_retention_ms > min(3_600_000, retention_ms)
        if due or len(self.orders.data) > self.settings.max_orders * 1.1:
            self._last_retention_ms = now
            ticks += self._evict_old_orders(now, retention_ms)
        if ticks:
            with self.watchdog.deadline("tick flush", 10 + CALL_GRACE_S):
                self.ticker.flush(10)
        self.metrics.held.set(sum(count for _, _, count in self.holding.values()))
        oldest_all = min((o for _, o, _ in self.holding.values()), default=None)
        self.metrics.oldest_hold_age.set(0 if oldest_all is None else (now - oldest_all) / 1000)
        self._observe_lag()

    def _evict_old_orders(self, now: int, retention_ms: int) -> int:
        """Dedup state is bounded in time (retention) and size (max_orders, oldest first).

        The oldest orders come from the last-seen index: the cost is the evicted orders'."""
        excess = max(0, len(self.last_seen) - self.settings.max_orders)
        evict = self.last_seen.oldest(excess, now - retention_ms)
        for _, key, partition in evict:
            self._send_tick(key, partition, TICK_EVICT)
        if evict:
            log.warning("evicting %d orders from dedup state (retention %.0f days, bound %d)",
                        len(evict), self.settings.dedup_retention_days, self.settings.max_orders)
        return len(evict)

    def _send_tick(self, order_id: bytes, partition: int, command: bytes) -> None:
        self.ticker.produce(self.settings.ticks_topic, key=order_id, value=command,
                            partition=partition)

    def _scan_holds(self) -> None:
        """Rebuild the holds and last-seen indexes from the table (after a restart or an
        assignment they start empty)."""
        holding: dict[bytes, tuple[int, int, int]] = {}
        last_seen = LastSeenIndex()
        for key, raw in list(self.orders.items()):
            if raw and not key.startswith(b"__position__"):
                # Once per assignment (not hourly): the index is kept per batch after it.
                data = orjson.loads(raw)
                last_seen.touch(key, int(data.get("last_seen_ms", 0)), int(data["partition"]))
            if raw and _HELD_MARK in raw:
                state = OrderState(orjson.loads(raw))
                oldest = self.engine.oldest_hold_ms(state)
                if oldest is not None:
                    holding[key] = (state.data["partition"], oldest, len(state.held))
        self.holding = holding
        self.last_seen = last_seen

    def _end_offset(self, partition: int) -> int | None:
        """The input partition's end offset now, or None when the broker cannot say."""
        try:
            with self.watchdog.deadline("end offset", 1 + CALL_GRACE_S):
                _, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.settings.input_topic, partition), timeout=1.0,
                    cached=False)
        except Exception as exc:  # KafkaException: broker away; holds wait for it
            log.info("holds on partition %d wait: end offset unknown (%s)", partition, exc)
            return None
        return int(high)

    def _read_up_to(self, partition: int) -> int:
        """How far the worker has read an input partition (its next offset to take)."""
        done = self.next_offset.get(partition, -1)
        try:
            [tp] = self.consumer.position([TopicPartition(self.settings.input_topic, partition)])
        except Exception:  # not assigned (any more)
            return done
        # position() also steps over transaction markers, which no record reports.
        return max(done, tp.offset)

    def _observe_lag(self) -> None:
        topic = self.settings.input_topic
        for partition, done in list(self.next_offset.items()):
            if done < 0:
                continue
            try:
                _, high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True)
            except Exception:  # no statistics yet
                continue
            self.metrics.consumer_lag.labels(str(partition)).set(max(0, high - done))


def _deserializer(settings: Settings) -> EventDeserializer:
    """The decoder, with the schema registry when one is configured (Confluent framing)."""
    registry = registry_config(settings)
    if registry is None:
        return EventDeserializer()
    return EventDeserializer(registry=registry_client(registry))


def build_worker(settings: Settings, bootstrap: str, metrics: Metrics | None = None) -> Worker:
    return Worker(settings, bootstrap, metrics or Metrics())


def topics_for(settings: Settings) -> dict[str, int]:
    """Topics the worker needs, with partition counts (created before it starts)."""
    n = settings.input_partitions
    return {
        settings.input_topic: n,
        settings.ticks_topic: n,
        settings.validated_topic: n,
        settings.exceptions_topic: n,
        settings.outcomes_topic: n,
        settings.dead_letter_topic: n,
    }


# Wall-clock time of the first start of a worker that re-runs itself after a transient
# start-up failure: its start-up deadline counts from then.
_FIRST_START_ENV = "REVLINE_WORKER_FIRST_START"


def run(settings: Settings, bootstrap: str) -> None:
    """Run one worker process until SIGTERM/SIGINT (Faust handles both gracefully)."""
    from revline.core.admin import check_partition_counts, ensure_operations_topics, ensure_topics
    from revline.core.startup import wait_for_group_coordinator

    first_start = _first_start()
    timeout = max(1.0, settings.startup_timeout_s - (time.time() - first_start))
    ensure_topics(bootstrap, topics_for(settings), startup_timeout_s=timeout)
    check_partition_counts(bootstrap, {settings.input_topic: settings.input_partitions,
                                       settings.ticks_topic: settings.input_partitions})
    ensure_operations_topics(bootstrap, settings)
    ensure_topics(bootstrap, {settings.reference_topic: 1},
                  config={settings.reference_topic: {"cleanup.policy": "compact"}},
                  startup_timeout_s=timeout)
    # Faust (aiokafka) gives up on a coordinator that is still loading on a new cluster.
    wait_for_group_coordinator(bootstrap, settings.app_id, component=COMPONENT,
                               timeout_s=timeout)
    metrics = Metrics()
    port = metrics.serve(settings.metrics_port, settings.metrics_host)
    log.warning("metrics on http://127.0.0.1:%d/metrics", port)
    worker = build_worker(settings, bootstrap, metrics)
    faust_worker = faust.Worker(worker.app, loglevel=settings.log_level)
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        # mode's exiting() turns any failure into a bare exit 1: say what it was.
        cause = exc.__context__ or worker.app.crash_reason
        _after_faust_failure(settings, cause, first_start, int(exc.code)
                             if isinstance(exc.code, int) else 1)
        raise


def _first_start() -> float:
    raw = os.environ.get(_FIRST_START_ENV, "")
    try:
        return float(raw) if raw else time.time()
    except ValueError:
        return time.time()


def _after_faust_failure(settings: Settings, cause: BaseException | None, first_start: float,
                         code: int) -> None:
    """Log why Faust stopped; re-run the process on a transient start-up failure."""
    import sys

    from revline.core.startup import is_transient

    what = (f"{type(cause).__name__}: {cause}" if cause is not None and str(cause)
            else type(cause).__name__ if cause is not None else "no reason given by faust")
    waited = time.time() - first_start
    if cause is not None and is_transient(cause) and waited < settings.startup_timeout_s:
        log.warning("worker: Faust stopped on a transient broker error (%s) after %.0f s; "
                    "starting again (up to REVLINE_STARTUP_TIMEOUT_S=%.0f s)", what, waited,
                    settings.startup_timeout_s)
        logging.shutdown()
        time.sleep(1.0)
        env = {**os.environ, _FIRST_START_ENV: repr(first_start)}
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    log.critical("worker stopped (exit %d): %s", code, what,
                 exc_info=(type(cause), cause, cause.__traceback__) if cause is not None
                 else None)

