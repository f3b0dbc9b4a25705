"""The workload generator is deterministic and its manifest is self-consistent."""

from __future__ import annotations

from collections import Counter

from revline.schemas import EventDeserializer, EventSerializer, validate_event
from revline.tools.workload import WorkloadOptions, generate

OPTIONS = WorkloadOptions(orders=400, seed=11, orphans=2, poison=0.01)


def test_same_seed_same_workload() -> None:
    a, b = generate(OPTIONS), generate(OPTIONS)
    assert a.manifest() == b.manifest()
    assert list(a.json_lines()) == list(b.json_lines())
    assert generate(WorkloadOptions(orders=400, seed=12)).manifest() != a.manifest()


def test_every_kind_of_input_is_present() -> None:
    workload = generate(OPTIONS)
    outcomes = Counter(r.expect.outcome for r in workload.records)
    assert set(outcomes) == {"validated", "duplicate", "exception", "dead_letter"}
    checks = {r.expect.check_id for r in workload.records if r.expect.check_id}
    assert {"dependency.blocked", "dedup.conflict", "hold.timeout"} <= checks
    assert any(c.startswith("completeness.") for c in checks)
    assert any(c.startswith("policy.") for c in checks)
    assert any(c.startswith("reconciliation.") for c in checks)
    assert any(r.expect.warnings for r in workload.records)
    assert sum(r.expect.held for r in workload.records) > 0
    stages = {r.expect.stage for r in workload.records if r.expect.outcome == "dead_letter"}
    assert stages == {"decode", "schema", "structure"}
    types = {r.event_type for r in workload.records if r.event}
    assert types >= {
        "order_booked", "discount_approved", "order_amended", "order_cancelled",
        "fulfilment_confirmed", "invoice_issued", "payment_captured", "refund_issued",
    }


def test_events_are_valid_publisher_input_and_round_trip() -> None:
    import json

    workload = generate(OPTIONS)
    encode, decode = EventSerializer(), EventDeserializer()
    for line, rec in zip(workload.json_lines(), workload.records, strict=True):
        if rec.event is None:
            assert "__raw__" in json.loads(line)
            continue
        canonical = validate_event(json.loads(line))
        assert canonical == rec.event
        assert decode.decode(encode(canonical)) == rec.event


def test_manifest_totals_follow_validated_money_events() -> None:
    workload = generate(OPTIONS)
    for order_id, totals in workload.orders.items():
        records = [r for r in workload.records if r.key == order_id and r.event]
        paid = sum(
            r.event["amount_minor"]
            for r in records
            if r.event_type == "payment_captured" and r.expect.outcome == "validated"
        )
        assert paid == totals.paid_minor
        assert totals.refunded_minor <= totals.paid_minor
        if totals.invoiced_minor:
            assert totals.paid_minor <= totals.invoiced_minor


def test_duplicates_always_follow_their_original() -> None:
    workload = generate(OPTIONS)
    first: dict[str, int] = {}
    for rec in workload.records:
        if rec.event is None:
            continue
        key = rec.idempotency_key
        assert key is not None
        if rec.expect.outcome == "duplicate" or rec.expect.check_id == "dedup.conflict":
            assert key in first
        else:
            first.setdefault(key, rec.seq)


def test_held_events_have_a_later_dependency() -> None:
    workload = generate(OPTIONS)
    for rec in workload.records:
        if rec.expect.held and rec.expect.check_id != "hold.timeout":
            assert rec.deps
