"""Money on screen: major units with each currency's decimals, never cut, at 80 and 200 columns."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from revline.cli.demo import money_report
from revline.core.money import format_money
from revline.sinks.ledger import SqlLedger

AMOUNTS = {"EUR": 3_813_034_567_890, "JPY": 9_876_543_210, "KWD": 1_234_567_890_123,
           "USD": 5, "GBP": 645_208_812}


def invoice(order: str, currency: str, total: int) -> dict[str, Any]:
    return {"envelope": {"event_type": "invoice_issued", "idempotency_key": f"{order}:inv",
                         "order_id": order, "source_system": "t", "source_record_id": order,
                         "occurred_at": datetime(2026, 12, 1, tzinfo=UTC),
                         "invoice_id": f"INV-{order}"},
            "currency": currency, "subtotal_minor": total, "tax_minor": 0,
            "total_minor": total}


@pytest.mark.parametrize("width", [80, 200])
def test_demo_ledger_table_shows_every_amount_whole(tmp_path: Path, width: int) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with SqlLedger(url) as ledger:
        ledger.post([invoice(f"O-{c}", c, v) for c, v in AMOUNTS.items()])
    console = Console(width=width, record=True, force_terminal=False)
    money_report(console, url, "the in-memory ERP", 1.0)
    text = console.export_text()
    for currency, minor in AMOUNTS.items():
        for amount in (format_money(minor, currency), format_money(-minor, currency)):
            assert amount.removesuffix(f" {currency}") in text, (amount, text)
    assert "…" not in text.split("ERP documents")[0]
    assert "0.05" in text and "9,876,543,210" in text and "1,234,567,890.123" in text
