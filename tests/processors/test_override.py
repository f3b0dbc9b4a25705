"""Manual overrides in the engine: stored when valid, used once judged, flagged when not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from revline.processors import (
    DEAD_LETTER,
    EXCEPTION,
    HELD,
    REENTRY_HEADER,
    REPLAYED,
    VALIDATED,
    Decision,
    InputRecord,
    OrderState,
)
from revline.processors.engine import OVERRIDE_APPLIED
from revline.schemas import EventSerializer, validate_event
from tests.processors.test_engine_manifest import make_engine

ENGINE = make_engine()
ENCODE = EventSerializer()
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
ORDER = "SO-77"


def booking(discount_minor: int = 22080, sku: str = "SKU-CRM-PRO",
            key: str = f"{ORDER}:booked") -> dict[str, Any]:
    quantity, price = 2, 110400
    subtotal = quantity * price - discount_minor
    return validate_event({
        "envelope": {"event_type": "order_booked", "idempotency_key": key, "order_id": ORDER,
                     "sequence": 1, "occurred_at": "2026-11-24T09:00:00Z",
                     "source_system": "salesforce", "source_record_id": "006"},
        "booking_kind": "DEAL_CLOSED", "customer_id": "C-1", "currency": "EUR",
        "lines": [{"line_id": "L1", "sku": sku, "quantity": quantity, "unit_price_minor": price,
                   "discount_minor": discount_minor, "campaign_id": None, "channel_id": None}],
        "tax_minor": 0, "total_minor": subtotal,
    })


def amendment(discount_minor: int) -> dict[str, Any]:
    quantity, price = 3, 110400
    subtotal = quantity * price - discount_minor
    return validate_event({
        "envelope": {"event_type": "order_amended", "idempotency_key": f"{ORDER}:amend:1",
                     "order_id": ORDER, "sequence": 2, "occurred_at": "2026-11-24T10:00:00Z",
                     "source_system": "salesforce", "source_record_id": "006-A1",
                     "amendment_number": 1},
        "reason": "seats", "currency": "EUR",
        "lines": [{"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": quantity,
                   "unit_price_minor": price, "discount_minor": discount_minor}],
        "tax_minor": 0, "total_minor": subtotal,
    })


def override(check_id: str = "policy.discount", target: str = f"{ORDER}:booked",
             expires: datetime = NOW + timedelta(days=1), reason_code: str = "APPROVED_OFFLINE",
             n: int = 1) -> dict[str, Any]:
    event = validate_event({
        "envelope": {"event_type": "manual_override", "idempotency_key": f"{ORDER}:override:{n}",
                     "order_id": ORDER, "sequence": 0, "occurred_at": NOW.isoformat(),
                     "source_system": "revline-cli", "source_record_id": f"OVR-{n}"},
        "override_id": f"OVR-{n}", "target_idempotency_key": target, "check_id": check_id,
        "reason_code": "X", "actor": "ana@example.com", "expires_at": expires.isoformat(),
        "note": None,
    })
    event["reason_code"] = reason_code  # an upstream producer may skip validation
    return event


class Feed:
    """One order's inputs, at increasing offsets, through the engine."""

    def __init__(self) -> None:
        self.state = OrderState()
        self.offset = 0

    def send(self, event: dict[str, Any], now_ms: int = NOW_MS,
             headers: tuple[tuple[str, bytes], ...] = ()) -> list[Decision]:
        self.offset += 1
        return self.send_record(InputRecord("in", 0, self.offset, ORDER.encode(), ENCODE(event),
                                            headers=headers), now_ms)

    def send_record(self, record: InputRecord, now_ms: int = NOW_MS) -> list[Decision]:
        decoded, dead = ENGINE.decode(record, now_ms)
        if dead is not None:
            return [dead]
        assert decoded is not None
        return ENGINE.process(self.state, record, decoded, now_ms)


def test_override_first_then_the_off_policy_event_passes_and_says_why() -> None:
    feed = Feed()
    [o] = feed.send(override())
    assert o.kind == VALIDATED and o.warnings == ()
    [d] = feed.send(booking(discount_minor=110400))  # 50 % off: beyond the 20 % tolerance
    assert d.kind == VALIDATED
    assert d.warnings == (OVERRIDE_APPLIED,)
    assert "policy.discount" in d.reason and "OVR-1" in d.reason and "APPROVED_OFFLINE" in d.reason
    assert d.findings == ()  # nothing advisory left: no exception record
    assert ENGINE.rules.spec(OVERRIDE_APPLIED).severity == "P3"  # metrics can label it


def test_failed_event_passes_on_reentry_after_an_override_and_replays_stay_replays() -> None:
    feed = Feed()
    [failed] = feed.send(booking(discount_minor=110400))
    assert failed.kind == EXCEPTION and failed.check_id == "policy.discount"
    original = failed.input
    [o] = feed.send(override())
    assert o.kind == VALIDATED
    # Re-driven: the original bytes at new coordinates with the re-entry header.
    redriven = InputRecord("in", 0, 99, original.key, original.value,
                           headers=((REENTRY_HEADER, (failed.exception_id or "").encode()),))
    [again] = feed.send_record(redriven)
    assert again.kind == VALIDATED and again.warnings == (OVERRIDE_APPLIED,)
    assert feed.state.token("booked") is True  # dependents are no longer blocked
    assert feed.send_record(redriven)[0].kind == REPLAYED
    assert feed.send_record(original)[0].kind == REPLAYED
    assert feed.send_record(o.input)[0].kind == REPLAYED


def test_override_of_another_check_or_event_does_not_help() -> None:
    feed = Feed()
    feed.send(override(check_id="policy.price"))
    feed.send(override(check_id="policy.discount", target=f"{ORDER}:other", n=2))
    [d] = feed.send(booking(discount_minor=110400))
    assert d.kind == EXCEPTION and d.check_id == "policy.discount"


def test_override_that_expired_before_use_is_not_applied() -> None:
    feed = Feed()
    feed.send(override(expires=NOW + timedelta(minutes=5)))
    [d] = feed.send(booking(discount_minor=110400), now_ms=NOW_MS + 6 * 60_000)
    assert d.kind == EXCEPTION and d.check_id == "policy.discount"


def test_override_arriving_expired_is_an_exception_for_finance_and_not_stored() -> None:
    feed = Feed()
    [o] = feed.send(override(expires=NOW - timedelta(hours=1)))
    assert (o.kind, o.check_id, o.owner) == (EXCEPTION, "override.expired", "finance")
    assert "expired" in o.reason
    assert "overrides" not in feed.state.data
    [d] = feed.send(booking(discount_minor=110400))
    assert d.kind == EXCEPTION


def test_reasonless_override_is_an_owned_exception_not_a_dead_letter() -> None:
    for reason in ("", "   "):
        feed = Feed()
        [o] = feed.send(override(reason_code=reason))
        assert o.kind != DEAD_LETTER
        assert (o.kind, o.check_id, o.owner) == (EXCEPTION, "override.reason_missing", "finance")
        assert "overrides" not in feed.state.data
    # Other structural problems of an override still dead-letter.
    broken = override()
    broken["actor"] = ""
    [dead] = Feed().send(broken)
    assert dead.kind == DEAD_LETTER and dead.stage == "structure"


def test_held_event_gets_the_override_when_released() -> None:
    feed = Feed()
    [held] = feed.send(amendment(discount_minor=300_000))  # ~90 % off, before its booking
    assert held.kind == HELD
    feed.send(override(target=f"{ORDER}:amend:1"))
    decisions = feed.send(booking())
    kinds = {d.input.offset: (d.kind, d.warnings) for d in decisions}
    assert kinds[3] == (VALIDATED, ())  # the booking
    assert kinds[1] == (VALIDATED, (OVERRIDE_APPLIED,))  # the amendment, released
    assert next(d for d in decisions if d.input.offset == 1).held


def test_overriding_completeness_lets_later_checks_run_without_crashing() -> None:
    # Waiving the unknown SKU vouches for the SKU, not for its price and discount, which
    # nothing can check without a list price: those need their own override.
    feed = Feed()
    feed.send(override(check_id="completeness.sku"))
    [d] = feed.send(booking(sku="SKU-NOT-IN-CATALOG"))
    assert d.kind == EXCEPTION and d.check_id == "policy.price"
    assert "cannot be checked" in d.reason
    feed = Feed()
    feed.send(override(check_id="completeness.sku"))
    feed.send(override(check_id="policy.price", n=2))
    [d] = feed.send(booking(sku="SKU-NOT-IN-CATALOG"))
    assert d.kind == VALIDATED and d.warnings == (OVERRIDE_APPLIED,)
    # Without the override the unknown SKU is still an exception.
    [plain] = Feed().send(booking(sku="SKU-NOT-IN-CATALOG"))
    assert plain.kind == EXCEPTION and plain.check_id == "completeness.sku"


def test_orders_without_overrides_carry_no_override_state() -> None:
    feed = Feed()
    feed.send(booking())
    assert "overrides" not in feed.state.data


def test_an_override_cannot_waive_another_overrides_refusal() -> None:
    # Override 1 would waive override 2's missing reason code; override 2 would then
    # waive the discount. The refusal is not a person's call: override 1 is refused and
    # override 2 stays unapplied, so the discount is still an exception.
    feed = Feed()
    [first] = feed.send(override(check_id="override.reason_missing",
                                 target=f"{ORDER}:override:2", n=1))
    assert first.kind == EXCEPTION and first.check_id == "override.not_waivable"
    [second] = feed.send(override(reason_code="", n=2))
    assert second.kind == EXCEPTION and second.check_id == "override.reason_missing"
    [d] = feed.send(booking(discount_minor=150_000))
    assert d.kind == EXCEPTION and d.check_id == "policy.discount"
