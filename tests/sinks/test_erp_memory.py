"""The ERP contract on the in-memory reference adapter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from revline.core.errors import ConfigurationError
from revline.sinks._protocols import ErpAdapter, PermanentSinkError
from revline.sinks.erp import InMemoryErp, MemoryErpStore
from tests.sinks.erp_contract import LINES, ErpContract, booked, invoiced, line, new_order


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



class TestDurableInMemoryErp(TestInMemoryErp):
    """The same contract on a store with a journal, where a reopened adapter is another
    process reading the file: every document must come back as it was written."""

    @pytest.fixture
    def erp(self, tmp_path: Path) -> Iterator[ErpAdapter]:
        store = MemoryErpStore(journal=tmp_path / "erp.jsonl")
        yield InMemoryErp(store)
        store.close()

    def reopen(self, erp: ErpAdapter) -> ErpAdapter:
        # The old process is gone: what both handles see from here on is what the file
        # gave back (the contract then reads the ERP through the first handle).
        old = _mem(erp)
        old.store.close()
        old.store = MemoryErpStore(journal=old.store.journal)
        return InMemoryErp(old.store)


def test_a_journal_line_cut_by_a_kill_is_as_if_that_apply_never_happened(
        tmp_path: Path) -> None:
    journal = tmp_path / "erp.jsonl"
    erp = InMemoryErp(MemoryErpStore(journal=journal))
    order = new_order()
    erp.apply(booked(order, LINES))
    invoice = invoiced(order, LINES)
    erp.apply(invoice)
    whole = journal.read_bytes()
    before = {k: dict(v) for k, v in erp.store.invoices.items()}
    erp.store.close()  # the process is killed: its lock on the file goes with it
    journal.write_bytes(whole[: len(whole) - 7])  # the invoice's line, cut mid-write
    again = InMemoryErp(MemoryErpStore(journal=journal))
    with pytest.raises(ConfigurationError, match="in use by another process"):
        MemoryErpStore(journal=journal)  # a second sink on the same file
    assert not again.store.invoices  # the booking is there, the invoice is not
    assert again.apply(booked(order, LINES)).status == "already_applied"
    assert again.apply(invoice).status == "applied"  # applied again, once
    assert {k: dict(v) for k, v in again.store.invoices.items()} == before
    again.store.close()
    third = InMemoryErp(MemoryErpStore(journal=journal))
    assert third.apply(invoice).status == "already_applied"
    assert third.store.counts() == again.store.counts()



def test_a_line_written_after_a_cut_one_is_not_lost_with_it(tmp_path: Path) -> None:
    # The cut line is dropped from the file on opening: the next line appended does not
    # glue onto it (both would be unreadable, and B's sale, recorded done, gone).
    journal = tmp_path / "erp.jsonl"
    erp = InMemoryErp(MemoryErpStore(journal=journal))
    a, b = new_order(), new_order()
    erp.apply(booked(a, LINES))
    erp.apply(booked(b, LINES))
    erp.store.close()
    journal.write_bytes(journal.read_bytes()[:-9])  # B's line cut by a kill
    again = InMemoryErp(MemoryErpStore(journal=journal))
    assert again.apply(booked(b, LINES)).status == "applied"
    again.store.close()
    third = InMemoryErp(MemoryErpStore(journal=journal))
    assert third.apply(booked(a, LINES)).status == "already_applied"
    assert third.apply(booked(b, LINES)).status == "already_applied"
    assert third.apply(invoiced(b, LINES)).status == "applied"


def test_a_failed_write_is_taken_back_and_the_retry_writes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from revline.sinks._protocols import TransientSinkError
    from revline.sinks.erp import _memory

    journal = tmp_path / "erp.jsonl"
    erp = InMemoryErp(MemoryErpStore(journal=journal))
    a = new_order()
    erp.apply(booked(a, LINES))
    real_write = os.write

    def half(fd: int, data: bytes) -> int:  # a disk that fills in the middle of the line
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(_memory.os, "write", half)
    with pytest.raises(TransientSinkError, match="write failed"):
        erp.apply(invoiced(a, LINES))
    monkeypatch.setattr(_memory.os, "write", real_write)
    assert journal.read_bytes().endswith(b"\n")  # the half line is gone
    # The retry finds the invoice in memory and writes it now.
    assert erp.apply(invoiced(a, LINES)).status == "already_applied"
    erp.store.close()
    again = InMemoryErp(MemoryErpStore(journal=journal))
    assert again.apply(invoiced(a, LINES)).status == "already_applied"
    with pytest.raises(ConfigurationError, match="does not exist"):
        MemoryErpStore(journal=tmp_path / "typo.jsonl", read_only=True)


def test_fail_next_fires_once_and_only_for_its_step() -> None:
    erp = InMemoryErp()
    erp.fail_next("invoice", PermanentSinkError("boom"))
    order = new_order()
    assert erp.apply(booked(order, [line("L1", "SKU-CRM-PRO", 1, 100)])).status == "applied"
    assert erp.pending_failures()  # still armed: a booking writes no invoice
