"""The issuer's key set: JWKS parsing, discovery and the refresh policy, sans-IO.

Nothing here does I/O. :class:`KeySetState` decides *whether* to fetch and consumes the
responses; the sync and async verifiers drive :meth:`KeySetState.refresh_flow` (a
generator that yields URLs and receives :class:`HttpResult`) with their own HTTP client,
in the style of httpx's ``Auth.auth_flow``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from m2m_client.errors import InvalidToken, KeySetUnavailable

__all__ = [
    "MAX_JWKS_BYTES",
    "HttpResult",
    "JwksPolicy",
    "KeySet",
    "KeySetState",
    "VerificationKey",
    "discovery_urls",
    "parse_jwks",
    "ttl_from_cache_control",
]

logger = logging.getLogger("m2m_client.verify")

#: Largest JWKS body read; real key sets are a few KiB.
MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 100
MIN_RSA_BITS = 2048

RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_CURVE_ALGS: Mapping[str, frozenset[str]] = {
    "P-256": frozenset({"ES256"}),
    "P-384": frozenset({"ES384"}),
    "P-521": frozenset({"ES512", "ES521"}),
    "secp256k1": frozenset({"ES256K"}),
    "Ed25519": frozenset({"EdDSA"}),
    "Ed448": frozenset({"EdDSA"}),
}
#: Every algorithm a verifier may allow: asymmetric only (no "none", no HMAC).
SUPPORTED_ALGORITHMS = RSA_ALGS.union(*_CURVE_ALGS.values())
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,10})", re.IGNORECASE)


@dataclass(frozen=True)
class VerificationKey:
    """One usable public key from the JWKS, parsed once."""

    kid: str | None
    kty: str
    algorithms: frozenset[str]
    key: Any
    fingerprint: str


@dataclass(frozen=True)
class HttpResult:
    """What a shell reports back for one GET: a response, or ``error`` for a failure."""

    status: int = 0
    body: bytes = b""
    cache_control: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class JwksPolicy:
    """Refresh bounds, in seconds."""

    min_ttl: float = 60.0
    max_ttl: float = 86400.0
    default_ttl: float = 600.0
    unknown_kid_cooldown: float = 30.0
    error_retry: float = 5.0


def _parse_key(jwk: object) -> VerificationKey:
    if not isinstance(jwk, dict):
        raise ValueError("entry is not a JSON object")
    kty = jwk.get("kty")
    if kty not in _PUBLIC_MEMBERS:
        # "oct" keys are refused outright: a symmetric key in a public set is the
        # ingredient of the HMAC algorithm-confusion attack.
        raise ValueError(f"unsupported kty {str(kty)[:20]!r}")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use is {str(use)[:20]!r}, not 'sig'")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError("key_ops does not allow 'verify'")
    public = {"kty": kty}
    key: Any
    for member in _PUBLIC_MEMBERS[kty]:
        value = jwk.get(member)
        if not isinstance(value, str):
            raise ValueError(f"member {member!r} missing or not a string")
        public[member] = value
    # Private members ("d", "p", ...) are dropped: a JWKS leaking a private key is the
    # issuer's problem, but we must never hold or use it.
    if kty == "RSA":
        key = RSAAlgorithm.from_jwk(public)
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits is below {MIN_RSA_BITS}")
        compatible = RSA_ALGS
    else:
        compatible = _CURVE_ALGS.get(public["crv"], frozenset())
        if not compatible:
            raise ValueError(f"unsupported curve {public['crv'][:20]!r}")
        key = ECAlgorithm.from_jwk(public) if kty == "EC" else OKPAlgorithm.from_jwk(public)
    alg = jwk.get("alg")
    if alg is not None:
        # RFC 7517 §4.4: a key bound to one algorithm may verify only that algorithm.
        if alg not in compatible:
            raise ValueError(f"alg {str(alg)[:20]!r} does not fit kty {kty}")
        compatible = frozenset({alg})
    fingerprint = json.dumps([kid, sorted(public.items()), sorted(compatible)])
    return VerificationKey(kid, kty, compatible, key, fingerprint)


class KeySet:
    """Parsed keys indexed by kid."""

    __slots__ = ("_by_kid", "fingerprint", "keys")

    def __init__(self, keys: list[VerificationKey]) -> None:
        self.keys = tuple(keys)
        self.fingerprint = frozenset(k.fingerprint for k in keys)
        self._by_kid: dict[str | None, list[VerificationKey]] = {}
        for key in keys:
            self._by_kid.setdefault(key.kid, []).append(key)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, kid: str | None, alg: str) -> VerificationKey | None:
        """Return the key for ``kid`` usable with ``alg``; None if the kid is unknown.

        Raises InvalidToken when the kid exists but its key does not fit ``alg``: the
        algorithm is bound to the key, never taken from the token alone.
        """
        if kid is None:
            # Without a kid, only an unambiguous key is acceptable (no trying every key).
            candidates = [k for k in self.keys if alg in k.algorithms]
            if len(candidates) == 1:
                return candidates[0]
            if candidates:
                raise InvalidToken("the token has no 'kid' and the key set has several keys")
            return None
        found = self._by_kid.get(kid)
        if found is None:
            return None
        for key in found:
            if alg in key.algorithms:
                return key
        raise InvalidToken("the token's algorithm does not match the type of its signing key")


def parse_jwks(body: bytes) -> KeySet:
    """Parse a JWKS document; unusable keys are skipped with a log line.

    Raises ValueError when the document itself is unusable or holds no usable key.
    """
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError("JWKS is not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS is not an object with a 'keys' list")
    entries = document["keys"]
    if len(entries) > MAX_KEYS:
        logger.warning("JWKS has %d keys; only the first %d are used", len(entries), MAX_KEYS)
    keys: list[VerificationKey] = []
    for index, entry in enumerate(entries[:MAX_KEYS]):
        try:
            keys.append(_parse_key(entry))
        except Exception as exc:  # one bad key must never sink the whole set
            kid = entry.get("kid") if isinstance(entry, dict) else None
            logger.warning("skipping JWKS key #%d (kid %.40r): %s", index, kid, exc)
    if not keys:
        raise ValueError("JWKS holds no usable signing key")
    return KeySet(keys)


def ttl_from_cache_control(cache_control: str | None, policy: JwksPolicy) -> float:
    """Freshness lifetime of a JWKS response, clamped to the policy bounds."""
    ttl = policy.default_ttl
    if cache_control:
        lowered = cache_control.lower()
        if "no-store" in lowered or "no-cache" in lowered:
            ttl = policy.min_ttl
        else:
            match = _MAX_AGE.search(cache_control)
            if match:
                ttl = float(match.group(1))
    return min(max(ttl, policy.min_ttl), policy.max_ttl)


def discovery_urls(issuer: str) -> list[str]:
    """Metadata URLs to try: OpenID Connect Discovery, then RFC 8414 §3."""
    base = issuer.rstrip("/")
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return [
        f"{base}/.well-known/openid-configuration",
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}",
    ]


def _jwks_uri_from_metadata(body: bytes, issuer: str) -> str:
    try:
        metadata = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError("metadata is not JSON") from exc
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not a JSON object")
    # RFC 8414 §3.3 / OIDC Discovery §4.3: metadata for another issuer must not be used,
    # or a compromised metadata host could point us at an attacker's keys.
    if metadata.get("issuer") != issuer:
        raise ValueError("metadata 'issuer' does not match the configured issuer")
    jwks_uri = metadata.get("jwks_uri")
    if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("https", "http"):
        raise ValueError("metadata has no http(s) 'jwks_uri'")
    return jwks_uri


class KeySetState:
    """The cached key set and every decision about refreshing it.

    ``now`` is always passed in (epoch seconds), so tests drive time explicitly.
    """

    def __init__(self, issuer: str, jwks_url: str | None, policy: JwksPolicy) -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.policy = policy
        self.keys: KeySet | None = None
        self.generation = 0
        self.fresh_until = -math.inf
        self.last_attempt = -math.inf
        self.retry_at = -math.inf
        self.last_error: str | None = None

    def lookup(self, kid: str | None, alg: str, now: float) -> VerificationKey | None:
        """The key for a token if the set is fresh and has it; None means 'ask to fetch'."""
        if self.keys is None or now >= self.fresh_until:
            return None
        return self.keys.find(kid, alg)

    def should_fetch(self, kid: str | None, alg: str, now: float) -> bool:
        """Whether a fetch is due for this token (re-asked under the lock: single flight)."""
        if now < self.retry_at:
            return False  # a recent fetch failed: keep serving what we have
        if self.keys is None or now >= self.fresh_until:
            return True
        if self.keys.find(kid, alg) is not None:
            return False
        # Unknown kid: maybe a rotation. Refetch at most once per cooldown so random kids
        # cannot turn every request into a request to the issuer.
        return now - self.last_attempt >= self.policy.unknown_kid_cooldown

    def key_after_refresh(self, kid: str | None, alg: str) -> VerificationKey:
        """The key for a token from whatever set we hold, fresh or stale, or the error."""
        if self.keys is None:
            raise KeySetUnavailable(
                "the issuer's signing keys (JWKS) could not be fetched: "
                f"{self.last_error or 'not fetched yet'}"
            )
        key = self.keys.find(kid, alg)
        if key is not None:
            return key
        if self.last_error is not None:
            raise KeySetUnavailable(
                "the token's signing key is not in the cached key set and the JWKS "
                f"cannot be refreshed: {self.last_error}"
            )
        raise InvalidToken("the token's signing key ('kid') is not in the issuer's key set")

    def retry_after(self, now: float) -> float:
        """Seconds until the next fetch attempt is allowed (for Retry-After)."""
        return max(0.0, self.retry_at - now)

    def refresh_flow(self, now: float) -> Generator[str, HttpResult, bool]:
        """Fetch (discovering the JWKS URL first if needed); return True if keys changed."""
        self.last_attempt = now
        try:
            if self.jwks_url is None:
                self.jwks_url = yield from self._discover()
            result = yield self.jwks_url
            if result.error is not None:
                raise ValueError(result.error)
            if result.status != 200:
                raise ValueError(f"JWKS endpoint answered HTTP {result.status}")
            keys = parse_jwks(result.body)
        except ValueError as exc:
            self.last_error = str(exc)
            self.retry_at = now + self.policy.error_retry
            logger.warning("JWKS refresh for issuer %s failed: %s", self.issuer, exc)
            return False
        self.last_error = None
        self.retry_at = -math.inf
        self.fresh_until = now + ttl_from_cache_control(result.cache_control, self.policy)
        changed = self.keys is None or keys.fingerprint != self.keys.fingerprint
        if changed:
            self.generation += 1
            logger.info("JWKS for issuer %s loaded: %d usable keys", self.issuer, len(keys))
        self.keys = keys
        return changed

    def _discover(self) -> Generator[str, HttpResult, str]:
        problems = []
        for url in discovery_urls(self.issuer):
            result = yield url
            if result.error is not None or result.status != 200:
                problems.append(f"{url}: {result.error or f'HTTP {result.status}'}")
                continue
            try:
                return _jwks_uri_from_metadata(result.body, self.issuer)
            except ValueError as exc:
                problems.append(f"{url}: {exc}")
        raise ValueError("discovery failed (" + "; ".join(problems) + ")")
