"""An independent reference model of an order's money, written from docs/lifecycle.md.

It shares no code with ``processors/`` or ``sinks/``: it reads the delivered events
(decoded canonical dicts, in delivery order, several orders mixed) and says what each
input's outcome must be and what the ledger must hold per (order, account, currency).
QA checks that are not about money (SKU/currency reference data, price and discount
policy, attribution, overrides) are out of scope: generators keep events passing them.

Readings of the spec where it is silent (what a finance person would expect):
* A dependency ("the booking", "amendment N", "invoice X", "payment Y") is met once an
  accepted event provides it and stays met; it is failed while only exceptions provided
  it (a later accepted provider still meets it for events judged afterwards).
* A ``dedup.conflict`` or ``duplicate`` provides nothing and fails nothing: the first
  copy of the key is the fact.
* When an event breaks several rules the primary check is the first in this order:
  completeness (short-circuits), the state's refusal, a reused document reference (it
  is another document under a known number: its amounts mean nothing for this one),
  then currency, stale version, invoice total / open balance.
* The state decides the refusal: a second ``order_booked`` on a cancelled order is
  ``lifecycle.after_cancellation`` (terminal: it accepts only what its row lists).
* Payments and refunds need their invoice / payment only: the booking is implied.
* At the end of input every still-held event is ``hold.timeout`` (all at once).
* An invoice naming amendment 0 (or less) waits for no amendment (none can come: they
  are numbered from 1) and is ``lifecycle.stale_version``: 0 is not null.

The ledger (docs/lifecycle.md "What the ledger posts"): a cancellation takes back all of
the order's revenue, so a refund may not reduce revenue a second time. A refund after
the cancellation pays back the customer's credit (AR / cash); refunds posted before it
move from contra-revenue to AR with it (AR / refunds). Whatever the order: a cancelled
order's revenue, tax payable and refunds are 0, AR = -(captured - refunded) and cash =
captured - refunded (``cancelled_order_problems``).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

MAX = 2**63 - 1
IDS = ("event_id", "idempotency_key", "order_id", "source_record_id", "invoice_id", "payment_id",
       "refund_id", "approval_id", "fulfilment_id", "override_id", "customer_id")
REQUIRED = {"order_amended": ("amendment_number",), "invoice_issued": ("invoice_id",),
            "payment_captured": ("invoice_id", "payment_id"), "refund_issued": ("payment_id",)}
LINED = ("order_booked", "order_amended", "invoice_issued")


@dataclass(frozen=True)
class Outcome:
    kind: str  # validated | duplicate | exception | dead_letter
    checks: tuple[str, ...] = ()  # exception: every finding, primary first

    @property
    def check(self) -> str | None:
        return self.checks[0] if self.checks else None


def _bad_id(value: Any) -> bool:
    return isinstance(value, str) and (
        len(value) > 512 or len(value.encode("utf-8", "surrogatepass")) > 1024
        or any(unicodedata.category(c) in ("Cc", "Cs") for c in value))


def structurally_broken(event: dict[str, Any]) -> bool:
    env = event["envelope"]
    ids = [d.get(n) for d in (env, event) for n in IDS]
    ids += [ln["line_id"] for ln in event.get("lines") or event.get("shipments") or []]
    return (any(_bad_id(v) for v in ids)
            or not all(env[n] for n in ("event_id", "idempotency_key", "order_id"))
            or any(env.get(n) in (None, "") for n in REQUIRED.get(env["event_type"], ()))
            or (env["event_type"] == "order_amended" and env["amendment_number"] < 1))


def depends_on(event: dict[str, Any]) -> list[str]:
    env, etype = event["envelope"], event["envelope"]["event_type"]
    n = env.get("amendment_number")
    if etype == "order_amended":
        return ["booking"] + ([f"amend:{n - 1}"] if n > 1 else [])
    if etype == "invoice_issued":
        return ["booking"] + ([f"amend:{n}"] if n is not None and n >= 1 else [])
    if etype == "payment_captured":
        return [f"invoice:{env['invoice_id']}"]
    if etype == "refund_issued":
        return [f"payment:{env['payment_id']}"]
    return ["booking"] if etype in ("order_cancelled", "fulfilment_confirmed") else []


def provides(event: dict[str, Any]) -> str | None:
    env, etype = event["envelope"], event["envelope"]["event_type"]
    return {"order_booked": "booking", "order_amended": f"amend:{env.get('amendment_number')}",
            "invoice_issued": f"invoice:{env.get('invoice_id')}",
            "payment_captured": f"payment:{env.get('payment_id')}"}.get(etype)


def completeness(e: dict[str, Any]) -> list[str]:
    etype = e["envelope"]["event_type"]
    if etype in ("payment_captured", "refund_issued"):
        return [] if 0 < e["amount_minor"] <= MAX else ["completeness.amounts"]
    if etype not in LINED:
        return []
    if not e["lines"]:
        return ["completeness.lines"]
    amounts = [ln["quantity"] * ln["unit_price_minor"] - ln["discount_minor"] for ln in e["lines"]]
    bad = any(ln["quantity"] <= 0 or ln["unit_price_minor"] < 0 or ln["discount_minor"] < 0
              for ln in e["lines"]) or any(not 0 <= a <= MAX for a in amounts)
    subtotal = sum(amounts)
    bad |= not 0 <= e["tax_minor"] <= MAX or not 0 <= e["total_minor"] <= MAX
    bad |= e["total_minor"] != subtotal + e["tax_minor"]
    bad |= etype == "invoice_issued" and e["subtotal_minor"] != subtotal
    return ["completeness.amounts"] if bad else []


@dataclass
class Order:
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> body sans event_id
    tokens: dict[str, bool] = field(default_factory=dict)  # dependency -> met (True) / failed
    held: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    booked: bool = False
    cancelled: bool = False
    currency: str = ""
    total: int = 0  # as amended
    amendment: int | None = None  # latest accepted
    invoiced: int = 0
    invoices: dict[str, list[Any]] = field(default_factory=dict)  # id -> [event, captured]
    payments: dict[str, list[Any]] = field(default_factory=dict)  # id -> [event, refunded]
    refunds: set[str] = field(default_factory=set)
    captured: int = 0  # accepted captures, minor units (one currency per order)
    refunded: int = 0  # accepted refunds


def rules(o: Order, e: dict[str, Any]) -> list[str]:
    """Lifecycle and money findings of an event whose dependencies are all met."""
    env, etype, out = e["envelope"], e["envelope"]["event_type"], []
    if o.cancelled and etype in ("order_booked", "order_amended", "invoice_issued",
                                 "payment_captured", "fulfilment_confirmed", "order_cancelled"):
        out.append("lifecycle.after_cancellation")
    elif etype == "order_booked" and o.booked:
        out.append("lifecycle.already_booked")
    ref = {"invoice_issued": (env["invoice_id"], o.invoices), "refund_issued": (
        e.get("refund_id"), o.refunds), "payment_captured": (env["payment_id"], o.payments)}
    if etype in ref and ref[etype][0] in ref[etype][1]:
        out.append("lifecycle.reused_reference")
    if etype == "order_amended":
        if o.invoices:
            out.append("lifecycle.amend_after_invoice")
        if e["currency"] != o.currency:
            out.append("reconciliation.currency")
    elif etype == "invoice_issued":
        if e["currency"] != o.currency:
            out.append("reconciliation.currency")
        if env["amendment_number"] != o.amendment:
            out.append("lifecycle.stale_version")
        if e["total_minor"] > o.total - o.invoiced:
            out.append("reconciliation.invoice_total")
    elif etype == "payment_captured":
        inv, captured = o.invoices[env["invoice_id"]]
        if e["currency"] != inv["currency"]:
            out.append("reconciliation.currency")
        if e["amount_minor"] > inv["total_minor"] - captured:
            out.append("reconciliation.payment_balance")
    elif etype == "refund_issued":
        pay, refunded = o.payments[env["payment_id"]]
        if e["currency"] != pay["currency"]:
            out.append("reconciliation.currency")
        if e["amount_minor"] > pay["amount_minor"] - refunded:
            out.append("reconciliation.refund_balance")
    return out


def post(bal: dict[tuple[str, str, str], int], oid: str, cur: str, *lines: tuple[str, int]) -> None:
    for account, amount in lines:  # debits positive
        bal[(oid, account, cur)] = bal.get((oid, account, cur), 0) + amount


def accept(o: Order, e: dict[str, Any], bal: dict[tuple[str, str, str], int]) -> None:
    env, etype, oid = e["envelope"], e["envelope"]["event_type"], e["envelope"]["order_id"]
    cur, amount = e.get("currency", ""), e.get("amount_minor", 0)
    if etype in ("order_booked", "order_amended"):
        o.booked, o.total, o.currency = True, e["total_minor"], cur
        o.amendment = env["amendment_number"] if etype == "order_amended" else None
    elif etype == "invoice_issued":
        o.invoices[env["invoice_id"]] = [e, 0]
        o.invoiced += e["total_minor"]
        post(bal, oid, cur, ("accounts_receivable", e["total_minor"]),
             ("revenue", -e["subtotal_minor"]), ("tax_payable", -e["tax_minor"]))
    elif etype == "payment_captured":
        o.payments[env["payment_id"]] = [e, 0]
        o.invoices[env["invoice_id"]][1] += amount
        o.captured += amount
        post(bal, oid, cur, ("cash", amount), ("accounts_receivable", -amount))
    elif etype == "refund_issued":
        o.refunds.add(e["refund_id"])
        o.payments[env["payment_id"]][1] += amount
        o.refunded += amount
        # After the cancellation the revenue is already all taken back: the refund pays
        # back the customer's credit instead of reducing revenue again.
        post(bal, oid, cur, ("accounts_receivable" if o.cancelled else "refunds", amount),
             ("cash", -amount))
    elif etype == "order_cancelled":
        o.cancelled = True
        for inv, _ in o.invoices.values():  # one credit note per accepted invoice
            post(bal, oid, inv["currency"], ("accounts_receivable", -inv["total_minor"]),
                 ("revenue", inv["subtotal_minor"]), ("tax_payable", inv["tax_minor"]))
        for currency in {inv["currency"] for inv, _ in o.invoices.values()}:
            # Refunds so far reduced revenue that the credit notes took back whole: they
            # become what was paid back of the customer's credit.
            moved = bal.get((oid, "refunds", currency), 0)
            post(bal, oid, currency, ("accounts_receivable", moved), ("refunds", -moved))


def cancelled_order_problems(orders: dict[str, Order], bal: dict[tuple[str, str, str], int]
                             ) -> list[str]:
    """The invariant of a cancelled order, checked on ``bal`` (per order, account, currency):
    revenue, tax payable and refunds 0; AR = -(captured - refunded); cash = captured - refunded.
    """
    out = []
    for oid, o in sorted(orders.items()):
        if not o.cancelled:
            continue
        owed = o.captured - o.refunded
        for account, want in (("revenue", 0), ("tax_payable", 0), ("refunds", 0),
                              ("accounts_receivable", -owed), ("cash", owed)):
            got = sum(n for (b_oid, b_acct, _), n in bal.items()
                      if b_oid == oid and b_acct == account)
            if got != want:
                out.append(f"cancelled order {oid!r}: {account} {got}, expected {want} "
                           f"(captured {o.captured}, refunded {o.refunded})")
    return out


def run(events: list[dict[str, Any]], orders_out: dict[str, Order] | None = None
        ) -> tuple[list[Outcome], dict[tuple[str, str, str], int]]:
    """Outcome of each input (by position) and non-zero ledger balances, debits positive.
    ``orders_out``: filled with each order's final state (order id -> Order)."""
    orders: dict[str, Order] = {} if orders_out is None else orders_out
    outcomes: list[Outcome | None] = [None] * len(events)
    bal: dict[tuple[str, str, str], int] = {}

    def judge(o: Order, i: int, e: dict[str, Any]) -> None:
        blocked = any(not o.tokens[d] for d in depends_on(e))
        found = ["dependency.blocked"] if blocked else completeness(e) or rules(o, e)
        if not found:
            accept(o, e, bal)
        outcomes[i] = Outcome("exception", tuple(found)) if found else Outcome("validated")
        token = provides(e)
        if token is not None:
            o.tokens[token] = o.tokens.get(token, False) or not found

    def release(o: Order) -> None:
        while ready := [h for h in o.held if all(d in o.tokens for d in depends_on(h[1]))]:
            i, e = min(ready, key=lambda h: (h[1]["envelope"]["sequence"], h[0]))
            o.held.remove((i, e))
            judge(o, i, e)

    for i, event in enumerate(events):
        if structurally_broken(event):
            outcomes[i] = Outcome("dead_letter")
            continue
        env = event["envelope"]
        o = orders.setdefault(env["order_id"], Order())
        body = {**event, "envelope": {k: v for k, v in env.items() if k != "event_id"}}
        first = o.seen.get(env["idempotency_key"])
        if first is not None:
            outcomes[i] = (Outcome("duplicate") if first == body
                           else Outcome("exception", ("dedup.conflict",)))
            continue
        o.seen[env["idempotency_key"]] = body
        if all(d in o.tokens for d in depends_on(event)):
            judge(o, i, event)
            release(o)
        else:
            o.held.append((i, event))
    for o in orders.values():
        for i, _ in o.held:
            outcomes[i] = Outcome("exception", ("hold.timeout",))
    assert all(x is not None for x in outcomes)
    return [x for x in outcomes if x is not None], {k: v for k, v in bal.items() if v}
