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

from revline.sinks._protocols import (
    EffectResult,
    ErpAdapter,
    ErpDocument,
    ErpInventory,
    PartialWriteError,
    PermanentSinkError,
    TransientSinkError,
)
from revline.sinks.erp._mapping import add_marker, marker, markers

DAY = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
# Only the partial-write test uses this month, so a backend may break it (close it).
PARTIAL_DAY = datetime(2027, 2, 15, 9, 0, tzinfo=UTC)
TAX_BPS = {"USD": 800, "EUR": 2000, "GBP": 2000, "JPY": 1000, "SEK": 2500}


def new_order() -> str:
    return f"SO-T{uuid.uuid4().hex[:10].upper()}"


def envelope(
    event_type: str, order_id: str, suffix: str, at: datetime, seq: int = 1,
    key: str | None = None, **refs: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "idempotency_key": key if key is not None else f"{order_id}:{suffix}",
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
    customer: str = "CUST-CONTRACT", key: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "envelope": envelope("order_booked", order, "booked", at, key=key),
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
    order: str, lines: list[dict[str, Any]], currency: str = "EUR", at: datetime = DAY,
    n: int = 1, invoice_id: str | None = None, key: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Invoice ``n`` of the order (``INV-<order>`` for the first, ``INV-<order>-<n>`` after)."""
    return {
        "envelope": envelope(
            "invoice_issued", order, f"invoice:{n}", at + timedelta(days=1, minutes=n), 4 + n,
            key=key, invoice_id=invoice_id or invoice_name(order, n),
        ),
        "currency": currency,
        "lines": lines,
        "subtotal_minor": subtotal(lines),
        "tax_minor": tax_of(lines, currency),
        "total_minor": subtotal(lines) + tax_of(lines, currency),
        "due_at": at + timedelta(days=31),
    }


def invoice_name(order: str, n: int = 1) -> str:
    return f"INV-{order}" if n == 1 else f"INV-{order}-{n}"


def captured(
    order: str, n: int, amount: int, currency: str = "EUR", at: datetime = DAY,
    invoice_id: str | None = None, key: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "envelope": envelope(
            "payment_captured", order, f"capture:{n}", at + timedelta(days=2, hours=n), 10 + n,
            key=key, invoice_id=invoice_id or f"INV-{order}", payment_id=f"PAY-{order}-{n}",
        ),
        "currency": currency,
        "amount_minor": amount,
        "method": "card",
        "processor_ref": f"ch_{order}_{n}",
    }  # fmt: skip


def refunded(
    order: str, amount: int, currency: str = "EUR", at: datetime = DAY, key: str | None = None
) -> dict[str, Any]:
    return {
        "envelope": envelope(
            "refund_issued", order, "refund:1", at + timedelta(days=4), 40, key=key,
            payment_id=f"PAY-{order}-1",
        ),
        "refund_id": f"REF-{order}-1",
        "currency": currency,
        "amount_minor": amount,
        "reason": "seat reduction",
    }  # fmt: skip


def cancelled(order: str, at: datetime = DAY, later: timedelta = timedelta(0)) -> dict[str, Any]:
    return {
        "envelope": envelope(
            "order_cancelled", order, "cancelled", at + timedelta(hours=6) + later, 3
        ),
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
        env = event["envelope"]
        assert (first.order_id, first.idempotency_key) == (env["order_id"], env["idempotency_key"])
        before = self.counts(erp)
        again = erp.apply(event)
        assert again.status == "already_applied", again
        assert dict(again.external_refs) == dict(first.external_refs)
        assert self.counts(erp) == before
        return first

    def invoiced_order(self, erp: ErpAdapter) -> tuple[str, dict[str, Any]]:
        """A new order booked with LINES and invoiced in full: (order id, the invoice event)."""
        order = new_order()
        erp.apply(booked(order, LINES))
        inv = invoiced(order, LINES)
        erp.apply(inv)
        return order, inv

    def order_documents(self, erp: ErpAdapter, order: str) -> list[dict[str, Any]]:
        """The order's invoices and credit notes, as ``invoice`` reads them."""
        refs = sorted({d.ref for d in self.documents(erp)
                       if d.order_id == order and d.step in ("invoice", "credit_note")})
        return [self.invoice(erp, ref) for ref in refs]

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
        assert erp.lookup(order, f"{order}:booked") == {"sale": result.external_refs["sale"]}

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
        assert erp.lookup(order, f"{order}:invoice:1") == {
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
        key = f"{order}:capture:2"
        assert erp.lookup(order, key) == {"payment": second.external_refs["payment"]}

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
        assert erp.lookup(order, f"{order}:cancelled") == {"sale": sale_ref}

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
        credit_ref = erp.lookup(order, f"{order}:cancelled")["credit_note"]
        assert credit_ref == result.external_refs["credit_note"]

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
        with pytest.raises(PermanentSinkError, match="SKU-NOPE"):
            erp.apply(invoiced(order, [line("L1", "SKU-NOPE", 5, 110400)]))
        with pytest.raises(PermanentSinkError, match="USD"):
            erp.apply(invoiced(order, LINES, "USD"))
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
            assert erp.lookup(order, key) == {"sale": sale_ref}
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
        assert fresh.lookup(order, f"{order}:booked") == {"sale": booking.external_refs["sale"]}
        assert fresh.lookup(order, f"{order}:invoice:1") == {
            "sale": invoice.external_refs["sale"],
            "invoice": invoice.external_refs["invoice"],
        }
        key = f"{order}:capture:1"
        assert fresh.lookup(order, key) == {"payment": pay.external_refs["payment"]}
        assert fresh.lookup(order, f"{order}:capture:2") == {}
        # A key that is a prefix of another does not match it.
        assert fresh.lookup(order, f"{order}:capture:") == {}
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
                erp.lookup(order, f"{order}:booked")
        # Back up: the same adapter instance carries on.
        assert erp.apply(invoiced(order, LINES)).status == "applied"

    # -- the effect identity: (order, idempotency key) ---------------------------------------
    def test_two_orders_sharing_an_idempotency_key_are_two_effects(self, erp: ErpAdapter) -> None:
        a = new_order()
        b = f" {a}\u3000"  # differs only by outer whitespace, which an ERP may strip
        shared = f"SHARED-{uuid.uuid4().hex[:8]}"
        refs: dict[str, dict[str, EffectResult]] = {a: {}, b: {}}
        for order in (a, b):
            before = self.counts(erp)
            refs[order]["booked"] = self.apply_twice(erp, booked(order, LINES, key=f"{shared}:b"))
            inv = invoiced(order, LINES, key=f"{shared}:i", invoice_id="INV-SHARED")
            refs[order]["invoice"] = self.apply_twice(erp, inv)
            pay = captured(order, 1, 1000, key=f"{shared}:p", invoice_id="INV-SHARED")
            refs[order]["payment"] = self.apply_twice(erp, pay)
            after = self.counts(erp)
            # The second order's events are new effects, not the first order's replays.
            assert (after["sale"], after["invoice"], after["payment"]) == (
                before["sale"] + 1, before["invoice"] + 1, before["payment"] + 1,
            )  # fmt: skip
        for step in ("booked", "invoice", "payment"):
            assert refs[a][step].external_refs != refs[b][step].external_refs
        assert refs[b]["payment"].external_refs["invoice"] == refs[b]["invoice"].external_refs[
            "invoice"
        ]
        for order in (a, b):
            assert erp.lookup(order, f"{shared}:b") == {
                "sale": refs[order]["booked"].external_refs["sale"]
            }
            assert erp.lookup(order, f"{shared}:i") == {
                "sale": refs[order]["booked"].external_refs["sale"],
                "invoice": refs[order]["invoice"].external_refs["invoice"],
            }
            assert erp.lookup(order, f"{shared}:p") == {
                "payment": refs[order]["payment"].external_refs["payment"]
            }
            view = self.invoice(erp, refs[order]["invoice"].external_refs["invoice"])
            assert view["to_pay_minor"] == invoiced(order, LINES)["total_minor"] - 1000
        assert erp.lookup(new_order(), f"{shared}:b") == {}
        self.assert_documents(erp, {a, b}, {f"{shared}:b", f"{shared}:i", f"{shared}:p"})

    def test_two_orders_sharing_an_invoice_id_are_paid_separately(self, erp: ErpAdapter) -> None:
        a, b = new_order(), new_order()
        shared = f"INV-SHARED-{uuid.uuid4().hex[:8]}"
        invoices = {}
        for order in (a, b):
            erp.apply(booked(order, LINES))
            invoices[order] = erp.apply(invoiced(order, LINES, invoice_id=shared))
        total = invoiced(a, LINES)["total_minor"]
        pay_a = self.apply_twice(erp, captured(a, 1, total, invoice_id=shared))
        pay_b = self.apply_twice(erp, captured(b, 1, 500, invoice_id=shared))
        assert pay_a.external_refs["invoice"] == invoices[a].external_refs["invoice"]
        assert pay_b.external_refs["invoice"] == invoices[b].external_refs["invoice"]
        assert self.invoice(erp, invoices[a].external_refs["invoice"])["state"] == "paid"
        view_b = self.invoice(erp, invoices[b].external_refs["invoice"])
        assert (view_b["state"], view_b["to_pay_minor"]) == ("posted", total - 500)
        # An order that has no invoice of that name cannot pay the other order's.
        other = new_order()
        erp.apply(booked(other, LINES))
        with pytest.raises(PermanentSinkError, match="no invoice"):
            erp.apply(captured(other, 1, 100, invoice_id=shared))

    @pytest.mark.parametrize(
        "tag", ["[a]", "%25]x[", "ü→€ 漢字 ]%[ ", "100%", "k]"], ids=["brackets", "escaped",
                                                                       "unicode", "percent", "end"]
    )
    def test_ids_hold_any_character_the_contract_allows(self, erp: ErpAdapter, tag: str) -> None:
        order = f"{new_order()}{tag}"
        key = f"{order}:{tag}:"
        events = {
            "booked": booked(order, LINES, key=f"{key}b"),
            "invoice": invoiced(order, LINES, key=f"{key}i", invoice_id=f"INV{tag}"),
            "payment": captured(order, 1, invoiced(order, LINES)["total_minor"],
                                key=f"{key}p", invoice_id=f"INV{tag}"),
            "refund": refunded(order, 700, key=f"{key}r"),
        }  # fmt: skip
        results = {name: self.apply_twice(erp, event) for name, event in events.items()}
        assert erp.lookup(order, f"{key}b") == {"sale": results["booked"].external_refs["sale"]}
        assert erp.lookup(order, f"{key}p") == {
            "payment": results["payment"].external_refs["payment"]
        }
        assert erp.lookup(order, f"{key}r") == {
            step: results["refund"].external_refs[step]
            for step in ("credit_note", "refund_payment")
        }
        # Neither a key's prefix, nor its escaped spelling, is the key.
        assert erp.lookup(order, key) == {}
        assert erp.lookup(order, f"{key}b".replace("%", "%25").replace("[", "%5B")) == (
            {} if "%" in key or "[" in key else erp.lookup(order, f"{key}b")
        )
        assert self.invoice(erp, results["invoice"].external_refs["invoice"])["state"] == "paid"
        self.assert_documents(erp, {order}, {f"{key}{s}" for s in "bipr"})

    # -- split billing --------------------------------------------------------------------
    def test_deposit_and_balance_are_two_invoices_each_paid(self, erp: ErpAdapter) -> None:
        order = new_order()
        sale_ref = erp.apply(booked(order, LINES)).external_refs["sale"]
        deposit_lines = [line("D1", "SKU-CRM-PRO", 1, 60000)]  # a deposit of 600.00
        balance_lines = [
            line("L1", "SKU-CRM-PRO", 2, 110400, 22080 + 60000),
            line("L2", "SKU-HW-TERM", 3, 44160, 1001),
        ]
        assert subtotal(deposit_lines) + subtotal(balance_lines) == subtotal(LINES)
        before = self.counts(erp)
        deposit = invoiced(order, deposit_lines, n=1)
        dep = self.apply_twice(erp, deposit)
        assert self.sale(erp, sale_ref)["state"] == "processing"
        balance = invoiced(order, balance_lines, n=2)
        bal = self.apply_twice(erp, balance)
        assert dep.external_refs["sale"] == bal.external_refs["sale"] == sale_ref
        assert dep.external_refs["invoice"] != bal.external_refs["invoice"]
        for result, event, n in ((dep, deposit, 1), (bal, balance, 2)):
            view = self.invoice(erp, result.external_refs["invoice"])
            assert (view["state"], view["total_minor"], view["reference"]) == (
                "posted", event["total_minor"], invoice_name(order, n),
            )  # fmt: skip
        assert self.counts(erp)["invoice"] == before["invoice"] + 2
        # The sale keeps what was sold; no amendment once the first invoice exists.
        assert self.sale(erp, sale_ref)["lines"] == summary(LINES)
        with pytest.raises(PermanentSinkError, match="confirmed sale"):
            erp.apply(amended(order, 1, LINES))
        pay_dep = self.apply_twice(
            erp, captured(order, 1, deposit["total_minor"], invoice_id=invoice_name(order, 1))
        )
        pay_bal = self.apply_twice(
            erp, captured(order, 2, 1000, invoice_id=invoice_name(order, 2))
        )
        rest = balance["total_minor"] - 1000
        pay_rest = self.apply_twice(
            erp, captured(order, 3, rest, invoice_id=invoice_name(order, 2))
        )
        assert pay_dep.external_refs["invoice"] == dep.external_refs["invoice"]
        assert pay_bal.external_refs["invoice"] == pay_rest.external_refs["invoice"]
        assert pay_bal.external_refs["invoice"] == bal.external_refs["invoice"]
        for result in (dep, bal):
            view = self.invoice(erp, result.external_refs["invoice"])
            assert (view["state"], view["to_pay_minor"]) == ("paid", 0)
        with pytest.raises(PermanentSinkError):
            erp.apply(captured(order, 4, 1, invoice_id=invoice_name(order, 1)))
        after = self.counts(erp)
        assert after["payment"] == before["payment"] + 3
        for event in (deposit, balance):
            assert erp.apply(event).status == "already_applied"
        assert self.counts(erp) == after

    def test_one_invoice_per_shipment(self, erp: ErpAdapter) -> None:
        order = new_order()
        erp.apply(booked(order, LINES))
        shipments = [
            [line("L2", "SKU-HW-TERM", 1, 44160)],
            [line("L2", "SKU-HW-TERM", 2, 44160, 1001)],
            [line("L1", "SKU-CRM-PRO", 2, 110400, 22080)],
        ]
        assert sum(subtotal(s) for s in shipments) == subtotal(LINES)
        before = self.counts(erp)
        events = [invoiced(order, lines, n=n) for n, lines in enumerate(shipments, 1)]
        results = [self.apply_twice(erp, event) for event in events]
        assert len({r.external_refs["invoice"] for r in results}) == 3
        for result, event in zip(results, events, strict=True):
            view = self.invoice(erp, result.external_refs["invoice"])
            assert (view["state"], view["total_minor"]) == ("posted", event["total_minor"])
            key = event["envelope"]["idempotency_key"]
            assert erp.lookup(order, key) == {
                k: v for k, v in result.external_refs.items() if k != "party"
            }
        after = self.counts(erp)
        assert after["invoice"] == before["invoice"] + 3
        fresh = self.reopen(erp)
        for event in events:
            assert fresh.apply(event).status == "already_applied"
        assert self.counts(erp) == after

    def test_cancelling_after_a_partial_invoice_credits_each_invoice(
        self, erp: ErpAdapter
    ) -> None:
        order = new_order()
        erp.apply(booked(order, LINES))
        first = invoiced(order, [line("D1", "SKU-CRM-PRO", 1, 60000)], n=1)
        second = invoiced(order, [line("L2", "SKU-HW-TERM", 1, 44160)], n=2)
        inv1 = erp.apply(first).external_refs["invoice"]
        inv2 = erp.apply(second).external_refs["invoice"]
        erp.apply(captured(order, 1, 1000, invoice_id=invoice_name(order, 2)))
        before = self.counts(erp)
        cancel = cancelled(order, later=timedelta(days=3))
        result = self.apply_twice(erp, cancel)
        assert self.counts(erp)["credit_note"] == before["credit_note"] + 2
        credit = self.invoice(erp, result.external_refs["credit_note"])
        assert credit["total_minor"] == -first["total_minor"]
        # Unpaid: credited with refund, so it is cancelled; the partly paid one stays posted.
        assert self.invoice(erp, inv1)["state"] == "cancelled"
        assert self.invoice(erp, inv2)["state"] == "posted"
        key = cancel["envelope"]["idempotency_key"]
        assert erp.lookup(order, key)["credit_note"] == result.external_refs["credit_note"]
        assert self.reopen(erp).apply(cancel).status == "already_applied"
        # A replay of the whole order after the cancellation changes nothing and refuses nothing.
        after = self.counts(erp)
        for event in (first, second, captured(order, 1, 1000, invoice_id=invoice_name(order, 2))):
            assert self.reopen(erp).apply(event).status == "already_applied"
        assert self.counts(erp) == after
        credits = [
            d for d in self.documents(erp)
            if d.order_id == order and d.step == "credit_note" and d.idempotency_key == key
        ]  # fmt: skip
        assert sorted(d.amount_minor for d in credits) == sorted(
            [-first["total_minor"], -second["total_minor"]]
        )

    # -- cancellation and refunds: the customer is given back each refund once ----------
    # The cancellation's credit notes give back all that was billed; a refund after it
    # pays that credit out (no credit note of its own), one before it has its credit note
    # credited in turn. Either order: the order's invoices and credit notes total 0 and
    # leave -(captured - refunded) open (owed back), as the ledger's AR says.
    @pytest.mark.parametrize(
        "script",
        [
            "pay cancel refund",
            "pay refund cancel",
            "pay:1/3 cancel",
            "pay refund:1/4 cancel refund:3/4",
            "pay:1/2 refund:1/4 cancel refund:1/8",
        ],
    )
    def test_cancelled_order_gives_each_refund_back_once(
        self, erp: ErpAdapter, script: str
    ) -> None:
        order, inv = self.invoiced_order(erp)
        total = inv["total_minor"]
        captured_ = refunded_ = 0
        cancel = cancelled(order, later=timedelta(days=3))
        steps: list[dict[str, Any]] = []
        paid_out: dict[str, bool] = {}  # refund key -> after the cancellation
        for n, step in enumerate(script.split(), start=1):
            op, _, share = step.partition(":")
            num, _, den = (share or "1/1").partition("/")
            if op == "pay":
                captured_ = total * int(num) // int(den)
                steps.append(captured(order, 1, captured_))
            elif op == "refund":
                amount = captured_ * int(num) // int(den)
                refunded_ += amount
                event = refunded(order, amount, key=f"{order}:refund:{n}")
                event["refund_id"] = f"REF-{order}-{n}"
                paid_out[event["envelope"]["idempotency_key"]] = cancel in steps
                steps.append(event)
            else:
                steps.append(cancel)
        results = [self.apply_twice(erp, event) for event in steps]
        for event, result in zip(steps, results, strict=True):
            key = event["envelope"]["idempotency_key"]
            if key not in paid_out:
                continue
            found = erp.lookup(order, key)
            if paid_out[key]:  # out of the cancellation's credit note: a refund payment only
                assert set(found) == {"refund_payment"}, found
                assert result.external_refs["credit_note"] in {
                    d.ref for d in self.documents(erp)
                    if d.idempotency_key == cancel["envelope"]["idempotency_key"]
                }  # fmt: skip
            else:
                assert {"credit_note", "refund_payment"} <= set(found)
        docs = self.order_documents(erp, order)
        assert sum(d["total_minor"] for d in docs) == 0, docs
        assert sum(d["to_pay_minor"] for d in docs) == -(captured_ - refunded_), docs
        # A replay of everything, by a restarted adapter, changes nothing.
        before = self.counts(erp)
        again = self.reopen(erp)
        assert {again.apply(e).status for e in [inv, *steps]} == {"already_applied"}
        assert self.counts(erp) == before

    @pytest.mark.parametrize("paid", [0, 1, 2], ids=["unpaid", "half_paid", "paid"])
    def test_a_second_cancellation_under_another_key_credits_nothing(
        self, erp: ErpAdapter, paid: int
    ) -> None:
        # The engine refuses a second cancellation of an order, but one can still reach the
        # sink (a hand-published event, a second upstream system): crediting the invoices
        # again would give the customer back twice what they were billed.
        order, inv = self.invoiced_order(erp)
        if paid:
            erp.apply(captured(order, 1, inv["total_minor"] * paid // 2))
        first = erp.apply(cancelled(order))
        assert first.status == "applied"
        before = self.counts(erp)
        second = cancelled(order, later=timedelta(hours=1))
        second["envelope"]["idempotency_key"] = f"{order}:cancelled-again"
        with pytest.raises(PermanentSinkError, match="earlier cancellation"):
            erp.apply(second)
        assert self.counts(erp) == before
        docs = self.order_documents(erp, order)
        assert sum(d["total_minor"] for d in docs) == 0, docs
        # The first cancellation's replay is still its own, applied once.
        assert erp.apply(cancelled(order)).status == "already_applied"

    # -- markers --------------------------------------------------------------------------
    def test_markers_round_trip_and_old_markers_still_read(self) -> None:
        for key in ("SO-1:booked", "a[b]c", "%", "%25", "]]", "ü€漢", "x%5Dy", "k y_z\\"):
            text = add_marker(add_marker(None, "sale", "other"), "invoice", key)
            assert markers(text) == [("sale", "other"), ("invoice", key)]
            assert "[" not in marker("sale", key)[1:] and "]" not in marker("sale", key)[:-1]
        # Written before keys were escaped: unchanged for keys without % [ ].
        assert marker("sale", "SO-1:amend:1") == "[revline step=sale key=SO-1:amend:1]"
        assert markers("x\n[revline step=payment key=SO-9:capture:1] PAY-1") == [
            ("payment", "SO-9:capture:1")
        ]
        with pytest.raises(PermanentSinkError):
            marker("sale", "a\nb")

    def documents(self, erp: ErpAdapter) -> list[ErpDocument]:
        assert isinstance(erp, ErpInventory)
        return erp.documents()

    def assert_documents(self, erp: ErpAdapter, orders: set[str], keys: set[str]) -> None:
        """documents() names each marked effect by its order and its exact key."""
        seen = {(d.order_id, d.idempotency_key) for d in self.documents(erp)
                if d.order_id in orders}  # fmt: skip
        assert {(o, k) for o in orders for k in keys} <= seen
        assert all(k in keys for o, k in seen if o in orders)
