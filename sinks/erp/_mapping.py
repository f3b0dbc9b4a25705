"""What both ERP adapters share: step names, idempotency markers, money and line pricing.

The two adapters (Tryton and the in-memory reference) must give the same answers,
so everything that decides *what* to write lives here and only *how* differs.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from revline.core import money
from revline.sinks._protocols import (
    EffectResult,
    Event,
    PartialWriteError,
    PermanentSinkError,
    TransientSinkError,
)

ADAPTER = "erp"

# Steps, in the order a document chain is built; also the keys of external_refs.
PARTY = "party"
SALE = "sale"
INVOICE = "invoice"
PAYMENT = "payment"
CREDIT_NOTE = "credit_note"
REFUND_PAYMENT = "refund_payment"

APPLICABLE = frozenset(
    {
        "order_booked",
        "order_amended",
        "order_cancelled",
        "invoice_issued",
        "payment_captured",
        "refund_issued",
    }
)

# Price precision of a sale line in major units (Tryton's default price_decimal).
PRICE_DECIMALS = 4

# A key is stored percent-escaped (``%``, ``[`` and ``]`` only), so a marker never holds
# a bracket of its own; a key without those characters is written as it always was, and
# markers written before the escaping read back unchanged.
_MARKER = re.compile(r"\[revline step=(?P<step>[a-z_]+) key=(?P<key>[^\]\n]+)\]")
_ESCAPE = {"%": "%25", "[": "%5B", "]": "%5D"}
_UNESCAPE = re.compile(r"%(25|5B|5D)")
_LEGACY = re.compile(r"%(?!25|5B|5D)")


def currency_digits(code: str) -> int:
    """ISO 4217 decimals (used where the ERP does not say; Tryton's own currency records
    win there)."""
    return money.digits(code)


def escape_key(key: str) -> str:
    """The key as a marker holds it: ``%``, ``[`` and ``]`` percent-encoded."""
    return "".join(_ESCAPE.get(ch, ch) for ch in key)


def unescape_key(stored: str) -> str:
    return _UNESCAPE.sub(lambda mt: chr(int(mt[1], 16)), stored)


def marker(step: str, key: str) -> str:
    """The text stored on an ERP document so a search for the key finds it."""
    if not key or any(unicodedata.category(ch) == "Cc" for ch in key):
        # The contract's identifiers hold no control characters (QA refuses them at
        # the structure stage); a marker cannot carry one across a line break.
        raise PermanentSinkError(f"idempotency key {key!r} cannot be stored in the ERP")
    return f"[revline step={step} key={escape_key(key)}]"


def markers(text: str | None) -> list[tuple[str, str]]:
    """(step, key) of every marker in a document's text field."""
    return [(mt["step"], unescape_key(mt["key"])) for mt in _MARKER.finditer(text or "")]


def like_escape(text: str) -> str:
    """``text`` matched literally inside a LIKE pattern (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def like_pattern(key: str) -> str:
    """A LIKE pattern (escape ``\\``) matching any marker of exactly this key."""
    # The closing bracket stops "SO-1:amend:1" from matching "SO-1:amend:10".
    return f"%key={like_escape(escape_key(key))}]%"


def _legacy(key: str) -> bool:
    """Whether ``key``, stored raw, is told apart from every escaped key: it holds a ``%``
    that starts no escape (``%25``, ``%5B``, ``%5D``), which an escaped key never does."""
    return _LEGACY.search(key) is not None


def like_patterns(key: str) -> list[str]:
    """LIKE patterns matching every form a marker of this key may have been stored in:
    the escaped one, and the raw one markers had before the escaping (``%`` unescaped)
    where that raw form cannot be another key's escaped form (see ``marker_steps``)."""
    patterns = [like_pattern(key)]
    if _legacy(key):
        patterns.append(f"%key={like_escape(key)}]%")
    return patterns


def marker_steps(text: str | None, key: str) -> list[str]:
    """Steps of the markers in ``text`` that carry ``key``.

    A key is stored escaped. Before the escaping, ``%`` was stored raw: such a legacy
    marker is recognised when its raw text holds a ``%`` that starts no escape (e.g.
    ``50%off``), so an upgrade never applies its effect twice. A legacy key whose every
    ``%`` happens to read as an escape (``a%25``) is indistinguishable from the escaped
    key ``a%`` and is read as that: an escaped spelling is never another key.
    """
    escaped = escape_key(key)
    legacy = key if _legacy(key) else None
    return [
        mt["step"]
        for mt in _MARKER.finditer(text or "")
        if mt["key"] == escaped or mt["key"] == legacy
    ]


def has_marker(text: str | None, step: str, key: str) -> bool:
    return step in marker_steps(text, key)


def marker_end(text: str, step: str) -> list[tuple[str, str]]:
    """(key, the text after the marker) of each ``step`` marker in ``text``."""
    return [
        (unescape_key(mt["key"]), text[mt.end() :])
        for mt in _MARKER.finditer(text)
        if mt["step"] == step
    ]


def add_marker(text: str | None, step: str, key: str) -> str:
    line = marker(step, key)
    if has_marker(text, step, key):
        return text or ""
    return f"{text}\n{line}" if text else line


def to_major(minor: int, digits: int) -> Decimal:
    return Decimal(minor).scaleb(-digits)


def to_minor(amount: Decimal, digits: int) -> int:
    return int(amount.scaleb(digits).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


@dataclass(frozen=True)
class PricedLine:
    """One ERP document line: the discount is folded into the unit price."""

    line_id: str
    sku: str
    quantity: int
    unit_price: Decimal  # major units, at most PRICE_DECIMALS decimals
    amount_minor: int  # quantity * unit_price, exact in minor units

    @property
    def description(self) -> str:
        return f"{self.line_id} {self.sku}"


def price_lines(lines: Sequence[Mapping[str, Any]], digits: int) -> list[PricedLine]:
    """Event lines -> ERP lines whose amounts equal the event's to the minor unit.

    ERP lines carry a unit price and no separate discount amount, so the net
    (quantity x price - discount) is spread over the units. Where that unit price
    is not exact at the ERP's price precision, the line is split in two
    (quantity - 1 units at the floor price, one unit carrying the remainder) rather
    than letting rounding move the total.
    """
    if not lines:
        raise PermanentSinkError("the event has no lines")
    priced: list[PricedLine] = []
    step = Decimal(1).scaleb(-PRICE_DECIMALS)
    for ln in lines:
        qty = int(ln["quantity"])
        unit = int(ln["unit_price_minor"])
        discount = int(ln.get("discount_minor") or 0)
        if qty <= 0:
            raise PermanentSinkError(f"line {ln['line_id']}: quantity {qty} is not positive")
        net = qty * unit - discount
        if unit < 0 or discount < 0 or net < 0:
            raise PermanentSinkError(
                f"line {ln['line_id']}: negative amount (price {unit}, discount {discount})"
            )
        price = (to_major(net, digits) / qty).quantize(step, rounding=ROUND_HALF_EVEN)
        if to_minor(price * qty, digits) == net:
            priced.append(PricedLine(ln["line_id"], ln["sku"], qty, price, net))
            continue
        floor, remainder = divmod(net, qty)
        if qty > 1:
            priced.append(
                PricedLine(
                    ln["line_id"], ln["sku"], qty - 1, to_major(floor, digits), floor * (qty - 1)
                )
            )
        priced.append(
            PricedLine(
                ln["line_id"], ln["sku"], 1, to_major(floor + remainder, digits), floor + remainder
            )
        )
    return priced


def event_day(value: Any) -> date:
    """The accounting date of a timestamp (UTC calendar day)."""
    if isinstance(value, datetime):
        return value.date() if value.tzinfo is None else value.astimezone(UTC).date()
    if isinstance(value, date):
        return value
    raise PermanentSinkError(f"not a timestamp: {value!r}")


def envelope(event: Event) -> Mapping[str, Any]:
    env = event.get("envelope")
    if not isinstance(env, Mapping):
        raise PermanentSinkError("event has no envelope")
    return env


def result(
    order_id: str, key: str, applied: bool, refs: Mapping[str, str], detail: str = ""
) -> EffectResult:
    return EffectResult(
        adapter=ADAPTER,
        order_id=order_id,
        idempotency_key=key,
        status="applied" if applied else "already_applied",
        external_refs=dict(refs),
        detail=detail,
    )


def not_applicable(order_id: str, key: str, event_type: str) -> EffectResult:
    return EffectResult(
        adapter=ADAPTER,
        order_id=order_id,
        idempotency_key=key,
        status="not_applicable",
        detail=f"{event_type} has no ERP document",
    )


def partial(done: Mapping[str, str], exc: Exception, event_type: str) -> PartialWriteError:
    steps = ", ".join(f"{k}={v}" for k, v in done.items())
    return PartialWriteError(f"{event_type}: done {steps}; then failed: {exc}", done, exc)


class Progress:
    """Which steps exist for one event, and whether this call wrote anything."""

    def __init__(self) -> None:
        self.refs: dict[str, str] = {}
        self.done: dict[str, str] = {}  # completed steps (the partial-write report)
        self.wrote = False

    def ref(self, step: str, ref: object) -> None:
        self.refs[step] = str(ref)

    def complete(self, step: str, ref: object) -> None:
        self.refs[step] = self.done[step] = str(ref)


# Event type -> the adapter method that applies it; other types are not applicable.
HANDLERS = {
    "order_booked": "_book",
    "order_amended": "_amend",
    "order_cancelled": "_cancel",
    "invoice_issued": "_invoice",
    "payment_captured": "_payment",
    "refund_issued": "_refund",
}


def dispatch(
    adapter: object, event: Event, before: Callable[[], None] | None = None
) -> EffectResult:
    """Apply ``event`` with the adapter's handler, turning a failure after a finished step
    into a ``PartialWriteError`` that names what is already done."""
    env = envelope(event)
    order_id = str(env["order_id"])
    key = str(env["idempotency_key"])
    etype = str(env["event_type"])
    name = HANDLERS.get(etype)
    if name is None:
        return not_applicable(order_id, key, etype)
    handler = getattr(adapter, name)
    progress = Progress()
    try:
        if before is not None:
            before()
        handler(event, env, key, progress)
    except (TransientSinkError, PermanentSinkError) as exc:
        if progress.done:
            raise partial(progress.done, exc, etype) from exc
        raise
    return result(order_id, key, progress.wrote, progress.refs)


def refuse_a_second_cancellation(order_id: str, key: str, note_comments: list[Any]) -> None:
    """A cancellation under another key, of an order whose invoices an earlier cancellation
    credited (``note_comments``: those credit notes' comments). The engine refuses it, but
    one can reach the sink; crediting again would give the customer back twice."""
    earlier = sorted({k for comment in note_comments
                      for step, k in markers(comment) if step == CREDIT_NOTE and k != key})
    if earlier:
        raise PermanentSinkError(
            f"order_cancelled {key} for order {order_id}: an earlier cancellation, "
            f"{earlier[0]}, credited the order's invoices (replay it if it did not finish); "
            "crediting again would give the customer back twice"
        )
