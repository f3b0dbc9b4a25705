"""The read model on the real broker: what the components write equals a rebuild from the
topics, and the operator commands answer from it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from revline.operations.verify import finals_by_input
from revline.sinks.read_model import ReadModel
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadOptions, generate

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def revline(pipeline: IsolatedPipeline, *args: str, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "revline.cli", *args],
                          env={**pipeline.env, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def test_components_write_what_a_rebuild_from_the_topics_gives(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp_path / "state", extra_env={
        "REVLINE_EXCEPTION_CHECK_INTERVAL_S": "0.5"})
    workload = generate(WorkloadOptions(
        orders=30, seed=11, run_id=f"rm{pipeline.name}", duplicates=0.05, conflicts=0,
        out_of_order=0, incomplete=0.1, off_policy=0.1, unknown_attribution=0.05,
        amount_mismatch=0.05, poison=0, orphans=0))
    url = f"sqlite:///{tmp_path / 'state' / 'ledger.db'}"
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        pipeline.start("exceptions", "run", log_name="manager")
        pipeline.start("auditor", "--metrics-port", "-1", log_name="auditor")
        pipeline.publish(workload)
        pipeline.wait_for(lambda o: len(finals_by_input(o)) >= len(workload.records), 180,
                          "a final outcome for every workload input")

        def settled() -> dict[str, list[tuple[Any, ...]]] | None:
            if not os.path.exists(tmp_path / "state" / "ledger.db"):
                return None
            model = ReadModel(url, migrate=False)
            try:
                first = model.snapshot()
                counted = len(first["outcomes_counted"])
                if counted < len(workload.records) or not first["exception_states"]:
                    return None
                time.sleep(3)
                again = model.snapshot()
                return again if again == first else None
            except Exception:
                return None
            finally:
                model.close()

        written = eventually(settled, 180, "the read model to hold every outcome and settle")
        # An ack through the CLI: the state changes in the table too.
        some = written["exception_states"][0][0]
        ack = revline(pipeline, "exceptions", "ack", some, "--actor", "ana@example.com")
        assert ack.returncode == 0, ack.stderr
        written = eventually(settled, 60, "the read model to settle after the ack")
    finally:
        pipeline.stop_all()

    # The commands answer from the tables.
    order = written["audit_records"][0][0]
    shown = revline(pipeline, "audit", order)
    assert shown.returncode == 0 and "chain verified" in shown.stdout, shown.stdout + shown.stderr
    assert "read model" not in shown.stderr  # no fallback line
    listed = revline(pipeline, "exceptions", "list", "--status", "all")
    assert listed.returncode == 0 and some in listed.stdout
    report = revline(pipeline, "report")
    assert report.returncode == 0 and "from the read model" in report.stdout, report.stderr
    verify = revline(pipeline, "audit", "verify")
    assert verify.returncode == 0 and "complete" in verify.stdout, verify.stdout

    # Rebuilt into an empty database from the topics: the same content.
    rebuilt_url = f"sqlite:///{tmp_path / 'rebuilt' / 'ledger.db'}"
    done = revline(pipeline, "index", "rebuild", env={"REVLINE_LEDGER_DSN": rebuilt_url})
    assert done.returncode == 0, done.stderr
    model = ReadModel(rebuilt_url, migrate=False)
    try:
        rebuilt = model.snapshot()
    finally:
        model.close()
    for table, rows in written.items():
        assert rebuilt[table] == rows, table
    assert written["audit_records"] and written["outcome_hours"] and written["audit_heads"]
    status = revline(pipeline, "index", "status", env={"REVLINE_LEDGER_DSN": rebuilt_url})
    assert status.returncode == 0, status.stderr
    listed = {line.split()[0] for line in status.stdout.splitlines() if line.strip()}
    assert {"audit_records", "exception_states", "exception_counts"} <= listed, status.stdout

    # An old deployment (no read model): the commands say so and read the topics.
    old = revline(pipeline, "audit", order,
                  env={"REVLINE_LEDGER_DSN": f"sqlite:///{tmp_path / 'none' / 'x.db'}"})
    assert old.returncode == 0 and "read model unavailable" in old.stderr
