"""``revline bench``: the pipeline against a bare Faust passthrough and a raw Python loop.

One run, one broker, one generated workload (clean: no duplicates, holds, QA
faults or poison, so every input takes the pipeline's common path). Each
contender gets its own input topic pre-filled with the same encoded events
(uncompressed, see ``UNCOMPRESSED``):

* **raw** — a confluent-kafka consume → decode → encode → produce → commit loop,
  the ceiling for a Python processor;
* **faust** — a bare faust-streaming per-event passthrough agent
  (``revline/_bench_faust.py``);
* **pipeline** — ``revline worker`` itself; reported as unavailable (not an
  error) when the command is missing or fails, so the harness works before it.

Sustained events/s: raw times itself from the first message consumed to the
last output acked; the others are timed from the first to the last output
record's CreateTime. Latency: once a contender has caught up, fresh events are
published into its input topic at half its sustained rate for a few seconds;
per event, output CreateTime minus input CreateTime (both stamped by producers
on this machine, so one clock).

Every process, topic and consumer group is unique to the run and removed after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from revline.errors import RevlineError

ProgressFn = Callable[[str, int, int | None], None]
"""``progress(step, done, total)``; a new ``step`` text starts a new step."""

PACE_SHARE = 0.5  # paced runs publish at this share of the measured sustained rate
CONSUME_BATCH = 500
# consume() waits for a full batch or this timeout: short, or it becomes the latency.
CONSUME_TIMEOUT_S = 0.01
# Inputs go out uncompressed: the figures are about processing, not codecs, and
# aiokafka (under Faust) decodes lz4 only when cramjam is installed.
UNCOMPRESSED = {"compression.type": "none"}
STARTUP_TIMEOUT_S = 120.0  # until a processor's first output (group join, Faust boot)
STALL_TIMEOUT_S = 30.0  # no new output for this long: the contender is stuck
_RAW_LABEL = "raw confluent-kafka loop (Python ceiling)"
_FAUST_LABEL = "bare Faust passthrough agent"
_PIPELINE_LABEL = "Revline pipeline (`revline worker`)"
_STEP_NAMES = {"raw": "raw loop", "faust": "Faust", "pipeline": "pipeline"}


class BenchError(RevlineError):
    """A contender could not be measured; the reason is reported, not raised."""


# -- results -------------------------------------------------------------------------
@dataclass
class ContenderResult:
    name: str
    label: str
    expected: int = 0
    processed: int = 0  # distinct outputs of the sustained run
    events_per_s: float | None = None
    paced_rate: float | None = None
    paced_events: int = 0
    latency_samples: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    unavailable: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.unavailable is None
            and self.processed == self.expected
            and (self.events_per_s or 0) > 0
        )


@dataclass
class BenchReport:
    events: int
    partitions: int
    raw: ContenderResult
    faust: ContenderResult
    pipeline: ContenderResult | None  # None: not requested (--no-pipeline)
    machine: dict[str, str]
    started_at: datetime
    duration_s: float
    pace_seconds: float

    @property
    def contenders(self) -> list[ContenderResult]:
        return [c for c in (self.raw, self.faust, self.pipeline) if c is not None]

    def _ratio(self, other: ContenderResult) -> float | None:
        mine = self.pipeline.events_per_s if self.pipeline is not None else None
        theirs = other.events_per_s
        return mine / theirs if mine and theirs else None

    @property
    def pipeline_vs_faust(self) -> float | None:
        return self._ratio(self.faust)

    @property
    def pipeline_vs_raw(self) -> float | None:
        return self._ratio(self.raw)

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for c in self.contenders:
            if c.unavailable is not None:
                rows.append((c.label, f"unavailable: {c.unavailable}", "", "", ""))
                continue
            rate = _fmt_rate(c.events_per_s)
            if c.processed != c.expected:
                rate += f" (only {c.processed:,} of {c.expected:,} events)"
            rows.append(
                (c.label, rate, _fmt_ms(c.p50_ms), _fmt_ms(c.p99_ms), _fmt_rate(c.paced_rate))
            )
        return rows

    def _ratio_lines(self) -> list[str]:
        if self.pipeline is None:
            return ["Pipeline not measured (--no-pipeline)."]
        if self.pipeline.unavailable is not None:
            return [f"Pipeline unavailable: {self.pipeline.unavailable}"]
        flag = "" if all(c.ok for c in self.contenders) else " — from an incomplete run, see notes"
        return [
            f"pipeline / Faust passthrough: {_fmt_ratio(self.pipeline_vs_faust)} "
            f"(target ≥ 2×){flag}",
            f"pipeline / raw loop: {_fmt_ratio(self.pipeline_vs_raw)} (target ≥ 0.5×){flag}",
        ]

    def _machine_line(self) -> str:
        m = self.machine
        return (
            f"{self.started_at:%Y-%m-%d %H:%M} UTC · {self.events:,} events · "
            f"{self.partitions} partitions · nproc {m['nproc']} · Python {m['python']} · "
            f"Kafka {m['kafka']} · confluent-kafka {m['confluent_kafka']} "
            f"(librdkafka {m['librdkafka']}) · faust-streaming {m['faust']} "
            f"(aiokafka {m['aiokafka']}) · {m['platform']} · "
            f"latency paced at {PACE_SHARE:.0%} of each sustained rate for "
            f"{self.pace_seconds:g} s · run took {self.duration_s:.0f} s"
        )

    def to_markdown(self) -> str:
        header = ["contender", "sustained events/s", "p50 ms", "p99 ms", "paced at events/s"]
        lines = ["| " + " | ".join(header) + " |", "|---|--:|--:|--:|--:|"]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        lines.append("")
        lines += [f"- {line}" for line in self._ratio_lines()]
        notes = [f"{c.name}: {n}" for c in self.contenders for n in c.notes]
        lines += [f"- note — {n}" for n in notes]
        lines += ["", f"<sub>{self._machine_line()}</sub>", ""]
        return "\n".join(lines)

    def to_rich(self) -> Any:
        from rich.console import Group, JustifyMethod
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"revline bench — {self.events:,} events, {self.partitions} partitions")
        columns: list[tuple[str, JustifyMethod]] = [
            ("contender", "left"),
            ("sustained events/s", "right"),
            ("p50 ms", "right"),
            ("p99 ms", "right"),
            ("paced at /s", "right"),
        ]
        for name, justify in columns:
            table.add_column(name, justify=justify)
        for row in self._rows():
            table.add_row(*row)
        notes = [f"note — {c.name}: {n}" for c in self.contenders for n in c.notes]
        extra = [Text(line) for line in self._ratio_lines() + notes]
        return Group(table, *extra, Text(self._machine_line(), style="dim"))


def _fmt_rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _fmt_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


# -- run -----------------------------------------------------------------------------
def run_benchmark(
    events: int = 20000,
    partitions: int = 3,
    bootstrap: str | None = None,
    include_pipeline: bool = True,
    progress: ProgressFn | None = None,
    *,
    pace_seconds: float = 10.0,
    seed: int = 7,
) -> BenchReport:
    """Measure raw, Faust and (optionally) the pipeline on one broker; see the module doc."""
    if events < 2:
        raise RevlineError("the benchmark needs at least 2 events")
    if bootstrap is None:
        from revline.broker import resolve_bootstrap
        from revline.settings import Settings

        bootstrap, _ = resolve_bootstrap(Settings().broker_home, start_if_missing=True)
    started_at = datetime.now(UTC)
    clock = time.monotonic()
    run = _Run(bootstrap, partitions, pace_seconds, seed, progress or _no_progress)
    try:
        run.step("generating the workload", 0, events)
        run.prepare(events)
        raw = run.contender("raw", _RAW_LABEL, run.bench_raw)
        faust = run.contender("faust", _FAUST_LABEL, run.bench_faust)
        pipeline = (
            run.contender("pipeline", _PIPELINE_LABEL, run.bench_pipeline)
            if include_pipeline
            else None
        )
    finally:
        run.cleanup()
    return BenchReport(
        events=events,
        partitions=partitions,
        raw=raw,
        faust=faust,
        pipeline=pipeline,
        machine=_machine_info(),
        started_at=started_at,
        duration_s=time.monotonic() - clock,
        pace_seconds=pace_seconds,
    )


def _no_progress(step: str, done: int, total: int | None) -> None:
    pass


@dataclass(frozen=True)
class _Input:
    key: str
    value: bytes
    seq: int
    event_id: str


@dataclass(frozen=True)
class _Output:
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes


@dataclass
class _Sent:
    """Delivery reports of a paced run: where each input landed and its CreateTime."""

    timestamps: list[int]
    coordinates: dict[tuple[int, int], int]  # (partition, offset) -> input index


class _Run:
    def __init__(
        self, bootstrap: str, partitions: int, pace_seconds: float, seed: int, progress: ProgressFn
    ) -> None:
        from revline.settings import Settings

        self.bootstrap = bootstrap
        self.partitions = partitions
        self.pace_seconds = pace_seconds
        self.seed = seed
        self.step = progress
        self.settings = Settings()
        self.prefix = f"revline-bench-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.tmp = Path(tempfile.mkdtemp(prefix="revline-bench-"))
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.groups: list[str] = []
        self.inputs: list[_Input] = []
        self._fresh: list[_Input] = []
        self._fresh_batches = 0
        self.env = {k: v for k, v in os.environ.items() if k != "SCHEMA_REGISTRY_URL"}
        self.env["PYTHONUNBUFFERED"] = "1"

    # -- shared pieces -------------------------------------------------------------
    def prepare(self, events: int) -> None:
        self.inputs = self._generate(events, f"{self.prefix[-6:]}s", self.seed)

    def _generate(self, n: int, run_id: str, seed: int) -> list[_Input]:
        from revline.workload import WorkloadOptions, generate
        from schemas import EventSerializer

        encode = EventSerializer()
        orders = math.ceil(n / 4.5) + 10  # a clean order averages ~5 events
        while True:
            workload = generate(
                WorkloadOptions(
                    orders=orders,
                    seed=seed,
                    run_id=run_id,
                    duplicates=0,
                    conflicts=0,
                    out_of_order=0,
                    incomplete=0,
                    off_policy=0,
                    unknown_attribution=0,
                    amount_mismatch=0,
                    poison=0,
                )
            )
            if len(workload.records) >= n:
                break
            orders = math.ceil(orders * 1.25)
        # Cutting the delivery timeline keeps it clean: dependencies come earlier.
        out = []
        for rec in workload.records[:n]:
            assert rec.event is not None
            env = rec.event["envelope"]
            out.append(_Input(rec.key, encode(rec.event), rec.seq, str(env["event_id"])))
        return out

    def fresh_inputs(self, n: int) -> list[_Input]:
        """Events never seen by any contender (the pipeline would dedupe repeats)."""
        while len(self._fresh) < n:
            self._fresh_batches += 1
            self.step("generating paced events", len(self._fresh), n)
            self._fresh += self._generate(
                n - len(self._fresh),
                f"{self.prefix[-6:]}p{self._fresh_batches}",
                self.seed + self._fresh_batches,
            )
        return self._fresh[:n]

    def topic(self, name: str) -> str:
        from revline.admin import ensure_topics

        full = f"{self.prefix}-{name}"
        ensure_topics(self.bootstrap, {full: self.partitions})
        # Created is not ready: until every partition has a leader, watermark
        # reads fail with NOT_LEADER_FOR_PARTITION.
        deadline = time.monotonic() + 30
        while True:
            md = self.admin.list_topics(topic=full, timeout=10).topics.get(full)
            partitions = md.partitions.values() if md is not None and md.error is None else []
            if partitions and all(p.leader >= 0 for p in partitions):
                return full
            if time.monotonic() > deadline:
                raise BenchError(f"topic {full} has no leader after 30 s")
            time.sleep(0.1)

    def group(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        self.groups.append(full)
        return full

    def fill(self, topic: str, what: str) -> None:
        from revline.publisher import SOURCE_LINE_HEADER, Publisher

        publisher = Publisher(
            self.bootstrap, topic, settings=self.settings, extra_config=UNCOMPRESSED
        )
        total = len(self.inputs)
        for i, rec in enumerate(self.inputs, start=1):
            publisher.publish_raw(rec.key, rec.value, [(SOURCE_LINE_HEADER, str(rec.seq).encode())])
            if i % 2000 == 0 or i == total:
                self.step(f"filling the {what} input topic", i, total)
        publisher.flush()

    def contender(
        self, name: str, label: str, bench: Callable[[ContenderResult], None]
    ) -> ContenderResult:
        result = ContenderResult(name, label, expected=len(self.inputs))
        try:
            bench(result)
        except BenchError as exc:
            result.unavailable = str(exc)
        except Exception as exc:  # one contender failing must not cost the others' figures
            result.unavailable = f"{type(exc).__name__}: {exc}"
        return result

    def paced(self, topic: str, rate: float, what: str) -> tuple[list[_Input], _Sent]:
        """Publish fresh events into ``topic`` at ``rate``/s for ``pace_seconds``."""
        from revline.publisher import SOURCE_LINE_HEADER

        n = max(20, round(rate * self.pace_seconds))
        inputs = self.fresh_inputs(n)
        sent = _Sent([0] * n, {})
        failures: list[str] = []

        def delivered(index: int) -> Callable[[KafkaError | None, Message], None]:
            def report(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    failures.append(err.str())
                    return
                sent.timestamps[index] = msg.timestamp()[1]
                sent.coordinates[(msg.partition() or 0, msg.offset() or 0)] = index

            return report

        producer = Producer(self.settings.producer_config(self.bootstrap) | UNCOMPRESSED)
        # Without the topic's metadata (and producer id) ready, the first events
        # wait ~0.5 s in the producer and that would be charged to the contender.
        producer.list_topics(topic, timeout=10)
        time.sleep(0.5)
        start = time.perf_counter()
        shown = start
        i = 0
        while i < n:
            due = min(n, int((time.perf_counter() - start) * rate) + 1)
            while i < due:
                rec = inputs[i]
                producer.produce(
                    topic,
                    value=rec.value,
                    key=rec.key.encode(),
                    headers=[(SOURCE_LINE_HEADER, str(rec.seq).encode())],
                    on_delivery=delivered(i),
                )
                i += 1
            producer.poll(0)
            if time.perf_counter() - shown > 0.25:
                shown = time.perf_counter()
                self.step(f"{what}: publishing paced events at {rate:,.0f}/s", i, n)
            time.sleep(0.0005)
        if producer.flush(60):
            raise BenchError("paced events were not all delivered within 60 s")
        if failures:
            raise BenchError(f"paced publishing failed: {failures[0]}")
        return inputs, sent

    def cleanup(self) -> None:
        # Best effort throughout: a failed cleanup must never mask the figures.
        with contextlib.suppress(Exception):
            topics = self.admin.list_topics(timeout=10).topics
            names = [t for t in topics if t.startswith(self.prefix)]
            if names:
                _settle(self.admin.delete_topics(names, operation_timeout=30))
        with contextlib.suppress(Exception):
            if self.groups:
                _settle(self.admin.delete_consumer_groups(self.groups, request_timeout=10))
        shutil.rmtree(self.tmp, ignore_errors=True)

    def wait_for_outputs(
        self,
        tail: _Tail,
        target: int,
        what: str,
        proc: _Proc | None,
        done: Callable[[list[_Output]], int] | None = None,
    ) -> list[_Output]:
        """Wait until ``target`` outputs arrived (``done`` counts the useful ones).

        Only the cheap watermark count is polled while the contender works, so
        the harness does not compete with it for the two cores. A contender that
        stalls short of ``target`` returns what it produced (the caller reports
        the shortfall); one that never produces anything is an error.
        """
        records: list[_Output] = []
        useful = 0
        seen = 0
        stall_limit = STARTUP_TIMEOUT_S
        last_change = time.monotonic()
        while True:
            available = tail.available()
            if available != seen:
                seen, last_change = available, time.monotonic()
                stall_limit = STALL_TIMEOUT_S
            stalled = time.monotonic() - last_change > stall_limit
            if available >= target or (records and available > len(records)) or stalled:
                records += tail.drain()
                useful = done(records) if done else len(records)
                if useful >= target or (stalled and seen):
                    return records
            self.step(what, min(useful if done else available, target), target)
            if proc is not None and (failure := proc.failure()) is not None:
                raise BenchError(failure)
            if stalled:
                log = f"; log: {proc.tail()}" if proc is not None else ""
                raise BenchError(f"{what}: no output within {stall_limit:.0f} s{log}")
            time.sleep(0.2)

    # -- raw -----------------------------------------------------------------------
    def bench_raw(self, result: ContenderResult) -> None:
        source, sink = self.topic("raw-in"), self.topic("raw-out")
        self.fill(source, "raw")
        status = self.tmp / "raw-status.json"
        argv = [
            sys.executable, "-m", "revline.bench", "raw-loop", "--bootstrap", self.bootstrap,
            "--source", source, "--sink", sink, "--group", self.group("raw"),
            "--sustained", str(len(self.inputs)), "--status", str(status),
        ]  # fmt: skip
        # Generous: even 500 events/s would be far below any working raw loop.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S + len(self.inputs) / 500
        with _Proc("raw loop", argv, self.env, self.tmp) as proc:
            while not status.exists():
                self.step("raw loop: sustained run", 0, len(self.inputs))
                if (failure := proc.failure()) is not None:
                    raise BenchError(failure)
                if time.monotonic() > deadline:
                    raise BenchError(f"the raw loop did not finish in time; log: {proc.tail()}")
                time.sleep(0.1)
            stats = json.loads(status.read_text())
            result.processed = min(int(stats["consumed"]), int(stats["acked"]))
            result.events_per_s = float(stats["events_per_s"])
            if stats["failures"]:
                result.notes.append(f"{stats['failures']} deliveries failed")
            self.latency(result, source, sink, proc)

    # -- faust ---------------------------------------------------------------------
    def bench_faust(self, result: ContenderResult) -> None:
        source, sink = self.topic("faust-in"), self.topic("faust-out")
        self.fill(source, "Faust")
        app_id = self.group("faust")
        env = dict(self.env)
        env.update(
            REVLINE_BENCH_APP_ID=app_id,
            REVLINE_BENCH_BOOTSTRAP=self.bootstrap,
            REVLINE_BENCH_INPUT=source,
            REVLINE_BENCH_OUTPUT=sink,
            REVLINE_BENCH_PARTITIONS=str(self.partitions),
            REVLINE_BENCH_DATADIR=str(self.tmp / "faust-data"),
        )
        # --without-web: `worker` turns the web server (port 6066) back on otherwise.
        argv = [sys.executable, "-m", "revline._bench_faust", "worker", "--without-web"]
        argv += ["-l", "warn"]
        with _Proc("Faust worker", argv, env, self.tmp) as proc, _Tail(self, sink) as tail:
            outputs = self.wait_for_outputs(tail, len(self.inputs), "Faust: sustained run", proc)
            result.processed = len({o.value for o in outputs})
            result.events_per_s = _rate([o.timestamp_ms for o in outputs])
            _note_shortfall(result)
            self.latency(result, source, sink, proc)

    # -- pipeline ------------------------------------------------------------------
    def bench_pipeline(self, result: ContenderResult) -> None:
        source = self.topic("pipeline-in")
        app_id = self.group("pipeline")
        env = dict(self.env)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            REVLINE_APP_ID=app_id,
            REVLINE_STATE_DIR=str(self.tmp / "pipeline-state"),
            REVLINE_METRICS_PORT="0",
            REVLINE_INPUT_PARTITIONS=str(self.partitions),
            REVLINE_INPUT_TOPIC=source,
        )
        names = ["validated", "outcomes", "exceptions", "dead_letter", "reference", "ticks"]
        for name in names:
            env[f"REVLINE_{name.upper()}_TOPIC"] = f"{self.prefix}-pipeline-{name}"
        outcomes = env["REVLINE_OUTCOMES_TOPIC"]
        cli = [sys.executable, "-m", "revline.cli"]
        self.step("pipeline: loading reference data", 0, None)
        try:
            loaded = subprocess.run(
                [*cli, "reference", "load"], env=env, cwd=self.tmp, capture_output=True,
                text=True, timeout=120, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise BenchError("`revline reference load` did not finish within 120 s") from exc
        if loaded.returncode != 0:
            raise BenchError(
                f"`revline reference load` exited {loaded.returncode}: "
                f"{_last_line(loaded.stderr or loaded.stdout)}"
            )
        self.fill(source, "pipeline")
        self.topic("pipeline-outcomes")  # so the watermarks can be read before the worker starts
        finals = _FinalOutcomes(source)
        with _Proc("revline worker", [*cli, "worker"], env, self.tmp) as proc:
            with _Tail(self, outcomes) as tail:
                self.wait_for_outputs(
                    tail, len(self.inputs), "pipeline: sustained run", proc, finals.count
                )
            result.processed = len(finals.by_input)
            result.events_per_s = _rate(list(finals.by_input.values()))
            _note_shortfall(result, "got no final outcome")
            self.latency(result, source, outcomes, proc, pipeline=True)

    # -- latency -------------------------------------------------------------------
    def latency(
        self,
        result: ContenderResult,
        source: str,
        sink: str,
        proc: _Proc,
        *,
        pipeline: bool = False,
    ) -> None:
        """Pace fresh events into ``source`` of a running, caught-up contender."""
        if not result.events_per_s:
            return
        rate = result.events_per_s * PACE_SHARE
        with _Tail(self, sink, from_end=True) as tail:
            inputs, sent = self.paced(source, rate, _STEP_NAMES[result.name])
            result.paced_rate, result.paced_events = rate, len(inputs)
            latencies: list[int] = []
            if pipeline:
                finals = _FinalOutcomes(source)
                self.wait_for_outputs(
                    tail,
                    len(inputs),
                    f"{_STEP_NAMES[result.name]}: latency run",
                    proc,
                    finals.count,
                )
                for coords, ts in finals.by_input.items():
                    index = sent.coordinates.get(coords)
                    if index is not None:
                        latencies.append(ts - sent.timestamps[index])
            else:
                by_value = {rec.value: i for i, rec in enumerate(inputs)}
                by_id = {rec.event_id: i for i, rec in enumerate(inputs)}
                outputs = self.wait_for_outputs(
                    tail, len(inputs), f"{_STEP_NAMES[result.name]}: latency run", proc
                )
                for out in outputs:
                    index = by_value.get(out.value)
                    if index is None:  # re-encoding changed the bytes: match on event_id
                        index = by_id.get(_event_id(out.value) or "")
                    if index is not None:
                        latencies.append(out.timestamp_ms - sent.timestamps[index])
        if len(latencies) < len(inputs):
            result.notes.append(f"latency matched {len(latencies)} of {len(inputs)} paced events")
        result.latency_samples = len(latencies)
        if latencies:
            result.p50_ms = _percentile(latencies, 0.50)
            result.p99_ms = _percentile(latencies, 0.99)


def _note_shortfall(result: ContenderResult, what: str = "produced no output") -> None:
    if result.processed < result.expected:
        missing = result.expected - result.processed
        result.notes.append(
            f"{missing:,} of {result.expected:,} inputs {what} "
            f"(no progress for {STALL_TIMEOUT_S:.0f} s); rate is over those that did"
        )


class _FinalOutcomes:
    """Final outcomes of inputs from ``source``, deduplicated by input coordinates."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.by_input: dict[tuple[int, int], int] = {}  # -> the outcome's CreateTime
        self._decoded = 0

    def count(self, outputs: Sequence[_Output]) -> int:
        """Decodes what is new in ``outputs`` (all outcomes read so far)."""
        from schemas import DecodeError, outcome_codec

        codec = outcome_codec()
        for out in outputs[self._decoded :]:
            try:
                outcome = codec.decode(out.value)
            except DecodeError:
                continue
            if outcome["final"] and outcome["input_topic"] == self.source:
                coords = (int(outcome["input_partition"]), int(outcome["input_offset"]))
                self.by_input.setdefault(coords, out.timestamp_ms)  # replays repeat, never change
        self._decoded = len(outputs)
        return len(self.by_input)


def _settle(futures: dict[str, Any]) -> None:
    for fut in futures.values():
        with contextlib.suppress(Exception):
            fut.result(timeout=30)


def _event_id(value: bytes) -> str | None:
    from schemas import DecodeError, EventDeserializer

    try:
        return str(EventDeserializer().decode(value)["envelope"]["event_id"])
    except (DecodeError, KeyError):
        return None


def _rate(timestamps_ms: Sequence[int]) -> float | None:
    """Events/s between the first and the last output (n - 1 intervals)."""
    if len(timestamps_ms) < 2:
        return None
    span = max(timestamps_ms) - min(timestamps_ms)
    return (len(timestamps_ms) - 1) / (max(span, 1) / 1000)


def _percentile(values: Sequence[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# -- processes and topics ------------------------------------------------------------
class _Proc:
    """A contender subprocess in its own session, logging to a file, always stopped."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name.replace(' ', '-')}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def failure(self) -> str | None:
        code = self.popen.poll()
        if code is None:
            return None
        return f"{self.name} exited with code {code}: {self.tail()}"

    def tail(self, lines: int = 3) -> str:
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.log_path.read_text(errors="replace"))
        kept = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(kept[-lines:]) or "(no output)"

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is None:
            # Our own session: the signal reaches worker children too, nothing else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()

    def __enter__(self) -> _Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Tail:
    """Reads a topic from the beginning (or from its current end) without a group."""

    def __init__(self, run: _Run, topic: str, *, from_end: bool = False) -> None:
        self.topic = topic
        self.consumer = Consumer(
            {
                "bootstrap.servers": run.bootstrap,
                "group.id": f"{run.prefix}-reader",  # never joined or committed
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        metadata_ = self.consumer.list_topics(topic, timeout=10).topics[topic]
        self.partitions = sorted(metadata_.partitions)
        self.start: dict[int, int] = {}
        for p in self.partitions:
            low, high = self._watermarks(p)
            self.start[p] = high if from_end else low
        self.position = dict(self.start)
        self.consumer.assign([TopicPartition(topic, p, self.start[p]) for p in self.partitions])

    def _watermarks(self, partition: int) -> tuple[int, int]:
        tp = TopicPartition(self.topic, partition)
        for attempt in range(50):
            try:
                low, high = self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                return int(low), int(high)
            except KafkaException:  # e.g. a leader moving: retry, unless it persists
                if attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def available(self) -> int:
        return sum(self._watermarks(p)[1] - self.start[p] for p in self.partitions)

    def drain(self, timeout: float = 60.0) -> list[_Output]:
        """Everything from the last position up to the current end of each partition."""
        highs = {p: self._watermarks(p)[1] for p in self.partitions}
        out: list[_Output] = []
        deadline = time.monotonic() + timeout
        while any(self.position[p] < highs[p] for p in self.partitions):
            if time.monotonic() > deadline:
                raise BenchError(f"reading {self.topic} back took longer than {timeout:.0f} s")
            batch = self.consumer.consume(num_messages=5000, timeout=0.2)
            for msg in batch:
                partition, offset = msg.partition(), msg.offset()
                if msg.error() is not None or partition is None or offset is None:
                    continue
                self.position[partition] = offset + 1
                out.append(_Output(partition, offset, msg.timestamp()[1], msg.value() or b""))
            if not batch:  # transaction markers advance the position but carry no message
                for tp in self.consumer.position(
                    [TopicPartition(self.topic, p) for p in self.partitions]
                ):
                    if tp.offset >= 0:
                        self.position[tp.partition] = max(self.position[tp.partition], tp.offset)
        return out

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> _Tail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _machine_info() -> dict[str, str]:
    import confluent_kafka

    from revline.broker import kafka_version

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        nproc = os.cpu_count() or 0
    return {
        "nproc": str(nproc),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        # The version Revline's local broker runs; an external cluster may differ.
        "kafka": kafka_version(),
        "confluent_kafka": version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "faust": version("faust-streaming"),
        "aiokafka": version("aiokafka"),
    }


# -- the raw loop (runs as a subprocess, so paced publishing never shares its GIL) -----
def raw_loop(
    bootstrap: str, source: str, sink: str, group: str, sustained: int, status: Path
) -> None:
    """consume → decode → encode → produce → async commit, until SIGTERM.

    After ``sustained`` events it flushes and writes its figures to ``status``,
    then keeps serving (the paced latency run) until terminated.
    """
    from revline.settings import Settings
    from schemas import EventDeserializer, EventSerializer

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    settings = Settings()
    consumer = Consumer(settings.consumer_config(bootstrap, group) | {"log_level": 3})
    producer = Producer(settings.producer_config(bootstrap))
    decode = EventDeserializer().decode
    encode = EventSerializer()
    acked = failures = consumed = 0

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        nonlocal acked, failures
        if err is None:
            acked += 1
        else:
            failures += 1

    consumer.subscribe([source])
    first: float | None = None
    reported = False
    while not stopping:
        batch = consumer.consume(num_messages=CONSUME_BATCH, timeout=CONSUME_TIMEOUT_S)
        for msg in batch:
            if msg.error() is not None:
                continue
            if first is None:
                first = time.perf_counter()
            value = encode(decode(msg.value() or b""))
            while True:
                try:
                    producer.produce(sink, value=value, key=msg.key(), on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: let deliveries drain
            consumed += 1
        producer.poll(0)
        if batch:
            # Commits run ahead of acks: the ceiling skips the wait a correct
            # at-least-once processor must make.
            consumer.commit(asynchronous=True)
        if not reported and consumed >= sustained and first is not None:
            producer.flush(60)
            elapsed = time.perf_counter() - first
            stats = {
                "consumed": consumed,
                "acked": acked,
                "failures": failures,
                "seconds": elapsed,
                "events_per_s": consumed / elapsed,
            }
            partial = status.with_suffix(".tmp")
            partial.write_text(json.dumps(stats))
            partial.replace(status)  # the harness never reads half a file
            reported = True
    producer.flush(30)
    consumer.close()


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m revline.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("raw-loop", help="the raw contender (run by run_benchmark)")
    for name in ("bootstrap", "source", "sink", "group", "status"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--sustained", type=int, required=True)
    args = parser.parse_args(argv)
    raw_loop(args.bootstrap, args.source, args.sink, args.group, args.sustained, Path(args.status))
    return 0


# -- rich progress for the CLI -------------------------------------------------------
def rich_progress_callback(progress: Any) -> ProgressFn:
    """Adapts a started ``rich.progress.Progress``: one visible task, the current step."""
    tasks: dict[str, Any] = {}
    current: list[str] = []

    def update(step: str, done: int, total: int | None) -> None:
        if step not in tasks:
            if current:
                progress.update(tasks[current[-1]], visible=False)
            tasks[step] = progress.add_task(step, total=total)
            current.append(step)
        progress.update(tasks[step], completed=done, total=total)

    return update


if __name__ == "__main__":
    sys.exit(_main())
