"""Property: any delivery order of an order's events, with any re-sends, ends the same."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revline.processors import VALIDATED, InputRecord, OrderState, depends_on, provides
from revline.schemas import EventSerializer
from revline.tools.workload import WorkloadOptions, generate

from .test_engine_manifest import make_engine

ENGINE = make_engine()
ENCODE = EventSerializer()
CLEAN = WorkloadOptions(
    orders=40, seed=21, duplicates=0, conflicts=0, out_of_order=0, incomplete=0, off_policy=0,
    unknown_attribution=0, amount_mismatch=0, poison=0,
)
ORDERS: list[list[bytes]] = []
_by_order: dict[str, list[bytes]] = {}
for _rec in generate(CLEAN).records:
    assert _rec.event is not None
    _by_order.setdefault(_rec.key, []).append(ENCODE(_rec.event))
ORDERS = [values for values in _by_order.values() if len(values) >= 4]


def deliver(values: list[bytes], key: bytes) -> tuple[list[str], OrderState]:
    state = OrderState()
    validated: list[str] = []
    for offset, value in enumerate(values):
        record = InputRecord("in", 0, offset, key, value)
        event, dead = ENGINE.decode(record, 0)
        assert dead is None and event is not None
        for d in ENGINE.process(state, record, event, 0):
            if d.kind == VALIDATED:
                assert d.event is not None
                validated.append(d.event["envelope"]["idempotency_key"])
    return validated, state


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_permutation_with_any_resends_releases_each_event_once_in_dependency_order(
    data: st.DataObject,
) -> None:
    values = data.draw(st.sampled_from(ORDERS))
    key = ENGINE.deserializer.decode(values[0])["envelope"]["order_id"].encode()
    expected, expected_state = deliver(values, key)

    resent = data.draw(st.lists(st.sampled_from(values), max_size=len(values)))
    shuffled = data.draw(st.permutations(values + resent))
    validated, state = deliver(list(shuffled), key)

    assert sorted(validated) == sorted(expected)  # the same events
    assert len(validated) == len(set(validated))  # each exactly once
    events = {
        e["envelope"]["idempotency_key"]: e
        for e in (ENGINE.deserializer.decode(v) for v in values)
    }
    done: set[str] = set()
    for key_ in validated:  # in dependency order
        event = events[key_]
        assert set(depends_on(event)) <= done, (key_, depends_on(event), done)
        token = provides(event)
        if token:
            done.add(token)
    assert state.held == []
    for part in ("tokens", "versions", "invoices", "payments", "approvals", "invoiced"):
        assert state.data[part] == expected_state.data[part]
