"""The order lifecycle (processors/lifecycle.py, docs/lifecycle.md) as QA enforces it.

Each case is one order's inputs in delivery order and the outcome each must get:
``V`` validated, ``D`` duplicate, ``H`` held (no final decision yet), or a check id
(an exception with that primary check).
"""

from __future__ import annotations

from typing import Any

import pytest

from revline.processors import EXCEPTION, HELD, VALIDATED, Decision, InputRecord, OrderState
from revline.processors.lifecycle import ACCEPTS, REFUSED, Stage, refusal, stage_of
from revline.schemas import EventSerializer, validate_event
from tests.processors.test_engine_manifest import make_engine

ENGINE = make_engine()
ENCODE = EventSerializer()
NOW_MS = 1_764_000_000_000
ORDER = "SO-LC"
PRICE = 110400  # SKU-CRM-PRO's EUR list price


def _env(kind: str, key: str, seq: int, **refs: Any) -> dict[str, Any]:
    return {"event_type": kind, "idempotency_key": f"{ORDER}:{key}", "order_id": ORDER,
            "sequence": seq, "occurred_at": "2026-11-24T09:00:00Z",
            "source_system": "test", "source_record_id": key, **refs}


def _lines(qty: int) -> list[dict[str, Any]]:
    return [{"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": qty, "unit_price_minor": PRICE,
             "discount_minor": 0, "campaign_id": None, "channel_id": None}]


def book(qty: int = 2, key: str = "booked", currency: str = "EUR") -> dict[str, Any]:
    return validate_event({"envelope": _env("order_booked", key, 1), "booking_kind": "DEAL_CLOSED",
                           "customer_id": "C-1", "currency": currency, "lines": _lines(qty),
                           "tax_minor": 0, "total_minor": qty * PRICE})


def amend(n: int, qty: int, currency: str = "EUR", key: str | None = None) -> dict[str, Any]:
    return validate_event({"envelope": _env("order_amended", key or f"amend:{n}", 1 + n,
                                            amendment_number=n),
                           "reason": "seats", "currency": currency, "lines": _lines(qty),
                           "tax_minor": 0, "total_minor": qty * PRICE})


def invoice(inv: str, qty: int, amendment: int | None = None, currency: str = "EUR",
            key: str | None = None) -> dict[str, Any]:
    return validate_event({
        "envelope": _env("invoice_issued", key or f"invoice:{inv}", 10, invoice_id=inv,
                         amendment_number=amendment),
        "currency": currency, "lines": _lines(qty), "subtotal_minor": qty * PRICE,
        "tax_minor": 0, "total_minor": qty * PRICE, "due_at": "2026-12-24T00:00:00Z"})


def pay(pid: str, inv: str, amount: int, currency: str = "EUR",
        key: str | None = None) -> dict[str, Any]:
    return validate_event({
        "envelope": _env("payment_captured", key or f"capture:{pid}", 20, invoice_id=inv,
                         payment_id=pid),
        "currency": currency, "amount_minor": amount, "method": "card", "processor_ref": pid})


def refund(rid: str, pid: str, amount: int, key: str | None = None) -> dict[str, Any]:
    return validate_event({
        "envelope": _env("refund_issued", key or f"refund:{rid}", 30, payment_id=pid),
        "refund_id": rid, "currency": "EUR", "amount_minor": amount, "reason": "goodwill"})


def cancel(key: str = "cancelled") -> dict[str, Any]:
    return validate_event({"envelope": _env("order_cancelled", key, 40), "reason": "churn"})


def fulfil(fid: str = "F1") -> dict[str, Any]:
    return validate_event({"envelope": _env("fulfilment_confirmed", f"fulfil:{fid}", 5),
                           "fulfilment_id": fid,
                           "shipments": [{"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": 1}],
                           "partial": True, "carrier": None})


def run(events: list[dict[str, Any]]) -> dict[int, str]:
    """Outcome per input (its position), as V / D / H / check id."""
    state = OrderState()
    out: dict[int, str] = {}
    for n, event in enumerate(events):
        record = InputRecord("in", 0, n, ORDER.encode(), ENCODE(event))
        decoded, dead = ENGINE.decode(record, NOW_MS)
        decisions: list[Decision] = [dead] if dead else ENGINE.process(
            state, record, decoded or {}, NOW_MS)
        for d in decisions:
            out[d.input.offset] = (
                "V" if d.kind == VALIDATED else "H" if d.kind == HELD
                else str(d.check_id) if d.kind == EXCEPTION else d.kind[0].upper()
            )
    return out


TOTAL = 2 * PRICE
CASES: dict[str, tuple[list[dict[str, Any]], list[str]]] = {
    "deposit and balance": (
        [book(), invoice("I1", 1), invoice("I2", 1), pay("P1", "I1", PRICE),
         pay("P2", "I2", PRICE)], ["V"] * 5),
    "three invoices per shipment, the third over the order": (
        [book(qty=2), invoice("I1", 1), invoice("I2", 1), invoice("I3", 1)],
        ["V", "V", "V", "reconciliation.invoice_total"]),
    "partial captures up to the invoice, then one too many": (
        [book(), invoice("I1", 2), pay("P1", "I1", PRICE), pay("P2", "I1", PRICE),
         pay("P3", "I1", 1)], ["V", "V", "V", "V", "reconciliation.payment_balance"]),
    "zero capture and zero refund": (
        [book(), invoice("I1", 2), pay("P1", "I1", 0), pay("P2", "I1", TOTAL),
         refund("R1", "P2", 0)],
        ["V", "V", "completeness.amounts", "V", "completeness.amounts"]),
    "refunds up to what was captured": (
        [book(), invoice("I1", 2), pay("P1", "I1", TOTAL), refund("R1", "P1", PRICE),
         refund("R2", "P1", PRICE), refund("R3", "P1", 1)],
        ["V", "V", "V", "V", "V", "reconciliation.refund_balance"]),
    "second booking under another key": (
        [book(), book(qty=3, key="booked-again"), invoice("I1", 2)],
        ["V", "lifecycle.already_booked", "V"]),
    "a refused second booking does not block the order": (
        [book(key="b2", qty=3), book(), amend(1, 4)],
        ["V", "lifecycle.already_booked", "V"]),
    "events after a cancellation": (
        [book(), invoice("I1", 1), pay("P1", "I1", PRICE), cancel(), invoice("I2", 1),
         pay("P2", "I1", 1), amend(1, 3), fulfil(), cancel(key="cancel-again"),
         refund("R1", "P1", PRICE)],
        ["V", "V", "V", "V", "lifecycle.after_cancellation", "lifecycle.after_cancellation",
         "lifecycle.after_cancellation", "lifecycle.after_cancellation",
         "lifecycle.after_cancellation", "V"]),
    "amendment after an invoice": (
        [book(), invoice("I1", 1), amend(1, 3)], ["V", "V", "lifecycle.amend_after_invoice"]),
    "invoice billing a stale version": (
        [book(), amend(1, 3), amend(2, 4), invoice("I1", 3, amendment=1),
         invoice("I2", 2)],
        ["V", "V", "V", "lifecycle.stale_version", "lifecycle.stale_version"]),
    "invoice against the amended total": (
        [book(qty=2), amend(1, 4), invoice("I1", 3, amendment=1),
         invoice("I2", 1, amendment=1)], ["V", "V", "V", "V"]),
    "currency switches": (
        [book(), amend(1, 3, currency="USD"), invoice("I1", 2, currency="USD"),
         invoice("I2", 2), pay("P1", "I2", 10, currency="USD")],
        ["V", "reconciliation.currency", "reconciliation.currency", "V",
         "reconciliation.currency"]),
    "fulfilment before booking waits for it": (
        [fulfil(), book()], ["V", "V"]),
    "reused invoice id under another key": (
        [book(qty=4), invoice("I1", 1), invoice("I1", 1, key="other-invoice"),
         pay("P1", "I1", PRICE)],
        ["V", "V", "lifecycle.reused_reference", "V"]),
    "reused payment id under another key": (
        [book(), invoice("I1", 2), pay("P1", "I1", 1), pay("P1", "I1", 1, key="other-pay")],
        ["V", "V", "V", "lifecycle.reused_reference"]),
    "reused amendment number under another key": (
        [book(), amend(1, 3), amend(1, 4, key="amend-again")],
        ["V", "V", "lifecycle.reused_reference"]),
    "exact re-send is a duplicate, not a reuse": (
        [book(), book()], ["V", "D"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lifecycle_outcomes(name: str) -> None:
    events, expected = CASES[name]
    outcomes = run(events)
    assert [outcomes.get(n, "H") for n in range(len(events))] == expected


def test_every_refusal_in_the_table_has_a_check_in_the_rules() -> None:
    for check_id, _why in REFUSED.values():
        assert ENGINE.rules.spec(check_id).owner
    for check in ("lifecycle.reused_reference", "lifecycle.stale_version",
                  "override.not_waivable"):
        assert ENGINE.rules.spec(check).severity in ("P1", "P2")


def test_every_stage_either_accepts_or_names_why_for_each_judged_event_type() -> None:
    judged = {"order_booked", "order_amended", "order_cancelled", "fulfilment_confirmed",
              "invoice_issued", "payment_captured", "refund_issued", "discount_approved",
              "manual_override"}
    for stage in Stage:
        if stage is Stage.NONE:
            continue  # before a booking, everything else waits for it (a dependency)
        for kind in judged:
            assert kind in ACCEPTS[stage] or refusal(stage, kind) is not None, (stage, kind)


def test_stage_is_derived_from_accepted_facts_only() -> None:
    state = OrderState()
    assert stage_of(state.data) is Stage.NONE
    state.data["versions"]["0"] = {"total": 1, "currency": "EUR"}
    assert stage_of(state.data) is Stage.BOOKED
    state.data["versions"]["1"] = {"total": 1, "currency": "EUR"}
    assert stage_of(state.data) is Stage.AMENDED
    state.data["invoices"]["I"] = {"total": 1, "currency": "EUR", "captured": 0}
    assert stage_of(state.data) is Stage.INVOICED
    state.data["payments"]["P"] = {"amount": 1, "currency": "EUR", "refunded": 0}
    assert stage_of(state.data) is Stage.PAID
    state.data["payments"]["P"]["refunded"] = 1
    assert stage_of(state.data) is Stage.REFUNDED
    state.data["cancelled"] = True
    assert stage_of(state.data) is Stage.CANCELLED


def test_an_override_cannot_waive_a_money_check() -> None:
    from tests.processors.test_override import Feed, override
    feed = Feed()
    [o] = feed.send(override(check_id="reconciliation.invoice_total"))
    assert o.kind == EXCEPTION and o.check_id == "override.not_waivable"
    [o2] = feed.send(override(check_id="lifecycle.after_cancellation", n=2))
    assert o2.kind == EXCEPTION and o2.check_id == "override.not_waivable"


@pytest.mark.parametrize("bad", ["SO\x00-1", "SO\n1", "SO\x7f", "x" * 513])
def test_ids_with_control_characters_or_too_long_are_dead_lettered(bad: str) -> None:
    event = book()
    event["envelope"]["order_id"] = bad
    record = InputRecord("in", 0, 0, bad.encode(), ENCODE(event))
    _, dead = ENGINE.decode(record, NOW_MS)
    assert dead is not None and dead.stage == "structure"
    assert "order_id" in dead.reason


@pytest.mark.parametrize("odd", ["SO-[1]", "SO-%41", "SO-\"q'", "SO-é-😀", "x" * 512])
def test_ids_with_odd_printable_characters_are_accepted(odd: str) -> None:
    event = book()
    event["envelope"]["order_id"] = odd
    record = InputRecord("in", 0, 0, odd.encode(), ENCODE(event))
    decoded, dead = ENGINE.decode(record, NOW_MS)
    assert dead is None and decoded is not None
    [d] = ENGINE.process(OrderState(), record, decoded, NOW_MS)
    assert d.kind == VALIDATED


def test_an_event_too_large_to_hold_is_an_exception_not_an_unwritable_state() -> None:
    from revline.processors.engine import HELD_BYTES_PER_ORDER

    state = OrderState()
    payment = pay("P1", "I1", PRICE)
    payment["processor_ref"] = "x" * (HELD_BYTES_PER_ORDER // 2)
    decisions: list[Decision] = []
    for n, event in enumerate([payment, pay("P2", "I1", 1, key="p2")]):
        record = InputRecord("in", 0, n, ORDER.encode(), ENCODE(event))
        decoded, _ = ENGINE.decode(record, NOW_MS)
        decisions += ENGINE.process(state, record, decoded or {}, NOW_MS)
    assert [d.kind for d in decisions] == [HELD, HELD]  # 1/2 of the budget (as base64 2/3)
    third = pay("P3", "I1", 1, key="p3")
    third["processor_ref"] = "y" * (HELD_BYTES_PER_ORDER // 2)
    record = InputRecord("in", 0, 9, ORDER.encode(), ENCODE(third))
    decoded, _ = ENGINE.decode(record, NOW_MS)
    [d] = ENGINE.process(state, record, decoded or {}, NOW_MS)
    assert d.kind == EXCEPTION and d.check_id == "hold.oversized"
    assert len(state.held) == 2


def test_a_hold_expires_only_if_held_by_the_checked_cutoff() -> None:
    state = OrderState()
    held = []
    for n, (event, at) in enumerate([(pay("P1", "I1", 1), 0), (pay("P2", "I2", 1), 60_000)]):
        record = InputRecord("in", 0, n, ORDER.encode(), ENCODE(event))
        decoded, _ = ENGINE.decode(record, at)
        held += ENGINE.process(state, record, decoded or {}, at)
    assert [d.kind for d in held] == [HELD, HELD]
    late = 10**9  # both are past the timeout by now
    # The worker read up to what was on the topic when P1 came due, not yet P2's.
    [expired] = ENGINE.expire_holds(state, late, held_since_ms=0)
    assert expired.check_id == "hold.timeout" and expired.input.offset == 0
    assert [h["offset"] for h in state.held] == [1]


def test_ids_are_bounded_in_utf8_bytes_too() -> None:
    event = book()
    event["envelope"]["idempotency_key"] = "注" * 512  # 512 characters, 1,536 bytes
    record = InputRecord("in", 0, 0, ORDER.encode(), ENCODE(event))
    _, dead = ENGINE.decode(record, NOW_MS)
    assert dead is not None and "bytes" in dead.reason
