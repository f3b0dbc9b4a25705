"""The test Kafka broker itself, and LocalBroker's lifecycle, against real processes."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from revline.tools.broker import LocalBroker

pytestmark = pytest.mark.kafka


def test_idempotent_producer_roundtrip_preserves_partition_order(
    new_topic: Callable[..., str], kafka_config: dict[str, Any]
) -> None:
    topic = new_topic("roundtrip", partitions=3)
    sent = [(f"key-{i % 10}".encode(), f"value-{i:03d}".encode()) for i in range(100)]

    producer = Producer({**kafka_config, "enable.idempotence": True, "acks": "all"})
    delivered: list[tuple[int, int, bytes, bytes]] = []
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            delivered.append((msg.partition(), msg.offset(), msg.key(), msg.value()))

    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []
    assert len(delivered) == 100

    # Each key lives in one partition, and a partition holds its messages in send
    # order at offsets 0..n-1: what idempotence promises (no dupes, no reordering).
    partition_of = {key: p for p, _, key, _ in delivered}
    assert len({(key, p) for p, _, key, _ in delivered}) == len(partition_of) == 10
    expected: dict[int, list[tuple[int, bytes, bytes]]] = defaultdict(list)
    for key, value in sent:
        p = partition_of[key]
        expected[p].append((len(expected[p]), key, value))
    assert {p: sorted(rows) for p, rows in _by_partition(delivered).items()} == expected

    consumer = Consumer(
        {
            **kafka_config,
            "group.id": f"roundtrip-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        received: list[tuple[int, int, bytes, bytes]] = []
        deadline = time.monotonic() + 60
        while len(received) < 100 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received.append((msg.partition(), msg.offset(), msg.key(), msg.value()))
        # Nothing beyond the 100: a duplicate would show up here.
        extra = consumer.poll(1.0)
        assert extra is None or extra.error() is not None, extra.value()

        assert _by_partition(received) == expected
        consumer.commit(asynchronous=False)
        committed = consumer.committed([TopicPartition(topic, p) for p in expected], timeout=10)
        assert {tp.partition: tp.offset for tp in committed} == {
            p: len(rows) for p, rows in expected.items()
        }
    finally:
        consumer.close()


def _by_partition(
    rows: list[tuple[int, int, bytes, bytes]],
) -> dict[int, list[tuple[int, bytes, bytes]]]:
    out: dict[int, list[tuple[int, bytes, bytes]]] = defaultdict(list)
    for partition, offset, key, value in rows:
        out[partition].append((offset, key, value))
    return dict(out)


def test_topic_factory_returns_distinct_ready_topics(
    new_topic: Callable[..., str], kafka_bootstrap: str
) -> None:
    first = new_topic("dup")
    second = new_topic("dup", partitions=1, config={"cleanup.policy": "compact"})
    assert first != second
    assert first.startswith("dup-") and second.startswith("dup-")

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    topics = admin.list_topics(timeout=10).topics
    assert len(topics[first].partitions) == 3
    assert len(topics[second].partitions) == 1
    resource = ConfigResource(ConfigResource.Type.TOPIC, second)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    assert configs["cleanup.policy"].value == "compact"


def test_status_of_session_and_unstarted_brokers(
    kafka_session: Any, kafka_bootstrap: str, tmp_path: Path
) -> None:
    if kafka_session.local is not None:
        # The broker this session started answers, and is ours.
        assert kafka_session.local.status() == kafka_bootstrap
        assert kafka_session.local.bootstrap == kafka_bootstrap
        assert kafka_session.local.pid_file.exists()

    never_started = LocalBroker(tmp_path / "never")
    assert never_started.status() is None
    assert never_started.bootstrap is None
    assert never_started.stop() is False


def test_status_cleans_stale_pid_even_if_port_answers(kafka_bootstrap: str, tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "stale")
    broker.home.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    broker.pid_file.write_text(f"{dead.pid}\n")
    # A live address must not make a dead pid look alive.
    broker.bootstrap_file.write_text(kafka_bootstrap.split(",")[0] + "\n")
    assert broker.status() is None
    assert not broker.pid_file.exists()
    assert not broker.bootstrap_file.exists()


def test_pid_reused_by_another_process_is_never_signalled(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    broker = LocalBroker(tmp_path / "reused")
    broker.home.mkdir()
    # Our own pid stands in for an unrelated process that got the old broker pid.
    broker.pid_file.write_text(f"{os.getpid()}\n")
    broker.bootstrap_file.write_text(kafka_bootstrap.split(",")[0] + "\n")
    assert broker.status() is None
    assert not broker.pid_file.exists()
    broker.pid_file.write_text(f"{os.getpid()}\n")
    assert broker.stop(timeout=1) is False  # and we are still alive to assert it


def test_local_broker_start_is_idempotent_and_stop_ends_the_process(
    broker_jars_dir: Path, tmp_path: Path
) -> None:
    broker = LocalBroker(tmp_path / "lifecycle", jars_dir=broker_jars_dir)
    try:
        addr = broker.start(timeout=120)
        assert addr.startswith("127.0.0.1:")
        assert broker.status() == addr == broker.bootstrap
        pid = int(broker.pid_file.read_text())
        assert broker.start() == addr  # already running: same broker, no second JVM
        assert int(broker.pid_file.read_text()) == pid
        assert "Kafka Server started" in broker.log_file.read_text()

        assert broker.stop() is True
        assert broker.status() is None
        assert not broker.pid_file.exists()
        with pytest.raises(ProcessLookupError):  # gone, and reaped (no zombie)
            os.kill(pid, 0)
        assert broker.stop() is False
    finally:
        broker.stop(timeout=10)


def test_restart_keeps_topics_records_offsets_and_address_and_clients_carry_on(
    broker_jars_dir: Path, tmp_path: Path
) -> None:
    broker = LocalBroker(tmp_path / "keeps", jars_dir=broker_jars_dir)
    try:
        addr = broker.start(timeout=120)
        admin = AdminClient({"bootstrap.servers": addr})
        admin.create_topics([NewTopic("kept", 1, 1)])[
            "kept"].result(timeout=30)
        producer = Producer({"bootstrap.servers": addr, "enable.idempotence": True,
                             "acks": "all", "log_level": 0})
        for n in range(10):
            producer.produce("kept", value=f"before-{n}".encode())
        assert producer.flush(30) == 0
        group = {"bootstrap.servers": addr, "group.id": "keeps", "enable.auto.commit": False,
                 "auto.offset.reset": "earliest", "log_level": 0}
        consumer = Consumer(group)
        consumer.subscribe(["kept"])
        got = _consume_n(consumer, 5)
        consumer.commit(got[-1], asynchronous=False)

        # A restart with the clients still running: same address, same data.
        started = time.monotonic()
        assert broker.stop() is True
        assert broker.start(timeout=120) == addr
        restart_s = time.monotonic() - started
        for n in range(5):
            producer.produce("kept", value=f"after-{n}".encode())
        assert producer.flush(60) == 0  # the running producer reconnected by itself
        rest = _consume_n(consumer, 10)  # and so did the running consumer
        assert [m.value() for m in got + rest] == [f"before-{n}".encode() for n in range(10)] + [
            f"after-{n}".encode() for n in range(5)]
        consumer.close()

        # The group's committed offset survived: a new member resumes after it.
        second = Consumer(group)
        committed = second.committed([TopicPartition("kept", 0)], timeout=30)
        assert committed[0].offset == 5
        second.close()
        assert restart_s < 90

        # --fresh (and reset) delete everything.
        broker.stop()
        broker.start(timeout=120, fresh=True)
        assert "kept" not in AdminClient(
            {"bootstrap.servers": broker.bootstrap or ""}).list_topics(timeout=30).topics
        assert broker.reset() is True
        assert broker.status() is None and not broker.data_dir.exists()
    finally:
        broker.stop(timeout=10)


def _consume_n(consumer: Consumer, n: int, timeout: float = 90) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is None:
            out.append(msg)
    assert len(out) == n, f"got {len(out)} of {n}"
    return out


def test_broker_reset_without_a_terminal_needs_yes(tmp_path: Path) -> None:
    env = {**os.environ, "REVLINE_STATE_DIR": str(tmp_path)}
    res = subprocess.run([".venv/bin/revline", "broker", "reset"], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, env=env, check=False)
    assert res.returncode == 2
    assert "--yes" in res.stderr and "Traceback" not in res.stderr
