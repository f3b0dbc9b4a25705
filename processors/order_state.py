"""Everything the pipeline knows about one order, as one JSON-able value.

One value per order (the table key is the order id) holds the dedup record
of every idempotency key, the dependency tokens that have arrived, the facts
the reconciliation checks need, and the held events. Because it is a single
value, a changelog write is all-or-nothing per order: dedup, holds and facts
can never disagree after a crash.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# A dependency token: what an event provides and what others wait for,
# e.g. "booked", "amend:2", "invoice:INV-7", "payment:PAY-7-1", "approval:APR-1".
Token = str


def provides(event: Mapping[str, Any]) -> Token | None:
    env = event["envelope"]
    kind = env["event_type"]
    if kind == "order_booked":
        return "booked"
    if kind == "order_amended":
        return f"amend:{env['amendment_number']}"
    if kind == "order_cancelled":
        return "cancelled"
    if kind == "invoice_issued":
        return f"invoice:{env['invoice_id']}"
    if kind == "payment_captured":
        return f"payment:{env['payment_id']}"
    if kind == "refund_issued":
        return f"refund:{event['refund_id']}"
    if kind == "discount_approved":
        return f"approval:{event['approval_id']}"
    if kind == "fulfilment_confirmed":
        return f"fulfilment:{event['fulfilment_id']}"
    return None


def depends_on(event: Mapping[str, Any]) -> list[Token]:
    """What must have arrived before this event can be judged, in dependency order."""
    env = event["envelope"]
    kind = env["event_type"]
    if kind == "order_booked":
        return _approvals(event)
    if kind == "order_amended":
        number = env["amendment_number"]
        previous = [f"amend:{number - 1}"] if number > 1 else []
        return ["booked", *previous, *_approvals(event)]
    if kind in ("order_cancelled", "fulfilment_confirmed"):
        return ["booked"]
    if kind == "invoice_issued":
        amended = env.get("amendment_number")
        return ["booked", f"amend:{amended}"] if amended else ["booked"]
    if kind == "payment_captured":
        return [f"invoice:{env['invoice_id']}"]
    if kind == "refund_issued":
        return [f"payment:{env['payment_id']}"]
    return []


def _approvals(event: Mapping[str, Any]) -> list[Token]:
    """The approvals a booking's or amendment's lines name (only those wait for them)."""
    return sorted({f"approval:{ln['approval_id']}" for ln in event.get("lines", ())
                   if ln["approval_id"]})


class OrderState:
    """A view over the JSON-able dict stored in the orders table."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = data if data is not None else {
            "seen": {},  # idempotency key -> decision record (see Engine)
            "tokens": {},  # token -> True (ok) | False (ended in an exception)
            "versions": {},  # "0" booking, "N" amendment N -> {"total", "currency"}
            "cancelled": False,
            "invoiced": 0,
            "invoices": {},  # invoice id -> {"total", "currency", "captured"}
            "payments": {},  # payment id -> {"amount", "currency", "refunded"}
            "approvals": {},  # approval id -> {"sku", "max_bps"}
            "held": [],  # held inputs, in arrival order
            "last_seen_ms": 0,
        }

    # -- dedup -----------------------------------------------------------------------
    def seen(self, key: str) -> dict[str, Any] | None:
        record: dict[str, Any] | None = self.data["seen"].get(key)
        return record

    def remember(self, key: str, record: dict[str, Any]) -> None:
        self.data["seen"][key] = record

    # -- dependencies ----------------------------------------------------------------
    def token(self, token: Token) -> bool | None:
        """True: arrived and accepted; False: arrived and ended in an exception; None: not yet."""
        value: bool | None = self.data["tokens"].get(token)
        return value

    def missing(self, tokens: list[Token]) -> list[Token]:
        have = self.data["tokens"]
        return [t for t in tokens if t not in have]

    def failed(self, tokens: list[Token]) -> list[Token]:
        have = self.data["tokens"]
        return [t for t in tokens if have.get(t) is False]

    def settle(self, token: Token | None, ok: bool) -> None:
        if token is not None:
            self.data["tokens"][token] = ok

    # -- holds -----------------------------------------------------------------------
    @property
    def held(self) -> list[dict[str, Any]]:
        held: list[dict[str, Any]] = self.data["held"]
        return held

    def iter_ready(self) -> Iterator[dict[str, Any]]:
        """Held entries whose dependencies have all arrived, lowest sequence first."""
        while True:
            ready = [h for h in self.held if not self.missing(h["waiting_for"])]
            if not ready:
                return
            entry = min(ready, key=lambda h: (h["sequence"], h["offset"]))
            self.held.remove(entry)
            yield entry

    # -- facts -----------------------------------------------------------------------
    def apply(self, event: Mapping[str, Any]) -> None:
        """Record the facts of an accepted event that later checks reconcile against."""
        env = event["envelope"]
        kind = env["event_type"]
        d = self.data
        if kind == "order_booked":
            d["versions"]["0"] = {"total": event["total_minor"], "currency": event["currency"]}
        elif kind == "order_amended":
            d["versions"][str(env["amendment_number"])] = {
                "total": event["total_minor"],
                "currency": event["currency"],
            }
        elif kind == "order_cancelled":
            d["cancelled"] = True
        elif kind == "invoice_issued":
            d["invoiced"] += event["total_minor"]
            d["invoices"][env["invoice_id"]] = {
                "total": event["total_minor"],
                "currency": event["currency"],
                "captured": 0,
            }
        elif kind == "payment_captured":
            invoice = d["invoices"].get(env["invoice_id"])
            if invoice is not None:
                invoice["captured"] += event["amount_minor"]
            d["payments"][env["payment_id"]] = {
                "amount": event["amount_minor"],
                "currency": event["currency"],
                "refunded": 0,
            }
        elif kind == "refund_issued":
            payment = d["payments"].get(env["payment_id"])
            if payment is not None:
                payment["refunded"] += event["amount_minor"]
        elif kind == "discount_approved":
            d["approvals"][event["approval_id"]] = {
                "sku": event["sku"],
                "max_bps": event["max_discount_bps"],
            }
        elif kind == "manual_override":
            # Kept outside the default state (most orders never see one): target key ->
            # check id -> the override. A newer override of the same check replaces it.
            targets = d.setdefault("overrides", {}).setdefault(event["target_idempotency_key"], {})
            targets[event["check_id"]] = {
                "id": event["override_id"],
                "exp": int(event["expires_at"].timestamp() * 1000),
                "by": event["actor"],
                "rc": event["reason_code"],
            }

    def overrides_for(self, key: str, now_ms: int) -> dict[str, dict[str, Any]] | None:
        """Active (unexpired) overrides of the event with this idempotency key, by check id."""
        table = self.data.get("overrides")  # absent on the hot path: one dict lookup
        if not table:
            return None
        entries: dict[str, dict[str, Any]] | None = table.get(key)
        if not entries:
            return None
        active = {check: o for check, o in entries.items() if o["exp"] > now_ms}
        return active or None

    def version(self, amendment: int | None) -> dict[str, Any] | None:
        version: dict[str, Any] | None = self.data["versions"].get(str(amendment or 0))
        return version

    @property
    def currency(self) -> str | None:
        booking = self.data["versions"].get("0")
        return booking["currency"] if booking else None
