"""FastAPI integration: ``JWTBearer``, a bearer-token dependency backed by a verifier.

>>> auth = JWTBearer(AsyncTokenVerifier(issuer=..., audience=...))
>>> @app.get("/items")
... async def items(claims: Claims = Security(auth, scopes=["read:items"])): ...
>>> @app.get("/admin")
... async def admin(claims: Claims = Depends(auth.require(roles=["admin"]))): ...

Responses follow RFC 6750 §3: 401 with ``WWW-Authenticate: Bearer`` when no token was
sent, ``error="invalid_token"`` for a bad one, 403 ``error="insufficient_scope"`` for a
valid token lacking rights, and 503 (with ``Retry-After``) when the issuer's keys cannot
be fetched. Bodies and headers never repeat the token.

With a verifier whose ``dpop`` policy is ``"allowed"`` or ``"required"``, DPoP-bound tokens
(RFC 9449) come as ``Authorization: DPoP <token>`` with exactly one ``DPoP`` proof header,
checked against the request's method and URL; refusals use the ``DPoP`` challenge of
RFC 9449 §7.1 (``error="invalid_dpop_proof"``, ``"invalid_token"`` or ``"use_dpop_nonce"``
with a ``DPoP-Nonce`` header, and ``algs=``).
"""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime, and `x` is a local name there.

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPBearer, SecurityScopes

from m2m_client.errors import ConfigurationError, VerificationError
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier
from m2m_client.verify._receive import Gate, Refusal, Rights, asgi_url

__all__ = ["JWTBearer"]


def _granted(granted: frozenset[str], needed: list[str]) -> bool:
    """Whether every scope a route declares is granted; False sends it to the full check.

    True only where ``check`` would pass: each name hashable, a granted string, non-empty.
    """
    try:
        return granted.issuperset(needed) and "" not in needed
    except TypeError:  # an unhashable name: the full check refuses the configuration
        return False


class JWTBearer(HTTPBearer):
    """A FastAPI dependency that verifies the bearer token and returns its Claims.

    Works with :class:`AsyncTokenVerifier` (awaited) and :class:`TokenVerifier` (run in
    the thread pool, except for cached tokens). Appears in OpenAPI as an HTTP bearer
    scheme. With ``auto_error=False`` a request *without* a token gets ``None``; a
    request with a bad token is still refused.

    DPoP (the verifier's ``dpop`` policy): the proof's ``htu`` is compared with the URL
    the request was sent to, rebuilt from the ASGI scope (scheme, ``Host`` header, raw
    path). Behind a reverse proxy that terminates TLS or rewrites the host, run uvicorn
    with ``--proxy-headers`` for the scheme, or set ``trust_forwarded=True`` to take
    ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` -- only if the proxy overwrites them and
    clients cannot reach the app directly. ``request_url(request) -> str`` replaces the
    reconstruction entirely (a fixed public base URL, a stripped path prefix).

    ``resource_metadata``: the URL of this API's RFC 9728 metadata
    (:func:`m2m_client.protected_resource_metadata`), named in every challenge.
    """

    def __init__(
        self,
        verifier: AsyncTokenVerifier | TokenVerifier,
        *,
        auto_error: bool = True,
        scheme_name: str | None = None,
        description: str | None = None,
        trust_forwarded: bool = False,
        request_url: Callable[[Request], str] | None = None,
        resource_metadata: str | None = None,
    ) -> None:
        super().__init__(
            bearerFormat="JWT", scheme_name=scheme_name, description=description, auto_error=False
        )
        self.verifier = verifier
        self.require_token = auto_error
        self.trust_forwarded = trust_forwarded
        self.request_url = request_url
        self._gate = Gate(verifier, resource_metadata=resource_metadata)

    async def __call__(  # type: ignore[override]
        self, request: Request, security_scopes: SecurityScopes, response: Response
    ) -> Claims | None:
        found = self._authorization(request)
        claims = None
        if found is not None and found[0] == "bearer":
            # A repeated bearer token (most requests): its cached verdict, with no coroutine,
            # thread hop or proof machinery; every other case takes the full path below.
            claims = self.verifier.cached_bearer(found[1])
        if found is None:
            if not self.require_token:
                return None
            raise _http(self._gate.missing())
        scheme, token = found
        try:
            if claims is None:
                claims = await self._verify(request, scheme, token)
            scopes = security_scopes.scopes
            if scopes and not _granted(claims.scopes, scopes):
                self.verifier.check(claims, scopes=scopes)  # raises, naming what is missing
        except (VerificationError, ConfigurationError) as exc:
            raise _http(self._gate.refusal(exc, scheme)) from None
        for name, value in self._gate.success_headers(scheme):
            # RFC 9449 §9: a fresh nonce with every answer, so the client's next proof
            # carries one still valid and it need not be challenged again.
            response.headers[name] = value
        return claims

    def require(
        self,
        *,
        scopes: str | Iterable[str] = (),
        permissions: str | Iterable[str] = (),
        roles: str | Iterable[str] = (),
    ) -> Callable[..., Awaitable[Claims]]:
        """A dependency that also demands scopes, Auth0 permissions and/or roles.

        >>> Depends(auth.require(permissions=["read:dashboard"], roles=["admin"]))
        """
        rights = Rights(scopes, permissions, roles)  # checked now: wrong types fail at start-up

        async def require_rights(claims: Annotated[Claims | None, Depends(self)]) -> Claims:
            try:
                return self._gate.check(claims, rights)
            except Refusal as refusal:
                raise _http(refusal) from None

        return require_rights

    def _authorization(self, request: Request) -> tuple[str, str] | None:
        """(lower-cased scheme, credentials) of the one Authorization header, or None."""
        # The raw ASGI headers (names lowercased by the server): no Headers object per request.
        value = None
        several = False
        for name, raw in request.scope["headers"]:
            if name == b"authorization":
                several = value is not None
                value = raw
        if value is None:
            return None
        text = value.decode("latin-1")
        if not several and text[:7] == "Bearer ":
            # The common spelling, answered as the core answers it (one scan, no list).
            token = text[7:].strip()
            if token:
                return "bearer", token
        try:
            return self._gate.authorization([value, value] if several else [text])
        except Refusal as refusal:
            raise _http(refusal) from None

    def _url(self, request: Request) -> str:
        """The URL the client sent the request to, as its proof's ``htu`` should name it."""
        if self.request_url is not None:
            return self.request_url(request)
        return asgi_url(request.scope, trust_forwarded=self.trust_forwarded)

    async def _verify(self, request: Request, scheme: str, token: str) -> Claims:
        verifier = self.verifier
        if scheme == "dpop":
            # Every DPoP header: more than one is refused (RFC 9449 §4.3 step 1).
            proofs: list[str] | None = [
                v.decode("latin-1") for k, v in request.scope["headers"] if k == b"dpop"
            ]
            method: str | None = request.method
            url: str | None = self._url(request)
        else:
            proofs = method = url = None
        if isinstance(verifier, AsyncTokenVerifier):
            return await verifier.verify(token, dpop_proof=proofs, method=method, url=url)
        # Cached tokens are a dict lookup: not worth a thread hop -- unless a DPoP proof
        # goes to a replay cache that does I/O (Redis), which must not block the event loop.
        if proofs is None or not verifier.dpop_checker.replay_does_io:
            cached = verifier.verify_cached(token, dpop_proof=proofs, method=method, url=url)
            if cached is not None:
                return cached
        return await run_in_threadpool(
            functools.partial(verifier.verify, dpop_proof=proofs, method=method, url=url), token
        )


def _http(refusal: Refusal) -> HTTPException:
    return HTTPException(
        status_code=refusal.status, detail=refusal.detail, headers=refusal.headers or None
    )
