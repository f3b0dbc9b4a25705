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
