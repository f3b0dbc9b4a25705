"""`revline redrive` on the real broker with a real worker: an exception fixed by new
reference data is judged again and validated; poison re-driven repeatedly is dead-lettered
again each time and quarantined after N, never looping; dry runs send nothing; key and
headers are preserved; every run is audited. Plus the filters and skips, without a worker."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from revline import cli
from revline.core.admin import ensure_topics
from revline.core.auditlog import AuditFact
from revline.core.readback import header, read_topic
from revline.core.settings import DATA_DIR, Settings
from revline.operations.publisher import SOURCE_LINE_HEADER, Publisher
from revline.operations.redrive import RedriveFilter, redrive
from revline.operations.replay import OperationRefusedError
from revline.processors import REDRIVE_COUNT_HEADER, REENTRY_HEADER
from revline.schemas import EventSerializer, exception_codec, validate_event
from revline.tools.isolated import IsolatedPipeline
from tests.conftest import TopicFactory

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

NEW_SKU = "SKU-RD-LAUNCH"


@pytest.fixture(scope="module")
def pipeline(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[IsolatedPipeline]:
    """One real worker for the module; each test uses its own orders."""
    p = IsolatedPipeline(kafka_bootstrap, tmp_path_factory.mktemp("redrive"), partitions=2,
                         prefix="rd")
    p.extra_env["REVLINE_REDRIVE_LOG_TOPIC"] = p.topic("redrive-log")
    try:
        # The input topic first: a publish racing the worker's start would have the broker
        # auto-create it with its default partition count, and the worker reads only as
        # many partitions as it owns (REVLINE_INPUT_PARTITIONS).
        ensure_topics(kafka_bootstrap, {p.topic("events"): p.partitions})
        p.cli("reference", "load")
        p.start_worker()
        # Ready means deciding: a clean booking gets its outcome (on a busy shared machine
        # a worker's start-up takes anywhere from seconds to a minute).
        ready = f"RDREADY-{uuid.uuid4().hex[:6]}"
        with Publisher(kafka_bootstrap, p.topic("events")) as pub:
            pub.publish(booking(ready, "SKU-CRM-PRO"))
        wait_finals(p, 1, key=ready.encode(), timeout=180)
        yield p
    finally:
        p.stop_all()
        _delete_topics(kafka_bootstrap, p.topic(""))
        _delete_topics(kafka_bootstrap, f"revline-{p.prefix}-{p.name}-")  # Faust's own


def _delete_topics(bootstrap: str, prefix: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if mine:
        for fut in admin.delete_topics(mine, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(timeout=30)


@pytest.fixture
def env(pipeline: IsolatedPipeline, monkeypatch: pytest.MonkeyPatch) -> IsolatedPipeline:
    """This pipeline's settings in the environment, for Settings() and the CLI in-process."""
    for key, value in pipeline.env.items():
        if key.startswith(("REVLINE_", "KAFKA_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli.console, "width", 250)
    return pipeline


def booking(order_id: str, sku: str) -> dict[str, Any]:
    return validate_event({
        "envelope": {
            "event_id": str(uuid.uuid4()), "event_type": "order_booked",
            "idempotency_key": f"{order_id}:booked", "order_id": order_id, "sequence": 1,
            "occurred_at": "2026-11-24T09:00:00Z", "source_system": "salesforce",
            "source_record_id": f"006-{order_id}",
        },
        "booking_kind": "DEAL_CLOSED", "customer_id": "CUST-RD", "currency": "EUR",
        "lines": [{"line_id": "L1", "sku": sku, "quantity": 2, "unit_price_minor": 10000,
                   "discount_minor": 0, "campaign_id": None, "channel_id": "direct-sales"}],
        "tax_minor": 4000, "total_minor": 24000,
    })


def finals(pipeline: IsolatedPipeline, order_id: str) -> list[dict[str, Any]]:
    return [o for o in pipeline.outcomes() if o["final"] and o["order_id"] == order_id]


def wait_finals(pipeline: IsolatedPipeline, n: int, *, key: bytes, timeout: float = 90
                ) -> list[dict[str, Any]]:
    """The first n final outcomes of inputs keyed ``key`` (poison has no order id)."""
    topic = pipeline.topic("events")
    deadline = time.monotonic() + timeout
    while True:
        keyed = {(p, o) for p, o in _keys(pipeline.bootstrap, topic, key)}
        got = [o for o in pipeline.outcomes()
               if o["final"] and (o["input_partition"], o["input_offset"]) in keyed]
        if len(got) >= n:
            return sorted(got, key=lambda o: o["input_offset"])
        if time.monotonic() > deadline:
            logs = "".join(f.read_text(errors="replace")[-3000:]
                           for f in sorted(pipeline.state_dir.glob("worker-*.log")))
            raise AssertionError(f"waited for {n} outcomes of {key!r}, have {got}; worker log "
                                 f"tail:\n{logs}")
        time.sleep(0.5)


def _keys(bootstrap: str, topic: str, key: bytes) -> list[tuple[int, int]]:
    return [(m.partition() or 0, m.offset() or 0) for m in read_topic(bootstrap, topic)
            if m.key() == key]


def record_at(bootstrap: str, coords: str) -> Message:
    topic, partition, offset = coords.rsplit("/", 2)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe-" + uuid.uuid4().hex})
    try:
        c.assign([TopicPartition(topic, int(partition), int(offset))])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = c.poll(1.0)
            if msg is not None and msg.error() is None:
                return msg
        raise AssertionError(f"no record at {coords}")
    finally:
        c.close()


def input_end(pipeline: IsolatedPipeline) -> int:
    c = Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": "probe-" + uuid.uuid4().hex})
    topic = pipeline.topic("events")
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in parts)
    finally:
        c.close()


def facts(bootstrap: str, topic: str) -> list[AuditFact]:
    return [AuditFact.decode(m.value() or b"") for m in read_topic(bootstrap, topic, timeout=30)]


def names(msg: Message) -> list[str]:
    return [k for k, _ in (msg.headers() or [])]


# -- an exception fixed by new reference data ----------------------------------------------
def test_exception_for_an_unknown_sku_is_validated_after_the_fix_and_redrive(
    env: IsolatedPipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = env
    bootstrap = pipeline.bootstrap
    order = f"RD-{uuid.uuid4().hex[:8]}"
    with Publisher(bootstrap, pipeline.topic("events")) as pub:
        pub.publish(booking(order, NEW_SKU),
                    headers=[("trace-id", b"trace-77"), (SOURCE_LINE_HEADER, b"1")])
    [first] = wait_finals(pipeline, 1, key=order.encode())
    assert (first["kind"], first["check_id"]) == ("exception", "completeness.sku")
    exc_id = first["exception_id"]
    original = f"{pipeline.topic('events')}/{first['input_partition']}/{first['input_offset']}"

    # Dry run: shows the record, sends nothing, writes no redrive log.
    end = input_end(pipeline)
    dry = redrive(Settings(), bootstrap, "exceptions", RedriveFilter(orders=(order,)),
                  actor="ana@example.com", dry_run=True)
    [c] = dry.selected
    assert (c.source_id, c.input_coords, c.count, c.action) == (exc_id, original, 0, "redrive")
    assert c.headers == [("trace-id", b"trace-77"), (SOURCE_LINE_HEADER, b"1")]
    capsys.readouterr()
    assert cli.main(["redrive", "--source", "exceptions", "--reason", "completeness.SKU",
                     "--order", order, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Dry run" in out and exc_id in out and "1 would be re-driven" in out
    assert input_end(pipeline) == end
    assert list(read_topic(bootstrap, pipeline.topic("redrive-log"), timeout=10)) == []

    # The fix: reference data that knows the SKU; a probe order proves the worker has it.
    data = yaml.safe_load((DATA_DIR / "reference.yaml").read_text())
    data["version"] = f"{data['version']}+{NEW_SKU}"
    data["products"].append({"sku": NEW_SKU, "family": "software", "name": "Launch bundle",
                             "list_prices": {c: 10000 for c in ("USD", "EUR", "GBP", "SEK")}
                             | {"JPY": 15000}})
    (tmp_path / "reference.yaml").write_text(yaml.safe_dump(data))
    pipeline.cli("reference", "load", "--file", str(tmp_path / "reference.yaml"))
    probes = 0
    while True:  # the worker follows the reference topic: a probe passes once it has the fix
        probe = f"RDPROBE-{uuid.uuid4().hex[:6]}"
        with Publisher(bootstrap, pipeline.topic("events")) as pub:
            pub.publish(booking(probe, NEW_SKU))
        probes += 1
        [verdict] = wait_finals(pipeline, 1, key=probe.encode())
        if verdict["kind"] == "validated":
            break
        assert probes < 20, "the worker never saw the new reference data"
        time.sleep(1.0)

    assert cli.main(["redrive", "--source", "exceptions", "--order", order,
                     "--actor", "ana@example.com"]) == 0
    out = capsys.readouterr().out
    assert "Re-drove 1 records" in out
    outcomes = wait_finals(pipeline, 2, key=order.encode())
    assert [o["kind"] for o in outcomes] == ["exception", "validated"]
    again = outcomes[1]
    target = f"{pipeline.topic('events')}/{again['input_partition']}/{again['input_offset']}"
    assert target != original and again["idempotency_key"] == f"{order}:booked"

    # Key and headers preserved, plus the re-entry id and the count.
    sent = record_at(bootstrap, target)
    assert sent.key() == order.encode()
    assert sent.value() == record_at(bootstrap, original).value()
    assert names(sent) == ["trace-id", SOURCE_LINE_HEADER, REENTRY_HEADER, REDRIVE_COUNT_HEADER]
    assert header(sent, "trace-id") == b"trace-77"
    assert header(sent, REENTRY_HEADER) == exc_id.encode()
    assert header(sent, REDRIVE_COUNT_HEADER) == b"1"
    validated = [m for m in read_topic(bootstrap, pipeline.topic("validated"))
                 if header(m, "revline.input") == target.encode()]
    assert len(validated) == 1 and header(validated[0], REENTRY_HEADER) == exc_id.encode()

    # The same command again sends nothing: that exception was re-driven already.
    rerun = redrive(Settings(), bootstrap, "exceptions", RedriveFilter(orders=(order,)),
                    actor="ana@example.com")
    assert rerun.selected == [] and sum(rerun.skipped.values()) == 1
    assert input_end(pipeline) == end + 1 + probes

    # Audited: every run on the operations chain, the record on its order's chain.
    audit = facts(bootstrap, pipeline.topic("audit-facts"))
    runs = [f for f in audit if f.fact_id.startswith("redrive-run:")
            and f.detail["filters"]["order"] == [order]]
    assert [(f.detail["dry_run"], f.detail["redriven"]) for f in runs] == \
        [(True, 1), (True, 1), (False, 1), (False, 0)]
    assert all(f.chain == "_operations" and f.kind == "redrive" for f in runs)
    [mine] = [f for f in audit if f.fact_id == f"redrive:{exc_id}"]
    assert mine.chain == order and mine.actor == "ana@example.com"
    assert (mine.detail["action"], mine.detail["target"], mine.detail["input"],
            mine.detail["redrive_count"]) == ("redriven", target, original, 1)


# -- poison: dead-lettered again each time, then quarantined ------------------------------
def test_poison_redriven_repeatedly_is_dead_lettered_again_then_quarantined_never_looping(
    env: IsolatedPipeline, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = env
    bootstrap = pipeline.bootstrap
    monkeypatch.setenv("REVLINE_REDRIVE_MAX", "2")
    key = f"RDX-{uuid.uuid4().hex[:8]}"
    poison = b'{"not": "avro"} \x00\x01 poison'
    with Publisher(bootstrap, pipeline.topic("events")) as pub:
        pub.publish_raw(key, poison, [("trace-id", b"poison-1"), (SOURCE_LINE_HEADER, b"9")])
    [dead] = wait_finals(pipeline, 1, key=key.encode())
    assert (dead["kind"], dead["stage"]) == ("dead_letter", "decode")

    def dead_letters() -> list[Message]:
        return [m for m in read_topic(bootstrap, pipeline.topic("deadletter"))
                if m.key() == key.encode()]

    for attempt in (1, 2):
        if attempt == 1:
            result = redrive(Settings(), bootstrap, "deadletter",
                             RedriveFilter(orders=(key,), reasons=("decode",)), actor="ops")
            [c] = result.redriven
        else:  # through the CLI, by the newest dead letter's id
            newest = dead_letters()[-1]
            source = f"dlq:{newest.topic()}/{newest.partition()}/{newest.offset()}"
            assert cli.main(["redrive", "--source", "deadletter", "--exception-id", source,
                             "--rate", "5"]) == 0
            assert "Re-drove 1 records" in capsys.readouterr().out
        outcomes = wait_finals(pipeline, attempt + 1, key=key.encode())
        assert [o["kind"] for o in outcomes] == ["dead_letter"] * (attempt + 1)
    assert c.new_count == 1 and c.headers == [("trace-id", b"poison-1"),
                                              (SOURCE_LINE_HEADER, b"9")]

    letters = dead_letters()
    assert len(letters) == 3 and all(m.value() == poison for m in letters)
    assert [header(m, REDRIVE_COUNT_HEADER) for m in letters] == [None, b"1", b"2"]
    assert [header(m, REENTRY_HEADER) for m in letters[1:]] == [
        f"dlq:{m.topic()}/{m.partition()}/{m.offset()}".encode() for m in letters[:2]]
    assert all(header(m, "trace-id") == b"poison-1" for m in letters)
    # One copy of each diagnostic header: the re-driven record did not carry the old ones.
    assert all(names(m).count("revline.errors.stage") == 1 for m in letters)

    # Third time: the count would exceed REVLINE_REDRIVE_MAX=2 -> quarantine, not the input.
    end = input_end(pipeline)
    third = redrive(Settings(), bootstrap, "deadletter", RedriveFilter(orders=(key,)),
                    actor="ops")
    assert third.redriven == [] and len(third.quarantined) == 1
    assert sum(third.skipped.values()) == 2  # the two earlier dead letters: handled already
    assert input_end(pipeline) == end
    [q] = list(read_topic(bootstrap, pipeline.topic("quarantine")))
    assert q.key() == key.encode() and q.value() == poison
    assert header(q, "trace-id") == b"poison-1" and header(q, REDRIVE_COUNT_HEADER) == b"2"
    assert b"limit is 2" in (header(q, "revline.quarantine.reason") or b"")
    assert header(q, "revline.quarantine.source") == third.quarantined[0].source_id.encode()
    assert header(q, "revline.errors.stage") == b"decode"  # the last failure, for whoever fixes it

    # Nothing more happens: no new dead letter, and re-running selects nothing.
    time.sleep(3)
    assert len(dead_letters()) == 3 and input_end(pipeline) == end
    last = redrive(Settings(), bootstrap, "deadletter", RedriveFilter(orders=(key,)), actor="ops")
    assert last.selected == [] and sum(last.skipped.values()) == 3
    audit = facts(bootstrap, pipeline.topic("audit-facts"))
    mine = [f for f in audit if f.chain == key]
    assert sorted(f.detail["action"] for f in mine) == ["quarantined", "redriven", "redriven"]


# -- filters and skips, without a worker -----------------------------------------------------
def _dlq_record(producer: Producer, topic: str, i: int, stage: str, ts: int) -> None:
    key = f"O-{i}"
    headers = [("trace-id", key.encode())] + [
        (f"revline.errors.{k}", v.encode()) for k, v in
        [("topic", "in"), ("partition", "0"), ("offset", str(100 + i)), ("stage", stage),
         ("exception.class", "MalformedRecordError" if stage == "decode"
          else "UnknownSchemaError"), ("exception.message", f"problem {i}")]]
    producer.produce(topic, key=key.encode(), value=b"bytes-" + key.encode(), headers=headers,
                     timestamp=ts)


def _exception(producer: Producer, topic: str, exc_id: str, order: str, check: str, *,
               blocking: bool = True) -> None:
    value = exception_codec().encode({
        "exception_id": exc_id, "check_id": check, "severity": "P2", "owner": "revenue_ops",
        "reason": f"{check} failed", "all_findings": [], "blocking": blocking,
        "opened_at_ms": 1, "sla_deadline_ms": 2, "rules_version": "r", "event_type": None,
        "idempotency_key": None, "order_id": order, "source_system": None,
        "source_record_id": None, "input_topic": "gone-topic", "input_partition": 0,
        "input_offset": 5, "event": EventSerializer()(booking(order, "SKU-CRM-PRO")),
    })
    producer.produce(topic, key=order.encode(), value=value)


@pytest.fixture
def prefix(kafka_bootstrap: str) -> Iterator[str]:
    """A topic-name prefix; every topic under it is deleted after the test."""
    name = f"rdf-{uuid.uuid4().hex[:8]}"
    yield name
    _delete_topics(kafka_bootstrap, name)


def test_filters_settled_exceptions_and_rate_without_a_worker(
    kafka_bootstrap: str, new_topic: TopicFactory, monkeypatch: pytest.MonkeyPatch, prefix: str,
) -> None:
    topics = {kind: new_topic(f"{prefix}.{kind}", 1)
              for kind in ("deadletter", "exceptions", "events", "exception-state")}
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    for var, kind in [("DEAD_LETTER", "deadletter"), ("EXCEPTIONS", "exceptions"),
                      ("INPUT", "events"), ("EXCEPTION_STATE", "exception-state")]:
        monkeypatch.setenv(f"REVLINE_{var}_TOPIC", topics[kind])
    for kind in ("audit-facts", "audit", "audit-heads", "exception-events", "quarantine",
                 "redrive-log"):
        monkeypatch.setenv(f"REVLINE_{kind.upper().replace('-', '_')}_TOPIC", f"{prefix}.{kind}")
    monkeypatch.setenv("REVLINE_INPUT_PARTITIONS", "1")
    settings = Settings()
    assert settings.exception_state_topic == topics["exception-state"]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    t0 = int(time.time() * 1000) - 86_400_000  # the broker refuses future timestamps
    for i in range(6):
        _dlq_record(producer, topics["deadletter"], i, "decode" if i % 2 else "schema",
                    t0 + i * 60_000)
    # Input 102's dead letter again (DLQ offset 6): a worker killed after sending, before
    # committing, sends it again. It goes back once, never twice.
    _dlq_record(producer, topics["deadletter"], 2, "schema", t0 + 2 * 60_000)
    _exception(producer, topics["exceptions"], "EX-open", "O-1", "completeness.sku")
    _exception(producer, topics["exceptions"], "EX-open", "O-1", "completeness.sku")  # replayed
    _exception(producer, topics["exceptions"], "EX-resolved", "O-2", "policy.price")
    _exception(producer, topics["exceptions"], "EX-waived", "O-3", "policy.price")
    _exception(producer, topics["exceptions"], "EX-p3", "O-4", "attribution.channel",
               blocking=False)
    _exception(producer, topics["exceptions"], "EX-sink", "O-5", "sink.erp_refused")
    for exc_id, status in [("EX-resolved", "resolved"), ("EX-waived", "WAIVED"),
                           ("EX-open", "acknowledged")]:
        producer.produce(topics["exception-state"], key=exc_id.encode(),
                         value=orjson.dumps({"exception_id": exc_id, "status": status}))
    producer.produce(topics["exception-state"], key=b"junk", value=b"not json")
    assert producer.flush(10) == 0

    def ids(source: str, **filters: Any) -> list[str]:
        result = redrive(settings, kafka_bootstrap, source, RedriveFilter(**filters),
                         actor="t", dry_run=True)
        return [c.source_id.rsplit("/", 1)[-1] for c in result.selected]

    dl = "deadletter"
    assert ids(dl) == ["0", "1", "2", "3", "4", "5"]  # DLQ offsets, in input order
    dry = redrive(settings, kafka_bootstrap, dl, RedriveFilter(), actor="t", dry_run=True)
    assert [n for why, n in dry.skipped.items() if "repeat" in why] == [1]
    assert ids(dl, reasons=("decode",)) == ["1", "3", "5"]
    assert ids(dl, reasons=("unknownschema", "problem 3")) == ["0", "2", "3", "4"]
    assert ids(dl, orders=("O-4", "O-9")) == ["4"]
    assert ids(dl, since_ms=t0 + 120_000, until_ms=t0 + 240_000) == ["2", "3"]
    assert ids(dl, limit=2) == ["0", "1"]
    ex = redrive(settings, kafka_bootstrap, "exceptions", RedriveFilter(), actor="t",
                 dry_run=True)
    assert [c.source_id for c in ex.selected] == ["EX-open"]  # acknowledged is still open
    assert not ex.selected[0].headers_preserved  # its input topic is gone: nothing to copy
    assert sorted(ex.skipped.values()) == [1, 1, 1, 1] and ex.matched == 5
    assert any("resolved" in why for why in ex.skipped)
    assert any("waived" in why for why in ex.skipped)
    assert any("advisory" in why for why in ex.skipped)
    assert any("sink refusal" in why for why in ex.skipped)

    # A real run, rate-limited: 5 records at 10/s take about 0.4 s and land in input order.
    started = time.monotonic()
    sent = redrive(settings, kafka_bootstrap, dl, RedriveFilter(limit=5), actor="t", rate=10)
    assert time.monotonic() - started >= 0.4
    assert [c.target for c in sent.selected] == [f"{topics['events']}/0/{i}" for i in range(5)]
    landed = list(read_topic(kafka_bootstrap, topics["events"]))
    assert [m.key() for m in landed] == [f"O-{i}".encode() for i in range(5)]
    assert all(names(m) == ["trace-id", REENTRY_HEADER, REDRIVE_COUNT_HEADER] for m in landed)
    log = {(m.key() or b"").decode(): orjson.loads(m.value() or b"{}")
           for m in read_topic(kafka_bootstrap, settings.redrive_log_topic)}
    assert sorted(log) == sorted(c.source_id for c in sent.selected)
    assert ids(dl) == ["5"]  # the others are in the redrive log

    # No filter at all needs --all on the command line.
    with pytest.raises(OperationRefusedError, match="--all"):
        from revline.cli.replay import cmd_redrive

        cmd_redrive(cli.build_parser().parse_args(["redrive", "--source", dl]), settings)
