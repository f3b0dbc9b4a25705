"""Audit facts: what the sink, the exception manager and operators did, before chaining.

Every component that changes something records a fact here; the audit chainer
(``revline auditor``) turns facts, together with the worker's outcome records,
into the append-only, hash-chained audit trail (one chain per order). A fact
carries a deterministic ``fact_id``: a re-sent fact (a crash before the offset
commit, a replay) has the same id, and the chainer records it once.

Facts are keyed by order id, partitioned like the outcome records (the Java
murmur2 partitioner), so one chainer instance sees all of an order's facts.
Facts that belong to no order (a replay run, a re-drive run) use ``OPS_CHAIN``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Producer

from revline.core.kafka_config import producer_config
from revline.core.settings import Settings

OPS_CHAIN = "_operations"

# The vocabulary of audit entries (the chainer derives the first group from outcomes).
FROM_OUTCOMES = ("received", "duplicate", "held", "released", "validated", "exception_opened",
                 "dead_letter")
LIFECYCLE = ("exception_acknowledged", "exception_escalated", "exception_resolved",
             "exception_waived", "exception_expired")
OPERATIONS = ("override", "applied", "partial", "refused", "replay", "redrive", "reconcile")


MAX_FACT_BYTES = 256 * 1024


def _cut(value: Any) -> Any:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    if len(text) <= 2048:
        return value
    return f"{text[:2048]}… (cut: {len(text):,} characters)"


@dataclass(frozen=True)
class AuditFact:
    fact_id: str  # same fact re-sent -> same id
    kind: str  # see the vocabulary above
    actor: str  # a person ("jane@acme") or a component ("sink", "exception-manager")
    order_id: str | None = None  # the chain; None -> OPS_CHAIN
    detail: Mapping[str, Any] = field(default_factory=dict)  # JSON-able: why, refs, reason codes
    at_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def chain(self) -> str:
        return self.order_id or OPS_CHAIN

    def encode(self) -> bytes:
        record = {
            "fact_id": self.fact_id, "kind": self.kind, "actor": self.actor,
            "order_id": self.order_id, "detail": dict(self.detail), "at_ms": self.at_ms,
        }
        raw = orjson.dumps(record)
        if len(raw) > MAX_FACT_BYTES:  # must fit its topic: cut long texts, say so
            record["detail"] = {k: _cut(v) for k, v in self.detail.items()}
            raw = orjson.dumps(record)
        return raw

    @classmethod
    def decode(cls, raw: bytes) -> AuditFact:
        data = orjson.loads(raw)
        return cls(fact_id=data["fact_id"], kind=data["kind"], actor=data["actor"],
                   order_id=data.get("order_id"), detail=data.get("detail") or {},
                   at_ms=int(data["at_ms"]))


class AuditLog:
    """Sends facts to the audit-facts topic; ``flush()`` before committing what they record."""

    def __init__(self, producer: Producer, topic: str, *, track_delivery: bool = True) -> None:
        """``track_delivery=False`` leaves delivery reports to the producer's own default
        callback (a component that retries and shrinks its records itself)."""
        self._producer = producer
        self.topic = topic
        self._track = track_delivery
        self._failed: list[str] = []  # delivery errors since the last flush

    @classmethod
    def from_settings(cls, settings: Settings, bootstrap: str) -> AuditLog:
        return cls(Producer(producer_config(settings, bootstrap)), settings.audit_facts_topic)

    def record(self, fact: AuditFact) -> None:
        def delivered(err: Any, _msg: Any, fact_id: str = fact.fact_id) -> None:
            if err is not None:  # librdkafka already retried what could be retried
                self._failed.append(f"{fact_id}: {err}")

        if self._track:
            self._producer.produce(self.topic, key=fact.chain.encode(), value=fact.encode(),
                                   on_delivery=delivered)
        else:
            self._producer.produce(self.topic, key=fact.chain.encode(), value=fact.encode())
        self._producer.poll(0)

    def take_failures(self) -> list[str]:
        """Facts whose delivery failed since the last call (for callers that flush the
        shared producer themselves)."""
        failed, self._failed = self._failed, []
        return failed

    def flush(self, timeout: float = 30.0) -> None:
        from revline.core.errors import InfrastructureError

        if self._producer.flush(timeout):
            raise InfrastructureError(
                f"audit facts not acknowledged by Kafka within {timeout:.0f}s ({self.topic})"
            )
        failed = self.take_failures()
        if failed:
            raise InfrastructureError(
                f"{len(failed)} audit fact(s) not written to {self.topic}; first: {failed[0]}"
            )
