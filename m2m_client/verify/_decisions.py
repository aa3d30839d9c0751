"""The verifier's sans-IO decisions: configuration, the verification steps and the caches.

The sync and async verifiers add only locking and I/O around :class:`VerifierCore`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass

from m2m_client._http import HttpRequest
from m2m_client.errors import ConfigurationError, InsufficientPermissions

from ._cache import VerifiedTokens
from ._claims import (
    Claims,
    ClaimsPolicy,
    check_rights,
    hint_roles_elsewhere,
    names,
    validate_payload,
)
from ._jwks import SUPPORTED_ALGORITHMS, JwksPolicy, KeySet, VerificationKey
from ._jws import HeaderCache, ParsedToken, check_header, check_signature, parse_compact
from ._keyset import KeySetState
from ._source import Answer, check_configured_url

__all__ = ["NeedKey", "VerifierCore"]

_TOKEN_TYPES = (None, "at+jwt")


@dataclass(frozen=True, slots=True)
class NeedKey:
    """A parsed token waiting for its key: the shell must fetch (or wait for a fetch)."""

    parsed: ParsedToken
    alg: str
    kid: str | None


@dataclass(frozen=True, slots=True)
class Settings:
    """The verifier's options, as the constructor received them."""

    issuer: str
    audience: str | Sequence[str] | None
    algorithms: str | Sequence[str]
    leeway: float
    roles_claim: str
    jwks_url: str | None
    required_claims: str | Iterable[str]
    expected_claims: Mapping[str, str | Sequence[str]] | None
    token_type: str | None
    jwks_min_ttl: float
    jwks_max_ttl: float
    unknown_kid_cooldown: float
    cache_size: int
    clock: Callable[[], float]


class VerifierCore:
    """Everything but I/O and locking: parsing, key choice, signature, claims, caches."""

    def __init__(self, settings: Settings) -> None:
        s = settings
        if not isinstance(s.issuer, str) or not s.issuer:
            raise ConfigurationError("issuer must be a non-empty string (the token's 'iss')")
        jwks_url = check_configured_url(s.jwks_url, "jwks_url")
        if jwks_url is None:
            # Discovery fetches from the issuer URL; with jwks_url the issuer is only the
            # string compared with 'iss'.
            check_configured_url(s.issuer, "issuer")
        expected = _expected_claims(s.expected_claims or {})
        algorithms = names(s.algorithms, "algorithms")
        bad = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
        if bad or not algorithms:
            raise ConfigurationError(
                f"algorithms {bad} are not supported; choose from {sorted(SUPPORTED_ALGORITHMS)} "
                "(none and HMAC are refused: the keys are public)"
            )
        if not 0 <= s.leeway <= 300:
            raise ConfigurationError("leeway must be between 0 and 300 seconds")
        if s.token_type not in _TOKEN_TYPES:
            raise ConfigurationError("token_type must be None or 'at+jwt'")
        if not 0 < s.jwks_min_ttl <= s.jwks_max_ttl:
            raise ConfigurationError("need 0 < jwks_min_ttl <= jwks_max_ttl")
        if s.unknown_kid_cooldown < 0 or s.cache_size < 0:
            raise ConfigurationError("unknown_kid_cooldown and cache_size must be >= 0")
        self.algorithms = frozenset(algorithms)
        self.token_type = s.token_type
        self.clock = s.clock
        # Durations (TTL, back-off, cooldown) need a clock that never steps back; a clock
        # injected for tests drives both.
        self.monotonic = time.monotonic if s.clock is time.time else s.clock
        self.claims_policy = ClaimsPolicy(
            issuer=s.issuer,
            audiences=_audiences(s.audience, expected),
            leeway=float(s.leeway),
            required=names(s.required_claims, "required_claims"),
            roles_claim=s.roles_claim,
            expected=expected,
        )
        policy = JwksPolicy(
            min_ttl=s.jwks_min_ttl,
            max_ttl=s.jwks_max_ttl,
            default_ttl=min(max(600.0, s.jwks_min_ttl), s.jwks_max_ttl),
            unknown_kid_cooldown=s.unknown_kid_cooldown,
            error_retry=min(s.unknown_kid_cooldown, 5.0),
            max_stale=s.jwks_max_ttl,
        )
        self.keys = KeySetState(s.issuer, jwks_url, policy, monotonic=self.monotonic)
        self.tokens = VerifiedTokens(s.cache_size)
        self.headers = HeaderCache()

    def cached(self, token: object) -> Claims | None:
        """Claims of an already verified token, if its verdict may still be served."""
        claims = self.tokens.get(token, self.clock())
        if claims is not None and self.keys.usable(self.monotonic()):
            return claims
        return None

    def begin(self, token: object) -> Claims | NeedKey:
        """Verify from the cache or the held key set; a NeedKey when the shell must fetch."""
        claims = self.cached(token)
        if claims is not None:
            return claims
        parsed = parse_compact(token, self.headers)
        if parsed.checked is None:  # a header not seen on a verified token yet
            parsed.checked = check_header(parsed.header, self.algorithms, self.token_type)
        alg, kid = parsed.checked
        now = self.monotonic()
        key = self.keys.fresh_key(kid, alg, now)
        if key is None:
            key = self.keys.choose(kid, alg, now).key
            if key is None:
                return NeedKey(parsed, alg, kid)
        return self.finish(token, parsed, alg, key)

    def finish(self, token: object, parsed: ParsedToken, alg: str, key: VerificationKey) -> Claims:
        """Check the signature and the claims; cache the verdict."""
        check_signature(parsed, alg, key.key)
        self.headers.add(parsed.header_segment, parsed.header, parsed.checked)
        # The clock is read now, not before a wait for the key set: exp is checked late.
        claims = validate_payload(parsed.payload(), self.claims_policy, self.clock())
        if type(token) is str:
            self.tokens.remember(token, claims, key, self._current_keys)
        return claims

    def _current_keys(self) -> KeySet | None:
        return self.keys.keys

    def key_under_lock(self, need: NeedKey) -> tuple[VerificationKey | None, bool]:
        """Asked again holding the lock: the key, or (None, unknown_kid) to fetch now."""
        choice = self.keys.choose(need.kid, need.alg, self.monotonic())
        return choice.key, choice.unknown_kid

    def key_while_fetching(self, need: NeedKey) -> VerificationKey | None:
        """The held (maybe stale) key for a caller that finds a fetch in flight, or None."""
        return self.keys.key_while_fetching(need.kid, need.alg, self.monotonic())

    def check(
        self,
        claims: Claims,
        *,
        scopes: str | Iterable[str],
        permissions: str | Iterable[str],
        roles: str | Iterable[str],
    ) -> None:
        """``TokenVerifier.check``: InsufficientPermissions unless everything is granted."""
        try:
            check_rights(claims, scopes=scopes, permissions=permissions, roles=roles)
        except InsufficientPermissions:
            lacking = [role for role in names(roles, "roles") if role not in claims.roles]
            if lacking:
                hint_roles_elsewhere(claims, self.claims_policy.roles_claim, lacking)
            raise

    def fetch_reason(self, unknown_kid: bool = False) -> str:
        """Why the key set is fetched now (``m2m_client.reason``)."""
        if unknown_kid:
            return "unknown_kid"
        return "start" if self.keys.keys is None else "ttl"

    def refresh_flow(self, *, unknown_kid: bool = False) -> Generator[HttpRequest, Answer, bool]:
        """The key set's fetch; verdicts of keys that left the set are dropped after it."""
        changed = yield from self.keys.refresh_flow(unknown_kid=unknown_kid)
        if changed and self.keys.keys is not None:
            self.tokens.prune(self.keys.keys.fingerprint)
        return changed


def _audiences(
    audience: str | Sequence[str] | None, expected: tuple[tuple[str, frozenset[str]], ...]
) -> frozenset[str] | None:
    if audience is None:
        if not expected:
            # Without aud, any token of the issuer (an ID token, another client's token,
            # a token for another API) would pass: something must pin it.
            raise ConfigurationError(
                "audience=None skips the 'aud' check; it needs expected_claims= to pin "
                "what the token is for (e.g. Cognito: token_use and client_id)"
            )
        return None
    listed = [audience] if isinstance(audience, str) else list(audience)
    if not listed or not all(isinstance(a, str) and a for a in listed):
        raise ConfigurationError(
            "audience must be a non-empty string or list of strings "
            "(or None, with expected_claims=, to skip the 'aud' check)"
        )
    return frozenset(listed)


def _expected_claims(
    expected_claims: Mapping[str, str | Sequence[str]],
) -> tuple[tuple[str, frozenset[str]], ...]:
    if not isinstance(expected_claims, Mapping):
        raise ConfigurationError("expected_claims must be a mapping of claim name to value(s)")
    result: list[tuple[str, frozenset[str]]] = []
    for name, value in expected_claims.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError("expected_claims names must be non-empty strings")
        try:
            allowed = names(value, f"expected_claims[{name!r}]")
        except ConfigurationError:
            allowed = ()
        if not allowed:
            raise ConfigurationError(
                f"expected_claims[{name!r}] must be a non-empty string or list of them"
            )
        result.append((name, frozenset(allowed)))
    return tuple(result)
