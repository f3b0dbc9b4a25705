"""The differential test through the real pipeline: broker, worker, sink, ledger, ERP.

A sample of the hypothesis-generated deliveries of tests/test_differential.py (shuffled,
re-sent, conflicting, shared keys and document ids, cancellations anywhere, partial and
over-invoicing, edge amounts, odd and control characters) is published as real Avro
records to a real broker; `revline worker` and `revline sink` (SQLite ledger, in-memory
ERP) process them as in production. Every input's final outcome must be the reference
model's, the ledger's balances per order, account and currency must be the model's to
the minor unit, every journal balances, the sink refuses no validated event, and
`revline reconcile` (ledger) finds 0.000 % drift.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from hypothesis import HealthCheck, Phase, given, settings

from revline.core.readback import read_topic
from revline.operations.verify import finals_by_input
from revline.sinks.ledger import SqlLedger
from revline.tools.isolated import IsolatedPipeline
from tests import reference_model as model
from tests.streams.test_worker_kafka import rules_with
from tests.test_differential import (
    DECODE,
    ENCODE,
    PREFIX_LEN,
    agrees,
    delivery,
    describe,
    ledger_balances,
    with_prefix,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EXAMPLES = 60  # deliveries of 1-3 orders each


def _sample() -> list[dict[str, Any]]:
    """A reproducible sample of deliveries (the first EXAMPLES hypothesis generates,
    derandomized, not shrunk), each under its own order and key prefix."""
    batches: list[list[dict[str, Any]]] = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(delivery(max_orders=3))
    def draw(events: list[dict[str, Any]]) -> None:
        batches.append(events)

    draw()
    events: list[dict[str, Any]] = []
    for n, batch in enumerate(batches):
        prefix = f"k{n:07d}|"
        assert len(prefix) == PREFIX_LEN
        events += with_prefix(batch, prefix)
    return events


def _sink_done(bootstrap: str, group: str, topic: str) -> bool:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in parts]
        committed = consumer.committed(tps, timeout=10)
        ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps]
    finally:
        consumer.close()
    return all(c.offset >= end for c, end in zip(committed, ends, strict=True)
               if end > 0) and any(end > 0 for end in ends)


def test_the_real_pipeline_agrees_with_the_reference_model(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    events = _sample()
    want, want_bal = model.run([DECODE.decode(ENCODE(e)) for e in events])
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp_path, partitions=1,
                                rules_file=rules_with(tmp_path, hold_timeout_seconds=4),
                                extra_env={"REVLINE_ERP": "memory"})
    try:
        pipeline.cli("reference", "load")
        pipeline.create_input_topic()
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        for e in events:  # one partition: offset i is input i, in the model's order
            producer.produce(pipeline.topic("events"), value=ENCODE(e),
                             key=e["envelope"]["order_id"].encode(), partition=0)
        assert producer.flush(60) == 0
        pipeline.start_worker()
        pipeline.start("sink")
        outcomes = pipeline.wait_for(
            lambda o: len(finals_by_input(o)) >= len(events), 240, "every input's outcome")
        group = f"{pipeline.env['REVLINE_APP_ID']}-sink"
        deadline = time.monotonic() + 180
        while not _sink_done(kafka_bootstrap, group, pipeline.topic("validated")):
            assert time.monotonic() < deadline, "the sink did not apply every validated event"
            time.sleep(1)
        reconciled = subprocess.run(
            [sys.executable, "-m", "revline.cli", "reconcile", "--ledger-only",
             "--no-exceptions"], env=pipeline.env, capture_output=True, text=True,
            check=False)
        refusals = [m for m in read_topic(kafka_bootstrap, pipeline.topic("exceptions"),
                                          missing_ok=True)
                    if b"sink." in (m.value() or b"")]
    finally:
        pipeline.stop_all()

    problems = []
    finals = finals_by_input(outcomes)
    for i, w in enumerate(want):
        got = finals.get((0, i), [])
        if len(got) != 1 or not agrees(w, got[0]["kind"], got[0]["check_id"]):
            problems.append(f"#{i} {describe(events[i])}: model {w.kind} {w.checks}, pipeline "
                            f"{[(g['kind'], g['check_id']) for g in got]}")
    order_ids = {e["envelope"]["order_id"] for e in events}
    with SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}", migrate=False) as ledger:
        got_bal, unbalanced = ledger_balances(ledger, order_ids)
    want_bal = {k: v for k, v in want_bal.items() if k[0] in order_ids}
    problems += [f"balance {k}: model {want_bal.get(k, 0)}, ledger {got_bal.get(k, 0)}"
                 for k in sorted(set(got_bal) | set(want_bal))
                 if want_bal.get(k, 0) != got_bal.get(k, 0)]
    problems += unbalanced
    problems += [f"sink refused a validated event: {m.value()[:200]!r}" for m in refusals]
    assert not problems, "\n".join(problems[:40])
    assert reconciled.returncode == 0, reconciled.stdout[-3000:] + reconciled.stderr[-2000:]
    assert "0.000 %" in reconciled.stdout
    kinds = {w.kind for w in want}
    print(f"\n{len(events)} inputs in {EXAMPLES} deliveries ({', '.join(sorted(kinds))}); "
          f"{len(want_bal)} ledger balances; all equal to the model")
