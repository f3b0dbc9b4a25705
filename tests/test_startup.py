"""revline.startup: which errors start-up waits out, how long, and what it says."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from revline.core import startup
from revline.core.errors import ConfigurationError, InfrastructureError
from revline.core.startup import StartupTimeoutError, is_transient, retry_startup


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(errors: list[BaseException], result: Any = "ok") -> Callable[[], Any]:
    def fn() -> Any:
        if errors:
            raise errors.pop(0)
        return result
    return fn


def kafka(code: int) -> KafkaException:
    return KafkaException(KafkaError(code))


def wrapped(cause: BaseException) -> InfrastructureError:
    try:
        raise InfrastructureError("cannot describe consumer group 'g'") from cause
    except InfrastructureError as exc:
        return exc


@pytest.mark.parametrize("error", [
    kafka(KafkaError.NOT_COORDINATOR),
    kafka(KafkaError.COORDINATOR_LOAD_IN_PROGRESS),
    kafka(KafkaError.COORDINATOR_NOT_AVAILABLE),
    kafka(KafkaError._TRANSPORT),
    kafka(KafkaError._TIMED_OUT),
    kafka(KafkaError.LEADER_NOT_AVAILABLE),
    concurrent.futures.TimeoutError(),
    wrapped(concurrent.futures.TimeoutError()),
    wrapped(kafka(KafkaError.NOT_COORDINATOR)),
], ids=lambda e: type(e).__name__ + (f"({e.__cause__!r})" if e.__cause__ else f"({e})"))
def test_transient_errors_are_waited_out(error: BaseException,
                                         caplog: pytest.LogCaptureFixture) -> None:
    assert is_transient(error)
    clock = FakeClock()
    with caplog.at_level(logging.INFO, "revline.startup"):
        assert retry_startup(failing([error, error, error]), "the coordinator of group 'g'",
                             timeout_s=60, component="sink", sleep=clock.sleep,
                             clock=clock) == "ok"
    assert len(clock.sleeps) == 3
    assert clock.sleeps[0] <= clock.sleeps[1] <= clock.sleeps[2]  # backoff grows
    assert "sink: waiting for the coordinator of group 'g'" in caplog.text


@pytest.mark.parametrize("error", [
    kafka(KafkaError.TOPIC_AUTHORIZATION_FAILED),
    kafka(KafkaError.INVALID_REPLICATION_FACTOR),
    ConfigurationError("an exception manager is already running"),
    ValueError("a bug"),
])
def test_other_errors_fail_at_once(error: BaseException) -> None:
    clock = FakeClock()
    with pytest.raises(type(error)):
        retry_startup(failing([error]), "x", timeout_s=60, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == []


def test_after_the_deadline_one_clear_error() -> None:
    clock = FakeClock()
    errors: list[BaseException] = [kafka(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)] * 1000
    with pytest.raises(StartupTimeoutError) as raised:
        retry_startup(failing(errors), "consumer group 'g'", timeout_s=30, component="exceptions",
                      sleep=clock.sleep, clock=clock)
    message = str(raised.value)
    assert message.startswith("exceptions: gave up after 30 s waiting for consumer group 'g'")
    assert "COORDINATOR_LOAD_IN_PROGRESS" in message and "REVLINE_STARTUP_TIMEOUT_S" in message
    assert "\n" not in message
    assert 30 <= clock.now <= 31
    assert max(clock.sleeps) <= startup.BACKOFF_MAX_S


def test_the_deadline_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVLINE_STARTUP_TIMEOUT_S", "7")
    assert startup.default_timeout_s() == 7
    monkeypatch.setenv("REVLINE_STARTUP_TIMEOUT_S", "junk")
    assert startup.default_timeout_s() == startup.DEFAULT_TIMEOUT_S


def test_the_second_manager_check_retries_what_the_issue_saw(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client-side timeout, then NOT_COORDINATOR, then the answer (issues 16 and 17)."""
    import revline.core.admin
    from revline.streams.exceptions import _refuse_second_manager

    answers: list[Any] = [wrapped(concurrent.futures.TimeoutError()),
                          wrapped(kafka(KafkaError.NOT_COORDINATOR)), []]
    seen: list[str | None] = []

    def live_members(admin: Any, group: str, *, except_instance: str | None = None) -> Any:
        seen.append(except_instance)
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(revline.core.admin, "live_members", live_members)
    clock = FakeClock()
    retry_startup(lambda: _refuse_second_manager("127.0.0.1:1", "g", "host-exceptions"),
                  "group g", timeout_s=60, sleep=clock.sleep, clock=clock)
    assert seen == ["host-exceptions"] * 3
    answers[:] = [["other-host (10.0.0.2, member m, instance other-exceptions)"]]
    with pytest.raises(ConfigurationError, match="already running"):
        retry_startup(lambda: _refuse_second_manager("127.0.0.1:1", "g", "host-exceptions"),
                      "group g", timeout_s=60, sleep=clock.sleep, clock=clock)


def test_instance_ids_are_stable_and_one_live_process_holds_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REVLINE_INSTANCE_ID", "eu-1")
    assert startup.group_instance_id("sink") == "eu-1-sink"
    assert startup.group_instance_id("sink", "b/2") == "b-2-sink"
    config = startup.membership_config(6.0, "sink")
    assert config["session.timeout.ms"] == 6000 and config["group.instance.id"] == "eu-1-sink"
    startup.claim_instance(tmp_path, "g-eu-1-sink")
    startup.claim_instance(tmp_path, "g-eu-1-sink")  # the same process again: fine
    # Another process holding it is refused with one clear line.
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path\n"
            "from revline.core.startup import claim_instance\n"
            "try:\n claim_instance(Path(sys.argv[1]), 'g-eu-1-sink')\n"
            "except Exception as e:\n print(e); sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 3, other.stdout + other.stderr
    assert "g-eu-1-sink already runs on this host" in other.stdout
    assert "--instance or REVLINE_INSTANCE_ID" in other.stdout


def test_a_worker_that_faust_stops_says_why(caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """mode's exiting() turns any failure into a bare exit 1; the worker logs the cause,
    and re-runs itself only for a transient one within the start-up deadline."""
    import time

    from revline.core.settings import Settings
    from revline.streams import app

    settings = Settings(_env_file=None, startup_timeout_s=60)  # type: ignore[call-arg]
    with caplog.at_level(logging.INFO, "revline.worker"):
        app._after_faust_failure(settings, RuntimeError("assignor blew up"), time.time(), 1)
    assert "worker stopped (exit 1): RuntimeError: assignor blew up" in caplog.text
    execs: list[list[str]] = []
    monkeypatch.setattr("revline.streams.app.os.execve", lambda path, argv, env: execs.append(argv))
    monkeypatch.setattr("revline.streams.app.time.sleep", lambda s: None)
    transient = kafka(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    app._after_faust_failure(settings, transient, time.time(), 1)
    assert len(execs) == 1  # started again
    app._after_faust_failure(settings, transient, time.time() - 61, 1)
    assert len(execs) == 1  # past the deadline: stays down, says why
    assert "COORDINATOR_LOAD_IN_PROGRESS" in caplog.text
