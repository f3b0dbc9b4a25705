"""The operators' read model: indexed tables next to the ledger, kept by the components.

What the operator commands query instead of reading whole topics:

* ``audit_records``: every chained audit record by (chain, seq), written by the auditor
  in the batch it commits (upserted, so a batch it redoes after an abort writes the same
  rows); ``audit_heads``: the chain heads it pages in through a bounded cache;
* ``exception_states``: every exception's current state, upserted by the exception
  manager on each change once Kafka has acknowledged it; ``exception_counts``: how many
  per status, owner, backup owner, escalation and severity, kept in the same transaction
  (what "N of M match" reads instead of counting the table);
* ``outcome_hours``: final outcomes counted per hour and kind, check, severity, owner,
  event type (and what the report needs besides: stage, held, latency bucket), by the
  auditor from the outcomes it reads; ``outcomes_counted`` keeps it once per outcome;
* ``read_model_offsets``: up to where each writer's source partitions are in the
  tables, so a component can tell on start whether they agree with Kafka.

A lost database connection (a PostgreSQL restart, a fail-over) is ridden out, not fatal:
a ``write()`` transaction keeps the steps it ran and, when a statement or the commit fails
on the connection, waits for the database and runs them all again in a new transaction
(every step is idempotent: upserts, "not counted yet" checks, counts moved from what the
table holds), and reads are retried, both for up to ``outage_s``
(``REVLINE_LEDGER_OUTAGE_S`` for the components); opening the model waits up to
``wait_s`` (``REVLINE_STARTUP_TIMEOUT_S``) for the database.

The topics stay the source of truth: ``rebuild`` recreates every table from them (the
audit, heads, outcomes and exception-state topics) with the same content the
components write. The tables live in the ledger's database (SQLite by default,
PostgreSQL in production) and come with its migrations (``0003_read_model``,
``0004_exception_counts``).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import random
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from revline.sinks.ledger._errors import is_transient
from revline.sinks.ledger._schema import (
    READ_MODEL_ALL,
    audit_heads,
    audit_records,
    exception_counts,
    exception_states,
    outcome_hours,
    outcomes_counted,
    read_model_offsets,
)

if TYPE_CHECKING:
    from revline.core.settings import Settings
    from revline.processors.audit_chain import ChainHead

log = logging.getLogger("revline.read_model")

HOUR_MS = 3_600_000
AUDITOR = "auditor"  # owner names in read_model_offsets
EXCEPTIONS = "exceptions"
ACTIVE = ("open", "acknowledged")
_CHUNK = 2_000

# Latency buckets (ms, upper bounds, exclusive): 1-2-5 steps plus the report's own
# boundaries, so its histogram and its 24 h target are exact; percentiles are the
# bucket's upper bound (capped by the exact maximum).
LATENCY_EDGES: tuple[int, ...] = tuple(sorted(
    {m * 10**e for e in range(0, 11) for m in (1, 2, 5)}
    | {60_000, 600_000, 1_800_000, 3_600_000, 7_200_000, 43_200_000, 86_400_000}))
NO_LATENCY = -1
_REFUSED_OVERRIDE = re.compile(r"manual_override requires (\w+)")

State = dict[str, Any]
T = TypeVar("T")
P = ParamSpec("P")
_BACKOFF_FIRST_S = 0.25
_BACKOFF_MAX_S = 5.0


def latency_bucket(ms: int) -> int:
    """Index of the first edge above ``ms`` (len(LATENCY_EDGES) for beyond the last)."""
    return bisect.bisect_right(LATENCY_EDGES, ms)


def bucket_value(bucket: int) -> int:
    return LATENCY_EDGES[bucket] if bucket < len(LATENCY_EDGES) else LATENCY_EDGES[-1] * 10


def hour_of(ms: int) -> int:
    return ms - ms % HOUR_MS


# -- rows from source values ---------------------------------------------------------------
def outcome_counts(outcome: Mapping[str, Any]) -> tuple[str, int, list[dict[str, Any]]] | None:
    """(input coordinates, hour, rows to add) for a final outcome; None for an interim one."""
    if not outcome.get("final"):
        return None
    coords = f"{outcome['input_topic']}/{outcome['input_partition']}/{outcome['input_offset']}"
    decided = int(outcome["decided_at_ms"])
    hour = hour_of(decided)
    kind = str(outcome["kind"])
    occurred = outcome.get("occurred_at_ms")
    latency: int | None = None
    if occurred is not None and kind != "dead_letter":
        latency = max(0, decided - int(occurred))
    exception = kind == "exception"
    rows = [{
        "hour_ms": hour, "row_type": "outcome", "kind": kind,
        "event_type": str(outcome.get("event_type") or ""),
        "check_id": str(outcome.get("check_id") or "") if exception else "",
        "severity": str(outcome.get("severity") or "") if exception else "",
        "owner": str(outcome.get("owner") or "") if exception else "",
        "stage": str(outcome.get("stage") or "unknown") if kind == "dead_letter" else "",
        "held": bool(outcome.get("held")),
        "refused_override": kind == "dead_letter"
        and bool(_REFUSED_OVERRIDE.search(str(outcome.get("reason") or ""))),
        "latency_bucket": NO_LATENCY if latency is None else latency_bucket(latency),
        "count": 1, "max_latency_ms": latency,
    }]
    if kind in ("validated", "exception"):
        for check_id in sorted(set(outcome.get("warnings") or ())):
            rows.append({
                "hour_ms": hour, "row_type": "warning", "kind": kind, "event_type": "",
                "check_id": str(check_id), "severity": "", "owner": "", "stage": "",
                "held": False, "refused_override": False, "latency_bucket": NO_LATENCY,
                "count": 1, "max_latency_ms": None,
            })
    return coords, hour, rows


def state_row(state: Mapping[str, Any], raw: bytes | None = None) -> dict[str, Any]:
    expires = state.get("expires_at_ms")
    return {
        "exception_id": str(state["exception_id"]), "order_id": state.get("order_id"),
        "check_id": str(state["check_id"]), "severity": str(state["severity"]),
        "owner": str(state["owner"]), "backup_owner": state.get("backup_owner"),
        "status": str(state["status"]), "escalated": bool(state.get("escalated")),
        "opened_at_ms": int(state["opened_at_ms"]),
        "sla_deadline_ms": int(state["sla_deadline_ms"]),
        "expires_at_ms": int(expires) if expires is not None else None,
        "state": (raw if raw is not None else orjson.dumps(state)).decode(),
    }


_COUNT_DIMENSIONS = ("status", "owner", "backup_owner", "escalated", "severity")


def _count_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A state row's key in ``exception_counts`` ('' for no backup owner)."""
    return (str(row["status"]), str(row["owner"]), str(row["backup_owner"] or ""),
            bool(row["escalated"]), str(row["severity"]))


def record_row(partition: int, record: Mapping[str, Any], raw: bytes,
               location: str) -> dict[str, Any]:
    return {"chain": record["chain"], "seq": int(record["seq"]), "kafka_partition": partition,
            "at_ms": int(record["at_ms"]), "kind": str(record["kind"])[:64],
            "fact_id": str(record["fact_id"]), "hash": str(record["hash"]),
            "record": raw.decode(), "location": location}


def head_row(partition: int, head: ChainHead) -> dict[str, Any]:
    return {"chain": head.chain, "kafka_partition": partition, "seq": head.seq,
            "hash": head.hash, "recent": orjson.dumps(list(head.recent)).decode()}


def head_from_row(row: Mapping[str, Any]) -> ChainHead:
    from collections import deque

    from revline.processors.audit_chain import RECENT_FACT_IDS, ChainHead

    return ChainHead(chain=row["chain"], seq=int(row["seq"]), hash=row["hash"],
                     recent=deque(orjson.loads(row["recent"]), maxlen=RECENT_FACT_IDS))


# -- the database ------------------------------------------------------------------------
class ReadModelUnavailable(Exception):
    """The tables are missing (an old deployment) or the database cannot be opened."""


def wait_for_database(fn: Callable[[], T], what: str, budget_s: float) -> T:
    """``fn()``, called again while it fails on the database connection (``is_transient``:
    a restart, a fail-over, a server starting up), with backoff, for up to ``budget_s``;
    then the last error. Any other error is raised at once."""
    started = time.monotonic()
    delay = _BACKOFF_FIRST_S
    warned = float("-inf")
    attempt = 0
    while True:
        attempt += 1
        try:
            result = fn()
        except Exception as exc:
            now = time.monotonic()
            if not is_transient(exc) or now - started >= budget_s:
                raise
            if now - warned >= 10:
                warned = now
                log.warning("%s: the ledger database is unavailable (%s); retrying for up to "
                            "%.0f s more", what, _one_line(exc), budget_s - (now - started))
            time.sleep(min(delay, budget_s - (now - started)) * random.uniform(0.8, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX_S)
            continue
        if attempt > 1:
            log.warning("%s: the ledger database is back after %.1f s", what,
                        time.monotonic() - started)
        return result


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return " ".join(text.split())[:300] or type(exc).__name__


class ReadModelWrite:
    """One write transaction of the read model that survives a lost connection.

    What ``ReadModel.write()`` yields: the model's writing methods (``write_audit_batch``,
    ``write_states``, ``set_offsets``…) and ``execute`` run here as steps, at once, in one
    transaction that commits when the ``with`` block ends. When a step or the commit fails
    on the connection, it waits for the database (up to the model's ``outage_s``) and runs
    every step so far again in a new transaction: the steps are idempotent and read what
    they depend on inside the transaction, so a commit that did happen before the
    connection broke is not applied twice. An error of the block itself rolls back.
    """

    def __init__(self, model: ReadModel) -> None:
        self._model = model
        self._steps: list[Callable[[Connection], Any]] = []
        self._conn: Connection | None = None

    def run(self, step: Callable[[Connection], T]) -> T:
        """Run ``step`` in this transaction (every step again after a lost connection)."""
        self._steps.append(step)
        if self._conn is not None:
            try:
                return step(self._conn)
            except Exception as exc:
                self._drop()
                if not is_transient(exc) or self._model.outage_s <= 0:
                    raise
        result: T = self._model.retrying(self._replay, "read model write")
        return result

    def execute(self, statement: Any, parameters: Any = None) -> Any:
        """``Connection.execute`` as a step (its result is the last run's)."""
        if parameters is None:
            return self.run(lambda conn: conn.execute(statement))
        return self.run(lambda conn: conn.execute(statement, parameters))

    def _replay(self) -> Any:
        """Every step so far in a new transaction; the last one's result."""
        self._drop()
        try:
            conn = self._model.engine.connect()
            self._conn = conn.execution_options(revline_write=True)
            self._conn.begin()
            result: Any = None
            for step in self._steps:
                result = step(self._conn)
            return result
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # rolls back what is open; a dead connection is discarded

    def _commit(self) -> None:
        if not self._steps:
            return

        def commit() -> None:
            if self._conn is None:
                self._replay()
            assert self._conn is not None
            try:
                self._conn.commit()
            finally:
                self._drop()

        self._model.retrying(commit, "read model commit")

    def _rollback(self) -> None:
        self._drop()


Tx = Connection | ReadModelWrite  # what the writing methods take: write()'s, or a connection


def _read(method: Callable[Concatenate[ReadModel, P], T]
          ) -> Callable[Concatenate[ReadModel, P], T]:
    """A query of the model, run again while the database is away (up to ``outage_s``)."""
    @functools.wraps(method)
    def retried(model: ReadModel, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return model.retrying(lambda: method(model, *args, **kwargs),
                              f"read model {method.__name__}")
    return retried


class ReadModel:
    """The read-model tables in the ledger's database at ``url``.

    Components open it with ``migrate=True`` (the ledger's migrations bring the tables);
    operator commands with ``migrate=False``, and fall back to the topics when
    ``ready()`` says the tables are missing or empty.
    """

    def __init__(self, url: str, *, migrate: bool = True, wait_s: float = 0.0,
                 outage_s: float = 0.0) -> None:
        from revline.sinks.ledger._ledger import _create_engine, migrating, upgrade_to_head

        self.url = url
        self.engine: Engine = _create_engine(url)
        self.dialect = self.engine.dialect.name
        self.outage_s = outage_s  # a lost connection: how long writes and reads wait
        if migrate:
            def upgrade() -> None:
                with migrating(self.engine) as conn:
                    upgrade_to_head(conn)

            wait_for_database(upgrade, "read model start-up", wait_s)

    @classmethod
    def for_settings(cls, settings: Settings, *, migrate: bool = True) -> ReadModel:
        """For a component: waits for the database at start (``startup_timeout_s``) and
        rides out a lost connection (``ledger_outage_s``)."""
        return cls(settings.ledger_url, migrate=migrate, wait_s=settings.startup_timeout_s,
                   outage_s=settings.ledger_outage_s)

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, retried while the database is away, for up to ``outage_s``."""
        if self.outage_s <= 0:
            return fn()
        return wait_for_database(fn, what, self.outage_s)

    @classmethod
    def for_query(cls, settings: Settings) -> ReadModel:
        """For an operator command: never creates a database; ReadModelUnavailable if absent."""
        url = settings.ledger_url
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            if str(path) not in ("", ":memory:") and not path.exists():
                raise ReadModelUnavailable(f"no ledger database at {path}")
        try:
            model = cls(url, migrate=False)
            missing = model.missing_tables()
        except Exception as exc:
            raise ReadModelUnavailable(f"cannot open the ledger database: {exc}") from exc
        if missing:
            model.close()
            raise ReadModelUnavailable(
                f"the ledger database has no read-model tables ({', '.join(missing)}): the "
                "components have not run with this version yet")
        return model

    def close(self) -> None:
        self.engine.dispose()

    @_read
    def missing_tables(self) -> list[str]:
        names = set(sa.inspect(self.engine).get_table_names())
        return [t.name for t in READ_MODEL_ALL if t.name not in names]

    @_read
    def has_rows(self, table: sa.Table) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.literal(1)).select_from(table).limit(1)).first() \
                is not None

    @contextmanager
    def write(self) -> Iterator[ReadModelWrite]:
        """One transaction (see ``ReadModelWrite``), committed when the block ends."""
        tx = ReadModelWrite(self)
        try:
            yield tx
        except BaseException:
            tx._rollback()
            raise
        tx._commit()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    def _upsert(self, conn: Tx, table: sa.Table, rows: Sequence[Mapping[str, Any]]
                ) -> None:
        if isinstance(conn, ReadModelWrite):
            return conn.run(lambda c: self._upsert(c, table, rows))
        if not rows:
            return
        stmt = self._insert(table)
        keys = [c.name for c in table.primary_key.columns]
        stmt = stmt.on_conflict_do_update(
            index_elements=keys,
            set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys})
        for start in range(0, len(rows), _CHUNK):
            conn.execute(stmt, list(rows[start:start + _CHUNK]))

    # -- writes ------------------------------------------------------------------------
    def write_audit_batch(self, conn: Tx, records: Sequence[Mapping[str, Any]],
                          heads: Sequence[Mapping[str, Any]],
                          offsets: Mapping[tuple[str, int], int],
                          outcomes: Sequence[Mapping[str, Any]]) -> None:
        """One auditor batch: its records, the heads it moved, its offsets, its outcomes."""
        if isinstance(conn, ReadModelWrite):
            return conn.run(
                lambda c: self.write_audit_batch(c, records, heads, offsets, outcomes))
        self._upsert(conn, audit_records, records)
        self._upsert(conn, audit_heads, heads)
        self.set_offsets(conn, AUDITOR, offsets)
        self.count_outcomes(conn, outcomes)

    def set_offsets(self, conn: Tx, owner: str,
                    offsets: Mapping[tuple[str, int], int]) -> None:
        if isinstance(conn, ReadModelWrite):
            return conn.run(lambda c: self.set_offsets(c, owner, offsets))
        self._upsert(conn, read_model_offsets, [
            {"owner": owner, "topic": topic, "kafka_partition": p, "next_offset": o}
            for (topic, p), o in sorted(offsets.items())])

    def forget_offsets(self, owner: str, partitions: Iterable[int]) -> None:
        """The tables may be ahead of Kafka for these partitions: make them look stale.

        Marked -1, not deleted: a deleted row reads as offset 0, which equals what Kafka
        says for a partition with nothing committed yet, so an aborted *first* batch's
        heads looked current and the redo chained onto them (a fork the review found)."""
        parts = sorted(set(partitions))
        with self.write() as tx:
            tx.execute(read_model_offsets.update().where(
                read_model_offsets.c.owner == owner,
                read_model_offsets.c.kafka_partition.in_(parts)).values(next_offset=-1))

    @_read
    def offsets(self, owner: str) -> dict[tuple[str, int], int]:
        t = read_model_offsets
        with self.read() as conn:
            rows = conn.execute(sa.select(t.c.topic, t.c.kafka_partition, t.c.next_offset)
                                .where(t.c.owner == owner))
            return {(r.topic, r.kafka_partition): r.next_offset for r in rows}

    def count_outcomes(self, conn: Tx, outcomes: Iterable[Mapping[str, Any]]) -> int:
        """Add final outcomes not counted yet (by input coordinates); returns how many."""
        if isinstance(conn, ReadModelWrite):
            given = list(outcomes)  # an iterator is read once, a step may run again
            return conn.run(lambda c: self.count_outcomes(c, given))
        fresh: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        for outcome in outcomes:
            counted = outcome_counts(outcome)
            if counted is not None:
                coords, hour, rows = counted
                fresh.setdefault(coords, (hour, rows))
        if not fresh:
            return 0
        ids = list(fresh)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for seen in conn.execute(sa.select(outcomes_counted.c.input)
                                     .where(outcomes_counted.c.input.in_(chunk))).scalars():
                fresh.pop(seen, None)
        if not fresh:
            return 0
        conn.execute(outcomes_counted.insert(),
                     [{"input": k, "hour_ms": hour} for k, (hour, _) in fresh.items()])
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        keys = [c.name for c in outcome_hours.primary_key.columns]
        for _, rows in fresh.values():
            for row in rows:
                key = tuple(row[k] for k in keys)
                have = merged.get(key)
                if have is None:
                    merged[key] = dict(row)
                else:
                    have["count"] += row["count"]
                    if row["max_latency_ms"] is not None:
                        have["max_latency_ms"] = max(have["max_latency_ms"] or 0,
                                                     row["max_latency_ms"])
        stmt = self._insert(outcome_hours)
        t = outcome_hours
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_={
            "count": t.c.count + stmt.excluded["count"],
            "max_latency_ms": sa.case(
                (t.c.max_latency_ms.is_(None), stmt.excluded["max_latency_ms"]),
                (stmt.excluded["max_latency_ms"].is_(None), t.c.max_latency_ms),
                (stmt.excluded["max_latency_ms"] > t.c.max_latency_ms,
                 stmt.excluded["max_latency_ms"]),
                else_=t.c.max_latency_ms),
        })
        # Sorted: concurrent auditors (PostgreSQL) lock the rows they add to in one order.
        conn.execute(stmt, [merged[k] for k in sorted(merged, key=repr)])
        return len(fresh)

    def write_states(self, conn: Tx, rows: Sequence[Mapping[str, Any]],
                     offsets: Mapping[tuple[str, int], int] | None = None) -> None:
        """Upsert states (rows of ``state_row``) and keep ``exception_counts`` with them."""
        if isinstance(conn, ReadModelWrite):
            return conn.run(lambda c: self.write_states(c, rows, offsets))
        if rows:
            latest = {r["exception_id"]: r for r in rows}  # upserted in order: the last wins
            delta: Counter[tuple[Any, ...]] = Counter()
            for key in self._count_keys(conn, list(latest)).values():
                delta[key] -= 1
            for row in latest.values():
                delta[_count_key(row)] += 1
            self._upsert(conn, exception_states, rows)
            self._add_counts(conn, delta)
        if offsets:
            self.set_offsets(conn, EXCEPTIONS, offsets)

    def delete_states(self, conn: Tx, ids: Sequence[str]) -> None:
        if isinstance(conn, ReadModelWrite):
            return conn.run(lambda c: self.delete_states(c, ids))
        delta: Counter[tuple[Any, ...]] = Counter()
        for key in self._count_keys(conn, list(ids)).values():
            delta[key] -= 1
        for start in range(0, len(ids), 500):
            conn.execute(exception_states.delete()
                         .where(exception_states.c.exception_id.in_(ids[start:start + 500])))
        self._add_counts(conn, delta)

    def clear_states(self, conn: Tx) -> None:
        """Every exception state gone, and their counts."""
        if isinstance(conn, ReadModelWrite):
            return conn.run(self.clear_states)
        conn.execute(exception_states.delete())
        conn.execute(exception_counts.delete())

    def _count_keys(self, conn: Connection, ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """The counted dimensions of the states of ``ids`` in the table (locked on
        PostgreSQL until the transaction ends, so their counts move once)."""
        t = exception_states
        out: dict[str, tuple[Any, ...]] = {}
        for start in range(0, len(ids), 500):
            for row in conn.execute(
                    sa.select(t.c.exception_id, t.c.status, t.c.owner, t.c.backup_owner,
                              t.c.escalated, t.c.severity)
                    .where(t.c.exception_id.in_(ids[start:start + 500]))
                    .with_for_update()).mappings():
                out[row["exception_id"]] = _count_key(dict(row))
        return out

    def _add_counts(self, conn: Connection, delta: Mapping[tuple[Any, ...], int]) -> None:
        moved = [dict(zip(_COUNT_DIMENSIONS, key, strict=True), n=n)
                 for key, n in sorted(delta.items(), key=repr) if n]  # one lock order
        if not moved:
            return
        t = exception_counts
        stmt = self._insert(t)
        stmt = stmt.on_conflict_do_update(index_elements=list(_COUNT_DIMENSIONS),
                                          set_={"n": t.c.n + stmt.excluded["n"]})
        conn.execute(stmt, moved)
        conn.execute(t.delete().where(t.c.n == 0))  # a handful of rows: as rebuilt

    # -- audit queries -----------------------------------------------------------------
    @_read
    def chain_records(self, chain: str) -> list[tuple[str, str]]:
        """(canonical record JSON, location) of every record of ``chain``, by seq."""
        t = audit_records
        with self.read() as conn:
            return [(r.record, r.location) for r in conn.execute(
                sa.select(t.c.record, t.c.location).where(t.c.chain == chain).order_by(t.c.seq))]

    @_read
    def heads_for(self, chains: Iterable[str]) -> dict[str, tuple[int, ChainHead]]:
        out: dict[str, tuple[int, ChainHead]] = {}
        wanted = list(chains)
        t = audit_heads
        with self.read() as conn:
            for start in range(0, len(wanted), 500):
                for row in conn.execute(sa.select(t).where(t.c.chain.in_(
                        wanted[start:start + 500]))).mappings():
                    out[row["chain"]] = (int(row["kafka_partition"]), head_from_row(dict(row)))
        return out

    @_read
    def facts(self, kinds: Sequence[str]) -> list[dict[str, Any]]:
        """Audit records of these kinds (overrides, reconcile runs: few), oldest first."""
        t = audit_records
        with self.read() as conn:
            return [orjson.loads(r) for r in conn.execute(
                sa.select(t.c.record).where(t.c.kind.in_(kinds)).order_by(t.c.at_ms)).scalars()]

    # -- exception queries -------------------------------------------------------------
    def state(self, exception_id: str) -> State | None:
        found = self.states([exception_id])
        return found.get(exception_id)

    @_read
    def states(self, ids: Iterable[str]) -> dict[str, State]:
        wanted = list(ids)
        t = exception_states
        out: dict[str, State] = {}
        with self.read() as conn:
            for start in range(0, len(wanted), 500):
                for row in conn.execute(sa.select(t.c.exception_id, t.c.state).where(
                        t.c.exception_id.in_(wanted[start:start + 500]))):
                    out[row.exception_id] = orjson.loads(row.state)
        return out

    @_read
    def select_states(self, *, now_ms: int, owner: str | None = None,
                      severity: str | None = None, statuses: Sequence[str] = ACTIVE,
                      check: str | None = None, min_age_ms: int | None = None,
                      order_id: str | None = None, limit: int = 200,
                      ) -> tuple[list[State], int, int]:
        """(first ``limit`` matches, most severe then oldest first; matches; all states)."""
        t = exception_states
        where: list[sa.ColumnElement[bool]] = [t.c.status.in_(list(statuses))]
        if owner is not None:
            where.append(sa.or_(t.c.owner == owner,
                                sa.and_(t.c.escalated.is_(True), t.c.backup_owner == owner)))
        if severity is not None:
            where.append(t.c.severity == severity)
        if check is not None:
            like = check.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") \
                .replace("*", "%").replace("?", "_")
            where.append(t.c.check_id.like(like, escape="\\"))
        if min_age_ms is not None:
            where.append(t.c.opened_at_ms <= now_ms - min_age_ms)
        if order_id is not None:
            where.append(t.c.order_id == order_id)
        cond = sa.and_(*where)
        c = exception_counts
        counted: list[sa.ColumnElement[bool]] = [c.c.status.in_(list(statuses))]
        if owner is not None:
            counted.append(sa.or_(c.c.owner == owner,
                                  sa.and_(c.c.escalated.is_(True), c.c.backup_owner == owner)))
        if severity is not None:
            counted.append(c.c.severity == severity)
        with self.read() as conn:
            rows = [orjson.loads(s) for s in conn.execute(
                sa.select(t.c.state).where(cond)
                .order_by(t.c.severity, t.c.opened_at_ms, t.c.exception_id)
                .limit(limit + 1)).scalars()]
            if len(rows) <= limit:
                matched = len(rows)
            elif check is None and min_age_ms is None and order_id is None:
                matched = self._counted(conn, sa.and_(*counted))  # kept counts
            else:  # a filter the counts do not keep: what the indexed part matches
                matched = int(conn.execute(
                    sa.select(sa.func.count()).select_from(t).where(cond)).scalar_one())
            total = self._counted(conn, sa.true())
        if check is not None:  # LIKE is a superset of the glob on some backends (case)
            from fnmatch import fnmatchcase

            rows = [s for s in rows if fnmatchcase(s["check_id"], check)]
        return rows[:limit], matched, total

    @_read
    def state_count(self) -> int:
        with self.read() as conn:
            return self._counted(conn, sa.true())

    @staticmethod
    def _counted(conn: Tx, where: sa.ColumnElement[bool]) -> int:
        if isinstance(conn, ReadModelWrite):
            return conn.run(lambda c: ReadModel._counted(c, where))
        c = exception_counts
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(c.c.n), 0))
                                .where(where)).scalar_one())

    @_read
    def due_states(self, now_ms: int) -> list[State]:
        """Active exceptions whose expiry or (unescalated, open) SLA deadline has come."""
        t = exception_states
        with self.read() as conn:
            rows = conn.execute(sa.select(t.c.state).where(sa.or_(
                sa.and_(t.c.status == "open", t.c.escalated.is_(False),
                        t.c.sla_deadline_ms <= now_ms),
                sa.and_(t.c.status.in_(list(ACTIVE)), t.c.expires_at_ms <= now_ms),
            )).order_by(t.c.opened_at_ms, t.c.exception_id)).scalars()
            return [orjson.loads(s) for s in rows]

    @_read
    def active_summary(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(owner, severity) -> (active count, oldest opened_at_ms)."""
        t = exception_states
        with self.read() as conn:
            return {(r.owner, r.severity): (int(r.n), int(r.oldest)) for r in conn.execute(
                sa.select(t.c.owner, t.c.severity, sa.func.count().label("n"),
                          sa.func.min(t.c.opened_at_ms).label("oldest"))
                .where(t.c.status.in_(list(ACTIVE))).group_by(t.c.owner, t.c.severity))}

    @_read
    def report_states(self, since_ms: int) -> list[State]:
        """Active exceptions, and every exception opened since ``since_ms``."""
        t = exception_states
        with self.read() as conn:
            found: dict[str, State] = {}
            for query in (sa.select(t.c.exception_id, t.c.state)
                          .where(t.c.status.in_(list(ACTIVE))),
                          sa.select(t.c.exception_id, t.c.state)
                          .where(t.c.opened_at_ms >= since_ms)):
                for row in conn.execute(query):
                    found.setdefault(row.exception_id, orjson.loads(row.state))
            return list(found.values())

    @_read
    def outcome_rows(self, since_ms: int) -> list[dict[str, Any]]:
        """Counted rows of the hours from the one holding ``since_ms`` on."""
        t = outcome_hours
        with self.read() as conn:
            return [dict(r) for r in conn.execute(
                sa.select(t).where(t.c.hour_ms >= hour_of(since_ms))).mappings()]

    @_read
    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every content table, sorted (tests compare written and rebuilt)."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        with self.read() as conn:
            for table in READ_MODEL_ALL:
                if table is read_model_offsets:
                    continue
                out[table.name] = sorted(tuple(r) for r in conn.execute(sa.select(table)))
        return out


# -- bounded caches for the components ------------------------------------------------------
class HeadCache:
    """The auditor's chain heads: an LRU of ``capacity`` heads over ``audit_heads``."""

    def __init__(self, model: ReadModel, capacity: int = 20_000) -> None:
        self.model = model
        self.capacity = capacity
        self._lru: OrderedDict[str, tuple[int, ChainHead]] = OrderedDict()
        self.misses = 0

    def __len__(self) -> int:
        return len(self._lru)

    def prefetch(self, chains: Iterable[str]) -> None:
        """Page in the heads of ``chains`` not in the cache (one query)."""
        missing = {c for c in chains if c not in self._lru}
        if not missing:
            return
        self.misses += len(missing)
        for chain, found in self.model.heads_for(missing).items():
            self._lru[chain] = found
        self._trim()

    def get(self, partition: int, chain: str) -> ChainHead:
        from revline.processors.audit_chain import ChainHead

        found = self._lru.get(chain)
        if found is None:
            self.prefetch([chain])
            found = self._lru.get(chain)
        if found is None:
            found = (partition, ChainHead(chain))
        self._lru[chain] = found
        self._lru.move_to_end(chain)
        return found[1]

    def _trim(self) -> None:
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def trim(self) -> None:
        self._trim()

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        if partitions is None:
            self._lru.clear()
            return
        gone = set(partitions)
        for chain in [c for c, (p, _) in self._lru.items() if p in gone]:
            del self._lru[chain]


class PagedStates:
    """The exception manager's states: written-through to ``exception_states``, an LRU of
    ``capacity`` states in memory, and the changes of the current batch until flushed.

    Reads as a mapping (``states[id]``, ``id in states``, ``states.get(id)``)."""

    def __init__(self, model: ReadModel, capacity: int = 20_000) -> None:
        self.model = model
        self.capacity = capacity
        self._lru: OrderedDict[str, State] = OrderedDict()
        self.pending: dict[str, State] = {}

    def get(self, exception_id: str) -> State | None:
        state = self.pending.get(exception_id)
        if state is not None:
            return state
        state = self._lru.get(exception_id)
        if state is None:
            state = self.model.state(exception_id)
            if state is None:
                return None
        self._lru[exception_id] = state
        self._lru.move_to_end(exception_id)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return state

    def __getitem__(self, exception_id: str) -> State:
        state = self.get(exception_id)
        if state is None:
            raise KeyError(exception_id)
        return state

    def __contains__(self, exception_id: object) -> bool:
        return isinstance(exception_id, str) and self.get(exception_id) is not None

    def __setitem__(self, exception_id: str, state: State) -> None:
        self.pending[exception_id] = state

    def __len__(self) -> int:
        return self.model.state_count() + sum(1 for k in self.pending if k not in self._lru)

    def due(self, now_ms: int) -> list[State]:
        """Active states due for the clock: the table's, with this batch's changes on top."""
        from revline.processors.exception_lifecycle import breached, overdue

        found = {s["exception_id"]: s for s in self.model.due_states(now_ms)}
        for exception_id, state in self.pending.items():
            found[exception_id] = state
        return [s for s in found.values() if overdue(s, now_ms) or breached(s, now_ms)]

    def active_summary(self) -> dict[tuple[str, str], tuple[int, int]]:
        if self.pending:
            raise RuntimeError("flush the pending states first")
        return self.model.active_summary()

    def flush(self, offsets: Mapping[tuple[str, int], int] | None = None) -> None:
        """Write the batch's states (Kafka has acknowledged them) and where the topic is."""
        if not self.pending and not offsets:
            return
        rows = [state_row(s) for s in self.pending.values()]
        with self.model.write() as conn:
            self.model.write_states(conn, rows, offsets)
        for exception_id, state in self.pending.items():
            self._lru[exception_id] = state
            self._lru.move_to_end(exception_id)
        self.pending.clear()
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def forget(self) -> None:
        self._lru.clear()
        self.pending.clear()


def reload_heads(model: ReadModel, bootstrap: str, topic: str, partitions: Sequence[int],
                 offsets: Mapping[tuple[str, int], int]) -> int:
    """Replace the heads of ``partitions`` by the committed ones of the heads topic (streamed
    in chunks: memory stays bounded), then record ``offsets``; returns how many heads."""
    from revline.core.readback import CommittedReader
    from revline.processors.audit_chain import ChainHead

    parts = sorted(set(partitions))
    with model.write() as conn:
        conn.execute(read_model_offsets.delete().where(
            read_model_offsets.c.owner == AUDITOR,
            read_model_offsets.c.kafka_partition.in_(parts)))
        conn.execute(audit_heads.delete().where(audit_heads.c.kafka_partition.in_(parts)))
    batch: dict[str, dict[str, Any]] = {}

    def write() -> None:
        with model.write() as conn:
            model._upsert(conn, audit_heads, list(batch.values()))
        batch.clear()

    with CommittedReader(bootstrap, topic, parts) as reader:
        for msg in reader:
            if msg.value() is None:
                continue
            try:
                head = ChainHead.decode(msg.value() or b"")
            except Exception as exc:  # a forked chain would be worse than stopping
                from revline.core.errors import InfrastructureError

                raise InfrastructureError(
                    f"{topic}/{msg.partition()}/{msg.offset()} is not a chain head ({exc}); "
                    "the heads topic was written by something other than the auditor") from exc
            batch[head.chain] = head_row(msg.partition() or 0, head)
            if len(batch) >= _CHUNK * 5:
                write()
    if batch:
        write()
    with model.write() as conn:
        model.set_offsets(conn, AUDITOR, offsets)
        return int(conn.execute(sa.select(sa.func.count()).select_from(audit_heads).where(
            audit_heads.c.kafka_partition.in_(parts))).scalar_one())


# -- rebuilding from the topics ----------------------------------------------------------------
@dataclass
class RebuildCounts:
    audit_records: int = 0
    chain_heads: int = 0
    outcomes_counted: int = 0
    exception_states: int = 0
    unreadable: int = 0


Progress = Callable[[str, int | None], Callable[[int], None]]


def _no_progress(_label: str, _total: int | None) -> Callable[[int], None]:
    return lambda _n: None


def rebuild(model: ReadModel, bootstrap: str, settings: Settings, *,
            progress: Progress = _no_progress) -> RebuildCounts:
    """Empty the tables and fill them again from the topics, in bounded chunks."""
    from confluent_kafka import Consumer, TopicPartition

    from revline.core.kafka_config import client_config
    from revline.core.readback import CommittedReader, read_topic, watermarks
    from revline.processors.audit_chain import ChainHead, parse_record
    from revline.schemas import DecodeError, outcome_codec

    counts = RebuildCounts()
    # Where the auditor and the state topic are *before* reading: the auditor and the
    # manager are stopped (the command checks), so nothing moves meanwhile.
    probe = Consumer(client_config("consumer", bootstrap, {
        "group.id": f"{settings.app_id}-auditor", "enable.auto.commit": False,
        "log_level": 3}, settings=settings))
    try:
        auditor_at: dict[tuple[str, int], int] = {}
        state_end: dict[tuple[str, int], int] = {}
        state_ranges: dict[int, tuple[int, int]] = {}
        for topic in (settings.outcomes_topic, settings.audit_facts_topic):
            info = probe.list_topics(topic, timeout=15).topics.get(topic)
            if info is None or info.error is not None:
                continue
            for tp in probe.committed([TopicPartition(topic, p) for p in info.partitions],
                                      timeout=15):
                auditor_at[topic, tp.partition] = max(0, tp.offset)
        info = probe.list_topics(settings.exception_state_topic, timeout=15) \
            .topics.get(settings.exception_state_topic)
        if info is not None and info.error is None:
            for p in info.partitions:
                state_ranges[p] = watermarks(probe, settings.exception_state_topic, p)
                state_end[settings.exception_state_topic, p] = state_ranges[p][1]
    finally:
        probe.close()

    with model.write() as conn:
        for table in READ_MODEL_ALL:
            conn.execute(table.delete())

    def chunks(rows: Iterator[dict[str, Any]], write: Callable[[ReadModelWrite, list[Any]], None]
               ) -> None:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= _CHUNK * 5:
                with model.write() as conn:
                    write(conn, batch)
                batch = []
        if batch:
            with model.write() as conn:
                write(conn, batch)

    # Audit records, as committed (read_committed), with where each is.
    def audit_rows() -> Iterator[dict[str, Any]]:
        try:
            reader = CommittedReader(bootstrap, settings.audit_topic)
        except Exception as exc:
            log.warning("audit topic: %s", exc)
            return
        with reader:
            tick = progress("audit records", reader.total or None)
            for n, msg in enumerate(reader, start=1):
                record, _ = parse_record(msg.value())
                if record is None:
                    counts.unreadable += 1
                    continue
                counts.audit_records += 1
                yield record_row(msg.partition() or 0, record, msg.value() or b"",
                                 f"{msg.topic()}/{msg.partition()}/{msg.offset()}")
                if n % 1000 == 0:
                    tick(n)
            tick(reader.total)

    chunks(audit_rows(), lambda conn, rows: model._upsert(conn, audit_records, rows))

    # Chain heads: the compacted heads topic, the last per chain.
    def head_rows() -> Iterator[dict[str, Any]]:
        try:
            reader = CommittedReader(bootstrap, settings.audit_heads_topic)
        except Exception as exc:
            log.warning("heads topic: %s", exc)
            return
        with reader:
            tick = progress("chain heads", reader.total or None)
            for n, msg in enumerate(reader, start=1):
                if msg.value() is None:
                    continue
                head = ChainHead.decode(msg.value() or b"")
                yield head_row(msg.partition() or 0, head)
                if n % 1000 == 0:
                    tick(n)
            tick(reader.total)

    def write_heads(conn: ReadModelWrite, rows: list[dict[str, Any]]) -> None:
        last = {r["chain"]: r for r in rows}  # in read order: the last wins
        model._upsert(conn, audit_heads, list(last.values()))

    chunks(head_rows(), write_heads)
    with model.read() as reading:
        counts.chain_heads = int(reading.execute(sa.select(sa.func.count())
                                                 .select_from(audit_heads)).scalar_one())

    # Outcomes: every final one, once per input.
    codec = outcome_codec()

    def outcome_values() -> Iterator[dict[str, Any]]:
        tick = progress("outcomes", None)
        for n, msg in enumerate(read_topic(bootstrap, settings.outcomes_topic, timeout=3600,
                                           missing_ok=True), start=1):
            try:
                yield codec.decode(msg.value() or b"")
            except DecodeError:
                counts.unreadable += 1
            if n % 1000 == 0:
                tick(n)

    def write_outcomes(conn: ReadModelWrite, rows: list[dict[str, Any]]) -> None:
        counts.outcomes_counted += model.count_outcomes(conn, rows)

    chunks(outcome_values(), write_outcomes)

    # Exception states: the compacted topic to the end seen above; the last value wins.
    def state_records() -> Iterator[dict[str, Any]]:
        if not state_ranges:
            return
        tick = progress("exception states",
                        sum(high - low for low, high in state_ranges.values()) or None)
        for n, msg in enumerate(read_topic(
                bootstrap, settings.exception_state_topic, timeout=3600, missing_ok=True,
                ranges=state_ranges), start=1):
            yield {"key": (msg.key() or b"").decode("utf-8", "replace"), "value": msg.value()}
            if n % 1000 == 0:
                tick(n)

    def write_states(conn: ReadModelWrite, rows: list[dict[str, Any]]) -> None:
        last: dict[str, bytes | None] = {}
        for r in rows:
            last[r["key"]] = r["value"]
        gone = [k for k, v in last.items() if v is None]
        if gone:
            model.delete_states(conn, gone)
        good = []
        for value in (v for v in last.values() if v is not None):
            try:
                good.append(state_row(orjson.loads(value), value))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                counts.unreadable += 1
        model.write_states(conn, good)

    chunks(state_records(), write_states)
    with model.write() as conn:
        counts.exception_states = model._counted(conn, sa.true())
        model.set_offsets(conn, EXCEPTIONS, state_end)
        model.set_offsets(conn, AUDITOR, auditor_at)
    return counts
