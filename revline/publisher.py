"""Publish canonical events to the input topic: validate, encode, produce.

The producer is idempotent with acks=all, keyed by order id so every event of
an order lands in one partition in publish order.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from revline.errors import InfrastructureError
from revline.settings import Settings
from schemas import EncodeError, EventSerializer, EventValidationError, validate_event

SOURCE_LINE_HEADER = "revline-source-line"

Headers = list[tuple[str, str | bytes | None]]


@dataclass
class PublishReport:
    sent: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    delivery_failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected and not self.delivery_failures


class Publisher:
    """Validated, encoded, idempotent publishing for upstream services.

    >>> with Publisher("127.0.0.1:9092", "revline.events.v1") as pub:   # doctest: +SKIP
    ...     pub.publish(event_dict)
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        settings: Settings | None = None,
        serializer: EventSerializer | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        settings = settings or Settings()
        self.topic = topic
        self.serializer = serializer or EventSerializer()
        config = settings.producer_config(bootstrap)
        config.update(extra_config or {})
        self._producer = Producer(config)
        self._delivered = 0
        self._failures: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self._delivered += 1
        else:
            self._failures.append(f"{msg.key()!r}: {err.str()}")

    def _produce(self, key: bytes, value: bytes, headers: Headers | None) -> None:
        while True:
            try:
                self._producer.produce(
                    self.topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain
        self._producer.poll(0)

    def publish(
        self,
        event: Mapping[str, Any],
        *,
        headers: Headers | None = None,
        validate: bool = True,
    ) -> None:
        """Publish one event. ``validate=False`` takes an already canonical dict.

        Raises ``EventValidationError`` for a bad event (nothing is sent).
        """
        canonical = validate_event(dict(event)) if validate else event
        try:
            value = self.serializer(canonical)
        except EncodeError as exc:
            raise EventValidationError([str(exc)]) from exc
        self._produce(canonical["envelope"]["order_id"].encode(), value, headers)

    def publish_raw(self, key: str, value: bytes, headers: Headers | None = None) -> None:
        """Send bytes as they are (for replays and for testing the dead-letter path)."""
        self._produce(key.encode(), value, headers)

    def flush(self, timeout: float = 60.0) -> int:
        """Wait for every delivery; returns how many were delivered in total."""
        remaining = self._producer.flush(timeout)
        if remaining:
            raise InfrastructureError(
                f"{remaining} events still undelivered after {timeout:.0f}s: is the broker up?"
            )
        return self._delivered

    @property
    def delivery_failures(self) -> list[str]:
        return list(self._failures)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def publish_records(publisher: Publisher, records: Iterable[Any],
                    progress: Callable[[int], None] | None = None) -> int:
    """Publish generated workload records (events or poison bytes) with their source line."""
    count = 0
    for count, rec in enumerate(records, start=1):
        headers: Headers = [(SOURCE_LINE_HEADER, str(rec.seq).encode())]
        if rec.event is not None:
            publisher.publish(rec.event, headers=headers, validate=False)
        else:
            publisher.publish_raw(rec.key, rec.raw, headers)
        if progress and count % 500 == 0:
            progress(count)
    return count


def publish_lines(
    publisher: Publisher,
    lines: Iterable[str],
    *,
    allow_raw: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PublishReport:
    """Publish JSON lines; a bad line is reported by number and field, the rest still go."""
    report = PublishReport()
    for number, line in enumerate(lines, start=1):
        if progress:
            progress(number)
        text = line.strip()
        if not text:
            continue
        headers: Headers = [(SOURCE_LINE_HEADER, str(number).encode())]
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            report.rejected.append((number, f"not valid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if isinstance(raw, dict) and "__raw__" in raw:
            if not allow_raw:
                report.rejected.append(
                    (number, "raw record (__raw__) refused; pass --allow-raw to send it as-is")
                )
                continue
            try:
                value = base64.b64decode(raw["__raw__"], validate=True)
            except (binascii.Error, TypeError) as exc:
                report.rejected.append((number, f"__raw__ is not base64: {exc}"))
                continue
            publisher.publish_raw(str(raw.get("__key__", f"raw-line-{number}")), value, headers)
            report.sent += 1
            continue
        try:
            publisher.publish(raw, headers=headers)
        except EventValidationError as exc:
            report.rejected.append((number, "; ".join(exc.problems)))
            continue
        report.sent += 1
    publisher.flush()
    report.delivery_failures = publisher.delivery_failures
    return report
