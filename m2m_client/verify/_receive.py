"""The receiving core every integration shares: which status, which challenge, which headers.

FastAPI's ``JWTBearer``, the ASGI middleware, Flask and Django only read the request and
render what this module decides: a :class:`Refusal` (status, detail, headers) for every
way a request can fail, the ``Authorization`` header rule, and the URL a DPoP proof must
name. Nothing here imports a web framework.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from m2m_client.errors import (
    ConfigurationError,
    DPoPNonceRequired,
    InsufficientPermissions,
    ReplayCacheUnavailable,
    VerificationError,
)

from ._claims import Claims, names
from ._proof import request_url
from ._verifier import AsyncTokenVerifier, TokenVerifier
from ._www_authenticate import Challenges

__all__ = [
    "Gate",
    "PublicPaths",
    "Refusal",
    "Rights",
    "asgi_url",
    "environ_url",
    "verifier_from_config",
]

logger = logging.getLogger("m2m_client.verify")


class Refusal(Exception):
    """An HTTP answer refusing the request: ``status``, a ``detail`` and ``headers``.

    ``detail`` and the headers never repeat the token.
    """

    def __init__(self, status: int, detail: str, headers: Mapping[str, str]) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers)

    def body(self) -> bytes:
        """The JSON body every integration sends: ``{"detail": "..."}``."""
        import json

        return json.dumps({"detail": self.detail}).encode()


class Rights:
    """What a route demands (scopes, permissions, roles), checked once at definition."""

    __slots__ = ("permissions", "roles", "scopes")

    def __init__(
        self,
        scopes: str | Iterable[str] = (),
        permissions: str | Iterable[str] = (),
        roles: str | Iterable[str] = (),
    ) -> None:
        # A bare string is one permission or role (roles="admin" must not demand the roles
        # a, d, m, i, n); scopes are space-delimited as in OAuth. A wrong type fails here.
        self.scopes = names(scopes, "scopes", split=True)
        self.permissions = names(permissions, "permissions")
        self.roles = names(roles, "roles")

    def granted(self, claims: Claims) -> bool:
        return (
            claims.scopes.issuperset(self.scopes)
            and claims.permissions.issuperset(self.permissions)
            and claims.roles.issuperset(self.roles)
        )


class Gate:
    """Decisions of the receiving side, for one verifier: every integration holds one.

    ``resource_metadata``: the URL of the RFC 9728 protected-resource metadata, named in
    every challenge (``resource_metadata="..."``, RFC 9728 §5.1).
    """

    def __init__(
        self,
        verifier: AsyncTokenVerifier | TokenVerifier,
        *,
        resource_metadata: str | None = None,
    ) -> None:
        if not isinstance(verifier, (AsyncTokenVerifier, TokenVerifier)):
            raise ConfigurationError("verifier must be a TokenVerifier or AsyncTokenVerifier")
        self.verifier = verifier
        self.challenges = Challenges(resource_metadata)

    # --- the request ------------------------------------------------------------------

    def authorization(self, values: Sequence[str | bytes]) -> tuple[str, str] | None:
        """(lower-cased scheme, credentials) of the one Authorization header, or None.

        ``values``: every ``Authorization`` value the request carried. More than one is a
        malformed request (RFC 6750 §3.1): picking one would let a proxy and the app
        disagree on the caller. (A WSGI server folds several into one value joined by
        commas, which no token matches: the verifier refuses it, 401 ``invalid_token``.)
        None for no credentials, or a scheme this verifier's
        policy does not speak (RFC 6750 §3.1: no error code then).
        """
        if not values:
            return None
        if len(values) > 1:
            raise self.malformed()
        raw = values[0]
        value = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        scheme, _, credentials = value.strip().partition(" ")
        credentials = credentials.strip()
        if not credentials:
            return None
        scheme = scheme.lower()
        if scheme == "bearer" or (scheme == "dpop" and self.verifier.dpop != "disabled"):
            return scheme, credentials
        return None

    def cached_bearer(self, value: str | None) -> Claims | None:
        """The claims of the one ``Authorization: Bearer <token>`` value if its token's
        verdict is cached and the policy takes it as is; else None (then the full path).

        Only a case :meth:`authorization` would take as ``("bearer", token)``: the caller
        passes None when the request had more than one header.
        """
        if value is None or value[:7] != "Bearer ":
            return None
        token = value[7:].strip()
        return self.verifier.cached_bearer(token) if token else None

    def malformed(self) -> Refusal:
        return Refusal(
            400,
            "Send exactly one Authorization header.",
            {"WWW-Authenticate": self.challenges.bearer(("error", "invalid_request"))},
        )

    # --- the answers --------------------------------------------------------------------

    def no_token_challenge(self) -> str:
        return self.challenges.no_token(self.verifier.dpop, self._algs())

    def _algs(self) -> str:
        return self.verifier.dpop_checker.settings.algs_parameter

    def missing(self) -> Refusal:
        """401 for a request without (usable) credentials."""
        how = "DPoP" if self.verifier.dpop == "required" else "Bearer"
        return Refusal(
            401,
            f"Not authenticated: send an access token as 'Authorization: {how} <token>'",
            {"WWW-Authenticate": self.no_token_challenge()},
        )

    def refusal(self, exc: VerificationError | ConfigurationError, scheme: str) -> Refusal:
        """The answer to a verification that raised ``exc`` (``scheme`` the one used)."""
        if isinstance(exc, ConfigurationError):
            # The API's own configuration (e.g. an issuer the metadata contradicts): the
            # operator must fix it, the caller cannot; the details are in the log. A 503
            # without Retry-After (the service cannot serve, and says so; a 500 would read
            # as a crash), never an answer that blames the caller's token.
            logger.error("token verification is misconfigured: %s", exc)
            return Refusal(
                503, "The API's token verification is misconfigured; its operator must fix it.", {}
            )
        message = str(exc)
        policy = self.verifier.dpop
        use_dpop = policy == "required" or (policy == "allowed" and scheme == "dpop")
        if exc.reason == "insufficient_rights" and isinstance(exc, InsufficientPermissions):
            value = self.challenges.insufficient_scope(
                use_dpop, self._algs(), message, exc.missing_scopes
            )
            return Refusal(403, message, {"WWW-Authenticate": value})
        if exc.reason == "keys_unavailable":
            retry = max(1, math.ceil(self.verifier.retry_after()))
            return Refusal(
                503,
                "The issuer's signing keys (JWKS) are temporarily unavailable; retry later.",
                {"Retry-After": str(retry), "WWW-Authenticate": self.no_token_challenge()},
            )
        if isinstance(exc, ReplayCacheUnavailable):
            # The proof could not be checked, not found bad: a 401 would blame the client.
            return Refusal(
                503,
                "The API cannot check DPoP proofs for replay right now; retry later.",
                {"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
            )
        headers: dict[str, str] = {}
        if policy != "disabled" and isinstance(exc, DPoPNonceRequired):
            headers["DPoP-Nonce"] = exc.nonce
        headers["WWW-Authenticate"] = self.challenges.invalid(exc, policy, use_dpop, self._algs())
        return Refusal(401, message, headers)

    def check(self, claims: Claims | None, rights: Rights) -> Claims:
        """``claims`` if they grant ``rights``; a 401 without claims, a 403 naming what lacks."""
        if claims is None:
            raise self.missing()
        if rights.granted(claims):
            return claims
        try:
            self.verifier.check(
                claims, scopes=rights.scopes, permissions=rights.permissions, roles=rights.roles
            )
        except InsufficientPermissions as exc:
            dpop = self.verifier.dpop != "disabled" and "jkt" in (claims.get("cnf") or {})
            raise self.refusal(exc, "dpop" if dpop else "bearer") from None
        return claims  # pragma: no cover - granted() and check() agree

    def success_headers(self, scheme: str) -> list[tuple[str, str]]:
        """Headers of a served answer: RFC 9449 §9's fresh ``DPoP-Nonce`` for a DPoP request."""
        if scheme != "dpop":
            return []
        nonces = self.verifier.dpop_checker.nonces
        if nonces is None:
            return []
        return [("DPoP-Nonce", nonces.current(self.verifier.now()))]

    # --- verification -------------------------------------------------------------------

    async def verify_async(
        self, found: tuple[str, str], proofs: list[str], method: str, url: Any
    ) -> Claims:
        """Verify with an :class:`AsyncTokenVerifier`; ``url()`` is called for DPoP only."""
        verifier = self.verifier
        assert isinstance(verifier, AsyncTokenVerifier)
        scheme, token = found
        try:
            if scheme == "bearer":
                claims = verifier.cached_bearer(token)
                if claims is not None:
                    return claims
                return await verifier.verify(token)
            return await verifier.verify(token, dpop_proof=proofs, method=method, url=url())
        except (VerificationError, ConfigurationError) as exc:
            raise self.refusal(exc, scheme) from None

    def verify_sync(
        self, found: tuple[str, str], proofs: list[str], method: str, url: Any
    ) -> Claims:
        """Verify with a :class:`TokenVerifier` (thread-safe); ``url()`` for DPoP only."""
        verifier = self.verifier
        assert isinstance(verifier, TokenVerifier)
        scheme, token = found
        try:
            if scheme == "bearer":
                return verifier.verify(token)
            return verifier.verify(token, dpop_proof=proofs, method=method, url=url())
        except (VerificationError, ConfigurationError) as exc:
            raise self.refusal(exc, scheme) from None


def asgi_url(scope: Mapping[str, Any], *, trust_forwarded: bool = False) -> str:
    """The URL an ASGI request was sent to, as its DPoP proof's ``htu`` should name it."""
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
    # raw_path is the path as it came over the wire (what the client signed); without it,
    # the mount prefix and the decoded path, escaped again.
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
        trust_forwarded=trust_forwarded,
    )


def environ_url(environ: Mapping[str, Any], *, trust_forwarded: bool = False) -> str:
    """The URL a WSGI request (or Django ``request.META``) was sent to, for ``htu``."""
    host = environ.get("HTTP_HOST")
    if not host:
        host = f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"

    # WSGI paths are the wire bytes decoded as latin-1 (PEP 3333): encode them back.
    def wire(value: str) -> str:
        return quote(value.encode("latin-1", "replace"), safe="/:@!$&'()*+,;=-._~%")

    # The request target as sent, where the server keeps it (gunicorn, Werkzeug: RAW_URI or
    # REQUEST_URI): what the client signed, %2F and lower-case escapes included.
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if isinstance(raw, str) and raw.startswith("/"):
        path, root_path = raw.partition("?")[0], ""
    else:
        path = wire(environ.get("PATH_INFO", "") or "/")
        root_path = wire(environ.get("SCRIPT_NAME", ""))
    return request_url(
        scheme=environ.get("wsgi.url_scheme", "http"),
        host=host,
        path=path,
        root_path=root_path,
        forwarded_proto=environ.get("HTTP_X_FORWARDED_PROTO"),
        forwarded_host=environ.get("HTTP_X_FORWARDED_HOST"),
        trust_forwarded=trust_forwarded,
    )


class PublicPaths:
    """Paths served without a token: ``"/health"`` is that path exactly; an entry ending
    in ``/`` (``"/static/"``) is every path under it.

    A path with an empty, ``.`` or ``..`` segment is never public by prefix: a router or
    proxy that normalises ``/static/../admin`` must not reach ``/admin`` unauthenticated.
    """

    __slots__ = ("exact", "prefixes")

    def __init__(self, paths: str | Iterable[str]) -> None:
        listed = names(paths, "public_paths")
        if not all(p.startswith("/") for p in listed):
            raise ConfigurationError("public_paths must start with '/'")
        self.exact = frozenset(p for p in listed if not p.endswith("/") or p == "/")
        self.prefixes = tuple(p for p in listed if p.endswith("/") and p != "/")

    def __contains__(self, path: str) -> bool:
        if path in self.exact:
            return True
        if not self.prefixes or not path.startswith(self.prefixes):
            return False
        return (
            "//" not in path
            and "/./" not in path
            and "/../" not in path
            and not (path.endswith(("/.", "/..")))
        )


def verifier_from_config(config: Any) -> TokenVerifier:
    """A TokenVerifier from ``M2M_ISSUER``, ``M2M_AUDIENCE`` and optional ``M2M_ROLES_CLAIM``
    and ``M2M_DPOP`` (Flask's ``app.config`` or Django's settings)."""
    issuer = config.get("M2M_ISSUER")
    audience = config.get("M2M_AUDIENCE")
    if not issuer or not audience:
        raise ConfigurationError("set M2M_ISSUER and M2M_AUDIENCE, or pass verifier=")
    options: dict[str, Any] = {"issuer": issuer, "audience": audience}
    if config.get("M2M_ROLES_CLAIM"):
        options["roles_claim"] = config.get("M2M_ROLES_CLAIM")
    if config.get("M2M_DPOP"):
        options["dpop"] = config.get("M2M_DPOP")
    return TokenVerifier(**options)
