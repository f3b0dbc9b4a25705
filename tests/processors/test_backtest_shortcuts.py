"""The backtest's speed shortcuts give exactly what the plain path gives.

* ``_Owners``: an exception's owner and severity remembered per check, event facts and
  the amount's place among the ownership rules' thresholds, equal to ``outcome_of``;
* ``_HeldInputs``: a held input that comes back is the record read and the event decoded
  from it, equal to what the worker rebuilds from the order's state, and none is kept
  once no state holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from revline.core.settings import DATA_DIR
from revline.processors import Engine, InputRecord, OrderState, Rules
from revline.processors.backtest import (
    Backtest,
    ReferenceTimeline,
    _HeldInputs,
    _Owners,
    outcome_of,
)
from revline.processors.engine import EXCEPTION, HELD, REPLAYED, VALIDATED, Decision
from revline.processors.ownership import Ownership
from revline.tools.workload import WorkloadOptions, generate
from tests.processors.test_backtest import (
    LIVE,
    OWNERSHIP,
    REFERENCE,
    candidate_raw,
    sides,
    workload_records,
)


def _ownerships() -> list[Ownership]:
    """The live file, and one with thresholds on every money event and currency."""
    raw = yaml.safe_load((DATA_DIR / "ownership.yaml").read_text())
    raw["version"] = "thresholds"
    raw["rules"] = [
        {"name": "huge", "match": {"min_amount_minor": 5_000_000}, "severity": "P1",
         "owner": "finance"},
        {"name": "eur-big", "match": {"currency": "EUR", "min_amount_minor": 200_000},
         "owner": "revenue_ops", "severity": "P2"},
        {"name": "bookings-mid", "match": {"event_type": "order_booked",
                                           "min_amount_minor": 100_000},
         "owner": "integrations"},
        {"name": "policy", "match": {"check_id": "policy.*", "source_system": "salesforce"},
         "owner": "finance", "severity": "P3"},
        *raw["rules"],
    ]
    return [OWNERSHIP, Ownership.from_mapping(raw)]


def _decisions() -> list[Decision]:
    """Every final decision of the live engine over a generated workload with faults."""
    workload = generate(WorkloadOptions(orders=300, seed=7, orphans=3, poison=0.01,
                                        out_of_order=0.3, off_policy=0.1))
    engine = Engine(rules=LIVE, reference=lambda: REFERENCE)
    states: dict[bytes, OrderState] = {}
    out: list[Decision] = []
    for rec, _ in workload_records(workload):
        event, dead = engine.decode(rec, rec.timestamp_ms)
        if dead is not None:
            out.append(dead)
            continue
        assert event is not None and rec.key is not None
        state = states.setdefault(rec.key, OrderState())
        out += [d for d in engine.process(state, rec, event, rec.timestamp_ms)
                if d.kind not in (HELD, REPLAYED)]
    for state in states.values():
        out += engine.expire_holds(state, 2**62)
    return out


def _at_thresholds(decisions: list[Decision], ownership: Ownership) -> list[Decision]:
    """Copies of exceptions with the event's amount at, just below and above each threshold."""
    amounts = sorted({r.match.min_amount_minor for r in ownership.rules
                      if r.match.min_amount_minor is not None})
    out = []
    for d in decisions:
        event = d.event
        if d.kind != EXCEPTION or event is None:
            continue
        field = "total_minor" if "total_minor" in event else "amount_minor"
        if field not in event:
            continue
        for amount in amounts:
            for value in (amount - 1, amount, amount + 1):
                out.append(dataclasses.replace(d, event={**event, field: value}))
    return out


@pytest.mark.parametrize("index", [0, 1])
def test_remembered_ownership_equals_outcome_of(index: int) -> None:
    ownership = _ownerships()[index]
    candidate = Rules.from_mapping(candidate_raw())
    decisions = _decisions()
    extra = _at_thresholds(decisions, ownership)
    assert {d.kind for d in decisions} >= {VALIDATED, EXCEPTION}
    assert extra or not any(r.match.min_amount_minor for r in ownership.rules)
    for rules in (LIVE, candidate):
        owners = _Owners(rules, ownership)
        for d in [*decisions, *extra, *decisions]:  # the second time from memory
            assert owners.outcome(d) == outcome_of(d, rules, ownership), d
    assert any(o.opens for o in (outcome_of(d, LIVE, ownership) for d in decisions))


def _run(records: list[tuple[InputRecord, bool]], candidate: Rules, *,
         share: bool = True) -> tuple[dict[str, Any], Backtest]:
    bt = Backtest(*sides(candidate), ReferenceTimeline.fixed(REFERENCE), share=share)
    for rec, counted in records:
        bt.feed(rec, counted=counted)
    return bt.finish(records[-1][0].timestamp_ms + 3_600_000).as_dict(), bt


@pytest.mark.parametrize("candidate", [
    candidate_raw(hold_timeout=900),  # orders shared, split on the discount
    candidate_raw(hold_timeout=25),  # also split while they hold (the state is copied)
])
@pytest.mark.parametrize("share", [True, False])
def test_held_inputs_come_back_as_the_worker_rebuilds_them(
        candidate: Mapping[str, Any], share: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Rules.from_mapping(candidate)
    workload = generate(WorkloadOptions(orders=300, seed=23, orphans=4, poison=0.005,
                                        out_of_order=0.4, off_policy=0.05))
    records = workload_records(workload)
    taken = {"kept": 0, "rebuilt": 0}
    take = _HeldInputs.take

    def checked(self: _HeldInputs, entry: Mapping[str, Any]
                ) -> tuple[InputRecord, dict[str, Any]] | None:
        kept = take(self, entry)
        rebuilt = Engine(rules=LIVE, reference=lambda: REFERENCE)._restore(entry)
        if kept is None:
            taken["rebuilt"] += 1
        else:
            taken["kept"] += 1
            assert kept == rebuilt
        return kept

    monkeypatch.setattr(_HeldInputs, "take", checked)
    fast, bt = _run(records, rules, share=share)
    assert taken["kept"] > 0 and taken["rebuilt"] == 0, taken
    # Kept exactly while some lane's state holds it: the holds still pending at the end.
    still_held = {(h["topic"], h["partition"], h["offset"])
                  for lane in bt._lanes for state in lane.states.values()
                  for h in state.held}
    assert set(bt.held_inputs._kept) == still_held

    monkeypatch.setattr(_HeldInputs, "take", lambda self, entry: None)  # the worker's way
    slow, _ = _run(records, rules, share=share)
    assert fast == slow


def test_an_unknown_held_input_is_rebuilt() -> None:
    held = _HeldInputs()
    assert held.take({"topic": "t", "partition": 0, "offset": 1}) is None
    record = InputRecord("t", 0, 1, b"k", b"v")
    event = {"envelope": {}}
    held.hold(record, event)
    held.hold(record, event)  # two states hold it
    entry = {"topic": "t", "partition": 0, "offset": 1}
    assert held.take(entry) == (record, event)
    assert len(held) == 1
    assert held.take(entry) == (record, event)
    assert len(held) == 0 and held.take(entry) is None
    # Two different inputs read at one place (not from Kafka): neither is handed back.
    held.hold(record, event)
    held.hold(InputRecord("t", 0, 1, b"k", b"other"), {"envelope": {"x": 1}})
    assert held.take(entry) is None and held.take(entry) is None and len(held) == 0


def _body_hash_by_the_loop(value: bytes) -> str:
    """``engine.body_hash`` as it read every length: the general zig-zag varint loop."""
    import hashlib

    pos = 10 if value[:2] == b"\xc3\x01" else 5
    shift = raw = 0
    while pos < len(value):
        byte = value[pos]
        pos += 1
        raw |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    length = (raw >> 1) ^ -(raw & 1)
    return hashlib.blake2b(value[pos + length:], digest_size=16).hexdigest()


def test_body_hash_one_byte_lengths_equal_the_varint_loop() -> None:
    from revline.processors.engine import body_hash

    def zigzag(n: int) -> bytes:
        raw, out = n << 1, bytearray()
        while True:
            byte = raw & 0x7F
            raw >>= 7
            if raw:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                return bytes(out)

    body = bytes(range(256)) * 2
    for head in (b"\xc3\x01" + bytes(8), b"\x00" + bytes(4)):
        for length in range(300):
            value = head + zigzag(length) + b"e" * length + body
            assert body_hash(value) == _body_hash_by_the_loop(value) \
                == _body_hash_by_the_loop(head + zigzag(length) + b"x" * length + body)
        for odd in (head, head + b"\x01", head + b"\x7f" + body, head + b"\x80"):
            assert body_hash(odd) == _body_hash_by_the_loop(odd)


def test_same_verdict_is_verdict_equality() -> None:
    import itertools

    from revline.processors.backtest import PENDING, Outcome, _same_verdict
    from revline.processors.engine import DEAD_LETTER, DUPLICATE

    outcomes = [Outcome(kind, check, opens, severity, owner, warnings, reason, released, at)
                for kind in (VALIDATED, EXCEPTION, DUPLICATE, DEAD_LETTER, PENDING)
                for check, opens in ((None, None), ("policy.discount", "policy.discount"),
                                     (None, "attribution.campaign"))
                for severity, owner in ((None, None), ("P2", "revenue_ops"), ("P1", "finance"))
                for warnings in ((), ("a.x",), ("a.x", "b.y"), ("b.y", "a.x"))
                for reason, released, at in (("", None, 0), ("why", "timeout", 5))]
    for a, b in itertools.product(outcomes[::3], outcomes[::2]):
        assert _same_verdict(a, b) == (a.verdict == b.verdict), (a, b)
        assert _same_verdict(a, a)
