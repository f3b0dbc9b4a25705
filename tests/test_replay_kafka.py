"""`revline replay` on the real broker: resetting the sink's group re-reads everything and
changes neither ledger nor ERP; dry run, live-member refusal, --to-datetime, worker group."""

from __future__ import annotations

import contextlib
import copy
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from revline import cli
from revline.core.auditlog import AuditFact
from revline.core.readback import read_topic
from revline.core.settings import Settings
from revline.operations.publisher import Publisher, publish_records
from revline.operations.replay import (
    GroupActiveError,
    OperationRefusedError,
    ReplayTarget,
    committed_offsets,
    format_ms,
    replay,
)
from revline.sinks.erp import InMemoryErp
from revline.sinks.ledger import SqlLedger, normalize_url
from revline.sinks.ledger._schema import journal_lines, journals, side_effects
from revline.sinks.processor import SinkProcessor
from revline.tools.workload import WorkloadOptions, generate
from tests.conftest import TopicFactory

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

OPS_TOPICS = ("audit-facts", "audit", "audit-heads", "exception-events", "exception-state",
              "quarantine", "redrive-log")


@dataclass
class Ops:
    prefix: str
    app_id: str

    def topic(self, kind: str) -> str:
        return f"{self.prefix}.{kind}"

    def settings(self) -> Settings:
        return Settings()


@pytest.fixture
def ops(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ops]:
    """Per-test operations topics and app id in the environment (the CLI reads it)."""
    o = Ops(f"rp-{uuid.uuid4().hex[:10]}", f"revline-rp-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REVLINE_APP_ID", o.app_id)
    monkeypatch.setenv("REVLINE_INPUT_PARTITIONS", "2")
    for kind in OPS_TOPICS:
        monkeypatch.setenv(f"REVLINE_{kind.upper().replace('-', '_')}_TOPIC", o.topic(kind))
    monkeypatch.setattr(cli.console, "width", 250)  # no wrapped table cells in captured output
    yield o
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(o.prefix)]
    if mine:
        for fut in admin.delete_topics(mine, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(timeout=30)


@pytest.fixture
def ledger_url(tmp_path: Path) -> Iterator[str]:
    """SQLite, or a fresh PostgreSQL database when REVLINE_TEST_POSTGRES_DSN is set."""
    dsn = os.environ.get("REVLINE_TEST_POSTGRES_DSN")
    if not dsn:
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    server = sa.make_url(normalize_url(dsn))
    name = f"revline_t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield server.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def _facts(bootstrap: str, topic: str, kind: str) -> list[AuditFact]:
    facts = [AuditFact.decode(m.value() or b"") for m in read_topic(bootstrap, topic, timeout=30)]
    return [f for f in facts if f.kind == kind]


def _watermarks(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe-" + uuid.uuid4().hex})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts}
    finally:
        c.close()


def _committed(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    return committed_offsets(AdminClient({"bootstrap.servers": bootstrap}), group)


# -- replay of the sink: safe by construction ------------------------------------------
def _sink(bootstrap: str, topic: str, group: str, ledger: SqlLedger, erp: InMemoryErp,
          exceptions: str) -> SinkProcessor:
    return SinkProcessor(bootstrap, topic, group, ledger, erp, exceptions, batch_size=100,
                         poll_timeout_s=0.2, backoff_base_s=0.01, backoff_max_s=0.05)


def _drain(proc: SinkProcessor, topic: str, end: dict[int, int], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    want = {(topic, p): o for p, o in end.items() if o > 0}
    try:
        while any(proc.stats.committed.get(tp, 0) < o for tp, o in want.items()):
            assert time.monotonic() < deadline, f"sink did not drain: {proc.stats}"
            proc.step()
    finally:
        proc.close()  # leaves the group: no live member remains


def _snapshot(ledger: SqlLedger, erp: InMemoryErp) -> dict[str, Any]:
    with ledger.engine.connect() as conn:
        count = sa.select(sa.func.count())
        effects = conn.execute(sa.select(
            side_effects.c.idempotency_key, side_effects.c.adapter, side_effects.c.status,
            side_effects.c.external_ref, side_effects.c.attempts, side_effects.c.applied_at,
        ).order_by(side_effects.c.idempotency_key, side_effects.c.adapter)).all()
        return {
            "balances": ledger.balances(),
            "journals": conn.execute(count.select_from(journals)).scalar_one(),
            "journal_lines": conn.execute(count.select_from(journal_lines)).scalar_one(),
            "side_effects": [tuple(r) for r in effects],
            "erp": copy.deepcopy({"parties": erp.store.parties, "sales": erp.store.sales,
                                  "invoices": erp.store.invoices, "moves": erp.store.moves}),
        }


def test_replaying_the_sink_from_earliest_changes_neither_ledger_nor_erp(
    kafka_bootstrap: str, new_topic: TopicFactory, ops: Ops, ledger_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    validated = new_topic("replay-validated", 2)
    exceptions = new_topic("replay-sink-exceptions", 1)
    workload = generate(WorkloadOptions(
        orders=40, seed=23, run_id=f"RP{uuid.uuid4().hex[:6]}", duplicates=0, conflicts=0,
        out_of_order=0, incomplete=0, off_policy=0, unknown_attribution=0, amount_mismatch=0,
        poison=0, orphans=0))
    assert all(r.expect.outcome == "validated" for r in workload.records)
    with Publisher(kafka_bootstrap, validated) as publisher:
        publish_records(publisher, workload.records)
    end = {p: high for p, (_, high) in _watermarks(kafka_bootstrap, validated).items()}
    group = f"{ops.app_id}-sink"
    erp = InMemoryErp()  # one ERP across both runs, as one real ERP would be
    with SqlLedger(ledger_url) as ledger:
        first = _sink(kafka_bootstrap, validated, group, ledger, erp, exceptions)
        _drain(first, validated, end)
        before = _snapshot(ledger, erp)
        assert before["journals"] > 0 and before["erp"]["invoices"] and before["erp"]["moves"]
        assert _committed(kafka_bootstrap, group) == {(validated, p): o for p, o in end.items()}

        # Dry run: the table shows current -> new per partition; nothing moves.
        capsys.readouterr()
        assert cli.main(["replay", "--group", group, "--to-offset", "earliest", "--dry-run",
                         "--actor", "ops@example.com"]) == 0
        out = capsys.readouterr().out
        assert "Dry run" in out and validated in out
        for o in end.values():
            assert f"re-read {o:,}" in out, out
        assert _committed(kafka_bootstrap, group) == {(validated, p): o for p, o in end.items()}

        # The replay itself, through the CLI.
        assert cli.main(["replay", "--group", group, "--to-offset", "earliest",
                         "--actor", "ops@example.com"]) == 0
        out = capsys.readouterr().out
        assert f"{sum(end.values()):,} records will be read again" in out
        assert _committed(kafka_bootstrap, group) == {(validated, p): 0 for p in end}

        second = _sink(kafka_bootstrap, validated, group, ledger, erp, exceptions)
        _drain(second, validated, end)
        after = _snapshot(ledger, erp)
        ledger_rows = sum(1 for r in before["side_effects"] if r[1] == "ledger")
        erp_rows = sum(1 for r in before["side_effects"] if r[1] == "erp")
        print(f"\nreplay on {ledger.dialect}: {sum(end.values())} events re-read; "
              f"{before['journals']} journals, {len(before['side_effects'])} side effects, "
              f"ERP {erp.store.counts()} unchanged; second run {second.stats.skipped}")

    assert after == before  # balances, journals, side effects, every ERP document
    # Every event was read again and recognised as already applied.
    assert second.stats.events == sum(end.values())
    assert second.stats.applied == {} and second.stats.exceptions == 0
    assert second.stats.skipped == {"ledger": ledger_rows, "erp": erp_rows}

    facts = _facts(kafka_bootstrap, ops.topic("audit-facts"), "replay")
    assert [f.detail["dry_run"] for f in facts] == [True, False]
    for fact in facts:
        assert fact.actor == "ops@example.com" and fact.chain == "_operations"
        assert fact.detail["group"] == group and fact.detail["topic"] == [validated]
        assert sorted((d["partition"], d["from"], d["to"]) for d in fact.detail["partitions"]) \
            == [(p, o, 0) for p, o in sorted(end.items())]


# -- the refusals --------------------------------------------------------------------
def test_replay_is_refused_while_the_group_has_live_members(
    kafka_bootstrap: str, new_topic: TopicFactory, ops: Ops, capsys: pytest.CaptureFixture[str],
) -> None:
    topic = new_topic("replay-live", 1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(5):
        producer.produce(topic, value=f"r{i}".encode())
    producer.flush(10)
    group = f"downstream-{uuid.uuid4().hex[:8]}"
    member = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group,
                       "client.id": "billing-exporter-7", "auto.offset.reset": "earliest"})
    member.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        seen = 0
        while seen < 5:
            assert time.monotonic() < deadline, "the live member never got its records"
            msg = member.poll(0.5)
            if msg is not None and msg.error() is None:
                seen += 1
        member.commit(asynchronous=False)
        capsys.readouterr()
        assert cli.main(["replay", "--group", group, "--to-offset", "earliest"]) == 2
        err = capsys.readouterr().err
        assert "live member" in err and "billing-exporter-7" in err, err
        with pytest.raises(GroupActiveError):
            replay(ops.settings(), kafka_bootstrap, group, ReplayTarget("earliest"),
                   dry_run=True, actor="t")
        assert _committed(kafka_bootstrap, group) == {(topic, 0): 5}
    finally:
        member.close()
    # Once it has stopped, the same replay goes through.
    result = replay(ops.settings(), kafka_bootstrap, group, ReplayTarget("earliest"), actor="t")
    assert [(m.current, m.new) for m in result.moves] == [(5, 0)]
    assert _committed(kafka_bootstrap, group) == {(topic, 0): 0}


def test_the_worker_group_is_refused_with_what_to_do_instead(
    ops: Ops, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["replay", "--group", ops.app_id, "--to-offset", "earliest"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "a group of the stream worker" in err and "revline redrive" in err
    assert f"--group {ops.app_id}-sink" in err
    # Its input consumer commits offsets for lag tooling only; the same answer.
    for group in (ops.app_id, f"{ops.app_id}-input", f"{ops.app_id}-reference"):
        with pytest.raises(OperationRefusedError, match="cannot change any decision"):
            replay(ops.settings(), "unused:1", group, ReplayTarget("latest"), actor="t")


# -- --to-datetime and --to-offset N -----------------------------------------------------
def test_to_datetime_moves_each_partition_to_its_first_record_at_or_after_the_time(
    kafka_bootstrap: str, new_topic: TopicFactory, ops: Ops, capsys: pytest.CaptureFixture[str],
) -> None:
    topic = new_topic("replay-time", 2)
    now = int(time.time() * 1000)
    old, recent = now - 2 * 3600_000, now - 3600_000
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for p, (n_old, n_recent) in enumerate([(7, 3), (4, 6)]):
        for i in range(n_old + n_recent):
            producer.produce(topic, value=b"x", partition=p,
                             timestamp=(old if i < n_old else recent) + i)
    producer.flush(10)
    group = f"downstream-{uuid.uuid4().hex[:8]}"
    settings = ops.settings()

    # A group with no offsets yet is positioned with --topic.
    with pytest.raises(OperationRefusedError, match="--topic"):
        replay(settings, kafka_bootstrap, group, ReplayTarget("latest"), actor="t")
    done = replay(settings, kafka_bootstrap, group, ReplayTarget("latest"), topics=[topic],
                  actor="t")
    assert [(m.current, m.new) for m in done.moves] == [(None, 10), (None, 10)]

    halfway = format_ms(old + 1800_000)
    capsys.readouterr()
    assert cli.main(["replay", "--group", group, "--to-datetime", halfway, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "re-read 3" in out and "re-read 6" in out, out
    assert _committed(kafka_bootstrap, group) == {(topic, 0): 10, (topic, 1): 10}
    assert cli.main(["replay", "--group", group, "--to-datetime", halfway]) == 0
    assert _committed(kafka_bootstrap, group) == {(topic, 0): 7, (topic, 1): 4}

    # After the last record: the end. A duration ago works too.
    moved = replay(settings, kafka_bootstrap, group, ReplayTarget.parse(None, "1m"), actor="t")
    assert [(m.new, bool(m.note)) for m in moved.moves] == [(10, True), (10, True)]
    # An absolute offset in one partition; beyond the end it is clamped, and says so.
    one = replay(settings, kafka_bootstrap, group, ReplayTarget.parse("8", None),
                 partitions=[1], actor="t")
    assert [(m.partition, m.current, m.new, m.note) for m in one.moves] == [(1, 10, 8, "")]
    far = replay(settings, kafka_bootstrap, group, ReplayTarget.parse("99", None), actor="t",
                 dry_run=True)
    assert [m.new for m in far.moves] == [10, 10] and all("clamped" in m.note for m in far.moves)
    assert _committed(kafka_bootstrap, group) == {(topic, 0): 10, (topic, 1): 8}
    assert len(_facts(kafka_bootstrap, ops.topic("audit-facts"), "replay")) == 6


def test_bad_targets_are_refused_with_a_hint() -> None:
    with pytest.raises(OperationRefusedError, match="earliest, latest"):
        ReplayTarget.parse("-3", None)
    with pytest.raises(OperationRefusedError, match="ISO 8601"):
        ReplayTarget.parse(None, "yesterday-ish")
    assert ReplayTarget.parse(None, "2026-11-24T09:00:00").at_ms == \
        ReplayTarget.parse(None, "2026-11-24T10:00:00+01:00").at_ms
