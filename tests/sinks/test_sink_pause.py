"""The sink resumes after its held batch went away during a breaker pause (found in review:
an ERP outage plus a broker restart longer than the session timeout left it paused for
good, its heartbeat advancing)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import pytest
from confluent_kafka import TopicPartition

import revline.sinks.processor as sp
from revline.schemas import EventSerializer, validate_event
from revline.sinks.erp import InMemoryErp
from revline.sinks.ledger import SqlLedger


class Msg:
    def __init__(self, value: bytes, offset: int) -> None:
        self._v, self._o = value, offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "validated"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return self._v

    def key(self) -> bytes:
        return b"SO-1"

    def headers(self) -> list[Any]:
        return []

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)


class FakeConsumer:
    """Just enough of a confluent-kafka Consumer: a queue, pause/resume, callbacks."""

    instances: ClassVar[list[FakeConsumer]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.queue: list[Msg] = []
        self.paused: set[tuple[str, int]] = set()
        self.assigned: list[TopicPartition] = []
        self.cbs: dict[str, Any] = {}
        FakeConsumer.instances.append(self)

    def subscribe(self, topics: list[str], **cbs: Any) -> None:
        self.cbs = cbs

    def assign_now(self, tps: list[TopicPartition]) -> None:
        self.assigned = tps
        self.cbs["on_assign"](self, tps)

    def lose(self) -> None:
        tps, self.assigned = self.assigned, []
        self.paused.clear()
        self.cbs["on_lost"](self, tps)

    def assignment(self) -> list[TopicPartition]:
        return list(self.assigned)

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {(t.topic, t.partition) for t in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused -= {(t.topic, t.partition) for t in tps}

    def _take(self, n: int) -> list[Msg]:
        if ("validated", 0) in self.paused:
            return []
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def consume(self, num_messages: int = 1, timeout: float = 0) -> list[Msg]:
        return self._take(num_messages)

    def poll(self, timeout: float = 0) -> Msg | None:
        taken = self._take(1)
        return taken[0] if taken else None

    def seek(self, tp: TopicPartition) -> None:
        pass

    def commit(self, offsets: Any = None, asynchronous: bool = True) -> None:
        pass

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = True
                              ) -> tuple[int, int]:
        return (0, 1)

    def close(self) -> None:
        pass


def test_a_sink_paused_by_an_outage_resumes_after_its_partitions_were_lost(
    monkeypatch: pytest.MonkeyPatch,
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
    erp = InMemoryErp()
    proc = sp.SinkProcessor("127.0.0.1:1", "validated", "g", SqlLedger("sqlite:///:memory:"),
                            erp, "exceptions", breaker_threshold=1, breaker_cooldown_s=0.2,
                            backoff_base_s=0.001, poll_timeout_s=0.01)
    try:
        c = FakeConsumer.instances[-1]
        tp = [TopicPartition("validated", 0)]
        c.assign_now(tp)
        c.queue.append(Msg(value, 0))
        erp.available = False  # an ERP outage: the breaker opens, the sink pauses
        assert proc.step() is False and proc._paused
        c.queue.insert(0, Msg(value, 0))  # the held batch is read again after rejoining
        c.lose()  # a broker restart longer than the session timeout
        c.assign_now(tp)
        erp.available = True
        time.sleep(0.3)
        for _ in range(20):
            proc.step()
        assert not proc._paused and not c.paused
        assert len(erp.store.sales) == 1 and proc.stats.batches == 1
    finally:
        proc.producer.flush(0)


def test_a_row_over_a_database_limit_is_refused_not_retried_forever() -> None:
    import sqlalchemy.exc as sa_exc

    from revline.sinks._protocols import PermanentSinkError, TransientSinkError
    from revline.sinks.ledger._errors import translate

    class Orig(Exception):
        sqlstate = "54000"  # index row size exceeds the btree maximum

    too_big = sa_exc.OperationalError("INSERT ...", {}, Orig("index row size 3088 exceeds"))
    assert isinstance(translate(too_big), PermanentSinkError)

    class Gone(Exception):
        sqlstate = "08006"  # connection failure

    assert isinstance(translate(sa_exc.OperationalError("SELECT 1", {}, Gone("gone"))),
                      TransientSinkError)
