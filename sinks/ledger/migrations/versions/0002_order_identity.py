"""An effect is (order_id, idempotency_key): journals and side effects keyed per order.

* journals: UNIQUE (idempotency_key) becomes UNIQUE (order_id, idempotency_key);
* side_effects: a nullable ``order_id`` column; the primary key (idempotency_key,
  adapter) becomes UNIQUE (order_id, idempotency_key, adapter), plus a partial
  unique index keeping legacy rows (order_id NULL) unique per (key, adapter);
* backfill: side_effects.order_id from the journals of its key (journals.event_key
  -> order_id, unambiguous while keys were unique). Rows no journal names (ERP rows
  of events that post nothing, refusals) keep NULL: "legacy, written before
  per-order identity"; a lookup for (order, key) also matches them (see
  ``revline.sinks.ledger._schema.side_effects``).

On SQLite both tables are rebuilt (batch mode): every ledger trigger is dropped first
and re-created at the end, and ``SqlLedger.migrate`` runs this with foreign keys off
and checks them (PRAGMA foreign_key_check) before committing.

Revision ID: 0002_order_identity
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from revline.sinks.ledger._schema import drop_sqlite_triggers, install_triggers
from revline.sinks.ledger.migrations import _baseline

revision = "0002_order_identity"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

_LEGACY_WHERE = sa.text("order_id IS NULL")


def upgrade() -> None:
    conn = op.get_bind()
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        drop_sqlite_triggers(conn)

    with op.batch_alter_table("journals", copy_from=_baseline.journals) as batch:
        batch.drop_constraint("journals_idempotency_key_key", type_="unique")
        batch.create_unique_constraint("journals_order_key", ["order_id", "idempotency_key"])

    with op.batch_alter_table("side_effects", copy_from=_baseline.side_effects) as batch:
        batch.add_column(sa.Column("order_id", sa.Text, nullable=True))
        batch.drop_constraint("side_effects_pkey", type_="primary")
        batch.create_unique_constraint(
            "side_effects_effect", ["order_id", "idempotency_key", "adapter"]
        )
    op.create_index(
        "side_effects_legacy_key",
        "side_effects",
        ["idempotency_key", "adapter"],
        unique=True,
        sqlite_where=_LEGACY_WHERE,
        postgresql_where=_LEGACY_WHERE,
    )

    # The order of each side effect whose key a journal names. Exactly one order per
    # key under the old schema (its key was unique); the CASE guards that anyway (no
    # HAVING without GROUP BY: SQLite before 3.39 refuses it).
    op.execute(
        """
        UPDATE side_effects SET order_id = (
          SELECT CASE WHEN count(DISTINCT j.order_id) = 1 THEN min(j.order_id) END
            FROM journals j
           WHERE j.event_key = side_effects.idempotency_key
        )
        WHERE order_id IS NULL
        """
    )

    if sqlite:
        install_triggers(conn)


def downgrade() -> None:
    raise NotImplementedError("the ledger is append-only: migrations go forward only")
