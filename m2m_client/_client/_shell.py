"""What the sync and async token clients share above the core (httpx's BaseClient pattern):
construction, the warm path, invalidation, fork handling, and the seam auths use.

Fork handling: a child process (gunicorn ``--preload``, multiprocessing with fork) inherits
the parent's flights without the threads that would land them, locks a parent thread may hold,
and the parent's sockets. Every live client is tracked by :mod:`m2m_client._fork` and resets
them in the child.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Generic, Protocol, TypeVar

from m2m_client._discovery import Discovery
from m2m_client._fork import track
from m2m_client._retry import RetryPolicy
from m2m_client._shared import AsyncSharedTokenCache, SharedTokenCache
from m2m_client._singleflight import Flight, SingleFlight
from m2m_client._token import AccessToken, CacheKey, RefreshPolicy, TokenCache
from m2m_client.config import ClientCredentials
from m2m_client.errors import ConfigurationError

from ._decisions import Budget, Renewals, TokenClientStats, TokenEvent, _ClientCore

__all__ = ["_BaseTokenClient"]

logger = logging.getLogger("m2m_client")

HttpT = TypeVar("HttpT")  # SyncHttpClient / AsyncHttpClient (httpx or httpx2)
SleepT = TypeVar("SleepT")
SharedT = TypeVar("SharedT", SharedTokenCache, AsyncSharedTokenCache)


class _Fetcher(Protocol):
    """What a shell needs of its fetcher (``_fetch.SyncFetcher`` / ``AsyncFetcher``)."""

    def fetch(self, key: CacheKey, budget: Budget) -> Any: ...

    def after_fork(self) -> None: ...


FetcherT = TypeVar("FetcherT", bound=_Fetcher)

SHARED_WAIT_DEFAULT = 35.0
"""The longest a shared cache level is assumed to make the flight owner wait for the fleet's
lease, when the level does not say (``RedisTokenCache``'s default ``wait_timeout``)."""


def _join_shared_level(client: _BaseTokenClient[Any, Any, Any, Any], shared: object) -> None:
    """Wire a client to its shared cache level (events, counters, invalidations)."""
    core = client._core
    # The flight owner may wait for the fleet's lease before fetching: waiters in this
    # process allow for it (the level's own bound when it says so).
    core.shared_wait = float(getattr(shared, "wait_timeout", SHARED_WAIT_DEFAULT)) + 1.0
    # Its metrics reach on_event / stats like the client's own (issue 10).
    core.stats.shared = getattr(shared, "stats", None)
    subscribe = getattr(shared, "add_listener", None)
    # Always: OpenTelemetry (resolved later) counts them too; emit() is cheap. Listeners are
    # held weakly: bound methods of objects that live as long as the client.
    if callable(subscribe):
        subscribe(client._shared_event)
    # Another process's invalidate() drops the token from this client's memory too.
    forget = getattr(shared, "add_invalidation_listener", None)
    if callable(forget):
        forget(client._renewals.forget_invalidated)


def _start_telemetry(client: _AuthSeam) -> None:
    """Resolve a client's OpenTelemetry providers (once). With an SDK, its
    :meth:`~_AuthSeam.cached_token` (the warm path of ``get_token`` and ``BearerAuth``) becomes
    a measured one on that instance; without one it stays exactly as it is, not one check
    added."""
    telemetry = client._core.reporter.resolve()
    if telemetry is None:
        return
    cached = type(client).cached_token

    def measured(key: CacheKey) -> AccessToken | None:
        started = time.perf_counter()
        token = cached(client, key)
        if token is not None:
            telemetry.acquired("hit", time.perf_counter() - started)
        return token

    vars(client)["cached_token"] = measured  # shadows the class's method from now on


class _AuthSeam:
    """What an auth (``BearerAuth``) may call on a token client, and nothing else: public
    names, not for applications (they call ``get_token``). Each client adds
    ``fetch_token(key)`` and ``token_refused(key, token)``, plain or awaitable.

    An auth builds its key once (:meth:`cache_key`), takes the warm token without a lock or
    a coroutine (:meth:`cached_token`), else ``fetch_token``; on a 401 that blames the token,
    ``token_refused`` says whether a replay would carry another one.
    """

    _core: _ClientCore
    _cache: TokenCache

    def cache_key(
        self,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] | None = None,
    ) -> CacheKey:
        """For auths: the key of the tokens for ``audience``/``resource``/``scope``
        (defaults: the credentials'). Build it once per auth, pass it to the calls below."""
        return self._core.key(audience, resource, scope)

    def cached_token(self, key: CacheKey) -> AccessToken | None:
        """For auths: the cached token for ``key`` if nothing needs doing (no I/O, no lock,
        no await), else ``None``: then call ``fetch_token(key)``."""
        try:
            token = self._cache.get(key)
        except Exception:
            return None  # the slow path logs it
        if token is None or self._core.closed or self._core.clock() >= token.refresh_at:
            return None
        return token

    def dpop_proof(
        self, method: str, url: str, token: AccessToken, nonce: str | None = None
    ) -> str | None:
        """For auths: the ``DPoP`` header (RFC 9449 proof) for sending ``token`` with one
        request, or ``None`` if ``token`` is not bound to this client's key. Without
        ``nonce``, the one the request's origin sent last (:meth:`dpop_nonce`)."""
        core = self._core
        if core.dpop is None or token.token_type != "DPoP":
            return None
        if nonce is None and len(core.nonces):  # most servers never send one
            nonce = core.nonces.get(url)
        return core.dpop.proof(
            method, url, now=core.clock(), access_token=token.access_token, nonce=nonce
        )

    def dpop_nonce(self, url: str, nonce: str | None) -> None:
        """For auths: an answer from ``url``'s origin carried ``DPoP-Nonce: nonce`` (any
        answer may, RFC 9449 §8.2); later proofs for that origin carry it."""
        self._core.nonces.update(url, nonce)


class _BaseTokenClient(_AuthSeam, Generic[HttpT, SleepT, SharedT, FetcherT]):
    """Construction, repr, stats, invalidation and fork handling of both clients."""

    _lock: AbstractContextManager[Any]  # makes the core's decisions atomic (each shell's)
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
        self._renewals = Renewals(self._core)
        if shared_cache is not None:
            _join_shared_level(self, shared_cache)
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
        self._cache = self._core.cache  # the warm path's (one attribute lookup less)
        self._init_shell()
        track(self)

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
        self._fetcher.after_fork()

    @contextmanager
    def _flying(self, key: CacheKey, flight: Flight[Any], link: object) -> Iterator[Any]:
        """Run a flight's fetch inside (it lands whatever happens, in its span); yields the
        fetch to call or to hand to the shared level, which may answer without calling it
        (then ``flight.shared`` stays set)."""
        core, fetcher = self._core, self._fetcher

        def fetch() -> Any:  # an AccessToken, or an awaitable of one (the fetcher's kind)
            flight.shared = False
            return fetcher.fetch(key, core.budget())

        with core.landing(key, flight, self._lock), core.reporter.fetch_span(link):
            flight.shared = self._shared is not None
            yield fetch

    def _shared_event(self, name: str) -> None:
        """A shared cache counter moved: a ``shared_cache`` event, whose source is the level
        (OpenTelemetry counts its breaker state once, whatever clients share it)."""
        self._core.emit("shared_cache", detail=name, source=self._shared)

    def _slow_path_started(self) -> float:
        """A ``get_token`` that needs more than the cache starts now (perf_counter)."""
        started = time.perf_counter()
        if self._core.reporter.providers is not None:
            _start_telemetry(self)
        return started

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
        removed = self._renewals.invalidate(key, token)
        if removed:
            self._forget_shared(key, token)
        return removed

    def _forget_shared(self, key: CacheKey, token: AccessToken) -> None:
        """Delete ``token`` from the shared level if it still holds it (each shell's way)."""
