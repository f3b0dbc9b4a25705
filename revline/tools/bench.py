"""``revline bench``: the pipeline against a bare Faust passthrough and a raw Python loop.

One run, one broker, one generated workload (clean: no duplicates, holds, QA
faults or poison, so every input takes the pipeline's common path). Each
contender gets its own input topic pre-filled with the same encoded events
(uncompressed, see ``UNCOMPRESSED``):

* **raw** — a confluent-kafka consume → decode → encode → produce → commit loop,
  the ceiling for a Python processor;
* **faust** — a bare faust-streaming per-event passthrough agent
  (``revline/tools/_bench_faust.py``);
* **pipeline** — ``revline worker`` itself; reported as unavailable (not an
  error) when the command is missing or fails, so the harness works before it.

Sustained events/s: raw times itself from the first message consumed to the
last output acked; the others are timed from the first to the last output
record's CreateTime. Latency: once a contender has caught up, fresh events are
published into its input topic at half its sustained rate for a few seconds;
per event, output CreateTime minus input CreateTime (both stamped by producers
on this machine, so one clock).

Sinks (issue "Sinks", section Speed), on one ledger database (``--ledger-dsn``;
by default ``REVLINE_LEDGER_DSN`` when it is PostgreSQL, else SQLite in the run's
temporary directory; the report says which):

* **ledger** — journal lines/s of ``SqlLedger.post`` in batches
  (``revline/tools/ledger_bench.py``; fresh idempotency keys, so every event posts);
* **end to end** — ``revline worker`` (a subprocess, as for the pipeline
  contender) feeding a ``SinkProcessor`` in a second subprocess, as ``revline
  sink`` runs (``SqlLedger`` on the same database, the in-memory ERP, audit facts
  to a Kafka topic). The sustained
  maximum is a burst of events timed from the first publish to the sink's commit
  of the last; latency is then measured at half that rate, per event, as ledger
  commit time minus the input's CreateTime (the worker copies the input's
  timestamp onto its validated record; the sink takes its clock once the batch's
  journals and side-effect rows are committed and its audit facts acknowledged,
  as it issues the asynchronous offset commit).

Every process, topic and consumer group is unique to the run and removed after
(the ledger's journals stay: it is append-only, so point it at a scratch database).

Without Kafka (``--only erp,read-model`` runs just these):

* **ERP** (``--erp tryton``) — per-document ``apply`` against batched
  ``TrytonErp.apply_many`` on the same validated events, each on a fresh trytond
  database: events/s, RPCs per event, the ratio against ``≥ 10×``
  (``revline/tools/tryton_bench.py``);
* **read model** (``--read-model 10000,1000000``) — ``revline audit``,
  ``exceptions list`` and ``report`` on read models filled to each size: ms per
  command, the largest size against the smallest against ``≤ 2×`` and ``< 1 s``
  (``revline/tools/read_model_bench.py``);
* **backtest** (``--backtest``) — ``revline rules backtest`` against the worker's
  in-process engine on the same generated week: events/s of each, the ratio, the
  verdict against 20,000 events/s (``revline/tools/backtest_bench.py``);
* **memory** (``--memory 10000,100000,1000000``) — the worker, the exception manager and
  the auditor, each in its own child process, fed a generated history through their own
  state code: RSS and the heap of their state at each size, the largest against the
  smallest (``revline/tools/memory_bench.py``).
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
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from revline.core._gc import freeze_long_lived
from revline.core.errors import RevlineError
from revline.core.kafka_config import client_config, consumer_config, producer_config
from revline.core.settings import Settings

if TYPE_CHECKING:
    from revline.sinks._protocols import EffectResult, ErpAdapter, Event
    from revline.sinks.ledger import SqlLedger
    from revline.tools.backtest_bench import BacktestBenchOptions, BacktestBenchReport
    from revline.tools.memory_bench import MemoryBenchOptions, MemoryReport
    from revline.tools.read_model_bench import ReadModelReport
    from revline.tools.tryton_bench import Comparison

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
_CLI = [sys.executable, "-m", "revline.cli"]

# What `revline bench --only` selects from; Kafka runs only for the first three.
SECTIONS = ("contenders", "pipeline", "sinks", "erp", "read-model", "backtest", "memory")
ERPS = ("tryton",)  # adapters --erp can compare per document vs batched

# Sinks: the targets.
LEDGER_TARGET_LINES_PER_S = 10_000
E2E_P99_TARGET_MS = 250.0
# The end-to-end run's settings (flags of `revline bench`; the report lists them):
# the defaults of `revline worker` and `revline sink`. Both take what has arrived
# instead of waiting to fill a batch, so neither wait below is paid under load;
# they bound the idle wait only. (Before that, a 20 ms sink poll gave p99 221-285 ms
# at half the sustained rate and 50 ms gave 665+ ms.)
E2E_WORKER_BATCH_WITHIN_S = 0.05
E2E_SINK_BATCH = 300
E2E_SINK_POLL_TIMEOUT_S = 0.05
E2E_WARMUP_EVENTS = 200  # through worker and sink before the clock starts
# The paced publisher wakes this often (each wake costs CPU the 2 cores' worker,
# sink, broker and database share).
E2E_TICK_S = 0.01


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


@dataclass(frozen=True)
class SinkBenchOptions:
    """What the sink part of ``revline bench`` runs; ``cmd_bench`` builds it from flags."""

    ledger_url: str | None = None  # None: SQLite in the run's temporary directory
    ledger_origin: str = "no PostgreSQL configured"  # why this database, for the report
    ledger: bool = True
    ledger_events: int = 20_000
    ledger_batch: int = 500
    e2e: bool = True
    # The burst that measures the sustained maximum. Not larger: InMemoryErp looks
    # documents up by scanning them all, so its cost per event grows with the run.
    e2e_events: int = 5_000
    e2e_seconds: float = 15.0  # paced run at PACE_SHARE of it
    worker_batch_within_s: float = E2E_WORKER_BATCH_WITHIN_S
    sink_batch: int = E2E_SINK_BATCH
    sink_poll_timeout_s: float = E2E_SINK_POLL_TIMEOUT_S


@dataclass(frozen=True)
class ErpBenchOptions:
    """``--erp``: per-document against batched applies on a real ERP (tryton_bench)."""

    adapter: str = "tryton"
    events: int = 150
    batch: int = 200  # events per apply_many call (the sink's batch)


@dataclass(frozen=True)
class ReadModelBenchOptions:
    """``--read-model``: operator commands at each size (read_model_bench)."""

    sizes: tuple[int, ...] = (10_000, 1_000_000)
    runs: int = 5
    cli: bool = True  # also one CLI run per command as a new process, for context


@dataclass
class LedgerResult:
    events: int = 0
    batch_size: int = 0
    journal_lines: int = 0
    seconds: float = 0.0
    lines_per_s: float | None = None
    batch_p50_ms: float | None = None
    batch_max_ms: float | None = None
    trial_balance_ok: bool | None = None
    unavailable: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.unavailable is None and bool(self.lines_per_s)


@dataclass
class EndToEndResult:
    burst_events: int = 0  # validated records the burst should bring to the sink
    burst_committed: int = 0
    burst_seconds: float | None = None
    max_rate: float | None = None  # events/s, input published -> ledger committed
    paced_rate: float | None = None
    paced_seconds: float = 0.0
    paced_events: int = 0
    latency_samples: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # of the paced run
    # Same records, input published -> consumed by the sink: the share before the sink.
    arrival_p50_ms: float | None = None
    arrival_p99_ms: float | None = None
    # Sink time per burst event (ms) in each adapter call, from timed adapters.
    burst_busy_ms: dict[str, float] = field(default_factory=dict)
    # The paced run: how many batches, and sink ms per batch in each call.
    paced_batches: int = 0
    paced_busy_ms: dict[str, float] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # settings, for the report
    unavailable: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.unavailable is None
            and self.burst_committed == self.burst_events
            and self.latency_samples == self.paced_events > 0
        )


@dataclass
class SinkReport:
    backend: str  # postgresql | sqlite
    database: str  # the URL without a password, or where the temporary SQLite was
    origin: str  # why this database
    ledger: LedgerResult | None  # None: not requested
    e2e: EndToEndResult | None
    # Journals already in the ledger before the run: index inserts and lookups slow
    # as it grows (append-only, and earlier runs' journals stay).
    journals_before: int | None = None

    @property
    def ok(self) -> bool:
        return all(part.ok for part in (self.ledger, self.e2e) if part is not None)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(measure, measured, target, verdict)"""
        rows: list[tuple[str, str, str, str]] = []
        if (ledger := self.ledger) is not None:
            label = f"ledger journal lines/s (batches of {ledger.batch_size:,} events)"
            target = f"≥ {LEDGER_TARGET_LINES_PER_S:,}"
            if ledger.unavailable is not None:
                rows.append((label, f"unavailable: {ledger.unavailable}", target, ""))
            else:
                met = _verdict(ledger.lines_per_s, lambda v: v >= LEDGER_TARGET_LINES_PER_S)
                rows.append((label, _fmt_rate(ledger.lines_per_s), target, met))
        if (e2e := self.e2e) is not None:
            if e2e.unavailable is not None:
                unavailable = f"unavailable: {e2e.unavailable}"
                rows.append(("end to end, input → ledger commit", unavailable, "", ""))
                return rows
            rate = _fmt_rate(e2e.max_rate)
            if e2e.burst_committed != e2e.burst_events:
                rate += f" (only {e2e.burst_committed:,} of {e2e.burst_events:,} committed)"
            burst = f"end to end sustained max, events/s (burst of {e2e.burst_events:,})"
            rows.append((burst, rate, "", ""))
            at = f"at {_fmt_rate(e2e.paced_rate)} events/s"
            p99_target = f"≤ {E2E_P99_TARGET_MS:,.0f}"
            p99_met = _verdict(e2e.p99_ms, lambda v: v <= E2E_P99_TARGET_MS)
            rows += [
                (f"end to end p50 ms {at}", _fmt_ms(e2e.p50_ms), "", ""),
                (f"end to end p95 ms {at}", _fmt_ms(e2e.p95_ms), "", ""),
                (f"end to end p99 ms {at}", _fmt_ms(e2e.p99_ms), p99_target, p99_met),
                (f"end to end max ms {at}", _fmt_ms(e2e.max_ms), "", ""),
            ]
        return rows

    def lines(self) -> list[str]:
        out = [f"ledger database: {self.backend} — {self.database} ({self.origin})"]
        if self.journals_before is not None:
            out.append(f"ledger: {self.journals_before:,} journals in it before this run")
        if (ledger := self.ledger) is not None and ledger.unavailable is None:
            balance = {True: "balanced", False: "NOT balanced", None: "not checked"}
            out.append(
                f"ledger: {ledger.events:,} money events → {ledger.journal_lines:,} journal "
                f"lines in {ledger.seconds:.2f} s (post only; generation not timed); batch "
                f"p50 {_fmt_ms(ledger.batch_p50_ms)} ms, max {_fmt_ms(ledger.batch_max_ms)} ms; "
                f"trial balance {balance[ledger.trial_balance_ok]}"
            )
        if (e2e := self.e2e) is not None and e2e.unavailable is None:
            out += [f"end to end: {line}" for line in e2e.setup]
            if e2e.burst_seconds is not None:
                out.append(
                    f"end to end: burst of {e2e.burst_events:,} committed in "
                    f"{e2e.burst_seconds:.2f} s (first publish → last ledger commit); "
                    f"paced {e2e.paced_events:,} events over {e2e.paced_seconds:g} s, "
                    f"{e2e.latency_samples:,} latencies"
                )
            if e2e.arrival_p99_ms is not None:
                out.append(
                    f"end to end: of that, input published → taken by the sink (publisher "
                    f"linger, worker, two broker hops, the sink's previous batch): p50 "
                    f"{_fmt_ms(e2e.arrival_p50_ms)} ms, p99 "
                    f"{_fmt_ms(e2e.arrival_p99_ms)} ms"
                )
            if e2e.burst_busy_ms and e2e.max_rate:
                spent = ", ".join(f"{k} {v:.2f}" for k, v in sorted(e2e.burst_busy_ms.items()))
                out.append(
                    f"end to end: sink ms per event in the burst: {spent} "
                    f"(of {1000 / e2e.max_rate:.2f} ms per event overall)"
                )
            if e2e.paced_busy_ms and e2e.paced_batches:
                spent = ", ".join(f"{k} {v:.1f}" for k, v in sorted(e2e.paced_busy_ms.items()))
                out.append(
                    f"end to end: paced run in {e2e.paced_batches:,} sink batches "
                    f"({e2e.paced_events / e2e.paced_batches:,.1f} events each); ms per "
                    f"batch: {spent}"
                )
        notes = [("ledger", n) for n in (self.ledger.notes if self.ledger else [])]
        notes += [("end to end", n) for n in (self.e2e.notes if self.e2e else [])]
        out += [f"note — {name}: {n}" for name, n in notes]
        return out


@dataclass
class BenchReport:
    events: int
    partitions: int
    raw: ContenderResult | None  # None: not requested (--sinks-only)
    faust: ContenderResult | None
    pipeline: ContenderResult | None  # None: not requested (--no-pipeline)
    machine: dict[str, str]
    started_at: datetime
    duration_s: float
    pace_seconds: float
    sinks: SinkReport | None = None  # None: not requested (--no-sinks)
    erp: Comparison | None = None  # None: not requested (no --erp)
    read_model: ReadModelReport | None = None  # None: not requested (no --read-model)
    backtest: BacktestBenchReport | None = None  # None: not requested (backtest_bench)
    memory: MemoryReport | None = None  # None: not requested (memory_bench)

    @property
    def contenders(self) -> list[ContenderResult]:
        return [c for c in (self.raw, self.faust, self.pipeline) if c is not None]

    @property
    def ok(self) -> bool:
        """Everything requested was measured (targets are reported, not enforced)."""
        baselines = [c for c in (self.raw, self.faust) if c is not None]
        return (all(c.ok for c in baselines) and (self.sinks is None or self.sinks.ok)
                and all(part.ok for part in (self.erp, self.read_model, self.backtest,
                                             self.memory) if part is not None))

    @property
    def kafka(self) -> bool:
        return bool(self.contenders) or self.sinks is not None

    def _erp_header(self) -> list[str]:
        return ["ERP (Tryton)", "events/s", "RPCs per event", "seconds", "outcomes"]

    def _erp_ratio_line(self) -> str:
        from revline.tools.tryton_bench import TARGET_RATIO

        erp = self.erp
        assert erp is not None
        ratio = erp.ratio
        if ratio is None:
            return f"ERP (Tryton) batched / per document: not measured (target ≥ {TARGET_RATIO:g}×)"
        single, batched = erp.runs["single"], erp.runs["batch"]
        rpcs = (f"{sum(single.rpcs.values()) / single.events:.2f} → "
                f"{sum(batched.rpcs.values()) / batched.events:.2f} RPCs per event")
        return (f"ERP (Tryton) batched / per document: {ratio:.2f}× events/s ({rpcs}); "
                f"target ≥ {TARGET_RATIO:g}×: {erp.verdict()}")

    def _part_lines(self) -> list[str]:
        out: list[str] = []
        if self.erp is not None:
            out += self.erp.lines()
        if self.read_model is not None:
            out += self.read_model.lines()
        if self.backtest is not None:
            out += self.backtest.lines()
        if self.memory is not None:
            out += self.memory.lines()
        return out

    def _ratio(self, other: ContenderResult | None) -> float | None:
        mine = self.pipeline.events_per_s if self.pipeline is not None else None
        theirs = other.events_per_s if other is not None else None
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
        if not self.contenders:
            return []
        if self.pipeline is None:
            return ["Pipeline not measured (--no-pipeline)."]
        if self.pipeline.unavailable is not None:
            return [f"Pipeline unavailable: {self.pipeline.unavailable}"]
        if self.raw is None or self.faust is None:
            return []
        flag = "" if all(c.ok for c in self.contenders) else " — from an incomplete run, see notes"
        return [
            f"pipeline / Faust passthrough: {_fmt_ratio(self.pipeline_vs_faust)} "
            f"(target ≥ 2×){flag}",
            f"pipeline / raw loop: {_fmt_ratio(self.pipeline_vs_raw)} (target ≥ 0.5×){flag}",
        ]

    def _sink_lines(self) -> list[str]:
        if self.sinks is None and not self.kafka:
            return []  # --only without Kafka sections: nothing to say about sinks
        return (
            self.sinks.lines() if self.sinks is not None else ["Sinks not measured (--no-sinks)."]
        )

    def _machine_line(self) -> str:
        m = self.machine
        parts = [f"{self.started_at:%Y-%m-%d %H:%M} UTC"]
        if self.contenders:
            parts += [f"{self.events:,} events", f"{self.partitions} partitions"]
        parts += [
            f"nproc {m['nproc']}",
            f"load average {m['load']} at the start"
            + (f", {m['load_end']} at the end" if m.get("load_end") else ""),
            f"Python {m['python']}",
        ]
        if self.kafka:
            parts += [
                f"Kafka {m['kafka']}",
                f"confluent-kafka {m['confluent_kafka']} (librdkafka {m['librdkafka']})",
            ]
        if self.erp is not None:
            parts.append(f"trytond {m.get('trytond', '?')}")
        if self.read_model is not None:
            parts.append(f"SQLite {m.get('sqlite', '?')}")
        if self.faust is not None:
            parts.append(f"faust-streaming {m['faust']} (aiokafka {m['aiokafka']})")
        parts.append(m["platform"])
        if self.contenders:
            parts.append(
                f"latency paced at {PACE_SHARE:.0%} of each sustained rate for "
                f"{self.pace_seconds:g} s"
            )
        parts.append(f"run took {self.duration_s:.0f} s")
        return " · ".join(parts)

    def to_markdown(self) -> str:
        lines: list[str] = []
        if self.contenders:
            header = ["contender", "sustained events/s", "p50 ms", "p99 ms", "paced at events/s"]
            lines += ["| " + " | ".join(header) + " |", "|---|--:|--:|--:|--:|"]
            lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
            lines.append("")
            lines += [f"- {line}" for line in self._ratio_lines()]
            notes = [f"{c.name}: {n}" for c in self.contenders for n in c.notes]
            lines += [f"- note — {n}" for n in notes]
            lines.append("")
        if self.sinks is not None:
            lines += ["| sinks | measured | target | |", "|---|--:|--:|---|"]
            lines += ["| " + " | ".join(row) + " |" for row in self.sinks.rows()]
            lines.append("")
        lines += [f"- {line}" for line in self._sink_lines()]
        if self.erp is not None:
            lines += ["", "| " + " | ".join(self._erp_header()) + " |", "|---|--:|--:|--:|---|"]
            lines += ["| " + " | ".join(row) + " |" for row in self.erp.rows()]
            lines += ["", f"- {self._erp_ratio_line()}"]
        if (rm := self.read_model) is not None:
            lines += ["", "| " + " | ".join(rm.header()) + " |",
                      "|---|" + "--:|" * (len(rm.header()) - 2) + "---|"]
            lines += ["| " + " | ".join(row) + " |" for row in rm.rows()]
            lines.append("")
        if self.backtest is not None:
            lines += ["", *self.backtest.to_markdown(), ""]
        if self.memory is not None:
            lines += ["", *self.memory.to_markdown(), ""]
        lines += [f"- {line}" for line in self._part_lines()]
        lines += ["", f"<sub>{self._machine_line()}</sub>", ""]
        return "\n".join(lines)

    def to_rich(self) -> Any:
        from rich.console import Group, JustifyMethod, RenderableType
        from rich.table import Table
        from rich.text import Text

        parts: list[RenderableType] = []
        if self.contenders:
            table = Table(
                title=f"revline bench — {self.events:,} events, {self.partitions} partitions"
            )
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
            parts += [table, *(Text(line) for line in self._ratio_lines() + notes)]
        if self.sinks is not None:
            sinks = Table(title=f"revline bench — sinks ({self.sinks.backend} ledger)")
            sinks.add_column("sinks")
            sinks.add_column("measured", justify="right")
            sinks.add_column("target", justify="right")
            sinks.add_column("")
            for measure, measured, target, verdict in self.sinks.rows():
                style = {"met": "green", "missed": "red"}.get(verdict, "")
                sinks.add_row(measure, measured, target, Text(verdict, style=style))
            parts.append(sinks)
        parts += [Text(line) for line in self._sink_lines()]
        if self.erp is not None:
            erp = Table(title=f"revline bench — ERP (Tryton): per document vs batched, "
                              f"{self.erp.events} events")
            for name in self._erp_header():
                erp.add_column(name, justify="left" if name in ("ERP (Tryton)", "outcomes")
                               else "right")
            for row in self.erp.rows():
                erp.add_row(*(Text(cell) for cell in row))
            verdict = self.erp.verdict()
            parts += [erp, Text(self._erp_ratio_line(),
                                style={"met": "green", "missed": "red"}.get(verdict, ""))]
        if (rm := self.read_model) is not None:
            table = Table(title="revline bench — read model: operator commands by history size")
            for i, name in enumerate(rm.header()):
                table.add_column(name, justify="left" if i == 0 else "right")
            for *cells, verdict in rm.rows():
                style = {"met": "green", "missed": "red"}.get(verdict, "")
                table.add_row(*(Text(c) for c in cells), Text(verdict, style=style))
            parts.append(table)
        if self.backtest is not None:
            parts += self.backtest.to_rich()
        if self.memory is not None:
            parts += self.memory.to_rich()
        parts += [Text(line) for line in self._part_lines()]
        parts.append(Text(self._machine_line(), style="dim"))
        return Group(*parts)


def _fmt_rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _fmt_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _verdict(value: float | None, meets: Callable[[float], bool]) -> str:
    if value is None:
        return ""
    return "met" if meets(value) else "missed"


def ledger_target(explicit: str | None, configured: str) -> tuple[str | None, str]:
    """(URL or None for a temporary SQLite, why): ``--ledger-dsn``, else ``configured``
    (``settings.ledger_url``) when it is PostgreSQL. The default SQLite ledger under
    the state dir is never used: the benchmark's journals would stay in it."""
    if explicit:
        return explicit, "from --ledger-dsn"
    if _backend(configured) == "postgresql":
        return configured, "from REVLINE_LEDGER_DSN"
    return None, "REVLINE_LEDGER_DSN is not PostgreSQL, so a temporary SQLite file"


def _backend(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from revline.sinks.ledger import normalize_url

    try:
        return make_url(normalize_url(url)).get_backend_name()
    except ArgumentError:
        return "?"


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an unparsable URL)"


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
    include_baselines: bool = True,
    sinks: SinkBenchOptions | None = None,
    settings: Settings | None = None,
    erp: ErpBenchOptions | None = None,
    read_model: ReadModelBenchOptions | None = None,
    backtest: BacktestBenchOptions | None = None,
    memory: MemoryBenchOptions | None = None,
) -> BenchReport:
    """Measure raw, Faust, the pipeline and (with ``sinks``) the sinks, (with ``erp``) the
    ERP per document vs batched, (with ``read_model``) the operator commands by history
    size; see the module doc. Without the first four, no broker is needed."""
    if events < 2:
        raise RevlineError("the benchmark needs at least 2 events")
    settings = settings or Settings()
    kafka = include_baselines or include_pipeline or sinks is not None
    if bootstrap is None and kafka:
        from revline.tools.broker import resolve_bootstrap

        bootstrap, _ = resolve_bootstrap(settings.broker_home, start_if_missing=True)
    started_at = datetime.now(UTC)
    clock = time.monotonic()
    machine = _machine_info()  # before the run: the load average is other people's work
    step = progress or _no_progress
    run = (_Run(bootstrap, partitions, pace_seconds, seed, step, settings)
           if kafka and bootstrap is not None else None)
    raw = faust = pipeline = None
    sink_report = None
    erp_report = read_model_report = backtest_report = memory_report = None
    try:
        if run is not None:
            if include_baselines or include_pipeline:
                run.step("generating the workload", 0, events)
                run.prepare(events)
            if include_baselines:
                raw = run.contender("raw", _RAW_LABEL, run.bench_raw)
                faust = run.contender("faust", _FAUST_LABEL, run.bench_faust)
            if include_pipeline:
                pipeline = run.contender("pipeline", _PIPELINE_LABEL, run.bench_pipeline)
            if sinks is not None:
                sink_report = run.bench_sinks(sinks)
        if read_model is not None:
            from revline.tools import read_model_bench

            read_model_report = read_model_bench.run(
                read_model.sizes, read_model.runs, cli=read_model.cli, progress=step)
        if erp is not None:
            erp_report = bench_erp(erp, step)
        if backtest is not None:
            from revline.tools import backtest_bench

            backtest_report = backtest_bench.run(backtest, step)
        if memory is not None:
            from revline.tools import memory_bench

            memory_report = memory_bench.run(memory, step)
    finally:
        if run is not None:
            run.cleanup()
    with contextlib.suppress(OSError):
        machine["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return BenchReport(
        events=events,
        partitions=partitions,
        raw=raw,
        faust=faust,
        pipeline=pipeline,
        machine=machine,
        started_at=started_at,
        duration_s=time.monotonic() - clock,
        pace_seconds=pace_seconds,
        sinks=sink_report,
        erp=erp_report,
        read_model=read_model_report,
        backtest=backtest_report,
        memory=memory_report,
    )


def bench_erp(options: ErpBenchOptions, progress: ProgressFn) -> Comparison:
    """Per document vs batched on ``options.adapter`` (Tryton, started for the run)."""
    if options.adapter not in ERPS:
        raise RevlineError(f"no ERP comparison for {options.adapter!r}: choose {', '.join(ERPS)}")
    try:
        from revline.tools import tryton_bench
    except ImportError as exc:  # trytond is a development dependency
        raise RevlineError(f"the Tryton comparison needs trytond installed ({exc})") from exc
    return tryton_bench.compare(options.events, options.batch, progress=progress)


def _no_progress(step: str, done: int, total: int | None) -> None:
    pass


@dataclass(frozen=True)
class _Input:
    key: str
    value: bytes
    seq: int
    event_id: str
    validated: bool = True  # the workload expects it on the validated topic


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
        self,
        bootstrap: str,
        partitions: int,
        pace_seconds: float,
        seed: int,
        progress: ProgressFn,
        settings: Settings,
    ) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.pace_seconds = pace_seconds
        self.seed = seed
        self.step = progress
        self.settings = settings
        self.prefix = f"revline-bench-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        # Where the next generated events begin (see continue_from).
        self.start = datetime.now(UTC).replace(microsecond=0)
        self.tmp = Path(tempfile.mkdtemp(prefix="revline-bench-"))
        self.admin = AdminClient(client_config("admin", bootstrap, settings=settings))
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
        from revline.schemas import EventSerializer
        from revline.tools.workload import WorkloadOptions, generate

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
                    start=self.start,
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
            # The next set follows this one (a generated set spans days).
            self.start = max(self.start, env["occurred_at"] + timedelta(seconds=1))
            out.append(
                _Input(
                    rec.key,
                    encode(rec.event),
                    rec.seq,
                    str(env["event_id"]),
                    rec.expect.outcome == "validated",
                )
            )
        return out

    def continue_from(self, moment: datetime) -> None:
        """Generate events from ``moment`` on (if later): the ledger's time-ordered
        journal ids then append, as a live stream's do (see ``next_start``).
        Events generated earlier would not, so the cached paced ones are dropped."""
        if moment > self.start:
            self.start = moment
            self._fresh = []

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
        from revline.core.admin import ensure_topics

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
        from revline.operations.publisher import SOURCE_LINE_HEADER, Publisher

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

    def paced(
        self,
        topic: str,
        rate: float,
        what: str,
        *,
        seconds: float | None = None,
        tick_s: float = 0.0005,
    ) -> tuple[list[_Input], _Sent]:
        """Publish fresh events into ``topic`` at ``rate``/s for ``seconds``
        (default ``pace_seconds``), waking every ``tick_s`` to send what is due."""
        from revline.operations.publisher import SOURCE_LINE_HEADER

        n = max(20, round(rate * (self.pace_seconds if seconds is None else seconds)))
        inputs = self.fresh_inputs(n)
        sent = _Sent([0] * n, {})
        # The harness's generated events would otherwise be walked by every full
        # collection, stalling the publisher by up to ~190 ms (measured) and sending
        # what fell due meanwhile as one burst.
        freeze_long_lived()
        failures: list[str] = []

        def delivered(index: int) -> Callable[[KafkaError | None, Message], None]:
            def report(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    failures.append(err.str())
                    return
                sent.timestamps[index] = msg.timestamp()[1]
                sent.coordinates[(msg.partition() or 0, msg.offset() or 0)] = index

            return report

        producer = Producer(producer_config(self.settings, self.bootstrap) | UNCOMPRESSED)
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
            time.sleep(tick_s)
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
            sys.executable, "-m", "revline.tools.bench", "raw-loop", "--bootstrap", self.bootstrap,
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
        argv = [sys.executable, "-m", "revline.tools._bench_faust", "worker", "--without-web"]
        argv += ["-l", "warn"]
        with _Proc("Faust worker", argv, env, self.tmp) as proc, _Tail(self, sink) as tail:
            outputs = self.wait_for_outputs(tail, len(self.inputs), "Faust: sustained run", proc)
            result.processed = len({o.value for o in outputs})
            result.events_per_s = _rate([o.timestamp_ms for o in outputs])
            _note_shortfall(result)
            self.latency(result, source, sink, proc)

    # -- pipeline ------------------------------------------------------------------
    def worker_env(self, name: str, source: str) -> dict[str, str]:
        """Environment of a ``revline worker`` with its own app id, state and topics."""
        env = dict(self.env)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            REVLINE_APP_ID=self.group(name),
            REVLINE_STATE_DIR=str(self.tmp / f"{name}-state"),
            REVLINE_METRICS_PORT="0",
            REVLINE_INPUT_PARTITIONS=str(self.partitions),
            REVLINE_INPUT_TOPIC=source,
        )
        names = ["validated", "outcomes", "exceptions", "dead_letter", "reference", "ticks"]
        for kind in names:
            env[f"REVLINE_{kind.upper()}_TOPIC"] = f"{self.prefix}-{name}-{kind}"
        return env

    def load_reference(self, env: dict[str, str], what: str) -> None:
        self.step(f"{what}: loading reference data", 0, None)
        try:
            loaded = subprocess.run(
                [*_CLI, "reference", "load"], env=env, cwd=self.tmp, capture_output=True,
                text=True, timeout=120, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise BenchError("`revline reference load` did not finish within 120 s") from exc
        if loaded.returncode != 0:
            raise BenchError(
                f"`revline reference load` exited {loaded.returncode}: "
                f"{_last_line(loaded.stderr or loaded.stdout)}"
            )

    def bench_pipeline(self, result: ContenderResult) -> None:
        source = self.topic("pipeline-in")
        env = self.worker_env("pipeline", source)
        outcomes = env["REVLINE_OUTCOMES_TOPIC"]
        self.load_reference(env, "pipeline")
        self.fill(source, "pipeline")
        self.topic("pipeline-outcomes")  # so the watermarks can be read before the worker starts
        finals = _FinalOutcomes(source)
        with _Proc("revline worker", [*_CLI, "worker"], env, self.tmp) as proc:
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

    # -- sinks ---------------------------------------------------------------------
    def bench_sinks(self, options: SinkBenchOptions) -> SinkReport:
        from revline.tools.ledger_bench import ledger_extent, next_start

        url = options.ledger_url or f"sqlite:///{self.tmp / 'ledger.db'}"
        report = SinkReport(
            backend=_backend(url),
            database=_redacted(url) if options.ledger_url else "a temporary SQLite file",
            origin=options.ledger_origin,
            ledger=LedgerResult(batch_size=options.ledger_batch) if options.ledger else None,
            e2e=EndToEndResult() if options.e2e else None,
        )
        extent = ledger_extent(url)
        if extent is not None:
            report.journals_before = extent.journals
        self.continue_from(next_start(extent))
        latest = extent.latest_occurred_at if extent is not None else None
        if report.ledger is not None:
            ledger = report.ledger
            _measure(ledger, lambda: self.bench_ledger(ledger, url, options, latest))
        if report.e2e is not None:
            e2e = report.e2e
            _measure(e2e, lambda: self.bench_e2e(e2e, url, options))
        return report

    def bench_ledger(
        self, result: LedgerResult, url: str, options: SinkBenchOptions, latest: datetime | None
    ) -> None:
        """``latest``: when the ledger's latest journal occurred (None: it held none)."""
        from revline.tools.ledger_bench import bench_ledger

        self.step("ledger: generating money events", 0, None)
        figures = bench_ledger(
            url,
            options.ledger_events,
            options.ledger_batch,
            progress=lambda done, total: self.step("ledger: posting batches", done, total),
            events_from=self.start,
        )
        # The end-to-end run's events follow these.
        self.continue_from(figures["events_until"] + timedelta(seconds=1))
        result.events = int(figures["events"])
        result.journal_lines = int(figures["journal_lines"])
        result.seconds = float(figures["seconds"])
        result.lines_per_s = float(figures["lines_per_s"])
        result.batch_p50_ms = float(figures["batch_p50_ms"])
        result.batch_max_ms = float(figures["batch_max_ms"])
        result.trial_balance_ok = bool(figures["trial_balance_ok"])
        statuses: dict[str, int] = figures["statuses"]
        if statuses.get("not_applicable"):
            result.notes.append(
                f"{statuses['not_applicable']:,} of the events posted no lines "
                "(not_applicable, e.g. a cancellation with nothing to reverse)"
            )
        others = {k: v for k, v in statuses.items() if k not in ("applied", "not_applicable")}
        if others:
            result.notes.append(f"unexpected statuses: {others}")
        if figures["maintenance"] is not None:
            result.notes.append(f"PostgreSQL while posting: {figures['maintenance']}")
        events_from = f"{figures['events_from']:%Y-%m-%d %H:%M} UTC"
        if latest is None:
            result.notes.append(f"events occur from {events_from} on (the ledger held no journals)")
        else:
            result.notes.append(
                f"events occur from {events_from} on, after the ledger's latest journal "
                f"({latest:%Y-%m-%d %H:%M} UTC), as a live stream's do"
            )

    def bench_e2e(self, result: EndToEndResult, url: str, options: SinkBenchOptions) -> None:
        """Worker subprocess → validated topic → sink subprocess: burst, then paced."""
        from revline.tools.ledger_bench import maintenance, maintenance_since

        source = self.topic("e2e-in")
        env = self.worker_env("e2e", source)
        env["REVLINE_BATCH_WITHIN_S"] = str(options.worker_batch_within_s)
        # Created now: the sink subscribes before the worker would create them.
        validated = self.topic("e2e-validated")
        audit = self.topic("e2e-audit-facts")
        result.setup = [
            f"`revline worker` subprocess (batch size {self.settings.batch_size:,}, "
            f"REVLINE_BATCH_WITHIN_S={options.worker_batch_within_s:g} s) → validated "
            f"topic → SinkProcessor in its own process (batch {options.sink_batch:,}, "
            f"poll timeout {options.sink_poll_timeout_s:g} s; SqlLedger on the ledger "
            "database above; ERP: the in-memory InMemoryErp, not Tryton; audit facts to "
            "Kafka; metrics collected, not served)",
            "latency = when the batch's journals, side-effect rows and audit facts are "
            "durable (the sink then commits offsets asynchronously) − the input's CreateTime; "
            f"sustained max from a burst, then paced at {PACE_SHARE:.0%} of it for "
            f"{options.e2e_seconds:g} s in {E2E_TICK_S * 1000:g} ms ticks; "
            f"{E2E_WARMUP_EVENTS} warm-up events first",
        ]
        self.load_reference(env, "end to end")
        _settle_disk()
        tag = self.prefix[-6:]
        warmup = self._generate(E2E_WARMUP_EVENTS, f"{tag}w", self.seed + 500)
        self.step("end to end: generating the burst", 0, options.e2e_events)
        burst = self._generate(options.e2e_events, f"{tag}e", self.seed + 1000)
        producer = Producer(producer_config(self.settings, self.bootstrap) | UNCOMPRESSED)
        producer.list_topics(source, timeout=10)
        sink = _SinkChild(self, url, validated, env["REVLINE_EXCEPTIONS_TOPIC"], audit, options)
        worker = _Proc("revline worker (end to end)", [*_CLI, "worker"], env, self.tmp)
        with worker as proc, sink:
            # Group joins, Faust boot, first connections: all before any clock starts.
            self.publish(producer, source, warmup, "end to end: warming up")
            self.wait_for_commits(
                sink, _validated(warmup), "end to end: warming up", proc, startup=True
            )

            base, busy = sink.committed, sink.spent()
            result.burst_events = _validated(burst)
            started = time.monotonic()
            self.publish(producer, source, burst, "end to end: publishing the burst")
            done_at = self.wait_for_commits(
                sink, base + result.burst_events, "end to end: burst", proc, base=base
            )
            result.burst_committed = min(sink.committed - base, result.burst_events)
            if done_at is None:
                result.notes.append(
                    f"burst: {result.burst_events - result.burst_committed:,} of "
                    f"{result.burst_events:,} never committed (no progress for "
                    f"{STALL_TIMEOUT_S:.0f} s); rate is over those that were"
                )
                done_at = sink.last_commit_at
            result.burst_seconds = done_at - started
            if result.burst_committed <= 0 or result.burst_seconds <= 0:
                return
            result.max_rate = result.burst_committed / result.burst_seconds
            result.burst_busy_ms = {
                name: (spent - busy.get(name, 0.0)) * 1000 / result.burst_committed
                for name, spent in sink.spent().items()
            }

            rate = result.max_rate * PACE_SHARE
            _settle_disk()
            maintenance_before = maintenance(url)
            result.paced_rate, result.paced_seconds = rate, options.e2e_seconds
            base, mark = sink.committed, len(sink.latencies)
            busy, batches = sink.spent(), sink.batches
            arrival_mark = len(sink.arrivals)
            inputs, _ = self.paced(
                source, rate, "end to end", seconds=options.e2e_seconds, tick_s=E2E_TICK_S
            )
            result.paced_events = _validated(inputs)
            if (
                self.wait_for_commits(
                    sink, base + result.paced_events, "end to end: latency run", proc, base=base
                )
                is None
            ):
                result.notes.append("latency run: not every paced event was committed")
            latencies = sink.latencies[mark:]
            result.paced_batches = sink.batches - batches
            if result.paced_batches:
                result.paced_busy_ms = {
                    name: (spent - busy.get(name, 0.0)) * 1000 / result.paced_batches
                    for name, spent in sink.spent().items()
                }
            arrivals = sink.arrivals[arrival_mark:]
            # Named in the report: a vacuum or checkpoint here competes for the cores.
            if (pg_work := maintenance_since(url, maintenance_before)) is not None:
                result.notes.append(f"PostgreSQL during the paced run: {pg_work}")
        refused, pauses = sink.counts.get("exceptions", 0), sink.counts.get("pauses", 0)
        transient = sink.counts.get("transient_failures", 0)
        if refused:
            result.notes.append(f"the sink refused {refused:,} events")
        if pauses or transient:
            result.notes.append(f"the sink paused {pauses}× ({transient} transient failures)")
        if len(latencies) != result.paced_events:
            result.notes.append(
                f"{len(latencies):,} latencies for {result.paced_events:,} paced events"
            )
        result.latency_samples = len(latencies)
        result.latencies_ms = latencies
        if (trend := _trend(latencies)) is not None:
            result.notes.append(trend)
        if latencies:
            result.p50_ms = _percentile(latencies, 0.50)
            result.p95_ms = _percentile(latencies, 0.95)
            result.p99_ms = _percentile(latencies, 0.99)
            result.max_ms = max(latencies)
        if arrivals:
            result.arrival_p50_ms = _percentile(arrivals, 0.50)
            result.arrival_p99_ms = _percentile(arrivals, 0.99)

    def publish(self, producer: Producer, topic: str, inputs: Sequence[_Input], what: str) -> None:
        """All of ``inputs`` as fast as the producer takes them, then wait for the acks."""
        from revline.operations.publisher import SOURCE_LINE_HEADER

        failures: list[str] = []

        def report(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failures.append(err.str())

        for i, rec in enumerate(inputs, start=1):
            while True:
                try:
                    producer.produce(
                        topic,
                        value=rec.value,
                        key=rec.key.encode(),
                        headers=[(SOURCE_LINE_HEADER, str(rec.seq).encode())],
                        on_delivery=report,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: let deliveries drain
            if i % 2000 == 0:
                producer.poll(0)
                self.step(what, i, len(inputs))
        if producer.flush(60):
            raise BenchError(f"{what}: events were not all delivered within 60 s")
        if failures:
            raise BenchError(f"{what}: publishing failed: {failures[0]}")

    def wait_for_commits(
        self,
        sink: _SinkChild,
        target: int,
        what: str,
        proc: _Proc,
        *,
        base: int = 0,
        startup: bool = False,
    ) -> float | None:
        """Until the sink has committed ``target`` events in all; returns when it did
        (monotonic), or None when it stopped short (no progress for STALL_TIMEOUT_S)."""
        limit = STARTUP_TIMEOUT_S if startup else STALL_TIMEOUT_S
        seen, last_change = sink.committed, time.monotonic()
        while True:
            done = sink.committed
            if done >= target:
                return sink.reached(target)
            sink.check()
            if (failure := proc.failure()) is not None:
                raise BenchError(failure)
            now = time.monotonic()
            if done != seen:
                seen, last_change = done, now
            elif now - last_change > limit:
                if startup:
                    raise BenchError(
                        f"{what}: {done - base} of {target - base} committed, no progress "
                        f"for {limit:.0f} s; worker log: {proc.tail()}"
                    )
                return None
            self.step(what, done - base, target - base)
            # Short: the sink reports its own commit times; this only polls.
            time.sleep(0.05)


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
        from revline.schemas import DecodeError, outcome_codec

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
    from revline.schemas import DecodeError, EventDeserializer

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


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# -- processes and topics ------------------------------------------------------------
class _Proc:
    """A contender subprocess in its own session, logging to a file, always stopped.

    With ``pipe_stdout`` its stdout is a pipe for the harness to read (``stdout``)
    and only stderr goes to the log."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        workdir: Path,
        *,
        pipe_stdout: bool = False,
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name.replace(' ', '-')}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=workdir,
            stdout=subprocess.PIPE if pipe_stdout else self._log,
            stderr=self._log if pipe_stdout else subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.stdout = self.popen.stdout

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


class _SinkChild:
    """A ``SinkProcessor`` in its own process, as ``revline sink`` runs in production,
    so the paced publisher never shares its GIL. It reports each committed batch as
    a JSON line on its stdout (``sink_child``); monotonic clocks are system-wide."""

    def __init__(
        self,
        run: _Run,
        url: str,
        validated: str,
        exceptions: str,
        audit: str,
        options: SinkBenchOptions,
    ) -> None:
        self.committed = 0  # events of committed batches; written by the reader thread
        self.latencies: list[float] = []
        self.arrivals: list[float] = []
        # The child's final refusals, pauses and transient failures, once it stopped.
        self.counts: dict[str, int] = {}
        self.batches = 0
        self.error: str | None = None
        self._marks: list[tuple[float, int]] = []  # (monotonic, committed) per batch
        self._spent: dict[str, float] = {}  # adapter call / Kafka wait -> seconds
        self._ready = threading.Event()
        config = {
            "url": url,
            "bootstrap": run.bootstrap,
            "validated": validated,
            "exceptions": exceptions,
            "audit": audit,
            "group": run.group("e2e-sink"),
            "batch": options.sink_batch,
            "poll_timeout_s": options.sink_poll_timeout_s,
        }
        self.proc = _Proc(
            "bench sink",
            [sys.executable, "-m", "revline.tools.bench", "sink-child",
             "--config", json.dumps(config)],
            run.env, run.tmp, pipe_stdout=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name="bench-sink-reader", daemon=True)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = json.loads(raw)
            kind = line.pop("kind")
            if kind == "ready":
                self._ready.set()
            elif kind == "batch":
                self.latencies.extend(line["latencies"])
                self.arrivals.extend(line["arrivals"])
                self._spent = line["spent"]
                self.batches = line["batches"]
                self.committed = line["committed"]
                self._marks.append((line["at"], self.committed))
            elif kind == "counts":
                self.counts = line["counts"]
            elif kind == "error":
                self.error = line["error"]
        self._ready.set()

    def check(self) -> None:
        if self.error is not None:
            raise BenchError(f"sink: {self.error}")
        if (failure := self.proc.failure()) is not None:
            raise BenchError(failure)

    def spent(self) -> dict[str, float]:
        """Seconds so far in each adapter call and each wait on Kafka."""
        return dict(self._spent)

    def reached(self, target: int) -> float:
        """When the committed count first reached ``target``."""
        return next(t for t, n in list(self._marks) if n >= target)

    @property
    def last_commit_at(self) -> float:
        return self._marks[-1][0] if self._marks else time.monotonic()

    def __enter__(self) -> _SinkChild:
        self._reader.start()
        self._ready.wait(120)
        self.check()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop(60)
        self._reader.join(10)


def sink_child(config: dict[str, Any]) -> None:
    """The end-to-end sink (see ``_SinkChild``): runs until SIGTERM."""
    from revline.core.metrics import SinkMetrics
    from revline.sinks.processor import SinkProcessor

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def emit(kind: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"kind": kind, **fields}) + "\n")
        sys.stdout.flush()

    signal.signal(signal.SIGTERM, stop)
    busy: dict[str, float] = {}
    try:
        ledger, erp = _timed_adapters(config["url"], busy)
        with ledger:
            processor = SinkProcessor(
                config["bootstrap"], config["validated"], config["group"], ledger, erp,
                config["exceptions"], SinkMetrics(), batch_size=config["batch"],
                audit_topic=config["audit"], poll_timeout_s=config["poll_timeout_s"],
                keep_latencies=True,
            )  # fmt: skip
            stats = processor.stats
            freeze_long_lived()  # as `revline sink` does once set up
            emit("ready")
            try:
                while not stopping:
                    if processor.step():
                        waits = {f"kafka {k}": v for k, v in stats.kafka_wait_s.items()}
                        emit(
                            "batch",
                            at=time.monotonic(),
                            committed=stats.events,
                            batches=stats.batches,
                            latencies=stats.latencies_ms,
                            arrivals=stats.arrival_ms,
                            spent={**busy, **waits},
                        )
                        # Sent (arrivals of a batch still pending go with the next).
                        stats.latencies_ms.clear()
                        stats.arrival_ms.clear()
            finally:
                processor.close()
                counts = {"exceptions": stats.exceptions, "pauses": stats.pauses,
                          "transient_failures": stats.transient_failures}  # fmt: skip
                emit("counts", counts=counts)
    except Exception as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        raise


def _timed_adapters(url: str, busy: dict[str, float]) -> tuple[SqlLedger, ErpAdapter]:
    """SqlLedger and InMemoryErp that add the time of each call to ``busy``, so the
    report can say where the sink's time goes (it is the end-to-end bottleneck)."""
    from revline.sinks.erp import InMemoryErp
    from revline.sinks.ledger import EffectId, EffectRow, SideEffect, SqlLedger

    def timed(name: str, started: float) -> None:
        busy[name] = busy.get(name, 0.0) + time.perf_counter() - started

    class TimedLedger(SqlLedger):
        def post(self, events: Sequence[Event]) -> list[EffectResult]:
            started = time.perf_counter()
            try:
                return super().post(events)
            finally:
                timed("ledger post", started)

        def record_effects(self, rows: Sequence[EffectRow]) -> list[SideEffect]:
            started = time.perf_counter()
            try:
                return super().record_effects(rows)
            finally:
                timed("side-effect rows", started)

        def effects_of(
            self, effects: Iterable[EffectId], adapters: Sequence[str]
        ) -> dict[str, dict[EffectId, SideEffect]]:
            started = time.perf_counter()
            try:
                return super().effects_of(effects, adapters)
            finally:
                timed("side-effect lookups", started)

    class TimedErp(InMemoryErp):
        def apply(self, event: Event) -> EffectResult:
            started = time.perf_counter()
            try:
                return super().apply(event)
            finally:
                timed("in-memory ERP", started)

    return TimedLedger(url), TimedErp()


def _trend(latencies: Sequence[float]) -> str | None:
    """A note when latency kept rising through the paced run: the rate is not
    sustainable there, and the percentiles depend on how long the run lasted."""
    tenth = len(latencies) // 10
    if tenth < 5:
        return None
    first = _percentile(latencies[:tenth], 0.5)
    last = _percentile(latencies[-tenth:], 0.5)
    if last < 2 * first or last - first < 50:
        return None
    return (
        f"latency rose through the paced run (median of the first tenth {first:,.0f} ms, "
        f"of the last {last:,.0f} ms): the sink did not keep up at this rate"
    )


def _settle_disk() -> None:
    """Write back what earlier phases left dirty in the page cache before a timed phase.

    The ledger phase leaves ~1 GB of PostgreSQL writes dirty (measured); the kernel
    wrote them back during the paced run, where the ledger's commit fsyncs queued
    behind them (batches stalled 150-880 ms). That was the harness measuring itself."""
    if hasattr(os, "sync"):
        os.sync()


def _validated(inputs: Sequence[_Input]) -> int:
    return sum(rec.validated for rec in inputs)


def _measure(result: LedgerResult | EndToEndResult, bench: Callable[[], None]) -> None:
    """One sink measurement failing must not cost the others' figures."""
    try:
        bench()
    except BenchError as exc:
        result.unavailable = str(exc)
    except Exception as exc:
        result.unavailable = f"{type(exc).__name__}: {exc}"


class _Tail:
    """Reads a topic from the beginning (or from its current end) without a group."""

    def __init__(self, run: _Run, topic: str, *, from_end: bool = False) -> None:
        self.topic = topic
        self.consumer = Consumer(
            client_config("consumer", run.bootstrap, {
                "group.id": f"{run.prefix}-reader",  # never joined or committed
                "enable.auto.commit": False,
                "log_level": 3,
            }, settings=run.settings)
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

    from revline.tools.broker import kafka_version

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        nproc = os.cpu_count() or 0
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "nproc": str(nproc),
        "load": load,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        # The version Revline's local broker runs; an external cluster may differ.
        "kafka": kafka_version(),
        "confluent_kafka": version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "faust": version("faust-streaming"),
        "aiokafka": version("aiokafka"),
        "trytond": version("trytond"),
        "sqlite": sqlite3.sqlite_version,
    }


# -- the raw loop (runs as a subprocess, so paced publishing never shares its GIL) -----
def raw_loop(
    bootstrap: str, source: str, sink: str, group: str, sustained: int, status: Path
) -> None:
    """consume → decode → encode → produce → async commit, until SIGTERM.

    After ``sustained`` events it flushes and writes its figures to ``status``,
    then keeps serving (the paced latency run) until terminated.
    """
    from revline.core.settings import Settings
    from revline.schemas import EventDeserializer, EventSerializer

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    settings = Settings()
    consumer = Consumer(consumer_config(settings, bootstrap, group) | {"log_level": 3})
    producer = Producer(producer_config(settings, bootstrap))
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
    parser = argparse.ArgumentParser(prog="python -m revline.tools.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("raw-loop", help="the raw contender (run by run_benchmark)")
    for name in ("bootstrap", "source", "sink", "group", "status"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--sustained", type=int, required=True)
    c = sub.add_parser("sink-child", help="the end-to-end sink (run by run_benchmark)")
    c.add_argument("--config", required=True, help="JSON, see _SinkChild")
    args = parser.parse_args(argv)
    if args.command == "sink-child":
        sink_child(json.loads(args.config))
    else:
        raw_loop(
            args.bootstrap, args.source, args.sink, args.group, args.sustained, Path(args.status)
        )
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
