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
"""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime, and `x` is a local name there.

import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPBearer, SecurityScopes

from m2m_client.errors import (
    ConfigurationError,
    InsufficientPermissions,
    VerificationError,
)
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier
from m2m_client.verify._claims import names

__all__ = ["JWTBearer"]

logger = logging.getLogger("m2m_client.verify")

# RFC 6750 §3: error_description and scope values are restricted to these characters.
_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
# RFC 6749 §3.3: a scope token; names that are not one cannot go in scope="...".
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _escaped(value: str, limit: int = 300) -> str:
    """``value`` with the characters RFC 6750 forbids percent-encoded, never dropped."""
    out = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _challenge(error: str | None = None, description: str | None = None, scope: str = "") -> str:
    params = []
    if error:
        params.append(f'error="{error}"')
    if description:
        params.append(f'error_description="{_escaped(description)}"')
    if scope:
        params.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(params) if params else "Bearer"


def _insufficient(exc: InsufficientPermissions) -> str:
    """The 403 challenge: only scopes in ``scope=``; permissions and roles described."""
    scopes = [s for s in exc.missing_scopes if _SCOPE_TOKEN.fullmatch(s)]
    return _challenge("insufficient_scope", str(exc), " ".join(scopes)[:1000])


class JWTBearer(HTTPBearer):
    """A FastAPI dependency that verifies the bearer token and returns its Claims.

    Works with :class:`AsyncTokenVerifier` (awaited) and :class:`TokenVerifier` (run in
    the thread pool, except for cached tokens). Appears in OpenAPI as an HTTP bearer
    scheme. With ``auto_error=False`` a request *without* a token gets ``None``; a
    request with a bad token is still refused.
    """

    def __init__(
        self,
        verifier: AsyncTokenVerifier | TokenVerifier,
        *,
        auto_error: bool = True,
        scheme_name: str | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__(
            bearerFormat="JWT", scheme_name=scheme_name, description=description, auto_error=False
        )
        self.verifier = verifier
        self.require_token = auto_error

    async def __call__(  # type: ignore[override]
        self, request: Request, security_scopes: SecurityScopes
    ) -> Claims | None:
        token = self._token_from(request)
        if token is None:
            if not self.require_token:
                return None
            raise HTTPException(
                status_code=401,
                detail="Not authenticated: send an access token as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": _challenge()},
            )
        try:
            claims = await self._verify(token)
            if security_scopes.scopes:
                self.verifier.check(claims, scopes=security_scopes.scopes)
        except VerificationError as exc:
            raise self._http_error(exc) from None
        except ConfigurationError as exc:
            # The API's own configuration (e.g. an issuer the metadata contradicts): the
            # operator must fix it, the caller cannot; the details are in the log. A 503
            # without Retry-After (the service cannot serve, and says so; a 500 would
            # read as a crash), never an answer that blames the caller's token.
            logger.error("token verification is misconfigured: %s", exc)
            raise HTTPException(
                status_code=503,
                detail="The API's token verification is misconfigured; its operator must fix it.",
            ) from None
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
        # A bare string is one permission or role (roles="admin" must not demand the
        # roles a, d, m, i, n); scopes are space-delimited as in OAuth. Checked here, at
        # route definition, so a wrong type fails at start-up, not per request.
        needed_scopes = names(scopes, "scopes", split=True)
        needed_permissions = names(permissions, "permissions")
        needed_roles = names(roles, "roles")

        async def require_rights(claims: Annotated[Claims | None, Depends(self)]) -> Claims:
            if claims is None:
                raise HTTPException(
                    status_code=401,
                    detail="Not authenticated",
                    headers={"WWW-Authenticate": _challenge()},
                )
            try:
                self.verifier.check(
                    claims, scopes=needed_scopes, permissions=needed_permissions, roles=needed_roles
                )
            except InsufficientPermissions as exc:
                raise self._http_error(exc) from None
            return claims

        return require_rights

    @staticmethod
    def _token_from(request: Request) -> str | None:
        # The raw ASGI headers (names lowercased by the server): no Headers object per request.
        headers = [v for k, v in request.scope["headers"] if k == b"authorization"]
        if len(headers) > 1:
            # RFC 6750 §3.1: more than one way of sending credentials is a malformed
            # request; picking one would let a proxy and the app disagree on the caller.
            raise HTTPException(
                status_code=400,
                detail="Send exactly one Authorization header.",
                headers={"WWW-Authenticate": _challenge("invalid_request")},
            )
        header = headers[0].decode("latin-1") if headers else ""
        if not header:
            return None
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None  # RFC 6750 §3.1: no bearer credentials at all -> no error code
        credentials = credentials.strip()
        return credentials or None

    async def _verify(self, token: str) -> Claims:
        verifier = self.verifier
        if isinstance(verifier, AsyncTokenVerifier):
            return await verifier.verify(token)
        # Cached tokens are a dict lookup: not worth a thread hop.
        cached = verifier._verify_cached(token)
        if cached is not None:
            return cached
        return await run_in_threadpool(verifier.verify, token)

    def _http_error(self, exc: VerificationError) -> HTTPException:
        message = str(exc)
        if exc.reason == "insufficient_rights" and isinstance(exc, InsufficientPermissions):
            return HTTPException(
                status_code=403,
                detail=message,
                headers={"WWW-Authenticate": _insufficient(exc)},
            )
        if exc.reason == "keys_unavailable":
            retry = max(1, math.ceil(self.verifier.retry_after()))
            return HTTPException(
                status_code=503,
                detail="The issuer's signing keys (JWKS) are temporarily unavailable; retry later.",
                headers={"Retry-After": str(retry), "WWW-Authenticate": _challenge()},
            )
        return HTTPException(
            status_code=401,
            detail=message,
            headers={"WWW-Authenticate": _challenge("invalid_token", message)},
        )
