"""`revline chaos` at CI size (issue 18): faults on a 3-node cluster, every check holds.

300 orders (about 1,500 inputs) on a fresh plain 3-node cluster of its own: kill -9 of a
worker twice, of the sink, the auditor and the exception manager once, kill -9 of the
leader of the busiest input partition once (restarted), workers scaled 1 -> 2 -> 1, the
ERP down for 12 s, and, with REVLINE_TEST_POSTGRES_DSN and REVLINE_CHAOS_PG_RESTART set
(``.ci/run`` sets both), the chaos run's ledger in a fresh PostgreSQL database and that
server restarted once. The command's own checks decide (exit 0 only if all hold); the
figures are printed (-s). docs/chaos.md has a larger run's.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from revline.sinks.ledger._ledger import normalize_url
from revline.tools.chaos import ChaosOptions, run_chaos, table
from tests.conftest import STATE_DIR

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@contextmanager
def _fresh_database(dsn: str) -> Iterator[str]:
    """A database of this run's own on the server of ``dsn``, dropped afterwards."""
    server = sa.make_url(normalize_url(dsn))
    name = f"revline_chaos_{uuid.uuid4().hex[:12]}"
    # No pool: the run restarts the server, a pooled session would be dead by the drop.
    admin = sa.create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield server.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def test_chaos_ci_size_every_check_holds(tmp_path: Path) -> None:
    home = STATE_DIR / f"test-kafka-chaos-cluster-{os.getpid()}"
    dsn = os.environ.get("REVLINE_TEST_POSTGRES_DSN")
    restart = os.environ.get("REVLINE_CHAOS_PG_RESTART")
    postgres = bool(dsn and restart)
    with _fresh_database(dsn) if postgres and dsn else _no_database() as ledger_dsn:
        try:
            ok, summary = run_chaos(ChaosOptions(
                orders=300, seed=18, worker_kills=2, sink_kills=1, auditor_kills=1,
                exceptions_kills=1, broker_kills=1, scale_to=2, erp_outages=1, erp_down_s=12,
                pg_restarts=1 if postgres else 0, pg_restart_command=restart,
                ledger_dsn=ledger_dsn, stall_s=120, wait_s=240, cluster_home=home,
                state_dir=tmp_path / "chaos", json_out=tmp_path / "chaos-summary.json"))
        finally:
            shutil.rmtree(home, ignore_errors=True)
    print("\n" + table(summary), flush=True)
    assert summary["events_lost"] == 0 and summary["effects_doubled"] == 0
    # 6 kills, 2 scalings, 1 ERP outage, and the PostgreSQL restart when there is one
    assert sum(summary["faults"].values()) == 9 + postgres, summary["faults"]
    assert summary["ledger"] == ("postgresql" if postgres else "sqlite")
    failed = [name for name, held in summary["checks"].items() if not held]
    assert ok and not failed, (failed, {k: summary[k] for k in (
        "stalls", "unexpected_exits", "manifest_problems", "audit_verify", "reconcile",
        "dead_letter", "erp_effects", "notes")})


@contextmanager
def _no_database() -> Iterator[None]:
    yield None
