"""`revline rules backtest` on the real broker: a real worker decides a generated workload;
replaying its input topic with the live rules reproduces every recorded outcome (0
changes, exit 0); a lowered discount ceiling moves exactly the inputs the oracle says,
with the money they carry (exit 1); windows, limits and errors; the HTML in Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from decimal import Decimal
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import yaml

from revline.core.money import to_major
from revline.core.settings import DATA_DIR
from revline.operations.replay import format_ms
from revline.operations.verify import finals_by_input
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadOptions, generate
from tests.processors.test_backtest import new_discount_faults, oracle

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"


def rules_file(path: Path, **changes: Any) -> Path:
    raw = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    for key, value in changes.items():
        if key == "software_bps":
            raw["discount_tolerance_bps"]["families"]["software"] = value
        else:
            raw[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def backtest(pipeline: IsolatedPipeline, *args: str) -> tuple[int, str, str]:
    env = dict(pipeline.env, COLUMNS="220")
    result = subprocess.run([sys.executable, "-m", "revline.cli", "rules", "backtest", *args],
                            env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def test_backtest_reproduces_the_worker_and_finds_a_planted_change(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    live = rules_file(tmp_path / "live.yaml", hold_timeout_seconds=4)
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp_path / "state", rules_file=live,
                                prefix="bt")
    workload = generate(WorkloadOptions(orders=250, seed=23, orphans=2, poison=0.006))
    started_ms = int(time.time() * 1000)
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.publish(workload)
        pipeline.wait_for(lambda o: len(finals_by_input(o)) >= len(workload.records), 240,
                          "a final outcome for every input")
    finally:
        pipeline.stop_all()
    time.sleep(1.0)  # the window below ends after every hold deadline the worker met

    # 1. The live rules file itself: 0 changes, and every recorded outcome reproduced.
    out = tmp_path / "same.json"
    code, stdout, stderr = backtest(pipeline, "--rules", str(live), "--since", "30m",
                                    "--verify-recorded", "--json", str(out))
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "unchanged" and doc["changed"] == 0 and doc["changes"] == []
    assert doc["inputs"]["counted"] == len(workload.records)
    recorded = doc["recorded"]
    assert recorded["compared"] == len(workload.records), recorded
    assert recorded["matched"] == recorded["compared"] and recorded["differ"] == 0, recorded
    assert "the reference topic" in doc["reference_data"]
    assert "UNCHANGED" in stdout and "reproduced" in stdout

    # 2. A 10-point lower software discount ceiling: exactly the oracle's inputs move.
    candidate = rules_file(tmp_path / "candidate.yaml", version="2026.12.9-test",
                           hold_timeout_seconds=4, software_bps=1000)
    out, page = tmp_path / "changed.json", tmp_path / "changed.html"
    code, stdout, stderr = backtest(pipeline, "--rules", str(candidate), "--since", "30m",
                                    "--json", str(out), "--html", str(page))
    assert code == 1, stderr
    doc = json.loads(out.read_text())
    never = 10**9  # hold timeouts are the same on both sides: leave them out of the oracle
    end = len(workload.records) + 1
    families = {"software": 1000, "hardware": 1000, "services": 1500, "support": 500}
    faults = new_discount_faults(workload, families)
    before = oracle(workload, never, set(), end)
    after = oracle(workload, never, faults, end)
    expected = {seq: list(after[seq]) for seq in after if after[seq] != before[seq]}
    got = {int(c["source_line"]): [c["after"]["kind"], c["after"]["check_id"]]
           for c in doc["changes"]}
    assert got == expected
    assert doc["changed"] == len(expected) > 10 and doc["verdict"] == "changed"
    assert {c["before"]["kind"] for c in doc["changes"]} == {"validated"}

    # The money held back: each changed input's own amount, per currency, exact.
    by_seq = {r.seq: r for r in workload.records}
    want: dict[str, int] = defaultdict(int)
    for seq in expected:
        event = by_seq[seq].event
        assert event is not None
        amount = event.get("total_minor", event.get("amount_minor"))
        if amount is not None and event["envelope"]["event_type"] != "fulfilment_confirmed":
            want[event["currency"]] += amount
    held: dict[str, Decimal] = defaultdict(Decimal)
    for row in doc["money"]:
        held[row["currency"]] += Decimal(row["held_back"])
        assert row["released"] == str(to_major(0, row["currency"]))
    assert dict(held) == {c: to_major(v, c) for c, v in want.items()}
    checks = {c["check_id"]: c for c in doc["checks"]}
    assert checks["policy.discount"]["delta"] == sum(1 for v in expected.values()
                                                     if v[1] == "policy.discount")
    assert "CHANGED" in stdout and "policy.discount" in stdout

    # Within --max-changes it passes; the report is the same.
    code, _, stderr = backtest(pipeline, "--rules", str(candidate), "--since", "30m",
                               "--max-changes", str(len(expected)))
    assert code == 0, stderr

    # A window before anything was published: nothing to replay, nothing changes.
    out = tmp_path / "empty.json"
    code, _, stderr = backtest(pipeline, "--rules", str(candidate),
                               "--from", format_ms(started_ms - 7_200_000),
                               "--to", format_ms(started_ms - 3_600_000), "--json", str(out))
    assert code == 0, stderr
    assert json.loads(out.read_text())["inputs"]["counted"] == 0

    # Errors: one line, exit 2.
    code, _, stderr = backtest(pipeline, "--rules", str(candidate), "--since", "1h",
                               "--topic", "bt-no-such-topic")
    assert code == 2
    assert stderr.startswith("error:") and "does not exist" in stderr
    assert len(stderr.strip().splitlines()) == 1

    # The HTML page renders in a real browser with its sections and the money moved.
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is missing: apt-get install -y --no-install-recommends chromium "
                    "(.ci/run does)")
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    body = dom.stdout[dom.stdout.index("<body"):]
    for ident in ("kpi-changed", "checks", "transitions", "money", "workload", "changes"):
        assert f'id="{ident}"' in body, ident
    text = re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", body)))
    assert f"{len(expected):,}" in text and "policy.discount" in text
    first = doc["money"][0]
    assert first["held_back"] in text
