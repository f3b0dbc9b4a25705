"""Exception states counted per status, owner, backup owner, escalation and severity.

One new table, ``exception_counts`` (``revline.sinks.read_model`` keeps it in the
transaction that writes ``exception_states``), filled here from the states already in
the table, so ``revline exceptions list`` answers "N of M match" from a few rows instead
of counting every exception ever opened.

Revision ID: 0004_exception_counts
Revises: 0003_read_model
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_exception_counts"
down_revision = "0003_read_model"
branch_labels = None
depends_on = None

# This revision's shape, frozen (a later change to the table needs its own revision).
_meta = sa.MetaData()
exception_counts = sa.Table(
    "exception_counts",
    _meta,
    sa.Column("status", sa.String(16), primary_key=True),
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("backup_owner", sa.String(64), primary_key=True),
    sa.Column("escalated", sa.Boolean, primary_key=True),
    sa.Column("severity", sa.String(16), primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)
_states = sa.table(
    "exception_states",
    sa.column("status"), sa.column("owner"), sa.column("backup_owner"),
    sa.column("escalated"), sa.column("severity"),
)


def upgrade() -> None:
    conn = op.get_bind()
    exception_counts.create(conn, checkfirst=False)
    backup = sa.func.coalesce(_states.c.backup_owner, "")
    conn.execute(exception_counts.insert().from_select(
        ["status", "owner", "backup_owner", "escalated", "severity", "n"],
        sa.select(_states.c.status, _states.c.owner, backup, _states.c.escalated,
                  _states.c.severity, sa.func.count())
        .group_by(_states.c.status, _states.c.owner, backup, _states.c.escalated,
                  _states.c.severity)))


def downgrade() -> None:
    raise NotImplementedError("the ledger's migrations go forward only")
