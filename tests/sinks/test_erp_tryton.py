"""The ERP contract against a real trytond server, over its JSON-RPC."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest

from revline.sinks._protocols import ErpAdapter, PartialWriteError, PermanentSinkError
from revline.sinks.erp import TrytonErp, TrytonServer
from revline.sinks.erp import _mapping as m
from tests.sinks.erp_contract import (
    LINES,
    PARTIAL_DAY,
    ErpContract,
    booked,
    cancelled,
    captured,
    invoiced,
    line,
    new_order,
    refunded,
)
from tests.sinks.erp_fixtures import tryton_adapter, tryton_server

__all__ = ["tryton_server"]  # the session fixture, registered by this import


def _t(erp: ErpAdapter) -> TrytonErp:
    assert isinstance(erp, TrytonErp)
    return erp


def _minor(amount: Decimal, digits: int) -> int:
    return int(amount.scaleb(digits))


class TestTrytonErp(ErpContract):
    server: TrytonServer

    @pytest.fixture
    def erp(self, tryton_server: TrytonServer) -> Iterator[ErpAdapter]:
        self.server = tryton_server
        self._opened: list[TrytonErp] = []
        adapter = tryton_adapter(tryton_server)
        yield adapter
        adapter.close()
        for other in self._opened:
            other.close()

    def reopen(self, erp: ErpAdapter) -> ErpAdapter:
        fresh = tryton_adapter(self.server)
        self._opened.append(fresh)
        return fresh

    def counts(self, erp: ErpAdapter) -> dict[str, int]:
        t = _t(erp)
        invoices = t.rpc(
            "model.account.invoice.search_read", [["type", "=", "out"]], 0, None, None,
            ["total_amount"],
        )  # fmt: skip
        return {
            "sale": t.rpc("model.sale.sale.search_count", []),
            "invoice": sum(1 for i in invoices if i["total_amount"] >= 0),
            "credit_note": sum(1 for i in invoices if i["total_amount"] < 0),
            "payment": t.rpc(
                "model.account.move.search_count", [["description", "like", "%[revline step=%"]]
            ),
            "party": t.rpc("model.party.party.search_count", []),
        }

    def sale(self, erp: ErpAdapter, ref: str) -> dict[str, Any]:
        t = _t(erp)
        (sale,) = t.rpc(
            "model.sale.sale.read", [int(ref)],
            ["state", "currency.code", "currency.digits", "lines", "untaxed_amount"],
        )  # fmt: skip
        digits = sale["currency."]["digits"]
        lines = t.rpc("model.sale.line.read", sale["lines"], ["product.code", "quantity", "amount"])
        by_sku: dict[str, tuple[int, int]] = {}
        for ln in lines:
            sku = ln["product."]["code"]
            q, a = by_sku.get(sku, (0, 0))
            by_sku[sku] = (q + round(ln["quantity"]), a + _minor(ln["amount"], digits))
        return {
            "state": sale["state"],
            "currency": sale["currency."]["code"],
            "lines": sorted((sku, q, a) for sku, (q, a) in by_sku.items()),
            "untaxed_minor": _minor(sale["untaxed_amount"], digits),
        }

    def invoice(self, erp: ErpAdapter, ref: str) -> dict[str, Any]:
        (inv,) = _t(erp).rpc(
            "model.account.invoice.read", [int(ref)],
            ["state", "total_amount", "amount_to_pay", "reference", "currency.digits"],
        )  # fmt: skip
        digits = inv["currency."]["digits"]
        return {
            "state": inv["state"],
            "total_minor": _minor(inv["total_amount"], digits),
            "to_pay_minor": _minor(inv["amount_to_pay"], digits),
            "reference": inv["reference"],
        }

    @contextmanager
    def failing(self, erp: ErpAdapter, step: str) -> Iterator[None]:
        # A real refusal, not a stub: the accountant closed the month the invoice falls in.
        assert step == "invoice", "Tryton's contract run only breaks the invoice step"
        with self.closed_period(_t(erp), PARTIAL_DAY.date()):
            yield

    @contextmanager
    def closed_period(self, t: TrytonErp, day: dt.date) -> Iterator[None]:
        periods = t.rpc(
            "model.account.period.search",
            [["start_date", "<=", day], ["end_date", ">=", day], ["type", "=", "standard"]],
            0, None, None,
        )  # fmt: skip
        assert len(periods) == 1
        t.rpc("model.account.period.close", periods)
        try:
            yield
        finally:
            t.rpc("model.account.period.reopen", periods)
            # Tryton's period reopen leaves its journal-periods closed: a later test's move
            # in that month (an invoice date moved forward to it) would be refused.
            closed = t.rpc("model.account.journal.period.search",
                           [["period", "in", periods], ["state", "=", "closed"]], 0, None, None)
            if closed:
                t.rpc("model.account.journal.period.reopen", closed)

    @contextmanager
    def outage(self, erp: ErpAdapter) -> Iterator[None]:
        self.server.stop()
        try:
            yield
        finally:
            self.server.start()


def test_tryton_refusal_carries_trytons_own_text(tryton_server: TrytonServer) -> None:
    contract = TestTrytonErp()
    with tryton_adapter(tryton_server) as erp:
        order = new_order()
        erp.apply(booked(order, LINES, at=PARTIAL_DAY))
        with (
            contract.closed_period(erp, PARTIAL_DAY.date()),
            pytest.raises(PartialWriteError) as caught,
        ):
            erp.apply(invoiced(order, LINES, at=PARTIAL_DAY))
        cause = caught.value.cause
        assert isinstance(cause, PermanentSinkError)
        assert "Tryton refused" in str(cause)
        print(cause)


def test_a_sale_booked_before_split_billing_is_switched_to_manual_invoicing(
    tryton_server: TrytonServer,
) -> None:
    """Sales booked before invoices were created per event drafted one invoice of the whole
    sale when confirmed; the first invoice_issued switches such a quotation to manual."""
    with tryton_adapter(tryton_server) as erp:
        order = new_order()
        sale = int(erp.apply(booked(order, LINES)).external_refs["sale"])
        erp.rpc("model.sale.sale.draft", [sale])
        erp.rpc("model.sale.sale.write", [sale], {"invoice_method": "order"})
        erp.rpc("model.sale.sale.quote", [sale])
        deposit = invoiced(order, [line("D1", "SKU-CRM-PRO", 1, 60000)])
        result = erp.apply(deposit)
        (row,) = erp.rpc("model.sale.sale.read", [sale], ["invoice_method", "invoices", "state"])
        assert row["invoice_method"] == "manual"
        assert row["invoices"] == [int(result.external_refs["invoice"])]
        assert row["state"] in ("processing", "done")
        assert erp.lookup(order, deposit["envelope"]["idempotency_key"]) == {
            "sale": str(sale), "invoice": result.external_refs["invoice"],
        }  # fmt: skip


def test_ids_tryton_would_strip_are_stored_exactly(tryton_server: TrytonServer) -> None:
    """Tryton strips outer whitespace from Char fields; such ids are stored encoded."""
    with tryton_adapter(tryton_server) as erp:
        plain = new_order()
        padded = f"{plain} "
        refs = {o: erp.apply(booked(o, LINES, customer=f" {o}")).external_refs
                for o in (plain, padded)}  # fmt: skip
        assert refs[plain]["sale"] != refs[padded]["sale"]
        assert refs[plain]["party"] != refs[padded]["party"]
        (row,) = erp.rpc("model.sale.sale.read", [int(refs[plain]["sale"])], ["reference"])
        assert row["reference"] == plain  # an id without outer whitespace: as it always was
        sales = (refs[plain]["sale"], refs[padded]["sale"])  # ids are per model: sales only
        orders = {d.order_id for d in erp.documents() if d.step == "sale" and d.ref in sales}
        assert orders == {plain, padded}


class _Batched(TrytonErp):
    """``apply`` through ``apply_many`` (a batch of one): the batched path, wave by wave,
    under the whole contract."""

    def apply(self, event: Any) -> Any:
        (outcome,) = self.apply_many([event])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def _batched(server: TrytonServer) -> TrytonErp:
    db = server.database
    return _Batched(server.url, db.name, db.user, db.password, timeout=30.0)


class TestTrytonErpBatched(TestTrytonErp):
    @pytest.fixture
    def erp(self, tryton_server: TrytonServer) -> Iterator[ErpAdapter]:
        self.server = tryton_server
        self._opened: list[TrytonErp] = []
        adapter = _batched(tryton_server)
        yield adapter
        adapter.close()
        for other in self._opened:
            other.close()

    def reopen(self, erp: ErpAdapter) -> ErpAdapter:
        fresh = _batched(self.server)
        self._opened.append(fresh)
        return fresh


def _legacy(erp: TrytonErp, model: str, record: int, key: str) -> None:
    """Rewrite a document's marker of ``key`` as markers were stored before the escaping:
    ``%`` raw."""
    (row,) = erp.rpc(f"model.{model}.read", [record], ["comment"])
    escaped = m.escape_key(key)
    assert f"key={escaped}]" in row["comment"] and escaped != key
    erp.rpc(f"model.{model}.write", [record],
            {"comment": row["comment"].replace(f"key={escaped}]", f"key={key}]")})  # fmt: skip


@pytest.mark.parametrize("batched", [False, True], ids=["apply", "apply_many"])
def test_a_legacy_marker_with_a_raw_percent_is_found(
    tryton_server: TrytonServer, batched: bool
) -> None:
    """Keys written before the escaping stored ``%`` raw; after the upgrade the same event
    is found applied, never applied a second time (a raw ``%`` that starts no escape)."""
    with (_batched if batched else tryton_adapter)(tryton_server) as erp:
        order = new_order()
        booking = booked(order, LINES, key=f"{order}:book 50%off")
        sale = int(erp.apply(booking).external_refs["sale"])
        inv = invoiced(order, LINES, key=f"{order}:inv%41")
        invoice = int(erp.apply(inv).external_refs["invoice"])
        _legacy(erp, "sale.sale", sale, booking["envelope"]["idempotency_key"])
        _legacy(erp, "account.invoice", invoice, inv["envelope"]["idempotency_key"])
        before = erp.rpc("model.account.invoice.search_count", [])
        again = erp.apply(booking)
        assert (again.status, again.external_refs["sale"]) == ("already_applied", str(sale))
        again = erp.apply(inv)
        assert (again.status, again.external_refs["invoice"]) == (
            "already_applied", str(invoice))  # fmt: skip
        assert erp.rpc("model.account.invoice.search_count", []) == before
        assert erp.rpc("model.sale.sale.search_count", [["reference", "=", order]]) == 1
        assert erp.lookup(order, inv["envelope"]["idempotency_key"]) == {
            "sale": str(sale), "invoice": str(invoice)}  # fmt: skip


class _DiesBeforeRemarkingARefundsCredit(TrytonErp):
    """Dies (as kill -9 would: nothing after runs) at the write that re-marks the second
    credit of a cancellation, the credit of the refund's credit note."""

    remarks = 0

    def _m(self, model: str, method: str, *args: Any, context: Any = None) -> Any:
        if (model == "account.invoice" and method == "write" and len(args) == 2
                and str(args[1].get("description", "")).startswith("cancellation ")):
            self.remarks += 1
            if self.remarks == 2:
                raise RuntimeError("killed between the credit wizard and the re-marking")
        return super()._m(model, method, *args, context=context)


def test_a_cancellation_killed_after_crediting_a_refund_note_credits_it_once(
    tryton_server: TrytonServer,
) -> None:
    """Crediting a refund's credit note copies that note's marker: a replay took the
    interrupted attempt's credit for someone else's and credited the note again."""
    order = new_order()
    db = tryton_server.database
    dying = _DiesBeforeRemarkingARefundsCredit(tryton_server.url, db.name, db.user, db.password,
                                               timeout=30.0)
    inv = invoiced(order, LINES)
    total = inv["total_minor"]
    cancel = cancelled(order, later=dt.timedelta(days=3))
    for event in (booked(order, LINES), inv, captured(order, 1, total),
                  refunded(order, total // 4)):
        dying.apply(event)
    with pytest.raises(RuntimeError, match="killed"):
        dying.apply(cancel)
    dying.close()
    erp = tryton_adapter(tryton_server)
    try:
        assert erp.apply(cancel).status == "applied"
        assert erp.apply(cancel).status == "already_applied"
        ids = sorted(erp._order_invoices(order))
        docs = erp.rpc("model.account.invoice.read", ids,
                       ["total_amount", "amount_to_pay", "state"])  # fmt: skip
        digits = 2
        assert sum(_minor(Decimal(d["total_amount"]), digits) for d in docs) == 0, docs
        owed = sum(_minor(Decimal(d["amount_to_pay"]), digits) for d in docs)
        assert owed == -(total - total // 4), docs
    finally:
        erp.close()
