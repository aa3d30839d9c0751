"""LocalIssuer: a small OAuth 2.0 authorization server for tests and demos.

**Not for production.** It keeps its keys and clients in memory, has no persistence, no rate
limiting and no admin API. It exists so that a user can run the whole client-credentials flow,
and test a protected service, without an Auth0 (or any other) account.

It still follows the specs a real server follows, so that code tested against it behaves the
same against a real one: RFC 6749 §2.3.1 / §4.4 / §5 (client authentication, the
client_credentials grant, token and error responses), RFC 7523 (``private_key_jwt``),
RFC 8414 and OpenID Connect Discovery (metadata), RFC 7517 / RFC 7638 (JWKS, ``kid``
thumbprints) and RFC 9068 (JWT access tokens).

Request handling is written once, in :meth:`LocalIssuer.handle_request` (no I/O: method, target,
headers and body in; status, headers and body out). The stdlib HTTP server and the httpx
``MockTransport`` are thin shells around it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.server
import json
import logging
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple

import anyio.to_thread
import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from m2m_client.errors import ConfigurationError

__all__ = ["IssuerResponse", "LocalIssuer"]

logger = logging.getLogger("m2m_client.testing")

Algorithm = Literal["RS256", "ES256"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
_FORM_TYPE = "application/x-www-form-urlencoded"
_DRAIN_LIMIT = 1024 * 1024
_JSON_TYPE = "application/json"


class IssuerResponse(NamedTuple):
    """What :meth:`LocalIssuer.handle_request` answers: status, headers and body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class _SigningKey:
    kid: str
    algorithm: Algorithm
    private_key: PrivateKey
    public_jwk: dict[str, Any]


@dataclass
class _Client:
    client_id: str
    secret: str | None
    public_key: Any
    audiences: tuple[str, ...]
    scopes: tuple[str, ...]
    permissions: tuple[str, ...] | None
    roles: tuple[str, ...]
    subject: str
    auth_methods: tuple[str, ...]
    grant_types: tuple[str, ...]
    expires_in: int | None
    extra_claims: dict[str, Any] = field(default_factory=dict)


class _OAuthError(Exception):
    """An RFC 6749 §5.2 error response, raised inside the token endpoint and turned into JSON."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    # RFC 7638: SHA-256 over the required members only, sorted, no whitespace.
    required = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def _generate_key(algorithm: str) -> _SigningKey:
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
    kid = _thumbprint(jwk)
    jwk.update(kid=kid, alg=alg, use="sig")
    return _SigningKey(kid=kid, algorithm=alg, private_key=private_key, public_jwk=jwk)


def _json(status: int, payload: Mapping[str, Any], **headers: str) -> IssuerResponse:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return IssuerResponse(status, {"Content-Type": _JSON_TYPE, **headers}, body)


def _words(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split())
    return tuple(value)


def _single_params(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("ascii")
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _OAuthError("invalid_request", "the body is not valid form-urlencoded data") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        # RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once."
        if name in params:
            raise _OAuthError("invalid_request", f"parameter {name!r} is repeated")
        params[name] = value
    return params


class LocalIssuer:
    """A development authorization server: keys, discovery, JWKS and a client_credentials endpoint.

    A test and demo tool, not a production server (keys and clients live in memory). Tokens
    are JWTs (RFC 9068) with ``iss``, ``sub`` (``"<client_id>@clients"`` like Auth0), ``aud``,
    ``iat``, ``exp``, ``jti``, ``scope``, ``azp``, ``client_id``, Auth0's ``permissions`` and
    roles under :attr:`roles_claim` (by default ``f"{audience}/roles"``, the namespaced claim of
    Auth0's guides; pass ``roles_claim=`` to use another name).

    >>> issuer = LocalIssuer()
    >>> issuer.add_client("worker", "s3cret", audience="https://api.example.com",
    ...                   scope="read:data", roles=["admin"])
    >>> with issuer:                      # real HTTP server on 127.0.0.1, on a free port
    ...     token_url = issuer.token_url
    >>> http = httpx.Client(transport=issuer.transport())     # or fully in-process

    Without a running server, :attr:`url` is the ``url=`` given to the constructor (needed for
    in-process use through :meth:`transport`); a running server's own URL always wins.
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
    ) -> None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"LocalIssuer url must be an http(s) URL, not {url!r}")
        self.algorithm: Algorithm = algorithm
        self.audience = audience
        self.token_lifetime = token_lifetime
        self.jwks_max_age = jwks_max_age
        self.typ = typ
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self._roles_claim = roles_claim
        self._fixed_url = None if url is None else url.rstrip("/") + "/"
        self._keys = [_generate_key(algorithm)]
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()
        self._failures: list[IssuerResponse] = []
        self._seen_assertions: dict[str, float] = {}
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: Requests that reached the token endpoint (including refused and failed ones).
        self.token_requests = 0
        #: Tokens issued by the token endpoint (not counting :meth:`mint`).
        self.tokens_issued = 0
        #: Requests for the JWKS document.
        self.jwks_requests = 0
        #: Requests for either discovery document.
        self.metadata_requests = 0

    def __repr__(self) -> str:
        where = self._url_or_none() or "not running"
        return f"<LocalIssuer {self.algorithm} kid={self.kid} {where} clients={len(self._clients)}>"

    # --- configuration ---------------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        client_secret: str | None = None,
        *,
        audience: str | None = None,
        audiences: Sequence[str] | None = None,
        scope: str | Iterable[str] | None = None,
        permissions: Iterable[str] | None = None,
        roles: Iterable[str] = (),
        subject: str | None = None,
        public_key: Any = None,
        auth_methods: Iterable[str] | None = None,
        grant_types: Iterable[str] = ("client_credentials",),
        expires_in: int | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> None:
        """Register a client allowed to use the token endpoint.

        ``audiences`` (or one ``audience``; default the issuer's ``audience``) are the APIs it
        may ask for; the first one is used when the request names none. ``scope`` is what it may
        ask for (everything, when it asks for nothing, as Auth0 does). ``permissions`` default to
        the granted scopes. ``public_key`` (a cryptography public key or a JWK dict) enables
        ``private_key_jwt`` (RFC 7523). ``expires_in`` overrides the token lifetime.
        """
        if client_secret is None and public_key is None:
            raise ConfigurationError("add_client needs a client_secret or a public_key")
        if isinstance(public_key, Mapping):
            public_key = jwt.PyJWK(dict(public_key)).key
        allowed = tuple(audiences or ()) or ((audience or self.audience),)
        if auth_methods is None:
            methods: tuple[str, ...] = (
                ("client_secret_basic", "client_secret_post") if client_secret else ()
            )
            methods += ("private_key_jwt",) if public_key is not None else ()
        else:
            methods = tuple(auth_methods)
        unknown = set(methods) - set(_AUTH_METHODS)
        if unknown:
            raise ConfigurationError(f"unknown auth methods {sorted(unknown)}")
        if "private_key_jwt" in methods and public_key is None:
            raise ConfigurationError("private_key_jwt needs the client's public_key")
        client = _Client(
            client_id=client_id,
            secret=client_secret,
            public_key=public_key,
            audiences=allowed,
            scopes=_words(scope),
            permissions=None if permissions is None else tuple(permissions),
            roles=tuple(roles),
            subject=subject or f"{client_id}@clients",
            auth_methods=methods,
            grant_types=tuple(grant_types),
            expires_in=expires_in,
            extra_claims=dict(extra_claims or {}),
        )
        with self._lock:
            self._clients[client_id] = client

    def remove_client(self, client_id: str) -> None:
        """Forget a client (its next token request fails with ``invalid_client``)."""
        with self._lock:
            self._clients.pop(client_id, None)

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 503,
        error: str | None = None,
        error_description: str | None = None,
        retry_after: int | str | None = None,
    ) -> None:
        """Make the next ``count`` token requests fail, for retry and outage tests.

        With ``error`` the body is an RFC 6749 §5.2 JSON error; without it a 5xx gets a plain
        text body, as a proxy or load balancer would send. ``retry_after`` sets ``Retry-After``.
        """
        headers: dict[str, str] = {"Cache-Control": "no-store"}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if error is not None:
            payload = {"error": error}
            if error_description:
                payload["error_description"] = error_description
            failure = _json(status, payload, **headers)
        else:
            headers["Content-Type"] = "text/plain; charset=utf-8"
            failure = IssuerResponse(status, headers, f"injected failure: HTTP {status}".encode())
        with self._lock:
            self._failures.extend([failure] * count)

    def clear_failures(self) -> None:
        """Forget failures injected with :meth:`fail_next` that have not happened yet."""
        with self._lock:
            self._failures.clear()

    def client_secret(self, client_id: str) -> str:
        """The secret registered for ``client_id`` (test helper; raises ConfigurationError)."""
        with self._lock:
            client = self._clients.get(client_id)
        if client is None or client.secret is None:
            raise ConfigurationError(f"no client {client_id!r} with a secret is registered")
        return client.secret

    def reset_counters(self) -> None:
        """Set every request counter back to zero."""
        with self._lock:
            self.token_requests = self.tokens_issued = 0
            self.jwks_requests = self.metadata_requests = 0

    # --- keys ------------------------------------------------------------------------

    @property
    def kid(self) -> str:
        """The ``kid`` of the current signing key (its RFC 7638 thumbprint)."""
        return self._keys[-1].kid

    @property
    def private_key(self) -> PrivateKey:
        """The current signing key, for tests that need to forge unusual tokens."""
        return self._keys[-1].private_key

    def rotate_keys(self, algorithm: Algorithm | None = None) -> str:
        """Sign with a new key from now on; every older public key stays in the JWKS.

        Returns the new ``kid``. Tokens signed before the rotation keep verifying.
        """
        key = _generate_key(algorithm or self.algorithm)
        with self._lock:
            self._keys.append(key)
            self.algorithm = key.algorithm
        return key.kid

    def retire_old_keys(self) -> None:
        """Drop every key but the current one from the JWKS (the end of a rotation)."""
        with self._lock:
            self._keys = self._keys[-1:]

    def jwks(self) -> dict[str, Any]:
        """The public JSON Web Key Set, newest key first."""
        return {"keys": [dict(key.public_jwk) for key in reversed(self._keys)]}

    # --- URLs ------------------------------------------------------------------------

    def _url_or_none(self) -> str | None:
        if self._server is not None:
            host, port = self._server.server_address[:2]
            return f"http://{host!s}:{port}/"
        return self._fixed_url

    @property
    def url(self) -> str:
        """The issuer identifier (``iss`` of its tokens), with a trailing slash."""
        url = self._url_or_none()
        if url is None:
            raise ConfigurationError(
                "LocalIssuer is not running: start it with `with issuer:` / `async with issuer:`, "
                "or pass url=... to use it in-process through issuer.transport()"
            )
        return url

    @property
    def token_url(self) -> str:
        """The token endpoint (``<url>oauth/token``, Auth0's path)."""
        return self.url + "oauth/token"

    @property
    def jwks_url(self) -> str:
        """The JWKS document (``<url>.well-known/jwks.json``)."""
        return self.url + ".well-known/jwks.json"

    def roles_claim_for(self, audience: str | None = None) -> str:
        """The claim that holds roles in tokens for ``audience`` (see the class docstring)."""
        if self._roles_claim is not None:
            return self._roles_claim
        return f"{audience or self.audience}/roles"

    @property
    def roles_claim(self) -> str:
        """The roles claim for the default audience."""
        return self.roles_claim_for(None)

    def metadata(self) -> dict[str, Any]:
        """The discovery document (same content for OIDC and RFC 8414)."""
        with self._lock:
            scopes = sorted({s for c in self._clients.values() for s in c.scopes})
            algs = sorted({k.algorithm for k in self._keys})
        return {
            "issuer": self.url,
            "token_endpoint": self.token_url,
            "jwks_uri": self.jwks_url,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": list(_AUTH_METHODS),
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
            "scopes_supported": scopes,
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
        }

    # --- minting ---------------------------------------------------------------------

    def sign(self, claims: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None) -> str:
        """Sign ``claims`` as they are with the current key (no claim is added)."""
        key = self._keys[-1]
        header: dict[str, Any] = {"kid": key.kid}
        if self.typ:
            header["typ"] = self.typ
        header.update(headers or {})
        return jwt.encode(dict(claims), key.private_key, algorithm=key.algorithm, headers=header)

    def mint(
        self,
        sub: str = "test-client@clients",
        audience: str | Sequence[str] | None = None,
        scope: str | Iterable[str] | None = None,
        permissions: Iterable[str] | None = None,
        roles: Iterable[str] | None = None,
        expires_in: int | None = None,
        **extra_claims: Any,
    ) -> str:
        """Sign an access token directly, without a token request.

        A negative ``expires_in`` makes an already expired token. ``extra_claims`` are added
        last, so they can also replace any standard claim (``iss=``, ``nbf=``, ``azp=`` ...).

        >>> issuer.mint(permissions=["read:dashboard"], roles=["admin"], tenant="acme")
        """
        now = int(self.clock())
        aud: str | list[str] = audience if isinstance(audience, str) else list(audience or ())
        aud = aud or self.audience
        first_aud = aud if isinstance(aud, str) else aud[0]
        client_id = sub.removesuffix("@clients")
        lifetime = self.token_lifetime if expires_in is None else expires_in
        claims: dict[str, Any] = {
            "iss": self.url,
            "sub": sub,
            "aud": aud,
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
            "azp": client_id,
            "client_id": client_id,
        }
        scopes = _words(scope)
        if scopes:
            claims["scope"] = " ".join(scopes)
        if permissions is not None:
            claims["permissions"] = list(permissions)
        if roles is not None:
            claims[self.roles_claim_for(first_aud)] = list(roles)
        claims.update(extra_claims)
        return self.sign(claims)

    # --- the request handler (no I/O) --------------------------------------------------

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
            f"{prefix}/oauth/token": ("POST", lambda: self._token_response(lowered, body)),
        }
        if path not in routes:
            return _json(404, {"error": "not_found", "error_description": f"no route {path}"})
        allowed, respond = routes[path]
        if method.upper() != allowed:
            return _json(405, {"error": "method_not_allowed"}, Allow=allowed)
        return respond()

    def _metadata_response(self) -> IssuerResponse:
        with self._lock:
            self.metadata_requests += 1
        return _json(200, self.metadata(), **{"Cache-Control": "public, max-age=3600"})

    def _jwks_response(self) -> IssuerResponse:
        with self._lock:
            self.jwks_requests += 1
            document = self.jwks()
        return _json(200, document, **{"Cache-Control": f"public, max-age={self.jwks_max_age}"})

    def _token_response(self, headers: Mapping[str, str], body: bytes) -> IssuerResponse:
        with self._lock:
            self.token_requests += 1
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return failure
        try:
            return self._issue(headers, body)
        except _OAuthError as exc:
            logger.debug("token request refused: %s (%s)", exc.error, exc.description)
            extra = {"Cache-Control": "no-store", "Pragma": "no-cache"}
            if exc.status == 401:
                # RFC 6749 §5.2 demands it when Basic was used; RFC 7235 §3.1 for any 401.
                extra["WWW-Authenticate"] = 'Basic realm="LocalIssuer", charset="UTF-8"'
            payload = {"error": exc.error, "error_description": exc.description}
            return _json(exc.status, payload, **extra)

    def _issue(self, headers: Mapping[str, str], body: bytes) -> IssuerResponse:
        if len(body) > self.max_body_bytes:
            raise _OAuthError("invalid_request", "request body too large", status=413)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != _FORM_TYPE:
            raise _OAuthError("invalid_request", f"Content-Type must be {_FORM_TYPE}")
        params = _single_params(body)
        client = self._authenticate(headers, params)
        grant_type = params.get("grant_type")
        if not grant_type:
            raise _OAuthError("invalid_request", "grant_type is missing")
        if grant_type != "client_credentials":
            raise _OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} not supported")
        if grant_type not in client.grant_types:
            raise _OAuthError("unauthorized_client", "client may not use client_credentials")
        audience = self._audience(client, params)
        requested = _words(params.get("scope"))
        not_allowed = sorted(set(requested) - set(client.scopes))
        if not_allowed:
            raise _OAuthError("invalid_scope", f"scope not allowed: {' '.join(not_allowed)}")
        granted = requested or client.scopes
        lifetime = self.token_lifetime if client.expires_in is None else client.expires_in
        permissions = list(granted) if client.permissions is None else list(client.permissions)
        token = self.mint(
            sub=client.subject,
            audience=audience,
            scope=granted,
            permissions=permissions,
            roles=client.roles or None,
            expires_in=lifetime,
            azp=client.client_id,
            client_id=client.client_id,
            gty="client-credentials",
            **client.extra_claims,
        )
        with self._lock:
            self.tokens_issued += 1
        logger.debug("issued a token to client %r for %r", client.client_id, audience)
        response: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": lifetime,
        }
        if granted:
            response["scope"] = " ".join(granted)
        # RFC 6749 §5.1: token responses must not be cached by anyone on the way.
        return _json(200, response, **{"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _audience(self, client: _Client, params: Mapping[str, str]) -> str:
        wanted = params.get("audience") or params.get("resource")
        if not wanted:
            return client.audiences[0]
        if wanted not in client.audiences:
            # RFC 8707 §2: the error for a resource the client may not have a token for.
            raise _OAuthError("invalid_target", f"client may not get tokens for {wanted!r}")
        return wanted

    def _authenticate(self, headers: Mapping[str, str], params: dict[str, str]) -> _Client:
        authorization = headers.get("authorization", "")
        basic = authorization[:6].lower() == "basic "
        used = [
            name
            for name, present in (
                ("client_secret_basic", basic),
                ("client_secret_post", "client_secret" in params),
                ("private_key_jwt", "client_assertion" in params),
            )
            if present
        ]
        if len(used) > 1:
            # RFC 6749 §2.3: "The client MUST NOT use more than one authentication method".
            raise _OAuthError("invalid_request", "more than one client authentication method used")
        if not used:
            raise _OAuthError("invalid_client", "client authentication is missing", status=401)
        method = used[0]
        if method == "client_secret_basic":
            client_id, secret = self._basic_credentials(authorization[6:].strip())
            if params.get("client_id", client_id) != client_id:
                raise _OAuthError("invalid_request", "client_id does not match the credentials")
        elif method == "client_secret_post":
            client_id, secret = params.get("client_id", ""), params.pop("client_secret")
        else:
            return self._authenticate_assertion(params)
        with self._lock:
            client = self._clients.get(client_id)
        expected = (client.secret if client else None) or secrets.token_hex(16)
        # compare_digest: no timing signal about how much of the secret matched.
        good = hmac.compare_digest(expected.encode(), secret.encode())
        if client is None or not good or method not in client.auth_methods:
            raise _OAuthError("invalid_client", "client authentication failed", status=401)
        return client

    @staticmethod
    def _basic_credentials(encoded: str) -> tuple[str, str]:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise _OAuthError("invalid_client", "malformed Basic credentials", status=401) from exc
        client_id, colon, secret = decoded.partition(":")
        if not colon:
            raise _OAuthError("invalid_client", "malformed Basic credentials", status=401)
        # RFC 6749 §2.3.1: id and secret are form-urlencoded before the Basic encoding.
        return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)

    def _authenticate_assertion(self, params: Mapping[str, str]) -> _Client:
        if params.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise _OAuthError("invalid_request", "unsupported client_assertion_type")
        assertion = params["client_assertion"]
        refused = _OAuthError("invalid_client", "client assertion refused", status=401)
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise refused from exc
        client_id = str(unverified.get("iss", ""))
        with self._lock:
            client = self._clients.get(client_id)
        if (
            client is None
            or client.public_key is None
            or "private_key_jwt" not in client.auth_methods
        ):
            raise refused
        try:
            # RFC 7523 §3: iss = sub = client_id, aud = the token endpoint (or the issuer), exp.
            claims = jwt.decode(
                assertion,
                client.public_key,
                algorithms=["RS256", "PS256", "ES256"],
                audience=[self.token_url, self.url, self.url.rstrip("/")],
                issuer=client_id,
                options={"require": ["exp", "sub", "jti"]},
                leeway=5,
            )
        except jwt.PyJWTError as exc:
            raise refused from exc
        if claims["sub"] != client_id or params.get("client_id", client_id) != client_id:
            raise refused
        now = self.clock()
        with self._lock:
            self._seen_assertions = {j: e for j, e in self._seen_assertions.items() if e > now}
            # RFC 7523 §3 item 7: one use per jti, so a captured assertion cannot be replayed.
            if claims["jti"] in self._seen_assertions:
                raise refused
            self._seen_assertions[str(claims["jti"])] = float(claims["exp"]) + 5
        return client

    # --- shells: in-process transport and HTTP server --------------------------------

    def transport(self) -> httpx.MockTransport:
        """An httpx transport serving the issuer in-process (``httpx.Client`` and ``AsyncClient``).

        Every host is answered; set ``url=`` on the issuer to the base URL the clients use.
        """

        def handler(request: httpx.Request) -> httpx.Response:
            response = self.handle_request(
                request.method,
                request.url.raw_path.decode("ascii"),
                request.headers,
                request.content,
            )
            return httpx.Response(response.status, headers=response.headers, content=response.body)

        return httpx.MockTransport(handler)

    @property
    def running(self) -> bool:
        """Whether the HTTP server is running."""
        return self._server is not None

    def start(self) -> None:
        """Start the HTTP server on 127.0.0.1, on a free port, in a daemon thread."""
        if self._server is not None:
            raise ConfigurationError("LocalIssuer is already running")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.name = f"LocalIssuer-{server.server_address[1]}"
        thread.start()
        self._server, self._thread = server, thread
        logger.debug("LocalIssuer listening on %s", self.url)

    def stop(self) -> None:
        """Stop the HTTP server and release its port (no-op when not running)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LocalIssuer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> LocalIssuer:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)


def _make_handler(issuer: LocalIssuer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "LocalIssuer"
        timeout = 10  # an idle or slow client cannot hold a handler thread for ever

        def _serve(self) -> None:
            length_header = self.headers.get("Content-Length", "0")
            length = int(length_header) if length_header.isdigit() else 0
            # Read at most one byte past the limit: enough for the handler to refuse it, and
            # a client announcing gigabytes cannot make us buffer them.
            body = self.rfile.read(min(length, issuer.max_body_bytes + 1)) if length else b""
            if issuer.max_body_bytes < length <= _DRAIN_LIMIT:
                # Drain the rest so closing does not reset the connection before the client
                # reads our 413; beyond the drain limit we just close.
                self.rfile.read(length - len(body))
            response = issuer.handle_request(self.command, self.path, dict(self.headers), body)
            self.close_connection = True
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(response.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            # Never the stdlib's stderr access log: keep output clean, and request lines are
            # all we would log anyway (no bodies, so no secrets).
            logger.debug("%s %s", self.command, urllib.parse.urlsplit(self.path).path)

    return Handler
