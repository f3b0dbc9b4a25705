"""The exception manager killed with SIGKILL and started again at once comes up: its
predecessor (same group.instance.id, session not yet expired) is not "a second
manager", while a manager of another instance still is."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from revline.tools.isolated import IsolatedPipeline

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

READY = "exception manager ready"


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, after: int, timeout: float) -> float:
    started = time.monotonic()
    while log.read_text(errors="replace").count(READY) <= after:
        assert proc.poll() is None, (f"the manager exited with {proc.returncode}:\n"
                                     + log.read_text(errors="replace")[-3000:])
        assert time.monotonic() - started < timeout, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    return time.monotonic() - started


def test_a_killed_manager_restarts_at_once_and_a_second_one_is_still_refused(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pipeline = IsolatedPipeline(kafka_bootstrap, tmp_path, extra_env={
        "REVLINE_SESSION_TIMEOUT_S": "30",  # long: a restart must not wait it out
        "REVLINE_INSTANCE_ID": f"em-{uuid.uuid4().hex[:6]}",
    })
    log = tmp_path / "manager.log"
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "revline.cli", "exceptions", "run"],
                                    env={**pipeline.env, **env}, stdout=out,
                                    stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        first = start()
        _wait_ready(first, log, 0, 120)
        time.sleep(3)  # joined the group
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed = time.monotonic()
        second = start()
        _wait_ready(second, log, 1, 60)
        restarted_s = time.monotonic() - killed
        print(f"exception manager restarted {restarted_s:.1f} s after SIGKILL "
              "(session timeout 30 s)")
        assert restarted_s < 30
        time.sleep(3)
        # Another instance's manager is refused while this one runs.
        other = start(REVLINE_INSTANCE_ID="somewhere-else", REVLINE_STATE_DIR=str(tmp_path / "o"))
        assert other.wait(120) == 2
        assert "an exception manager is already running" in log.read_text(errors="replace")
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
