"""TokenClient: the core's decisions carried out with threads and blocking I/O."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from m2m_client._discovery import Discovery
from m2m_client._shared import SharedTokenCache
from m2m_client._singleflight import Flight, SingleFlight, wait_for
from m2m_client._stacks import SyncHttpClient
from m2m_client._token import AccessToken, CacheKey

from ._decisions import Fetch, RefreshBehind, Use, describe
from ._fetch import SyncFetcher
from ._shell import _BaseTokenClient

__all__ = ["TokenClient"]

logger = logging.getLogger("m2m_client")


class TokenClient(
    _BaseTokenClient[SyncHttpClient, Callable[[float], None], SharedTokenCache, SyncFetcher]
):
    """Gets, caches and refreshes client-credentials tokens; safe to share between threads.

    ::

        with TokenClient(creds) as tokens:
            token = tokens.get_token()

    Refresh-ahead runs in a background thread; every call returns or raises within the
    retry policy's ``max_total_seconds`` (plus a second).
    """

    _shared_is_async = False
    _shared_type = SharedTokenCache
    _default_sleep = staticmethod(time.sleep)

    def _new_flights(self) -> SingleFlight[Any]:
        return SingleFlight(threading.Event)

    def _new_fetcher(
        self, discovery: Discovery | None, http: SyncHttpClient | None, sleep: Any
    ) -> SyncFetcher:
        return SyncFetcher(self._core, discovery, http, sleep)

    def _init_shell(self) -> None:
        self._lock = threading.Lock()

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
        """Close the HTTP client if this object created it; ``get_token`` then raises."""
        self._core.closed = True
        self._fetcher.close()

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
        :class:`InvalidTokenResponse`, :class:`DiscoveryError`, or
        :class:`ConfigurationError` after :meth:`close`.
        """
        if self._core.authenticator.identity_unknown:
            # Issue 21: the assertion's identity is part of the key; learn it first.
            self._core.authenticator.prepare(self._core.clock())
        key = self._core.key(audience, resource, scope)
        if not force_refresh:
            token = self.cached_token(key)
            if token is not None:
                return token  # the lock-free fast path
        return self.fetch_token(key, force_refresh)

    def fetch_token(self, key: CacheKey, force: bool = False) -> AccessToken:
        """For auths: a token for ``key`` when :meth:`cached_token` had none (refresh-ahead,
        a fetch, or waiting for another caller's); ``force``: not the cached one."""
        started = self._slow_path_started()
        try:
            token, outcome = self._carry_out(key, force)
        except BaseException:
            self._core.reporter.acquired("failed", started)
            raise
        self._core.reporter.acquired(outcome, started)
        return token

    def token_refused(self, key: CacheKey, token: AccessToken) -> bool:
        """For auths: the API answered 401 to ``token`` (its challenge blames the token).
        Drops it if still cached (here and in the shared level; at most once per key every
        few seconds); ``True`` if a replay would carry another token."""
        replay, dropped = self._renewals.refused(key, token)
        if dropped:
            self._forget_shared(key, token)
        return replay

    def _carry_out(self, key: CacheKey, force_refresh: bool) -> tuple[AccessToken, str]:
        self._core.check_open("TokenClient")
        with self._lock:
            decision = self._core.begin(key, force_refresh)
        if isinstance(decision, Use):
            return decision.token, self._core.use_outcome(key, decision.token)
        if isinstance(decision, RefreshBehind):
            threading.Thread(
                target=self._run_flight,
                args=(key, decision.flight, decision.token, self._core.reporter.span_link()),
                daemon=True,
                name="m2m-refresh",
            ).start()
            return decision.token, "refresh_ahead"
        if isinstance(decision, Fetch):
            self._run_flight(key, decision.flight, decision.stale)
            token = decision.flight.outcome()
            return token, "shared_hit" if decision.flight.shared else "fetched"
        wait_for(decision.flight)
        return decision.flight.outcome(), "waited"

    def _run_flight(
        self, key: CacheKey, flight: Flight[Any], stale: AccessToken | None, link: object = None
    ) -> None:
        with self._flying(key, flight, link) as fetch:
            shared = self._shared
            if shared is None:
                flight.token = fetch()
            else:
                flight.token = shared.obtain(key, fetch, policy=self._core.refresh, stale=stale)

    def _forget_shared(self, key: CacheKey, token: AccessToken) -> None:
        if self._shared is not None:
            try:
                self._shared.invalidate(key, token)
            except Exception as exc:  # the shared level is an optimisation, never a failure
                logger.warning("shared token cache invalidate failed (%s)", describe(exc))
