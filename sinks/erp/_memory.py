"""``InMemoryErp``: the reference ERP adapter, documents in dicts.

Same documents, steps, markers, refs and errors as ``TrytonErp`` (the shared rules
are in ``_mapping``), so the demo runs without Tryton and the contract suite pins
both to one behaviour. The documents live in a ``MemoryErpStore``; a second
adapter over the same store is a restarted worker in front of the same ERP.

Every document carries its ``order``: an effect is (order id, idempotency key), and
lookups read the order's documents only.

Test hooks: ``fail_next(step, error)`` makes the next write of a step raise
``error`` (after the earlier steps were applied), ``available = False`` makes
every call raise ``TransientSinkError`` as an unreachable server would.

Durable across processes: with ``journal`` (the sink's ``REVLINE_MEMORY_ERP_FILE``),
every ``apply`` ends by appending the order's documents, as they now stand, to that
file, and a store opened on it reads them back: a sink killed with ``kill -9`` and
restarted finds what it had written, as it would in Tryton. A write is one ``write``
call on an append-only file; a line a kill cut short is ignored on reading (that
apply is then as if it had not happened, and its event is applied again).

An outage from outside the process: with ``outage_file`` (the sink's
``REVLINE_MEMORY_ERP_OUTAGE_FILE``), every call raises that same
``TransientSinkError`` while the file exists, as a Tryton that cannot be reached
does; the sink backs off, opens its breaker and pauses, and goes on where it
stopped once the file is gone (``revline chaos`` takes the ERP down this way).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from revline.core.errors import ConfigurationError
from revline.sinks._protocols import (
    EffectResult,
    ErpDocument,
    Event,
    PermanentSinkError,
    TransientSinkError,
)
from revline.sinks.erp import _mapping as m
from revline.sinks.erp._tryton_setup import REFUND_SKU


def _default_skus() -> frozenset[str]:
    import yaml

    from revline.processors.reference import ReferenceData
    from revline.sinks.erp._tryton_setup import REFERENCE_FILE

    data = yaml.safe_load(REFERENCE_FILE.read_text(encoding="utf-8"))
    return frozenset(ReferenceData.from_mapping(data).products) | {REFUND_SKU}


_TEXT_FIELDS = ("comment", "description")  # where documents carry their markers

KeyIndex = dict[str, set[tuple[str, int]]]  # idempotency key -> (kind, document id)
_REF = "\0reference:"  # index entries for a document's reference (order id, invoice id)


class _Doc(dict[str, Any]):
    """A document that adds its markers to the store's key index whenever its text changes,
    so a lookup by key reads a few documents instead of scanning them all."""

    __slots__ = ("_index", "_ref")

    def __init__(self, data: Mapping[str, Any], index: KeyIndex, ref: tuple[str, int]) -> None:
        super().__init__(data)
        self._index = index
        self._ref = ref
        self._add_markers()

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        if name in _TEXT_FIELDS or name == "reference":
            self._add_markers()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._add_markers()

    def _add_markers(self) -> None:
        # Markers are only ever added; a stale entry is harmless (lookups re-check the text).
        for name in _TEXT_FIELDS:
            for _step, key in m.markers(self.get(name)):
                self._index.setdefault(key, set()).add(self._ref)
        if self.get("reference"):
            self._index.setdefault(_REF + str(self["reference"]), set()).add(self._ref)


class _Docs(dict[int, dict[str, Any]]):
    """One kind of document by id; every document stored is indexed by its markers."""

    def __init__(self, kind: str, index: KeyIndex) -> None:
        super().__init__()
        self.kind = kind
        self.index = index
        self.of_order: dict[str, set[int]] = {}  # order id -> ids (what a journal line holds)

    def __setitem__(self, doc_id: int, doc: dict[str, Any]) -> None:
        super().__setitem__(doc_id, _Doc(doc, self.index, (self.kind, doc_id)))
        self.of_order.setdefault(str(doc.get("order")), set()).add(doc_id)

    def marked(self, key: str) -> list[int]:
        """Ids of the documents of this kind that carry a marker of ``key``, in id order."""
        return sorted(i for kind, i in self.index.get(key, ()) if kind == self.kind)

    def referenced(self, reference: str) -> list[tuple[int, dict[str, Any]]]:
        """(id, document) of those whose ``reference`` is ``reference``, in id order."""
        ids = sorted(i for kind, i in self.index.get(_REF + reference, ()) if kind == self.kind)
        return [(i, self[i]) for i in ids if self[i].get("reference") == reference]


@dataclass
class MemoryErpStore:
    """The ERP's database: what survives an adapter (worker) restart."""

    skus: frozenset[str] = field(default_factory=_default_skus)
    parties: dict[int, dict[str, Any]] = field(default_factory=dict)
    party_ids: dict[str, int] = field(default_factory=dict)  # code -> id, as the ERP's index
    available: bool = True
    lock: threading.RLock = field(default_factory=threading.RLock)
    _next: int = 0
    by_key: KeyIndex = field(default_factory=dict)
    journal: Path | None = None  # durable: see the module docstring
    read_only: bool = False  # read the journal, take no lock, write nothing (reconcile)

    def __post_init__(self) -> None:
        self.sales = _Docs("sale", self.by_key)
        self.invoices = _Docs("invoice", self.by_key)
        self.moves = _Docs("move", self.by_key)
        self._saved_parties: set[int] = set()
        self._written: dict[tuple[str, int], bytes] = {}  # each document as last written
        self._journal_fd: int | None = None
        if self.journal is not None and self.read_only:
            if not self.journal.is_file():  # a misspelt path would read as an empty ERP
                raise ConfigurationError(
                    f"in-memory ERP file {self.journal} does not exist (REVLINE_MEMORY_ERP_FILE "
                    "names the sink's file)")
            self._read_journal(self.journal)
        elif self.journal is not None:
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:  # one process per file: two would hand out the same document ids
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigurationError(
                    f"in-memory ERP file {self.journal} is in use by another process "
                    "(one sink per file)") from None
            self._journal_fd = fd
            whole = self._read_journal(self.journal)
            # A line a kill cut short is dropped from the file too: the next line appended
            # to it would otherwise be unreadable with it.
            if os.fstat(fd).st_size != whole:
                os.ftruncate(fd, whole)

    def _tables(self) -> dict[str, _Docs]:
        return {"sale": self.sales, "invoice": self.invoices, "move": self.moves}

    def _read_journal(self, path: Path) -> int:
        """Load the file's documents; the length of its whole lines (the rest was cut)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        whole = data.rfind(b"\n") + 1
        tables = self._tables()
        for line in data[:whole].split(b"\n"):
            if not line:
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # not a record (it cannot be one of ours: each is one write)
            self._next = max(self._next, int(record["next"]))
            for pid, party in record["parties"]:
                self.parties[int(pid)] = party
                self.party_ids[str(party["code"])] = int(pid)
                self._saved_parties.add(int(pid))
            for kind, doc_id, doc in record["docs"]:
                tables[kind][int(doc_id)] = {k: _thaw(v) for k, v in doc.items()}
        return whole

    def save_order(self, order_id: str) -> None:
        """Append the order's documents (and parties not yet saved) to the journal."""
        if self._journal_fd is None:
            if self.journal is not None and not self.read_only:
                raise TransientSinkError(f"in-memory ERP file {self.journal} is closed")
            return
        # Only the documents that changed since they were last written: the file grows
        # with the writes, not with the order's size times its events.
        changed: dict[tuple[str, int], bytes] = {}
        for kind, table in self._tables().items():
            for doc_id in sorted(table.of_order.get(order_id, ())):
                text = orjson.dumps({k: _freeze(v) for k, v in table[doc_id].items()})
                if self._written.get((kind, doc_id)) != text:
                    changed[(kind, doc_id)] = text
        parties = ([] if len(self.parties) == len(self._saved_parties) else  # only ever added
                   [(pid, party) for pid, party in sorted(self.parties.items())
                    if pid not in self._saved_parties])
        if not changed and not parties:
            return
        docs = [(kind, doc_id, orjson.Fragment(text)) for (kind, doc_id), text in changed.items()]
        line = orjson.dumps({"next": self._next, "parties": parties, "docs": docs}) + b"\n"
        fd = self._journal_fd
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"wrote {written} of {len(line)} bytes")
        except OSError as exc:  # a disk full: take back the half line, or the next is lost
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise TransientSinkError(
                f"in-memory ERP file {self.journal}: the write failed ({exc})") from exc
        self._saved_parties.update(pid for pid, _ in parties)
        self._written.update(changed)

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def new_id(self) -> int:
        self._next += 1
        return self._next

    def counts(self) -> dict[str, int]:
        return {
            "party": len(self.parties),
            "sale": len(self.sales),
            "invoice": sum(1 for i in self.invoices.values() if i["total_minor"] >= 0),
            "credit_note": sum(1 for i in self.invoices.values() if i["total_minor"] < 0),
            "move": len(self.moves),
        }


class InMemoryErp:
    """``ErpAdapter`` over a ``MemoryErpStore`` (see the module docstring)."""

    name = "erp"

    def __init__(self, store: MemoryErpStore | None = None, *,
                 outage_file: str | os.PathLike[str] | None = None) -> None:
        self.store = store if store is not None else MemoryErpStore()
        self._failures: dict[str, Exception] = {}
        # While this file exists, the ERP is "down" (see the module docstring).
        self.outage_file = os.fspath(outage_file) if outage_file is not None else None

    def close(self) -> None:
        """Release the store's file (a store without one has nothing to release)."""
        self.store.close()

    # -- test hooks ------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.store.available

    @available.setter
    def available(self, value: bool) -> None:
        self.store.available = value

    def fail_next(self, step: str, error: Exception) -> None:
        """The next write of ``step`` raises ``error`` instead of happening."""
        self._failures[step] = error

    def pending_failures(self) -> dict[str, Exception]:
        return dict(self._failures)

    def clear_failures(self) -> None:
        self._failures.clear()

    def _write(self, step: str) -> None:
        """Called right before each write, where a real ERP could fail."""
        self._reach()
        error = self._failures.pop(step, None)
        if error is not None:
            raise error

    def _reach(self) -> None:
        if not self.store.available:
            raise TransientSinkError("in-memory ERP is unavailable (simulated outage)")
        if self.outage_file is not None and os.path.exists(self.outage_file):
            raise TransientSinkError(
                f"in-memory ERP is unavailable (outage: {self.outage_file} exists)")

    # -- lookup ----------------------------------------------------------------------------
    @staticmethod
    def _order_of(doc: Mapping[str, Any]) -> str | None:
        """The order a document belongs to (every sale, invoice, credit note and move has one)."""
        order = doc.get("order")
        return None if order is None else str(order)

    def _marked(
        self, docs: Mapping[int, Mapping[str, Any]], field_: str, order_id: str, key: str
    ) -> list[tuple[str, int]]:
        """(step, id) of the order's documents carrying a marker of ``key``, in id order."""
        ids = docs.marked(key) if isinstance(docs, _Docs) else sorted(docs)
        return [
            (step, doc_id)
            for doc_id in ids
            if self._order_of(docs[doc_id]) == order_id
            for step, k in m.markers(docs[doc_id].get(field_))
            if k == key
        ]

    def lookup(self, order_id: str, idempotency_key: str) -> dict[str, str]:
        with self.store.lock:
            self._reach()
            refs: dict[str, str] = {}
            for docs, field_ in (
                (self.store.sales, "comment"),
                (self.store.invoices, "comment"),
                (self.store.moves, "description"),
            ):
                for step, doc_id in self._marked(docs, field_, order_id, idempotency_key):
                    # Completed steps only, as TrytonErp: a marked draft is a step under way.
                    if docs[doc_id].get("state") != "draft":
                        refs.setdefault(step, str(doc_id))
            return refs

    def documents(self) -> list[ErpDocument]:
        """Read-only: every marked document, one entry per marker (for reconciliation)."""
        with self.store.lock:
            self._reach()
            out: list[ErpDocument] = []
            for sale_id, sale in sorted(self.store.sales.items()):
                amount = sum(ln.amount_minor for ln in sale["lines"])
                for step, key in m.markers(sale.get("comment")):
                    out.append(ErpDocument(key, step, str(sale_id), sale["currency"], amount,
                                           sale["state"], sale.get("sale_date"),
                                           order_id=str(sale["reference"])))
            for inv_id, inv in sorted(self.store.invoices.items()):
                for step, key in m.markers(inv.get("comment")):
                    out.append(ErpDocument(key, step, str(inv_id), inv["currency"],
                                           inv["total_minor"], inv["state"],
                                           inv.get("invoice_date"), order_id=str(inv["order"])))
            for move_id, move in sorted(self.store.moves.items()):
                currency = self.store.invoices[move["invoice"]]["currency"]
                for step, key in m.markers(move.get("description")):
                    out.append(ErpDocument(key, step, str(move_id), currency,
                                           move["amount_minor"], "posted", move.get("date"),
                                           order_id=str(move["order"])))
            return out

    # -- apply -----------------------------------------------------------------------------
    def apply(self, event: Event) -> EffectResult:
        with self.store.lock:
            try:
                result = m.dispatch(self, event, before=self._reach)
            except BaseException:
                # What a failed step left written is kept too, as Tryton's commits are. If
                # keeping it fails, that TransientSinkError stands (the refusal or partial
                # write is its __context__): the retry finds the documents in memory and
                # writes them then, so nothing is taken as done that is not in the file.
                self._save(event)
                raise
            self._save(event)
            return result

    def _save(self, event: Event) -> None:
        env = event.get("envelope")
        if isinstance(env, Mapping) and env.get("order_id") is not None:
            self.store.save_order(str(env["order_id"]))

    # -- shared pieces ---------------------------------------------------------------------
    def _sale_for_order(self, order_id: str) -> tuple[int, dict[str, Any]] | None:
        rows = self.store.sales.referenced(order_id)
        if not rows:
            return None
        live = [r for r in rows if r[1]["state"] != "cancelled"]
        return (live or rows)[-1]

    def _require_sale(self, order_id: str, etype: str) -> tuple[int, dict[str, Any]]:
        found = self._sale_for_order(order_id)
        if found is None:
            raise PermanentSinkError(
                f"{etype} for order {order_id}: the ERP has no sale with reference {order_id} "
                "(the booking has not been applied)"
            )
        return found

    def _priced(self, lines: Any, currency: str) -> list[m.PricedLine]:
        priced = m.price_lines(lines, m.currency_digits(currency))
        unknown = sorted({ln.sku for ln in priced} - self.store.skus)
        if unknown:
            raise PermanentSinkError(f"unknown SKU(s) in the ERP: {unknown}")
        return priced

    def _check_currency(self, doc: Mapping[str, Any], code: str, what: str) -> int:
        if doc["currency"] != code:
            raise PermanentSinkError(
                f"{what} is in {doc['currency']} in the ERP, the event is in {code}"
            )
        return m.currency_digits(code)

    def _party(self, customer_id: str) -> int:
        pid = self.store.party_ids.get(customer_id)
        if pid is None:
            pid = self.store.new_id()
            self.store.parties[pid] = {"code": customer_id, "name": customer_id}
            self.store.party_ids[customer_id] = pid
        return pid

    # -- events ----------------------------------------------------------------------------
    def _book(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        order_id = str(env["order_id"])
        marked = [
            i for s, i in self._marked(self.store.sales, "comment", order_id, key) if s == m.SALE
        ]
        if marked:
            sale = self.store.sales[marked[0]]
            p.ref(m.PARTY, sale["party"])
            if sale["state"] == "draft":
                self._write(m.SALE)
                sale["state"] = "quotation"
                p.wrote = True
            p.complete(m.SALE, marked[0])
            return
        other = self._sale_for_order(order_id)
        if other is not None and other[1]["state"] != "cancelled":
            raise PermanentSinkError(
                f"order {order_id} is already sale {other[0]} in the ERP, booked under another key"
            )
        currency = str(event["currency"])
        priced = self._priced(event["lines"], currency)
        self._write(m.PARTY)
        party = self._party(str(event["customer_id"]))
        p.ref(m.PARTY, party)
        self._write(m.SALE)
        sale_id = self.store.new_id()
        self.store.sales[sale_id] = {
            "reference": order_id,
            "order": order_id,
            "party": party,
            "currency": currency,
            "state": "quotation",
            "lines": priced,
            "comment": m.marker(m.SALE, key),
            "invoices": [],
            "sale_date": m.event_day(env["occurred_at"]),
        }
        p.wrote = True
        p.complete(m.SALE, sale_id)

    def _amend(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        sale_id, sale = self._require_sale(str(env["order_id"]), "order_amended")
        p.ref(m.PARTY, sale["party"])
        if (m.SALE, key) in m.markers(sale["comment"]):
            p.complete(m.SALE, sale_id)
            return
        if sale["state"] not in ("draft", "quotation"):
            raise PermanentSinkError(
                f"sale {sale_id} for order {env['order_id']} is {sale['state']}: the ERP does not "
                "change the lines of a confirmed sale; amendment "
                f"{env.get('amendment_number')} needs a credit note and a new order"
            )
        self._check_currency(sale, str(event["currency"]), f"sale {sale_id}")
        priced = self._priced(event["lines"], str(event["currency"]))
        self._write(m.SALE)
        sale["lines"] = priced
        sale["comment"] = m.add_marker(sale["comment"], m.SALE, key)
        sale["state"] = "quotation"
        p.wrote = True
        p.complete(m.SALE, sale_id)

    def _cancel(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        order_id = str(env["order_id"])
        sale_id, sale = self._require_sale(order_id, "order_cancelled")
        p.ref(m.PARTY, sale["party"])
        if sale["state"] in ("draft", "quotation"):
            self._write(m.SALE)
            sale["state"] = "cancelled"
            p.wrote = True
        elif sale["state"] != "cancelled":
            m.refuse_a_second_cancellation(order_id, key, [
                self.store.invoices[n]["comment"] for n in sale.get("cancellation_notes", [])
            ])  # fmt: skip
            # One credit note per invoice of the order (a deposit and a balance: two), and
            # one crediting each refund's credit note: the invoices' credit notes give the
            # customer back all they were billed, so what the refunds' notes already gave
            # back is taken back (the ledger moves those refunds to AR alike). The order's
            # documents then owe the customer what was paid and not yet refunded.
            for inv_id in [*sale["invoices"], *sale.get("refund_notes", [])]:
                credit = self._credit_invoice(inv_id, order_id, key, env, p)
                notes = sale.setdefault("cancellation_notes", [])
                if credit is not None and inv_id in sale["invoices"] and credit not in notes:
                    notes.append(credit)
                # The refs name the first credit note (as lookup does: lowest id first).
                if credit is not None and m.CREDIT_NOTE not in p.done:
                    p.complete(m.CREDIT_NOTE, credit)
        if (m.SALE, key) not in m.markers(sale["comment"]):
            self._write(m.SALE)
            sale["comment"] = m.add_marker(sale["comment"], m.SALE, key)
            p.wrote = True
        p.complete(m.SALE, sale_id)

    def _credit_invoice(
        self, inv_id: int, order_id: str, key: str, env: Mapping[str, Any], p: m.Progress
    ) -> int | None:
        invoice = self.store.invoices[inv_id]
        mine = [
            i
            for s, i in self._marked(self.store.invoices, "comment", order_id, key)
            if s == m.CREDIT_NOTE and self.store.invoices[i].get("credit_of") == inv_id
        ]
        if mine:
            return mine[0]
        if invoice["state"] == "draft":
            self._write(m.INVOICE)
            invoice["state"] = "cancelled"
            p.wrote = True
            return None
        if invoice["state"] not in ("posted", "paid"):
            return None
        self._write(m.CREDIT_NOTE)
        credit_id = self.store.new_id()
        unpaid = invoice["amount_to_pay_minor"] == invoice["total_minor"]
        self.store.invoices[credit_id] = {
            **invoice,
            "reference": None,
            "state": "paid" if unpaid else "posted",
            "untaxed_minor": -invoice["untaxed_minor"],
            "tax_minor": -invoice["tax_minor"],
            "total_minor": -invoice["total_minor"],
            "amount_to_pay_minor": 0 if unpaid else -invoice["total_minor"],
            "comment": m.marker(m.CREDIT_NOTE, key),
            "invoice_date": m.event_day(env["occurred_at"]),
            "credit_of": inv_id,
        }
        if unpaid:  # credited with refund: the two cancel out, as Tryton reconciles them
            invoice["state"] = "cancelled"
            invoice["amount_to_pay_minor"] = 0
            invoice["posted"] = True  # it was posted: a replay of its event is applied
        p.wrote = True
        return credit_id

    def _invoice(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        """One ERP invoice per invoice_issued, with the event's own lines, tax and total
        (a deposit and its balance, or one invoice per shipment, are separate invoices).

        Step "sale": the first invoice confirms the sale (processing: no more amendments).
        Step "invoice": a draft invoice carrying the marker, then posted. A failure of the
        invoice step (``fail_next("invoice")``) fires at posting and leaves the marked
        draft behind, as a Tryton refusing to post does; the retry posts that draft.
        """
        order_id = str(env["order_id"])
        invoice_ref = str(env.get("invoice_id") or key)
        sale_id, sale = self._require_sale(order_id, "invoice_issued")
        p.ref(m.PARTY, sale["party"])
        currency = str(event["currency"])
        self._check_currency(sale, currency, f"sale {sale_id}")
        marked = [
            i
            for s, i in self._marked(self.store.invoices, "comment", order_id, key)
            if s == m.INVOICE
        ]
        priced: list[m.PricedLine] = []
        if not marked:
            priced = self._priced(event["lines"], currency)
            untaxed = sum(ln.amount_minor for ln in priced)
            if untaxed != int(event["subtotal_minor"]):
                raise PermanentSinkError(
                    f"invoice {invoice_ref}: lines sum to {untaxed} "
                    f"but subtotal_minor is {event['subtotal_minor']}"
                )
            if self._invoice_of(order_id, invoice_ref) is not None:
                raise PermanentSinkError(
                    f"order {order_id} already has an invoice {invoice_ref} in the ERP, "
                    "issued under another key"
                )
        if sale["state"] == "cancelled":
            raise PermanentSinkError(f"sale {sale_id} for order {order_id} is cancelled")
        if sale["state"] in ("draft", "quotation"):
            self._write(m.SALE)
            sale["state"] = "processing"  # confirmed: its lines no longer change
            p.wrote = True
        if (m.SALE, key) not in m.markers(sale["comment"]):
            self._write(m.SALE)
            sale["comment"] = m.add_marker(sale["comment"], m.SALE, key)
            p.wrote = True
        p.complete(m.SALE, sale_id)

        if marked:
            inv_id = marked[0]
        else:
            self._reach()
            inv_id = self.store.new_id()
            untaxed = sum(ln.amount_minor for ln in priced)
            tax = int(event.get("tax_minor") or 0)
            self.store.invoices[inv_id] = {
                "reference": invoice_ref,
                "order": order_id,
                "party": sale["party"],
                "currency": currency,
                "sale": sale_id,
                "state": "draft",
                "lines": priced,
                "untaxed_minor": untaxed,
                "tax_minor": tax,
                "total_minor": untaxed + tax,
                "amount_to_pay_minor": untaxed + tax,
                "comment": m.marker(m.INVOICE, key),
                "invoice_date": m.event_day(env["occurred_at"]),
            }
            sale["invoices"].append(inv_id)
            p.wrote = True
        inv = self.store.invoices[inv_id]
        p.ref(m.INVOICE, inv_id)
        if inv["state"] == "draft":
            if inv["total_minor"] != int(event["total_minor"]):
                raise PermanentSinkError(
                    f"invoice {inv_id} totals {inv['total_minor']} in the ERP but the event says "
                    f"{event['total_minor']}"
                )
            self._write(m.INVOICE)
            inv["state"] = "posted"
            p.wrote = True
        elif inv["state"] == "cancelled" and not inv.get("posted"):
            # A draft the cancellation withdrew: this invoice was never issued in the ERP.
            # (One posted, then credited by the cancellation, is this event applied.)
            raise PermanentSinkError(f"invoice {inv_id} for {invoice_ref} is cancelled in the ERP")
        p.complete(m.INVOICE, inv_id)

    def _invoice_of(self, order_id: str, invoice_ref: str) -> int | None:
        """The order's invoice (not a credit note) whose reference is ``invoice_ref``."""
        found = [
            i
            for i, inv in self.store.invoices.referenced(invoice_ref)
            if inv.get("order") == order_id
            and any(step == m.INVOICE for step, _ in m.markers(inv["comment"]))
        ]
        return found[0] if found else None

    def _move(self, order_id: str, key: str, step: str) -> int | None:
        moves = [
            i
            for s, i in self._marked(self.store.moves, "description", order_id, key)
            if s == step
        ]
        return moves[0] if moves else None

    def _pay(self, inv_id: int, amount_minor: int, description: str, env: Mapping[str, Any]) -> int:
        inv = self.store.invoices[inv_id]
        move_id = self.store.new_id()
        self.store.moves[move_id] = {
            "invoice": inv_id,
            "order": inv["order"],
            "amount_minor": amount_minor,
            "description": description,
            "date": m.event_day(env["occurred_at"]),
        }
        inv["amount_to_pay_minor"] -= amount_minor
        if inv["amount_to_pay_minor"] == 0:
            inv["state"] = "paid"
        return move_id

    def _payment(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        order_id = str(env["order_id"])
        invoice_ref = str(env.get("invoice_id") or "")
        inv_id = self._invoice_of(order_id, invoice_ref)
        if inv_id is None:
            raise PermanentSinkError(
                f"payment {env.get('payment_id')}: the ERP has no invoice {invoice_ref} "
                f"for order {order_id}"
            )
        inv = self.store.invoices[inv_id]
        p.ref(m.INVOICE, inv_id)
        move = self._move(order_id, key, m.PAYMENT)
        if move is None:
            self._check_currency(inv, str(event["currency"]), f"invoice {inv_id}")
            amount = int(event["amount_minor"])
            if inv["state"] != "posted":
                raise PermanentSinkError(
                    f"invoice {inv_id} ({invoice_ref}) is {inv['state']}: cannot take a payment"
                )
            if amount <= 0 or amount > inv["amount_to_pay_minor"]:
                digits = m.currency_digits(inv["currency"])
                raise PermanentSinkError(
                    f"payment of {m.to_major(amount, digits)} {event['currency']} does not fit "
                    f"invoice {invoice_ref}'s open balance "
                    f"{m.to_major(inv['amount_to_pay_minor'], digits)}"
                )
            self._write(m.PAYMENT)
            description = f"{m.marker(m.PAYMENT, key)} {env.get('payment_id')}"
            move = self._pay(inv_id, amount, description, env)
            p.wrote = True
        p.complete(m.PAYMENT, move)

    def _refund(self, event: Event, env: Mapping[str, Any], key: str, p: m.Progress) -> None:
        order_id = str(env["order_id"])
        refund_ref = str(event.get("refund_id") or key)
        currency = str(event["currency"])
        amount = int(event["amount_minor"])
        if amount <= 0:
            raise PermanentSinkError(f"refund {refund_ref}: amount {amount} is not positive")
        marked = [
            i
            for s, i in self._marked(self.store.invoices, "comment", order_id, key)
            if s == m.CREDIT_NOTE
        ]
        if not marked:
            paying = self._cancellation_credit(order_id, key, str(env.get("payment_id")), amount)
            if paying is not None:
                self._pay_out(paying, order_id, key, refund_ref, amount, env, p)
                return
        if marked:
            credit_id = marked[0]
        else:
            sale_id, sale = self._require_sale(order_id, "refund_issued")
            unit = m.to_major(amount, m.currency_digits(currency))
            self._write(m.CREDIT_NOTE)
            credit_id = self.store.new_id()
            self.store.invoices[credit_id] = {
                "reference": refund_ref,
                "order": order_id,
                "party": sale["party"],
                "currency": currency,
                "sale": sale_id,
                "state": "posted",
                "lines": [m.PricedLine("refund", REFUND_SKU, -1, unit, -amount)],
                "untaxed_minor": -amount,
                "tax_minor": 0,
                "total_minor": -amount,
                "amount_to_pay_minor": -amount,
                "comment": m.marker(m.CREDIT_NOTE, key),
                "invoice_date": m.event_day(env["occurred_at"]),
            }
            sale.setdefault("refund_notes", []).append(credit_id)
            p.wrote = True
        credit = self.store.invoices[credit_id]
        p.ref(m.PARTY, credit["party"])
        p.complete(m.CREDIT_NOTE, credit_id)
        self._refund_payment(credit_id, order_id, key, refund_ref, amount, env, p)

    def _cancellation_credit(
        self, order_id: str, key: str, payment_id: str, amount: int
    ) -> int | None:
        """The cancellation credit note a refund after the cancellation pays out; None when
        the order has none (not cancelled once invoiced: the refund is a credit note of its
        own).

        The cancellation credited every invoice in full, so the customer's money is already
        a credit of theirs: a refund pays that credit out (as the ledger posts it: AR /
        cash) instead of crediting them a second time. The note of the invoice the refunded
        payment paid, else the first with enough left open; a replay finds its move's.
        """
        move = self._move(order_id, key, m.REFUND_PAYMENT)
        if move is not None:
            return int(self.store.moves[move]["invoice"])
        found = self._sale_for_order(order_id)
        notes = [] if found is None else found[1].get("cancellation_notes", [])
        if not notes:
            return None
        paid = {
            mv["invoice"]
            for mv in self.store.moves.values()
            if mv["order"] == order_id
            and any(rest[1:] == payment_id  # the move's description: marker, space, id
                    for _, rest in m.marker_end(str(mv["description"]), m.PAYMENT))
        }  # fmt: skip
        open_ = [i for i in notes if -self.store.invoices[i]["amount_to_pay_minor"] >= amount]
        preferred = [i for i in open_ if self.store.invoices[i]["credit_of"] in paid]
        if preferred or open_:
            return int((preferred or open_)[0])
        raise PermanentSinkError(
            f"refund of {amount} for cancelled order {order_id}: its credit notes have less "
            "than that left to pay out"
        )

    def _pay_out(
        self, credit_id: int, order_id: str, key: str, refund_ref: str, amount: int,
        env: Mapping[str, Any], p: m.Progress,
    ) -> None:  # fmt: skip
        """A refund after the cancellation: the money paid back against its credit note.
        The refs name that credit note (the cancellation's; the refund's own marker is on
        the move alone, so lookup finds the refund payment only)."""
        credit = self.store.invoices[credit_id]
        p.ref(m.PARTY, credit["party"])
        p.ref(m.CREDIT_NOTE, credit_id)
        self._refund_payment(credit_id, order_id, key, refund_ref, amount, env, p)

    def _refund_payment(
        self, credit_id: int, order_id: str, key: str, refund_ref: str, amount: int,
        env: Mapping[str, Any], p: m.Progress,
    ) -> None:  # fmt: skip
        """The money paid back against a credit note, once per refund key."""
        move = self._move(order_id, key, m.REFUND_PAYMENT)
        if move is None:
            self._write(m.REFUND_PAYMENT)
            description = f"{m.marker(m.REFUND_PAYMENT, key)} {refund_ref}"
            move = self._pay(credit_id, -amount, description, env)
            p.wrote = True
        p.complete(m.REFUND_PAYMENT, move)


# A document's values as JSON (the journal) and back: dates, lines (Decimal prices) tagged.
def _freeze(value: Any) -> Any:
    if isinstance(value, m.PricedLine):
        return {"$line": [value.line_id, value.sku, value.quantity, str(value.unit_price),
                          value.amount_minor]}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, list):
        return [_freeze(v) for v in value]
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, dict):
        if "$line" in value:
            line_id, sku, quantity, unit_price, amount = value["$line"]
            return m.PricedLine(line_id, sku, quantity, Decimal(unit_price), amount)
        if "$date" in value:
            return dt.date.fromisoformat(value["$date"])
    if isinstance(value, list):
        return [_thaw(v) for v in value]
    return value
