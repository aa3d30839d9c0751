"""LocalIssuer's registered clients and how the token endpoint authenticates them.

RFC 6749 §2.3 (``client_secret_basic``, ``client_secret_post``; one method per request) and
RFC 7523 (``private_key_jwt``, with one use per assertion ``jti``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

from m2m_client.errors import ConfigurationError
from m2m_client.testing._responses import OAuthError, words

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")


@dataclass(frozen=True)
class RegisteredClient:
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
    extra_claims: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # never the secret
        return f"<RegisteredClient {self.client_id!r} {list(self.auth_methods)}>"


def auth_methods_for(
    secret: str | None, public_key: Any, auth_methods: Iterable[str] | None
) -> tuple[str, ...]:
    """The methods a client may use: explicit ones, checked, or what its credentials allow."""
    if secret is None and public_key is None:
        raise ConfigurationError("add_client needs a client_secret or a public_key")
    if auth_methods is None:
        methods: tuple[str, ...] = ("client_secret_basic", "client_secret_post") if secret else ()
        methods += ("private_key_jwt",) if public_key is not None else ()
    else:
        methods = tuple(auth_methods)
    unknown = set(methods) - set(AUTH_METHODS)
    if unknown:
        raise ConfigurationError(f"unknown auth methods {sorted(unknown)}")
    if "private_key_jwt" in methods and public_key is None:
        raise ConfigurationError("private_key_jwt needs the client's public_key")
    return methods


class FederatedTrust:
    """Assertions another issuer signs for ``subject`` authenticate as ``client_id``
    (federated client authentication, as Entra federated credentials and Keycloak 26.4).

    ``source``: a running :class:`LocalIssuer` (in process), a
    :class:`~m2m_client.testing.ProjectedTokenFile` (its key), or an issuer URL (its JWKS
    from OpenID discovery, loopback only in tests)."""

    def __init__(self, source: Any, subject: str, client_id: str) -> None:
        if (
            not isinstance(source, str)
            and not hasattr(source, "jwks")
            and not hasattr(source, "public_jwk")
        ):
            raise ConfigurationError(
                "trust source must be an issuer URL, a LocalIssuer or a ProjectedTokenFile"
            )
        self.source, self.subject, self.client_id = source, subject, client_id
        self._jwks: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<FederatedTrust {self.issuer()!r} {self.subject!r} -> {self.client_id!r}>"

    def issuer(self) -> str:
        source = self.source
        if isinstance(source, str):
            return source
        if hasattr(source, "public_jwk"):
            return str(source.issuer)
        return str(source.url)

    def keys(self, refresh: bool = False) -> dict[str, Any]:
        source = self.source
        if hasattr(source, "public_jwk"):
            return {"keys": [source.public_jwk]}
        if not isinstance(source, str):
            return dict(source.jwks())
        if self._jwks is None or refresh:
            self._jwks = _fetch_jwks(source)
        return self._jwks


def _fetch_jwks(issuer: str) -> dict[str, Any]:
    import json
    import urllib.request

    def get(url: str) -> Any:
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310  # test tool
            return json.loads(answer.read(256 * 1024))

    try:
        metadata = get(issuer.rstrip("/") + "/.well-known/openid-configuration")
        jwks = get(str(metadata["jwks_uri"]))
    except (OSError, ValueError, KeyError, TypeError):
        return {"keys": []}  # the assertion is then refused as invalid_client
    return jwks if isinstance(jwks, dict) else {"keys": []}


def parse_trust(spec: str) -> tuple[str, str, str]:
    """``ISSUER_URL:SUBJECT=CLIENT_ID`` (the CLI's ``--trust``); the subject may hold ``:``."""
    import re

    match = re.fullmatch(r"(https?://[^/:\s]+(?::\d+)?(?:/[^:\s]*)?):(.+)=([^=]+)", spec.strip())
    if match is None:
        raise ConfigurationError(
            "--trust must look like ISSUER_URL:SUBJECT=CLIENT_ID, e.g. "
            "https://k8s.example:system:serviceaccount:ns:worker=worker"
        )
    return match.group(1), match.group(2), match.group(3)


class ClientRegistry:
    """The clients an issuer knows, and client authentication at its token endpoint."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, RegisteredClient] = {}
        self._seen_assertions: dict[str, float] = {}
        self.trusts: list[FederatedTrust] = []

    def __len__(self) -> int:
        return len(self._clients)

    def add(self, client: RegisteredClient) -> None:
        with self._lock:
            self._clients[client.client_id] = client

    def get(self, client_id: str) -> RegisteredClient | None:
        with self._lock:
            return self._clients.get(client_id)

    def all(self) -> list[RegisteredClient]:
        with self._lock:
            return list(self._clients.values())

    def snapshot(self) -> dict[str, RegisteredClient]:
        with self._lock:
            return dict(self._clients)

    def restore(self, clients: Mapping[str, RegisteredClient]) -> None:
        with self._lock:
            self._clients = dict(clients)

    def authenticate(
        self, headers: Mapping[str, str], params: dict[str, str], audiences: Sequence[str]
    ) -> RegisteredClient:
        """The client a token request authenticates as, or an ``invalid_client`` OAuthError.

        ``headers`` have lower-case names; ``audiences`` are the values a client assertion's
        ``aud`` may take (the token endpoint, the issuer).
        """
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
            raise OAuthError("invalid_request", "more than one client authentication method used")
        if not used:
            raise OAuthError("invalid_client", "client authentication is missing", status=401)
        method = used[0]
        if method == "private_key_jwt":
            return self._authenticate_assertion(params, audiences)
        if method == "client_secret_basic":
            client_id, secret = _basic_credentials(authorization[6:].strip())
            if params.get("client_id", client_id) != client_id:
                raise OAuthError("invalid_request", "client_id does not match the credentials")
        else:
            client_id, secret = params.get("client_id", ""), params.pop("client_secret")
        client = self.get(client_id)
        expected = (client.secret if client else None) or secrets.token_hex(16)
        # compare_digest: no timing signal about how much of the secret matched.
        good = hmac.compare_digest(expected.encode(), secret.encode())
        if client is None or not good or method not in client.auth_methods:
            raise OAuthError("invalid_client", "client authentication failed", status=401)
        return client

    def _authenticate_assertion(
        self, params: Mapping[str, str], audiences: Sequence[str]
    ) -> RegisteredClient:
        kind = params.get("client_assertion_type")
        if kind not in (CLIENT_ASSERTION_TYPE, JWT_SPIFFE):
            raise OAuthError("invalid_request", "unsupported client_assertion_type")
        assertion = params["client_assertion"]
        refused = OAuthError("invalid_client", "client assertion refused", status=401)
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise refused from exc
        client_id = str(unverified.get("iss", ""))
        for trust in self.trusts:
            if trust.issuer() == client_id and trust.subject == unverified.get("sub"):
                return self._authenticate_federated(trust, assertion, params, audiences)
        client = self.get(client_id)
        if client is None or "private_key_jwt" not in client.auth_methods or kind == JWT_SPIFFE:
            raise refused  # a JWT-SVID is only ever a federated credential
        try:
            # RFC 7523 §3: iss = sub = client_id, aud = the token endpoint (or the issuer), exp.
            claims = jwt.decode(
                assertion,
                client.public_key,
                algorithms=["RS256", "PS256", "ES256"],
                audience=list(audiences),
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

    def _authenticate_federated(
        self,
        trust: FederatedTrust,
        assertion: str,
        params: Mapping[str, str],
        audiences: Sequence[str],
    ) -> RegisteredClient:
        # Federated: the other issuer's token is reused until it rotates (no one-use jti,
        # as Entra and Keycloak); its signature, issuer, subject, audience and exp are checked.
        refused = OAuthError("invalid_client", "client assertion refused", status=401)
        try:
            key = _federated_key(trust, assertion)
            if key is None:
                raise refused
            jwt.decode(
                assertion,
                key,
                algorithms=["RS256", "PS256", "ES256"],
                audience=list(audiences),
                issuer=trust.issuer(),
                options={"require": ["exp", "sub", "iss", "aud"]},
                leeway=5,
            )
        except (jwt.PyJWTError, ValueError) as exc:
            raise refused from exc
        if params.get("client_id", trust.client_id) != trust.client_id:
            raise refused
        client = self.get(trust.client_id)
        if client is None:
            raise refused
        return client


def _federated_key(trust: FederatedTrust, assertion: str) -> Any:
    kid = jwt.get_unverified_header(assertion).get("kid")
    for refresh in (False, True):  # an unknown kid: the issuer may have rotated its keys
        for jwk in trust.keys(refresh).get("keys", []):
            if isinstance(jwk, dict) and (kid is None or jwk.get("kid") == kid):
                return jwt.PyJWK(jwk).key
    return None


def _basic_credentials(encoded: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError("invalid_client", "malformed Basic credentials", status=401) from exc
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise OAuthError("invalid_client", "malformed Basic credentials", status=401)
    # RFC 6749 §2.3.1: id and secret are form-urlencoded before the Basic encoding.
    return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)


class IssuerClients:
    """LocalIssuer's methods about its registered clients."""

    _clients: ClientRegistry
    audience: str

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
        if isinstance(public_key, Mapping):
            public_key = jwt.PyJWK(dict(public_key)).key
        methods = auth_methods_for(client_secret, public_key, auth_methods)
        client = RegisteredClient(
            client_id=client_id,
            secret=client_secret,
            public_key=public_key,
            audiences=tuple(audiences or ()) or ((audience or self.audience),),
            scopes=words(scope),
            permissions=None if permissions is None else tuple(permissions),
            roles=tuple(roles),
            subject=subject or f"{client_id}@clients",
            auth_methods=methods,
            grant_types=tuple(grant_types),
            expires_in=expires_in,
            extra_claims=dict(extra_claims or {}),
        )
        self._clients.add(client)

    def add_trust(self, source: Any, subject: str, client_id: str) -> None:
        """Federated client authentication: an assertion ``source`` signs with ``sub`` =
        ``subject`` (and ``aud`` = this issuer or its token endpoint) authenticates as
        ``client_id``. ``source``: an issuer URL, a LocalIssuer or a ProjectedTokenFile.
        ``client_id`` is registered (default settings, no secret) if it is not yet."""
        if self._clients.get(client_id) is None:
            self._clients.add(
                RegisteredClient(
                    client_id=client_id,
                    secret=None,
                    public_key=None,
                    audiences=(self.audience,),
                    scopes=(),
                    permissions=None,
                    roles=(),
                    subject=f"{client_id}@clients",
                    auth_methods=("federated",),
                    grant_types=("client_credentials",),
                    expires_in=None,
                )
            )
        self._clients.trusts.append(FederatedTrust(source, subject, client_id))

    def client_secret(self, client_id: str) -> str:
        """The secret registered for ``client_id`` (test helper; raises ConfigurationError)."""
        client = self._clients.get(client_id)
        if client is None or client.secret is None:
            raise ConfigurationError(f"no client {client_id!r} with a secret is registered")
        return client.secret
