"""What a Redis-backed cache counts and reports: its counters, their listeners, the breaker.

One bookkeeping for both caches: the shared token cache (``_decisions.SharedCore`` and the
drivers in ``_drive`` record here, counting into :class:`SharedCacheStats`) and the DPoP replay
cache (``_replay``, counting into its ``ReplayCacheStats``). Each says in its :class:`Voice`
what an outage means for it. Nothing here does I/O. Counter names are exported to telemetry
(``_telemetry``) and listed in the docs: keep them stable.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Generic, NamedTuple, TypeVar

from ._breaker import BreakerState, CircuitBreaker
from ._codec import UndecodableEntry
from ._options import ConnectionOptions

__all__ = ["TOKEN_CACHE", "Ledger", "SharedCacheStats", "Voice"]

logger = logging.getLogger("m2m_client.cache")
StatsT = TypeVar("StatsT")


class Voice(NamedTuple):
    """How a cache names itself in its logs, and what its breaker opening and closing mean."""

    name: str
    outage: str
    """What this process does while the breaker is open (logged when it opens)."""
    recovery: str
    """What resumes when Redis answers again (logged when the breaker closes)."""
    round_trips: str = "redis_round_trips"
    """The counter of operations Redis answered."""


TOKEN_CACHE = Voice(
    "shared token cache", "this process fetches tokens on its own", "sharing tokens resumes"
)


@dataclass
class SharedCacheStats:
    """Running counters of one shared cache in this process (``cache.stats``)."""

    shared_hits: int = 0
    """Tokens another process fetched, returned without a token request."""
    negative_hits: int = 0
    """OAuth errors another process saw, re-raised without a token request."""
    fetches: int = 0
    """Token requests made through this cache (as lease holder or as fallback)."""
    coalesced: int = 0
    """Calls that joined a call of this cache for the same key already in flight in this
    process (the one single flight; a token client sends only its own flight owner, so
    through token clients it counts only calls of two clients sharing a cache)."""
    leases_won: int = 0
    leases_lost: int = 0
    """Calls that found another process fetching and waited for it (or used its valid token)."""
    leases_expired: int = 0
    """Leases taken over from a holder that vanished (or our own lease lapsed mid-fetch)."""
    waits_woken: int = 0
    """Waits ended by the holder's notification."""
    waits_polled: int = 0
    """Waits ended by the poll interval (the safety net)."""
    wait_timeouts: int = 0
    """Waits that gave up (``wait_timeout``) and fetched for themselves."""
    holder_failures: int = 0
    """Waits ended by the holder's failed fetch, raised here too (no turn of our own)."""
    redis_errors: int = 0
    redis_round_trips: int = 0
    fallbacks: int = 0
    """Calls that fetched for themselves because Redis failed or the breaker was open."""
    breaker_opened: int = 0
    breaker_closed: int = 0
    undecodable_entries: int = 0
    """Values that were garbage, foreign, or sealed with another key (each treated as a miss)."""

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Ledger(Generic[StatsT]):
    """Counters, listeners and the breaker of one Redis-backed cache (thread-safe).

    The breaker's transitions are counted (``breaker_opened`` / ``breaker_closed``) and logged
    at WARNING once each per outage: probes that fail while Redis stays down log at DEBUG."""

    def __init__(
        self,
        options: ConnectionOptions,
        on_event: Callable[[str], None] | None = None,
        *,
        stats: StatsT,
        voice: Voice = TOKEN_CACHE,
    ) -> None:
        self.on_event = on_event
        # Token clients using this cache listen too (weakly: a cache outlives its clients).
        self.listeners: list[weakref.WeakMethod[Callable[[str], None]]] = []
        self.stats = stats
        self.voice = voice
        self.breaker = CircuitBreaker(
            threshold=options.breaker_threshold, reset_seconds=options.breaker_reset_seconds
        )
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def count(self, name: str, n: int = 1) -> None:
        stats: Any = self.stats
        with self._lock:
            setattr(stats, name, getattr(stats, name) + n)
        if name == self.voice.round_trips:
            return
        hooks = [self.on_event] if self.on_event is not None else []
        hooks += [hook for ref in list(self.listeners) if (hook := ref()) is not None]
        for hook in hooks:
            try:
                hook(name)
            except Exception:  # a metrics hook must never break token fetching
                logger.exception("shared cache on_event hook failed")

    def add_listener(self, method: Callable[[str], None]) -> None:
        """Also report counter names to ``method`` (a bound method, held weakly)."""
        self.listeners = [ref for ref in self.listeners if ref() is not None]
        self.listeners.append(weakref.WeakMethod(method))

    def allow(self) -> bool:
        return self.breaker.allow(time.monotonic())

    def redis_ok(self) -> None:
        self.count(self.voice.round_trips)
        if self.breaker.succeeded() is BreakerState.CLOSED:
            self.count("breaker_closed")
            logger.warning("%s: Redis answers again; %s", self.voice.name, self.voice.recovery)

    def redis_failed(self, exc: BaseException) -> None:
        self.count("redis_errors")
        was_closed = self.breaker.state is BreakerState.CLOSED
        if self.breaker.failed(time.monotonic()) is BreakerState.OPEN and was_closed:
            self.count("breaker_opened")
            logger.warning(
                "%s: Redis failed (%s: %s); %s until Redis answers again (checked every %g s)",
                self.voice.name,
                type(exc).__name__,
                exc,
                self.voice.outage,
                self.breaker.reset_seconds,
            )
        else:
            # Failed probes while Redis stays down: the outage was logged when it began.
            logger.debug("%s: Redis operation failed: %r", self.voice.name, exc)

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self.breaker.reset()

    def undecodable(self, what: str, exc: UndecodableEntry) -> None:
        self.count("undecodable_entries")
        # Once per cache at WARNING: a fleet with a wrong key would otherwise log on every call.
        level = logging.DEBUG if "undecodable" in self._warned else logging.WARNING
        self._warned.add("undecodable")
        logger.log(level, "shared token cache: ignoring an unreadable %s entry (%s)", what, exc)

    def foreign_lease(self) -> None:
        if "foreign lease" not in self._warned:
            self._warned.add("foreign lease")
            logger.warning(
                "shared token cache: a lease in Redis was not written by a process holding this "
                "credential and encryption key (someone else can write to Redis?); this process "
                "fetches for itself while it stands"
            )
