"""Faust wiring of the stream core: thin, all decisions live in ``processors``.

One agent reads the input topic (and the internal ticks topic) in batches
(``take_events``). For each batch it:

1. decodes each input once and asks the engine for decisions, against the
   order's state read from the ``orders`` table;
2. produces every output (validated, exception, dead-letter, outcome) and
   waits until all are acknowledged;
3. only then writes the touched orders' state to the table (changelog) and
   lets Faust ack the inputs, whose offsets Faust commits after flushing the
   changelog.

A crash anywhere replays uncommitted inputs against the last durable state;
because decisions are deterministic and remembered by input coordinates, a
replay re-sends at most identical records and changes nothing.

Hold timeouts and retention are driven by a timer that cannot write the
table itself (a table write belongs to an input's partition), so it publishes
a tick for the order to the co-partitioned ticks topic; the agent handles it
like an input.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import faust
from confluent_kafka import Consumer, Producer, TopicPartition

from processors import (
    DEAD_LETTER,
    DUPLICATE,
    EXCEPTION,
    FINAL_KINDS,
    HELD,
    REPLAYED,
    Decision,
    Engine,
    InputRecord,
    OrderState,
    Rules,
    load_yaml,
)
from revline.errors import InfrastructureError
from revline.metrics import Metrics
from revline.settings import Settings
from streams._outputs import OutputWriter
from streams._reference import ReferenceView

log = logging.getLogger("revline.worker")

TICK_EXPIRE = b"expire"
TICK_EVICT = b"evict"
_HELD_MARK = b'"held": [{'  # json.dumps default separators: cheap test before parsing


def _headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    pairs = raw.items() if isinstance(raw, dict) else (raw or ())
    return tuple((k, v if isinstance(v, bytes) else str(v).encode()) for k, v in pairs)


@contextmanager
def _partition_of(stream: faust.Stream[bytes], event: faust.EventT[bytes]) -> Iterator[None]:
    """Make table reads/writes use ``event``'s partition.

    Faust picks a table's partition from the current event. With batches we set it
    explicitly, then restore the stream's attribute: ``take_events`` reads it to pair
    the next buffered value with its event, and a stale one would lose that input.
    """
    previous = stream.current_event
    stream._set_current_event(event)
    try:
        yield
    finally:
        stream.current_event = previous


def _now_ms() -> int:
    return int(time.time() * 1000)


class Worker:
    """Builds the Faust app and owns the per-batch procedure."""

    def __init__(self, settings: Settings, bootstrap: str, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.rules = Rules.from_mapping(load_yaml(settings.rules_file))
        store = "rocksdb://" if settings.store == "rocksdb" else "memory://"
        datadir = (settings.state_dir / "faust").absolute()
        datadir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            settings.app_id,
            broker=f"kafka://{bootstrap}",
            store=store,
            datadir=str(datadir),
            topic_partitions=settings.input_partitions,
            web_enabled=False,
            broker_commit_interval=settings.commit_interval_s,
            broker_commit_every=settings.batch_size * 4,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            table_standby_replicas=0,
            stream_wait_empty=False,
            broker_session_timeout=settings.session_timeout_s,
            broker_heartbeat_interval=max(1.0, settings.session_timeout_s / 5),
        )
        self.source = self.app.topic(
            settings.input_topic, settings.ticks_topic,
            key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        )
        # key_type/value_type must be given directly: a table declared with schema=... has
        # no key_type, faust then uses the json codec for its changelog, and recovery fails
        # on every record (logging a warning only) and silently starts from empty state.
        self.orders = self.app.Table(
            settings.orders_table, default=None, partitions=settings.input_partitions,
            key_type=bytes, value_type=bytes,
        )
        # Reference data: the loader's compacted topic is copied into a global table by a
        # small agent (a GlobalTable reading a custom changelog topic hangs Faust's
        # assignor in faust-streaming 0.15), so every worker sees all of it.
        self.reference_source = self.app.topic(
            settings.reference_topic, key_type=bytes, key_serializer="raw",
            value_serializer="json", partitions=1,
        )
        self.reference = self.app.GlobalTable(
            "reference", default=None, partitions=1, key_type=bytes,
        )
        self.view = ReferenceView(self.reference)
        self.engine = Engine(rules=self.rules, reference=self.view)
        self.writer = OutputWriter(settings, bootstrap, metrics, self.rules)
        self.ticker = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                "acks": "all", "log_level": 3})
        # Orders with held events: order id -> (partition, oldest since_ms, count).
        self.holding: dict[bytes, tuple[int, int, int]] = {}
        self.tick_sent: dict[bytes, int] = {}
        self.processed: dict[int, int] = {}  # input partition -> last offset processed
        self._bootstrap = bootstrap
        self._gap_consumer: Consumer | None = None
        self._last_scan_ms = 0
        self._last_retention_ms = _now_ms()
        self._register()

    # -- wiring ------------------------------------------------------------------------
    def _register(self) -> None:
        worker = self

        @self.app.agent(self.source, name="pipeline", concurrency=1)
        async def pipeline(source: faust.StreamT[bytes]) -> None:
            stream = cast(faust.Stream[bytes], source)  # take_events is not on the protocol
            async for batch in stream.take_events(worker.settings.batch_size,
                                                  within=worker.settings.batch_within_s):
                await worker.wait_for_reference()
                try:
                    await worker.process_batch(stream, batch)
                except Exception:
                    # Crash-only: the batch stays unacked and uncommitted, so a restart
                    # replays it against durable state. Continuing would stall the partition.
                    log.critical("batch failed; exiting so the supervisor restarts the worker",
                                 exc_info=True)
                    logging.shutdown()
                    os._exit(70)

        @self.app.agent(self.reference_source, name="reference-sync")
        async def reference_sync(source: faust.StreamT[Any]) -> None:
            async for event in source.events():
                key = event.key
                if isinstance(key, bytes):
                    worker.reference[key] = event.value

        @self.app.timer(self.settings.hold_check_interval_s)  # type: ignore[untyped-decorator]
        async def housekeeping() -> None:
            worker.housekeeping()

    async def wait_for_reference(self) -> None:
        waited = 0.0
        while not self.view.loaded():
            if waited == 0 or waited % 30 < 0.5:
                log.warning(
                    "waiting for reference data on %s (run `revline reference load`)",
                    self.settings.reference_topic,
                )
            await asyncio.sleep(0.5)
            waited += 0.5
        self.metrics.reference_loaded.set(1)

    # -- the batch ---------------------------------------------------------------------
    async def process_batch(self, stream: faust.Stream[bytes],
                            batch: Sequence[faust.EventT[bytes]]) -> None:
        started = time.perf_counter()
        now = _now_ms()
        ticks_topic = self.settings.ticks_topic
        touched: dict[bytes, tuple[faust.EventT[bytes], OrderState]] = {}
        evicted: dict[bytes, faust.EventT[bytes]] = {}
        positions: dict[int, tuple[faust.EventT[bytes], int]] = {}  # partition -> next offset
        decisions: list[Decision] = []
        for event in batch:
            msg = event.message
            key = msg.key if isinstance(msg.key, bytes) else None
            if msg.topic == ticks_topic:
                if key is None:
                    continue
                if msg.value == TICK_EVICT and key not in touched:
                    evicted[key] = event
                else:
                    decisions.extend(self.engine.expire_holds(
                        self._state(stream, event, key, touched), now))
                continue
            record = InputRecord(
                topic=msg.topic, partition=msg.partition, offset=msg.offset, key=key,
                value=msg.value if isinstance(msg.value, bytes) else b"",
                headers=_headers(msg.headers),
                timestamp_ms=int((msg.timestamp or 0) * 1000),
            )
            expected = self._next_offset(stream, event, positions)
            if expected is not None and msg.offset > expected:
                # Never skip an input, whatever the consumer did: fetch what is missing.
                missed = self._fetch(msg.topic, msg.partition, expected, msg.offset)
                log.warning("consumer skipped %s/%d offsets %d..%d; processing %d records "
                            "fetched directly", msg.topic, msg.partition, expected,
                            msg.offset - 1, len(missed))
                self.metrics.gaps_filled.inc(len(missed))
                for lost in missed:
                    decisions.extend(self._decide(stream, event, lost, touched, now))
            positions[msg.partition] = (event, max(expected or 0, msg.offset + 1))
            self.processed[msg.partition] = msg.offset
            decisions.extend(self._decide(stream, event, record, touched, now))
        for decision in decisions:
            self.writer.emit(decision)
        # 1. Outputs durable before the state that remembers them as decided: otherwise a
        #    crash could leave an input "replayed" whose outputs were never delivered.
        await self.writer.flush()
        # 2. State durable before Faust may commit these inputs. The changelog is written
        #    with our own idempotent producer and flushed, because Faust's producer buffer
        #    flush gives up after 0.1 s of no progress and its offset commit can then
        #    overtake table writes still buffered.
        changelog = self.orders.changelog_topic.get_topic_name()
        values: dict[bytes, bytes | None] = {}
        for order_id, (event, state) in touched.items():
            values[order_id] = json.dumps(state.data).encode()
            self.writer.write_state(changelog, event.message.partition, order_id,
                                    values[order_id])
        for order_id, event in evicted.items():
            values[order_id] = None
            self.writer.write_state(changelog, event.message.partition, order_id, None)
        events_of = {k: v[0] for k, v in touched.items()} | evicted
        for partition, (event, next_offset) in positions.items():
            key = self._position_key(partition)
            values[key] = json.dumps({"next": next_offset}).encode()
            self.writer.write_state(changelog, partition, key, values[key])
            events_of[key] = event
        await self.writer.flush()
        # 3. Only now the local store (what the next batch reads).
        for order_id, value in values.items():
            event = events_of[order_id]
            with _partition_of(stream, event):
                if value is None:
                    self.orders.data.pop(order_id, None)
                else:
                    self.orders.data[order_id] = value
            self._index_holds(order_id, event, touched.get(order_id, (event, None))[1])
        self._observe(decisions, now)
        self.metrics.processing_latency.observe(time.perf_counter() - started)

    def _decide(self, stream: faust.Stream[bytes], event: faust.EventT[bytes],
                record: InputRecord, touched: dict[bytes, tuple[faust.EventT[bytes], OrderState]],
                now: int) -> list[Decision]:
        decoded, dead = self.engine.decode(record, now)
        if dead is not None:
            if dead.stage == "schema" and dead.schema_ref:
                self.metrics.schema_drift.labels(dead.schema_ref).inc()
                log.warning("schema drift: %s at %s", dead.reason, record.coords)
            self.metrics.events_in.labels("undecodable").inc()
            return [dead]
        assert decoded is not None and record.key is not None
        self.metrics.events_in.labels(decoded["envelope"]["event_type"]).inc()
        state = self._state(stream, event, record.key, touched)
        try:
            return self.engine.process(state, record, decoded, now)
        except Exception as exc:  # an engine bug: route the record, never crash-loop on it
            log.exception("engine failed on %s", record.coords)
            return [Decision(
                input=record, kind=DEAD_LETTER, event=decoded, stage="processing",
                error_class=type(exc).__name__, reason=f"engine error: {exc}",
                decided_at_ms=now, rules_version=self.rules.version,
            )]

    def _state(self, stream: faust.Stream[bytes], event: faust.EventT[bytes], order_id: bytes,
               touched: dict[bytes, tuple[faust.EventT[bytes], OrderState]]) -> OrderState:
        if order_id in touched:
            return touched[order_id][1]
        with _partition_of(stream, event):
            raw = self.orders.get(order_id)
        state = OrderState(json.loads(raw)) if raw else OrderState()
        state.data["partition"] = event.message.partition
        touched[order_id] = (event, state)
        return state

    # -- input positions: our own record of what was processed ------------------------------
    def _position_key(self, partition: int) -> bytes:
        return f"__position__:{self.settings.input_topic}:{partition}".encode()

    def _next_offset(self, stream: faust.Stream[bytes], event: faust.EventT[bytes],
                     positions: dict[int, tuple[faust.EventT[bytes], int]]) -> int | None:
        partition = event.message.partition
        if partition in positions:
            return positions[partition][1]
        with _partition_of(stream, event):
            raw = self.orders.get(self._position_key(partition))
        return int(json.loads(raw)["next"]) if raw else None

    def _fetch(self, topic: str, partition: int, start: int, end: int) -> list[InputRecord]:
        """Records [start, end) of one input partition, read directly from the broker."""
        if self._gap_consumer is None:
            self._gap_consumer = Consumer({
                "bootstrap.servers": self._bootstrap,
                "group.id": f"{self.settings.app_id}-gapfill",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "log_level": 3,
            })
        consumer = self._gap_consumer
        consumer.assign([TopicPartition(topic, partition, start)])
        out: list[InputRecord] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                offset = msg.offset() or 0
                if msg.error() or offset >= end:
                    continue
                out.append(InputRecord(
                    topic=topic, partition=partition, offset=offset, key=msg.key(),
                    value=msg.value() or b"", headers=_headers(msg.headers()),
                    timestamp_ms=msg.timestamp()[1],
                ))
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition))
            position = consumer.position([TopicPartition(topic, partition)])[0].offset
            if position >= end or position >= high:
                return out
        raise InfrastructureError(f"could not re-read {topic}/{partition} [{start}, {end})")

    def _index_holds(self, order_id: bytes, event: faust.EventT[bytes],
                     state: OrderState | None) -> None:
        oldest = self.engine.oldest_hold_ms(state) if state is not None else None
        if oldest is None or state is None:
            self.holding.pop(order_id, None)
        else:
            self.holding[order_id] = (event.message.partition, oldest, len(state.held))

    def _observe(self, decisions: list[Decision], now: int) -> None:
        m = self.metrics
        for d in decisions:
            if d.kind == REPLAYED:
                m.replayed.inc()
                continue
            if d.kind == HELD:
                continue
            if d.kind in FINAL_KINDS:
                m.outcomes.labels(d.kind).inc()
            if d.kind == DUPLICATE:
                m.duplicates.inc()
            elif d.kind == EXCEPTION and d.check_id:
                m.qa_failures.labels(d.check_id, d.severity or "").inc()
                if d.check_id == "dedup.conflict":
                    m.conflicting_duplicates.inc()
                if d.check_id == "hold.timeout":
                    m.hold_timeouts.inc()
            elif d.kind == DEAD_LETTER:
                m.dead_letters.labels(d.stage or "").inc()
            for warning in d.warnings if d.kind != EXCEPTION else ():
                m.qa_failures.labels(warning, self.rules.spec(warning).severity).inc()
            if d.held and d.released_by:
                m.holds_released.inc()
            env = d.envelope
            if env is not None:
                m.end_to_end_latency.observe(max(0.0, now / 1000 - env["occurred_at"].timestamp()))

    # -- housekeeping (timer) ------------------------------------------------------------
    def housekeeping(self) -> None:
        now = _now_ms()
        if now - self._last_scan_ms > self.settings.hold_check_interval_s * 6000:
            self._scan_holds()
            self._last_scan_ms = now
        timeout_ms = int(self.rules.hold_timeout_seconds * 1000)
        ticks = 0
        for order_id, (partition, oldest, _) in list(self.holding.items()):
            if now - oldest >= timeout_ms and now - self.tick_sent.get(order_id, 0) > 10_000:
                self._send_tick(order_id, partition, TICK_EXPIRE)
                self.tick_sent[order_id] = now
                ticks += 1
        retention_ms = int(self.settings.dedup_retention_days * 86_400_000)
        if now - self._last_retention_ms > min(3_600_000, retention_ms):
            self._last_retention_ms = now
            for key, raw in list(self.orders.items()):
                data = json.loads(raw) if raw else None
                if data and now - data.get("last_seen_ms", now) > retention_ms:
                    self._send_tick(key, data["partition"], TICK_EVICT)
                    ticks += 1
        if ticks:
            self.ticker.flush(10)
        self.metrics.held.set(sum(count for _, _, count in self.holding.values()))
        oldest_all = min((o for _, o, _ in self.holding.values()), default=None)
        self.metrics.oldest_hold_age.set(0 if oldest_all is None else (now - oldest_all) / 1000)
        self._observe_lag()

    def _send_tick(self, order_id: bytes, partition: int, command: bytes) -> None:
        self.ticker.produce(self.settings.ticks_topic, key=order_id, value=command,
                            partition=partition)

    def _scan_holds(self) -> None:
        """Rebuild the holds index from the table (after a restart it starts empty)."""
        holding: dict[bytes, tuple[int, int, int]] = {}
        for key, raw in list(self.orders.items()):
            if raw and _HELD_MARK in raw:
                state = OrderState(json.loads(raw))
                oldest = self.engine.oldest_hold_ms(state)
                if oldest is not None:
                    holding[key] = (state.data["partition"], oldest, len(state.held))
        self.holding = holding

    def _observe_lag(self) -> None:
        consumer = self.app.consumer
        try:
            assignment = consumer.assignment()
        except Exception:  # not assigned yet
            return
        for tp in assignment:
            if tp.topic != self.settings.input_topic:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            done = self.processed.get(tp.partition, -1) + 1
            self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, highwater - done))


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


def run(settings: Settings, bootstrap: str) -> None:
    """Run one worker process until SIGTERM/SIGINT (Faust handles both gracefully)."""
    from revline.admin import ensure_topics

    ensure_topics(bootstrap, topics_for(settings))
    metrics = Metrics()
    port = metrics.serve(settings.metrics_port)
    log.warning("metrics on http://127.0.0.1:%d/metrics", port)
    worker = build_worker(settings, bootstrap, metrics)
    faust_worker = faust.Worker(worker.app, loglevel=settings.log_level)
    faust_worker.execute_from_commandline()

