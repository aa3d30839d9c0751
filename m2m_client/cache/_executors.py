"""Executors: send one shared-cache operation to Redis, sync, asyncio, or through threads.

What each operation sends is decided once, by :func:`plan_for` (pipelined commands or one Lua
script, and how to read the reply); the executors only send it. The Lua scripts make every
compare-and-set step atomic: only the lease holder releases or extends its lease, and a 401
deletes the shared token only if it is still the one that was refused.

Where Redis refuses scripts (an ACL with ``-@scripting``, a proxy that blocks EVAL), the first
refusal switches the cache to the same steps without Lua: each compare-and-set becomes a
``WATCH``/``MULTI`` transaction on the lease (or entry), one WARNING says so, and the call that
met the refusal goes on at once (see :class:`Scripting`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._codec import MAX_VALUE_BYTES, KeyNames
from ._decisions import (
    Announce,
    Commit,
    CommitError,
    DeleteIfEquals,
    Get,
    InvalidateOp,
    Op,
    Read,
    Snapshot,
)
from ._lease import Extend, LeaseAndRead, Release, ReleaseFailed
from ._options import ConnectionOptions

logger = logging.getLogger("m2m_client.cache")

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
# KEYS: lease, failed marker. ARGV: lease, marker value, marker ttl ms, channel.
# The marker goes first: a waiter woken by the PUBLISH must find it.
_RELEASE_FAILED = """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[4], '0')
return 1
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


def scripting_refused(exc: BaseException) -> bool:
    """Whether ``exc`` says this server (or a proxy) will not run Lua scripts for us."""
    import redis.exceptions

    if isinstance(exc, (redis.exceptions.NoPermissionError, redis.exceptions.NoScriptError)):
        return True
    if not isinstance(exc, redis.exceptions.ResponseError):
        return False
    text = str(exc).lower()
    return text.startswith("noperm") or (
        "unknown command" in text and ("eval" in text or "script" in text)
    )


class Scripting:
    """Whether one cache may use Lua scripts; shared by all its executors (every loop)."""

    def __init__(self) -> None:
        self.refused = False
        self._lock = threading.Lock()

    def refuse(self, exc: BaseException) -> None:
        with self._lock:
            first, self.refused = not self.refused, True
        if first:
            logger.warning(
                "shared Redis cache: Redis refuses Lua scripts (%s); using WATCH/MULTI "
                "transactions instead from now on",
                type(exc).__name__,
            )


# --- executors: run one operation against Redis ---------------------------------------


def _value(reply: Any) -> bytes | None:
    # GETRANGE answers b"" for a missing key (GET: None); no entry, lease or marker is empty.
    return reply or None


def snapshot(results: list[Any]) -> Snapshot:
    token, pttl, error = results[-3:]
    return Snapshot(_value(token), int(pttl), _value(error))


# Reads are bounded in Redis (GETRANGE), not after the fact: whoever can write Redis could
# otherwise plant a 512 MiB value that every process downloads and holds on each miss. One
# byte more than a value may have, so that an oversized one is still seen as such (a miss).
_MAX_SMALL = 256
"""Lease values (32 hex digits) and failure markers (~100 bytes)."""


def _bounded_get(name: str, limit: int) -> Command:
    return ("getrange", (name, 0, limit), {})


_SCRIPTS = {
    "commit": _COMMIT,
    "commit_error": _COMMIT_ERROR,
    "release": _RELEASE,
    "release_failed": _RELEASE_FAILED,
    "extend": _EXTEND,
    "delete_if_equals": _DELETE_IF_EQUALS,
}


Command = tuple[str, tuple[Any, ...], dict[str, Any]]


class Steps(NamedTuple):
    """A script's work without Lua: ``before``; then ``then`` in a transaction that runs only
    while ``watch`` holds ``expected``; then ``after``. The reply is 1 if ``then`` ran, else 0."""

    before: tuple[Command, ...]
    watch: str
    expected: bytes
    then: tuple[Command, ...]
    after: tuple[Command, ...] = ()


class Plan(NamedTuple):
    """One round trip: pipelined ``commands`` or one Lua ``script``, and how to read the reply.

    Written once here; the sync and async executors only send it. ``steps`` is the script's
    work without Lua, for a server that refuses scripts.
    """

    commands: tuple[Command, ...]
    script: tuple[str, list[str], list[Any]] | None
    finish: Callable[[Any], Any]
    steps: Steps | None = None


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def reads(names: KeyNames) -> tuple[tuple[str, tuple[Any, ...], dict[str, Any]], ...]:
    return (
        _bounded_get(names.token, MAX_VALUE_BYTES),
        ("pttl", (names.token,), {}),
        _bounded_get(names.negative, MAX_VALUE_BYTES),
    )


def plan_for(op: Op | InvalidateOp) -> Plan:
    if isinstance(op, Read):
        return Plan(reads(op.names), None, snapshot)
    if isinstance(op, LeaseAndRead):
        # GET after SET NX: a SET that redis-py retried after a lost reply finds the lease
        # held, by us; the lease is ours when it holds our random value (redis-py lock.py).
        n = op.names
        take = ("set", (n.lease, op.lease), {"nx": True, "px": op.lease_ms})
        extra = (_bounded_get(n.lease, _MAX_SMALL), _bounded_get(op.failed, _MAX_SMALL))

        def leased(r: list[Any]) -> tuple[bool, Snapshot, bytes | None, bytes | None]:
            won = bool(r[0]) or r[1] == _b(op.lease)
            return won, snapshot(r), _value(r[1]), _value(r[2])

        return Plan((take, *extra, *reads(n)), None, leased)
    if isinstance(op, CommitError):
        n = op.names
        script = ("commit_error", [n.negative, n.lease], [op.value, op.ttl_ms, op.lease, n.channel])
        steps = Steps(
            (("set", (n.negative, op.value), {"px": op.ttl_ms}),),
            n.lease,
            _b(op.lease),
            (("delete", (n.lease,), {}),),
            (("publish", (n.channel, "0"), {}),),
        )
        return Plan((), script, lambda _: None, steps)
    if isinstance(op, Commit):
        n = op.names
        script = (
            "commit",
            [n.token, n.negative, n.lease],
            [op.value, op.ttl_ms, op.lease, n.channel],
        )
        steps = Steps(
            (("set", (n.token, op.value), {"px": op.ttl_ms}), ("delete", (n.negative,), {})),
            n.lease,
            _b(op.lease),
            (("delete", (n.lease,), {}),),
            (("publish", (n.channel, "1"), {}),),
        )
        return Plan((), script, bool, steps)
    if isinstance(op, ReleaseFailed):
        n = op.names
        script = (
            "release_failed",
            [n.lease, op.failed],
            [op.lease, op.marker, op.marker_ms, n.channel],
        )
        steps = Steps(
            (("set", (op.failed, op.marker), {"px": op.marker_ms}),),
            n.lease,
            _b(op.lease),
            (("delete", (n.lease,), {}),),
            (("publish", (n.channel, "0"), {}),),
        )
        return Plan((), script, lambda _: None, steps)
    if isinstance(op, Release):
        n = op.names
        then: tuple[Command, ...] = (("delete", (n.lease,), {}), ("publish", (n.channel, "0"), {}))
        steps = Steps((), n.lease, _b(op.lease), then)
        return Plan((), ("release", [n.lease], [op.lease, n.channel]), bool, steps)
    if isinstance(op, Extend):  # keep the lease of a running fetch alive
        n = op.names
        steps = Steps((), n.lease, _b(op.lease), (("pexpire", (n.lease, op.lease_ms), {}),))
        return Plan((), ("extend", [n.lease], [op.lease, op.lease_ms]), bool, steps)
    if isinstance(op, Get):
        return Plan((_bounded_get(op.name, MAX_VALUE_BYTES),), None, lambda r: _value(r[0]))
    if isinstance(op, DeleteIfEquals):
        steps = Steps((), op.name, op.value, (("delete", (op.name,), {}),))
        return Plan((), ("delete_if_equals", [op.name], [op.value]), bool, steps)
    if isinstance(op, Announce):
        return Plan((("publish", (op.channel, op.message), {}),), None, lambda r: r[0])
    raise TypeError(f"not a Redis operation: {op!r}")  # pragma: no cover


class Executor:
    def __init__(
        self,
        client: Any,
        options: ConnectionOptions,
        *,
        owned: bool,
        scripting: Scripting | None = None,
    ) -> None:
        self.client = client
        self.options = options
        self.owned = owned
        self.scripting = scripting if scripting is not None else Scripting()
        self.scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}


class SyncExecutor(Executor):
    """Runs operations with a sync ``redis.Redis`` (thread-safe: redis-py pools are)."""

    def run(self, op: Op | InvalidateOp) -> Any:
        plan = plan_for(op)
        if plan.script is not None and not self.scripting.refused:
            name, keys, args = plan.script
            try:
                return plan.finish(self.scripts[name](keys, args))
            except Exception as exc:
                if plan.steps is None or not scripting_refused(exc):
                    raise
                self.scripting.refuse(exc)
        if plan.steps is not None:
            return plan.finish(self._steps(plan.steps))
        return plan.finish(self._pipeline(plan.commands))

    def _pipeline(self, commands: tuple[Command, ...]) -> list[Any]:
        if len(commands) == 1:  # one command needs no pipeline (nor a slot, for PUBLISH)
            command, positional, named = commands[0]
            return [getattr(self.client, command)(*positional, **named)]
        pipe = self.client.pipeline(transaction=False)
        for command, positional, named in commands:
            getattr(pipe, command)(*positional, **named)
        return list(pipe.execute())

    def _steps(self, steps: Steps) -> int:
        import redis.exceptions

        if steps.before:
            self._pipeline(steps.before)
        done = 0
        with self.client.pipeline(transaction=True) as pipe:
            pipe.watch(steps.watch)
            if pipe.getrange(steps.watch, 0, len(steps.expected)) == steps.expected:
                pipe.multi()
                for command, positional, named in steps.then:
                    getattr(pipe, command)(*positional, **named)
                with contextlib.suppress(redis.exceptions.WatchError):
                    pipe.execute()
                    done = 1
        if steps.after:
            self._pipeline(steps.after)
        return done

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

    def __init__(
        self,
        client: Any,
        options: ConnectionOptions,
        *,
        owned: bool,
        scripting: Scripting | None = None,
    ) -> None:
        super().__init__(client, options, owned=owned, scripting=scripting)
        self.guard = options.guard

    async def run(self, op: Op | InvalidateOp) -> Any:
        plan = plan_for(op)
        # A client we did not build may have no socket timeout: never wait longer than this.
        with anyio.fail_after(self.guard):
            if plan.script is not None and not self.scripting.refused:
                name, keys, args = plan.script
                try:
                    return plan.finish(await self.scripts[name](keys, args))
                except Exception as exc:
                    if plan.steps is None or not scripting_refused(exc):
                        raise
                    self.scripting.refuse(exc)
            if plan.steps is not None:
                return plan.finish(await self._steps(plan.steps))
            return plan.finish(await self._pipeline(plan.commands))

    async def _pipeline(self, commands: tuple[Command, ...]) -> list[Any]:
        if len(commands) == 1:  # one command needs no pipeline (nor a slot, for PUBLISH)
            command, positional, named = commands[0]
            return [await getattr(self.client, command)(*positional, **named)]
        pipe = self.client.pipeline(transaction=False)
        for command, positional, named in commands:
            getattr(pipe, command)(*positional, **named)
        return list(await pipe.execute())

    async def _steps(self, steps: Steps) -> int:
        import redis.exceptions

        if steps.before:
            await self._pipeline(steps.before)
        done = 0
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(steps.watch)
            current = await pipe.getrange(steps.watch, 0, len(steps.expected))
            if current == steps.expected:
                pipe.multi()
                for command, positional, named in steps.then:
                    getattr(pipe, command)(*positional, **named)
                with contextlib.suppress(redis.exceptions.WatchError):
                    await pipe.execute()
                    done = 1
        if steps.after:
            await self._pipeline(steps.after)
        return done

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

    async def disconnect(self) -> None:
        """Drop the connections of a client we did not build (its pool stays usable): they
        belong to the event loop that is ending, and would fail on the next one."""
        with anyio.move_on_after(2), contextlib.suppress(Exception):
            pool = getattr(self.client, "connection_pool", None)
            if pool is not None:
                await pool.disconnect()
            elif hasattr(self.client, "nodes_manager"):  # a cluster client reconnects lazily
                await self.client.aclose()


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
