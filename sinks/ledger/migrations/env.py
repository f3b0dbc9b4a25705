"""Alembic environment of the ledger.

``SqlLedger.migrate()`` hands over its own connection, already inside the migrating
transaction and holding the migration lock (``config.attributes["connection"]``);
every revision then runs in that one transaction. From the alembic CLI the URL comes
from ``-x url=...`` and the run takes the same lock itself (a ledger written before
migrations needs ``stamp 0001_baseline`` first there; ``migrate()`` does that itself).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from revline.sinks.ledger._ledger import _create_engine, migrating
from revline.sinks.ledger._schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite alters constraints only by rebuilding the table.
        render_as_batch=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("alembic: pass the ledger database as -x url=...")
    engine = _create_engine(url)
    try:
        with migrating(engine) as conn:  # locked; SQLite: foreign keys off, checked at the end
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("the ledger's migrations run online only (SqlLedger.migrate)")
run_migrations_online()
