"""The sink processor on the real broker: a real worker's validated topic → ledger + ERP."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from revline.isolated import IsolatedPipeline
from revline.readback import read_topic
from revline.settings import DATA_DIR
from revline.verify import finals_by_input
from revline.workload import Workload, WorkloadOptions, generate
from schemas import EventDeserializer, exception_codec
from sinks._breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from sinks.erp import InMemoryErp
from sinks.ledger import SqlLedger
from sinks.processor import SinkProcessor

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

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


@pytest.fixture(scope="module")
def validated(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Validated]:
    """One real worker run per module; every test reads its validated topic."""
    tmp = tmp_path_factory.mktemp("sink-pipeline")
    rules = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    rules["hold_timeout_seconds"] = 3
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules))
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp, rules_file=tmp / "rules.yaml")
    workload = generate(WorkloadOptions(orders=150, seed=5, poison=0.0))
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
    yield Validated(pipeline, workload, topic, _end_offsets(kafka_bootstrap, topic), keys,
                    dict(counts), refusable)


def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe-" + uuid.uuid4().hex})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        c.close()


def _processor(bootstrap: str, v: Validated, ledger: SqlLedger, erp: InMemoryErp,
               exceptions_topic: str, group: str | None = None,
               batch_size: int = 200) -> SinkProcessor:
    return SinkProcessor(
        bootstrap, v.topic, group or f"sink-{uuid.uuid4().hex[:8]}", ledger, erp,
        exceptions_topic, batch_size=batch_size, poll_timeout_s=0.2, backoff_base_s=0.01,
        backoff_max_s=0.05, breaker_threshold=3, breaker_cooldown_s=0.5,
    )


def _drain(proc: SinkProcessor, v: Validated, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    want = {(v.topic, p): o for p, o in v.end.items() if o > 0}
    while any(proc.stats.committed.get(tp, 0) < o for tp, o in want.items()):
        assert time.monotonic() < deadline, f"not drained: {proc.stats}"
        proc.step()


def _expected_balances(v: Validated) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = defaultdict(int)
    for o in v.workload.orders.values():
        out[("accounts_receivable", o.currency)] += o.invoiced_minor - o.paid_minor
        out[("cash", o.currency)] += o.paid_minor - o.refunded_minor
        out[("refunds", o.currency)] += o.refunded_minor
        # revenue and tax are split in the events only; together they carry the invoice
        out[("revenue+tax", o.currency)] -= o.invoiced_minor
    return {k: n for k, n in out.items() if n}


def _actual_balances(ledger: SqlLedger) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = defaultdict(int)
    for (account, currency), n in ledger.balances().items():
        name = "revenue+tax" if account in ("revenue", "tax_payable") else account
        out[(name, currency)] += n
    return {k: n for k, n in out.items() if n}


def _sink_exceptions(bootstrap: str, topic: str) -> set[str]:
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


def test_workload_lands_once_and_balances_match_manifest_then_replay_changes_nothing(
    kafka_bootstrap: str, validated: Validated, tmp_path: Path, new_topic: object
) -> None:
    exceptions = new_topic("sink-exceptions", 1)  # type: ignore[operator]
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    erp = InMemoryErp()
    started = time.monotonic()
    proc = _processor(kafka_bootstrap, validated, ledger, erp, exceptions)
    try:
        _drain(proc, validated)
    finally:
        proc.close()
    elapsed = time.monotonic() - started
    print(f"\nsink: {proc.stats.events} events in {elapsed:.1f}s; {proc.stats}")

    # The only refusals are real ones: the ERP will not amend a cancelled sale.
    assert _sink_exceptions(kafka_bootstrap, exceptions) == validated.refusable
    assert proc.stats.exceptions == len(validated.refusable)
    refused = ledger.effects_for(validated.refusable, "erp")
    assert {e.status for e in refused.values()} <= {"refused"}
    posted = ledger.effects_for(validated.money_keys, "ledger")
    assert set(posted) == validated.money_keys
    assert {e.status for e in posted.values()} == {"applied"}
    assert proc.stats.applied["ledger"] == len(validated.money_keys)  # once each
    assert all(tb.balanced for tb in ledger.trial_balance().values())
    assert _actual_balances(ledger) == _expected_balances(validated)
    counts = erp.store.counts()
    assert counts["invoice"] == validated.type_counts.get("invoice_issued", 0)
    assert counts["sale"] == validated.type_counts.get("order_booked", 0)
    erp_rows = ledger.effects_for(validated.money_keys, "erp")
    assert {e.status for e in erp_rows.values()} == {"applied"}
    assert all(e.external_ref for e in erp_rows.values())

    # Replay: a new group reads the topic from offset 0 against the same DB and ERP.
    balances, counts_before = ledger.balances(), erp.store.counts()
    replay = _processor(kafka_bootstrap, validated, ledger, erp, exceptions)
    try:
        _drain(replay, validated)
    finally:
        replay.close()
    assert ledger.balances() == balances
    assert erp.store.counts() == counts_before
    assert replay.stats.applied == {}  # nothing written anew
    assert replay.stats.skipped["erp"] >= len(validated.money_keys)
    assert replay.stats.exceptions == 0  # a refusal is owned once, not re-raised per replay
    assert _sink_exceptions(kafka_bootstrap, exceptions) == validated.refusable
    ledger.close()


def test_erp_outage_pauses_commits_nothing_and_then_applies_everything_once(
    kafka_bootstrap: str, validated: Validated, tmp_path: Path, new_topic: object
) -> None:
    exceptions = new_topic("sink-exceptions", 1)  # type: ignore[operator]
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    erp = InMemoryErp()
    group = f"sink-{uuid.uuid4().hex[:8]}"
    proc = _processor(kafka_bootstrap, validated, ledger, erp, exceptions, group, batch_size=100)
    try:
        deadline = time.monotonic() + 30
        while proc.stats.batches < 2:  # some progress before the ERP goes away
            assert time.monotonic() < deadline
            proc.step()
        erp.available = False
        committed = dict(proc.stats.committed)
        events = proc.stats.events
        outage_end = time.monotonic() + 4
        steps = 0
        while time.monotonic() < outage_end:
            proc.step()
            steps += 1
        assert proc.breakers["erp"].times_opened >= 1
        assert proc.stats.pauses == 1 and proc._paused
        assert proc.stats.committed == committed and proc.stats.events == events
        assert steps < 200, "the paused loop must wait, not spin"
        print(f"\noutage: {steps} loop steps in 4 s, breaker opened "
              f"{proc.breakers['erp'].times_opened}x, {proc.stats.transient_failures} failures")
        # The broker agrees: the group's offsets did not move past the failing batch.
        on_broker = {(tp.topic, tp.partition): tp.offset for tp in proc.consumer.committed(
            [TopicPartition(validated.topic, p) for p in validated.end], timeout=10)
            if tp.offset >= 0}
        assert on_broker == committed
        assert proc.stats.exceptions <= len(validated.refusable)  # none from the outage

        erp.available = True
        _drain(proc, validated)
        assert not proc._paused
    finally:
        proc.close()
    assert _sink_exceptions(kafka_bootstrap, exceptions) == validated.refusable
    assert proc.stats.exceptions == len(validated.refusable)
    counts = erp.store.counts()
    assert counts["invoice"] == validated.type_counts.get("invoice_issued", 0)
    assert counts["sale"] == validated.type_counts.get("order_booked", 0)
    payments = validated.type_counts.get("payment_captured", 0)
    refunds = validated.type_counts.get("refund_issued", 0)
    assert counts["move"] == payments + refunds
    assert _actual_balances(ledger) == _expected_balances(validated)
    ledger.close()


def test_breaker_opens_after_threshold_probes_half_open_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker("erp", failure_threshold=3, cooldown_s=2.0, clock=lambda: now[0])
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == CLOSED
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow()
    now[0] = 2.0
    assert breaker.state == HALF_OPEN and breaker.allow()
    breaker.record_failure()  # failed probe: open again for a full cool-down
    assert breaker.state == OPEN and breaker.remaining_s() == 2.0
    now[0] = 4.0
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.times_opened == 2
