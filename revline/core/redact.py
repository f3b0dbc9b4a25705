"""Redaction of secrets before anything is printed or logged, and spreadsheet-safe CSV cells.

``redact_url`` hides the password (and any token-like query parameter) of a connection
string or URL, whatever its scheme: SQLAlchemy DSNs, ``postgresql://``, libpq
``key=value`` strings, HTTP URLs with credentials. It never raises: a string it
cannot parse is returned with anything that looks like a credential masked.

``csv_safe`` neutralises a cell a spreadsheet would read as a formula (OWASP CSV
injection): a text cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return gets a leading ``'``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "***"
_SECRET_KEYS = re.compile(r"pass(word)?|pwd|secret|token|api[_-]?key|auth|credential|sig",
                          re.IGNORECASE)
# libpq keyword/value form: "host=db user=app password=secret dbname=ledger"
_KV_SECRET = re.compile(r"(?i)\b(password|pwd|secret|token|api[_-]?key)\s*=\s*('[^']*'|\S+)")
_USERINFO = re.compile(r"(//[^/@:\s]*:)[^@/\s]*@")


def redact_url(url: object) -> str:
    """``url`` with its password and secret query parameters replaced by ``***``."""
    text = "" if url is None else str(url)
    if "://" not in text:
        return _KV_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
    try:
        parts = urlsplit(text)
        out = text
        if "@" in parts.netloc:
            userinfo, _, host = parts.netloc.rpartition("@")
            user, has_password, _ = userinfo.partition(":")
            if has_password:
                out = out.replace(parts.netloc, f"{user}:{MASK}@{host}", 1)
        if parts.query:
            pairs = parse_qsl(parts.query, keep_blank_values=True)
            if any(_SECRET_KEYS.search(k) for k, _ in pairs):
                masked = urlencode(
                    [(k, MASK if _SECRET_KEYS.search(k) else v) for k, v in pairs], safe="*")
                head, _, _ = out.partition("?")
                out = f"{head}?{masked}" + (f"#{parts.fragment}" if parts.fragment else "")
        return out
    except ValueError:  # e.g. an invalid port or IPv6 literal: mask by pattern instead
        return _KV_SECRET.sub(lambda m: f"{m.group(1)}={MASK}",
                              _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text, never evaluates (OWASP CSV injection)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_safe_row(row: Iterable[Any]) -> list[Any]:
    return [csv_safe(cell) for cell in row]


__all__ = ["MASK", "csv_safe", "csv_safe_row", "redact_url"]
