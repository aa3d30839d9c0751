"""JWKS documents: parsing keys (RFC 7517) and reading a response's freshness, sans-IO."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from m2m_client._jose import (
    JWKS_CURVE_ALGS,
    MAX_JWKS_BYTES,
    MIN_RSA_BITS,
    PUBLIC_MEMBERS,
    RSA_ALGS,
    SUPPORTED_ALGORITHMS,
)
from m2m_client.errors import InvalidToken

__all__ = [
    "MAX_JWKS_BYTES",
    "SUPPORTED_ALGORITHMS",
    "JwksPolicy",
    "KeySet",
    "VerificationKey",
    "parse_jwks",
    "ttl_from_headers",
]

logger = logging.getLogger("m2m_client.verify")

_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,10})", re.IGNORECASE)
# ROCA (CVE-2017-15361): moduli from Infineon's generator are 65537^a mod M for a primorial M,
# so for every small prime p, n mod p lies in the subgroup 65537 generates. A random modulus
# passes all 38 primes with probability about 2^-120.
_ROCA_PRIMES = (
    3,
    5,
    7,
    11,
    13,
    17,
    19,
    23,
    29,
    31,
    37,
    41,
    43,
    47,
    53,
    59,
    61,
    67,
    71,
    73,
    79,
    83,
    89,
    97,
    101,
    103,
    107,
    109,
    113,
    127,
    131,
    137,
    139,
    149,
    151,
    157,
    163,
    167,
)


def _subgroup(p: int) -> frozenset[int]:
    members, x = {1}, 65537 % p
    while x not in members:
        members.add(x)
        x = x * 65537 % p
    return frozenset(members)


_ROCA_SUBGROUPS = tuple((p, _subgroup(p)) for p in _ROCA_PRIMES)


def has_roca_fingerprint(modulus: int) -> bool:
    """Whether an RSA modulus has the structure of the ROCA-weak Infineon keys."""
    return all(modulus % p in group for p, group in _ROCA_SUBGROUPS)


@dataclass(frozen=True)
class VerificationKey:
    """One usable public key from the JWKS, parsed once."""

    kid: str | None
    kty: str
    algorithms: frozenset[str]
    key: Any
    fingerprint: str


@dataclass(frozen=True)
class JwksPolicy:
    """Refresh bounds, in seconds; ``refresh_ahead`` is the share of a TTL left when the
    set is refreshed in the background; ``max_stale`` how long past its expiry a set may
    still be used while the issuer cannot be reached."""

    min_ttl: float = 60.0
    max_ttl: float = 86400.0
    default_ttl: float = 600.0
    unknown_kid_cooldown: float = 30.0
    error_retry: float = 5.0
    refresh_ahead: float = 0.25
    max_stale: float = 86400.0


def _parse_key(jwk: object) -> VerificationKey:
    if not isinstance(jwk, dict):
        raise ValueError("entry is not a JSON object")
    kty = jwk.get("kty")
    if kty not in PUBLIC_MEMBERS:
        # "oct" keys are refused outright: a symmetric key in a public set is the
        # ingredient of the HMAC algorithm-confusion attack.
        raise ValueError(f"unsupported kty {str(kty)[:20]!r}")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use is {str(use)[:20]!r}, not 'sig'")
    if "key_ops" in jwk:
        # RFC 7517 §4.3: an array of unique strings. null, duplicates or non-strings make
        # the key's intended use unknowable: not usable (as panva/jose decides).
        key_ops = jwk["key_ops"]
        if (
            not isinstance(key_ops, list)
            or not all(isinstance(op, str) for op in key_ops)
            or len(set(key_ops)) != len(key_ops)
        ):
            raise ValueError("key_ops is not a list of unique strings")
        if "verify" not in key_ops:
            raise ValueError("key_ops does not allow 'verify'")
    public = {"kty": kty}
    key: Any
    for member in PUBLIC_MEMBERS[kty]:
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
        if has_roca_fingerprint(key.public_numbers().n):
            raise ValueError("RSA key has the ROCA weakness (CVE-2017-15361)")
        compatible = RSA_ALGS
    else:
        compatible = JWKS_CURVE_ALGS.get(public["crv"], frozenset())
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
                raise InvalidToken(
                    "the token has no 'kid' and the key set has several keys", reason="unknown_kid"
                )
            return None
        found = self._by_kid.get(kid)
        if found is None:
            return None
        for key in found:
            if alg in key.algorithms:
                return key
        raise InvalidToken(
            "the token's algorithm does not match the type of its signing key", reason="algorithm"
        )


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
    keys: list[VerificationKey] = []
    for index, entry in enumerate(entries):
        try:
            keys.append(_parse_key(entry))
        except Exception as exc:  # one bad key must never sink the whole set
            kid = entry.get("kid") if isinstance(entry, dict) else None
            logger.warning("skipping JWKS key #%d (kid %.40r): %s", index, kid, exc)
    if not keys:
        raise ValueError("JWKS holds no usable signing key")
    return KeySet(keys)


def ttl_from_headers(headers: Mapping[str, str], policy: JwksPolicy) -> float:
    """Freshness lifetime left for a JWKS response, clamped to the policy bounds.

    RFC 9111 §4.2.3: a response that waited ``Age`` seconds in a cache has that much less
    of its ``max-age`` left.
    """
    cache_control = headers.get("cache-control")
    ttl = policy.default_ttl
    if cache_control:
        lowered = cache_control.lower()
        if "no-store" in lowered or "no-cache" in lowered:
            ttl = policy.min_ttl
        else:
            match = _MAX_AGE.search(cache_control)
            if match:
                ttl = float(match.group(1))
                age = (headers.get("age") or "").strip()
                if age.isdigit() and len(age) <= 10:
                    ttl -= int(age)
    return min(max(ttl, policy.min_ttl), policy.max_ttl)
