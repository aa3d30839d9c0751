"""The token clients' policy, with no I/O: which token a caller gets, and who fetches.

:meth:`_ClientCore.begin` returns a typed :data:`Decision`; the sync and async shells only
carry it out (send, sleep, wait). :meth:`_ClientCore.finish` records a flight's outcome
(cache, negative cache, counters); :meth:`_ClientCore.refused` decides what a 401 does. Every
duration here is on the ``monotonic`` clock; the wall ``clock`` is used only for token expiry
(``expires_at``, refresh points), which servers state in wall time.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Hashable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from m2m_client._dpop import DPoPKey, NonceStore
from m2m_client._fork import at_fork
from m2m_client._oauth import ClientAuthenticator
from m2m_client._retry import RetryPolicy
from m2m_client._singleflight import Flight, Interrupted, SingleFlight, clone_error
from m2m_client._telemetry import Telemetry
from m2m_client._token import (
    AccessToken,
    CacheKey,
    CredentialId,
    Freshness,
    InMemoryTokenCache,
    RefreshPolicy,
    TokenCache,
    freshness,
)
from m2m_client.config import ClientCredentials
from m2m_client.errors import ConfigurationError, M2MError

from ._events import EventKind, Reporter, TokenClientStats, TokenEvent, TokenSummary

__all__ = [
    "Budget",
    "Decision",
    "Fetch",
    "RefreshBehind",
    "TokenClientStats",
    "TokenEvent",
    "TokenSummary",
    "Use",
    "Wait",
]

logger = logging.getLogger("m2m_client")
_SHARED_RNG = random.Random()  # noqa: S311 - refresh-ahead jitter, not security


@at_fork
def _reseed_after_fork() -> None:
    """In a forked child: a fresh jitter source, or every worker of a pre-forking server
    (gunicorn --preload) draws the parent's sequence and they all refresh in lockstep."""
    _SHARED_RNG.seed()  # from os.urandom: differs in each child


MAX_KEYS = 10_000
"""Bound of every per-key table of the core (negative cache, renewal limits, ...)."""
MAX_SERVER_HOLD = 300.0
"""Longest a failure is re-raised without asking because the server asked for a wait
(``Retry-After`` or a rate-limit reset beyond the retry budget)."""
RENEWAL_INTERVAL = 5.0
"""At most one 401-driven renewal per key in this many seconds: an API that rejects every
token (wrong audience, its clock off) must not turn each call into a token request."""

# --- the decision a caller carries out -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Use:
    """Return ``token`` now."""

    token: AccessToken


@dataclass(frozen=True, slots=True)
class RefreshBehind:
    """Return ``token`` now, and run ``flight`` in the background (refresh-ahead)."""

    token: AccessToken
    flight: Flight[Any]


@dataclass(frozen=True, slots=True)
class Fetch:
    """Run ``flight`` (this caller owns it), then return its outcome.

    ``stale`` is a token the caller will not take (forced refresh, 401): a shared cache
    level holding it counts as a miss.
    """

    flight: Flight[Any]
    stale: AccessToken | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait (with the flight's deadline) for another caller's ``flight``."""

    flight: Flight[Any]


Decision = Use | RefreshBehind | Fetch | Wait

V = TypeVar("V")


def remember(table: dict[Hashable, V], key: Hashable, value: V, limit: int = MAX_KEYS) -> None:
    """``table[key] = value`` keeping at most ``limit`` entries (the oldest tenth goes)."""
    table.pop(key, None)
    if len(table) >= limit:
        for old in list(itertools.islice(table, max(limit // 10, 1))):
            del table[old]
    table[key] = value


NOT_IN_CACHE_KEY = frozenset({"timeout"})
"""The ClientCredentials fields that are not part of a cache key, because they cannot change
what the server issues (how long we wait for an answer). Every other field is in the key or in
the credential's id (docs/security.md; tests/unit/test_cache_key_isolation.py holds to it)."""


def make_key(
    creds: ClientCredentials,
    audience: str | None,
    resource: str | None,
    scope: str | Iterable[str] | None,
    dpop_jkt: str | None = None,
    credential: CredentialId | None = None,
) -> CacheKey:
    """The cache key of a request: ``None`` arguments take the credentials' defaults.

    ``credential`` is the client's :meth:`ClientAuthenticator.credential_id` (computed once
    per client: deriving it parses the private key)."""
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
        dpop_jkt,
        creds.auth_method,
        tuple(sorted(creds.extra_params.items())),
        credential,
    )


def describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


class Budget(NamedTuple):
    """One fetch's time: ``started`` on the core's monotonic clock (the retry budget, fake
    in tests), ``deadline`` on :func:`time.monotonic` (what the I/O driver enforces)."""

    started: float
    deadline: float

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)


class FailureMemory:
    """Per-key memory of failures, each table bounded by ``MAX_KEYS``; monotonic times.

    ``negative``: the last error of a key and until when it is re-raised without a request;
    ``retry_refresh_at``: when a failed refresh-ahead may be tried again;
    ``renewed_at`` / ``rejected``: the last 401-driven drop of a key and the token dropped.
    """

    __slots__ = ("negative", "rejected", "renewed_at", "retry_refresh_at")

    def __init__(self) -> None:
        self.negative: dict[Hashable, tuple[M2MError, float]] = {}
        self.retry_refresh_at: dict[Hashable, float] = {}
        self.renewed_at: dict[Hashable, float] = {}
        self.rejected: dict[Hashable, AccessToken] = {}

    def error(self, key: Hashable, mono: float) -> M2MError | None:
        """The negative-cached error of ``key`` while it lasts."""
        entry = self.negative.get(key)
        if entry is not None and mono >= entry[1]:
            del self.negative[key]
            return None
        return None if entry is None else entry[0]

    def failed(self, key: Hashable, error: M2MError, mono: float, retry: RetryPolicy) -> None:
        """Re-raise ``error`` for ``key`` without asking, for a while (a frame-free clone)."""
        hold = retry.negative_cache_seconds
        asked = getattr(error, "retry_after", None)
        if isinstance(asked, int | float) and asked > hold:
            # The server asked for a longer wait (rate limit): asking before it ends only
            # earns another 429 (Auth0 and Okta lengthen the penalty), up to a bound.
            hold = min(float(asked), MAX_SERVER_HOLD)
        remember(self.negative, key, (clone_error(error, with_cause=False), mono + hold))

    def fetched(self, key: Hashable) -> None:
        self.retry_refresh_at.pop(key, None)
        self.negative.pop(key, None)

    def may_renew(self, key: Hashable, mono: float) -> bool:
        return mono - self.renewed_at.get(key, -RENEWAL_INTERVAL) >= RENEWAL_INTERVAL

    def renewed(self, key: Hashable, token: AccessToken, mono: float) -> None:
        remember(self.renewed_at, key, mono)
        remember(self.rejected, key, token)


class Renewals:
    """What a 401 does to a core's state: which token a refused request replays with, and
    the renewal limit (the core's :class:`FailureMemory` holds the drops it counts). The
    shell owns it beside the core, so the core holds no reference back (no cycle)."""

    __slots__ = ("__weakref__", "core")  # held weakly as a shared level's listener

    def __init__(self, core: _ClientCore) -> None:
        self.core = core

    def refused(self, key: CacheKey, token: AccessToken) -> tuple[bool, bool]:
        """After the API refused ``token``: ``(replay, dropped)``.

        A 401 for ``token`` means "drop it if the cache still holds it, then use the current
        token". When another caller already dropped or replaced it, this caller replays with
        the current token (waiting for the renewal in flight) and drops nothing: the renewal
        limit counts drops of a cached token, it never refuses the callers that waited on
        one (fifty requests refused with a revoked token: one token request, fifty replays).
        ``dropped``: this call removed ``token`` (the shell then forgets it in a shared level).
        """
        current = self.core.cache_get(key)
        if current is not None and current.access_token == token.access_token:
            if self.invalidate(key, token):
                return True, True
            current = self.core.cache_get(key)  # limited, or replaced between the two reads
        return current is None or current.access_token != token.access_token, False

    def invalidate(self, key: CacheKey, token: AccessToken) -> bool:
        """Drop ``token`` if it is still the cached one; ``True`` if it was dropped.

        At most one drop per key per :data:`RENEWAL_INTERVAL`: an API rejecting every token
        (wrong audience, its clock off) costs a handful of token requests, not one per call.
        """
        mono = self.core.monotonic()
        if not self.core.failures.may_renew(key, mono) or not self._delete(key, token, ""):
            return False
        self.core.failures.renewed(key, token, mono)
        return True

    def forget_invalidated(self, key: CacheKey, access_token: str) -> None:
        """Another process invalidated this token (shared cache): drop it if still cached."""
        current = self.core.cache_get(key)
        if current is not None and current.access_token == access_token:
            self._delete(key, current, " by another process")

    def _delete(self, key: CacheKey, token: AccessToken, by: str) -> bool:
        try:
            removed = self.core.cache.delete(key, token)
        except Exception as exc:
            logger.warning("token cache delete failed (%s)", describe(exc))
            return False
        if removed:
            logger.debug("token %s invalidated%s", token.fingerprint, by)
            self.core.emit("token_invalidated", key, token=TokenSummary.of(token))
        return removed


class _ClientCore:
    """The state both clients share (credentials, cache, flights, failures) and every
    decision taken on it; the shells hold the locks and do the I/O."""

    def __init__(
        self,
        credentials: ClientCredentials,
        *,
        flights: SingleFlight[Any],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        retry: RetryPolicy | None = None,
        refresh: RefreshPolicy | None = None,
        cache: TokenCache | None = None,
        on_event: Callable[[TokenEvent], object] | None = None,
        seed: int | None = None,
        meter_provider: object | None = None,
        tracer_provider: object | None = None,
    ) -> None:
        if not isinstance(credentials, ClientCredentials):
            raise ConfigurationError("credentials must be a ClientCredentials instance")
        self.credentials = credentials
        self.authenticator = ClientAuthenticator(credentials)
        # DPoP (RFC 9449): dpop=True is a fresh key per client object; the thumbprint is part
        # of every cache key, so a token bound to another key is never taken from a cache.
        dpop = credentials.dpop
        self.dpop: DPoPKey | None = DPoPKey.generate() if dpop is True else (dpop or None)
        self.nonces = NonceStore()
        self.clock, self.monotonic = clock, monotonic
        self.retry = retry or RetryPolicy()
        self.refresh = refresh or RefreshPolicy()
        self.cache: TokenCache = cache if cache is not None else InMemoryTokenCache(clock=clock)
        self.reporter = Reporter(on_event, meter_provider, tracer_provider)
        # A Mersenne Twister state is 2.5 KiB: unseeded clients share one (jitter only).
        self.rng = _SHARED_RNG if seed is None else random.Random(seed)  # noqa: S311
        self.stats = TokenClientStats()
        self.flights = flights
        self.closed = False
        self.shared_wait = 0.0  # set by a shell given a shared cache level
        self.failures = FailureMemory()
        self.dpop_jkt = self.dpop.thumbprint if self.dpop is not None else None
        # Part of every key: a cache shared by clients (in-process or through Redis) gives a
        # token only to a client holding the credential it was issued to (issue 18).
        self.credential_id = self.authenticator.credential_id()
        self.default_key = make_key(
            credentials, None, None, None, self.dpop_jkt, self.credential_id
        )

    @property
    def telemetry(self) -> Telemetry | None:
        """OpenTelemetry once resolved (see :class:`Reporter`); ``None`` without an SDK."""
        return self.reporter.telemetry

    def key(
        self, audience: str | None, resource: str | None, scope: str | Iterable[str] | None
    ) -> CacheKey:
        """The cache key of a request (``None``: the credentials' default)."""
        credential = self.authenticator.credential_id()
        if credential is not self.credential_id:
            # A file-backed secret or key rotated, or an assertion's identity became known
            # (issue 21): from now on, the new credential's entries.
            self.credential_id = credential
            self.default_key = make_key(
                self.credentials, None, None, None, self.dpop_jkt, credential
            )
        if audience is None and resource is None and scope is None:
            return self.default_key
        return make_key(self.credentials, audience, resource, scope, self.dpop_jkt, credential)

    def emit(self, kind: EventKind, key: CacheKey | None = None, **fields: Any) -> None:
        """Report an event about ``key`` (default: the credentials' own key)."""
        self.reporter.emit(kind, key or self.default_key, fields)

    def cache_get(self, key: CacheKey) -> AccessToken | None:
        """The cached token; a cache that fails (Redis blipping) counts as a miss."""
        try:
            return self.cache.get(key)
        except Exception as exc:
            logger.warning("token cache get failed (%s); treating it as a miss", describe(exc))
            return None

    def check_open(self, kind: str) -> None:
        if self.closed:
            raise ConfigurationError(f"this {kind} is closed; create a new one to get tokens")

    def budget(self) -> Budget:
        """The budget of a fetch starting now (discovery and token request share it)."""
        return Budget(self.monotonic(), time.monotonic() + self.retry.max_total_seconds)

    # --- get_token: what a caller does, and what a flight's outcome changes ---------------

    def begin(self, key: CacheKey, force: bool = False) -> Decision:
        """Decide what a ``get_token`` caller does. Must run atomically (lock / no await).

        Raises a copy of a negative-cached error while it lasts.
        """
        now, mono = self.clock(), self.monotonic()
        token = self.cache_get(key)
        state = freshness(token, now) if token is not None else Freshness.EXPIRED
        flight = self.flights.get(key)
        if token is not None and not force and state is not Freshness.EXPIRED:
            if (
                state is Freshness.REFRESH_AHEAD
                and flight is None
                and mono >= self.failures.retry_refresh_at.get(key, 0.0)
            ):
                self.emit("token_refresh_started", key, token=TokenSummary.of(token))
                return RefreshBehind(token, self._start(key))
            return Use(token)
        if flight is not None:
            return Wait(flight)
        error = self.failures.error(key, mono)
        if error is not None:
            self.emit("negative_cache_hit", key, error=describe(error))
            raise clone_error(error)
        stale = token if force else self.failures.rejected.pop(key, None)
        return Fetch(self._start(key), stale)

    def _start(self, key: CacheKey) -> Flight[Any]:
        """A flight for ``key``. It must have landed within one fetch budget, plus the longest
        a shared cache level may make its owner wait first (real monotonic time)."""
        deadline = time.monotonic() + self.retry.max_total_seconds + self.shared_wait
        return self.flights.start(key, deadline)

    def use_outcome(self, key: CacheKey, token: AccessToken) -> str:
        """What a :class:`Use` decision served: ``stale`` is a token past its refresh point
        whose refresh failed (the token endpoint is down), served until it expires."""
        if key in self.failures.retry_refresh_at and self.clock() >= token.refresh_at:
            return "stale"
        return "hit"

    def landing(
        self, key: CacheKey, flight: Flight[Any], lock: AbstractContextManager[Any]
    ) -> AbstractContextManager[Flight[Any]]:
        """Run a flight's fetch inside; it lands whatever happens (see SingleFlight)."""
        return self.flights.landing(key, flight, lambda t, e: self.finish(key, t, e), lock)

    def finish(self, key: CacheKey, token: AccessToken | None, error: BaseException | None) -> None:
        """Record a flight's outcome in the cache, the negative cache and the counters."""
        if token is not None:
            self._store(key, token)
            return
        now, mono = self.clock(), self.monotonic()
        if isinstance(error, M2MError) and not isinstance(error, Interrupted):
            # Every failure kind (OAuth error, HTML 404, WAF page, 5xx after retries, no
            # route) is remembered briefly: the same request would fail the same way, and
            # a fleet retrying in a tight loop is an outage of its own.
            self.failures.failed(key, error, mono, self.retry)
        previous = self.cache_get(key)
        if previous is not None and freshness(previous, now) is not Freshness.EXPIRED:
            # A failed refresh while the token is still valid fails nobody: keep serving it
            # and try again later, not on the very next call (no tight loop).
            self.stats.refresh_failures += 1
            retry_in = self.refresh.next_refresh_attempt(previous, now) - now
            remember(self.failures.retry_refresh_at, key, mono + retry_in)
            logger.warning("token refresh failed (%s); retry in %.1fs", describe(error), retry_in)
            self.emit("token_refresh_failed", key, error=describe(error))
        else:
            self.stats.fetch_failures += 1
            # Raised to every caller waiting for this token: a WARNING too would print the
            # same failure twice in the user's output. DEBUG keeps it traceable.
            logger.debug("token request failed: %s", describe(error))
            self.emit("token_fetch_failed", key, error=describe(error))

    def _store(self, key: CacheKey, token: AccessToken) -> None:
        try:
            self.cache.set(key, token)
        except Exception as exc:
            logger.warning("token cache set failed (%s); token not cached", describe(exc))
        self.failures.fetched(key)
        self.stats.tokens_fetched += 1
        if self.reporter.telemetry is not None:
            self.reporter.telemetry.token_received(token.expires_at - self.clock())
        logger.debug("token %s fetched for %r", token.fingerprint, key.audience)
        self.emit("token_fetched", key, token=TokenSummary.of(token))

    def after_fork(self) -> None:
        """In a forked child: the parent's flights have no owner here."""
        self.flights.reset()
