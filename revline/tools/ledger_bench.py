"""Ledger throughput: journal lines per second posted in batches.

    python -m revline.tools.ledger_bench postgresql://revline@127.0.0.1:55432/revline 20000

Posts the validated money events of a generated workload (fresh keys every run, so
nothing is ``already_applied``) into the ledger at ``url`` and times ``post`` only.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from revline.sinks.ledger._ledger import SqlLedger, _create_engine, normalize_url
from revline.sinks.ledger._schema import journal_lines, journals
from revline.tools.workload import WorkloadOptions, generate

MONEY_EVENTS = ("invoice_issued", "payment_captured", "refund_issued", "order_cancelled")
BATCH = 500


@dataclass(frozen=True)
class LedgerExtent:
    """What a ledger already holds: how many journals, and when the latest occurred."""

    journals: int
    latest_occurred_at: datetime | None


def next_start(extent: LedgerExtent | None) -> datetime:
    """When a run's events should start: now, or just after the ledger's latest journal.

    A live stream's events are newer than what its ledger holds, so their
    time-ordered journal ids append at the right edge of the id indexes. A run
    whose events began before journals already there would slot its ids between
    theirs (earlier runs made within days overlap: a run spans days), and every
    insert would land on a different index page, a full-page WAL image each.
    """
    now = datetime.now(UTC).replace(microsecond=0)
    if extent is None or extent.latest_occurred_at is None:
        return now
    return max(now, extent.latest_occurred_at.replace(microsecond=0) + timedelta(seconds=1))


def ledger_extent(url: str) -> LedgerExtent | None:
    """The ledger at ``url`` so far; None when it has no ledger yet."""
    engine = _create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(journals.name):
                return None
            count, latest = conn.execute(
                sa.select(sa.func.count(), sa.func.max(journals.c.occurred_at))
            ).one()
            return LedgerExtent(int(count), latest)
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Maintenance:
    """PostgreSQL's own background work so far: what can slow a timed phase."""

    vacuums: Mapping[str, int]  # table -> autovacuum + autoanalyze runs finished
    checkpoints: int
    # Running now; None when the role may not see them (needs pg_read_all_stats).
    autovacuum_workers: int | None

    def since(self, before: Maintenance) -> str:
        """What happened between ``before`` and this snapshot, for the report."""
        runs = {
            table: n - before.vacuums.get(table, 0)
            for table, n in sorted(self.vacuums.items())
            if n > before.vacuums.get(table, 0)
        }
        done = ", ".join(f"{table} ×{n}" for table, n in runs.items()) or "none"
        workers = "unknown" if before.autovacuum_workers is None else before.autovacuum_workers
        return (
            f"autovacuum/autoanalyze runs finished: {done}; "
            f"checkpoints: {self.checkpoints - before.checkpoints}; "
            f"autovacuum workers running at the start: {workers}"
        )


def maintenance(url: str) -> Maintenance | None:
    """A snapshot of PostgreSQL's autovacuum and checkpoint counters; None on SQLite."""
    if make_url(normalize_url(url)).get_backend_name() != "postgresql":
        return None
    engine = _create_engine(url)
    try:
        with engine.connect() as conn:
            vacuums = conn.execute(sa.text(
                "SELECT relname, autovacuum_count + autoanalyze_count FROM pg_stat_user_tables"
                " WHERE schemaname = current_schema()"
            )).all()  # fmt: skip
            checkpoints = conn.execute(sa.text(
                "SELECT num_timed + num_requested FROM pg_stat_checkpointer"
                if (conn.dialect.server_version_info or (0,)) >= (17,)  # moved in 17
                else "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
            )).scalar_one()  # fmt: skip
            # Other roles' backends show a NULL backend_type without pg_read_all_stats.
            workers, hidden = conn.execute(sa.text(
                "SELECT count(*) FILTER (WHERE backend_type = 'autovacuum worker'),"
                " bool_or(backend_type IS NULL) FROM pg_stat_activity"
            )).one()  # fmt: skip
        return Maintenance(
            {str(t): int(n) for t, n in vacuums},
            int(checkpoints),
            None if hidden else int(workers),
        )
    finally:
        engine.dispose()


def maintenance_since(url: str, before: Maintenance | None) -> str | None:
    """What PostgreSQL did since ``before`` (from ``maintenance(url)``), for the report.

    None on SQLite; unreadable counters become the text, not a lost benchmark result.
    """
    if before is None:
        return None
    try:
        after = maintenance(url)
    except sa.exc.SQLAlchemyError as exc:
        return f"counters unreadable: {exc}"
    return None if after is None else after.since(before)


def money_events(n_events: int, start: datetime, seed: int = 7) -> list[dict[str, Any]]:
    """Exactly ``n_events`` validated money events, occurring from ``start`` on."""
    run = f"b{uuid.uuid4().hex[:10]}"
    orders = max(10, n_events // 2)  # about 2.1 money events per generated order
    while True:
        workload = generate(WorkloadOptions(orders=orders, seed=seed, run_id=run, start=start))
        events = [
            r.event
            for r in workload.records
            if r.event is not None
            and r.expect.outcome == "validated"
            and r.event_type in MONEY_EVENTS
        ]
        if len(events) >= n_events:
            return events[:n_events]
        orders = orders * 3 // 2 + 10


def _rows(conn: sa.Connection, table: sa.Table) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def _line_count(ledger: SqlLedger) -> int:
    with ledger.engine.connect() as conn:
        return _rows(conn, journal_lines)


def bench_ledger(
    url: str,
    n_events: int,
    batch_size: int = BATCH,
    progress: Callable[[int, int], None] | None = None,
    events_from: datetime | None = None,
) -> dict[str, Any]:
    """Post ``n_events`` money events in batches; report journal lines/s and batch latency.

    ``progress(posted, total)`` is called after each batch (``revline bench`` shows it).
    The events occur from ``events_from`` on, by default ``next_start`` of the ledger.
    """
    if events_from is None:
        events_from = next_start(ledger_extent(url))
    events = money_events(n_events, events_from)
    with SqlLedger(url) as ledger:
        before = _line_count(ledger)
        statuses: dict[str, int] = {}
        latencies: list[float] = []
        pg_before = maintenance(url)
        started = time.perf_counter()
        for start in range(0, len(events), batch_size):
            t0 = time.perf_counter()
            for result in ledger.post(events[start : start + batch_size]):
                statuses[result.status] = statuses.get(result.status, 0) + 1
            latencies.append(time.perf_counter() - t0)
            if progress is not None:
                progress(min(start + batch_size, len(events)), len(events))
        elapsed = time.perf_counter() - started
        pg_work = maintenance_since(url, pg_before)
        lines = _line_count(ledger) - before
        balanced = all(tb.balanced for tb in ledger.trial_balance().values())
        backend = ledger.dialect
    latencies.sort()
    return {
        "backend": backend,
        "events": len(events),
        "batch_size": batch_size,
        "batches": len(latencies),
        "statuses": statuses,
        "journal_lines": lines,
        "seconds": round(elapsed, 3),
        "lines_per_s": round(lines / elapsed) if elapsed else 0,
        "events_per_s": round(len(events) / elapsed) if elapsed else 0,
        "batch_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else 0.0,
        "batch_max_ms": round(latencies[-1] * 1000, 1) if latencies else 0.0,
        "trial_balance_ok": balanced,
        "maintenance": pg_work,  # PostgreSQL's background work while posting
        "events_from": events_from,
        "events_until": max(e["envelope"]["occurred_at"] for e in events),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m revline.tools.ledger_bench URL [N_EVENTS]", file=sys.stderr)
        return 2
    n_events = int(args[1]) if len(args) == 2 else 20_000
    print(json.dumps(bench_ledger(args[0], n_events), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
