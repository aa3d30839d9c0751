"""The Redis / Valkey shared token cache: sync and async shells around ``_core.SharedCore``.

redis-py is an optional dependency, imported only when a cache is constructed.

Why the cache makes its own client from yours: redis-py's defaults (no socket timeout, three
retries with backoff) make a dead or black-holed Redis cost seconds per call, or hang. The
cache copies the connection settings of the client you pass (host, port, db, credentials, TLS,
Unix socket) into its own client with short timeouts and at most one quick retry, and never
touches your client's pool. A client it cannot copy (Sentinel, Cluster, a custom pool) is
used as it is: then its own timeouts apply.

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
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from m2m_client._token import AccessToken, CacheKey, RefreshPolicy
from m2m_client.errors import ConfigurationError, TokenEndpointError

from ._codec import Codec, KeyNames
from ._core import (
    Commit,
    CommitError,
    DeleteIfEquals,
    Fetch,
    Get,
    InvalidateOp,
    LeaseAndRead,
    Op,
    Options,
    Read,
    Release,
    SharedCacheStats,
    SharedCore,
    Snapshot,
    Subscribe,
    Wait,
)

__all__ = ["AsyncRedisTokenCache", "RedisTokenCache"]

logger = logging.getLogger("m2m_client.cache")

T = TypeVar("T")

_INSTALL_HINT = "the Redis token cache needs redis-py: pip install 'm2m-client[redis]'"

# KEYS: token, error, lease. ARGV: value, ttl ms, lease, channel. -> 1 if the lease was ours.
_COMMIT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
local ours = 0
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]); ours = 1 end
redis.call('PUBLISH', ARGV[4], '1')
return ours
"""
# KEYS: error, lease. ARGV: value, ttl ms, lease, channel.
_COMMIT_ERROR = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], '0')
return 1
"""
# KEYS: lease. ARGV: lease, channel. Only the holder releases (compare-and-delete).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1]); redis.call('PUBLISH', ARGV[2], '0'); return 1
end
return 0
"""
# KEYS: lease. ARGV: lease, ttl ms.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: key. ARGV: exact value.
_DELETE_IF_EQUALS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    # OSError covers socket errors and the builtin TimeoutError (anyio.fail_after).
    return (redis.exceptions.RedisError, OSError)


# Connection settings we copy from a user's client; everything else (timeouts, retries,
# redis-py internals that differ between versions) is ours.
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


# --- executors: run one operation against Redis ---------------------------------------


def _snapshot(results: list[Any]) -> Snapshot:
    token, pttl, error = results[-3:]
    return Snapshot(token, int(pttl), error)


_SCRIPTS = {
    "commit": _COMMIT,
    "commit_error": _COMMIT_ERROR,
    "release": _RELEASE,
    "extend": _EXTEND,
    "delete_if_equals": _DELETE_IF_EQUALS,
}


class _Plan(NamedTuple):
    """One round trip: pipelined ``commands`` or one Lua ``script``, and how to read the reply.

    Written once here; the sync and async executors only send it.
    """

    commands: tuple[tuple[str, tuple[Any, ...], dict[str, Any]], ...]
    script: tuple[str, list[str], list[Any]] | None
    finish: Callable[[Any], Any]


def _reads(names: KeyNames) -> tuple[tuple[str, tuple[Any, ...], dict[str, Any]], ...]:
    return (
        ("get", (names.token,), {}),
        ("pttl", (names.token,), {}),
        ("get", (names.negative,), {}),
    )


def _plan(op: Op | InvalidateOp) -> _Plan:
    if isinstance(op, Read):
        return _Plan(_reads(op.names), None, _snapshot)
    if isinstance(op, LeaseAndRead):
        take = ("set", (op.names.lease, op.lease), {"nx": True, "px": op.lease_ms})
        return _Plan((take, *_reads(op.names)), None, lambda r: (bool(r[0]), _snapshot(r)))
    if isinstance(op, Commit):
        n = op.names
        script = (
            "commit",
            [n.token, n.negative, n.lease],
            [op.value, op.ttl_ms, op.lease, n.channel],
        )
        return _Plan((), script, bool)
    if isinstance(op, CommitError):
        n = op.names
        script = ("commit_error", [n.negative, n.lease], [op.value, op.ttl_ms, op.lease, n.channel])
        return _Plan((), script, lambda _: None)
    if isinstance(op, Release):
        return _Plan((), ("release", [op.names.lease], [op.lease, op.names.channel]), bool)
    if isinstance(op, Fetch):  # keep the lease of a running fetch alive
        assert op.names is not None
        return _Plan((), ("extend", [op.names.lease], [op.lease, op.lease_ms]), bool)
    if isinstance(op, Get):
        return _Plan((("get", (op.name,), {}),), None, lambda r: r[0])
    if isinstance(op, DeleteIfEquals):
        return _Plan((), ("delete_if_equals", [op.name], [op.value]), bool)
    raise TypeError(f"not a Redis operation: {op!r}")  # pragma: no cover


class _Executor:
    def __init__(self, client: Any, options: Options, *, owned: bool) -> None:
        self.client = client
        self.options = options
        self.owned = owned
        self.scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}


class _SyncExecutor(_Executor):
    """Runs operations with a sync ``redis.Redis`` (thread-safe: redis-py pools are)."""

    def run(self, op: Op | InvalidateOp) -> Any:
        plan = _plan(op)
        if plan.script is not None:
            name, keys, args = plan.script
            return plan.finish(self.scripts[name](keys, args))
        pipe = self.client.pipeline(transaction=False)
        for command, positional, named in plan.commands:
            getattr(pipe, command)(*positional, **named)
        return plan.finish(pipe.execute())

    def subscribe(self, channel: str) -> Any:
        pubsub = self.client.pubsub()
        try:
            pubsub.subscribe(channel)
            # Wait for the confirmation: only then will a commit's PUBLISH reach us.
            deadline = time.monotonic() + self.options.operation_timeout * 4
            while (remaining := deadline - time.monotonic()) > 0:
                message = pubsub.get_message(timeout=remaining)
                if message is not None and message.get("type") == "subscribe":
                    return pubsub
            raise TimeoutError("no SUBSCRIBE confirmation")
        except BaseException:
            self.unsubscribe(pubsub)
            raise

    def wait(self, pubsub: Any, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
            if message is not None and message.get("type") == "message":
                return True
        return False

    @staticmethod
    def unsubscribe(pubsub: Any) -> None:
        with contextlib.suppress(Exception):
            pubsub.close()  # drops its dedicated connection

    def close(self) -> None:
        if self.owned:
            with contextlib.suppress(Exception):
                self.client.close()


class _AsyncExecutor(_Executor):
    """Runs operations with ``redis.asyncio`` (asyncio only), each under a deadline."""

    def __init__(self, client: Any, options: Options, *, owned: bool) -> None:
        super().__init__(client, options, owned=owned)
        self.guard = (options.operation_timeout + options.connect_timeout) * 2 + 0.5

    async def run(self, op: Op | InvalidateOp) -> Any:
        plan = _plan(op)
        # A client we did not build may have no socket timeout: never wait longer than this.
        with anyio.fail_after(self.guard):
            if plan.script is not None:
                name, keys, args = plan.script
                return plan.finish(await self.scripts[name](keys, args))
            pipe = self.client.pipeline(transaction=False)
            for command, positional, named in plan.commands:
                getattr(pipe, command)(*positional, **named)
            return plan.finish(await pipe.execute())

    async def subscribe(self, channel: str) -> Any:
        pubsub = self.client.pubsub()
        try:
            with anyio.fail_after(self.guard):
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=self.options.operation_timeout)
                    if message is not None and message.get("type") == "subscribe":
                        return pubsub
        except BaseException:
            await self.unsubscribe(pubsub)
            raise

    async def wait(self, pubsub: Any, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        with anyio.fail_after(seconds + self.guard):
            while (remaining := deadline - time.monotonic()) > 0:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=remaining
                )
                if message is not None and message.get("type") == "message":
                    return True
        return False

    @staticmethod
    async def unsubscribe(pubsub: Any) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1), contextlib.suppress(Exception):
            close = getattr(pubsub, "aclose", None) or pubsub.reset
            await close()

    async def close(self) -> None:
        if self.owned:
            with anyio.move_on_after(2), contextlib.suppress(Exception):
                close = getattr(self.client, "aclose", None) or self.client.close
                await close()


class _ThreadedExecutor:
    """A sync executor driven from async code through worker threads (trio, or a sync client)."""

    def __init__(self, sync: _SyncExecutor) -> None:
        self.sync = sync
        self._limiter: tuple[object, anyio.CapacityLimiter] | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # Our own limiter, so waits do not use up anyio's default one that the app shares;
        # one per event loop, since a limiter belongs to the loop (or trio run) that made it.
        loop = anyio.lowlevel.current_token()
        current = self._limiter
        if current is None or current[0] != loop:
            current = self._limiter = (loop, anyio.CapacityLimiter(16))
        return current[1]

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(func, *args, limiter=self.limiter)

    async def run(self, op: Op | InvalidateOp) -> Any:
        return await self._call(self.sync.run, op)

    async def subscribe(self, channel: str) -> Any:
        return await self._call(self.sync.subscribe, channel)

    async def wait(self, pubsub: Any, seconds: float) -> bool:
        return await self._call(self.sync.wait, pubsub, seconds)

    async def unsubscribe(self, pubsub: Any) -> None:
        with anyio.CancelScope(shield=True):
            await self._call(self.sync.unsubscribe, pubsub)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._call(self.sync.close)


# --- drivers: feed a flow with operation results ---------------------------------------


def _drive_sync(
    core: SharedCore,
    executor: _SyncExecutor | None,
    flow: Generator[Op, Any, AccessToken],
    fetch: Callable[[], AccessToken],
) -> AccessToken:
    if executor is None:
        flow.close()
        core.count("fallbacks")
        core.count("fetches")
        return fetch()
    errors = _redis_errors()
    fetched: AccessToken | None = None
    fetch_error: Exception | None = None
    pubsub: Any = None
    try:
        op = next(flow)
        while True:
            if isinstance(op, Fetch):
                if op.names is None:
                    core.count("fetches")
                try:
                    fetched = _fetch_holding(core, executor, op, fetch)
                except Exception as exc:
                    fetch_error = exc
                    op = flow.throw(exc)
                else:
                    op = flow.send(fetched)
                continue
            try:
                if isinstance(op, Subscribe):
                    pubsub = executor.subscribe(op.names.channel)
                    result: Any = None
                elif isinstance(op, Wait):
                    result = executor.wait(pubsub, op.seconds)
                else:
                    result = executor.run(op)
            except errors as exc:
                core.redis_failed(exc)
                flow.close()
                if fetched is not None:
                    return fetched
                if fetch_error is not None:
                    raise fetch_error from None
                core.count("fallbacks")
                core.count("fetches")
                return fetch()
            core.redis_ok()
            op = flow.send(result)
    except StopIteration as stop:
        token: AccessToken = stop.value
        return token
    finally:
        if pubsub is not None:
            executor.unsubscribe(pubsub)


def _fetch_holding(
    core: SharedCore, executor: _SyncExecutor, op: Fetch, fetch: Callable[[], AccessToken]
) -> AccessToken:
    """Run ``fetch``; while it runs, a thread keeps our lease alive (a fetch with retries can
    outlast any fixed lease, and a short lease is what bounds the cost of a dead holder)."""
    names = op.names
    if names is None:
        return fetch()
    stop = threading.Event()
    errors = _redis_errors()

    def keep_alive() -> None:
        while not stop.wait(op.lease_ms / 3000):
            try:
                ours = executor.run(op)
            except errors as exc:
                core.redis_failed(exc)
                continue
            core.redis_ok()
            if not ours:
                return

    thread = threading.Thread(target=keep_alive, name="m2m-client-lease", daemon=True)
    thread.start()
    try:
        return fetch()
    finally:
        stop.set()


async def _drive_async(
    core: SharedCore,
    executor: _AsyncExecutor | _ThreadedExecutor | None,
    flow: Generator[Op, Any, AccessToken],
    fetch: Callable[[], Awaitable[AccessToken]],
) -> AccessToken:
    if executor is None:
        flow.close()
        core.count("fallbacks")
        core.count("fetches")
        return await fetch()
    errors = _redis_errors()
    fetched: AccessToken | None = None
    fetch_error: Exception | None = None
    pubsub: Any = None
    try:
        op = next(flow)
        while True:
            if isinstance(op, Fetch):
                if op.names is None:
                    core.count("fetches")
                try:
                    fetched = await _fetch_holding_async(core, executor, op, fetch)
                except Exception as exc:
                    fetch_error = exc
                    op = flow.throw(exc)
                except BaseException:
                    # Cancelled mid-fetch (the client is closing): hand the lease back now
                    # rather than make the fleet wait for it to lapse.
                    if op.names is not None:
                        with anyio.CancelScope(shield=True), contextlib.suppress(*errors):
                            await executor.run(Release(op.names, op.lease))
                    raise
                else:
                    op = flow.send(fetched)
                continue
            try:
                if isinstance(op, Subscribe):
                    pubsub = await executor.subscribe(op.names.channel)
                    result: Any = None
                elif isinstance(op, Wait):
                    result = await executor.wait(pubsub, op.seconds)
                else:
                    result = await executor.run(op)
            except errors as exc:
                core.redis_failed(exc)
                flow.close()
                if fetched is not None:
                    return fetched
                if fetch_error is not None:
                    raise fetch_error from None
                core.count("fallbacks")
                core.count("fetches")
                return await fetch()
            core.redis_ok()
            op = flow.send(result)
    except StopIteration as stop:
        token: AccessToken = stop.value
        return token
    finally:
        if pubsub is not None:
            await executor.unsubscribe(pubsub)


async def _fetch_holding_async(
    core: SharedCore,
    executor: _AsyncExecutor | _ThreadedExecutor,
    op: Fetch,
    fetch: Callable[[], Awaitable[AccessToken]],
) -> AccessToken:
    if op.names is None:
        return await fetch()
    errors = _redis_errors()

    async def keep_alive() -> None:
        while True:
            await anyio.sleep(op.lease_ms / 3000)
            try:
                ours = await executor.run(op)
            except errors as exc:
                core.redis_failed(exc)
                continue
            core.redis_ok()
            if not ours:
                return

    outcome: AccessToken | None = None
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_alive)
        try:
            outcome = await fetch()
        except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    assert outcome is not None
    return outcome


# --- in-process coalescing -------------------------------------------------------------


class _Flight:
    __slots__ = ("error", "token")

    def __init__(self) -> None:
        self.token: AccessToken | None = None
        self.error: Exception | None = None

    def outcome(self) -> AccessToken | None:
        """The leader's token (or its error, raised); None if the leader was cancelled."""
        error = self.error
        if isinstance(error, TokenEndpointError):
            # A fresh instance per caller: one exception object raised in many tasks would
            # share (and grow) one traceback.
            raise TokenEndpointError(
                error.error,
                error.error_description,
                status_code=error.status_code,
                error_uri=error.error_uri,
            ) from error
        if error is not None:
            raise error
        return self.token


class _SyncFlight(_Flight):
    __slots__ = ("done",)

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Event()


class _AsyncFlight(_Flight):
    __slots__ = ("done",)

    def __init__(self) -> None:
        super().__init__()
        self.done = anyio.Event()


# --- fork safety ----------------------------------------------------------------------

_LIVE: weakref.WeakSet[_BaseRedisCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_LIVE):
        cache._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._init_shell()
        _LIVE.add(self)

    def _init_shell(self) -> None:
        """Where the sync or async cache sets up its own state (connections, flights)."""

    @property
    def stats(self) -> SharedCacheStats:
        """Running counters of this cache in this process."""
        return self._core.stats

    @property
    def namespace(self) -> str:
        return self._core.codec.namespace

    def _sync_executor(self, client: Any) -> _SyncExecutor:
        redis = self._redis
        if self._params is None:
            return _SyncExecutor(client, self._core.options, owned=False)
        retry = redis.retry.Retry(redis.backoff.NoBackoff(), 1)  # one quick retry, no sleep
        built = _build_client(redis.Redis, self._params, self._core.options, retry)
        return _SyncExecutor(built, self._core.options, owned=True)

    def _after_fork(self) -> None:
        # The child must not share the parent's sockets: forget (never close: closing could
        # disturb the parent's connections) every client we built; they are rebuilt lazily.
        self._core.after_fork()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._init_shell()

    def __repr__(self) -> str:
        c = self._core
        return (
            f"{type(self).__name__}(namespace={c.codec.namespace!r}, "
            f"encrypted={c.codec.encrypted}, breaker={c.breaker.state.value!r})"
        )


_DOC_OPTIONS = """
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


class RedisTokenCache(_BaseRedisCache):
    """A token cache shared by every process of a fleet through Redis or Valkey (sync).

    >>> shared = RedisTokenCache(redis.Redis.from_url("redis://cache:6379/0"),
    ...                          encryption_key=os.environ["M2M_CACHE_KEY"])

    Pass it as ``TokenClient(creds, shared_cache=shared)``. Redis failing never fails a call:
    the process then fetches tokens on its own until Redis answers again.
    """

    __doc__ = (__doc__ or "") + _DOC_OPTIONS

    def _init_shell(self) -> None:
        if _is_async(self._client):
            raise ConfigurationError(
                "RedisTokenCache needs a sync redis.Redis; use AsyncRedisTokenCache for "
                "redis.asyncio.Redis"
            )
        self._executor: _SyncExecutor | None = None
        self._flights: dict[tuple[CacheKey, str | None], _SyncFlight] = {}
        self._flights_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisTokenCache:
        """``RedisTokenCache.from_url("redis://cache:6379/0", encryption_key=...)``."""
        redis = _import_redis()
        return cls(redis.Redis.from_url(url), **options)

    def _get_executor(self) -> _SyncExecutor | None:
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
                flight = self._flights[name] = _SyncFlight()
        if not leader:
            joined = flight.outcome() if flight.done.wait(self._core.options.wait_timeout) else None
            if joined is not None:
                self._core.count("coalesced")
                return joined
            flight = _SyncFlight()  # the leader is stuck or was interrupted: go on our own
        try:
            flow = self._core.obtain_flow(key, policy, stale)
            flight.token = _drive_sync(self._core, self._get_executor(), flow, fetch)
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
        except _redis_errors() as exc:
            self._core.redis_failed(exc)

    def close(self) -> None:
        """Close the connections this cache opened (not those of the client you passed)."""
        self._closed = True
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

    __doc__ = (__doc__ or "") + _DOC_OPTIONS

    def _init_shell(self) -> None:
        self._is_async_client = _is_async(self._client)
        # asyncio connections belong to one event loop: one executor per loop.
        self._native: dict[int, tuple[Any, _AsyncExecutor]] = {}
        self._threaded: _ThreadedExecutor | None = None
        self._warned_unusable = False
        self._flights: dict[tuple[CacheKey, str | None, int], _AsyncFlight] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncRedisTokenCache:
        """``AsyncRedisTokenCache.from_url("redis://cache:6379/0", encryption_key=...)``."""
        redis = _import_redis()
        return cls(redis.asyncio.Redis.from_url(url), **options)

    def _get_executor(self) -> _AsyncExecutor | _ThreadedExecutor | None:
        if self._closed:
            return None
        if self._pid != os.getpid():
            self._after_fork()
        if self._is_async_client and _on_asyncio():
            return self._native_executor()
        return self._threaded_executor()

    def _native_executor(self) -> _AsyncExecutor:
        loop = asyncio.get_running_loop()
        entry = self._native.get(id(loop))
        if entry is not None and entry[0]() is loop:
            return entry[1]
        redis = self._redis
        if self._params is None:
            executor = _AsyncExecutor(self._client, self._core.options, owned=False)
        else:
            retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 1)
            built = _build_client(redis.asyncio.Redis, self._params, self._core.options, retry)
            executor = _AsyncExecutor(built, self._core.options, owned=True)
        # Executors of loops that are gone are dropped (their sockets died with the loop).
        self._native = {k: v for k, v in self._native.items() if v[0]() is not None}
        self._native[id(loop)] = (weakref.ref(loop), executor)
        return executor

    def _threaded_executor(self) -> _ThreadedExecutor | None:
        if self._threaded is not None:
            return self._threaded
        if self._is_async_client and self._params is None:
            if not self._warned_unusable:
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
                self._threaded = _ThreadedExecutor(self._sync_executor(self._client))
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
        flight = self._flights[name] = _AsyncFlight()
        try:
            flow = self._core.obtain_flow(key, policy, stale)
            flight.token = await _drive_async(self._core, self._get_executor(), flow, fetch)
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
        executor = self._get_executor()
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
        except _redis_errors() as exc:
            self._core.redis_failed(exc)

    async def aclose(self) -> None:
        """Close the connections this cache opened (not those of the client you passed)."""
        self._closed = True
        native, self._native = self._native, {}
        threaded, self._threaded = self._threaded, None
        # asyncio connections can only be closed from their own loop; others died with theirs.
        loop = asyncio.get_running_loop() if _on_asyncio() else None
        for ref, executor in native.values():
            if ref() is loop:
                await executor.close()
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
