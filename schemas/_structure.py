"""Structural rules of the wire contract that Avro cannot express.

A record that breaks one is schema-valid but cannot be a real event (an
amendment without a number, a payment that names no invoice); such records
are rejected by the publisher and dead-lettered by the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas._catalog import RECORD_NAMES

# Envelope references each event type must carry.
REQUIRED_REFS: dict[str, tuple[str, ...]] = {
    "order_amended": ("amendment_number",),
    "invoice_issued": ("invoice_id",),
    "payment_captured": ("invoice_id", "payment_id"),
    "refund_issued": ("payment_id",),
}
_NON_EMPTY = ("event_id", "idempotency_key", "order_id")


def structural_error(event: Mapping[str, Any]) -> str | None:
    """The first structural problem of a decoded event, or None."""
    envelope = event["envelope"]
    event_type = envelope["event_type"]
    if event_type not in RECORD_NAMES:
        return f"envelope.event_type {event_type!r} is not a canonical event type"
    for name in _NON_EMPTY:
        if not envelope[name]:
            return f"envelope.{name} is empty"
    for name in REQUIRED_REFS.get(event_type, ()):
        if envelope.get(name) is None or envelope.get(name) == "":
            return f"{event_type} requires envelope.{name}"
    if event_type == "order_amended" and envelope["amendment_number"] < 1:
        return "order_amended requires envelope.amendment_number >= 1"
    if event_type == "manual_override":
        for name in ("reason_code", "actor", "check_id", "target_idempotency_key"):
            if not event.get(name):
                return f"manual_override requires {name}"
    return None
