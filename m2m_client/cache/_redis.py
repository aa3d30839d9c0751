"""The Redis / Valkey shared token cache: sync and async shells around ``_core.SharedCore``.

The package: ``_core`` decides (a flow of operations, no I/O), ``_codec`` names and seals
entries, ``_breaker`` is the per-process circuit breaker, ``_executors`` send operations to
Redis, ``_drive`` runs a flow; this module holds the public caches, their connections and
fork handling. redis-py is an optional dependency, imported only when a cache is constructed.

Why the cache makes its own client from yours: redis-py's defaults (no socket timeout, three
retries with backoff) make a dead or black-holed Redis cost seconds per call, or hang. The
cache copies the connection settings of the client you pass (host, port, db, credentials, TLS,
Unix socket) into its own client with short timeouts and at most one quick retry, and never
touches your client's pool. A client it cannot copy (Sentinel, Cluster, a custom pool) is
used as it is: then its own timeouts apply. Such a ``redis.asyncio`` client's connections belong
to the event loop they were opened on: the cache uses it on one loop at a time and, when that
loop shuts down, disconnects its connections (the pool stays), so a later loop
(``asyncio.run`` per job) opens fresh ones instead of failing with "Event loop is closed".

Invalidations reach the other processes by pub/sub (``<namespace>:invalidated``): a listener
thread per cache, started once a token client uses the cache, drops an invalidated token
from those clients' memory (see :class:`_Invalidations`).

Why trio works: ``redis.asyncio`` runs on asyncio only. Under trio (or with a sync
``redis.Redis`` given to the async cache) the cache runs the same operations with a sync
client in worker threads (``anyio.to_thread``, own capacity limiter). Only the in-process
flight owner ever talks to Redis, so a thread hop (~50 µs) next to a token request is noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio

from m2m_client._token import AccessToken, CacheKey, RefreshPolicy
from m2m_client.errors import ConfigurationError

from ._codec import Codec, KeyNames, _derive
from ._core import Options, SharedCacheStats, SharedCore, announcement
from ._drive import AsyncFlight, SyncFlight, drive_async, drive_sync
from ._executors import AsyncExecutor, Scripting, SyncExecutor, ThreadedExecutor

__all__ = ["AsyncRedisTokenCache", "RedisTokenCache"]

logger = logging.getLogger("m2m_client.cache")

_INSTALL_HINT = "the Redis token cache needs redis-py: pip install 'm2m-client[redis]'"


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _import_redis() -> Any:
    try:
        import redis
        import redis.asyncio
        import redis.backoff
    except ImportError as exc:
        raise ConfigurationError(_INSTALL_HINT) from exc
    return redis


_COPIED = frozenset(
    {"host", "port", "db", "username", "password", "credential_provider", "client_name"}
)


def _connection_params(client: Any) -> dict[str, Any] | None:
    """The connection settings of a plain redis-py client, or None if it is not one."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or type(pool).__name__ not in ("ConnectionPool", "BlockingConnectionPool"):
        return None
    kwargs: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}))
    params = {k: v for k, v in kwargs.items() if k in _COPIED or k.startswith("ssl_")}
    kind = getattr(pool, "connection_class", type(None)).__name__
    if kind == "SSLConnection":
        params["ssl"] = True
    elif kind == "UnixDomainSocketConnection":
        params["unix_socket_path"] = kwargs.get("path")
        params.pop("host", None)
        params.pop("port", None)
    elif kind != "Connection":
        return None
    return params


def _build_client(factory: Any, params: dict[str, Any], options: Options, retry: Any) -> Any:
    accepted = inspect.signature(factory).parameters
    return factory(
        **{k: v for k, v in params.items() if k in accepted},
        socket_timeout=options.operation_timeout,
        socket_connect_timeout=options.connect_timeout,
        retry=retry,
        decode_responses=False,
        health_check_interval=0,
    )


def _is_async(client: Any) -> bool:
    """redis.asyncio.Redis, its RedisCluster, Sentinel masters: their commands are coroutines."""
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


def _check_as_is(client: Any) -> None:
    encoder = getattr(client, "get_encoder", None)
    if encoder is not None and getattr(encoder(), "decode_responses", False):
        raise ConfigurationError(
            "the Redis token cache stores bytes: give it a client with decode_responses=False"
        )


# --- fork safety ----------------------------------------------------------------------

_LIVE: weakref.WeakSet[_BaseRedisCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_LIVE):
        cache._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
    """Everything the sync and async caches share: options, core, copied connection settings."""

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
        self._redis = _import_redis()
        for name, value in (
            ("lease_seconds", lease_seconds),
            ("poll_interval", poll_interval),
            ("wait_timeout", wait_timeout),
            ("operation_timeout", operation_timeout),
            ("connect_timeout", connect_timeout),
            ("breaker_reset_seconds", breaker_reset_seconds),
        ):
            if not value > 0:
                raise ConfigurationError(f"{name} must be > 0, not {value!r}")
        if poll_interval > lease_seconds:
            # The poll is the safety net for a lost wake-up: it must notice a lapsed lease.
            raise ConfigurationError(
                f"poll_interval ({poll_interval}) must not exceed lease_seconds ({lease_seconds})"
            )
        if negative_seconds < 0:
            raise ConfigurationError(f"negative_seconds must be >= 0, not {negative_seconds!r}")
        options = Options(
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
        self._client = client
        self._params = _connection_params(client)
        if self._params is None:
            _check_as_is(client)
            logger.info(
                "shared token cache: using %s as it is (its own timeouts and retries apply)",
                type(client).__name__,
            )
        self._scripting = Scripting()
        if encryption_key is not None:  # valid: Codec checked it
            secret = encryption_key.encode() if isinstance(encryption_key, str) else encryption_key
            purpose = b"m2m-client shared token cache v1: invalidation ids"
            self._core.announce_key = _derive(secret, purpose)
        self._invalidations = _Invalidations(
            self._core.invalidation_channel, self._core.announce_key
        )
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._init_shell()
        _LIVE.add(self)

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
        """Where the sync or async cache sets up its own state (connections, flights)."""

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

    def _sync_executor(self, client: Any) -> SyncExecutor:
        redis = self._redis
        if self._params is None:
            return SyncExecutor(client, self._core.options, owned=False, scripting=self._scripting)
        retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1)  # one quick retry, no sleep
        built = _build_client(redis.Redis, self._params, self._core.options, retry)
        return SyncExecutor(built, self._core.options, owned=True, scripting=self._scripting)

    def _after_fork(self) -> None:
        # The child must not share the parent's sockets: forget (never close: closing could
        # disturb the parent's connections) every client we built; they are rebuilt lazily.
        self._core.after_fork()
        self._invalidations.after_fork()
        self._pid = os.getpid()
        self._lock = threading.Lock()
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
        if _is_async(self._client):
            raise ConfigurationError(
                "RedisTokenCache needs a sync redis.Redis; use AsyncRedisTokenCache for "
                "redis.asyncio.Redis"
            )
        self._executor: SyncExecutor | None = None
        self._flights: dict[tuple[CacheKey, str | None], SyncFlight] = {}
        self._flights_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisTokenCache:
        """``RedisTokenCache.from_url("redis://cache:6379/0", encryption_key=...)``."""
        redis = _import_redis()
        return cls(redis.Redis.from_url(url), **options)

    def _get_executor(self) -> SyncExecutor | None:
        if self._closed:
            return None
        if self._pid != os.getpid():
            self._after_fork()
        executor = self._executor
        if executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = self._sync_executor(self._client)
                executor = self._executor
        return executor

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
            flight = self._flights.get(name)
            leader = flight is None
            if flight is None:
                flight = self._flights[name] = SyncFlight()
        if not leader:
            joined = flight.outcome() if flight.done.wait(self._core.options.wait_timeout) else None
            if joined is not None:
                self._core.count("coalesced")
                return joined
            flight = SyncFlight()  # the leader is stuck or was interrupted: go on our own
        try:
            flow = self._core.obtain_flow(key, policy, stale)
            executor = self._get_executor()
            flight.token = drive_sync(self._core, executor, flow, fetch)
            self._remember(key, flight.token, executor)
            return flight.token
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                if self._flights.get(name) is flight:
                    del self._flights[name]
            flight.done.set()

    def invalidate(self, key: CacheKey, token: AccessToken) -> None:
        """Delete the shared entry if it still holds ``token`` (after a 401). Never raises."""
        executor = self._get_executor()
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
        self._closed = True
        self._invalidations.stop()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.close()

    def __enter__(self) -> RedisTokenCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _LoopExecutor:
    """An asyncio executor and the event loop its connections belong to.

    Those connections can only be closed on that loop, while it runs: left to the garbage
    collector after the loop ended, each costs ResourceWarnings and a socket the server keeps
    open until a collection. So :meth:`bind` starts an async generator on the loop, which
    ``loop.shutdown_asyncgens()`` (run by ``asyncio.run``, ``asyncio.Runner``, anyio) closes,
    closing the connections with it; :meth:`close` (the cache's ``aclose()``) does it earlier.
    """

    __slots__ = ("_closer", "early", "executor", "forsaken", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: AsyncExecutor) -> None:
        self.loop = weakref.ref(loop)
        self.executor = executor
        self.forsaken = False  # in a forked child: the sockets are the parent's, never close
        self.early = False  # closed by aclose(), not by the loop's end
        self._closer: AsyncGenerator[None, None] | None = None

    def alive(self) -> bool:
        loop = self.loop()
        return loop is not None and not loop.is_closed()

    async def bind(self) -> None:
        self._closer = self._until_loop_ends()
        await self._closer.asend(None)  # the loop's firstiter hook now tracks it

    async def _until_loop_ends(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            if self.forsaken:
                pass
            elif self.executor.owned:
                await self.executor.close()
            elif not self.early:
                # Your client, used as it is: its connections belong to this loop, which
                # ends now; drop them (the pool stays) so the next loop opens its own.
                await self.executor.disconnect()

    async def close(self) -> None:
        """Close the connections now if on their loop, else soon on their loop if it runs."""
        self.early = True
        closer, self._closer = self._closer, None
        loop = self.loop()
        if closer is None or loop is None or loop.is_closed():
            return
        if _on_asyncio() and asyncio.get_running_loop() is loop:
            await closer.aclose()
        elif loop.is_running():

            async def close_there() -> None:
                await closer.aclose()

            asyncio.run_coroutine_threadsafe(close_there(), loop)
        # Otherwise the loop is idle: the generator's finalizer closes it when it runs again.


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
        self._is_async_client = _is_async(self._client)
        # asyncio connections belong to one event loop: one executor per loop.
        self._native: dict[int, _LoopExecutor] = {}
        self._threaded: ThreadedExecutor | None = None
        self._warned_unusable = False
        self._flights: dict[tuple[CacheKey, str | None, int], AsyncFlight] = {}

    def _after_fork(self) -> None:
        for entry in self._native.values():
            entry.forsaken = True
        super()._after_fork()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncRedisTokenCache:
        """``AsyncRedisTokenCache.from_url("redis://cache:6379/0", encryption_key=...)``."""
        redis = _import_redis()
        return cls(redis.asyncio.Redis.from_url(url), **options)

    async def _get_executor(self) -> AsyncExecutor | ThreadedExecutor | None:
        if self._closed:
            return None
        if self._pid != os.getpid():
            self._after_fork()
        if self._is_async_client and _on_asyncio():
            return await self._native_executor()
        return self._threaded_executor()

    async def _native_executor(self) -> AsyncExecutor | None:
        loop = asyncio.get_running_loop()
        entry = self._native.get(id(loop))
        if entry is not None and entry.loop() is loop:
            return entry.executor
        redis = self._redis
        self._native = {k: v for k, v in self._native.items() if v.alive()}
        if self._params is None:
            if self._native:
                # Your client's connections are in use on another event loop that still
                # exists: they cannot serve this one. Not shared here (a miss, no error).
                return None
            executor = AsyncExecutor(
                self._client, self._core.options, owned=False, scripting=self._scripting
            )
        else:
            retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 1)
            built = _build_client(redis.asyncio.Redis, self._params, self._core.options, retry)
            executor = AsyncExecutor(
                built, self._core.options, owned=True, scripting=self._scripting
            )
        entry = self._native[id(loop)] = _LoopExecutor(loop, executor)
        await entry.bind()
        return executor

    def _threaded_executor(self, *, warn: bool = True) -> ThreadedExecutor | None:
        if self._threaded is not None:
            return self._threaded
        if self._is_async_client and self._params is None:
            if warn and not self._warned_unusable:
                self._warned_unusable = True
                logger.warning(
                    "shared token cache: redis.asyncio runs on asyncio only, and this %s cannot "
                    "be copied into a sync client; outside asyncio this process does not share "
                    "tokens (pass a sync redis.Redis to AsyncRedisTokenCache instead)",
                    type(self._client).__name__,
                )
            return None
        with self._lock:
            if self._threaded is None:
                self._threaded = ThreadedExecutor(self._sync_executor(self._client))
        return self._threaded

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
        # Events belong to one event loop, and each loop runs in one thread.
        name = (key, None if stale is None else stale.access_token, threading.get_ident())
        flight = self._flights.get(name)
        if flight is not None:
            with anyio.move_on_after(self._core.options.wait_timeout):
                await flight.done.wait()
            joined = flight.outcome() if flight.done.is_set() else None
            if joined is not None:
                self._core.count("coalesced")
                return joined
        flight = self._flights[name] = AsyncFlight()
        try:
            flow = self._core.obtain_flow(key, policy, stale)
            executor = await self._get_executor()
            flight.token = await drive_async(self._core, executor, flow, fetch)
            if self._invalidations.wanted():
                threaded = self._threaded_executor(warn=False)
                self._remember(key, flight.token, None if threaded is None else threaded.sync)
            return flight.token
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            if self._flights.get(name) is flight:
                del self._flights[name]
            flight.done.set()

    async def invalidate(self, key: CacheKey, token: AccessToken) -> None:
        """Delete the shared entry if it still holds ``token`` (after a 401). Never raises."""
        executor = await self._get_executor()
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
        self._closed = True
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._invalidations.stop)
        native, self._native = self._native, {}
        threaded, self._threaded = self._threaded, None
        for entry in native.values():
            await entry.close()
        if threaded is not None:
            await threaded.close()

    async def __aenter__(self) -> AsyncRedisTokenCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
