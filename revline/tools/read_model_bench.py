"""What operator commands cost on the read model at 10,000 and 1,000,000 audit records.

``python -m revline.tools.read_model_bench [--sizes 10000,1000000] [--runs 5] [--cli]``

Fills a fresh SQLite read model per size directly (bulk inserts, not through Kafka: the
point is the queries' cost): N audit records (real hash chains, 10 per order), N final
outcomes over the last 7 days, and one exception state per 20 records (opened over a
year; 300 of them, opened this week, still active). Then times, in process, the code the CLI
runs for ``revline audit ORDER_ID``, ``revline exceptions list --owner finance`` and
``revline report`` (7 days), output discarded; with ``--cli`` also the whole command
as a new process (interpreter start-up included), for context.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

DAY_MS = 86_400_000
RECORDS_PER_ORDER = 10
OWNERS = ("revenue_ops", "finance", "integrations")
NOW_MS = 1_790_000_000_000
ACTIVE_BACKLOG = 300


def fill(url: str, records: int, outcomes: int, *, seed: int = 7) -> str:
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


def measure(sizes: list[int], runs: int, *, cli: bool, workdir: Path,
            log: Callable[[str], None] = print) -> list[Timing]:
    out: list[Timing] = []
    for size in sizes:
        state_dir = workdir / f"rm-{size}"
        state_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{state_dir / 'ledger.db'}"
        started = time.perf_counter()
        order = fill(url, size, size)
        log(f"filled {size:,} audit records, {size:,} outcomes, {max(1, size // 20):,} "
            f"exception states in {time.perf_counter() - started:.1f} s")
        env = {"REVLINE_STATE_DIR": str(state_dir), "REVLINE_LEDGER_DSN": url,
               "REVLINE_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
        for label, argv in commands(order):
            timing = Timing(label, size, _timed_runs(argv, env, runs))
            if cli:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "revline.cli", *argv],
                               env={**os.environ, **env}, capture_output=True, check=True)
                timing.cli_ms = (time.perf_counter() - t0) * 1000
            log(timing.line())
            out.append(timing)
    return out


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
