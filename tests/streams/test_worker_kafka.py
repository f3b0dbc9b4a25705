"""The stream core on the real broker: manifest parity, routing, and kill -9 recovery."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from revline.isolated import IsolatedPipeline as Pipeline
from revline.readback import header, read_topic
from revline.settings import DATA_DIR
from revline.verify import compare_with_manifest, finals_by_input
from revline.workload import WorkloadOptions, generate

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
    from schemas import exception_codec

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
    from schemas import EventDeserializer

    decode = EventDeserializer()
    for msg in read_topic(kafka_bootstrap, pipeline.topic("validated")):
        key = decode.decode(msg.value() or b"")["envelope"]["idempotency_key"]
        inputs_per_key[key].add(header(msg, "revline.input"))
    assert all(len(inputs) == 1 for inputs in inputs_per_key.values())
