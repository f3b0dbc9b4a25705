"""The sink against real Tryton and real PostgreSQL, with real faults.

* trytond stopped for 30 s mid-stream: the breaker opens, consumption pauses,
  nothing is committed, nothing is dead-lettered or excepted; after it returns
  everything is applied once.
* ``kill -9`` of a ``revline sink`` process right after an ERP write, before its
  side-effect row and its offset commit: no duplicate ERP document, no
  duplicate journal.
* a replay of the whole validated topic from offset 0 changes neither the
  ledger nor the ERP.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, TopicPartition

from revline.core.readback import read_topic
from revline.schemas import EventDeserializer
from revline.sinks.erp import TrytonErp, TrytonServer, prepare_database, start_server
from revline.sinks.ledger import SqlLedger
from tests.sinks._validated import (
    MONEY,
    Validated,
    actual_balances,
    drain,
    expected_balances,
    processor,
    run_validated,
    sink_exceptions,
)
from tests.sinks.erp_fixtures import STATE_DIR

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(scope="module")
def validated(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Validated:
    return run_validated(kafka_bootstrap, tmp_path_factory.mktemp("tryton-faults"), orders=30,
                         seed=21)


@pytest.fixture
def tryton(tmp_path: Path) -> Iterator[TrytonServer]:
    """A trytond of this test's own (a fresh database), so document counts are exact."""
    server = start_server(prepare_database(tmp_path / "tryton", state_dir=STATE_DIR))
    try:
        yield server
    finally:
        server.stop()


def _adapter(server: TrytonServer, timeout: float = 5.0) -> TrytonErp:
    db = server.database
    return TrytonErp(server.url, db.name, db.user, db.password, timeout=timeout)


Effect = tuple[str, str]  # (order_id, idempotency_key): the effect's identity


def documents(erp: TrytonErp) -> dict[tuple[str, str, str], list[int]]:
    """(step, order id, idempotency key) -> ids of the ERP documents that step created."""
    out: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for doc in erp.documents():
        # A credit note copies its invoice's text: count each marker on its own kind.
        if doc.step in ("invoice", "credit_note") and (doc.step == "invoice") != (
                doc.amount_minor >= 0):
            continue
        out[(doc.step, doc.order_id, doc.idempotency_key)].append(int(doc.ref))
    return dict(out)


def effects(docs: dict[tuple[str, str, str], list[int]]) -> set[Effect]:
    return {(order, key) for _, order, key in docs}


def money_effects(bootstrap: str, v: Validated) -> set[Effect]:
    """(order, key) of the validated topic's money events (``v.money_keys`` holds keys)."""
    decode = EventDeserializer()
    out: set[Effect] = set()
    for msg in read_topic(bootstrap, v.topic):
        env = decode.decode(msg.value() or b"")["envelope"]
        if env["event_type"] in MONEY:
            out.add((env["order_id"], env["idempotency_key"]))
    assert {key for _, key in out} == v.money_keys
    return out


def assert_once_each(docs: dict[tuple[str, str, str], list[int]]) -> None:
    twice = {k: ids for k, ids in docs.items() if len(ids) > 1}
    assert twice == {}, f"duplicate ERP documents: {twice}"


def assert_erp_matches(v: Validated, money: set[Effect],
                       docs: dict[tuple[str, str, str], list[int]], ledger: SqlLedger) -> None:
    """One document per money event, and exactly the documents the side-effect ledger knows."""
    counts = v.type_counts
    made = Counter(step for step, _, _ in docs)
    assert made["invoice"] == counts.get("invoice_issued", 0), made
    assert made["payment"] == counts.get("payment_captured", 0), made
    assert made["refund_payment"] == counts.get("refund_issued", 0), made
    assert made["sale"] >= counts.get("order_booked", 0), made  # amendments mark the sale too
    in_erp = effects(docs)
    found = ledger.effects_for(in_erp | money, "erp")
    recorded = {k for k, e in found.items()
                if e.status in ("applied", "already_applied") and e.external_ref}
    assert in_erp == recorded


def test_erp_down_for_30s_pauses_then_applies_everything_once(
    kafka_bootstrap: str, validated: Validated, tryton: TrytonServer, postgres_url: str,
    new_topic: object,
) -> None:
    exceptions = new_topic("sink-exceptions", 1)  # type: ignore[operator]
    ledger = SqlLedger(postgres_url)
    erp = _adapter(tryton)
    proc = processor(kafka_bootstrap, validated, ledger, erp, exceptions, batch_size=10)
    try:
        deadline = time.monotonic() + 120
        while proc.stats.batches < 2:  # some documents exist before the ERP goes away
            assert time.monotonic() < deadline, f"no progress: {proc.stats}"
            proc.step()
        tryton.stop()
        committed, events = dict(proc.stats.committed), proc.stats.events
        exceptions_before = proc.stats.exceptions
        outage_end = time.monotonic() + 30
        steps = 0
        while time.monotonic() < outage_end:
            proc.step()
            steps += 1
        assert proc.breakers["erp"].times_opened >= 1 and proc._paused
        assert proc.stats.committed == committed and proc.stats.events == events
        assert proc.stats.exceptions == exceptions_before  # an outage is nobody's exception
        # Each loop step waits in poll() on the paused consumer, and a probe goes out once
        # per 0.5 s cool-down: some hundreds of steps, where a spinning loop makes millions.
        assert steps < 1000, f"the paused loop must wait, not spin ({steps} steps in 30 s)"
        assert proc.stats.transient_failures < 200
        print(f"\noutage 30 s: {steps} loop steps, breaker opened "
              f"{proc.breakers['erp'].times_opened}x, {proc.stats.transient_failures} "
              "transient failures")

        tryton.start()  # same port, same database
        started = time.monotonic()
        drain(proc, validated, timeout=300)
        print(f"after the outage: drained in {time.monotonic() - started:.1f}s; {proc.stats}")
        assert not proc._paused
    finally:
        proc.close()
    assert sink_exceptions(kafka_bootstrap, exceptions) == validated.refusable
    docs = documents(erp)
    assert_once_each(docs)
    assert_erp_matches(validated, money_effects(kafka_bootstrap, validated), docs, ledger)
    assert actual_balances(ledger) == expected_balances(validated)
    assert all(tb.balanced for tb in ledger.trial_balance().values())
    erp.close()
    ledger.close()


def _committed(bootstrap: str, group: str, v: Validated) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = consumer.committed([TopicPartition(v.topic, p) for p in v.end], timeout=10)
        return {tp.partition: tp.offset for tp in parts}
    finally:
        consumer.close()


def _run_sink(v: Validated, server: TrytonServer, dsn: str, group: str,
              crash_after: int | None, log: Path) -> subprocess.Popen[bytes]:
    env = dict(v.pipeline.env)
    db = server.database
    env.update({
        "REVLINE_ERP": "tryton",
        "REVLINE_TRYTON_URL": server.url,
        "REVLINE_TRYTON_DATABASE": db.name,
        "REVLINE_TRYTON_USER": db.user,
        "REVLINE_TRYTON_PASSWORD": db.password,
        "REVLINE_LEDGER_DSN": dsn,
        "REVLINE_SINK_GROUP": group,
        "REVLINE_SINK_BATCH_SIZE": "8",
    })
    env.pop("REVLINE_SINK_CRASH_AFTER_ERP_WRITES", None)
    if crash_after is not None:
        env["REVLINE_SINK_CRASH_AFTER_ERP_WRITES"] = str(crash_after)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "revline.cli", "sink"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def test_kill_9_between_erp_write_and_commit_then_replay_from_zero_changes_nothing(
    kafka_bootstrap: str, validated: Validated, tryton: TrytonServer, postgres_url: str,
    tmp_path: Path,
) -> None:
    group = f"sink-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "sink.log"
    erp = _adapter(tryton)
    ledger = SqlLedger(postgres_url)
    crashes = 0
    orphans: set[Effect] = set()
    for crash_after in (12, 9):  # twice, each time right after an ERP write
        proc = _run_sink(validated, tryton, postgres_url, group, crash_after, log)
        code = proc.wait(240)
        assert code == -9, f"the failpoint did not fire (exit {code}); see {log}"
        crashes += 1
        # The crash left an ERP document that neither the side-effect ledger nor the
        # committed offsets know about: the worst case for a duplicate.
        docs = documents(erp)
        known = ledger.effects_for(effects(docs), "erp")
        orphaned = effects(docs) - set(known)
        assert orphaned, "expected an ERP document without its side-effect row"
        orphans |= orphaned
    proc = _run_sink(validated, tryton, postgres_url, group, None, log)
    try:
        want = {p: o for p, o in validated.end.items() if o > 0}
        deadline = time.monotonic() + 300
        while True:
            done = _committed(kafka_bootstrap, group, validated)
            if all(done.get(p, -1) >= o for p, o in want.items()):
                break
            assert proc.poll() is None, f"sink exited with {proc.returncode}; see {log}"
            assert time.monotonic() < deadline, f"sink did not catch up: {done} of {want}"
            time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\n{crashes} kill -9 crashes after an ERP write; sink log: {log}")
    # What the crashes left behind was found in the ERP (by the key stored on the
    # document), not written again.
    found = ledger.effects_for(list(orphans), "erp")
    assert {e.status for e in found.values()} == {"already_applied"}, found

    docs = documents(erp)
    assert_once_each(docs)
    money = money_effects(kafka_bootstrap, validated)
    assert_erp_matches(validated, money, docs, ledger)
    posted = ledger.effects_for(money, "ledger")
    assert set(posted) == money
    assert actual_balances(ledger) == expected_balances(validated)
    with ledger.engine.connect() as conn:  # the key is unique: a duplicate cannot even exist
        journals = conn.execute(sa.text("SELECT count(*) FROM journals")).scalar_one()
    assert journals >= len(validated.money_keys)

    # Replay: a new group from offset 0 against the same ledger and the same ERP.
    balances = ledger.balances()
    replay = processor(kafka_bootstrap, validated, ledger, erp, validated.pipeline.topic(
        "exceptions"), batch_size=50)
    try:
        drain(replay, validated, timeout=300)
    finally:
        replay.close()
    assert replay.stats.applied == {}, replay.stats
    assert replay.stats.skipped.get("erp", 0) >= len(validated.money_keys)
    assert ledger.balances() == balances
    assert documents(erp) == docs
    erp.close()
    ledger.close()
