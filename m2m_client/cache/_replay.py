"""The DPoP replay cache a fleet of verifiers shares through Redis or Valkey (RFC 9449 §11.1).

A proof's ``jti`` is remembered by ``SET name value NX PX ttl``: one atomic command decides
which instance saw the proof first, so a proof replayed to any other instance is refused.

- **Names are bounded**: ``<namespace>:dpop-jti:`` and the SHA-256 of the replay key (the
  key's thumbprint and the ``jti``, both chosen by the caller), base64url: 43 characters
  whatever the ``jti``. Nothing secret is stored (a value is 12 random bytes), so no
  encryption.
- **Expiry without trusting Redis's clock**: the TTL is relative (``PX``), the time the
  proof can still pass the ``iat`` window on our clock, plus ``clock_skew`` for verifiers
  whose clocks lag ours (they accept the proof for longer).
- **A retried SET is not a replay**: redis-py retries once after a lost connection, and the
  first attempt may have been executed. The value is random per call, so a SET that finds
  the key holding *our* value was our own first attempt.
- **Redis down**: short timeouts (one quick retry) and the circuit breaker of the token
  cache: after ``breaker_threshold`` failures in a row, Redis is left alone for
  ``breaker_reset_seconds``, and every check is answered at once, without waiting:
  ``on_unavailable="refuse"`` (the default) raises
  :class:`~m2m_client.errors.ReplayCacheUnavailable` (HTTP 503), ``"memory"`` checks the
  proof in this process only (a replay to another instance then passes).
- **"memory" remembers both ways**: with ``on_unavailable="memory"`` every proof this
  instance accepts is also recorded in its in-process cache (bounded, each entry until its
  proof's window ends), whether Redis answered or not. A proof used before an outage is
  refused when replayed to this instance during it, and one used during an outage is refused
  when replayed to this instance after Redis returns.
- Any exception out of the Redis client (not only redis-py's) counts as Redis failing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Literal

import anyio
import anyio.to_thread

from m2m_client.errors import ConfigurationError, ReplayCacheUnavailable
from m2m_client.verify._proof import MemoryReplayCache

from ._breaker import BreakerState, CircuitBreaker
from ._core import Options
from ._executors import AsyncExecutor, SyncExecutor, ThreadedExecutor
from ._redis import (
    _build_client,
    _connection_params,
    _import_redis,
    _is_async,
    _LoopExecutor,
    _on_asyncio,
)

__all__ = ["RedisReplayCache", "ReplayCacheStats"]

logger = logging.getLogger("m2m_client.cache")

OnUnavailable = Literal["refuse", "memory"]
# ~4,400 years: a bound for PX whatever expires_at a caller passes.
_MAX_TTL_MS = 2**47
_MAX_NAMESPACE = 64
# Concurrent commands (and so connections) per event loop on the native asyncio path.
_NATIVE_CONCURRENCY = 32


@dataclass
class ReplayCacheStats:
    """Running counters of one :class:`RedisReplayCache` in this process (``cache.stats``)."""

    checks: int = 0
    """Proofs Redis answered for (first uses and replays)."""
    replays: int = 0
    """Proofs refused as replays (by Redis, or by the in-process fallback)."""
    redis_errors: int = 0
    unavailable: int = 0
    """Proofs answered without Redis: refused with 503, or checked in this process only."""
    breaker_opened: int = 0
    breaker_closed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def replay_name(namespace: str, key: str) -> str:
    """The Redis key for a replay key: bounded, whatever the caller put in its ``jti``."""
    # surrogatepass: a JSON "\ud800" escape is a valid jti, and must not crash the check.
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return f"{namespace}:dpop-jti:{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


def _set_sync(client: Any, name: str, value: bytes, ttl_ms: int) -> bool:
    if client.set(name, value, nx=True, px=ttl_ms):
        return True
    # Not set: a replay, or our own SET whose answer was lost and which redis-py retried.
    # Bounded: a value planted by whoever can write Redis is never read whole.
    return bool(client.getrange(name, 0, len(value)) == value)


async def _set_async(client: Any, name: str, value: bytes, ttl_ms: int) -> bool:
    if await client.set(name, value, nx=True, px=ttl_ms):
        return True
    return bool(await client.getrange(name, 0, len(value)) == value)


class RedisReplayCache:
    """A DPoP replay cache shared by every verifier of a fleet through Redis or Valkey.

    >>> replay = RedisReplayCache.from_url("redis://cache:6379/0")
    >>> verifier = AsyncTokenVerifier(issuer=..., audience=..., dpop="required",
    ...                               dpop_checker=DPoPChecker(replay_cache=replay))

    Works with :class:`~m2m_client.verify.TokenVerifier` (``first_use``, blocking, in the
    caller's thread) and :class:`~m2m_client.verify.AsyncTokenVerifier`
    (``first_use_async``: redis.asyncio on asyncio, worker threads under trio). The client
    you pass is only read for its connection settings (see ``RedisTokenCache``).
    """

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = "m2m",
        on_unavailable: OnUnavailable = "refuse",
        clock_skew: float = 5.0,
        operation_timeout: float = 0.25,
        connect_timeout: float = 0.25,
        breaker_threshold: int = 2,
        breaker_reset_seconds: float = 5.0,
        fallback_entries: int = 100_000,
    ) -> None:
        """Wrap ``client`` (a ``redis.Redis`` or ``redis.asyncio.Redis``; Valkey alike).

        ``namespace`` prefixes every key. ``on_unavailable``: what a check does while Redis
        fails or the breaker is open: ``"refuse"`` raises ``ReplayCacheUnavailable`` (503:
        no proof passes unchecked), ``"memory"`` checks it in an in-process
        ``MemoryReplayCache(fallback_entries)`` (no outage for the API, but a proof
        replayed to another instance passes meanwhile); it also records every proof
        accepted while Redis answers, so a replay to this instance is refused across the start
        and the end of an outage. ``clock_skew``: seconds an entry
        outlives its proof's ``iat`` window, for verifiers whose clocks lag this one's.
        ``operation_timeout`` / ``connect_timeout``: per Redis command (one quick retry).
        ``breaker_threshold`` failures in a row leave Redis alone for
        ``breaker_reset_seconds``.
        """
        self._redis = _import_redis()
        if (
            not isinstance(namespace, str)
            or not namespace
            or len(namespace) > _MAX_NAMESPACE
            or not namespace.isprintable()
            or any(c.isspace() or c in "{}" for c in namespace)
        ):
            raise ConfigurationError(
                f"namespace must be 1-{_MAX_NAMESPACE} printable characters without braces "
                "or spaces"
            )
        if on_unavailable not in ("refuse", "memory"):
            raise ConfigurationError("on_unavailable must be 'refuse' or 'memory'")
        for name, value in (
            ("operation_timeout", operation_timeout),
            ("connect_timeout", connect_timeout),
            ("breaker_reset_seconds", breaker_reset_seconds),
        ):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"{name} must be > 0, not {value!r}")
        if not (isinstance(clock_skew, (int, float)) and 0 <= clock_skew < 86400):
            raise ConfigurationError(f"clock_skew must be 0-86400 seconds, not {clock_skew!r}")
        self._options = Options(
            operation_timeout=operation_timeout,
            connect_timeout=connect_timeout,
            breaker_threshold=breaker_threshold,
            breaker_reset_seconds=breaker_reset_seconds,
        )
        self.namespace = namespace
        self.on_unavailable: OnUnavailable = on_unavailable
        self._skew = float(clock_skew)
        self._fallback_entries = fallback_entries
        self._fallback = MemoryReplayCache(fallback_entries) if on_unavailable == "memory" else None
        self._breaker = CircuitBreaker(
            threshold=breaker_threshold, reset_seconds=breaker_reset_seconds
        )
        self.stats = ReplayCacheStats()
        self._client = client
        self._params = _connection_params(client)
        self._client_is_async = _is_async(client)
        # The whole async round trip, waits for a connection or a thread included.
        self._guard = (operation_timeout + connect_timeout) * 2 + 0.5
        self._closed = False
        self._setup()

    def _setup(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._sync: SyncExecutor | None = None
        self._threaded: ThreadedExecutor | None = None
        # asyncio connections belong to one event loop: one client per loop, closed when
        # the loop shuts down (see _LoopExecutor) or by aclose().
        self._native: dict[int, tuple[_LoopExecutor, asyncio.Semaphore]] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisReplayCache:
        """``RedisReplayCache.from_url("redis://cache:6379/0", on_unavailable="refuse")``."""
        redis = _import_redis()
        return cls(redis.Redis.from_url(url), **options)

    # --- the ReplayCache protocol ---------------------------------------------------------

    def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        """Record ``key`` fleet-wide; True if no verifier recorded it before (blocking)."""
        name, value, ttl_ms = self._entry(key, expires_at, now)
        if self._closed or not self._breaker.allow(time.monotonic()):
            return self._without_redis(key, expires_at, now, None)
        try:
            client = self._sync_executor().client
            first = _set_sync(client, name, value, ttl_ms)
        except Exception as exc:  # whatever the Redis client raises
            if isinstance(exc, ConfigurationError):
                raise
            return self._without_redis(key, expires_at, now, exc)
        return self._answered(first, key, expires_at, now)

    async def first_use_async(self, key: str, *, expires_at: float, now: float) -> bool:
        """:meth:`first_use` for async verifiers: the event loop never waits on a socket."""
        name, value, ttl_ms = self._entry(key, expires_at, now)
        if self._closed or not self._breaker.allow(time.monotonic()):
            return self._without_redis(key, expires_at, now, None)
        try:
            with anyio.fail_after(self._guard):
                if _on_asyncio() and (self._params is not None or self._client_is_async):
                    executor, slots = await self._native_executor()
                    async with slots:
                        first = await _set_async(executor.client, name, value, ttl_ms)
                else:
                    threaded = self._threaded_executor()
                    first = await anyio.to_thread.run_sync(
                        _set_sync,
                        threaded.sync.client,
                        name,
                        value,
                        ttl_ms,
                        limiter=threaded.limiter,
                    )
        except Exception as exc:  # whatever the Redis client raises; TimeoutError (fail_after)
            if isinstance(exc, ConfigurationError):
                raise
            return self._without_redis(key, expires_at, now, exc)
        return self._answered(first, key, expires_at, now)

    # --- decisions shared by both --------------------------------------------------------

    def _entry(self, key: str, expires_at: float, now: float) -> tuple[str, bytes, int]:
        if self._pid != os.getpid():
            self._after_fork()
        # Relative expiry, so Redis's own clock does not matter; ours may be off from the
        # other verifiers' by up to clock_skew, and theirs decides how long they accept it.
        seconds = expires_at - now + self._skew
        if math.isfinite(seconds):
            ttl_ms = min(max(1, math.ceil(seconds * 1000)), _MAX_TTL_MS)
        else:
            ttl_ms = _MAX_TTL_MS if seconds > 0 else 1
        return replay_name(self.namespace, key), secrets.token_bytes(12), ttl_ms

    def _answered(self, first: bool, key: str, expires_at: float, now: float) -> bool:
        self.stats.checks += 1
        if first and self._fallback is not None:
            # Remember it here too: a replay to this instance during an outage is refused,
            # and a proof this instance accepted during one is refused now.
            first = self._fallback.first_use(key, expires_at=expires_at, now=now)
        if not first:
            self.stats.replays += 1
        if self._breaker.succeeded() is BreakerState.CLOSED:
            self.stats.breaker_closed += 1
            logger.warning("DPoP replay cache: Redis answers again; replays are refused fleet-wide")
        return first

    def _without_redis(
        self, key: str, expires_at: float, now: float, exc: BaseException | None
    ) -> bool:
        if exc is not None:
            self.stats.redis_errors += 1
            if self._breaker.failed(time.monotonic()) is BreakerState.OPEN:
                self.stats.breaker_opened += 1
                logger.warning(
                    "DPoP replay cache: Redis failed (%s); for %g s %s",
                    type(exc).__name__,
                    self._breaker.reset_seconds,
                    "DPoP requests are refused (503)"
                    if self._fallback is None
                    else "proofs are checked for replay in this process only",
                )
        self.stats.unavailable += 1
        if self._fallback is None:
            raise ReplayCacheUnavailable(
                "the DPoP proof could not be checked for replay: the shared replay cache "
                "(Redis) is unavailable",
                retry_after=self._breaker.reset_seconds,
            ) from exc
        first = self._fallback.first_use(key, expires_at=expires_at, now=now)
        if not first:
            self.stats.replays += 1
        return first

    # --- connections -----------------------------------------------------------------------

    def _sync_executor(self) -> SyncExecutor:
        executor = self._sync
        if executor is None:
            with self._lock:
                if self._sync is None:
                    self._sync = self._build_sync()
                executor = self._sync
        return executor

    def _build_sync(self) -> SyncExecutor:
        redis = self._redis
        if self._params is None:
            if self._client_is_async:
                raise ConfigurationError(
                    "RedisReplayCache cannot copy this redis.asyncio client into a sync one "
                    "(for TokenVerifier, or trio): pass a sync redis.Redis"
                )
            return SyncExecutor(self._client, self._options, owned=False)
        retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1)  # one quick retry, no sleep
        built = _build_client(redis.Redis, self._params, self._options, retry)
        return SyncExecutor(built, self._options, owned=True)

    def _threaded_executor(self) -> ThreadedExecutor:
        threaded = self._threaded
        if threaded is None:
            sync = self._sync_executor()
            with self._lock:
                if self._threaded is None:
                    self._threaded = ThreadedExecutor(sync)
                threaded = self._threaded
        return threaded

    async def _native_executor(self) -> tuple[AsyncExecutor, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        entry = self._native.get(id(loop))
        if entry is not None and entry[0].loop() is loop:
            return entry[0].executor, entry[1]
        redis = self._redis
        if self._params is None:
            executor = AsyncExecutor(self._client, self._options, owned=False)
        else:
            retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 1)
            built = _build_client(redis.asyncio.Redis, self._params, self._options, retry)
            executor = AsyncExecutor(built, self._options, owned=True)
        self._native = {k: v for k, v in self._native.items() if v[0].alive()}
        bound = _LoopExecutor(loop, executor)
        # asyncio's own: unlike anyio's, it does not yield to the loop when a slot is free.
        slots = asyncio.Semaphore(_NATIVE_CONCURRENCY)
        self._native[id(loop)] = (bound, slots)
        await bound.bind()
        return executor, slots

    def _after_fork(self) -> None:
        # The child must not share the parent's sockets: forget (never close: closing could
        # disturb the parent's connections) every client we built; they are rebuilt lazily.
        # Locks another thread held at fork() are never released in the child: new ones.
        for bound, _slots in self._native.values():
            bound.forsaken = True
        self._setup()
        self._breaker.reset()
        if self._fallback is not None:
            self._fallback = MemoryReplayCache(self._fallback_entries)

    def close(self) -> None:
        """Close the connections this cache opened (not those of the client you passed)."""
        self._closed = True
        sync, self._sync = self._sync, None
        self._threaded, self._native = None, {}
        if sync is not None:
            sync.close()

    async def aclose(self) -> None:
        """:meth:`close` from async code; asyncio connections are closed on their own loop.

        Without it, a loop's connections close when that loop shuts down (``asyncio.run``,
        anyio, uvicorn), never left to the garbage collector.
        """
        self._closed = True
        native, self._native = self._native, {}
        sync, self._sync = self._sync, None
        self._threaded = None
        for bound, _slots in native.values():
            await bound.close()
        if sync is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sync.close)

    def __repr__(self) -> str:
        return (
            f"RedisReplayCache(namespace={self.namespace!r}, "
            f"on_unavailable={self.on_unavailable!r}, breaker={self._breaker.state.value!r})"
        )
