"""Versioned migrations of the ledger database (Alembic), run by ``SqlLedger.migrate()``.

``0001_baseline`` is the schema every ledger had before migrations existed (written
by ``metadata.create_all``); a database that has those tables but no
``alembic_version`` table is stamped with it and upgraded in place. Add a revision
with ``alembic -c sinks/ledger/migrations/alembic.ini revision -m '...'`` and write
its ``upgrade()`` by hand: SQLite changes constraints only by rebuilding a table
(``op.batch_alter_table``), which drops the table's triggers, so such a revision
drops the ledger's triggers first and re-creates them at its end (see
``0002_order_identity``).
"""

from __future__ import annotations

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
BASELINE = "0001_baseline"
