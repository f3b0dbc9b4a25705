"""The sink processor on the real broker: a real worker's validated topic → ledger + ERP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from revline.sinks._breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from revline.sinks._protocols import EffectResult, PermanentSinkError, TransientSinkError
from revline.sinks.erp import InMemoryErp
from revline.sinks.ledger import SideEffect, SqlLedger
from tests.sinks._validated import (
    Validated,
    actual_balances,
    drain,
    expected_balances,
    processor,
    run_validated,
    sink_exceptions,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MONEY = ("invoice_issued", "payment_captured", "refund_issued")


def effects_by_key(ledger: SqlLedger, adapter: str, keys: set[str]) -> dict[str, SideEffect]:
    """Side-effect rows by key alone: every key of the workload names one order."""
    rows = [e for e in ledger.all_effects(adapter) if e.idempotency_key in keys]
    found = {e.idempotency_key: e for e in rows}
    assert len(found) == len(rows), "a key of the workload was recorded for two orders"
    assert all(e.order_id for e in rows)  # written now: every row names its order
    return found


@pytest.fixture(scope="module")
def validated(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Validated]:
    yield run_validated(kafka_bootstrap, tmp_path_factory.mktemp("sink-pipeline"))


def test_workload_lands_once_and_balances_match_manifest_then_replay_changes_nothing(
    kafka_bootstrap: str, validated: Validated, tmp_path: Path, new_topic: object
) -> None:
    exceptions = new_topic("sink-exceptions", 1)  # type: ignore[operator]
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    erp = InMemoryErp()
    started = time.monotonic()
    proc = processor(kafka_bootstrap, validated, ledger, erp, exceptions)
    try:
        drain(proc, validated)
    finally:
        proc.close()
    elapsed = time.monotonic() - started
    print(f"\nsink: {proc.stats.events} events in {elapsed:.1f}s; {proc.stats}")

    # The only refusals are real ones: the ERP will not amend a cancelled sale.
    assert sink_exceptions(kafka_bootstrap, exceptions) == validated.refusable
    assert proc.stats.exceptions == len(validated.refusable)
    refused = effects_by_key(ledger, "erp", validated.refusable)
    assert {e.status for e in refused.values()} <= {"refused"}
    posted = effects_by_key(ledger, "ledger", validated.money_keys)
    assert set(posted) == validated.money_keys
    assert {e.status for e in posted.values()} == {"applied"}
    assert proc.stats.applied["ledger"] == len(validated.money_keys)  # once each
    assert all(tb.balanced for tb in ledger.trial_balance().values())
    assert actual_balances(ledger) == expected_balances(validated)
    counts = erp.store.counts()
    assert counts["invoice"] == validated.type_counts.get("invoice_issued", 0)
    assert counts["sale"] == validated.type_counts.get("order_booked", 0)
    erp_rows = effects_by_key(ledger, "erp", validated.money_keys)
    assert {e.status for e in erp_rows.values()} == {"applied"}
    assert all(e.external_ref for e in erp_rows.values())

    # Replay: a new group reads the topic from offset 0 against the same DB and ERP.
    balances, counts_before = ledger.balances(), erp.store.counts()
    replay = processor(kafka_bootstrap, validated, ledger, erp, exceptions)
    try:
        drain(replay, validated)
    finally:
        replay.close()
    assert ledger.balances() == balances
    assert erp.store.counts() == counts_before
    assert replay.stats.applied == {}  # nothing written anew
    assert replay.stats.skipped["erp"] >= len(validated.money_keys)
    assert replay.stats.exceptions == 0  # a refusal is owned once, not re-raised per replay
    assert sink_exceptions(kafka_bootstrap, exceptions) == validated.refusable
    ledger.close()


def test_erp_outage_pauses_commits_nothing_and_then_applies_everything_once(
    kafka_bootstrap: str, validated: Validated, tmp_path: Path, new_topic: object
) -> None:
    exceptions = new_topic("sink-exceptions", 1)  # type: ignore[operator]
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    erp = InMemoryErp()
    group = f"sink-{uuid.uuid4().hex[:8]}"
    proc = processor(kafka_bootstrap, validated, ledger, erp, exceptions, group, batch_size=100)
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
        drain(proc, validated)
        assert not proc._paused
    finally:
        proc.close()
    assert sink_exceptions(kafka_bootstrap, exceptions) == validated.refusable
    assert proc.stats.exceptions == len(validated.refusable)
    counts = erp.store.counts()
    assert counts["invoice"] == validated.type_counts.get("invoice_issued", 0)
    assert counts["sale"] == validated.type_counts.get("order_booked", 0)
    payments = validated.type_counts.get("payment_captured", 0)
    refunds = validated.type_counts.get("refund_issued", 0)
    assert counts["move"] == payments + refunds
    assert actual_balances(ledger) == expected_balances(validated)
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


class _FlakyInvoices(InMemoryErp):
    """The ERP accepts the sale step but fails the invoice step for chosen keys."""

    def __init__(self, transient: dict[str, int], refused: set[str]) -> None:
        super().__init__()
        self.transient = dict(transient)  # key -> how many more times to time out
        self.refused = refused

    def apply(self, event: Mapping[str, Any]) -> EffectResult:
        key = event["envelope"]["idempotency_key"]
        if self.transient.get(key, 0) > 0:
            self.transient[key] -= 1
            self.fail_next("invoice", TransientSinkError("invoice endpoint timed out (injected)"))
        if key in self.refused:
            self.fail_next("invoice", PermanentSinkError("invoice refused: period closed "
                                                         "(injected)"))
        return super().apply(event)


def test_partial_writes_are_recorded_completed_once_or_owned_as_exceptions(
    kafka_bootstrap: str, validated: Validated, tmp_path: Path, new_topic: object
) -> None:
    from revline.core.readback import read_topic
    from revline.schemas import EventDeserializer

    decode = EventDeserializer()
    invoices: dict[str, str] = {}  # invoice key -> order id
    paid_orders: set[str] = set()
    for msg in read_topic(kafka_bootstrap, validated.topic):
        env = decode.decode(msg.value() or b"")["envelope"]
        if env["event_type"] == "invoice_issued":
            invoices[env["idempotency_key"]] = env["order_id"]
        elif env["event_type"] in ("payment_captured", "refund_issued"):
            paid_orders.add(env["order_id"])
    unpaid = sorted(k for k, order in invoices.items() if order not in paid_orders)
    paid = sorted(k for k, order in invoices.items() if order in paid_orders)
    assert unpaid and paid
    flaky, refused = paid[0], unpaid[0]  # the refused one has no payments to block

    exceptions = new_topic("sink-exceptions", 1)  # type: ignore[operator]
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    erp = _FlakyInvoices({flaky: 2}, {refused})
    proc = processor(kafka_bootstrap, validated, ledger, erp, exceptions)
    try:
        drain(proc, validated)
    finally:
        proc.close()
    assert proc.stats.partials >= 4  # 2 timeouts + the refusal tried twice

    done = effects_by_key(ledger, "erp", {flaky, refused})
    assert done[flaky].status == "applied" and set(done[flaky].external_ref) >= {"sale",
                                                                                   "invoice"}
    assert done[flaky].attempts >= 3
    assert done[refused].status == "refused"
    assert set(done[refused].external_ref) == {"sale"}  # what was done, kept
    assert "period closed" in done[refused].detail
    # The sale was reused by every attempt: one sale per booking, one invoice per success.
    counts = erp.store.counts()
    assert counts["sale"] == validated.type_counts.get("order_booked", 0)
    posted = [i for i in erp.store.invoices.values()
              if i["total_minor"] >= 0 and i["state"] != "draft"]
    assert len(posted) == validated.type_counts.get("invoice_issued", 0) - 1
    # The refused invoice stays a draft in the ERP: visible to `revline reconcile`.
    assert counts["invoice"] == len(posted) + 1
    assert sink_exceptions_with(kafka_bootstrap, exceptions) == validated.refusable | {refused}


def sink_exceptions_with(bootstrap: str, topic: str) -> set[str]:
    from revline.core.readback import read_topic
    from revline.schemas import exception_codec

    codec = exception_codec()
    out = set()
    for msg in read_topic(bootstrap, topic, timeout=20):
        record = codec.decode(msg.value() or b"")
        assert (record["check_id"], record["owner"]) == ("sink.erp_refused", "integrations")
        out.add(record["idempotency_key"])
    return out
