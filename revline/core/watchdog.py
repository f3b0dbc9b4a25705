"""Liveness for long-running components: a progress heartbeat and deadlines on blocking calls.

A chaos run found the auditor blocked for good inside a transactional Kafka call after
a broker restart: librdkafka did not honour the call's timeout, nothing was logged,
SIGTERM was ignored, and the trail silently stopped growing. A component that cannot
make progress must say so and exit, so its supervisor restarts it (crash-only, like the
worker): every component wraps its blocking Kafka calls in ``deadline()`` and calls
``progress()`` whenever it has done work or confirmed there is none to do.

The checking runs in a daemon thread, so it works while the main thread is stuck in C
code. On a missed deadline it logs one CRITICAL line naming the call and exits the
process with ``EXIT_STALLED`` (``os._exit``: a wedged client cannot be shut down
cleanly, and nothing half-done is durable by design).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger("revline.watchdog")

EXIT_STALLED = 75  # EX_TEMPFAIL: try again (a supervisor restarts the component)


class Watchdog:
    """One component's heartbeat gauge and its in-flight call deadlines."""

    def __init__(
        self,
        component: str,
        registry: CollectorRegistry | None = None,
        *,
        poll_s: float = 1.0,
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.component = component
        self._poll_s = poll_s
        self._on_stall = on_stall or _exit_stalled
        self._calls: dict[int, tuple[str, float, float]] = {}  # id -> (what, started, deadline)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_progress = time.time()
        self._gauge: Gauge | None = None
        if registry is not None:
            self._gauge = Gauge(
                "revline_component_last_progress_timestamp_seconds",
                "Unix time of the component's last progress (work done, or none waiting)",
                ["component"], registry=registry,
            )
            self._gauge.labels(component).set(self.last_progress)

    def progress(self) -> None:
        self.last_progress = time.time()
        if self._gauge is not None:
            self._gauge.labels(self.component).set(self.last_progress)

    @contextlib.contextmanager
    def deadline(self, what: str, seconds: float) -> Iterator[None]:
        """Run the block; if it has not returned after ``seconds``, the process exits."""
        call = next(self._ids)
        now = time.monotonic()
        with self._lock:
            self._calls[call] = (what, now, now + seconds)
        self._ensure_thread()
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(call, None)

    def overdue(self) -> list[str]:
        """Descriptions of the calls past their deadline, oldest first."""
        now = time.monotonic()
        with self._lock:
            late = sorted((started, what, deadline) for what, started, deadline
                          in self._calls.values() if now > deadline)
        return [f"{what} has not returned after {now - started:.0f} s"
                for started, what, _ in late]

    def stop(self) -> None:
        self._stop.set()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"watchdog-{self.component}")
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            late = self.overdue()
            if late:
                self._on_stall(f"{self.component}: {late[0]}; exiting so the supervisor "
                               "restarts it")
                return


def _exit_stalled(message: str) -> None:
    log.critical(message)
    logging.shutdown()
    os._exit(EXIT_STALLED)
