"""Turn decisions into records on the validated, exception, dead-letter and outcome topics.

Records go out through one idempotent confluent-kafka producer (about 2 µs a
``produce()``); ``flush()`` returns only when every record is acknowledged by
all in-sync replicas, and the worker writes its state and acks its inputs only
after that, so an input is never committed before its outcome is durable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from revline.core.errors import InfrastructureError
from revline.core.kafka_config import producer_config
from revline.core.metrics import Metrics
from revline.core.settings import Settings
from revline.core.startup import TRANSIENT_CODES
from revline.processors import (
    DEAD_LETTER,
    EXCEPTION,
    HELD,
    REENTRY_HEADER,
    REPLAYED,
    VALIDATED,
    Decision,
    Rules,
)
from revline.schemas import exception_codec, outcome_codec

SOURCE_LINE_HEADER = "revline-source-line"
ERROR_HEADER_PREFIX = "revline.errors."
TRUNCATED_HEADER = "revline.truncated"
# A record whose Kafka value is null (a tombstone) is dead-lettered as null, with this class.
NULL_VALUE_CLASS = "NullValue"

log = logging.getLogger("revline.worker.outputs")

# Too large for the client (message.max.bytes) or for the topic (the broker's
# RECORD_TOO_LARGE / MESSAGE_TOO_LARGE, which librdkafka reports as MSG_SIZE_TOO_LARGE).
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
# Retriable whatever librdkafka's retriable() says: the transient broker states start-up
# waits out too (one list, revline.startup), and a full local queue.
RETRIABLE = TRANSIENT_CODES | {KafkaError._QUEUE_FULL}
MAX_ATTEMPTS = 6  # per record, for retriable errors; then the batch fails (crash-only)
MAX_TEXT = 2048  # characters of any one text kept in a shrunk record
MAX_KEY = 1024  # bytes of a key kept in a shrunk record


@dataclass(frozen=True)
class Failed:
    """A record the producer could not deliver, with what is needed to send it again."""

    error: KafkaError
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    partition: int | None  # explicit partition (changelog), or None: by key
    timestamp_ms: int = 0
    attempt: int = 0
    shrunk: bool = False  # already the shrunk (or pointer) form
    fallback: bool = False  # a pointer to the dead letter topic: the last resort
    local: bool = False  # refused by the client before sending (not by the broker)

    @property
    def size(self) -> int:
        return (len(self.key or b"") + len(self.value or b"")
                + sum(len(k) + len(v or b"") for k, v in self.headers or ()))


def _text(value: Any, limit: int = MAX_TEXT) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}… ({len(value) - limit:,} more characters dropped)"
    return value


def _short_key(key: bytes | None) -> bytes | None:
    if key is None or len(key) <= MAX_KEY:
        return key
    return key[:MAX_KEY - 20] + b"~" + hashlib.sha256(key).hexdigest()[:19].encode()


def _header_text(value: bytes | None, limit: int = MAX_TEXT) -> bytes:
    if value is None:
        return b""
    if len(value) <= limit:
        return value
    return value[:limit] + f"… ({len(value) - limit:,} more bytes dropped)".encode()


def _ms(value: Any) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return None


class OutputWriter:
    def __init__(self, settings: Settings, bootstrap: str, metrics: Metrics, rules: Rules) -> None:
        config = producer_config(settings, bootstrap, component="worker")
        config["linger.ms"] = 2  # the batch is flushed anyway; linger only adds latency
        # Only failures need a Python callback; one per record would cost more than encoding.
        config["delivery.report.only.error"] = True
        self._producer = Producer(config)
        self._settings = settings
        self._metrics = metrics
        self._rules = rules
        self._failed: list[Failed] = []
        self._outcome = outcome_codec()
        self._exception = exception_codec()
        self.recovered = 0  # records retried, shrunk or re-routed (tests, logs)

    def _on_delivery(self, headers: list[tuple[str, bytes]] | None, timestamp_ms: int,
                     attempt: int, partition: int | None, shrunk: bool, fallback: bool,
                     err: KafkaError | None, msg: Message) -> None:
        # Headers travel with the callback: a delivery report does not carry them.
        if err is not None:
            self._failed.append(Failed(
                err, msg.topic() or "", msg.key(), msg.value(), headers, partition,
                timestamp_ms, attempt, shrunk, fallback))

    def _produce(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]] | None = None,
                 partition: int | None = None, timestamp_ms: int = 0, *, attempt: int = 0,
                 shrunk: bool = False, fallback: bool = False) -> None:
        callback = partial(self._on_delivery, headers, timestamp_ms, attempt, partition, shrunk,
                           fallback)
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value=value, key=key, headers=headers,  # type: ignore[arg-type]
                                           timestamp=timestamp_ms, on_delivery=callback)
                else:
                    self._producer.produce(topic, value=value, key=key, partition=partition,
                                           headers=headers, on_delivery=callback)  # type: ignore[arg-type]
                return
            except BufferError:
                self._producer.poll(0.01)  # queue full: drain deliveries, then retry
            except KafkaException as exc:  # refused before sending, e.g. above message.max.bytes
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else \
                    KafkaError(KafkaError._FAIL, str(exc))
                self._failed.append(Failed(err, topic, key, value, headers, partition,
                                           timestamp_ms, attempt, shrunk, fallback, local=True))
                return

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
                       *((ERROR_HEADER_PREFIX + k, v.encode(errors="replace"))
                         for k, v in error_headers)]
            value = None if d.error_class == NULL_VALUE_CLASS else record.value
            self._produce(s.dead_letter_topic, record.key, value, headers)
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
        """Wait until every record is acknowledged, or recovered; raise only when Kafka is.

        No record can stop a partition: a record refused for its own sake is retried
        (retriable errors), shrunk (too large: the envelope, the error and a pointer to
        the input stay, the oversized copy goes) or dead-lettered with the reason (any
        other permanent error). Only an outage or a producer that cannot go on raises,
        and then nothing of the batch is committed: a restart redoes it.
        """
        loop = asyncio.get_running_loop()
        remaining = await loop.run_in_executor(None, self._producer.flush, timeout)
        if remaining:
            self._failed.clear()
            raise InfrastructureError(
                f"{remaining} output records not acknowledged within {timeout:.0f}s; inputs "
                "stay uncommitted and will be processed again after restart")
        if self._failed:
            await loop.run_in_executor(None, self.recover, timeout)

    def recover(self, timeout: float = 60.0) -> None:
        """Handle every failed record, one at a time (a record alone in its batch: a small
        record refused only because its batch was too large for the topic then passes)."""
        while self._failed:
            failed, self._failed = self._failed, []
            for f in failed:
                self._recover_one(f)
                if self._producer.flush(timeout):
                    raise InfrastructureError(
                        f"a recovered record for {f.topic} was not acknowledged within "
                        f"{timeout:.0f}s; inputs stay uncommitted and will be processed again")

    def _recover_one(self, f: Failed) -> None:
        err = f.error
        code = err.code()
        self.recovered += 1
        if err.fatal():
            raise InfrastructureError(f"the producer hit a fatal error ({err.str()}) writing to "
                                      f"{f.topic}; restarting redoes the batch")
        if code in TOO_LARGE:
            if f.attempt == 0 and not f.shrunk and not f.local:
                # The broker refused the batch; the record alone may fit: try it alone once.
                self._again(f)
            elif not f.fallback:
                log.warning("record for %s too large (%d bytes: %s); writing it shrunk",
                            f.topic, f.size, err.str())
                self._shrink(f)
            else:
                raise InfrastructureError(
                    f"even a shrunk dead letter does not fit {f.topic} ({err.str()}); check the "
                    "topic's max.message.bytes")
        elif err.retriable() or code in RETRIABLE:
            if f.attempt + 1 >= MAX_ATTEMPTS:
                raise InfrastructureError(
                    f"could not write to {f.topic} after {MAX_ATTEMPTS} attempts ({err.str()}); "
                    "inputs stay uncommitted and will be processed again after restart")
            time.sleep(min(2.0, 0.1 * 2 ** f.attempt))
            self._again(f)
        elif f.fallback:
            raise InfrastructureError(
                f"the dead letter topic {f.topic} refuses records ({err.str()}); inputs stay "
                "uncommitted and will be processed again after restart")
        else:
            log.warning("record for %s refused (%s); dead-lettering a pointer to its input",
                        f.topic, err.str())
            self._pointer_dead_letter(f, f"could not write to {f.topic}: {err.str()}")

    def _again(self, f: Failed) -> None:
        self._produce(f.topic, f.key, f.value, f.headers, f.partition, f.timestamp_ms,
                      attempt=f.attempt + 1, shrunk=f.shrunk, fallback=f.fallback)

    # -- shrinking ---------------------------------------------------------------------
    def _shrink(self, f: Failed) -> None:
        s = self._settings
        why = f"{f.error.str()}: the record of {f.size:,} bytes does not fit {f.topic}"
        note = [(TRUNCATED_HEADER, _header_text(why.encode()))]
        if f.topic == s.dead_letter_topic and not f.shrunk:
            # Keep the error headers (the reason and the input's coordinates); drop the copy.
            kept = [(k, _header_text(v)) for k, v in f.headers or ()
                    if k.startswith(ERROR_HEADER_PREFIX) or k == SOURCE_LINE_HEADER]
            self._produce(f.topic, _short_key(f.key), None, [*kept, *note], None,
                          f.timestamp_ms, shrunk=True)
        elif f.topic == s.exceptions_topic and not f.shrunk and f.value:
            record = self._exception.decode(f.value)
            record.update({k: _text(v) for k, v in record.items() if isinstance(v, str)})
            record["all_findings"] = [{"check_id": _text(x["check_id"], 200),
                                       "reason": _text(x["reason"], 500)}
                                      for x in record["all_findings"][:20]]
            record["event"] = b""  # the input is at input_topic/partition/offset
            self._produce(f.topic, _short_key(f.key), self._exception.encode(record),
                          [*(f.headers or ()), *note], f.partition, f.timestamp_ms, shrunk=True)
        elif f.topic == s.outcomes_topic and not f.shrunk and f.value:
            record = self._outcome.decode(f.value)
            record.update({k: _text(v) for k, v in record.items() if isinstance(v, str)})
            for name in ("waiting_for", "warnings"):
                record[name] = [_text(x, 200) for x in record.get(name) or []][:20]
            self._produce(f.topic, _short_key(f.key), self._outcome.encode(record),
                          [*(f.headers or ()), *note], f.partition, f.timestamp_ms, shrunk=True)
        else:
            # Validated records, lifecycle events, state: no smaller form is still the
            # record, so a pointer to the input goes to the dead letter topic instead.
            self._pointer_dead_letter(f, why)

    def _pointer(self, f: Failed) -> tuple[str, str, str]:
        """(topic, partition, offset) of the input a failed output record came from."""
        headers = dict(f.headers or ())
        coords = headers.get("revline.input")
        if coords:
            topic, _, rest = coords.decode(errors="replace").rpartition("/")
            topic, _, partition = topic.rpartition("/")
            return topic, partition, rest
        prefix = ERROR_HEADER_PREFIX
        if prefix + "offset" in headers:
            return tuple(headers.get(prefix + k, b"").decode(errors="replace")  # type: ignore[return-value]
                         for k in ("topic", "partition", "offset"))
        codec = (self._exception if f.topic == self._settings.exceptions_topic else
                 self._outcome if f.topic == self._settings.outcomes_topic else None)
        if codec is not None and f.value:
            try:
                record = codec.decode(f.value)
                return (str(record["input_topic"]), str(record["input_partition"]),
                        str(record["input_offset"]))
            except Exception:
                pass
        return f.topic, "" if f.partition is None else str(f.partition), ""

    def _pointer_dead_letter(self, f: Failed, why: str) -> None:
        topic, partition, offset = self._pointer(f)
        error_headers = [
            ("topic", topic), ("partition", partition), ("offset", offset),
            ("stage", "output"),
            ("exception.class", f.error.name() or "KafkaError"),
            ("exception.message", why),
            ("output.topic", f.topic),
            ("output.size", str(f.size)),
        ]
        headers = [(ERROR_HEADER_PREFIX + k, _header_text(v.encode(errors="replace")))
                   for k, v in error_headers]
        self._produce(self._settings.dead_letter_topic, _short_key(f.key), None, headers, None,
                      f.timestamp_ms, shrunk=True, fallback=True)

    def close(self) -> None:
        self._producer.flush(30)

