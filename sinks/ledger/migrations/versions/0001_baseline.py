"""Baseline: the ledger as it was before versioned migrations.

A database created by that code (tables from ``metadata.create_all``, no
``alembic_version``) is stamped with this revision instead of running it.

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

from alembic import op

from revline.sinks.ledger._schema import install_triggers
from revline.sinks.ledger.migrations._baseline import metadata

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    metadata.create_all(conn, checkfirst=False)
    install_triggers(conn)


def downgrade() -> None:
    raise NotImplementedError("the ledger is append-only: migrations go forward only")
