"""The operators' read model: audit records, chain heads, exception states, outcomes per hour.

New tables only (nothing of the ledger changes): indexed copies of the audit, outcome
and exception-state topics that the auditor and the exception manager maintain and the
operator commands query (``revline.sinks.read_model``). They start empty; ``revline index
rebuild`` fills them from the topics.

Revision ID: 0003_read_model
Revises: 0002_order_identity
"""

from __future__ import annotations

from alembic import op

from revline.sinks.ledger._schema import READ_MODEL_TABLES

revision = "0003_read_model"
down_revision = "0002_order_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    for table in READ_MODEL_TABLES:
        # The newest shape; a later change to one of these tables needs its own revision
        # (and a frozen copy of this shape, as _baseline is for 0001).
        table.create(conn, checkfirst=False)


def downgrade() -> None:
    raise NotImplementedError("the ledger's migrations go forward only")
