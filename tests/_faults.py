"""The machinery of the fault test (tests/test_faults_kafka.py).

* ``PacedPublisher``: publishes a workload at a steady pace from a thread, and can be held
  at a line until the test lets it go on (so every fault happens while lines still flow);
* ``Tail``: reads topics as they grow (read_committed, no consumer group) and notes when
  each record became visible, so a recovery time is "fault → first new record";
* ``LedgerProbe``: notes when each side-effect row first appeared in the SQLite ledger;
* ``Supervisor``: runs the pipeline's components as ``revline run`` does, one process
  each, kill -9s and restarts them, and restarts (and records) any that exit on their own,
  as a process supervisor would.

Times are wall-clock seconds (``time.time()``) throughout, so they compare with the
CreateTime a component's producer stamps on each record it writes.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from revline.core.settings import Settings
from revline.operations.publisher import SOURCE_LINE_HEADER, Publisher
from revline.schemas import outcome_codec
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadRecord

# librdkafka's lines while the broker is away: expected, and no evidence of anything.
_NOISE = ("Connection refused", "not found in cache", "Connect call failed",
          "NodeNotReadyError", "Unable to update metadata", "Unable connect to node")

# The components of `revline run`, one process each (tests/test_run_kafka.py runs them as
# one `revline run`; here each must be killed on its own).
COMMANDS: dict[str, tuple[str, ...]] = {
    "worker": ("worker",),
    "sink": ("sink",),
    "auditor": ("auditor", "--metrics-port", "0"),
    "exceptions": ("exceptions", "run"),
}


def settings_of(pipeline: IsolatedPipeline) -> Settings:
    """The ``Settings`` the pipeline's processes see (its REVLINE_* environment)."""
    fields = Settings.model_fields
    values = {name.removeprefix("REVLINE_").lower(): value
              for name, value in pipeline.env.items() if name.startswith("REVLINE_")}
    return Settings(_env_file=None, **{k: v for k, v in values.items() if k in fields})


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               every: float = 0.2, check: Callable[[], None] | None = None) -> float:
    """Poll ``condition`` until true; returns when it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.time()
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# -- publishing ----------------------------------------------------------------------------
class PacedPublisher(threading.Thread):
    """Publishes ``records`` at ``rate`` lines/s, never past ``limit`` (see ``hold_at``)."""

    def __init__(self, bootstrap: str, topic: str, records: Sequence[WorkloadRecord],
                 rate: float) -> None:
        super().__init__(name="paced-publisher", daemon=True)
        self.bootstrap, self.topic, self.records, self.rate = bootstrap, topic, records, rate
        self._cond = threading.Condition()
        self._limit = len(records)
        self.sent = 0  # lines handed to the producer
        self.delivered = 0
        self.paused_s = 0.0  # time spent held at a limit
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self.sent_at: list[float] = []  # when each line was handed to the producer
        self.failures: list[str] = []

    def hold_at(self, line: int) -> None:
        """Publish at most ``line`` lines until ``release``."""
        with self._cond:
            self._limit = max(line, self.sent)

    def release(self, line: int | None = None) -> None:
        with self._cond:
            self._limit = len(self.records) if line is None else line
            self._cond.notify_all()

    def run(self) -> None:
        try:
            # No delivery timeout: a broker restart only delays the lines (librdkafka's
            # default of 300 s would also do; this says it).
            with Publisher(self.bootstrap, self.topic, settings=Settings(_env_file=None),
                           extra_config={"message.timeout.ms": 0, "log_level": 0}) as publisher:
                due = time.monotonic()
                for index, rec in enumerate(self.records):
                    with self._cond:
                        while index >= self._limit:
                            began = time.monotonic()
                            self._cond.wait(0.5)
                            self.paused_s += time.monotonic() - began
                            due = time.monotonic()
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    due = max(due + 1.0 / self.rate, time.monotonic() - 1.0)
                    headers: list[tuple[str, str | bytes | None]] = [
                        (SOURCE_LINE_HEADER, str(rec.seq).encode())]
                    if rec.event is not None:
                        publisher.publish(rec.event, headers=headers, validate=False)
                    else:
                        assert rec.raw is not None
                        publisher.publish_raw(rec.key, rec.raw, headers)
                    self.sent_at.append(time.time())
                    self.sent = index + 1
                self.delivered = publisher.flush(600)
                self.failures = publisher.delivery_failures
        except BaseException as exc:  # reported by the test, never lost in the thread
            self.error = exc
        finally:
            self.finished_at = time.time()


# -- watching the outputs ------------------------------------------------------------------
@dataclass
class Seen:
    at: float  # when the tail read it (visible: committed)
    created: float  # the record's CreateTime: when its producer made it
    value: bytes | None
    source_line: int | None = None  # outcomes only
    final: bool = False


class Tail(threading.Thread):
    """Every record of some topics, with the time it became visible (read_committed)."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        super().__init__(name="tail", daemon=True)
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"fault-test-tail-{uuid.uuid4().hex[:8]}",  # never joined nor committed
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "log_level": 0,  # the broker restart is expected; its errors are no news here
        })
        # On a fresh cluster the broker asked may not know a topic created a moment ago
        # on another one yet (a KeyError here once in the chaos test): wait for it.
        deadline = time.monotonic() + 60
        while True:
            metadata = self.consumer.list_topics(timeout=30).topics
            if all(t in metadata and metadata[t].partitions and metadata[t].error is None
                   for t in topics) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                              for t in topics for p in metadata[t].partitions])
        self.seen: dict[str, list[Seen]] = {t: [] for t in topics}
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._codec = outcome_codec()

    def run(self) -> None:
        while not self._halt.is_set():
            for msg in self.consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                seen = Seen(time.time(), msg.timestamp()[1] / 1000, msg.value())
                topic = msg.topic() or ""
                if topic.endswith(".outcomes"):
                    with contextlib.suppress(Exception):
                        outcome = self._codec.decode(msg.value() or b"")
                        seen.source_line = int(outcome["source_line"] or -1)
                        seen.final = bool(outcome["final"])
                with self._lock:
                    self.seen[topic].append(seen)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.consumer.close()

    def records(self, topic: str) -> list[Seen]:
        with self._lock:
            return list(self.seen[topic])

    def first_made_after(self, topic: str, since: float) -> float | None:
        """When the first record made after ``since`` became visible.

        By CreateTime, so a record a killed process committed just before its death, read
        by this tail a moment later, is never taken for its successor's."""
        return min((s.at for s in self.records(topic) if s.created > since), default=None)


class LedgerProbe(threading.Thread):
    """When each (order, key, adapter) side-effect row first appeared in a SQLite ledger."""

    Row = tuple[str, str, str]

    def __init__(self, path: Path, every: float = 0.2) -> None:
        super().__init__(name="ledger-probe", daemon=True)
        self.path, self.every = path, every
        self.first_seen: dict[LedgerProbe.Row, float] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def rows(self) -> set[LedgerProbe.Row]:
        """The side-effect rows now (read at once, and noted)."""
        if not self.path.exists():
            return set()
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                                    timeout=10)) as db:
                rows = {(order or "", key, adapter) for order, key, adapter in db.execute(
                    "SELECT order_id, idempotency_key, adapter FROM side_effects")}
        except sqlite3.Error:  # not migrated yet, or busy: nothing new this round
            return set(self.first_seen)
        now = time.time()
        with self._lock:
            for row in rows:
                self.first_seen.setdefault(row, now)
        return rows

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.rows()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def first_new(self, known: set[LedgerProbe.Row],
                  where: Callable[[LedgerProbe.Row], bool] | None = None) -> float | None:
        """When the first row not in ``known`` (that ``where`` accepts) appeared."""
        with self._lock:
            times = [t for row, t in self.first_seen.items()
                     if row not in known and (where is None or where(row))]
        return min(times, default=None)


# -- the processes ---------------------------------------------------------------------------
@dataclass
class Exit:
    role: str
    code: int
    at: float
    log: list[str]


@dataclass
class Supervisor:
    """One process per component; restarts those that exit on their own (and says so)."""

    pipeline: IsolatedPipeline
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, list[Path]] = field(default_factory=dict)
    unexpected: list[Exit] = field(default_factory=list)
    deaths: dict[str, list[float]] = field(default_factory=dict)  # role -> when one ended

    def start(self, role: str) -> float:
        index = len(self.pipeline.procs)
        self.procs[role] = self.pipeline.start(*COMMANDS[role], log_name=role)
        self.logs.setdefault(role, []).append(self.pipeline.state_dir / f"{role}-{index}.log")
        return time.time()

    def kill9_and_restart(self, role: str) -> tuple[float, float]:
        """SIGKILL (no shutdown, no commit, no flush), then start a new one at once."""
        proc = self.procs[role]
        assert proc.poll() is None, f"{role} was not running before its kill -9"
        killed = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.deaths.setdefault(role, []).append(killed)
        return killed, self.start(role)

    def log_tail(self, role: str, lines: int = 8) -> list[str]:
        """The last lines of a component's current log, without librdkafka's reconnect noise."""
        log = self.logs[role][-1]
        text = log.read_text(errors="replace") if log.exists() else ""
        keep = [ln.strip()[:400] for ln in text.splitlines()
                if ln.strip() and not any(n in ln for n in _NOISE)]
        return keep[-lines:]

    def log_has(self, role: str, needle: str) -> bool:
        """Whether any log of this component (this run) has ``needle``."""
        return any(needle in log.read_text(errors="replace")
                   for log in self.logs.get(role, []) if log.exists())

    def check(self) -> None:
        """Restart whatever exited by itself, as a supervisor would; record it."""
        for role, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            log = self.logs[role][-1]
            self.unexpected.append(Exit(role, code, time.time(), self.log_tail(role)))
            self.deaths.setdefault(role, []).append(time.time())
            print(f"[faults] {role} exited by itself with {code}; restarting it "
                  f"(log {log})", file=sys.stderr, flush=True)
            self.start(role)

    def stop(self, roles: Sequence[str], timeout: float = 60) -> dict[str, int]:
        """SIGTERM, then wait: each component's exit code."""
        for role in roles:
            if self.procs[role].poll() is None:
                self.procs[role].send_signal(signal.SIGTERM)
        codes = {}
        for role in roles:
            try:
                codes[role] = self.procs[role].wait(timeout)
            except subprocess.TimeoutExpired:
                self.procs[role].kill()
                codes[role] = self.procs[role].wait(10)
        return codes


def group_caught_up(bootstrap: str, group: str, topics: Sequence[str]) -> bool:
    """The group has committed, on every partition of ``topics``, the end offset there now."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False, "log_level": 0})
    try:
        metadata = consumer.list_topics(timeout=10).topics
        parts = [TopicPartition(t, p) for t in topics for p in metadata[t].partitions]
        ends = {}
        for tp in parts:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high > low:
                ends[tp.topic, tp.partition] = high
        if not ends:
            return True
        committed = consumer.committed([TopicPartition(t, p) for t, p in ends], timeout=10)
        return all(tp.offset >= ends[tp.topic, tp.partition] for tp in committed)
    except Exception:  # the broker may be busy: not caught up as far as we can tell
        return False
    finally:
        consumer.close()


def audit_verify(pipeline: IsolatedPipeline) -> subprocess.CompletedProcess[str]:
    """`revline audit verify` as an operator runs it (integrity and completeness)."""
    return subprocess.run([sys.executable, "-m", "revline.cli", "audit", "verify"],
                          env={**pipeline.env, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=180)


def describe_exits(exits: Sequence[Exit]) -> list[dict[str, Any]]:
    return [{"component": e.role, "code": e.code,
             "last_log_lines": e.log[-3:]} for e in exits]
