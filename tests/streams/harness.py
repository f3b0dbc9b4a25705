"""Run real worker processes against the real broker, and read what they concluded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revline.publisher import SOURCE_LINE_HEADER, Publisher
from revline.readback import read_topic
from revline.workload import Workload
from schemas import outcome_codec


@dataclass
class Pipeline:
    """One isolated pipeline: its own topics, consumer group and state dir."""

    bootstrap: str
    state_dir: Path
    partitions: int = 3
    rules_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def topic(self, kind: str) -> str:
        return f"t-{self.name}.{kind}"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "REVLINE_INPUT_TOPIC": self.topic("events"),
            "REVLINE_VALIDATED_TOPIC": self.topic("validated"),
            "REVLINE_EXCEPTIONS_TOPIC": self.topic("exceptions"),
            "REVLINE_DEAD_LETTER_TOPIC": self.topic("deadletter"),
            "REVLINE_OUTCOMES_TOPIC": self.topic("outcomes"),
            "REVLINE_REFERENCE_TOPIC": self.topic("reference"),
            "REVLINE_TICKS_TOPIC": self.topic("ticks"),
            "REVLINE_APP_ID": f"revline-test-{self.name}",
            "REVLINE_STATE_DIR": str(self.state_dir),
            "REVLINE_INPUT_PARTITIONS": str(self.partitions),
            "REVLINE_METRICS_PORT": "0",
            "REVLINE_HOLD_CHECK_INTERVAL_S": "1",
            "REVLINE_SESSION_TIMEOUT_S": "6",
        })
        if self.rules_file:
            env["REVLINE_RULES_FILE"] = str(self.rules_file)
        env.update(self.extra_env)
        return env

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "revline.cli", *args], env=self.env, check=True,
                       stdout=subprocess.DEVNULL)

    def start_worker(self, log_name: str = "worker") -> subprocess.Popen[bytes]:
        log = open(self.state_dir / f"{log_name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "revline.cli", "worker"], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def publish(self, workload: Workload, records: list[Any] | None = None) -> None:
        with Publisher(self.bootstrap, self.topic("events")) as publisher:
            for rec in records if records is not None else workload.records:
                headers = [(SOURCE_LINE_HEADER, str(rec.seq).encode())]
                if rec.event is not None:
                    publisher.publish(rec.event, headers=headers, validate=False)
                else:
                    publisher.publish_raw(rec.key, rec.raw, headers)

    def outcomes(self) -> list[dict[str, Any]]:
        codec = outcome_codec()
        try:
            return [codec.decode(m.value() or b"") for m in read_topic(self.bootstrap,
                                                                       self.topic("outcomes"))]
        except Exception:  # the topic may not exist yet
            return []

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float,
                 what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        outcomes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            outcomes = self.outcomes()
            if predicate(outcomes):
                return outcomes
            for proc in self.procs:
                if proc.poll() not in (None, 0, -9, -15):
                    raise AssertionError(f"worker exited with {proc.returncode}; see "
                                         f"{self.state_dir}")
            time.sleep(1.0)
        raise AssertionError(f"timed out waiting for {what}; have {len(outcomes)} outcomes")


def finals_by_input(outcomes: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Final outcomes per input coordinates, after removing exact repeats of a replay."""
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for o in outcomes:
        if not o["final"]:
            continue
        coords = (o["input_partition"], o["input_offset"])
        same = [x for x in out.get(coords, []) if _verdict(x) == _verdict(o)]
        if not same:
            out.setdefault(coords, []).append(o)
    return out


def _verdict(o: dict[str, Any]) -> tuple[Any, ...]:
    return (o["kind"], o["check_id"], o["held"], tuple(sorted(o["warnings"])), o["stage"],
            o["idempotency_key"])


def compare_with_manifest(workload: Workload, outcomes: list[dict[str, Any]]) -> list[str]:
    """Problems: inputs without exactly one final verdict, or with the wrong one."""
    finals = finals_by_input(outcomes)
    by_line: dict[int, list[dict[str, Any]]] = {}
    for verdicts in finals.values():
        for o in verdicts:
            by_line.setdefault(int(o["source_line"] or -1), []).append(o)
    problems = []
    for rec in workload.records:
        got = by_line.get(rec.seq, [])
        if len(got) != 1:
            problems.append(f"input {rec.seq} ({rec.note or rec.event_type}): "
                            f"{len(got)} distinct final outcomes {[_verdict(g) for g in got]}")
            continue
        o = got[0]
        have = (o["kind"], o["check_id"], o["held"],
                sorted(o["warnings"]) if o["kind"] == "validated" else [], o["stage"])
        want = (rec.expect.outcome, rec.expect.check_id, rec.expect.held,
                sorted(rec.expect.warnings), rec.expect.stage)
        if have != want:
            problems.append(f"input {rec.seq} {rec.event_type} {rec.note}: got {have}, "
                            f"want {want} ({o['reason']})")
    return problems
