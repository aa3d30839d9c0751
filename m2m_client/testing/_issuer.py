"""LocalIssuer: a small OAuth 2.0 authorization server for tests and demos.

**Not for production.** It keeps its keys and clients in memory, has no persistence, no rate
limiting and no admin API. It exists so that a user can run the whole client-credentials flow,
and test a protected service, without an Auth0 (or any other) account.

It still follows the specs a real server follows, so that code tested against it behaves the
same against a real one: RFC 6749, RFC 7523, RFC 8414 / OpenID Connect Discovery, RFC 7517 /
RFC 7638 and RFC 9068. One concern per module: ``_keys`` (signing keys and the JWKS),
``_clients`` (registered clients and client authentication), ``_token_endpoint`` (the grant),
``_server`` (the HTTP server and httpx transport shells). This module is the facade: settings,
minting, discovery metadata, and :meth:`LocalIssuer.handle_request`, the one request handler
(no I/O) behind both shells.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from m2m_client.errors import ConfigurationError
from m2m_client.testing._clients import AUTH_METHODS, ClientRegistry, IssuerClients
from m2m_client.testing._keys import Algorithm, KeyRing
from m2m_client.testing._minting import IssuerMinting
from m2m_client.testing._responses import IssuerResponse, json_response
from m2m_client.testing._server import IssuerServing, LoopbackServer
from m2m_client.testing._token_endpoint import IssuerTokenEndpoint, TokenEndpoint
from m2m_client.verify._proof import DEFAULT_DPOP_ALGORITHMS

__all__ = ["IssuerResponse", "LocalIssuer"]

# Settings a test may change on a shared issuer; the pytest plugin restores them after each test.
_SETTINGS = (
    "algorithm",
    "audience",
    "token_lifetime",
    "jwks_max_age",
    "typ",
    "max_body_bytes",
    "dpop_nonce",
)


class LocalIssuer(IssuerServing, IssuerMinting, IssuerClients, IssuerTokenEndpoint):
    """A development authorization server: keys, discovery, JWKS and a client_credentials endpoint.

    A test and demo tool, not a production server (keys and clients live in memory). Tokens
    are JWTs (RFC 9068) with ``iss``, ``sub`` (``"<client_id>@clients"`` like Auth0), ``aud``,
    ``iat``, ``exp``, ``jti``, ``scope``, ``azp``, ``client_id``, Auth0's ``permissions`` and
    roles under :attr:`roles_claim` (by default ``f"{audience}/roles"``, Auth0's namespaced
    claim; a dotted ``roles_claim="realm_access.roles"`` nests it as Keycloak does).

    >>> issuer = LocalIssuer()
    >>> issuer.add_client("worker", "s3cret", scope="read:data", roles=["admin"])
    >>> with issuer:                      # real HTTP server on 127.0.0.1, on a free port
    ...     token_url = issuer.token_url
    >>> http = httpx.Client(transport=issuer.transport())     # or fully in-process

    ``url="http://127.0.0.1:9011/"`` fixes the address: the server binds that port or raises
    ConfigurationError. Any other ``url=`` is for in-process use through :meth:`transport`.

    DPoP (RFC 9449): a token request with a valid ``DPoP`` proof gets a token bound to the
    proof's key (``cnf.jkt``, ``token_type`` ``DPoP``); a bad or replayed proof gets 400
    ``invalid_dpop_proof``. ``dpop_nonce=True`` demands a server nonce in proofs (400
    ``use_dpop_nonce`` with a ``DPoP-Nonce`` header first).

    Federated client authentication (issue 21): ``trust=[(source, subject, client_id)]`` (or
    :meth:`add_trust`) accepts as ``client_id`` a client assertion another issuer signed for
    ``subject`` with ``aud`` this issuer (or its token endpoint), as Entra federated
    credentials and Keycloak 26.4 do. ``source``: that issuer's URL (its JWKS by discovery),
    another LocalIssuer, or a :class:`~m2m_client.testing.ProjectedTokenFile`.
    """

    def __init__(
        self,
        algorithm: Algorithm = "RS256",
        *,
        url: str | None = None,
        audience: str = "https://api.example.com",
        roles_claim: str | None = None,
        token_lifetime: int = 3600,
        jwks_max_age: int = 300,
        typ: str | None = "at+jwt",
        max_body_bytes: int = 16 * 1024,
        clock: Callable[[], float] = time.time,
        dpop_nonce: bool = False,
        trust: Iterable[tuple[Any, str, str]] = (),
    ) -> None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"LocalIssuer url must be an http(s) URL, not {url!r}")
        self.audience = audience
        self.token_lifetime = token_lifetime
        self.jwks_max_age = jwks_max_age
        self.typ = typ
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        #: Demand a server nonce in DPoP proofs at the token endpoint (RFC 9449 §8).
        self.dpop_nonce = dpop_nonce
        self._roles_claim = roles_claim
        self._fixed_url = None if url is None else url.rstrip("/") + "/"
        self._keys = KeyRing(algorithm)
        self.algorithm: Algorithm = self._keys.current.algorithm
        self._clients = ClientRegistry(lambda: self.clock())
        self._token_endpoint = TokenEndpoint(self, self._clients)
        for source, subject, client_id in trust:
            self.add_trust(source, subject, client_id)
        self._server = LoopbackServer(self.handle_request, lambda: self.max_body_bytes)
        self._lock = threading.Lock()
        #: Requests for the JWKS document.
        self.jwks_requests = 0
        #: Requests for either discovery document.
        self.metadata_requests = 0

    def __repr__(self) -> str:
        where = self._url_or_none() or "not running"
        return f"<LocalIssuer {self.algorithm} kid={self.kid} {where} clients={len(self._clients)}>"

    def metadata(self) -> dict[str, Any]:
        """The discovery document (same content for OIDC and RFC 8414)."""
        scopes = sorted({s for client in self._clients.all() for s in client.scopes})
        return {
            "issuer": self.url,
            "token_endpoint": self.token_url,
            "jwks_uri": self.jwks_url,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
            "scopes_supported": scopes,
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": self._keys.algorithms,
            "dpop_signing_alg_values_supported": sorted(DEFAULT_DPOP_ALGORITHMS),
        }

    # --- the request handler (no I/O) ----------------------------------------------------

    def handle_request(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> IssuerResponse:
        """Answer one HTTP request; the single handler behind the server and the transport.

        ``target`` is the request path (a query string is ignored); header names are matched
        case-insensitively.
        """
        path = urllib.parse.urlsplit(target).path or "/"
        lowered = {name.lower(): value for name, value in headers.items()}
        prefix = urllib.parse.urlsplit(self.url).path.rstrip("/")
        routes: dict[str, tuple[str, Callable[[], IssuerResponse]]] = {
            f"{prefix}/.well-known/openid-configuration": ("GET", self._metadata_response),
            f"/.well-known/oauth-authorization-server{prefix}": ("GET", self._metadata_response),
            f"{prefix}/.well-known/jwks.json": ("GET", self._jwks_response),
            f"{prefix}/jwks.json": ("GET", self._jwks_response),
            f"{prefix}/oauth/token": ("POST", lambda: self._token_endpoint.respond(lowered, body)),
        }
        if path not in routes:
            payload = {"error": "not_found", "error_description": f"no route {path}"}
            return json_response(404, payload)
        allowed, respond = routes[path]
        if method.upper() != allowed:
            return json_response(405, {"error": "method_not_allowed"}, Allow=allowed)
        return respond()

    def _metadata_response(self) -> IssuerResponse:
        with self._lock:
            self.metadata_requests += 1
        return json_response(200, self.metadata(), **{"Cache-Control": "public, max-age=3600"})

    def _jwks_response(self) -> IssuerResponse:
        with self._lock:
            self.jwks_requests += 1
        cache = {"Cache-Control": f"public, max-age={self.jwks_max_age}"}
        return json_response(200, self.jwks(), **cache)

    # --- state a shared (session) issuer restores between tests ----------------------------

    def _save_state(self) -> tuple[Any, ...]:
        settings = {name: getattr(self, name) for name in _SETTINGS}
        return (
            settings,
            self.clock,
            self._roles_claim,
            self._keys.snapshot(),
            self._clients.snapshot(),
        )

    def _restore_state(self, state: tuple[Any, ...]) -> None:
        settings, self.clock, self._roles_claim, keys, clients = state
        for name, value in settings.items():
            setattr(self, name, value)
        self._keys.restore(keys)
        self._clients.restore(clients)
        self.clear_failures()
        self.reset_counters()
