"""The key set a verifier holds and every decision about refreshing it, sans-IO.

:class:`KeySetState` answers "which key verifies this token, or must we fetch first?" and
consumes the fetch through :meth:`KeySetState.refresh_flow`, a generator that yields
requests and receives answers (or the exception the shell's driver raised), in the style of
httpx's ``Auth.auth_flow``. Durations use the injected monotonic clock.

The rules, each against a failure seen in real deployments:

* one fetch at a time (the shells hold a lock around the flow); the error back-off counts
  from the *end* of the failed attempt, so requests queued behind a hanging fetch do not
  each start their own;
* while a fetch is in flight or backing off, tokens whose key is cached verify with the
  (stale) set at once, for at most ``max_stale`` past its expiry; the others fail fast with
  :class:`KeySetUnavailable`;
* refresh ahead: from ``refresh_at`` (75% of the TTL) the set is refreshed in the
  background while callers keep using it; only a cold start, an expired set or an unknown
  ``kid`` makes a caller wait;
* an unknown ``kid`` refetches at once (issuers sign with a new key as soon as they publish
  it); only *repeated* unknown-kid refetches wait for ``unknown_kid_cooldown``, counted
  from the end of the last one. A cancelled fetch starts no cooldown and no back-off.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from m2m_client._discovery import Discovery
from m2m_client._http import HttpAnswer, HttpRequest
from m2m_client.errors import ConfigurationError, InvalidToken, KeySetUnavailable, M2MError

from ._jwks import JwksPolicy, KeySet, VerificationKey, ttl_from_headers
from ._source import Answer, KeySource

__all__ = ["Answer", "KeyChoice", "KeySetState"]

logger = logging.getLogger("m2m_client.verify")


@dataclass(frozen=True, slots=True)
class KeyChoice:
    """The key to verify with (and whether to refresh behind), or ``None``: fetch first."""

    key: VerificationKey | None
    refresh_behind: bool = False
    unknown_kid: bool = False


_FETCH = KeyChoice(None)
_FETCH_FOR_KID = KeyChoice(None, unknown_kid=True)


class KeySetState:
    """The cached key set of one issuer and the refresh decisions; no I/O."""

    def __init__(
        self,
        issuer: str,
        jwks_url: str | None,
        policy: JwksPolicy,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.policy = policy
        self.monotonic = monotonic
        discovery = Discovery(issuer, negative_seconds=policy.error_retry, monotonic=monotonic)
        self.source = KeySource(jwks_url, discovery)
        self.keys: KeySet | None = None
        self.fresh_until = self.refresh_at = -math.inf
        self.retry_at = self.kid_refetch_at = -math.inf
        self.fetching = False
        self.last_error: M2MError | None = None

    # --- decisions -------------------------------------------------------------------
    def choose(self, kid: str | None, alg: str, now: float) -> KeyChoice:
        """The key for a token, or a fetch to make first; raises when neither may happen."""
        keys = self.keys
        if keys is not None:
            key = keys.find(kid, alg)
            if key is not None:
                if now < self.refresh_at:
                    return KeyChoice(key)
                if now < self.fresh_until or self._stale_ok(now):
                    return KeyChoice(key, refresh_behind=self.refresh_due(now))
                # Expired (the key may be withdrawn): decided below like an unknown key.
        if self.fetching:
            return _FETCH  # wait for the fetch in flight, then decide again
        if now < self.retry_at:
            raise self._unavailable()
        if keys is None or now >= self.fresh_until:
            return _FETCH
        if now >= self.kid_refetch_at:
            return _FETCH_FOR_KID
        raise InvalidToken(
            "the token's signing key ('kid') is not in the issuer's key set", reason="unknown_kid"
        )

    def fresh_key(self, kid: str | None, alg: str, now: float) -> VerificationKey | None:
        """:meth:`choose`'s first answer, the usual one: the key while the set needs no
        refresh yet. None means ask :meth:`choose` (it also decides fetches and refusals)."""
        keys = self.keys
        if keys is None or now >= self.refresh_at:
            return None
        return keys.find(kid, alg)

    def key_while_fetching(self, kid: str | None, alg: str, now: float) -> VerificationKey | None:
        """The key in the held set, stale or not, for a caller that finds a fetch in flight.

        The shells ask this instead of waiting for the fetch (a hung JWKS endpoint would
        hold every caller until its deadline): the set serves as :meth:`choose` serves it
        while :attr:`fetching`, up to ``max_stale`` past its expiry. None: no such key,
        wait for the fetch.
        """
        keys = self.keys
        if keys is None or now >= self.fresh_until + self.policy.max_stale:
            return None
        return keys.find(kid, alg)

    def after_fetch(self, kid: str | None, alg: str) -> VerificationKey:
        """The key once a fetch ended (fresh or stale set), or the error; never fetches."""
        key = self.keys.find(kid, alg) if self.keys is not None else None
        if key is not None:
            return key
        if self.last_error is not None or self.keys is None:
            raise self._unavailable()
        raise InvalidToken(
            "the token's signing key ('kid') is not in the issuer's key set", reason="unknown_kid"
        )

    def refresh_due(self, now: float) -> bool:
        """Whether a background refresh should start now."""
        return not self.fetching and now >= self.refresh_at and now >= self.retry_at

    def usable(self, now: float) -> bool:
        """Whether verdicts made under the held set may still be served."""
        return now < self.refresh_at or (
            self.keys is not None and (now < self.fresh_until or self._stale_ok(now))
        )

    def _stale_ok(self, now: float) -> bool:
        # Stale-while-error, bounded: a withdrawn key must not live forever because the
        # issuer (or the path to it) is down.
        fetch_pending = self.fetching or now < self.retry_at
        return fetch_pending and now < self.fresh_until + self.policy.max_stale

    def retry_after(self, now: float) -> float:
        """Seconds until the next fetch attempt is allowed (for ``Retry-After``)."""
        return max(0.0, self.retry_at - now)

    def raise_if_failed(self) -> None:
        if self.last_error is not None:
            raise self._unavailable()

    def _unavailable(self) -> M2MError:
        error = self.last_error
        if isinstance(error, ConfigurationError):
            return ConfigurationError(str(error))
        return KeySetUnavailable(
            "the issuer's signing keys (JWKS) could not be fetched: "
            f"{error if error is not None else 'not fetched yet'}"
        )

    # --- the fetch -------------------------------------------------------------------
    def refresh_flow(self, *, unknown_kid: bool = False) -> Generator[HttpRequest, Answer, bool]:
        """Fetch the key set (discovering its URL first if needed); True if it changed."""
        self.fetching = True
        try:
            try:
                url = yield from self.source.jwks_url()
                answer = yield HttpRequest("GET", url, headers={"Accept": "application/json"})
                keys = self.source.read(answer, url)
            except (KeySetUnavailable, ConfigurationError) as exc:
                self._failed(exc, unknown_kid)
                return False
            return self._loaded(keys, answer, unknown_kid)
        finally:
            # Also on cancellation (GeneratorExit): then no back-off and no cooldown start.
            self.fetching = False

    def _failed(self, exc: M2MError, unknown_kid: bool) -> None:
        end = self.monotonic()  # the back-off counts from the end of the attempt
        self.last_error = exc
        self.retry_at = end + self.policy.error_retry
        if unknown_kid:
            self.kid_refetch_at = end + self.policy.unknown_kid_cooldown
        if isinstance(exc, ConfigurationError):
            logger.error("verifier for issuer %s is misconfigured: %s", self.issuer, exc)
        else:
            logger.warning("JWKS refresh for issuer %s failed: %s", self.issuer, exc)

    def _loaded(self, keys: KeySet, answer: Answer, unknown_kid: bool) -> bool:
        assert isinstance(answer, HttpAnswer)
        end = self.monotonic()
        ttl = ttl_from_headers(answer.headers, self.policy)
        self.last_error = None
        self.retry_at = -math.inf
        self.fresh_until = end + ttl
        self.refresh_at = end + ttl * (1.0 - self.policy.refresh_ahead)
        if unknown_kid:
            self.kid_refetch_at = end + self.policy.unknown_kid_cooldown
        changed = self.keys is None or keys.fingerprint != self.keys.fingerprint
        if changed:
            logger.info("JWKS for issuer %s loaded: %d usable keys", self.issuer, len(keys))
        self.keys = keys
        return changed
