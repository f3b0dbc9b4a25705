"""Holds are judged by the stream: a backlog or an outage never times out a hold whose
releasing event is already on the topic; one that arrives after the deadline still does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from revline.operations.verify import finals_by_input
from revline.tools.isolated import IsolatedPipeline as Pipeline
from revline.tools.workload import Workload, WorkloadOptions, WorkloadRecord, generate
from tests.streams.test_worker_kafka import rules_with

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CLEAN = {"duplicates": 0, "conflicts": 0, "out_of_order": 0, "incomplete": 0, "off_policy": 0,
         "unknown_attribution": 0, "amount_mismatch": 0, "poison": 0}


def _paid_order(seed: int) -> tuple[Workload, list[WorkloadRecord], WorkloadRecord]:
    """One paid order: (workload, every record but its invoice, the invoice)."""
    for attempt in range(seed, seed + 50):
        workload = generate(WorkloadOptions(orders=1, seed=attempt, **CLEAN))
        kinds = [r.event_type for r in workload.records]
        if "invoice_issued" in kinds and "payment_captured" in kinds and \
                "order_cancelled" not in kinds:
            [invoice] = [r for r in workload.records if r.event_type == "invoice_issued"]
            return workload, [r for r in workload.records if r is not invoice], invoice
    raise AssertionError("no paid order generated")


def _payment_outcome(outcomes: list[dict[str, object]], order_id: str
                     ) -> dict[str, object] | None:
    finals = [o for v in finals_by_input(outcomes).values() for o in v]
    payments = [o for o in finals
                if o.get("event_type") == "payment_captured" and o.get("order_id") == order_id]
    return payments[0] if payments else None


def test_a_hold_whose_release_waits_in_the_backlog_is_released_not_timed_out(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(kafka_bootstrap, tmp_path,
                        rules_file=rules_with(tmp_path, hold_timeout_seconds=3))
    workload, before, invoice = _paid_order(5)
    # A backlog ahead of the invoice on the same (single) partition: after the restart
    # the worker needs seconds to read up to the invoice, long past the hold's deadline.
    backlog = generate(WorkloadOptions(orders=600, seed=77, **CLEAN))
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.publish(workload, before)  # the payment waits for its invoice
        pipeline.wait_for(lambda o: any(not x["final"] for x in o), 90, "the payment held")
        pipeline.stop_all()  # the worker is down (an outage) ...
        pipeline.publish(backlog)
        pipeline.publish(workload, [invoice])  # ... while the releasing invoice arrives
        time.sleep(5)  # longer than the hold timeout
        pipeline.start_worker()
        total = len(workload.records) + len(backlog.records)
        outcomes = pipeline.wait_for(
            lambda o: len(finals_by_input(o)) >= total, 180, "every outcome")
    finally:
        pipeline.stop_all()
    payment = _payment_outcome(outcomes, invoice.key)
    assert payment is not None
    assert payment["kind"] == "validated", payment
    assert payment["held"] and payment["released_by"] != "timeout"


def test_a_release_published_after_the_deadline_still_times_the_hold_out(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(kafka_bootstrap, tmp_path,
                        rules_file=rules_with(tmp_path, hold_timeout_seconds=2))
    workload, before, invoice = _paid_order(9)
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.publish(workload, before)
        outcomes = pipeline.wait_for(
            lambda o: _payment_outcome(o, invoice.key) is not None, 60, "the hold to time out")
        payment = _payment_outcome(outcomes, invoice.key)
        assert payment is not None and payment["kind"] == "exception"
        assert payment["check_id"] == "hold.timeout"
        pipeline.publish(workload, [invoice])
        outcomes = pipeline.wait_for(
            lambda o: len(finals_by_input(o)) >= len(workload.records), 60, "the invoice")
    finally:
        pipeline.stop_all()
    payment = _payment_outcome(outcomes, invoice.key)
    assert payment is not None and payment["check_id"] == "hold.timeout"
