"""The sink processor identifies an effect by (order_id, idempotency_key), on the real broker.

Two orders share idempotency keys. Before, the second order's money was skipped as
"already applied" and an ERP refusal of it overwrote the first order's "applied"
row. The ERP here is a recording fake (the real adapters have their own contract
tests), so what is checked is the processor's own bookkeeping.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from revline.core.auditlog import AuditFact
from revline.core.metrics import SinkMetrics
from revline.core.readback import read_topic
from revline.operations.publisher import Publisher
from revline.schemas import exception_codec
from revline.sinks._protocols import EffectResult, PermanentSinkError
from revline.sinks.ledger import EffectId, SqlLedger
from revline.sinks.processor import SinkProcessor
from tests.sinks.erp_contract import LINES, booked, invoiced

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


class _RecordingErp:
    """Applies by (order, key) and refuses the effects it is told to."""

    name = "erp"

    def __init__(self, refuse: set[EffectId]) -> None:
        self.refuse = refuse
        self.applied: Counter[EffectId] = Counter()

    def apply(self, event: Mapping[str, Any]) -> EffectResult:
        env = event["envelope"]
        effect = (env["order_id"], env["idempotency_key"])
        if effect in self.refuse:
            raise PermanentSinkError(f"period closed for {effect[0]} (injected)")
        self.applied[effect] += 1
        ref = f"{env['event_type']}/{effect[0]}"
        return EffectResult("erp", effect[1], "applied", {"doc": ref}, order_id=effect[0])

    def lookup(self, order_id: str, idempotency_key: str) -> dict[str, str]:
        return {}


def _shared(event: dict[str, Any], key: str) -> dict[str, Any]:
    event["envelope"]["idempotency_key"] = key
    return event


def _run(bootstrap: str, topic: str, total: int, ledger: SqlLedger, erp: _RecordingErp,
         exceptions: str, audit: str, metrics: SinkMetrics) -> SinkProcessor:  # fmt: skip
    proc = SinkProcessor(bootstrap, topic, f"sink-{uuid.uuid4().hex[:8]}", ledger, erp,
                         exceptions, metrics, batch_size=50, audit_topic=audit,
                         poll_timeout_s=0.2)  # fmt: skip
    deadline = time.monotonic() + 60
    try:
        while sum(proc.stats.committed.values()) < total:
            assert time.monotonic() < deadline, proc.stats
            proc.step()
    finally:
        proc.close()
    return proc


def test_two_orders_sharing_keys_are_applied_and_refused_apart(
    kafka_bootstrap: str, tmp_path: Path, new_topic: Any
) -> None:
    a, b = f"SO-A-{uuid.uuid4().hex[:6]}", f"SO-B-{uuid.uuid4().hex[:6]}"
    book, inv = f"SHARED-{uuid.uuid4().hex[:6]}:booked", f"SHARED-{uuid.uuid4().hex[:6]}:inv"
    events = [_shared(booked(a, LINES), book), _shared(booked(b, LINES), book),
              _shared(invoiced(a, LINES), inv), _shared(invoiced(b, LINES), inv)]  # fmt: skip
    topic, exceptions, audit = new_topic("validated", 1), new_topic("exc", 1), new_topic("aud", 1)
    with Publisher(kafka_bootstrap, topic) as publisher:
        for n, event in enumerate(events):
            publisher.publish(event, headers=[("revline.input", f"revline.events.v1/0/{n}")])

    erp = _RecordingErp(refuse={(b, inv)})
    metrics = SinkMetrics()
    with SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        proc = _run(kafka_bootstrap, topic, len(events), ledger, erp, exceptions, audit, metrics)
        # The ledger posted both orders' invoices, under the same key.
        journals = {o: ledger.journals_for(o) for o in (a, b)}
        assert [j.idempotency_key for j in journals[a]] == [inv] == [
            j.idempotency_key for j in journals[b]]
        assert proc.stats.applied["ledger"] == 2
        # The ERP applied everything of both orders but B's invoice, once each.
        assert erp.applied == {(a, book): 1, (b, book): 1, (a, inv): 1}
        rows = ledger.effects_for([(a, book), (b, book), (a, inv), (b, inv)], "erp")
        assert {ident: row.status for ident, row in rows.items()} == {
            (a, book): "applied", (b, book): "applied", (a, inv): "applied",
            (b, inv): "refused",
        }  # fmt: skip
        assert all(row.order_id == ident[0] for ident, row in rows.items())
        ledger_rows = ledger.effects_for([(a, inv), (b, inv)], "ledger")
        assert ledger_rows[(a, inv)].external_ref != ledger_rows[(b, inv)].external_ref
        sample = metrics.registry.get_sample_value
        name = "revline_sink_refusals_validated_total"
        assert sample(name, {"adapter": "erp"}) == 1
        assert sample(name, {"adapter": "ledger"}) == 0

        # Replayed by a new group: nothing applied anew, the refusal not raised again.
        again = _run(kafka_bootstrap, topic, len(events), ledger, erp, exceptions, audit,
                     SinkMetrics())  # fmt: skip
        assert again.stats.applied == {} and again.stats.exceptions == 0
        assert again.stats.skipped == {"ledger": 2, "erp": 4}
        assert erp.applied == {(a, book): 1, (b, book): 1, (a, inv): 1}

    codec = exception_codec()
    [record] = [codec.decode(m.value() or b"") for m in read_topic(kafka_bootstrap, exceptions)]
    assert (record["check_id"], record["owner"], record["severity"]) == (
        "sink.erp_refused", "integrations", "P1")
    assert (record["order_id"], record["idempotency_key"]) == (b, inv)

    facts = [AuditFact.decode(m.value() or b"") for m in read_topic(kafka_bootstrap, audit)]
    assert all(f.order_id == f.detail["order_id"] for f in facts)
    firsts = {(f.order_id, f.detail["idempotency_key"], f.detail["adapter"], f.kind)
              for f in facts}  # fmt: skip
    assert firsts == {
        (a, book, "erp", "applied"), (b, book, "erp", "applied"),
        (a, inv, "ledger", "applied"), (b, inv, "ledger", "applied"),
        (a, inv, "erp", "applied"), (b, inv, "erp", "refused"),
    }  # fmt: skip
    # The replay re-sent each fact under its first id, on its own order's chain.
    ids = Counter((f.order_id, f.fact_id) for f in facts)
    assert set(ids.values()) == {2}
