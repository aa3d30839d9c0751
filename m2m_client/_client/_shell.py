"""What the sync and async token clients share above the core (httpx's BaseClient pattern).

Also the fork handling: a child process (gunicorn ``--preload``, multiprocessing with fork)
inherits the parent's flights without the threads that would land them, locks a parent thread
may hold, and the parent's sockets. Every live client resets them in the child.
"""

from __future__ import annotations

import inspect
import os
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from m2m_client._discovery import Discovery
from m2m_client._retry import RetryPolicy
from m2m_client._shared import AsyncSharedTokenCache, SharedTokenCache
from m2m_client._singleflight import SingleFlight
from m2m_client._token import AccessToken, CacheKey, RefreshPolicy, TokenCache
from m2m_client.config import ClientCredentials
from m2m_client.errors import ConfigurationError

from ._core import TokenClientStats, TokenEvent, _ClientCore, reseed_after_fork

__all__ = ["_BaseTokenClient"]

HttpT = TypeVar("HttpT")  # SyncHttpClient / AsyncHttpClient (httpx or httpx2)
SleepT = TypeVar("SleepT")
SharedT = TypeVar("SharedT", SharedTokenCache, AsyncSharedTokenCache)
FetcherT = TypeVar("FetcherT")

SHARED_WAIT_DEFAULT = 35.0
"""The longest a shared cache level is assumed to make the flight owner wait for the fleet's
lease, when the level does not say (``RedisTokenCache``'s default ``wait_timeout``)."""

_live_clients: weakref.WeakSet[_BaseTokenClient[Any, Any, Any, Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    reseed_after_fork()
    for client in list(_live_clients):
        client._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _BaseTokenClient(Generic[HttpT, SleepT, SharedT, FetcherT]):
    """Construction, repr, stats, invalidation and fork handling of both clients."""

    _shared_type: type[SharedT]
    _shared_is_async: bool
    _default_sleep: Callable[[float], Any]

    def __init__(
        self,
        credentials: ClientCredentials,
        *,
        http_client: HttpT | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: SleepT | None = None,
        retry: RetryPolicy | None = None,
        refresh: RefreshPolicy | None = None,
        cache: TokenCache | None = None,
        shared_cache: SharedT | None = None,
        on_event: Callable[[TokenEvent], object] | None = None,
        seed: int | None = None,
        meter_provider: object | None = None,
        tracer_provider: object | None = None,
    ) -> None:
        """Create a client; nothing is fetched until the first ``get_token``.

        Args:
            credentials: the client's :class:`ClientCredentials`.
            http_client: your own httpx (or httpx2) client for the authorization server
                (proxies, mTLS);
                it is not closed by this client, and neither its ``auth`` nor redirects are
                applied to token requests. By default one is created with timeouts.
            clock: wall time in seconds since the epoch (default ``time.time``), used only
                for token expiry; inject a fake one in tests.
            monotonic: the clock for durations (negative cache, retry budget, renewal
                limit); default ``time.monotonic``.
            sleep: how to wait between retries (tests pass a fake).
            retry: a :class:`RetryPolicy`; its ``max_total_seconds`` bounds each fetch.
            refresh: a :class:`RefreshPolicy`.
            cache: a :class:`TokenCache` (default: bounded, in memory, per client).
            shared_cache: a fleet-shared second level (Redis); only the one in-process
                fetcher talks to it.
            on_event: called with a :class:`TokenEvent` for metrics; its exceptions are
                logged.
            seed: seeds the refresh-ahead jitter (tests).
            meter_provider, tracer_provider: OpenTelemetry providers to record to
                (default: the global ones, looked up at the first token fetch); nothing
                is recorded without an SDK. See docs/observability.md.
        """
        self._core = _ClientCore(
            credentials,
            flights=self._new_flights(),
            clock=clock,
            monotonic=monotonic,
            retry=retry,
            refresh=refresh,
            cache=cache,
            on_event=on_event,
            seed=seed,
            meter_provider=meter_provider,
            tracer_provider=tracer_provider,
        )
        if shared_cache is not None and (
            not isinstance(shared_cache, self._shared_type)
            or inspect.iscoroutinefunction(shared_cache.obtain) != self._shared_is_async
        ):
            name = self._shared_type.__name__
            raise ConfigurationError(f"{type(self).__name__} needs a {name} as shared_cache")
        self._shared: SharedT | None = shared_cache
        if shared_cache is not None:
            # The flight owner may wait for the fleet's lease before fetching: waiters in
            # this process allow for it (the level's own bound when it says so).
            wait = getattr(shared_cache, "wait_timeout", SHARED_WAIT_DEFAULT)
            self._core.shared_wait = float(wait) + 1.0
            # Its metrics reach on_event / stats like the client's own (issue 10).
            self._core.stats.shared = getattr(shared_cache, "stats", None)
            self._core.shared_source = shared_cache
            subscribe = getattr(shared_cache, "add_listener", None)
            # Always: OpenTelemetry (resolved later) counts them too; emit() is cheap.
            if callable(subscribe):
                subscribe(self._core.shared_event)
            # Another process's invalidate() drops the token from this client's memory too.
            forget = getattr(shared_cache, "add_invalidation_listener", None)
            if callable(forget):
                forget(self._core.forget_invalidated)
        discovery = (
            None
            if credentials.token_url is not None
            else Discovery(
                credentials.issuer or "",
                negative_seconds=self._core.retry.negative_cache_seconds,
                monotonic=monotonic,
                clock=clock,
            )
        )
        self._fetcher: FetcherT = self._new_fetcher(
            discovery, http_client, sleep or type(self)._default_sleep
        )
        self._cache = self._core.cache
        self._init_shell()
        _live_clients.add(self)

    def _new_flights(self) -> SingleFlight[Any]:
        raise NotImplementedError

    def _new_fetcher(self, discovery: Discovery | None, http: HttpT | None, sleep: Any) -> FetcherT:
        raise NotImplementedError

    def _init_shell(self) -> None:
        """Where a shell creates its locks (again in a forked child)."""

    def _after_fork(self) -> None:
        self._core.after_fork()
        self._init_shell()
        # Drop, never close, the parent's connection pool: closing would shut sockets the
        # parent still uses. A caller's own http_client is theirs to handle.
        self._fetcher.after_fork()  # type: ignore[attr-defined]

    def _fresh(self, key: CacheKey) -> AccessToken | None:
        """The cached token if nothing needs doing (the fast path), else ``None``."""
        try:
            token = self._cache.get(key)
        except Exception:
            return None  # the slow path logs it
        if token is None or self._core.closed or self._core.clock() >= token.refresh_at:
            return None
        return token

    def _start_telemetry(self) -> None:
        """Resolve the OpenTelemetry providers (once). With an SDK, ``_fresh`` (the warm
        path of ``get_token`` and ``BearerAuth``) becomes a measured one on this instance;
        without one it stays exactly as it is, not one check added."""
        telemetry = self._core.resolve_telemetry()
        if telemetry is None:
            return
        fresh = type(self)._fresh

        def measured(key: CacheKey) -> AccessToken | None:
            started = time.perf_counter()
            token = fresh(self, key)
            if token is not None:
                telemetry.acquired("hit", time.perf_counter() - started)
            return token

        vars(self)["_fresh"] = measured  # shadows the class's method from now on

    def __repr__(self) -> str:
        creds = self._core.credentials
        return (
            f"{type(self).__name__}(endpoint={creds.endpoint_id!r}, client_id={creds.client_id!r})"
        )

    @property
    def stats(self) -> TokenClientStats:
        """Counters: token requests, fetched tokens, failures, retries."""
        return self._core.stats

    def invalidate(
        self,
        token: AccessToken,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] | None = None,
    ) -> bool:
        """Drop ``token`` if it is still the cached one (e.g. after a 401); ``True`` if dropped.

        With a ``shared_cache``, a dropped token is deleted from the shared level too, if the
        shared entry still holds that same token (compare-and-delete: a newer token another
        process stored stays), so the fleet does not hand it back. A failing shared level is
        logged, never raised. :class:`TokenClient` deletes before returning;
        :class:`AsyncTokenClient` (this method cannot await) in a background task inside
        ``async with``, else at its next fetch of the key; ``await tokens.ainvalidate(token)``
        returns once it is done.

        A token is dropped at most once per key every few seconds, so an API that refuses
        every token does not turn each call into a token request (nor the fleet's).
        """
        key = self._core.key(audience, resource, scope)
        removed = self._core.invalidate(key, token)
        if removed:
            self._forget_shared(key, token)
        return removed

    def _forget_shared(self, key: CacheKey, token: AccessToken) -> None:
        """Delete ``token`` from the shared level if it still holds it (each shell's way)."""
