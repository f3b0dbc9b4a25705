"""Differential tests: the engine + ledger + in-memory ERP against tests/reference_model.py.

Hypothesis generates per-order event sequences (shuffled delivery, exact and conflicting
re-sends, keys and document ids shared across orders, cancellations anywhere, partial,
over- and zero invoices, payments and refunds, huge amounts, currency switches, second
bookings, amendments after an invoice, stale-version invoices, odd and control characters
in ids). Every event goes through real Avro bytes (``schemas.EventSerializer``) into
``processors.Engine`` (one ``OrderState`` per order); validated events are posted to one
SQLite ``SqlLedger`` per test function and applied to an ``InMemoryErp`` as they validate.
At the end every hold expires. Asserted: each input's outcome (kind and check id) is the
model's, the ledger's balances per order/account/currency are the model's, every journal
balances, and no sink refuses a validated event.

CI runs 2,000 examples in total (derandomized, so reproducible). A long run::

    REVLINE_DIFFERENTIAL_EXAMPLES=100000 .venv/bin/python -m pytest tests/test_differential.py \
        --timeout=0 -p no:cacheprovider
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from revline.processors import (
    FINAL_KINDS,
    VALIDATED,
    Engine,
    InputRecord,
    OrderState,
    ReferenceData,
    Rules,
    load_yaml,
)
from revline.schemas import EventDeserializer, EventSerializer
from revline.sinks.erp import InMemoryErp
from revline.sinks.ledger import SqlLedger, load_posting_rules
from revline.sinks.reconcile import ALL_TIME, compare, expected_from_events
from tests import reference_model as model

DATA = Path(__file__).resolve().parent.parent / "revline" / "core" / "data"
MAX = 2**63 - 1
BASE_MS = 1_795_000_000_000  # 2026-11-18
TOTAL_EXAMPLES = int(os.environ.get("REVLINE_DIFFERENTIAL_EXAMPLES", "2000"))
PREFIX_LEN = 9
DAY_MS = 86_400_000  # each example's events occur on a day of their own
# Reconciliation over each example (revline.sinks.reconcile.compare) must find 0 drift.
RECONCILE = True
# Open product bugs the property tests step around, each pinned by a strict xfail
# regression at the end of this file: drop the step-around when that one passes.
ZERO_INVOICE_CREDIT_NOTE_OPEN = False  # fixed: reconcile expects a credit per ERP invoice
# Generate ids over 512 characters (dead letters by the spec).
TOO_LONG_IDS = True  # every example's order ids and keys start with a unique "t0000001|"

_REF = yaml.safe_load((DATA / "reference.yaml").read_text())
_RULES = yaml.safe_load((DATA / "rules.yaml").read_text())
PRICES: dict[str, dict[str, int]] = {p["sku"]: p["list_prices"] for p in _REF["products"]}
_TOL = _RULES["discount_tolerance_bps"]
TOLERANCE = {p["sku"]: _TOL["skus"].get(p["sku"], _TOL["families"][p["family"]])
             for p in _REF["products"]}
CAMPAIGNS = [c["campaign_id"] for c in _REF["campaigns"]]
CHANNELS = [c["channel_id"] for c in _REF["channels"]]
CURRENCIES = ["EUR", "USD", "GBP", "JPY", "SEK"]

POSTING_RULES = load_posting_rules()
ENCODE = EventSerializer()
DECODE = EventDeserializer()
_EVENT_IDS = itertools.count(1)
_PREFIXES = itertools.count(1)


def make_engine() -> Engine:
    rules = Rules.from_mapping(load_yaml(DATA / "rules.yaml"))
    reference = ReferenceData.from_mapping(load_yaml(DATA / "reference.yaml"))
    return Engine(rules=rules, reference=lambda: reference)


ENGINE = make_engine()
LATER_MS = int(ENGINE.rules.hold_timeout_seconds * 1000) + 1


# -- event builders (shared by the generator and the regression tests) ------------------
def envelope(etype: str, oid: str, key: str, seq: int, *, amendment: int | None = None,
             invoice: str | None = None, payment: str | None = None,
             source: str | None = None) -> dict[str, Any]:
    return {"event_id": f"ev-{next(_EVENT_IDS)}", "event_type": etype, "schema_version": 1,
            "idempotency_key": key, "order_id": oid, "sequence": seq,
            "occurred_at": BASE_MS + seq * 60_000, "source_system": "diff",
            "source_record_id": source or f"src-{seq}", "owner": None,
            "amendment_number": amendment, "invoice_id": invoice, "payment_id": payment}


def line(sku: str, qty: int, cur: str, *, bps: int = 0, line_id: str = "L1",
         unit: int | None = None) -> dict[str, Any]:
    unit = PRICES[sku][cur] if unit is None else unit
    return {"line_id": line_id, "sku": sku, "quantity": qty, "unit_price_minor": unit,
            "discount_minor": qty * unit * bps // 10_000, "approval_id": None,
            "campaign_id": CAMPAIGNS[0], "channel_id": CHANNELS[0]}


def net(lines: list[dict[str, Any]]) -> int:
    return sum(ln["quantity"] * ln["unit_price_minor"] - ln["discount_minor"] for ln in lines)


def booked(oid: str, key: str, seq: int, cur: str, lines: list[dict[str, Any]],
           tax: int = 0) -> dict[str, Any]:
    return {"envelope": envelope("order_booked", oid, key, seq), "booking_kind": "DEAL_CLOSED",
            "customer_id": "CUST-1", "currency": cur, "lines": lines, "tax_minor": tax,
            "total_minor": net(lines) + tax}


def amended(oid: str, key: str, seq: int, n: int, cur: str, lines: list[dict[str, Any]],
            tax: int = 0) -> dict[str, Any]:
    return {"envelope": envelope("order_amended", oid, key, seq, amendment=n),
            "reason": "change", "currency": cur, "lines": lines, "tax_minor": tax,
            "total_minor": net(lines) + tax}


def invoiced(oid: str, key: str, seq: int, inv: str, am: int | None, cur: str,
             lines: list[dict[str, Any]], tax: int = 0) -> dict[str, Any]:
    sub = net(lines)
    return {"envelope": envelope("invoice_issued", oid, key, seq, amendment=am, invoice=inv),
            "currency": cur, "lines": lines, "subtotal_minor": sub, "tax_minor": tax,
            "total_minor": sub + tax, "due_at": BASE_MS + 30 * 86_400_000}


def amount_invoice(oid: str, key: str, seq: int, inv: str, am: int | None, cur: str,
                   total: int, sku: str = "SKU-CRM-PRO", tax_pct: int = 0) -> dict[str, Any]:
    """An invoice of ``total`` (a deposit, a balance): one line priced at the subtotal."""
    tax = total * tax_pct // 100
    return invoiced(oid, key, seq, inv, am, cur, [line(sku, 1, cur, unit=total - tax)], tax)


def captured(oid: str, key: str, seq: int, inv: str, pay: str, cur: str,
             amount: int) -> dict[str, Any]:
    return {"envelope": envelope("payment_captured", oid, key, seq, invoice=inv, payment=pay),
            "currency": cur, "amount_minor": amount, "method": "card", "processor_ref": "ch_1"}


def refunded(oid: str, key: str, seq: int, pay: str, ref: str, cur: str,
             amount: int) -> dict[str, Any]:
    return {"envelope": envelope("refund_issued", oid, key, seq, payment=pay), "refund_id": ref,
            "currency": cur, "amount_minor": amount, "reason": "returned"}


def cancelled(oid: str, key: str, seq: int) -> dict[str, Any]:
    return {"envelope": envelope("order_cancelled", oid, key, seq), "reason": "churn"}


def fulfilled(oid: str, key: str, seq: int, ful: str,
              lines: list[dict[str, Any]]) -> dict[str, Any]:
    return {"envelope": envelope("fulfilment_confirmed", oid, key, seq), "fulfilment_id": ful,
            "shipments": [{"line_id": ln["line_id"], "sku": ln["sku"], "quantity": ln["quantity"]}
                          for ln in lines], "partial": False, "carrier": None}


def approved(oid: str, key: str, seq: int, apr: str) -> dict[str, Any]:
    return {"envelope": envelope("discount_approved", oid, key, seq), "approval_id": apr,
            "sku": "*", "max_discount_bps": 1000, "approver": "cfo@example.com"}


def resend(event: dict[str, Any]) -> dict[str, Any]:
    """The same fact again: a new event_id, the same body."""
    out = copy.deepcopy(event)
    out["envelope"]["event_id"] = f"ev-{next(_EVENT_IDS)}"
    return out


# -- strategies -------------------------------------------------------------------------
ODD = ["[", "]", "%", "'", '"', "🙂", "ü", "ß", "漢", "\u200b", "%25", "[x]", "\\"]
CONTROL = ["\x00", "\t", "\n", "\r", "\x7f", "\x85", "\x1b"]


def odd_suffix() -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), st.lists(st.sampled_from(ODD), max_size=4).map("".join))


@st.composite
def lines_for(draw: st.DrawFn, cur: str) -> list[dict[str, Any]]:
    skus = draw(st.lists(st.sampled_from(sorted(PRICES)), min_size=1, max_size=3, unique=True))
    out = []
    for i, sku in enumerate(skus):
        bps = draw(st.sampled_from([0, TOLERANCE[sku] // 2]))
        lid = f"L{i + 1}" + draw(odd_suffix())
        out.append(line(sku, draw(st.integers(1, 5)), cur, bps=bps, line_id=lid))
    return out


def tax_for(draw: st.DrawFn, subtotal: int) -> int:
    kind = draw(st.sampled_from(["vat", "vat", "zero", "huge", "negative"]))
    if kind == "huge":
        return MAX - subtotal - draw(st.integers(0, 1000))
    return {"vat": subtotal // 5, "zero": 0, "negative": -1}[kind]


OPS = ["amend", "invoice", "invoice", "invoice", "pay", "pay", "pay", "refund", "refund",
       "fulfil", "cancel", "book2", "approval"]
# Money around a cancellation: paid, refunded, cancelled, refunded again, in any order.
CANCEL_OPS = ["invoice", "pay", "pay", "pay", "refund", "refund", "refund", "cancel"]


@st.composite
def order_script(draw: st.DrawFn, k: int, shared_keys: bool, ops: list[str] = OPS
                 ) -> list[dict[str, Any]]:
    """One order's events in source order (sequence ascending).

    Each step is clean (what a correct source sends next, given the plan so far) or,
    about one time in four, a fault: an amendment after an invoice, a stale or future
    version, over-invoicing, a zero/negative/huge/over amount, another currency, a
    reused document id, a payment or refund of a document that never comes, a second
    booking, a cancellation. Faults do not move the plan, so later clean steps stay valid.
    """
    oid = f"O{k}" + draw(odd_suffix())
    if draw(st.integers(0, 7)) == 0:
        oid = (oid + "ĳ" * 512)[: 512 - PREFIX_LEN]  # exactly 512 with the prefix
    kp = "K:" if shared_keys else f"{oid[:40]}:"
    cur = draw(st.sampled_from(CURRENCIES))
    seq = itertools.count(1)
    lines = draw(lines_for(cur))
    tax = tax_for(draw, net(lines)) if draw(st.integers(0, 3)) == 0 else net(lines) // 5
    book = booked(oid, kp + "booked", next(seq), cur, lines, tax)
    events = [book]
    total, am, inv_total, cancelled_ = book["total_minor"], None, 0, False
    invoices: dict[str, list[int]] = {}  # planned clean invoices: id -> [total, captured]
    payments: dict[str, list[int]] = {}  # planned clean payments: id -> [amount, refunded]
    n = itertools.count(1)
    for op in draw(st.lists(st.sampled_from(ops), max_size=10 if ops is OPS else 14)):
        j, s = next(n), next(seq)
        fault = draw(st.integers(0, 3)) == 0
        other = draw(st.sampled_from([c for c in CURRENCIES if c != cur]))
        opened = {i: v for i, v in invoices.items() if v[0] > v[1]}
        refundable = {p: v for p, v in payments.items() if v[0] > v[1]}
        # A cancelled order takes refunds only (the rest is refused, see lifecycle.md).
        fault |= cancelled_ and (op != "refund" or not refundable)
        if op == "pay" and not opened and not fault:
            op = "invoice"
        if op == "refund" and not refundable and not fault:
            op = "pay" if opened else "invoice"
        if op in ("amend", "book2") and not fault:
            op = "fulfil"
        if op == "amend":
            switch = draw(st.booleans())
            new = draw(lines_for(other if switch else cur))
            number = (am or 0) + 1
            ev = amended(oid, f"{kp}amend:{number}", s, number, other if switch else cur, new,
                         net(new) // 5)
            if not (switch or invoices):  # else refused: the plan keeps the previous version
                am, total = number, ev["total_minor"]
        elif op == "invoice":
            inv = f"INV-{j}" + draw(odd_suffix())
            if draw(st.integers(0, 9)) == 0:
                inv = "I" * 512
            remaining = max(total - inv_total, 0)
            kind = draw(st.sampled_from(["full", "deposit", "shipment"]))
            if fault:
                kind = draw(st.sampled_from(["over", "zero", "huge", "negative_tax", "stale",
                                             "ahead", "currency", "reused", "version0",
                                             "overflow"]))
            v = {"stale": None if am in (None, 1) else am - 1, "ahead": (am or 0) + 1,
                 "version0": 0}.get(kind, am)
            if kind == "stale" and am is None:
                v = 1  # names an amendment that never comes: held, then timed out
            if kind == "reused" and invoices:
                inv = draw(st.sampled_from(sorted(invoices)))
            c = other if kind == "currency" else cur
            if kind == "shipment":
                part = draw(st.lists(st.sampled_from(lines), min_size=1, max_size=len(lines),
                                     unique_by=lambda x: x["line_id"]))
                ev = invoiced(oid, f"{kp}invoice:{j}", s, inv, v, c, part, 0)
                kind = "full" if ev["total_minor"] <= remaining else "over"
            elif kind == "overflow":  # a line beyond 2^63-1; the totals say MAX
                ev = amount_invoice(oid, f"{kp}invoice:{j}", s, inv, v, c, MAX, lines[0]["sku"])
                ev["lines"][0].update(quantity=3, unit_price_minor=MAX // 2)
            elif kind == "negative_tax":
                ev = invoiced(oid, f"{kp}invoice:{j}", s, inv, v, c, [line(lines[0]["sku"], 1, c)],
                              -1)
            else:
                amount = {"deposit": remaining * 3 // 10, "zero": 0, "huge": MAX,
                          "over": remaining + draw(st.integers(1, 10**6))}.get(kind, remaining)
                ev = amount_invoice(oid, f"{kp}invoice:{j}", s, inv, v, c, min(amount, MAX),
                                    lines[0]["sku"], draw(st.sampled_from([0, 20])))
            if kind in ("full", "deposit", "zero") and inv not in invoices:
                inv_total += ev["total_minor"]
                invoices[inv] = [ev["total_minor"], 0]
        elif op == "pay":
            pay = f"PAY-{j}" + draw(odd_suffix())
            if opened and not fault:
                inv = draw(st.sampled_from(sorted(opened)))
                open_ = opened[inv][0] - opened[inv][1]
                amount = draw(st.sampled_from([open_, max(open_ // 2, 1)]))
                invoices[inv][1] += amount
                payments[pay] = [amount, 0]
                ev = captured(oid, f"{kp}capture:{j}", s, inv, pay, cur, amount)
            else:
                inv = "INV-none"  # never comes: held, then timed out
                if invoices and draw(st.integers(0, 4)):
                    inv = draw(st.sampled_from(sorted(invoices)))
                left = invoices[inv][0] - invoices[inv][1] if inv in invoices else 100
                kind = draw(st.sampled_from(["over", "zero", "negative", "huge", "currency",
                                             "reused"]))
                amount = {"over": left + 1, "zero": 0, "negative": -draw(st.integers(1, MAX)),
                          "huge": MAX}.get(kind, max(left, 1))
                if kind == "reused" and payments:
                    pay = draw(st.sampled_from(sorted(payments)))
                c = other if kind == "currency" else cur
                ev = captured(oid, f"{kp}capture:{j}", s, inv, pay, c, min(amount, MAX))
        elif op == "refund":
            ref = f"REF-{j}" + draw(odd_suffix())
            if refundable and not fault:
                pay = draw(st.sampled_from(sorted(refundable)))
                left = refundable[pay][0] - refundable[pay][1]
                amount = draw(st.sampled_from([left, max(left // 3, 1)]))
                payments[pay][1] += amount
                ev = refunded(oid, f"{kp}refund:{j}", s, pay, ref, cur, amount)
            else:
                pay = "PAY-none"
                if payments and draw(st.integers(0, 4)):
                    pay = draw(st.sampled_from(sorted(payments)))
                left = payments[pay][0] - payments[pay][1] if pay in payments else 100
                kind = draw(st.sampled_from(["over", "zero", "negative", "currency", "reused"]))
                amount = {"over": left + 1, "zero": 0, "negative": -1}.get(kind, max(left, 1))
                if kind == "reused":
                    ref = "REF-1"
                c = other if kind == "currency" else cur
                ev = refunded(oid, f"{kp}refund:{j}", s, pay, ref, c, min(amount, MAX))
        elif op == "fulfil":
            ev = fulfilled(oid, f"{kp}fulfil:{j}", s, f"FUL-{j}", lines)
        elif op == "cancel":
            ev = cancelled(oid, f"{kp}cancelled:{j}", s)
            cancelled_ = True
        elif op == "book2":
            new = draw(lines_for(cur))
            ev = booked(oid, f"{kp}booked:{j}", s, cur, new, 0)
        else:
            ev = approved(oid, f"{kp}approval:{j}", s, f"APR-{j}")
        events.append(ev)
    return events


def conflicting(event: dict[str, Any], how: int) -> dict[str, Any]:
    """The same idempotency key with another body."""
    out = resend(event)
    if how == 0 or ("amount_minor" not in out and "total_minor" not in out):
        out["envelope"]["sequence"] += 1000
    elif "amount_minor" in out:
        out["amount_minor"] = max(out["amount_minor"] - 1, 1)
    else:
        out["tax_minor"] += 1
        out["total_minor"] = min(out["total_minor"] + 1, MAX)
    return out


def poisoned(event: dict[str, Any], where: int, bad: str) -> dict[str, Any]:
    out = resend(event)
    env = out["envelope"]
    body = [n for n in ("refund_id", "fulfilment_id", "customer_id", "approval_id") if n in out]
    refs = [n for n in ("invoice_id", "payment_id") if env[n]]
    if where == 0:
        env["source_record_id"] += bad
    elif where == 1 and "lines" in out:
        out["lines"][0]["line_id"] += bad
    elif where == 2 and body:
        out[body[0]] += bad
    elif where == 3 and refs:
        env[refs[-1]] += bad
    elif where == 4:
        env["order_id"] += bad
    else:
        env["idempotency_key"] += bad
    return out


@st.composite
def delivery(draw: st.DrawFn, max_orders: int = 1, ops: list[str] = OPS
             ) -> list[dict[str, Any]]:
    """Several orders' events, mutated and delivered in a drawn order."""
    shared = max_orders > 1 and draw(st.booleans())
    events: list[dict[str, Any]] = []
    for k in range(draw(st.integers(1, max_orders))):
        events += draw(order_script(k + 1, shared, ops))
    if shared and draw(st.booleans()):  # a twin: another order, the same keys and ids
        first = events[0]["envelope"]["order_id"]
        twin = [resend(e) for e in events if e["envelope"]["order_id"] == first]
        for e in twin:
            e["envelope"]["order_id"] = "T" + first[: 255 - PREFIX_LEN]
        events += twin
    extra = []
    for _ in range(draw(st.integers(0, 3))):
        extra.append(resend(draw(st.sampled_from(events))))
    for _ in range(draw(st.integers(0, 2))):
        extra.append(conflicting(draw(st.sampled_from(events)), draw(st.integers(0, 1))))
    if draw(st.integers(0, 4)) == 0:  # control characters or a too-long id: dead-lettered
        target = draw(st.integers(0, len(events) - 1))
        bad = draw(st.sampled_from([*CONTROL, *(["x" * 600] if TOO_LONG_IDS else [])]))
        events[target] = poisoned(events[target], draw(st.integers(0, 5)), bad)
    out = events + extra
    if draw(st.booleans()):
        out = list(draw(st.permutations(out)))
    return out


def with_prefix(events: list[dict[str, Any]], prefix: str, shift_ms: int = 0
                ) -> list[dict[str, Any]]:
    """The example's own orders and keys, on its own day (so its journals are apart)."""
    out = copy.deepcopy(events)
    for e in out:
        e["envelope"]["order_id"] = prefix + e["envelope"]["order_id"]
        e["envelope"]["idempotency_key"] = prefix + e["envelope"]["idempotency_key"]
        e["envelope"]["occurred_at"] += shift_ms
        if "due_at" in e:
            e["due_at"] += shift_ms
    return out


# -- the product, in-process ---------------------------------------------------------------
def run_product(events: list[dict[str, Any]], ledger: SqlLedger, erp: InMemoryErp
                ) -> tuple[list[tuple[str, str | None, str]], list[str], list[Any]]:
    """(kind, check id, reason) per input, every sink refusal of a validated event, and
    the validated events in the order they validated."""
    states: dict[bytes, OrderState] = {}
    finals: dict[int, tuple[str, str | None, str]] = {}
    refusals: list[str] = []
    validated: list[Any] = []

    def sink(event: Any) -> None:
        validated.append(event)
        env = event["envelope"]
        for name, apply in (("ledger", lambda: ledger.post([event])),
                            ("erp", lambda: erp.apply(event))):
            try:
                apply()
            except Exception as exc:  # any refusal of a validated event is a failure
                refusals.append(f"{name} refused {env['event_type']} {env['idempotency_key']!r}"
                                f" of {env['order_id']!r}: {type(exc).__name__}: {exc}")

    def handle(decisions: list[Any]) -> None:
        for d in decisions:
            if d.kind in FINAL_KINDS:
                assert d.input.offset not in finals, f"two final decisions for {d.input.offset}"
                finals[d.input.offset] = (d.kind, d.check_id, d.reason)
            if d.kind == VALIDATED:
                sink(d.event)

    for i, event in enumerate(events):
        rec = InputRecord("in", 0, i, event["envelope"]["order_id"].encode(), ENCODE(event))
        decoded, dead = ENGINE.decode(rec, 0)
        if dead is not None:
            handle([dead])
            continue
        assert decoded is not None and rec.key is not None
        handle(ENGINE.process(states.setdefault(rec.key, OrderState()), rec, decoded, 0))
    for state in states.values():
        handle(ENGINE.expire_holds(state, LATER_MS))
    missing = [i for i in range(len(events)) if i not in finals]
    assert not missing, f"inputs without a final decision: {missing}"
    return [finals[i] for i in range(len(events))], refusals, validated


def ledger_balances(ledger: SqlLedger, order_ids: set[str]
                    ) -> tuple[dict[tuple[str, str, str], int], list[str]]:
    bal: dict[tuple[str, str, str], int] = {}
    unbalanced = []
    for oid in sorted(order_ids):
        for j in ledger.journals_for(oid):
            if sum(ln.debit_minor for ln in j.lines) != sum(ln.credit_minor for ln in j.lines):
                unbalanced.append(f"journal {j.idempotency_key!r} does not balance")
            for ln in j.lines:
                k = (oid, ln.account, ln.currency)
                bal[k] = bal.get(k, 0) + ln.debit_minor - ln.credit_minor
    return {k: v for k, v in bal.items() if v}, unbalanced


def describe(e: dict[str, Any]) -> str:
    env = e["envelope"]
    money = e.get("amount_minor", e.get("total_minor"))
    refs = {k: env[k] for k in ("amendment_number", "invoice_id", "payment_id") if env[k]}
    return (f"{env['event_type']} key={env['idempotency_key']!r} seq={env['sequence']} "
            f"{e.get('currency', '')} {money if money is not None else ''} {refs}")


def agrees(want: model.Outcome, kind: str, check_id: str | None) -> bool:
    """Same kind and, for an exception, a primary check the model also finds.

    The spec says which rules an event breaks, not which of several to report first:
    the product's primary may be any of the model's findings (the model's own first is
    its best guess, see reference_model's docstring).
    """
    return kind == want.kind and (check_id == want.check or check_id in want.checks)


def check(events: list[dict[str, Any]], ledger: SqlLedger) -> None:
    """Run the product and the model on the same delivery; assert they agree."""
    n = next(_PREFIXES)
    events = with_prefix(events, f"t{n:07d}|", n * DAY_MS)
    decoded = [DECODE.decode(ENCODE(e)) for e in events]
    orders: dict[str, model.Order] = {}
    want, want_bal = model.run(decoded, orders)
    erp = InMemoryErp()
    got, refusals, validated = run_product(events, ledger, erp)
    problems = []
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if not agrees(w, g[0], g[1]):
            problems.append(f"#{i} {describe(events[i])}: model {w.kind} {w.checks}, "
                            f"product {g[0]} {g[1]} ({g[2][:160]})")
    order_ids = {e["envelope"]["order_id"] for e in events}
    got_bal, unbalanced = ledger_balances(ledger, order_ids)
    want_bal = {k: v for k, v in want_bal.items() if k[0] in order_ids}
    if got_bal != want_bal:
        keys = sorted(set(got_bal) | set(want_bal))
        problems += [f"balance {k}: model {want_bal.get(k, 0)}, ledger {got_bal.get(k, 0)}"
                     for k in keys if want_bal.get(k, 0) != got_bal.get(k, 0)]
    problems += unbalanced + refusals
    # Cancelled orders: revenue, tax and refunds 0, AR = -(captured - refunded), in the
    # model and in the product's ledger (the model's own rule checked as well).
    problems += [f"model: {p}" for p in model.cancelled_order_problems(orders, want_bal)]
    problems += [f"ledger: {p}" for p in model.cancelled_order_problems(orders, got_bal)]
    problems += erp_cancelled_problems(orders, erp)
    if RECONCILE:
        problems += drift(validated, ledger, erp, order_ids, n * DAY_MS)
    assert not problems, "\n".join(problems)


def erp_cancelled_problems(orders: dict[str, model.Order], erp: InMemoryErp) -> list[str]:
    """A cancelled order in the ERP: its invoices and credit notes total 0 (all billed given
    back, no refund given back twice) and leave -(captured - refunded) open: owed back."""
    out = []
    docs: dict[str, list[dict[str, Any]]] = {}
    for inv in erp.store.invoices.values():
        if inv["state"] != "draft" and (inv["state"] != "cancelled" or inv.get("posted")):
            docs.setdefault(inv["order"], []).append(inv)
    for oid, o in sorted(orders.items()):
        if not o.cancelled or oid not in docs:
            continue
        total = sum(d["total_minor"] for d in docs[oid])
        open_ = sum(d["amount_to_pay_minor"] for d in docs[oid])
        if (total, open_) != (0, o.refunded - o.captured):
            out.append(f"erp: cancelled order {oid!r}: documents total {total}, open {open_}; "
                       f"expected 0 and {o.refunded - o.captured}")
    return out


def drift(validated: list[Any], ledger: SqlLedger, erp: InMemoryErp, order_ids: set[str],
          shift_ms: int) -> list[str]:
    """What reconciliation finds between the validated events and both sinks."""
    start = datetime.fromtimestamp((BASE_MS + shift_ms) / 1000, UTC)
    journals = [j for j in ledger.journal_summaries(start, start + timedelta(days=1))
                if j.order_id in order_ids]
    stream = expected_from_events(((e, None) for e in validated), POSTING_RULES)
    report = compare(stream, ALL_TIME, journals, {}, erp.documents(), {}, {})
    skip = set()
    if ZERO_INVOICE_CREDIT_NOTE_OPEN:  # see test_regression_cancelling_after_a_zero_invoice
        zero = {e["envelope"]["order_id"] for e in validated
                if e["envelope"]["event_type"] == "invoice_issued" and not e["total_minor"]}
        skip = zero & {e["envelope"]["order_id"] for e in validated
                       if e["envelope"]["event_type"] == "order_cancelled"}
    out = [f"reconcile: {i.system} {i.kind} {i.key!r} of {i.order_id!r}: {i.detail}"
           for i in report.issues if i.order_id not in skip]
    out += [f"reconcile: order {d.order_id!r} drifted: {d.findings()}" for d in report.drifted
            if d.order_id not in skip]
    return out


# -- the differential tests ------------------------------------------------------------------
def _settings(share: float) -> Callable[[Any], Any]:
    return settings(settings.get_profile("revline-differential"),
                    max_examples=max(1, int(TOTAL_EXAMPLES * share)))


@pytest.fixture
def ledger(tmp_path: Path) -> Any:
    with SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}") as led:
        yield led


def test_one_order_at_a_time_agrees_with_the_model(ledger: SqlLedger) -> None:
    @_settings(0.6)
    @given(events=delivery(max_orders=1))
    def run(events: list[dict[str, Any]]) -> None:
        check(events, ledger)

    run()


def test_mixed_orders_sharing_keys_and_ids_agree_with_the_model(ledger: SqlLedger) -> None:
    @_settings(0.4)
    @given(events=delivery(max_orders=3))
    def run(events: list[dict[str, Any]]) -> None:
        check(events, ledger)

    run()


def test_cancelled_orders_count_each_refund_once(ledger: SqlLedger) -> None:
    # Captures, refunds and a cancellation anywhere among them (refunds after it too),
    # shuffled, re-sent: the ledger agrees with the model, and every cancelled order has
    # revenue, tax and refunds 0 and AR = -(captured - refunded) (see check).
    @_settings(0.25)
    @given(events=delivery(max_orders=2, ops=CANCEL_OPS))
    def run(events: list[dict[str, Any]]) -> None:
        check(events, ledger)

    run()






# -- regressions: shrunk examples, kept explicit -------------------------------------------
def _check_alone(events: list[dict[str, Any]], tmp_path: Path) -> None:
    with SqlLedger(f"sqlite:///{tmp_path / 'regression.db'}") as led:
        check(events, led)


def test_regression_invoice_naming_amendment_0_is_stale_at_once(tmp_path: Path) -> None:
    # Found by the generator (a refused amendment left the plan at version 0): amendment 0
    # can never arrive, so the invoice waits for nothing and is stale (0 is not null).
    lines = [line("SKU-ANL-ADD", 1, "EUR")]
    _check_alone([booked("O1", "O1:booked", 1, "EUR", lines, 11040),
                  amount_invoice("O1", "O1:invoice:1", 2, "INV-1", 0, "EUR", 66240)], tmp_path)


def test_regression_cancelling_after_a_zero_invoice_reconciles(tmp_path: Path) -> None:
    # Found by the generator (shrunk: booking, zero invoice, cancellation): the ERP credits
    # a zero invoice with a zero credit note; reconciliation expected none (it derived
    # the ERP's credit notes from the ledger, which posts nothing for a zero invoice).
    lines = [line("SKU-ANL-ADD", 1, "EUR")]
    _check_alone([booked("O1", "O1:booked", 1, "EUR", lines, 11040),
                  amount_invoice("O1", "O1:invoice:1", 2, "INV-1", None, "EUR", 0),
                  cancelled("O1", "O1:cancelled", 3)], tmp_path)


def test_regression_ids_over_512_characters_are_dead_lettered(tmp_path: Path) -> None:
    lines = [line("SKU-ANL-ADD", 1, "EUR")]
    _check_alone([booked("O1", "O1:booked", 1, "EUR", lines, 11040),
                  fulfilled("O1", "O1:fulfil:1" + "x" * 600, 2, "FUL-1", lines)], tmp_path)
