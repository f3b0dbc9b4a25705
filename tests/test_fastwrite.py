"""The compiled encoder writes exactly fastavro's bytes for the pipeline's records."""

from __future__ import annotations

import io
from typing import Any

from fastavro import schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from revline.schemas import exception_codec, outcome_codec

text = st.text(max_size=40)
opt_text = st.none() | text
longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)

outcomes = st.fixed_dictionaries({
    "input_topic": text, "input_partition": ints, "input_offset": longs,
    "kind": st.sampled_from(["validated", "duplicate", "exception", "dead_letter", "held"]),
    "final": st.booleans(), "held": st.booleans(), "released_by": opt_text,
    "waiting_for": st.lists(text, max_size=3), "check_id": opt_text, "severity": opt_text,
    "owner": opt_text, "reason": text, "warnings": st.lists(text, max_size=3),
    "exception_id": opt_text, "stage": opt_text, "event_type": opt_text, "event_id": opt_text,
    "idempotency_key": opt_text, "order_id": opt_text, "source_line": opt_text,
    "occurred_at_ms": st.none() | longs, "decided_at_ms": longs, "rules_version": text,
})

exceptions = st.fixed_dictionaries({
    "exception_id": text, "check_id": text, "severity": text, "owner": text, "reason": text,
    "all_findings": st.lists(st.fixed_dictionaries({"check_id": text, "reason": text}),
                             max_size=3),
    "blocking": st.booleans(), "opened_at_ms": longs, "sla_deadline_ms": longs,
    "rules_version": text, "event_type": opt_text, "idempotency_key": opt_text,
    "order_id": opt_text, "source_system": opt_text, "source_record_id": opt_text,
    "input_topic": text, "input_partition": ints, "input_offset": longs,
    "event": st.binary(max_size=64),
})


def _fastavro(parsed: Any, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, parsed, record)
    return out.getvalue()


@settings(max_examples=300, deadline=None)
@given(record=outcomes)
def test_outcome_bytes_equal_fastavro(record: dict[str, Any]) -> None:
    codec = outcome_codec()
    assert codec.encode(record) == codec.header + _fastavro(codec.parsed, record)
    assert codec.decode(codec.encode(record)) == record


@settings(max_examples=200, deadline=None)
@given(record=exceptions)
def test_exception_bytes_equal_fastavro(record: dict[str, Any]) -> None:
    codec = exception_codec()
    assert codec.encode(record) == codec.header + _fastavro(codec.parsed, record)


@settings(max_examples=100, deadline=None)
@given(record=outcomes, data=st.data())
def test_damaged_records_are_one_decode_error(record: dict[str, Any], data: st.DataObject) -> None:
    """Readers of the outcomes and exceptions topics (report, index rebuild, exception
    manager) route a DecodeError; a cut, padded or corrupted record is one, whose text
    carries no object address."""
    from revline.schemas import DecodeError

    codec = outcome_codec()
    value = codec.encode(record)
    cut = data.draw(st.integers(min_value=10, max_value=len(value) - 1))
    flipped = bytearray(value)
    at = data.draw(st.integers(min_value=10, max_value=len(value) - 1))
    flipped[at] = data.draw(st.integers(0, 255))
    for damaged in (value[:cut], value + b"\x00", bytes(flipped)):
        try:
            codec.decode(damaged)
        except DecodeError as exc:
            assert " at 0x" not in str(exc), str(exc)
