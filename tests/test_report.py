"""`revline report`: the computations with plain values, the HTML page, and the real thing
on Kafka rendered in headless Chromium."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from html import unescape
from pathlib import Path
from typing import Any

import orjson
import pytest

from revline.operations.report import (
    AGE_BUCKETS,
    ExceptionItem,
    OperationsReport,
    OverrideItem,
    ReportInputs,
    ReportTopics,
    build_report,
    collect,
    exception_from_state,
    final_outcomes,
    fmt_duration,
    fmt_money,
    fmt_pct,
    parse_since,
    percentile,
    qa_failure_rates,
    reconcile_from_fact,
    sla_compliance,
    summarise_duplicates,
    summarise_flow,
    summarise_latency,
    summarise_open,
    summarise_overrides,
)
from revline.operations.report_html import render_html

NOW = int(datetime(2026, 11, 23, 8, 0, tzinfo=UTC).timestamp() * 1000)  # a Monday morning
WEEK = 7 * 86_400_000
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
CHROMIUM = "/usr/bin/chromium"


# -- plain-value builders ---------------------------------------------------------------
_offsets: Iterator[int] = iter(range(10**9))


def outcome(kind: str = "validated", **fields: Any) -> dict[str, Any]:
    """A decoded Outcome record; every field of the Avro schema is present."""
    o: dict[str, Any] = {
        "input_topic": "in", "input_partition": 0, "input_offset": next(_offsets),
        "kind": kind, "final": True, "held": False, "released_by": None, "waiting_for": [],
        "check_id": None, "severity": None, "owner": None, "reason": "", "warnings": [],
        "exception_id": None, "stage": None, "event_type": "order_booked",
        "event_id": str(uuid.uuid4()), "idempotency_key": f"SO-{uuid.uuid4().hex[:6]}:booked",
        "order_id": "SO-1", "source_line": None, "occurred_at_ms": NOW - HOUR - 250,
        "decided_at_ms": NOW - HOUR, "rules_version": "2026.11.1",
    }
    o.update(fields)
    return o


def exc(status: str = "open", *, severity: str = "P1", owner: str = "finance",
        opened_ago: int = HOUR, sla: int = 15 * MIN, **fields: Any) -> ExceptionItem:
    values: dict[str, Any] = {
        "exception_id": uuid.uuid4().hex, "check_id": "reconciliation.invoice_total",
        "severity": severity, "owner": owner, "status": status,
        "opened_at_ms": NOW - opened_ago, "sla_deadline_ms": NOW - opened_ago + sla,
    }
    values.update(fields)
    return ExceptionItem(**values)


def override(oid: str = "OVR-1", *, reason: str = "APPROVED_OFFLINE", made_ago: int = DAY,
             expires_in: int = 7 * DAY) -> OverrideItem:
    return OverrideItem(override_id=oid, order_id="SO-1", target_idempotency_key="SO-1:booked",
                        check_id="policy.discount", reason_code=reason, actor="ana@example.com",
                        occurred_at_ms=NOW - made_ago, expires_at_ms=NOW + expires_in)


# -- computations -----------------------------------------------------------------------
def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7], 99) == 7
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50, 95,
                                                                                          100)
    assert percentile([30, 10, 20], 50) == 20


def test_final_outcomes_one_per_input_coordinates_within_the_period() -> None:
    first = outcome(input_offset=1)
    replayed = dict(first)  # a replay repeats the record, never changes it
    interim = outcome("held", final=False, input_offset=2)
    released = outcome(input_offset=2, held=True)
    old = outcome(input_offset=3, decided_at_ms=NOW - 2 * WEEK)
    finals = final_outcomes([first, replayed, interim, released, old], since_ms=NOW - WEEK)
    assert finals == [first, released]


def test_flow_summary_counts_kinds_and_delivery_success() -> None:
    finals = ([outcome() for _ in range(990)] + [outcome("exception") for _ in range(5)]
              + [outcome("duplicate") for _ in range(3)]
              + [outcome("dead_letter", stage="decode", event_type=None),
                 outcome("dead_letter", stage="schema", event_type=None)])
    flow = summarise_flow(finals)
    assert (flow.inputs, flow.validated, flow.exceptions, flow.duplicates, flow.dead_letters) == (
        1000, 990, 5, 3, 2)
    assert flow.delivery_success_pct == pytest.approx(99.8)
    assert dict(flow.dead_letters_by_stage) == {"decode": 1, "schema": 1}
    assert summarise_flow([]).delivery_success_pct is None


def test_open_exceptions_by_owner_and_age() -> None:
    items = [
        exc(owner="finance", opened_ago=5 * MIN, amount_minor=123_456, currency="EUR"),
        exc("acknowledged", owner="finance", opened_ago=3 * HOUR,
            acknowledged_at_ms=NOW - 2 * HOUR),
        exc(owner="finance", severity="P2", opened_ago=3 * DAY, sla=2 * HOUR, escalated=True,
            amount_minor=1000, currency="JPY"),
        exc(owner="integrations", severity="P3", opened_ago=10 * DAY, sla=48 * HOUR),
        exc("resolved", owner="revenue_ops", opened_ago=DAY, closed_at_ms=NOW - DAY + MIN),
        exc("waived", owner="revenue_ops"), exc("expired", owner="revenue_ops"),
    ]
    oe = summarise_open(items, NOW)
    assert oe.total == 4
    rows = {r.owner: r for r in oe.by_owner}
    assert rows["finance"].by_age == (1, 0, 1, 1, 0)
    assert rows["finance"].by_severity == (2, 1, 0)
    # past SLA: the P1 opened 5 min ago is not; the acknowledged one is answered.
    assert rows["finance"].overdue == 1
    assert rows["integrations"].by_age == (0, 0, 0, 0, 1)
    assert rows["revenue_ops"].total == 0
    assert rows["integrations"].oldest_age_ms == oe.oldest_age_ms == 10 * DAY
    assert (oe.overdue, oe.escalated) == (2, 1)
    assert dict(oe.amounts) == {"EUR": 123_456, "JPY": 1000}
    assert [e.owner for e in oe.oldest][:2] == ["integrations", "finance"]
    assert len(AGE_BUCKETS) == len(rows["finance"].by_age)


def test_sla_compliance_counts_first_response_against_the_deadline() -> None:
    since = NOW - WEEK
    items = [
        # P1, 15 min: acknowledged after 5 min (met), closed after 20 min without an ack
        # (breached), still open after 1 h (breached), escalated though answered (breached),
        # opened 5 min ago (pending), opened before the period (not counted).
        exc("acknowledged", opened_ago=2 * DAY, acknowledged_at_ms=NOW - 2 * DAY + 5 * MIN),
        exc("resolved", opened_ago=DAY, closed_at_ms=NOW - DAY + 20 * MIN),
        exc(opened_ago=HOUR),
        exc("resolved", opened_ago=3 * DAY, escalated=True, closed_at_ms=NOW - 3 * DAY + 10 * MIN),
        exc(opened_ago=5 * MIN),
        exc("resolved", opened_ago=2 * WEEK, closed_at_ms=NOW - 2 * WEEK + MIN),
        # P2, 2 h: resolved in 1 h (met).
        exc("resolved", severity="P2", sla=2 * HOUR, opened_ago=DAY,
            closed_at_ms=NOW - DAY + HOUR),
    ]
    rows = {r.severity: r for r in sla_compliance(items, NOW, since)}
    p1 = rows["P1"]
    assert (p1.opened, p1.met, p1.breached, p1.pending) == (5, 1, 3, 1)
    assert p1.compliance_pct == pytest.approx(25.0)
    assert p1.target_ms == 15 * MIN
    assert (p1.p50_close_ms, p1.p95_close_ms) == (10 * MIN, 20 * MIN)
    assert rows["P2"].compliance_pct == 100.0 and rows["P2"].target_ms == 2 * HOUR
    assert rows["P3"].opened == 0 and rows["P3"].compliance_pct is None
    assert rows["P3"].target_ms == 48 * HOUR  # the default when none was opened


def test_qa_failure_rates_by_check_with_warnings() -> None:
    finals = ([outcome() for _ in range(95)]
              + [outcome(warnings=["attribution.channel"]) for _ in range(2)]
              + [outcome("exception", check_id="policy.discount", severity="P2",
                         owner="revenue_ops") for _ in range(2)]
              + [outcome("exception", check_id="completeness.sku", severity="P1",
                         owner="revenue_ops")]
              + [outcome("duplicate"), outcome("dead_letter")])  # not judged by QA
    rows, judged = qa_failure_rates(finals, {"attribution.channel": ("P3", "revenue_ops")})
    assert judged == 100
    assert [(r.check_id, r.failures, r.warnings) for r in rows] == [
        ("policy.discount", 2, 0), ("completeness.sku", 1, 0), ("attribution.channel", 0, 2)]
    assert rows[0].rate_pct == pytest.approx(2.0)
    assert (rows[2].severity, rows[2].owner) == ("P3", "revenue_ops")


def test_overrides_flags_expired_reasonless_and_refused() -> None:
    overrides = [
        override("OVR-1"),
        override("OVR-1"),  # the same override read twice counts once
        override("OVR-2", reason="N/A", made_ago=2 * DAY),
        override("OVR-3", made_ago=3 * DAY, expires_in=-DAY),  # expired this week
        override("OVR-4", made_ago=30 * DAY, expires_in=30 * DAY),  # old but still in force
        override("OVR-5", made_ago=30 * DAY, expires_in=-20 * DAY),  # old and expired: not listed
    ]
    finals = [outcome("dead_letter", event_type=None, stage="structure",
                      reason="manual_override requires reason_code")]
    exceptions = [exc(check_id="override.expired"), exc(check_id="override.expired"),
                  exc(check_id="policy.price")]
    ov = summarise_overrides(overrides, finals, exceptions, NOW, NOW - WEEK)
    assert [o.override_id for o in ov.items] == ["OVR-1", "OVR-2", "OVR-3", "OVR-4"]
    assert (ov.expired, ov.reasonless, ov.refused) == (1, 1, 1)
    assert dict(ov.by_reason) == {"APPROVED_OFFLINE": 3, "N/A": 1}
    assert ov.exceptions_by_check == (("override.expired", 2),)


def test_duplicates_prevented() -> None:
    finals = ([outcome("duplicate", event_type="invoice_issued") for _ in range(3)]
              + [outcome("duplicate", event_type="payment_captured")]
              + [outcome(event_type="invoice_issued", idempotency_key=f"SO-{i}:invoice:1")
                 for i in range(500)]
              + [outcome("exception", check_id="dedup.conflict")])
    d = summarise_duplicates(finals)
    assert (d.prevented, d.conflicts, d.invoices, d.invoice_duplicates) == (4, 1, 500, 3)
    assert d.by_event_type[0] == ("invoice_issued", 3)


def test_latency_percentiles_histogram_and_target() -> None:
    finals = [outcome(occurred_at_ms=NOW - ms, decided_at_ms=NOW)
              for ms in [20] * 90 + [400] * 5 + [5_000] * 3 + [2 * DAY, 3 * DAY]]
    finals += [outcome("exception", occurred_at_ms=NOW - 50, decided_at_ms=NOW),
               outcome("dead_letter", occurred_at_ms=None)]
    lat = summarise_latency(finals)
    assert lat.count == 101
    assert (lat.p50_ms, lat.p95_ms, lat.p99_ms, lat.max_ms) == (20, 400, 2 * DAY, 3 * DAY)
    assert dict(lat.histogram)["< 0.1 s"] == 91 and dict(lat.histogram)["> 24 h"] == 2
    assert lat.within_target_pct == pytest.approx(98.0)
    assert [k for k, *_ in lat.by_kind] == ["validated", "exception"]


def test_parse_since() -> None:
    assert parse_since("7d", NOW) == NOW - WEEK
    assert parse_since("36h", NOW) == NOW - 36 * HOUR
    assert parse_since("2w", NOW) == NOW - 2 * WEEK
    assert parse_since("90m", NOW) == NOW - 90 * MIN
    assert parse_since("2026-11-16", NOW) == NOW - WEEK - 8 * HOUR
    assert parse_since("2026-11-16T08:00Z", NOW) == NOW - WEEK
    from revline.core.errors import RevlineError

    with pytest.raises(RevlineError, match="--since 'last week'"):
        parse_since("last week", NOW)


def test_parsing_state_records_and_reconcile_facts() -> None:
    item = exception_from_state({
        "exception_id": "E1", "check_id": "policy.price", "severity": "P2",
        "owner": "revenue_ops", "backup_owner": "finance", "status": "acknowledged",
        "opened_at_ms": 1, "sla_deadline_ms": 2, "escalated": False, "closed_at_ms": None,
        "reason_code": None, "order_id": "SO-1", "amount_minor": "1500", "currency": "EUR",
        "something_new": True,
    })
    assert item.is_open and item.amount_minor == 1500 and item.backup_owner == "finance"
    from revline.core.errors import RevlineError

    with pytest.raises(RevlineError):
        exception_from_state({"exception_id": "E2"})
    run = reconcile_from_fact(5, "ops@example.com", {
        "period": {"from": "2026-11-16", "to": "2026-11-23"}, "drift_pct": 0.25,
        "checked": 1000, "missing": ["SO-1:invoice:1"], "extra": 0, "mismatched": [1, 2]})
    assert (run.period, run.missing, run.mismatched, run.within_target) == (
        "2026-11-16 → 2026-11-23", 1, 2, False)


def test_formatting() -> None:
    assert [fmt_duration(v) for v in (None, 850, 4_200, 12 * MIN, 3 * HOUR + 20 * MIN, 2 * DAY
                                      + 4 * HOUR)] == ["—", "850 ms", "4.2 s", "12 min",
                                                       "3 h 20 min", "2 d 4 h"]
    assert fmt_pct(99.96) == "99.9 %"  # a shortfall never rounds up to 100 %
    assert fmt_pct(100.0) == "100.0 %" and fmt_pct(None) == "—"
    assert fmt_money(123_456, "EUR") == "1,234.56 EUR"
    assert fmt_money(1000, "JPY") == "1,000 JPY"
    assert fmt_money(1500, "KWD") == "1.500 KWD"


# -- a realistic week, as plain values (also published to Kafka below) -----------------
def sample_week(seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    outcomes: list[dict[str, Any]] = []
    types = ["order_booked", "discount_approved", "order_amended", "fulfilment_confirmed",
             "invoice_issued", "payment_captured", "refund_issued"]
    for i in range(1200):
        t = NOW - rng.randint(0, WEEK - HOUR)
        delay = int(rng.lognormvariate(3.5, 1.2)) if i % 200 else rng.randint(2, 30) * HOUR
        event_type = types[i % len(types)]
        o = outcome(input_partition=i % 3, input_offset=i, event_type=event_type,
                    idempotency_key=f"SO-{i // 7}:{event_type}", order_id=f"SO-{i // 7}",
                    occurred_at_ms=t - delay, decided_at_ms=t, held=i % 37 == 0)
        if i % 97 == 5:
            o.update(kind="duplicate")
        elif i % 41 == 3:
            check = rng.choice(["policy.discount", "policy.price", "completeness.sku",
                                "reconciliation.invoice_total", "dedup.conflict"])
            sev, own = {"policy.discount": ("P2", "revenue_ops"),
                        "policy.price": ("P2", "revenue_ops"),
                        "completeness.sku": ("P1", "revenue_ops"),
                        "reconciliation.invoice_total": ("P1", "finance"),
                        "dedup.conflict": ("P2", "integrations")}[check]
            o.update(kind="exception", check_id=check, severity=sev, owner=own,
                     exception_id=f"x{i:04d}")
        elif i % 300 == 17:
            o.update(kind="dead_letter", stage="decode", event_type=None, occurred_at_ms=None,
                     reason="not a framed Avro record")
        elif i % 53 == 0:
            o.update(warnings=["attribution.channel"])
        outcomes.append(o)
    outcomes.append(outcome("dead_letter", input_offset=5000, stage="structure",
                            event_type=None, occurred_at_ms=None, decided_at_ms=NOW - DAY,
                            reason="manual_override requires reason_code"))
    outcomes.append(outcome("held", final=False, input_offset=5001, decided_at_ms=NOW - DAY))

    state: list[dict[str, Any]] = []
    for n, (status, sev, owner, opened_ago, extra) in enumerate([
        ("open", "P1", "finance", 3 * DAY + 5 * HOUR, {"escalated": True}),
        ("open", "P1", "finance", 40 * MIN, {}),
        ("acknowledged", "P2", "revenue_ops", 26 * HOUR, {"acknowledged_at_ms": NOW - 25 * HOUR}),
        ("open", "P2", "revenue_ops", 90 * MIN, {}),
        ("open", "P2", "integrations", 9 * DAY, {"escalated": True}),
        ("open", "P3", "revenue_ops", 5 * HOUR, {}),
        ("open", "P1", "finance", 7 * MIN, {}),
        ("resolved", "P1", "finance", 2 * DAY, {"closed_at_ms": NOW - 2 * DAY + 12 * MIN}),
        ("resolved", "P1", "finance", 4 * DAY, {"closed_at_ms": NOW - 4 * DAY + 50 * MIN,
                                                "escalated": True}),
        ("waived", "P2", "revenue_ops", 3 * DAY, {"closed_at_ms": NOW - 3 * DAY + HOUR,
                                                  "reason_code": "KNOWN_ISSUE"}),
        ("resolved", "P2", "integrations", 5 * DAY, {"closed_at_ms": NOW - 5 * DAY + 30 * MIN}),
        ("open", "P2", "finance", 2 * DAY, {"check_id": "override.expired"}),
    ]):
        sla = {"P1": 15 * MIN, "P2": 2 * HOUR, "P3": 48 * HOUR}[sev]
        record = {
            "exception_id": f"exc-{n:03d}", "check_id": "reconciliation.invoice_total",
            "severity": sev, "owner": owner, "backup_owner": "revenue_ops", "status": status,
            "opened_at_ms": NOW - opened_ago, "sla_deadline_ms": NOW - opened_ago + sla,
            "escalated": False, "closed_at_ms": None, "reason_code": None,
            "order_id": f"SO-{100 + n}", "amount_minor": 125_000 * (n + 1), "currency": "EUR",
        }
        record.update(extra)
        state.append(record)
    overrides = [
        ("OVR-101", "APPROVED_OFFLINE", DAY, 6 * DAY),
        ("OVR-102", "CONTRACT_TERMS", 2 * DAY, 12 * HOUR),
        ("OVR-103", "N/A", 3 * DAY, 4 * DAY),
        ("OVR-104", "APPROVED_OFFLINE", 5 * DAY, -DAY),
    ]
    reconcile = {"fact_id": "reconcile:2026-W47", "kind": "reconcile", "actor": "ops@example.com",
                 "order_id": None, "at_ms": NOW - 2 * HOUR,
                 "detail": {"period": {"from": "2026-11-16", "to": "2026-11-23"},
                            "drift_pct": 0.042, "checked": 4812, "missing": 1, "extra": 0,
                            "mismatched": 1}}
    return {"outcomes": outcomes, "state": state, "overrides": overrides,
            "reconcile": reconcile}


def sample_report() -> OperationsReport:
    week = sample_week()
    inputs = ReportInputs(
        outcomes=week["outcomes"],
        exceptions=[exception_from_state(s) for s in week["state"]],
        overrides=[OverrideItem(oid, "SO-7", "SO-7:booked", "policy.discount", reason,
                                "ana@example.com", NOW - ago, NOW + expires)
                   for oid, reason, ago, expires in week["overrides"]],
        reconcile=reconcile_from_fact(week["reconcile"]["at_ms"], week["reconcile"]["actor"],
                                      week["reconcile"]["detail"]),
    )
    return build_report(inputs, now_ms=NOW, since_ms=NOW - WEEK)


def test_build_report_on_a_sample_week() -> None:
    r = sample_report()
    assert r.flow.inputs == 1201  # the interim "held" record is not an outcome
    assert r.open_exceptions.total == 8
    assert r.overrides.refused == 1 and r.overrides.reasonless == 1 and r.overrides.expired == 1
    assert r.reconciliation is not None and r.reconciliation.within_target


def test_html_is_self_contained_and_escapes_what_people_typed() -> None:
    inputs = ReportInputs(overrides=[override(reason="<script>alert(1)</script>")],
                          notes=["a <b>note</b>"])
    page = render_html(build_report(inputs, now_ms=NOW, since_ms=NOW - WEEK))
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "@import" not in page and "url(" not in page
    assert "not run" in page  # no reconciliation yet
    full = render_html(sample_report())
    assert full.count("<svg") >= 6
    assert not re.search(r"https?://", full)


# -- on Kafka, rendered in Chromium -------------------------------------------------------
def _produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all"})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _override_event(oid: str, reason: str, made_ms: int, expires_ms: int) -> dict[str, Any]:
    from revline.schemas import validate_event

    return validate_event({
        "envelope": {"event_type": "manual_override", "idempotency_key": f"SO-7:override:{oid}",
                     "order_id": "SO-7", "sequence": 9, "occurred_at": made_ms,
                     "source_system": "revline-cli", "source_record_id": oid},
        "override_id": oid, "target_idempotency_key": "SO-7:booked",
        "check_id": "policy.discount", "reason_code": reason, "actor": "ana@example.com",
        "expires_at": expires_ms, "note": None,
    })


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is missing: apt-get install -y --no-install-recommends chromium "
                    "(.ci/run does)")
    profile = tmp / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.kafka
def test_report_from_kafka_renders_in_chromium(kafka_bootstrap: str, new_topic: Any,
                                               tmp_path: Path) -> None:
    from revline.schemas import EventSerializer, outcome_codec

    week = sample_week()
    # The report reads "now" from the clock: move the sample week to now.
    shift = int(time.time() * 1000) - NOW
    topics = {k: new_topic(f"report-{k}") for k in ("outcomes", "state", "exceptions",
                                                    "validated", "facts")}
    codec = outcome_codec()
    outcomes = []
    for o in week["outcomes"]:
        o = dict(o, decided_at_ms=o["decided_at_ms"] + shift)
        if o["occurred_at_ms"] is not None:
            o["occurred_at_ms"] += shift
        outcomes.append((o["order_id"].encode(), codec.encode(o)))
    _produce(kafka_bootstrap, topics["outcomes"], outcomes + outcomes[:50])  # a replay repeats
    state = []
    for s in week["state"]:
        s = dict(s)
        for field in ("opened_at_ms", "sla_deadline_ms", "closed_at_ms", "acknowledged_at_ms"):
            if s.get(field) is not None:
                s[field] += shift
        state.append((s["exception_id"].encode(), orjson.dumps(s)))
    # An earlier version of one state, then a deleted exception (tombstone): last value wins.
    early = dict(orjson.loads(state[0][1]), status="resolved")
    _produce(kafka_bootstrap, topics["state"],
             [(state[0][0], orjson.dumps(early)), (b"gone", orjson.dumps(early)),
              (b"gone", None), *state])
    serialize = EventSerializer()
    validated = [(b"SO-7", serialize(_override_event(oid, reason, NOW - ago + shift,
                                                     NOW + expires + shift)))
                 for oid, reason, ago, expires in week["overrides"]]
    _produce(kafka_bootstrap, topics["validated"], validated)
    fact = dict(week["reconcile"], at_ms=week["reconcile"]["at_ms"] + shift)
    older = dict(fact, at_ms=fact["at_ms"] - WEEK, detail={"drift_pct": 3.0})
    other = {"fact_id": "x", "kind": "applied", "actor": "sink", "order_id": "SO-1",
             "at_ms": fact["at_ms"] + 1, "detail": {}}
    _produce(kafka_bootstrap, topics["facts"],
             [(b"_operations", orjson.dumps(f)) for f in (fact, older, other)])

    html = tmp_path / "out" / "report.html"
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
               REVLINE_OUTCOMES_TOPIC=topics["outcomes"],
               REVLINE_EXCEPTION_STATE_TOPIC=topics["state"],
               REVLINE_EXCEPTIONS_TOPIC=topics["exceptions"],
               REVLINE_VALIDATED_TOPIC=topics["validated"],
               REVLINE_AUDIT_FACTS_TOPIC=topics["facts"], COLUMNS="200")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "revline.cli", "report", "--since", "7d",
                             "--html", str(html)], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    out = result.stdout
    for text in ("Open exceptions by owner and age", "SLA compliance", "policy.discount",
                 "OVR-103", "NO REASON", "0.042 %", "events processed", "1,201"):
        assert text in out, text

    dom = _chromium("--dump-dom", html.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr
    body = dom.stdout[dom.stdout.index("<body"):]  # what is shown, not the stylesheet
    text = unescape(re.sub(r"<[^>]+>", " ", body))
    text = re.sub(r"\s+", " ", text)
    expected = sample_report()
    kpis = {
        "kpi-inputs": f"{expected.flow.inputs:,}",
        "kpi-open-exceptions": str(expected.open_exceptions.total),
        "kpi-duplicates": str(expected.duplicates.prevented),
        "kpi-drift": "0.042 %",
        "kpi-overrides": str(len(expected.overrides.items)),
    }
    assert re.search(r'id="overrides-refused">1<', dom.stdout)
    for ident, value in kpis.items():
        match = re.search(rf'id="{ident}".*?class="value">([^<]*)<', dom.stdout, re.S)
        assert match and match.group(1) == value, (ident, match and match.group(1), value)
    assert expected.open_exceptions.total == 8
    for figure in ("Operations report", "Finance", "Revenue operations", "Integrations",
                   "P1 invoice-stopping", fmt_pct(expected.sla_compliance_pct),
                   "policy.discount", "APPROVED_OFFLINE", "OVR-103", "no reason", "expired",
                   "refused", "reconciliation.invoice_total",
                   fmt_duration(expected.latency.p95_ms), "0.042 %", "within target",
                   "4,812", "override.expired"):
        assert figure in text, figure
    assert "not run" not in text

    png = tmp_path / "report.png"
    shot = _chromium(f"--screenshot={png}", "--window-size=1200,4200", "--hide-scrollbars",
                     html.as_uri(), tmp=tmp_path)
    assert shot.returncode == 0 and png.stat().st_size > 50_000, shot.stderr
    keep = os.environ.get("REVLINE_REPORT_ARTIFACTS")
    if keep:  # for a human look at the page
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(html, Path(keep) / "report.html")
        shutil.copy(png, Path(keep) / "report.png")


@pytest.mark.kafka
def test_report_falls_back_to_exception_records_and_says_so(kafka_bootstrap: str,
                                                            new_topic: Any) -> None:
    from revline.schemas import exception_codec

    now = int(time.time() * 1000)
    topics = ReportTopics(outcomes=new_topic("report-o"), exception_state=new_topic("report-s"),
                          exceptions=new_topic("report-e"), validated=new_topic("report-v"),
                          audit_facts=f"report-absent-{uuid.uuid4().hex}")
    codec = exception_codec()

    def record(n: int, severity: str, opened_ago: int) -> bytes:
        return codec.encode({
            "exception_id": f"e{n}", "check_id": "policy.price", "severity": severity,
            "owner": "revenue_ops", "reason": "price off list", "all_findings": [],
            "blocking": True, "opened_at_ms": now - opened_ago,
            "sla_deadline_ms": now - opened_ago + 2 * HOUR, "rules_version": "r",
            "event_type": "order_booked", "idempotency_key": f"SO-{n}:booked",
            "order_id": f"SO-{n}", "source_system": "salesforce", "source_record_id": "x",
            "input_topic": "in", "input_partition": 0, "input_offset": n, "event": b"",
        })

    records = [(b"SO-1", record(1, "P2", 3 * HOUR)), (b"SO-2", record(2, "P2", 10 * MIN))]
    _produce(kafka_bootstrap, topics.exceptions, records + records[:1])  # a replay repeats
    report = collect(kafka_bootstrap, topics, since_ms=now - WEEK, now_ms=now)
    assert report.open_exceptions.total == 2 and report.open_exceptions.overdue == 1
    assert "every exception counts as open" in report.exceptions_source
    assert report.reconciliation is None and report.flow.inputs == 0
    assert "not run" in render_html(report)
