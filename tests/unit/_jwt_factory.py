"""Keys, tokens and JWKS endpoints for the verifier tests (no LocalIssuer dependency)."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from m2m_client.errors import VerificationError

ISSUER = "https://issuer.test/"
AUDIENCE = "https://api.test"
JWKS_URL = "https://issuer.test/.well-known/jwks.json"
NOW = 1_700_000_000.0


@functools.cache
def rsa_key(name: str = "a", bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ec_key(name: str = "a", curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
    return ec.generate_private_key(curves[curve])


@functools.cache
def ed_key(name: str = "a") -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(private_key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return dict(jwk)


def jwks(*jwk_list: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(jwk_list)}


def claims(now: float = NOW, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "worker@clients",
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now) + 3600,
        "azp": "worker",
        "scope": "read:data write:data",
    }
    for name, value in overrides.items():
        if value is _DROP:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


_DROP = object()
DROP: Any = _DROP


def sign(
    payload: dict[str, Any],
    key: Any = None,
    *,
    alg: str = "RS256",
    kid: str | None = "k1",
    headers: dict[str, Any] | None = None,
) -> str:
    all_headers = {"kid": kid} if kid is not None else {}
    all_headers.update(headers or {})
    return jwt.encode(
        payload, key if key is not None else rsa_key(), algorithm=alg, headers=all_headers
    )


def token(now: float = NOW, **overrides: Any) -> str:
    return sign(claims(now, **overrides))


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return jwt.utils.base64url_encode(raw).decode()


def raw_token(header: Any, payload: Any, signature: bytes = b"sig") -> str:
    h = header if isinstance(header, str) else b64(json.dumps(header))
    p = payload if isinstance(payload, str) else b64(json.dumps(payload))
    return f"{h}.{p}.{b64(signature)}"


class _Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body httpx has not read yet, as from a network (the drivers stream raw bytes)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield self._data

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield self._data


def streamed(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """An httpx.Response for MockTransport whose body still has to be streamed."""
    data = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    return httpx.Response(status, headers=headers, stream=_Body(data))


@dataclass
class JwksEndpoint:
    """An in-process JWKS (and discovery) endpoint for httpx.MockTransport."""

    keys: dict[str, Any] = field(default_factory=lambda: jwks(public_jwk(rsa_key(), "k1")))
    cache_control: str | None = "max-age=600"
    fail: bool = False
    status: int = 200
    metadata_issuer: str = ISSUER
    requests: list[str] = field(default_factory=list)
    on_request: Callable[[], None] | None = None

    @property
    def jwks_fetches(self) -> int:
        return sum(1 for url in self.requests if url.endswith("jwks.json"))

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        if self.on_request is not None:
            self.on_request()
        if self.fail:
            raise httpx.ConnectError("down", request=request)
        path = request.url.path
        if path.endswith("openid-configuration"):
            return streamed(200, {"issuer": self.metadata_issuer, "jwks_uri": JWKS_URL})
        if path.endswith("jwks.json"):
            headers = {"cache-control": self.cache_control} if self.cache_control else {}
            return streamed(self.status, self.keys, headers)
        return streamed(404)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def verifier_options(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_url": JWKS_URL,
        "clock": clock,
    }
    options.update(overrides)
    return options


@contextlib.contextmanager
def refused(reason: str, match: str | None = None) -> Iterator[pytest.ExceptionInfo[Any]]:
    """Expect a VerificationError with this stable ``reason`` (and, if given, message text).

    Tests read the reason, which is API; ``match`` is only for messages whose wording is
    itself the point (a hint that says what to do).
    """
    with pytest.raises(VerificationError, match=match) as caught:
        yield caught
    assert caught.value.reason == reason, f"{caught.value.reason}: {caught.value}"
