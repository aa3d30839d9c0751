"""Receiving side: verify OAuth 2.0 JWT access tokens (RFC 9068) against an issuer's JWKS.

>>> from m2m_client.verify import AsyncTokenVerifier
>>> verifier = AsyncTokenVerifier(issuer="https://tenant.example.com/",
...                               audience="https://api.example.com")
>>> claims = await verifier.verify(token)
>>> claims.subject, claims.scopes, claims.permissions, claims.roles

Amazon Cognito access tokens have no ``aud``: skip that check explicitly and pin the token
use and app client instead (``audience=None`` without ``expected_claims`` is refused):

>>> AsyncTokenVerifier(issuer="https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC",
...                    audience=None,
...                    expected_claims={"token_use": "access", "client_id": ["<app-client>"]})

DPoP-bound tokens (RFC 9449): ``dpop="allowed"`` or ``"required"``, and the request's proof:

>>> verifier = AsyncTokenVerifier(issuer=..., audience=..., dpop="required")
>>> claims = await verifier.verify(token, dpop_proof=request.headers.get_list("dpop"),
...                                method="GET", url="https://api.example.com/data")
"""

from __future__ import annotations

from ._claims import Claims
from ._proof import (
    AsyncReplayCache,
    DPoPChecker,
    DPoPPolicy,
    DPoPSettings,
    HmacNonceSource,
    MemoryReplayCache,
    NonceSource,
    ReplayCache,
    dpop_challenge,
    request_url,
)
from ._verifier import AsyncTokenVerifier, TokenVerifier

__all__ = [
    "AsyncReplayCache",
    "AsyncTokenVerifier",
    "Claims",
    "DPoPChecker",
    "DPoPPolicy",
    "DPoPSettings",
    "HmacNonceSource",
    "MemoryReplayCache",
    "NonceSource",
    "ReplayCache",
    "TokenVerifier",
    "dpop_challenge",
    "request_url",
]
