"""A realistic order-to-cash workload and the manifest a correct pipeline must reach.

Each order is a causal flow (approve → book → amend → fulfil → invoice →
capture → refund, or book → cancel) in one of several currencies. On top, at
chosen rates: re-sent duplicates, conflicting re-sends, orders delivered out of
order, QA faults (incomplete, off-policy, unknown attribution, amounts that do
not reconcile), orphans whose dependency never comes, and poison records.

The manifest is derived from what was injected, never from the pipeline's own
code, so it is an independent oracle: for every input (by its 1-based
position, which ``revline publish`` also stamps as the ``revline-source-line``
header) its expected outcome, check and whether it must be held; for every
order the invoiced, paid and refunded totals the systems of record must show.

Semantics the manifest encodes (the pipeline's contract):
* the first copy of an idempotency key counts; a later identical copy is a
  duplicate, a later different copy a ``dedup.conflict`` exception;
* an event waits (is held) until every event it depends on has arrived;
* an event whose dependency ended in an exception becomes a
  ``dependency.blocked`` exception itself;
* P3 findings (attribution) pass with a warning; P1/P2 findings are exceptions;
* a hold that never resolves ends as a ``hold.timeout`` exception.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from revline.core.settings import DATA_DIR
from revline.processors.reference import ReferenceData, Rules, load_yaml
from revline.schemas import EventSerializer

EPOCH = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "SEK")
TAX_BPS = {"USD": 800, "EUR": 2000, "GBP": 2000, "JPY": 1000, "SEK": 2500}
SOURCES = {
    "DEAL_CLOSED": "salesforce",
    "QUOTE_ACCEPTED": "hubspot",
    "CONTRACT_SIGNED": "docusign",
    "STOREFRONT_ORDER": "shopify",
}

Token = tuple[str, str]


@dataclass(frozen=True)
class WorkloadOptions:
    orders: int = 100
    seed: int = 1
    run_id: str = ""
    duplicates: float = 0.03
    conflicts: float = 0.005
    out_of_order: float = 0.10
    incomplete: float = 0.01
    off_policy: float = 0.01
    unknown_attribution: float = 0.01
    amount_mismatch: float = 0.01
    poison: float = 0.002
    orphans: int = 0
    start: datetime = EPOCH
    # Multiplies every generated interval (orders 37 s apart, events 5-600 min apart):
    # the demo compresses a workload into the seconds before it publishes, so its events
    # occur during the run and trigger-to-outcome latency means what it says.
    time_scale: float = 1.0


@dataclass
class Expectation:
    outcome: str  # validated | duplicate | exception | dead_letter
    check_id: str | None = None
    held: bool = False
    warnings: list[str] = field(default_factory=list)
    stage: str | None = None  # dead letters: decode | schema | structure


@dataclass
class WorkloadRecord:
    seq: int
    key: str
    event: dict[str, Any] | None  # canonical event; None for poison
    raw: bytes | None  # poison bytes, sent as-is
    expect: Expectation
    note: str = ""
    deps: frozenset[Token] = frozenset()
    provides: Token | None = None
    fault: str | None = None  # the check this record is built to fail

    @property
    def idempotency_key(self) -> str | None:
        return self.event["envelope"]["idempotency_key"] if self.event else None

    @property
    def event_type(self) -> str | None:
        return self.event["envelope"]["event_type"] if self.event else None


@dataclass
class OrderTotals:
    order_id: str
    currency: str
    invoiced_minor: int = 0
    paid_minor: int = 0
    refunded_minor: int = 0
    cancelled: bool = False


@dataclass
class Workload:
    options: WorkloadOptions
    records: list[WorkloadRecord]
    orders: dict[str, OrderTotals]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.expect.outcome] = out.get(r.expect.outcome, 0) + 1
        out["held"] = sum(r.expect.held for r in self.records)
        return out

    def manifest(self) -> dict[str, Any]:
        opts = asdict(self.options)
        opts["start"] = self.options.start.isoformat()
        return {
            "options": opts,
            "counts": self.counts(),
            "inputs": [
                {
                    "seq": r.seq,
                    "order_id": r.key,
                    "event_type": r.event_type,
                    "idempotency_key": r.idempotency_key,
                    "event_id": r.event["envelope"]["event_id"] if r.event else None,
                    **asdict(r.expect),
                    "note": r.note,
                }
                for r in self.records
            ],
            "orders": {k: asdict(v) for k, v in sorted(self.orders.items())},
        }

    def json_lines(self) -> Iterator[str]:
        for r in self.records:
            if r.event is not None:
                yield json.dumps(r.event, default=_json_default, separators=(",", ":"))
            else:
                assert r.raw is not None
                yield json.dumps(
                    {
                        "__raw__": base64.b64encode(r.raw).decode(),
                        "__key__": r.key,
                        "__note__": r.note,
                    }
                )

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        events = directory / "events.jsonl"
        manifest = directory / "manifest.json"
        events.write_text("\n".join(self.json_lines()) + "\n")
        manifest.write_text(json.dumps(self.manifest(), indent=1))
        return events, manifest


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class _OrderBuilder:
    """Builds one order's causal flow; every event records what it depends on."""

    def __init__(self, gen: WorkloadGenerator, order_id: str, start: datetime) -> None:
        self.gen = gen
        self.rng = gen.rng
        self.order_id = order_id
        self.clock = start
        self.sequence = 0
        self.items: list[WorkloadRecord] = []
        self.currency = self.rng.choice(CURRENCIES)
        self.kind = self.rng.choice(list(SOURCES))
        self.source = SOURCES[self.kind]

    def envelope(self, event_type: str, key_suffix: str, **refs: Any) -> dict[str, Any]:
        self.sequence += 1
        self.clock += timedelta(minutes=self.rng.randint(5, 600) * self.gen.options.time_scale)
        return {
            "event_id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "event_type": event_type,
            "schema_version": 1,
            "idempotency_key": f"{self.order_id}:{key_suffix}",
            "order_id": self.order_id,
            "sequence": self.sequence,
            "occurred_at": self.clock.replace(microsecond=0),
            "source_system": self.source,
            "source_record_id": f"{self.source}-{self.rng.getrandbits(40):010x}",
            "owner": None,
            "amendment_number": refs.get("amendment_number"),
            "invoice_id": refs.get("invoice_id"),
            "payment_id": refs.get("payment_id"),
        }

    def add(
        self,
        event: dict[str, Any],
        deps: set[Token],
        provides: Token | None,
        fault: str | None = None,
        note: str = "",
    ) -> WorkloadRecord:
        rec = WorkloadRecord(
            seq=0,
            key=self.order_id,
            event=event,
            raw=None,
            expect=Expectation("validated"),
            note=note,
            deps=frozenset(deps),
            provides=provides,
            fault=fault,
        )
        self.items.append(rec)
        return rec

    def line(self, n: int, sku: str | None = None) -> dict[str, Any]:
        products = self.gen.products
        product = products[sku] if sku else self.rng.choice(list(products.values()))
        qty = self.rng.randint(1, 8)
        price = product.list_prices[self.currency]
        tolerance = self.gen.rules.discount_tolerance_bps(product.sku, product.family)
        discount = 0
        if tolerance and self.rng.random() < 0.4:
            discount = qty * price * self.rng.randint(0, tolerance) // 10_000
        return {
            "line_id": f"L{n}",
            "sku": product.sku,
            "quantity": qty,
            "unit_price_minor": price,
            "discount_minor": discount,
            "approval_id": None,
            "campaign_id": self.rng.choice([None, *sorted(self.gen.reference.campaigns)]),
            "channel_id": self.rng.choice(sorted(self.gen.reference.channels)),
        }


def totals(lines: list[dict[str, Any]], currency: str) -> tuple[int, int, int]:
    """(subtotal, tax, total) of lines, in minor units."""
    subtotal = sum(ln["quantity"] * ln["unit_price_minor"] - ln["discount_minor"] for ln in lines)
    tax = subtotal * TAX_BPS.get(currency, 0) // 10_000
    return subtotal, tax, subtotal + tax


class WorkloadGenerator:
    def __init__(
        self,
        options: WorkloadOptions,
        reference: ReferenceData | None = None,
        rules: Rules | None = None,
    ) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.reference = reference or ReferenceData.from_mapping(
            load_yaml(DATA_DIR / "reference.yaml")
        )
        self.rules = rules or Rules.from_mapping(load_yaml(DATA_DIR / "rules.yaml"))
        self.products = dict(sorted(self.reference.products.items()))
        self._serializer = EventSerializer()

    # -- one order ---------------------------------------------------------------
    def _order(self, index: int, start: datetime) -> list[WorkloadRecord]:
        opts = self.options
        run = opts.run_id or f"r{opts.seed}"
        b = _OrderBuilder(self, f"SO-{run}-{index:06d}", start)
        rng = self.rng
        roll = rng.random()
        fault = None
        edges = [
            ("incomplete", opts.incomplete),
            ("off_policy", opts.off_policy),
            ("unknown_attribution", opts.unknown_attribution),
            ("amount_mismatch", opts.amount_mismatch),
        ]
        acc = 0.0
        for name, rate in edges:
            acc += rate
            if roll < acc:
                fault = name
                break

        lines = [b.line(n) for n in range(1, rng.randint(1, 4) + 1)]
        booked: set[Token] = set()

        # An approved discount beyond policy (not a fault): approval, then the booking.
        approval_token: Token | None = None
        if fault is None and rng.random() < 0.08:
            target = lines[0]
            product = self.products[target["sku"]]
            tolerance = self.rules.discount_tolerance_bps(product.sku, product.family)
            approved_bps = min(tolerance + 1500, 9000)
            target["discount_minor"] = (
                target["quantity"] * target["unit_price_minor"] * (tolerance + 500) // 10_000
            )
            approval_id = f"APR-{b.order_id}"
            target["approval_id"] = approval_id
            approval_token = ("approval", approval_id)
            b.add(
                {
                    "envelope": b.envelope("discount_approved", f"approval:{approval_id}"),
                    "approval_id": approval_id,
                    "sku": target["sku"],
                    "max_discount_bps": approved_bps,
                    "approver": rng.choice(["cfo@example.com", "vp-sales@example.com"]),
                },
                set(),
                approval_token,
                note="discount beyond policy, approved",
            )
            booked.add(approval_token)

        booking_fault: str | None = None
        envelope = b.envelope("order_booked", "booked")
        currency = b.currency
        if fault == "incomplete":
            variant = rng.choice(["sku", "lines", "amounts", "currency", "source_ref"])
            booking_fault = f"completeness.{variant}"
            if variant == "sku":
                lines[0]["sku"] = "SKU-DOES-NOT-EXIST"
            elif variant == "lines":
                lines = []
            elif variant == "amounts":
                lines[0]["quantity"] = -lines[0]["quantity"]
            elif variant == "currency":
                currency = "XBZ"
            else:
                envelope["source_record_id"] = ""
        elif fault == "off_policy":
            target = lines[0]
            product = self.products[target["sku"]]
            if rng.random() < 0.5:
                booking_fault = "policy.discount"
                tolerance = self.rules.discount_tolerance_bps(product.sku, product.family)
                target["discount_minor"] = (
                    target["quantity"] * target["unit_price_minor"] * (tolerance + 1000) // 10_000
                )
            else:
                booking_fault = "policy.price"
                target["unit_price_minor"] = (
                    target["unit_price_minor"] * (10_000 + self.rules.price_tolerance_bps + 800)
                ) // 10_000
        if fault == "unknown_attribution":  # passes with a P3 warning, see generate()
            if rng.random() < 0.5:
                lines[0]["campaign_id"] = "cmp-typo-" + str(rng.randint(1, 99))
            else:
                lines[0]["channel_id"] = "chan-unknown"

        _, tax, total = totals(lines, currency)
        b.add(
            {
                "envelope": envelope,
                "booking_kind": b.kind,
                "customer_id": f"CUST-{rng.randint(1, max(10, opts.orders // 3)):06d}",
                "currency": currency,
                "lines": lines,
                "tax_minor": tax,
                "total_minor": total,
            },
            set(booked),
            ("booked", ""),
            fault=booking_fault,
        )
        currency_in_use = currency

        # Amendments replace the lines; each needs the booking and the previous one.
        amendments = rng.choice([0, 0, 0, 1, 1, 2])
        for n in range(1, amendments + 1):
            lines = [dict(ln) for ln in lines] or [b.line(1)]
            for ln in lines:
                ln["quantity"] = max(1, ln["quantity"] + rng.choice([-1, 1, 2]))
                ln["discount_minor"] = min(
                    ln["discount_minor"], ln["quantity"] * ln["unit_price_minor"] // 20
                )
            _subtotal, tax, total = totals(lines, currency_in_use)
            deps: set[Token] = {("booked", "")}
            if n > 1:
                deps.add(("amend", str(n - 1)))
            deps |= {("approval", ln["approval_id"]) for ln in lines if ln["approval_id"]}
            b.add(
                {
                    "envelope": b.envelope(
                        "order_amended", f"amend:{n}", amendment_number=n
                    ),
                    "reason": rng.choice(["seat count change", "customer request", "upsell"]),
                    "currency": currency_in_use,
                    "lines": lines,
                    "tax_minor": tax,
                    "total_minor": total,
                },
                deps,
                ("amend", str(n)),
            )
        last_amend: set[Token] = {("amend", str(amendments))} if amendments else set()

        if rng.random() < 0.05:
            b.add(
                {
                    "envelope": b.envelope("order_cancelled", "cancelled"),
                    "reason": rng.choice(["customer churned", "duplicate order", "credit hold"]),
                },
                {("booked", "")},
                ("cancelled", ""),
            )
            return b.items

        # Fulfilment, possibly split in two shipments.
        splits = 2 if rng.random() < 0.2 and len(lines) >= 2 else 1
        for s in range(1, splits + 1):
            shipments = [
                {"line_id": ln["line_id"], "sku": ln["sku"], "quantity": abs(ln["quantity"])}
                for i, ln in enumerate(lines)
                if splits == 1 or i % 2 == s - 1
            ]
            b.add(
                {
                    "envelope": b.envelope("fulfilment_confirmed", f"fulfil:{s}"),
                    "fulfilment_id": f"FUL-{b.order_id}-{s}",
                    "shipments": shipments,
                    "partial": splits > 1 and s < splits,
                    "carrier": rng.choice([None, "UPS", "DHL", "DPD"]),
                },
                {("booked", "")},
                None,
            )

        # One invoice for the order as last amended.
        invoice_id = f"INV-{b.order_id}"
        invoice_fault = None
        inv_lines = [dict(ln) for ln in lines]
        if fault == "amount_mismatch":
            invoice_fault = rng.choice(
                [
                    "reconciliation.invoice_total",
                    "reconciliation.payment_balance",
                    "reconciliation.refund_balance",
                    "reconciliation.currency",
                ]
            )
            if invoice_fault == "reconciliation.invoice_total":
                # Internally consistent, but bills a quantity the order never had.
                inv_lines[0]["quantity"] += 1
        inv_subtotal, inv_tax, inv_total = totals(inv_lines, currency_in_use)
        b.add(
            {
                "envelope": b.envelope(
                    "invoice_issued",
                    "invoice:1",
                    invoice_id=invoice_id,
                    amendment_number=amendments or None,
                ),
                "currency": currency_in_use,
                "lines": inv_lines,
                "subtotal_minor": inv_subtotal,
                "tax_minor": inv_tax,
                "total_minor": inv_total,
                "due_at": (b.clock + timedelta(days=30)).replace(microsecond=0),
            },
            {("booked", ""), *last_amend},
            ("invoice", invoice_id),
            fault="reconciliation.invoice_total"
            if invoice_fault == "reconciliation.invoice_total"
            else None,
        )

        # Captures: none (unpaid), one, or two partial ones.
        paid_plan = rng.random()
        if invoice_fault in (
            "reconciliation.payment_balance",
            "reconciliation.refund_balance",
            "reconciliation.currency",
        ):
            paid_plan = 0.5  # exactly one capture, so the fault is unambiguous
        if paid_plan < 0.1:
            return b.items
        parts = [inv_total] if paid_plan < 0.8 or inv_total < 2 else _split(rng, inv_total)
        payments: list[tuple[str, int]] = []
        for p, amount in enumerate(parts, start=1):
            payment_id = f"PAY-{b.order_id}-{p}"
            pay_fault = None
            pay_currency = currency_in_use
            if invoice_fault == "reconciliation.payment_balance":
                amount += rng.choice([1, 500])
                pay_fault = invoice_fault
            elif invoice_fault == "reconciliation.currency":
                pay_currency = "USD" if currency_in_use != "USD" else "EUR"
                pay_fault = invoice_fault
            b.add(
                {
                    "envelope": b.envelope(
                        "payment_captured",
                        f"capture:{p}",
                        invoice_id=invoice_id,
                        payment_id=payment_id,
                    ),
                    "currency": pay_currency,
                    "amount_minor": amount,
                    "method": rng.choice(["card", "bank_transfer", "wallet"]),
                    "processor_ref": f"ch_{rng.getrandbits(48):012x}",
                },
                {("invoice", invoice_id)},
                ("payment", payment_id),
                fault=pay_fault,
            )
            payments.append((payment_id, amount))

        if invoice_fault == "reconciliation.refund_balance" or rng.random() < 0.1:
            payment_id, amount = payments[0]
            refund = max(1, amount // rng.choice([1, 2, 4]))
            refund_fault = None
            if invoice_fault == "reconciliation.refund_balance":
                refund = amount + rng.choice([1, 1000])
                refund_fault = invoice_fault
            b.add(
                {
                    "envelope": b.envelope(
                        "refund_issued", "refund:1", payment_id=payment_id
                    ),
                    "refund_id": f"REF-{b.order_id}-1",
                    "currency": currency_in_use,
                    "amount_minor": refund,
                    "reason": rng.choice(["damaged goods", "goodwill", "seat reduction"]),
                },
                {("payment", payment_id)},
                ("refund", f"REF-{b.order_id}-1"),
                fault=refund_fault,
            )
        return b.items

    # -- the whole workload ------------------------------------------------------
    def generate(self) -> Workload:
        opts = self.options
        rng = self.rng
        timeline: list[tuple[float, int, WorkloadRecord]] = []
        tie = 0
        for i in range(1, opts.orders + 1):
            start = opts.start + timedelta(seconds=i * 37 * opts.time_scale)
            items = self._order(i, start)
            slots = [i * 10.0 + k * rng.uniform(1.0, 30.0) for k in range(len(items))]
            slots.sort()
            if rng.random() < opts.out_of_order and len(items) > 1:
                order = items[:]
                while order == items:
                    rng.shuffle(order)
                items = order
            for slot, rec in zip(slots, items, strict=True):
                tie += 1
                timeline.append((slot, tie, rec))
        timeline.sort(key=lambda t: (t[0], t[1]))
        delivered = [rec for _, _, rec in timeline]

        # Re-sends: identical bodies (webhook fired twice) and conflicting ones.
        resends: list[tuple[int, WorkloadRecord]] = []
        for pos, rec in enumerate(delivered):
            assert rec.event is not None
            if rng.random() < opts.duplicates:
                copy = _copy_event(rec, rng, conflicting=False)
                resends.append((pos + rng.randint(1, 40), copy))
            elif rec.event["envelope"]["event_type"] in ("payment_captured", "invoice_issued") and (
                rng.random() < opts.conflicts
            ):
                copy = _copy_event(rec, rng, conflicting=True)
                resends.append((pos + rng.randint(1, 40), copy))
        for pos, rec in sorted(resends, key=lambda t: -t[0]):
            delivered.insert(min(pos + 1, len(delivered)), rec)

        # Orphans: an amendment of an order whose booking never arrives.
        for o in range(1, opts.orphans + 1):
            run = opts.run_id or f"r{opts.seed}"
            b = _OrderBuilder(self, f"SO-{run}-ORPHAN{o:03d}", opts.start)
            lines = [b.line(1)]
            _, tax, total = totals(lines, b.currency)
            rec = b.add(
                {
                    "envelope": b.envelope("order_amended", "amend:1", amendment_number=1),
                    "reason": "booking lost upstream",
                    "currency": b.currency,
                    "lines": lines,
                    "tax_minor": tax,
                    "total_minor": total,
                },
                {("booked", "")},
                ("amend", "1"),
                note="orphan: its booking is never published",
            )
            delivered.insert(rng.randint(0, len(delivered)), rec)

        # Poison records.
        poison_count = round(len(delivered) * opts.poison)
        for p in range(poison_count):
            delivered.insert(rng.randint(0, len(delivered)), self._poison(p, delivered))

        for seq, rec in enumerate(delivered, start=1):
            rec.seq = seq
            rec.expect.warnings = self._attribution_warnings(rec)
        orders = self._simulate(delivered)
        return Workload(options=opts, records=delivered, orders=orders)

    def _attribution_warnings(self, rec: WorkloadRecord) -> list[str]:
        """Unknown campaign/channel ids pass with a P3 warning on every event carrying them."""
        lines = rec.event.get("lines", []) if rec.event else []
        out = set()
        for ln in lines:
            if ln["campaign_id"] is not None and ln["campaign_id"] not in self.reference.campaigns:
                out.add("attribution.campaign")
            if ln["channel_id"] is not None and ln["channel_id"] not in self.reference.channels:
                out.add("attribution.channel")
        return sorted(out)

    def _poison(self, n: int, delivered: list[WorkloadRecord]) -> WorkloadRecord:
        rng = self.rng
        kind = ("garbage", "unknown_fingerprint", "truncated", "structure")[n % 4]
        sample = next(r for r in delivered if r.event is not None)
        assert sample.event is not None
        good = self._serializer(sample.event)
        key = f"POISON-{n:05d}"
        if kind == "garbage":
            raw, stage = b'{"not": "avro"} ' + rng.randbytes(12), "decode"
        elif kind == "unknown_fingerprint":
            raw, stage = b"\xc3\x01" + rng.randbytes(8) + good[10:], "schema"
        elif kind == "truncated":
            raw, stage = good[: max(11, len(good) // 2)], "decode"
        else:
            event = json.loads(json.dumps(sample.event, default=_json_default))
            event = _revive_timestamps(event)
            env = event["envelope"]
            env.update(
                event_type="payment_captured",
                invoice_id=None,
                payment_id="PAY-NOWHERE",
                idempotency_key=f"{key}:capture",
                event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            )
            event = {
                "envelope": env,
                "currency": "USD",
                "amount_minor": 100,
                "method": "card",
                "processor_ref": "ch_poison",
            }
            raw, stage = self._serializer(event), "structure"
        return WorkloadRecord(
            seq=0,
            key=key,
            event=None,
            raw=raw,
            expect=Expectation("dead_letter", stage=stage),
            note=f"poison: {kind}",
        )

    def _simulate(self, delivered: list[WorkloadRecord]) -> dict[str, OrderTotals]:
        """Walk the delivery order like a correct pipeline and fill in expectations."""
        first_body: dict[tuple[str, str], WorkloadRecord] = {}
        arrived: dict[tuple[str, Token], bool] = {}  # token -> ok?
        held: dict[str, list[WorkloadRecord]] = {}
        orders: dict[str, OrderTotals] = {}

        def settle(rec: WorkloadRecord) -> None:
            assert rec.event is not None
            order = rec.key
            if order not in orders:
                orders[order] = OrderTotals(order, rec.event.get("currency", ""))
            failed = [d for d in rec.deps if not arrived[(order, d)]]
            cancelled = arrived.get((order, ("cancelled", ""))) is True
            if failed:
                rec.expect.outcome, rec.expect.check_id = "exception", "dependency.blocked"
            elif rec.fault and rec.fault.startswith("completeness."):
                rec.expect.outcome, rec.expect.check_id = "exception", rec.fault
            elif cancelled and rec.event_type not in _AFTER_CANCELLATION_OK:
                # Delivered out of order, an amendment may be judged after the
                # cancellation: the lifecycle refuses it (processors/lifecycle.py).
                rec.expect.outcome = "exception"
                rec.expect.check_id = "lifecycle.after_cancellation"
            elif rec.fault:
                rec.expect.outcome, rec.expect.check_id = "exception", rec.fault
            else:
                rec.expect.outcome = "validated"
                _apply_totals(orders, rec)
            if rec.provides:
                arrived[(order, rec.provides)] = rec.expect.outcome == "validated"

        for rec in delivered:
            if rec.event is None:
                continue
            order = rec.key
            body_key = (order, rec.event["envelope"]["idempotency_key"])
            if body_key in first_body:
                same = _body(first_body[body_key]) == _body(rec)
                rec.expect.outcome = "duplicate" if same else "exception"
                rec.expect.check_id = None if same else "dedup.conflict"
                rec.expect.warnings = []
                continue
            first_body[body_key] = rec
            if any((order, d) not in arrived for d in rec.deps):
                rec.expect.held = True
                held.setdefault(order, []).append(rec)
                continue
            settle(rec)
            waiting = held.get(order, [])
            while True:
                ready = [r for r in waiting if all((order, d) in arrived for d in r.deps)]
                if not ready:
                    break
                ready.sort(key=lambda r: r.event["envelope"]["sequence"])  # type: ignore[index]
                nxt = ready[0]
                waiting.remove(nxt)
                settle(nxt)
        for waiting in held.values():
            for rec in waiting:
                rec.expect.outcome, rec.expect.check_id = "exception", "hold.timeout"
                rec.expect.warnings = []
        for rec in delivered:
            if rec.expect.outcome != "validated":
                rec.expect.warnings = []
        return orders


_AFTER_CANCELLATION_OK = ("refund_issued", "discount_approved", "manual_override")


def _apply_totals(orders: dict[str, OrderTotals], rec: WorkloadRecord) -> None:
    assert rec.event is not None
    event = rec.event
    event_type = event["envelope"]["event_type"]
    currency = event.get("currency")
    totals_ = orders[rec.key]
    if event_type == "invoice_issued":
        totals_.invoiced_minor += event["total_minor"]
    elif event_type == "payment_captured":
        totals_.paid_minor += event["amount_minor"]
    elif event_type == "refund_issued":
        totals_.refunded_minor += event["amount_minor"]
    elif event_type == "order_cancelled":
        totals_.cancelled = True
    if currency and not totals_.currency:
        totals_.currency = currency


def _body(rec: WorkloadRecord) -> str:
    assert rec.event is not None
    env = {k: v for k, v in rec.event["envelope"].items() if k != "event_id"}
    rest = {k: v for k, v in rec.event.items() if k != "envelope"}
    return json.dumps([env, rest], default=_json_default, sort_keys=True)


def _copy_event(rec: WorkloadRecord, rng: random.Random, *, conflicting: bool) -> WorkloadRecord:
    assert rec.event is not None
    event = json.loads(json.dumps(rec.event, default=_json_default))
    event = _revive_timestamps(event)
    event["envelope"]["event_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if conflicting:
        key = "amount_minor" if "amount_minor" in event else "total_minor"
        event[key] += 1
    return WorkloadRecord(
        seq=0,
        key=rec.key,
        event=event,
        raw=None,
        expect=Expectation("exception" if conflicting else "duplicate"),
        note="conflicting re-send" if conflicting else "re-send of the same fact",
        deps=rec.deps,
        provides=None,
    )


def _revive_timestamps(event: dict[str, Any]) -> dict[str, Any]:
    env = event["envelope"]
    env["occurred_at"] = datetime.fromisoformat(env["occurred_at"])
    for name in ("due_at", "expires_at"):
        if name in event:
            event[name] = datetime.fromisoformat(event[name])
    return event


def _split(rng: random.Random, amount: int) -> list[int]:
    first = rng.randint(1, amount - 1)
    return [first, amount - first]


def generate(options: WorkloadOptions) -> Workload:
    return WorkloadGenerator(options).generate()


def encoded(records: list[WorkloadRecord], clock_ms: int = 0,
            ) -> Iterator[tuple[WorkloadRecord, bytes, int]]:
    """(record, its bytes on the wire, its time in ms) of each record, as the worker reads
    them: an event encoded and stamped with its occurred_at (never going back), poison as
    its raw bytes stamped with the time before it. ``clock_ms``: the time before the
    first record (a history generated in chunks goes on from the last chunk's)."""
    encode = EventSerializer()
    for r in records:
        if r.event is not None:
            value = encode(r.event)
            when = r.event["envelope"]["occurred_at"]
            if isinstance(when, datetime):
                clock_ms = max(clock_ms, int(when.timestamp() * 1000))
        else:
            assert r.raw is not None
            value = r.raw
        yield r, value, clock_ms
