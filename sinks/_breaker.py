"""A per-adapter circuit breaker: closed → open → half-open → closed.

closed: calls go through; ``failure_threshold`` consecutive failures open it.
open: calls are refused until ``cooldown_s`` has passed, then it is half-open.
half-open: one probe goes through; success closes it, failure re-opens it (and
restarts the cool-down).
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cooldown_s < 0:
            raise ValueError("cooldown_s must not be negative")
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        # Half-open is derived from time so nobody has to tick the breaker.
        if self._clock() - self._opened_at >= self.cooldown_s:
            return HALF_OPEN
        return OPEN

    def allow(self) -> bool:
        """True when a call may go out now (closed, or a half-open probe)."""
        return self.state != OPEN

    def remaining_s(self) -> float:
        """Seconds until the next probe is allowed (0 when not open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None

    def record_failure(self) -> None:
        if self._opened_at is not None:  # a failed half-open probe: open again
            self._opened_at = self._clock()
            self.times_opened += 1
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self.times_opened += 1

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, {self.state}, failures={self._failures})"
