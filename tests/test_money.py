"""The money display context: exact, with each currency's own decimals."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from revline.core.money import digits, format_money, to_major


def test_each_currency_shows_its_own_decimals() -> None:
    assert format_money(123456, "EUR") == "1,234.56 EUR"
    assert format_money(-7, "JPY") == "-7 JPY"
    assert format_money(125, "KWD") == "0.125 KWD"
    assert format_money(5, "USD") == "0.05 USD"
    assert format_money(100, "EUR", signed=True) == "+1.00 EUR"
    assert format_money(0, "EUR", code=False) == "0.00"
    assert digits("XYZ") == 2


def test_amounts_near_the_limit_keep_every_digit() -> None:
    top = 2**63 - 1
    assert format_money(top, "EUR") == "92,233,720,368,547,758.07 EUR"
    assert format_money(-(2**70), "JPY") == f"-{2**70:,} JPY"


@given(st.integers(min_value=-(2**80), max_value=2**80),
       st.sampled_from(["EUR", "JPY", "KWD", "CLF", "USD"]))
def test_formatting_round_trips_exactly(minor: int, currency: str) -> None:
    shown = format_money(minor, currency, code=False).replace(",", "")
    assert Decimal(shown) == to_major(minor, currency)
    assert Decimal(shown).scaleb(digits(currency)) == minor
