"""The options of the Redis caches, each object validated once, when it is made.

:class:`ConnectionOptions` is what every Redis cache has (timeouts per operation, the circuit
breaker); :class:`SharedOptions` adds the token cache's lease and waits, :class:`ReplayOptions`
the DPoP replay cache's own. One rule for every number of seconds: finite, > 0 and at most a
day (a NaN, an infinity or 1e300 would be a wait without a deadline), so the two caches
cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from m2m_client.errors import ConfigurationError

__all__ = ["ConnectionOptions", "OnUnavailable", "ReplayOptions", "SharedOptions"]

OnUnavailable = Literal["refuse", "memory"]
_MAX_NAMESPACE = 64
#: The longest of any seconds option: a finite 1e300 is no deadline either (and overflows
#: the lease keep-alive thread's wait, time_t, and Redis's PX).
MAX_SECONDS = 86_400


def _seconds(name: str, value: object, *, zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if zero else value > 0) and value <= MAX_SECONDS):  # type: ignore[operator]
        raise ConfigurationError(
            f"{name} must be {'>=' if zero else '>'} 0 and at most {MAX_SECONDS}, not {value!r}"
        )


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """How a cache talks to Redis: per-operation timeouts (one quick retry), the breaker."""

    operation_timeout: float = 0.25
    connect_timeout: float = 0.25
    breaker_threshold: int = 2
    breaker_reset_seconds: float = 5.0

    def __post_init__(self) -> None:
        for name in ("operation_timeout", "connect_timeout", "breaker_reset_seconds"):
            _seconds(name, getattr(self, name))
        threshold = self.breaker_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigurationError(f"breaker_threshold must be an int >= 1, not {threshold!r}")

    @property
    def guard(self) -> float:
        """The whole of one async round trip, waits for a connection or a thread included."""
        return (self.operation_timeout + self.connect_timeout) * 2 + 0.5


@dataclass(frozen=True, slots=True)
class SharedOptions(ConnectionOptions):
    """The token cache's (see the cache classes for their meaning)."""

    lease_seconds: float = 5.0
    poll_interval: float = 0.5
    wait_timeout: float = 35.0
    negative_seconds: float = 10.0

    def __post_init__(self) -> None:
        ConnectionOptions.__post_init__(self)
        for name in ("lease_seconds", "poll_interval", "wait_timeout"):
            _seconds(name, getattr(self, name))
        _seconds("negative_seconds", self.negative_seconds, zero=True)
        if self.poll_interval > self.lease_seconds:
            # The poll is the safety net for a lost wake-up: it must notice a lapsed lease.
            raise ConfigurationError(
                f"poll_interval ({self.poll_interval}) must not exceed lease_seconds "
                f"({self.lease_seconds})"
            )


@dataclass(frozen=True, slots=True)
class ReplayOptions(ConnectionOptions):
    """The DPoP replay cache's (see ``RedisReplayCache``)."""

    namespace: str = "m2m"
    on_unavailable: OnUnavailable = "refuse"
    clock_skew: float = 5.0
    fallback_entries: int = 100_000

    def __post_init__(self) -> None:
        ConnectionOptions.__post_init__(self)
        ns = self.namespace
        if (
            not isinstance(ns, str)
            or not ns
            or len(ns) > _MAX_NAMESPACE
            or not ns.isprintable()
            or any(c.isspace() or c in "{}" for c in ns)
        ):
            raise ConfigurationError(
                f"namespace must be 1-{_MAX_NAMESPACE} printable characters without braces "
                "or spaces"
            )
        if self.on_unavailable not in ("refuse", "memory"):
            raise ConfigurationError("on_unavailable must be 'refuse' or 'memory'")
        skew = self.clock_skew
        if not (isinstance(skew, int | float) and 0 <= skew < 86400):
            raise ConfigurationError(f"clock_skew must be 0-86400 seconds, not {skew!r}")
