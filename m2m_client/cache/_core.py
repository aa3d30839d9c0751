"""The shared-cache decisions, written once for the sync and the async cache.

:meth:`SharedCore.obtain_flow` is a generator in the style of httpx's auth flows: it yields
operations (read, take the lease, fetch, commit, wait ...) and receives their results. It
does no I/O itself; the drivers in ``_redis.py`` run each operation against Redis (or call the
token client's ``fetch``) and send the result back. A Redis failure is never thrown into the
flow: the driver closes it and falls back to fetching for itself (see ``_redis.drive``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from m2m_client._token import AccessToken, CacheKey, Freshness, RefreshPolicy, freshness
from m2m_client.errors import (
    DiscoveryError,
    InvalidTokenResponse,
    TokenEndpointError,
    TokenEndpointUnavailable,
    TokenError,
)

from ._breaker import BreakerState, CircuitBreaker
from ._codec import Codec, KeyNames, UndecodableEntry

__all__ = ["SharedCacheStats", "SharedCore"]

logger = logging.getLogger("m2m_client.cache")


@dataclass
class SharedCacheStats:
    """Running counters of one shared cache in this process (``cache.stats``)."""

    shared_hits: int = 0
    """Tokens another process fetched, returned without a token request."""
    negative_hits: int = 0
    """OAuth errors another process saw, re-raised without a token request."""
    fetches: int = 0
    """Token requests made through this cache (as lease holder or as fallback)."""
    coalesced: int = 0
    """Calls that joined a call for the same key already running in this process."""
    leases_won: int = 0
    leases_lost: int = 0
    """Calls that found another process fetching and waited for it (or used its valid token)."""
    leases_expired: int = 0
    """Leases taken over from a holder that vanished (or our own lease lapsed mid-fetch)."""
    waits_woken: int = 0
    """Waits ended by the holder's notification."""
    waits_polled: int = 0
    """Waits ended by the poll interval (the safety net)."""
    wait_timeouts: int = 0
    """Waits that gave up (``wait_timeout``) and fetched for themselves."""
    holder_failures: int = 0
    """Waits ended by the holder's failed fetch, raised here too (no turn of our own)."""
    redis_errors: int = 0
    redis_round_trips: int = 0
    fallbacks: int = 0
    """Calls that fetched for themselves because Redis failed or the breaker was open."""
    breaker_opened: int = 0
    breaker_closed: int = 0
    undecodable_entries: int = 0
    """Values that were garbage, foreign, or sealed with another key (each treated as a miss)."""

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --- operations the flow yields (the drivers run them) ---------------------------------


class Snapshot(NamedTuple):
    """One round trip's view of a cache key: token value, its PTTL in ms, error value."""

    token: bytes | None
    pttl: int
    error: bytes | None


@dataclass(frozen=True, slots=True)
class Read:
    names: KeyNames


@dataclass(frozen=True, slots=True)
class LeaseAndRead:
    """SET lease NX PX, GET the lease and the failure marker, then the same reads as
    :class:`Read`, in one round trip. -> (lease is ours, snapshot, holder, marker)."""

    names: KeyNames
    lease: str
    lease_ms: int
    failed: str


@dataclass(frozen=True, slots=True)
class Fetch:
    """Run the caller's fetch; with ``names``/``lease``, keep the lease alive meanwhile."""

    names: KeyNames | None = None
    lease: str = ""
    lease_ms: int = 0


@dataclass(frozen=True, slots=True)
class Commit:
    """Store the token, clear the error, release the lease, wake waiters. -> lease was ours."""

    names: KeyNames
    value: bytes
    ttl_ms: int
    lease: str


@dataclass(frozen=True, slots=True)
class CommitError:
    """Store the OAuth error, release the lease, wake waiters."""

    names: KeyNames
    value: bytes
    ttl_ms: int
    lease: str


@dataclass(frozen=True, slots=True)
class Release:
    """Release the lease if still ours and wake waiters (so one of them fetches now)."""

    names: KeyNames
    lease: str


@dataclass(frozen=True, slots=True)
class ReleaseFailed:
    """Our fetch failed: leave a short-lived marker naming our lease (so the processes that
    waited for it raise the failure too), release the lease if still ours, wake waiters."""

    names: KeyNames
    lease: str
    failed: str
    marker: bytes
    marker_ms: int


@dataclass(frozen=True, slots=True)
class Announce:
    """PUBLISH ``message`` (a non-secret id of an invalidated token) on ``channel``."""

    channel: str
    message: bytes


@dataclass(frozen=True, slots=True)
class Subscribe:
    names: KeyNames


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait for a wake-up on the subscribed channel. -> True if woken, False if timed out."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Get:
    name: str


@dataclass(frozen=True, slots=True)
class DeleteIfEquals:
    name: str
    value: bytes


Op = Read | LeaseAndRead | Fetch | Commit | CommitError | Release | ReleaseFailed | Subscribe | Wait
InvalidateOp = Get | DeleteIfEquals | Announce


def failed_name(names: KeyNames) -> str:
    """Where a holder whose fetch failed leaves its marker (same Cluster slot as the lease)."""
    return f"{names.lease}:failed"


# A failed holder's outcome as waiters raise it: the class, never the message (which could
# name the token endpoint, and Redis is no place for it).
_FAILURES: dict[str, type[TokenError]] = {
    cls.__name__: cls
    for cls in (TokenEndpointUnavailable, InvalidTokenResponse, DiscoveryError, TokenError)
}


def failure_marker(lease: str, exc: BaseException) -> bytes:
    kind = next((n for n, c in _FAILURES.items() if type(exc) is c), "TokenError")
    return f"{lease}|{kind}".encode()


def failure_from(marker: bytes | None, holders: set[bytes]) -> TokenError | None:
    """The failure of a holder we waited for (``holders``: lease values we saw), if any."""
    if not marker:
        return None
    lease, _, kind = marker.partition(b"|")
    if lease not in holders:
        return None  # another attempt's failure: not the one we waited for
    cls = _FAILURES.get(kind.decode("ascii", "replace"), TokenError)
    message = (
        f"the process fetching this token for the fleet failed ({cls.__name__}); this call "
        "shares that outcome rather than starting another fetch"
    )
    if cls is TokenEndpointUnavailable:
        return TokenEndpointUnavailable(message)
    return cls(message)


_UNKEYED_ANNOUNCE_KEY = b"m2m-client shared token cache: invalidation ids without a key"


def announcement(key: bytes, names: KeyNames, access_token: str) -> bytes:
    """What an invalidation publishes: the entry's name and an HMAC of the token (keyed by
    the fleet's encryption key when there is one), never the token."""
    mac = hmac.new(key, f"{names.token}|{access_token}".encode(), hashlib.sha256)
    return f"{names.token}|{mac.hexdigest()[:32]}".encode()


@dataclass(frozen=True, slots=True)
class Options:
    """Validated options of a shared cache (see the cache classes for their meaning)."""

    lease_seconds: float = 5.0
    poll_interval: float = 0.5
    wait_timeout: float = 35.0
    negative_seconds: float = 10.0
    operation_timeout: float = 0.25
    connect_timeout: float = 0.25
    breaker_threshold: int = 2
    breaker_reset_seconds: float = 5.0


class SharedCore:
    """Everything of a shared cache that is not I/O: names, codec, breaker, stats, the flow."""

    def __init__(
        self,
        codec: Codec,
        options: Options,
        *,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.codec = codec
        self.options = options
        self.clock = clock
        self.on_event = on_event
        # Token clients using this cache listen too (weakly: a cache outlives its clients).
        self.listeners: list[weakref.WeakMethod[Callable[[str], None]]] = []
        self.stats = SharedCacheStats()
        self.breaker = CircuitBreaker(
            threshold=options.breaker_threshold, reset_seconds=options.breaker_reset_seconds
        )
        self.rng = random.Random()  # noqa: S311 - spreads refresh points, not a secret
        self.announce_key = _UNKEYED_ANNOUNCE_KEY  # the shell derives one from the fleet key
        self._lock = threading.Lock()
        self._undecodable_logged = False

    # --- bookkeeping ------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)
        if name == "redis_round_trips":
            return
        hooks = [self.on_event] if self.on_event is not None else []
        hooks += [hook for ref in list(self.listeners) if (hook := ref()) is not None]
        for hook in hooks:
            try:
                hook(name)
            except Exception:  # a metrics hook must never break token fetching
                logger.exception("shared cache on_event hook failed")

    def add_listener(self, method: Callable[[str], None]) -> None:
        """Also report counter names to ``method`` (a bound method, held weakly)."""
        self.listeners = [ref for ref in self.listeners if ref() is not None]
        self.listeners.append(weakref.WeakMethod(method))

    def allow(self) -> bool:
        return self.breaker.allow(time.monotonic())

    def redis_ok(self) -> None:
        self.count("redis_round_trips")
        if self.breaker.succeeded() is BreakerState.CLOSED:
            self.count("breaker_closed")
            logger.warning("shared token cache: Redis answers again; sharing tokens resumes")

    def redis_failed(self, exc: BaseException) -> None:
        self.count("redis_errors")
        was_closed = self.breaker.state is BreakerState.CLOSED
        if self.breaker.failed(time.monotonic()) is BreakerState.OPEN and was_closed:
            self.count("breaker_opened")
            logger.warning(
                "shared token cache: Redis failed (%s: %s); this process fetches tokens on its "
                "own until Redis answers again (checked every %g s)",
                type(exc).__name__,
                exc,
                self.breaker.reset_seconds,
            )
        else:
            # Failed probes while Redis stays down: the outage was logged when it began.
            logger.debug("shared token cache: Redis operation failed: %r", exc)

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self.breaker.reset()

    def _undecodable(self, what: str, exc: UndecodableEntry) -> None:
        self.count("undecodable_entries")
        # Once per cache at WARNING: a fleet with a wrong key would otherwise log on every call.
        level = logging.DEBUG if self._undecodable_logged else logging.WARNING
        self._undecodable_logged = True
        logger.log(level, "shared token cache: ignoring an unreadable %s entry (%s)", what, exc)

    # --- reading entries --------------------------------------------------------------

    def token_from(
        self, names: KeyNames, snap: Snapshot, policy: RefreshPolicy, now: float
    ) -> AccessToken | None:
        """Rebuild the stored token with expiry and refresh point from its remaining life."""
        if snap.token is None or snap.pttl <= 0:
            return None  # -2: gone since GET; -1: not written by us (we always set a TTL)
        try:
            entry = self.codec.decode_token(names, snap.token)
        except UndecodableEntry as exc:
            self._undecodable("token", exc)
            return None
        # The sealed expiry bounds the entry; the TTL (Redis's clock, immune to our skew) can
        # only shorten it: whoever can write Redis can restore an old entry with any TTL.
        remaining = min(snap.pttl / 1000.0, entry.expires_at - now)
        if remaining <= 0:
            return None
        lifetime = max(entry.lifetime, remaining)
        return policy.make_token(
            access_token=entry.access_token,
            token_type=entry.token_type,
            expires_in=lifetime,
            scope=entry.scope,
            sent_at=now + remaining - lifetime,
            rng=self.rng,
        )

    def error_from(self, names: KeyNames, snap: Snapshot) -> TokenEndpointError | None:
        if snap.error is None:
            return None
        try:
            entry = self.codec.decode_error(names, snap.error)
        except UndecodableEntry as exc:
            self._undecodable("error", exc)
            return None
        # Past its sealed expiry, whatever TTL the stored copy has (a restored old entry).
        return entry.exception() if self.clock() < entry.expires_at else None

    # --- the flow ---------------------------------------------------------------------

    def obtain_flow(
        self, key: CacheKey, policy: RefreshPolicy, stale: AccessToken | None
    ) -> Generator[Op, Any, AccessToken]:
        """One call of ``obtain``: a shared hit, a wait for another process, or our own fetch."""
        opts = self.options
        if not self.allow():
            self.count("fallbacks")
            token: AccessToken = yield Fetch()
            return token
        names = self.codec.names(key)

        def usable(snap: Snapshot, *, fresh_only: bool) -> AccessToken | None:
            now = self.clock()
            token = self.token_from(names, snap, policy, now)
            if token is None or (stale is not None and token.access_token == stale.access_token):
                return None
            state = freshness(token, now)
            if state is Freshness.FRESH or (not fresh_only and state is Freshness.REFRESH_AHEAD):
                return token
            return None

        snap: Snapshot = yield Read(names)
        found = usable(snap, fresh_only=True)
        error = None if found is not None else self.error_from(names, snap)
        if error is not None:
            # An error never beats a token still valid: a failed refresh (by anyone) leaves
            # the fleet on the old token until it expires, as it leaves one process.
            found = usable(snap, fresh_only=False)
        if found is not None:
            self.count("shared_hits")
            return found
        if error is not None:
            self.count("negative_hits")
            raise error

        lease = secrets.token_hex(16)
        lease_ms = max(int(opts.lease_seconds * 1000), 1)
        deadline = time.monotonic() + opts.wait_timeout
        subscribed = lost = False
        woken: bool | None = None
        failed = failed_name(names)
        holders: set[bytes] = set()  # the leases we saw held: their failure is ours too
        while True:
            leased = yield LeaseAndRead(names, lease, lease_ms, failed)
            # (won, snapshot, holder, marker); a driver may leave out the last two.
            won, snap = leased[0], leased[1]
            holder, marker = (leased[2], leased[3]) if len(leased) > 2 else (None, None)
            if holder is not None and not won:
                holders.add(holder)
            failure = failure_from(marker, holders)
            if failure is not None:
                if won:
                    yield Release(names, lease)
                self.count("holder_failures")
                raise failure
            if won:
                self.count("leases_won")
                if woken is False:
                    # We waited, nobody told us the holder finished, and its lease is gone.
                    self.count("leases_expired")
                # Re-read under the lease: a holder may have committed since our first read.
                found = usable(snap, fresh_only=True)
                error = None if found is not None else self.error_from(names, snap)
                if error is not None:
                    found = usable(snap, fresh_only=False)  # an error never beats a token
                if found is not None or error is not None:
                    yield Release(names, lease)
                    if found is not None:
                        self.count("shared_hits")
                        return found
                    assert error is not None
                    self.count("negative_hits")
                    raise error
                token = yield from self._hold(names, lease, lease_ms)
                return token
            if not lost:
                lost = True
                self.count("leases_lost")
            # Someone else is fetching. A token that is still valid (refresh-ahead) serves
            # meanwhile: the holder refreshes for the whole fleet.
            found = usable(snap, fresh_only=False)
            if found is not None:
                self.count("shared_hits")
                return found
            error = self.error_from(names, snap)
            if error is not None:
                self.count("negative_hits")
                raise error
            if not subscribed:
                yield Subscribe(names)
                subscribed = True
                continue  # look again once subscribed: a commit before that sent no wake-up to us
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.count("wait_timeouts")
                self.count("fallbacks")
                token = yield Fetch()
                return token
            woken = yield Wait(min(opts.poll_interval, remaining))
            self.count("waits_woken" if woken else "waits_polled")

    def _hold(self, names: KeyNames, lease: str, lease_ms: int) -> Generator[Op, Any, AccessToken]:
        """We hold the lease: fetch, share the outcome, release."""
        self.count("fetches")
        try:
            token: AccessToken = yield Fetch(names, lease, lease_ms)
        except TokenEndpointError as exc:
            # Shared negative cache: a misconfigured fleet asks once per period, not per process.
            ttl_ms = int(self.options.negative_seconds * 1000)
            if ttl_ms > 0:
                until = self.clock() + self.options.negative_seconds
                yield CommitError(names, self.codec.encode_error(names, exc, until), ttl_ms, lease)
            else:
                yield Release(names, lease)
            raise
        except TokenError as exc:
            # Transient (issuer down, 5xx after retries): not shared as an entry, but the
            # processes that waited for this attempt get its outcome, not a turn of their
            # own (a turn each would make the k-th wait k retry budgets).
            opts = self.options
            marker_ms = int((2 * opts.poll_interval + 2 * opts.operation_timeout + 1.0) * 1000)
            yield ReleaseFailed(
                names, lease, failed_name(names), failure_marker(lease, exc), marker_ms
            )
            raise
        except Exception:
            yield Release(names, lease)  # wakes the waiters: one of them tries next
            raise
        ttl_ms = int((token.expires_at - self.clock()) * 1000)
        if ttl_ms <= 0:
            yield Release(names, lease)
            return token
        ours = yield Commit(names, self.codec.encode_token(names, token), ttl_ms, lease)
        if not ours:
            self.count("leases_expired")
            logger.info("shared token cache: our lease lapsed during a slow fetch")
        return token

    def invalidate_flow(
        self, key: CacheKey, token: AccessToken
    ) -> Generator[InvalidateOp, Any, None]:
        """Delete the shared entry only if it still holds ``token`` (the one that got a 401)."""
        if not self.allow():
            return
        names = self.codec.names(key)
        yield from self._delete_if_holding(names, token)
        # Then tell the other processes, which may hold it in memory (docs/sharing.md).
        message = announcement(self.announce_key, names, token.access_token)
        yield Announce(self.invalidation_channel, message)

    @property
    def invalidation_channel(self) -> str:
        return f"{self.codec.namespace}:invalidated"

    def _delete_if_holding(
        self, names: KeyNames, token: AccessToken
    ) -> Generator[InvalidateOp, Any, None]:
        value: bytes | None = yield Get(names.token)
        if value is None:
            return
        try:
            entry = self.codec.decode_token(names, value)
        except UndecodableEntry:
            return
        if entry.access_token == token.access_token:
            # Compare-and-delete on the exact bytes: a token written meanwhile survives.
            yield DeleteIfEquals(names.token, value)
