"""A per-process circuit breaker for the shared cache. Pure: every method takes ``now``.

Closed: Redis is used. After ``threshold`` consecutive failed operations it opens: for
``reset_seconds`` nobody in this process talks to Redis (each caller behaves as without a
shared cache). Then one operation is let through (half-open): success closes the breaker,
failure opens it again. Transitions are reported once each, so a dead Redis logs two lines,
not one per call.
"""

from __future__ import annotations

import enum
import threading

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Decides whether this process may talk to Redis now. Thread-safe."""

    __slots__ = (
        "_failures",
        "_lock",
        "_opened_at",
        "_probe_at",
        "_probing",
        "reset_seconds",
        "state",
        "threshold",
    )

    def __init__(self, *, threshold: int = 2, reset_seconds: float = 5.0) -> None:
        self.threshold = max(1, threshold)
        self.reset_seconds = reset_seconds
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._probe_at = 0.0
        self._lock = threading.Lock()

    def allow(self, now: float) -> bool:
        """Whether an operation may go to Redis at ``now`` (claims the probe when half-open)."""
        with self._lock:
            if self.state is BreakerState.CLOSED:
                return True
            if self.state is BreakerState.OPEN and now - self._opened_at >= self.reset_seconds:
                self.state = BreakerState.HALF_OPEN
                self._probing = False
            # A probe that never reported (its caller was cancelled) must not keep the
            # breaker half-open for ever: after another reset period, probe again.
            stuck = self._probing and now - self._probe_at >= self.reset_seconds
            if self.state is BreakerState.HALF_OPEN and (not self._probing or stuck):
                self._probing = True
                self._probe_at = now
                return True
            return False

    def succeeded(self) -> BreakerState | None:
        """Record a successful operation; the new state if this closed the breaker."""
        with self._lock:
            self._failures = 0
            if self.state is BreakerState.CLOSED:
                return None
            self.state = BreakerState.CLOSED
            self._probing = False
            return BreakerState.CLOSED

    def failed(self, now: float) -> BreakerState | None:
        """Record a failed operation; the new state if this opened the breaker."""
        with self._lock:
            self._failures += 1
            if self.state is BreakerState.OPEN:
                return None
            if self.state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
                self.state = BreakerState.OPEN
                self._opened_at = now
                self._probing = False
                return BreakerState.OPEN
            return None

    def reset(self) -> None:
        """Forget everything (a forked child starts closed, with its own connections)."""
        self._lock = threading.Lock()
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._probing = False
