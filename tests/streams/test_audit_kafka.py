"""The audit chainer on the real broker: exactly once under kill -9, verified, tampering named."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from revline.core.auditlog import OPS_CHAIN, AuditFact, AuditLog
from revline.core.errors import InfrastructureError
from revline.core.kafka_config import producer_config
from revline.core.readback import CommittedReader, read_topic
from revline.core.settings import DATA_DIR, Settings
from revline.operations.verify import finals_by_input
from revline.processors.audit_chain import canonical, entries_from_outcome, record_hash
from revline.schemas import outcome_codec
from revline.tools.isolated import IsolatedPipeline as Pipeline
from revline.tools.workload import WorkloadOptions, generate

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def rules_with(tmp_path: Path, **changes: object) -> Path:
    rules = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    rules.update(changes)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def audit_records(pipeline: Pipeline) -> list[tuple[dict[str, Any], int, int]]:
    """(record, partition, offset) of every committed audit record."""
    try:
        with CommittedReader(pipeline.bootstrap, pipeline.topic("audit")) as reader:
            return [(orjson.loads(m.value() or b""), m.partition() or 0, m.offset() or 0)
                    for m in reader]
    except InfrastructureError:  # not created yet
        return []


def wait_for_audit(pipeline: Pipeline, fact_ids: set[str], timeout: float,
                   ) -> list[tuple[dict[str, Any], int, int]]:
    deadline = time.monotonic() + timeout
    records: list[tuple[dict[str, Any], int, int]] = []
    while time.monotonic() < deadline:
        records = audit_records(pipeline)
        if fact_ids <= {r["fact_id"] for r, _, _ in records}:
            return records
        for proc in pipeline.procs:
            assert proc.poll() in (None, 0, -9, -15), f"a process died; see {pipeline.state_dir}"
        time.sleep(1.0)
    missing = fact_ids - {r["fact_id"] for r, _, _ in records}
    raise AssertionError(f"{len(missing)} entries never chained, e.g. {sorted(missing)[:5]}")


def wait_until_auditor_caught_up(pipeline: Pipeline, timeout: float = 60) -> None:
    """The auditor group has committed every source record that exists now."""
    group = f"{pipeline.env['REVLINE_APP_ID']}-auditor"
    consumer = Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": group})
    try:
        sources = [pipeline.topic("outcomes"), pipeline.topic("audit-facts")]
        marks = {(t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                 for t in sources for p in range(pipeline.partitions)}
        ends = {tp: high for tp, (low, high) in marks.items() if high > low}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            committed = consumer.committed([TopicPartition(t, p) for t, p in ends], timeout=10)
            if all(tp.offset >= ends[tp.topic, tp.partition] for tp in committed):
                return
            time.sleep(0.5)
    finally:
        consumer.close()
    raise AssertionError("the auditor did not catch up with its sources")


def revline(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    env = pipeline.env | {"COLUMNS": "250"}  # rich wraps at the terminal width
    return subprocess.run([sys.executable, "-m", "revline.cli", *args], env=env,
                          capture_output=True, text=True, timeout=180)


def assert_exactly_once_and_gapless(records: list[tuple[dict[str, Any], int, int]]) -> None:
    ids = Counter(r["fact_id"] for r, _, _ in records)
    assert [i for i, n in ids.items() if n > 1] == []
    seqs: dict[str, list[int]] = {}
    for record, _, _ in records:
        seqs.setdefault(record["chain"], []).append(record["seq"])
    for chain, run in seqs.items():
        assert run == list(range(1, len(run) + 1)), chain


def audit_log(bootstrap: str, pipeline: Pipeline) -> AuditLog:
    return AuditLog(Producer(producer_config(Settings(), bootstrap)), pipeline.topic("audit-facts"))


def test_every_outcome_and_fact_is_chained_exactly_once_across_kill_9(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(kafka_bootstrap, tmp_path,
                        rules_file=rules_with(tmp_path, hold_timeout_seconds=4),
                        extra_env={"REVLINE_BATCH_SIZE": "40"})
    workload = generate(WorkloadOptions(orders=60, seed=23, out_of_order=0.3, poison=0.01))
    total = len(workload.records)
    first, second, third = (workload.records[k * total // 3:(k + 1) * total // 3]
                            for k in range(3))
    orders = sorted({r.key for r in workload.records})
    facts = [AuditFact(fact_id=f"{order}:ledger:effect", kind="applied", actor="sink",
                       order_id=order, at_ms=1_800_000_000_000 + i,
                       detail={"adapter": "ledger", "external_refs": {"journal": f"J-{i}"},
                               "idempotency_key": f"{order}:invoice:1"})
             for i, order in enumerate(orders[:6])]
    facts.append(AuditFact(fact_id="replay:run-1", kind="replay", actor="ana@example.com",
                           detail={"reason": "ledger outage", "from": "2026-11-24T09:00Z"}))
    auditor_args = ("auditor", "--metrics-port", "0", "--batch-size", "20")
    log = audit_log(kafka_bootstrap, pipeline)
    try:
        pipeline.cli("reference", "load")
        worker = pipeline.start_worker()
        # The first auditor dies by SIGKILL inside its 4th transaction, its records sent.
        auditor = pipeline.start(*auditor_args, "--failpoint-kill-before-commit", "4")
        pipeline.publish(workload, first)
        for fact in facts[:4]:
            log.record(fact)
        log.flush()
        auditor.wait(120)
        assert auditor.returncode == -signal.SIGKILL
        pipeline.publish(workload, second)
        pipeline.wait_for(lambda o: len(finals_by_input(o)) >= len(first) + 20, 120,
                          "the second chunk under way")
        worker.send_signal(signal.SIGKILL)  # mid-stream: no flush, no commit
        worker.wait(10)
        pipeline.start_worker()
        pipeline.start(*auditor_args)
        pipeline.publish(workload, third)
        for fact in facts[2:]:  # facts[2:4] are re-sent: same fact ids
            log.record(fact)
        log.flush()
        pipeline.wait_for(lambda o: len(finals_by_input(o)) >= total, 240,
                          "a final outcome for every input")
        # What a worker does after kill -9: identical outcome records at new offsets.
        reemit = Producer(producer_config(Settings(), kafka_bootstrap))
        for msg in list(read_topic(kafka_bootstrap, pipeline.topic("outcomes")))[::10]:
            reemit.produce(pipeline.topic("outcomes"), key=msg.key(), value=msg.value())
        assert reemit.flush(30) == 0
        outcomes = [outcome_codec().decode(msg.value() or b"")
                    for msg in read_topic(kafka_bootstrap, pipeline.topic("outcomes"))]
        expected = {e.fact_id for o in outcomes for e in entries_from_outcome(o)}
        expected |= {f.fact_id for f in facts}
        records = wait_for_audit(pipeline, expected, 180)
        wait_until_auditor_caught_up(pipeline)  # the re-emitted copies too: they add nothing
        verified_records = audit_records(pipeline)
        with CommittedReader(kafka_bootstrap, pipeline.topic("audit"),
                             committed_only=False) as reader:
            written = sum(1 for _ in reader)  # aborted records included
        verified = revline(pipeline, "audit", "verify")
        order = next(r.key for r in workload.records
                     if r.event is not None and r.expect.outcome == "validated")
        log.record(AuditFact(fact_id=f"{order}:erp:effect", kind="applied", actor="sink",
                             order_id=order, detail={"adapter": "erp",
                                                     "external_refs": {"sale": "SALE-77"}}))
        log.flush()
        expected.add(f"{order}:erp:effect")
        records = wait_for_audit(pipeline, expected, 60)
        timeline = revline(pipeline, "audit", order, "--json", str(tmp_path / "a.json"),
                           "--csv", str(tmp_path / "a.csv"))
        port = re.search(r"auditor metrics on http://127.0.0.1:(\d+)/metrics",
                         (tmp_path / "auditor-3.log").read_text())
        assert port, (tmp_path / "auditor-3.log").read_text()[-2000:]
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10).read().decode()
    finally:
        pipeline.stop_all()

    # The killed transaction's records are in the log, aborted: no reader of the trail sees them.
    assert written > len(verified_records)
    assert {r["fact_id"] for r, _, _ in records} == expected  # nothing more, nothing less
    assert_exactly_once_and_gapless(records)
    # Every final outcome of every input is in its order's chain, once.
    by_fact = {r["fact_id"]: r for r, _, _ in records}
    finals = [o for verdicts in finals_by_input(outcomes).values() for o in verdicts]
    assert len(finals) == total
    for o in finals:
        chained = by_fact[entries_from_outcome(o)[-1].fact_id]
        assert chained["detail"]["rules_version"] == o["rules_version"]
        assert chained["chain"] == (o["order_id"] or chained["chain"])
    kinds = Counter(r["kind"] for r, _, _ in records)
    assert kinds["received"] == total and kinds["released"] == sum(o["held"] for o in finals)
    assert by_fact["replay:run-1"]["chain"] == OPS_CHAIN
    assert by_fact[f"{orders[0]}:ledger:effect"]["detail"]["external_refs"] == {"journal": "J-0"}

    assert verified.returncode == 0, verified.stdout + verified.stderr
    chains = len({r["chain"] for r, _, _ in records})
    assert f"{chains:,} chains, {len(verified_records):,} records" in verified.stdout
    assert "complete: all" in verified.stdout

    # Intact is not complete: with the auditor stopped, a new fact is not chained, and
    # verify says so (a stalled auditor once left an intact but stale trail).
    log.record(AuditFact(fact_id=f"{order}:erp:late", kind="applied", actor="sink",
                         order_id=order, detail={"adapter": "erp"}))
    log.flush()
    stale = revline(pipeline, "audit", "verify")
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert "NOT complete" in stale.stdout and "1 of" in stale.stdout
    assert f"{order}:erp:late" in stale.stderr

    assert timeline.returncode == 0, timeline.stdout + timeline.stderr
    assert "chain verified" in timeline.stdout
    assert "applied to erp" in timeline.stdout and "sale SALE-77" in timeline.stdout
    assert "passed QA" in timeline.stdout
    exported = json.loads((tmp_path / "a.json").read_text())
    mine = sorted((r for r, _, _ in records if r["chain"] == order), key=lambda r: r["seq"])
    assert exported["verified"] is True
    assert [r["hash"] for r in exported["records"]] == [r["hash"] for r in mine]
    csv_lines = (tmp_path / "a.csv").read_text().splitlines()
    assert len(csv_lines) == len(mine) + 1 and csv_lines[0].startswith("seq,time_utc")

    skipped = re.search(r"^revline_audit_redelivered_total (\S+)$", metrics, re.M)
    assert skipped and float(skipped.group(1)) >= 2  # at least the re-sent facts
    chained_total = sum(float(v) for v in re.findall(
        r'^revline_audit_records_total\{kind="[a-z_]+"\} (\S+)$', metrics, re.M))
    assert chained_total > 0


def test_facts_are_chained_once_and_verify_names_a_tampered_record(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(kafka_bootstrap, tmp_path)
    orders = [f"SO-T{i}" for i in range(8)]
    facts = [AuditFact(fact_id=f"{order}:step:{step}", kind="override" if step else "applied",
                       actor="ana@example.com", order_id=order, at_ms=1_800_000_000_000 + step,
                       detail={"reason_code": "APPROVED_OFFLINE", "step": step})
             for step in range(5) for order in orders]
    auditor_args = ("auditor", "--metrics-port", "-1", "--batch-size", "7")
    log = audit_log(kafka_bootstrap, pipeline)
    try:
        auditor = pipeline.start(*auditor_args)
        for fact in facts[:20]:
            log.record(fact)
        log.flush()
        wait_for_audit(pipeline, {f.fact_id for f in facts[:10]}, 90)
        auditor.send_signal(signal.SIGKILL)
        auditor.wait(10)
        for fact in facts[15:30]:  # 15..19 again, under the same ids
            log.record(fact)
        log.record(facts[0])
        log.flush()
        pipeline.start(*auditor_args)
        wait_for_audit(pipeline, {f.fact_id for f in facts[:30]}, 120)
        # A second instance joins: the partitions (and their chains) are split between two.
        pipeline.start(*auditor_args[:-1], "3", "--instance", "1")
        for fact in facts[25:]:
            log.record(fact)
            time.sleep(0.2)  # spread over the rebalance
        log.flush()
        records = wait_for_audit(pipeline, {f.fact_id for f in facts}, 120)
        wait_until_auditor_caught_up(pipeline)
        records = audit_records(pipeline)
    finally:
        pipeline.stop_all()
    assert len(records) == len(facts)
    assert_exactly_once_and_gapless(records)
    logs = "".join(path.read_text() for path in tmp_path.glob("auditor-*.log"))
    assert "auditor-1: partitions" in logs, logs  # the second instance did get partitions
    assert revline(pipeline, "audit", "verify").returncode == 0

    # Tampering 1: a copy of SO-T1's seq 2 with another detail, its hash left as it was.
    # Tampering 2: a copy of SO-T2's seq 3, altered and re-hashed (a careful forger).
    topic = pipeline.topic("audit")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    locations = {}
    offsets: list[int] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        offsets.append(msg.offset() or 0)

    for chain, seq, rehash in (("SO-T1", 2, False), ("SO-T2", 3, True)):
        original, partition, _ = next((r, p, o) for r, p, o in records
                                      if r["chain"] == chain and r["seq"] == seq)
        forged = {**original, "detail": {**original["detail"], "reason_code": "NONE"}}
        if rehash:
            forged["hash"] = record_hash(forged)
        producer.produce(topic, key=chain.encode(), value=canonical(forged), partition=partition,
                         on_delivery=delivered)
        producer.flush(30)
        locations[chain] = f"{topic}/{partition}/{offsets[-1]}"
    verify = revline(pipeline, "audit", "verify")
    one = revline(pipeline, "audit", "verify", "--order", "SO-T3")
    timeline = revline(pipeline, "audit", "SO-T1", "--from-topic")  # the topic was forged

    output = verify.stdout + verify.stderr
    assert verify.returncode == 1, output
    assert f"chain SO-T1 seq 2 at {locations['SO-T1']}: bad hash" in output
    assert f"chain SO-T2 seq 3 at {locations['SO-T2']}: duplicate seq" in output
    assert "2 of 8 chains broken" in output
    assert one.returncode == 0, one.stdout + one.stderr
    assert "1 chain, 5 records" in one.stdout
    assert timeline.returncode == 1
    assert "chain NOT verified" in timeline.stderr
