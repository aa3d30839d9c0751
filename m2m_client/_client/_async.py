"""AsyncTokenClient: the core's decisions carried out with anyio (asyncio or trio)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from m2m_client._discovery import Discovery
from m2m_client._loops import LoopEvent, LoopRef, current_loop
from m2m_client._shared import AsyncSharedTokenCache
from m2m_client._singleflight import Flight, SingleFlight
from m2m_client._stacks import AsyncHttpClient
from m2m_client._token import AccessToken, CacheKey

from ._core import Fetch, RefreshBehind, Use, Wait, describe, remember
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
    _task_group: anyio.abc.TaskGroup | None = None

    def _new_flights(self) -> SingleFlight[Any]:
        return SingleFlight(LoopEvent)

    def _new_fetcher(
        self, discovery: Discovery | None, http: AsyncHttpClient | None, sleep: Any
    ) -> AsyncFetcher:
        return AsyncFetcher(self._core, discovery, http, sleep)

    def _init_shell(self) -> None:
        self._task_group = None
        self._task_group_loop = LoopRef(None)
        # The core's decisions are atomic within one loop (no await inside); this lock makes
        # them atomic across the threads of several loops too. Never held across an await.
        self._lock = threading.Lock()
        # Shared-level deletes an invalidate() outside ``async with`` could not start: done by
        # the next fetch of the key (bounded like every per-key table).
        self._forget_pending: dict[Hashable, AccessToken] = {}

    async def __aenter__(self) -> AsyncTokenClient:
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._task_group_loop = LoopRef(current_loop())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        try:
            if task_group is not None:
                # The block's own exception is NOT handed to the task group (which would
                # wrap it in an ExceptionGroup): returning lets it propagate exactly as
                # raised. Background fetches are cancelled, landing their flights.
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
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
            token = self._fresh(key)
            if token is not None:
                return token  # the fast path
        return await self._token(key, force_refresh)

    async def _token(self, key: CacheKey, force_refresh: bool = False) -> AccessToken:
        started = time.perf_counter()
        if self._core.providers is not None:
            self._start_telemetry()
        try:
            token, outcome = await self._carry_out(key, force_refresh)
        except BaseException:
            self._core.acquired("failed", started)
            raise
        self._core.acquired(outcome, started)
        return token

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
            link = self._core.span_link() if behind else None
            task_group = self._own_task_group()
            if task_group is not None:
                task_group.start_soon(self._run_quietly, key, decision.flight, stale, link)
            else:
                with anyio.CancelScope(shield=True):
                    await self._run_flight(key, decision.flight, stale, link)
            if isinstance(decision, RefreshBehind):
                return decision.token, "refresh_ahead"
        flight = decision.flight
        with anyio.move_on_after(flight.wait_seconds()):
            await flight.done.wait()
        token = flight.outcome()
        if isinstance(decision, Wait):
            return token, "waited"
        return token, "shared_hit" if flight.shared else "fetched"

    async def _run_quietly(
        self, key: CacheKey, flight: Flight[Any], stale: AccessToken | None, link: object = None
    ) -> None:
        # A background task must never fail: the task group would cancel the user's block.
        try:
            await self._run_flight(key, flight, stale, link)
        except Exception:
            logger.exception("m2m_client: background token fetch failed")

    async def _run_flight(
        self, key: CacheKey, flight: Flight[Any], stale: AccessToken | None, link: object = None
    ) -> None:
        with self._core.landing(key, flight, self._lock), self._core.fetch_span(link):
            fetched = False

            def fetch() -> Awaitable[AccessToken]:
                nonlocal fetched
                fetched = True
                return self._fetcher.fetch(key, self._core.budget())

            shared = self._shared
            if shared is None:
                flight.token = await fetch()
            else:
                pending = self._forget_pending.pop(key, None)
                if pending is not None:
                    await self._forget_shared_now(key, pending)
                flight.token = await shared.obtain(
                    key, fetch, policy=self._core.refresh, stale=stale
                )
                flight.shared = not fetched

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
        removed = self._core.invalidate(key, token)
        if removed:
            await self._forget_shared_now(key, token)
        return removed

    def _forget_shared(self, key: CacheKey, token: AccessToken) -> None:
        """:meth:`invalidate` cannot await: inside ``async with`` the delete runs as one of the
        client's background tasks; outside, the next fetch of ``key`` does it first."""
        if self._shared is None:
            return
        task_group = self._own_task_group()
        if task_group is not None:
            task_group.start_soon(self._forget_shared_now, key, token)
        else:
            remember(self._forget_pending, key, token)

    def _own_task_group(self) -> anyio.abc.TaskGroup | None:
        """The ``async with`` block's task group, if this code runs in its loop (a task group
        belongs to one loop: a caller in another one runs its fetch itself)."""
        task_group = self._task_group
        if task_group is None or not self._task_group_loop.is_current():
            return None
        return task_group

    async def _forget_shared_now(self, key: CacheKey, token: AccessToken) -> None:
        if self._shared is None:
            return
        try:
            await self._shared.invalidate(key, token)
        except Exception as exc:  # the shared level is an optimisation, never a failure
            logger.warning("shared token cache invalidate failed (%s)", describe(exc))

    async def _ainvalidate(self, key: CacheKey, token: AccessToken) -> bool:
        """:meth:`invalidate` plus the shared level (BearerAuth's 401 path)."""
        replay, dropped = self._core.refused(key, token)
        if dropped:
            self._forget_pending.pop(key, None)
            await self._forget_shared_now(key, token)
        return replay
