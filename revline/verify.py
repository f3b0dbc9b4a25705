"""Read what the pipeline concluded and hold it against a workload manifest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from revline.readback import read_topic
from schemas import outcome_codec

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
