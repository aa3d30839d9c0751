"""The one owner of a Redis cache's connections: the token cache and the replay cache use it.

Why a cache makes its own client from yours: redis-py's defaults (no socket timeout, three
retries with backoff) make a dead or black-holed Redis cost seconds per call, or hang. The
cache copies the connection settings of the client you pass (host, port, db, credentials, TLS,
Unix socket) into its own client with short timeouts and at most one quick retry, and never
touches your client's pool. A client it cannot copy (Sentinel, Cluster, a custom pool) is
used as it is: then its own timeouts apply. Such a ``redis.asyncio`` client's connections belong
to the event loop they were opened on: it is used on one loop at a time and, when that loop
shuts down, its connections are disconnected (the pool stays), so a later loop
(``asyncio.run`` per job) opens fresh ones instead of failing with "Event loop is closed".

Three kinds of executor, each built lazily: one sync (blocking callers), one driven through
worker threads (trio, or a sync client under async code), one per asyncio event loop. In a
forked child (``m2m_client._fork``) they are forgotten, never closed (closing could disturb
the parent's connections), and rebuilt on first use.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import weakref
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import anyio.to_thread

from m2m_client import _fork
from m2m_client.errors import ConfigurationError

from ._executors import AsyncExecutor, Scripting, SyncExecutor, ThreadedExecutor
from ._options import ConnectionOptions

__all__ = ["Connections", "import_redis", "on_asyncio"]

logger = logging.getLogger("m2m_client.cache")

_INSTALL_HINT = "the Redis caches need redis-py: pip install 'm2m-client[redis]'"
# Concurrent commands (and so connections) per event loop on the native asyncio path.
_NATIVE_CONCURRENCY = 32
_COPIED = frozenset(
    {"host", "port", "db", "username", "password", "credential_provider", "client_name"}
)


def on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def import_redis() -> Any:
    try:
        import redis
        import redis.asyncio
        import redis.backoff
    except ImportError as exc:
        raise ConfigurationError(_INSTALL_HINT) from exc
    return redis


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


def _is_async(client: Any) -> bool:
    """redis.asyncio.Redis, its RedisCluster, Sentinel masters: their commands are coroutines."""
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


class LoopExecutor:
    """An asyncio executor, the event loop its connections belong to, and its command slots.

    Those connections can only be closed on that loop, while it runs: left to the garbage
    collector after the loop ended, each costs ResourceWarnings and a socket the server keeps
    open until a collection. So :meth:`bind` starts an async generator on the loop, which
    ``loop.shutdown_asyncgens()`` (run by ``asyncio.run``, ``asyncio.Runner``, anyio) closes,
    closing the connections with it; :meth:`close` (a cache's ``aclose()``) does it earlier.
    """

    __slots__ = ("_closer", "early", "executor", "forsaken", "loop", "slots")

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: AsyncExecutor) -> None:
        self.loop = weakref.ref(loop)
        self.executor = executor
        # asyncio's own: unlike anyio's, it does not yield to the loop when a slot is free.
        self.slots = asyncio.Semaphore(_NATIVE_CONCURRENCY)
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
        if on_asyncio() and asyncio.get_running_loop() is loop:
            await closer.aclose()
        elif loop.is_running():

            async def close_there() -> None:
                await closer.aclose()

            asyncio.run_coroutine_threadsafe(close_there(), loop)
        # Otherwise the loop is idle: the generator's finalizer closes it when it runs again.


class Connections:
    """The executors of one cache over the client you passed (copied when it can be)."""

    def __init__(self, client: Any, options: ConnectionOptions, *, owner: str) -> None:
        self.redis = import_redis()
        self.client = client
        self.options = options
        self.owner = owner
        self.is_async = _is_async(client)
        self.params = _connection_params(client)
        if self.params is None:
            encoder = getattr(client, "get_encoder", None)
            if encoder is not None and getattr(encoder(), "decode_responses", False):
                raise ConfigurationError(
                    f"{owner} stores and compares bytes: give it a client with "
                    "decode_responses=False"
                )
            logger.info(
                "%s: using %s as it is (its own timeouts and retries apply)",
                owner,
                type(client).__name__,
            )
        self.scripting = Scripting()  # one per cache: every executor (every loop) shares it
        self.closed = False
        self._reset()
        _fork.track(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self.sync_executor: SyncExecutor | None = None
        self.threaded_executor: ThreadedExecutor | None = None
        self.loops: dict[int, LoopExecutor] = {}  # by id(loop): connections are per loop

    def _after_fork(self) -> None:
        # The child must not share the parent's sockets: forget (never close) every client
        # we built. Locks another thread held at fork() are never released here: new ones.
        for entry in self.loops.values():
            entry.forsaken = True
        self._reset()

    def _build(self, factory: Any, retry: Any) -> Any:
        assert self.params is not None
        accepted = inspect.signature(factory).parameters
        return factory(
            **{k: v for k, v in self.params.items() if k in accepted},
            socket_timeout=self.options.operation_timeout,
            socket_connect_timeout=self.options.connect_timeout,
            retry=retry,
            decode_responses=False,
            health_check_interval=0,
        )

    def sync(self) -> SyncExecutor:
        """The sync executor (ConfigurationError: a redis.asyncio client it cannot copy)."""
        executor = self.sync_executor
        if executor is None:
            with self._lock:
                if self.sync_executor is None:
                    self.sync_executor = self._build_sync()
                executor = self.sync_executor
        return executor

    def _build_sync(self) -> SyncExecutor:
        if self.params is None:
            if self.is_async:
                raise ConfigurationError(
                    f"{self.owner} cannot copy this redis.asyncio client into a sync one "
                    "(for blocking callers, or trio): pass a sync redis.Redis"
                )
            return SyncExecutor(self.client, self.options, owned=False, scripting=self.scripting)
        redis = self.redis
        retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1)  # one quick retry, no sleep
        built = self._build(redis.Redis, retry)
        return SyncExecutor(built, self.options, owned=True, scripting=self.scripting)

    def threaded(self) -> ThreadedExecutor:
        """The sync executor, driven from async code through worker threads."""
        threaded = self.threaded_executor
        if threaded is None:
            sync = self.sync()
            with self._lock:
                if self.threaded_executor is None:
                    self.threaded_executor = ThreadedExecutor(sync)
                threaded = self.threaded_executor
        return threaded

    async def native(self) -> LoopExecutor | None:
        """This event loop's redis.asyncio executor; None when your client, used as it is,
        is in use on another event loop that still exists (its connections cannot serve
        this one)."""
        loop = asyncio.get_running_loop()
        entry = self.loops.get(id(loop))
        if entry is not None and entry.loop() is loop:
            return entry
        self.loops = {k: v for k, v in self.loops.items() if v.alive()}
        if self.params is None:
            if self.loops:
                return None
            executor = AsyncExecutor(
                self.client, self.options, owned=False, scripting=self.scripting
            )
        else:
            redis = self.redis
            built = self._build(
                redis.asyncio.Redis, redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 1)
            )
            executor = AsyncExecutor(built, self.options, owned=True, scripting=self.scripting)
        entry = self.loops[id(loop)] = LoopExecutor(loop, executor)
        await entry.bind()
        return entry

    def close(self) -> None:
        """Close the connections this cache opened (not those of the client you passed);
        an event loop's close when that loop shuts down."""
        self.closed = True
        sync, self.sync_executor = self.sync_executor, None
        self.threaded_executor, self.loops = None, {}
        if sync is not None:
            sync.close()

    async def aclose(self) -> None:
        """:meth:`close` from async code; asyncio connections close on their own loop."""
        self.closed = True
        native, self.loops = self.loops, {}
        sync, self.sync_executor = self.sync_executor, None
        self.threaded_executor = None
        for entry in native.values():
            await entry.close()
        if sync is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sync.close)
