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

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from revline.core.errors import InfrastructureError
from revline.core.kafka_config import producer_config
from revline.core.settings import Settings
from revline.schemas import EncodeError, EventSerializer, EventValidationError, validate_event

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
        config = producer_config(settings, bootstrap)
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
        if not isinstance(event, Mapping):
            raise EventValidationError([f"(event): expected a JSON object, got "
                                        f"{_json_kind(event)}"])
        canonical = validate_event(dict(event)) if validate else event
        try:
            value = self.serializer(canonical)
            key = str(canonical["envelope"]["order_id"]).encode()
        except EncodeError as exc:
            raise EventValidationError([str(exc)]) from exc
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") in the order id
            raise EventValidationError([f"envelope.order_id: not valid Unicode ({exc.reason})"]
                                       ) from exc
        self._produce(key, value, headers)

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


class LineError(ValueError):
    """One input line that cannot be published; the message names the field."""


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                      type(value).__name__)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a key given twice is refused, not last-one-wins."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise LineError(f"{key}: duplicate key in one JSON object (which value is meant?)")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise LineError(f"{name} is not valid JSON (NaN and Infinity are not numbers here)")


def parse_line(line: str | bytes, number: int) -> Any:
    """One JSON line -> its value; ``LineError`` says why not (never another exception)."""
    if isinstance(line, bytes):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte order mark, as some editors write
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LineError(f"not valid UTF-8: byte {exc.start + 1} is 0x{line[exc.start]:02x}"
                            ) from None
    else:
        text = line[1:] if number == 1 and line.startswith("\ufeff") else line
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates,
                          parse_constant=_no_constant)
    except LineError:
        raise
    except json.JSONDecodeError as exc:
        raise LineError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise LineError("not accepted: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise LineError(f"not valid JSON: {exc}") from None


def _publish_raw_line(publisher: Publisher, raw: dict[str, Any], number: int,
                      headers: Headers) -> None:
    try:
        value = base64.b64decode(raw["__raw__"], validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise LineError(f"__raw__ is not base64: {exc}") from None
    key = raw.get("__key__", f"raw-line-{number}")
    if not isinstance(key, str):
        raise LineError(f"__key__: expected a string, got {_json_kind(key)}")
    try:
        key.encode()
    except UnicodeEncodeError:
        raise LineError("__key__: not valid Unicode") from None
    publisher.publish_raw(key, value, headers)


def publish_lines(
    publisher: Publisher,
    lines: Iterable[str | bytes],
    *,
    allow_raw: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PublishReport:
    """Publish JSON lines; a bad line is reported by number and field, the rest still go.

    Lines may be bytes (a file read in binary), so one line of invalid UTF-8 is one
    rejected line. Whatever a line holds, it is rejected with a reason, never raised:
    the lines around it are still published.
    """
    report = PublishReport()
    for number, line in enumerate(lines, start=1):
        if progress:
            progress(number)
        headers: Headers = [(SOURCE_LINE_HEADER, str(number).encode())]
        try:
            if not line.strip() or line.strip() in ("\ufeff", b"\xef\xbb\xbf"):
                continue  # a blank line
            raw = parse_line(line, number)
            if isinstance(raw, dict) and "__raw__" in raw:
                if not allow_raw:
                    raise LineError("raw record (__raw__) refused; pass --allow-raw to send it "
                                    "as-is")
                _publish_raw_line(publisher, raw, number, headers)
            else:
                publisher.publish(raw, headers=headers)
        except LineError as exc:
            report.rejected.append((number, str(exc)))
            continue
        except EventValidationError as exc:
            report.rejected.append((number, "; ".join(exc.problems)))
            continue
        except KafkaException as exc:  # refused by the client itself, e.g. too large
            err = exc.args[0] if exc.args else None
            why = err.str() if isinstance(err, KafkaError) else str(exc)
            report.rejected.append((number, f"not sent: {why}"))
            continue
        except RecursionError:
            report.rejected.append((number, "not accepted: nested too deeply"))
            continue
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            # A case no check above foresaw: still one rejected line, never a lost file.
            report.rejected.append((number, f"not accepted: {type(exc).__name__}: {exc}"))
            continue
        report.sent += 1
    publisher.flush()
    report.delivery_failures = publisher.delivery_failures
    return report
