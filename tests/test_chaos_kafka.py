"""`revline chaos` at CI size (issue 18): faults on a 3-node cluster, every check holds.

300 orders (about 1,500 inputs) on a fresh plain 3-node cluster of its own: kill -9 of a
worker twice, of the sink, the auditor and the exception manager once, kill -9 of the
leader of the busiest input partition once (restarted), workers scaled 1 -> 2 -> 1. The
command's own checks decide (exit 0 only if all hold); the figures are printed (-s).
docs/chaos.md has a larger run's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from revline.tools.chaos import ChaosOptions, run_chaos, table
from tests.conftest import STATE_DIR

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_chaos_ci_size_every_check_holds(tmp_path: Path) -> None:
    home = STATE_DIR / f"test-kafka-chaos-cluster-{os.getpid()}"
    try:
        ok, summary = run_chaos(ChaosOptions(
            orders=300, seed=18, worker_kills=2, sink_kills=1, auditor_kills=1,
            exceptions_kills=1, broker_kills=1, scale_to=2, stall_s=120, wait_s=240,
            cluster_home=home, state_dir=tmp_path / "chaos",
            json_out=tmp_path / "chaos-summary.json"))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print("\n" + table(summary), flush=True)
    assert summary["events_lost"] == 0 and summary["effects_doubled"] == 0
    assert sum(summary["faults"].values()) == 8, summary["faults"]  # with 2 scalings
    failed = [name for name, held in summary["checks"].items() if not held]
    assert ok and not failed, (failed, {k: summary[k] for k in (
        "stalls", "unexpected_exits", "manifest_problems", "audit_verify", "reconcile",
        "dead_letter")})
