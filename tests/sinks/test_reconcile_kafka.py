"""Reconciliation and shadow parity on the real broker, with SQLite and PostgreSQL ledgers.

Generated validated events are published to a fresh validated topic (what the worker
would have validated: a fault-free workload in causal order, plus one amendment the
ERP refuses), a real ``SinkProcessor`` runs until idle, and then records are deleted
and tampered with behind the pipeline's back, with SQL (and JSON-RPC for Tryton).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition

from revline import cli
from revline.core.auditlog import AuditFact
from revline.core.readback import read_topic
from revline.operations.publisher import Publisher
from revline.schemas import EventDeserializer, exception_codec
from revline.sinks.erp import InMemoryErp, TrytonServer
from revline.sinks.ledger import SqlLedger, load_posting_rules, normalize_url
from revline.sinks.processor import SinkProcessor
from revline.sinks.reconcile import (
    ALL_TIME,
    CHECK_DRIFT,
    StreamView,
    audit_fact,
    open_exceptions,
    parse_window,
    read_stream,
    reconcile,
)
from revline.sinks.shadow import ledger_parity, shadow_processor
from revline.tools.workload import WorkloadOptions, generate
from tests.conftest import TopicFactory
from tests.sinks.erp_contract import (
    LINES,
    amended,
    booked,
    cancelled,
    captured,
    invoiced,
    new_order,
    refunded,
)
from tests.sinks.erp_fixtures import tryton_adapter, tryton_server  # noqa: F401 (fixture)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RULES = load_posting_rules()
SLA = {"P1": 15, "P2": 120}


@dataclass
class Published:
    topic: str
    events: list[dict[str, Any]]
    refused_key: str  # the amendment the ERP refuses


def _publish(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    with Publisher(bootstrap, topic) as publisher:
        for n, event in enumerate(events):
            # Where the worker read it: the exception of a missing record points there.
            publisher.publish(event, headers=[("revline.input", f"revline.events.v1/0/{n}")])


@pytest.fixture(scope="module")
def published(kafka_bootstrap: str) -> Iterator[Published]:
    from confluent_kafka.admin import AdminClient, NewTopic

    workload = generate(WorkloadOptions(orders=40, seed=23, duplicates=0, conflicts=0,
                                        out_of_order=0, incomplete=0, off_policy=0,
                                        amount_mismatch=0, poison=0))
    events = [r.event for r in workload.records
              if r.event is not None and r.expect.outcome == "validated"]
    inv = next(e for e in events if e["envelope"]["event_type"] == "invoice_issued")
    late = amended(inv["envelope"]["order_id"], 9, LINES, inv["currency"],
                   inv["envelope"]["occurred_at"] + timedelta(days=1))
    events.append(late)
    topic = f"reconcile-validated-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 3, replication_factor=-1)])[topic].result(30)
    try:
        _publish(kafka_bootstrap, topic, events)
        yield Published(topic, events, late["envelope"]["idempotency_key"])
    finally:
        with contextlib.suppress(Exception):
            admin.delete_topics([topic])[topic].result(30)


def _sink(bootstrap: str, topic: str, ledger: SqlLedger, erp: Any, exceptions: str) -> None:
    """A real sink over the whole topic: until it has committed every record (an idle
    timeout alone raced the group's first assignment on a freshly started broker)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        total = sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in parts)  # fmt: skip
    finally:
        consumer.close()
    proc = SinkProcessor(bootstrap, topic, f"sink-{uuid.uuid4().hex[:8]}", ledger, erp,
                         exceptions, batch_size=200, poll_timeout_s=0.2)
    deadline = time.monotonic() + 90
    try:
        while sum(proc.stats.committed.values()) < total:
            assert time.monotonic() < deadline, (total, proc.stats)
            proc.step()
    finally:
        proc.close()


def _stream(bootstrap: str, topic: str) -> StreamView:
    return read_stream(bootstrap, topic, EventDeserializer(), RULES)


@contextlib.contextmanager
def behind_the_back(url: str) -> Iterator[sa.Connection]:
    """A DBA's transaction on the ledger with its append-only triggers out of the way."""
    engine = sa.create_engine(normalize_url(url))  # not the ledger's: no FK pragma either
    pg = engine.dialect.name == "postgresql"
    try:
        with engine.begin() as conn:
            for table in ("journals", "journal_lines"):
                if pg:
                    conn.exec_driver_sql(f"ALTER TABLE {table} DISABLE TRIGGER USER")
                else:
                    for op in ("update", "delete"):
                        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_no_{op}")
        with engine.begin() as conn:
            yield conn
    finally:
        if pg:  # in a transaction of its own: no deferred trigger events pending
            with engine.begin() as conn:
                for table in ("journals", "journal_lines"):
                    conn.exec_driver_sql(f"ALTER TABLE {table} ENABLE TRIGGER USER")
        engine.dispose()


def _delete_journal(url: str, key: str) -> None:
    with behind_the_back(url) as conn:
        ids = [r[0] for r in conn.execute(
            sa.text("SELECT id FROM journals WHERE event_key = :k"), {"k": key})]
        assert ids, key
        for jid in ids:
            conn.execute(sa.text("DELETE FROM journal_lines WHERE journal_id = :j"), {"j": jid})
            conn.execute(sa.text("DELETE FROM journals WHERE id = :j"), {"j": jid})
        conn.execute(sa.text("DELETE FROM side_effects WHERE idempotency_key = :k"), {"k": key})


def _tamper(url: str, key: str, plus: int) -> None:
    """Add ``plus`` to both sides of a journal, header included: balanced, but wrong."""
    with behind_the_back(url) as conn:
        params = {"k": key, "p": plus}
        conn.execute(sa.text(
            "UPDATE journal_lines SET debit_minor = debit_minor + :p WHERE debit_minor > 0 AND "
            "journal_id IN (SELECT id FROM journals WHERE event_key = :k)"), params)
        conn.execute(sa.text(
            "UPDATE journal_lines SET credit_minor = credit_minor + :p WHERE line_no = ("
            "SELECT max(line_no) FROM journal_lines l2 WHERE l2.journal_id = journal_lines."
            "journal_id AND l2.credit_minor > 0) AND journal_id IN "
            "(SELECT id FROM journals WHERE event_key = :k)"), params)
        conn.execute(sa.text(
            "UPDATE journals SET total_debit_minor = total_debit_minor + :p, "
            "total_credit_minor = total_credit_minor + :p WHERE event_key = :k"), params)


def _exceptions(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    codec = exception_codec()
    return [codec.decode(m.value() or b"") for m in read_topic(bootstrap, topic, timeout=20)]


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_reconcile_finds_a_journal_deleted_and_one_tampered_behind_the_pipelines_back(
    kafka_bootstrap: str, published: Published, ledger_url: str, new_topic: TopicFactory,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    exceptions, facts = new_topic("rec-exceptions", 1), new_topic("rec-facts", 1)
    erp = InMemoryErp()
    with SqlLedger(ledger_url) as ledger:
        _sink(kafka_bootstrap, published.topic, ledger, erp, exceptions)
        stream = _stream(kafka_bootstrap, published.topic)
        assert len(stream.records) == len(published.events) and not stream.undecodable

        clean = reconcile(stream, ALL_TIME, ledger, erp)
        assert clean.issues == [] and clean.drift_pct == 0.0
        assert clean.system("ledger").checked > 50 and clean.system("erp").checked > 100
        # The amendment the ERP refused is owned (the sink's exception), not drift.
        assert [i.key for i in clean.system("erp").refused] == [published.refused_key]
        assert [r["idempotency_key"] for r in _exceptions(kafka_bootstrap, exceptions)] == [
            published.refused_key]

        payment = next(e for e in stream.records if e.event_type == "payment_captured")
        _delete_journal(ledger_url, payment.key)
        report = reconcile(stream, ALL_TIME, ledger, erp)
        (missing,) = report.issues
        assert (missing.system, missing.kind, missing.key, missing.expected_minor,
                missing.actual_minor, missing.currency) == (
            "ledger", "missing", payment.key, payment.amount_minor, None, payment.currency)
        assert report.record_drift_pct == pytest.approx(100 / report.checked)
        assert [o.order_id for o in report.drifted] == [payment.order_id]
        money = report.money()[payment.currency]
        assert money.diff_minor == payment.amount_minor
        assert report.drift_pct == pytest.approx(100 * money.diff_minor / money.expected_minor)

        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        assert open_exceptions(report, kafka_bootstrap, producer, exceptions, sla_minutes=SLA,
                               rules_version="postings t") == 1
        again = reconcile(stream, ALL_TIME, ledger, erp)
        assert open_exceptions(again, kafka_bootstrap, producer, exceptions, sla_minutes=SLA,
                               rules_version="postings t") == 0
        assert again.exceptions_known == 1
        records = [r for r in _exceptions(kafka_bootstrap, exceptions)
                   if r["check_id"] == CHECK_DRIFT]
        assert len(records) == 1  # re-running opened no second one
        (rec,) = records
        assert (rec["check_id"], rec["owner"], rec["severity"], rec["idempotency_key"],
                rec["order_id"], rec["event_type"], rec["source_system"]) == (
            "reconciliation.drift", "finance", "P1", payment.key, payment.order_id,
            "payment_captured", "ledger")
        assert payment.order_id in rec["reason"] and "payment_captured" in rec["reason"]

        # A tampered invoice of another order: that order drifts too, one more exception.
        invoice = next(e for e in stream.records if e.event_type == "invoice_issued"
                       and e.order_id != payment.order_id)
        _tamper(ledger_url, invoice.key, 100)
        report = reconcile(stream, ALL_TIME, ledger, erp)
        (mismatch,) = report.system("ledger").mismatched
        assert (mismatch.key, mismatch.expected_minor, mismatch.actual_minor) == (
            invoice.key, invoice.amount_minor, (invoice.amount_minor or 0) + 100)
        assert all(tb.balanced for tb in ledger.trial_balance().values())  # only this finds it
        assert sorted(o.order_id for o in report.drifted) == sorted(
            [payment.order_id, invoice.order_id])
        assert open_exceptions(report, kafka_bootstrap, producer, exceptions, sla_minutes=SLA,
                               rules_version="postings t") == 1

    # The same through the command line: exit 1, the JSON names both; nothing re-opened.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REVLINE_VALIDATED_TOPIC", published.topic)
    monkeypatch.setenv("REVLINE_EXCEPTIONS_TOPIC", exceptions)
    monkeypatch.setenv("REVLINE_AUDIT_FACTS_TOPIC", facts)
    monkeypatch.setenv("REVLINE_LEDGER_DSN", ledger_url)
    monkeypatch.setenv("REVLINE_ERP", "memory")
    monkeypatch.delenv("REVLINE_TRYTON_URL", raising=False)
    out = tmp_path / "report.json"
    assert cli.main(["reconcile", "--json", str(out)]) == 1
    data = orjson.loads(out.read_bytes())
    assert (data["missing"], data["mismatched"], data["extra"]) == (1, 1, 0)
    assert data["erp"]["reconciled"] is False and "in-memory" in data["erp"]["note"]
    # The ledger-only run finds the exceptions the runs with the ERP opened.
    assert data["exceptions_opened"] == 0 and data["exceptions_already_open"] == 2
    assert sorted(o["order_id"] for o in data["drifted_orders"]) == sorted(
        [payment.order_id, invoice.order_id])
    assert data["drift_pct"] > 0 and data["by_currency"][payment.currency]["diff_minor"] > 0
    assert len([r for r in _exceptions(kafka_bootstrap, exceptions)
                if r["check_id"] == CHECK_DRIFT]) == 2
    (fact,) = [AuditFact.decode(m.value() or b"") for m in read_topic(kafka_bootstrap, facts)]
    assert (fact.kind, fact.order_id, fact.detail["missing"], fact.detail["mismatched"]) == (
        "reconcile", None, 1, 1)
    assert fact.detail["drift_pct"] > 0 and fact.detail["ledger"]["checked"] > 50
    assert cli.main(["reconcile", "--period", "2031-01", "--no-exceptions"]) == 0  # nothing then


def test_shadow_run_has_full_parity_until_a_shadow_journal_is_deleted(
    kafka_bootstrap: str, published: Published, postgres_url: str, new_topic: TopicFactory,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    exceptions, shadow_exceptions = new_topic("rec-exc", 1), new_topic("rec-shadow-exc", 1)
    primary_url = f"sqlite:///{tmp_path / 'primary.db'}"
    shadow_url = postgres_url  # a different backend: parity is about content, not storage
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "REVLINE_VALIDATED_TOPIC": published.topic, "REVLINE_LEDGER_DSN": primary_url,
           "REVLINE_EXCEPTIONS_TOPIC": exceptions, "REVLINE_STATE_DIR": str(tmp_path)}
    with SqlLedger(primary_url) as primary, SqlLedger(shadow_url) as shadow:
        _sink(kafka_bootstrap, published.topic, primary, InMemoryErp(), exceptions)
        stream = _stream(kafka_bootstrap, published.topic)
        # The real command, beside the (finished) primary, until its ledger has caught up.
        log = (tmp_path / "shadow.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "revline.cli", "shadow", "run", "--ledger", shadow_url,
             "--group", f"shadow-{uuid.uuid4().hex[:8]}", "--exceptions-topic",
             shadow_exceptions], env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while (same := ledger_parity(stream, primary, shadow, RULES)).parity_pct < 100:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "shadow.log").read_text()[-3000:])
                time.sleep(1)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, (tmp_path / "shadow.log").read_text()[-3000:]
            log.close()
        assert same.parity_pct == 100.0 and same.differences == []
        assert same.compared == len([e for e in stream.records if e.event_type not in (
            "fulfilment_confirmed", "discount_approved", "manual_override")])
        # The shadow's refusal went to the shadow topic; the primary's topic has only its own.
        assert [r["idempotency_key"] for r in _exceptions(kafka_bootstrap, shadow_exceptions)] \
            == [published.refused_key]
        assert len(_exceptions(kafka_bootstrap, exceptions)) == 1

        refund = next(e for e in stream.records if e.event_type in (
            "refund_issued", "payment_captured"))
        _delete_journal(shadow_url, refund.key)
        report = ledger_parity(stream, primary, shadow, RULES)
        assert report.parity_pct < 100.0 and report.compared == same.compared
        assert [d.key for d in report.differences] == [refund.key]
        assert report.by_type[refund.event_type].parity_pct < 100.0
        assert report.by_type["invoice_issued"].parity_pct == 100.0

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REVLINE_VALIDATED_TOPIC", published.topic)
    monkeypatch.setenv("REVLINE_LEDGER_DSN", primary_url)
    out = tmp_path / "parity.json"
    assert cli.main(["shadow", "parity", "--ledger", shadow_url, "--json", str(out)]) == 1
    assert orjson.loads(out.read_bytes())["differences"][0]["key"] == refund.key
    assert cli.main(["shadow", "parity", "--ledger", shadow_url, "--min-parity", "95"]) == 0
    # Refused: a shadow that would write into the primary's ledger.
    with pytest.raises(Exception, match="share the primary's ledger"), \
            SqlLedger(primary_url) as same_ledger:
        shadow_processor(kafka_bootstrap, published.topic, ledger=same_ledger,
                         erp=InMemoryErp(), group="g", exceptions_topic="x",
                         primary=[("ledger", primary_url)])


# -- Tryton ------------------------------------------------------------------------------
# A month no other test writes in: the session's Tryton database is shared.
TRYTON_DAY = datetime(2029, 6, 12, 9, 0, tzinfo=UTC)


def test_reconcile_against_tryton_finds_a_sale_deleted_over_json_rpc(
    kafka_bootstrap: str, tryton_server: TrytonServer, new_topic: TopicFactory,  # noqa: F811
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    topic, exceptions = new_topic("rec-tryton-validated", 3), new_topic("rec-tryton-exc", 1)
    facts = new_topic("rec-tryton-facts", 1)
    paid, quoted, dropped = new_order(), new_order(), new_order()
    inv = invoiced(paid, LINES[:1], at=TRYTON_DAY)
    at = TRYTON_DAY
    # Every kind of ERP document: sale (booked, amended), invoice, payment, refund credit
    # note and refund payment, and a cancellation's credit note.
    events = [booked(paid, LINES, at=at), amended(paid, 1, LINES[:1], at=at), inv,
              captured(paid, 1, inv["total_minor"], at=at), refunded(paid, 5000, at=at),
              booked(quoted, LINES, at=at),
              booked(dropped, LINES, at=at), invoiced(dropped, LINES, at=at),
              cancelled(dropped, at + timedelta(days=2))]
    _publish(kafka_bootstrap, topic, events)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    window = parse_window("2029-06")
    with SqlLedger(url) as ledger, tryton_adapter(tryton_server) as erp:
        _sink(kafka_bootstrap, topic, ledger, erp, exceptions)
        stream = _stream(kafka_bootstrap, topic)
        clean = reconcile(stream, window, ledger, erp)
        assert clean.issues == [], clean.issues
        assert (clean.system("erp").checked, clean.system("ledger").checked) == (9, 5)

        # Behind the pipeline's back: a clerk drafts the quotation and deletes it.
        sale = next(d for d in erp.documents() if d.idempotency_key == f"{quoted}:booked")
        erp.rpc("model.sale.sale.draft", [int(sale.ref)])
        erp.rpc("model.sale.sale.delete", [int(sale.ref)])
        report = reconcile(stream, window, ledger, erp)
        (missing,) = report.issues
        assert (missing.system, missing.kind, missing.key, missing.money) == (
            "erp", "missing", f"{quoted}:booked", False)
        assert "no sale" in missing.detail

        records = list(audit_fact(report).detail.items())
        assert ("missing", 1) in records

    db = tryton_server.database
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REVLINE_VALIDATED_TOPIC", topic)
    monkeypatch.setenv("REVLINE_EXCEPTIONS_TOPIC", exceptions)
    monkeypatch.setenv("REVLINE_AUDIT_FACTS_TOPIC", facts)
    monkeypatch.setenv("REVLINE_LEDGER_DSN", url)
    monkeypatch.setenv("REVLINE_TRYTON_URL", tryton_server.url)
    monkeypatch.setenv("REVLINE_TRYTON_DATABASE", db.name)
    monkeypatch.setenv("REVLINE_TRYTON_USER", db.user)
    monkeypatch.setenv("REVLINE_TRYTON_PASSWORD", db.password)
    monkeypatch.setenv("REVLINE_ERP", "auto")
    out = tmp_path / "report.json"
    assert cli.main(["reconcile", "--period", "2029-06", "--json", str(out)]) == 1
    data = orjson.loads(out.read_bytes())
    assert data["erp"]["reconciled"] is True and data["erp"]["missing"] == 1
    assert data["exceptions_opened"] == 1
    (rec,) = [r for r in _exceptions(kafka_bootstrap, exceptions)
              if r["check_id"] == CHECK_DRIFT]
    assert (rec["check_id"], rec["severity"], rec["order_id"]) == (
        "reconciliation.drift", "P2", quoted)  # a sale, not money


def test_events_the_sink_has_not_reached_are_in_flight_not_drift(
    kafka_bootstrap: str, published: Published, tmp_path: Path
) -> None:
    """A lagging or paused sink must not open P1 'missing' exceptions for work still queued."""
    from revline.sinks.erp import InMemoryErp
    from revline.sinks.reconcile import committed_offsets, reconcile

    group = f"sink-{uuid.uuid4().hex[:8]}"
    assert committed_offsets(kafka_bootstrap, group, published.topic) is None
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    proc = SinkProcessor(kafka_bootstrap, published.topic, group, ledger, InMemoryErp(),
                         "unused-exceptions", batch_size=10, poll_timeout_s=0.2)
    try:
        while proc.stats.batches < 2:  # the sink applied two batches, then "stalled"
            proc.step()
    finally:
        proc.close()
    upto = committed_offsets(kafka_bootstrap, group, published.topic)
    assert upto is not None and 0 < sum(upto.values()) < len(published.events)
    view = read_stream(kafka_bootstrap, published.topic, EventDeserializer(), RULES,
                       applied_upto=upto)
    assert view.in_flight == len(published.events) - sum(upto.values())
    report = reconcile(view, parse_window(), ledger, None)
    assert report.issues == [] and report.drift_pct == 0.0
    # Without the bound, the same ledger looks like drift: every queued event "missing".
    assert reconcile(_stream(kafka_bootstrap, published.topic), parse_window(),
                     ledger, None).issues
    ledger.close()


# -- per order: every kind of damage, on the real broker and ledger ----------------------
SHARED_KEY = "ERP-INV-0001"  # two sources both number their invoice 1


def _journal_ids(conn: sa.Connection, order: str, event_type: str | None = None) -> list[str]:
    sql = "SELECT id FROM journals WHERE order_id = :o"
    params = {"o": order}
    if event_type is not None:
        sql += " AND event_type = :t"
        params["t"] = event_type
    return [r[0] for r in conn.execute(sa.text(sql + " ORDER BY id"), params)]


def _delete_journals(url: str, order: str, event_type: str | None = None) -> None:
    """Delete an order's journals (of one type), by order: not its key, which another
    order may share."""
    with behind_the_back(url) as conn:
        ids = _journal_ids(conn, order, event_type)
        assert ids, (order, event_type)
        for jid in ids:
            conn.execute(sa.text("DELETE FROM journal_lines WHERE journal_id = :j"), {"j": jid})
            conn.execute(sa.text("DELETE FROM journals WHERE id = :j"), {"j": jid})


def _post_again(url: str, order: str, event_type: str) -> None:
    """A second journal for an effect already posted, inserted behind the pipeline's
    back (another effect key for the same event: the unique key allows it)."""
    with behind_the_back(url) as conn:
        old = _journal_ids(conn, order, event_type)[0]
        new = str(uuid.uuid4())
        conn.execute(sa.text(
            "INSERT INTO journal_lines (journal_id, line_no, account, currency, debit_minor, "
            "credit_minor) SELECT :n, line_no, account, currency, debit_minor, credit_minor "
            "FROM journal_lines WHERE journal_id = :j"), {"n": new, "j": old})
        conn.execute(sa.text(
            "INSERT INTO journals (id, idempotency_key, event_key, order_id, event_type, "
            "currency, total_debit_minor, total_credit_minor, source_ref, occurred_at, "
            "posted_at, reverses_journal_id, description) SELECT :n, idempotency_key || "
            "'#again', event_key, order_id, event_type, currency, total_debit_minor, "
            "total_credit_minor, source_ref, occurred_at, posted_at, reverses_journal_id, "
            "description FROM journals WHERE id = :j"), {"n": new, "j": old})


def _recurrency(url: str, order: str, event_type: str, currency: str) -> None:
    with behind_the_back(url) as conn:
        (jid, *_) = _journal_ids(conn, order, event_type)
        for table, column in (("journal_lines", "journal_id"), ("journals", "id")):
            conn.execute(sa.text(f"UPDATE {table} SET currency = :c WHERE {column} = :j"),
                         {"c": currency, "j": jid})


def test_every_kind_of_damage_drifts_exactly_the_damaged_orders_and_opens_one_exception_each(
    kafka_bootstrap: str, ledger_url: str, new_topic: TopicFactory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    topic, exceptions = new_topic("rec-damage-validated", 3), new_topic("rec-damage-exc", 1)
    facts = new_topic("rec-damage-facts", 1)
    orders = {name: new_order() for name in (
        "lost", "doubled", "amount", "currency", "credit_note", "erp", "shared_kept",
        "shared_lost", "untouched")}  # fmt: skip

    def flow(order: str, currency: str = "EUR") -> list[dict[str, Any]]:
        inv = invoiced(order, LINES, currency)
        total = inv["total_minor"]
        return [booked(order, LINES, currency), inv, captured(order, 1, total // 2, currency),
                captured(order, 2, total - total // 2, currency),
                refunded(order, 5000, currency)]

    events = [e for name in ("lost", "doubled", "amount", "erp", "untouched")
              for e in flow(orders[name])]
    events += flow(orders["currency"], "JPY")
    c = orders["credit_note"]
    events += [booked(c, LINES), invoiced(c, LINES), cancelled(c)]
    for name, lines in (("shared_kept", LINES), ("shared_lost", LINES[:1])):
        events += [booked(orders[name], lines), invoiced(orders[name], lines, key=SHARED_KEY)]
    _publish(kafka_bootstrap, topic, events)
    erp = InMemoryErp()
    with SqlLedger(ledger_url) as ledger:
        _sink(kafka_bootstrap, topic, ledger, erp, exceptions)
        stream = _stream(kafka_bootstrap, topic)
        assert len(stream.records) == len(events)

        clean = reconcile(stream, ALL_TIME, ledger, erp)
        assert clean.issues == [] and clean.drifted == [] and clean.drift_pct == 0.0
        assert set(clean.money()) == {"EUR", "JPY"}
        # Both orders of the shared key hold their own invoice in both systems.
        for name in ("shared_kept", "shared_lost"):
            cell = clean.orders[orders[name]].cells["invoice_issued", "EUR"]
            assert cell.expected_minor == cell.ledger_minor == cell.erp_minor
            assert cell.expected_minor > 0

        damage: list[tuple[str, Callable[[], None]]] = [
            ("lost", lambda: _delete_journals(ledger_url, orders["lost"])),
            ("doubled", lambda: _post_again(ledger_url, orders["doubled"], "payment_captured")),
            ("amount", lambda: _tamper(ledger_url, f"{orders['amount']}:invoice:1", 100)),
            ("currency", lambda: _recurrency(ledger_url, orders["currency"],
                                             "payment_captured", "USD")),
            ("credit_note", lambda: _delete_journals(ledger_url, c, "order_cancelled")),
            ("erp", lambda: _edit_erp_invoice(erp, orders["erp"], 250)),
            ("shared_lost", lambda: _delete_journals(ledger_url, orders["shared_lost"])),
        ]
        damaged: list[str] = []
        for name, do in damage:
            do()
            damaged.append(orders[name])
            report = reconcile(stream, ALL_TIME, ledger, erp)
            assert sorted(o.order_id for o in report.drifted) == sorted(damaged), name
            assert report.drift_pct > 0, name
            drift = next(o for o in report.drifted if o.order_id == orders[name])
            assert drift.differing and drift.money, name
        assert orders["shared_kept"] not in {o.order_id for o in report.drifted}
        assert report.money()["USD"].drift_pct == 100.0  # nothing in USD was expected
        erp_drift = next(o for o in report.drifted if o.order_id == orders["erp"])
        assert erp_drift.systems == ["erp"]
        (cell,) = erp_drift.differing.values()
        assert cell.erp_minor == cell.erp_expected_minor + 250

        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        assert open_exceptions(report, kafka_bootstrap, producer, exceptions, sla_minutes=SLA,
                               rules_version="postings t") == len(damage)
        again = reconcile(stream, ALL_TIME, ledger, erp)
        assert open_exceptions(again, kafka_bootstrap, producer, exceptions, sla_minutes=SLA,
                               rules_version="postings t") == 0
        assert again.exceptions_known == len(damage)
    records = [r for r in _exceptions(kafka_bootstrap, exceptions) if r["check_id"] == CHECK_DRIFT]
    assert sorted(r["order_id"] for r in records) == sorted(damaged)  # once each
    assert {(r["severity"], r["owner"]) for r in records} == {("P1", "finance")}

    # The command line: exit 1, the JSON names the ledger's drifted orders (the in-memory
    # ERP is not read there) with amounts in minor units; nothing opened again.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REVLINE_VALIDATED_TOPIC", topic)
    monkeypatch.setenv("REVLINE_EXCEPTIONS_TOPIC", exceptions)
    monkeypatch.setenv("REVLINE_AUDIT_FACTS_TOPIC", facts)
    monkeypatch.setenv("REVLINE_LEDGER_DSN", ledger_url)
    monkeypatch.setenv("REVLINE_ERP", "memory")
    monkeypatch.delenv("REVLINE_TRYTON_URL", raising=False)
    out = tmp_path / "report.json"
    assert cli.main(["reconcile", "--json", str(out)]) == 1
    data = orjson.loads(out.read_bytes())
    ledger_damaged = sorted(o for o in damaged if o != orders["erp"])
    assert sorted(o["order_id"] for o in data["drifted_orders"]) == ledger_damaged
    assert data["exceptions_opened"] == 0 and data["exceptions_already_open"] == 6
    lost = next(o for o in data["drifted_orders"] if o["order_id"] == orders["lost"])
    inv = next(d for d in lost["differences"] if d["event_type"] == "invoice_issued")
    assert (inv["currency"], inv["ledger_minor"], inv["ledger_diff_minor"]) == (
        "EUR", 0, inv["expected_minor"])
    assert data["by_currency"]["USD"]["drift_pct"] == 100.0 and data["drift_pct"] == 100.0
    assert cli.main(["reconcile", "--no-exceptions", "--period", "2031-01"]) == 0


def _edit_erp_invoice(erp: InMemoryErp, order: str, plus: int) -> None:
    """A clerk changes an invoice's total in the ERP by hand."""
    (doc,) = [d for d in erp.documents() if d.step == "invoice" and d.order_id == order]
    stored = next(v for k, v in erp.store.invoices.items() if str(k) == doc.ref)
    stored["total_minor"] += plus
