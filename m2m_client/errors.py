"""One exception hierarchy for the whole package.

Callers catch as broadly (:class:`M2MError`) or as narrowly as they need. No foreign
exception type (httpx, PyJWT, pydantic) escapes the public API: each is wrapped with
``raise ... from exc`` so the cause stays available for debugging.

No message here ever contains a client secret, a private key or an access token.
"""

from __future__ import annotations

__all__ = [
    "M2MError",
    "ConfigurationError",
    "TokenError",
    "DiscoveryError",
    "ResourceMetadataError",
    "UntrustedIssuer",
    "TokenEndpointError",
    "TokenEndpointUnavailable",
    "InvalidTokenResponse",
    "CredentialUnavailable",
    "AssertionExpired",
    "VerificationError",
    "InvalidToken",
    "ExpiredToken",
    "InsufficientPermissions",
    "KeySetUnavailable",
]


class M2MError(Exception):
    """Root of every error raised by m2m_client."""


class ConfigurationError(M2MError, ValueError):
    """The configuration (arguments or environment variables) is invalid.

    The message names the field and, where it came from the environment, the variable.
    """


# --- calling side -------------------------------------------------------------------


class TokenError(M2MError):
    """Getting an access token from the authorization server failed."""


class DiscoveryError(TokenError):
    """The authorization server metadata could not be fetched or is not acceptable."""


class ResourceMetadataError(DiscoveryError):
    """An API's RFC 9728 protected resource metadata could not be fetched or is not
    acceptable: missing, malformed, oversized, redirected, or describing another resource."""


class UntrustedIssuer(ResourceMetadataError):
    """The API names only authorization servers the caller did not list as trusted.

    Nothing was sent to them. ``authorization_servers``: what the API named (its word).
    """

    def __init__(self, message: str, *, authorization_servers: tuple[str, ...] = ()) -> None:
        self.authorization_servers = authorization_servers
        super().__init__(message)


class TokenEndpointError(TokenError):
    """The authorization server refused the token request (RFC 6749 §5.2).

    Not retried: the same request would be refused again. Check the client id, the
    secret or key, the audience/resource and the scopes this client is allowed.
    """

    def __init__(
        self,
        error: str,
        error_description: str | None = None,
        *,
        status_code: int | None = None,
        error_uri: str | None = None,
    ) -> None:
        self.error = error
        self.error_description = error_description
        self.status_code = status_code
        self.error_uri = error_uri
        message = f"token endpoint returned {error!r}"
        if error_description:
            message += f": {error_description}"
        if status_code is not None:
            message += f" (HTTP {status_code})"
        super().__init__(message)


class TokenEndpointUnavailable(TokenError):
    """The token endpoint could not be reached or kept failing after every retry.

    ``last_cause`` (also ``__cause__``) is the last failure seen; ``attempts`` how many
    requests were made; ``retry_after``, when the server asked for a wait (``Retry-After``
    or its rate-limit reset), the seconds it asked for, counted from its last answer.
    """

    def __init__(
        self,
        message: str,
        *,
        attempts: int = 0,
        last_cause: BaseException | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.attempts = attempts
        self.last_cause = last_cause
        self.retry_after = retry_after
        super().__init__(message)


class InvalidTokenResponse(TokenError):
    """The token endpoint answered, but not with a usable token response."""


class CredentialUnavailable(TokenError):
    """The client's credential could not be obtained from its source (issue 21).

    A client assertion file or callable, GitHub Actions' OIDC endpoint, a ``client_secret_file``
    or ``private_key_file``: the message names the source (a path, a callable's name, a URL),
    never what it holds. Not retried: a missing file or a refused request does not heal in the
    few seconds of a fetch's retry budget.
    """


class AssertionExpired(CredentialUnavailable):
    """The client assertion the source holds expires within the safety margin, even after
    reading it again: it is not sent (the server would refuse it, or accept it just before it
    dies). Usually the platform stopped rotating the file (kubelet, workload identity)."""


# --- receiving side -----------------------------------------------------------------


class VerificationError(M2MError):
    """An access token could not be accepted. Root of every receiving-side error.

    ``reason`` is a stable, machine-readable word for the failure (see
    :class:`InvalidToken`); read it rather than the message, whose wording may change.
    """

    #: RFC 6750 error code used in ``WWW-Authenticate`` for this failure.
    error_code = "invalid_token"
    #: Stable reason word; subclasses and call sites refine it.
    reason = "invalid"

    def __init__(self, *args: object, reason: str | None = None) -> None:
        super().__init__(*args)
        if reason is not None:
            self.reason = reason


class InvalidToken(VerificationError):
    """The token is malformed, badly signed, or its claims do not pass (HTTP 401).

    ``reason`` is one of: ``malformed`` (not a well-formed compact JWS), ``header`` (a
    header the verifier refuses: jku/jwk/x5u, crit, b64, a bad kid), ``token_type``
    (``typ`` is not ``at+jwt`` when required), ``algorithm`` (alg not allowed or not the
    key's), ``unknown_kid``, ``signature``, ``issuer``, ``audience``, ``expired``,
    ``not_yet_valid`` (``nbf`` or ``iat`` in the future), ``missing_claim``,
    ``claim_value`` (an expected claim has another value), ``claim_type`` (a claim of the
    wrong JSON type, or nested too deeply).
    """


class ExpiredToken(InvalidToken):
    """The token's ``exp`` has passed (beyond the configured leeway) (HTTP 401)."""

    reason = "expired"


class InsufficientPermissions(VerificationError):
    """The token is valid but lacks a required scope, permission or role (HTTP 403)."""

    error_code = "insufficient_scope"
    reason = "insufficient_rights"

    def __init__(
        self,
        message: str,
        *,
        required: tuple[str, ...] = (),
        missing_scopes: tuple[str, ...] = (),
    ) -> None:
        #: Every missing scope, permission and role; ``missing_scopes`` only the scopes
        #: (what RFC 6750 §3's ``scope=`` may list).
        self.required = required
        self.missing_scopes = missing_scopes
        super().__init__(message)


class KeySetUnavailable(VerificationError):
    """The issuer's JWKS could not be fetched and no usable key is cached (HTTP 503)."""

    error_code = "temporarily_unavailable"
    reason = "keys_unavailable"


# --- DPoP (RFC 9449), receiving side ------------------------------------------------


class DPoPProofError(InvalidToken):
    """The DPoP proof is missing, malformed, badly signed or does not fit the request (HTTP 401).

    Answer with ``WWW-Authenticate: DPoP error="invalid_dpop_proof", algs="..."`` (RFC 9449
    §7.1); ``m2m_client.verify._proof.dpop_challenge`` builds that value.
    """

    error_code = "invalid_dpop_proof"
    reason = "dpop_proof"


class DPoPNonceRequired(DPoPProofError):
    """The server wants its nonce in the proof (RFC 9449 §8-9).

    HTTP 401 at a resource server, 400 at a token endpoint. ``nonce`` is the value to send
    back in the ``DPoP-Nonce`` response header; the client retries once with it.
    """

    error_code = "use_dpop_nonce"
    reason = "dpop_nonce"

    def __init__(self, message: str, *, nonce: str) -> None:
        self.nonce = nonce
        super().__init__(message)


class DPoPBindingError(InvalidToken):
    """The token's DPoP binding does not fit how it was presented (HTTP 401).

    A DPoP-bound token (``cnf.jkt``) sent with ``Authorization: Bearer`` (the downgrade
    attack), an unbound token sent with ``Authorization: DPoP``, or bearer use where the
    policy is ``"required"``.
    """

    reason = "dpop_binding"


__all__ += ["DPoPProofError", "DPoPNonceRequired", "DPoPBindingError"]


class ReplayCacheUnavailable(VerificationError):
    """The shared DPoP replay cache did not answer, and it fails closed (HTTP 503).

    The proof was not found invalid: it could not be checked for replay (RFC 9449 §11.1).
    ``retry_after``: seconds until the cache will be tried again.
    """

    error_code = "temporarily_unavailable"
    reason = "replay_cache_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


__all__ += ["ReplayCacheUnavailable"]
