"""Drivers: feed a shared-cache flow with the results of its operations, sync and async.

The decisions live in ``_core.SharedCore``; a driver runs each operation the flow yields (on an
executor, or the caller's ``fetch`` while keeping the lease alive) and sends the result back.
A Redis failure is never thrown into the flow: the driver closes it and falls back to fetching
for itself. Any exception out of the Redis client is such a failure, not only redis-py's own
(a client used on an event loop it does not belong to raises ``RuntimeError``): a miss, never a
failed call. Also here: the in-process coalescing of concurrent calls for one key.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio

from m2m_client._token import AccessToken
from m2m_client.errors import TokenEndpointError

from ._core import Fetch, Op, Release, SharedCore, Subscribe, Wait
from ._executors import AsyncExecutor, SyncExecutor, ThreadedExecutor

# --- drivers: feed a flow with operation results ---------------------------------------


def _without_redis(core: SharedCore, flow: Generator[Op, Any, AccessToken]) -> None:
    """Abandon the flow: the caller fetches on its own (counted as a fallback)."""
    flow.close()
    core.count("fallbacks")
    core.count("fetches")


def _redis_gave_out(
    core: SharedCore,
    exc: BaseException,
    flow: Generator[Op, Any, AccessToken],
    fetched: AccessToken | None,
    fetch_error: Exception | None,
) -> AccessToken | None:
    """After Redis failed mid-flow: the token we already fetched, our own fetch's error
    (raised), or None when the caller must fetch on its own."""
    core.redis_failed(exc)
    if fetched is not None:
        flow.close()
        return fetched
    if fetch_error is not None:
        flow.close()
        raise fetch_error from None
    _without_redis(core, flow)
    return None


def drive_sync(
    core: SharedCore,
    executor: SyncExecutor | None,
    flow: Generator[Op, Any, AccessToken],
    fetch: Callable[[], AccessToken],
) -> AccessToken:
    if executor is None:
        _without_redis(core, flow)
        return fetch()
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
                    fetched = fetch_holding(core, executor, op, fetch)
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
            except Exception as exc:  # whatever the Redis client raises
                kept = _redis_gave_out(core, exc, flow, fetched, fetch_error)
                return kept if kept is not None else fetch()
            core.redis_ok()
            op = flow.send(result)
    except StopIteration as stop:
        token: AccessToken = stop.value
        return token
    finally:
        if pubsub is not None:
            executor.unsubscribe(pubsub)


def fetch_holding(
    core: SharedCore, executor: SyncExecutor, op: Fetch, fetch: Callable[[], AccessToken]
) -> AccessToken:
    """Run ``fetch``; while it runs, a thread keeps our lease alive (a fetch with retries can
    outlast any fixed lease, and a short lease is what bounds the cost of a dead holder)."""
    names = op.names
    if names is None:
        return fetch()
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(op.lease_ms / 3000):
            try:
                ours = executor.run(op)
            except Exception as exc:  # whatever the Redis client raises
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


async def drive_async(
    core: SharedCore,
    executor: AsyncExecutor | ThreadedExecutor | None,
    flow: Generator[Op, Any, AccessToken],
    fetch: Callable[[], Awaitable[AccessToken]],
) -> AccessToken:
    if executor is None:
        _without_redis(core, flow)
        return await fetch()
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
                    fetched = await fetch_holding_async(core, executor, op, fetch)
                except Exception as exc:
                    fetch_error = exc
                    op = flow.throw(exc)
                except BaseException:
                    # Cancelled mid-fetch (the client is closing): hand the lease back now
                    # rather than make the fleet wait for it to lapse.
                    if op.names is not None:
                        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
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
            except Exception as exc:  # whatever the Redis client raises
                kept = _redis_gave_out(core, exc, flow, fetched, fetch_error)
                return kept if kept is not None else await fetch()
            core.redis_ok()
            op = flow.send(result)
    except StopIteration as stop:
        token: AccessToken = stop.value
        return token
    finally:
        if pubsub is not None:
            await executor.unsubscribe(pubsub)


async def fetch_holding_async(
    core: SharedCore,
    executor: AsyncExecutor | ThreadedExecutor,
    op: Fetch,
    fetch: Callable[[], Awaitable[AccessToken]],
) -> AccessToken:
    if op.names is None:
        return await fetch()

    async def keep_alive() -> None:
        while True:
            await anyio.sleep(op.lease_ms / 3000)
            try:
                ours = await executor.run(op)
            except Exception as exc:  # whatever the Redis client raises
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


class Flight:
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


class SyncFlight(Flight):
    __slots__ = ("done",)

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Event()


class AsyncFlight(Flight):
    __slots__ = ("done",)

    def __init__(self) -> None:
        super().__init__()
        self.done = anyio.Event()
