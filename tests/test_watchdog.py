"""The watchdog: a blocked call past its deadline ends the process with one clear line."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from prometheus_client import CollectorRegistry, generate_latest

from revline.core.watchdog import EXIT_STALLED, Watchdog


def test_a_call_within_its_deadline_passes_and_progress_is_a_metric() -> None:
    registry = CollectorRegistry()
    stalls: list[str] = []
    dog = Watchdog("auditor", registry, poll_s=0.05, on_stall=stalls.append)
    with dog.deadline("commit", 5):
        time.sleep(0.1)
    dog.progress()
    assert stalls == [] and dog.overdue() == []
    text = generate_latest(registry).decode()
    assert 'revline_component_last_progress_timestamp_seconds{component="auditor"}' in text
    dog.stop()


def test_a_call_past_its_deadline_is_reported_while_it_still_blocks() -> None:
    stalls: list[str] = []
    seen = threading.Event()
    dog = Watchdog("auditor", poll_s=0.05, on_stall=lambda m: (stalls.append(m), seen.set()))
    with dog.deadline("send_offsets_to_transaction", 0.2):
        assert seen.wait(5)  # the block is still running: the watchdog thread spoke
    assert "send_offsets_to_transaction has not returned" in stalls[0]
    assert stalls[0].startswith("auditor:")
    dog.stop()


def test_a_stalled_process_exits_with_one_critical_line() -> None:
    code = (
        "import logging, time\n"
        "logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')\n"
        "from revline.core.watchdog import Watchdog\n"
        "dog = Watchdog('sink', poll_s=0.05)\n"
        "with dog.deadline('consume', 0.2):\n"
        "    time.sleep(30)\n"
    )
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=20, check=False)
    assert res.returncode == EXIT_STALLED
    assert time.monotonic() - started < 10
    assert "CRITICAL revline.watchdog: sink: consume has not returned" in res.stderr
    assert "Traceback" not in res.stderr
