"""The QA checks: pure functions of (event, order state, reference data, rules).

Each finding carries a stable check id; severity and default owner come from
the versioned rules file. Completeness runs first: when a record is
incomplete, later checks would only produce noise, so they are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from revline.processors.currencies import ISO_4217
from revline.processors.lifecycle import latest_amendment, refusal, stage_of
from revline.processors.order_state import OrderState, provides
from revline.processors.reference import ReferenceData, Rules

Event = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Finding:
    check_id: str
    reason: str  # human-readable, names the record's own values


@dataclass(slots=True)  # not frozen: built per judged input, and frozen costs ~2x; never mutated
class CheckContext:
    reference: ReferenceData
    rules: Rules
    now_ms: int = 0  # when the event is judged (an override's expiry is checked against it)


# A check returns its findings as a list: a generator per check and input cost a frame
# and its teardown on the engine's hottest path.
Check = Callable[[Event, OrderState, CheckContext], list[Finding]]

_LINES = ("order_booked", "order_amended", "invoice_issued")
_MONEY = ("order_booked", "order_amended", "invoice_issued", "payment_captured", "refund_issued")
MAX_MINOR = 2**63 - 1  # what the ledger's BIGINT columns hold


def _line_amount(line: Mapping[str, Any]) -> int:
    amount: int = line["quantity"] * line["unit_price_minor"] - line["discount_minor"]
    return amount


# -- completeness ------------------------------------------------------------------------
def completeness(event: Event, state: OrderState, ctx: CheckContext) -> list[Finding]:
    out: list[Finding] = []
    env = event["envelope"]
    kind = env["event_type"]
    if not env["source_system"] or not env["source_record_id"]:
        out.append(Finding(
            "completeness.source_ref",
            "record does not point back to its source (source_system/source_record_id empty)",
        ))
    if kind in _MONEY and event["currency"] not in ISO_4217:
        out.append(Finding("completeness.currency",
                           f"currency {event['currency']!r} is not ISO 4217"))
    products = ctx.reference.products
    if kind in _LINES:
        lines = event["lines"]
        if not lines:
            out.append(Finding("completeness.lines", f"{kind} has no lines"))
        subtotal = 0
        for ln in lines:
            if ln["sku"] not in products:
                out.append(Finding(
                    "completeness.sku", f"line {ln['line_id']}: SKU {ln['sku']!r} unknown"
                ))
            amount = _line_amount(ln)
            subtotal += amount  # the lines' sum, in the same pass
            if ln["quantity"] <= 0 or ln["unit_price_minor"] < 0 or not (
                0 <= ln["discount_minor"] <= ln["quantity"] * ln["unit_price_minor"]
            ) or amount > MAX_MINOR:
                out.append(Finding(
                    "completeness.amounts",
                    f"line {ln['line_id']}: quantity {ln['quantity']}, unit price "
                    f"{ln['unit_price_minor']}, discount {ln['discount_minor']} do not make a line",
                ))
        if event["tax_minor"] < 0:
            out.append(Finding("completeness.amounts", f"tax {event['tax_minor']} is negative"))
        if kind == "invoice_issued" and event["subtotal_minor"] != subtotal:
            out.append(Finding(
                "completeness.amounts",
                f"invoice subtotal {event['subtotal_minor']} != sum of its lines {subtotal}",
            ))
        if event["total_minor"] != subtotal + event["tax_minor"]:
            out.append(Finding(
                "completeness.amounts",
                f"total {event['total_minor']} != lines {subtotal} + tax {event['tax_minor']}",
            ))
    elif kind in ("payment_captured", "refund_issued") and event["amount_minor"] <= 0:
        # A capture or refund of nothing moves no money; both ERPs refuse it.
        out.append(Finding("completeness.amounts",
                           f"amount {event['amount_minor']} is not positive"))
    elif kind == "fulfilment_confirmed":
        if not event["shipments"]:
            out.append(Finding("completeness.lines", "fulfilment has no shipped lines"))
        for sh in event["shipments"]:
            if sh["sku"] not in products:
                out.append(Finding(
                    "completeness.sku", f"line {sh['line_id']}: SKU {sh['sku']!r} unknown"
                ))
            if sh["quantity"] <= 0:
                out.append(Finding(
                    "completeness.amounts", f"line {sh['line_id']}: quantity {sh['quantity']}"
                ))
    elif kind == "manual_override":
        out += override_validity(event, ctx)
    elif kind == "discount_approved":
        if event["sku"] != "*" and event["sku"] not in products:
            out.append(Finding("completeness.sku", f"approval for unknown SKU {event['sku']!r}"))
        if not 0 <= event["max_discount_bps"] <= 10_000:
            out.append(Finding(
                "completeness.amounts",
                f"max_discount_bps {event['max_discount_bps']} is outside 0..10000",
            ))
    return out


# Checks no person can waive: they guard what the ledger and the ERP hold (amounts that
# add up, one currency, where the order stands). Waiving one would post money the ERP
# refuses or the books cannot hold. Reference data (an unknown SKU the ERP knows),
# policy and attribution remain a person's call.
NOT_WAIVABLE_PREFIXES = ("lifecycle.", "reconciliation.", "dedup.", "dependency.", "hold.",
                         # An override's own refusal: waiving it would apply an override
                         # with no reason code, one expired on arrival, or one of a money
                         # check, the very overrides the refusal exists to stop.
                         "override.")
NOT_WAIVABLE = frozenset({"completeness.amounts", "completeness.currency", "completeness.lines",
                          "completeness.source_ref"})  # the ledger needs the source


def waivable(check_id: str) -> bool:
    return check_id not in NOT_WAIVABLE and not check_id.startswith(NOT_WAIVABLE_PREFIXES)


def override_validity(event: Event, ctx: CheckContext) -> list[Finding]:
    """An override must say why and must not be expired on arrival; else finance looks."""
    out: list[Finding] = []
    if not waivable(event["check_id"]):
        out.append(Finding(
            "override.not_waivable",
            f"override {event['override_id']} by {event['actor']!r} waives "
            f"{event['check_id']}, which guards the money itself; it is not applied",
        ))
    if not event["reason_code"].strip():
        out.append(Finding(
            "override.reason_missing",
            f"override {event['override_id']} by {event['actor']!r} has no reason code; "
            "it is not applied",
        ))
    expires_ms = int(event["expires_at"].timestamp() * 1000)
    if expires_ms <= ctx.now_ms:
        out.append(Finding(
            "override.expired",
            f"override {event['override_id']} by {event['actor']!r} expired at "
            f"{event['expires_at'].isoformat()} before it arrived; it is not applied",
        ))
    return out


# -- lifecycle ---------------------------------------------------------------------------
_REUSABLE_PREFIXES = ("booked", "cancelled")  # their refusals are the lifecycle table's


def lifecycle(event: Event, state: OrderState, ctx: CheckContext) -> list[Finding]:
    """Is the event acceptable where the order stands (revline.processors.lifecycle)?"""
    out: list[Finding] = []
    env = event["envelope"]
    kind = env["event_type"]
    d = state.data
    stage = stage_of(d)
    refused = refusal(stage, kind)
    if refused is not None:
        check_id, why = refused
        out.append(Finding(check_id, f"{kind} refused: {why} (order stage {stage})"))
        return out
    token = provides(event)
    if token is not None and not token.startswith(_REUSABLE_PREFIXES) and state.token(token):
        # The same reference accepted earlier under another idempotency key: a second
        # invoice INV-1 (or payment, refund, amendment number...) would collide in the ERP.
        out.append(Finding(
            "lifecycle.reused_reference",
            f"{token} was already accepted for this order under another idempotency key",
        ))
        return out
    if kind == "invoice_issued":
        latest = latest_amendment(d)
        billed = env.get("amendment_number")
        if billed != latest:
            out.append(Finding(
                "lifecycle.stale_version",
                f"invoice bills {_version_label(billed)} but the order is at "
                f"{_version_label(latest)}",
            ))
    return out


def _version_label(amendment: int | None) -> str:
    return "the booking" if amendment is None else f"amendment {amendment}"


# -- policy ------------------------------------------------------------------------------
POLICY_EVENT_TYPES = ("order_booked", "order_amended")  # the only events policy judges


def policy(event: Event, state: OrderState, ctx: CheckContext) -> list[Finding]:
    out: list[Finding] = []
    if event["envelope"]["event_type"] not in POLICY_EVENT_TYPES:
        return out
    rules = ctx.rules
    currency = event["currency"]
    for ln in event["lines"]:
        product = ctx.reference.products.get(ln["sku"])
        if product is None:
            # Reached only when a person waived completeness.sku: they vouched for the SKU,
            # not for its price or discount, which nothing here can check without a list
            # price. Someone must accept those too (an override of policy.price).
            out.append(Finding("policy.price", f"line {ln['line_id']}: SKU {ln['sku']} is not in "
                               "the reference data: its price and discount cannot be checked"))
            continue
        list_price = product.list_prices.get(currency)
        if list_price is None:
            out.append(Finding("policy.price",
                               f"SKU {ln['sku']} has no list price in {currency}"))
            continue
        deviation = abs(ln["unit_price_minor"] - list_price)
        if deviation * 10_000 > rules.price_tolerance_bps * list_price:
            out.append(Finding(
                "policy.price",
                f"line {ln['line_id']}: unit price {ln['unit_price_minor']} is off list price "
                f"{list_price} by more than {rules.price_tolerance_bps} bps",
            ))
        list_amount = ln["quantity"] * list_price
        tolerance = rules.discount_tolerance_bps(ln["sku"], product.family)
        if ln["discount_minor"] * 10_000 <= tolerance * list_amount:
            continue
        approval = state.data["approvals"].get(ln["approval_id"]) if ln["approval_id"] else None
        if (
            approval is not None
            and approval["sku"] in (ln["sku"], "*")
            and ln["discount_minor"] * 10_000 <= approval["max_bps"] * list_amount
        ):
            continue
        bps = ln["discount_minor"] * 10_000 // max(list_amount, 1)
        out.append(Finding(
            "policy.discount",
            f"line {ln['line_id']}: discount {bps} bps exceeds the {tolerance} bps tolerance for "
            f"{product.family}"
            + (f" and approval {ln['approval_id']}" if ln["approval_id"] else " with no approval"),
        ))
    return out


def policy_agrees(event: Event, reference: ReferenceData, a: Rules, b: Rules) -> bool:
    """Whether ``policy`` gives ``event`` the same findings under rules ``a`` and ``b``
    with this reference data, whatever the order's state.

    ``policy`` reads the rules only through its two tolerances. Where ``a`` and ``b``
    give a line the same tolerance, both compare the same values; where they differ, a
    line within the lower one passes both before the state (approvals) or the tolerance
    (in the reason) is read. A backtest runs the engine once for both sides on this;
    keep it in step with ``policy``. False means "maybe not"."""
    if (a.price_tolerance_bps == b.price_tolerance_bps
            and a.discount_family_bps == b.discount_family_bps
            and a.discount_sku_bps == b.discount_sku_bps):
        return True
    if event["envelope"]["event_type"] not in POLICY_EVENT_TYPES:
        return True
    price_a, price_b = a.price_tolerance_bps, b.price_tolerance_bps
    currency = event["currency"]
    for ln in event["lines"]:
        product = reference.products.get(ln["sku"])
        if product is None:
            continue
        list_price = product.list_prices.get(currency)
        if list_price is None:
            continue
        if price_a != price_b and (abs(ln["unit_price_minor"] - list_price) * 10_000
                                   > min(price_a, price_b) * list_price):
            return False
        low = a.discount_tolerance_bps(ln["sku"], product.family)
        high = b.discount_tolerance_bps(ln["sku"], product.family)
        if low != high and (ln["discount_minor"] * 10_000
                            > min(low, high) * ln["quantity"] * list_price):
            return False
    return True


# -- attribution -------------------------------------------------------------------------
def attribution(event: Event, state: OrderState, ctx: CheckContext) -> list[Finding]:
    out: list[Finding] = []
    if event["envelope"]["event_type"] not in _LINES:
        return out
    for ln in event["lines"]:
        if ln["campaign_id"] is not None and ln["campaign_id"] not in ctx.reference.campaigns:
            out.append(Finding(
                "attribution.campaign",
                f"line {ln['line_id']}: campaign {ln['campaign_id']!r} is not a known campaign",
            ))
        if ln["channel_id"] is not None and ln["channel_id"] not in ctx.reference.channels:
            out.append(Finding(
                "attribution.channel",
                f"line {ln['line_id']}: channel {ln['channel_id']!r} is not a known channel",
            ))
    return out


# -- reconciliation anchor ---------------------------------------------------------------
def reconciliation(event: Event, state: OrderState, ctx: CheckContext) -> list[Finding]:
    out: list[Finding] = []
    env = event["envelope"]
    kind = env["event_type"]
    d = state.data
    if kind == "order_amended":
        if state.currency is not None and event["currency"] != state.currency:
            out.append(Finding(
                "reconciliation.currency",
                f"amendment in {event['currency']} but the order is in {state.currency}",
            ))
    elif kind == "invoice_issued":
        version = state.version(env.get("amendment_number"))
        if version is None:
            return out
        if event["currency"] != version["currency"]:
            out.append(Finding(
                "reconciliation.currency",
                f"invoice in {event['currency']} but the order is in {version['currency']}",
            ))
            return out
        # Partial invoices (deposit and balance, per shipment) are fine; together they
        # may not bill more than the order as amended.
        remaining = version["total"] - d["invoiced"]
        if event["total_minor"] > remaining:
            label = _version_label(env.get("amendment_number"))
            out.append(Finding(
                "reconciliation.invoice_total",
                f"invoice total {event['total_minor']} exceeds order total {version['total']} "
                f"(as of {label}) less {d['invoiced']} already invoiced",
            ))
    elif kind == "payment_captured":
        invoice = d["invoices"].get(env["invoice_id"])
        if invoice is not None:
            out += _against_parent(
                event, invoice, invoice["total"] - invoice["captured"],
                "payment", "an invoice", "reconciliation.payment_balance",
                f"exceeds the open balance {{}} of invoice {env['invoice_id']}", "capture",
            )
    elif kind == "refund_issued":
        payment = d["payments"].get(env["payment_id"])
        if payment is not None:
            out += _against_parent(
                event, payment, payment["amount"] - payment["refunded"],
                "refund", "a payment", "reconciliation.refund_balance",
                f"exceeds the refundable {{}} of payment {env['payment_id']}", "refund",
            )
    return out


def _against_parent(event: Event, parent: Mapping[str, Any], remaining: int, noun: str,
                    parent_label: str, check_id: str, excess: str,
                    amount_label: str) -> list[Finding]:
    """Money moved against an earlier record: same currency, no more than what is left."""
    out: list[Finding] = []
    if event["currency"] != parent["currency"]:
        out.append(Finding(
            "reconciliation.currency",
            f"{noun} in {event['currency']} against {parent_label} in {parent['currency']}",
        ))
    elif event["amount_minor"] > remaining:
        amount = event["amount_minor"]
        out.append(Finding(check_id, f"{amount_label} {amount} {excess.format(remaining)}"))
    return out


LATER_STAGES: tuple[Check, ...] = (policy, attribution, reconciliation)


def run_checks(event: Event, state: OrderState, ctx: CheckContext,
               waived: Collection[str] = ()) -> list[Finding]:
    """Every finding, including those of ``waived`` checks (an active override drops them
    later); only findings that are not waived stop the later stages."""
    findings = completeness(event, state, ctx)
    if findings and (not waived or any(f.check_id not in waived for f in findings)):
        return findings
    # An event the order's stage does not accept is refused for that alone: what its
    # amounts would have done is noise (and no override can waive where an order stands).
    refused = lifecycle(event, state, ctx)
    if refused:
        return findings + refused
    for check in LATER_STAGES:
        findings.extend(check(event, state, ctx))
    return findings


SEVERITY_RANK = {"P1": 0, "P2": 1, "P3": 2}


def primary(findings: list[Finding], rules: Rules) -> Finding:
    """The most severe finding; ties go to the first found (check order)."""
    if len(findings) == 1:  # the common case; its spec is looked up by the caller anyway
        return findings[0]
    return min(findings, key=lambda f: SEVERITY_RANK[rules.spec(f.check_id).severity])
