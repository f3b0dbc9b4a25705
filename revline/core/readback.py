"""Read a topic back to its end and check what landed against a workload manifest."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from revline.core.errors import InfrastructureError
from revline.core.kafka_config import client_config, config_refusals


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    timeout: float = 120.0,
    batch: int = 1000,
    missing_ok: bool = False,
    progress: Callable[[int, int], None] | None = None,
    ranges: Mapping[int, tuple[int, int]] | None = None,
) -> Iterator[Message]:
    """Every record of ``topic`` from the beginning to the end offsets seen at the start
    (``ranges``: partition -> [from, to) offsets to read instead).

    A partition also ends at its EOF event: compacted-away records and transaction
    markers take offsets that no record carries, so "the last record's offset" may
    never come. ``missing_ok``: an absent topic reads as empty instead of an error.
    ``progress(done, total)`` after each fetch (total counts offsets, not records).
    """
    # Its librdkafka log goes to revline.readback.kafka: a long-running caller's logging
    # shows it; the command line drops *.kafka records (its one-line error says it).
    with config_refusals():
        consumer = Consumer(client_config("consumer", bootstrap, {
            "group.id": f"revline-readback-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }, component="readback"))
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=30)
        except KafkaException as exc:
            raise InfrastructureError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            if missing_ok:
                return
            raise InfrastructureError(f"topic {topic} does not exist on {bootstrap}")
        end: dict[int, int] = {}
        start: list[TopicPartition] = []
        for p in sorted(metadata.topics[topic].partitions):
            low, high = watermarks(consumer, topic, p) if ranges is None else \
                ranges.get(p, (0, 0))
            if high > low:
                end[p] = high
                start.append(TopicPartition(topic, p, low))
        total = sum(end[tp.partition] - tp.offset for tp in start)
        consumer.assign(start)
        deadline = time.monotonic() + timeout
        done = 0
        while end:
            if time.monotonic() > deadline:
                raise InfrastructureError(f"timed out reading {topic}: partitions {sorted(end)}")
            for msg in consumer.consume(batch, 1.0):
                p = msg.partition() or 0
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        end.pop(p, None)
                        continue
                    raise InfrastructureError(f"reading {topic}: {error}")
                offset = msg.offset() or 0
                if p not in end or offset >= end[p]:
                    continue
                done += 1
                yield msg
                if offset + 1 >= end[p]:
                    del end[p]
            if progress is not None:
                progress(done, total)
    finally:
        consumer.close()


def watermarks(consumer: Consumer, topic: str, partition: int,
                timeout: float = 30.0) -> tuple[int, int]:
    """(low, high) of a partition, waiting out a just-created topic's leader election."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                       timeout=10)
            return int(low), int(high)
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise InfrastructureError(f"cannot read where {topic}/{partition} ends: {exc}"
                                          ) from exc
            time.sleep(0.5)


def read_compacted_json(bootstrap: str, topic: str,
                        timeout: float = 120.0) -> dict[str, dict[str, Any]]:
    """key -> latest JSON object of a compacted topic (tombstones remove; junk is ignored;
    an absent topic is empty)."""
    import orjson

    out: dict[str, dict[str, Any]] = {}
    for msg in read_topic(bootstrap, topic, missing_ok=True, timeout=timeout):
        key = (msg.key() or b"").decode(errors="replace")
        value = msg.value()
        if value is None:
            out.pop(key, None)
            continue
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict):
            out[key] = data
    return out


def header(msg: Message, name: str) -> bytes | None:
    headers = msg.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    for key, value in pairs:
        if key == name:
            return value.encode() if isinstance(value, str) else value
    return None


class CommittedReader:
    """Every committed record of ``topic`` (or some partitions), from the start to its end.

    read_committed, so aborted transactions are never seen; the end is where the
    partition reports EOF, because a transaction's last offset is a commit marker
    that no consumer ever receives. (``committed_only=False`` shows aborted records
    too: for tests and forensics.)
    """

    def __init__(self, bootstrap: str, topic: str, partitions: Iterable[int] | None = None,
                 *, timeout: float = 300.0, committed_only: bool = True) -> None:
        self.topic = topic
        self._timeout = timeout
        with config_refusals():
            self._consumer = Consumer(client_config("consumer", bootstrap, {
                "group.id": f"revline-audit-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed" if committed_only else "read_uncommitted",
            }, component="readback"))
        try:
            metadata = self._consumer.list_topics(topic, timeout=10)
        except KafkaException as exc:
            self._consumer.close()
            raise InfrastructureError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            self._consumer.close()
            raise InfrastructureError(f"topic {topic} does not exist on {bootstrap}")
        wanted = sorted(metadata.topics[topic].partitions if partitions is None else partitions)
        self.total = 0  # approximate (includes markers and aborted records): for progress only
        self._pending: set[int] = set()
        for p in wanted:
            low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                self.total += high - low
                self._pending.add(p)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                               for p in sorted(self._pending)])

    def __enter__(self) -> CommittedReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._consumer.close()

    def __iter__(self) -> Iterator[Message]:
        deadline = time.monotonic() + self._timeout
        while self._pending:
            if time.monotonic() > deadline:
                raise InfrastructureError(
                    f"timed out reading {self.topic}: partitions {sorted(self._pending)} "
                    "never reached their end")
            for msg in self._consumer.consume(1000, 1.0):
                error = msg.error()
                if error is None:
                    yield msg
                elif error.code() == KafkaError._PARTITION_EOF:
                    self._pending.discard(msg.partition() or 0)
                else:
                    raise InfrastructureError(f"reading {self.topic}: {error}")
