"""The operators' read model without a broker: writes, idempotency, queries, bounded caches."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from revline.core.metrics import ExceptionMetrics
from revline.core.settings import Settings
from revline.operations.report import (
    ReportInputs,
    build_report,
    collect_from_read_model,
    final_outcomes,
)
from revline.processors.audit_chain import ChainHead, Entry, canonical
from revline.processors.exception_lifecycle import due_events, select
from revline.sinks.read_model import (
    HeadCache,
    PagedStates,
    ReadModel,
    head_row,
    record_row,
    state_row,
)
from revline.streams.app import LastSeenIndex
from revline.streams.exceptions import ExceptionManager

T0 = 1_790_000_000_000


@pytest.fixture
def model(tmp_path: Path) -> ReadModel:
    return ReadModel(f"sqlite:///{tmp_path / 'ledger.db'}")


def chain(name: str, n: int, partition: int = 0) -> tuple[list[dict[str, Any]], ChainHead]:
    head = ChainHead(name)
    rows = []
    for i in range(n):
        record = head.append(Entry(fact_id=f"{name}:{i}", kind="received", actor="w",
                                   at_ms=T0 + i, detail={"i": i}))
        rows.append(record_row(partition, record, canonical(record), f"audit/{partition}/{i}"))
    return rows, head


def outcome(n: int, kind: str = "validated", **more: Any) -> dict[str, Any]:
    return {"input_topic": "in", "input_partition": 0, "input_offset": n, "final": True,
            "held": False, "kind": kind, "event_type": "invoice_issued", "check_id": None,
            "severity": None, "owner": None, "stage": None, "reason": None, "warnings": [],
            "occurred_at_ms": T0 + n * 1000 - 250, "decided_at_ms": T0 + n * 1000,
            "idempotency_key": f"k{n}", **more}


def test_a_redone_audit_batch_writes_the_same_rows_and_counts_outcomes_once(
        model: ReadModel) -> None:
    rows, head = chain("SO-1", 5)
    outcomes = [outcome(i) for i in range(5)] + [outcome(9, final=False)]
    for _ in range(2):  # the batch, then the same batch redone after an abort
        with model.write() as conn:
            model.write_audit_batch(conn, rows, [head_row(0, head)], {("out", 0): 6}, outcomes)
    assert [r for r, _ in model.chain_records("SO-1")] == [r["record"] for r in rows]
    assert model.offsets("auditor") == {("out", 0): 6}
    counted = model.outcome_rows(T0)
    assert sum(r["count"] for r in counted) == 5  # the interim one is not a final outcome
    [(partition, again)] = model.heads_for(["SO-1"]).values()
    assert (partition, again.seq, again.hash, list(again.recent)) == (
        0, head.seq, head.hash, list(head.recent))


def test_head_cache_is_bounded_and_pages_heads_back_in(model: ReadModel) -> None:
    heads = [chain(f"SO-{i}", 2)[1] for i in range(50)]
    with model.write() as conn:
        model._upsert(conn, model_table("audit_heads"), [head_row(0, h) for h in heads])
    cache = HeadCache(model, capacity=10)
    cache.prefetch(h.chain for h in heads)
    assert len(cache) == 10
    for h in heads:
        assert cache.get(0, h.chain).hash == h.hash
    cache.trim()
    assert len(cache) == 10
    assert cache.get(0, "SO-new").seq == 0  # a new chain starts at the genesis


def model_table(name: str) -> Any:
    from revline.sinks.ledger import _schema

    return getattr(_schema, name)


def random_states(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        opened = T0 - rng.randrange(10 * 86_400_000)
        out.append({
            "exception_id": f"EX-{i:04d}", "check_id": rng.choice(["policy.a", "policy.b",
                                                                   "completeness.sku"]),
            "severity": rng.choice(["P1", "P2", "P3"]),
            "owner": rng.choice(["finance", "revenue_ops", "integrations"]),
            "backup_owner": rng.choice(["finance", "revenue_ops"]),
            "status": rng.choice(["open", "acknowledged", "resolved", "waived", "expired"]),
            "escalated": rng.random() < 0.3, "opened_at_ms": opened,
            "sla_deadline_ms": opened + rng.randrange(3 * 86_400_000),
            "expires_at_ms": opened + rng.randrange(20 * 86_400_000),
            "order_id": f"SO-{rng.randrange(20)}",
        })
    return out


def test_state_queries_answer_as_the_in_memory_filters_do(model: ReadModel) -> None:
    states = random_states(400)
    with model.write() as conn:
        model.write_states(conn, [state_row(s) for s in states])
    cases: list[dict[str, Any]] = [
        {}, {"owner": "finance"}, {"severity": "P1", "statuses": ("open",)},
        {"check": "policy.*", "statuses": ("resolved", "waived")},
        {"min_age_ms": 3 * 86_400_000, "order_id": "SO-3"},
        {"owner": "revenue_ops", "statuses": ("open", "acknowledged", "expired")},
    ]
    for case in cases:
        want = select(states, now_ms=T0, **case)
        got, matched, total = model.select_states(now_ms=T0, limit=25, **case)
        assert (got, matched, total) == (want[:25], len(want), 400), case
    for now in (T0 - 5 * 86_400_000, T0, T0 + 5 * 86_400_000):
        want_ids = [e["exception_id"] for e in due_events(states, now)]
        got_ids = [e["exception_id"] for e in due_events(model.due_states(now), now)]
        assert sorted(got_ids) == sorted(want_ids)


def recount(model: ReadModel) -> list[tuple[Any, ...]]:
    """``exception_counts`` as a GROUP BY over ``exception_states`` would give it."""
    import sqlalchemy as sa

    t = model_table("exception_states")
    backup = sa.func.coalesce(t.c.backup_owner, "")
    with model.read() as conn:
        return sorted(tuple(r) for r in conn.execute(
            sa.select(t.c.status, t.c.owner, backup, t.c.escalated, t.c.severity,
                      sa.func.count()).group_by(t.c.status, t.c.owner, backup, t.c.escalated,
                                                t.c.severity)))


def test_state_counts_are_kept_with_every_write(model: ReadModel) -> None:
    rng = random.Random(9)
    states = random_states(300, seed=4)
    for s in states[:40]:
        s["backup_owner"] = None
    current: dict[str, dict[str, Any]] = {}
    for batch in range(12):
        changed = []
        for s in rng.sample(states, 60):
            s = {**s, "status": rng.choice(["open", "acknowledged", "resolved", "expired"]),
                 "escalated": rng.random() < 0.3, "severity": rng.choice(["P1", "P2", "P3"])}
            changed.append(s)
        changed += changed[:5]  # the same state twice in one batch: the last counts
        gone = rng.sample(sorted(current), min(len(current), 8)) if batch % 3 == 2 else []
        with model.write() as conn:
            model.write_states(conn, [state_row(s) for s in changed])
            model.delete_states(conn, [*gone, "EX-never"])
        current.update({s["exception_id"]: s for s in changed})
        for g in gone:
            current.pop(g)
        assert model.snapshot()["exception_counts"] == recount(model)
        _, matched, total = model.select_states(now_ms=T0, owner="finance", limit=3)
        assert total == len(current) == model.state_count()
        assert matched == len(select(current.values(), now_ms=T0, owner="finance"))
    assert all(n > 0 for *_, n in recount(model))
    with model.write() as conn:
        model.clear_states(conn)
    assert model.snapshot()["exception_counts"] == [] and model.state_count() == 0


def test_the_manager_pages_states_and_finds_due_deadlines_in_the_table(
        tmp_path: Path, model: ReadModel) -> None:
    from tests.streams.test_exception_manager import OWNERSHIP, record

    settings = Settings(_env_file=None, kafka_bootstrap_servers="127.0.0.1:1",  # type: ignore[call-arg]
                        state_dir=tmp_path)
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    m = ExceptionManager(settings, "127.0.0.1:1", OWNERSHIP, ExceptionMetrics(),
                         clock=lambda: T0, producer=producer, read_model=model)
    assert isinstance(m.states, PagedStates)
    m.states.capacity = 2
    for i in range(6):
        m.on_exception_record(record(f"EX-{i}", severity="P1"))
    m.states.flush()  # what flush() does once Kafka has acknowledged them
    m.on_exception_record(record("EX-0"))  # known: found in the table, not reopened
    assert not m.states.pending
    assert len(m.states._lru) <= 2
    changes = m.tick(T0 + 60_000, observe=False)
    assert sorted(c.state["exception_id"] for c in changes) == [f"EX-{i}" for i in range(6)]
    m.states.flush()
    assert model.due_states(T0 + 60_000) == []  # escalated: not due again
    assert m.tick(T0 + 120_000, observe=False) == []  # escalated once
    m.observe(T0 + 120_000)


def test_the_report_from_counts_matches_the_report_from_outcomes(model: ReadModel) -> None:
    rng = random.Random(3)
    outcomes = []
    for n in range(3000):
        kind = rng.choice(["validated", "validated", "exception", "duplicate", "dead_letter"])
        outcomes.append(outcome(
            n, kind, event_type=rng.choice(["invoice_issued", "order_booked"]),
            check_id=rng.choice(["policy.a", "dedup.conflict"]) if kind == "exception" else None,
            severity="P2" if kind == "exception" else None,
            owner="finance" if kind == "exception" else None,
            stage="schema" if kind == "dead_letter" else None,
            reason="manual_override requires actor" if kind == "dead_letter" and n % 2 else None,
            held=rng.random() < 0.1, warnings=["policy.b"] if rng.random() < 0.1 else [],
            occurred_at_ms=T0 + n * 1000 - rng.randrange(1, 100_000)))
    outcomes += outcomes[:100]  # re-emitted after a crash: counted once
    with model.write() as conn:
        model.count_outcomes(conn, outcomes)
    since, now = T0, T0 + 3000 * 1000
    want = build_report(ReportInputs(outcomes=final_outcomes(outcomes, since)), now_ms=now,
                        since_ms=since)
    got = collect_from_read_model(model, since_ms=since, now_ms=now)
    assert got.flow == want.flow
    assert got.qa == want.qa and got.judged == want.judged
    assert got.duplicates == want.duplicates
    assert got.overrides.refused == want.overrides.refused
    assert got.latency.count == want.latency.count
    assert got.latency.max_ms == want.latency.max_ms
    assert got.latency.histogram == want.latency.histogram
    assert got.latency.within_target_pct == want.latency.within_target_pct
    for q in ("p50_ms", "p95_ms", "p99_ms"):  # bucket upper bounds: never below the truth
        exact, bucketed = getattr(want.latency, q), getattr(got.latency, q)
        assert exact <= bucketed <= exact * 2.5


def test_last_seen_index_evicts_what_the_full_scan_did() -> None:
    rng = random.Random(5)
    index = LastSeenIndex()
    truth: dict[bytes, tuple[int, int]] = {}
    for step in range(5000):
        key = f"SO-{rng.randrange(800)}".encode()
        if rng.random() < 0.05:
            index.remove(key)
            truth.pop(key, None)
        else:
            seen = T0 + step
            index.touch(key, seen, step % 4)
            truth[key] = (seen, step % 4)
        if step % 500 == 0:
            for bound, cutoff in ((700, T0 + step - 1000), (100, T0), (10_000, T0 + step)):
                seen_all = sorted((ms, k, p) for k, (ms, p) in truth.items())
                excess = max(0, len(seen_all) - bound)
                want = [s for i, s in enumerate(seen_all) if i < excess or s[0] < cutoff]
                assert index.oldest(excess, cutoff) == want


def test_operator_commands_cost_about_the_same_at_ten_times_the_history(
        tmp_path: Path) -> None:
    """CI-sized: 10k and 100k audit records and outcomes (docs/performance.md has 1M)."""
    from revline.tools.read_model_bench import measure

    timings = measure([10_000, 100_000], 5, cli=False, workdir=tmp_path, log=lambda _: None)
    by = {(t.command.split()[0], t.size): statistics.median(t.runs_ms) for t in timings}
    for command in ("audit", "exceptions", "report"):
        small, big = by[command, 10_000], by[command, 100_000]
        assert big < max(3 * small, small + 50), (command, small, big)
        assert big < 1000


def test_commands_say_so_and_read_the_topic_when_there_is_no_read_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from revline.sinks.read_model import ReadModelUnavailable

    settings = Settings(_env_file=None, state_dir=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(ReadModelUnavailable, match="no ledger database"):
        ReadModel.for_query(settings)
    assert not (tmp_path / "ledger.db").exists()  # a query never creates a database
    ReadModel.for_settings(settings).close()
    model = ReadModel.for_query(settings)
    assert not model.has_rows(model_table("audit_records"))
    model.close()


def test_an_aborted_first_batch_is_not_trusted_after_recovery(tmp_path: Path, monkeypatch: Any,
                                                               ) -> None:
    """The auditor's recovery forgets the read model's offsets: a partition whose first
    batch was aborted (Kafka has nothing committed, offset 0) must reload its heads from
    the heads topic, not chain the redo onto the aborted batch's head (a fork)."""
    import types

    from confluent_kafka import TopicPartition

    import revline.streams.audit as audit
    from revline.processors.audit_chain import ChainHead
    from revline.sinks.read_model import AUDITOR, HeadCache, head_row

    model = ReadModel(f"sqlite:///{tmp_path / 'rm.db'}")
    aborted = ChainHead("SO-1")
    aborted.seq, aborted.hash = 7, "abc"
    with model.write() as tx:  # written before the Kafka commit, which then failed
        model.write_audit_batch(tx, [], [head_row(0, aborted)],
                                {("outcomes", 0): 12, ("facts", 0): 3}, [])
    model.forget_offsets(AUDITOR, {0})
    reloaded: list[list[int]] = []
    monkeypatch.setattr(audit, "reload_heads",
                        lambda _model, _bootstrap, _topic, stale, _at: reloaded.append(stale) or 0)
    chainer = types.SimpleNamespace(
        read_model=model, sources=("outcomes", "facts"), heads=HeadCache(model),
        transactional_id="t", bootstrap="x",
        settings=types.SimpleNamespace(audit_heads_topic="heads"))
    audit.Chainer._sync_heads(chainer, {0}, [  # type: ignore[arg-type]
        TopicPartition("outcomes", 0, -1001), TopicPartition("facts", 0, -1001)])
    assert reloaded == [[0]]
    model.close()


def test_the_auditor_aborts_its_transaction_when_the_database_stays_away(
        tmp_path: Path, monkeypatch: Any) -> None:
    """The read-model write runs inside the auditor's Kafka transaction: a database away
    longer than the transaction can wait is an abortable Kafka error (abort, rewind, wait
    outside the transaction), not an exit, and the model's own budget is restored."""
    import sqlalchemy as sa
    from confluent_kafka import KafkaException

    from revline.streams.audit import Chainer

    model = ReadModel(f"sqlite:///{tmp_path / 'rm.db'}", outage_s=0.3)
    settings = Settings(_env_file=None, kafka_bootstrap_servers="127.0.0.1:1",  # type: ignore[call-arg]
                        state_dir=tmp_path)
    chainer = Chainer(settings, "127.0.0.1:1", read_model=model)

    def away(*_args: Any) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(model, "write_audit_batch", away)
    with pytest.raises(KafkaException) as raised:
        chainer._write_read_model([], [], {}, {("outcomes", 0): 1}, [])
    assert raised.value.args[0].txn_requires_abort()
    assert model.outage_s == 0.3
    chainer.watchdog.stop()
    model.close()


def test_the_auditor_replaces_a_producer_that_died_aborting_but_never_a_fenced_one(
        tmp_path: Path, monkeypatch: Any) -> None:
    """An abort after a moved coordinator can leave the transactional producer dead
    (INVALID_TXN_STATE, fatal): a new one with the same transactional.id is initialised in
    place, as a restart would. A fenced producer (another auditor took the id) is not."""
    import types

    from confluent_kafka import KafkaError, KafkaException

    import revline.streams.audit as audit
    from revline.core.errors import InfrastructureError

    made: list[Any] = []

    class FakeProducer:
        def __init__(self, _conf: dict[str, Any]) -> None:
            self.inits = 0
            made.append(self)

        def init_transactions(self, _timeout: float) -> None:
            self.inits += 1

    def dying(code: int) -> Any:
        def abort_transaction(_timeout: float) -> None:
            raise KafkaException(KafkaError(code, "abort failed", fatal=True))
        return types.SimpleNamespace(abort_transaction=abort_transaction, purge=lambda: None)

    model = ReadModel(f"sqlite:///{tmp_path / 'rm.db'}")
    settings = Settings(_env_file=None, kafka_bootstrap_servers="127.0.0.1:1",  # type: ignore[call-arg]
                        state_dir=tmp_path)
    chainer = audit.Chainer(settings, "127.0.0.1:1", read_model=model)
    monkeypatch.setattr(audit, "Producer", FakeProducer)
    chainer.consumer = types.SimpleNamespace(  # type: ignore[assignment]
        assignment=lambda: [], committed=lambda _parts, timeout: [])
    moved = KafkaException(KafkaError(KafkaError.NOT_COORDINATOR, "add offsets",
                                      retriable=True))
    chainer.producer = dying(KafkaError.INVALID_TXN_STATE)
    chainer._recover(moved)
    assert len(made) == 1 and made[0].inits == 1 and chainer.producer is made[0]

    chainer._producer_replaced_at = float("-inf")
    chainer.producer = dying(KafkaError.PRODUCER_FENCED)
    with pytest.raises(InfrastructureError):
        chainer._recover(moved)
    assert len(made) == 1
    chainer.watchdog.stop()
    model.close()


def test_a_kafka_error_surfacing_as_systemerror_is_handled_as_that_error(
        tmp_path: Path, monkeypatch: Any) -> None:
    """confluent-kafka can run a delivery callback while a failed call's KafkaException is
    pending; Python then raises SystemError ("... returned a result with an exception
    set") with the Kafka error as its cause (a fenced twin in CI exited on it). The
    auditor recovers from the cause: a fenced one ends with the fenced message."""
    import types

    from confluent_kafka import KafkaError, KafkaException

    import revline.streams.audit as audit
    from revline.core.errors import InfrastructureError

    model = ReadModel(f"sqlite:///{tmp_path / 'rm.db'}")
    settings = Settings(_env_file=None, kafka_bootstrap_servers="127.0.0.1:1",  # type: ignore[call-arg]
                        state_dir=tmp_path)
    chainer = audit.Chainer(settings, "127.0.0.1:1", read_model=model)
    message = types.SimpleNamespace(error=lambda: None, key=lambda: b"SO-1",
                                    partition=lambda: 0, topic=lambda: settings.outcomes_topic,
                                    offset=lambda: 7)
    monkeypatch.setattr(chainer, "_decoded", lambda _msg: ([], None))

    def fails_with(cause: BaseException) -> None:
        def commit(*_args: Any) -> None:
            raise SystemError("<method 'append' of 'list' objects> returned a result with "
                              "an exception set") from cause
        monkeypatch.setattr(chainer, "_commit", commit)

    fenced = KafkaException(KafkaError(KafkaError._FENCED, "fenced by a newer instance",
                                       fatal=True))
    fails_with(fenced)
    with pytest.raises(InfrastructureError, match="another auditor runs as"):
        chainer._chain_batch([message])  # type: ignore[list-item]

    recovered: list[Any] = []
    monkeypatch.setattr(chainer, "_recover", recovered.append)
    moved = KafkaException(KafkaError(KafkaError.NOT_COORDINATOR, "moved", retriable=True))
    fails_with(moved)
    chainer._chain_batch([message])  # type: ignore[list-item]
    assert recovered == [moved]

    fails_with(ValueError("not Kafka's"))
    with pytest.raises(SystemError):
        chainer._chain_batch([message])  # type: ignore[list-item]
    chainer.watchdog.stop()
    model.close()
