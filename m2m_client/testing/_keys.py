"""LocalIssuer's signing keys: generation, rotation, the published JWKS, and signing.

RFC 7517 (JWK / JWKS) and RFC 7638 (the ``kid`` is the key's thumbprint, so it is stable and
never collides between keys).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from m2m_client.errors import ConfigurationError

Algorithm = Literal["RS256", "ES256"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(jwk: Mapping[str, Any]) -> str:
    # RFC 7638: SHA-256 over the required members only, sorted, no whitespace.
    required = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: Algorithm
    private_key: PrivateKey
    public_jwk: Mapping[str, Any]


def generate_key(algorithm: str) -> SigningKey:
    """A new RS256 (RSA-2048) or ES256 (P-256) key with its public JWK."""
    jwk: dict[str, Any]
    private_key: PrivateKey
    if algorithm == "RS256":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = dict(RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True))
        alg: Algorithm = "RS256"
    elif algorithm == "ES256":
        private_key = ec.generate_private_key(ec.SECP256R1())
        jwk = dict(ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True))
        alg = "ES256"
    else:
        raise ConfigurationError(
            f"LocalIssuer algorithm must be 'RS256' or 'ES256', not {algorithm!r}"
        )
    kid = thumbprint(jwk)
    jwk.update(kid=kid, alg=alg, use="sig")
    return SigningKey(kid=kid, algorithm=alg, private_key=private_key, public_jwk=jwk)


class KeyRing:
    """The keys an issuer publishes, oldest first; the newest one signs."""

    def __init__(self, algorithm: str) -> None:
        self._lock = threading.Lock()
        self._keys: tuple[SigningKey, ...] = (generate_key(algorithm),)

    @property
    def current(self) -> SigningKey:
        return self._keys[-1]

    @property
    def algorithms(self) -> list[str]:
        return sorted({key.algorithm for key in self._keys})

    def rotate(self, algorithm: str) -> SigningKey:
        key = generate_key(algorithm)  # outside the lock: RSA generation takes ~50 ms
        with self._lock:
            self._keys = (*self._keys, key)
        return key

    def retire_old(self) -> None:
        with self._lock:
            self._keys = self._keys[-1:]

    def snapshot(self) -> tuple[SigningKey, ...]:
        return self._keys

    def restore(self, keys: tuple[SigningKey, ...]) -> None:
        with self._lock:
            self._keys = keys

    def jwks(self) -> dict[str, Any]:
        """The public JSON Web Key Set, newest key first."""
        return {"keys": [dict(key.public_jwk) for key in reversed(self._keys)]}

    def sign(self, claims: Mapping[str, Any], header: Mapping[str, Any]) -> str:
        key = self.current
        headers = {"kid": key.kid, **header}
        return jwt.encode(dict(claims), key.private_key, algorithm=key.algorithm, headers=headers)


class IssuerKeys:
    """LocalIssuer's methods about its signing keys."""

    _keys: KeyRing
    algorithm: Algorithm
    typ: str | None

    @property
    def kid(self) -> str:
        """The ``kid`` of the current signing key (its RFC 7638 thumbprint)."""
        return self._keys.current.kid

    @property
    def private_key(self) -> PrivateKey:
        """The current signing key, for tests that need to forge unusual tokens."""
        return self._keys.current.private_key

    def rotate_keys(self, algorithm: Algorithm | None = None) -> str:
        """Sign with a new key from now on; every older public key stays in the JWKS.

        Returns the new ``kid``. Tokens signed before the rotation keep verifying.
        """
        key = self._keys.rotate(algorithm or self.algorithm)
        self.algorithm = key.algorithm
        return key.kid

    def retire_old_keys(self) -> None:
        """Drop every key but the current one from the JWKS (the end of a rotation)."""
        self._keys.retire_old()

    def jwks(self) -> dict[str, Any]:
        """The public JSON Web Key Set, newest key first."""
        return self._keys.jwks()

    def sign(self, claims: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None) -> str:
        """Sign ``claims`` as they are with the current key (no claim is added)."""
        header: dict[str, Any] = {"typ": self.typ} if self.typ else {}
        return self._keys.sign(claims, {**header, **(headers or {})})
