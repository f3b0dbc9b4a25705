"""Shadow parity compares effects by (order_id, idempotency_key) (pure, no database)."""

from __future__ import annotations

from datetime import UTC, datetime

from revline.sinks.ledger import JournalSummary, SideEffect, load_posting_rules
from revline.sinks.reconcile import Expected, StreamView
from revline.sinks.shadow import LEGACY_ORDER, Footprint, footprints, parity

AT = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
RULES = load_posting_rules()


def journal(order: str, key: str, total: int) -> JournalSummary:
    return JournalSummary(id=f"J-{order}-{key}", idempotency_key=key, event_key=key,
                          order_id=order, event_type="invoice_issued", currency="EUR",
                          total_minor=total, occurred_at=AT, reverses_journal_id=None)


def effect(order: str | None, key: str, adapter: str, status: str) -> SideEffect:
    return SideEffect(order, key, adapter, {}, status, 1, AT, "")


def expected(order: str, key: str, position: int) -> Expected:
    return Expected(key=key, order_id=order, event_type="invoice_issued", currency="EUR",
                    amount_minor=100, occurred_at=AT, position=position)


def test_two_orders_sharing_a_key_are_compared_apart() -> None:
    stream = StreamView([expected("SO-A", "K", 0), expected("SO-B", "K", 1)])
    primary = footprints(
        [journal("SO-A", "K", 100), journal("SO-B", "K", 200)],
        [effect("SO-A", "K", "erp", "applied"), effect("SO-B", "K", "erp", "refused")],
    )
    assert set(primary) == {("SO-A", "K"), ("SO-B", "K")}
    assert primary[("SO-B", "K")] == Footprint((("K", "invoice_issued", "EUR", 200),),
                                               (("erp", "refused"),))
    # A shadow that lost order B's journal and applied it in the ERP: B differs, A not.
    shadow = footprints(
        [journal("SO-A", "K", 100)],
        [effect("SO-A", "K", "erp", "applied"), effect("SO-B", "K", "erp", "applied")],
    )
    report = parity(stream, primary, shadow, RULES)
    assert (report.compared, report.equal) == (2, 1)
    [diff] = report.differences
    assert (diff.order_id, diff.key) == ("SO-B", "K")
    assert diff.shadow == "erp=applied"


def test_a_legacy_row_counts_for_each_order_of_its_key_without_its_own() -> None:
    # order_id None: written before per-order identity; lookups match it by key.
    stream = StreamView([expected("SO-A", "K", 0), expected("SO-B", "L", 1)])
    primary = footprints(
        [journal("SO-A", "K", 100)],
        [effect(None, "K", "erp", "applied"), effect(None, "K", "ledger", "applied"),
         effect("SO-A", "K", "ledger", "refused"), effect(None, "L", "erp", "applied")],
    )
    assert primary[("SO-A", "K")].effects == (("erp", "applied"), ("ledger", "refused"))
    assert primary[(LEGACY_ORDER, "L")].effects == (("erp", "applied"),)
    shadow = footprints(
        [journal("SO-A", "K", 100)],
        [effect("SO-A", "K", "erp", "applied"), effect("SO-A", "K", "ledger", "refused"),
         effect("SO-B", "L", "erp", "applied")],
    )
    report = parity(stream, primary, shadow, RULES)
    assert (report.compared, report.equal) == (2, 2), report.differences
