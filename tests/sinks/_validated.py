"""A real worker run's validated topic, and what the sink should make of it."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml
from confluent_kafka import Consumer, TopicPartition

from revline.core.readback import read_topic
from revline.core.settings import DATA_DIR
from revline.operations.verify import finals_by_input
from revline.schemas import EventDeserializer, exception_codec
from revline.sinks._protocols import ErpAdapter
from revline.sinks.ledger import SqlLedger
from revline.sinks.processor import SinkProcessor
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import Workload, WorkloadOptions, generate

MONEY = ("invoice_issued", "payment_captured", "refund_issued")


@dataclass
class Validated:
    pipeline: IsolatedPipeline
    workload: Workload
    topic: str
    end: dict[int, int]  # partition -> high watermark
    money_keys: set[str]
    type_counts: dict[str, int]
    refusable: set[str]  # amendments released after their order's cancellation


def run_validated(kafka_bootstrap: str, tmp: Path, orders: int = 150, seed: int = 5) -> Validated:
    """One real worker run; every test of a module reads its validated topic."""
    rules = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    rules["hold_timeout_seconds"] = 3
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules))
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp, rules_file=tmp / "rules.yaml")
    workload = generate(WorkloadOptions(orders=orders, seed=seed, poison=0.0))
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.publish(workload)
        pipeline.wait_for(lambda o: len(finals_by_input(o)) >= len(workload.records), 120,
                          "a final outcome for every input")
    finally:
        pipeline.stop_all()
    topic = pipeline.topic("validated")
    decode = EventDeserializer()
    keys: set[str] = set()
    counts: dict[str, int] = defaultdict(int)
    cancelled: set[str] = set()
    refusable: set[str] = set()
    for msg in read_topic(kafka_bootstrap, topic):
        env = decode.decode(msg.value() or b"")["envelope"]
        counts[env["event_type"]] += 1
        if env["event_type"] == "order_cancelled":
            cancelled.add(env["order_id"])
        elif env["event_type"] == "order_amended" and env["order_id"] in cancelled:
            refusable.add(env["idempotency_key"])
        if env["event_type"] in MONEY:
            keys.add(env["idempotency_key"])
    expected_keys = {r.idempotency_key for r in workload.records
                     if r.expect.outcome == "validated" and r.event_type in MONEY}
    assert keys == expected_keys
    return Validated(pipeline, workload, topic, end_offsets(kafka_bootstrap, topic), keys,
                    dict(counts), refusable)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe-" + uuid.uuid4().hex})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        c.close()


def processor(bootstrap: str, v: Validated, ledger: SqlLedger, erp: ErpAdapter,
               exceptions_topic: str, group: str | None = None,
               batch_size: int = 200) -> SinkProcessor:
    return SinkProcessor(
        bootstrap, v.topic, group or f"sink-{uuid.uuid4().hex[:8]}", ledger, erp,
        exceptions_topic, batch_size=batch_size, poll_timeout_s=0.2, backoff_base_s=0.01,
        backoff_max_s=0.05, breaker_threshold=3, breaker_cooldown_s=0.5,
    )


def drain(proc: SinkProcessor, v: Validated, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    want = {(v.topic, p): o for p, o in v.end.items() if o > 0}
    while any(proc.stats.committed.get(tp, 0) < o for tp, o in want.items()):
        assert time.monotonic() < deadline, f"not drained: {proc.stats}"
        proc.step()


def expected_balances(v: Validated) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = defaultdict(int)
    for o in v.workload.orders.values():
        out[("accounts_receivable", o.currency)] += o.invoiced_minor - o.paid_minor
        out[("cash", o.currency)] += o.paid_minor - o.refunded_minor
        out[("refunds", o.currency)] += o.refunded_minor
        # revenue and tax are split in the events only; together they carry the invoice
        out[("revenue+tax", o.currency)] -= o.invoiced_minor
    return {k: n for k, n in out.items() if n}


def actual_balances(ledger: SqlLedger) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = defaultdict(int)
    for (account, currency), n in ledger.balances().items():
        name = "revenue+tax" if account in ("revenue", "tax_payable") else account
        out[(name, currency)] += n
    return {k: n for k, n in out.items() if n}


def sink_exceptions(bootstrap: str, topic: str) -> set[str]:
    """Keys of the sink's exception records; each must be a well-formed ERP refusal."""
    codec = exception_codec()
    keys: set[str] = set()
    for msg in read_topic(bootstrap, topic, timeout=20):
        record = codec.decode(msg.value() or b"")
        assert (record["check_id"], record["owner"], record["severity"], record["blocking"]) == (
            "sink.erp_refused", "integrations", "P1", True)
        assert "cancelled" in record["reason"] and record["event"]
        keys.add(record["idempotency_key"])
    return keys
