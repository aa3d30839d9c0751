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
- **Redis down**: short timeouts (one quick retry) and the circuit breaker and counters of
  the token cache (``_ledger.Ledger``): after ``breaker_threshold`` failures in a row, Redis
  is left alone for ``breaker_reset_seconds``, and every check is answered at once, without
  waiting:
  ``on_unavailable="refuse"`` (the default) raises
  :class:`~m2m_client.errors.ReplayCacheUnavailable` (HTTP 503), ``"memory"`` checks the
  proof in this process only (a replay to another instance then passes).
- **"memory" remembers both ways**: with ``on_unavailable="memory"`` every proof this
  instance accepts is also recorded in its in-process cache (bounded, each entry until its
  proof's window ends), whether Redis answered or not. A proof used before an outage is
  refused when replayed to this instance during it, and one used during an outage is refused
  when replayed to this instance after Redis returns.
- Any exception out of the Redis client (not only redis-py's) counts as Redis failing.
- Connections (copying your client, one per event loop, fork, close) are
  ``_connections.Connections``, as for the token cache; options are ``ReplayOptions``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from dataclasses import dataclass, fields
from typing import Any

import anyio
import anyio.to_thread

from m2m_client import _fork
from m2m_client.errors import ConfigurationError, ReplayCacheUnavailable
from m2m_client.verify._proof import MemoryReplayCache

from ._connections import Connections, import_redis, on_asyncio
from ._ledger import Ledger, Voice
from ._options import OnUnavailable, ReplayOptions

__all__ = ["RedisReplayCache", "ReplayCacheStats"]

# ~4,400 years: a bound for PX whatever expires_at a caller passes.
_MAX_TTL_MS = 2**47


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


def _entry(options: ReplayOptions, key: str, left: float) -> tuple[str, bytes, int]:
    """The name, a random value and the PX of a replay key whose proof passes ``left`` s more."""
    # Relative expiry, so Redis's own clock does not matter; ours may be off from the
    # other verifiers' by up to clock_skew, and theirs decides how long they accept it.
    seconds = left + options.clock_skew
    if math.isfinite(seconds):
        ttl_ms = min(max(1, math.ceil(seconds * 1000)), _MAX_TTL_MS)
    else:
        ttl_ms = _MAX_TTL_MS if seconds > 0 else 1
    return replay_name(options.namespace, key), secrets.token_bytes(12), ttl_ms


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
        self._options = options = ReplayOptions(
            namespace=namespace,
            on_unavailable=on_unavailable,
            clock_skew=clock_skew,
            fallback_entries=fallback_entries,
            operation_timeout=operation_timeout,
            connect_timeout=connect_timeout,
            breaker_threshold=breaker_threshold,
            breaker_reset_seconds=breaker_reset_seconds,
        )
        self._connections = Connections(client, options, owner="RedisReplayCache")
        self.namespace = namespace
        self.on_unavailable: OnUnavailable = on_unavailable
        self._fallback = MemoryReplayCache(fallback_entries) if on_unavailable == "memory" else None
        outage = (
            "DPoP requests are refused (503)"
            if self._fallback is None
            else "proofs are checked for replay in this process only"
        )
        voice = Voice("DPoP replay cache", outage, "replays are refused fleet-wide", "checks")
        self._ledger = Ledger(options, stats=ReplayCacheStats(), voice=voice)
        self.stats = self._ledger.stats
        _fork.track(self)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisReplayCache:
        """``RedisReplayCache.from_url("redis://cache:6379/0", on_unavailable="refuse")``."""
        return cls(import_redis().Redis.from_url(url), **options)

    # --- the ReplayCache protocol ---------------------------------------------------------

    def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        """Record ``key`` fleet-wide; True if no verifier recorded it before (blocking)."""
        name, value, ttl_ms = _entry(self._options, key, expires_at - now)
        if self._connections.closed or not self._ledger.allow():
            return self._without_redis(key, expires_at, now, None)
        try:
            client = self._connections.sync().client
            first = _set_sync(client, name, value, ttl_ms)
        except Exception as exc:  # whatever the Redis client raises
            if isinstance(exc, ConfigurationError):
                raise
            return self._without_redis(key, expires_at, now, exc)
        return self._answered(first, key, expires_at, now)

    async def first_use_async(self, key: str, *, expires_at: float, now: float) -> bool:
        """:meth:`first_use` for async verifiers: the event loop never waits on a socket."""
        name, value, ttl_ms = _entry(self._options, key, expires_at - now)
        connections = self._connections
        if connections.closed or not self._ledger.allow():
            return self._without_redis(key, expires_at, now, None)
        try:
            with anyio.fail_after(self._options.guard):
                if on_asyncio() and (connections.params is not None or connections.is_async):
                    loop = await connections.native()
                    if loop is None:
                        raise RuntimeError("this redis.asyncio client serves another event loop")
                    async with loop.slots:
                        first = await _set_async(loop.executor.client, name, value, ttl_ms)
                else:
                    threaded = connections.threaded()
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

    def _answered(self, first: bool, key: str, expires_at: float, now: float) -> bool:
        self._ledger.redis_ok()  # counts the check; closes the breaker after an outage
        if first and self._fallback is not None:
            # Remember it here too: a replay to this instance during an outage is refused,
            # and a proof this instance accepted during one is refused now.
            first = self._fallback.first_use(key, expires_at=expires_at, now=now)
        if not first:
            self._ledger.count("replays")
        return first

    def _without_redis(
        self, key: str, expires_at: float, now: float, exc: BaseException | None
    ) -> bool:
        if exc is not None:
            self._ledger.redis_failed(exc)
        self._ledger.count("unavailable")
        if self._fallback is None:
            raise ReplayCacheUnavailable(
                "the DPoP proof could not be checked for replay: the shared replay cache "
                "(Redis) is unavailable",
                retry_after=self._ledger.breaker.reset_seconds,
            ) from exc
        first = self._fallback.first_use(key, expires_at=expires_at, now=now)
        if not first:
            self._ledger.count("replays")
        return first

    def _after_fork(self) -> None:
        # The breaker's state and the in-process fallback are the parent's (the connections
        # reset themselves: see _connections).
        self._ledger.after_fork()
        if self._fallback is not None:
            self._fallback = MemoryReplayCache(self._options.fallback_entries)

    def close(self) -> None:
        """Close the connections this cache opened (not those of the client you passed)."""
        self._connections.close()

    async def aclose(self) -> None:
        """:meth:`close` from async code; asyncio connections are closed on their own loop.

        Without it, a loop's connections close when that loop shuts down (``asyncio.run``,
        anyio, uvicorn), never left to the garbage collector.
        """
        await self._connections.aclose()

    def __repr__(self) -> str:
        return (
            f"RedisReplayCache(namespace={self.namespace!r}, "
            f"on_unavailable={self.on_unavailable!r}, breaker={self._ledger.breaker.state.value!r})"
        )
