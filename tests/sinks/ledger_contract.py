"""The contract every ledger backend fulfils; subclass ``LedgerContract`` and override ``ledger``.

Not collected by itself (no ``test_`` prefix): ``test_ledger_sqlite.py`` and
``test_ledger_postgres.py`` run it against a real database each. The
database-level tests bypass the adapter and write raw rows through its engine, to
show the database itself refuses what the code would never send.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc

from revline.sinks._protocols import LedgerAdapter, PermanentSinkError
from revline.sinks.ledger import EffectRow, RefusedEventError, SqlLedger
from revline.tools.workload import WorkloadOptions, generate

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
MONEY_EVENTS = ("invoice_issued", "payment_captured", "refund_issued", "order_cancelled")


def envelope(event_type: str, key: str, order_id: str, seq: int = 1, **refs: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "idempotency_key": key,
        "order_id": order_id,
        "sequence": seq,
        "occurred_at": T0 + timedelta(minutes=seq),
        "source_system": "netsuite",
        "source_record_id": f"SRC-{key}",
        "owner": None,
        "amendment_number": None,
        "invoice_id": refs.get("invoice_id"),
        "payment_id": refs.get("payment_id"),
    }


def invoice(
    order_id: str,
    subtotal: int,
    tax: int,
    currency: str = "EUR",
    n: int = 1,
    total: int | None = None,
) -> dict[str, Any]:
    inv = f"INV-{order_id}-{n}"
    return {
        "envelope": envelope(
            "invoice_issued", f"{order_id}:invoice:{n}", order_id, 4 + n, invoice_id=inv
        ),
        "currency": currency,
        "lines": [
            {"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": 1, "unit_price_minor": subtotal,
             "discount_minor": 0, "approval_id": None, "campaign_id": None, "channel_id": None}
        ],
        "subtotal_minor": subtotal,
        "tax_minor": tax,
        "total_minor": subtotal + tax if total is None else total,
        "due_at": T0 + timedelta(days=30),
    }  # fmt: skip


def payment(order_id: str, amount: int, currency: str = "EUR", n: int = 1) -> dict[str, Any]:
    env = envelope(
        "payment_captured", f"{order_id}:capture:{n}", order_id, 10 + n,
        invoice_id=f"INV-{order_id}-1", payment_id=f"PAY-{order_id}-{n}",
    )  # fmt: skip
    return {"envelope": env, "currency": currency, "amount_minor": amount, "method": "card",
            "processor_ref": f"ch_{order_id}_{n}"}  # fmt: skip


def refund(order_id: str, amount: int, currency: str = "EUR", n: int = 1) -> dict[str, Any]:
    env = envelope("refund_issued", f"{order_id}:refund:{n}", order_id, 20 + n,
                   payment_id=f"PAY-{order_id}-1")  # fmt: skip
    return {"envelope": env, "refund_id": f"REF-{order_id}-{n}", "currency": currency,
            "amount_minor": amount, "reason": "seat reduction"}  # fmt: skip


def cancellation(order_id: str, key: str | None = None) -> dict[str, Any]:
    env = envelope("order_cancelled", key or f"{order_id}:cancelled", order_id, 30)
    return {"envelope": env, "reason": "customer churned"}


def non_money_events(order_id: str) -> list[dict[str, Any]]:
    line = {"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": 2, "unit_price_minor": 110400,
            "discount_minor": 0, "approval_id": None, "campaign_id": None,
            "channel_id": None}  # fmt: skip
    amended_env = envelope("order_amended", f"{order_id}:amend:1", order_id, 3)
    amended_env["amendment_number"] = 1
    return [
        {"envelope": envelope("order_booked", f"{order_id}:booked", order_id, 1),
         "booking_kind": "DEAL_CLOSED", "customer_id": "C1", "currency": "EUR", "lines": [line],
         "tax_minor": 44160, "total_minor": 264960},
        {"envelope": envelope("discount_approved", f"{order_id}:approval:A1", order_id, 2),
         "approval_id": "A1", "sku": "SKU-CRM-PRO", "max_discount_bps": 3000, "approver": "cfo"},
        {"envelope": amended_env, "reason": "seats", "currency": "EUR", "lines": [line],
         "tax_minor": 44160, "total_minor": 264960},
        {"envelope": envelope("fulfilment_confirmed", f"{order_id}:fulfil:1", order_id, 4),
         "fulfilment_id": "F1", "partial": False, "carrier": None,
         "shipments": [{"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": 2}]},
        {"envelope": envelope("manual_override", f"{order_id}:override:1", order_id, 5),
         "override_id": "O1", "target_idempotency_key": f"{order_id}:booked",
         "check_id": "policy.discount", "reason_code": "APPROVED_OFFLINE", "actor": "ana",
         "expires_at": T0 + timedelta(days=7), "note": None},
    ]  # fmt: skip


def count(ledger: SqlLedger, table: str) -> int:
    with ledger.engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


def header(journal_id: str, total: int, *, credit_total: int | None = None,
           currency: str = "EUR") -> dict[str, Any]:  # fmt: skip
    return {
        "id": journal_id, "idempotency_key": f"raw:{journal_id}", "event_key": f"raw:{journal_id}",
        "order_id": "SO-RAW", "event_type": "invoice_issued", "currency": currency,
        "total_debit_minor": total,
        "total_credit_minor": total if credit_total is None else credit_total,
        "source_ref": "test:raw", "occurred_at": T0, "posted_at": T0,
        "reverses_journal_id": None, "description": "raw insert",
    }  # fmt: skip


def line(journal_id: str, n: int, account: str, debit: int, credit: int,
         currency: str = "EUR") -> dict[str, Any]:  # fmt: skip
    return {"journal_id": journal_id, "line_no": n, "account": account, "currency": currency,
            "debit_minor": debit, "credit_minor": credit}  # fmt: skip


def insert_raw(ledger: SqlLedger, *steps: tuple[str, list[dict[str, Any]]]) -> None:
    """Insert rows table by table in ONE transaction, straight through the engine."""
    with ledger.engine.begin() as conn:
        for table, rows in steps:
            cols = list(rows[0])
            values = ", ".join(":" + c for c in cols)
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({values})"
            conn.execute(sa.text(sql), rows)


class LedgerContract:
    """Every ledger backend must pass these."""

    @pytest.fixture
    def ledger(self) -> Iterator[SqlLedger]:
        raise NotImplementedError("subclasses provide a ledger on a fresh database")

    # -- the adapter contract ----------------------------------------------------

    def test_is_a_ledger_adapter(self, ledger: SqlLedger) -> None:
        assert isinstance(ledger, LedgerAdapter)
        assert ledger.name == "ledger"
        assert ledger.post([]) == []

    def test_invoice_posts_receivable_revenue_and_tax(self, ledger: SqlLedger) -> None:
        [result] = ledger.post([invoice("SO-1", 298080, 59616)])
        assert result.status == "applied"
        assert result.adapter == "ledger" and result.idempotency_key == "SO-1:invoice:1"
        [journal] = ledger.journals_for("SO-1")
        assert result.external_refs == {"journal": journal.id}
        assert journal.event_type == "invoice_issued" and journal.currency == "EUR"
        assert journal.total_minor == 357696
        assert journal.source_ref == "netsuite:SRC-SO-1:invoice:1"
        assert journal.occurred_at == T0 + timedelta(minutes=5)
        assert journal.occurred_at.tzinfo is not None and journal.posted_at.tzinfo is not None
        assert journal.reverses_journal_id is None
        assert "INV-SO-1-1" in journal.description
        assert [(ln.account, ln.debit_minor, ln.credit_minor) for ln in journal.lines] == [
            ("accounts_receivable", 357696, 0),
            ("revenue", 0, 298080),
            ("tax_payable", 0, 59616),
        ]
        assert ledger.balances() == {
            ("accounts_receivable", "EUR"): 357696,
            ("revenue", "EUR"): -298080,
            ("tax_payable", "EUR"): -59616,
        }

    def test_invoice_without_tax_has_no_tax_line(self, ledger: SqlLedger) -> None:
        ledger.post([invoice("SO-1", 1000, 0, currency="JPY")])
        [journal] = ledger.journals_for("SO-1")
        assert [ln.account for ln in journal.lines] == ["accounts_receivable", "revenue"]

    def test_payment_debits_cash_and_credits_receivable(self, ledger: SqlLedger) -> None:
        ledger.post([invoice("SO-1", 1000, 200), payment("SO-1", 700), payment("SO-1", 500, n=2)])
        assert ledger.balances() == {
            ("accounts_receivable", "EUR"): 0,
            ("cash", "EUR"): 1200,
            ("revenue", "EUR"): -1000,
            ("tax_payable", "EUR"): -200,
        }
        pay = ledger.journals_for("SO-1")[1]
        assert [(ln.account, ln.debit_minor, ln.credit_minor) for ln in pay.lines] == [
            ("cash", 700, 0),
            ("accounts_receivable", 0, 700),
        ]

    def test_refund_debits_contra_revenue_and_credits_cash(self, ledger: SqlLedger) -> None:
        ledger.post([invoice("SO-1", 1000, 200), payment("SO-1", 1200), refund("SO-1", 300)])
        balances = ledger.balances()
        assert balances[("refunds", "EUR")] == 300
        assert balances[("cash", "EUR")] == 900
        [ref] = [j for j in ledger.journals_for("SO-1") if j.event_type == "refund_issued"]
        assert [(ln.account, ln.debit_minor, ln.credit_minor) for ln in ref.lines] == [
            ("refunds", 300, 0),
            ("cash", 0, 300),
        ]
        assert ledger.rules.account("refunds") is not None
        assert ledger.rules.account("refunds").kind == "contra_revenue"  # type: ignore[union-attr]

    def test_other_event_types_are_not_applicable(self, ledger: SqlLedger) -> None:
        events = non_money_events("SO-1")
        results = ledger.post(events)
        assert {r.status for r in results} == {"not_applicable"}
        assert [r.idempotency_key for r in results] == [
            e["envelope"]["idempotency_key"] for e in events
        ]
        assert all(r.external_refs == {} for r in results)
        assert ledger.journals_for("SO-1") == [] and ledger.balances() == {}

    def test_unknown_event_type_is_not_applicable(self, ledger: SqlLedger) -> None:
        event = {"envelope": envelope("loyalty_points_granted", "SO-1:points", "SO-1")}
        [result] = ledger.post([event])
        assert result.status == "not_applicable" and "no posting rule" in result.detail

    def test_cancellation_without_invoice_posts_nothing(self, ledger: SqlLedger) -> None:
        [result] = ledger.post([cancellation("SO-1")])
        assert result.status == "not_applicable"
        assert ledger.journals_for("SO-1") == []

    def test_cancellation_after_invoice_reverses_it(self, ledger: SqlLedger) -> None:
        [inv] = ledger.post([invoice("SO-1", 1000, 200)])
        [note] = ledger.post([cancellation("SO-1")])
        assert note.status == "applied"
        journals = {j.id: j for j in ledger.journals_for("SO-1")}
        credit_note = journals[note.external_refs["journal"]]
        original = journals[inv.external_refs["journal"]]
        assert credit_note.reverses_journal_id == original.id
        assert (
            credit_note.event_type == "order_cancelled"
            and credit_note.event_key == "SO-1:cancelled"
        )
        swapped = [(ln.account, ln.credit_minor, ln.debit_minor) for ln in original.lines]
        assert [
            (ln.account, ln.debit_minor, ln.credit_minor) for ln in credit_note.lines
        ] == swapped
        assert set(ledger.balances().values()) == {0}
        # Posting the cancellation again (a replay) changes nothing.
        [again] = ledger.post([cancellation("SO-1")])
        assert again.status == "already_applied" and again.external_refs == note.external_refs
        assert len(ledger.journals_for("SO-1")) == 2

    def test_cancellation_reverses_every_invoice_even_in_the_same_batch(
        self, ledger: SqlLedger
    ) -> None:
        ledger.post([invoice("SO-1", 1000, 200, n=1), invoice("SO-2", 50, 0)])
        results = ledger.post([invoice("SO-1", 400, 80, n=2), cancellation("SO-1")])
        note = results[1]
        assert note.status == "applied" and set(note.external_refs) == {"journal", "journal.2"}
        journals = ledger.journals_for("SO-1")
        reversed_ids = {j.reverses_journal_id for j in journals if j.reverses_journal_id}
        assert reversed_ids == {j.id for j in journals if j.event_type == "invoice_issued"}
        assert {k: v for k, v in ledger.balances().items() if v} == {
            ("accounts_receivable", "EUR"): 50,
            ("revenue", "EUR"): -50,
        }
        [again] = ledger.post([cancellation("SO-1")])
        assert again.status == "already_applied" and again.external_refs == note.external_refs

    def test_a_journal_is_reversed_once_even_by_another_cancellation(
        self, ledger: SqlLedger
    ) -> None:
        ledger.post([invoice("SO-1", 1000, 200), cancellation("SO-1")])
        [other] = ledger.post([cancellation("SO-1", key="SO-1:cancelled:resent")])
        assert other.status == "not_applicable"
        assert len(ledger.journals_for("SO-1")) == 2

    # -- cancellation and refunds: the customer repaid once, revenue and refunds at 0 ------
    # A cancellation reverses the invoices (revenue 0, the payments a credit on AR); a
    # refund after it pays that credit (AR / cash), and refunds posted before it move from
    # contra-revenue to AR (AR / refunds). Either order: revenue, tax and refunds end at 0,
    # AR = -(captured - refunded), cash = captured - refunded.

    @staticmethod
    def order_balances(ledger: SqlLedger, order_id: str) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for j in ledger.journals_for(order_id):
            assert sum(ln.debit_minor for ln in j.lines) == sum(ln.credit_minor for ln in j.lines)
            for ln in j.lines:
                out[ln.account] += ln.debit_minor - ln.credit_minor
        return {a: n for a, n in out.items() if n}

    @pytest.mark.parametrize("batched", [False, True], ids=["one_by_one", "one_batch"])
    @pytest.mark.parametrize(
        "script, captured, refunded",
        [
            ("pay cancel refund", 1200, 1200),
            ("pay refund cancel", 1200, 1200),
            ("pay:700 cancel", 700, 0),
            ("pay refund:300 cancel refund:900", 1200, 1200),
            ("pay refund:300 cancel", 1200, 300),
            ("pay cancel refund:500", 1200, 500),
            ("pay:700 refund:200 cancel refund:100", 700, 300),
        ],
    )
    def test_cancelled_order_counts_each_refund_once(
        self, ledger: SqlLedger, script: str, captured: int, refunded: int, batched: bool
    ) -> None:
        events = [invoice("SO-1", 1000, 200)]
        refunds = 0
        for step in script.split():
            op, _, amount = step.partition(":")
            if op == "pay":
                events.append(payment("SO-1", int(amount or 1200)))
            elif op == "refund":
                refunds += 1
                events.append(refund("SO-1", int(amount or 1200), n=refunds))
            else:
                events.append(cancellation("SO-1"))
        results = ledger.post(events) if batched else [r for e in events for r in ledger.post([e])]
        assert {r.status for r in results} == {"applied"}
        want = {"accounts_receivable": -(captured - refunded), "cash": captured - refunded}
        assert self.order_balances(ledger, "SO-1") == {a: n for a, n in want.items() if n}
        # Replays (one by one, and the whole script at once) change nothing.
        journals = ledger.journals_for("SO-1")
        again = [r for e in events for r in ledger.post([e])] + ledger.post(events)
        assert {r.status for r in again} == {"already_applied"}
        assert [r.external_refs for r in again] == [r.external_refs for r in results] * 2
        assert ledger.journals_for("SO-1") == journals
        assert all(tb.balanced for tb in ledger.trial_balance().values())

    def test_refund_after_cancellation_pays_back_the_credit(self, ledger: SqlLedger) -> None:
        ledger.post([invoice("SO-1", 1000, 200), payment("SO-1", 1200), cancellation("SO-1")])
        [ref] = ledger.post([refund("SO-1", 1200)])
        [journal] = [j for j in ledger.journals_for("SO-1") if j.event_type == "refund_issued"]
        assert ref.external_refs == {"journal": journal.id}
        assert [(ln.account, ln.debit_minor, ln.credit_minor) for ln in journal.lines] == [
            ("accounts_receivable", 1200, 0),
            ("cash", 0, 1200),
        ]
        # Another order (not cancelled) still books its refund on contra-revenue.
        ledger.post([invoice("SO-2", 1000, 200), payment("SO-2", 1200), refund("SO-2", 100)])
        assert self.order_balances(ledger, "SO-2")["refunds"] == 100

    def test_cancellation_after_refunds_moves_them_to_receivable(self, ledger: SqlLedger) -> None:
        ledger.post([invoice("SO-1", 1000, 200), payment("SO-1", 1200), refund("SO-1", 300),
                     refund("SO-1", 200, n=2)])  # fmt: skip
        [note] = ledger.post([cancellation("SO-1")])
        cancel = [j for j in ledger.journals_for("SO-1") if j.event_type == "order_cancelled"]
        [credit_note] = [j for j in cancel if j.reverses_journal_id]
        [moved] = [j for j in cancel if not j.reverses_journal_id]
        assert moved.event_key == "SO-1:cancelled" and moved.currency == "EUR"
        assert moved.idempotency_key == "SO-1:cancelled:reclassifies:refunds:EUR"
        assert [(ln.account, ln.debit_minor, ln.credit_minor) for ln in moved.lines] == [
            ("accounts_receivable", 500, 0),
            ("refunds", 0, 500),
        ]
        assert set(note.external_refs.values()) == {credit_note.id, moved.id}
        assert self.order_balances(ledger, "SO-1") == {"accounts_receivable": -700, "cash": 700}
        # A second cancellation reverses nothing and so moves nothing.
        [other] = ledger.post([cancellation("SO-1", key="SO-1:cancelled:resent")])
        assert other.status == "not_applicable" and len(ledger.journals_for("SO-1")) == 6

    def test_cancellation_moves_refunds_per_order(self, ledger: SqlLedger) -> None:
        ledger.post([invoice("SO-1", 1000, 200), payment("SO-1", 1200), refund("SO-1", 300),
                     invoice("SO-2", 500, 0, currency="USD"), payment("SO-2", 500, "USD"),
                     refund("SO-2", 50, "USD")])  # fmt: skip
        ledger.post([cancellation("SO-1")])
        assert self.order_balances(ledger, "SO-2")["refunds"] == 50
        assert "refunds" not in self.order_balances(ledger, "SO-1")
        assert ledger.balances()[("refunds", "USD")] == 50

    def test_posting_the_same_batch_twice_changes_nothing(self, ledger: SqlLedger) -> None:
        batch = [invoice("SO-1", 1000, 200), payment("SO-1", 1200), refund("SO-1", 100),
                 invoice("SO-2", 500, 40, currency="USD"), cancellation("SO-2"),
                 *non_money_events("SO-3")]  # fmt: skip
        first = ledger.post(batch)
        balances, journals = ledger.balances(), count(ledger, "journals")
        lines = count(ledger, "journal_lines")
        second = ledger.post(batch)
        assert [r.external_refs for r in second] == [r.external_refs for r in first]
        assert [r.status for r in second] == [
            "already_applied" if r.status == "applied" else r.status for r in first
        ]
        assert ledger.balances() == balances
        assert (count(ledger, "journals"), count(ledger, "journal_lines")) == (journals, lines)

    def test_duplicate_key_inside_one_batch_posts_once(self, ledger: SqlLedger) -> None:
        inv = invoice("SO-1", 1000, 200)
        resent = invoice("SO-1", 1000, 200)  # same fact, new event id
        results = ledger.post([inv, payment("SO-1", 1200), resent])
        assert [r.status for r in results] == ["applied", "applied", "already_applied"]
        assert results[2].external_refs == results[0].external_refs
        assert count(ledger, "journals") == 2
        assert ledger.balances()[("accounts_receivable", "EUR")] == 0

    def test_journal_ids_are_stable_across_ledgers(self, ledger: SqlLedger) -> None:
        # A function of the event: its occurred_at (ms) first, then a hash of its order
        # and key. The literal pins the scheme; changing it breaks replays into fresh
        # ledgers.
        [result] = ledger.post([invoice("SO-1", 1000, 200)])
        assert result.external_refs["journal"] == "01a20ccd-2260-8ea0-a4b3-08206b1b29bc"
        # The same key under another order (same occurred_at): another id.
        other = invoice("SO-2", 1000, 200)
        other["envelope"]["idempotency_key"] = "SO-1:invoice:1"
        [second] = ledger.post([other])
        assert second.status == "applied"
        assert second.external_refs["journal"] == "01a20ccd-2260-81cd-8c47-daee2d218147"

    def test_journals_posted_under_an_earlier_id_scheme_are_still_found(
        self, ledger: SqlLedger, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Ids are stored, never recomputed: a journal posted by a release that hashed
        # the key alone (this literal is what it gave) is found, and not posted again.
        from revline.sinks.ledger import _ledger

        legacy_id = "01a20ccd-2260-8cf7-ace4-3d0a20e1812d"
        with monkeypatch.context() as m:
            m.setattr(_ledger, "_journal_id", lambda _order, _key, _at: legacy_id)
            ledger.post([invoice("SO-1", 1000, 200)])
        [again] = ledger.post([invoice("SO-1", 1000, 200)])
        assert again.status == "already_applied"
        assert again.external_refs == {"journal": legacy_id}
        [note] = ledger.post([cancellation("SO-1")])
        [credit] = [j for j in ledger.journals_for("SO-1") if j.reverses_journal_id]
        assert credit.reverses_journal_id == legacy_id and note.status == "applied"
        assert credit.idempotency_key == f"SO-1:cancelled:reverses:{legacy_id}"

    def test_two_orders_sharing_a_key_are_two_effects(self, ledger: SqlLedger) -> None:
        a = invoice("SO-A", 1000, 200)
        b = invoice("SO-B", 500, 0)
        a["envelope"]["idempotency_key"] = b["envelope"]["idempotency_key"] = "INV-1"
        pay_a, pay_b = payment("SO-A", 1200), payment("SO-B", 500)
        pay_a["envelope"]["idempotency_key"] = pay_b["envelope"]["idempotency_key"] = "PAY-1"
        results = ledger.post([a, b, pay_a])
        assert [(r.order_id, r.idempotency_key, r.status) for r in results] == [
            ("SO-A", "INV-1", "applied"), ("SO-B", "INV-1", "applied"),
            ("SO-A", "PAY-1", "applied"),
        ]  # fmt: skip
        assert results[0].external_refs != results[1].external_refs
        # In a later batch, with a replay of the first order's invoice.
        later = ledger.post([pay_b, a])
        assert [(r.order_id, r.status) for r in later] == [
            ("SO-B", "applied"), ("SO-A", "already_applied"),
        ]  # fmt: skip
        assert later[1].external_refs == results[0].external_refs
        balances = ledger.balances()
        assert balances[("cash", "EUR")] == 1700 and balances[("accounts_receivable", "EUR")] == 0
        # A cancellation reverses its own order's invoice only, under the same key.
        cancel_a, cancel_b = cancellation("SO-A", key="CXL"), cancellation("SO-B", key="CXL")
        notes = ledger.post([cancel_a, cancel_b])
        assert [r.status for r in notes] == ["applied", "applied"]
        for order, inv in (("SO-A", results[0]), ("SO-B", results[1])):
            [credit] = [j for j in ledger.journals_for(order) if j.reverses_journal_id]
            assert credit.reverses_journal_id == inv.external_refs["journal"]
            assert credit.idempotency_key == f"CXL:reverses:{inv.external_refs['journal']}"
        assert ledger.balances()[("revenue", "EUR")] == 0
        assert [r.status for r in ledger.post([cancel_b, cancel_a])] == ["already_applied"] * 2

    def test_database_refuses_the_same_effect_twice_but_not_across_orders(
        self, ledger: SqlLedger
    ) -> None:
        first, same, other = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
        insert_raw(ledger, ("journal_lines", [line(first, 1, "cash", 10, 0),
                                              line(first, 2, "revenue", 0, 10)]),
                   ("journals", [header(first, 10)]))  # fmt: skip
        dup = {**header(same, 10), "idempotency_key": f"raw:{first}"}
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(ledger, ("journal_lines", [line(same, 1, "cash", 10, 0),
                                                  line(same, 2, "revenue", 0, 10)]),
                       ("journals", [dup]))  # fmt: skip
        elsewhere = {**header(other, 10), "idempotency_key": f"raw:{first}", "order_id": "SO-X"}
        insert_raw(ledger, ("journal_lines", [line(other, 1, "cash", 10, 0),
                                              line(other, 2, "revenue", 0, 10)]),
                   ("journals", [elsewhere]))  # fmt: skip
        assert count(ledger, "journals") == 2

    def test_journal_ids_sort_by_occurred_at(self, ledger: SqlLedger) -> None:
        # invoice n occurs at minute 4 + n
        results = ledger.post([invoice(f"SO-{n}", 1000, 0, n=n) for n in (3, 1, 2)])
        ids = [r.external_refs["journal"] for r in results]
        assert sorted(ids) == [ids[1], ids[2], ids[0]]
        assert {uuid.UUID(i).version for i in ids} == {8}

    def test_balances_and_trial_balance_per_currency(self, ledger: SqlLedger) -> None:
        ledger.post([
            invoice("SO-1", 1000, 200), payment("SO-1", 1200),
            invoice("SO-2", 5000, 400, currency="USD"), payment("SO-2", 2000, currency="USD"),
            invoice("SO-3", 700, 0, currency="JPY"),
        ])  # fmt: skip
        usd = ledger.balances("USD")
        assert usd == {
            ("accounts_receivable", "USD"): 3400,
            ("cash", "USD"): 2000,
            ("revenue", "USD"): -5000,
            ("tax_payable", "USD"): -400,
        }
        assert {c for _, c in ledger.balances()} == {"EUR", "USD", "JPY"}
        assert ledger.balances("GBP") == {}
        trial = ledger.trial_balance()
        assert set(trial) == {"EUR", "JPY", "USD"}
        assert all(type(tb.debit_minor) is int for tb in trial.values())
        assert all(tb.balanced for tb in trial.values())
        assert trial["USD"].debit_minor == 5400 + 2000
        assert trial["USD"].accounts == {a: b for (a, _), b in usd.items()}
        assert all(sum(tb.accounts.values()) == 0 for tb in trial.values())
        assert all(type(v) is int for v in ledger.balances().values())

    def test_totals_past_the_bigint_range_are_exact(self, ledger: SqlLedger) -> None:
        # Each journal fits a BIGINT; their sums in one currency do not. The database
        # must not overflow ("integer overflow" read as "database unavailable").
        big = 2**63 - 1
        events = [invoice(f"SO-{n}", big - n, 0) for n in range(3)]
        events += [payment(f"SO-{n}", big - n) for n in range(2)]
        events.append(invoice("SO-USD", 7, 0, currency="USD"))
        ledger.post(events)
        debits = sum(big - n for n in range(3)) + sum(big - n for n in range(2))
        assert debits > 2**64
        trial = ledger.trial_balance()
        assert trial["EUR"].debit_minor == trial["EUR"].credit_minor == debits
        assert type(trial["EUR"].debit_minor) is int and trial["EUR"].balanced
        assert trial["USD"].debit_minor == 7
        assert trial["EUR"].accounts == {
            "accounts_receivable": big - 2,
            "cash": (big) + (big - 1),
            "revenue": -(3 * big - 3),
        }
        assert ledger.balances("EUR")[("revenue", "EUR")] == -(3 * big - 3)
        assert all(type(v) is int for v in ledger.balances().values())

    # -- refused in code, before the database -------------------------------------

    @pytest.mark.parametrize(
        ("mutate", "message"),
        [
            (lambda e: e.update(total_minor=e["total_minor"] + 1), "does not balance"),
            (lambda e: e.update(tax_minor=-5, total_minor=995), "between 0 and"),
            (lambda e: e.update(subtotal_minor=10.5), "integer minor units"),
            (lambda e: e.update(currency="euro"), "ISO 4217"),
            (lambda e: e["envelope"].update(occurred_at=datetime(2026, 1, 1)), "aware datetime"),
            (lambda e: e["envelope"].update(order_id=""), "order_id"),
        ],
    )
    def test_bad_event_refuses_the_whole_batch(
        self, ledger: SqlLedger, mutate: Any, message: str
    ) -> None:
        bad = invoice("SO-2", 1000, 200)
        mutate(bad)
        with pytest.raises(RefusedEventError, match=message) as caught:
            ledger.post([invoice("SO-1", 1000, 200), bad])
        assert caught.value.idempotency_key == "SO-2:invoice:1"
        assert caught.value.order_id == ("SO-2" if "order_id" not in message else None)
        assert isinstance(caught.value, PermanentSinkError)
        assert count(ledger, "journals") == 0 and count(ledger, "journal_lines") == 0

    # -- refused by the database itself -------------------------------------------

    @pytest.mark.parametrize("order", ["lines_first", "header_first"])
    def test_database_refuses_unbalanced_journal(self, ledger: SqlLedger, order: str) -> None:
        jid = str(uuid.uuid4())
        head = ("journals", [header(jid, 1000)])
        lines = ("journal_lines", [line(jid, 1, "accounts_receivable", 1000, 0),
                                   line(jid, 2, "revenue", 0, 900)])  # fmt: skip
        steps = (lines, head) if order == "lines_first" else (head, lines)
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(ledger, *steps)
        assert count(ledger, "journals") == 0 and count(ledger, "journal_lines") == 0

    def test_database_refuses_header_with_unequal_totals(self, ledger: SqlLedger) -> None:
        jid = str(uuid.uuid4())
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(
                ledger,
                ("journal_lines", [line(jid, 1, "cash", 1000, 0), line(jid, 2, "revenue", 0, 900)]),
                ("journals", [header(jid, 1000, credit_total=900)]),
            )
        assert count(ledger, "journals") == 0

    def test_database_refuses_lines_without_a_journal(self, ledger: SqlLedger) -> None:
        jid = str(uuid.uuid4())
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(ledger, ("journal_lines", [line(jid, 1, "cash", 10, 0),
                                                  line(jid, 2, "revenue", 0, 10)]))  # fmt: skip
        assert count(ledger, "journal_lines") == 0

    def test_database_refuses_a_journal_without_lines(self, ledger: SqlLedger) -> None:
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(ledger, ("journals", [header(str(uuid.uuid4()), 10)]))
        assert count(ledger, "journals") == 0

    @pytest.mark.parametrize(
        "extra",
        [
            [("cash", 5, 0)],  # one more debit: unbalanced
            [("cash", 5, 0), ("revenue", 0, 5)],  # balanced, but not what the header says
        ],
    )
    def test_database_refuses_lines_added_to_a_posted_journal(
        self, ledger: SqlLedger, extra: list[tuple[str, int, int]]
    ) -> None:
        [result] = ledger.post([invoice("SO-1", 1000, 200)])
        jid = result.external_refs["journal"]
        rows = [line(jid, 10 + i, a, d, c) for i, (a, d, c) in enumerate(extra)]
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(ledger, ("journal_lines", rows))
        assert count(ledger, "journal_lines") == 3
        assert all(tb.balanced for tb in ledger.trial_balance().values())

    @pytest.mark.parametrize(
        "bad",
        [
            ("cash", 5, 5),  # both sides
            ("cash", -5, 0),  # negative
            ("cash", 0, 0),  # neither side
        ],
    )
    def test_database_refuses_malformed_lines(
        self, ledger: SqlLedger, bad: tuple[str, int, int]
    ) -> None:
        jid = str(uuid.uuid4())
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(ledger, ("journal_lines", [line(jid, 1, *bad)]))

    def test_database_refuses_lines_in_another_currency(self, ledger: SqlLedger) -> None:
        jid = str(uuid.uuid4())
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(
                ledger,
                ("journal_lines", [line(jid, 1, "cash", 10, 0),
                                   line(jid, 2, "revenue", 0, 10, currency="USD")]),
                ("journals", [header(jid, 10)]),
            )  # fmt: skip
        assert count(ledger, "journals") == 0

    def test_database_refuses_unknown_account(self, ledger: SqlLedger) -> None:
        jid = str(uuid.uuid4())
        with pytest.raises(sa_exc.IntegrityError):
            insert_raw(
                ledger,
                (
                    "journal_lines",
                    [line(jid, 1, "petty_cash", 10, 0), line(jid, 2, "revenue", 0, 10)],
                ),
                ("journals", [header(jid, 10)]),
            )

    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE journals SET description = 'edited'",
            "UPDATE journals SET total_debit_minor = 1, total_credit_minor = 1",
            "UPDATE journal_lines SET debit_minor = debit_minor + 1 WHERE debit_minor > 0",
            "UPDATE journal_lines SET account = 'cash'",
            "DELETE FROM journal_lines",
            "DELETE FROM journals",
        ],
    )
    def test_database_refuses_update_and_delete(self, ledger: SqlLedger, statement: str) -> None:
        ledger.post([invoice("SO-1", 1000, 200), cancellation("SO-1")])
        before = ledger.journals_for("SO-1")
        with pytest.raises(sa_exc.IntegrityError), ledger.engine.begin() as conn:
            conn.exec_driver_sql(statement)
        assert ledger.journals_for("SO-1") == before

    # -- concurrency and errors ----------------------------------------------------

    def test_losing_a_race_to_a_concurrent_writer_resolves_to_already_applied(
        self, ledger: SqlLedger, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        [won] = ledger.post([invoice("SO-1", 1000, 200)])
        # Make the next post blind to what is committed, as if the other writer
        # committed between our lookup and our insert: the UNIQUE key must catch it.
        real = SqlLedger._existing
        calls: list[int] = []

        def blind_once(self: SqlLedger, conn: Any, keys: list[str]) -> Any:
            calls.append(1)
            return {} if len(calls) == 1 else real(self, conn, keys)

        monkeypatch.setattr(SqlLedger, "_existing", blind_once)
        results = ledger.post([invoice("SO-1", 1000, 200), payment("SO-1", 1200)])
        assert len(calls) == 2
        assert [r.status for r in results] == ["already_applied", "applied"]
        assert results[0].external_refs == won.external_refs
        assert count(ledger, "journals") == 2

    def test_concurrent_writers_post_each_key_once(self, ledger: SqlLedger) -> None:
        url = ledger.engine.url.render_as_string(hide_password=False)
        batch = [invoice(f"SO-{i}", 1000, 200) for i in range(60)]
        batch += [payment(f"SO-{i}", 1200) for i in range(60)]
        batch += [cancellation(f"SO-{i}") for i in range(0, 60, 7)]
        writers = 4
        barrier = threading.Barrier(writers)

        def write(_: int) -> list[Any]:
            with SqlLedger(url) as other:
                barrier.wait()
                return other.post(batch)

        with ThreadPoolExecutor(writers) as pool:
            outcomes = list(pool.map(write, range(writers)))
        assert len({tuple(str(r.external_refs) for r in rs) for rs in outcomes}) == 1
        for i in range(len(batch)):
            statuses = sorted(rs[i].status for rs in outcomes)
            assert statuses == ["already_applied"] * (writers - 1) + ["applied"], i
        assert count(ledger, "journals") == 120 + len(range(0, 60, 7))
        assert all(tb.balanced for tb in ledger.trial_balance().values())

    def test_concurrent_refund_and_cancellation_of_one_order_count_the_refund_once(
        self, ledger: SqlLedger
    ) -> None:
        # Two writers, one posting each order's refund and the other its cancellation at
        # the same moment: whichever commits first, the other sees it (PostgreSQL: the
        # per-order lock; SQLite: one writer at a time), so no refund stays on refunds.
        url = ledger.engine.url.render_as_string(hide_password=False)
        orders = [f"SO-{i}" for i in range(20)]
        ledger.post([e for o in orders for e in (invoice(o, 1000, 200), payment(o, 1200))])
        barrier = threading.Barrier(2)

        def write(batch: list[dict[str, Any]]) -> None:
            with SqlLedger(url) as other:
                barrier.wait()
                other.post(batch)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(write, [[refund(o, 500) for o in orders],
                                  [cancellation(o) for o in reversed(orders)]]))
        for o in orders:
            assert self.order_balances(ledger, o) == {"accounts_receivable": -700, "cash": 700}

    def test_concurrent_twins_of_a_cancellation_resolve_to_already_applied(
        self, ledger: SqlLedger
    ) -> None:
        # Writers re-sending the same cancellations at once (a replay beside a live sink):
        # a cancellation writes no row a twin's insert could collide with, so each writer
        # must read what is posted only once it holds the order (PostgreSQL: the lock).
        # Read before it, the loser found nothing left to reverse and recorded
        # not_applicable for a cancellation that was applied.
        url = ledger.engine.url.render_as_string(hide_password=False)
        orders = [f"SO-{i}" for i in range(20)]
        ledger.post([invoice(o, 1000, 200) for o in orders])
        writers = 4
        barrier = threading.Barrier(writers)

        def write(_: int) -> list[Any]:
            with SqlLedger(url) as other:
                barrier.wait()
                return other.post([cancellation(o) for o in orders])

        with ThreadPoolExecutor(writers) as pool:
            outcomes = list(pool.map(write, range(writers)))
        for i, order in enumerate(orders):
            statuses = sorted(rs[i].status for rs in outcomes)
            assert statuses == ["already_applied"] * (writers - 1) + ["applied"], order
            assert len({str(rs[i].external_refs) for rs in outcomes}) == 1, order
            assert self.order_balances(ledger, order) == {}

    def test_integrity_error_that_is_no_race_is_permanent(
        self, ledger: SqlLedger, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Lines naming an account the chart does not have: the FK refuses them, and
        # re-planning yields the same plan, so it is refused data, not a lost race.
        from revline.sinks.ledger import _ledger

        real = _ledger.SqlLedger._plan

        def bad_account(self: SqlLedger, conn: Any, prepared: Any) -> Any:
            plan = real(self, conn, prepared)
            plan.new = [
                replace(j, amounts=tuple(("nope", d, c) for _, d, c in j.amounts)) for j in plan.new
            ]
            return plan

        monkeypatch.setattr(_ledger.SqlLedger, "_plan", bad_account)
        with pytest.raises(PermanentSinkError, match="refused"):
            ledger.post([invoice("SO-1", 1000, 200)])
        assert count(ledger, "journals") == 0

    # -- side-effect ledger ----------------------------------------------------------

    def test_side_effect_ledger_round_trip(self, ledger: SqlLedger) -> None:
        effect = ("SO-1", "SO-1:invoice:1")
        assert ledger.effect(*effect, "erp") is None
        stored = ledger.record_effect(
            *effect, "erp", {"sale": "SO/0001"}, "partial", 1, "invoice refused"
        )
        got = ledger.effect(*effect, "erp")
        assert got == stored and got.order_id == "SO-1"
        assert got is not None and got.applied_at.tzinfo is not None
        assert (got.status, got.attempts, got.detail) == ("partial", 1, "invoice refused")
        ledger.record_effect(*effect, "erp", {"sale": "SO/0001", "invoice": "INV/7"}, "applied", 2)
        ledger.record_effect(*effect, "ledger", {"journal": "j-1"}, "applied", 1)
        got = ledger.effect(*effect, "erp")
        assert got is not None
        assert (got.status, got.attempts) == ("applied", 2)
        assert got.external_ref == {"sale": "SO/0001", "invoice": "INV/7"}
        effects = [(f"SO-{i}", f"SO-{i}:invoice:1") for i in range(1200)]
        for order, key in effects[:3]:
            ledger.record_effect(order, key, "ledger", {"journal": key}, "applied", 1)
        found = ledger.effects_for(effects, "ledger")
        assert set(found) == set(effects[:3])
        assert found[effect].external_ref == {"journal": "SO-1:invoice:1"}  # replaced
        assert ledger.effects_for([], "erp") == {}
        both = ledger.effects_of([effect, *effects[1:3]], ["ledger", "erp"])
        assert set(both["ledger"]) == {effect, ("SO-2", "SO-2:invoice:1")}
        assert set(both["erp"]) == {effect}
        assert both["erp"][effect].external_ref == got.external_ref
        with pytest.raises(ValueError):
            ledger.record_effect("SO-1", "k", "erp", {}, "applied", -1)

    def test_side_effects_of_two_orders_sharing_a_key_are_apart(self, ledger: SqlLedger) -> None:
        # An ERP refusal of the second order must not overwrite the first's "applied".
        ledger.record_effects([
            EffectRow("SO-A", "K", "erp", {"invoice": "1"}, "applied", 1),
            EffectRow("SO-B", "K", "erp", {}, "refused", 1, "period closed"),
        ])
        found = ledger.effects_for([("SO-A", "K"), ("SO-B", "K"), ("SO-C", "K")], "erp")
        assert {ident: e.status for ident, e in found.items()} == {
            ("SO-A", "K"): "applied", ("SO-B", "K"): "refused",
        }  # fmt: skip
        assert [(e.order_id, e.status) for e in ledger.all_effects("erp")] == [
            ("SO-A", "applied"), ("SO-B", "refused"),
        ]  # fmt: skip

    def test_a_legacy_row_without_order_is_found_for_any_order_of_its_key(
        self, ledger: SqlLedger
    ) -> None:
        # order_id NULL: written before per-order identity, order not derivable.
        with ledger.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO side_effects (order_id, idempotency_key, adapter, external_ref,"
                " status, attempts, applied_at, detail) VALUES"
                " (NULL, 'K', 'erp', '{\"sale\":\"7\"}', 'applied', 1, :at, '')"
            ), {"at": T0.replace(tzinfo=None)})  # fmt: skip
        [legacy] = ledger.all_effects("erp")
        assert legacy.order_id is None and legacy.external_ref == {"sale": "7"}
        found = ledger.effects_for([("SO-A", "K"), ("SO-B", "K"), ("SO-A", "L")], "erp")
        assert found == {("SO-A", "K"): legacy, ("SO-B", "K"): legacy}
        # A row of the order itself wins over it; the legacy row stays for the others.
        ledger.record_effect("SO-A", "K", "erp", {"sale": "8"}, "refused", 1)
        found = ledger.effects_for([("SO-A", "K"), ("SO-B", "K")], "erp")
        assert found[("SO-A", "K")].status == "refused" and found[("SO-B", "K")] == legacy
        # Legacy rows stay unique per (key, adapter), as the old primary key had them.
        with pytest.raises(sa_exc.IntegrityError), ledger.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO side_effects (order_id, idempotency_key, adapter, external_ref,"
                " status, attempts, applied_at, detail) VALUES"
                " (NULL, 'K', 'erp', '{}', 'applied', 1, :at, '')"
            ), {"at": T0.replace(tzinfo=None)})  # fmt: skip

    # -- lifecycle and end-to-end ------------------------------------------------------

    def test_migrate_is_idempotent_and_data_survives_reopening(self, ledger: SqlLedger) -> None:
        ledger.post([invoice("SO-1", 1000, 200)])
        ledger.migrate()
        url = ledger.engine.url.render_as_string(hide_password=False)
        with SqlLedger(url) as again:
            again.migrate()
            assert again.balances() == ledger.balances()
            [result] = again.post([invoice("SO-1", 1000, 200)])
            assert result.status == "already_applied"
        assert count(ledger, "accounts") == len(ledger.rules.accounts)

    def test_workload_balances_match_the_generator_manifest(self, ledger: SqlLedger) -> None:
        workload = generate(WorkloadOptions(orders=150, seed=11))
        events = [
            r.event
            for r in workload.records
            if r.event is not None
            and r.expect.outcome == "validated"
            and r.event_type in MONEY_EVENTS
        ]
        for start in range(0, len(events), 100):
            ledger.post(events[start : start + 100])
        expected: dict[tuple[str, str], int] = defaultdict(int)
        for totals in workload.orders.values():
            if totals.cancelled:
                continue  # the generator cancels before invoicing: nothing posted
            cur = totals.currency
            expected[("accounts_receivable", cur)] += totals.invoiced_minor - totals.paid_minor
            expected[("cash", cur)] += totals.paid_minor - totals.refunded_minor
            expected[("refunds", cur)] += totals.refunded_minor
        balances = ledger.balances()
        for account_currency, amount in expected.items():
            assert balances.get(account_currency, 0) == amount, account_currency
        for cur in {c for _, c in balances}:
            income = balances.get(("revenue", cur), 0) + balances.get(("tax_payable", cur), 0)
            invoiced = sum(t.invoiced_minor for t in workload.orders.values() if t.currency == cur)
            assert -income == invoiced
        assert all(tb.balanced for tb in ledger.trial_balance().values())
        # A replay of everything changes nothing.
        replay = ledger.post(events[:500])
        assert {r.status for r in replay} <= {"already_applied", "not_applicable"}
        assert ledger.balances() == balances
