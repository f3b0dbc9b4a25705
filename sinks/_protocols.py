"""The contracts every sink adapter fulfils: one small Protocol per kind.

An adapter receives canonical events (the dicts ``schemas.EventDeserializer``
returns, as published on the validated topic) and applies their effect to a
system of record. Every adapter is idempotent on the event's effect, identified
by its order and idempotency key together, ``(order_id, idempotency_key)`` (two
orders may share a key; each is its own effect): applying the same event twice (a
replay, a redelivery, an offset reset) returns the earlier result and changes
nothing.

Failures are split by what the caller must do:
* ``TransientSinkError``: retry later (timeouts, connection refused, 5xx,
  deadlocks). The sink processor backs off, opens a circuit breaker, pauses.
* ``PermanentSinkError``: the target refused the event (validation, unknown
  account); retrying cannot help. Routed to the exception topic with owner
  "integrations" and the adapter's own error text. QA refuses first whatever an
  adapter would, so for a validated event this means the target's own data
  disagrees with the stream; the sink counts it
  (``revline_sink_refusals_validated_total``) and it is alerted on.
* ``PartialWriteError``: some steps were applied, the rest failed; ``done``
  names the completed steps so the next attempt completes only the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol, runtime_checkable

from revline.core.errors import InfrastructureError, RevlineError

Event = Mapping[str, Any]  # a decoded canonical event


@dataclass(frozen=True)
class EffectResult:
    """What applying one event did in one adapter."""

    adapter: str  # e.g. "ledger", "erp"
    idempotency_key: str
    status: str  # "applied" | "already_applied" | "not_applicable"
    external_refs: Mapping[str, str] = field(default_factory=dict)  # step -> external id
    detail: str = ""
    # The effect's identity is (order_id, idempotency_key): two orders may share a key.
    order_id: str = ""


@dataclass(frozen=True)
class ErpDocument:
    """One Revline marker on one ERP document, as reconciliation reads it back.

    A document carrying several markers (a sale marked by its booking, amendments,
    invoice and cancellation) appears once per marker. Amounts are minor units of
    ``currency``: a sale's untaxed amount, an invoice's total (negative for a credit
    note), a payment move's amount (negative when money went back to the customer).
    """

    idempotency_key: str
    step: str  # party | sale | invoice | payment | credit_note | refund_payment
    ref: str  # the ERP's own id of the document
    currency: str
    amount_minor: int
    state: str  # the ERP's state (draft, quotation, processing, posted, paid, cancelled...)
    day: date | None  # the document's accounting day
    order_id: str = ""  # the order the marked effect belongs to (with idempotency_key)


class TransientSinkError(InfrastructureError):
    """The target is unavailable for now; the same call may succeed later."""


class PermanentSinkError(RevlineError):
    """The target refused the event; the message is the target's own error text."""


class PartialWriteError(RevlineError):
    """Some steps were applied; ``done`` maps step -> external id of what exists."""

    def __init__(self, message: str, done: Mapping[str, str], cause: Exception) -> None:
        super().__init__(message)
        self.done = dict(done)
        self.cause = cause


@runtime_checkable
class LedgerAdapter(Protocol):
    """Double-entry, append-only postings for money events."""

    name: str

    def post(self, events: Sequence[Event]) -> list[EffectResult]:
        """Post a batch atomically (one transaction); one result per event, in order.

        Idempotent per (order_id, idempotency_key); each result names both.
        """
        ...

    def balances(self, currency: str | None = None) -> dict[tuple[str, str], int]:
        """(account, currency) -> balance in minor units (debits positive)."""
        ...


@runtime_checkable
class ErpAdapter(Protocol):
    """Orders, invoices, payments and credit notes in an ERP."""

    name: str

    def apply(self, event: Event) -> EffectResult:
        """Apply one event; idempotent via the order and idempotency key stored on the
        ERP document (the effect's identity)."""
        ...

    def lookup(self, order_id: str, idempotency_key: str) -> dict[str, str]:
        """step -> external id already in the ERP for this effect (empty if none)."""
        ...


@runtime_checkable
class ErpInventory(Protocol):
    """Read-only: what an ERP holds, for reconciliation (both ERP adapters have it)."""

    def documents(self) -> list[ErpDocument]:
        """Every document carrying a Revline marker, one entry per marker."""
        ...
