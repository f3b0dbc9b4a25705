"""The Tryton adapter's speed, CI-sized: 60 validated events, per document and batched.

The same events (a generated workload through the stream engine, validated ones only)
go to two fresh trytond databases: one ``apply`` per event, and ``apply_many`` over the
batch. Both must leave the same documents (same steps, keys, orders, amounts and
states); the batched path must take far fewer RPCs per event and never be slower than
a floor well under the measured rate (see docs/performance.md, "ERP (Tryton)"), so a
loaded CI machine does not make it flaky. The full measurement:
``python -m revline.tools.tryton_bench``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from revline.sinks.erp import TrytonErp, TrytonServer, prepare_database, start_server
from revline.tools.tryton_bench import run, validated_events
from tests.sinks.erp_fixtures import STATE_DIR

EVENTS = 60
FLOOR_EVENTS_S = 0.4  # measured 2-4 events/s batched on a loaded 2-CPU machine
pytestmark = pytest.mark.slow


def _documents(server: TrytonServer) -> Counter[tuple[Any, ...]]:
    db = server.database
    with TrytonErp(server.url, db.name, db.user, db.password) as erp:
        return Counter((d.step, d.order_id, d.idempotency_key, d.currency, d.amount_minor,
                        d.state) for d in erp.documents())  # fmt: skip


def test_batched_apply_matches_per_document_with_far_fewer_calls(tmp_path: Path) -> None:
    events = validated_events(20, seed=7)[:EVENTS]
    assert len(events) == EVENTS
    runs = {}
    documents = {}
    for mode in ("single", "batch"):
        server = start_server(prepare_database(tmp_path / mode, state_dir=STATE_DIR))
        try:
            runs[mode] = run(server, events, mode, batch=200)
            documents[mode] = _documents(server)
        finally:
            server.stop()
        print(f"\n{runs[mode].report()}")
    single, batch = runs["single"], runs["batch"]
    print(f"batched {batch.rate:.1f} events/s vs {single.rate:.1f} per document "
          f"({batch.rate / single.rate:.1f}x)")
    assert batch.statuses == single.statuses
    assert documents["batch"] == documents["single"]
    assert sum(batch.rpcs.values()) * 3 <= sum(single.rpcs.values())
    assert batch.rate >= FLOOR_EVENTS_S
