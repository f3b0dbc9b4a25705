"""What operator commands cost on the read model at 10,000 and 1,000,000 audit records.

``python -m revline.tools.read_model_bench [--sizes 10000,1000000] [--runs 5] [--cli]``

Fills a fresh SQLite read model per size directly (bulk inserts, not through Kafka: the
point is the queries' cost): N audit records (real hash chains, 10 per order), N final
outcomes over the last 7 days, and one exception state per 20 records (opened over a
year; 300 of them, opened this week, still active). Then times, in process, the code the CLI
runs for ``revline audit ORDER_ID``, ``revline exceptions list --owner finance`` and
``revline report`` (7 days), output discarded; with ``--cli`` also the whole command
as a new process (interpreter start-up included), for context.

``revline bench --read-model 10000,1000000`` runs the same (``run``) and shows it
against the issue's targets: at the largest size, within ``TARGET_RATIO`` of the
smallest and under ``TARGET_MS``.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

DAY_MS = 86_400_000
RECORDS_PER_ORDER = 10
OWNERS = ("revenue_ops", "finance", "integrations")
NOW_MS = 1_790_000_000_000
ACTIVE_BACKLOG = 300
TARGET_RATIO = 2.0  # largest size / smallest, medians
TARGET_MS = 1000.0  # per command at the largest size

Tick = Callable[[int, int], None]
"""``tick(done, total)``: records filled so far."""


def _no_tick(_done: int, _total: int) -> None:
    pass


def fill(url: str, records: int, outcomes: int, *, seed: int = 7, tick: Tick = _no_tick
         ) -> str:
    """Fill the read model at ``url``; returns an order id that has a chain."""
    from revline.processors.audit_chain import ChainHead, Entry, canonical
    from revline.sinks.read_model import ReadModel, head_row, record_row, state_row

    rng = random.Random(seed)
    model = ReadModel(url)
    orders = max(1, records // RECORDS_PER_ORDER)
    rows: list[dict[str, Any]] = []
    heads: list[dict[str, Any]] = []
    kinds = ("received", "validated", "applied", "held", "released")

    def flush_audit() -> None:
        with model.write() as conn:
            model._upsert(conn, _t("audit_records"), rows)
            model._upsert(conn, _t("audit_heads"), heads)
        rows.clear()
        heads.clear()
        tick(done[0], records)

    done = [0]

    for o in range(orders):
        chain = f"SO-{o:08d}"
        head = ChainHead(chain)
        partition = o % 6
        base = NOW_MS - rng.randrange(365 * DAY_MS)
        for i in range(RECORDS_PER_ORDER):
            entry = Entry(fact_id=f"f:{chain}:{i}", kind=kinds[i % len(kinds)],
                          actor="revline-worker", at_ms=base + i * 1000,
                          detail={"event_type": "order_booked", "order_id": chain},
                          idempotency_key=f"{chain}:{i}", input=f"in/{partition}/{o * 10 + i}")
            record = head.append(entry)
            rows.append(record_row(partition, record, canonical(record),
                                   f"audit/{partition}/{o * 10 + i}"))
        heads.append(head_row(partition, head))
        done[0] += RECORDS_PER_ORDER
        if len(rows) >= 50_000:
            flush_audit()
    flush_audit()

    # Final outcomes over the last 7 days, counted per hour as the auditor does.
    batch: list[dict[str, Any]] = []
    checks = ("completeness.sku", "policy.discount", "dedup.conflict", "hold.timeout")
    for n in range(outcomes):
        decided = NOW_MS - rng.randrange(7 * DAY_MS)
        roll = rng.random()
        kind = ("validated" if roll < 0.85 else "exception" if roll < 0.95
                else "duplicate" if roll < 0.99 else "dead_letter")
        batch.append({
            "input_topic": "in", "input_partition": n % 6, "input_offset": n, "final": True,
            "held": rng.random() < 0.05, "kind": kind,
            "event_type": rng.choice(("order_booked", "invoice_issued", "payment_received")),
            "check_id": rng.choice(checks) if kind == "exception" else None,
            "severity": rng.choice(("P1", "P2", "P3")) if kind == "exception" else None,
            "owner": rng.choice(OWNERS) if kind == "exception" else None,
            "stage": "schema" if kind == "dead_letter" else None, "reason": None,
            "warnings": ["policy.discount"] if rng.random() < 0.02 else [],
            "occurred_at_ms": decided - rng.randrange(1, 120_000), "decided_at_ms": decided,
        })
        if len(batch) >= 50_000:
            with model.write() as conn:
                model.count_outcomes(conn, batch)
            batch.clear()
    if batch:
        with model.write() as conn:
            model.count_outcomes(conn, batch)

    # Exception states: one per 20 records, opened over a year; recent ones partly active.
    states = []
    for n in range(max(1, records // 20)):
        # The backlog (300 active, opened this week) does not grow with history; the
        # closed ones do.
        active = n < ACTIVE_BACKLOG
        opened = NOW_MS - rng.randrange((7 if active else 365) * DAY_MS)
        status = rng.choice(("open", "acknowledged")) if active else \
            rng.choice(("resolved", "waived", "expired"))
        severity = rng.choice(("P1", "P2", "P3"))
        state = {
            "exception_id": f"EX-{n:08d}", "check_id": rng.choice(checks), "severity": severity,
            "owner": rng.choice(OWNERS), "backup_owner": "revenue_ops", "status": status,
            "opened_at_ms": opened, "sla_deadline_ms": opened + 900_000,
            "expires_at_ms": opened + 30 * DAY_MS, "escalated": False, "escalated_at_ms": None,
            "acknowledged_at_ms": None if status == "open" else opened + 600_000,
            "acknowledged_by": None, "closed_at_ms": None if status in ("open", "acknowledged")
            else opened + 3_600_000, "closed_by": None, "reason_code": None, "note": None,
            "order_id": f"SO-{rng.randrange(orders):08d}", "idempotency_key": "k",
            "event_type": "order_booked", "source_system": "crm", "amount_minor": 1000,
            "currency": "EUR", "input": {"topic": "in", "partition": 0, "offset": n},
            "reason": "bench", "rules_version": "r", "ownership_version": "o",
            "ownership_rule": None, "history": [], "corrected_event_id": None,
        }
        states.append(state_row(state))
        if len(states) >= 50_000:
            with model.write() as conn:
                model.write_states(conn, states)
            states.clear()
    if states:
        with model.write() as conn:
            model.write_states(conn, states)
    model.close()
    return f"SO-{orders // 2:08d}"


def _t(name: str) -> Any:
    from revline.sinks.ledger import _schema

    return getattr(_schema, name)


@dataclass
class Timing:
    command: str
    size: int
    runs_ms: list[float]
    cli_ms: float | None = None

    def line(self) -> str:
        lo, hi = min(self.runs_ms), max(self.runs_ms)
        cli = f", CLI wall {self.cli_ms:.0f} ms" if self.cli_ms is not None else ""
        median = statistics.median(self.runs_ms)
        return (f"{self.command:<36} {self.size:>10,}  median {median:7.1f} ms  "
                f"(range {lo:.1f}–{hi:.1f}){cli}")


# The command is the program under test: a child process runs its entry point ``runs + 1``
# times (the first warms imports and SQLite's page cache) and reports each run's time, so
# the figure leaves out interpreter start-up and this tool imports nothing of the CLI.
_TIMED_CHILD = """
import contextlib, io, json, sys, time
from revline.cli import main
argv, runs = json.loads(sys.argv[1]), int(sys.argv[2])
times = []
for _ in range(runs + 1):
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        started = time.perf_counter()
        code = main(argv)
        times.append((time.perf_counter() - started) * 1000)
    if code != 0:
        sys.exit(f"exited {code}: {sink.getvalue()[-2000:]}")
print(json.dumps(times[1:]))
"""


def _timed_runs(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    result = subprocess.run([sys.executable, "-c", _TIMED_CHILD, orjson.dumps(argv).decode(),
                             str(runs)], env={**os.environ, **env}, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"revline {' '.join(argv)}: {result.stderr[-2000:]}")
    times: list[float] = orjson.loads(result.stdout.strip().splitlines()[-1])
    return times


def commands(order: str) -> list[tuple[str, list[str]]]:
    return [(f"audit {order}", ["audit", order]),
            ("exceptions list --owner finance", ["exceptions", "list", "--owner", "finance"]),
            ("report --since 7d", ["report", "--since", "7d"])]


ProgressFn = Callable[[str, int, int | None], None]
"""``progress(step, done, total)``, as ``revline bench`` takes it."""


def _no_progress(_step: str, _done: int, _total: int | None) -> None:
    pass


def measure(sizes: list[int], runs: int, *, cli: bool, workdir: Path,
            log: Callable[[str], None] = print, progress: ProgressFn = _no_progress,
            fill_seconds: dict[int, float] | None = None) -> list[Timing]:
    out: list[Timing] = []
    for size in sizes:
        state_dir = workdir / f"rm-{size}"
        state_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{state_dir / 'ledger.db'}"
        started = time.perf_counter()
        step = f"read model: filling {size:,} records"
        progress(step, 0, size)
        order = fill(url, size, size, tick=functools.partial(progress, step))
        spent = time.perf_counter() - started
        if fill_seconds is not None:
            fill_seconds[size] = spent
        log(f"filled {size:,} audit records, {size:,} outcomes, {max(1, size // 20):,} "
            f"exception states in {spent:.1f} s")
        env = {"REVLINE_STATE_DIR": str(state_dir), "REVLINE_LEDGER_DSN": url,
               "REVLINE_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
        step = f"read model: timing the commands at {size:,} records"
        for n, (label, argv) in enumerate(commands(order)):
            progress(step, n, len(commands(order)))
            timing = Timing(label, size, _timed_runs(argv, env, runs))
            if cli:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "revline.cli", *argv],
                               env={**os.environ, **env}, capture_output=True, check=True)
                timing.cli_ms = (time.perf_counter() - t0) * 1000
            log(timing.line())
            out.append(timing)
        progress(step, len(commands(order)), len(commands(order)))
    return out


@dataclass
class ReadModelReport:
    """The commands' times at each size, and the largest size against the smallest."""

    sizes: list[int]
    runs: int
    timings: list[Timing]
    fill_seconds: dict[int, float]

    def timing(self, command: str, size: int) -> Timing | None:
        return next((t for t in self.timings
                     if t.command.split()[0] == command and t.size == size), None)

    @property
    def ok(self) -> bool:
        return len(self.timings) == 3 * len(self.sizes)

    def ratio(self, command: str) -> float | None:
        if len(self.sizes) < 2:
            return None
        small = self.timing(command, min(self.sizes))
        big = self.timing(command, max(self.sizes))
        if small is None or big is None:
            return None
        return statistics.median(big.runs_ms) / statistics.median(small.runs_ms)

    def rows(self) -> list[tuple[str, ...]]:
        """(command, median (range) ms per size..., largest/smallest, verdict)"""
        out: list[tuple[str, ...]] = []
        for command in ("audit", "exceptions", "report"):
            cells: list[str] = []
            label = ""
            for size in self.sizes:
                t = self.timing(command, size)
                if t is None:
                    cells.append("–")
                    continue
                label = label or (t.command if command != "audit" else "audit ORDER_ID")
                cells.append(f"{statistics.median(t.runs_ms):.1f} "
                             f"({min(t.runs_ms):.1f}–{max(t.runs_ms):.1f})")
            ratio = self.ratio(command)
            big = self.timing(command, max(self.sizes))
            verdict = ""
            if ratio is not None and big is not None:
                met = ratio <= TARGET_RATIO and statistics.median(big.runs_ms) < TARGET_MS
                verdict = "met" if met else "missed"
            out.append((label or command, *cells,
                        "–" if ratio is None else f"{ratio:.2f}×", verdict))
        return out

    def header(self) -> tuple[str, ...]:
        big, small = max(self.sizes), min(self.sizes)
        return ("command", *(f"{s:,} records, ms" for s in self.sizes),
                f"{big:,} / {small:,}", f"≤ {TARGET_RATIO:g}×, < {TARGET_MS / 1000:g} s")

    def lines(self) -> list[str]:
        cli = [f"{t.command.split()[0]} {t.cli_ms / 1000:.2f} s @ {t.size:,}"
               for t in self.timings if t.cli_ms is not None]
        out = [f"read model: SQLite, filled directly per size (N audit records, 10 per "
               f"order; N final outcomes over 7 days; N/20 exception states, "
               f"{ACTIVE_BACKLOG} active); each command in process, {self.runs} runs after "
               f"a warm-up, median (range) ms; filling took "
               + ", ".join(f"{s:.1f} s" for _, s in sorted(self.fill_seconds.items()))]
        if cli:
            out.append("read model: CLI wall (a new process, start-up included): "
                       + ", ".join(cli))
        return out


def run(sizes: Sequence[int], runs: int = 5, *, cli: bool = True,
        workdir: Path | None = None, progress: ProgressFn = _no_progress) -> ReadModelReport:
    """``measure`` in a temporary directory (or ``workdir``), as a report."""
    fill_seconds: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="revline-read-model-bench-") as tmp:
        timings = measure(list(sizes), runs, cli=cli, workdir=workdir or Path(tmp),
                          log=lambda _: None, progress=progress, fill_seconds=fill_seconds)
    return ReadModelReport(list(sizes), runs, timings, fill_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cli", action="store_true", help="also time the CLI as a process")
    parser.add_argument("--dir", help="where the databases go (default: a temporary one)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        timings = measure(sizes, args.runs, cli=args.cli, workdir=Path(args.dir or tmp))
    by = {(t.command.split()[0], t.size): statistics.median(t.runs_ms) for t in timings}
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        for command in ("audit", "exceptions", "report"):
            ratio = by[command, big] / by[command, small]
            print(f"{command}: {big:,} / {small:,} = {ratio:.2f}x "
                  f"({by[command, big]:.1f} ms)")
    print(orjson.dumps({f"{c}@{s}": v for (c, s), v in by.items()}).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
