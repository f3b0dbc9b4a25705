"""Start-up that survives a cold cluster: one retry policy for every component.

A broker that has just started answers for a while with errors that mean "not yet":
the group coordinator is loading (``COORDINATOR_LOAD_IN_PROGRESS``) or moving
(``NOT_COORDINATOR``), the offsets topic does not exist yet, a partition has no
leader, a request times out on the client (``concurrent.futures.TimeoutError``). A
component's start-up checks retry exactly those with exponential backoff, say what
they are waiting for, and fail only after ``REVLINE_STARTUP_TIMEOUT_S`` (default
120 s) with one message naming the last error. Anything else (a refused
configuration, a missing permission) fails at once.

Also here: the static group membership id of a component instance
(``group.instance.id``), so a restarted process takes over its own partitions at
once instead of after a rebalance (its predecessor's session is its own).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from confluent_kafka import KafkaError, KafkaException

from revline.core.errors import ConfigurationError, InfrastructureError

T = TypeVar("T")

log = logging.getLogger("revline.startup")

DEFAULT_TIMEOUT_S = 120.0
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 5.0

# Transient whatever librdkafka's retriable() says: a broker, a coordinator or a
# partition leader that is not there *yet*.
TRANSIENT_CODES = frozenset({
    KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE, KafkaError._WAIT_COORD, KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC, KafkaError._MSG_TIMED_OUT,
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION, KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NOT_CONTROLLER, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.KAFKA_STORAGE_ERROR, KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.CONCURRENT_TRANSACTIONS,
})


# How many retry_startup calls are waiting right now. A process in one has nothing in
# flight, so the command line lets SIGINT/SIGTERM end it at once even in a component that
# otherwise stops gracefully (a cold cluster's wait is minutes of nothing to finish).
_waiting = 0


def waiting() -> bool:
    """True while some start-up check is waiting out transient errors."""
    return _waiting > 0


class StartupTimeoutError(InfrastructureError):
    """Start-up waited out its deadline on transient errors."""


class NotReadyError(Exception):
    """Raised by a start-up check for a state that is expected to pass by itself."""


def kafka_error(exc: BaseException) -> KafkaError | None:
    """The KafkaError an exception (or one of its causes) carries, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, KafkaException) and current.args \
                and isinstance(current.args[0], KafkaError):
            return current.args[0]
        current = current.__cause__ or current.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """True for "not yet" errors: retriable Kafka errors and client-side timeouts,
    also when wrapped (an InfrastructureError raised from one)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, NotReadyError | concurrent.futures.TimeoutError):
            return True
        # aiokafka (the Faust worker's client) marks its transient errors as retriable;
        # its KafkaTimeoutError is a client-side timeout.
        if type(current).__module__.startswith("aiokafka") and (
                getattr(current, "retriable", False) is True
                or type(current).__name__ in ("KafkaTimeoutError", "RequestTimedOutError")):
            return True
        if isinstance(current, KafkaException):
            error = kafka_error(current)
            if error is None:
                return False
            if error.fatal():
                return False
            return bool(error.retriable()) or error.code() in TRANSIENT_CODES
        current = current.__cause__ or current.__context__
    return False


def _describe(exc: BaseException) -> str:
    error = kafka_error(exc)
    if error is not None:
        return f"{error.name()}: {error.str()}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def default_timeout_s() -> float:
    """REVLINE_STARTUP_TIMEOUT_S (validated by Settings for the CLI), else 120 s."""
    raw = os.environ.get("REVLINE_STARTUP_TIMEOUT_S", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def retry_startup(
    fn: Callable[[], T],
    what: str,
    *,
    timeout_s: float | None = None,
    component: str = "",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, retried with exponential backoff while it fails transiently.

    Logs what it waits for (the first time and then about every 10 s at WARNING, the
    rest at INFO); after ``timeout_s`` (default REVLINE_STARTUP_TIMEOUT_S) raises
    ``StartupTimeoutError`` with one message naming the last error. A non-transient
    error is raised at once, unchanged.
    """
    global _waiting
    _waiting += 1
    try:
        return _retry(fn, what, timeout_s=timeout_s, component=component, sleep=sleep,
                      clock=clock)
    finally:
        _waiting -= 1


def _retry(fn: Callable[[], T], what: str, *, timeout_s: float | None, component: str,
           sleep: Callable[[float], None], clock: Callable[[], float]) -> T:
    budget = default_timeout_s() if timeout_s is None else timeout_s
    started = clock()
    deadline = started + budget
    delay = BACKOFF_FIRST_S
    attempt = 0
    last_warned = float("-inf")
    who = f"{component}: " if component else ""
    while True:
        attempt += 1
        try:
            result = fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            now = clock()
            if now >= deadline:
                raise StartupTimeoutError(
                    f"{who}gave up after {now - started:.0f} s waiting for {what} "
                    f"({attempt} attempts; last: {_one_line(_describe(exc))}). Is Kafka up "
                    "and reachable? REVLINE_STARTUP_TIMEOUT_S sets how long start-up waits"
                ) from exc
            pause = min(delay, deadline - now) * random.uniform(0.8, 1.0)
            level = logging.WARNING if now - last_warned >= 10 else logging.INFO
            if level == logging.WARNING:
                last_warned = now
            log.log(level, "%swaiting for %s: %s; retrying in %.1f s (%.0f s left)", who, what,
                    _one_line(_describe(exc)), pause, deadline - now)
            sleep(pause)
            delay = min(delay * 2, BACKOFF_MAX_S)
            continue
        if attempt > 1:
            log.info("%s%s ready after %.1f s", who, what, clock() - started)
        return result


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


# -- static group membership ---------------------------------------------------------------
def instance_name(explicit: str | None = None) -> str:
    """This process's instance name: --instance, else REVLINE_INSTANCE_ID, else the host."""
    name = explicit or os.environ.get("REVLINE_INSTANCE_ID") or socket.gethostname() or "local"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name.strip())[:200] or "local"


def group_instance_id(component: str, instance: str | None = None) -> str:
    """A stable ``group.instance.id``: the same for a restarted process of one instance,
    different for each instance (two members with one id fence each other)."""
    return f"{instance_name(instance)}-{component}"


def membership_config(session_timeout_s: float, component: str,
                      instance: str | None = None) -> dict[str, object]:
    """Consumer settings for fast fail-over: the session timeout, static membership."""
    return {
        "session.timeout.ms": int(session_timeout_s * 1000),
        "heartbeat.interval.ms": max(500, int(session_timeout_s * 1000 / 5)),
        "group.instance.id": group_instance_id(component, instance),
    }


# Held for the life of the process (the OS frees them at exit); a process may claim
# the same id again (in-process tests build several processors).
_CLAIMS: dict[Path, IO[str]] = {}


def claim_instance(state_dir: Path, instance_id: str) -> None:
    """Refuse to start a second live process of one ``group.instance.id`` on this host.

    Two members with one static id fence each other (the older one dies); a killed
    process's lock dies with it, so a restart after kill -9 is never refused.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = (state_dir / f"instance-{instance_id}.lock").absolute()
    if path in _CLAIMS:
        return
    handle = path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigurationError(
            f"{instance_id} already runs on this host ({holder}, lock {path}); a second "
            "member with the same group.instance.id would fence it. Give each instance its "
            "own name: --instance or REVLINE_INSTANCE_ID") from None
    with contextlib.suppress(OSError):
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
    _CLAIMS[path] = handle


def fenced_message(component: str, instance_id: str) -> str:
    return (f"{component}: another process joined the group as {instance_id!r} "
            "(group.instance.id) and took over this one's partitions; each instance needs its "
            "own name: --instance or REVLINE_INSTANCE_ID")


def wait_for_group_coordinator(bootstrap: str, group: str, *, component: str = "",
                               timeout_s: float | None = None) -> None:
    """Until the broker can serve ``group`` (on a new cluster, its offsets topic is only
    created by the first request and loads for a while)."""
    from confluent_kafka.admin import AdminClient

    from revline.core.kafka_config import client_config

    admin = AdminClient(client_config("admin", bootstrap, {"log_level": 3}, component=component))

    def describe() -> None:
        future = admin.describe_consumer_groups([group], request_timeout=10)[group]
        future.result(timeout=15)

    retry_startup(describe, f"the coordinator of consumer group {group!r}",
                  timeout_s=timeout_s, component=component)
