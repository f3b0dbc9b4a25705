"""Turn decisions into records on the validated, exception, dead-letter and outcome topics.

Records go out through one idempotent confluent-kafka producer (about 2 µs a
``produce()``); ``flush()`` returns only when every record is acknowledged by
all in-sync replicas, and the worker writes its state and acks its inputs only
after that, so an input is never committed before its outcome is durable.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer

from processors import (
    DEAD_LETTER,
    EXCEPTION,
    HELD,
    REENTRY_HEADER,
    REPLAYED,
    VALIDATED,
    Decision,
    Rules,
)
from revline.errors import InfrastructureError
from revline.metrics import Metrics
from revline.settings import Settings
from schemas import exception_codec, outcome_codec

SOURCE_LINE_HEADER = "revline-source-line"
ERROR_HEADER_PREFIX = "revline.errors."


def _ms(value: Any) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return None


class OutputWriter:
    def __init__(self, settings: Settings, bootstrap: str, metrics: Metrics, rules: Rules) -> None:
        config = settings.producer_config(bootstrap)
        config["linger.ms"] = 2  # the batch is flushed anyway; linger only adds latency
        # Only failures need a Python callback; one per record would cost more than encoding.
        config["delivery.report.only.error"] = True
        self._producer = Producer(config)
        self._settings = settings
        self._metrics = metrics
        self._rules = rules
        self._failures: list[str] = []
        self._outcome = outcome_codec()
        self._exception = exception_codec()

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failures.append(f"{msg.topic()}: {err.str()}")

    def _produce(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]] | None = None,
                 partition: int | None = None, timestamp_ms: int = 0) -> None:
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value=value, key=key, headers=headers,  # type: ignore[arg-type]
                                           timestamp=timestamp_ms,
                                           on_delivery=self._on_delivery)
                else:
                    self._producer.produce(topic, value=value, key=key, partition=partition,
                                           on_delivery=self._on_delivery)
                return
            except BufferError:
                self._producer.poll(0.01)  # queue full: drain deliveries, then retry

    def emit(self, d: Decision) -> None:
        if d.kind == REPLAYED:
            return
        s = self._settings
        record = d.input
        if d.kind == VALIDATED:
            headers = [
                *record.headers,
                ("revline.qa.rules_version", d.rules_version.encode()),
                ("revline.qa.warnings", ",".join(d.warnings).encode()),
                ("revline.input", record.coords.encode()),
                ("revline.held", b"true" if d.held else b"false"),
            ]
            # The input's own timestamp travels on: the sink measures input -> ledger commit,
            # and a replay of the sink by --to-datetime means the inputs' time.
            self._produce(s.validated_topic, record.key, record.value, headers,
                          timestamp_ms=max(record.timestamp_ms, 0))
            if d.findings:  # P3: passes, but someone should still fix the source
                self._produce_exception(d, blocking=False)
            retried = record.header(REENTRY_HEADER)
            if retried is not None and retried.startswith(b"EX-"):
                self._resolve_retried(retried.decode(), d)
        elif d.kind == EXCEPTION:
            self._produce_exception(d, blocking=True)
        elif d.kind == DEAD_LETTER:
            error_headers = [
                ("topic", record.topic),
                ("partition", str(record.partition)),
                ("offset", str(record.offset)),
                ("stage", d.stage or ""),
                ("exception.class", d.error_class or ""),
                ("exception.message", d.reason),
                ("schema.ref", d.schema_ref or ""),
                ("rules.version", d.rules_version),
            ]
            headers = [*record.headers,
                       *((ERROR_HEADER_PREFIX + k, v.encode()) for k, v in error_headers)]
            self._produce(s.dead_letter_topic, record.key, record.value, headers)
        self._produce(s.outcomes_topic, record.key, self._outcome_record(d))

    def _resolve_retried(self, exception_id: str, d: Decision) -> None:
        """A re-driven or corrected input passed: its exception is resolved, by the pipeline.

        A lifecycle event like the CLI's; the exception manager ignores it if a person
        closed the exception first. The event id is the input's, so a repeat is one event.
        """
        event = {
            "event_id": f"reentry:{d.input.coords}",
            "type": "resolve",
            "exception_id": exception_id,
            "actor": "revline-worker",
            "at_ms": d.decided_at_ms,
            "reason_code": "REENTRY_VALIDATED",
            "note": f"re-entered as {d.input.coords} and validated "
                    f"(rules {d.rules_version})",
        }
        self._produce(self._settings.exception_events_topic, exception_id.encode(),
                      orjson.dumps(event))

    def _outcome_record(self, d: Decision) -> bytes:
        env = d.envelope
        line = d.input.header(SOURCE_LINE_HEADER)
        return self._outcome.encode({
            "input_topic": d.input.topic,
            "input_partition": d.input.partition,
            "input_offset": d.input.offset,
            "kind": d.kind,
            "final": d.kind != HELD,
            "held": d.held,
            "released_by": d.released_by,
            "waiting_for": list(d.waiting_for),
            "check_id": d.check_id,
            "severity": d.severity,
            "owner": d.owner,
            "reason": d.reason,
            "warnings": list(d.warnings),
            "exception_id": d.exception_id,
            "stage": d.stage,
            "event_type": env["event_type"] if env else None,
            "event_id": env["event_id"] if env else None,
            "idempotency_key": env["idempotency_key"] if env else None,
            "order_id": env["order_id"] if env else None,
            "source_line": line.decode() if line else None,
            "occurred_at_ms": _ms(env["occurred_at"]) if env else None,
            "decided_at_ms": d.decided_at_ms,
            "rules_version": d.rules_version,
        })

    def _produce_exception(self, d: Decision, *, blocking: bool) -> None:
        env = d.envelope
        # A blocking exception names its primary check; an advisory one its first finding.
        main = d.findings[0]
        check_id = (d.check_id or main.check_id) if blocking else main.check_id
        spec = self._rules.spec(check_id)
        value = self._exception.encode({
            "exception_id": d.exception_id or "",
            "check_id": check_id,
            "severity": spec.severity,
            "owner": spec.owner,
            "reason": d.reason if blocking else main.reason,
            "all_findings": [{"check_id": f.check_id, "reason": f.reason} for f in d.findings],
            "blocking": blocking,
            "opened_at_ms": d.decided_at_ms,
            "sla_deadline_ms": d.sla_deadline_ms
            or d.decided_at_ms + self._rules.sla_minutes[spec.severity] * 60_000,
            "rules_version": d.rules_version,
            "event_type": env["event_type"] if env else None,
            "idempotency_key": env["idempotency_key"] if env else None,
            "order_id": env["order_id"] if env else None,
            "source_system": env["source_system"] if env else None,
            "source_record_id": env["source_record_id"] if env else None,
            "input_topic": d.input.topic,
            "input_partition": d.input.partition,
            "input_offset": d.input.offset,
            "event": d.input.value,
        })
        self._produce(self._settings.exceptions_topic, d.input.key, value)

    def write_state(self, changelog: str, partition: int, key: bytes, value: bytes | None) -> None:
        """A table snapshot (or tombstone) for the changelog, in the input's partition."""
        self._produce(changelog, key, value, partition=partition)

    async def flush(self, timeout: float = 60.0) -> None:
        """Wait until every record is acknowledged; raise if any could not be delivered."""
        loop = asyncio.get_running_loop()
        remaining = await loop.run_in_executor(None, self._producer.flush, timeout)
        if self._failures or remaining:
            failures, self._failures = self._failures, []
            raise InfrastructureError(
                f"could not deliver {len(failures) + remaining} output records "
                f"(first: {failures[:1] or 'timeout'}); inputs stay uncommitted and will be "
                "processed again after restart"
            )

    def close(self) -> None:
        self._producer.flush(30)

