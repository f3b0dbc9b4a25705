"""The ERP contract on the in-memory reference adapter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from revline.sinks._protocols import ErpAdapter, PermanentSinkError
from revline.sinks.erp import InMemoryErp
from tests.sinks.erp_contract import ErpContract, booked, line, new_order


def _mem(erp: ErpAdapter) -> InMemoryErp:
    assert isinstance(erp, InMemoryErp)
    return erp


def _by_sku(lines: Any) -> list[tuple[str, int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for ln in lines:
        q, a = out.get(ln.sku, (0, 0))
        out[ln.sku] = (q + ln.quantity, a + ln.amount_minor)
    return sorted((sku, q, a) for sku, (q, a) in out.items())


class TestInMemoryErp(ErpContract):
    @pytest.fixture
    def erp(self) -> Iterator[ErpAdapter]:
        yield InMemoryErp()

    def reopen(self, erp: ErpAdapter) -> ErpAdapter:
        return InMemoryErp(_mem(erp).store)

    def counts(self, erp: ErpAdapter) -> dict[str, int]:
        counts = _mem(erp).store.counts()
        counts["payment"] = counts.pop("move")
        return counts

    def sale(self, erp: ErpAdapter, ref: str) -> dict[str, Any]:
        sale = _mem(erp).store.sales[int(ref)]
        return {
            "state": sale["state"],
            "currency": sale["currency"],
            "lines": _by_sku(sale["lines"]),
            "untaxed_minor": sum(ln.amount_minor for ln in sale["lines"]),
        }

    def invoice(self, erp: ErpAdapter, ref: str) -> dict[str, Any]:
        inv = _mem(erp).store.invoices[int(ref)]
        return {
            "state": inv["state"],
            "total_minor": inv["total_minor"],
            "to_pay_minor": inv["amount_to_pay_minor"],
            "reference": inv["reference"],
        }

    @contextmanager
    def failing(self, erp: ErpAdapter, step: str) -> Iterator[None]:
        _mem(erp).fail_next(step, PermanentSinkError(f"injected failure of {step}"))
        try:
            yield
        finally:
            _mem(erp).clear_failures()

    @contextmanager
    def outage(self, erp: ErpAdapter) -> Iterator[None]:
        _mem(erp).available = False
        try:
            yield
        finally:
            _mem(erp).available = True


def test_fail_next_fires_once_and_only_for_its_step() -> None:
    erp = InMemoryErp()
    erp.fail_next("invoice", PermanentSinkError("boom"))
    order = new_order()
    assert erp.apply(booked(order, [line("L1", "SKU-CRM-PRO", 1, 100)])).status == "applied"
    assert erp.pending_failures()  # still armed: a booking writes no invoice
