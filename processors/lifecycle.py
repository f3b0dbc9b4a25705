"""The order lifecycle, stated once: the states an order passes through and what each accepts.

docs/lifecycle.md is the prose of this table. The QA check ``lifecycle`` (in
``revline.processors.checks``) enforces it, so an event the ERP or the ledger would refuse
because of where the order stands fails QA with its own check id, owner and severity
instead of reaching a sink. A state is derived from the facts ``OrderState`` keeps
about accepted events; an event that ended in an exception never moves an order.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Stage(StrEnum):
    NONE = "none"  # nothing accepted yet (only a booking, an approval or an override is judged)
    BOOKED = "booked"
    AMENDED = "amended"
    INVOICED = "invoiced"  # in part or in full
    PAID = "paid"  # in part or in full
    REFUNDED = "refunded"  # in part or in full
    CANCELLED = "cancelled"  # terminal


# What arrives in which stage. Everything else in a stage is refused with the check id
# that REFUSED names; an event type missing from both is accepted. Events whose
# dependencies (see order_state.depends_on) have not arrived never get here: they wait.
_ANYTIME = frozenset({"discount_approved", "manual_override"})
_OPEN = _ANYTIME | {
    "order_amended", "fulfilment_confirmed", "invoice_issued", "order_cancelled",
    "payment_captured", "refund_issued",
}
_BILLED = _ANYTIME | {
    "fulfilment_confirmed", "invoice_issued", "order_cancelled", "payment_captured",
    "refund_issued",
}
ACCEPTS: Mapping[Stage, frozenset[str]] = {
    Stage.NONE: _ANYTIME | {"order_booked"},
    Stage.BOOKED: _OPEN,
    Stage.AMENDED: _OPEN,
    Stage.INVOICED: _BILLED,
    Stage.PAID: _BILLED,
    Stage.REFUNDED: _BILLED,
    Stage.CANCELLED: _ANYTIME | {"refund_issued"},
}

# Why an event is refused in a stage: (check id, what the reason says).
_AFTER_CANCELLATION = ("lifecycle.after_cancellation", "the order is cancelled")
REFUSED: Mapping[tuple[Stage, str], tuple[str, str]] = {
    **{(stage, "order_booked"): ("lifecycle.already_booked", "the order is already booked")
       for stage in Stage if stage not in (Stage.NONE, Stage.CANCELLED)},
    (Stage.CANCELLED, "order_booked"): _AFTER_CANCELLATION,
    **{(stage, "order_amended"): (
        "lifecycle.amend_after_invoice",
        "the order is already invoiced; the ERP does not change a confirmed sale "
        "(credit it and book a new order)",
    ) for stage in (Stage.INVOICED, Stage.PAID, Stage.REFUNDED)},
    **{(Stage.CANCELLED, kind): _AFTER_CANCELLATION for kind in (
        "order_amended", "fulfilment_confirmed", "invoice_issued", "order_cancelled",
        "payment_captured",
    )},
}


def stage_of(data: Mapping[str, Any]) -> Stage:
    """The stage of an order, from ``OrderState.data``."""
    if data["cancelled"]:
        return Stage.CANCELLED
    payments = data["payments"]
    if payments:
        for p in payments.values():  # a loop, not any(): no generator per judged input
            if p["refunded"]:
                return Stage.REFUNDED
        return Stage.PAID
    if data["invoices"]:
        return Stage.INVOICED
    versions = data["versions"]
    if len(versions) > 1:
        return Stage.AMENDED
    return Stage.BOOKED if "0" in versions else Stage.NONE


def refusal(stage: Stage, event_type: str) -> tuple[str, str] | None:
    """(check id, why) when ``stage`` does not accept ``event_type``, else None."""
    if event_type in ACCEPTS[stage]:
        return None
    return REFUSED.get((stage, event_type))


def latest_amendment(data: Mapping[str, Any]) -> int | None:
    """The number of the order's latest accepted amendment; None when there is none."""
    numbers = [int(n) for n in data["versions"] if n != "0"]
    return max(numbers) if numbers else None
