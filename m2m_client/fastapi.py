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

import math
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPBearer, SecurityScopes

from m2m_client.errors import InsufficientPermissions, KeySetUnavailable, VerificationError
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier

__all__ = ["JWTBearer"]

# RFC 6750 §3: error_description and scope values are restricted to these characters.
_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def _quoted(value: str, limit: int = 200) -> str:
    return _UNSAFE.sub("", value)[:limit]


def _challenge(error: str | None = None, description: str | None = None, scope: str = "") -> str:
    params = []
    if error:
        params.append(f'error="{error}"')
    if description:
        params.append(f'error_description="{_quoted(description)}"')
    if scope:
        params.append(f'scope="{_quoted(scope, 1000)}"')
    return "Bearer " + ", ".join(params) if params else "Bearer"


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
        return claims

    def require(
        self,
        *,
        scopes: Iterable[str] = (),
        permissions: Iterable[str] = (),
        roles: Iterable[str] = (),
    ) -> Callable[..., Awaitable[Claims]]:
        """A dependency that also demands scopes, Auth0 permissions and/or roles.

        >>> Depends(auth.require(permissions=["read:dashboard"], roles=["admin"]))
        """
        needed_scopes, needed_permissions, needed_roles = (
            tuple(scopes),
            tuple(permissions),
            tuple(roles),
        )

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
        header = request.headers.get("authorization")
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
        core = verifier._core
        cached = core.cached(token, core.clock())
        if cached is not None:
            return cached
        return await run_in_threadpool(verifier.verify, token)

    def _http_error(self, exc: VerificationError) -> HTTPException:
        message = str(exc)
        if isinstance(exc, InsufficientPermissions):
            return HTTPException(
                status_code=403,
                detail=message,
                headers={
                    "WWW-Authenticate": _challenge(
                        "insufficient_scope", message, " ".join(exc.required)
                    )
                },
            )
        if isinstance(exc, KeySetUnavailable):
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
