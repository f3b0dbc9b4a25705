"""An engine failure half-way through an input leaves the order's state as it was.

The engine records the dedup memo first and may hold or release records before it
fails. The worker dead-letters the input; if those changes stayed, a re-drive of the
dead letter came back "duplicate" (or "replayed") and was never judged again."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastavro import schemaless_writer

from revline.core.metrics import Metrics
from revline.core.settings import Settings
from revline.processors import DEAD_LETTER, DUPLICATE, REPLAYED, InputRecord
from revline.schemas import default_catalog
from revline.streams.app import build_worker
from tests.test_schemas import example_event


def _framed(event: dict[str, Any]) -> bytes:
    entry = default_catalog().latest(event["envelope"]["event_type"])
    assert entry is not None
    out = io.BytesIO()
    out.write(b"\xc3\x01" + entry.fingerprint)
    schemaless_writer(out, entry.parsed, event)
    return out.getvalue()


class _FailsAfterItsChanges:
    """The real engine, whose ``process`` makes all its state changes and then raises."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def process(self, *args: Any) -> Any:
        self.real.process(*args)
        raise RuntimeError("an engine bug after the state was changed")


def test_an_engine_failure_is_dead_lettered_and_a_redrive_is_judged_again(
        tmp_path: Path) -> None:
    nowhere = "127.0.0.1:1"  # clients are built, never used
    settings = Settings(_env_file=None, kafka_bootstrap_servers=nowhere,  # type: ignore[call-arg]
                        state_dir=tmp_path)
    worker = build_worker(settings, nowhere, Metrics())
    real = worker.engine
    event = example_event("order_booked")
    event["envelope"]["order_id"] = "SO-FAIL-1"
    record = InputRecord("revline.input", 0, 7, b"SO-FAIL-1", _framed(event))
    touched: dict[bytes, Any] = {}

    worker.engine = _FailsAfterItsChanges(real)  # type: ignore[assignment]
    [dead] = worker._decide(record, touched, 1_000)
    assert dead.kind == DEAD_LETTER and dead.stage == "processing"
    state = touched[b"SO-FAIL-1"][1]
    assert state.seen(event["envelope"]["idempotency_key"]) is None
    assert state.held == []

    worker.engine = real  # the bug fixed: the dead letter's input is judged, not skipped
    again = worker._decide(record, touched, 2_000)
    assert again and again[0].kind not in (DUPLICATE, REPLAYED, DEAD_LETTER), again[0]


def test_an_engine_failure_while_expiring_holds_keeps_them_and_the_worker_running(
        tmp_path: Path) -> None:
    nowhere = "127.0.0.1:1"
    settings = Settings(_env_file=None, kafka_bootstrap_servers=nowhere,  # type: ignore[call-arg]
                        state_dir=tmp_path)
    worker = build_worker(settings, nowhere, Metrics())
    real = worker.engine
    event = example_event("payment_captured")  # waits for its invoice: held
    event["envelope"]["order_id"] = "SO-FAIL-2"
    record = InputRecord("revline.input", 0, 9, b"SO-FAIL-2", _framed(event))
    touched: dict[bytes, Any] = {}
    [held] = worker._decide(record, touched, 1_000)
    state = touched[b"SO-FAIL-2"][1]
    assert len(state.held) == 1, held

    class _ExpiryFails(_FailsAfterItsChanges):
        def expire_holds(self, *args: Any, **kwargs: Any) -> Any:
            self.real.expire_holds(*args, **kwargs)
            raise RuntimeError("an engine bug while releasing")

    worker.engine = _ExpiryFails(real)  # type: ignore[assignment]
    far = 10**13  # every hold is past its timeout
    assert worker._expire(0, b"SO-FAIL-2", touched, far, None) == []
    assert len(state.held) == 1  # kept as it was, not half-expired
    worker.engine = real
    [expired] = worker._expire(0, b"SO-FAIL-2", touched, far, None)
    assert "hold.timeout" in str(expired), expired
