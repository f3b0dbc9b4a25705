"""The stream core on the real broker: manifest parity, routing, and kill -9 recovery."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from revline.core.readback import header, read_topic
from revline.core.settings import DATA_DIR
from revline.operations.verify import compare_with_manifest, finals_by_input
from revline.tools.isolated import IsolatedPipeline as Pipeline
from revline.tools.workload import WorkloadOptions, generate

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def rules_with(tmp_path: Path, **changes: object) -> Path:
    rules = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    rules.update(changes)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def test_generated_workload_ends_exactly_as_the_manifest_says(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(kafka_bootstrap, tmp_path,
                        rules_file=rules_with(tmp_path, hold_timeout_seconds=4))
    workload = generate(WorkloadOptions(orders=400, seed=31, orphans=2, poison=0.006))
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.publish(workload)
        outcomes = pipeline.wait_for(
            lambda o: len(finals_by_input(o)) >= len(workload.records), 180,
            "a final outcome for every input",
        )
    finally:
        pipeline.stop_all()
    assert compare_with_manifest(workload.manifest(), outcomes) == []

    # Routed records: validated carries the QA stamp; dead letters keep the original
    # bytes and say why; exceptions are one per excepted input (plus P3 advisories).
    expected = defaultdict(int)
    for rec in workload.records:
        expected[rec.expect.outcome] += 1
    validated = list(read_topic(kafka_bootstrap, pipeline.topic("validated")))
    assert len({header(m, "revline.input") for m in validated}) == expected["validated"]
    assert all(header(m, "revline.qa.rules_version") for m in validated)
    dead = list(read_topic(kafka_bootstrap, pipeline.topic("deadletter")))
    assert len(dead) == expected["dead_letter"]
    poison = {r.seq: r for r in workload.records if r.raw is not None}
    for msg in dead:
        seq = int(header(msg, "revline-source-line") or 0)
        assert msg.value() == poison[seq].raw
        assert header(msg, "revline.errors.stage") == (poison[seq].expect.stage or "").encode()
        assert header(msg, "revline.errors.exception.message")
        assert header(msg, "revline.errors.offset") is not None
    from revline.schemas import exception_codec

    exceptions = [exception_codec().decode(m.value() or b"")
                  for m in read_topic(kafka_bootstrap, pipeline.topic("exceptions"))]
    blocking = {(e["input_partition"], e["input_offset"]) for e in exceptions if e["blocking"]}
    assert len(blocking) == expected["exception"]
    for e in exceptions:
        assert e["owner"] in ("revenue_ops", "finance", "integrations")
        assert e["sla_deadline_ms"] > e["opened_at_ms"]


def test_kill_9_twice_mid_stream_still_one_outcome_per_input(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(kafka_bootstrap, tmp_path,
                        rules_file=rules_with(tmp_path, hold_timeout_seconds=600),
                        extra_env={"REVLINE_BATCH_SIZE": "200"})
    workload = generate(WorkloadOptions(orders=1500, seed=77, poison=0.002, out_of_order=0.2))
    total = len(workload.records)
    chunks = [workload.records[k * total // 3:(k + 1) * total // 3] for k in range(3)]
    try:
        pipeline.cli("reference", "load")
        for round_, chunk in enumerate(chunks):
            worker = pipeline.start_worker()
            pipeline.publish(workload, chunk)
            if round_ < 2:
                seen = len(finals_by_input(pipeline.outcomes()))
                pipeline.wait_for(lambda o, s=seen: len(finals_by_input(o)) > s + 300, 120,
                                  "progress before the kill")
                worker.send_signal(signal.SIGKILL)  # no shutdown, no commit, no flush
                worker.wait(10)
                time.sleep(0.5)
        outcomes = pipeline.wait_for(lambda o: len(finals_by_input(o)) >= total, 300,
                                     "every input after two kill -9 and restarts")
    finally:
        pipeline.stop_all()
    assert compare_with_manifest(workload.manifest(), outcomes) == []
    # No event was released (validated) twice from different inputs.
    inputs_per_key: dict[str, set[bytes | None]] = defaultdict(set)
    from revline.schemas import EventDeserializer

    decode = EventDeserializer()
    for msg in read_topic(kafka_bootstrap, pipeline.topic("validated")):
        key = decode.decode(msg.value() or b"")["envelope"]["idempotency_key"]
        inputs_per_key[key].add(header(msg, "revline.input"))
    assert all(len(inputs) == 1 for inputs in inputs_per_key.values())


@pytest.mark.parametrize("store", ["memory", "rocksdb"])
def test_out_of_order_events_are_held_visibly_then_released_and_state_survives_restart(
    kafka_bootstrap: str, tmp_path: Path, store: str
) -> None:
    import re
    import urllib.request

    from revline.core.settings import Settings
    from revline.streams.inspect import held_events

    pipeline = Pipeline(kafka_bootstrap, tmp_path,
                        rules_file=rules_with(tmp_path, hold_timeout_seconds=600),
                        extra_env={"REVLINE_STORE": store})
    workload = generate(WorkloadOptions(orders=1, seed=3, duplicates=0, conflicts=0,
                                        out_of_order=0, incomplete=0, off_policy=0,
                                        unknown_attribution=0, amount_mismatch=0, poison=0))
    booking, *later = workload.records
    assert booking.event_type in ("order_booked", "discount_approved")
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.publish(workload, later)  # everything but the first event
        pipeline.wait_for(lambda o: sum(not x["final"] for x in o) >= 1, 90, "a hold")
        settings = Settings(_env_file=None, app_id=f"revline-t-{pipeline.name}",
                            input_topic=pipeline.topic("events"))
        holds = held_events(kafka_bootstrap, settings)
        assert holds and all(h["order_id"] == booking.key for h in holds)
        assert any(h["waiting_for"] for h in holds)

        # Restart: holds live in durable state, not in the process.
        pipeline.stop_all()
        pipeline.start_worker()
        pipeline.publish(workload, [booking])
        outcomes = pipeline.wait_for(
            lambda o: len(finals_by_input(o)) >= len(workload.records), 90, "the release")
        log = (tmp_path / "worker-1.log").read_text()
        port = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", log)
        assert port, log[-2000:]
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10).read().decode()
        assert "revline_holds_released_total" in metrics
        assert 'revline_outcomes_total{kind="validated"}' in metrics
    finally:
        pipeline.stop_all()
    finals = [o for v in finals_by_input(outcomes).values() for o in v]
    assert len(finals) == len(workload.records)
    assert {o["kind"] for o in finals} == {"validated"}
    released = [o for o in finals if o["held"]]
    assert released and all(o["released_by"] for o in released)
    assert len(held_events(kafka_bootstrap, settings)) == 0


def test_dedup_state_is_bounded(kafka_bootstrap: str, tmp_path: Path) -> None:
    from revline.core.settings import Settings
    from revline.streams.inspect import order_states

    pipeline = Pipeline(kafka_bootstrap, tmp_path, extra_env={"REVLINE_MAX_ORDERS": "5"})
    workload = generate(WorkloadOptions(orders=20, seed=4, poison=0.0, out_of_order=0.0))
    settings = Settings(_env_file=None, app_id=f"revline-t-{pipeline.name}")
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.publish(workload)
        pipeline.wait_for(lambda o: len(finals_by_input(o)) >= len(workload.records), 90,
                          "every input")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            orders = [k for k in order_states(kafka_bootstrap, settings)
                      if not k.startswith("__position__")]
            if len(orders) <= 5:
                break
            time.sleep(1)
    finally:
        pipeline.stop_all()
    assert len(orders) <= 5


def test_two_workers_share_the_partitions_and_agree_with_the_manifest(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(kafka_bootstrap, tmp_path, partitions=4,
                        rules_file=rules_with(tmp_path, hold_timeout_seconds=600))
    workload = generate(WorkloadOptions(orders=600, seed=12, poison=0.003))
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.start_worker()
        time.sleep(3)
        pipeline.publish(workload)
        outcomes = pipeline.wait_for(
            lambda o: len(finals_by_input(o)) >= len(workload.records), 180,
            "every input, decided by two workers")
    finally:
        pipeline.stop_all()
    assert compare_with_manifest(workload.manifest(), outcomes) == []
    logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
    assert all("reading" in log or "metrics" in log for log in logs)
