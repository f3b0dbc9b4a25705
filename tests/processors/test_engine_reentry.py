"""Re-drive and corrections: an input whose key ended in an exception is judged again."""

from __future__ import annotations

from revline.processors import (
    EXCEPTION,
    REENTRY_HEADER,
    REPLAYED,
    VALIDATED,
    InputRecord,
    OrderState,
)
from revline.schemas import EventSerializer
from revline.tools.workload import WorkloadOptions, generate
from tests.processors.test_engine_manifest import make_engine


def _failed_booking() -> tuple[InputRecord, dict]:  # type: ignore[type-arg]
    workload = generate(WorkloadOptions(orders=60, seed=11, incomplete=1.0, duplicates=0,
                                        conflicts=0, out_of_order=0, poison=0, orphans=0))
    record = next(r for r in workload.records
                  if r.event is not None and r.event_type == "order_booked"
                  and r.expect.outcome == "exception")
    assert record.event is not None
    return InputRecord("in", 0, 1, record.key.encode(), EventSerializer()(record.event)), \
        record.event


def test_reentry_is_judged_again_and_replays_of_both_attempts_change_nothing() -> None:
    engine = make_engine()
    state = OrderState()
    original, event = _failed_booking()
    [first] = engine.process(state, original, engine.decode(original, 0)[0] or {}, 0)
    assert first.kind == EXCEPTION

    # The same bytes again without the header: a duplicate of the excepted input.
    copy = InputRecord("in", 0, 2, original.key, original.value)
    assert engine.process(state, copy, event, 0)[0].kind == "duplicate"

    # Re-driven (same bytes, new coordinates, re-entry header): judged again, same verdict.
    again = InputRecord("in", 0, 3, original.key, original.value,
                        headers=((REENTRY_HEADER, first.exception_id.encode()),))  # type: ignore[union-attr]
    [second] = engine.process(state, again, event, 0)
    assert second.kind == EXCEPTION and second.exception_id != first.exception_id

    # Replaying either attempt is recognised as a replay.
    assert engine.process(state, original, event, 0)[0].kind == REPLAYED
    assert engine.process(state, again, event, 0)[0].kind == REPLAYED


def test_reentry_of_a_validated_key_is_still_a_duplicate() -> None:
    engine = make_engine()
    workload = generate(WorkloadOptions(orders=5, seed=2, duplicates=0, conflicts=0,
                                        out_of_order=0, incomplete=0, off_policy=0,
                                        unknown_attribution=0, amount_mismatch=0, poison=0,
                                        orphans=0))
    booking = next(r for r in workload.records if r.event_type == "order_booked")
    assert booking.event is not None
    value = EventSerializer()(booking.event)
    state = OrderState()
    rec = InputRecord("in", 0, 1, booking.key.encode(), value)
    assert engine.process(state, rec, booking.event, 0)[0].kind == VALIDATED
    redriven = InputRecord("in", 0, 9, booking.key.encode(), value,
                           headers=((REENTRY_HEADER, b"EX-x"),))
    assert engine.process(state, redriven, booking.event, 0)[0].kind == "duplicate"
