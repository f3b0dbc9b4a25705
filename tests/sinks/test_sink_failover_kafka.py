"""A `revline sink` killed with SIGKILL mid-stream and restarted resumes within the
session timeout plus a few seconds (static group membership: the restarted process
takes its own partitions back, no rebalance wait for the dead member's session).

A chaos run measured 96 s before this (no session timeout, Kafka's 45 s default).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from revline.operations.publisher import Publisher, publish_records
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadOptions, generate

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SESSION_TIMEOUT_S = 6.0  # the broker's default group.min.session.timeout.ms
SLACK_S = 10.0


def _committed(admin: AdminClient, group: str) -> int:
    """The sum of the group's committed offsets (0 before its first commit)."""
    future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
    try:
        result = future.result(timeout=10)
    except Exception:  # the coordinator busy for a moment: ask again
        return -1
    return sum(max(0, tp.offset) for tp in result.topic_partitions or [])


def _wait_for_progress(admin: AdminClient, group: str, above: int, timeout: float,
                       proc: subprocess.Popen[bytes], log: Path) -> float:
    """Seconds until the group commits past ``above``."""
    started = time.monotonic()
    while True:
        if _committed(admin, group) > above:
            return time.monotonic() - started
        assert proc.poll() is None, f"the sink exited with {proc.returncode}:\n" \
            + log.read_text(errors="replace")[-4000:]
        assert time.monotonic() - started < timeout, (
            f"no offsets committed past {above} within {timeout:.0f} s:\n"
            + log.read_text(errors="replace")[-4000:])
        time.sleep(0.1)


def test_a_killed_sink_resumes_within_the_session_timeout(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp_path, extra_env={
        "REVLINE_ERP": "memory",
        "REVLINE_SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
        "REVLINE_INSTANCE_ID": f"failover-{uuid.uuid4().hex[:6]}",
        "REVLINE_SINK_BATCH_SIZE": "20",
    })
    topic = pipeline.topic("validated")
    group = f"{pipeline.env['REVLINE_APP_ID']}-sink"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    # A stream that keeps flowing: the same valid events again and again (already
    # applied ones are skipped, but every batch still commits its offsets).
    workload = generate(WorkloadOptions(orders=40, seed=21, poison=0.0))
    records = [r for r in workload.records if r.event is not None]
    stop = threading.Event()

    def flow() -> None:
        with Publisher(kafka_bootstrap, topic) as publisher:
            while not stop.is_set():
                for i in range(0, len(records), 10):
                    if stop.is_set():
                        break
                    publish_records(publisher, records[i:i + 10])
                    publisher.flush(30)
                    time.sleep(0.1)

    from revline.core.admin import ensure_topics

    ensure_topics(kafka_bootstrap, {topic: pipeline.partitions})
    feeder = threading.Thread(target=flow, daemon=True)
    feeder.start()
    log = tmp_path / "sink.log"
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "revline.cli", "sink"],
                                    env=pipeline.env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        first = start()
        _wait_for_progress(admin, group, 50, 60, first, log)
        _wait_for_progress(admin, group, _committed(admin, group), 30, first, log)  # flowing
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = time.monotonic()
        at_kill = _committed(admin, group)
        second = start()
        _wait_for_progress(admin, group, at_kill, SESSION_TIMEOUT_S + SLACK_S + 30, second, log)
        resumed_s = time.monotonic() - killed_at
        print(f"sink killed with SIGKILL mid-stream; a restarted sink committed again "
              f"{resumed_s:.1f} s after the kill (session timeout {SESSION_TIMEOUT_S:.0f} s)")
        assert resumed_s < SESSION_TIMEOUT_S + SLACK_S
        text = log.read_text(errors="replace")
        assert "fenced" not in text.lower(), text[-4000:]
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, text[-4000:]
    finally:
        stop.set()
        feeder.join(60)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
