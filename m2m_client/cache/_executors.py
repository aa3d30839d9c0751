"""Executors: send one shared-cache operation to Redis, sync, asyncio, or through threads.

What each operation sends is decided once, by :func:`plan_for` (pipelined commands or one Lua
script, and how to read the reply); the executors only send it. The Lua scripts make every
compare-and-set step atomic: only the lease holder releases or extends its lease, and a 401
deletes the shared token only if it is still the one that was refused.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._codec import KeyNames
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
    Snapshot,
)

T = TypeVar("T")

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


def redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    # OSError covers socket errors and the builtin TimeoutError (anyio.fail_after).
    return (redis.exceptions.RedisError, OSError)


# --- executors: run one operation against Redis ---------------------------------------


def snapshot(results: list[Any]) -> Snapshot:
    token, pttl, error = results[-3:]
    return Snapshot(token, int(pttl), error)


_SCRIPTS = {
    "commit": _COMMIT,
    "commit_error": _COMMIT_ERROR,
    "release": _RELEASE,
    "extend": _EXTEND,
    "delete_if_equals": _DELETE_IF_EQUALS,
}


class Plan(NamedTuple):
    """One round trip: pipelined ``commands`` or one Lua ``script``, and how to read the reply.

    Written once here; the sync and async executors only send it.
    """

    commands: tuple[tuple[str, tuple[Any, ...], dict[str, Any]], ...]
    script: tuple[str, list[str], list[Any]] | None
    finish: Callable[[Any], Any]


def reads(names: KeyNames) -> tuple[tuple[str, tuple[Any, ...], dict[str, Any]], ...]:
    return (
        ("get", (names.token,), {}),
        ("pttl", (names.token,), {}),
        ("get", (names.negative,), {}),
    )


def plan_for(op: Op | InvalidateOp) -> Plan:
    if isinstance(op, Read):
        return Plan(reads(op.names), None, snapshot)
    if isinstance(op, LeaseAndRead):
        take = ("set", (op.names.lease, op.lease), {"nx": True, "px": op.lease_ms})
        return Plan((take, *reads(op.names)), None, lambda r: (bool(r[0]), snapshot(r)))
    if isinstance(op, Commit):
        n = op.names
        script = (
            "commit",
            [n.token, n.negative, n.lease],
            [op.value, op.ttl_ms, op.lease, n.channel],
        )
        return Plan((), script, bool)
    if isinstance(op, CommitError):
        n = op.names
        script = ("commit_error", [n.negative, n.lease], [op.value, op.ttl_ms, op.lease, n.channel])
        return Plan((), script, lambda _: None)
    if isinstance(op, Release):
        return Plan((), ("release", [op.names.lease], [op.lease, op.names.channel]), bool)
    if isinstance(op, Fetch):  # keep the lease of a running fetch alive
        assert op.names is not None
        return Plan((), ("extend", [op.names.lease], [op.lease, op.lease_ms]), bool)
    if isinstance(op, Get):
        return Plan((("get", (op.name,), {}),), None, lambda r: r[0])
    if isinstance(op, DeleteIfEquals):
        return Plan((), ("delete_if_equals", [op.name], [op.value]), bool)
    raise TypeError(f"not a Redis operation: {op!r}")  # pragma: no cover


class Executor:
    def __init__(self, client: Any, options: Options, *, owned: bool) -> None:
        self.client = client
        self.options = options
        self.owned = owned
        self.scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}


class SyncExecutor(Executor):
    """Runs operations with a sync ``redis.Redis`` (thread-safe: redis-py pools are)."""

    def run(self, op: Op | InvalidateOp) -> Any:
        plan = plan_for(op)
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


class AsyncExecutor(Executor):
    """Runs operations with ``redis.asyncio`` (asyncio only), each under a deadline."""

    def __init__(self, client: Any, options: Options, *, owned: bool) -> None:
        super().__init__(client, options, owned=owned)
        self.guard = (options.operation_timeout + options.connect_timeout) * 2 + 0.5

    async def run(self, op: Op | InvalidateOp) -> Any:
        plan = plan_for(op)
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


class ThreadedExecutor:
    """A sync executor driven from async code through worker threads (trio, or a sync client)."""

    def __init__(self, sync: SyncExecutor) -> None:
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
