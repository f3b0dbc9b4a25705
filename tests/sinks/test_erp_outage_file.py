"""The in-memory ERP's outage switch (``REVLINE_MEMORY_ERP_OUTAGE_FILE``): while the file
exists every call fails as an unreachable ERP does, and the sink rides it out (pauses on
its breaker, refuses nothing, applies each document once when the ERP is back)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

import revline.sinks.processor as sp
from revline.core.settings import Settings
from revline.schemas import EventSerializer, validate_event
from revline.sinks._protocols import TransientSinkError
from revline.sinks.erp import InMemoryErp, erp_from_settings
from revline.sinks.ledger import SqlLedger
from tests.sinks.erp_contract import booked, line, new_order
from tests.sinks.test_sink_pause import FakeConsumer, Msg


def _booking() -> dict[str, Any]:
    return booked(new_order(), [line("L1", "SKU-CRM-PRO", 1, 110400)])


def test_every_call_fails_transiently_while_the_file_exists(tmp_path: Path) -> None:
    down = tmp_path / "erp-down"
    erp = InMemoryErp(outage_file=down)
    first = _booking()
    assert erp.apply(first).status == "applied"
    order_id = first["envelope"]["order_id"]
    key = first["envelope"]["idempotency_key"]
    down.touch()
    second = _booking()
    for call in (lambda: erp.apply(second), lambda: erp.lookup(order_id, key),
                 erp.documents):
        with pytest.raises(TransientSinkError, match="unavailable"):
            call()
    assert len(erp.store.sales) == 1  # nothing written while down
    down.unlink()
    assert erp.lookup(order_id, key)  # back: what was there is still there
    assert erp.apply(second).status == "applied"
    assert erp.apply(second).status == "already_applied"
    assert len(erp.store.sales) == 2


def test_the_setting_reaches_the_adapter(tmp_path: Path) -> None:
    down = tmp_path / "erp-down"
    erp = erp_from_settings(Settings(_env_file=None, erp="memory",  # type: ignore[call-arg]
                                     memory_erp_outage_file=down))
    assert isinstance(erp, InMemoryErp) and erp.outage_file == str(down)
    down.touch()
    with pytest.raises(TransientSinkError):
        erp.apply(_booking())
    plain = erp_from_settings(Settings(_env_file=None, erp="memory"))  # type: ignore[call-arg]
    assert isinstance(plain, InMemoryErp) and plain.outage_file is None


def test_the_sink_pauses_while_down_and_applies_once_when_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setattr(sp, "Consumer", FakeConsumer)
    env = {"event_type": "order_booked", "idempotency_key": "k1", "order_id": "SO-1",
           "sequence": 1, "occurred_at": "2026-11-24T09:00:00Z", "source_system": "s",
           "source_record_id": "r"}
    value = EventSerializer()(validate_event({
        "envelope": env, "booking_kind": "DEAL_CLOSED", "customer_id": "C-1",
        "currency": "EUR", "lines": [{"line_id": "L1", "sku": "SKU-CRM-PRO", "quantity": 1,
                                      "unit_price_minor": 110400, "discount_minor": 0,
                                      "campaign_id": None, "channel_id": None}],
        "tax_minor": 0, "total_minor": 110400}))
    down = tmp_path / "erp-down"
    down.touch()
    erp = InMemoryErp(outage_file=down)
    ledger = SqlLedger("sqlite:///:memory:")
    proc = sp.SinkProcessor("127.0.0.1:1", "validated", "g", ledger, erp, "exceptions",
                            breaker_threshold=2, breaker_cooldown_s=0.1,
                            backoff_base_s=0.001, poll_timeout_s=0.01)
    try:
        c = FakeConsumer.instances[-1]
        c.assign_now([TopicPartition("validated", 0)])
        c.queue.append(Msg(value, 0))
        assert proc.step() is False and proc._paused
        for _ in range(5):  # half-open probes while still down: still paused
            time.sleep(0.12)
            assert proc.step() is False and proc._paused
        assert len(erp.store.sales) == 0 and proc.stats.exceptions == 0
        down.unlink()
        time.sleep(0.12)
        for _ in range(20):
            if proc.step():
                break
        assert not proc._paused and proc.stats.batches == 1
        assert len(erp.store.sales) == 1 and proc.stats.exceptions == 0  # none refused
        effect = ledger.effect("SO-1", "k1", "erp")
        assert effect is not None and effect.status == "applied"
    finally:
        proc.producer.flush(0)
