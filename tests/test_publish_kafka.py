"""Publishing on the real broker: 10,000 generated events out and back, bad lines named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revline.cli import main
from revline.core.readback import header, read_topic
from revline.operations.publisher import (
    SOURCE_LINE_HEADER,
    Publisher,
    publish_lines,
    publish_records,
)
from revline.operations.verify import check_against_manifest
from revline.tools.workload import WorkloadOptions, generate

pytestmark = pytest.mark.kafka


def test_ten_thousand_generated_events_round_trip_and_match_the_manifest(
    kafka_bootstrap: str, new_topic
) -> None:  # type: ignore[no-untyped-def]
    topic = new_topic("publish10k", partitions=6)
    workload = generate(WorkloadOptions(orders=2000, seed=42, orphans=3, poison=0.003))
    assert len(workload.records) >= 10_000
    with Publisher(kafka_bootstrap, topic) as publisher:
        publish_records(publisher, workload.records)
    assert publisher.delivery_failures == []

    report = check_against_manifest(read_topic(kafka_bootstrap, topic), workload.manifest())
    assert report.mismatches == [] and report.missing == []
    assert report.records == len(workload.records)
    assert report.matched == len(workload.records)
    poison = sum(1 for r in workload.records if r.event is None)
    assert report.decoded == len(workload.records) - poison
    assert sum(report.decode_errors.values()) == poison


def test_events_of_one_order_share_a_partition_in_publish_order(
    kafka_bootstrap: str, new_topic
) -> None:  # type: ignore[no-untyped-def]
    topic = new_topic("keyed", partitions=3)
    workload = generate(WorkloadOptions(orders=60, seed=5, poison=0.0))
    with Publisher(kafka_bootstrap, topic) as publisher:
        for rec in workload.records:
            assert rec.event is not None
            publisher.publish(
                rec.event, headers=[(SOURCE_LINE_HEADER, str(rec.seq).encode())], validate=False
            )
    partition_of: dict[bytes, int] = {}
    last_seq: dict[bytes, int] = {}
    for msg in read_topic(kafka_bootstrap, topic):
        key = msg.key()
        assert partition_of.setdefault(key, msg.partition()) == msg.partition()
        seq = int(header(msg, SOURCE_LINE_HEADER) or b"0")
        assert seq > last_seq.get(key, 0)
        last_seq[key] = seq


def test_cli_publish_names_the_bad_line_sends_the_good_ones_and_fails(
    kafka_bootstrap: str, new_topic, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    topic = new_topic("cli")
    workload = generate(WorkloadOptions(orders=3, seed=9, poison=0.0, duplicates=0.0))
    lines = list(workload.json_lines())
    broken = json.loads(lines[1])
    broken["envelope"]["occurred_at"] = "not a time"
    lines[1] = json.dumps(broken)
    lines.insert(3, "{this is not json")
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")

    code = main(["publish", str(path), "--topic", topic])
    out = capsys.readouterr()
    assert code == 1
    assert "line 2" in out.err and "envelope.occurred_at" in out.err
    assert "line 4" in out.err and "not valid JSON" in out.err
    assert f"Published {len(lines) - 2} events" in out.out
    landed = list(read_topic(kafka_bootstrap, topic))
    assert len(landed) == len(lines) - 2
    assert {int(header(m, SOURCE_LINE_HEADER) or 0) for m in landed} == (
        set(range(1, len(lines) + 1)) - {2, 4}
    )


def test_publish_lines_refuses_raw_records_unless_allowed(
    kafka_bootstrap: str, new_topic
) -> None:  # type: ignore[no-untyped-def]
    topic = new_topic("raw")
    line = json.dumps({"__raw__": "3q2+7w==", "__key__": "POISON-1"})
    with Publisher(kafka_bootstrap, topic) as publisher:
        refused = publish_lines(publisher, [line])
        sent = publish_lines(publisher, [line], allow_raw=True)
    assert refused.rejected and "--allow-raw" in refused.rejected[0][1]
    assert sent.sent == 1
    assert [m.value() for m in read_topic(kafka_bootstrap, topic)] == [bytes.fromhex("deadbeef")]
