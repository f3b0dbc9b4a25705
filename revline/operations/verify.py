"""Read what the pipeline concluded and hold it against a workload manifest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    Message,
)

from revline.core.readback import header, read_topic
from revline.operations.publisher import SOURCE_LINE_HEADER
from revline.schemas import (
    DecodeError,
    EventDeserializer,
    MalformedRecordError,
    UnknownSchemaError,
    outcome_codec,
)

Outcome = dict[str, Any]


def read_outcomes(bootstrap: str, topic: str) -> list[Outcome]:
    codec = outcome_codec()
    return [codec.decode(msg.value() or b"") for msg in read_topic(bootstrap, topic)]


def verdict(o: Outcome) -> tuple[Any, ...]:
    return (o["kind"], o["check_id"], o["held"], tuple(sorted(o["warnings"])), o["stage"],
            o["idempotency_key"])


def finals_by_input(outcomes: list[Outcome]) -> dict[tuple[int, int], list[Outcome]]:
    """Distinct final verdicts per input (partition, offset).

    A replay may repeat an outcome record; it must never change it. So after
    dropping exact repeats, a correct pipeline has exactly one per input.
    """
    out: dict[tuple[int, int], list[Outcome]] = {}
    for o in outcomes:
        if not o["final"]:
            continue
        coords = (o["input_partition"], o["input_offset"])
        if all(verdict(x) != verdict(o) for x in out.get(coords, [])):
            out.setdefault(coords, []).append(o)
    return out


def compare_with_manifest(manifest: Mapping[str, Any], outcomes: list[Outcome]) -> list[str]:
    """Problems: inputs without exactly one final verdict, or with another than expected."""
    by_line: dict[int, list[Outcome]] = {}
    for verdicts in finals_by_input(outcomes).values():
        for o in verdicts:
            by_line.setdefault(int(o["source_line"] or -1), []).append(o)
    problems = []
    for entry in manifest["inputs"]:
        seq = entry["seq"]
        got = by_line.get(seq, [])
        label = entry["note"] or entry["event_type"]
        if len(got) != 1:
            problems.append(f"input {seq} ({label}): {len(got)} distinct final outcomes "
                            f"{[verdict(g) for g in got]}")
            continue
        o = got[0]
        have = (o["kind"], o["check_id"], o["held"],
                sorted(o["warnings"]) if o["kind"] == "validated" else [], o["stage"])
        want = (entry["outcome"], entry["check_id"], entry["held"], sorted(entry["warnings"]),
                entry["stage"])
        if have != want:
            problems.append(f"input {seq} {label}: got {have}, want {want} ({o['reason']})")
    return problems


@dataclass
class ReadbackReport:
    records: int = 0
    decoded: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    decode_errors: Counter[str] = field(default_factory=Counter)
    matched: int = 0
    mismatches: list[str] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.missing


_STAGE = {UnknownSchemaError: "schema", MalformedRecordError: "decode"}


def check_against_manifest(
    messages: Iterator[Message],
    manifest: Mapping[str, Any],
    deserializer: EventDeserializer | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReadbackReport:
    """Decode every record and compare it, by its source-line header, with the manifest."""
    from revline.schemas import structural_error

    deserializer = deserializer or EventDeserializer()
    inputs = {entry["seq"]: entry for entry in manifest["inputs"]}
    seen: set[int] = set()
    report = ReadbackReport()
    for msg in messages:
        report.records += 1
        if progress:
            progress(report.records)
        raw_seq = header(msg, SOURCE_LINE_HEADER)
        seq = int(raw_seq) if raw_seq else -1
        expected = inputs.get(seq)
        stage: str | None = None
        try:
            event = deserializer.decode(msg.value() or b"")
            problem = structural_error(event)
            if problem:
                stage = "structure"
                report.decode_errors[f"structure: {problem}"] += 1
            else:
                report.decoded += 1
                report.by_type[event["envelope"]["event_type"]] += 1
        except DecodeError as exc:
            stage = _STAGE.get(type(exc), "decode")
            report.decode_errors[f"{stage}: {type(exc).__name__}"] += 1
            event = None
        if expected is None:
            report.mismatches.append(f"offset {msg.partition()}/{msg.offset()}: no manifest entry")
            continue
        seen.add(seq)
        if expected["outcome"] == "dead_letter":
            if stage != expected["stage"]:
                report.mismatches.append(
                    f"input {seq}: expected a {expected['stage']} failure, got {stage or 'ok'}"
                )
                continue
        elif event is None or stage is not None:
            report.mismatches.append(f"input {seq}: expected an event, got a {stage} failure")
            continue
        elif (
            event["envelope"]["event_id"] != expected["event_id"]
            or event["envelope"]["idempotency_key"] != expected["idempotency_key"]
            or msg.key() != expected["order_id"].encode()
        ):
            report.mismatches.append(f"input {seq}: decoded event is not the one published")
            continue
        report.matched += 1
    report.missing = sorted(set(inputs) - seen)
    return report
