"""The audit chainer (``revline auditor``): outcomes and audit facts → the hash-chained trail.

Reads the worker's outcome records and the audit facts of other components
(sink, exception manager, operators) and appends one audit record per entry to
the chain of its order on the audit topic, each carrying the hash of the
previous one (``revline.processors.audit_chain``).

Exactly once, no gap, under kill -9 and restarts:

* the two source topics are co-partitioned (same key, the Java murmur2
  partitioner, same partition count) and the group uses the range assignor, so
  partition p of both goes to one member, and that member alone writes the
  chains fed by partition p;
* audit records and chain heads are written to partition p of the audit and
  heads topics, in one Kafka transaction with the consumed offsets; a crash
  aborts all of it, and everything committed is mutually consistent;
* on assignment the heads of the new partitions are paged in from the read model
  (``audit_heads`` in the ledger's database, through a bounded LRU cache) when the
  offsets it recorded equal the group's stable committed offsets; otherwise (first
  start, a crash between the table write and the Kafka commit, an aborted
  transaction) that partition's heads are reloaded from the compacted heads topic
  (read_committed) into the table first;
* the batch's audit records, chain heads, outcome counts and source offsets are
  written to the read model after the records are acknowledged and before the Kafka
  transaction commits, so the tables are never behind what Kafka committed; rows of a
  batch that is then aborted are overwritten when it is redone (upserts by chain and
  seq, outcomes counted once per input);
* source records come again after crashes and replays (the worker re-emits
  outcomes after kill -9, the sink re-sends facts); an entry whose fact id is
  among its chain's recent ids is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import Counter as CountOf
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from revline.core.auditlog import AuditFact
from revline.core.errors import ConfigurationError, InfrastructureError
from revline.core.kafka_config import client_config, consumer_config, producer_config
from revline.core.readback import CommittedReader
from revline.core.settings import Settings
from revline.core.startup import NotReadyError, is_transient, retry_startup
from revline.core.watchdog import Watchdog
from revline.processors.audit_chain import (
    ChainHead,
    Entry,
    canonical,
    chain_for,
    entries_from_outcome,
    entry_from_fact,
    unreadable_entry,
)
from revline.schemas import outcome_codec
from revline.sinks.ledger._errors import is_transient as database_away
from revline.sinks.read_model import (
    AUDITOR,
    HeadCache,
    ReadModel,
    head_row,
    record_row,
    reload_heads,
)

T = TypeVar("T")

log = logging.getLogger("revline.auditor")

# The group's offsets may wait for a dead member's transaction to be aborted
# (transaction.timeout.ms); reading heads before that could miss its commit.
STABLE_OFFSETS_TIMEOUT_S = 120.0
TRANSACTION_TIMEOUT_MS = 60_000
# A Kafka call may take its own timeout plus this before the watchdog ends the process:
# librdkafka does not always honour the timeout of transactional calls (a broker restart
# left send_offsets_to_transaction blocked for good, with nothing logged).
CALL_GRACE_S = 30.0
# The transactional calls get short timeouts and grace of their own: after a broker
# restart librdkafka's send_offsets_to_transaction may never return (fault test: the
# auditor resumed only when the watchdog ended it, 95 s after the restart). 15 s is
# ample for a healthy commit; a wedged one ends the process within 25 s.
TXN_TIMEOUT_S = 15.0
TXN_GRACE_S = 10.0
LAG_EVERY_S = 10.0
_ASSIGN_BUDGET_S = 2 * (60.0 + STABLE_OFFSETS_TIMEOUT_S)
# Retried reads after an aborted transaction (committed offsets, chain heads), in all.
_RECOVER_BUDGET_S = 2 * STABLE_OFFSETS_TIMEOUT_S
# The read model's lost-connection wait inside a Kafka transaction (its write and its
# commit may each wait this long: 2 x 15 s, well inside transaction.timeout.ms).
_READ_MODEL_IN_TXN_S = 15.0
# A producer librdkafka declared dead is replaced in place at most this often.
_REPLACE_AT_MOST_EVERY_S = 60.0


def _fenced(error: KafkaError) -> bool:
    """Fenced: another producer took this transactional.id (a standby or a twin). Never
    replaced in place: the newer one owns the chains now, and this one ends."""
    return error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                            KafkaError.INVALID_PRODUCER_EPOCH) or "fenced" in error.str().lower()


def _kafka_error(exc: KafkaException | SystemError) -> KafkaException:
    """The Kafka error behind ``exc``. confluent-kafka may run a delivery callback while a
    failed call's KafkaException is still pending (a fenced twin, CI): Python then raises
    SystemError "... returned a result with an exception set" with the Kafka error as its
    cause, which is what happened. Any other SystemError is raised again."""
    if isinstance(exc, KafkaException):
        return exc
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, KafkaException):
        return cause
    raise exc


HEAD_CACHE_SIZE = 20_000  # chain heads kept in memory; the rest are paged from the read model


def _retrying(fn: Callable[[], T], what: str, timeout_s: float = 60.0) -> T:
    """fn(), retried while Kafka answers with a retriable error (e.g. a partition whose
    leader is still being elected just after the topic was created)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except KafkaException as exc:
            # is_transient, not retriable(): librdkafka leaves e.g. NOT_LEADER_FOR_PARTITION
            # from a watermark read unmarked, and a leader moving is the commonest "not yet".
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            log.warning("%s: %s; retrying", what, exc.args[0] if exc.args else exc)
            time.sleep(1.0)


class AuditMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.chained = Counter(
            "revline_audit_records_total",
            "Audit records chained, by kind (unreadable_source: a source record that could not "
            "be decoded)", ["kind"], registry=self.registry)
        self.skipped = Counter(
            "revline_audit_redelivered_total",
            "Source entries already in their chain (redelivered or re-sent), not chained again",
            registry=self.registry)
        self.lag = Gauge(
            "revline_audit_lag_records",
            "Outcomes and facts on the source topics not yet chained (end offset less the "
            "auditor's position, over its partitions)", registry=self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        try:
            server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise InfrastructureError(
                f"cannot serve auditor metrics on port {port}: {exc} (use --metrics-port)"
            ) from exc
        bound: int = server.server_port
        return bound


# -- reading committed records ---------------------------------------------------------


def load_heads(bootstrap: str, topic: str,
               partitions: Iterable[int] | None = None) -> dict[int, dict[str, ChainHead]]:
    """The committed chain heads of ``partitions`` (all when None); the last per chain wins."""
    wanted = None if partitions is None else sorted(set(partitions))
    heads: dict[int, dict[str, ChainHead]] = {p: {} for p in wanted or ()}
    with CommittedReader(bootstrap, topic, wanted) as reader:
        for msg in reader:
            if msg.value() is None:
                continue
            try:
                head = ChainHead.decode(msg.value() or b"")
            except Exception as exc:  # a forked chain would be worse than stopping
                raise InfrastructureError(
                    f"{topic}/{msg.partition()}/{msg.offset()} is not a chain head ({exc}); "
                    "the heads topic was written by something other than the auditor") from exc
            heads.setdefault(msg.partition() or 0, {})[head.chain] = head
    return heads


def head_summaries(bootstrap: str, topic: str) -> dict[str, tuple[int, str]]:
    """chain -> (seq, hash) of every committed head, for ``revline audit verify``."""
    return {chain: (head.seq, head.hash)
            for by_chain in load_heads(bootstrap, topic).values()
            for chain, head in by_chain.items()}


# -- topics ------------------------------------------------------------------------------
def ensure_audit_topics(bootstrap: str, settings: Settings) -> None:
    """Create what is missing and insist the four topics are co-partitioned."""
    from revline.core.admin import ensure_operations_topics, ensure_topics

    ensure_topics(bootstrap, {settings.outcomes_topic: settings.input_partitions})
    ensure_operations_topics(bootstrap, settings)
    admin = AdminClient(client_config("admin", bootstrap, {"log_level": 3}, settings=settings,
                                      component="auditor"))
    names = [settings.outcomes_topic, settings.audit_facts_topic, settings.audit_topic,
             settings.audit_heads_topic]

    def partition_counts() -> dict[str, int]:
        # A topic created a moment ago may not be known yet to the broker this client
        # asks on a multi-broker cluster (a KeyError here once on a fresh one).
        metadata = admin.list_topics(timeout=30).topics
        unseen = [n for n in names if n not in metadata or not metadata[n].partitions]
        if unseen:
            raise NotReadyError(f"topics {unseen} not in the metadata yet")
        return {name: len(metadata[name].partitions) for name in names}

    counts = retry_startup(partition_counts, "the audit topics' metadata",
                           timeout_s=settings.startup_timeout_s, component="auditor")
    if len(set(counts.values())) != 1:
        raise ConfigurationError(
            "the audit chainer needs co-partitioned topics (one order = one partition number); "
            f"partition counts differ: {counts}")
    _warn_if_audit_expires(admin, settings.audit_topic)


def _warn_if_audit_expires(admin: AdminClient, topic: str) -> None:
    try:
        resource = ConfigResource("topic", topic)
        configs = admin.describe_configs([resource])[resource].result(timeout=30)
        retention = configs["retention.ms"].value
    except Exception as exc:  # only a warning: never stop the chainer for it
        log.warning("could not read the retention of %s: %s", topic, exc)
        return
    if retention not in (None, "-1"):
        log.warning("audit topic %s has retention.ms=%s: old audit records will be deleted and "
                    "`revline audit verify` will report the chains as starting late; set "
                    "retention.ms=-1", topic, retention)


# -- the chainer -------------------------------------------------------------------------
class Chainer:
    """One chainer instance; several instances (distinct ``instance``) share the partitions."""

    def __init__(self, settings: Settings, bootstrap: str, *, instance: str = "0",
                 batch_size: int = 500, metrics: AuditMetrics | None = None,
                 kill_before_commit: int | None = None, read_model: ReadModel | None = None,
                 head_cache_size: int = HEAD_CACHE_SIZE) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.batch_size = batch_size
        self.metrics = metrics or AuditMetrics()
        self.watchdog = Watchdog("auditor", self.metrics.registry)
        self._lag_at = 0.0
        self._kill_before_commit = kill_before_commit  # tests: SIGKILL inside batch N's txn
        self._batches = 0
        self.group_id = f"{settings.app_id}-auditor"
        self.transactional_id = f"{settings.app_id}-auditor-{instance}"
        self.sources = (settings.outcomes_topic, settings.audit_facts_topic)
        self.read_model = read_model or ReadModel.for_settings(settings)
        self.heads = HeadCache(self.read_model, head_cache_size)
        self._outcome = outcome_codec()
        consumer_conf = consumer_config(settings, bootstrap, self.group_id, component="auditor")
        consumer_conf.update({
            "partition.assignment.strategy": "range",  # partition p of both sources together
            "session.timeout.ms": int(settings.session_timeout_s * 1000),
        })
        self.consumer = Consumer(consumer_conf)
        producer_conf = producer_config(settings, bootstrap, component="auditor")
        producer_conf.update({
            # Stable per instance: a restart fences its predecessor and aborts its open
            # transaction at once instead of after the transaction timeout.
            "transactional.id": self.transactional_id,
            "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
        })
        self._producer_conf = producer_conf
        self._producer_replaced_at = -math.inf
        self.producer = Producer(producer_conf)

    # -- lifecycle ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            with self.watchdog.deadline("init_transactions", 60 + CALL_GRACE_S):
                self.producer.init_transactions(60)
        except KafkaException as exc:
            raise InfrastructureError(
                f"cannot initialise transactions as {self.transactional_id}: {exc}") from exc
        self.consumer.subscribe(list(self.sources), on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        log.info("auditor %s: chaining %s and %s into %s", self.transactional_id,
                 *self.sources, self.settings.audit_topic)
        try:
            while not stop.is_set():
                # consume() runs the assignment callback, which may wait out two retried
                # reads (stable offsets, chain heads) before it returns.
                with self.watchdog.deadline("consume", 0.5 + CALL_GRACE_S + _ASSIGN_BUDGET_S):
                    messages = self.consumer.consume(self.batch_size, 0.5)
                if messages:
                    self._chain_batch(messages)
                self.watchdog.progress()
                if time.monotonic() - self._lag_at > LAG_EVERY_S:
                    self._lag_at = time.monotonic()
                    self._observe_lag()
        finally:
            self.watchdog.stop()
            self.consumer.close()
            self.producer.flush(10)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        by_topic: dict[str, set[int]] = {topic: set() for topic in self.sources}
        for tp in partitions:
            by_topic[tp.topic].add(tp.partition)
        if by_topic[self.sources[0]] != by_topic[self.sources[1]]:
            raise ConfigurationError(
                f"auditor got different partitions of {self.sources[0]} and {self.sources[1]} "
                f"({by_topic}); they must be co-partitioned and assigned with the range assignor")
        if not partitions:
            return
        # Waits until a previous owner's pending transaction is resolved (KIP-447).
        committed = _retrying(
            lambda: consumer.committed(partitions, timeout=STABLE_OFFSETS_TIMEOUT_S),
            "waiting for stable offsets")
        wanted = by_topic[self.sources[0]]
        self._sync_heads(wanted, committed)

    def _sync_heads(self, wanted: set[int], committed: list[TopicPartition]) -> None:
        """Trust the table's heads of ``wanted`` where it recorded the committed offsets;
        reload the others from the heads topic."""
        at = {(tp.topic, tp.partition): max(0, tp.offset) for tp in committed}
        recorded = self.read_model.offsets(AUDITOR)
        stale = sorted(p for p in wanted
                       if any(at.get((t, p), 0) != recorded.get((t, p), 0)
                              for t in self.sources))
        self.heads.forget(wanted)
        if stale:
            loaded = _retrying(
                lambda: reload_heads(self.read_model, self.bootstrap,
                                     self.settings.audit_heads_topic, stale,
                                     {k: v for k, v in at.items() if k[1] in stale}),
                "loading chain heads")
            log.warning("auditor %s: the read model did not match Kafka for partitions %s "
                        "(first start with it, a crash mid-commit or an abort): %d chain heads "
                        "reloaded from %s", self.transactional_id, stale, loaded,
                        self.settings.audit_heads_topic)
        log.info("auditor %s: partitions %s assigned (heads paged from the read model)",
                 self.transactional_id, sorted(wanted))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.heads.forget({tp.partition for tp in partitions})

    # -- one batch = one transaction ---------------------------------------------------
    def _chain_batch(self, messages: list[Message]) -> None:
        next_offsets: dict[tuple[str, int], int] = {}
        records: list[tuple[int, str, bytes]] = []
        touched: dict[tuple[int, str], ChainHead] = {}
        kinds: CountOf[str] = CountOf()
        outcomes: list[dict[str, Any]] = []
        skipped = 0
        good = [m for m in messages if m.error() is None]
        self.heads.prefetch({chain_for(m.key(), m.partition() or 0) for m in good})
        batch_heads: dict[str, ChainHead] = {}  # the batch's own, whatever the cache drops
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.fatal() or error.code() == KafkaError._FATAL:
                    raise InfrastructureError(f"auditor consumer: {error}")
                log.warning("auditor consumer: %s", error)
                continue
            topic, partition = msg.topic() or "", msg.partition() or 0
            chain = chain_for(msg.key(), partition)
            head = batch_heads.get(chain)
            if head is None:
                head = batch_heads[chain] = self.heads.get(partition, chain)
            entries, outcome = self._decoded(msg)
            if outcome is not None:
                outcomes.append(outcome)
            for entry in entries:
                if head.has(entry.fact_id):
                    skipped += 1
                    continue
                record = head.append(entry)
                records.append((partition, chain, canonical(record)))
                touched[partition, chain] = head
                kinds[entry.kind] += 1
            next_offsets[topic, partition] = (msg.offset() or 0) + 1
        if not next_offsets:
            return
        try:
            self._commit(records, touched, next_offsets, outcomes)
        except (KafkaException, SystemError) as exc:
            self._recover(_kafka_error(exc))
            return
        self.heads.trim()
        for kind, count in kinds.items():
            self.metrics.chained.labels(kind).inc(count)
        self.metrics.skipped.inc(skipped)

    def _decoded(self, msg: Message) -> tuple[list[Entry], dict[str, Any] | None]:
        return decoded_source(msg, self.settings.outcomes_topic, self._outcome)

    def _commit(self, records: list[tuple[int, str, bytes]],
                touched: dict[tuple[int, str], ChainHead],
                next_offsets: dict[tuple[str, int], int],
                outcomes: list[dict[str, Any]] | None = None) -> None:
        self.producer.begin_transaction()
        where: list[str | None] = [None] * len(records)
        failed: list[KafkaError] = []

        def delivered(i: int) -> Callable[[KafkaError | None, Message], None]:
            def report(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    failed.append(err)
                else:
                    where[i] = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
            return report

        for i, (partition, chain, value) in enumerate(records):
            self._produce(self.settings.audit_topic, partition, chain, value, delivered(i))
        for (partition, chain), head in touched.items():
            self._produce(self.settings.audit_heads_topic, partition, chain, head.encode())
        offsets = [TopicPartition(topic, partition, offset)
                   for (topic, partition), offset in next_offsets.items()]
        with self.watchdog.deadline("send_offsets_to_transaction", TXN_TIMEOUT_S + TXN_GRACE_S):
            self.producer.send_offsets_to_transaction(
                offsets, self.consumer.consumer_group_metadata(), TXN_TIMEOUT_S)
        # The records' places are known once acknowledged; the read model gets the batch
        # before the commit, so it is never behind what Kafka committed.
        with self.watchdog.deadline("flush", 60 + CALL_GRACE_S):
            remaining = self.producer.flush(60)
        if remaining or failed or any(w is None for w in where):
            raise KafkaException(failed[0] if failed else KafkaError(
                KafkaError._TIMED_OUT, "audit records not acknowledged before the commit",
                txn_requires_abort=True))
        self._write_read_model(records, where, touched, next_offsets, outcomes or [])
        self._batches += 1
        if self._batches == self._kill_before_commit:
            self.producer.flush(30)  # the records reach the log, uncommitted
            log.error("failpoint: SIGKILL before committing batch %d", self._batches)
            os.kill(os.getpid(), signal.SIGKILL)
        for attempt in range(3):
            try:
                with self.watchdog.deadline("commit_transaction",
                                            TXN_TIMEOUT_S + TXN_GRACE_S):
                    self.producer.commit_transaction(TXN_TIMEOUT_S)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                # A retriable commit (e.g. a timeout) may have succeeded: retry, never abort.
                if attempt == 2 or not error.retriable() or error.txn_requires_abort():
                    raise
                log.warning("auditor: commit failed (%s); retrying", error)

    def _write_read_model(self, records: list[tuple[int, str, bytes]], where: list[str | None],
                          touched: dict[tuple[int, str], ChainHead],
                          next_offsets: dict[tuple[str, int], int],
                          outcomes: list[dict[str, Any]]) -> None:
        rows = [record_row(partition, orjson.loads(value), value, str(at))
                for (partition, _, value), at in zip(records, where, strict=True)]
        heads = [head_row(partition, head) for (partition, _), head in touched.items()]
        # The write runs inside the open Kafka transaction (transaction.timeout.ms): the
        # database's lost-connection wait is cut to fit in it, and a database still away
        # then aborts the transaction (_recover: its rewind waits for the database outside
        # any transaction, for the model's whole outage budget) instead of outliving it.
        outage_s = self.read_model.outage_s
        self.read_model.outage_s = min(outage_s, _READ_MODEL_IN_TXN_S)
        try:
            with self.watchdog.deadline("read model write", 120 + CALL_GRACE_S), \
                    self.read_model.write() as conn:
                self.read_model.write_audit_batch(conn, rows, heads, next_offsets, outcomes)
        except Exception as exc:  # nothing is committed to Kafka: the batch comes again
            if outage_s > 0 and database_away(exc):
                raise KafkaException(KafkaError(
                    KafkaError._TRANSPORT, f"the read model's database is away "
                    f"({type(exc).__name__}: {exc})", txn_requires_abort=True)) from exc
            raise InfrastructureError(
                f"auditor cannot write the read model ({type(exc).__name__}: {exc}); nothing "
                "was committed, restart to resume once the ledger database is back") from exc
        finally:
            self.read_model.outage_s = outage_s

    def _produce(self, topic: str, partition: int, chain: str, value: bytes,
                 on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
                 ) -> None:
        while True:
            try:
                if on_delivery is None:
                    self.producer.produce(topic, value=value, key=chain.encode(),
                                          partition=partition)
                else:
                    self.producer.produce(topic, value=value, key=chain.encode(),
                                          partition=partition, on_delivery=on_delivery)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _recover(self, exc: KafkaException) -> None:
        """Abort, then start again from what is committed: offsets and heads."""
        error: KafkaError = exc.args[0]
        # A retriable failure (the broker away for a moment: _TRANSPORT while adding the
        # offsets) is aborted and redone like an abortable one, not a reason to exit; a
        # producer librdkafka declared dead is replaced (below).
        if _fenced(error) or not (error.fatal() or error.txn_requires_abort()
                                  or is_transient(exc)):
            raise InfrastructureError(
                f"auditor transaction failed ({error}); nothing uncommitted was kept, restart "
                f"to resume (if fenced: another auditor runs as {self.transactional_id!r})"
            ) from exc
        log.warning("auditor: transaction aborted (%s); resuming from the committed state", error)
        try:
            if error.fatal():
                self._replace_producer(error)
            else:
                try:
                    with self.watchdog.deadline("abort_transaction", 60 + CALL_GRACE_S):
                        self.producer.abort_transaction(60)
                except KafkaException as failed:
                    # E.g. INVALID_TXN_STATE when the abort follows a coordinator that moved
                    # (CI-size chaos run, after a broker kill): the producer is dead.
                    if not failed.args[0].fatal() or _fenced(failed.args[0]):
                        raise
                    self._replace_producer(failed.args[0])

            def rewind() -> None:
                assignment = self.consumer.assignment()
                committed = self.consumer.committed(assignment,
                                                    timeout=STABLE_OFFSETS_TIMEOUT_S)
                for tp in committed:
                    offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                    self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
                # The read model may hold the aborted batch: its heads come from the topic.
                self.read_model.forget_offsets(AUDITOR, {tp.partition for tp in assignment})
                self._sync_heads({tp.partition for tp in assignment}, committed)

            # A broker killed moves leaders: the reads wait for the new ones (the chaos
            # suite found an exit here on NOT_LEADER_FOR_PARTITION).
            with self.watchdog.deadline("recover", _RECOVER_BUDGET_S + CALL_GRACE_S):
                _retrying(rewind, "auditor: resuming from the committed state",
                          timeout_s=_RECOVER_BUDGET_S)
        except KafkaException as again:
            raise InfrastructureError(f"auditor could not recover from {error}: {again}") from again


    def _replace_producer(self, error: KafkaError) -> None:
        """A new transactional producer with the same transactional.id: initialising it
        aborts the dead one's open transaction, as a restart would. Once a minute at most:
        dead again sooner means another auditor runs with this id (each fences the other)."""
        if time.monotonic() - self._producer_replaced_at < _REPLACE_AT_MOST_EVERY_S:
            raise InfrastructureError(
                f"auditor producer failed ({error}) again within "
                f"{_REPLACE_AT_MOST_EVERY_S:.0f}s of its replacement: another auditor may run "
                f"as {self.transactional_id!r}; stop it, then restart this one")
        self._producer_replaced_at = time.monotonic()
        log.warning("auditor: producer failed (%s); replacing it", error)
        with contextlib.suppress(Exception):
            self.producer.purge()
        self.producer = Producer(self._producer_conf)

        def init() -> None:
            with self.watchdog.deadline("init_transactions", 60 + CALL_GRACE_S):
                self.producer.init_transactions(60)
        _retrying(init, "auditor: initialising the replaced producer's transactions",
                  timeout_s=_RECOVER_BUDGET_S)

    def _observe_lag(self) -> None:
        """End offsets less positions over the assigned source partitions (the audit lag)."""
        try:
            assignment = self.consumer.assignment()
            if not assignment:
                return
            with self.watchdog.deadline("audit lag", 5 + CALL_GRACE_S):
                positions = self.consumer.position(assignment)
                lag = 0
                for tp in positions:
                    _, high = self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)
                    lag += max(0, high - tp.offset) if tp.offset >= 0 else high
        except KafkaException as exc:  # a broker away: the figure waits for it
            log.info("auditor: lag unknown (%s)", exc)
            return
        self.metrics.lag.set(lag)


def source_entries(msg: Message, outcomes_topic: str, codec: Any) -> list[Entry]:
    """The audit entries one source record (an outcome or an audit fact) stands for."""
    return decoded_source(msg, outcomes_topic, codec)[0]


def decoded_source(msg: Message, outcomes_topic: str, codec: Any,
                   ) -> tuple[list[Entry], dict[str, Any] | None]:
    """``source_entries``, and the decoded outcome when the record is one."""
    coords = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
    try:
        if msg.topic() == outcomes_topic:
            outcome: dict[str, Any] = codec.decode(msg.value() or b"")
            return entries_from_outcome(outcome), outcome
        fact = AuditFact.decode(msg.value() or b"")
        return [entry_from_fact(fact_id=fact.fact_id, kind=fact.kind, actor=fact.actor,
                                at_ms=fact.at_ms, detail=fact.detail)], None
    except Exception as exc:  # bad bytes are data: chained as unreadable, never dropped
        _, timestamp_ms = msg.timestamp()
        return [unreadable_entry(coords, timestamp_ms or int(time.time() * 1000),
                                 f"{type(exc).__name__}: {exc}")], None


def expected_fact_ids(bootstrap: str, settings: Settings,
                      only_chain: str | None = None) -> dict[str, set[str]]:
    """chain -> the fact ids the committed outcomes and audit facts call for.

    What a complete trail holds: ``audit verify`` compares it with what is chained.
    """
    codec = outcome_codec()
    out: dict[str, set[str]] = {}
    for topic in (settings.outcomes_topic, settings.audit_facts_topic):
        with CommittedReader(bootstrap, topic) as reader:
            for msg in reader:
                chain = chain_for(msg.key(), msg.partition() or 0)
                if only_chain is not None and chain != only_chain:
                    continue
                ids = out.setdefault(chain, set())
                ids.update(e.fact_id for e in source_entries(msg, settings.outcomes_topic, codec))
    return out


def run_auditor(settings: Settings, bootstrap: str, stop: threading.Event, *,
                instance: str = "0", batch_size: int = 500, metrics_port: int | None = None,
                kill_before_commit: int | None = None) -> None:
    """Create the topics, serve metrics (if a port is given), chain until ``stop`` is set."""
    ensure_audit_topics(bootstrap, settings)
    metrics = AuditMetrics()
    if metrics_port is not None:
        port = metrics.serve(metrics_port, settings.metrics_host)
        log.info("auditor metrics on http://127.0.0.1:%d/metrics", port)
    Chainer(settings, bootstrap, instance=instance, batch_size=batch_size, metrics=metrics,
            kill_before_commit=kill_before_commit).run(stop)
