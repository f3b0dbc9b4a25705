"""The ledger's tables as they were before migrations existed (revision 0001_baseline).

A frozen copy: ``_schema`` describes the newest revision and moves on, this does not.
Used to create a new database's baseline and, on SQLite, as the shape that a rebuild
in ``0002_order_identity`` starts from (so nothing depends on how SQLite reflects
deferred foreign keys and CHECK constraints). The unnamed UNIQUE constraints of the
original carry PostgreSQL's own names for them here, which is what PostgreSQL called
them when the original was created; SQLite ignores constraint names.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("code", sa.String(64), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.CheckConstraint(
        "kind IN ('asset', 'liability', 'equity', 'revenue', 'contra_revenue', 'expense')",
        name="accounts_kind_known",
    ),
)

journals = sa.Table(
    "journals",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("event_key", sa.Text, nullable=False),
    sa.Column("order_id", sa.Text, nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("total_debit_minor", sa.BigInteger, nullable=False),
    sa.Column("total_credit_minor", sa.BigInteger, nullable=False),
    sa.Column("source_ref", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("posted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reverses_journal_id", sa.String(36), nullable=True),
    sa.Column("description", sa.Text, nullable=False),
    # Explicit, not index=True: a batch rebuild re-creates only explicit indexes.
    sa.Index("ix_journals_event_key", "event_key"),
    sa.Index("ix_journals_order_id", "order_id"),
    sa.UniqueConstraint("idempotency_key", name="journals_idempotency_key_key"),
    sa.UniqueConstraint("reverses_journal_id", name="journals_reverses_journal_id_key"),
    sa.UniqueConstraint("id", "currency", name="journals_id_currency"),
    sa.CheckConstraint("length(currency) = 3", name="journals_currency_iso"),
    sa.CheckConstraint("total_debit_minor > 0", name="journals_total_positive"),
    sa.CheckConstraint("total_debit_minor = total_credit_minor", name="journals_balanced"),
    sa.CheckConstraint("reverses_journal_id <> id", name="journals_not_self_reversing"),
    sa.ForeignKeyConstraint(
        ["reverses_journal_id"],
        ["journals.id"],
        name="journals_reverses_fk",
        deferrable=True,
        initially="DEFERRED",
    ),
)

journal_lines = sa.Table(
    "journal_lines",
    metadata,
    sa.Column("journal_id", sa.String(36), primary_key=True),
    sa.Column("line_no", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("account", sa.String(64), sa.ForeignKey("accounts.code"), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("debit_minor", sa.BigInteger, nullable=False),
    sa.Column("credit_minor", sa.BigInteger, nullable=False),
    sa.CheckConstraint("line_no >= 1", name="journal_lines_line_no"),
    sa.CheckConstraint("debit_minor >= 0 AND credit_minor >= 0", name="journal_lines_non_negative"),
    sa.CheckConstraint(
        "(debit_minor > 0 AND credit_minor = 0) OR (debit_minor = 0 AND credit_minor > 0)",
        name="journal_lines_one_side",
    ),
    sa.ForeignKeyConstraint(
        ["journal_id", "currency"],
        ["journals.id", "journals.currency"],
        name="journal_lines_journal_fk",
        deferrable=True,
        initially="DEFERRED",
    ),
)

side_effects = sa.Table(
    "side_effects",
    metadata,
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("adapter", sa.String(64), nullable=False),
    sa.Column("external_ref", sa.Text, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.PrimaryKeyConstraint("idempotency_key", "adapter", name="side_effects_pkey"),
    sa.CheckConstraint("attempts >= 0", name="side_effects_attempts"),
)
