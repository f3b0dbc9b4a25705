"""The exception manager's handlers with an injected clock (no broker: records stay queued)."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
from confluent_kafka import Producer
from prometheus_client import generate_latest

from revline.core.metrics import ExceptionMetrics
from revline.core.settings import Settings
from revline.processors.exception_lifecycle import ACK, lifecycle_event
from revline.processors.ownership import Ownership
from revline.schemas import EventSerializer, exception_codec, validate_event
from revline.streams.exceptions import ExceptionManager

T0 = 1_790_000_000_000
OWNERSHIP = Ownership.from_mapping({
    "version": "unit", "sla_minutes": {"P1": 1, "P2": 10},
    "backup_owners": {"revenue_ops": "finance", "finance": "revenue_ops",
                      "integrations": "revenue_ops"},
    "rules": [{"name": "big", "match": {"min_amount_minor": 100_000}, "owner": "finance"}],
})
BOOKING = validate_event({
    "envelope": {"event_type": "order_booked", "idempotency_key": "SO-1:booked",
                 "order_id": "SO-1", "sequence": 1, "occurred_at": "2026-11-24T09:00:00Z",
                 "source_system": "salesforce", "source_record_id": "006"},
    "booking_kind": "DEAL_CLOSED", "customer_id": "C", "currency": "EUR",
    "lines": [{"line_id": "L1", "sku": "SKU-X", "quantity": 1, "unit_price_minor": 200_000}],
    "tax_minor": 0, "total_minor": 200_000,
})


def record(exception_id: str, severity: str = "P1") -> bytes:
    return exception_codec().encode({
        "exception_id": exception_id, "check_id": "completeness.sku", "severity": severity,
        "owner": "revenue_ops", "reason": "SKU-X unknown",
        "all_findings": [{"check_id": "completeness.sku", "reason": "SKU-X unknown"}],
        "blocking": True, "opened_at_ms": T0, "sla_deadline_ms": T0 + 1, "rules_version": "r",
        "event_type": "order_booked", "idempotency_key": "SO-1:booked", "order_id": "SO-1",
        "source_system": "salesforce", "source_record_id": "006", "input_topic": "in",
        "input_partition": 0, "input_offset": 7, "event": EventSerializer()(BOOKING),
    })


def manager() -> tuple[ExceptionManager, ExceptionMetrics]:
    metrics = ExceptionMetrics()
    settings = Settings(_env_file=None, kafka_bootstrap_servers="127.0.0.1:1")  # type: ignore[call-arg]
    # Nothing listens there: produced records just queue (and are never flushed).
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    return ExceptionManager(settings, "127.0.0.1:1", OWNERSHIP, metrics, clock=lambda: T0,
                            producer=producer), metrics


def sample(metrics: ExceptionMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_records_open_once_with_amount_based_owner_then_escalate_once() -> None:
    m, metrics = manager()
    m.on_exception_record(record("EX-1"))
    m.on_exception_record(record("EX-1"))  # a replay re-sends the same id: no-op
    m.on_exception_record(record("EX-2", severity="P2"))
    m.on_exception_record(b"not avro")  # logged and skipped
    s = m.states["EX-1"]
    assert (s["owner"], s["backup_owner"], s["amount_minor"], s["currency"]) == (
        "finance", "revenue_ops", 200_000, "EUR")
    assert s["ownership_rule"] == "big" and s["sla_deadline_ms"] == T0 + 60_000
    assert sample(metrics, "revline_exception_transitions_total", status="open") == 2

    assert m.tick(T0 + 59_999) == []
    [change] = m.tick(T0 + 60_000)  # only the P1 is due
    assert change.transition == "escalated" and change.state["exception_id"] == "EX-1"
    assert m.tick(T0 + 120_000) == []  # once
    assert sample(metrics, "revline_sla_breaches_total", owner="finance", severity="P1") == 1
    assert sample(metrics, "revline_escalations_total", owner="revenue_ops") == 1
    assert sample(metrics, "revline_exceptions_open", owner="finance", severity="P1") == 1
    assert sample(metrics, "revline_exception_oldest_age_seconds", owner="finance",
                  severity="P1") == 120
    # Our own escalated event seen again on the topic changes nothing.
    echo = lifecycle_event("escalated", "EX-1", actor="exception-manager", at_ms=T0 + 60_000,
                           event_id="EX-1:escalated", to="revenue_ops")
    m.on_lifecycle_event(orjson.dumps(echo))
    assert sample(metrics, "revline_escalations_total", owner="revenue_ops") == 1
    assert b"revline_exceptions_open" in generate_latest(metrics.registry)


def test_commands_apply_and_bad_ones_are_skipped() -> None:
    m, metrics = manager()
    m.on_exception_record(record("EX-3", severity="P2"))
    m.on_lifecycle_event(orjson.dumps(lifecycle_event(ACK, "EX-3", actor="ana", at_ms=T0 + 5)))
    m.on_lifecycle_event(orjson.dumps(lifecycle_event(ACK, "EX-3", actor="bo", at_ms=T0 + 6)))
    m.on_lifecycle_event(orjson.dumps(lifecycle_event(ACK, "EX-404", actor="x", at_ms=T0)))
    m.on_lifecycle_event(b"{not json")
    bad: dict[str, Any] = lifecycle_event("resolve", "EX-3", actor="ana", at_ms=T0 + 7)
    m.on_lifecycle_event(orjson.dumps(bad))  # no reason code
    s = m.states["EX-3"]
    assert (s["status"], s["acknowledged_by"]) == ("acknowledged", "ana")
    assert sample(metrics, "revline_exception_transitions_total", status="acknowledged") == 1
    assert m.tick(T0 + 3_600_000) == []  # acknowledged: no breach


class _DeadOnce:
    """A consumer whose first consume() reports the consumer dead (librdkafka's _FATAL,
    e.g. a static member fenced by its own rejoin after its coordinator moved)."""

    made: ClassVar[list[_DeadOnce]] = []
    fail_every: ClassVar[bool] = False
    stop: ClassVar[Any] = None

    def __init__(self, _config: dict[str, Any]) -> None:
        self.consumes = 0
        self.closed = False
        _DeadOnce.made.append(self)

    def subscribe(self, _topics: list[str]) -> None:
        pass

    def consume(self, _n: int, _timeout: float) -> list[Any]:
        self.consumes += 1
        if self.consumes == 1 and (len(_DeadOnce.made) == 1 or _DeadOnce.fail_every):
            from confluent_kafka import KafkaError

            class Dead:
                def error(self) -> KafkaError:
                    return KafkaError(KafkaError._FATAL, "Static consumer fenced", fatal=True)
            return [Dead()]
        if self.consumes >= 3:
            _DeadOnce.stop.set()
        return []

    def commit(self, **_kwargs: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _run_with_dead_consumers(monkeypatch: Any, fail_every: bool) -> list[_DeadOnce]:
    import threading

    import revline.streams.exceptions as module

    _DeadOnce.made, _DeadOnce.fail_every = [], fail_every
    _DeadOnce.stop = threading.Event()
    monkeypatch.setattr(module, "Consumer", _DeadOnce)
    monkeypatch.setattr(module, "_refuse_second_manager", lambda *_a, **_k: None)
    monkeypatch.setattr(module, "_caught_up", lambda _consumer: True)
    m, _ = manager()
    monkeypatch.setattr(m, "rebuild", lambda: 0)
    try:
        m.run(_DeadOnce.stop)
    finally:
        m.watchdog.stop()
    return _DeadOnce.made


def test_a_dead_consumer_is_replaced_in_place_not_an_exit(monkeypatch: Any) -> None:
    made = _run_with_dead_consumers(monkeypatch, fail_every=False)
    assert len(made) == 2 and made[0].closed and made[1].closed  # replaced, then stopped
    assert made[1].consumes >= 3


def test_a_consumer_dead_again_within_a_minute_stops_the_manager(monkeypatch: Any) -> None:
    import pytest

    from revline.core.errors import InfrastructureError

    with pytest.raises(InfrastructureError, match="another process may run as"):
        _run_with_dead_consumers(monkeypatch, fail_every=True)
