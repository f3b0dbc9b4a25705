"""An isolated pipeline run: own topics, consumer group and state, real worker processes.

Used by the demo, the benchmark and the integration tests.
"""

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

from revline.operations.publisher import Publisher, publish_records
from revline.operations.verify import compare_with_manifest, finals_by_input, read_outcomes
from revline.tools.workload import Workload


@dataclass
class IsolatedPipeline:
    """One isolated pipeline: its own topics, consumer group and state dir."""

    bootstrap: str
    state_dir: Path
    partitions: int = 3
    rules_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    prefix: str = "t"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # As a supervisor would: restart a process that crashed (the demo). Tests leave it off,
    # so a crash fails them.
    restart_crashed: bool = False
    commands: dict[int, tuple[str, ...]] = field(default_factory=dict)  # pid -> command

    def topic(self, kind: str) -> str:
        return f"{self.prefix}-{self.name}.{kind}"

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
            "REVLINE_AUDIT_FACTS_TOPIC": self.topic("audit-facts"),
            "REVLINE_AUDIT_TOPIC": self.topic("audit"),
            "REVLINE_AUDIT_HEADS_TOPIC": self.topic("audit-heads"),
            "REVLINE_EXCEPTION_EVENTS_TOPIC": self.topic("exception-events"),
            "REVLINE_EXCEPTION_STATE_TOPIC": self.topic("exception-state"),
            "REVLINE_QUARANTINE_TOPIC": self.topic("quarantine"),
            "REVLINE_REDRIVE_LOG_TOPIC": self.topic("redrive-log"),
            "REVLINE_SINK_METRICS_PORT": "0",
            "REVLINE_EXCEPTIONS_METRICS_PORT": "0",
            "REVLINE_APP_ID": f"revline-{self.prefix}-{self.name}",
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
        return self.start("worker", log_name=log_name)

    def start(self, *command: str, log_name: str | None = None) -> subprocess.Popen[bytes]:
        """Run ``revline COMMAND…`` in the background with this pipeline's settings."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        name = log_name or command[0]
        log = open(self.state_dir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "revline.cli", *command], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.commands[proc.pid] = command
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

    def create_input_topic(self) -> None:
        """Before publishing: a broker's auto-create would use its own partition count."""
        from revline.core.admin import ensure_topics

        ensure_topics(self.bootstrap, {self.topic("events"): self.partitions})

    def publish(self, workload: Workload, records: list[Any] | None = None) -> None:
        self.create_input_topic()
        with Publisher(self.bootstrap, self.topic("events")) as publisher:
            publish_records(publisher, records if records is not None else workload.records)

    def outcomes(self) -> list[dict[str, Any]]:
        try:
            return read_outcomes(self.bootstrap, self.topic("outcomes"))
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
            for proc in list(self.procs):
                if proc.poll() not in (None, 0, -9, -15):
                    command = self.commands.get(proc.pid, ("worker",))
                    if not self.restart_crashed:
                        raise AssertionError(f"revline {' '.join(command)} exited with "
                                             f"{proc.returncode}; see {self.state_dir}")
                    print(f"revline {' '.join(command)} exited with {proc.returncode} "
                          f"(see its log in {self.state_dir}); restarting it", file=sys.stderr)
                    self.procs.remove(proc)
                    self.start(*command)
            time.sleep(1.0)
        raise AssertionError(f"timed out waiting for {what}; have {len(outcomes)} outcomes")


__all__ = ["IsolatedPipeline", "compare_with_manifest", "finals_by_input"]
