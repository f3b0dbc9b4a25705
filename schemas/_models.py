"""Pydantic models of the public edge: JSON lines accepted by ``revline publish``
and the ``Publisher`` API. They check structure and types only; business rules
(known SKU, valid currency, non-negative amounts, policy) are the pipeline's QA
checks, so a bad value still reaches them and becomes an owned exception.

These models are not used on the per-event hot path.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
)

from revline.schemas._catalog import default_catalog
from revline.schemas._structure import structural_error


def _to_datetime(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a timestamp is an ISO 8601 string or epoch milliseconds, not a boolean")
    if isinstance(value, int):
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"epoch milliseconds {value} are out of range "
                             "(years 1 to 9999)") from None
    return value


def _require_tz(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp needs a timezone, e.g. 2026-11-24T09:30:00Z")
    try:  # the wire carries epoch milliseconds: the moment must have one
        value.astimezone(UTC).timestamp()
    except (OverflowError, OSError, ValueError):
        raise ValueError("timestamp is out of range in UTC") from None
    return value


# ISO-8601 with a timezone, or epoch milliseconds.
Timestamp = Annotated[datetime, BeforeValidator(_to_datetime), AfterValidator(_require_tz)]
NonEmpty = Annotated[str, Field(min_length=1)]
# JSON integers only (no strings, floats such as 238464.0, or booleans), in the range of
# the Avro type they are written as: money, sequence and counts are never rounded or guessed.
Long = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Int32 = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


EventType = Literal[
    "order_booked",
    "discount_approved",
    "order_amended",
    "order_cancelled",
    "fulfilment_confirmed",
    "invoice_issued",
    "payment_captured",
    "refund_issued",
    "manual_override",
]


class EnvelopeIn(_Strict):
    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    event_type: EventType
    schema_version: Int32 | None = None
    idempotency_key: NonEmpty
    order_id: NonEmpty
    sequence: Long = 0
    occurred_at: Timestamp
    source_system: str
    source_record_id: str
    owner: str | None = None
    amendment_number: Int32 | None = None
    invoice_id: str | None = None
    payment_id: str | None = None


class LineIn(_Strict):
    line_id: NonEmpty
    sku: str
    quantity: Int32
    unit_price_minor: Long
    discount_minor: Long = 0
    approval_id: str | None = None
    campaign_id: str | None = None
    channel_id: str | None = None


class ShippedLineIn(_Strict):
    line_id: NonEmpty
    sku: str
    quantity: Int32


class _Event(_Strict):
    envelope: EnvelopeIn


class OrderBookedIn(_Event):
    booking_kind: Literal["DEAL_CLOSED", "QUOTE_ACCEPTED", "CONTRACT_SIGNED", "STOREFRONT_ORDER"]
    customer_id: NonEmpty
    currency: str
    lines: list[LineIn]
    tax_minor: Long
    total_minor: Long


class DiscountApprovedIn(_Event):
    approval_id: NonEmpty
    sku: NonEmpty
    max_discount_bps: Int32
    approver: NonEmpty


class OrderAmendedIn(_Event):
    reason: str
    currency: str
    lines: list[LineIn]
    tax_minor: Long
    total_minor: Long


class OrderCancelledIn(_Event):
    reason: str


class FulfilmentConfirmedIn(_Event):
    fulfilment_id: NonEmpty
    shipments: list[ShippedLineIn]
    partial: StrictBool
    carrier: str | None = None


class InvoiceIssuedIn(_Event):
    currency: str
    lines: list[LineIn]
    subtotal_minor: Long
    tax_minor: Long
    total_minor: Long
    due_at: Timestamp


class PaymentCapturedIn(_Event):
    currency: str
    amount_minor: Long
    method: NonEmpty
    processor_ref: NonEmpty


class RefundIssuedIn(_Event):
    refund_id: NonEmpty
    currency: str
    amount_minor: Long
    reason: str


class ManualOverrideIn(_Event):
    override_id: NonEmpty
    target_idempotency_key: NonEmpty
    check_id: NonEmpty
    reason_code: NonEmpty
    actor: NonEmpty
    expires_at: Timestamp
    note: str | None = None


EVENT_MODELS: dict[str, type[_Event]] = {
    "order_booked": OrderBookedIn,
    "discount_approved": DiscountApprovedIn,
    "order_amended": OrderAmendedIn,
    "order_cancelled": OrderCancelledIn,
    "fulfilment_confirmed": FulfilmentConfirmedIn,
    "invoice_issued": InvoiceIssuedIn,
    "payment_captured": PaymentCapturedIn,
    "refund_issued": RefundIssuedIn,
    "manual_override": ManualOverrideIn,
}


class EventValidationError(ValueError):
    """A JSON event that cannot be published; ``problems`` name field paths."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _describe(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(event)"
        out.append(f"{path}: {err['msg']}")
    return out


def validate_event(raw: Any) -> dict[str, Any]:
    """A JSON-shaped event -> the canonical dict the encoder writes.

    Raises ``EventValidationError`` naming every bad field.
    """
    if not isinstance(raw, dict):
        raise EventValidationError(["(event): expected a JSON object"])
    envelope = raw.get("envelope")
    if not isinstance(envelope, dict):
        raise EventValidationError(["envelope: field required (a JSON object)"])
    event_type = envelope.get("event_type")
    model = EVENT_MODELS.get(event_type) if isinstance(event_type, str) else None
    if model is None or not isinstance(event_type, str):
        raise EventValidationError(
            [f"envelope.event_type: {event_type!r} is not one of {', '.join(EVENT_MODELS)}"]
        )
    try:
        parsed = model.model_validate(raw)
    except ValidationError as exc:
        raise EventValidationError(_describe(exc)) from None
    event = parsed.model_dump()
    env = event["envelope"]
    event_type = env["event_type"]
    if env["schema_version"] is None:
        latest = default_catalog().latest(event_type)
        assert latest is not None
        env["schema_version"] = latest.version
    elif default_catalog().get(event_type, env["schema_version"]) is None:
        raise EventValidationError(
            [f"envelope.schema_version: {event_type} has no version {env['schema_version']}"]
        )
    problem = structural_error(event)
    if problem:
        raise EventValidationError([problem])
    return event
