"""The read model and the ledger ride out a lost database (a PostgreSQL restart): writes
run again in a new transaction, reads are retried, start-up waits; nothing is doubled.

The outage is made on a database of the test's own: connections refused
(``ALLOW_CONNECTIONS false``) and every session of it terminated, for a few seconds, as a
restart does to the components' sessions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa

from revline.sinks._protocols import TransientSinkError
from revline.sinks.ledger import SqlLedger
from revline.sinks.ledger._ledger import normalize_url
from revline.sinks.read_model import EXCEPTIONS, ReadModel, state_row


def _admin(url: str) -> sa.Engine:
    return sa.create_engine(sa.make_url(normalize_url(url)).set(database="postgres"),
                            isolation_level="AUTOCOMMIT")


def _name(url: str) -> str:
    name = sa.make_url(normalize_url(url)).database
    assert name
    return name


def _down(admin: sa.Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")


def _up(admin: sa.Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@contextmanager
def outage(url: str, seconds: float) -> Iterator[None]:
    """The database away now, back after ``seconds`` (in the background)."""
    admin, name = _admin(url), _name(url)
    _down(admin, name)
    back = threading.Timer(seconds, _up, (admin, name))
    back.start()
    try:
        yield
    finally:
        back.join()
        admin.dispose()


def _state(i: int, status: str = "open") -> dict[str, Any]:
    return {"exception_id": f"EX-{i}", "order_id": f"SO-{i}", "check_id": "policy.price",
            "severity": "P2", "owner": "finance", "backup_owner": None, "status": status,
            "escalated": False, "opened_at_ms": 1000 + i, "sla_deadline_ms": 10**12,
            "expires_at_ms": None}


def test_a_write_interrupted_mid_transaction_runs_again_once(postgres_url: str) -> None:
    model = ReadModel(postgres_url, outage_s=30)
    try:
        with model.write() as tx:
            model.write_states(tx, [state_row(_state(i)) for i in range(3)])
        started = time.monotonic()
        with model.write() as tx:
            model.write_states(tx, [state_row(_state(0, "resolved")),
                                    state_row(_state(3))])
            with outage(postgres_url, 2.0):
                # The transaction's session is gone: this step and the one before run again.
                model.write_states(tx, [state_row(_state(4))], {("s", 0): 7})
        assert time.monotonic() - started >= 1.5
        assert model.state_count() == 5
        assert model.states(["EX-0"])["EX-0"]["status"] == "resolved"
        summary = model.active_summary()
        assert summary[("finance", "P2")][0] == 4  # EX-0 resolved: counted once, not twice
        assert model.offsets(EXCEPTIONS) == {("s", 0): 7}
    finally:
        model.close()


def test_a_lost_commit_and_reads_wait_for_the_database(postgres_url: str) -> None:
    model = ReadModel(postgres_url, outage_s=30)
    try:
        tx_cm = model.write()
        tx = tx_cm.__enter__()
        model.write_states(tx, [state_row(_state(1))])
        with outage(postgres_url, 2.0):
            tx_cm.__exit__(None, None, None)  # the commit finds the session gone: redone
            assert model.state_count() == 1  # a read while away waits for it
        assert model.active_summary()[("finance", "P2")][0] == 1
    finally:
        model.close()


def test_without_an_outage_budget_the_error_is_raised(postgres_url: str) -> None:
    model = ReadModel(postgres_url)  # outage_s=0: operator commands fail fast
    try:
        with outage(postgres_url, 1.0), pytest.raises(sa.exc.OperationalError):
            model.state_count()
    finally:
        model.close()


def test_start_up_waits_for_the_database(postgres_url: str) -> None:
    with outage(postgres_url, 2.0):
        started = time.monotonic()
        model = ReadModel(postgres_url, wait_s=30)
        ledger = SqlLedger(postgres_url, wait_s=30)
        assert time.monotonic() - started >= 1.5
    model.close()
    ledger.close()
    with outage(postgres_url, 1.0), pytest.raises(TransientSinkError, match="unavailable"):
        SqlLedger(postgres_url)  # no wait: at once, as before


def test_the_ledger_reports_a_lost_connection_as_transient_then_works(
        postgres_url: str) -> None:
    from tests.sinks.ledger_contract import invoice

    with SqlLedger(postgres_url) as ledger:
        ledger.post([invoice("SO-1", 1000, 200)])
        with outage(postgres_url, 1.5):
            with pytest.raises(TransientSinkError):
                ledger.post([invoice("SO-2", 1000, 200)])
            time.sleep(2.0)
            ledger.post([invoice("SO-2", 1000, 200)])  # back: the pool replaced its sessions
        assert len(ledger.journals_for("SO-2")) == 1
