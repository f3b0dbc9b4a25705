"""Tables, constraints and triggers of the ledger, for SQLite and PostgreSQL.

Invariants the database itself enforces (the code checks them too, first):

* amounts are BIGINT minor units; a line has exactly one positive side;
* journals and their lines are append-only: UPDATE and DELETE (and TRUNCATE on
  PostgreSQL) raise; corrections are reversal journals;
* an effect is posted once: journals are UNIQUE on ``(order_id, idempotency_key)``
  (two orders may share a key; each is its own effect);
* a journal is reversed at most once (``reverses_journal_id`` is UNIQUE);
* every line is in its journal's currency (composite FK to ``journals(id, currency)``);
* every journal balances: ``total_debit_minor = total_credit_minor`` on the header
  (CHECK) and the lines sum to exactly those totals. How the second half is enforced
  differs per backend, see ``SQLITE_TRIGGERS`` and ``POSTGRES_DDL``.

The tables here describe the schema at the newest migration (``migrations/``); the
database is created and upgraded by those migrations (``SqlLedger.migrate``), never by
``metadata.create_all``. Changing a table or a trigger means adding a migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

# Fixed so that concurrent migrations on PostgreSQL serialise on one advisory lock.
MIGRATION_LOCK_ID = 0x7265766C696E65  # "revline"


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out (SQLite stores no offset)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the ledger stores aware timestamps only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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
    # The effect's key: the event's idempotency key, or for one credit note of a
    # cancellation "<event key>:reverses:<journal id>" (one event, several journals).
    # Unique per order only (journals_order_key): the effect is (order_id, key).
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("event_key", sa.Text, nullable=False),
    sa.Column("order_id", sa.Text, nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("total_debit_minor", sa.BigInteger, nullable=False),
    sa.Column("total_credit_minor", sa.BigInteger, nullable=False),
    sa.Column("source_ref", sa.Text, nullable=False),
    sa.Column("occurred_at", UtcDateTime, nullable=False),
    sa.Column("posted_at", UtcDateTime, nullable=False),
    sa.Column("reverses_journal_id", sa.String(36), nullable=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Index("ix_journals_event_key", "event_key"),
    sa.Index("ix_journals_order_id", "order_id"),
    sa.UniqueConstraint("order_id", "idempotency_key", name="journals_order_key"),
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
    # Deferred: on SQLite lines are written before their header (see SQLITE_TRIGGERS),
    # and the check at COMMIT is what forbids a line without a journal.
    sa.ForeignKeyConstraint(
        ["journal_id", "currency"],
        ["journals.id", "journals.currency"],
        name="journal_lines_journal_fk",
        deferrable=True,
        initially="DEFERRED",
    ),
)

# One row per effect and adapter: (order_id, idempotency_key, adapter) is unique.
# order_id NULL = a legacy row, written before effects were identified per order and
# whose order could not be derived when migrating (no journal names its key: ERP rows
# of bookings, amendments..., refused events). A lookup for (order, key) also matches
# a legacy row with that key, exactly as lookups by key alone did before; a row for
# the order itself wins over it. New rows always carry their order. Legacy rows stay
# unique per (key, adapter), as the old primary key had them (side_effects_legacy_key).
side_effects = sa.Table(
    "side_effects",
    metadata,
    sa.Column("order_id", sa.Text, nullable=True),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("adapter", sa.String(64), nullable=False),
    sa.Column("external_ref", sa.Text, nullable=False),  # JSON object: step -> external id
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("applied_at", UtcDateTime, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.CheckConstraint("attempts >= 0", name="side_effects_attempts"),
    sa.UniqueConstraint("order_id", "idempotency_key", "adapter", name="side_effects_effect"),
    sa.Index(
        "side_effects_legacy_key",
        "idempotency_key",
        "adapter",
        unique=True,
        sqlite_where=sa.text("order_id IS NULL"),
        postgresql_where=sa.text("order_id IS NULL"),
    ),
)

# SQLite has no deferred triggers, so the balance check cannot wait for COMMIT.
# Instead the header is the seal of its journal:
#   1. lines are inserted first (their FK to the header is DEFERRABLE INITIALLY
#      DEFERRED, checked at COMMIT);
#   2. inserting the header checks that the lines already present sum to exactly its
#      totals and are all in its currency (journals_balanced_on_insert); the header's
#      own CHECK makes those totals equal;
#   3. once the header exists no line can be added to it (journal_lines_sealed), and
#      lines and headers can never be updated or deleted (the append-only triggers);
#   4. at COMMIT the deferred FK refuses any line whose header was never inserted.
# So every committed journal's lines are exactly the lines its header was checked
# against, and they balance. Any order of writes, in one transaction or many, either
# ends balanced or fails. This needs PRAGMA foreign_keys=ON (for 4) and
# recursive_triggers=ON (so INSERT OR REPLACE fires the delete triggers), which the
# ledger sets on every connection; reports join lines to headers, so a line written
# by a tool that turned foreign keys off is never counted.
SQLITE_TRIGGERS = (
    """
    CREATE TRIGGER IF NOT EXISTS journal_lines_sealed
    BEFORE INSERT ON journal_lines
    WHEN EXISTS (SELECT 1 FROM journals WHERE id = NEW.journal_id)
    BEGIN
      SELECT RAISE(ABORT, 'ledger: journal is sealed: lines must be written before their header');
    END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS journals_balanced_on_insert
    BEFORE INSERT ON journals
    WHEN (SELECT coalesce(sum(debit_minor), 0) FROM journal_lines WHERE journal_id = NEW.id)
           <> NEW.total_debit_minor
      OR (SELECT coalesce(sum(credit_minor), 0) FROM journal_lines WHERE journal_id = NEW.id)
           <> NEW.total_credit_minor
      OR EXISTS (SELECT 1 FROM journal_lines
                 WHERE journal_id = NEW.id AND currency <> NEW.currency)
    BEGIN
      SELECT RAISE(ABORT, 'ledger: journal does not balance: its lines do not sum to its totals');
    END
    """,
    *(
        f"""
        CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()}
        BEFORE {op} ON {table}
        BEGIN
          SELECT RAISE(ABORT, 'ledger is append-only: {table} cannot be {verb}; post a reversal');
        END
        """
        for table in ("journals", "journal_lines")
        for op, verb in (("UPDATE", "updated"), ("DELETE", "deleted"))
    ),
)

# PostgreSQL checks the balance when the transaction commits: a DEFERRABLE INITIALLY
# DEFERRED constraint trigger on every inserted line and header re-sums that journal's
# lines against its header. Lines added to an old journal in a later transaction fire
# it too, so no sequence of inserts commits an unbalanced journal. Errors use SQLSTATE
# class 23 (integrity), which drivers surface as IntegrityError.
POSTGRES_DDL = (
    """
    CREATE OR REPLACE FUNCTION revline_ledger_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
      RAISE EXCEPTION 'ledger is append-only: % on % refused; post a reversal', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
    END
    $$
    """,
    """
    CREATE OR REPLACE FUNCTION revline_ledger_check_balanced() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
      jid text;
      head_debit bigint;
      head_credit bigint;
      head_currency text;
      debits bigint;
      credits bigint;
      mixed boolean;
    BEGIN
      IF TG_TABLE_NAME = 'journals' THEN jid := NEW.id; ELSE jid := NEW.journal_id; END IF;
      -- One query per fired row: this runs for every line and header at COMMIT.
      SELECT h.total_debit_minor, h.total_credit_minor, h.currency,
             coalesce(sum(l.debit_minor), 0), coalesce(sum(l.credit_minor), 0),
             coalesce(bool_or(l.currency <> h.currency), false)
        INTO head_debit, head_credit, head_currency, debits, credits, mixed
        FROM journals h LEFT JOIN journal_lines l ON l.journal_id = h.id
       WHERE h.id = jid
       GROUP BY h.id;
      IF NOT FOUND THEN
        RAISE EXCEPTION 'ledger: lines of journal % have no header', jid
          USING ERRCODE = 'foreign_key_violation';
      END IF;
      IF debits <> head_debit OR credits <> head_credit OR debits <> credits OR mixed THEN
        RAISE EXCEPTION
          'ledger: journal % does not balance: lines debit % credit %, header % / % %',
          jid, debits, credits, head_debit, head_credit,
          head_currency || CASE WHEN mixed THEN ' (lines in another currency)' ELSE '' END
          USING ERRCODE = 'check_violation';
      END IF;
      RETURN NULL;
    END
    $$
    """,
    *(
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_trigger
                         WHERE tgname = '{table}_append_only'
                           AND tgrelid = '{table}'::regclass) THEN
            CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table}
              FOR EACH ROW EXECUTE FUNCTION revline_ledger_append_only();
            CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
              FOR EACH STATEMENT EXECUTE FUNCTION revline_ledger_append_only();
          END IF;
          -- OR REPLACE is not available for constraint triggers.
          IF NOT EXISTS (SELECT 1 FROM pg_trigger
                         WHERE tgname = '{table}_balance_at_commit'
                           AND tgrelid = '{table}'::regclass) THEN
            CREATE CONSTRAINT TRIGGER {table}_balance_at_commit AFTER INSERT ON {table}
              DEFERRABLE INITIALLY DEFERRED
              FOR EACH ROW EXECUTE FUNCTION revline_ledger_check_balanced();
          END IF;
        END $$
        """
        for table in ("journals", "journal_lines")
    ),
)


def lock_for_migration(conn: Connection) -> None:
    """Serialise concurrent migrations: a transaction-scoped advisory lock on PostgreSQL.

    SQLite needs nothing here: the migrating transaction is BEGIN IMMEDIATE, which
    holds the database's write lock until it commits.
    """
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_ID)))
    elif dialect != "sqlite":
        raise ValueError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")


def install_triggers(conn: Connection) -> None:
    """Create the balance and append-only triggers that are missing (idempotent).

    Called by the migrations that create or rebuild the ledger's tables; a change to
    a trigger's text needs a migration that drops and re-creates it.
    """
    for ddl in POSTGRES_DDL if conn.dialect.name == "postgresql" else SQLITE_TRIGGERS:
        # no_parameters: psycopg would read RAISE's % placeholders as its own.
        conn.exec_driver_sql(ddl, execution_options={"no_parameters": True})


def drop_sqlite_triggers(conn: Connection) -> list[str]:
    """Drop every trigger of a SQLite ledger (before a table rebuild); returns their names.

    A rebuild drops the rebuilt table's own triggers, and renaming the rebuilt table
    into place fails while a trigger of another table names the dropped one; the
    migration re-creates them all with ``install_triggers`` once the tables are back.
    """
    names = list(
        conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
        ).scalars()
    )
    for name in names:
        conn.exec_driver_sql(f'DROP TRIGGER "{name}"')
    return names


# -- the operators' read model (revision 0003_read_model) --------------------------------
# Indexed copies of what the audit, outcome and exception-state topics hold, so that an
# operator's query costs what its answer holds, not the topic's history. The topics stay
# the source of truth: ``revline index rebuild`` recreates all of this from them. Written
# by the components that own the data (see ``revline.sinks.read_model``); not append-only.

# One row per chained audit record: (chain, seq) is the record's place in its chain, and
# a batch the auditor redoes after an aborted transaction upserts the same rows.
audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("chain", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("kafka_partition", sa.Integer, nullable=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("fact_id", sa.Text, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("record", sa.Text, nullable=False),  # the canonical JSON, exactly as chained
    sa.Column("location", sa.Text, nullable=False),  # audit topic/partition/offset
    sa.Index("ix_audit_records_kind_at", "kind", "at_ms"),
)

# The auditor's chain heads (what it appends to next), paged in through a bounded cache.
audit_heads = sa.Table(
    "audit_heads",
    metadata,
    sa.Column("chain", sa.Text, primary_key=True),
    sa.Column("kafka_partition", sa.Integer, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("recent", sa.Text, nullable=False),  # JSON list of recent fact digests
    sa.Index("ix_audit_heads_partition", "kafka_partition"),
)

# Up to where each writer's source partitions are reflected in the tables: how a
# component tells, on start, whether the tables agree with Kafka or need catching up.
read_model_offsets = sa.Table(
    "read_model_offsets",
    metadata,
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("topic", sa.Text, primary_key=True),
    sa.Column("kafka_partition", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
)

# Every exception's current state (the compacted exception-state topic, queryable).
exception_states = sa.Table(
    "exception_states",
    metadata,
    sa.Column("exception_id", sa.Text, primary_key=True),
    sa.Column("order_id", sa.Text, nullable=True),
    sa.Column("check_id", sa.Text, nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("backup_owner", sa.String(64), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("escalated", sa.Boolean, nullable=False),
    sa.Column("opened_at_ms", sa.BigInteger, nullable=False),
    sa.Column("sla_deadline_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_at_ms", sa.BigInteger, nullable=True),
    sa.Column("state", sa.Text, nullable=False),  # the state value as on the topic (JSON)
    sa.Index("ix_exception_states_status_owner", "status", "owner", "opened_at_ms"),
    sa.Index("ix_exception_states_status_backup", "status", "backup_owner", "opened_at_ms"),
    sa.Index("ix_exception_states_status_deadline", "status", "sla_deadline_ms"),
    sa.Index("ix_exception_states_status_expiry", "status", "expires_at_ms"),
    sa.Index("ix_exception_states_status_opened", "status", "opened_at_ms"),
    sa.Index("ix_exception_states_opened", "opened_at_ms"),
    sa.Index("ix_exception_states_order", "order_id"),
)

# Final outcomes counted per hour, for the report; ``outcomes_counted`` makes the counts
# idempotent per outcome (an input's final outcome is counted once however often it is
# re-emitted or re-read). Dimensions are '' (never NULL) so they can be part of the key.
outcomes_counted = sa.Table(
    "outcomes_counted",
    metadata,
    sa.Column("input", sa.Text, primary_key=True),  # input topic/partition/offset
    sa.Column("hour_ms", sa.BigInteger, nullable=False),
)

outcome_hours = sa.Table(
    "outcome_hours",
    metadata,
    sa.Column("hour_ms", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("row_type", sa.String(8), primary_key=True),  # outcome | warning
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("event_type", sa.String(64), primary_key=True),
    sa.Column("check_id", sa.String(128), primary_key=True),
    sa.Column("severity", sa.String(16), primary_key=True),
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("stage", sa.String(32), primary_key=True),
    sa.Column("held", sa.Boolean, primary_key=True),
    sa.Column("refused_override", sa.Boolean, primary_key=True),
    sa.Column("latency_bucket", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("max_latency_ms", sa.BigInteger, nullable=True),
)

# The tables revision 0003_read_model creates (its migration iterates this tuple, so a
# table added later is not listed here but in READ_MODEL_ALL, with its own revision).
READ_MODEL_TABLES = (audit_records, audit_heads, read_model_offsets, exception_states,
                     outcomes_counted, outcome_hours)

# -- revision 0004_exception_counts ---------------------------------------------------------
# How many exception states there are per status and the dimensions `exceptions list`
# filters on, kept in the transaction that writes ``exception_states`` (a delta per
# changed state, rows at zero deleted), so "N of M match" reads a few rows instead of
# counting the table. Few rows: statuses x owners x backups x severities. backup_owner
# is '' for none (a key column cannot be NULL).
exception_counts = sa.Table(
    "exception_counts",
    metadata,
    sa.Column("status", sa.String(16), primary_key=True),
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("backup_owner", sa.String(64), primary_key=True),
    sa.Column("escalated", sa.Boolean, primary_key=True),
    sa.Column("severity", sa.String(16), primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)

# Every read-model table (what rebuild empties and refills, and the commands need).
READ_MODEL_ALL = (*READ_MODEL_TABLES, exception_counts)
