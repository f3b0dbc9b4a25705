"""The sink processor: validated topic → ledger and ERP, exactly once in effect.

Per batch: decode, post to the ledger (one transaction, idempotent by key), apply
each event to the ERP unless the side-effect ledger says it already was, make the
exception records and audit facts durable, record every effect (one transaction
for the batch), and only then commit the batch's offsets. The commit is
asynchronous: once the effects are durable, the offsets are only where to resume,
and a commit that is lost re-reads a batch the side-effect ledger makes harmless
(closing and losing partitions commit synchronously). A crash
before the effects are recorded loses nothing: the ledger's key is unique and the
ERP adapters find earlier writes by the key stored on the document. Transient
failures are retried with backoff and jitter; repeated ones open the adapter's
circuit breaker, which pauses consumption (no commit, no exception) until a
half-open probe succeeds. Permanent refusals become exception records owned by
"integrations" and a "refused" side-effect row; the batch moves on.

An effect is identified by the event's order and idempotency key together
(``docs/lifecycle.md``): two orders may share a key, and each is applied once. Every
lookup, skip and side-effect row here uses the pair.

Every effect is also an audit fact (adapter, order, key, external ids, attempts),
on its order's chain. A fact is re-sent whenever the side-effect ledger says the
effect was already done, with the same fact id: a crash after the effect but before
the fact was acknowledged loses nothing, and the audit chainer records each fact
once (fact ids are unique within their order's chain, which is where the chainer
looks for them).

A refusal of a validated event (the ledger's or the ERP's) means that system's own
data disagrees with the stream (QA refuses first whatever an adapter would): it is
counted in ``revline_sink_refusals_validated_total{adapter}`` and alerted on.

Liveness: every blocking Kafka call (poll, consume, flush, commit) runs under a
watchdog deadline, its own timeout plus ``CALL_GRACE_S``; past it the process logs
one CRITICAL line and exits 75 for its supervisor. Each loop iteration and each
adapter call reports progress
(``revline_component_last_progress_timestamp_seconds{component}``). With static
group membership (``revline sink`` passes ``group.instance.id``), a process that
another one with the same instance id fenced stops with a message saying so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from revline.core.auditlog import AuditFact, AuditLog
from revline.core.errors import InfrastructureError
from revline.core.kafka_config import client_config
from revline.core.metrics import SinkMetrics
from revline.core.watchdog import Watchdog
from revline.processors import exception_id_for
from revline.schemas import EventDeserializer, exception_codec
from revline.sinks._breaker import CircuitBreaker
from revline.sinks._protocols import (
    EffectResult,
    ErpAdapter,
    Event,
    PartialWriteError,
    PermanentSinkError,
    TransientSinkError,
)
from revline.sinks.ledger import EffectId, EffectRow, RefusedEventError, SideEffect, SqlLedger

log = logging.getLogger("revline.sinks")

# Side-effect statuses after which an event is never sent to the adapter again:
# "refused" already raised an exception that a person owns; re-sending on a replay
# would only duplicate it.
_DONE = frozenset({"applied", "already_applied", "not_applicable", "refused"})
# A Kafka call may take its own timeout plus this before the watchdog ends the process.
CALL_GRACE_S = 30.0
# A synchronous offset commit has no timeout of its own; librdkafka retries it.
_SYNC_COMMIT_S = 60.0


@dataclass
class SinkStats:
    batches: int = 0
    events: int = 0
    commits: int = 0
    applied: dict[str, int] = field(default_factory=dict)  # adapter -> effects written now
    skipped: dict[str, int] = field(default_factory=dict)  # adapter -> already in the ledger
    exceptions: int = 0
    partials: int = 0
    transient_failures: int = 0
    pauses: int = 0
    commit_failures: int = 0  # asynchronous commits the broker refused (harmless)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset
    latencies_ms: list[float] = field(default_factory=list)  # only when asked to keep them
    # Input published -> consumed here, same records: the share before the sink.
    arrival_ms: list[float] = field(default_factory=list)  # only when asked to keep them
    # Seconds spent waiting on Kafka per batch step (the audit-fact flush, the commit).
    kafka_wait_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Item:
    msg: Message
    event: Event | None  # None: undecodable
    error: str = ""

    @property
    def key(self) -> str:
        if self.event is None:
            return f"undecodable:{self.msg.topic()}/{self.msg.partition()}/{self.msg.offset()}"
        return str(self.event["envelope"]["idempotency_key"])

    @property
    def order_id(self) -> str:
        """The event's order ("" for an undecodable record: its key is unique by itself)."""
        if self.event is None:
            return ""
        return str(self.event["envelope"]["order_id"])

    @property
    def effect(self) -> EffectId:
        """The effect's identity: (order_id, idempotency_key)."""
        return (self.order_id, self.key)


class _ConsumerFailed(InfrastructureError):
    """librdkafka marked the consumer failed (fatal); it cannot be used again."""

    def __init__(self, message: str, error: KafkaError | None = None) -> None:
        super().__init__(message)
        self.error = error if error is not None else KafkaError(KafkaError._FATAL, message)


class _Suspend(Exception):
    """An adapter's breaker is open: stop the batch, keep it, commit nothing."""

    def __init__(self, adapter: str, cause: BaseException | None) -> None:
        super().__init__(f"{adapter} circuit open: {cause}")
        self.adapter = adapter


class SinkProcessor:
    """Consumes the validated topic and applies each event to the ledger and the ERP."""

    def __init__(
        self,
        bootstrap: str,
        validated_topic: str,
        group_id: str,
        ledger: SqlLedger,
        erp: ErpAdapter,
        exceptions_topic: str,
        metrics: SinkMetrics | None = None,
        batch_size: int = 500,
        *,
        audit_topic: str | None = None,
        poll_timeout_s: float = 0.5,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 1.0,
        breaker_threshold: int = 5,
        breaker_cooldown_s: float = 2.0,
        sla_minutes: int = 15,
        decoder: EventDeserializer | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        keep_latencies: bool = False,
        crash_after_erp_writes: int | None = None,
        component: str = "sink",
    ) -> None:
        self.validated_topic = validated_topic
        self.component = component
        self.watchdog = Watchdog(component, metrics.registry if metrics is not None else None)
        self.exceptions_topic = exceptions_topic
        self.ledger = ledger
        self.erp = erp
        self.metrics = metrics
        self.keep_latencies = keep_latencies
        # Fault injection for tests: SIGKILL this process right after the Nth ERP write,
        # before the side-effect row and the offset commit (the worst moment to die).
        self._crash_after_erp_writes = crash_after_erp_writes
        self._erp_writes = 0
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.sla_minutes = sla_minutes
        self.decoder = decoder or EventDeserializer()
        self.breakers = {
            name: CircuitBreaker(name, breaker_threshold, breaker_cooldown_s)
            for name in (ledger.name, erp.name)
        }
        self.stats = SinkStats()
        self._codec = exception_codec()
        self._stop = threading.Event()
        self._pending: list[_Item] = []  # a batch held back by an open breaker
        self._effects: list[EffectRow] = []  # this batch's side-effect rows, written together
        self._paused = False
        self._bootstrap, self._group_id = bootstrap, group_id
        self._extra_consumer_config = dict(consumer_config or {})
        self._rebuilt_at = -math.inf
        self.consumer = self._new_consumer()
        self.producer = Producer(client_config("producer", bootstrap, {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # Keyed by order id like every other producer, so records and audit facts
            # of one order share a partition number across topics.
            "partitioner": "murmur2_random",
        }, component=component))
        self.audit = AuditLog(self.producer, audit_topic) if audit_topic else None
        self.consumer.subscribe([validated_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)

    # -- lifecycle ---------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        try:
            with self.watchdog.deadline("flush on close", 10 + CALL_GRACE_S):
                self.producer.flush(10)
            self._commit_now(self.stats.committed)
            with self.watchdog.deadline("consumer close", _SYNC_COMMIT_S + CALL_GRACE_S):
                self.consumer.close()
        finally:
            self.watchdog.stop()

    def run(self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None) -> None:
        """Process until ``stop`` is set (or, for tests, nothing arrived for ``idle_exit_s``)."""
        stop = stop or self._stop
        idle_since = time.monotonic()
        try:
            while not stop.is_set() and not self._stop.is_set():
                try:
                    done = self.step()
                except _ConsumerFailed as exc:
                    self._rebuild_consumer(exc)
                    continue
                self.watchdog.progress()  # a batch done, or none waiting
                if done:
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    return
        finally:
            self.close()

    def step(self) -> bool:
        """One loop iteration; True if a batch was completed."""
        if self._pending:
            return self._retry_pending()
        if self._paused:
            # Paused by an open breaker, but the held batch went (its partitions were
            # revoked or lost, or the consumer was replaced): nothing is left to retry, so
            # resume, or the sink would stay paused for good with its heartbeat advancing.
            log.info("no held batch left; resuming consumption")
            self._paused = False
            self.consumer.resume(self.consumer.assignment())
            self._observe_breakers()
        msgs = self._fetch()
        items = [self._decode(m) for m in msgs if not self._is_error(m)]
        if not items:
            return False
        if self.keep_latencies:
            now_ms = time.time() * 1000
            self.stats.arrival_ms.extend(
                now_ms - ts for ts in (i.msg.timestamp()[1] for i in items) if ts > 0)
        self._pending = items
        return self._retry_pending()

    def _fetch(self) -> list[Message]:
        """What has arrived, up to a batch; if nothing has, wait for the first record.

        Natural batching: ``consume(n, timeout)`` would wait out the whole timeout
        unless n records arrive, adding it to every record's latency at moderate rates.
        Taking what librdkafka has prefetched means batches stay small when the sink
        keeps up and grow by themselves while it is busy.
        """
        with self.watchdog.deadline("consume", CALL_GRACE_S):
            msgs = self.consumer.consume(num_messages=self.batch_size, timeout=0)
        if msgs:
            return msgs
        with self.watchdog.deadline("poll", self.poll_timeout_s + CALL_GRACE_S):
            first = self.consumer.poll(self.poll_timeout_s)
        if first is None:
            return []
        if self.batch_size == 1:
            return [first]
        with self.watchdog.deadline("consume", CALL_GRACE_S):
            rest = self.consumer.consume(num_messages=self.batch_size - 1, timeout=0)
        return [first, *rest]

    # -- batch ---------------------------------------------------------------------------
    def _retry_pending(self) -> bool:
        self._observe_breakers()
        wait = max((b.remaining_s() for b in self.breakers.values()), default=0.0)
        if wait > 0:
            # Open breaker: poll anyway, so the group membership (and rebalance
            # callbacks) stay alive; a paused consumer returns nothing, no busy loop.
            self.consumer.pause(self.consumer.assignment())
            with self.watchdog.deadline("poll (paused)", min(wait, 1.0) + CALL_GRACE_S):
                msg = self.consumer.poll(min(wait, 1.0))
            if msg is not None and self._is_error(msg):
                msg = None
            if msg is not None:
                # Not ours to take now (e.g. a partition assigned during the pause):
                # rewind, so the next batch starts with it.
                self.consumer.seek(TopicPartition(msg.topic() or "", msg.partition() or 0,
                                                  msg.offset() or 0))
            return False
        items = self._pending
        started = time.perf_counter()
        try:
            self._process(items)
        except _Suspend as exc:
            self._keep_effects_done()
            if not self._paused:
                self.stats.pauses += 1
                log.warning("pausing consumption: %s", exc)
            self._paused = True
            self.consumer.pause(self.consumer.assignment())
            self._observe_breakers()
            return False
        self._commit(items)
        self._pending = []
        if self._paused:
            log.info("circuit closed, resuming consumption")
            self._paused = False
            self.consumer.resume(self.consumer.assignment())
        self.stats.batches += 1
        self.stats.events += len(items)
        self._observe_batch(items, started)
        return True

    def _observe_breakers(self) -> None:
        if self.metrics is None:
            return
        for name, breaker in self.breakers.items():
            self.metrics.breaker_open.labels(name).set(1 if breaker.remaining_s() > 0 else 0)
        self.metrics.paused.set(1 if self._paused else 0)

    def _observe_batch(self, items: list[_Item], started: float) -> None:
        """Input published -> effects committed, per record (the input's timestamp travels)."""
        now_ms = time.time() * 1000
        latencies = [now_ms - ts for ts in (i.msg.timestamp()[1] for i in items) if ts > 0]
        if self.keep_latencies:
            self.stats.latencies_ms.extend(latencies)
        if self.metrics is None:
            return
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        for latency in latencies:
            self.metrics.end_to_end.observe(latency / 1000)
        for (topic, partition), offset in self.stats.committed.items():
            try:
                high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True)[1]
            except Exception:  # no statistics yet
                continue
            self.metrics.lag.labels(str(partition)).set(max(0, high - offset))
        self._observe_breakers()

    def _process(self, items: list[_Item]) -> None:
        decodable = [i for i in items if i.event is not None]
        for bad in (i for i in items if i.event is None):
            self._refuse(bad, "ledger", "sink.undecodable", bad.error, {})
        done = self._call(self.ledger.name, lambda: self.ledger.effects_of(
            [i.effect for i in decodable], ["ledger", self.erp.name]))[0]
        self._to_ledger(decodable, done["ledger"])
        self._to_erp(decodable, done[self.erp.name])
        # Exception records and audit facts durable before the rows that stop re-sends
        # (a crash in between re-sends the same ids, never loses them); all before the commit.
        flushing = time.perf_counter()
        with self.watchdog.deadline("flush", 30 + CALL_GRACE_S):
            unsent = self.producer.flush(30)
        self._waited("audit flush", flushing)
        lost = self.audit.take_failures() if self.audit is not None else []
        if unsent or lost:
            if lost:  # the batch is redone: the same facts are re-sent under the same ids
                log.warning("audit facts not written (%d): %s", len(lost), lost[0])
            raise _Suspend("kafka", None)
        rows, self._effects = self._effects, []
        if rows:
            self._call(self.ledger.name, partial(self.ledger.record_effects, rows))

    def _keep_effects_done(self) -> None:
        """Before pausing: record what this attempt did, if the database lets us."""
        rows, self._effects = self._effects, []
        if not rows:
            return
        with self.watchdog.deadline("flush", 10 + CALL_GRACE_S):
            if self.producer.flush(10):
                return
        try:
            self.ledger.record_effects(rows)
        except Exception as exc:  # the retry re-discovers them (unique keys, ERP lookups)
            log.info("side effects of a suspended batch not recorded now: %s", exc)

    def _commit(self, items: list[_Item]) -> None:
        if not items:
            return
        nxt: dict[tuple[str, int], int] = {}
        for i in items:
            tp = (i.msg.topic() or "", i.msg.partition() or 0)
            nxt[tp] = max(nxt.get(tp, 0), (i.msg.offset() or 0) + 1)
        offsets = [TopicPartition(t, p, o) for (t, p), o in nxt.items()]
        committing = time.perf_counter()
        try:
            with self.watchdog.deadline("commit", CALL_GRACE_S):
                self.consumer.commit(offsets=offsets, asynchronous=True)
        except Exception as exc:
            # Lost the partitions in a rebalance: the new owner re-reads the batch and
            # the side-effect ledger makes that harmless.
            log.warning("offset commit failed (%s); the batch will be re-read", exc)
            return
        self._waited("offset commit", committing)
        self.stats.commits += 1
        self.stats.committed.update(nxt)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [p for p in partitions if p.error is not None]
        if err is not None or failed:
            # Harmless (the next commit or the next owner covers it), but worth seeing.
            self.stats.commit_failures += 1
            log.warning("offset commit failed (%s); the next one covers it",
                        err or failed[0].error)

    def _commit_now(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Synchronously, best effort: before the partitions go to another member."""
        if not positions:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            with self.watchdog.deadline("commit (synchronous)", _SYNC_COMMIT_S + CALL_GRACE_S):
                self.consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:
            log.info("final offset commit not made (%s); the next owner re-reads", exc)

    def _waited(self, step: str, since: float) -> None:
        waits = self.stats.kafka_wait_s
        waits[step] = waits.get(step, 0.0) + time.perf_counter() - since

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            log.info("%s: partitions %s of %s assigned", self.component,
                     sorted(tp.partition for tp in partitions), self.validated_topic)
        if self._paused:  # new partitions join the pause, or they would be read past
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The new owner redoes a held-back batch; keeping it here would apply it twice
        # concurrently.
        lost = {(p.topic, p.partition) for p in partitions}
        self._pending = [i for i in self._pending
                         if (i.msg.topic(), i.msg.partition()) not in lost]
        self._commit_now({tp: o for tp, o in self.stats.committed.items() if tp in lost})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The session expired (a broker restart longer than the session timeout): the
        # group has moved on, a commit now is refused (and fenced a static member for good
        # once). Drop what was held back; the next owner, or we after rejoining, redo it.
        lost = {(p.topic, p.partition) for p in partitions}
        self._pending = [i for i in self._pending
                         if (i.msg.topic(), i.msg.partition()) not in lost]
        log.warning("%s: partitions %s lost (session expired); rejoining", self.component,
                    sorted(p for _, p in lost))

    # -- ledger --------------------------------------------------------------------------
    def _to_ledger(self, items: list[_Item], done: Mapping[EffectId, SideEffect]) -> None:
        name = self.ledger.name
        remaining = list(items)
        split = False
        while remaining:
            events = [i.event for i in remaining if i.event is not None]
            try:
                results, attempts = self._call(name, partial(self.ledger.post, events))
            except RefusedEventError as exc:
                culprit = next((i for i in remaining if i.key == exc.idempotency_key
                                and exc.order_id in (None, i.order_id)), None)
                if culprit is None:
                    remaining = self._ledger_one_by_one(remaining, exc)
                    continue
                self._refuse(culprit, name, "sink.ledger_refused", str(exc), {})
                remaining.remove(culprit)
                continue
            except PermanentSinkError as exc:
                if split:  # each posted alone, refused together: nothing left to isolate
                    for item in remaining:
                        self._refuse(item, name, "sink.ledger_refused", str(exc), {})
                    return
                split = True
                remaining = self._ledger_one_by_one(remaining, exc)
                continue
            for item, result in zip(remaining, results, strict=True):
                self._record_ledger(item, result, attempts, done)
            return

    def _ledger_one_by_one(self, items: list[_Item], batch_error: Exception) -> list[_Item]:
        """Find the refused event(s) of a batch the ledger refused as a whole."""
        if len(items) == 1:
            self._refuse(items[0], self.ledger.name, "sink.ledger_refused", str(batch_error), {})
            return []
        keep: list[_Item] = []
        for item in items:
            assert item.event is not None
            event = item.event
            try:
                self._call(self.ledger.name, partial(self.ledger.post, [event]))
                keep.append(item)  # posted now; the final batch call returns already_applied
            except PermanentSinkError as exc:
                self._refuse(item, self.ledger.name, "sink.ledger_refused", str(exc), {})
        return keep

    def _record_ledger(
        self, item: _Item, result: EffectResult, attempts: int,
        done: Mapping[EffectId, SideEffect],
    ) -> None:
        if result.status == "not_applicable":
            return  # most events carry no money; a row each would only slow the batch
        earlier = done.get(item.effect)
        if result.status == "already_applied" and earlier is not None \
                and earlier.status in _DONE:
            self._count("ledger", "skipped")
            self._audit_again(item, earlier)
            return
        self._record(item, "ledger", result.external_refs, "applied", attempts, result.detail)
        self._count("ledger", result.status)
        self._audit("ledger", item, result.external_refs, attempts, result.status)

    # -- ERP -----------------------------------------------------------------------------
    def _to_erp(self, items: list[_Item], done: Mapping[EffectId, SideEffect]) -> None:
        name = self.erp.name
        todo = []
        for item in items:
            existing = done.get(item.effect)
            if existing is not None and existing.status in _DONE:
                self._count(name, "skipped")
                self._audit_again(item, existing)
                continue
            todo.append(item)
        many = getattr(self.erp, "apply_many", None)
        if many is None or len(todo) < 2:
            for item in todo:
                self._apply_erp(item)
            return
        # A batch-capable ERP (Tryton) applies the batch with a bounded number of calls
        # per step. An event it could not settle in the batch (a refusal, a partial
        # write) goes through the one-at-a-time path, which owns refusals and partials.
        events = [item.event for item in todo]
        outcomes, attempts = self._call(name, lambda: many(events))
        for item, outcome in zip(todo, outcomes, strict=True):
            if not isinstance(outcome, EffectResult):
                self._apply_erp(item)
                continue
            self._maybe_crash(outcome)
            if outcome.status == "not_applicable":
                continue
            self._record(item, name, outcome.external_refs, outcome.status, attempts,
                         outcome.detail)
            self._count(name, outcome.status)
            self._audit(name, item, outcome.external_refs, attempts, outcome.status)

    def _apply_erp(self, item: _Item) -> None:
        name = self.erp.name
        assert item.event is not None
        event = item.event
        refs: dict[str, str] = {}
        total = 0
        partial_permanent = 0
        while True:
            try:
                result, attempts = self._call(name, lambda: self.erp.apply(event))
                total += attempts
                self._maybe_crash(result)
                break
            except PartialWriteError as exc:
                total += 1
                refs.update(exc.done)
                self.stats.partials += 1
                self._record(item, name, refs, "partial", total, str(exc))
                self._fact(item, name, "partial", refs, total, str(exc),
                           fact_id=f"{item.key}:{name}:partial:{total}")
                log.warning("partial write %s order %s key %s done=%s: %s", name, item.order_id,
                            item.key, refs, exc)
                if isinstance(exc.cause, PermanentSinkError):
                    # One more go: the adapter re-discovers the done steps and may finish.
                    partial_permanent += 1
                    if partial_permanent > 1:
                        self._refuse(item, name, "sink.erp_refused", str(exc.cause), refs,
                                     attempts=total)
                        return
                else:
                    self._note_transient(name, exc)
                    self._backoff(total)
            except PermanentSinkError as exc:
                self._refuse(item, name, "sink.erp_refused", str(exc), refs, attempts=total + 1)
                return
        merged = {**refs, **result.external_refs}
        if result.status == "not_applicable":
            return  # no ERP document for this event type: nothing to remember
        self._record(item, name, merged, result.status, total, result.detail)
        self._count(name, result.status)
        self._audit(name, item, merged, total, result.status)

    # -- retries and breakers ------------------------------------------------------------
    def _call(self, adapter: str, fn: Callable[[], Any]) -> tuple[Any, int]:
        """fn() with retries on TransientSinkError; raises _Suspend when the breaker opens."""
        breaker = self.breakers[adapter]
        attempt = 0
        while True:
            if not breaker.allow():
                raise _Suspend(adapter, None)
            attempt += 1
            try:
                value = fn()
            except TransientSinkError as exc:
                self._note_transient(adapter, exc)
                if not breaker.allow():
                    raise _Suspend(adapter, exc) from exc
                self._backoff(attempt)
                continue
            breaker.record_success()
            self.watchdog.progress()  # a slow ERP batch is still progress
            return value, attempt

    def _note_transient(self, adapter: str, exc: BaseException) -> None:
        self.stats.transient_failures += 1
        self.breakers[adapter].record_failure()
        log.info("transient %s failure: %s", adapter, exc)

    def _backoff(self, attempt: int) -> None:
        # Full jitter: workers retrying together do not hit the target in lock-step.
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        time.sleep(random.uniform(ceiling / 2, ceiling))

    # -- records -------------------------------------------------------------------------
    def _record(self, item: _Item, adapter: str, refs: Mapping[str, str], status: str,
                attempts: int, detail: str) -> None:
        self._effects.append(EffectRow(item.order_id, item.key, adapter, dict(refs), status,
                                       attempts, detail))

    def _refuse(self, item: _Item, adapter: str, check_id: str, reason: str,
                refs: Mapping[str, str], attempts: int = 1) -> None:
        self._produce_exception(item, check_id, reason)
        self._record(item, adapter, refs, "refused", attempts, reason)
        self._fact(item, adapter, "refused", refs, attempts, reason)
        self.stats.exceptions += 1
        self._count(adapter, "refused")
        if item.event is not None and self.metrics is not None:
            # A validated event refused: the system's data disagrees with the stream.
            # The label is one of two fixed values, never anything from the input.
            label = "ledger" if adapter == self.ledger.name else "erp"
            self.metrics.refusals_validated.labels(label).inc()
        log.error("%s refused order %s key %s: %s", adapter, item.order_id, item.key, reason)

    def _produce_exception(self, item: _Item, check_id: str, reason: str) -> None:
        msg = item.msg
        coords = _header(msg, "revline.input") or f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
        parts = coords.rsplit("/", 2)  # "topic/partition/offset" of the original input
        in_topic = parts[0] if len(parts) == 3 else (msg.topic() or "")
        in_part = int(parts[1]) if len(parts) == 3 else (msg.partition() or 0)
        in_off = int(parts[2]) if len(parts) == 3 else (msg.offset() or 0)
        env: Mapping[str, Any] = item.event["envelope"] if item.event is not None else {}
        now = int(time.time() * 1000)
        value = self._codec.encode({
            "exception_id": exception_id_for(f"{coords}|{check_id}"),
            "check_id": check_id,
            "severity": "P1",
            "owner": "integrations",
            "reason": reason,
            "all_findings": [{"check_id": check_id, "reason": reason}],
            "blocking": True,
            "opened_at_ms": now,
            "sla_deadline_ms": now + self.sla_minutes * 60_000,
            "rules_version": _header(msg, "revline.qa.rules_version") or "",
            "event_type": env.get("event_type"),
            "idempotency_key": env.get("idempotency_key"),
            "order_id": env.get("order_id"),
            "source_system": env.get("source_system"),
            "source_record_id": env.get("source_record_id"),
            "input_topic": in_topic,
            "input_partition": in_part,
            "input_offset": in_off,
            "event": msg.value() or b"",
        })
        self.producer.produce(self.exceptions_topic, value=value, key=msg.key())

    def _audit(self, adapter: str, item: _Item, refs: Mapping[str, str], attempts: int,
               status: str) -> None:
        log.info("effect %s adapter=%s order=%s key=%s refs=%s attempts=%d", status, adapter,
                 item.order_id, item.key, dict(refs), attempts)
        self._fact(item, adapter, "applied", refs, attempts, status)

    def _audit_again(self, item: _Item, effect: SideEffect) -> None:
        """Re-send the fact of an effect done before (same id; the chainer keeps one)."""
        kind = "refused" if effect.status == "refused" else "applied"
        self._fact(item, effect.adapter, kind, effect.external_ref, effect.attempts,
                   effect.detail or effect.status, at_ms=int(effect.applied_at.timestamp() * 1000))

    def _fact(self, item: _Item, adapter: str, kind: str, refs: Mapping[str, str],
              attempts: int, detail: str, *, fact_id: str | None = None,
              at_ms: int | None = None) -> None:
        if self.audit is None:
            return
        env: Mapping[str, Any] = item.event["envelope"] if item.event is not None else {}
        self.audit.record(AuditFact(
            # Unique within the order's chain (the chainer's scope for fact ids), and the
            # same as before effects were identified per order: re-sent facts of earlier
            # effects keep their ids.
            fact_id=fact_id or f"{item.key}:{adapter}:{kind}",
            kind=kind,
            actor="sink",
            order_id=env.get("order_id"),
            detail={"adapter": adapter, "order_id": env.get("order_id"),
                    "idempotency_key": item.key,
                    "event_type": env.get("event_type"), "external_refs": dict(refs),
                    "attempts": attempts, "detail": detail,
                    "validated": f"{item.msg.topic()}/{item.msg.partition()}/{item.msg.offset()}"},
            **({"at_ms": at_ms} if at_ms is not None else {}),
        ))

    def _maybe_crash(self, result: EffectResult) -> None:
        if self._crash_after_erp_writes is None or result.status != "applied":
            return
        self._erp_writes += 1
        if self._erp_writes >= self._crash_after_erp_writes:
            log.error("failpoint: SIGKILL after ERP write %d (%s)", self._erp_writes,
                      dict(result.external_refs))
            os.kill(os.getpid(), signal.SIGKILL)

    def _count(self, adapter: str, status: str) -> None:
        bucket = self.stats.skipped if status == "skipped" else self.stats.applied
        if status != "refused":
            bucket[adapter] = bucket.get(adapter, 0) + 1
        if self.metrics is not None:
            self.metrics.effects.labels(adapter, status).inc()

    # -- decoding ------------------------------------------------------------------------
    def _is_error(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return False
        if err.fatal() or err.code() == KafkaError._FATAL:
            # E.g. fenced: another process joined with this one's group.instance.id -- or
            # this one, rejoining after its broker came back from a restart longer than the
            # session timeout (its old member id is fenced by its own new one).
            fenced = "FENCED" in err.str().upper() or err.code() == KafkaError.FENCED_INSTANCE_ID
            raise _ConsumerFailed(
                f"{self.component} consumer: {err.str()}"
                + ("; another process runs with this instance's group.instance.id: give "
                   "each its own --instance or REVLINE_INSTANCE_ID" if fenced else
                   "; restart to resume from the committed offsets"), err)
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", err)
        return True

    def _new_consumer(self) -> Consumer:
        config: dict[str, Any] = client_config("consumer", self._bootstrap, {
            "group.id": self._group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # A batch against a slow ERP (Tryton: a few events/s) may take minutes; past this
            # the group would hand the partitions to another member mid-batch.
            "max.poll.interval.ms": 900_000,
            "on_commit": self._on_commit,
        }, component=self.component)
        config.update(self._extra_consumer_config)
        return Consumer(config)

    def _rebuild_consumer(self, failure: _ConsumerFailed) -> None:
        """A consumer librdkafka gave up on is replaced once; failing again within a minute
        means another process holds this instance's id: stop, saying so."""
        if time.monotonic() - self._rebuilt_at < 60:
            raise InfrastructureError(str(failure)) from failure
        self._rebuilt_at = time.monotonic()
        log.warning("%s consumer failed (%s); replacing it, resuming from the committed "
                    "offsets", self.component, failure.error.str())
        self._pending = []  # redone from the committed offsets; every effect is idempotent
        self._effects = []
        with contextlib.suppress(Exception), self.watchdog.deadline(
                "failed consumer close", _SYNC_COMMIT_S + CALL_GRACE_S):
            self.consumer.close()
        self.consumer = self._new_consumer()
        self.consumer.subscribe([self.validated_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _decode(self, msg: Message) -> _Item:
        try:
            return _Item(msg, self.decoder.decode(msg.value() or b""))
        except Exception as exc:  # the worker validated it, so this is drift: own it
            return _Item(msg, None, f"undecodable on the validated topic: {exc}")


def _header(msg: Message, name: str) -> str | None:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    for key, value in pairs:
        if key == name and value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def new_group_id(prefix: str = "revline-sink") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
