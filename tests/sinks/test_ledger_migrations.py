"""Versioned ledger migrations (Alembic) on SQLite and PostgreSQL.

The heart of it: a ledger written by the code before migrations existed (its
schema copied verbatim in ``legacy_ledger_schema.py``: ``create_all`` plus
triggers, no ``alembic_version``) is recognised as the baseline and upgraded in
place to effects identified by (order_id, idempotency_key), its data intact, its
triggers and foreign keys still refusing what they refused.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from revline.core.errors import ConfigurationError
from revline.sinks.ledger import SqlLedger, load_posting_rules
from revline.sinks.ledger._ledger import _create_engine
from revline.sinks.ledger._schema import metadata as head_metadata

try:  # tests/sinks may or may not become a package
    from . import legacy_ledger_schema as legacy
    from .ledger_contract import cancellation, count, header, insert_raw, invoice, line, payment
except ImportError:
    import legacy_ledger_schema as legacy  # type: ignore[no-redef]
    from ledger_contract import (  # type: ignore[no-redef]
        cancellation,
        count,
        header,
        insert_raw,
        invoice,
        line,
        payment,
    )

HEAD = "0004_exception_counts"
LEGACY_NS = uuid.UUID("5b0f6f43-3c59-4d0e-9d55-2f6f0b7f3e11")  # the old code's journal ids
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SQLITE_TRIGGERS = {
    "journal_lines_sealed", "journals_balanced_on_insert", "journals_no_update",
    "journals_no_delete", "journal_lines_no_update", "journal_lines_no_delete",
}  # fmt: skip
POSTGRES_TRIGGERS = {
    f"{table}_{name}" for table in ("journals", "journal_lines")
    for name in ("append_only", "no_truncate", "balance_at_commit")
}  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
    else:
        yield request.getfixturevalue("postgres_url")


# -- a ledger written by the old code ----------------------------------------------------
def _journal(order: str, key: str, event_type: str, amounts: list[tuple[str, int, int]],
             *, event_key: str | None = None, reverses: str | None = None,
             minutes: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    jid = str(uuid.uuid5(LEGACY_NS, key))  # the uuid5 ids the old code gave
    total = sum(d for _, d, _ in amounts)
    head = {
        "id": jid, "idempotency_key": key, "event_key": event_key or key, "order_id": order,
        "event_type": event_type, "currency": "EUR", "total_debit_minor": total,
        "total_credit_minor": total, "source_ref": f"netsuite:{key}",
        "occurred_at": T0 + timedelta(minutes=minutes), "posted_at": T0 + timedelta(hours=1),
        "reverses_journal_id": reverses, "description": f"legacy {event_type}",
    }  # fmt: skip
    lines = [
        {"journal_id": jid, "line_no": n, "account": a, "currency": "EUR",
         "debit_minor": d, "credit_minor": c}
        for n, (a, d, c) in enumerate(amounts, start=1)
    ]  # fmt: skip
    return head, lines


def _effect(key: str, adapter: str, status: str, refs: dict[str, str]) -> dict[str, Any]:
    return {"idempotency_key": key, "adapter": adapter, "external_ref": json.dumps(refs),
            "status": status, "attempts": 1, "applied_at": T0, "detail": ""}  # fmt: skip


def write_legacy_ledger(url: str) -> dict[str, str]:
    """Create the old schema with the old code's DDL and fill it; returns journal ids."""
    inv1 = _journal("SO-1", "SO-1:invoice:1", "invoice_issued",
                    [("accounts_receivable", 1200, 0), ("revenue", 0, 1000),
                     ("tax_payable", 0, 200)], minutes=1)  # fmt: skip
    pay1 = _journal("SO-1", "SO-1:capture:1", "payment_captured",
                    [("cash", 1200, 0), ("accounts_receivable", 0, 1200)], minutes=2)
    inv2 = _journal("SO-2", "SO-2:invoice:1", "invoice_issued",
                    [("accounts_receivable", 500, 0), ("revenue", 0, 500)], minutes=3)
    note_key = f"SO-2:cancelled:reverses:{inv2[0]['id']}"
    note2 = _journal("SO-2", note_key, "order_cancelled",
                     [("revenue", 500, 0), ("accounts_receivable", 0, 500)],
                     event_key="SO-2:cancelled", reverses=inv2[0]["id"], minutes=4)
    journals = [inv1, pay1, inv2, note2]
    effects = [
        _effect("SO-1:invoice:1", "ledger", "applied", {"journal": inv1[0]["id"]}),
        _effect("SO-1:invoice:1", "erp", "applied", {"sale": "7", "invoice": "9"}),
        _effect("SO-1:capture:1", "ledger", "applied", {"journal": pay1[0]["id"]}),
        _effect("SO-2:cancelled", "ledger", "applied", {"journal": note2[0]["id"]}),
        _effect("SO-2:cancelled", "erp", "applied", {"credit_note": "3"}),
        # No journal names these keys: their order cannot be derived.
        _effect("SO-1:booked", "erp", "applied", {"sale": "7"}),
        _effect("SO-3:amend:1", "erp", "refused", {}),
        _effect("SO-9:invoice:1", "ledger", "refused", {}),
    ]
    engine = _create_engine(url)  # the ledger's connection settings (SQLite pragmas)
    try:
        with engine.begin() as conn:
            legacy.create_schema(conn)
            conn.execute(legacy.accounts.insert(), [
                {"code": a.code, "name": a.name, "kind": a.kind}
                for a in load_posting_rules().accounts
            ])  # fmt: skip
            # Lines before their header: the old SQLite trigger seals a journal on insert.
            for head, lines in journals:
                conn.execute(legacy.journal_lines.insert(), lines)
                conn.execute(legacy.journals.insert(), [head])
            conn.execute(legacy.side_effects.insert(), effects)
        with engine.connect() as conn:
            assert "alembic_version" not in sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()
    return {"inv1": inv1[0]["id"], "pay1": pay1[0]["id"], "inv2": inv2[0]["id"],
            "note2": note2[0]["id"]}  # fmt: skip


# -- checks ----------------------------------------------------------------------------
def version(ledger: SqlLedger) -> list[str]:
    with ledger.engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars())


def triggers(ledger: SqlLedger) -> set[str]:
    with ledger.engine.connect() as conn:
        if ledger.dialect == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        else:
            sql = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
        return set(conn.exec_driver_sql(sql).scalars())


def unique_keys(ledger: SqlLedger, table: str) -> set[tuple[str, ...]]:
    with ledger.engine.connect() as conn:
        inspector = sa.inspect(conn)
        keys = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)}
        keys |= {tuple(str(c) for c in i["column_names"])
                 for i in inspector.get_indexes(table) if i["unique"]}  # fmt: skip
        pk = inspector.get_pk_constraint(table)["constrained_columns"]
        if pk:
            keys.add(("PRIMARY KEY", *pk))
        return keys


def assert_schema_is_head(ledger: SqlLedger) -> None:
    assert version(ledger) == [HEAD]
    with ledger.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), head_metadata)
    assert diffs == [], diffs
    want = SQLITE_TRIGGERS if ledger.dialect == "sqlite" else POSTGRES_TRIGGERS
    assert triggers(ledger) >= want
    assert ("order_id", "idempotency_key") in unique_keys(ledger, "journals")
    assert ("idempotency_key",) not in unique_keys(ledger, "journals")
    effects = unique_keys(ledger, "side_effects")
    assert ("order_id", "idempotency_key", "adapter") in effects
    assert ("PRIMARY KEY", "idempotency_key", "adapter") not in effects
    if ledger.dialect == "sqlite":
        with ledger.engine.connect() as conn:  # the migration turned it off for itself only
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []


def assert_database_still_refuses(ledger: SqlLedger) -> None:
    """The triggers and foreign keys survived (SQLite rebuilt journals and side_effects)."""
    ledger.post([invoice("SO-R", 10, 0)])  # something for UPDATE and DELETE to touch
    before = (count(ledger, "journals"), count(ledger, "journal_lines"))
    jid = str(uuid.uuid4())
    unbalanced = ("journal_lines", [line(jid, 1, "accounts_receivable", 1000, 0),
                                    line(jid, 2, "revenue", 0, 900)])  # fmt: skip
    with pytest.raises(sa_exc.IntegrityError):
        insert_raw(ledger, unbalanced, ("journals", [header(jid, 1000)]))
    with pytest.raises(sa_exc.IntegrityError):  # lines without a header
        insert_raw(ledger, ("journal_lines", [line(jid, 1, "cash", 10, 0),
                                              line(jid, 2, "revenue", 0, 10)]))  # fmt: skip
    with pytest.raises(sa_exc.IntegrityError):  # another currency than the header's
        insert_raw(ledger, ("journal_lines", [line(jid, 1, "cash", 10, 0),
                                              line(jid, 2, "revenue", 0, 10, currency="USD")]),
                   ("journals", [header(jid, 10)]))  # fmt: skip
    with pytest.raises(sa_exc.IntegrityError):  # reverses a journal that does not exist
        insert_raw(ledger, ("journal_lines", [line(jid, 1, "cash", 10, 0),
                                              line(jid, 2, "revenue", 0, 10)]),
                   ("journals", [{**header(jid, 10), "reverses_journal_id": "nope"}]))
    for statement in ("UPDATE journals SET description = 'edited'",
                      "DELETE FROM journal_lines", "DELETE FROM journals"):  # fmt: skip
        with pytest.raises(sa_exc.IntegrityError), ledger.engine.begin() as conn:
            conn.exec_driver_sql(statement)
    assert (count(ledger, "journals"), count(ledger, "journal_lines")) == before


# -- tests -----------------------------------------------------------------------------
def test_an_empty_database_is_migrated_to_head(url: str) -> None:
    with SqlLedger(url) as ledger:
        assert_schema_is_head(ledger)
        assert_database_still_refuses(ledger)
        ledger.migrate()  # again: nothing to do
        assert version(ledger) == [HEAD]


def test_a_legacy_ledger_is_upgraded_in_place(url: str) -> None:
    ids = write_legacy_ledger(url)
    engine = _create_engine(url)
    with engine.connect() as conn:
        lines_before = conn.execute(
            sa.select(legacy.journal_lines).order_by(
                legacy.journal_lines.c.journal_id, legacy.journal_lines.c.line_no)
        ).all()
        journals_before = conn.execute(
            sa.select(legacy.journals).order_by(legacy.journals.c.id)).all()
    engine.dispose()

    with SqlLedger(url) as ledger:
        assert_schema_is_head(ledger)
        with ledger.engine.connect() as conn:
            assert conn.execute(
                sa.select(legacy.journal_lines).order_by(
                    legacy.journal_lines.c.journal_id, legacy.journal_lines.c.line_no)
            ).all() == lines_before
            assert conn.execute(
                sa.select(legacy.journals).order_by(legacy.journals.c.id)).all() == journals_before

        # Backfilled from the journals; NULL where no journal names the key.
        orders = {(e.idempotency_key, e.adapter): e.order_id for e in ledger.all_effects()}
        assert orders == {
            ("SO-1:invoice:1", "ledger"): "SO-1", ("SO-1:invoice:1", "erp"): "SO-1",
            ("SO-1:capture:1", "ledger"): "SO-1",
            ("SO-2:cancelled", "ledger"): "SO-2", ("SO-2:cancelled", "erp"): "SO-2",
            ("SO-1:booked", "erp"): None, ("SO-3:amend:1", "erp"): None,
            ("SO-9:invoice:1", "ledger"): None,
        }  # fmt: skip
        erp = ledger.effects_for([("SO-1", "SO-1:invoice:1"), ("SO-1", "SO-1:booked"),
                                  ("SO-2", "SO-1:invoice:1")], "erp")  # fmt: skip
        assert set(erp) == {("SO-1", "SO-1:invoice:1"), ("SO-1", "SO-1:booked")}
        assert erp[("SO-1", "SO-1:booked")].order_id is None  # legacy: matched by its key

        # Old events replayed: found under their legacy ids, nothing posted twice.
        replay = ledger.post([invoice("SO-1", 1000, 200), payment("SO-1", 1200),
                              cancellation("SO-2")])  # fmt: skip
        assert [r.status for r in replay] == ["already_applied"] * 3
        assert [r.external_refs["journal"] for r in replay] == [
            ids["inv1"], ids["pay1"], ids["note2"]]
        assert count(ledger, "journals") == 4

        # The same key for a second order is now a second effect.
        other = invoice("SO-7", 300, 0)
        other["envelope"]["idempotency_key"] = "SO-1:invoice:1"
        [posted] = ledger.post([other])
        assert posted.status == "applied" and posted.order_id == "SO-7"
        assert posted.external_refs["journal"] != ids["inv1"]
        [cancelled] = ledger.post([cancellation("SO-1")])
        assert cancelled.status == "applied"  # reverses SO-1's legacy invoice, not SO-7's
        [note] = [j for j in ledger.journals_for("SO-1") if j.reverses_journal_id]
        assert note.reverses_journal_id == ids["inv1"]
        ledger.record_effect("SO-7", "SO-1:invoice:1", "erp", {}, "refused", 1, "no")
        both = ledger.effects_for([("SO-1", "SO-1:invoice:1"), ("SO-7", "SO-1:invoice:1")],
                                  "erp")
        assert [both[k].status for k in sorted(both)] == ["applied", "refused"]
        assert all(tb.balanced for tb in ledger.trial_balance().values())

        assert_database_still_refuses(ledger)
        ledger.migrate()
        assert version(ledger) == [HEAD]


def test_exception_states_written_before_the_counts_are_counted(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from revline.sinks.ledger._ledger import migrating
    from revline.sinks.ledger._schema import exception_counts, exception_states
    from revline.sinks.ledger.migrations import MIGRATIONS_DIR

    engine = _create_engine(url)
    with migrating(engine) as conn:  # a read model as 0003 left it, with states
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.upgrade(config, "0003_read_model")
        assert "exception_counts" not in sa.inspect(conn).get_table_names()
        conn.execute(exception_states.insert(), [
            {"exception_id": f"EX-{i}", "order_id": None, "check_id": "policy.a",
             "severity": ("P1", "P2")[i % 2], "owner": "finance",
             "backup_owner": None if i % 3 else "revenue_ops", "status": ("open", "waived")[i % 2],
             "escalated": i % 5 == 0, "opened_at_ms": i, "sla_deadline_ms": i,
             "expires_at_ms": None, "state": "{}"} for i in range(30)])
    engine.dispose()
    with SqlLedger(url) as ledger:
        assert_schema_is_head(ledger)
        with ledger.engine.connect() as conn:
            counts = {tuple(r[:-1]): r[-1] for r in conn.execute(sa.select(exception_counts))}
    want: dict[tuple[Any, ...], int] = {}
    for i in range(30):
        key = (("open", "waived")[i % 2], "finance", "" if i % 3 else "revenue_ops",
               i % 5 == 0, ("P1", "P2")[i % 2])
        want[key] = want.get(key, 0) + 1
    assert counts == want


def test_concurrent_starts_on_a_legacy_ledger_migrate_it_once(url: str) -> None:
    write_legacy_ledger(url)
    starts = 4
    barrier = threading.Barrier(starts)

    def start(_: int) -> list[str]:
        barrier.wait()
        with SqlLedger(url) as ledger:
            return version(ledger)

    with ThreadPoolExecutor(starts) as pool:
        assert list(pool.map(start, range(starts))) == [[HEAD]] * starts
    with SqlLedger(url) as ledger:
        assert_schema_is_head(ledger)
        assert count(ledger, "journals") == 4 and len(ledger.all_effects()) == 8


def test_a_database_with_only_some_ledger_tables_is_refused(url: str) -> None:
    engine = _create_engine(url)
    with engine.begin() as conn:
        legacy.accounts.create(conn)
    engine.dispose()
    with pytest.raises(ConfigurationError, match="journal_lines"):
        SqlLedger(url)
