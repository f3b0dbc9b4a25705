"""The publisher's edge validation names the bad field and keeps business rules for QA."""

from __future__ import annotations

import copy

import pytest

from revline.schemas import EventValidationError, validate_event

BOOKED = {
    "envelope": {
        "event_type": "order_booked",
        "idempotency_key": "SO-1:booked",
        "order_id": "SO-1",
        "occurred_at": "2026-11-24T09:30:00Z",
        "source_system": "salesforce",
        "source_record_id": "006Hs00001",
    },
    "booking_kind": "DEAL_CLOSED",
    "customer_id": "CUST-1",
    "currency": "EUR",
    "lines": [
        {"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": 2, "unit_price_minor": 110400}
    ],
    "tax_minor": 44160,
    "total_minor": 264960,
}


def test_defaults_are_filled_in() -> None:
    event = validate_event(copy.deepcopy(BOOKED))
    env = event["envelope"]
    assert env["schema_version"] == 1 and len(env["event_id"]) == 36
    assert env["occurred_at"].tzinfo is not None
    assert event["lines"][0]["discount_minor"] == 0


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda e: e["envelope"].pop("order_id"), "envelope.order_id: Field required"),
        (lambda e: e["envelope"].update(occurred_at="yesterday"), "envelope.occurred_at"),
        (lambda e: e["envelope"].update(occurred_at="2026-11-24T09:30:00"), "timezone"),
        (lambda e: e["lines"][0].update(quantity="two"), "lines.0.quantity"),
        (lambda e: e.update(colour="blue"), "colour: Extra inputs are not permitted"),
        (lambda e: e["envelope"].update(event_type="order_teleported"), "not one of"),
        (lambda e: e["envelope"].update(schema_version=9), "has no version 9"),
    ],
)
def test_bad_fields_are_named(mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    event = copy.deepcopy(BOOKED)
    mutate(event)
    with pytest.raises(EventValidationError) as info:
        validate_event(event)
    assert expected in str(info.value)


def test_business_rules_are_left_to_the_qa_checks() -> None:
    event = copy.deepcopy(BOOKED)
    event["currency"] = "XBZ"
    event["lines"][0]["sku"] = "NOPE"
    event["lines"][0]["quantity"] = -1
    assert validate_event(event)["currency"] == "XBZ"


def test_structure_is_enforced_at_the_edge() -> None:
    payment = {
        "envelope": {**BOOKED["envelope"], "event_type": "payment_captured",
                     "idempotency_key": "SO-1:capture:1", "payment_id": "PAY-1"},
        "currency": "EUR", "amount_minor": 100, "method": "card", "processor_ref": "ch_1",
    }
    with pytest.raises(EventValidationError, match=r"requires envelope\.invoice_id"):
        validate_event(payment)


def test_manual_override_needs_reason_actor_and_expiry() -> None:
    override = {
        "envelope": {**BOOKED["envelope"], "event_type": "manual_override",
                     "idempotency_key": "SO-1:override:1"},
        "override_id": "OVR-1", "target_idempotency_key": "SO-1:booked",
        "check_id": "policy.discount", "reason_code": "", "actor": "ana@example.com",
    }
    with pytest.raises(EventValidationError) as info:
        validate_event(override)
    text = str(info.value)
    assert "reason_code" in text and "expires_at: Field required" in text
