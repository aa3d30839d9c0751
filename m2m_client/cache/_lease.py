"""The fleet lease: who fetches a token for every process, in one class.

Modelled on redis-py's ``lock.py`` (acquire / extend / release, a random value per holder,
compare-and-delete so only the holder releases), but sans-IO: each method returns the
operation a driver sends (``_executors.plan_for`` says what goes over the wire, ``_drive``
keeps a running fetch's lease alive). Two things redis-py's lock does not need:

- **MACed values.** A lease value is a random nonce and an HMAC of it keyed like the entries
  (fleet key and credential). A waiter waits only for a holder of its own credential: a lease
  planted by whoever can write Redis but holds neither is no reason to wait
  (:meth:`Lease.vouched`).
- **Failure markers.** A holder whose fetch fails transiently leaves a short-lived, MACed
  marker naming its lease value and the failure's class (never its message): the processes
  that waited for that holder raise the same failure instead of taking a turn each
  (:meth:`Lease.failure_marker`, :meth:`Lease.failure_from`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from m2m_client.errors import (
    DiscoveryError,
    InvalidTokenResponse,
    TokenEndpointUnavailable,
    TokenError,
)

from ._codec import KeyNames

__all__ = ["Extend", "Lease", "LeaseAndRead", "Release", "ReleaseFailed", "failed_name"]

#: Clock difference between processes of a fleet tolerated when dating a lease value.
CLOCK_SKEW = 30.0


@dataclass(frozen=True, slots=True)
class LeaseAndRead:
    """SET lease NX PX, GET the lease and the failure marker, then the same reads as
    ``Read``, in one round trip. -> (lease is ours, snapshot, holder, marker)."""

    names: KeyNames
    lease: str
    lease_ms: int
    failed: str


@dataclass(frozen=True, slots=True)
class Extend:
    """PEXPIRE the lease if it still holds our value. -> still ours."""

    names: KeyNames
    lease: str
    lease_ms: int


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


def failed_name(names: KeyNames) -> str:
    """Where a holder whose fetch failed leaves its marker (same Cluster slot as the lease)."""
    return f"{names.lease}:failed"


# A failed holder's outcome as waiters raise it: the class, never the message (which could
# name the token endpoint, and Redis is no place for it).
_FAILURES: dict[str, type[TokenError]] = {
    cls.__name__: cls
    for cls in (TokenEndpointUnavailable, InvalidTokenResponse, DiscoveryError, TokenError)
}


def _marker_mac(names: KeyNames, body: bytes) -> bytes:
    # Keyed like the entries (fleet key and credential): whoever can write Redis but holds
    # neither cannot make the fleet raise a "failure" (a lease it holds plus a marker
    # naming it would otherwise fail every call of that credential for as long as it likes).
    message = failed_name(names).encode() + b"\0" + body
    return hmac.new(names.entry_key, message, hashlib.sha256).hexdigest()[:32].encode()


def _lease_mac(names: KeyNames, nonce: bytes) -> str:
    message = names.lease.encode() + b"\0" + nonce
    return hmac.new(names.entry_key, message, hashlib.sha256).hexdigest()[:32]


class Lease:
    """One attempt's lease on a cache key: its value, and the operations that move it."""

    __slots__ = ("ms", "names", "value")

    def __init__(self, names: KeyNames, seconds: float, value: str | None = None) -> None:
        self.names = names
        self.ms = max(int(seconds * 1000), 1)
        # Random per attempt (a retried SET finds our own value: see plan_for), dated (so
        # a value seen once cannot be put back later: see vouched), and MACed.
        nonce = f"{int(time.time()):x}-{secrets.token_hex(16)}"
        self.value = value if value is not None else f"{nonce}.{_lease_mac(names, nonce.encode())}"

    @staticmethod
    def vouched(names: KeyNames, holder: bytes, max_age: float = 600.0) -> bool:
        """Whether ``holder`` (a lease value read from Redis) was written by a process holding
        this credential and fleet key, at most ``max_age`` seconds ago (give or take
        :data:`CLOCK_SKEW`). The MAC alone would vouch for a genuine value a Redis writer saw
        once and put back: a holder that is no longer fetching (and whose failure marker,
        put back with it, would fail every call of the credential)."""
        nonce, _, mac = holder.partition(b".")
        if not hmac.compare_digest(mac, _lease_mac(names, nonce).encode()):
            return False
        written, dash, _ = nonce.partition(b"-")
        try:
            age = time.time() - int(written, 16)
        except ValueError:
            return False
        return bool(dash) and -CLOCK_SKEW <= age <= max_age + CLOCK_SKEW

    def acquire(self) -> LeaseAndRead:
        return LeaseAndRead(self.names, self.value, self.ms, failed_name(self.names))

    def extend(self) -> Extend:
        return Extend(self.names, self.value, self.ms)

    def release(self) -> Release:
        return Release(self.names, self.value)

    def release_failed(self, exc: BaseException, marker_seconds: float) -> ReleaseFailed:
        marker = self.failure_marker(exc)
        ms = int(marker_seconds * 1000)
        return ReleaseFailed(self.names, self.value, failed_name(self.names), marker, ms)

    def failure_marker(self, exc: BaseException) -> bytes:
        kind = next((n for n, c in _FAILURES.items() if type(exc) is c), "TokenError")
        body = f"{self.value}|{kind}".encode()
        return body + b"|" + _marker_mac(self.names, body)

    @staticmethod
    def failure_from(
        names: KeyNames, marker: bytes | None, holders: set[bytes]
    ) -> TokenError | None:
        """The failure of a holder we waited for (``holders``: lease values we saw), if any."""
        if not marker:
            return None
        body, _, mac = marker.rpartition(b"|")
        if not hmac.compare_digest(mac, _marker_mac(names, body)):
            return None  # not written by a process of this credential (and fleet key)
        lease, _, kind = body.partition(b"|")
        if lease not in holders:
            return None  # another attempt's failure: not the one we waited for
        cls = _FAILURES.get(kind.decode("ascii", "replace"), TokenError)
        message = (
            f"the process fetching this token for the fleet failed ({cls.__name__}); this call "
            "shares that outcome rather than starting another fetch"
        )
        return cls(message)
