"""Regenerate docs/report.png: the HTML operations report of an invented week, in Chromium.

    .venv/bin/python docs/make_screenshot.py [--html report.html] [--png docs/report.png]

The report is built by the code (``build_report`` + ``render_html``, as
``revline report --html`` does) from plain values, so no broker is needed. The week is
made up: 1,400 inputs, sub-second decisions, a few exceptions, overrides and a
reconciliation run.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from revline.operations.report import (
    ExceptionItem,
    OverrideItem,
    ReportInputs,
    build_report,
    reconcile_from_fact,
)
from revline.operations.report_html import render_html

HERE = Path(__file__).parent
NOW = int(datetime(2026, 11, 23, 8, 0, tzinfo=UTC).timestamp() * 1000)  # a Monday morning
MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000
WEEK = 7 * DAY
TYPES = ["order_booked", "discount_approved", "order_amended", "fulfilment_confirmed",
         "invoice_issued", "payment_captured", "refund_issued"]
CHECKS = {"policy.discount": ("P2", "revenue_ops"), "completeness.sku": ("P1", "revenue_ops"),
          "reconciliation.invoice_total": ("P1", "finance"),
          "dedup.conflict": ("P2", "integrations"), "hold.timeout": ("P2", "integrations")}


def week(seed: int = 11) -> ReportInputs:
    rng = random.Random(seed)
    outcomes: list[dict[str, Any]] = []
    for i in range(1400):
        decided = NOW - rng.randint(HOUR, WEEK - HOUR)
        event_type = TYPES[i % len(TYPES)]
        o: dict[str, Any] = {
            "input_topic": "revline.events.v1", "input_partition": i % 6, "input_offset": i,
            "kind": "validated", "final": True, "held": i % 43 == 0, "released_by": None,
            "waiting_for": [], "check_id": None, "severity": None, "owner": None,
            "reason": "", "warnings": [], "exception_id": None, "stage": None,
            "event_type": event_type, "event_id": f"e-{i}",
            "idempotency_key": f"SO-{i // 7}:{event_type}", "order_id": f"SO-{i // 7}",
            "source_line": i, "occurred_at_ms": decided - int(rng.lognormvariate(4.5, 0.8)),
            "decided_at_ms": decided, "rules_version": "2026.11.1",
        }
        if i % 89 == 7:
            o["kind"] = "duplicate"
        elif i % 47 == 3:
            check = rng.choice(sorted(CHECKS))
            severity, owner = CHECKS[check]
            o.update(kind="exception", check_id=check, severity=severity, owner=owner,
                     exception_id=f"x{i:04d}")
        elif i % 350 == 20:
            o.update(kind="dead_letter", stage="decode", event_type=None, occurred_at_ms=None)
        elif i % 61 == 0:
            o["warnings"] = ["attribution.channel"]
        outcomes.append(o)

    exceptions = []
    for n, (status, sev, owner, ago, check, amount, cur) in enumerate([
        ("open", "P1", "finance", 40 * MIN, "reconciliation.invoice_total", 1_249_900, "EUR"),
        ("acknowledged", "P1", "finance", 3 * HOUR, "reconciliation.drift", 86_000, "USD"),
        ("open", "P2", "revenue_ops", 90 * MIN, "policy.discount", 2_380_000, "JPY"),
        ("open", "P2", "integrations", 2 * DAY, "hold.timeout", None, None),
        ("open", "P3", "revenue_ops", 5 * HOUR, "attribution.campaign", None, None),
        ("resolved", "P1", "finance", 2 * DAY, "completeness.sku", 410_000, "GBP"),
        ("resolved", "P2", "integrations", 5 * DAY, "dedup.conflict", None, None),
        ("waived", "P2", "revenue_ops", 3 * DAY, "policy.discount", 99_000, "EUR"),
    ]):
        sla = {"P1": 15 * MIN, "P2": 2 * HOUR, "P3": 48 * HOUR}[sev]
        closed = NOW - ago + (8 + n) * MIN if status in ("resolved", "waived") else None
        acked = NOW - ago + 9 * MIN if status == "acknowledged" else None
        exceptions.append(ExceptionItem(
            exception_id=f"EX-{n:04d}", check_id=check, severity=sev, owner=owner,
            status=status, opened_at_ms=NOW - ago, sla_deadline_ms=NOW - ago + sla,
            closed_at_ms=closed, acknowledged_at_ms=acked, backup_owner="revenue_ops",
            reason_code="ACCEPTED_RISK" if status == "waived" else None,
            order_id=f"SO-{200 + n}", amount_minor=amount, currency=cur))

    overrides = [
        OverrideItem("OVR-101", "SO-7", "SO-7:booked", "policy.discount", "APPROVED_OFFLINE",
                     "ana@example.com", NOW - DAY, NOW + 6 * DAY),
        OverrideItem("OVR-102", "SO-19", "SO-19:booked", "policy.price", "CONTRACT_TERMS",
                     "li@example.com", NOW - 3 * DAY, NOW - DAY),
    ]
    reconcile = reconcile_from_fact(
        NOW - 2 * HOUR, "ops@example.com",
        {"period": {"from": "2026-11-16", "to": "2026-11-23"}, "drift_pct": 0.03,
         "checked": 1180, "missing": 0, "extra": 0, "mismatched": 1})
    return ReportInputs(outcomes=outcomes, exceptions=exceptions, overrides=overrides,
                        reconcile=reconcile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, help="also keep the HTML page here")
    parser.add_argument("--png", type=Path, default=HERE / "report.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    page = render_html(build_report(week(), now_ms=NOW, since_ms=NOW - WEEK))
    with tempfile.TemporaryDirectory() as tmp:
        html = args.html or Path(tmp) / "report.html"
        html.write_text(page)
        subprocess.run(
            [args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-background-networking", "--disable-dev-shm-usage",
             f"--user-data-dir={Path(tmp) / 'profile'}", f"--screenshot={args.png.absolute()}",
             "--window-size=1280,1600", html.absolute().as_uri()],
            check=True, capture_output=True, timeout=120)
    print(f"{args.png}: {args.png.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
