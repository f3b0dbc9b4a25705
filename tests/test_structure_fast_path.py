"""The structural rules' one-pass fast path (``_clean``) never hides a problem: on
generated events, and on copies with one string made bad in every way the rules know,
``structural_error`` says what the rules field by field say."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

import revline.schemas._structure as structure
from revline.schemas import EventDeserializer, EventSerializer, structural_error
from revline.tools.workload import WorkloadOptions, generate

BAD = ["\x00", "a\x01b", "x" * 513, "é" * 300, "\u3042" * 260, "\ud800", "\x7f", "\x9f",
       "line\nbreak", "x" * 256, "y" * 257, "\u3042" * 256, "\U0001f600" * 256,
       "\U0001f600" * 257]


def field_by_field(event: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str | None:
    with monkeypatch.context() as m:
        m.setattr(structure, "_clean", lambda _event: False)
        return structural_error(event)


def string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in string_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in string_paths(v, (*path, i))]
    return [path] if isinstance(value, str) else []


def test_the_fast_path_agrees_with_the_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    workload = generate(WorkloadOptions(orders=60, seed=3))
    encode, decode = EventSerializer(), EventDeserializer()
    events = [decode.decode(encode(r.event)) for r in workload.records if r.event is not None]
    rng = random.Random(7)
    found = 0
    for event in events:
        assert structural_error(event) == field_by_field(event, monkeypatch) is None
        for path in rng.sample(string_paths(event), 4):
            bad = copy.deepcopy(event)
            target = bad
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = rng.choice(BAD) + (target[path[-1]] if rng.random() < .5 else "")
            want = field_by_field(bad, monkeypatch)
            assert structural_error(bad) == want, path
            found += want is not None
    assert found > 100
    # Shapes the codec never builds take the rules field by field.
    odd = copy.deepcopy(events[0])
    odd["envelope"]["order_id"] = ("SO-1",)  # not a string: no id problem, not plain
    assert not structure._clean(odd)
    assert structural_error(odd) == field_by_field(odd, monkeypatch)


# -- the compiled decoder (``_fastread``): fastavro's record, or fastavro's error ----------
def fastavro_only() -> EventDeserializer:
    decoder = EventDeserializer()
    decoder._fast = {}  # every record through fastavro, as before the fast path
    return decoder


def outcome(decoder: EventDeserializer, data: bytes) -> tuple[str, str]:
    """What decoding ``data`` gives: the record (its repr names every type) or the error."""
    try:
        return "record", repr(decoder.decode(data))
    except Exception as exc:  # the error is compared too: type and message
        # No object address in it: the same bad bytes give the same text on every run
        # (fastavro's "cannot read boolean from <_io.BytesIO object at 0x7f…>" did not).
        assert " at 0x" not in str(exc), str(exc)
        return type(exc).__name__, str(exc)


def test_the_compiled_decoder_reads_every_event_type() -> None:
    decoder = EventDeserializer()
    assert {entry.event_type for entry in decoder.catalog
            if entry.fingerprint in decoder._fast} == set(decoder.catalog.event_types())


def test_the_compiled_decoder_gives_fastavros_records_and_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    workload = generate(WorkloadOptions(orders=120, seed=11))
    encode, fast, slow = EventSerializer(), EventDeserializer(), fastavro_only()
    values = [encode(r.event) for r in workload.records if r.event is not None]
    rng = random.Random(5)
    for event in (decoded for decoded in map(slow.decode, values[:200])):
        for path in rng.sample(string_paths(event), 3):  # strings bad in every known way
            bad = copy.deepcopy(event)
            target = bad
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = rng.choice(BAD) + target[path[-1]]
            try:
                values.append(encode(bad))
            except Exception:  # a lone surrogate has no UTF-8: it cannot be on the wire
                continue
    clean_seen = dirty_seen = 0
    for value in values:
        assert outcome(fast, value) == outcome(slow, value)
        event, clean = fast.decode_plain(value)
        if clean:  # sound: the one-pass rules would have passed it too
            assert structure._clean(event)
            clean_seen += 1
        else:
            dirty_seen += 1
        assert structural_error(event, ids_clean=clean) == field_by_field(event, monkeypatch)
    assert clean_seen > 500 and dirty_seen > 100
    # Damaged bytes: every truncation of a few records, and random byte changes.
    for value in values[:40]:
        for cut in range(len(value)):
            assert outcome(fast, value[:cut]) == outcome(slow, value[:cut])
    for _ in range(20_000):
        value = bytearray(rng.choice(values))
        for _ in range(rng.randint(1, 3)):
            value[rng.randrange(10, len(value))] = rng.choice(
                (0, 1, 2, 3, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        if rng.random() < 0.2:
            value += bytes([rng.randrange(256)])
        assert outcome(fast, bytes(value)) == outcome(slow, bytes(value))


def test_the_compiled_decoder_leaves_odd_encodings_to_fastavro() -> None:
    """What the compiled reader does not take (fastavro may accept it): its answer is
    fastavro's, whichever way."""
    from revline.schemas._fastread import compile_reader

    schema = {"type": "record", "name": "R", "namespace": "t", "fields": [
        {"name": "i", "type": "int"}, {"name": "b", "type": "boolean"},
        {"name": "u", "type": ["null", "string"]},
        {"name": "a", "type": {"type": "array", "items": "long"}},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y"]}}]}
    read = compile_reader(schema)
    assert read(bytes([4, 1, 2, 2, 0x61, 2, 6, 0, 2]), 0) == (
        {"i": 2, "b": True, "u": "a", "a": [3], "e": "Y"}, 9, True)
    for odd in (bytes([0x80, 0x80, 0x80, 0x80, 0x20, 1, 0, 0, 0]),  # an int past 32 bits
                bytes([4, 2, 0, 0, 0]),  # a boolean byte of 2
                bytes([4, 1, 4, 0, 0]),  # a union branch that is not there
                bytes([4, 1, 0, 1, 2, 6, 0, 0]),  # an array block with its byte size
                bytes([4, 1, 2, 3, 0x61, 0, 0]),  # a negative string length
                bytes([4, 1, 0, 0, 1]),  # a negative enum index
                bytes([4, 1, 0, 0x80] + [0xFF] * 10 + [1, 0, 0])):  # a varint past 64 bits
        with pytest.raises((ValueError, IndexError)):
            read(odd, 0)
    with pytest.raises(TypeError):
        compile_reader({"type": "record", "name": "F", "fields": [{"name": "x", "type": "float"}]})
