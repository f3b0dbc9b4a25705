"""`revline run`: worker, sink, auditor and exception manager together, on the real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from revline.core.settings import DATA_DIR
from revline.operations.verify import compare_with_manifest, finals_by_input
from revline.sinks.ledger import SqlLedger
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadOptions, generate

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_the_whole_pipeline_runs_and_every_part_does_its_work(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    rules = yaml.safe_load((DATA_DIR / "rules.yaml").read_text())
    rules["hold_timeout_seconds"] = 3
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp_path, rules_file=tmp_path / "rules.yaml",
                                extra_env={"REVLINE_ERP": "memory"})
    workload = generate(WorkloadOptions(orders=40, seed=13))
    pipeline.cli("reference", "load")
    proc = pipeline.start("run", "--auditor-metrics-port", "0")
    try:
        pipeline.publish(workload)
        outcomes = pipeline.wait_for(
            lambda o: len(finals_by_input(o)) >= len(workload.records), 120,
            "a final outcome for every input")
        assert compare_with_manifest(workload.manifest(), outcomes) == []
        money = {(r.key, r.idempotency_key or "") for r in workload.records
                 if r.expect.outcome == "validated"
                 and r.event_type in ("invoice_issued", "payment_captured", "refund_issued")}
        ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
        deadline = time.monotonic() + 90
        while len(ledger.effects_for(money, "ledger")) < len(money):
            assert proc.poll() is None, f"revline run exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the sink did not post every money event"
            time.sleep(1)
        ledger.close()
        # The auditor chained the outcomes; the exception manager holds the exceptions.
        deadline = time.monotonic() + 60
        while True:
            verify = subprocess.run([sys.executable, "-m", "revline.cli", "audit", "verify"],
                                    env=pipeline.env, capture_output=True, text=True)
            listed = subprocess.run(
                [sys.executable, "-m", "revline.cli", "exceptions", "list", "--json",
                 "--status", "all"], env=pipeline.env, capture_output=True, text=True)
            if verify.returncode == 0 and listed.returncode == 0 and "EX-" in listed.stdout:
                break
            assert time.monotonic() < deadline, (verify.stdout + verify.stderr
                                                 + listed.stdout + listed.stderr)
            time.sleep(2)
        # A component that dies is restarted by `revline run`, as a supervisor would.
        sink = _child(proc.pid, "sink")
        os.kill(sink, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _child(proc.pid, "sink", missing_ok=True) in (None, sink):
            assert proc.poll() is None, "revline run stopped instead of restarting the sink"
            assert time.monotonic() < deadline, "the sink was not restarted"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        pipeline.stop_all()
    assert code == 0, f"revline run exited with {code}; see {tmp_path}/run-*.log"


def _child(parent: int, command: str, *, missing_ok: bool = False) -> int | None:
    """The pid of ``revline COMMAND`` started by ``parent`` (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and b"revline.cli" in argv and command.encode() in argv:
            return int(entry.name)
    assert missing_ok, f"no revline {command} under {parent}"
    return None
