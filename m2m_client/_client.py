"""TokenClient (threads) and AsyncTokenClient (anyio): thin shells over one non-I/O core.

The core decides (cache lookup, fresh / refresh-ahead / expired, who fetches, negative cache,
events); the shells only send bytes, sleep and wait. Single flight: one token request per
cache key is in flight at a time; every other caller waits on the same "flight".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, NoReturn, TypeVar

import anyio
import httpx
import tenacity

from ._oauth import (
    BodyBuffer,
    ClientAuthenticator,
    TokenRequest,
    discovery_urls,
    interpret_discovery_response,
    interpret_token_response,
    metadata_request,
)
from ._retry import RetryPolicy, TransientFailure
from ._token import (
    AccessToken,
    CacheKey,
    Freshness,
    InMemoryTokenCache,
    RefreshPolicy,
    TokenCache,
    freshness,
)
from .config import ClientCredentials
from .errors import (
    ConfigurationError,
    DiscoveryError,
    InvalidTokenResponse,
    M2MError,
    TokenEndpointError,
    TokenEndpointUnavailable,
    TokenError,
)

__all__ = ["AsyncTokenClient", "TokenClient", "TokenClientStats", "TokenEvent"]

logger = logging.getLogger("m2m_client")

EventKind = Literal[
    "token_fetched",
    "token_fetch_failed",
    "token_refresh_started",
    "token_refresh_failed",
    "token_invalidated",
    "retry",
    "negative_cache_hit",
    "discovery_completed",
]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """What a client reports to ``on_event`` (for metrics). Never holds a secret.

    ``token`` is an :class:`AccessToken` (whose repr hides the token); ``error`` the
    exception's type and message.
    """

    kind: EventKind
    audience: str | None = None
    scopes: tuple[str, ...] = ()
    attempt: int | None = None
    delay: float | None = None
    error: str | None = None
    token: AccessToken | None = None


@dataclass(slots=True)
class TokenClientStats:
    """Running counters of one client (read them for metrics or in tests)."""

    token_requests: int = 0
    tokens_fetched: int = 0
    fetch_failures: int = 0
    refresh_failures: int = 0
    retries: int = 0


EventT = TypeVar("EventT", threading.Event, anyio.Event)
T = TypeVar("T")


class _Flight(Generic[EventT]):
    """One token request in progress for one cache key; waiters block on ``done``."""

    __slots__ = ("done", "error", "token")

    def __init__(self, done: EventT) -> None:
        self.done: EventT = done
        self.token: AccessToken | None = None
        self.error: BaseException | None = None

    def outcome(self) -> AccessToken:
        if self.token is not None:
            return self.token
        raise _clone(self.error) from self.error


def _clone(error: BaseException | None) -> M2MError:
    # Each waiter raises its own instance: re-raising one shared exception object from
    # a thousand tasks would tangle their tracebacks.
    if isinstance(error, TokenEndpointError):
        return TokenEndpointError(
            error.error,
            error.error_description,
            status_code=error.status_code,
            error_uri=error.error_uri,
        )
    if isinstance(error, TokenEndpointUnavailable):
        return TokenEndpointUnavailable(
            str(error), attempts=error.attempts, last_cause=error.last_cause
        )
    if isinstance(error, M2MError):
        return type(error)(str(error))
    return TokenError(f"token request failed unexpectedly ({type(error).__name__})")


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


class _Exchange(Generic[T]):
    """One HTTP request the core needs; a shell sends it, re-sending on transient failures.

    ``build(now)`` makes the request at each attempt (a private_key_jwt assertion is single-use);
    ``interpret(status, headers, body, sent_at)`` turns the answer into the result or raises.
    """

    __slots__ = ("build", "interpret", "unavailable", "what")

    def __init__(
        self,
        what: str,
        build: Callable[[float], TokenRequest],
        interpret: Callable[[int, httpx.Headers, bytes, float], T],
        unavailable: Callable[[TokenEndpointUnavailable], M2MError] | None = None,
    ) -> None:
        self.what = what
        self.build = build
        self.interpret = interpret
        self.unavailable = unavailable


class _ClientCore:
    """Everything both clients share that does no I/O."""

    def __init__(
        self,
        credentials: ClientCredentials,
        *,
        clock: Callable[[], float],
        retry: RetryPolicy | None,
        refresh: RefreshPolicy | None,
        cache: TokenCache | None,
        on_event: Callable[[TokenEvent], object] | None,
        seed: int | None,
    ) -> None:
        if not isinstance(credentials, ClientCredentials):
            raise ConfigurationError("credentials must be a ClientCredentials instance")
        self.credentials = credentials
        self.authenticator = ClientAuthenticator(credentials)
        self.clock = clock
        self.retry = retry or RetryPolicy()
        self.refresh = refresh or RefreshPolicy()
        self.cache: TokenCache = cache if cache is not None else InMemoryTokenCache()
        self.on_event = on_event
        self.rng = random.Random(seed)  # noqa: S311 - jitter, not security
        self.stats = TokenClientStats()
        self.token_url: str | None = credentials.token_url
        self.flights: dict[CacheKey, _Flight[Any]] = {}
        self.retry_refresh_at: dict[CacheKey, float] = {}
        self.negative: dict[CacheKey, tuple[TokenEndpointError, float]] = {}
        self.discovery_negative: tuple[DiscoveryError, float] | None = None
        self.default_key = self._make_key(None, None, None)

    def describe(self, kind: str) -> str:
        creds = self.credentials
        return f"{kind}(endpoint={creds.endpoint_id!r}, client_id={creds.client_id!r})"

    # --- keys and events ---------------------------------------------------------

    def key(
        self, audience: str | None, resource: str | None, scope: str | Iterable[str] | None
    ) -> CacheKey:
        if audience is None and resource is None and scope is None:
            return self.default_key
        return self._make_key(audience, resource, scope)

    def _make_key(
        self, audience: str | None, resource: str | None, scope: str | Iterable[str] | None
    ) -> CacheKey:
        creds = self.credentials
        if scope is None:
            scopes = creds.scope
        elif isinstance(scope, str):
            scopes = tuple(scope.replace(",", " ").split())
        else:
            scopes = tuple(s for item in scope for s in str(item).split())
        return CacheKey(
            creds.endpoint_id,
            creds.client_id,
            audience if audience is not None else creds.audience,
            resource if resource is not None else creds.resource,
            tuple(sorted(set(scopes))),
        )

    def emit(self, kind: EventKind, key: CacheKey | None = None, **fields: Any) -> None:
        if self.on_event is None:
            return
        key = key or self.default_key
        try:
            self.on_event(TokenEvent(kind, key.audience, key.scopes, **fields))
        except Exception:
            # A broken metrics hook must never break token fetching.
            logger.exception("m2m_client: on_event hook raised on %s", kind)

    def retry_kwargs(self, key: CacheKey, step: _Exchange[Any]) -> dict[str, Any]:
        """``tenacity.Retrying``/``AsyncRetrying`` arguments for ``step`` (the shell adds sleep)."""

        def report(attempt: int, delay: float, error: BaseException | None) -> None:
            self.stats.retries += 1
            logger.info(
                "%s attempt %d failed (%s); retrying in %.2fs",
                step.what,
                attempt,
                _describe(error),
                delay,
            )
            self.emit("retry", key, attempt=attempt, delay=delay, error=_describe(error))

        def give_up(exc: tenacity.RetryError) -> NoReturn:
            error = RetryPolicy.exhausted(exc, step.what)
            raise (step.unavailable(error) if step.unavailable else error) from error.last_cause

        return self.retry.tenacity_kwargs(clock=self.clock, on_retry=report, give_up=give_up)

    # --- the decision --------------------------------------------------------------

    def begin(
        self, key: CacheKey, now: float, force: bool, new_event: Callable[[], EventT]
    ) -> tuple[AccessToken | None, _Flight[EventT] | None, bool]:
        """Decide what a ``get_token`` caller does. Must run atomically (lock / no await).

        Returns ``(token, flight, owner)``: return ``token`` at once if given (after starting a
        background refresh if ``owner``); otherwise wait on ``flight`` (after running it if
        ``owner``).
        """
        token = self.cache.get(key)
        state = freshness(token, now) if token is not None else Freshness.EXPIRED
        flight = self.flights.get(key)
        if token is not None and not force and state is not Freshness.EXPIRED:
            if (
                state is Freshness.REFRESH_AHEAD
                and flight is None
                and now >= self.retry_refresh_at.get(key, 0.0)
            ):
                self.emit("token_refresh_started", key, token=token)
                return token, self._new_flight(key, new_event), True
            return token, None, False
        if flight is not None:
            return None, flight, False
        negative: tuple[M2MError, float] | None = self.negative.get(key)
        if negative is None and self.token_url is None:
            negative = self.discovery_negative
        if negative is not None:
            error, until = negative
            if now < until:
                self.emit("negative_cache_hit", key, error=_describe(error))
                raise _clone(error) from error
            self.negative.pop(key, None)
        return None, self._new_flight(key, new_event), True

    def _new_flight(self, key: CacheKey, new_event: Callable[[], EventT]) -> _Flight[EventT]:
        flight: _Flight[EventT] = _Flight(new_event())
        self.flights[key] = flight
        return flight

    @contextmanager
    def landing(
        self, key: CacheKey, flight: _Flight[Any], lock: AbstractContextManager[Any]
    ) -> Iterator[_Flight[Any]]:
        """Run a flight's fetch inside; records its outcome and wakes the waiters.

        The shell sets ``flight.token``; any ``Exception`` becomes the flight's error (each
        waiter raises a copy); cancellation still ends the flight, then propagates.
        """
        error: BaseException | None = TokenError("token request interrupted")
        try:
            yield flight
            error = None
        except Exception as exc:
            error = exc
        finally:
            with lock:
                self.finish(key, flight, flight.token if error is None else None, error)
            flight.done.set()

    def finish(
        self,
        key: CacheKey,
        flight: _Flight[Any],
        token: AccessToken | None,
        error: BaseException | None,
    ) -> None:
        """Record a flight's outcome; the shell then sets ``flight.done``."""
        now = self.clock()
        if self.flights.get(key) is flight:
            del self.flights[key]
        flight.token, flight.error = token, error
        if token is not None:
            self.cache.set(key, token)
            self.retry_refresh_at.pop(key, None)
            self.negative.pop(key, None)
            self.stats.tokens_fetched += 1
            logger.debug(
                "token %s fetched for audience=%r scopes=%r, expires in %.0fs",
                token.fingerprint,
                key.audience,
                key.scopes,
                token.expires_at - now,
            )
            self.emit("token_fetched", key, token=token)
            return
        if isinstance(error, TokenEndpointError):
            self.negative[key] = (error, now + self.retry.negative_cache_seconds)
        elif isinstance(error, DiscoveryError):
            # Unreachable metadata or a wrong issuer will not heal in milliseconds: without
            # this every caller would repeat the whole discovery in a tight loop.
            self.discovery_negative = (error, now + self.retry.negative_cache_seconds)
        previous = self.cache.get(key)
        if previous is not None and freshness(previous, now) is not Freshness.EXPIRED:
            # A failed refresh while the token is still valid fails nobody: keep serving it
            # and try again later, not on the very next call (no tight loop).
            self.stats.refresh_failures += 1
            self.retry_refresh_at[key] = self.refresh.next_refresh_attempt(previous, now)
            logger.warning(
                "background token refresh failed (%s); still using the current token, "
                "next attempt in %.1fs",
                _describe(error),
                self.retry_refresh_at[key] - now,
            )
            self.emit("token_refresh_failed", key, error=_describe(error))
        else:
            self.stats.fetch_failures += 1
            logger.warning("token request failed: %s", _describe(error))
            self.emit("token_fetch_failed", key, error=_describe(error))

    def invalidate(self, key: CacheKey, token: AccessToken) -> bool:
        removed = self.cache.delete(key, token)
        if removed:
            logger.debug("token %s invalidated", token.fingerprint)
            self.emit("token_invalidated", key, token=token)
        return removed

    # --- what to send, and what the answers mean ---------------------------------------

    def token_exchange(self, key: CacheKey) -> _Exchange[AccessToken]:
        """The token request for ``key`` (after discovery, if any)."""
        token_url = self.token_url
        assert token_url is not None

        def build(now: float) -> TokenRequest:
            self.stats.token_requests += 1
            return self.authenticator.token_request(
                token_url, audience=key.audience, resource=key.resource, scopes=key.scopes, now=now
            )

        def interpret(status: int, headers: httpx.Headers, body: bytes, sent_at: float) -> Any:
            return interpret_token_response(
                status,
                headers,
                body,
                sent_at=sent_at,
                now=self.clock(),
                policy=self.refresh,
                rng=self.rng,
            )

        return _Exchange("token request", build, interpret)

    def discovery_flow(self) -> Generator[_Exchange[str | None], str | None, None]:
        """Find the token endpoint; the shell runs this under its discovery lock.

        Yields the metadata requests in order (OIDC Discovery, then RFC 8414) and receives
        each one's token endpoint, or ``None`` for "not here, try the next URL".
        """
        if self.token_url is not None:
            return  # another caller discovered it while this one waited for the lock
        issuer = self.credentials.issuer or ""
        urls = discovery_urls(issuer)

        def interpret(status: int, headers: httpx.Headers, body: bytes, sent_at: float) -> Any:
            return interpret_discovery_response(
                status, headers, body, issuer=issuer, now=self.clock()
            )

        def unavailable(exc: TokenEndpointUnavailable) -> DiscoveryError:
            return DiscoveryError(f"metadata for {issuer!r} unavailable: {exc}")

        for url in urls:
            build = functools.partial(_metadata_request, url)
            found = yield _Exchange("metadata request", build, interpret, unavailable)
            if found is not None:
                self.token_url = found
                logger.info("discovered token endpoint %s from %s", found, url)
                self.emit("discovery_completed")
                return
        raise DiscoveryError(
            f"no authorization server metadata found for issuer {issuer!r} "
            f"(tried {', '.join(urls)}); set token_url instead"
        )

    def http_timeout(self) -> httpx.Timeout:
        seconds = self.credentials.timeout
        return httpx.Timeout(seconds, connect=min(seconds, 5.0))


def _metadata_request(url: str, now: float) -> TokenRequest:
    return metadata_request(url)


def _stream_args(request: TokenRequest) -> dict[str, Any]:
    return {
        "method": request.method,
        "url": request.url,
        "headers": request.headers,
        "content": request.content or None,
    }


def _transport_failure(exc: httpx.HTTPError, url: str) -> Exception:
    if isinstance(exc, httpx.TransportError):
        return TransientFailure(f"{type(exc).__name__} talking to {url}: {str(exc)[:200]}")
    return InvalidTokenResponse(f"unreadable response from {url} ({type(exc).__name__})")


_SHARED_DOC = """

    Args:
        credentials: the client's :class:`ClientCredentials`.
        http_client: your own httpx client for the authorization server (proxies, mTLS);
            it is not closed by this client. By default one is created with timeouts.
        clock: seconds since the epoch (default ``time.time``); inject a fake one in tests.
        sleep: how to wait between retries (tests pass a fake).
        retry, refresh: :class:`RetryPolicy` and :class:`RefreshPolicy`.
        cache: a :class:`TokenCache` (default: in memory, per client).
        on_event: called with a :class:`TokenEvent` for metrics; its exceptions are logged.
        seed: seeds the refresh-ahead jitter (tests).
"""


HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)
_SyncSleep = Callable[[float], None]
_AsyncSleep = Callable[[float], Awaitable[Any]]
SleepT = TypeVar("SleepT", _SyncSleep, _AsyncSleep)


class _BaseTokenClient(Generic[HttpT, SleepT]):
    """What both clients share above the core (httpx's BaseClient pattern)."""

    _http_type: type[HttpT]
    _default_sleep: Callable[[float], Any]

    def __init__(
        self,
        credentials: ClientCredentials,
        *,
        http_client: HttpT | None = None,
        clock: Callable[[], float] = time.time,
        sleep: SleepT | None = None,
        retry: RetryPolicy | None = None,
        refresh: RefreshPolicy | None = None,
        cache: TokenCache | None = None,
        on_event: Callable[[TokenEvent], object] | None = None,
        seed: int | None = None,
    ) -> None:
        self._core = _ClientCore(
            credentials,
            clock=clock,
            retry=retry,
            refresh=refresh,
            cache=cache,
            on_event=on_event,
            seed=seed,
        )
        if http_client is not None and not isinstance(http_client, self._http_type):
            name = self._http_type.__name__
            raise ConfigurationError(f"{type(self).__name__} needs an httpx.{name}")
        self._http: HttpT | None = http_client
        self._owns_http = http_client is None
        self._sleep: SleepT = sleep or type(self)._default_sleep
        self._cache_get = self._core.cache.get
        self._init_shell()

    def _init_shell(self) -> None:
        """Where a shell creates its locks."""

    def _fresh(self, key: CacheKey) -> AccessToken | None:
        """The cached token if nothing needs doing (BearerAuth's fast path), else ``None``."""
        token = self._cache_get(key)
        return token if token is not None and self._core.clock() < token.refresh_at else None

    def __repr__(self) -> str:
        return self._core.describe(type(self).__name__)

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
        """Drop ``token`` from the cache if it is still the cached one (e.g. after a 401)."""
        return self._core.invalidate(self._core.key(audience, resource, scope), token)


class AsyncTokenClient(_BaseTokenClient[httpx.AsyncClient, _AsyncSleep]):
    """Gets, caches and refreshes client-credentials tokens (asyncio or trio, via anyio).

    ::

        async with AsyncTokenClient(creds) as tokens:
            token = await tokens.get_token()

    Use it with ``async with``: refresh-ahead then runs in the background and a caller that
    is cancelled never cancels the request others wait for. Without it, the caller that
    triggers a request runs it itself, shielded from cancellation.
    """

    __doc__ = (__doc__ or "") + _SHARED_DOC
    _http_type = httpx.AsyncClient
    _default_sleep = staticmethod(anyio.sleep)
    _task_group: anyio.abc.TaskGroup | None = None
    _discovery_lock: anyio.Lock | None = None

    async def __aenter__(self) -> AsyncTokenClient:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            task_group.cancel_scope.cancel()  # a background refresh must not delay shutdown
            await task_group.__aexit__(exc_type, exc, tb)
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def get_token(
        self,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] | None = None,
        force_refresh: bool = False,
    ) -> AccessToken:
        """Await a valid token; see :meth:`TokenClient.get_token` (same arguments and errors)."""
        return await self._token(self._core.key(audience, resource, scope), force_refresh)

    async def _token(self, key: CacheKey, force_refresh: bool = False) -> AccessToken:
        now = self._core.clock()
        token = self._cache_get(key)
        if token is not None and now < token.refresh_at and not force_refresh:
            return token  # the lock-free fast path
        token, flight, owner = self._core.begin(key, now, force_refresh, anyio.Event)
        if owner:
            assert flight is not None
            if self._task_group is not None:
                self._task_group.start_soon(self._run_flight, key, flight)
            else:
                with anyio.CancelScope(shield=True):
                    await self._run_flight(key, flight)
        if token is not None:
            return token
        assert flight is not None
        await flight.done.wait()
        return flight.outcome()

    async def _run_flight(self, key: CacheKey, flight: _Flight[anyio.Event]) -> None:
        with self._core.landing(key, flight, contextlib.nullcontext()):
            if self._core.token_url is None:
                self._discovery_lock = self._discovery_lock or anyio.Lock()
                async with self._discovery_lock:
                    await self._drive(key, self._core.discovery_flow())
            flight.token = await self._exchange(key, self._core.token_exchange(key))

    async def _drive(self, key: CacheKey, flow: Generator[_Exchange[T], T | None, None]) -> None:
        result: T | None = None
        with contextlib.suppress(StopIteration):
            while True:
                result = await self._exchange(key, flow.send(result))

    async def _exchange(self, key: CacheKey, step: _Exchange[T]) -> T:
        retrying = tenacity.AsyncRetrying(sleep=self._sleep, **self._core.retry_kwargs(key, step))
        result: T = await retrying(self._attempt, step)
        return result

    async def _attempt(self, step: _Exchange[T]) -> T:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._core.http_timeout())
        sent_at = self._core.clock()
        request, buffer = step.build(sent_at), BodyBuffer()
        try:
            async with self._http.stream(**_stream_args(request)) as resp:
                buffer.check_length_header(resp.headers.get("content-length"))
                async for chunk in resp.aiter_bytes():
                    buffer.add(chunk)
        except httpx.HTTPError as exc:
            raise _transport_failure(exc, request.url) from exc
        return step.interpret(resp.status_code, resp.headers, buffer.body(), sent_at)


class TokenClient(_BaseTokenClient[httpx.Client, _SyncSleep]):
    """Gets, caches and refreshes client-credentials tokens; safe to share between threads.

    ::

        with TokenClient(creds) as tokens:
            token = tokens.get_token()
    """

    __doc__ = (__doc__ or "") + _SHARED_DOC
    _http_type = httpx.Client
    _default_sleep = staticmethod(time.sleep)

    def _init_shell(self) -> None:
        self._lock = threading.Lock()
        self._discovery_lock = threading.Lock()

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None

    def get_token(
        self,
        *,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | Iterable[str] | None = None,
        force_refresh: bool = False,
    ) -> AccessToken:
        """A valid token for ``audience``/``resource``/``scope`` (defaults: the credentials').

        ``resource`` is RFC 8707's (node oidc-provider and other standard servers),
        ``audience`` Auth0's; each combination is cached apart. Raises
        :class:`TokenEndpointError`, :class:`TokenEndpointUnavailable`,
        :class:`InvalidTokenResponse` or :class:`DiscoveryError`.
        """
        return self._token(self._core.key(audience, resource, scope), force_refresh)

    def _token(self, key: CacheKey, force_refresh: bool = False) -> AccessToken:
        now = self._core.clock()
        token = self._cache_get(key)
        if token is not None and now < token.refresh_at and not force_refresh:
            return token  # the lock-free fast path
        with self._lock:
            token, flight, owner = self._core.begin(key, now, force_refresh, threading.Event)
        if owner:
            assert flight is not None
            if token is not None:
                threading.Thread(
                    target=self._run_flight, args=(key, flight), daemon=True, name="m2m-refresh"
                ).start()
            else:
                self._run_flight(key, flight)
        if token is not None:
            return token
        assert flight is not None
        flight.done.wait()
        return flight.outcome()

    def _run_flight(self, key: CacheKey, flight: _Flight[threading.Event]) -> None:
        with self._core.landing(key, flight, self._lock):
            if self._core.token_url is None:
                with self._discovery_lock:
                    self._drive(key, self._core.discovery_flow())
            flight.token = self._exchange(key, self._core.token_exchange(key))

    def _drive(self, key: CacheKey, flow: Generator[_Exchange[T], T | None, None]) -> None:
        result: T | None = None
        with contextlib.suppress(StopIteration):
            while True:
                result = self._exchange(key, flow.send(result))

    def _exchange(self, key: CacheKey, step: _Exchange[T]) -> T:
        retrying = tenacity.Retrying(sleep=self._sleep, **self._core.retry_kwargs(key, step))
        result: T = retrying(self._attempt, step)
        return result

    def _attempt(self, step: _Exchange[T]) -> T:
        if self._http is None:
            self._http = httpx.Client(timeout=self._core.http_timeout())
        sent_at = self._core.clock()
        request, buffer = step.build(sent_at), BodyBuffer()
        try:
            with self._http.stream(**_stream_args(request)) as resp:
                buffer.check_length_header(resp.headers.get("content-length"))
                for chunk in resp.iter_bytes():
                    buffer.add(chunk)
        except httpx.HTTPError as exc:
            raise _transport_failure(exc, request.url) from exc
        return step.interpret(resp.status_code, resp.headers, buffer.body(), sent_at)
