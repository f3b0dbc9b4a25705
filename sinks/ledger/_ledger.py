"""``SqlLedger``: the double-entry, append-only ledger adapter on SQLAlchemy Core."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from revline.core.errors import ConfigurationError
from revline.sinks._protocols import EffectResult, Event, PermanentSinkError, TransientSinkError
from revline.sinks.ledger._errors import RefusedEventError, db_errors, db_message, translate
from revline.sinks.ledger._rules import LineRule, PostingRule, PostingRules, load_posting_rules
from revline.sinks.ledger._schema import (
    accounts,
    journal_lines,
    journals,
    lock_for_migration,
    side_effects,
)

log = logging.getLogger("revline.ledger")

DEFAULT_URL = "sqlite:///.revline/ledger.db"
ADAPTER_NAME = "ledger"
MAX_MINOR = 2**63 - 1  # BIGINT
# Hashed into journal ids (see _journal_id); never change them. The legacy namespace
# hashed the effect key alone; ids since hash the order and the key.
_JOURNAL_NAMESPACE = uuid.UUID("5b0f6f43-3c59-4d0e-9d55-2f6f0b7f3e11")
_ORDER_KEY_NAMESPACE = uuid.uuid5(_JOURNAL_NAMESPACE, "order_id+idempotency_key")
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_CHUNK = 500  # keys per IN (...) lookup, well under every backend's parameter limit
_MAX_ATTEMPTS = 5  # re-plans of one batch after losing a race to a concurrent writer
_LEDGER_TABLES = frozenset({"accounts", "journals", "journal_lines", "side_effects"})

# An effect's identity: (order_id, idempotency_key). Two orders may share a key.
EffectId = tuple[str, str]
_T = TypeVar("_T")


@dataclass(frozen=True)
class JournalLine:
    line_no: int
    account: str
    currency: str
    debit_minor: int
    credit_minor: int


@dataclass(frozen=True)
class Journal:
    id: str
    idempotency_key: str
    event_key: str
    order_id: str
    event_type: str
    currency: str
    total_minor: int
    source_ref: str
    occurred_at: datetime
    posted_at: datetime
    reverses_journal_id: str | None
    description: str
    lines: tuple[JournalLine, ...]


@dataclass(frozen=True)
class TrialBalance:
    currency: str
    debit_minor: int
    credit_minor: int
    accounts: Mapping[str, int]  # account -> balance, debits positive

    @property
    def balanced(self) -> bool:
        return self.debit_minor == self.credit_minor


@dataclass(frozen=True)
class SideEffect:
    """One row of the side-effect ledger: what an adapter did for one effect.

    ``order_id`` is None for a legacy row: written before effects were identified per
    order, its order not derivable when the ledger was migrated. Lookups for
    (order, key) match such a row by its key, as they did before.
    """

    order_id: str | None
    idempotency_key: str
    adapter: str
    external_ref: Mapping[str, str]
    status: str
    attempts: int
    applied_at: datetime
    detail: str


@dataclass(frozen=True)
class JournalSummary:
    """A journal header without its lines: what reconciliation compares."""

    id: str
    idempotency_key: str  # the effect's key (a credit note: "<event key>:reverses:<id>")
    event_key: str  # the event's idempotency key
    order_id: str
    event_type: str
    currency: str
    total_minor: int
    occurred_at: datetime
    reverses_journal_id: str | None
    # The reversed journal's idempotency key: names a credit note without journal ids,
    # which differ between ledgers written by releases with different id schemes.
    reverses_key: str | None = None


@dataclass(frozen=True)
class EffectRow:
    """A side-effect row to record (see ``SqlLedger.record_effects``).

    ``order_id`` is the event's order ("" only for a record that names no order, such
    as an undecodable one, whose key is unique by itself).
    """

    order_id: str
    key: str
    adapter: str
    external_ref: Mapping[str, str]
    status: str
    attempts: int
    detail: str = ""
    applied_at: datetime | None = None


Amounts = tuple[tuple[str, int, int], ...]  # (account, debit_minor, credit_minor) per line


@dataclass(frozen=True)
class _Prepared:
    key: str
    order_id: str
    event_type: str
    rule: PostingRule | None
    source_ref: str
    occurred_at: datetime
    description: str
    currency: str = ""
    amounts: Amounts = ()
    after_reversal: Amounts = ()  # the lines once the order has a credit note in the currency

    @property
    def ident(self) -> EffectId:
        return (self.order_id, self.key)


@dataclass(frozen=True)
class _Journal:
    """A journal to insert, or an existing one that a cancellation may reverse."""

    id: str
    idempotency_key: str
    event_key: str
    order_id: str
    event_type: str
    currency: str
    source_ref: str
    occurred_at: datetime
    description: str
    amounts: Amounts
    reverses_journal_id: str | None = None

    @property
    def total(self) -> int:
        return sum(debit for _, debit, _ in self.amounts)


@dataclass
class _Plan:
    results: list[EffectResult] = field(default_factory=list)
    new: list[_Journal] = field(default_factory=list)

    @property
    def keys(self) -> frozenset[EffectId]:
        return frozenset((j.order_id, j.idempotency_key) for j in self.new)


class SqlLedger:
    """Double-entry ledger in SQLite (embedded default) or PostgreSQL.

    ``url`` is a SQLAlchemy URL; ``postgresql://`` and ``postgres://`` mean psycopg 3.
    The schema is created or upgraded to the newest migration (safe against
    concurrent starts) by the constructor unless ``migrate=False``; call ``migrate()``
    yourself then. A database that is down at construction raises
    ``TransientSinkError``, at once or, with ``wait_s``, once it has not come up within
    that many seconds (a component starting: ``REVLINE_STARTUP_TIMEOUT_S``). Later, a
    lost connection (a restart) is a ``TransientSinkError`` of the call; the pool
    replaces dead connections (``pool_pre_ping``).

    Effects are identified by (order_id, idempotency_key): journals are unique per
    order and key, and the side-effect ledger is keyed by (order_id, key, adapter).
    """

    name = ADAPTER_NAME

    def __init__(
        self, url: str = DEFAULT_URL, rules: PostingRules | None = None, *, migrate: bool = True,
        wait_s: float = 0.0,
    ) -> None:
        self._rules = rules if rules is not None else load_posting_rules()
        self._engine = _create_engine(url)
        if migrate:
            self.migrate(wait_s=wait_s)

    # -- lifecycle ---------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def rules(self) -> PostingRules:
        return self._rules

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> SqlLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqlLedger({self._engine.url.render_as_string(hide_password=True)!r})"

    def migrate(self, *, wait_s: float = 0.0) -> None:
        """Upgrade the database to the newest migration and add the chart's missing accounts.

        A database that is unavailable (down, starting up) is waited for up to ``wait_s``
        (with backoff); then, or at once without it, ``TransientSinkError``.

        An empty database is created from the first revision on; one written before
        migrations existed (the ledger's tables, no ``alembic_version``) is taken for
        the baseline revision and upgraded in place. All of it is one transaction
        under a lock (a PostgreSQL advisory lock; SQLite's write lock, BEGIN
        IMMEDIATE), so processes starting together migrate once, one after the other.

        An account whose kind in the database differs from the chart is a
        ConfigurationError: changing a kind would silently change old reports.
        """
        started = time.monotonic()
        delay = 0.25
        while True:
            try:
                self._migrate()
                return
            except TransientSinkError as exc:
                left = wait_s - (time.monotonic() - started)
                if left <= 0:
                    raise
                log.warning("waiting for the ledger database (%s); %.0f s left", exc, left)
                time.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)

    def _migrate(self) -> None:
        with db_errors(), migrating(self._engine) as conn:
            upgrade_to_head(conn)
            rows = conn.execute(sa.select(accounts.c.code, accounts.c.kind))
            existing = {row.code: row.kind for row in rows}
            for account in self._rules.accounts:
                kind = existing.get(account.code)
                if kind is not None and kind != account.kind:
                    raise ConfigurationError(
                        f"account {account.code!r} is a {kind} in the ledger database but a "
                        f"{account.kind} in the posting rules; a kind cannot change once used"
                    )
            missing = [
                {"code": a.code, "name": a.name, "kind": a.kind}
                for a in self._rules.accounts
                if a.code not in existing
            ]
            if missing:
                conn.execute(accounts.insert(), missing)

    # -- posting -----------------------------------------------------------------

    def post(self, events: Sequence[Event]) -> list[EffectResult]:
        """Post a batch in one transaction; one result per event, in order.

        Raises RefusedEventError (naming the event) before touching the database if
        an event cannot be posted, TransientSinkError when the database is
        unavailable, PermanentSinkError when it refuses the write. In every error
        case nothing of the batch is written.
        """
        prepared = [self._prepare(event) for event in events]
        if not prepared:
            return []
        failed: frozenset[EffectId] | None = None
        for _ in range(_MAX_ATTEMPTS):
            plan = _Plan()
            try:
                with self._transaction(write=True) as conn:
                    plan = self._plan(conn, prepared)
                    self._insert(conn, plan.new, datetime.now(UTC))
                return plan.results
            except sa_exc.IntegrityError as exc:
                # A concurrent writer may have posted one of our keys (or reversed one
                # of our targets) after we looked: re-plan against what is committed
                # now. The same plan failing twice is not a race but refused data.
                if plan.keys == failed or not plan.new:
                    raise PermanentSinkError(
                        f"ledger database refused the batch: {db_message(exc)}"
                    ) from exc
                failed = plan.keys
            except (sa_exc.DBAPIError, sa_exc.TimeoutError, sa_exc.DisconnectionError) as exc:
                sink_error = translate(exc)
                if sink_error is exc:
                    raise  # not a database verdict but a bug: let it surface as is
                raise sink_error from exc
        raise TransientSinkError(
            f"ledger batch kept conflicting with concurrent writers after {_MAX_ATTEMPTS} attempts"
        )

    def _prepare(self, event: Event) -> _Prepared:
        env = event.get("envelope")
        if not isinstance(env, Mapping):
            raise RefusedEventError("ledger: event has no envelope")
        key = env.get("idempotency_key")
        if not isinstance(key, str) or not key:
            raise RefusedEventError("ledger: event has no idempotency_key")
        order = env.get("order_id")
        order_id = order if isinstance(order, str) and order else None

        def refuse(message: str) -> RefusedEventError:
            return RefusedEventError(
                f"ledger refused {key} of order {order!r}: {message}", key, order_id
            )

        fields = {}
        for name in ("event_type", "order_id", "source_system", "source_record_id"):
            value = env.get(name)
            if not isinstance(value, str) or (not value and name != "source_record_id"):
                raise refuse(f"envelope.{name} must be a non-empty string, got {value!r}")
            fields[name] = value
        occurred_at = env.get("occurred_at")
        if not isinstance(occurred_at, datetime) or occurred_at.tzinfo is None:
            raise refuse(f"envelope.occurred_at must be an aware datetime, got {occurred_at!r}")
        rule = self._rules.rule_for(fields["event_type"])
        base = _Prepared(
            key=key,
            order_id=fields["order_id"],
            event_type=fields["event_type"],
            rule=rule,
            source_ref=f"{fields['source_system']}:{fields['source_record_id']}",
            occurred_at=occurred_at,
            description=_describe(rule, env, event),
        )
        if rule is None or rule.action != "post":
            return base
        currency = event.get(rule.currency)
        if not isinstance(currency, str) or not _CURRENCY.match(currency):
            raise refuse(f"{rule.currency} must be an ISO 4217 code, got {currency!r}")
        amounts = self._amounts(rule.lines, event, fields["event_type"], currency, refuse)
        after = (
            self._amounts(rule.after_reversal, event, fields["event_type"], currency, refuse)
            if rule.after_reversal else amounts
        )  # fmt: skip
        return replace(base, currency=currency, amounts=amounts, after_reversal=after)

    @staticmethod
    def _amounts(
        lines: Sequence[LineRule], event: Event, event_type: str, currency: str,
        refuse: Callable[[str], RefusedEventError],
    ) -> Amounts:  # fmt: skip
        amounts: list[tuple[str, int, int]] = []
        for line in lines:
            amount = event.get(line.amount)
            if not isinstance(amount, int) or isinstance(amount, bool):
                raise refuse(f"{line.amount} must be integer minor units, got {amount!r}")
            if not 0 <= amount <= MAX_MINOR:
                raise refuse(f"{line.amount} must be between 0 and {MAX_MINOR}, got {amount}")
            if amount:  # a zero line (no tax) is left out: a line has one positive side
                debit = amount if line.side == "debit" else 0
                amounts.append((line.account, debit, amount - debit))
        debits = sum(d for _, d, _ in amounts)
        credits = sum(c for _, _, c in amounts)
        if debits != credits:
            raise refuse(
                f"{event_type} does not balance under the posting rules: "
                f"debits {debits} != credits {credits} {currency}"
            )
        if debits > MAX_MINOR:
            raise refuse(f"journal total {debits} exceeds {MAX_MINOR}")
        return tuple(amounts)

    def _plan(self, conn: Connection, prepared: list[_Prepared]) -> _Plan:
        # What a cancellation or a refund posts depends on the order's other journals:
        # one writer per such order at a time (see _lock_orders). Locked before reading
        # what is posted, so a twin waiting behind us sees our commit and records
        # already_applied (its rows would not collide with ours to tell it).
        reversing = [p for p in prepared if p.rule is not None and p.rule.action == "reverse"]
        switching = [p for p in prepared if p.rule is not None and p.rule.after_reversal]
        _lock_orders(conn, {p.order_id for p in (*reversing, *switching)})
        existing = self._existing(conn, list(dict.fromkeys(p.ident for p in prepared)))
        reversing = [p for p in reversing if p.ident not in existing]
        switching = [p for p in switching if p.ident not in existing]
        types = {t for p in reversing if p.rule is not None for t in p.rule.reverses}
        candidates = self._reversible(conn, {p.order_id for p in reversing}, types)
        # (order, currency) that have a credit note: a refund there pays back a credit.
        credited = self._credited(conn, {p.order_id for p in switching})
        moved = sorted({r.account for p in reversing if p.rule for r in p.rule.reclassify})
        # (order, account, currency) -> balance, debits positive, of the accounts a
        # cancellation reclassifies; kept current with what this batch posts.
        held = self._order_balances(conn, {p.order_id for p in reversing}, moved)

        def track(journal: _Journal) -> None:
            for account, debit, credit in journal.amounts:
                if account in moved:
                    k = (journal.order_id, account, journal.currency)
                    held[k] = held.get(k, 0) + debit - credit

        plan = _Plan()
        first: dict[EffectId, EffectResult] = {}
        reversed_ids: set[str] = set()
        for p in prepared:
            if p.ident in first:
                earlier = first[p.ident]
                if earlier.status == "applied":
                    refs = earlier.external_refs
                    plan.results.append(
                        _result(p, "already_applied", refs, "duplicate in batch")
                    )
                else:
                    plan.results.append(earlier)
                continue
            if p.ident in existing:
                result = _result(p, "already_applied", _refs(existing[p.ident]), "posted earlier")
            elif p.rule is None:
                result = _result(p, "not_applicable", {}, f"no posting rule for {p.event_type}")
            elif p.rule.action == "not_applicable":
                result = _result(p, "not_applicable", {}, f"{p.event_type} posts nothing")
            elif p.rule.action == "post":
                amounts = (
                    p.after_reversal if (p.order_id, p.currency) in credited else p.amounts
                )
                if not amounts:
                    result = _result(p, "not_applicable", {}, "nothing to post: amounts are 0")
                else:
                    journal = _Journal(
                        id=_journal_id(p.order_id, p.key, p.occurred_at),
                        idempotency_key=p.key,
                        event_key=p.key,
                        order_id=p.order_id,
                        event_type=p.event_type,
                        currency=p.currency,
                        source_ref=p.source_ref,
                        occurred_at=p.occurred_at,
                        description=p.description,
                        amounts=amounts,
                    )
                    plan.new.append(journal)
                    candidates[p.order_id].append(journal)
                    track(journal)
                    result = _result(p, "applied", {"journal": journal.id}, p.description)
            else:
                targets = [
                    j
                    for j in candidates.get(p.order_id, [])
                    if j.event_type in p.rule.reverses and j.id not in reversed_ids
                ]
                notes = []
                for target in targets:
                    reversed_ids.add(target.id)
                    # Scoped to the same order as the event (journals_order_key).
                    notes.append(_derived(
                        p, f"{p.key}:reverses:{target.id}", target.currency,
                        f"{p.description} [reverses {target.event_type} "
                        f"{target.idempotency_key}]",
                        tuple((a, credit, debit) for a, debit, credit in target.amounts),
                        reverses_journal_id=target.id,
                    ))  # fmt: skip
                if notes:
                    notes.sort(key=lambda j: j.idempotency_key)
                    for note in notes:
                        track(note)
                        credited.add((p.order_id, note.currency))
                    moves = self._reclassifications(p, sorted({j.currency for j in notes}), held)
                    for journal in moves:
                        track(journal)
                    new = [*notes, *moves]
                    plan.new.extend(new)
                    refs = _refs([(j.idempotency_key, j.id) for j in new])
                    result = _result(p, "applied", refs, p.description)
                else:
                    result = _result(
                        p,
                        "not_applicable",
                        {},
                        f"no unreversed {'/'.join(p.rule.reverses)} journal for {p.order_id}",
                    )
            first[p.ident] = result
            plan.results.append(result)
        return plan

    @staticmethod
    def _reclassifications(
        p: _Prepared, currencies: Sequence[str], held: Mapping[tuple[str, str, str], int]
    ) -> list[_Journal]:
        """A cancellation's journals that move the order's balances its rule reclassifies.

        One per (account, currency) in which the cancellation posts credit notes, for
        the order's whole balance on the account there (its credit notes included), so
        that balance ends at 0 (refunds: contra-revenue of an order whose revenue is all
        reversed). A second cancellation reverses nothing and so moves nothing. The
        effect key names account and currency: one event, several journals, each once.
        """
        out = []
        assert p.rule is not None
        for rule in p.rule.reclassify:
            for currency in currencies:
                balance = held.get((p.order_id, rule.account, currency), 0)
                if not balance:
                    continue
                if balance > 0:  # a debit balance: credit it, debit the target
                    amounts = ((rule.to, balance, 0), (rule.account, 0, balance))
                else:
                    amounts = ((rule.account, -balance, 0), (rule.to, 0, -balance))
                out.append(_derived(
                    p, f"{p.key}:reclassifies:{rule.account}:{currency}", currency,
                    f"{p.description} [moves {rule.account} to {rule.to}]", amounts,
                ))  # fmt: skip
        return out

    def _credited(self, conn: Connection, order_ids: set[str]) -> set[tuple[str, str]]:
        """(order id, currency) of the given orders that have a credit note."""
        out: set[tuple[str, str]] = set()
        for chunk in _chunks(sorted(order_ids)):
            rows = conn.execute(
                sa.select(journals.c.order_id, journals.c.currency)
                .where(journals.c.order_id.in_(chunk), journals.c.reverses_journal_id.is_not(None))
                .distinct()
            )
            out.update((order_id, currency) for order_id, currency in rows)
        return out

    def _order_balances(
        self, conn: Connection, order_ids: set[str], accounts_: Sequence[str]
    ) -> dict[tuple[str, str, str], int]:
        """(order id, account, currency) -> balance (debits positive) of some accounts."""
        out: dict[tuple[str, str, str], int] = {}
        if not order_ids or not accounts_:
            return out
        debits, credits = (_exact_sum(conn.dialect.name, c) for c in _DEBIT_CREDIT)
        n = len(debits)
        for chunk in _chunks(sorted(order_ids)):
            rows = conn.execute(
                sa.select(
                    journals.c.order_id, journal_lines.c.account, journal_lines.c.currency,
                    *debits, *credits,
                )
                .select_from(_posted_lines())
                .where(journals.c.order_id.in_(chunk), journal_lines.c.account.in_(accounts_))
                .group_by(journals.c.order_id, journal_lines.c.account, journal_lines.c.currency)
            )  # fmt: skip
            for order_id, account, currency, *sums in rows:
                out[(order_id, account, currency)] = _combine(sums[:n]) - _combine(sums[n:])
        return out

    def _existing(
        self, conn: Connection, effects: list[EffectId]
    ) -> dict[EffectId, list[tuple[str, str]]]:
        """(order id, event key) -> [(journal idempotency key, journal id)] already committed."""
        out: dict[EffectId, list[tuple[str, str]]] = defaultdict(list)
        for chunk in _chunks(effects):
            wanted = set(chunk)
            rows = conn.execute(
                sa.select(
                    journals.c.order_id, journals.c.event_key,
                    journals.c.idempotency_key, journals.c.id,
                ).where(
                    journals.c.event_key.in_(sorted({key for _, key in chunk})),
                    journals.c.order_id.in_(sorted({order for order, _ in chunk})),
                )
            )  # fmt: skip
            for order_id, event_key, journal_key, journal_id in rows:
                if (order_id, event_key) in wanted:
                    out[(order_id, event_key)].append((journal_key, journal_id))
        return dict(out)

    def _reversible(
        self, conn: Connection, order_ids: set[str], event_types: set[str]
    ) -> defaultdict[str, list[_Journal]]:
        """order id -> its committed, not yet reversed journals of the given types."""
        out: defaultdict[str, list[_Journal]] = defaultdict(list)
        if not order_ids or not event_types:
            return out
        reversal = journals.alias("reversal")
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted(order_ids)):
            rows = conn.execute(
                sa.select(journals)
                .where(
                    journals.c.order_id.in_(chunk),
                    journals.c.event_type.in_(sorted(event_types)),
                    journals.c.reverses_journal_id.is_(None),
                    ~sa.exists().where(reversal.c.reverses_journal_id == journals.c.id),
                )
                .order_by(journals.c.occurred_at, journals.c.idempotency_key)
            )
            for found_row in rows.mappings():
                found[found_row["id"]] = dict(found_row)
        lines = self._lines(conn, list(found))
        for journal_id, row in found.items():
            out[row["order_id"]].append(
                _Journal(
                    id=journal_id,
                    idempotency_key=row["idempotency_key"],
                    event_key=row["event_key"],
                    order_id=row["order_id"],
                    event_type=row["event_type"],
                    currency=row["currency"],
                    source_ref=row["source_ref"],
                    occurred_at=row["occurred_at"],
                    description=row["description"],
                    amounts=tuple(
                        (line.account, line.debit_minor, line.credit_minor)
                        for line in lines.get(journal_id, ())
                    ),
                )
            )
        return out

    def _lines(self, conn: Connection, journal_ids: list[str]) -> dict[str, list[JournalLine]]:
        out: dict[str, list[JournalLine]] = defaultdict(list)
        for chunk in _chunks(journal_ids):
            rows = conn.execute(
                sa.select(journal_lines)
                .where(journal_lines.c.journal_id.in_(chunk))
                .order_by(journal_lines.c.journal_id, journal_lines.c.line_no)
            )
            for row in rows:
                out[row.journal_id].append(
                    JournalLine(
                        line_no=row.line_no,
                        account=row.account,
                        currency=row.currency,
                        debit_minor=int(row.debit_minor),
                        credit_minor=int(row.credit_minor),
                    )
                )
        return dict(out)

    @staticmethod
    def _insert(conn: Connection, new: list[_Journal], posted_at: datetime) -> None:
        if not new:
            return
        # Lines before headers: on SQLite the header insert is the balance check
        # (see _schema); PostgreSQL checks at commit, so the order is free there.
        line_rows = [
            (j.id, n, account, j.currency, debit, credit)
            for j in new
            for n, (account, debit, credit) in enumerate(j.amounts, start=1)
        ]
        journal_rows = [
            (
                j.id,
                j.idempotency_key,
                j.event_key,
                j.order_id,
                j.event_type,
                j.currency,
                j.total,
                sum(credit for _, _, credit in j.amounts),
                j.source_ref,
                j.occurred_at,
                posted_at,
                j.reverses_journal_id,
                j.description,
            )
            for j in new
        ]
        if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
            _copy_rows(conn, journal_lines, line_rows)
            _copy_rows(conn, journals, journal_rows)
            return
        for table, rows in ((journal_lines, line_rows), (journals, journal_rows)):
            names = [c.name for c in table.columns]
            conn.execute(table.insert(), [dict(zip(names, row, strict=True)) for row in rows])

    # -- reports -----------------------------------------------------------------

    def balances(self, currency: str | None = None) -> dict[tuple[str, str], int]:
        """(account, currency) -> balance in minor units, debits positive (exact ints)."""
        debits, credits = (_exact_sum(self.dialect, c) for c in _DEBIT_CREDIT)
        stmt = (
            sa.select(journal_lines.c.account, journal_lines.c.currency, *debits, *credits)
            .select_from(_posted_lines())
            .group_by(journal_lines.c.account, journal_lines.c.currency)
            .order_by(journal_lines.c.currency, journal_lines.c.account)
        )
        if currency is not None:
            stmt = stmt.where(journal_lines.c.currency == currency)
        n = len(debits)
        with db_errors(), self._transaction() as conn:
            return {
                (acct, cur): _combine(sums[:n]) - _combine(sums[n:])
                for acct, cur, *sums in conn.execute(stmt)
            }

    def trial_balance(self) -> dict[str, TrialBalance]:
        """Per currency: total debits, total credits (equal when sound) and account balances.

        Totals are exact Python ints: a currency's debits may sum past 2^63 - 1.
        """
        debits, credits = (_exact_sum(self.dialect, c) for c in _DEBIT_CREDIT)
        stmt = (
            sa.select(journal_lines.c.currency, *debits, *credits)
            .select_from(_posted_lines())
            .group_by(journal_lines.c.currency)
        )
        n = len(debits)
        with db_errors(), self._transaction() as conn:
            totals = [
                (cur, _combine(sums[:n]), _combine(sums[n:])) for cur, *sums in conn.execute(stmt)
            ]
        per_account = self.balances()
        return {
            cur: TrialBalance(
                currency=cur,
                debit_minor=debits_total,
                credit_minor=credits_total,
                accounts={a: b for (a, c), b in per_account.items() if c == cur},
            )
            for cur, debits_total, credits_total in sorted(totals)
        }

    def journals_for(self, order_id: str) -> list[Journal]:
        """Every journal of an order, oldest first, with its lines."""
        with db_errors(), self._transaction() as conn:
            rows = list(
                conn.execute(
                    sa.select(journals)
                    .where(journals.c.order_id == order_id)
                    .order_by(
                        journals.c.occurred_at, journals.c.posted_at, journals.c.idempotency_key
                    )
                ).mappings()
            )
            lines = self._lines(conn, [row["id"] for row in rows])
        return [
            Journal(
                id=row["id"],
                idempotency_key=row["idempotency_key"],
                event_key=row["event_key"],
                order_id=row["order_id"],
                event_type=row["event_type"],
                currency=row["currency"],
                total_minor=int(row["total_debit_minor"]),
                source_ref=row["source_ref"],
                occurred_at=row["occurred_at"],
                posted_at=row["posted_at"],
                reverses_journal_id=row["reverses_journal_id"],
                description=row["description"],
                lines=tuple(lines.get(row["id"], ())),
            )
            for row in rows
        ]

    def journal_summaries(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[JournalSummary]:
        """Read-only: every journal header whose event occurred in [since, until)."""
        reversed_ = journals.alias("reversed")
        stmt = sa.select(
            journals.c.id, journals.c.idempotency_key, journals.c.event_key,
            journals.c.order_id, journals.c.event_type, journals.c.currency,
            journals.c.total_debit_minor, journals.c.occurred_at,
            journals.c.reverses_journal_id, reversed_.c.idempotency_key.label("reverses_key"),
        ).select_from(journals.outerjoin(
            reversed_, reversed_.c.id == journals.c.reverses_journal_id
        )).order_by(journals.c.occurred_at, journals.c.idempotency_key)  # fmt: skip
        if since is not None:
            stmt = stmt.where(journals.c.occurred_at >= since)
        if until is not None:
            stmt = stmt.where(journals.c.occurred_at < until)
        with db_errors(), self._transaction() as conn:
            return [
                JournalSummary(
                    id=row.id,
                    idempotency_key=row.idempotency_key,
                    event_key=row.event_key,
                    order_id=row.order_id,
                    event_type=row.event_type,
                    currency=row.currency,
                    total_minor=int(row.total_debit_minor),
                    occurred_at=row.occurred_at,
                    reverses_journal_id=row.reverses_journal_id,
                    reverses_key=row.reverses_key,
                )
                for row in conn.execute(stmt)
            ]

    # -- side-effect ledger ------------------------------------------------------

    def record_effect(
        self,
        order_id: str,
        key: str,
        adapter: str,
        external_ref: Mapping[str, str],
        status: str,
        attempts: int,
        detail: str = "",
        *,
        applied_at: datetime | None = None,
    ) -> SideEffect:
        """Insert or replace the (order_id, key, adapter) row; returns what was stored."""
        return self.record_effects([
            EffectRow(order_id, key, adapter, external_ref, status, attempts, detail, applied_at)
        ])[0]

    def record_effects(self, rows: Sequence[EffectRow]) -> list[SideEffect]:
        """Insert or replace many (order_id, key, adapter) rows in one transaction.

        A legacy row of the same key and adapter (order_id NULL) is left as it is; the
        row written now is the one lookups for this order find from now on.
        """
        values = []
        for r in rows:
            if not r.key or not r.adapter or not r.status:
                raise ValueError("record_effect needs a key, an adapter and a status")
            if not isinstance(r.order_id, str):
                raise ValueError(f"order_id must be a string, got {r.order_id!r}")
            if isinstance(r.attempts, bool) or not isinstance(r.attempts, int) or r.attempts < 0:
                raise ValueError(f"attempts must be a non-negative int, got {r.attempts!r}")
            refs = {str(k): str(v) for k, v in r.external_ref.items()}
            values.append({
                "order_id": r.order_id,
                "idempotency_key": r.key,
                "adapter": r.adapter,
                "external_ref": json.dumps(refs, sort_keys=True, separators=(",", ":")),
                "status": r.status,
                "attempts": r.attempts,
                "applied_at": r.applied_at or datetime.now(UTC),
                "detail": r.detail,
            })
        if not values:
            return []
        # The last row per (order, key, adapter) wins, as separate calls in this order would.
        latest = {(v["order_id"], v["idempotency_key"], v["adapter"]): v for v in values}
        insert = (pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert)(
            side_effects
        )
        stmt = insert.on_conflict_do_update(
            index_elements=[
                side_effects.c.order_id, side_effects.c.idempotency_key, side_effects.c.adapter
            ],
            set_={
                name: insert.excluded[name]
                for name in ("external_ref", "status", "attempts", "applied_at", "detail")
            },
        )  # fmt: skip
        with db_errors(), self._transaction(write=True) as conn:
            conn.execute(stmt, list(latest.values()))
        return [_side_effect(v) for v in values]

    def effect(self, order_id: str, key: str, adapter: str) -> SideEffect | None:
        """The row of one effect in one adapter (a legacy row of the key too, see effects_of)."""
        return self.effects_for([(order_id, key)], adapter).get((order_id, key))

    def effects_for(self, effects: Iterable[EffectId], adapter: str) -> dict[EffectId, SideEffect]:
        """(order_id, key) -> row for the effects that have one (one query per 500)."""
        return self.effects_of(effects, [adapter])[adapter]

    def effects_of(
        self, effects: Iterable[EffectId], adapters: Sequence[str]
    ) -> dict[str, dict[EffectId, SideEffect]]:
        """adapter -> (order_id, key) -> row, for several adapters in one query (per 500).

        A row of the order itself wins; failing that a legacy row of the key (order_id
        NULL: written before effects were identified per order, its order not derivable
        when migrating) is the effect's row, exactly as lookups by key alone found it.
        The returned row keeps ``order_id=None`` then.
        """
        wanted = list(dict.fromkeys(effects))
        out: dict[str, dict[EffectId, SideEffect]] = {adapter: {} for adapter in adapters}
        if not wanted or not adapters:
            return out
        with db_errors(), self._transaction() as conn:
            for chunk in _chunks(wanted):
                by_key: dict[str, list[EffectId]] = defaultdict(list)
                for order_id, key in chunk:
                    by_key[key].append((order_id, key))
                rows = conn.execute(
                    sa.select(side_effects).where(
                        side_effects.c.adapter.in_(list(adapters)),
                        side_effects.c.idempotency_key.in_(sorted(by_key)),
                        sa.or_(
                            side_effects.c.order_id.in_(sorted({o for o, _ in chunk})),
                            side_effects.c.order_id.is_(None),
                        ),
                    )
                ).mappings()
                legacy: list[SideEffect] = []
                for row in rows:
                    effect = _side_effect(dict(row))
                    if effect.order_id is None:
                        legacy.append(effect)
                        continue
                    ident = (effect.order_id, effect.idempotency_key)
                    if ident in by_key.get(effect.idempotency_key, ()):
                        out[effect.adapter][ident] = effect
                for effect in legacy:
                    found = out[effect.adapter]
                    for ident in by_key[effect.idempotency_key]:
                        found.setdefault(ident, effect)
        return out

    def all_effects(
        self, adapter: str | None = None, statuses: Iterable[str] | None = None
    ) -> list[SideEffect]:
        """Read-only: side-effect rows (order_id None: legacy), optionally of one adapter
        and some statuses; ordered by key, order, adapter."""
        stmt = sa.select(side_effects).order_by(
            side_effects.c.idempotency_key,
            sa.func.coalesce(side_effects.c.order_id, ""),
            side_effects.c.adapter,
        )
        if adapter is not None:
            stmt = stmt.where(side_effects.c.adapter == adapter)
        if statuses is not None:
            stmt = stmt.where(side_effects.c.status.in_(sorted(set(statuses))))
        with db_errors(), self._transaction() as conn:
            return [_side_effect(dict(row)) for row in conn.execute(stmt).mappings()]

    # -- plumbing ----------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            if write:
                conn = conn.execution_options(revline_write=True)
            with conn.begin():
                yield conn


@contextmanager
def migrating(engine: Engine) -> Iterator[Connection]:
    """One migrating transaction: locked, and on SQLite with foreign keys off.

    The lock serialises concurrent migrations (PostgreSQL: a transaction-scoped
    advisory lock; SQLite: BEGIN IMMEDIATE holds the write lock). SQLite rebuilds a
    table to change its constraints (drop, then rename a copy into place), which with
    foreign keys on would count every line of a rebuilt journals table as orphaned;
    the pragma cannot change inside a transaction, so it is turned off before BEGIN,
    every foreign key is checked before COMMIT, and it is on again afterwards.
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        raw = conn.connection.driver_connection
        if sqlite:
            assert raw is not None
            raw.execute("PRAGMA foreign_keys = OFF")
        try:
            write = conn.execution_options(revline_write=True)
            with write.begin():
                lock_for_migration(write)
                yield write
                if sqlite:
                    broken = write.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise ConfigurationError(
                            f"ledger migration left {len(broken)} row(s) whose foreign key "
                            f"has no parent (first: {tuple(broken[0])}); nothing was changed"
                        )
        finally:
            if raw is not None and sqlite:
                raw.execute("PRAGMA foreign_keys = ON")


def upgrade_to_head(conn: Connection) -> None:
    """Run the migrations the database lacks, inside ``conn``'s transaction (see migrate)."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from revline.sinks.ledger.migrations import BASELINE, MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    tables = set(sa.inspect(conn).get_table_names())
    current: set[str] = set()
    if "alembic_version" in tables:
        current = set(conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars())
    if current == set(ScriptDirectory.from_config(config).get_heads()):
        return  # the usual start: nothing to do, and nothing logged
    if not current and tables & _LEDGER_TABLES:
        # Written before migrations existed: that schema is the baseline revision.
        missing = _LEDGER_TABLES - tables
        if missing:
            raise ConfigurationError(
                f"the ledger database has some of the ledger's tables but not "
                f"{sorted(missing)} and no migration history: not a ledger this code wrote"
            )
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")


def _copy_rows(conn: Connection, table: sa.Table, rows: list[tuple[Any, ...]]) -> None:
    """COPY ... FROM STDIN on the transaction's own connection.

    About twice the rows/s of a pipelined executemany; constraints and triggers
    (the balance check included) fire exactly as for INSERT.
    """
    statement = f"COPY {table.name} ({', '.join(c.name for c in table.columns)}) FROM STDIN"
    raw = conn.connection.driver_connection
    assert raw is not None
    dbapi = conn.dialect.loaded_dbapi
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except dbapi.Error as exc:
        # Bypassing SQLAlchemy's execute: wrap like it would, so errors classify alike.
        lost = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
        raise sa_exc.DBAPIError.instance(
            statement, None, exc, dbapi.Error, connection_invalidated=lost, dialect=conn.dialect
        ) from exc


def _posted_lines() -> sa.Join:
    # Through the header: a line can only count once its journal exists (see _schema).
    return journal_lines.join(journals, journals.c.id == journal_lines.c.journal_id)


# The class half of the (int, int) advisory locks of orders ("RVLO"); the one-key lock
# space of the migration lock is another (PostgreSQL keeps the two apart).
_ORDER_LOCK_CLASS = 0x52564C4F


def _lock_orders(conn: Connection, order_ids: set[str]) -> None:
    """PostgreSQL: a transaction-scoped advisory lock per order, taken in key order.

    A refund posts differently once its order has a credit note, and a cancellation
    reclassifies the refunds posted before it: two transactions writing one order's
    refund and cancellation at once would each miss the other (READ COMMITTED). With
    the lock the second waits, then reads what the first committed. SQLite needs
    nothing: a writer holds the database's write lock from BEGIN IMMEDIATE on.
    Taken only for batches holding refunds or cancellations.
    """
    if conn.dialect.name != "postgresql" or not order_ids:
        return
    keys = sorted({
        int.from_bytes(hashlib.blake2b(o.encode("utf-8", "surrogatepass"), digest_size=4)
                       .digest(), "big", signed=True)
        for o in order_ids
    })  # fmt: skip
    conn.execute(
        sa.text(
            "SELECT pg_advisory_xact_lock(:cls, s.k) FROM "
            "(SELECT k FROM unnest(CAST(:keys AS integer[])) AS k ORDER BY k OFFSET 0) AS s"
        ),
        {"cls": _ORDER_LOCK_CLASS, "keys": keys},
    )


def _result(p: _Prepared, status: str, refs: Mapping[str, str], detail: str) -> EffectResult:
    return EffectResult(ADAPTER_NAME, p.key, status, dict(refs), detail, order_id=p.order_id)


_DEBIT_CREDIT = (journal_lines.c.debit_minor, journal_lines.c.credit_minor)
_LOW_BITS = 32


def _exact_sum(dialect: str, column: sa.ColumnElement[int]) -> tuple[sa.ColumnElement[Any], ...]:
    """SUM of a BIGINT money column that cannot overflow; ``_combine`` makes it one int.

    PostgreSQL sums into NUMERIC. SQLite's SUM over integers raises "integer overflow"
    past 2^63 - 1 and has no wider integer, so it sums the high and the low 32 bits
    of the (non-negative) amounts separately: each partial sum stays below 2^63 for
    up to 2^31 lines per group, and Python adds them up exactly.
    """
    if dialect == "postgresql":
        return (sa.cast(sa.func.coalesce(sa.func.sum(column), 0), sa.Numeric),)
    return (
        sa.func.coalesce(sa.func.sum(column.op(">>")(_LOW_BITS)), 0),
        sa.func.coalesce(sa.func.sum(column.op("&")(2**_LOW_BITS - 1)), 0),
    )


def _combine(sums: Sequence[Any]) -> int:
    """The int that ``_exact_sum``'s columns add up to (NUMERIC arrives as Decimal)."""
    if len(sums) == 1:
        return int(sums[0])
    high, low = sums
    return (int(high) << _LOW_BITS) + int(low)


def _refs(journal_keys_and_ids: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{"journal": id}; a cancellation reversing several invoices adds "journal.2", ..."""
    ordered = sorted(journal_keys_and_ids)
    return {
        ("journal" if n == 1 else f"journal.{n}"): journal_id
        for n, (_, journal_id) in enumerate(ordered, start=1)
    }


def _journal_id(order_id: str, effect_key: str, occurred_at: datetime) -> str:
    """A UUIDv8 (RFC 9562): the event's occurred_at in Unix ms, then 74 bits of
    uuid5(order id, effect key).

    A function of the event alone, so a replay into an empty ledger reproduces the same
    ids; time-ordered, so the indexes on journal ids take inserts at their recent end
    instead of at random pages (random uuid5 ids halved COPY throughput on a large
    ledger and dirtied a page per insert). The order is hashed with the key: two orders
    may share a key, and their journals must not share an id. Journals keep the id they
    were posted with: ledgers written before hold uuid5(key) ids (version 5) and
    UUIDv8 ids of the key alone; lookups read stored ids, never recompute them, and the
    namespaces differ, so no scheme collides with another. A credit note's effect key
    embeds the reversed journal's id, so shadow parity names it by the reversed key.
    """
    unix_ms = max((occurred_at - _UNIX_EPOCH) // _MS, 0)  # year 9999 still fits 48 bits
    # JSON: an unambiguous encoding of the pair (no separator a key could contain).
    name = json.dumps([order_id, effect_key])
    digest = uuid.uuid5(_ORDER_KEY_NAMESPACE, name).int
    rand_a = (digest >> 64) & 0xFFF
    rand_b = digest & (2**62 - 1)
    return str(uuid.UUID(int=unix_ms << 80 | 0x8 << 76 | rand_a << 64 | 0b10 << 62 | rand_b))


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def _describe(rule: PostingRule | None, env: Mapping[str, Any], event: Event) -> str:
    if rule is None or not rule.description:
        return str(env.get("event_type", ""))
    fields = _Fields({k: v for k, v in event.items() if isinstance(v, str | int)})
    fields.update({k: v for k, v in env.items() if v is not None})
    try:
        return rule.description.format_map(fields)
    except (ValueError, IndexError, AttributeError, TypeError):
        return rule.description


def _side_effect(row: Mapping[str, Any]) -> SideEffect:
    refs = json.loads(row["external_ref"])
    return SideEffect(
        order_id=row["order_id"],
        idempotency_key=row["idempotency_key"],
        adapter=row["adapter"],
        external_ref={str(k): str(v) for k, v in refs.items()},
        status=row["status"],
        attempts=int(row["attempts"]),
        applied_at=row["applied_at"],
        detail=row["detail"],
    )


def normalize_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> psycopg 3 (SQLAlchemy's default is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _create_engine(url: str) -> Engine:
    try:
        parsed = make_url(normalize_url(url))
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(f"ledger database URL {url!r} is not valid: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend == "postgresql":
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = 10
        if "application_name" not in parsed.query:
            connect_args["application_name"] = "revline-ledger"
        # pre_ping: a connection killed by a server restart is replaced, not reused.
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    raise ConfigurationError(
        f"ledger database {backend!r} is not supported: use sqlite:///... or postgresql://..."
    )


def _sqlite_engine(parsed: sa.URL) -> Engine:
    database = parsed.database or ""
    memory = database in ("", ":memory:") or "mode=memory" in database
    if memory:
        # One shared connection, else every pooled connection sees its own empty DB.
        engine = sa.create_engine(
            parsed, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        if not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit transactions start
        # late, after our SELECTs); see the "begin" hook below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")  # the deferred FK seals journals
            cursor.execute("PRAGMA recursive_triggers = ON")  # REPLACE fires delete triggers
            if not memory:
                cursor.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer takes the write lock up front, so its existence checks and its
        # inserts see the same database and never fail mid-way on SQLITE_BUSY.
        immediate = conn.get_execution_options().get("revline_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _derived(
    p: _Prepared, effect_key: str, currency: str, description: str,
    amounts: Amounts, reverses_journal_id: str | None = None,
) -> _Journal:  # fmt: skip
    """A journal an event posts besides its own (a credit note, a reclassification): its
    own effect key, scoped to the event's order (journals_order_key), found by event_key."""
    return _Journal(
        id=_journal_id(p.order_id, effect_key, p.occurred_at),
        idempotency_key=effect_key,
        event_key=p.key,
        order_id=p.order_id,
        event_type=p.event_type,
        currency=currency,
        source_ref=p.source_ref,
        occurred_at=p.occurred_at,
        description=description,
        amounts=amounts,
        reverses_journal_id=reverses_journal_id,
    )
