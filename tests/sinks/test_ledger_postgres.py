"""The ledger contract on a real PostgreSQL server (a fresh database per test)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy.exc as sa_exc

from revline.sinks._protocols import TransientSinkError
from revline.sinks.ledger import SqlLedger
from revline.tools.ledger_bench import Maintenance, maintenance

try:  # tests/sinks may or may not become a package
    from .ledger_contract import LedgerContract, invoice
except ImportError:
    from ledger_contract import LedgerContract, invoice  # type: ignore[no-redef]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestPostgresLedger(LedgerContract):
    @pytest.fixture
    def ledger(self, postgres_url: str) -> Iterator[SqlLedger]:
        with SqlLedger(postgres_url) as ledger:
            assert ledger.dialect == "postgresql"
            yield ledger

    def test_database_refuses_truncate(self, ledger: SqlLedger) -> None:
        ledger.post([invoice("SO-1", 1000, 200)])
        for table in ("journal_lines", "journals"):
            with pytest.raises(sa_exc.IntegrityError), ledger.engine.begin() as conn:
                conn.exec_driver_sql(f"TRUNCATE {table} CASCADE")
        assert len(ledger.journals_for("SO-1")) == 1

    def test_balance_is_checked_at_commit_not_per_statement(self, ledger: SqlLedger) -> None:
        # Deferred: header first, then lines, is fine inside one transaction.
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO journals (id, idempotency_key, event_key, order_id, event_type,"
                " currency, total_debit_minor, total_credit_minor, source_ref, occurred_at,"
                " posted_at, description) VALUES ('j1', 'k1', 'k1', 'SO-9', 'invoice_issued',"
                " 'EUR', 10, 10, 't:1', now(), now(), 'raw')"
            )
            conn.exec_driver_sql(
                "INSERT INTO journal_lines VALUES ('j1', 1, 'cash', 'EUR', 10, 0),"
                " ('j1', 2, 'revenue', 'EUR', 0, 10)"
            )
        assert ledger.balances() == {("cash", "EUR"): 10, ("revenue", "EUR"): -10}

    def test_concurrent_migrations_do_not_collide(self, postgres_url: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def open_and_close(_: int) -> None:
            SqlLedger(postgres_url).close()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(open_and_close, range(4)))


def test_connection_refused_is_transient() -> None:
    url = f"postgresql://revline@127.0.0.1:{_closed_port()}/revline?connect_timeout=3"
    with pytest.raises(TransientSinkError, match="unavailable"):
        SqlLedger(url)


def test_recovers_when_its_connections_are_killed(postgres_url: str) -> None:
    import sqlalchemy as sa

    with SqlLedger(postgres_url) as ledger:
        ledger.post([invoice("SO-1", 1000, 200)])
        name = ledger.engine.url.database
        # Kill our own backends: the pool's next use finds them dead.
        admin = sa.create_engine(
            ledger.engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT"
        )
        with ledger.engine.connect() as held:
            with admin.connect() as conn:
                conn.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    f" WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                )
            with pytest.raises(sa_exc.DBAPIError):
                held.exec_driver_sql("SELECT 1")
        admin.dispose()
        # pool_pre_ping replaces the dead connection: the ledger just works again.
        assert ledger.balances()[("accounts_receivable", "EUR")] == 1200


def test_bench_names_postgres_maintenance(postgres_url: str, tmp_path: Path) -> None:
    # The benchmark reports vacuums and checkpoints that ran during its paced run.
    with SqlLedger(postgres_url) as ledger:
        ledger.post([invoice("SO-1", 1000, 200)])
    before = maintenance(postgres_url)
    assert before is not None
    assert before.autovacuum_workers is None or before.autovacuum_workers >= 0
    with SqlLedger(postgres_url) as ledger, ledger.engine.connect() as conn:
        try:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("CHECKPOINT")
            checkpointed = True
        except sa_exc.ProgrammingError:  # a role without pg_checkpoint (own server)
            checkpointed = False
    deadline = time.monotonic() + 5  # the checkpointer's counters reach the view shortly
    while True:
        after = maintenance(postgres_url)
        assert after is not None
        if after.checkpoints >= before.checkpoints + checkpointed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after.checkpoints >= before.checkpoints + checkpointed
    ran = Maintenance({**before.vacuums, "journals": before.vacuums.get("journals", 0) + 1},
                      after.checkpoints, 0)
    workers = "unknown" if before.autovacuum_workers is None else before.autovacuum_workers
    assert ran.since(before) == (
        "autovacuum/autoanalyze runs finished: journals ×1; "
        f"checkpoints: {after.checkpoints - before.checkpoints}; "
        f"autovacuum workers running at the start: {workers}"
    )
    assert maintenance(f"sqlite:///{tmp_path / 'ledger.db'}") is None
