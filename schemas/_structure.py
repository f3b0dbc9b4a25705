"""Structural rules of the wire contract that Avro cannot express.

A record that breaks one is schema-valid but cannot be a real event (an
amendment without a number, a payment that names no invoice); such records
are rejected by the publisher and dead-lettered by the pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from revline.schemas._catalog import RECORD_NAMES

# Envelope references each event type must carry.
REQUIRED_REFS: dict[str, tuple[str, ...]] = {
    "order_amended": ("amendment_number",),
    "invoice_issued": ("invoice_id",),
    "payment_captured": ("invoice_id", "payment_id"),
    "refund_issued": ("payment_id",),
}
_NON_EMPTY = ("event_id", "idempotency_key", "order_id")

# Identifiers (docs/lifecycle.md, "Identifiers"): any Unicode except control characters,
# at most MAX_ID_LENGTH characters and MAX_ID_BYTES in UTF-8. The adapters store every
# other character as it is.
MAX_ID_LENGTH = 512
MAX_ID_BYTES = 1024
_ENVELOPE_IDS = ("event_id", "idempotency_key", "order_id", "source_system",
                 "source_record_id", "invoice_id", "payment_id")
_EVENT_IDS = ("refund_id", "approval_id", "fulfilment_id", "override_id", "customer_id",
              "target_idempotency_key")
_LINE_IDS = ("line_id", "sku", "approval_id", "campaign_id", "channel_id")


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _id_problem(value: str) -> str | None:
    if len(value) > MAX_ID_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_ID_LENGTH})"
    # At most 4 bytes a character: only a long id can pass the byte bound (hot path).
    size = len(value.encode("utf-8", "surrogatepass")) if len(value) * 4 > MAX_ID_BYTES else 0
    if size > MAX_ID_BYTES:
        # Database indexes hold an order id and a key together (PostgreSQL: 2,704 bytes
        # an index row); 512 CJK characters are 1,536 bytes.
        return f"is {size} bytes in UTF-8 (at most {MAX_ID_BYTES})"
    found = _CONTROL.search(value)
    if found:
        return f"holds the control character U+{ord(found.group()):04X}"
    return None


def _text_problem(event: Mapping[str, Any], path: str = "") -> str | None:
    """The first string anywhere in the event holding NUL (no database text column can)."""
    for name, value in event.items():
        if isinstance(value, str):
            if "\x00" in value:
                return f"{path}{name} holds the NUL character"
        elif isinstance(value, Mapping):
            found = _text_problem(value, f"{path}{name}.")
            if found:
                return found
        elif isinstance(value, list):
            for n, item in enumerate(value):
                if isinstance(item, Mapping):
                    found = _text_problem(item, f"{path}{name}[{n}].")
                    if found:
                        return found
    return None


SHORT = MAX_ID_BYTES // 4  # a string this long or shorter passes both size bounds
_SCALARS = frozenset({int, float, bool, type(None), bytes, datetime, Decimal})


def _plain_strings(value: dict[str, Any], out: list[str]) -> bool:
    """Every string in a decoded event (plain dicts and lists, as the codec builds them)
    into ``out``; False on anything else (the full rules then judge it)."""
    for item in value.values():
        kind = type(item)
        if kind is str:
            out.append(item)
        elif kind is dict:
            if not _plain_strings(item, out):
                return False
        elif kind is list:
            for element in item:
                element_kind = type(element)
                if element_kind is dict:
                    if not _plain_strings(element, out):
                        return False
                elif element_kind is str:
                    out.append(element)
                elif element_kind not in _SCALARS:
                    return False
        elif kind not in _SCALARS:
            return False
    return True


def _clean(event: Mapping[str, Any]) -> bool:
    """True only when no rule below can find a problem: every string anywhere is short
    enough for both size bounds and holds no control character (NUL included). The
    common case, in one pass (the rules field by field cost ~9 µs an event)."""
    if type(event) is not dict:
        return False
    strings: list[str] = []
    if not _plain_strings(event, strings):
        return False
    for text in strings:
        if len(text) > SHORT:
            return False
    return _CONTROL.search("".join(strings)) is None


def id_error(event: Mapping[str, Any]) -> str | None:
    """The first identifier that breaks the wire contract's id rule, or None."""
    if _clean(event):
        return None
    envelope = event["envelope"]
    for name in _ENVELOPE_IDS:
        value = envelope.get(name)
        if isinstance(value, str) and (problem := _id_problem(value)):
            return f"envelope.{name} {problem}"
    for name in _EVENT_IDS:
        value = event.get(name)
        if isinstance(value, str) and (problem := _id_problem(value)):
            return f"{name} {problem}"
    for group in ("lines", "shipments"):
        for n, line in enumerate(event.get(group) or ()):
            for name in _LINE_IDS:
                value = line.get(name)
                if isinstance(value, str) and (problem := _id_problem(value)):
                    return f"{group}[{n}].{name} {problem}"
    return _text_problem(event)


def structural_error(event: Mapping[str, Any], *, ids_clean: bool = False) -> str | None:
    """The first structural problem of a decoded event, or None.

    ``ids_clean``: the caller knows every string of the event is at most ``SHORT``
    characters and holds no control character (``EventDeserializer.decode_plain`` says
    so while decoding), so the identifier rules cannot find anything."""
    envelope = event["envelope"]
    event_type = envelope["event_type"]
    if event_type not in RECORD_NAMES:
        return f"envelope.event_type {event_type!r} is not a canonical event type"
    for name in _NON_EMPTY:
        if not envelope[name]:
            return f"envelope.{name} is empty"
    for name in REQUIRED_REFS.get(event_type, ()):
        if envelope.get(name) is None or envelope.get(name) == "":
            return f"{event_type} requires envelope.{name}"
    if event_type == "order_amended" and envelope["amendment_number"] < 1:
        return "order_amended requires envelope.amendment_number >= 1"
    if event_type == "manual_override":
        for name in ("reason_code", "actor", "check_id", "target_idempotency_key"):
            if not event.get(name):
                return f"manual_override requires {name}"
    return None if ids_clean else id_error(event)
