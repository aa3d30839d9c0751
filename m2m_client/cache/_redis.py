"""The Redis / Valkey shared token cache: sync and async shells around ``SharedCore``.

The package: ``_decisions`` decides (a flow of operations, no I/O), ``_lease`` is the fleet
lease, ``_ledger`` counts, ``_codec`` names and seals entries, ``_executors`` send operations
to Redis, ``_drive`` runs a flow, ``_connections`` owns the connections (copying your client,
per-loop executors, fork reset, close); this module holds the public caches. redis-py is an
optional dependency, imported only when a cache is constructed.

Concurrent calls of one cache for the same key (and ``stale``) in this process share one call
to Redis through the package's single flight (``m2m_client._singleflight``), counted as
``coalesced``. A token client already sends only its own flight owner here; direct callers
(and two clients sharing one cache) get the same guarantee.

Invalidations reach the other processes by pub/sub (``<namespace>:invalidated``): a listener
thread per cache, started once a token client uses the cache, drops an invalidated token
from those clients' memory (see :class:`_Invalidations`).

Why trio works: ``redis.asyncio`` runs on asyncio only. Under trio (or with a sync
``redis.Redis`` given to the async cache) the cache runs the same operations with a sync
client in worker threads (``anyio.to_thread``, own capacity limiter). Only the in-process
flight owner ever talks to Redis, so a thread hop (~50 µs) next to a token request is noise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread

from m2m_client import _fork
from m2m_client._singleflight import SingleFlight, wait_for, wait_for_async
from m2m_client._token import AccessToken, CacheKey, RefreshPolicy
from m2m_client.errors import ConfigurationError

from ._codec import Codec, KeyNames, _derive
from ._connections import Connections, import_redis, on_asyncio
from ._decisions import SharedCore, announcement
from ._drive import drive_async, drive_sync
from ._executors import AsyncExecutor, SyncExecutor, ThreadedExecutor
from ._ledger import SharedCacheStats
from ._options import SharedOptions

__all__ = ["AsyncRedisTokenCache", "RedisTokenCache"]

logger = logging.getLogger("m2m_client.cache")


# --- invalidations from other processes ----------------------------------------------

_SEEN_MAX = 10_000
"""Tokens remembered for invalidation messages (the client's own cache holds as many)."""


class _Invalidations:
    """The tokens this process got through the cache (bounded), keyed by the id another
    process announces when it invalidates one, and the token clients to tell.

    The listener is a daemon thread with one pub/sub connection (sync redis-py: it works
    whatever event loops come and go). It reconnects after an error (back-off 0.5-5 s), ends
    within ~0.25 s of :meth:`stop` (``close()``) or of the cache being garbage-collected,
    and a forked child starts its own. Messages missed while it is
    disconnected are lost: then a process keeps the token until its own 401 (the behaviour
    without pub/sub).
    """

    def __init__(self, channel: str, key: bytes) -> None:
        self.channel = channel
        self.key = key
        self.hooks: list[weakref.WeakMethod[Callable[[CacheKey, str], None]]] = []
        self.seen: OrderedDict[bytes, tuple[CacheKey, str, float]] = OrderedDict()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def add_hook(self, method: Callable[[CacheKey, str], None]) -> None:
        with self.lock:
            self.hooks = [ref for ref in self.hooks if ref() is not None]
            self.hooks.append(weakref.WeakMethod(method))

    def wanted(self) -> bool:
        return bool(self.hooks) and not self.stopping.is_set()

    def record(self, names: KeyNames, key: CacheKey, token: AccessToken) -> None:
        message = announcement(self.key, names, token.access_token)
        now = time.time()
        with self.lock:
            self.seen[message] = (key, token.access_token, token.expires_at)
            self.seen.move_to_end(message)
            while self.seen:
                oldest = next(iter(self.seen.values()))
                if len(self.seen) <= _SEEN_MAX and oldest[2] > now:
                    break
                self.seen.popitem(last=False)

    def deliver(self, message: bytes) -> None:
        with self.lock:
            entry = self.seen.pop(message, None)
            hooks = [hook for ref in self.hooks if (hook := ref()) is not None]
        if entry is None:
            return
        key, access_token, _ = entry
        for hook in hooks:
            try:
                hook(key, access_token)
            except Exception:  # one client's hook must not keep the others from hearing
                logger.exception("shared token cache: invalidation hook failed")

    def start(self, make_pubsub: Callable[[], Any]) -> None:
        with self.lock:
            if self.thread is not None or self.stopping.is_set():
                return
            self.thread = threading.Thread(
                target=_listen,
                args=(weakref.ref(self), make_pubsub, self.channel, self.stopping),
                name="m2m-client-invalidations",
                daemon=True,
            )
            self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def after_fork(self) -> None:
        # The parent's thread does not exist here; its socket is the parent's: never touched.
        self.lock = threading.Lock()
        self.thread = None
        if not self.stopping.is_set():
            self.stopping = threading.Event()


def _listen(
    ref: weakref.ref[_Invalidations],
    make_pubsub: Callable[[], Any],
    channel: str,
    stopping: threading.Event,
) -> None:
    backoff = 0.5
    while not stopping.is_set() and ref() is not None:
        pubsub: Any = None
        try:
            pubsub = make_pubsub()
            pubsub.subscribe(channel)
            backoff = 0.5
            while not stopping.is_set():
                # Short, so stop() (close) returns within a quarter second.
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
                target = ref()
                if target is None:
                    return
                if message is not None and message.get("type") == "message":
                    target.deliver(message["data"])
                del target
        except Exception as exc:  # reconnect after a back-off; never crash the thread
            logger.debug("shared token cache: invalidation listener: %r", exc)
        finally:
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    pubsub.close()
        stopping.wait(backoff)
        backoff = min(backoff * 2, 5.0)


# --- the public caches ----------------------------------------------------------------


class _BaseRedisCache:
    """Everything the sync and async caches share: options, core, connections, invalidations."""

    def __init__(
        self,
        client: Any,
        *,
        encryption_key: str | bytes | None = None,
        namespace: str = "m2m",
        lease_seconds: float = 5.0,
        poll_interval: float = 0.5,
        wait_timeout: float = 35.0,
        negative_seconds: float = 10.0,
        operation_timeout: float = 0.25,
        connect_timeout: float = 0.25,
        breaker_threshold: int = 2,
        breaker_reset_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        """Wrap ``client`` (a ``redis.Redis`` / ``redis.asyncio.Redis``; Valkey alike).

        ``encryption_key`` (str or bytes, at least 16 bytes; e.g. from ``M2M_CACHE_KEY``) seals
        every value with AES-256-GCM. Without it, anyone who can read Redis (or a dump of it) can
        read bearer tokens. ``namespace`` prefixes every Redis key.

        ``lease_seconds``: how long a process that died mid-fetch blocks the others (the holder
        extends the lease while its fetch runs). ``poll_interval``: how often a waiter looks
        again if it misses the wake-up message. ``wait_timeout``: the longest a waiter waits
        before fetching for itself. ``negative_seconds``: how long an OAuth error is shared.
        ``operation_timeout`` / ``connect_timeout``: per Redis operation (one quick retry).
        ``breaker_threshold`` failed operations in a row make this process stop using Redis for
        ``breaker_reset_seconds``. ``on_event(name)`` is called with the name of each counter
        of :attr:`stats` as it is incremented.
        """
        import_redis()
        options = SharedOptions(
            lease_seconds=lease_seconds,
            poll_interval=poll_interval,
            wait_timeout=wait_timeout,
            negative_seconds=negative_seconds,
            operation_timeout=operation_timeout,
            connect_timeout=connect_timeout,
            breaker_threshold=breaker_threshold,
            breaker_reset_seconds=breaker_reset_seconds,
        )
        self._core = SharedCore(
            Codec(namespace, encryption_key), options, clock=clock, on_event=on_event
        )
        self._connections = Connections(client, options, owner=type(self).__name__)
        if encryption_key is not None:  # valid: Codec checked it
            secret = encryption_key.encode() if isinstance(encryption_key, str) else encryption_key
            purpose = b"m2m-client shared token cache v1: invalidation ids"
            self._core.announce_key = _derive(secret, purpose)
        self._invalidations = _Invalidations(
            self._core.invalidation_channel, self._core.announce_key
        )
        self._init_shell()
        _fork.track(self)

    def add_invalidation_listener(self, method: Callable[[CacheKey, str], None]) -> None:
        """Call ``method(key, access_token)`` when another process invalidates a token this
        process got through the cache (a bound method, held weakly; token clients do this)."""
        self._invalidations.add_hook(method)

    def _remember(self, key: CacheKey, token: AccessToken, sync: SyncExecutor | None) -> None:
        """Note a token handed out, and listen for its invalidation (sync client needed)."""
        invalidations = self._invalidations
        if not invalidations.wanted():
            return
        invalidations.record(self._core.codec.names(key), key, token)
        if invalidations.thread is None and sync is not None:
            invalidations.start(sync.client.pubsub)

    @property
    def wait_timeout(self) -> float:
        """The longest a process waits for another's fetch before fetching for itself."""
        return self._core.options.wait_timeout

    def _init_shell(self) -> None:
        """Where the sync or async cache sets up its own state (its single flight)."""

    def _flight_deadline(self) -> float:
        # A caller joining a call in flight waits as long as that call may wait for Redis.
        return time.monotonic() + self._core.options.wait_timeout

    @property
    def stats(self) -> SharedCacheStats:
        """Running counters of this cache in this process."""
        return self._core.stats

    def add_listener(self, method: Callable[[str], None]) -> None:
        """Report each counter name to ``method`` too (a bound method, held weakly).

        A token client given ``shared_cache=`` and ``on_event=`` subscribes itself, so the
        cache's metrics arrive as ``TokenEvent(kind="shared_cache", detail=name)``.
        """
        self._core.add_listener(method)

    @property
    def namespace(self) -> str:
        return self._core.codec.namespace

    def _after_fork(self) -> None:
        # Flights in progress, the breaker's state and the listener thread are the parent's
        # (the connections reset themselves: see _connections).
        self._core.after_fork()
        self._invalidations.after_fork()
        self._init_shell()

    def __repr__(self) -> str:
        c = self._core
        return (
            f"{type(self).__name__}(namespace={c.codec.namespace!r}, "
            f"encrypted={c.codec.encrypted}, breaker={c.breaker.state.value!r})"
        )


class RedisTokenCache(_BaseRedisCache):
    """A token cache shared by every process of a fleet through Redis or Valkey (sync).

    >>> shared = RedisTokenCache(redis.Redis.from_url("redis://cache:6379/0"),
    ...                          encryption_key=os.environ["M2M_CACHE_KEY"])

    Pass it as ``TokenClient(creds, shared_cache=shared)``. Redis failing never fails a call:
    the process then fetches tokens on its own until Redis answers again.
    """

    def _init_shell(self) -> None:
        if self._connections.is_async:
            raise ConfigurationError(
                "RedisTokenCache needs a sync redis.Redis; use AsyncRedisTokenCache for "
                "redis.asyncio.Redis"
            )
        self._flights: SingleFlight[threading.Event] = SingleFlight(threading.Event)
        self._flights_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisTokenCache:
        """``RedisTokenCache.from_url("redis://cache:6379/0", encryption_key=...)``."""
        return cls(import_redis().Redis.from_url(url), **options)

    def _executor(self) -> SyncExecutor | None:
        return None if self._connections.closed else self._connections.sync()

    def obtain(
        self,
        key: CacheKey,
        fetch: Callable[[], AccessToken],
        *,
        policy: RefreshPolicy,
        stale: AccessToken | None,
    ) -> AccessToken:
        """A token for ``key`` fetched once for the whole fleet (see ``SharedTokenCache``).

        Concurrent calls for the same key (and ``stale``) in this process share one call to
        Redis: a token client already sends only its flight owner here, direct callers get
        the same guarantee.
        """
        name = (key, None if stale is None else stale.access_token)
        with self._flights_lock:
            flight, owner = self._flights.join(name, self._flight_deadline())
        if not owner:
            wait_for(flight)
            joined = flight.joined()
            if joined is not None:
                self._core.count("coalesced")
                return joined
            return self._obtain(key, fetch, policy, stale)  # its owner gave out: on our own
        with self._flights.landing(name, flight, propagate=True):
            token = flight.token = self._obtain(key, fetch, policy, stale)
        return token

    def _obtain(
        self,
        key: CacheKey,
        fetch: Callable[[], AccessToken],
        policy: RefreshPolicy,
        stale: AccessToken | None,
    ) -> AccessToken:
        executor = self._executor()
        token = drive_sync(self._core, executor, self._core.obtain_flow(key, policy, stale), fetch)
        self._remember(key, token, executor)
        return token

    def invalidate(self, key: CacheKey, token: AccessToken) -> None:
        """Delete the shared entry if it still holds ``token`` (after a 401). Never raises."""
        executor = self._executor()
        if executor is None:
            return
        flow = self._core.invalidate_flow(key, token)
        try:
            op = next(flow)
            while True:
                result = executor.run(op)
                self._core.redis_ok()
                op = flow.send(result)
        except StopIteration:
            return
        except Exception as exc:  # whatever the Redis client raises: logged, never raised
            self._core.redis_failed(exc)

    def close(self) -> None:
        """Close the connections this cache opened (not those of the client you passed)."""
        self._invalidations.stop()
        self._connections.close()

    def __enter__(self) -> RedisTokenCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncRedisTokenCache(_BaseRedisCache):
    """A token cache shared by every process of a fleet through Redis or Valkey (async).

    >>> shared = AsyncRedisTokenCache(redis.asyncio.Redis.from_url("redis://cache:6379/0"),
    ...                               encryption_key=os.environ["M2M_CACHE_KEY"],
    ...                               namespace="m2m")

    Pass it as ``AsyncTokenClient(creds, shared_cache=shared)``. Works on asyncio and trio
    (under trio, and with a sync ``redis.Redis``, Redis calls run in worker threads). Redis
    failing never fails a call: the process then fetches tokens on its own until Redis
    answers again.
    """

    def _init_shell(self) -> None:
        self._warned_unusable = False
        # Keyed by thread too: an anyio.Event belongs to one event loop, each loop one thread.
        self._flights: SingleFlight[anyio.Event] = SingleFlight(anyio.Event)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncRedisTokenCache:
        """``AsyncRedisTokenCache.from_url("redis://cache:6379/0", encryption_key=...)``."""
        return cls(import_redis().asyncio.Redis.from_url(url), **options)

    async def _executor(self) -> AsyncExecutor | ThreadedExecutor | None:
        connections = self._connections
        if connections.closed:
            return None
        if connections.is_async and on_asyncio():
            # None: your client's connections are in use on another event loop that still
            # exists and cannot serve this one. Not shared here (a miss, no error).
            entry = await connections.native()
            return None if entry is None else entry.executor
        return self._threaded()

    def _threaded(self, *, warn: bool = True) -> ThreadedExecutor | None:
        try:
            return self._connections.threaded()
        except ConfigurationError:
            if warn and not self._warned_unusable:
                self._warned_unusable = True
                logger.warning(
                    "shared token cache: redis.asyncio runs on asyncio only, and this %s cannot "
                    "be copied into a sync client; outside asyncio this process does not share "
                    "tokens (pass a sync redis.Redis to AsyncRedisTokenCache instead)",
                    type(self._connections.client).__name__,
                )
            return None

    async def obtain(
        self,
        key: CacheKey,
        fetch: Callable[[], Awaitable[AccessToken]],
        *,
        policy: RefreshPolicy,
        stale: AccessToken | None,
    ) -> AccessToken:
        """A token for ``key`` fetched once for the whole fleet (see ``AsyncSharedTokenCache``).

        Concurrent calls for the same key (and ``stale``) in this event loop share one call
        to Redis.
        """
        name = (key, None if stale is None else stale.access_token, threading.get_ident())
        flight, owner = self._flights.join(name, self._flight_deadline())
        if not owner:
            await wait_for_async(flight)
            joined = flight.joined()
            if joined is not None:
                self._core.count("coalesced")
                return joined
            return await self._obtain(key, fetch, policy, stale)  # its owner gave out
        with self._flights.landing(name, flight, propagate=True):
            token = flight.token = await self._obtain(key, fetch, policy, stale)
        return token

    async def _obtain(
        self,
        key: CacheKey,
        fetch: Callable[[], Awaitable[AccessToken]],
        policy: RefreshPolicy,
        stale: AccessToken | None,
    ) -> AccessToken:
        flow = self._core.obtain_flow(key, policy, stale)
        token = await drive_async(self._core, await self._executor(), flow, fetch)
        if self._invalidations.wanted():
            threaded = self._threaded(warn=False)
            self._remember(key, token, None if threaded is None else threaded.sync)
        return token

    async def invalidate(self, key: CacheKey, token: AccessToken) -> None:
        """Delete the shared entry if it still holds ``token`` (after a 401). Never raises."""
        executor = await self._executor()
        if executor is None:
            return
        flow = self._core.invalidate_flow(key, token)
        try:
            op = next(flow)
            while True:
                result = await executor.run(op)
                self._core.redis_ok()
                op = flow.send(result)
        except StopIteration:
            return
        except Exception as exc:  # whatever the Redis client raises: logged, never raised
            self._core.redis_failed(exc)

    async def aclose(self) -> None:
        """Close the connections this cache opened (not those of the client you passed).

        Those of another event loop still running are closed on that loop. Without
        ``aclose()``, an asyncio loop's connections close when the loop shuts down
        (``asyncio.run``, ``asyncio.Runner``, anyio), never left to the garbage collector.
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._invalidations.stop)
        await self._connections.aclose()

    async def __aenter__(self) -> AsyncRedisTokenCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
