"""Drivers: feed a shared-cache flow with the results of its operations, sync and async.

The decisions live in ``_decisions.SharedCore``; a driver runs each operation the flow yields
(on an executor, or the caller's ``fetch`` while keeping the lease alive) and sends the result
back. What a driver remembers of one flow, and what it does when Redis gives out, is written
once (:class:`_Progress`); only the calls differ between the two. A Redis failure is never
thrown into the flow: the driver closes it and falls back to fetching for itself. Any
exception out of the Redis client is such a failure, not only redis-py's own (a client used on
an event loop it does not belong to raises ``RuntimeError``): a miss, never a failed call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio

from m2m_client._token import AccessToken

from ._decisions import Fetch, Op, SharedCore, Subscribe, Wait
from ._executors import AsyncExecutor, SyncExecutor, ThreadedExecutor
from ._lease import Release

Flow = Generator[Op, Any, AccessToken]


def without_redis(core: SharedCore, flow: Flow) -> None:
    """Abandon the flow: the caller fetches on its own (counted as a fallback)."""
    flow.close()
    core.count("fallbacks")
    core.count("fetches")


class _Progress:
    """One flow as a driver runs it: what our own fetch gave, and the next operation."""

    __slots__ = ("core", "fetch_error", "fetched", "flow")

    def __init__(self, core: SharedCore, flow: Flow) -> None:
        self.core, self.flow = core, flow
        self.fetched: AccessToken | None = None
        self.fetch_error: Exception | None = None

    def fetching(self, op: Fetch) -> None:
        if op.names is None:  # a fetch without the lease (the lease holder's is counted)
            self.core.count("fetches")

    def fetch_failed(self, exc: Exception) -> Op:
        self.fetch_error = exc
        return self.flow.throw(exc)

    def fetch_gave(self, token: AccessToken) -> Op:
        self.fetched = token
        return self.flow.send(token)

    def redis_gave(self, result: Any) -> Op:
        self.core.redis_ok()
        return self.flow.send(result)

    def redis_gave_out(self, exc: BaseException) -> AccessToken | None:
        """After Redis failed mid-flow: the token we already fetched, our own fetch's error
        (raised), or None when the caller must fetch on its own."""
        self.core.redis_failed(exc)
        if self.fetched is not None:
            self.flow.close()
            return self.fetched
        if self.fetch_error is not None:
            self.flow.close()
            raise self.fetch_error from None
        without_redis(self.core, self.flow)
        return None


def drive_sync(
    core: SharedCore, executor: SyncExecutor | None, flow: Flow, fetch: Callable[[], AccessToken]
) -> AccessToken:
    if executor is None:
        without_redis(core, flow)
        return fetch()
    run = _Progress(core, flow)
    pubsub: Any = None
    result: Any
    try:
        op = next(flow)
        while True:
            if isinstance(op, Fetch):
                run.fetching(op)
                try:
                    fetched = fetch_holding(core, executor, op, fetch)
                except Exception as exc:
                    op = run.fetch_failed(exc)
                else:
                    op = run.fetch_gave(fetched)
                continue
            try:
                if isinstance(op, Subscribe):
                    result = pubsub = executor.subscribe(op.names.channel)
                elif isinstance(op, Wait):
                    result = executor.wait(pubsub, op.seconds)
                else:
                    result = executor.run(op)
            except Exception as exc:  # whatever the Redis client raises
                kept = run.redis_gave_out(exc)
                return kept if kept is not None else fetch()
            op = run.redis_gave(result)
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
    if op.names is None:
        return fetch()
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(op.lease_ms / 3000):
            try:
                ours = executor.run(op.extend())
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
    flow: Flow,
    fetch: Callable[[], Awaitable[AccessToken]],
) -> AccessToken:
    if executor is None:
        without_redis(core, flow)
        return await fetch()
    run = _Progress(core, flow)
    pubsub: Any = None
    result: Any
    try:
        op = next(flow)
        while True:
            if isinstance(op, Fetch):
                run.fetching(op)
                try:
                    fetched = await fetch_holding_async(core, executor, op, fetch)
                except Exception as exc:
                    op = run.fetch_failed(exc)
                except BaseException:
                    # Cancelled mid-fetch (the client is closing): hand the lease back now
                    # rather than make the fleet wait for it to lapse.
                    if op.names is not None:
                        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                            await executor.run(Release(op.names, op.lease))
                    raise
                else:
                    op = run.fetch_gave(fetched)
                continue
            try:
                if isinstance(op, Subscribe):
                    result = pubsub = await executor.subscribe(op.names.channel)
                elif isinstance(op, Wait):
                    result = await executor.wait(pubsub, op.seconds)
                else:
                    result = await executor.run(op)
            except Exception as exc:  # whatever the Redis client raises
                kept = run.redis_gave_out(exc)
                return kept if kept is not None else await fetch()
            op = run.redis_gave(result)
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
                ours = await executor.run(op.extend())
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
