"""LocalIssuer's token endpoint: the client_credentials grant, injected failures, counters.

RFC 6749 §4.4 (the grant), §5.1 / §5.2 (token and error responses) and RFC 8707 §2
(``invalid_target`` for a resource the client may not have a token for). Client
authentication itself is in ``_clients.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from m2m_client.errors import DPoPNonceRequired, DPoPProofError
from m2m_client.testing._responses import (
    FORM_TYPE,
    IssuerResponse,
    OAuthError,
    form_params,
    json_response,
    words,
)
from m2m_client.verify._proof import HmacNonceSource, MemoryReplayCache, check_proof
from m2m_client.verify._www_authenticate import challenge

if TYPE_CHECKING:
    from m2m_client.testing._clients import ClientRegistry, RegisteredClient
    from m2m_client.testing._issuer import LocalIssuer

logger = logging.getLogger("m2m_client.testing")

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class TokenEndpoint:
    """``POST <issuer>oauth/token``: authenticate, check the grant, mint, count."""

    def __init__(self, issuer: LocalIssuer, clients: ClientRegistry) -> None:
        self._issuer = issuer
        self._clients = clients
        self._lock = threading.Lock()
        self._failures: list[IssuerResponse] = []
        self.requests = 0
        self.issued = 0
        # DPoP (RFC 9449): proofs are checked like a real server does, jti replay included.
        self._dpop_replay = MemoryReplayCache(10_000)
        self._dpop_nonces = HmacNonceSource()

    def inject_failures(self, failure: IssuerResponse, count: int) -> None:
        with self._lock:
            self._failures.extend([failure] * count)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.issued = 0

    def respond(self, headers: Mapping[str, str], body: bytes) -> IssuerResponse:
        """Answer one token request (``headers`` with lower-case names)."""
        with self._lock:
            self.requests += 1
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return failure
        try:
            return self._issue(headers, body)
        except OAuthError as exc:
            logger.debug("token request refused: %s (%s)", exc.error, exc.description)
            extra = dict(_NO_STORE)
            if exc.status == 401:
                # RFC 6749 §5.2 demands it when Basic was used; RFC 7235 §3.1 for any 401.
                extra["WWW-Authenticate"] = challenge(
                    "Basic", ("realm", "LocalIssuer"), ("charset", "UTF-8")
                )
            nonce = getattr(exc, "dpop_nonce", None)
            if nonce is not None:
                extra["DPoP-Nonce"] = nonce
            payload = {"error": exc.error, "error_description": exc.description}
            return json_response(exc.status, payload, **extra)

    def _dpop_jkt(self, headers: Mapping[str, str]) -> str | None:
        """The thumbprint to bind the token to, if the request carries a valid DPoP proof."""
        proof = headers.get("dpop")
        if proof is None:
            return None
        issuer = self._issuer
        now = issuer.clock()
        try:
            checked = check_proof(
                proof,
                method="POST",
                url=issuer.token_url,
                now=now,
                nonces=self._dpop_nonces if issuer.dpop_nonce else None,
            )
        except DPoPNonceRequired as exc:
            # RFC 9449 §8: 400 use_dpop_nonce with the nonce to retry with.
            raise _DPoPError(
                "use_dpop_nonce", "send a DPoP proof with the server nonce", nonce=exc.nonce
            ) from None
        except DPoPProofError as exc:
            raise _DPoPError("invalid_dpop_proof", str(exc)) from None
        if not self._dpop_replay.first_use(
            checked.replay_key, expires_at=checked.replay_expires_at, now=now
        ):
            raise _DPoPError("invalid_dpop_proof", "DPoP proof refused: it was already used")
        return checked.jkt

    def _issue(self, headers: Mapping[str, str], body: bytes) -> IssuerResponse:
        issuer = self._issuer
        if len(body) > issuer.max_body_bytes:
            raise OAuthError("invalid_request", "request body too large", status=413)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != FORM_TYPE:
            raise OAuthError("invalid_request", f"Content-Type must be {FORM_TYPE}")
        params = form_params(body)
        assertion_audiences = [issuer.token_url, issuer.url, issuer.url.rstrip("/")]
        client = self._clients.authenticate(headers, params, assertion_audiences)
        grant_type = params.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is missing")
        if grant_type != "client_credentials":
            raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} not supported")
        if grant_type not in client.grant_types:
            raise OAuthError("unauthorized_client", "client may not use client_credentials")
        audience = _audience(client, params)
        requested = words(params.get("scope"))
        not_allowed = sorted(set(requested) - set(client.scopes))
        if not_allowed:
            raise OAuthError("invalid_scope", f"scope not allowed: {' '.join(not_allowed)}")
        granted = requested or client.scopes
        lifetime = issuer.token_lifetime if client.expires_in is None else client.expires_in
        permissions = list(granted) if client.permissions is None else list(client.permissions)
        jkt = self._dpop_jkt(headers)
        if jkt is not None:
            extra_claims: dict[str, Any] = {**client.extra_claims, "cnf": {"jkt": jkt}}
        else:
            extra_claims = dict(client.extra_claims)
        token = issuer.mint(
            sub=client.subject,
            audience=audience,
            scope=granted,
            permissions=permissions,
            roles=client.roles or None,
            expires_in=lifetime,
            azp=client.client_id,
            client_id=client.client_id,
            gty="client-credentials",
            **extra_claims,
        )
        with self._lock:
            self.issued += 1
        logger.debug("issued a token to client %r for %r", client.client_id, audience)
        response: dict[str, Any] = {
            "access_token": token,
            "token_type": "DPoP" if jkt is not None else "Bearer",
            "expires_in": lifetime,
        }
        if granted:
            response["scope"] = " ".join(granted)
        # RFC 6749 §5.1: token responses must not be cached by anyone on the way.
        return json_response(200, response, **_NO_STORE)


class _DPoPError(OAuthError):
    def __init__(self, error: str, description: str, *, nonce: str | None = None) -> None:
        super().__init__(error, description)
        self.dpop_nonce = nonce


def _audience(client: RegisteredClient, params: Mapping[str, str]) -> str:
    wanted = params.get("audience") or params.get("resource")
    if not wanted:
        return client.audiences[0]
    if wanted not in client.audiences:
        # RFC 8707 §2: the error for a resource the client may not have a token for.
        raise OAuthError("invalid_target", f"client may not get tokens for {wanted!r}")
    return wanted


class IssuerTokenEndpoint:
    """LocalIssuer's methods about its token endpoint: injected failures and counters."""

    _token_endpoint: TokenEndpoint
    _lock: threading.Lock
    jwks_requests: int
    metadata_requests: int

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 503,
        error: str | None = None,
        error_description: str | None = None,
        retry_after: int | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Make the next ``count`` token requests fail, for retry and outage tests.

        With ``error`` the body is an RFC 6749 §5.2 JSON error; without it a 5xx gets a plain
        text body, as a proxy or load balancer would send. ``retry_after`` sets ``Retry-After``;
        ``headers`` adds more (rate-limit headers: ``{"RateLimit": '"default";r=0;t=2'}``).
        """
        headers = {"Cache-Control": "no-store", **(headers or {})}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if error is not None:
            payload = {"error": error}
            if error_description:
                payload["error_description"] = error_description
            failure = json_response(status, payload, **headers)
        else:
            headers["Content-Type"] = "text/plain; charset=utf-8"
            failure = IssuerResponse(status, headers, f"injected failure: HTTP {status}".encode())
        self._token_endpoint.inject_failures(failure, count)

    def clear_failures(self) -> None:
        """Forget failures injected with :meth:`fail_next` that have not happened yet."""
        self._token_endpoint.clear_failures()

    @property
    def token_requests(self) -> int:
        """Requests that reached the token endpoint (including refused and failed ones)."""
        return self._token_endpoint.requests

    @property
    def tokens_issued(self) -> int:
        """Tokens issued by the token endpoint (not counting :meth:`mint`)."""
        return self._token_endpoint.issued

    def reset_counters(self) -> None:
        """Set every request counter back to zero."""
        self._token_endpoint.reset_counters()
        with self._lock:
            self.jwks_requests = self.metadata_requests = 0
