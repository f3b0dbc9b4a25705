"""The exception lifecycle on the real broker: worker + `revline exceptions run` + the CLI.

One pipeline (worker and manager as subprocesses) is shared by the tests of this module.
The ownership config gives P1 a 3-second SLA and P3 a 9-second expiry (a fast clock),
and routes policy.* exceptions to finance with integrations as the backup owner.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from revline.core.auditlog import AuditFact
from revline.core.readback import read_topic
from revline.core.settings import DATA_DIR
from revline.operations.publisher import Publisher
from revline.operations.verify import finals_by_input
from revline.processors import REENTRY_HEADER
from revline.processors.engine import OVERRIDE_APPLIED
from revline.processors.ownership import ExceptionFacts, load_ownership
from revline.schemas import exception_codec, validate_event
from revline.streams.exceptions import read_states
from revline.tools.isolated import IsolatedPipeline
from revline.tools.workload import WorkloadOptions, generate

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T = TypeVar("T")
P1_SLA_S = 3.0
P3_EXPIRE_S = 9.0


@dataclass
class Run:
    pipeline: IsolatedPipeline
    bootstrap: str
    ownership_file: Path
    manager: subprocess.Popen[bytes]
    workload_inputs: int


def eventually(fetch: Callable[[], T], ok: Callable[[T], bool], timeout: float, what: str,
               every: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    value = fetch()
    while not ok(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
        value = fetch()
    return value


def cli_raw(run: Run, *args: str, expect: int = 0) -> str:
    proc = subprocess.run([sys.executable, "-m", "revline.cli", *args], env=run.pipeline.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == expect, (
        f"revline {' '.join(args)} -> {proc.returncode}: {proc.stdout} {proc.stderr}")
    return proc.stdout + proc.stderr


def cli(run: Run, *args: str, expect: int = 0) -> str:
    return " ".join(cli_raw(run, *args, expect=expect).split())  # rich wraps at 80 columns


def states(run: Run) -> dict[str, dict[str, Any]]:
    return read_states(run.bootstrap, run.pipeline.topic("exception-state"))


def topic_json(run: Run, kind: str) -> list[dict[str, Any]]:
    try:
        return [json.loads(m.value() or b"{}") for m in read_topic(run.bootstrap,
                                                                  run.pipeline.topic(kind))]
    except Exception:  # not created yet
        return []


def scrape(log: Path) -> str:
    port = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", log.read_text())
    assert port, log.read_text()[-2000:]
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as r:
        text: str = r.read().decode()
    return text


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def booking(order: str, discount_minor: int, *, key_suffix: str = "booked") -> dict[str, Any]:
    """A JSON booking of 2 CRM Pro seats (list 110400 EUR); > 44160 off is beyond policy."""
    subtotal = 2 * 110400 - discount_minor
    return {
        "envelope": {"event_type": "order_booked", "idempotency_key": f"{order}:{key_suffix}",
                     "order_id": order, "sequence": 1, "occurred_at": "2026-11-24T09:00:00Z",
                     "source_system": "salesforce", "source_record_id": f"006-{order}"},
        "booking_kind": "DEAL_CLOSED", "customer_id": "CUST-1", "currency": "EUR",
        "lines": [{"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": 2,
                   "unit_price_minor": 110400, "discount_minor": discount_minor,
                   "campaign_id": "cmp-2026-q4-webinar", "channel_id": "direct-sales"}],
        "tax_minor": 0, "total_minor": subtotal,
    }


def override_json(order: str, target: str, *, expires: datetime, reason_code: str,
                  n: str) -> dict[str, Any]:
    return {
        "envelope": {"event_type": "manual_override", "idempotency_key": f"{order}:override:{n}",
                     "order_id": order, "sequence": 0,
                     "occurred_at": datetime.now(UTC).isoformat(),
                     "source_system": "upstream-tool", "source_record_id": n},
        "override_id": n, "target_idempotency_key": target, "check_id": "policy.discount",
        "reason_code": reason_code, "actor": "ops-bot", "expires_at": expires.isoformat(),
    }


def outcome_of(run: Run, **match: Any) -> dict[str, Any]:
    """The final outcome whose fields equal ``match``."""
    def find() -> list[dict[str, Any]]:
        return [o for o in run.pipeline.outcomes()
                if o["final"] and all(o.get(k) == v for k, v in match.items())]
    return eventually(find, bool, 60, f"an outcome with {match}")[0]


def record_at(bootstrap: str, topic: str, partition: int, offset: int) -> tuple[bytes, bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "t-record-at",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        msg = consumer.poll(30)
        assert msg is not None and msg.error() is None and msg.offset() == offset
        return msg.key() or b"", msg.value() or b""
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("exceptions")
    ownership = yaml.safe_load((DATA_DIR / "ownership.yaml").read_text())
    ownership.update(
        version="test-fast",
        sla_minutes={"P1": P1_SLA_S / 60, "P2": 60, "P3": 60},
        expire_after_minutes={"P1": 60, "P2": 60, "P3": P3_EXPIRE_S / 60},
    )
    ownership["rules"].insert(0, {"name": "test-policy", "match": {"check_id": "policy.*"},
                                  "owner": "finance", "backup_owner": "integrations"})
    ownership_file = tmp / "ownership.yaml"
    ownership_file.write_text(yaml.safe_dump(ownership))
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp, extra_env={
        "REVLINE_OWNERSHIP_FILE": str(ownership_file),
        "REVLINE_EXCEPTION_CHECK_INTERVAL_S": "0.5",
        "REVLINE_EXCEPTIONS_METRICS_PORT": "0",
    })
    workload = generate(WorkloadOptions(
        orders=40, seed=5, run_id=f"x{pipeline.name}", duplicates=0, conflicts=0,
        out_of_order=0, incomplete=0.08, off_policy=0.1, unknown_attribution=0.1,
        amount_mismatch=0.08, poison=0, orphans=0))
    try:
        pipeline.cli("reference", "load")
        pipeline.start_worker()
        manager = pipeline.start("exceptions", "run", log_name="manager")
        pipeline.publish(workload)
        pipeline.wait_for(lambda o: len(finals_by_input(o)) >= len(workload.records), 120,
                          "a final outcome for every workload input")
        yield Run(pipeline, kafka_bootstrap, ownership_file, manager, len(workload.records))
    finally:
        pipeline.stop_all()


def test_workload_exceptions_become_owned_state_escalate_once_and_expire(run: Run) -> None:
    records = [exception_codec().decode(m.value() or b"")
               for m in read_topic(run.bootstrap, run.pipeline.topic("exceptions"))]
    ids = {r["exception_id"] for r in records}
    assert ids and {r["severity"] for r in records} >= {"P1", "P2", "P3"}
    current = eventually(lambda: states(run), lambda s: ids <= set(s), 60,
                         "a state for every exception record")

    # Owners, severities, backups and SLAs come from the ownership rules.
    ownership = load_ownership(run.ownership_file)
    for r in records:
        s = current[r["exception_id"]]
        want = ownership.assign(ExceptionFacts(
            r["check_id"], r["severity"], r["owner"], r["event_type"], r["source_system"],
            s["amount_minor"], s["currency"]))
        assert (s["owner"], s["severity"], s["backup_owner"]) == (
            want.owner, want.severity, want.backup_owner), s
        assert s["sla_deadline_ms"] == s["opened_at_ms"] + want.sla_ms
        assert s["ownership_version"] == "test-fast" and s["order_id"] == r["order_id"]
        if r["check_id"].startswith("policy."):
            assert (s["owner"], s["backup_owner"]) == ("finance", "integrations")

    # P1: not acknowledged within 3 s -> escalated once to the backup owner; P3 expire at 9 s.
    p1 = {i for i in ids if current[i]["severity"] == "P1"}
    p3 = {i for i in ids if current[i]["severity"] == "P3"}
    assert p1 and p3
    current = eventually(
        lambda: states(run),
        lambda s: all(s[i]["escalated"] for i in p1) and all(s[i]["status"] == "expired"
                                                             for i in p3),
        60, "P1 escalations and P3 expiries")
    for i in p1:
        s = current[i]
        assert s["status"] == "open" and s["escalated_at_ms"] >= s["sla_deadline_ms"]
        assert s["history"][-1]["status"] == "escalated"
    for i in p3:
        assert current[i]["closed_by"] == "exception-manager"
        assert current[i]["closed_at_ms"] >= current[i]["opened_at_ms"] + P3_EXPIRE_S * 1000
    assert all(current[i]["status"] == "open" and not current[i]["escalated"]
               for i in ids - p1 - p3)  # P2: 60 min SLA

    metrics = scrape(next(run.pipeline.state_dir.glob("manager-*.log")))
    assert metric_sum(metrics, "revline_sla_breaches_total", severity="P1") == len(p1)
    by_backup = Counter(current[i]["backup_owner"] for i in p1)
    for owner, count in by_backup.items():
        assert metric_sum(metrics, "revline_escalations_total", owner=owner) == count
    assert metric_sum(metrics, "revline_exception_transitions_total", status="expired") == len(p3)
    assert metric_sum(metrics, "revline_exception_transitions_total", status="open") == len(ids)
    assert "revline_exceptions_open{" in metrics
    assert "revline_exception_oldest_age_seconds{" in metrics

    # A restarted manager rebuilds from the state topic: nothing escalates twice.
    run.manager.send_signal(signal.SIGTERM)
    assert run.manager.wait(30) == 0
    run.manager = run.pipeline.start("exceptions", "run", log_name="manager")
    time.sleep(4)  # several ticks
    events = topic_json(run, "exception-events")
    escalations = Counter(e["exception_id"] for e in events if e["type"] == "escalated")
    assert escalations == dict.fromkeys(p1, 1)
    assert {e["to"] for e in events if e["type"] == "escalated"} == set(by_backup)
    after = states(run)
    assert {i: after[i]["escalated_at_ms"] for i in p1} == {
        i: current[i]["escalated_at_ms"] for i in p1}

    facts = [AuditFact.decode(m.value() or b"")
             for m in read_topic(run.bootstrap, run.pipeline.topic("audit-facts"))]
    kinds = Counter(f.kind for f in facts)
    assert kinds["exception_escalated"] == len(p1) and kinds["exception_expired"] == len(p3)
    assert all(f.fact_id.startswith(f"{f.detail['exception_id']}:") for f in facts
               if f.kind.startswith("exception_"))


def test_ack_resolve_waive_and_a_corrected_event_through_the_cli(run: Run) -> None:
    current = states(run)
    p2 = sorted(i for i, s in current.items() if s["severity"] == "P2" and s["status"] == "open")
    assert len(p2) >= 2
    first, second = p2[:2]

    # Filters: owner, severity, check, age.
    listed = [json.loads(line) for line in cli_raw(run, "exceptions", "list", "--severity", "P2",
                                                   "--json").splitlines()
              if line.startswith("{")]
    assert {first, second} <= {s["exception_id"] for s in listed}
    assert {s["severity"] for s in listed} == {"P2"}
    text = cli(run, "exceptions", "list", "--owner", current[first]["owner"], "--severity", "P2",
               "--check", current[first]["check_id"], "--older-than", "1s")
    assert first in text
    assert first not in cli(run, "exceptions", "list", "--severity", "P1")
    assert first not in cli(run, "exceptions", "list", "--older-than", "1d")

    out = cli(run, "exceptions", "ack", first, "--actor", "ana@example.com")
    assert f"{first} is now acknowledged" in out
    out = cli(run, "exceptions", "resolve", first, "--reason-code", "SOURCE_FIXED",
              "--actor", "bo@example.com", "--note", "fixed in the CRM")
    assert "is now resolved" in out and "SOURCE_FIXED" in out
    out = cli(run, "exceptions", "ack", first, "--actor", "ana@example.com", expect=2)
    assert "already resolved" in out and "nothing sent" in out
    cli(run, "exceptions", "waive", first, "--actor", "x", expect=2)  # no --reason-code

    out = cli(run, "exceptions", "waive", second, "--reason-code", "ACCEPTED_RISK",
              "--actor", "cy@example.com")
    assert "is now waived" in out
    current = states(run)
    s = current[first]
    assert (s["status"], s["acknowledged_by"], s["closed_by"], s["reason_code"], s["note"]) == (
        "resolved", "ana@example.com", "bo@example.com", "SOURCE_FIXED", "fixed in the CRM")
    assert [h["status"] for h in s["history"]] == ["open", "acknowledged", "resolved"]
    assert (current[second]["status"], current[second]["reason_code"]) == (
        "waived", "ACCEPTED_RISK")
    shown = cli(run, "exceptions", "show", first)
    assert "resolved" in shown and "bo@example.com" in shown and "SOURCE_FIXED" in shown

    # A correction: the off-policy booking is fixed and re-enters linked to its exception.
    order = f"CX-{run.pipeline.name}"
    with Publisher(run.bootstrap, run.pipeline.topic("events")) as publisher:
        publisher.publish(booking(order, discount_minor=110400))
    failed = outcome_of(run, order_id=order, kind="exception")
    exception_id = failed["exception_id"]
    eventually(lambda: states(run), lambda s: exception_id in s, 30, "the booking's exception")
    bad = run.pipeline.state_dir / "bad.json"
    bad.write_text(json.dumps({"envelope": {"event_type": "order_booked"}}))
    out = cli(run, "exceptions", "resolve", exception_id, "--reason-code", "CORRECTED",
              "--actor", "ana@example.com", "--corrected-event", str(bad), expect=2)
    assert "idempotency_key" in out and "nothing sent" in out
    fixed = run.pipeline.state_dir / "fixed.json"
    fixed.write_text(json.dumps(booking(order, discount_minor=22080)))
    out = cli(run, "exceptions", "resolve", exception_id, "--reason-code", "CORRECTED",
              "--actor", "ana@example.com", "--corrected-event", str(fixed))
    assert "is now resolved" in out
    resolved = states(run)[exception_id]
    corrected_id = resolved["corrected_event_id"]
    assert corrected_id and resolved["status"] == "resolved"
    again = outcome_of(run, event_id=corrected_id)
    assert again["kind"] == "validated" and again["idempotency_key"] == f"{order}:booked"
    assert (again["input_partition"], again["input_offset"]) != (
        failed["input_partition"], failed["input_offset"])

    facts = [AuditFact.decode(m.value() or b"")
             for m in read_topic(run.bootstrap, run.pipeline.topic("audit-facts"))]
    mine = {(f.kind, f.actor) for f in facts if f.detail.get("exception_id") in (first, second)}
    assert {("exception_acknowledged", "ana@example.com"), ("exception_resolved", "bo@example.com"),
            ("exception_waived", "cy@example.com")} <= mine
    assert any(f.kind == "exception_resolved" and f.detail.get("corrected_event_id") == corrected_id
               for f in facts)


def test_override_lets_a_failed_event_pass_on_reentry_and_bad_overrides_are_flagged(
    run: Run,
) -> None:
    order = f"OV-{run.pipeline.name}"
    with Publisher(run.bootstrap, run.pipeline.topic("events")) as publisher:
        publisher.publish(booking(order, discount_minor=110400))
    failed = outcome_of(run, order_id=order, kind="exception")
    exception_id = failed["exception_id"]
    assert failed["check_id"] == "policy.discount"
    eventually(lambda: states(run), lambda s: exception_id in s, 30, "the booking's exception")

    cli(run, "override", "--exception", exception_id, "--reason-code", "", "--actor", "ana",
        "--expires-in", "1h", expect=2)
    cli(run, "override", "--exception", exception_id, "--reason-code", "X", "--actor", "ana",
        "--expires", "2020-01-01T00:00:00Z", expect=2)
    out = cli(run, "override", "--exception", exception_id, "--reason-code", "APPROVED_OFFLINE",
              "--actor", "ana@example.com", "--expires-in", "1h", "--override-id", "OVR-T1")
    assert "OVR-T1" in out
    accepted = outcome_of(run, idempotency_key=f"{order}:override:OVR-T1")
    assert accepted["kind"] == "validated"

    # Re-drive (what `revline redrive` does): the original bytes, re-entry header.
    key, value = record_at(run.bootstrap, failed["input_topic"], failed["input_partition"],
                           failed["input_offset"])
    with Publisher(run.bootstrap, run.pipeline.topic("events")) as publisher:
        publisher.publish_raw(key.decode(), value, [(REENTRY_HEADER, exception_id.encode())])
    passed = eventually(
        lambda: [o for o in run.pipeline.outcomes() if o["final"]
                 and o["idempotency_key"] == f"{order}:booked" and o["kind"] == "validated"],
        bool, 60, "the re-driven booking")[0]
    assert passed["warnings"] == [OVERRIDE_APPLIED]
    assert "OVR-T1" in passed["reason"] and "APPROVED_OFFLINE" in passed["reason"]
    # The pipeline resolves the exception it retried, once the retry passed.
    closed = eventually(lambda: states(run),
                        lambda s: s[exception_id]["status"] == "resolved", 30,
                        "the retried exception resolved")[exception_id]
    assert (closed["closed_by"], closed["reason_code"]) == ("revline-worker", "REENTRY_VALIDATED")

    # Overrides that arrive expired or without a reason code are finance's exceptions.
    late = override_json(order, f"{order}:booked", expires=datetime.now(UTC) - timedelta(hours=1),
                         reason_code="LATE", n="OVR-T2")
    reasonless = validate_event(override_json(order, f"{order}:booked",
                                              expires=datetime.now(UTC) + timedelta(hours=1),
                                              reason_code="X", n="OVR-T3"))
    reasonless["reason_code"] = ""  # a producer that skips validation
    with Publisher(run.bootstrap, run.pipeline.topic("events")) as publisher:
        publisher.publish(late)
        publisher.publish(reasonless, validate=False)
    for n, check in (("OVR-T2", "override.expired"), ("OVR-T3", "override.reason_missing")):
        o = outcome_of(run, idempotency_key=f"{order}:override:{n}")
        assert (o["kind"], o["check_id"], o["owner"]) == ("exception", check, "finance")
        s = eventually(lambda o=o: states(run), lambda s, o=o: o["exception_id"] in s, 30,
                       f"the {check} exception")[o["exception_id"]]
        assert (s["owner"], s["status"], s["check_id"]) == ("finance", "open", check)
    flagged = cli(run, "exceptions", "list", "--check", "override.*", "--owner", "finance")
    assert "override.expired" in flagged and "override.reason_missing" in flagged

    facts = [AuditFact.decode(m.value() or b"")
             for m in read_topic(run.bootstrap, run.pipeline.topic("audit-facts"))]
    [fact] = [f for f in facts if f.kind == "override"]
    assert (fact.actor, fact.order_id, fact.detail["reason_code"]) == (
        "ana@example.com", order, "APPROVED_OFFLINE")
