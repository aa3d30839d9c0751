"""Access tokens, their lifetime, and the fresh / refresh-ahead / expired decision.

The functions are pure: each takes ``now`` (seconds since the epoch) and never reads a clock.
The in-memory cache reads the wall clock only to evict expired tokens when it is full.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import itertools
import json
import math
import random
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from . import _fork

__all__ = [
    "AccessToken",
    "CacheKey",
    "CredentialId",
    "Freshness",
    "InMemoryTokenCache",
    "RefreshPolicy",
    "TokenCache",
    "freshness",
    "jwt_expiry",
]


MIN_LIFETIME = 1.0
"""A token's lifetime is never taken to be shorter than this (see RefreshPolicy.make_token)."""


class Freshness(enum.Enum):
    """What a caller may do with a cached token at a given moment."""

    FRESH = "fresh"
    """Use it."""
    REFRESH_AHEAD = "refresh_ahead"
    """Use it; one caller refreshes it in the background."""
    EXPIRED = "expired"
    """Within the safety margin of its expiry: wait for a new one."""


@dataclass(frozen=True, slots=True, repr=False)
class AccessToken:
    """An access token from the authorization server.

    ``expires_at`` is in seconds since the epoch, counted from when the request was sent.
    ``repr()`` shows a short fingerprint, never the token itself.
    """

    access_token: str
    token_type: str = "Bearer"
    expires_at: float = 0.0
    scope: str | None = None
    issued_at: float = 0.0
    """When the token request was sent (our clock)."""
    refresh_at: float = 0.0
    """Start of refresh-ahead; randomised once per token so fleets do not refresh in lockstep."""
    usable_until: float = 0.0
    """``expires_at`` minus the safety margin: from here on the token is treated as expired."""
    authorization: str = field(default="", compare=False)
    """The ready ``Authorization`` header value (built once, not per request)."""

    def __post_init__(self) -> None:
        if not self.authorization:
            # RFC 9449 §7.1: a DPoP-bound token is presented with the DPoP scheme.
            scheme = "DPoP" if self.token_type.lower() == "dpop" else "Bearer"
            object.__setattr__(self, "authorization", f"{scheme} {self.access_token}")
        if not self.usable_until:
            object.__setattr__(self, "usable_until", self.expires_at)
        if not self.refresh_at:
            object.__setattr__(self, "refresh_at", self.usable_until)

    @property
    def fingerprint(self) -> str:
        """First 12 hex digits of the token's SHA-256: enough to correlate, useless to replay."""
        return hashlib.sha256(self.access_token.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return (
            f"AccessToken(token_type={self.token_type!r}, fingerprint={self.fingerprint!r}, "
            f"expires_at={self.expires_at!r}, scope={self.scope!r})"
        )

    __str__ = __repr__


class CredentialId(NamedTuple):
    """What proves a client's right to its tokens, reduced to a digest that stays in memory.

    ``kind`` says what was digested (``"client_secret"``, ``"private_key"``; an assertion-based
    credential supplies the identity it asserts, not the changing assertion). ``digest`` is a
    SHA-256 over a domain-separated encoding of the credential. It never leaves the process as
    it is: a shared cache writes only an HMAC of it keyed from the fleet's key (see
    ``cache/_codec.py``), so nobody can test guesses of a secret against Redis key names.
    ``repr()`` shows the kind only. A tuple: part of every cache key, it is hashed on every
    ``get_token()``, and a tuple of ``str`` and ``bytes`` hashes in C with cached hashes.
    """

    kind: str
    digest: bytes

    @classmethod
    def of(cls, kind: str, *parts: str | bytes | None) -> CredentialId:
        """The id of a credential made of ``parts`` (each length-prefixed: no two sequences of
        parts collide; ``None`` differs from every string)."""
        h = hashlib.sha256(b"m2m-client credential id v1\x00" + kind.encode() + b"\x00")
        for part in parts:
            if part is None:
                h.update(b"\xff" * 8)
                continue
            data = part.encode() if isinstance(part, str) else part
            h.update(len(data).to_bytes(8, "big") + data)
        return cls(kind, h.digest())

    def __repr__(self) -> str:
        return f"CredentialId(kind={self.kind!r})"

    def __str__(self) -> str:
        return self.__repr__()


class CacheKey(NamedTuple):
    """What a cached token belongs to: every input that can change what the server issues.

    Token endpoint, client, audience, resource, sorted scopes, the DPoP key's thumbprint (a
    token bound to one key is useless to another), the client authentication method, every
    ``extra_params`` entry (Auth0 ``organization``, Entra ``claims`` ...), and the credential
    that proves the right to the token (a process with another secret never gets it).
    """

    endpoint: str
    client_id: str
    audience: str | None
    resource: str | None
    scopes: tuple[str, ...]
    dpop_jkt: str | None = None
    auth_method: str | None = None
    extra_params: tuple[tuple[str, str], ...] = ()
    """Sorted ``(name, value)`` pairs."""
    credential: CredentialId | None = None


def freshness(token: AccessToken, now: float) -> Freshness:
    """Classify ``token`` at ``now``."""
    if now >= token.usable_until:
        return Freshness.EXPIRED
    if now >= token.refresh_at:
        return Freshness.REFRESH_AHEAD
    return Freshness.FRESH


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT access token, read WITHOUT verification (only to schedule refresh).

    Opaque tokens (anything that is not a JWS with a JSON payload) give ``None``.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError, RecursionError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        value = float(exp)
    except OverflowError:  # an int such as 10**400
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """When a token is refreshed.

    * ``default_lifetime`` (300 s) is assumed when the response has no ``expires_in`` and the
      token is not a JWT with ``exp``. RFC 6749 §5.1 only RECOMMENDS ``expires_in``; guessing
      short costs one extra token request every five minutes, guessing long means presenting
      expired tokens (each costing a 401 and a replay).
    * The token counts as expired ``expiry_margin`` seconds (at most ``max_margin_fraction`` of
      its lifetime, so short tokens stay usable) before ``expires_at``: covers clock skew and
      the time a request spends in flight.
    * Refresh-ahead starts ``refresh_window`` of the lifetime (bounded by ``min_window`` and
      ``max_window`` seconds) before that point; the exact start is drawn uniformly in the first
      half of the window, once per token.
    """

    default_lifetime: float = 300.0
    expiry_margin: float = 30.0
    max_margin_fraction: float = 0.1
    refresh_window: float = 0.2
    min_window: float = 5.0
    max_window: float = 600.0
    failed_refresh_delay: float = 10.0
    """After a failed background refresh, wait this long (or a quarter of the remaining
    validity, if less) before the next attempt."""

    def make_token(
        self,
        *,
        access_token: str,
        token_type: str,
        expires_in: float | None,
        scope: str | None,
        sent_at: float,
        rng: random.Random,
    ) -> AccessToken:
        """Build an :class:`AccessToken` with its refresh schedule decided once."""
        lifetime = self.default_lifetime if expires_in is None else expires_in
        expires_at = sent_at + lifetime
        exp = jwt_expiry(access_token)
        # An `exp` already behind our send time (or less than a second ahead of it) is clock
        # skew, not a dead token: using it would make every call fetch again. expires_in
        # (relative) is immune to skew.
        if exp is not None and sent_at + MIN_LIFETIME <= exp < expires_at:
            expires_at = exp
        lifetime = expires_at - sent_at
        margin = min(self.expiry_margin, lifetime * self.max_margin_fraction)
        usable_until = expires_at - margin
        window = min(max(lifetime * self.refresh_window, self.min_window), self.max_window)
        window = min(window, (usable_until - sent_at) / 2)
        refresh_at = usable_until - window + rng.random() * window / 2
        return AccessToken(
            access_token=access_token,
            token_type=token_type,
            expires_at=expires_at,
            scope=scope,
            issued_at=sent_at,
            refresh_at=refresh_at,
            usable_until=usable_until,
        )

    def next_refresh_attempt(self, token: AccessToken, now: float) -> float:
        """When to try again after a background refresh of ``token`` failed at ``now``."""
        remaining = max(token.usable_until - now, 0.0)
        return now + max(min(self.failed_refresh_delay, remaining / 4), 0.5)


@runtime_checkable
class TokenCache(Protocol):
    """Where tokens are kept between calls. Implementations must be thread-safe.

    ``delete`` removes the entry only if it still holds ``token`` (so a client that saw a 401
    cannot throw away a token another caller has just fetched).
    """

    def get(self, key: Hashable) -> AccessToken | None: ...

    def set(self, key: Hashable, token: AccessToken) -> None: ...

    def delete(self, key: Hashable, token: AccessToken) -> bool: ...


class InMemoryTokenCache:
    """The default :class:`TokenCache`: a dict, private to one client instance.

    Holds at most ``max_entries`` tokens: when full, expired tokens go first, then the
    oldest tenth, so a caller cycling through endless audiences cannot grow it forever.
    Tokens past their ``expires_at`` (on ``clock``: the token client's wall clock) can never
    be served again and are swept out as new ones are stored: once the cache has doubled
    since the last sweep (and holds at least :attr:`SWEEP_MIN_ENTRIES`), or
    :attr:`SWEEP_INTERVAL` seconds after it. A sweep costs O(entries) but runs at most once
    per that many stores, so a store pays O(1) on average; ``get`` (the warm hit) never sweeps.
    """

    SWEEP_INTERVAL = 60.0
    SWEEP_MIN_ENTRIES = 64

    __slots__ = (
        "__weakref__",
        "_clock",
        "_lock",
        "_sweep_at",
        "_sweep_size",
        "_tokens",
        "max_entries",
    )

    def __init__(
        self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max(int(max_entries), 1)
        self._tokens: dict[Hashable, AccessToken] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._sweep_at = clock() + self.SWEEP_INTERVAL
        self._sweep_size = self.SWEEP_MIN_ENTRIES
        _fork.track(self)  # its lock is renewed in a forked child

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, key: Hashable) -> AccessToken | None:
        return self._tokens.get(key)

    def set(self, key: Hashable, token: AccessToken) -> None:
        with self._lock:
            tokens = self._tokens
            if key not in tokens and len(tokens) >= self.max_entries:
                self._evict()
            tokens[key] = token
            if len(tokens) >= self._sweep_size or self._clock() >= self._sweep_at:
                self._sweep()

    def _sweep(self) -> None:
        now = self._clock()  # expiry is wall time (the server's, on the client's clock)
        tokens = self._tokens
        for key in [k for k, t in tokens.items() if t.expires_at <= now]:
            del tokens[key]
        self._sweep_at = now + self.SWEEP_INTERVAL
        self._sweep_size = max(2 * len(tokens), self.SWEEP_MIN_ENTRIES)

    def _evict(self) -> None:
        self._sweep()
        tokens = self._tokens
        if len(tokens) >= self.max_entries:
            for key in list(itertools.islice(tokens, max(self.max_entries // 10, 1))):
                del tokens[key]

    def delete(self, key: Hashable, token: AccessToken) -> bool:
        with self._lock:  # compare-and-delete must be one step
            current = self._tokens.get(key)
            if current is not None and current.access_token == token.access_token:
                del self._tokens[key]
                return True
            return False

    def _after_fork(self) -> None:
        # The parent may have held the lock at fork time; no thread here will release it.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"InMemoryTokenCache(entries={len(self._tokens)})"
