"""The contract every ERP adapter fulfils; subclass ``ErpContract`` and fill in its hooks.

Not collected by itself (no ``test_`` prefix): ``test_erp_memory.py`` runs it on
the in-memory reference, ``test_erp_tryton.py`` on a real trytond over JSON-RPC.
Each test books its own orders (fresh ids), so a shared ERP database is fine;
counts are compared before/after, never absolute.

Hooks (what only the backend knows):
* ``erp`` fixture: the adapter; ``reopen(erp)``: a new adapter instance on the same
  ERP (a restarted worker);
* ``counts(erp)``: documents by kind; ``sale(erp, ref)``, ``invoice(erp, ref)``: views;
* ``failing(erp, step)``: a context in which writing ``step`` (for events dated
  ``PARTIAL_DAY``) fails permanently, healed on exit; ``outage(erp)``: the ERP is down.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sinks._protocols import (
    EffectResult,
    ErpAdapter,
    PartialWriteError,
    PermanentSinkError,
    TransientSinkError,
)

DAY = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
# Only the partial-write test uses this month, so a backend may break it (close it).
PARTIAL_DAY = datetime(2027, 2, 15, 9, 0, tzinfo=UTC)
TAX_BPS = {"USD": 800, "EUR": 2000, "GBP": 2000, "JPY": 1000, "SEK": 2500}


def new_order() -> str:
    return f"SO-T{uuid.uuid4().hex[:10].upper()}"


def envelope(
    event_type: str, order_id: str, suffix: str, at: datetime, seq: int = 1, **refs: Any
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "idempotency_key": f"{order_id}:{suffix}",
        "order_id": order_id,
        "sequence": seq,
        "occurred_at": at,
        "source_system": "contract-test",
        "source_record_id": f"SRC-{order_id}-{suffix}",
        "owner": None,
        "amendment_number": refs.get("amendment_number"),
        "invoice_id": refs.get("invoice_id"),
        "payment_id": refs.get("payment_id"),
    }


def line(line_id: str, sku: str, qty: int, unit: int, discount: int = 0) -> dict[str, Any]:
    return {
        "line_id": line_id,
        "sku": sku,
        "quantity": qty,
        "unit_price_minor": unit,
        "discount_minor": discount,
        "approval_id": None,
        "campaign_id": None,
        "channel_id": "direct-sales",
    }


def subtotal(lines: list[dict[str, Any]]) -> int:
    return sum(ln["quantity"] * ln["unit_price_minor"] - ln["discount_minor"] for ln in lines)


def tax_of(lines: list[dict[str, Any]], currency: str) -> int:
    return subtotal(lines) * TAX_BPS.get(currency, 0) // 10_000


def booked(
    order: str, lines: list[dict[str, Any]], currency: str = "EUR", at: datetime = DAY,
    customer: str = "CUST-CONTRACT",
) -> dict[str, Any]:  # fmt: skip
    return {
        "envelope": envelope("order_booked", order, "booked", at),
        "booking_kind": "DEAL_CLOSED",
        "customer_id": customer,
        "currency": currency,
        "lines": lines,
        "tax_minor": tax_of(lines, currency),
        "total_minor": subtotal(lines) + tax_of(lines, currency),
    }


def amended(
    order: str, n: int, lines: list[dict[str, Any]], currency: str = "EUR", at: datetime = DAY
) -> dict[str, Any]:
    return {
        "envelope": envelope(
            "order_amended", order, f"amend:{n}", at + timedelta(hours=n), 2, amendment_number=n
        ),
        "reason": "seat count change",
        "currency": currency,
        "lines": lines,
        "tax_minor": tax_of(lines, currency),
        "total_minor": subtotal(lines) + tax_of(lines, currency),
    }


def invoiced(
    order: str, lines: list[dict[str, Any]], currency: str = "EUR", at: datetime = DAY
) -> dict[str, Any]:
    return {
        "envelope": envelope(
            "invoice_issued",
            order,
            "invoice:1",
            at + timedelta(days=1),
            5,
            invoice_id=f"INV-{order}",
        ),
        "currency": currency,
        "lines": lines,
        "subtotal_minor": subtotal(lines),
        "tax_minor": tax_of(lines, currency),
        "total_minor": subtotal(lines) + tax_of(lines, currency),
        "due_at": at + timedelta(days=31),
    }


def captured(
    order: str, n: int, amount: int, currency: str = "EUR", at: datetime = DAY
) -> dict[str, Any]:
    return {
        "envelope": envelope(
            "payment_captured", order, f"capture:{n}", at + timedelta(days=2, hours=n), 6 + n,
            invoice_id=f"INV-{order}", payment_id=f"PAY-{order}-{n}",
        ),
        "currency": currency,
        "amount_minor": amount,
        "method": "card",
        "processor_ref": f"ch_{order}_{n}",
    }  # fmt: skip


def refunded(order: str, amount: int, currency: str = "EUR", at: datetime = DAY) -> dict[str, Any]:
    return {
        "envelope": envelope(
            "refund_issued", order, "refund:1", at + timedelta(days=4), 9,
            payment_id=f"PAY-{order}-1",
        ),
        "refund_id": f"REF-{order}-1",
        "currency": currency,
        "amount_minor": amount,
        "reason": "seat reduction",
    }  # fmt: skip


def cancelled(order: str, at: datetime = DAY) -> dict[str, Any]:
    return {
        "envelope": envelope("order_cancelled", order, "cancelled", at + timedelta(hours=6), 3),
        "reason": "customer churned",
    }


def fulfilled(order: str) -> dict[str, Any]:
    return {
        "envelope": envelope("fulfilment_confirmed", order, "fulfil:1", DAY, 4),
        "fulfilment_id": f"FUL-{order}-1",
        "shipments": [{"line_id": "L1", "sku": "SKU-HW-TERM", "quantity": 1}],
        "partial": False,
        "carrier": None,
    }


LINES = [
    line("L1", "SKU-CRM-PRO", 2, 110400, 22080),
    # 3 units, a discount that does not divide: the unit price carries decimals.
    line("L2", "SKU-HW-TERM", 3, 44160, 1001),
]


def summary(lines: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """What the sale must hold: (sku, quantity, net amount minor), by SKU."""
    out: dict[str, tuple[int, int]] = {}
    for ln in lines:
        q, a = out.get(ln["sku"], (0, 0))
        out[ln["sku"]] = (
            q + ln["quantity"],
            a + ln["quantity"] * ln["unit_price_minor"] - ln["discount_minor"],
        )
    return sorted((sku, q, a) for sku, (q, a) in out.items())


class ErpContract:
    # -- hooks -----------------------------------------------------------------------------
    @pytest.fixture
    def erp(self) -> Iterator[ErpAdapter]:
        raise NotImplementedError

    def reopen(self, erp: ErpAdapter) -> ErpAdapter:
        raise NotImplementedError

    def counts(self, erp: ErpAdapter) -> dict[str, int]:
        """Documents by kind: sale, invoice, credit_note, payment (moves), party."""
        raise NotImplementedError

    def sale(self, erp: ErpAdapter, ref: str) -> dict[str, Any]:
        """{"state", "currency", "lines": [(sku, qty, amount_minor)] by SKU, "untaxed_minor"}."""
        raise NotImplementedError

    def invoice(self, erp: ErpAdapter, ref: str) -> dict[str, Any]:
        """{"state", "total_minor", "to_pay_minor", "reference"}."""
        raise NotImplementedError

    def failing(self, erp: ErpAdapter, step: str) -> AbstractContextManager[None]:
        raise NotImplementedError

    def outage(self, erp: ErpAdapter) -> AbstractContextManager[None]:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------
    def apply_twice(self, erp: ErpAdapter, event: dict[str, Any]) -> EffectResult:
        """Apply, then apply again: the second must change nothing and return the same refs."""
        first = erp.apply(event)
        assert first.status == "applied", first
        before = self.counts(erp)
        again = erp.apply(event)
        assert again.status == "already_applied", again
        assert dict(again.external_refs) == dict(first.external_refs)
        assert self.counts(erp) == before
        return first

    # -- the contract ----------------------------------------------------------------------
    def test_is_an_erp_adapter(self, erp: ErpAdapter) -> None:
        assert isinstance(erp, ErpAdapter)
        assert erp.name == "erp"

    def test_booking_creates_a_quotation_with_the_lines_and_amounts(self, erp: ErpAdapter) -> None:
        order = new_order()
        before = self.counts(erp)
        result = erp.apply(booked(order, LINES))
        assert result.status == "applied"
        assert result.adapter == "erp"
        assert result.idempotency_key == f"{order}:booked"
        assert set(result.external_refs) == {"party", "sale"}
        sale = self.sale(erp, result.external_refs["sale"])
        assert sale["state"] == "quotation"
        assert sale["currency"] == "EUR"
        assert sale["lines"] == summary(LINES)
        assert sale["untaxed_minor"] == subtotal(LINES) == 198720 + 131479
        after = self.counts(erp)
        assert after["sale"] == before["sale"] + 1
        assert erp.lookup(f"{order}:booked") == {"sale": result.external_refs["sale"]}

    def test_prices_that_do_not_divide_keep_the_exact_amount(self, erp: ErpAdapter) -> None:
        # 249,749 over 250 units is not exact at 4 decimals: the total must not move.
        odd = [line("L1", "SKU-API-10K", 250, 999, 1), line("L2", "SKU-CRM-PRO", 1, 110400)]
        result = erp.apply(booked(new_order(), odd))
        sale = self.sale(erp, result.external_refs["sale"])
        assert sale["lines"] == summary(odd)
        assert sale["untaxed_minor"] == 249749 + 110400

    def test_the_same_event_twice_creates_nothing_new(self, erp: ErpAdapter) -> None:
        order = new_order()
        self.apply_twice(erp, booked(order, LINES))
        self.apply_twice(erp, invoiced(order, LINES))

    def test_amendment_replaces_the_lines(self, erp: ErpAdapter) -> None:
        order = new_order()
        sale_ref = erp.apply(booked(order, LINES)).external_refs["sale"]
        new_lines = [line("L1", "SKU-CRM-PRO", 3, 110400, 33120), line("L3", "SKU-SVC-TRN", 1, 100)]
        result = self.apply_twice(erp, amended(order, 1, new_lines))
        assert result.external_refs["sale"] == sale_ref
        sale = self.sale(erp, sale_ref)
        assert sale["state"] == "quotation"
        assert sale["lines"] == summary(new_lines)
        assert sale["untaxed_minor"] == subtotal(new_lines)
        second = [line("L1", "SKU-CRM-PRO", 4, 110400)]
        erp.apply(amended(order, 2, second))
        assert self.sale(erp, sale_ref)["lines"] == summary(second)

    @pytest.mark.parametrize("currency", ["EUR", "JPY"])
    def test_invoice_confirms_the_sale_and_posts_the_invoice(
        self, erp: ErpAdapter, currency: str
    ) -> None:
        order = new_order()
        lines = [line("L1", "SKU-CRM-ENT", 2, 360000 if currency == "JPY" else 220800, 999)]
        sale_ref = erp.apply(booked(order, lines, currency)).external_refs["sale"]
        before = self.counts(erp)
        event = invoiced(order, lines, currency)
        result = erp.apply(event)
        assert result.status == "applied"
        assert result.external_refs["sale"] == sale_ref
        invoice = self.invoice(erp, result.external_refs["invoice"])
        assert invoice["state"] == "posted"
        assert invoice["total_minor"] == event["total_minor"]
        assert invoice["to_pay_minor"] == event["total_minor"]
        assert invoice["reference"] == f"INV-{order}"
        assert self.sale(erp, sale_ref)["state"] == "processing"
        after = self.counts(erp)
        assert (after["sale"], after["invoice"]) == (before["sale"], before["invoice"] + 1)
        assert erp.lookup(f"{order}:invoice:1") == {
            "sale": sale_ref,
            "invoice": result.external_refs["invoice"],
        }

    def test_payments_pay_the_invoice_partially_then_fully(self, erp: ErpAdapter) -> None:
        order = new_order()
        erp.apply(booked(order, LINES))
        inv = invoiced(order, LINES)
        invoice_ref = erp.apply(inv).external_refs["invoice"]
        total = inv["total_minor"]
        first = self.apply_twice(erp, captured(order, 1, 100_000))
        assert first.external_refs["invoice"] == invoice_ref
        assert "payment" in first.external_refs
        view = self.invoice(erp, invoice_ref)
        assert (view["state"], view["to_pay_minor"]) == ("posted", total - 100_000)
        second = erp.apply(captured(order, 2, total - 100_000))
        assert second.external_refs["payment"] != first.external_refs["payment"]
        view = self.invoice(erp, invoice_ref)
        assert (view["state"], view["to_pay_minor"]) == ("paid", 0)
        assert erp.lookup(f"{order}:capture:2") == {"payment": second.external_refs["payment"]}

    def test_overpayment_is_refused(self, erp: ErpAdapter) -> None:
        order = new_order()
        erp.apply(booked(order, LINES))
        inv = invoiced(order, LINES)
        erp.apply(inv)
        before = self.counts(erp)
        with pytest.raises(PermanentSinkError, match="open balance"):
            erp.apply(captured(order, 1, inv["total_minor"] + 1))
        assert self.counts(erp) == before

    def test_refund_is_a_paid_credit_note(self, erp: ErpAdapter) -> None:
        order = new_order()
        erp.apply(booked(order, LINES))
        inv = invoiced(order, LINES)
        invoice_ref = erp.apply(inv).external_refs["invoice"]
        erp.apply(captured(order, 1, inv["total_minor"]))
        before = self.counts(erp)
        result = self.apply_twice(erp, refunded(order, 50_000))
        assert {"credit_note", "refund_payment"} <= set(result.external_refs)
        credit = self.invoice(erp, result.external_refs["credit_note"])
        assert (credit["total_minor"], credit["state"], credit["to_pay_minor"]) == (
            -50_000, "paid", 0,
        )  # fmt: skip
        assert credit["reference"] == f"REF-{order}-1"
        after = self.counts(erp)
        assert after["credit_note"] == before["credit_note"] + 1
        assert after["invoice"] == before["invoice"]
        assert self.invoice(erp, invoice_ref)["state"] == "paid"

    def test_cancelling_a_quotation_cancels_the_sale(self, erp: ErpAdapter) -> None:
        order = new_order()
        sale_ref = erp.apply(booked(order, LINES)).external_refs["sale"]
        result = self.apply_twice(erp, cancelled(order))
        assert result.external_refs["sale"] == sale_ref
        assert self.sale(erp, sale_ref)["state"] == "cancelled"
        assert erp.lookup(f"{order}:cancelled") == {"sale": sale_ref}

    def test_cancelling_after_the_invoice_credits_it(self, erp: ErpAdapter) -> None:
        order = new_order()
        erp.apply(booked(order, LINES))
        inv = invoiced(order, LINES)
        invoice_ref = erp.apply(inv).external_refs["invoice"]
        result = self.apply_twice(erp, cancelled(order))
        credit = self.invoice(erp, result.external_refs["credit_note"])
        assert credit["total_minor"] == -inv["total_minor"]
        # Unpaid: credited with refund, the credit note and the invoice cancel out.
        assert self.invoice(erp, invoice_ref)["state"] == "cancelled"
        assert (
            erp.lookup(f"{order}:cancelled")["credit_note"] == result.external_refs["credit_note"]
        )

    def test_amending_an_invoiced_order_is_refused(self, erp: ErpAdapter) -> None:
        order = new_order()
        erp.apply(booked(order, LINES))
        erp.apply(invoiced(order, LINES))
        with pytest.raises(PermanentSinkError, match="confirmed sale"):
            erp.apply(amended(order, 1, [line("L1", "SKU-CRM-PRO", 9, 110400)]))

    def test_refusals_are_permanent_and_write_nothing(self, erp: ErpAdapter) -> None:
        before = self.counts(erp)
        with pytest.raises(PermanentSinkError, match="SKU-NOPE"):
            erp.apply(booked(new_order(), [line("L1", "SKU-NOPE", 1, 100)]))
        with pytest.raises(PermanentSinkError, match="no sale"):
            erp.apply(amended(new_order(), 1, LINES))
        order = new_order()
        erp.apply(booked(order, LINES))
        with pytest.raises(PermanentSinkError, match="holds"):
            erp.apply(invoiced(order, [line("L1", "SKU-CRM-PRO", 5, 110400)]))
        with pytest.raises(PermanentSinkError, match="no invoice"):
            erp.apply(captured(order, 1, 100))
        after = self.counts(erp)
        assert after["sale"] == before["sale"] + 1
        assert after["invoice"] == before["invoice"]

    def test_other_events_are_not_applicable(self, erp: ErpAdapter) -> None:
        before = self.counts(erp)
        result = erp.apply(fulfilled(new_order()))
        assert result.status == "not_applicable"
        assert dict(result.external_refs) == {}
        assert self.counts(erp) == before

    def test_partial_write_is_completed_by_the_retry(self, erp: ErpAdapter) -> None:
        order = new_order()
        sale_ref = erp.apply(booked(order, LINES, at=PARTIAL_DAY)).external_refs["sale"]
        event = invoiced(order, LINES, at=PARTIAL_DAY)
        key = event["envelope"]["idempotency_key"]
        before = self.counts(erp)
        with self.failing(erp, "invoice"):
            with pytest.raises(PartialWriteError) as caught:
                erp.apply(event)
            assert caught.value.done == {"sale": sale_ref}
            assert isinstance(caught.value.cause, PermanentSinkError | TransientSinkError)
            assert erp.lookup(key) == {"sale": sale_ref}
        # A restarted worker retries: step 1 is found, only step 2 runs.
        retry = self.reopen(erp).apply(event)
        assert retry.status == "applied"
        assert retry.external_refs["sale"] == sale_ref
        invoice = self.invoice(erp, retry.external_refs["invoice"])
        assert (invoice["state"], invoice["total_minor"]) == ("posted", event["total_minor"])
        after = self.counts(erp)
        assert after["sale"] == before["sale"]
        assert after["invoice"] == before["invoice"] + 1
        assert erp.apply(event).status == "already_applied"
        assert self.counts(erp) == after

    def test_a_restarted_adapter_finds_earlier_writes(self, erp: ErpAdapter) -> None:
        order = new_order()
        booking = erp.apply(booked(order, LINES))
        inv = invoiced(order, LINES)
        invoice = erp.apply(inv)
        pay = erp.apply(captured(order, 1, 1000))
        fresh = self.reopen(erp)
        assert fresh.lookup(f"{order}:booked") == {"sale": booking.external_refs["sale"]}
        assert fresh.lookup(f"{order}:invoice:1") == {
            "sale": invoice.external_refs["sale"],
            "invoice": invoice.external_refs["invoice"],
        }
        assert fresh.lookup(f"{order}:capture:1") == {"payment": pay.external_refs["payment"]}
        assert fresh.lookup(f"{order}:capture:2") == {}
        # A key that is a prefix of another does not match it.
        assert fresh.lookup(f"{order}:capture:") == {}
        before = self.counts(erp)
        for event in (booked(order, LINES), inv, captured(order, 1, 1000)):
            assert fresh.apply(event).status == "already_applied"
        assert self.counts(erp) == before

    def test_an_unreachable_erp_is_a_transient_error(self, erp: ErpAdapter) -> None:
        order = new_order()
        erp.apply(booked(order, LINES))
        with self.outage(erp):
            with pytest.raises(TransientSinkError):
                erp.apply(invoiced(order, LINES))
            with pytest.raises(TransientSinkError):
                erp.lookup(f"{order}:booked")
        # Back up: the same adapter instance carries on.
        assert erp.apply(invoiced(order, LINES)).status == "applied"
