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
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPBearer, SecurityScopes

from m2m_client.errors import (
    ConfigurationError,
    DPoPNonceRequired,
    DPoPProofError,
    InsufficientPermissions,
    ReplayCacheUnavailable,
    VerificationError,
)
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier
from m2m_client.verify._claims import names
from m2m_client.verify._dpop import request_url

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


def _challenge(
    error: str | None = None,
    description: str | None = None,
    scope: str = "",
    *,
    scheme: str = "Bearer",
    algs: str | None = None,
) -> str:
    params = []
    if error:
        params.append(f'error="{error}"')
    if description:
        params.append(f'error_description="{_escaped(description)}"')
    if scope:
        params.append(f'scope="{scope}"')
    if algs:
        params.append(f'algs="{algs}"')  # RFC 9449 §7.1, DPoP challenges only
    return f"{scheme} " + ", ".join(params) if params else scheme


def _granted(granted: frozenset[str], needed: list[str]) -> bool:
    """Whether every scope a route declares is granted; False sends it to the full check.

    True only where ``check`` would pass: each name hashable, a granted string, non-empty.
    """
    try:
        return granted.issuperset(needed) and "" not in needed
    except TypeError:  # an unhashable name: the full check refuses the configuration
        return False


def _insufficient(exc: InsufficientPermissions, scheme: str = "Bearer") -> str:
    """The 403 challenge: only scopes in ``scope=``; permissions and roles described."""
    scopes = [s for s in exc.missing_scopes if _SCOPE_TOKEN.fullmatch(s)]
    return _challenge("insufficient_scope", str(exc), " ".join(scopes)[:1000], scheme=scheme)


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
    ) -> None:
        super().__init__(
            bearerFormat="JWT", scheme_name=scheme_name, description=description, auto_error=False
        )
        self.verifier = verifier
        self.require_token = auto_error
        self.trust_forwarded = trust_forwarded
        self.request_url = request_url

    async def __call__(  # type: ignore[override]
        self, request: Request, security_scopes: SecurityScopes, response: Response
    ) -> Claims | None:
        found = self._authorization(request)
        claims = None
        if found is not None and found[0] == "bearer":
            # A repeated bearer token (most requests): its cached verdict, with no coroutine,
            # thread hop or proof machinery; every other case takes the full path below.
            claims = self.verifier._cached_bearer(found[1])
        elif found is not None and (found[0] != "dpop" or self.verifier.dpop == "disabled"):
            # RFC 6750 §3.1: no credentials we know at all -> no error code. The DPoP
            # scheme counts only where the verifier's policy speaks DPoP.
            found = None
        if found is None:
            if not self.require_token:
                return None
            how = "DPoP" if self.verifier.dpop == "required" else "Bearer"
            raise HTTPException(
                status_code=401,
                detail=f"Not authenticated: send an access token as 'Authorization: {how} <token>'",
                headers={"WWW-Authenticate": self._no_token_challenge()},
            )
        scheme, token = found
        try:
            if claims is None:
                claims = await self._verify(request, scheme, token)
            scopes = security_scopes.scopes
            if scopes and not _granted(claims.scopes, scopes):
                self.verifier.check(claims, scopes=scopes)  # raises, naming what is missing
        except VerificationError as exc:
            raise self._http_error(exc, scheme) from None
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
        if scheme == "dpop":
            nonces = self.verifier.dpop_checker.nonces
            if nonces is not None:
                # RFC 9449 §9: a fresh nonce with every answer, so the client's next proof
                # carries one still valid and it need not be challenged again.
                response.headers["DPoP-Nonce"] = nonces.current(self.verifier._core.clock())
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
                    headers={"WWW-Authenticate": self._no_token_challenge()},
                )
            if (
                claims.scopes.issuperset(needed_scopes)
                and claims.permissions.issuperset(needed_permissions)
                and claims.roles.issuperset(needed_roles)
            ):
                return claims  # the names were checked above, once; all are granted
            try:
                self.verifier.check(
                    claims, scopes=needed_scopes, permissions=needed_permissions, roles=needed_roles
                )
            except InsufficientPermissions as exc:
                dpop = self.verifier.dpop != "disabled" and "jkt" in (claims.get("cnf") or {})
                raise self._http_error(exc, "dpop" if dpop else "bearer") from None
            return claims

        return require_rights

    @staticmethod
    def _authorization(request: Request) -> tuple[str, str] | None:
        """(lower-cased scheme, credentials) of the one Authorization header, or None."""
        # The raw ASGI headers (names lowercased by the server): no Headers object per request.
        value = None
        for name, raw in request.scope["headers"]:
            if name == b"authorization":
                if value is not None:
                    # RFC 6750 §3.1: more than one way of sending credentials is a malformed
                    # request; picking one would let a proxy and the app disagree on the caller.
                    raise HTTPException(
                        status_code=400,
                        detail="Send exactly one Authorization header.",
                        headers={"WWW-Authenticate": _challenge("invalid_request")},
                    )
                value = raw
        if not value:
            return None
        scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
        credentials = credentials.strip()
        return (scheme.lower(), credentials) if credentials else None

    def _url(self, request: Request) -> str:
        """The URL the client sent the request to, as its proof's ``htu`` should name it."""
        if self.request_url is not None:
            return self.request_url(request)
        scope = request.scope
        host = forwarded_proto = forwarded_host = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"x-forwarded-proto":
                forwarded_proto = value.decode("latin-1")
            elif name == b"x-forwarded-host":
                forwarded_host = value.decode("latin-1")
        if host is None:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}" if server else ""
        raw = scope.get("raw_path")
        # raw_path is the path as it came over the wire (what the client signed); without
        # it, the mount prefix and the decoded path, escaped again.
        if raw:
            path, root_path = raw.decode("latin-1").partition("?")[0], ""
        else:
            path, root_path = quote(scope.get("path", "/")), quote(scope.get("root_path", ""))
        return request_url(
            scheme=scope.get("scheme", "http"),
            host=host,
            path=path,
            root_path=root_path,
            forwarded_proto=forwarded_proto,
            forwarded_host=forwarded_host,
            trust_forwarded=self.trust_forwarded,
        )

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
            cached = verifier._verify_cached(token, dpop_proof=proofs, method=method, url=url)
            if cached is not None:
                return cached
        return await run_in_threadpool(
            functools.partial(verifier.verify, dpop_proof=proofs, method=method, url=url), token
        )

    def _algs(self) -> str:
        return self.verifier.dpop_checker.settings.algs_parameter

    def _no_token_challenge(self) -> str:
        policy = self.verifier.dpop
        if policy == "disabled":
            return _challenge()
        dpop = _challenge(scheme="DPoP", algs=self._algs())
        return dpop if policy == "required" else f"Bearer, {dpop}"

    def _http_error(self, exc: VerificationError, scheme: str = "bearer") -> HTTPException:
        message = str(exc)
        policy = self.verifier.dpop
        use_dpop = policy == "required" or (policy == "allowed" and scheme == "dpop")
        if exc.reason == "insufficient_rights" and isinstance(exc, InsufficientPermissions):
            return HTTPException(
                status_code=403,
                detail=message,
                headers={"WWW-Authenticate": _insufficient(exc, "DPoP" if use_dpop else "Bearer")},
            )
        if exc.reason == "keys_unavailable":
            retry = max(1, math.ceil(self.verifier.retry_after()))
            return HTTPException(
                status_code=503,
                detail="The issuer's signing keys (JWKS) are temporarily unavailable; retry later.",
                headers={"Retry-After": str(retry), "WWW-Authenticate": self._no_token_challenge()},
            )
        if isinstance(exc, ReplayCacheUnavailable):
            # The proof could not be checked, not found bad: a 401 would blame the client.
            return HTTPException(
                status_code=503,
                detail="The API cannot check DPoP proofs for replay right now; retry later.",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
            )
        if policy == "disabled":
            return HTTPException(
                status_code=401,
                detail=message,
                headers={"WWW-Authenticate": _challenge("invalid_token", message)},
            )
        # RFC 9449 §7.1: the DPoP challenge names the error, and algs; under "allowed" the
        # other scheme is offered too, so either kind of client learns what to send.
        headers: dict[str, str] = {}
        code = exc.error_code if isinstance(exc, DPoPProofError) else "invalid_token"
        if isinstance(exc, DPoPNonceRequired):
            headers["DPoP-Nonce"] = exc.nonce
        if use_dpop or isinstance(exc, DPoPProofError):
            value = _challenge(code, message, scheme="DPoP", algs=self._algs())
            if policy == "allowed":
                value += ", Bearer"
        else:
            dpop = _challenge(scheme="DPoP", algs=self._algs())
            value = f"{_challenge('invalid_token', message)}, {dpop}"
        headers["WWW-Authenticate"] = value
        return HTTPException(status_code=401, detail=message, headers=headers)
