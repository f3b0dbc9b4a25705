"""revline chaos: which ERP refusals are the in-memory ERP's loss (excused) and which not."""

from __future__ import annotations

from revline.tools.chaos import _forgotten_by_a_killed_sink

NO_SALE = "the ERP has no sale for SO-1"


def test_only_a_refusal_after_a_kill_that_took_an_applied_document_is_excused() -> None:
    effects = {
        ("SO-1", "booked"): ("done", "", 10.0),  # applied by the sink killed at 20
        ("SO-1", "invoiced"): ("refused", NO_SALE, 30.0),  # its successor's empty ERP
        ("SO-2", "invoiced"): ("refused", NO_SALE, 31.0),  # nothing of SO-2 applied before
        ("SO-3", "booked"): ("done", "", 25.0),  # applied after the kill: the ERP has it
        ("SO-3", "invoiced"): ("refused", NO_SALE, 32.0),
        ("SO-4", "booked"): ("done", "", 5.0),
        ("SO-4", "invoiced"): ("refused", NO_SALE, 8.0),  # before any kill
        ("SO-5", "booked"): ("done", "", 5.0),
        ("SO-5", "invoiced"): ("refused", "amount above the open balance", 30.0),
    }
    excused = _forgotten_by_a_killed_sink(effects, [20.0])
    assert [k for k in effects if excused(k)] == [("SO-1", "invoiced")]
    assert not any(_forgotten_by_a_killed_sink(effects, [])(k) for k in effects)
