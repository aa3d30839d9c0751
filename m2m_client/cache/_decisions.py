"""The shared-cache decisions, written once for the sync and the async cache (sans-IO).

:meth:`SharedCore.obtain_flow` is a generator in the style of httpx's auth flows: it yields
operations (read, take the lease, fetch, commit, wait ...) and receives their results. It
does no I/O itself; the drivers in ``_drive.py`` run each operation against Redis (or call the
token client's ``fetch``) and send the result back. A Redis failure is never thrown into the
flow: the driver closes it and falls back to fetching for itself. The lease and its failure
markers are ``_lease.Lease``; the counters and the breaker are ``_ledger.Ledger``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, NamedTuple

from m2m_client._token import AccessToken, CacheKey, Freshness, RefreshPolicy, freshness
from m2m_client.errors import TokenEndpointError, TokenError

from ._codec import Codec, KeyNames, UndecodableEntry
from ._lease import Extend, Lease, LeaseAndRead, Release, ReleaseFailed
from ._ledger import Ledger, SharedCacheStats
from ._options import SharedOptions

__all__ = ["SharedCore"]

logger = logging.getLogger("m2m_client.cache")


# --- operations the flow yields (the drivers run them; the lease's are in _lease) -------


class Snapshot(NamedTuple):
    """One round trip's view of a cache key: token value, its PTTL in ms, error value."""

    token: bytes | None
    pttl: int
    error: bytes | None


@dataclass(frozen=True, slots=True)
class Read:
    names: KeyNames


@dataclass(frozen=True, slots=True)
class Fetch:
    """Run the caller's fetch; with ``names``/``lease``, keep the lease alive meanwhile."""

    names: KeyNames | None = None
    lease: str = ""
    lease_ms: int = 0

    def extend(self) -> Extend:
        assert self.names is not None
        return Extend(self.names, self.lease, self.lease_ms)


@dataclass(frozen=True, slots=True)
class Commit:
    """Store the token, clear the error, release the lease, wake waiters. -> lease was ours."""

    names: KeyNames
    value: bytes
    ttl_ms: int
    lease: str


@dataclass(frozen=True, slots=True)
class CommitError(Commit):
    """Store the OAuth error (``value``) instead, release the lease, wake waiters."""


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


Op = Read | LeaseAndRead | Fetch | Commit | Release | ReleaseFailed | Extend | Subscribe | Wait
InvalidateOp = Get | DeleteIfEquals | Announce

_UNKEYED_ANNOUNCE_KEY = b"m2m-client shared token cache: invalidation ids without a key"


def announcement(key: bytes, names: KeyNames, access_token: str) -> bytes:
    """What an invalidation publishes: the entry's name and an HMAC of the token (keyed by
    the fleet's encryption key when there is one), never the token."""
    mac = hmac.new(key, f"{names.token}|{access_token}".encode(), hashlib.sha256)
    return f"{names.token}|{mac.hexdigest()[:32]}".encode()


def _alone() -> Generator[Op, Any, AccessToken]:
    """Fetch for ourselves, without the lease (Redis unusable, or nobody of ours holds it)."""
    token: AccessToken = yield Fetch()
    return token


class EntryReader(Ledger[SharedCacheStats]):
    """What a snapshot of a cache key says: the token, the shared error, the answer."""

    def __init__(
        self,
        codec: Codec,
        options: SharedOptions,
        *,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(options, on_event, stats=SharedCacheStats())
        self.codec = codec
        self.options = options
        self.clock = clock
        self.rng = random.Random()  # noqa: S311 - spreads refresh points, not a secret

    def token_from(
        self, names: KeyNames, snap: Snapshot, policy: RefreshPolicy, now: float
    ) -> AccessToken | None:
        """Rebuild the stored token with expiry and refresh point from its remaining life."""
        if snap.token is None or snap.pttl <= 0:
            return None  # -2: gone since GET; -1: not written by us (we always set a TTL)
        try:
            entry = self.codec.decode_token(names, snap.token)
        except UndecodableEntry as exc:
            self.undecodable("token", exc)
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
            self.undecodable("error", exc)
            return None
        # Past its sealed expiry, whatever TTL the stored copy has (a restored old entry).
        return entry.exception() if self.clock() < entry.expires_at else None

    def _answer(
        self,
        names: KeyNames,
        snap: Snapshot,
        policy: RefreshPolicy,
        stale: AccessToken | None,
        *,
        valid: bool = False,
    ) -> AccessToken | TokenEndpointError | None:
        """What ``snap`` answers: a fresh token (with ``valid``, any valid one: someone else
        refreshes it), else a shared error, which never beats a token still valid (a failed
        refresh, by anyone, leaves the fleet on the old token until it expires)."""
        now = self.clock()
        token = self.token_from(names, snap, policy, now)
        if token is not None and stale is not None and token.access_token == stale.access_token:
            token = None
        state = Freshness.EXPIRED if token is None else freshness(token, now)
        if state is Freshness.FRESH or (valid and state is Freshness.REFRESH_AHEAD):
            return token
        error = self.error_from(names, snap)
        if error is not None and state is Freshness.REFRESH_AHEAD:
            return token
        return error

    def _served(self, answer: AccessToken | TokenEndpointError | None) -> AccessToken | None:
        if isinstance(answer, TokenEndpointError):
            self.count("negative_hits")
            raise answer
        if answer is not None:
            self.count("shared_hits")
        return answer


class SharedCore(EntryReader):
    """Everything of a shared cache that is not I/O: the flows, over the codec and the ledger."""

    def __init__(
        self,
        codec: Codec,
        options: SharedOptions,
        *,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(codec, options, clock=clock, on_event=on_event)
        self.announce_key = _UNKEYED_ANNOUNCE_KEY  # the shell derives one from the fleet key

    # --- the flows --------------------------------------------------------------------

    def obtain_flow(
        self, key: CacheKey, policy: RefreshPolicy, stale: AccessToken | None
    ) -> Generator[Op, Any, AccessToken]:
        """One call of ``obtain``: a shared hit, a wait for another process, or our own fetch."""
        if not self.allow():
            self.count("fallbacks")
            return (yield from _alone())
        names = self.codec.names(key)
        found = self._served(self._answer(names, (yield Read(names)), policy, stale))
        if found is not None:
            return found
        lease = Lease(names, self.options.lease_seconds)
        deadline = time.monotonic() + self.options.wait_timeout
        subscribed = lost = False
        woken: bool | None = None
        holders: set[bytes] = set()  # the leases we saw held: their failure is ours too
        while True:
            leased = yield lease.acquire()
            # (won, snapshot, holder, marker); a driver may leave out the last two.
            won, snap = leased[0], leased[1]
            holder, marker = (leased[2], leased[3]) if len(leased) > 2 else (None, None)
            if holder is not None and not won:
                # A live holder's lease is younger than any wait for it (wait_timeout),
                # give or take its last lease_seconds.
                max_age = self.options.wait_timeout + self.options.lease_seconds
                if not Lease.vouched(names, holder, max_age):
                    # Planted by someone who can write Redis but holds neither the fleet key
                    # nor the credential: nobody of ours is fetching, so waiting (up to
                    # wait_timeout, on every miss) would only hand them a stall. Fetch alone.
                    self.foreign_lease()
                    self.count("fallbacks")
                    return (yield from _alone())
                holders.add(holder)
            failure = Lease.failure_from(names, marker, holders)
            if failure is not None:
                if won:
                    yield lease.release()
                self.count("holder_failures")
                raise failure
            if won:
                self.count("leases_won")
                if woken is False:
                    # We waited, nobody told us the holder finished, and its lease is gone.
                    self.count("leases_expired")
                # Look again under the lease: a holder may have committed since our first read.
                answer = self._answer(names, snap, policy, stale)
                if answer is None:
                    return (yield from self._hold(lease))
                yield lease.release()
                found = self._served(answer)
                assert found is not None  # an answer: a token, or an error raised
                return found
            if not lost:
                lost = True
                self.count("leases_lost")
            # Someone else is fetching; a token still valid serves meanwhile.
            found = self._served(self._answer(names, snap, policy, stale, valid=True))
            if found is not None:
                return found
            if not subscribed:
                yield Subscribe(names)
                subscribed = True
                continue  # look again once subscribed: a commit before that sent no wake-up to us
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.count("wait_timeouts")
                self.count("fallbacks")
                return (yield from _alone())
            woken = yield Wait(min(self.options.poll_interval, remaining))
            self.count("waits_woken" if woken else "waits_polled")

    def _hold(self, lease: Lease) -> Generator[Op, Any, AccessToken]:
        """We hold the lease: fetch, share the outcome, release."""
        self.count("fetches")
        names, opts = lease.names, self.options
        try:
            token: AccessToken = yield Fetch(names, lease.value, lease.ms)
        except TokenEndpointError as exc:
            # Shared negative cache: a misconfigured fleet asks once per period, not per process.
            ttl_ms = int(opts.negative_seconds * 1000)
            if ttl_ms > 0:
                value = self.codec.encode_error(names, exc, self.clock() + opts.negative_seconds)
                yield CommitError(names, value, ttl_ms, lease.value)
            else:
                yield lease.release()
            raise
        except TokenError as exc:
            # Transient (issuer down, 5xx after retries): not shared as an entry, but the
            # processes that waited for this attempt get its outcome, not a turn of their
            # own (a turn each would make the k-th wait k retry budgets). The marker outlives
            # a waiter's poll, not the next attempt.
            yield lease.release_failed(exc, 2 * opts.poll_interval + 2 * opts.operation_timeout + 1)
            raise
        except Exception:
            yield lease.release()  # wakes the waiters: one of them tries next
            raise
        ttl_ms = int((token.expires_at - self.clock()) * 1000)
        if ttl_ms <= 0:
            yield lease.release()
            return token
        ours = yield Commit(names, self.codec.encode_token(names, token), ttl_ms, lease.value)
        if not ours:
            self.count("leases_expired")
            logger.info("shared token cache: our lease lapsed during a slow fetch")
        return token

    def invalidate_flow(
        self, key: CacheKey, token: AccessToken
    ) -> Generator[InvalidateOp, Any, None]:
        """Delete the shared entry only if it still holds ``token`` (the one that got a 401),
        then tell the other processes, which may hold it in memory (docs/sharing.md)."""
        if not self.allow():
            return
        names = self.codec.names(key)
        value: bytes | None = yield Get(names.token)
        if value is not None and self._holds(names, value, token):
            # Compare-and-delete on the exact bytes: a token written meanwhile survives.
            yield DeleteIfEquals(names.token, value)
        message = announcement(self.announce_key, names, token.access_token)
        yield Announce(self.invalidation_channel, message)

    def _holds(self, names: KeyNames, value: bytes, token: AccessToken) -> bool:
        try:
            return self.codec.decode_token(names, value).access_token == token.access_token
        except UndecodableEntry:
            return False

    @property
    def invalidation_channel(self) -> str:
        return f"{self.codec.namespace}:invalidated"
