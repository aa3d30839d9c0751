"""AsyncTokenClient: the core's decisions carried out with anyio (asyncio or trio)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Hashable, Iterable
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from m2m_client._discovery import Discovery
from m2m_client._loops import LoopEvent, LoopRef, current_loop
from m2m_client._shared import AsyncSharedTokenCache
from m2m_client._singleflight import Flight, SingleFlight, wait_for_async
from m2m_client._stacks import AsyncHttpClient
from m2m_client._token import AccessToken, CacheKey

from ._decisions import Fetch, RefreshBehind, Use, Wait, describe, remember
from ._fetch import AsyncFetcher
from ._shell import _BaseTokenClient

__all__ = ["AsyncTokenClient"]

logger = logging.getLogger("m2m_client")


class AsyncTokenClient(
    _BaseTokenClient[
        AsyncHttpClient,
        Callable[[float], Awaitable[Any]],
        AsyncSharedTokenCache,
        AsyncFetcher,
    ]
):
    """Gets, caches and refreshes client-credentials tokens (asyncio or trio, via anyio).

    ::

        async with AsyncTokenClient(creds) as tokens:
            token = await tokens.get_token()

    With ``async with``, fetches run in the client's own background tasks: refresh-ahead
    does not delay any caller, and a cancelled caller never cancels the request others wait
    for. Exceptions raised in the block come out exactly as raised. Without ``async with``
    the caller that triggers a fetch runs it, shielded from cancellation but bounded by the
    retry policy's ``max_total_seconds``.

    One client may serve several event loops (threads each running their own, asyncio or
    trio, or ``asyncio.run()`` called more than once): one token request per key for all of
    them, and a caller in one loop waiting for a request another loop runs is woken as soon
    as it lands. Without ``http_client``, each token request (with its discovery and
    retries) opens its connections in the loop that runs it and closes them at its end. A
    caller's ``http_client`` belongs to the loop it is first used in: a token request from
    another loop raises :class:`ConfigurationError` at once.
    """

    _shared_is_async = True
    _shared_type = AsyncSharedTokenCache
    _default_sleep = staticmethod(anyio.sleep)

    def _new_flights(self) -> SingleFlight[Any]:
        return SingleFlight(LoopEvent)

    def _new_fetcher(
        self, discovery: Discovery | None, http: AsyncHttpClient | None, sleep: Any
    ) -> AsyncFetcher:
        return AsyncFetcher(self._core, discovery, http, sleep)

    def _init_shell(self) -> None:
        self._tasks = _OwnTasks()
        self._deletes = _SharedDeletes(self._shared, self._tasks)
        # The core's decisions are atomic within one loop (no await inside); this lock makes
        # them atomic across the threads of several loops too. Never held across an await.
        self._lock = threading.Lock()

    async def __aenter__(self) -> AsyncTokenClient:
        await self._tasks.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._tasks.close()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it; ``get_token`` then raises."""
        self._core.closed = True
        await self._fetcher.aclose()

    async def get_token(
        self,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] | None = None,
        force_refresh: bool = False,
    ) -> AccessToken:
        """Await a valid token; see :meth:`TokenClient.get_token` (same arguments and errors)."""
        if self._core.authenticator.identity_unknown:
            # Issue 21: the assertion's identity is part of the key; learn it first.
            await self._core.authenticator.aprepare(self._core.clock())
        key = self._core.key(audience, resource, scope)
        if not force_refresh:
            token = self.cached_token(key)
            if token is not None:
                return token  # the fast path
        return await self.fetch_token(key, force_refresh)

    async def fetch_token(self, key: CacheKey, force: bool = False) -> AccessToken:
        """For auths: :meth:`TokenClient.fetch_token`, awaited."""
        started = self._slow_path_started()
        try:
            token, outcome = await self._carry_out(key, force)
        except BaseException:
            self._core.reporter.acquired("failed", started)
            raise
        self._core.reporter.acquired(outcome, started)
        return token

    async def token_refused(self, key: CacheKey, token: AccessToken) -> bool:
        """For auths: :meth:`TokenClient.token_refused`, returning once the shared level
        forgot the dropped token too."""
        replay, dropped = self._renewals.refused(key, token)
        if dropped:
            self._deletes.waiting.pop(key, None)  # this delete covers it
            await self._deletes.now(key, token)
        return replay

    async def _carry_out(self, key: CacheKey, force_refresh: bool) -> tuple[AccessToken, str]:
        self._core.check_open("AsyncTokenClient")
        self._fetcher.check_loop()  # a caller's http_client used from another loop: refuse now
        with self._lock:
            decision = self._core.begin(key, force_refresh)  # atomic: no await inside
        if isinstance(decision, Use):
            return decision.token, self._core.use_outcome(key, decision.token)
        if isinstance(decision, RefreshBehind | Fetch):
            behind = isinstance(decision, RefreshBehind)
            stale = decision.token if isinstance(decision, RefreshBehind) else decision.stale
            link = self._core.reporter.span_link() if behind else None
            task_group = self._tasks.here()
            if task_group is not None:
                task_group.start_soon(_quietly, self._run_flight, key, decision.flight, stale, link)
            else:
                with anyio.CancelScope(shield=True):
                    await self._run_flight(key, decision.flight, stale, link)
            if isinstance(decision, RefreshBehind):
                return decision.token, "refresh_ahead"
        flight = decision.flight
        await wait_for_async(flight)
        token = flight.outcome()
        if isinstance(decision, Wait):
            return token, "waited"
        return token, "shared_hit" if flight.shared else "fetched"

    async def _run_flight(
        self, key: CacheKey, flight: Flight[Any], stale: AccessToken | None, link: object = None
    ) -> None:
        with self._flying(key, flight, link) as fetch:
            shared = self._shared
            if shared is None:
                flight.token = await fetch()
            else:
                await self._deletes.pending(key)
                flight.token = await shared.obtain(
                    key, fetch, policy=self._core.refresh, stale=stale
                )

    async def ainvalidate(
        self,
        token: AccessToken,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] | None = None,
    ) -> bool:
        """:meth:`invalidate`, returning once the shared level forgot ``token`` too.

        ``True`` if the token was dropped; then the shared entry is deleted if it still holds
        that token (never a newer one another process stored). A failing shared level is
        logged, never raised.
        """
        key = self._core.key(audience, resource, scope)
        removed = self._renewals.invalidate(key, token)
        if removed:
            await self._deletes.now(key, token)
        return removed

    def _forget_shared(self, key: CacheKey, token: AccessToken) -> None:
        self._deletes.soon(key, token)


async def _quietly(run: Callable[..., Awaitable[None]], *args: Any) -> None:
    # A background task must never fail: the task group would cancel the user's block.
    try:
        await run(*args)
    except Exception:
        logger.exception("m2m_client: background token fetch failed")


class _OwnTasks:
    """The client's own background tasks: the task group of its ``async with`` block, which
    runs refresh-ahead, fetches a cancelled caller must not cancel, and shared-level deletes.

    A task group belongs to one loop: a caller in another loop runs its fetch itself."""

    __slots__ = ("group", "loop")

    def __init__(self) -> None:
        self.group: anyio.abc.TaskGroup | None = None
        self.loop = LoopRef(None)

    async def open(self) -> None:
        group = anyio.create_task_group()
        await group.__aenter__()
        self.group, self.loop = group, LoopRef(current_loop())

    async def close(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            # The block's own exception is NOT handed to the task group (which would wrap it
            # in an ExceptionGroup): returning lets it propagate exactly as raised. Background
            # fetches are cancelled, landing their flights.
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)

    def here(self) -> anyio.abc.TaskGroup | None:
        """The task group, if there is one and this code runs in its loop."""
        group = self.group
        if group is None or not self.loop.is_current():
            return None
        return group


class _SharedDeletes:
    """Deleting a dropped token from the shared level. :meth:`invalidate` cannot await:
    inside ``async with`` the delete runs as one of the client's background tasks; outside,
    it waits in ``waiting`` (bounded like every per-key table) for the next fetch of the key,
    which does it first."""

    __slots__ = ("shared", "tasks", "waiting")

    def __init__(self, shared: AsyncSharedTokenCache | None, tasks: _OwnTasks) -> None:
        self.shared, self.tasks = shared, tasks
        self.waiting: dict[Hashable, AccessToken] = {}

    def soon(self, key: CacheKey, token: AccessToken) -> None:
        if self.shared is None:
            return
        task_group = self.tasks.here()
        if task_group is not None:
            task_group.start_soon(self.now, key, token)
        else:
            remember(self.waiting, key, token)

    async def pending(self, key: CacheKey) -> None:
        """Before a fetch of ``key``: the delete an earlier invalidate() left waiting."""
        token = self.waiting.pop(key, None)
        if token is not None:
            await self.now(key, token)

    async def now(self, key: CacheKey, token: AccessToken) -> None:
        if self.shared is None:
            return
        try:
            await self.shared.invalidate(key, token)
        except Exception as exc:  # the shared level is an optimisation, never a failure
            logger.warning("shared token cache invalidate failed (%s)", describe(exc))
