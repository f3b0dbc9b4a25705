"""The decision engine: decode → deduplicate → hold → QA → route, one input at a time.

Pure: no Kafka, no Faust. The stream layer hands it an ``InputRecord`` and the
order's ``OrderState``; it returns ``Decision``s and mutates the state. The
same input against the same state always yields the same decisions, which is
what makes replays safe:

* the first occurrence of an idempotency key is remembered with its input
  coordinates, so a redelivered input (same coordinates) is recognised as a
  replay and changes nothing, while a re-sent copy (other coordinates) is a
  duplicate, or a conflicting duplicate when its body differs;
* an event whose dependencies have not arrived is held in the order state and
  judged when the last one arrives, lowest sequence first;
* an event whose dependency ended in an exception is itself blocked.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from revline.processors.checks import CheckContext, Finding, primary, run_checks, waivable
from revline.processors.order_state import OrderState, depends_on, provides
from revline.processors.reference import ReferenceData, Rules
from revline.schemas import DecodeError, EventDeserializer, structural_error

# Decision kinds. "held" is interim (the final decision follows at release or
# timeout); "replayed" means the input was already decided and emits nothing.
VALIDATED = "validated"
DUPLICATE = "duplicate"
EXCEPTION = "exception"
DEAD_LETTER = "dead_letter"
HELD = "held"
REPLAYED = "replayed"
FINAL_KINDS = (VALIDATED, DUPLICATE, EXCEPTION, DEAD_LETTER)

# The warning a validated decision carries when an active manual override dropped one of
# its findings (its reason names the override, check, reason code and actor).
OVERRIDE_APPLIED = "override.applied"

# Headers set by re-drive and by a resolution carrying a corrected event. An input
# with REENTRY_HEADER whose idempotency key ended in an exception is judged again
# (it is a second attempt, not a duplicate). REDRIVE_COUNT_HEADER counts re-drives
# of one record; the loop guard quarantines it after ``redrive_max``.
REENTRY_HEADER = "revline.reentry"  # value: the exception id being retried or corrected
REDRIVE_COUNT_HEADER = "revline.redrive.count"  # value: ASCII integer

# Held events live inside the order's state, one changelog record per order, which the
# broker caps (1 MB by default). An order may hold at most this many bytes of held
# records (as stored, base64); one more is an exception instead of a state write that
# can never be made durable.
HELD_BYTES_PER_ORDER = 384 * 1024


@dataclass(slots=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0

    @property
    def coords(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(slots=True)  # not frozen: frozen dataclasses cost ~2x to build, per event
class Decision:
    input: InputRecord
    kind: str
    event: Mapping[str, Any] | None = None
    check_id: str | None = None
    severity: str | None = None
    owner: str | None = None
    reason: str = ""
    findings: tuple[Finding, ...] = ()
    warnings: tuple[str, ...] = ()
    held: bool = False
    released_by: str | None = None
    waiting_for: tuple[str, ...] = ()
    exception_id: str | None = None
    decided_at_ms: int = 0
    sla_deadline_ms: int | None = None
    rules_version: str = ""
    stage: str | None = None  # dead letters: decode | schema | structure
    error_class: str | None = None
    schema_ref: str | None = None

    @property
    def envelope(self) -> Mapping[str, Any] | None:
        return self.event["envelope"] if self.event is not None else None


def body_hash(value: bytes) -> str:
    """Hash of a framed Avro event without its framing and its event_id.

    ``event_id`` is the first field of the envelope, itself the first field of
    every event record, so it is the first string of the body: skip it and the
    rest is the business content. A re-sent webhook (new event_id) hashes equal.
    """
    pos = 10 if value[:2] == b"\xc3\x01" else 5
    if pos < len(value) and value[pos] < 0x80:  # a length under 64: one byte
        raw = value[pos]
        start = pos + 1 + ((raw >> 1) ^ -(raw & 1))
        return hashlib.blake2b(value[start:], digest_size=16).hexdigest()
    shift = raw = 0
    while pos < len(value):
        byte = value[pos]
        pos += 1
        raw |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    length = (raw >> 1) ^ -(raw & 1)
    return hashlib.blake2b(value[pos + length :], digest_size=16).hexdigest()


def exception_id_for(coords: str) -> str:
    return "EX-" + hashlib.blake2b(coords.encode(), digest_size=8).hexdigest()


def _stored_size(record: InputRecord) -> int:
    """What holding ``record`` adds to the order's state (base64 of value and headers)."""
    raw = len(record.value) + sum(len(k) + len(v) for k, v in record.headers)
    return (raw + 2) // 3 * 4 + 256


def _held_bytes(state: OrderState) -> int:
    return sum(len(h["value"]) + 256 for h in state.held)


@dataclass
class Engine:
    rules: Rules
    reference: Callable[[], ReferenceData]
    deserializer: EventDeserializer = field(default_factory=EventDeserializer)

    # -- decode ------------------------------------------------------------------------
    def decode(
        self, record: InputRecord, now_ms: int
    ) -> tuple[dict[str, Any] | None, Decision | None]:
        """The event, or a dead-letter decision saying why there is none."""
        try:
            event, ids_clean = self.deserializer.decode_plain(record.value)
        except DecodeError as exc:
            return None, self._dead_letter(record, exc.stage, type(exc).__name__, str(exc),
                                           exc.schema_ref, now_ms)
        problem = structural_error(event, ids_clean=ids_clean)
        if (problem is not None and event["envelope"]["event_type"] == "manual_override"
                and not event["reason_code"].strip()):
            # A reasonless override is flagged to its owner (override.reason_missing, an
            # exception) rather than dead-lettered: it is a human decision missing its why.
            problem = structural_error({**event, "reason_code": "-"})
        if problem is None and record.key != event["envelope"]["order_id"].encode():
            problem = (
                f"record key {record.key!r} is not envelope.order_id "
                f"{event['envelope']['order_id']!r}: the order's events would be split "
                "across partitions"
            )
        if problem is not None:
            return None, self._dead_letter(record, "structure", "StructuralError", problem,
                                           None, now_ms)
        return event, None

    def _dead_letter(self, record: InputRecord, stage: str, error_class: str, message: str,
                     schema_ref: str | None, now_ms: int) -> Decision:
        return Decision(
            input=record, kind=DEAD_LETTER, reason=message, stage=stage,
            error_class=error_class, schema_ref=schema_ref or None, decided_at_ms=now_ms,
            rules_version=self.rules.version,
        )

    # -- one input ---------------------------------------------------------------------
    def process(self, state: OrderState, record: InputRecord, event: Mapping[str, Any],
                now_ms: int, *, digest: str | None = None) -> list[Decision]:
        """``digest``: ``body_hash(record.value)`` when the caller has it already (a
        backtest judges one record with two engines)."""
        env = event["envelope"]
        key = env["idempotency_key"]
        if digest is None:
            digest = body_hash(record.value)
        data = state.data
        if now_ms > data["last_seen_ms"]:
            data["last_seen_ms"] = now_ms
        first = state.seen(key)
        coords = record.coords
        if first is not None and coords in first.get("prev", ()):
            return [Decision(input=record, kind=REPLAYED, event=event)]
        if (first is not None and first["k"] == EXCEPTION and first["c"] != coords
                and record.header(REENTRY_HEADER) is not None):
            # A re-drive or a correction: judge it again. Earlier attempts' coordinates
            # are kept so replaying them is still recognised as a replay.
            prev = [*first.get("prev", ()), first["c"]]
            first = None
        else:
            prev = []
        if first is not None:
            if first["c"] == coords:
                return [Decision(input=record, kind=REPLAYED, event=event)]
            if first["h"] == digest:
                return [Decision(input=record, kind=DUPLICATE, event=event, decided_at_ms=now_ms,
                                 rules_version=self.rules.version,
                                 reason=f"same fact as input {first['c']}")]
            return [self._exception(
                record, event, [Finding(
                    "dedup.conflict",
                    f"idempotency key {key!r} was first seen at {first['c']} with a different "
                    "body; this copy is not applied",
                )], now_ms, held=False, released_by=None)]

        memo: dict[str, Any] = {"c": coords, "h": digest, "k": HELD}
        if prev:
            memo["prev"] = prev
        state.remember(key, memo)
        needs = depends_on(event)
        waiting = state.missing(needs)
        if waiting and _held_bytes(state) + _stored_size(record) > HELD_BYTES_PER_ORDER:
            decision = self._exception(record, event, [Finding(
                "hold.oversized",
                f"waits for {', '.join(waiting)}, but its {len(record.value):,} bytes would "
                f"take the order's held records past {HELD_BYTES_PER_ORDER:,} bytes; re-send "
                "it once what it depends on has arrived",
            )], now_ms, held=False, released_by=None)
            memo.update(k=EXCEPTION, chk="hold.oversized", w=[])
            token = provides(event)
            if token is not None and not state.token(token):
                state.settle(token, ok=False)
            return [decision]
        if waiting:
            state.held.append({
                "key": key,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "record_key": base64.b64encode(record.key or b"").decode(),
                "value": base64.b64encode(record.value).decode(),
                "headers": [[k, base64.b64encode(v).decode()] for k, v in record.headers],
                "timestamp_ms": record.timestamp_ms,
                "sequence": env["sequence"],
                "event_type": env["event_type"],
                "waiting_for": waiting,
                "since_ms": now_ms,
            })
            return [Decision(input=record, kind=HELD, event=event, held=True,
                             waiting_for=tuple(waiting), decided_at_ms=now_ms,
                             rules_version=self.rules.version)]
        decisions = [self._judge(state, record, event, memo, now_ms, held=False, released_by=None,
                                 needs=needs)]
        if state.held:  # nothing held: nothing to release
            decisions.extend(self._release(state, coords, now_ms))
        return decisions

    def _judge(self, state: OrderState, record: InputRecord, event: Mapping[str, Any],
               memo: dict[str, Any], now_ms: int, *, held: bool,
               released_by: str | None, needs: list[str] | None = None) -> Decision:
        # Override expiry is judged against the record's own timestamp, not the clock: a
        # redelivery after a crash must be decided exactly as before.
        record_ms = record.timestamp_ms if record.timestamp_ms > 0 else now_ms
        overrides = state.overrides_for(event["envelope"]["idempotency_key"], record_ms)
        if overrides:  # state written before a check became non-waivable may still name it
            overrides = {c: o for c, o in overrides.items() if waivable(c)} or None
        used: list[str] = []
        if needs is None:
            needs = depends_on(event)
        blocked = state.failed(needs) if needs else None
        if blocked:
            findings = [Finding(
                "dependency.blocked",
                f"depends on {', '.join(blocked)}, which ended in an exception; fix that first",
            )]
        else:
            try:
                findings = run_checks(event, state,
                                      CheckContext(self.reference(), self.rules, record_ms),
                                      overrides or ())
            except Exception as exc:  # a check bug must not become a crash loop
                findings = [Finding(
                    "qa.internal_error",
                    f"a QA check failed on this record ({type(exc).__name__}: {exc}); "
                    "the record is kept for re-drive once the check is fixed",
                )]
            else:
                if overrides:  # a person decided these checks may not stop this event
                    used = sorted({f.check_id for f in findings if f.check_id in overrides})
                    findings = [f for f in findings if f.check_id not in overrides]
        rules = self.rules
        # Most inputs pass with no finding: no comprehension (a frame each) for them.
        if findings and any(rules.spec(f.check_id).severity != "P3" for f in findings):
            decision = self._exception(record, event, findings, now_ms, held=held,
                                       released_by=released_by)
            # A refused second copy of a reference (another invoice INV-1, a second
            # booking) must not undo the accepted first one its dependents rely on.
            token = provides(event)
            if token is not None and not state.token(token):
                state.settle(token, ok=False)
        else:
            warnings = tuple([f.check_id for f in findings]) if findings else ()
            reason = ""
            if used:
                assert overrides is not None
                warnings += (OVERRIDE_APPLIED,)
                reason = "passed by override: " + "; ".join(
                    f"{c} ({overrides[c]['id']}, {overrides[c]['rc']} by {overrides[c]['by']})"
                    for c in used
                )
            decision = Decision(
                input=record, kind=VALIDATED, event=event, held=held, released_by=released_by,
                findings=tuple(findings), warnings=warnings, reason=reason,
                exception_id=exception_id_for(record.coords) if findings else None,
                decided_at_ms=now_ms, rules_version=rules.version,
            )
            state.apply(event)
            state.settle(provides(event), ok=True)
        memo["k"] = decision.kind  # as memo.update(k=, chk=, w=) did, key order included
        memo["chk"] = decision.check_id
        memo["w"] = list(decision.warnings)
        if released_by:
            memo["rb"] = released_by
        return decision

    def _exception(self, record: InputRecord, event: Mapping[str, Any] | None,
                   findings: list[Finding], now_ms: int, *, held: bool,
                   released_by: str | None) -> Decision:
        main = primary(findings, self.rules)
        spec = self.rules.spec(main.check_id)
        return Decision(
            input=record, kind=EXCEPTION, event=event, check_id=main.check_id,
            severity=spec.severity, owner=spec.owner, reason=main.reason,
            findings=tuple(findings),
            warnings=tuple(f.check_id for f in findings if f is not main),
            held=held, released_by=released_by, exception_id=exception_id_for(record.coords),
            decided_at_ms=now_ms,
            sla_deadline_ms=now_ms + self.rules.sla_minutes[spec.severity] * 60_000,
            rules_version=self.rules.version,
        )

    # -- releases and timeouts ---------------------------------------------------------
    def _restore(self, entry: Mapping[str, Any]) -> tuple[InputRecord, dict[str, Any]]:
        record = InputRecord(
            topic=entry["topic"], partition=entry["partition"], offset=entry["offset"],
            key=base64.b64decode(entry["record_key"]),
            value=base64.b64decode(entry["value"]),
            headers=tuple((k, base64.b64decode(v)) for k, v in entry["headers"]),
            timestamp_ms=entry["timestamp_ms"],
        )
        return record, self.deserializer.decode(record.value)

    def _release(self, state: OrderState, trigger: str, now_ms: int) -> list[Decision]:
        out = []
        for entry in state.iter_ready():
            record, event = self._restore(entry)
            memo = state.seen(entry["key"])
            assert memo is not None
            out.append(self._judge(state, record, event, memo, now_ms, held=True,
                                   released_by=trigger))
        return out

    def expire_holds(self, state: OrderState, now_ms: int,
                     held_since_ms: int | None = None) -> list[Decision]:
        """Holds older than the timeout become exceptions; their dependents are blocked.

        ``held_since_ms``: only holds held at or before then (the caller checked that what
        was on the topic when those came due has been read; younger ones wait)."""
        timeout_ms = int(self.rules.hold_timeout_seconds * 1000)
        expired = [h for h in state.held if now_ms - h["since_ms"] >= timeout_ms
                   and (held_since_ms is None or h["since_ms"] <= held_since_ms)]
        out: list[Decision] = []
        for entry in expired:
            state.held.remove(entry)
            record, event = self._restore(entry)
            waited = (now_ms - entry["since_ms"]) / 1000
            decision = self._exception(record, event, [Finding(
                "hold.timeout",
                f"waited {waited:.0f}s for {', '.join(entry['waiting_for'])}, which never arrived",
            )], now_ms, held=True, released_by="timeout")
            token = provides(event)
            if token is not None and not state.token(token):
                state.settle(token, ok=False)
            memo = state.seen(entry["key"])
            assert memo is not None
            memo.update(k=EXCEPTION, chk="hold.timeout", w=[], rb="timeout")
            out.append(decision)
        if expired:
            out.extend(self._release(state, "timeout", now_ms))
        return out

    @staticmethod
    def oldest_hold_ms(state: OrderState) -> int | None:
        return min((h["since_ms"] for h in state.held), default=None)
