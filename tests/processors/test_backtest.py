"""`revline.processors.backtest`, pure: the same inputs through two engines, compared exactly.

A hand-built week whose changes are worked out by hand, and a generated workload
against an oracle written here from the workload's own dependency tokens (not the
engine's code): a lower discount tolerance and a shorter hold timeout must move
exactly the inputs the oracle says, and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from revline import cli
from revline.core.settings import DATA_DIR
from revline.processors import InputRecord, ReferenceData, Rules, load_yaml
from revline.processors.backtest import (
    Backtest,
    BacktestReport,
    ReferenceTimeline,
    Side,
    missing_checks,
    money_total,
    reference_timeline,
    rules_differences,
)
from revline.processors.ownership import Ownership, load_ownership
from revline.schemas import EventSerializer, validate_event
from revline.tools.workload import Workload, WorkloadOptions, WorkloadRecord, generate

T0 = int(datetime(2026, 11, 16, 8, 0, tzinfo=UTC).timestamp() * 1000)
S = 1000  # one second in ms
LIVE_RAW = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
LIVE = Rules.from_mapping(LIVE_RAW)
OWNERSHIP = load_ownership(DATA_DIR / "ownership.yaml")
REFERENCE = ReferenceData.from_mapping(load_yaml(DATA_DIR / "reference.yaml"))
ENCODE = EventSerializer()


def candidate_raw(software_bps: int = 1000, hold_timeout: float = 120,
                  **changes: Any) -> dict[str, Any]:
    raw = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    raw["version"] = "2026.12.2-candidate"
    raw["discount_tolerance_bps"]["families"]["software"] = software_bps
    raw["hold_timeout_seconds"] = hold_timeout
    raw.update(changes)
    return dict(raw)


def sides(candidate: Rules, ownership: Ownership = OWNERSHIP) -> tuple[Side, Side]:
    return (Side("current", LIVE, OWNERSHIP, "live.yaml", "own.yaml"),
            Side("candidate", candidate, ownership, "new.yaml", "own.yaml"))


def run(records: Iterable[tuple[InputRecord, bool]], candidate: Rules,
        end_ms: int | None = None, ownership: Ownership = OWNERSHIP) -> BacktestReport:
    bt = Backtest(*sides(candidate, ownership), ReferenceTimeline.fixed(REFERENCE))
    for record, counted in records:
        bt.feed(record, counted=counted)
    return bt.finish(end_ms)


# -- a hand-built week -----------------------------------------------------------------------
def envelope(order: str, kind: str, key: str, seq: int, **refs: Any) -> dict[str, Any]:
    return {"event_id": f"{order}-{key}-{seq}", "event_type": kind, "schema_version": 1,
            "idempotency_key": f"{order}:{key}", "order_id": order, "sequence": seq,
            "occurred_at": "2026-11-16T08:00:00Z", "source_system": "salesforce",
            "source_record_id": f"sf-{order}-{key}", "owner": None,
            "amendment_number": refs.get("amendment_number"),
            "invoice_id": refs.get("invoice_id"), "payment_id": refs.get("payment_id")}


def line(discount_bps: int) -> dict[str, Any]:
    # SKU-CRM-PRO: software, USD list price 1,200.00; tolerance 2000 bps live.
    return {"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": 1, "unit_price_minor": 120000,
            "discount_minor": 120000 * discount_bps // 10_000, "approval_id": None,
            "campaign_id": None, "channel_id": "direct-sales"}


def booking(order: str, discount_bps: int, event_id: str = "") -> dict[str, Any]:
    ln = line(discount_bps)
    total = 120000 - ln["discount_minor"]
    env = envelope(order, "order_booked", "booked", 1)
    if event_id:
        env["event_id"] = event_id
    return {"envelope": env, "booking_kind": "DEAL_CLOSED", "customer_id": "CUST-1",
            "currency": "USD", "lines": [ln], "tax_minor": 0, "total_minor": total}


def invoice(order: str, discount_bps: int) -> dict[str, Any]:
    ln = line(discount_bps)
    total = 120000 - ln["discount_minor"]
    return {"envelope": envelope(order, "invoice_issued", "invoice:1", 2,
                                 invoice_id=f"INV-{order}"),
            "currency": "USD", "lines": [ln], "subtotal_minor": total, "tax_minor": 0,
            "total_minor": total, "due_at": "2026-12-16T08:00:00Z"}


def payment(order: str, amount: int) -> dict[str, Any]:
    return {"envelope": envelope(order, "payment_captured", "capture:1", 3,
                                 invoice_id=f"INV-{order}", payment_id=f"PAY-{order}"),
            "currency": "USD", "amount_minor": amount, "method": "card",
            "processor_ref": f"ch-{order}"}


def record(event: Mapping[str, Any], offset: int, at_s: int) -> InputRecord:
    canonical = validate_event(dict(event))
    key = canonical["envelope"]["order_id"].encode()
    return InputRecord("in", 0, offset, key, ENCODE(canonical),
                       (("revline-source-line", str(offset + 1).encode()),), T0 + at_s * S)


WEEK = [  # (event, seconds after T0); offsets follow the list
    (booking("A", 1500), 0),  # 0: 15 % off: within 20 %, not within 10 %
    (invoice("A", 1500), 10),  # 1
    (payment("A", 102000), 20),  # 2
    (booking("A", 1500, event_id="resent"), 25),  # 3: the same booking re-sent: a duplicate
    (booking("B", 500), 30),  # 4: 5 % off: within both
    (invoice("B", 500), 40),  # 5
    (invoice("C", 0), 50),  # 6: waits 300 s for its booking: within 900 s, not 120 s
    (booking("C", 0), 350),  # 7
    (payment("C", 120000), 400),  # 8
    (invoice("D", 0), 500),  # 9: waits 60 s: within both
    (booking("D", 0), 560),  # 10
    (invoice("E", 0), 600),  # 11: its booking never comes: times out with both
]
END_MS = T0 + 2000 * S  # after every deadline (E: 600 + 900 s)


def week(counted: Iterable[int] | None = None) -> list[tuple[InputRecord, bool]]:
    keep = set(range(len(WEEK))) if counted is None else set(counted)
    return [(record(event, i, at), i in keep) for i, (event, at) in enumerate(WEEK)]


def changed(report: BacktestReport) -> dict[int, tuple[str, str | None]]:
    return {c.info.offset: (c.after.kind, c.after.check_id) for c in report.changes}


def test_the_live_rules_against_themselves_change_nothing() -> None:
    report = run(week(), LIVE, END_MS)
    assert report.changed == 0 and report.changes == [] and report.money == []
    assert report.inputs == len(WEEK)
    assert report.exceptions == {"before": 1, "after": 1, "opened": 0, "closed": 0,
                                 "changed": 0}
    assert report.rule_changes[0].startswith("version unchanged")


def test_a_lower_discount_ceiling_and_a_shorter_hold_move_exactly_the_worked_out_inputs() -> None:
    candidate = Rules.from_mapping(candidate_raw(software_bps=1000, hold_timeout=120))
    report = run(week(), candidate, END_MS)
    assert changed(report) == {
        0: ("exception", "policy.discount"),  # A's booking: 1500 bps > 1000
        1: ("exception", "dependency.blocked"),  # A's invoice and payment depend on it
        2: ("exception", "dependency.blocked"),
        6: ("exception", "hold.timeout"),  # C's invoice: 300 s > 120 s
        8: ("exception", "dependency.blocked"),  # C's payment depends on that invoice
    }
    before = {c.info.offset: c.before.kind for c in report.changes}
    assert set(before.values()) == {"validated"}
    by_offset = {c.info.offset: c for c in report.changes}
    assert by_offset[0].after.severity == "P2" and by_offset[0].after.owner == "revenue_ops"
    assert "1500 bps exceeds the 1000 bps tolerance" in by_offset[0].after.reason
    assert by_offset[6].after.owner == "integrations"
    assert by_offset[6].after.decided_at_ms == T0 + (50 + 120) * S  # judged at its deadline
    assert report.orders_affected == 2

    # Money held back, exact, in major units (never float).
    assert money_total(report.money, "held_back") == {"USD": Decimal("5460.00")}
    rows = {m["event_type"]: m for m in report.money}
    assert rows["order_booked"]["held_back"] == "1020.00"
    assert rows["invoice_issued"]["held_back"] == "2220.00"  # A 1,020.00 + C 1,200.00
    assert rows["payment_captured"]["held_back"] == "2220.00"
    assert rows["invoice_issued"]["held_back_inputs"] == 2
    assert all(m["released"] == "0.00" for m in report.money)

    checks = {c["check_id"]: (c["before"], c["after"]) for c in report.checks}
    assert checks == {"policy.discount": (0, 1), "dependency.blocked": (0, 3),
                      "hold.timeout": (1, 2)}
    assert report.exceptions == {"before": 1, "after": 6, "opened": 5, "closed": 0,
                                 "changed": 0}
    workload = {(w["owner"], w["severity"]): (w["before"], w["after"], w["sla_minutes_after"])
                for w in report.workload}
    assert workload == {("integrations", "P2"): (1, 2, 120.0),
                        ("revenue_ops", "P2"): (0, 4, 120.0)}
    [day] = [d for d in report.daily if d["owner"] == "revenue_ops"]
    assert day == {"day": "2026-11-16", "owner": "revenue_ops", "before": 0, "after": 4,
                   "capacity": 0, "over_capacity": True}
    assert report.holds["timeouts_before"] == 1 and report.holds["timeouts_after"] == 2
    assert report.holds["hold_timeout_seconds_after"] == 120
    kinds = {(t["before"], t["after"]): t["inputs"] for t in report.transitions}
    assert kinds == {
        ("validated", "exception dependency.blocked P2 revenue_ops"): 3,
        ("validated", "exception policy.discount P2 revenue_ops"): 1,
        ("validated", "exception hold.timeout P2 integrations"): 1,
    }
    assert "discount_tolerance_bps.families.software 2000 → 1000" in report.rule_changes
    json.dumps(report.as_dict())  # JSON-able as it is


def test_holds_still_waiting_at_the_window_end_stay_pending() -> None:
    # At 1,000 s, E's invoice (since 600 s) is past 120 s but not 900 s: pending live,
    # timed out by the candidate.
    candidate = Rules.from_mapping(candidate_raw(software_bps=2000, hold_timeout=120))
    report = run(week(), candidate, T0 + 1000 * S)
    assert changed(report) == {6: ("exception", "hold.timeout"),
                               8: ("exception", "dependency.blocked"),
                               11: ("exception", "hold.timeout")}
    [e] = [c for c in report.changes if c.info.offset == 11]
    assert e.before.kind == "held"
    assert report.holds["pending_at_end_before"] == 1
    assert report.holds["pending_at_end_after"] == 0
    assert any("still held at the window's end" in n for n in report.notes)


def test_warm_up_inputs_build_state_but_are_not_counted() -> None:
    candidate = Rules.from_mapping(candidate_raw(software_bps=1000, hold_timeout=900))
    report = run(week(counted=range(1, len(WEEK))), candidate, END_MS)  # A's booking: warm-up
    assert changed(report) == {1: ("exception", "dependency.blocked"),
                               2: ("exception", "dependency.blocked")}
    assert report.warmup == 1 and report.inputs == len(WEEK) - 1


def test_an_ownership_change_alone_reassigns_exceptions() -> None:
    raw = yaml.safe_load((DATA_DIR / "ownership.yaml").read_text())
    raw["version"] = "2026.12.1"
    raw["rules"].insert(0, {"name": "holds-to-finance", "match": {"check_id": "hold.*"},
                            "owner": "finance", "severity": "P1"})
    report = run(week(), LIVE, END_MS, ownership=Ownership.from_mapping(raw))
    [change] = report.changes
    assert change.info.offset == 11
    assert (change.before.owner, change.before.severity) == ("integrations", "P2")
    assert (change.after.owner, change.after.severity) == ("finance", "P1")
    assert report.exceptions["changed"] == 1 and report.money == []


def test_a_candidate_must_know_every_check_the_engine_reports() -> None:
    raw = candidate_raw()
    del raw["checks"]["hold.timeout"]
    assert missing_checks(Rules.from_mapping(raw), LIVE) == ["hold.timeout"]
    assert rules_differences(LIVE, LIVE)[0].startswith("version unchanged")


def test_reference_data_as_it_stood_follows_each_load() -> None:
    def item(sku: str, price: int) -> dict[str, Any]:
        return {"sku": sku, "family": "software", "list_prices": {"USD": price}}

    records = [  # (key, value, timestamp, offset); offsets 2 and 5 compacted away
        ("product:SKU-1", item("SKU-1", 100), 1000, 0),
        ("__meta__", {"version": "v1"}, 1001, 1),
        ("product:SKU-2", item("SKU-2", 300), 3000, 3),  # rewritten: its v1 value is gone
        ("product:SKU-3", item("SKU-3", 50), 3000, 4),
        ("__meta__", {"version": "v2"}, 3001, 6),
    ]
    timeline = reference_timeline(records)
    assert timeline is not None
    assert [d.version for _, d in timeline.snapshots] == ["v1", "v2"]
    assert timeline.at(0).version == "v1" and timeline.at(3000).version == "v1"
    assert timeline.at(3001).version == "v2"
    # SKU-2 may have been there in v1 (offset 2 is gone): its oldest surviving value stands in.
    assert set(timeline.at(2000).products) == {"SKU-1", "SKU-2", "SKU-3"}
    assert timeline.notes and "compaction" in timeline.notes[0]
    assert reference_timeline([("product:SKU-1", item("SKU-1", 1), 1, 0)]) is None
    # Without gaps, an item first written after a load did not exist then.
    contiguous = reference_timeline([records[0], records[1],
                                     ("product:SKU-9", item("SKU-9", 1), 2000, 2),
                                     ("__meta__", {"version": "v2"}, 2001, 3)])
    assert contiguous is not None and set(contiguous.at(1500).products) == {"SKU-1"}


# -- a generated workload against an oracle -------------------------------------------------
Token = tuple[str, str]


@dataclass
class Held:
    rec: WorkloadRecord
    since: int


def new_discount_faults(workload: Workload, family_bps: Mapping[str, int]) -> set[int]:
    """Bookings and amendments the manifest validates whose discount the candidate
    tolerance refuses (an approval covering the line still lets it pass)."""
    approvals = {r.event["approval_id"]: r.event for r in workload.records
                 if r.event is not None and r.event_type == "discount_approved"}
    out = set()
    for r in workload.records:
        if r.event is None or r.event_type not in ("order_booked", "order_amended"):
            continue
        if r.expect.outcome != "validated":
            continue
        for ln in r.event["lines"]:
            product = REFERENCE.products[ln["sku"]]
            list_amount = ln["quantity"] * product.list_prices[r.event["currency"]]
            tolerance = LIVE.discount_sku_bps.get(ln["sku"], family_bps[product.family])
            if ln["discount_minor"] * 10_000 <= tolerance * list_amount:
                continue
            approval = approvals.get(ln["approval_id"])
            if approval is not None and approval["sku"] in (ln["sku"], "*") and \
                    ln["discount_minor"] * 10_000 <= approval["max_discount_bps"] * list_amount:
                continue
            out.add(r.seq)
    return out


def oracle(workload: Workload, timeout_s: int, discount_faults: set[int],
           end_s: int) -> dict[int, tuple[str, str | None]]:
    """Each input's final outcome when input N arrives at second N: the workload's own
    expectations (its faults, duplicates, dependencies), plus hold timeouts and the
    candidate's discount refusals, walked in delivery order."""
    out: dict[int, tuple[str, str | None]] = {}
    first: dict[tuple[str, str], WorkloadRecord] = {}
    arrived: dict[tuple[str, Token], bool] = {}
    held: dict[str, list[Held]] = {}

    def settle(rec: WorkloadRecord) -> None:
        order = rec.key
        if any(not arrived[(order, d)] for d in rec.deps):
            verdict: tuple[str, str | None] = ("exception", "dependency.blocked")
        elif rec.expect.outcome == "exception":
            verdict = ("exception", rec.expect.check_id)  # the workload's own fault
        elif rec.seq in discount_faults:
            verdict = ("exception", "policy.discount")
        else:
            verdict = ("validated", None)
        out[rec.seq] = verdict
        if rec.provides:
            arrived[(order, rec.provides)] = verdict[0] == "validated"

    def release(order: str) -> None:
        waiting = held.get(order, [])
        while True:
            ready = [h for h in waiting if all((order, d) in arrived for d in h.rec.deps)]
            if not ready:
                return
            nxt = min(ready, key=lambda h: (h.rec.event["envelope"]["sequence"], h.rec.seq))  # type: ignore[index]
            waiting.remove(nxt)
            settle(nxt.rec)

    def expire(order: str, now: int, inclusive: bool = False) -> None:
        waiting = held.get(order, [])
        while waiting:
            due = min(h.since for h in waiting) + timeout_s
            if due > now or (due == now and not inclusive):
                return
            for h in [h for h in waiting if h.since + timeout_s <= due]:
                waiting.remove(h)
                out[h.rec.seq] = ("exception", "hold.timeout")
                if h.rec.provides and (h.rec.key, h.rec.provides) not in arrived:
                    arrived[(h.rec.key, h.rec.provides)] = False
            release(order)

    for rec in workload.records:
        if rec.event is None:
            out[rec.seq] = ("dead_letter", None)
            continue
        order = rec.key
        expire(order, rec.seq)
        body = (order, rec.event["envelope"]["idempotency_key"])
        if body in first:
            same = rec.expect.outcome == "duplicate"
            out[rec.seq] = ("duplicate", None) if same else ("exception", "dedup.conflict")
            continue
        first[body] = rec
        if any((order, d) not in arrived for d in rec.deps):
            held.setdefault(order, []).append(Held(rec, rec.seq))
            continue
        settle(rec)
        release(order)
    for order in list(held):
        expire(order, end_s, inclusive=True)
    for waiting in held.values():
        for h in waiting:
            out[h.rec.seq] = ("held", None)
    return out


def workload_records(workload: Workload) -> list[tuple[InputRecord, bool]]:
    out = []
    for r in workload.records:
        value = ENCODE(r.event) if r.event is not None else r.raw
        assert value is not None
        out.append((InputRecord("in", 0, r.seq, r.key.encode(), value,
                                (("revline-source-line", str(r.seq).encode()),),
                                T0 + r.seq * S), True))
    return out


@pytest.mark.parametrize("seed", [11, 12])
def test_a_generated_workload_moves_exactly_what_the_oracle_says(seed: int) -> None:
    workload = generate(WorkloadOptions(orders=600, seed=seed, orphans=3, poison=0.005,
                                        out_of_order=0.3))
    end_s = len(workload.records)
    families = {**LIVE.discount_family_bps, "software": 1200, "services": 1000}
    timeout_s = 25
    live = oracle(workload, 900, set(), end_s)
    # The oracle agrees with the manifest wherever the manifest has an answer.
    for r in workload.records:
        if live[r.seq] != ("held", None):
            assert live[r.seq] == (r.expect.outcome, r.expect.check_id), r.seq
    faults = new_discount_faults(workload, families)
    new = oracle(workload, timeout_s, faults, end_s)
    expected = {seq: new[seq] for seq in new if new[seq] != live[seq]}

    raw = candidate_raw(hold_timeout=timeout_s)
    raw["discount_tolerance_bps"]["families"] = families
    report = run(workload_records(workload), Rules.from_mapping(raw), T0 + end_s * S)
    got = {int(c.info.source_line or 0): (c.after.kind, c.after.check_id)
           for c in report.changes}
    assert got == expected
    # Both kinds of change are in play, and their consequences.
    kinds = {v[1] for v in expected.values()}
    assert {"policy.discount", "hold.timeout", "dependency.blocked"} <= kinds
    assert len(faults) >= 20
    before = {int(c.info.source_line or 0): (c.before.kind, c.before.check_id)
              for c in report.changes}
    assert before == {seq: live[seq] for seq in expected}

    # The live rules against themselves: nothing changes.
    same = run(workload_records(workload), LIVE, T0 + end_s * S)
    assert same.changed == 0


def _cheaper_reference() -> ReferenceData:
    """The reference data with every list price 3% lower: other tolerances pass."""
    raw = dict(load_yaml(DATA_DIR / "reference.yaml"))
    raw["version"] = "cheaper"
    raw["products"] = [{**p, "list_prices": {c: v * 97 // 100
                                             for c, v in p["list_prices"].items()}}
                       for p in raw["products"]]
    return ReferenceData.from_mapping(raw)


def _candidates() -> dict[str, tuple[Rules, Ownership, bool]]:
    """name -> (candidate rules, ownership, whether orders may share one run)."""
    families = {"software": 1200, "services": 1000, "hardware": 500, "support": 500}
    own = yaml.safe_load((DATA_DIR / "ownership.yaml").read_text())
    own["rules"].insert(0, {"name": "big-to-finance", "match": {"check_id": "policy.*"},
                            "owner": "finance", "severity": "P1"})
    severity = candidate_raw(hold_timeout=900)
    severity["checks"]["attribution.campaign"] = {"severity": "P2", "owner": "revenue_ops"}
    sla = candidate_raw(hold_timeout=900)
    sla["sla_minutes"] = {k: v * 2 for k, v in sla["sla_minutes"].items()}
    out = {
        "same file": (LIVE, OWNERSHIP, True),
        "discount": (Rules.from_mapping({**candidate_raw(hold_timeout=900),
                                         "discount_tolerance_bps": {"families": families,
                                                                    "skus": {}}}),
                     OWNERSHIP, True),
        "discount and hold": (Rules.from_mapping({**candidate_raw(hold_timeout=25),
                                                  "discount_tolerance_bps": {
                                                      "families": families, "skus": {}}}),
                              OWNERSHIP, True),
        "price": (Rules.from_mapping(candidate_raw(hold_timeout=900, software_bps=2000,
                                                   price_tolerance_bps=400)), OWNERSHIP, True),
        "sla": (Rules.from_mapping(sla), OWNERSHIP, True),
        "ownership": (LIVE, Ownership.from_mapping(own), True),
        "ownership and discount": (Rules.from_mapping(candidate_raw(hold_timeout=900)),
                                   Ownership.from_mapping(own), True),
        "severity": (Rules.from_mapping(severity), OWNERSHIP, False),
    }
    return out


@pytest.mark.parametrize("name", list(_candidates()))
def test_orders_judged_once_for_both_sides_report_exactly_what_two_runs_do(name: str) -> None:
    """Sharing an order's run while the two sides provably judge it alike changes nothing
    in the report: the same rules changes, replayed with every order judged twice and with
    sharing, over a reference timeline whose prices move mid-window, give equal reports."""
    candidate, ownership, shareable = _candidates()[name]
    workload = generate(WorkloadOptions(orders=400, seed=31, orphans=3, poison=0.005,
                                        out_of_order=0.3, off_policy=0.05))
    records = workload_records(workload)
    middle = records[len(records) // 2][0].timestamp_ms
    timeline = ReferenceTimeline(((0, REFERENCE), (middle, _cheaper_reference())))
    end = T0 + (len(records) + 1) * S
    reports = []
    for share in (False, True):
        bt = Backtest(*sides(candidate, ownership), timeline, share=share)
        for rec, counted in records:
            bt.feed(rec, counted=counted)
        reports.append((bt.finish(end).as_dict(), bt.shared_inputs, bt.forked_orders,
                        bt.rejoined_orders))
    (twice, none_shared, _, _), (once, shared, forked, rejoined) = reports
    assert once == twice
    assert none_shared == 0
    if shareable:  # a tighter price tolerance splits most orders: the new prices are off
        assert shared > (0 if name == "price" else len(records) // 3), shared
    else:
        assert shared == 0
    if name in ("discount", "discount and hold", "price"):
        assert twice["changed"] > 0 and forked > 0
    if name == "discount":  # split orders whose sides end up alike are judged once again
        assert rejoined > 0


def test_replay_speed_is_the_engines() -> None:
    """Each input is decoded once and judged by two engines: a backtest costs about twice
    what the worker's engine does on the same inputs (measured against the engine alone in
    the same process, best of three, so a busy machine mostly cancels out)."""
    import time

    from revline.processors import Engine, OrderState

    workload = generate(WorkloadOptions(orders=400, seed=5))
    records = workload_records(workload)
    engine = Engine(rules=LIVE, reference=lambda: REFERENCE)

    def alone() -> float:
        started = time.perf_counter()
        states: dict[bytes, OrderState] = {}
        for rec, _ in records:
            event, dead = engine.decode(rec, rec.timestamp_ms)
            if dead is None:
                assert event is not None and rec.key is not None
                engine.process(states.setdefault(rec.key, OrderState()), rec, event,
                               rec.timestamp_ms)
        return time.perf_counter() - started

    def both() -> float:
        started = time.perf_counter()
        run(records, LIVE)
        return time.perf_counter() - started

    engine_s = min(alone() for _ in range(3))
    backtest_s = min(both() for _ in range(3))
    assert backtest_s < engine_s * 4, (backtest_s, engine_s)


# -- the CLI on a JSON-lines export (no broker) ----------------------------------------------
def test_cli_backtest_on_an_export_exits_1_on_changes_and_writes_json_and_html(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "width", 200)
    export = tmp_path / "events.jsonl"
    lines = []
    for i, (event, at) in enumerate(WEEK):
        lines.append(json.dumps({**event, "__timestamp_ms__": T0 + at * S}))
        if i == 4:
            lines.append("{not json")  # refused by `revline publish` too: skipped, noted
    export.write_text("\n".join(lines) + "\n")
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(candidate_raw(software_bps=1000, hold_timeout=120)))
    out, page = tmp_path / "report.json", tmp_path / "report.html"
    code = cli.main(["rules", "backtest", "--rules", str(new), "--input", str(export),
                     "--to", "2026-11-16T08:33:20Z", "--json", str(out), "--html", str(page)])
    printed = capsys.readouterr()
    assert code == 1, printed.err
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "changed" and doc["exit_code"] == 1 and doc["changed"] == 5
    assert sorted(int(c["source_line"]) for c in doc["changes"]) == [1, 2, 3, 8, 10]
    assert doc["money"][0]["currency"] == "USD"
    assert {m["event_type"]: m["held_back"] for m in doc["money"]} == {
        "order_booked": "1020.00", "invoice_issued": "2220.00", "payment_captured": "2220.00"}
    assert any("not replayed" in n for n in doc["notes"])
    assert "CHANGED: 5 decision(s) on 2 order(s)" in printed.out
    assert "policy.discount" in printed.out and "1,020.00" in printed.out
    html = page.read_text()
    assert 'id="transitions"' in html and 'id="money"' in html and "2220.00" in html

    # Within --max-changes: exit 0, same report.
    assert cli.main(["rules", "backtest", "--rules", str(new), "--input", str(export),
                     "--max-changes", "5"]) == 0
    # The live rules file itself: nothing changes, exit 0.
    assert cli.main(["rules", "backtest", "--rules", str(DATA_DIR / "rules.yaml"),
                     "--input", str(export), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["changed"] == 0
    # An ownership change alone: the live rules, E's hold.timeout owned by finance.
    owners = yaml.safe_load((DATA_DIR / "ownership.yaml").read_text())
    owners["rules"].insert(0, {"name": "holds", "match": {"check_id": "hold.*"},
                               "owner": "finance"})
    ownership = tmp_path / "ownership.yaml"
    ownership.write_text(yaml.safe_dump(owners))
    assert cli.main(["rules", "backtest", "--ownership", str(ownership), "--input",
                     str(export), "--to", "2026-11-16T08:33:20Z", "--json", str(out)]) == 1
    [change] = json.loads(out.read_text())["changes"]
    assert (change["before"]["owner"], change["after"]["owner"]) == ("integrations", "finance")
    capsys.readouterr()


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "events.jsonl"
    export.write_text("")
    assert cli.main(["rules", "backtest", "--rules", str(tmp_path / "nope.yaml"),
                     "--input", str(export)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope.yaml does not exist" in err
    assert len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.yaml"
    raw = candidate_raw()
    del raw["checks"]["policy.discount"]
    broken.write_text(yaml.safe_dump(raw))
    assert cli.main(["rules", "backtest", "--rules", str(broken), "--input", str(export)]) == 2
    assert "no severity/owner for policy.discount" in capsys.readouterr().err
    assert cli.main(["rules", "backtest", "--rules", str(broken)]) == 2  # no window
    assert "give the window" in capsys.readouterr().err
    assert cli.main(["rules", "backtest", "--rules", str(broken), "--input", str(export),
                     "--warmup", "soon"]) == 2
    assert "--warmup" in capsys.readouterr().err


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(candidate_raw()))
    assert cli.main(["rules", "validate", str(good)]) == 0
    assert "valid (rules 2026.12.1 → 2026.12.2-candidate" in capsys.readouterr().out
    assert cli.main(["rules", "validate", str(DATA_DIR / "rules.yaml")]) == 1
    assert "is the live one's" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    raw = candidate_raw()
    raw["checks"]["policy.discount"] = {"severity": "P9", "owner": "finance"}
    bad.write_text(yaml.safe_dump(raw))
    assert cli.main(["rules", "validate", str(bad)]) == 2
    assert "severity must be one of" in capsys.readouterr().err
