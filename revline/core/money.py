"""Money as people read it: one display context for every screen, report and export.

Money travels as integer minor units plus an ISO 4217 currency. People read major
units with the currency's own number of decimals (JPY 0, EUR 2, KWD 3) and its code,
never a truncated or float-rounded figure: formatting is integer arithmetic only, so
an amount near 2^63 shows every digit.
"""

from __future__ import annotations

from decimal import Decimal

__all__ = ["digits", "format_money", "to_major"]

# ISO 4217 minor units for the currencies whose exponent is not 2.
_NON_TWO_DIGITS = {
    "BHD": 3, "BIF": 0, "CLF": 4, "CLP": 0, "DJF": 0, "GNF": 0, "IQD": 3, "ISK": 0,
    "JOD": 3, "JPY": 0, "KMF": 0, "KRW": 0, "KWD": 3, "LYD": 3, "OMR": 3, "PYG": 0,
    "RWF": 0, "TND": 3, "UGX": 0, "UYI": 0, "UYW": 4, "VND": 0, "VUV": 0, "XAF": 0,
    "XOF": 0, "XPF": 0,
}  # fmt: skip


def digits(currency: str) -> int:
    """The currency's number of decimals (2 for a code this table does not list)."""
    return _NON_TWO_DIGITS.get(currency, 2)


def to_major(minor: int, currency: str) -> Decimal:
    """Exact major units: ``to_major(123456, "EUR") == Decimal("1234.56")``."""
    return Decimal(minor).scaleb(-digits(currency))


def format_money(minor: int, currency: str, *, signed: bool = False, code: bool = True) -> str:
    """``1,234.56 EUR``, ``-7 JPY``, ``0.125 KWD``; ``signed`` adds ``+`` to positives."""
    places = digits(currency)
    whole, frac = divmod(abs(minor), 10**places)
    text = f"{whole:,}" + (f".{frac:0{places}d}" if places else "")
    sign = "-" if minor < 0 else "+" if signed and minor > 0 else ""
    return f"{sign}{text} {currency}" if code else f"{sign}{text}"
