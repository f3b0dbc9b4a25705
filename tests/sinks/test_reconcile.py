"""Reconciliation and shadow parity as pure functions over plain values.

Where the model of "what a correct sink leaves" must agree with the real adapters,
the actual side comes from the real ones (SqlLedger on in-memory SQLite, the
in-memory ERP), driven without Kafka; the Kafka tests are test_reconcile_kafka.py.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from revline.core.errors import ConfigurationError
from revline.schemas import exception_codec
from revline.sinks._protocols import ErpDocument, PermanentSinkError
from revline.sinks.erp import InMemoryErp
from revline.sinks.erp import _mapping as m
from revline.sinks.ledger import JournalSummary, SideEffect, SqlLedger, load_posting_rules
from revline.sinks.ledger import _ledger as ledger_module
from revline.sinks.reconcile import (
    ALL_TIME,
    CHECK_DRIFT,
    ERP_STEPS,
    Report,
    StreamView,
    compare,
    compare_erp,
    compare_ledger,
    exception_id,
    exception_records,
    expected_from_events,
    fmt_minor,
    parse_window,
)
from revline.sinks.shadow import Footprint, footprints, parity
from revline.tools.workload import WorkloadOptions, generate
from tests.sinks.erp_contract import (
    DAY,
    LINES,
    amended,
    booked,
    cancelled,
    captured,
    fulfilled,
    invoiced,
    line,
    new_order,
    refunded,
    subtotal,
    tax_of,
)

RULES = load_posting_rules()


def stream_of(events: Iterable[dict[str, Any]]) -> StreamView:
    return expected_from_events(((e, None) for e in events), RULES)


def journal(key: str, etype: str, total: int, currency: str = "EUR", order: str = "SO-1",
            at: datetime = DAY, effect_key: str | None = None) -> JournalSummary:
    return JournalSummary(id=f"J-{effect_key or key}", idempotency_key=effect_key or key,
                          event_key=key, order_id=order, event_type=etype, currency=currency,
                          total_minor=total, occurred_at=at, reverses_journal_id=None)


def flow(order: str, currency: str = "EUR") -> list[dict[str, Any]]:
    """Booked, amended, invoiced, paid in two captures, partly refunded."""
    lines2 = [*LINES, line("L3", "SKU-CRM-PRO", 1, 110400)]
    total = subtotal(lines2) + tax_of(lines2, currency)
    return [booked(order, LINES, currency), amended(order, 1, lines2, currency),
            fulfilled(order), invoiced(order, lines2, currency),
            captured(order, 1, total // 3, currency), captured(order, 2, total - total // 3,
                                                               currency),
            refunded(order, 5000, currency)]


def cancelled_after_invoice(order: str) -> list[dict[str, Any]]:
    return [booked(order, LINES), invoiced(order, LINES), cancelled(order, DAY + timedelta(days=2))]


def sink(events: list[dict[str, Any]], ledger: SqlLedger, erp: InMemoryErp) -> None:
    """What the sink processor does, without Kafka: post, apply, record refusals."""
    for event in events:
        env = event["envelope"]
        ledger.post([event])
        try:
            erp.apply(event)
        except PermanentSinkError as exc:
            ledger.record_effect(env["order_id"], env["idempotency_key"], "erp", {}, "refused",
                                 1, str(exc))


# -- the model agrees with the real adapters -------------------------------------------
def test_a_correct_sink_leaves_zero_drift_in_the_real_ledger_and_erp() -> None:
    a, b, c = new_order(), new_order(), new_order()
    events = [*flow(a), *flow(b, "JPY"), *cancelled_after_invoice(c), booked(new_order(), LINES)]
    stream = stream_of(events)
    with SqlLedger("sqlite:///:memory:") as ledger:
        erp = InMemoryErp()
        sink(events, ledger, erp)
        lr = compare_ledger(stream, ledger.journal_summaries(), {})
        er = compare_erp(stream, erp.documents(), {})
    assert (lr.issues, er.issues) == ([], [])
    # invoice, 2 captures, refund per flow x2; invoice + credit note of the cancellation
    assert lr.checked == lr.matched == 10
    # per flow: booked, amended, invoice, 2 captures, refund; c: booked, invoice, cancel; +1
    assert er.checked == er.matched == 6 * 2 + 3 + 1
    cell = lr.cells[("order_cancelled", "EUR", "2026-11")]
    inv = subtotal(LINES) + tax_of(LINES, "EUR")
    assert (cell.stream_count, cell.stream_minor, cell.count, cell.minor) == (1, inv, 1, inv)
    assert er.cells[("order_cancelled", "EUR", "2026-11")].minor == inv


def test_generated_workload_sunk_in_order_reconciles_to_zero_with_refusals_owned() -> None:
    workload = generate(WorkloadOptions(orders=60, seed=11, duplicates=0, conflicts=0,
                                        out_of_order=0, incomplete=0, off_policy=0,
                                        amount_mismatch=0, poison=0))
    events = [r.event for r in workload.records
              if r.event is not None and r.expect.outcome == "validated"]
    # An amendment after invoicing: valid for the stream, refused by the ERP (a confirmed
    # sale's lines do not change), so the sink owns it as an exception.
    invoiced_order = next(e for e in events if e["envelope"]["event_type"] == "invoice_issued")
    late = amended(invoiced_order["envelope"]["order_id"], 9, LINES,
                   invoiced_order["currency"], DAY + timedelta(days=30))
    events.append(late)
    stream = stream_of(events)
    with SqlLedger("sqlite:///:memory:") as ledger:
        erp = InMemoryErp()
        sink(events, ledger, erp)
        refused = {(e.order_id or "", e.idempotency_key): e.detail
                   for e in ledger.all_effects("erp", ["refused"])}
        lr = compare_ledger(stream, ledger.journal_summaries(), {})
        er = compare_erp(stream, erp.documents(), refused)
        balances = ledger.balances()
    assert lr.issues == [] and er.issues == [], (lr.issues[:3], er.issues[:3])
    late_env = late["envelope"]
    assert list(refused) == [(late_env["order_id"], late_env["idempotency_key"])]
    assert [i.key for i in er.refused] == [late_env["idempotency_key"]]
    assert "confirmed sale" in er.refused[0].detail
    # The stream's amounts per currency equal the manifest's totals, independently derived.
    invoiced_ = {cur: 0 for cur in {o.currency for o in workload.orders.values()}}
    for (etype, cur, _), cell in lr.cells.items():
        if etype == "invoice_issued":
            invoiced_[cur] += cell.minor
    for cur, total in invoiced_.items():
        assert total == sum(o.invoiced_minor for o in workload.orders.values()
                            if o.currency == cur)
    assert sum(v for (acct, _), v in balances.items() if acct == "cash") == sum(
        o.paid_minor - o.refunded_minor for o in workload.orders.values())


def test_erp_steps_cover_exactly_what_the_erp_adapters_handle() -> None:
    assert set(ERP_STEPS) == set(m.HANDLERS) == m.APPLICABLE


# -- ledger: missing, extra, mismatched, refused ---------------------------------------
def test_ledger_names_missing_extra_and_mismatched_records_with_amounts() -> None:
    order = new_order()
    events = flow(order)
    stream = stream_of(events)
    inv, cap1, cap2, ref = (stream.by_key[f"{order}:{s}"] for s in
                            ("invoice:1", "capture:1", "capture:2", "refund:1"))
    journals = [
        journal(inv.key, "invoice_issued", inv.amount_minor or 0, order=order),
        # capture:1 deleted behind the pipeline's back
        journal(cap2.key, "payment_captured", (cap2.amount_minor or 0) + 1, order=order),
        journal(ref.key, "refund_issued", 5000, order=order),
        journal("SO-GHOST:invoice:1", "invoice_issued", 999, order="SO-GHOST"),
    ]
    report = compare_ledger(stream, journals, {})
    assert [(i.kind, i.key, i.expected_minor, i.actual_minor) for i in report.missing] == [
        ("missing", cap1.key, cap1.amount_minor, None)]
    assert [(i.key, i.expected_minor, i.actual_minor) for i in report.mismatched] == [
        (cap2.key, cap2.amount_minor, (cap2.amount_minor or 0) + 1)]
    assert "≠" in report.mismatched[0].detail
    assert [(i.key, i.actual_minor, i.order_id) for i in report.extra] == [
        ("SO-GHOST:invoice:1", 999, "SO-GHOST")]
    assert (report.checked, report.matched) == (4, 2)
    assert report.drift_pct == pytest.approx(75.0)


def test_refused_events_are_listed_as_owned_not_drift() -> None:
    order = new_order()
    stream = stream_of(flow(order))
    key = f"{order}:capture:1"
    kept = [journal(e.key, e.event_type, e.ledger_minor or 0, order=order)
            for e in stream.records if e.ledger_minor and e.key != key]
    report = compare_ledger(stream, kept, {(order, key): "ledger refused: account closed"})
    assert report.issues == []
    assert [(i.kind, i.key, i.detail) for i in report.refused] == [
        ("refused", key, "ledger refused: account closed")]
    assert report.drift_pct == 0.0


def test_cancellation_expects_the_reversal_of_only_unrefused_earlier_invoices() -> None:
    order = new_order()
    events = cancelled_after_invoice(order)
    stream = stream_of(events)
    cancel = stream.by_key[f"{order}:cancelled"]
    inv = stream.by_key[f"{order}:invoice:1"]
    assert cancel.reverses == (inv.key,) and cancel.amount_minor == inv.amount_minor
    credit = journal(cancel.key, "order_cancelled", inv.amount_minor or 0, order=order,
                     effect_key=f"{cancel.key}:reverses:J-{inv.key}")
    ok = compare_ledger(stream, [journal(inv.key, "invoice_issued", inv.amount_minor or 0,
                                         order=order), credit], {})
    assert ok.issues == [] and ok.matched == 2
    # The invoice was refused by the ledger: nothing to reverse, so a credit note is extra.
    refused = compare_ledger(stream, [credit], {(order, inv.key): "refused"})
    assert [(i.kind, i.key) for i in refused.extra] == [("extra", cancel.key)]


def paid_cancelled_refunded(order: str, script: str) -> list[dict[str, Any]]:
    """Booked, invoiced, paid in full, then ``script``: "cancel" and "refund:<minor>" steps."""
    total = subtotal(LINES) + tax_of(LINES, "EUR")
    events = [booked(order, LINES), invoiced(order, LINES), captured(order, 1, total)]
    for n, step in enumerate(script.split(), start=1):
        if step == "cancel":
            events.append(cancelled(order))
        else:
            event = refunded(order, int(step.partition(":")[2]), key=f"{order}:refund:{n}")
            event["refund_id"] = f"REF-{order}-{n}"
            events.append(event)
    return events


@pytest.mark.parametrize("script", ["cancel refund:1000", "refund:1000 cancel",
                                    "refund:300 cancel refund:700", "refund:300 refund:200 cancel"])
def test_cancellation_and_refunds_in_any_order_reconcile_to_zero(script: str) -> None:
    order = new_order()
    events = paid_cancelled_refunded(order, script)
    stream = stream_of(events)
    with SqlLedger("sqlite:///:memory:") as ledger:
        erp = InMemoryErp()
        sink(events, ledger, erp)
        journals = ledger.journal_summaries()
        report = compare(stream, ALL_TIME, journals, {}, erp.documents(), {}, {})
    assert report.issues == [] and report.drifted == []
    cancel = stream.by_key[f"{order}:cancelled"]
    before = sum(int(step.partition(":")[2]) for step in script.split("cancel")[0].split())
    assert sum(n for _, _, _, n in cancel.reclass) == before
    # The ERP: a refund after the cancellation pays out its credit note (no credit note
    # of its own); the cancellation credits the invoice and each earlier refund's note.
    refunds = [e for e in stream.records if e.event_type == "refund_issued"]
    assert [e.pays_credit for e in refunds] == [
        e.position > cancel.position for e in refunds]
    assert len(cancel.credits) == 1 + sum(not e.pays_credit for e in refunds)
    # The refunds moved to AR are a journal of the cancellation: leaving it out is drift.
    moved = [j for j in journals if ":reclassifies:" in j.idempotency_key]
    assert len(moved) == (1 if before else 0)
    if moved:
        lr = compare_ledger(stream, [j for j in journals if j not in moved], {})
        [issue] = lr.mismatched
        assert issue.key == cancel.key and "1 journals, expected 2" in issue.detail


def test_window_limits_expected_and_actual_alike_and_parses_periods() -> None:
    order = new_order()
    events = [booked(order, LINES, at=datetime(2026, 10, 30, tzinfo=UTC)),
              invoiced(order, LINES, at=datetime(2026, 10, 31, 12, tzinfo=UTC))]  # +1 day
    stream = stream_of(events)
    inv = stream.by_key[f"{order}:invoice:1"]
    assert inv.period == "2026-11"
    nov, oct_ = parse_window("2026-11"), parse_window("2026-10")
    assert compare_ledger(stream, [], {}, oct_).checked == 0
    assert [i.key for i in compare_ledger(stream, [], {}, nov).missing] == [inv.key]
    assert parse_window("2026-W47").start == datetime(2026, 11, 16, tzinfo=UTC)
    assert parse_window("2026-12").end == datetime(2027, 1, 1, tzinfo=UTC)
    assert parse_window(since="2026-11-01", until="2026-11-08").contains(
        datetime(2026, 11, 7, 23, 59, tzinfo=UTC))
    assert not parse_window(since="2026-11-01", until="2026-11-08").contains(date(2026, 11, 8))
    for bad in ({"period": "2026-13"}, {"period": "Nov"}, {"period": "2026-11", "since": "x"},
                {"since": "2026-11-08", "until": "2026-11-01"}):
        with pytest.raises(ConfigurationError):
            parse_window(**bad)


def test_copies_on_the_topic_count_once_and_conflicting_copies_are_noted() -> None:
    order = new_order()
    inv = invoiced(order, LINES)
    other = {**inv, "total_minor": inv["total_minor"] + 1}
    stream = stream_of([booked(order, LINES), inv, inv, other])
    assert len(stream.records) == 2 and stream.copies == 2
    assert stream.conflicts == [f"{order}:invoice:1"]


# -- ERP -------------------------------------------------------------------------------
def doc(key: str, step: str, amount: int, ref: str = "1", state: str = "posted",
        currency: str = "EUR", order: str = "") -> ErpDocument:
    return ErpDocument(key, step, ref, currency, amount, state, DAY.date(),
                       order_id=order or key.split(":")[0])


def test_erp_duplicate_invoice_cancelled_sale_draft_and_partial_are_drift() -> None:
    order = new_order()
    events = [booked(order, LINES), invoiced(order, LINES), captured(order, 1, 1000)]
    stream = stream_of(events)
    b, i, c = (e.key for e in stream.records)
    total = stream.by_key[i].amount_minor or 0
    net = subtotal(LINES)
    clean = [doc(b, "sale", net, "7", "processing"), doc(i, "sale", net, "7", "processing"),
             doc(i, "invoice", total, "8"), doc(c, "payment", 1000, "9")]
    assert compare_erp(stream, clean, {}).issues == []

    duplicated = [*clean, doc(i, "invoice", total, "10")]  # the two-invoices-per-amendment bug
    (issue,) = compare_erp(stream, duplicated, {}).mismatched
    assert issue.key == i and "2 invoice documents (8, 10), expected 1" in issue.detail
    assert issue.money and issue.expected_minor == total and issue.actual_minor == 2 * total

    cancelled_behind = [doc(b, "sale", net, "7", "cancelled"), *clean[1:]]
    report = compare_erp(stream, cancelled_behind, {})
    assert [(x.key, x.money) for x in report.mismatched] == [(b, False)]
    assert "never cancelled" in report.mismatched[0].detail

    draft = [*clean[:2], doc(i, "invoice", total, "8", "draft"), clean[3]]
    (issue,) = compare_erp(stream, draft, {}).mismatched
    assert "no invoice (document 8 is still a draft)" in issue.detail

    partial = {(order, c): "payment: done invoice=8; then timeout"}
    report = compare_erp(stream, clean[:3], {}, partial)
    assert [(x.kind, x.key) for x in report.mismatched] == [("mismatch", c)]
    assert "partial write not completed" in report.mismatched[0].detail

    report = compare_erp(stream, [*clean[:3], doc("SO-X:capture:1", "payment", 5, "11")], {})
    assert [(x.kind, x.key, x.key) for x in report.missing] == [("missing", c, c)]
    assert [(x.kind, x.key, x.actual_minor) for x in report.extra] == [
        ("extra", "SO-X:capture:1", 5)]


def test_erp_sale_amount_is_checked_against_the_latest_accepted_amendment() -> None:
    order = new_order()
    lines2 = [*LINES, line("L3", "SKU-CRM-PRO", 1, 110400)]
    stream = stream_of([booked(order, LINES), amended(order, 1, lines2),
                        amended(order, 2, LINES)])
    b, a1, a2 = (e.key for e in stream.records)
    old, new = subtotal(LINES), subtotal(lines2)
    docs = [doc(k, "sale", new, "5", "quotation") for k in (b, a1)]
    # amendment 2 refused by the ERP: the sale keeps amendment 1's lines
    assert compare_erp(stream, docs, {(order, a2): "refused"}).issues == []
    report = compare_erp(stream, [*docs, doc(a2, "sale", new, "5", "quotation")], {})
    assert [(x.key, x.money) for x in report.mismatched] == [(a2, False)]
    assert fmt_minor(old, "EUR") in report.mismatched[0].detail


# -- per order: every kind of damage is drift that names the order ---------------------
@dataclasses.dataclass
class Sunk:
    """Orders sunk into a real (SQLite) ledger and the in-memory ERP, then read back."""

    stream: StreamView
    journals: list[JournalSummary]
    erp: InMemoryErp
    a: str  # EUR: booked, amended, invoiced, paid twice, partly refunded
    b: str  # JPY: the same
    c: str  # EUR: invoiced, then cancelled
    d: str  # EUR: booked only
    shared: tuple[str, str]  # two EUR orders invoicing under one idempotency key

    def judge(self, journals: list[JournalSummary] | None = None,
              erp: bool = True) -> Report:
        return compare(self.stream, parse_window(),
                       self.journals if journals is None else journals, {},
                       self.erp.documents() if erp else None, {}, {})

    def journal(self, order: str, event_type: str) -> JournalSummary:
        return next(j for j in self.journals
                    if j.order_id == order and j.event_type == event_type)


SHARED_KEY = "ERP-INV-0001"  # two sources both number their invoice 1


def sunk() -> Sunk:
    a, b, c, d, e, f = (new_order() for _ in range(6))
    shared = [booked(e, LINES), invoiced(e, LINES, key=SHARED_KEY),
              booked(f, LINES[:1]), invoiced(f, LINES[:1], key=SHARED_KEY)]
    events = [*flow(a), *flow(b, "JPY"), *cancelled_after_invoice(c), booked(d, LINES),
              *shared]
    with SqlLedger("sqlite:///:memory:") as ledger:
        erp = InMemoryErp()
        sink(events, ledger, erp)
        journals = ledger.journal_summaries()
    return Sunk(stream_of(events), journals, erp, a, b, c, d, (e, f))


def drifted(report: Report) -> list[str]:
    return [o.order_id for o in report.drifted]


def test_nothing_damaged_is_zero_drift_per_currency_and_opens_nothing() -> None:
    s = sunk()
    report = s.judge()
    assert report.issues == [] and drifted(report) == []
    assert report.drift_pct == 0.0 and report.record_drift_pct == 0.0
    money = report.money()
    assert set(money) == {"EUR", "JPY"}
    assert all(m_.diff_minor == 0 and m_.expected_minor == m_.actual_minor > 0
               for m_ in money.values())
    # Both orders sharing a key are expected, and both are in both systems.
    e, f = s.shared
    for order in (e, f):
        inv = report.orders[order].cells["invoice_issued", "EUR"]
        assert inv.expected_minor == inv.ledger_minor == inv.erp_minor
        assert inv.expected_minor > 0
    assert report.orders[e].cells["invoice_issued", "EUR"].expected_minor != \
        report.orders[f].cells["invoice_issued", "EUR"].expected_minor
    assert list(exception_records(report.drifted, now_ms=1, sla_minutes={},
                                  rules_version="x")) == []
    assert report.fact_detail()["orders_drifted"] == 0


def _lost_order(s: Sunk) -> tuple[list[JournalSummary], str]:
    return [j for j in s.journals if j.order_id != s.a], s.a


def _doubled_effect(s: Sunk) -> tuple[list[JournalSummary], str]:
    pay = s.journal(s.a, "payment_captured")
    return [*s.journals, dataclasses.replace(pay, id="J-behind-the-back")], s.a


def _wrong_amount(s: Sunk) -> tuple[list[JournalSummary], str]:
    inv = s.journal(s.a, "invoice_issued")
    return [dataclasses.replace(j, total_minor=j.total_minor + 1) if j is inv else j
            for j in s.journals], s.a


def _wrong_currency(s: Sunk) -> tuple[list[JournalSummary], str]:
    pay = s.journal(s.b, "payment_captured")
    return [dataclasses.replace(j, currency="USD") if j is pay else j for j in s.journals], s.b


def _journal_deleted(s: Sunk) -> tuple[list[JournalSummary], str]:
    credit = s.journal(s.c, "order_cancelled")
    return [j for j in s.journals if j is not credit], s.c


def _shared_key_one_order_missing(s: Sunk) -> tuple[list[JournalSummary], str]:
    # What the ledger did while journals were unique on the key alone: the second
    # order's invoice was taken for the first's, and its money never posted.
    _, f = s.shared
    return [j for j in s.journals if j.order_id != f], f


def _unexplained_posting(s: Sunk) -> tuple[list[JournalSummary], str]:
    inv = s.journal(s.a, "invoice_issued")
    ghost = dataclasses.replace(inv, id="J-ghost", order_id="SO-GHOST", event_key="GHOST:1",
                                idempotency_key="GHOST:1")
    return [*s.journals, ghost], "SO-GHOST"


@pytest.mark.parametrize("damage", [
    _lost_order, _doubled_effect, _wrong_amount, _wrong_currency, _journal_deleted,
    _shared_key_one_order_missing, _unexplained_posting,
], ids=lambda f: f.__name__.strip("_"))  # fmt: skip
def test_every_kind_of_ledger_damage_is_money_drift_naming_the_order(damage: Any) -> None:
    s = sunk()
    journals, order = damage(s)
    report = s.judge(journals)
    assert drifted(report) == [order]
    assert report.drift_pct > 0
    (drift,) = report.drifted
    assert drift.differing and drift.money and drift.systems == ["ledger"]
    assert all(c.ledger_differs and not c.erp_differs for c in drift.differing.values())
    # Gains never offset losses: the difference is the sum of |ledger - expected|.
    diff = sum(c.ledger_diff for c in drift.differing.values())
    assert sum(m_.diff_minor for m_ in report.money().values()) == diff
    assert report.record_drift_pct > 0 and drift.issues
    (key, record), = exception_records(report.drifted, now_ms=1_000, rules_version="r",
                                       sla_minutes={"P1": 15})  # fmt: skip
    assert key == order and record["order_id"] == order
    assert (record["check_id"], record["severity"], record["owner"]) == (
        CHECK_DRIFT, "P1", "finance")
    assert order in record["reason"] and record["all_findings"]
    assert record["sla_deadline_ms"] == 1_000 + 15 * 60_000
    codec = exception_codec()
    assert codec.decode(codec.encode(record))["exception_id"] == exception_id(drift)
    # A re-run over the same damage: the same id, so nothing is opened twice.
    assert [exception_id(o) for o in s.judge(journals).drifted] == [record["exception_id"]]


def test_the_drift_says_what_differs_per_event_type_and_currency() -> None:
    s = sunk()
    journals, _ = _lost_order(s)
    report = s.judge(journals)
    (drift,) = report.drifted
    inv = drift.differing["invoice_issued", "EUR"]
    assert (inv.ledger_minor, inv.erp_minor) == (0, inv.expected_minor)
    assert set(drift.differing) == {("invoice_issued", "EUR"), ("payment_captured", "EUR"),
                                    ("refund_issued", "EUR")}
    eur = report.money()["EUR"]
    lost = sum(c.expected_minor for c in drift.differing.values())
    assert eur.diff_minor == lost
    assert report.drift_pct == pytest.approx(100 * lost / eur.expected_minor)
    assert report.money()["JPY"].drift_pct == 0.0
    assert report.money(["ledger"])["EUR"].drift_pct == pytest.approx(
        100 * lost / report.money(["ledger"])["EUR"].expected_minor)
    assert report.money(["erp"])["EUR"].diff_minor == 0
    (finding, *_) = drift.findings()
    assert finding.startswith("invoice_issued EUR: expected ") and "ledger 0.00 EUR" in finding
    data = report.to_dict()
    (order,) = data["drifted_orders"]
    assert order["order_id"] == s.a and order["money"] is True
    row = next(d for d in order["differences"] if d["event_type"] == "invoice_issued")
    assert (row["currency"], row["ledger_minor"], row["ledger_diff_minor"]) == (
        "EUR", 0, inv.expected_minor)
    assert data["orders_drifted"] == 1 and data["by_currency"]["EUR"]["diff_minor"] == lost


def test_a_doubled_effect_and_a_wrong_currency_are_named_per_record_too() -> None:
    s = sunk()
    journals, _ = _doubled_effect(s)
    (mismatch,) = s.judge(journals).system("ledger").mismatched
    assert "2 journals, expected 1" in mismatch.detail and "posted 2 times" in mismatch.detail
    journals, _ = _wrong_currency(s)
    report = s.judge(journals)
    (drift,) = report.drifted
    assert set(drift.differing) == {("payment_captured", "JPY"), ("payment_captured", "USD")}
    assert report.money()["USD"].drift_pct == 100.0  # nothing in USD was expected
    assert report.drift_pct == 100.0  # the worst currency
    (mismatch,) = report.system("ledger").mismatched
    assert "currency USD ≠ JPY" in mismatch.detail


def test_an_erp_document_changed_by_hand_is_drift_of_its_order() -> None:
    s = sunk()
    inv = next(d for d in s.erp.documents()
               if d.step == m.INVOICE and d.order_id == s.a)
    stored = next(v for k, v in s.erp.store.invoices.items() if str(k) == inv.ref)
    stored["total_minor"] += 100
    report = s.judge()
    assert drifted(report) == [s.a]
    (drift,) = report.drifted
    assert drift.systems == ["erp"]
    cell = drift.differing["invoice_issued", "EUR"]
    assert (cell.ledger_minor, cell.erp_minor) == (cell.expected_minor,
                                                   cell.expected_minor + 100)
    assert report.money(["erp"])["EUR"].diff_minor == 100
    assert "ERP " in drift.findings()[0]
    # Without the ERP read, only the ledger is judged: no drift.
    assert drifted(s.judge(erp=False)) == []


def test_a_sale_cancelled_by_hand_is_drift_but_not_money() -> None:
    s = sunk()
    sale = next(v for v in s.erp.store.sales.values() if v.get("reference") == s.d)
    sale["state"] = "cancelled"
    report = s.judge()
    (drift,) = report.drifted
    assert drift.order_id == s.d and not drift.differing and not drift.money
    assert report.drift_pct == 0.0  # no money is wrong, but the order is named
    ((_, record),) = exception_records(report.drifted, now_ms=0, sla_minutes={},
                                       rules_version="r")
    assert record["severity"] == "P2" and "never cancelled" in record["reason"]


def test_the_exception_id_changes_with_the_drift_not_with_the_run() -> None:
    s = sunk()
    lost, _ = _lost_order(s)
    doubled, _ = _doubled_effect(s)
    ids = {exception_id(o) for j in (lost, doubled, lost) for o in s.judge(j).drifted}
    assert len(ids) == 2


def test_report_drift_is_over_money_of_both_systems() -> None:
    order = new_order()
    stream = stream_of(flow(order))
    report = compare(stream, parse_window(), [], {}, [], {}, {})
    assert report.checked == report.system("ledger").checked + report.system("erp").checked
    assert report.drift_pct == 100.0 and report.record_drift_pct == 100.0
    detail = report.fact_detail()
    assert detail["missing"] == report.checked and detail["drifted_orders"] == [order]
    assert detail["ledger"]["drift_pct"] == 100.0 and detail["period"] == "all"
    assert detail["ledger"]["by_currency"]["EUR"]["drift_pct"] == 100.0
    assert Report(parse_window(), stream, []).drift_pct == 0.0  # nothing compared


def test_fmt_minor_uses_the_currency_exponent() -> None:
    assert fmt_minor(123456, "EUR") == "1,234.56 EUR"
    assert fmt_minor(123456, "JPY") == "123,456 JPY"
    assert fmt_minor(-5, "USD") == "-0.05 USD"
    assert fmt_minor(None, "USD") == "—"


# -- shadow parity ---------------------------------------------------------------------
def test_parity_is_100_for_identical_ledgers_and_names_the_difference() -> None:
    order = new_order()
    events = [*flow(order), fulfilled(new_order())]
    stream = stream_of(events)
    with SqlLedger("sqlite:///:memory:") as primary, SqlLedger("sqlite:///:memory:") as shadow:
        for ledger in (primary, shadow):
            sink(events, ledger, InMemoryErp())
            for e in stream.records:
                ledger.record_effect(e.order_id, e.key, "ledger", {}, "applied", 1)
        p = footprints(primary.journal_summaries(), primary.all_effects())
        s = footprints(shadow.journal_summaries(), shadow.all_effects())
    report = parity(stream, p, s, RULES)
    assert report.parity_pct == 100.0
    assert report.compared == 6  # fulfilments have no effect anywhere: not compared
    key = f"{order}:capture:2"
    s[order, key] = Footprint((), s[order, key].effects)
    report = parity(stream, p, s, RULES)
    assert report.compared == 6 and report.equal == 5
    assert report.by_type["payment_captured"].parity_pct == 50.0
    assert [(d.key, d.shadow) for d in report.differences] == [(key, "ledger=applied")]
    assert report.parity_pct == pytest.approx(500 / 6)


def test_parity_holds_across_journal_id_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A primary written before journal ids became time-ordered (uuid5 of the key)
    # against a shadow on the current scheme: a credit note's effect key embeds the
    # reversed journal's id, so footprints must name it by the reversed key instead.
    order = new_order()
    events = cancelled_after_invoice(order)
    stream = stream_of(events)
    legacy = uuid.UUID("5b0f6f43-3c59-4d0e-9d55-2f6f0b7f3e11")
    with SqlLedger("sqlite:///:memory:") as primary, SqlLedger("sqlite:///:memory:") as shadow:
        with monkeypatch.context() as m:
            m.setattr(ledger_module, "_journal_id",
                      lambda _order, key, _at: str(uuid.uuid5(legacy, key)))
            sink(events, primary, InMemoryErp())
        sink(events, shadow, InMemoryErp())
        p = footprints(primary.journal_summaries(), primary.all_effects())
        s = footprints(shadow.journal_summaries(), shadow.all_effects())
        ids = {j.id for led in (primary, shadow) for j in led.journal_summaries()}
    assert len(ids) == 4  # two invoices and two credit notes, no id shared
    credit_note = f"{order}:cancelled:reverses:{order}:invoice:1"
    assert [k for k, *_ in p[order, f"{order}:cancelled"].journals] == [credit_note]
    report = parity(stream, p, s, RULES)
    assert report.compared == 3 and report.parity_pct == 100.0, report.differences


def test_footprints_ignore_erp_refs_but_not_statuses() -> None:
    at = datetime(2026, 11, 1, tzinfo=UTC)
    a = [SideEffect("SO-1", "K", "erp", {"sale": "1"}, "applied", 1, at, "")]
    b = [SideEffect("SO-1", "K", "erp", {"sale": "99"}, "applied", 3, at, "")]
    c = [SideEffect("SO-1", "K", "erp", {}, "refused", 1, at, "no")]
    assert footprints([], a) == footprints([], b) != footprints([], c)


@pytest.mark.parametrize("width", [80, 200])
def test_the_printed_report_never_cuts_an_amount(width: int) -> None:
    from rich.console import Console

    from revline.cli.reconcile import _print_report

    s = sunk()
    report = s.judge(journals=_wrong_amount(s)[0])
    console = Console(width=width, record=True, force_terminal=False)
    _print_report(report, 20, console)
    text = console.export_text()
    money_part = text.split("Orders that differ")[0].split("Money by currency")[1]
    assert "…" not in money_part, money_part
    for system in report.reconciled:
        for cur, m_ in report.money([system.system]).items():
            for minor in (m_.expected_minor, m_.actual_minor):
                assert fmt_minor(minor, cur).removesuffix(f" {cur}") in money_part
