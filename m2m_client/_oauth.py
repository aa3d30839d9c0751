"""Sans-IO OAuth 2.0 client credentials: build requests, interpret responses. No I/O here.

* token request: RFC 6749 §4.4 with client_secret_basic / client_secret_post (§2.3.1) or
  private_key_jwt (RFC 7523 §2.2, OpenID Connect Core §9);
* token response and error parsing: RFC 6749 §5.1 / §5.2.

Discovery is in :mod:`m2m_client._discovery`, sending in :mod:`m2m_client._http`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import quote_plus, urlencode, urlsplit

from ._http import HttpRequest
from ._ratelimit import read_rate_limit
from ._retry import TransientFailure, parse_retry_after
from ._token import AccessToken, CredentialId, RefreshPolicy
from .assertions import AssertionSource, FileAssertion, asserted_identity
from .config import ClientCredentials, load_private_key, read_credential_file
from .errors import CredentialUnavailable, InvalidTokenResponse, M2MError, TokenEndpointError

__all__ = [
    "ASSERTION_LIFETIME",
    "MAX_BODY_BYTES",
    "ClientAuthenticator",
    "interpret_token_response",
]

MAX_BODY_BYTES = 64 * 1024
"""A token response is a few KiB; anything larger is refused while streaming (memory DoS)."""
MIN_EXPIRES_IN = 1
"""`expires_in` below one second cannot be used (see interpret_token_response)."""
MAX_EXPIRES_IN = 366 * 24 * 3600
"""`expires_in` beyond a year is treated as a broken server, not as a token to keep forever."""
ASSERTION_LIFETIME = 60
"""Client assertions are single-use and short-lived (RFC 7523 §3: limit the replay window)."""
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class _KeyMaterial:
    """The client secret or private key as last read: inline, or from a file read again
    when its inode, size or mtime changes (one ``stat`` per token request; issue 21)."""

    __slots__ = ("_signature", "algorithm", "file", "key_pem", "secret", "signing_key", "what")

    def __init__(self, credentials: ClientCredentials) -> None:
        secret, key = credentials.client_secret, credentials.private_key
        self.secret = secret.get_secret_value() if secret else None
        self.key_pem = key.get_secret_value() if key else None
        self.signing_key: Any = None
        self._signature: tuple[int, int, int, int] | None = None
        self.file = credentials.client_secret_file or credentials.private_key_file
        self.what = "client_secret_file" if credentials.client_secret_file else "private_key_file"
        self.algorithm = credentials.signing_algorithm
        if self.file is not None:
            self.read(force=True)
        elif self.key_pem is not None and credentials.auth_method == "private_key_jwt":
            self._load_key(self.key_pem)

    def _load_key(self, pem: str) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        self.signing_key = load_pem_private_key(pem.encode(), password=None)

    def read(self, *, force: bool) -> bool:
        """Read the file if it changed (or ``force``); ``True`` if what it holds changed."""
        path, what = self.file, self.what
        assert path is not None
        try:
            signature = _signature(os.stat(path))
        except OSError as exc:
            raise CredentialUnavailable(
                f"{what} {str(path)!r}: cannot read it ({exc.strerror})"
            ) from None
        if not force and signature == self._signature:
            return False
        try:
            text = read_credential_file(path)
        except ValueError as exc:
            raise CredentialUnavailable(f"{what}: {exc}") from None
        self._signature = signature
        if what == "client_secret_file":
            changed, self.secret = text != self.secret, text
            return changed
        if text == self.key_pem:
            return False
        try:  # the rules ClientCredentials applied to the first key, and its algorithm
            self.signing_key, _ = load_private_key(text, self.algorithm, what)
        except ValueError as exc:
            raise CredentialUnavailable(f"{what} {str(path)!r}: {exc}") from None
        self.key_pem = text
        return True

    def key_bytes(self) -> str | bytes | None:
        """The private key for the credential id: PKCS#8 DER (PEM formatting does not count)."""
        if self.signing_key is None:
            return self.key_pem
        from cryptography.hazmat.primitives import serialization

        der: bytes = self.signing_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return der


class _Asserted:
    """A client assertion from a source (issue 21): the one last read, and the identity it
    asserts (``iss``, ``sub``, ``aud``, read unverified); until one is read, an identity no
    other client has."""

    __slots__ = ("assertion", "identity", "source")

    def __init__(self, source: AssertionSource) -> None:
        self.source = source
        self.assertion: str | None = None
        self.identity: object = secrets.token_bytes(16)
        if isinstance(source, FileAssertion):
            try:  # the identity, so that the first token lands under the shared key
                source.get(time.time())
            except M2MError:
                return  # the first token request says why
        self.note(source.peek())

    def note(self, assertion: str | None) -> bool:
        """Keep ``assertion``; ``True`` if the identity it asserts is a new one."""
        self.assertion = assertion
        if not assertion:
            return False
        identity = asserted_identity(assertion)
        if identity is None:  # not a JWT: nothing to read an identity from but itself
            digest = hashlib.sha256(assertion.encode()).hexdigest()
            identity = ("opaque", digest, "")
        if identity == self.identity:
            return False
        self.identity = identity
        return True

    def id_parts(self) -> tuple[str | bytes | None, ...]:
        identity = self.identity
        if isinstance(identity, tuple):
            return tuple(identity)
        return (b"unknown", cast(bytes, identity))


class ClientAuthenticator:
    """Builds token requests for one :class:`ClientCredentials` (key parsed once).

    A credential read from a file or a source (issue 21) is kept here and read again by
    :meth:`prepare` / :meth:`aprepare` before each token request: a file only when its
    inode, size or mtime changed (one ``stat``), an assertion when it nears its ``exp``, and
    everything once more (``reload=True``) after an ``invalid_client`` answer. What was read
    lives in :class:`_KeyMaterial` (secret, key) and :class:`_Asserted` (assertion); this
    class decides when to read and builds the requests.
    """

    def __init__(self, credentials: ClientCredentials) -> None:
        self.credentials = credentials
        self._keys = _KeyMaterial(credentials)
        source = credentials.client_assertion
        self._asserted = _Asserted(source) if source is not None else None
        self._lock = threading.Lock()
        self._id = self._compute_id()

    @property
    def identity_unknown(self) -> bool:
        """An assertion source whose asserted identity is not known yet (never read)."""
        asserted = self._asserted
        return asserted is not None and not isinstance(asserted.identity, tuple)

    @property
    def dynamic(self) -> bool:
        """The credential comes from a file or a source: :meth:`prepare` before each request."""
        return self._keys.file is not None or self._asserted is not None

    def __repr__(self) -> str:
        return f"ClientAuthenticator(method={self.credentials.auth_method!r})"

    def prepare(self, now: float, *, reload: bool = False) -> bool:
        """Read a changed credential (all of it if ``reload``); ``True`` if it changed."""
        with self._lock:
            changed = self._read_file(reload)
            if self._asserted is not None:
                changed = self._note(self._asserted.source.get(now, reload=reload)) or changed
            return changed

    async def aprepare(self, now: float, *, reload: bool = False) -> bool:
        """:meth:`prepare` for async clients (an async assertion source is awaited)."""
        asserted = self._asserted
        if asserted is None:
            return self.prepare(now, reload=reload)
        changed = self._read_file(reload)
        return self._note(await asserted.source.aget(now, reload=reload)) or changed

    def _read_file(self, reload: bool) -> bool:
        if self._keys.file is None or not self._keys.read(force=reload):
            return False
        self._id = self._compute_id()  # a rotated secret or key is a new credential
        return True

    def _note(self, assertion: str | None) -> bool:
        asserted = self._asserted
        assert asserted is not None
        before = asserted.assertion
        if asserted.note(assertion):
            self._id = self._compute_id()  # the assertion asserts another identity
        return asserted.assertion != before

    def credential_id(self) -> CredentialId:
        """What proves this client's right to its tokens (part of every cache key).

        Every credential field goes in, so two clients share cached tokens only if they would
        authenticate identically: the secret, the private key (as PKCS#8 DER, so PEM
        formatting does not matter), its ``kid`` and algorithm, the assertion audience and the
        issuer (RFC 7523bis makes it the assertion audience). A secret or key read from a file
        goes in as read: a rotated secret is a new credential (new entries). A client
        assertion (issue 21) changes at every rotation, so it supplies the identity it
        asserts (``iss``, ``sub`` and ``aud``, read unverified), never the assertion itself;
        before the first assertion is read, an id no other client shares.
        """
        return self._id

    def _compute_id(self) -> CredentialId:
        creds = self.credentials
        if self._asserted is not None:
            parts = self._asserted.id_parts()
            return CredentialId.of("client_assertion", creds.auth_method, *parts, creds.issuer)
        return CredentialId.of(
            "private_key" if creds.auth_method == "private_key_jwt" else "client_secret",
            creds.auth_method,
            self._keys.secret,
            self._keys.key_bytes(),
            creds.private_key_id,
            creds.signing_algorithm,
            creds.assertion_audience,
            creds.issuer,
        )

    def client_assertion(self, token_url: str, now: float) -> str:
        """A fresh RFC 7523 client assertion for ``token_url``."""
        import jwt

        creds = self.credentials
        issued = int(now)
        claims = {
            "iss": creds.client_id,
            "sub": creds.client_id,
            # RFC 7523bis: the issuer identifier, a single string (audience injection fix).
            "aud": assertion_audience(creds, token_url),
            # A unique jti lets the server refuse a replayed assertion (RFC 7523 §3 item 7).
            "jti": secrets.token_urlsafe(24),
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        headers = {"kid": creds.private_key_id} if creds.private_key_id else None
        return jwt.encode(
            claims, self._keys.signing_key, algorithm=creds.signing_algorithm, headers=headers
        )

    def token_request(
        self,
        token_url: str,
        *,
        audience: str | None,
        resource: str | None,
        scopes: tuple[str, ...],
        now: float,
    ) -> HttpRequest:
        """The client-credentials token request (RFC 6749 §4.4.2)."""
        creds = self.credentials
        form: dict[str, str] = {"grant_type": "client_credentials"}
        if scopes:
            form["scope"] = " ".join(scopes)
        if audience:
            form["audience"] = audience
        if resource:
            form["resource"] = resource
        form.update(creds.extra_params)
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        secret = self._keys.secret or ""
        if creds.auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: id and secret are form-urlencoded BEFORE base64; skipping this
            # breaks secrets containing ':' or non-ASCII characters on compliant servers.
            pair = f"{quote_plus(creds.client_id)}:{quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif creds.auth_method == "client_secret_post":
            form["client_id"] = creds.client_id
            form["client_secret"] = secret
        else:
            form["client_id"] = creds.client_id
            form["client_assertion_type"] = JWT_BEARER
            asserted = self._asserted
            if asserted is not None:
                form["client_assertion_type"] = asserted.source.assertion_type
                assertion = asserted.assertion
                if assertion is None or not asserted.source._usable(assertion, now):
                    self.prepare(now)  # sync source; async ones were prepared by aprepare
                    assertion = asserted.assertion
                assert assertion is not None
                form["client_assertion"] = assertion
            else:
                form["client_assertion"] = self.client_assertion(token_url, now)
        content = urlencode(form).encode()
        return HttpRequest("POST", token_url, headers=headers, content=content)


# Servers documented to want the token endpoint as aud (docs/no-stored-secret.md):
# Entra ID (learn.microsoft.com, "certificate credentials") and Okta ("Build a JWT for
# client authentication"). Matched on the token endpoint's host.
_TOKEN_ENDPOINT_AUDIENCE_HOSTS = (
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.partner.microsoftonline.cn",
    ".okta.com",
    ".oktapreview.com",
    ".okta-emea.com",
)


def assertion_audience(creds: ClientCredentials, token_url: str) -> str:
    """The ``aud`` of a ``private_key_jwt`` assertion (see ``ClientCredentials``)."""
    choice = creds.assertion_audience
    if choice == "token_endpoint":
        return token_url
    if choice == "issuer":
        assert creds.issuer is not None  # checked by ClientCredentials
        return creds.issuer
    if choice is not None:
        return choice
    if creds.issuer is None:
        return token_url
    host = (urlsplit(token_url).hostname or "").lower()
    if any(
        host == h or (h.startswith(".") and host.endswith(h))
        for h in _TOKEN_ENDPOINT_AUDIENCE_HOSTS
    ):
        return token_url
    return creds.issuer


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def is_invalid_client(status: int, body: bytes) -> bool:
    """The answer refuses the client's authentication (RFC 6749 §5.2 ``invalid_client``)."""
    if status not in (400, 401):
        return False
    data = _json_object(body)
    return data is not None and data.get("error") == "invalid_client"


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _oauth_error(status: int, data: dict[str, Any] | None) -> TokenEndpointError | None:
    if data is None or not isinstance(data.get("error"), str):
        return None
    description = data.get("error_description")
    uri = data.get("error_uri")
    return TokenEndpointError(
        data["error"][:200],
        description[:500] if isinstance(description, str) else None,
        status_code=status,
        error_uri=uri if isinstance(uri, str) else None,
    )


def interpret_token_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    sent_at: float,
    now: float,
    policy: RefreshPolicy,
    rng: random.Random,
    dpop: bool = False,
) -> AccessToken:
    """Turn a token endpoint answer into an :class:`AccessToken`, or raise.

    Raises :class:`TokenEndpointError` (OAuth error, not retried), :class:`TransientFailure`
    (429/5xx, retried) or :class:`InvalidTokenResponse` (anything else malformed).
    ``dpop``: the request carried a DPoP proof, so ``token_type`` ``DPoP`` is accepted
    (RFC 9449 §5); without a proof a DPoP token could not be presented and is refused.
    """
    data = _json_object(body)
    if status == 429 or status >= 500:
        error = _oauth_error(status, data)
        reason = f" ({error.error})" if error else ""
        # Rate limited (429), or overloaded (503): what the server said about when to come
        # back, Retry-After or its rate-limit headers (IETF, Auth0, Okta).
        limited = read_rate_limit(headers, now) if status in (429, 503) else None
        if limited is not None:
            reason += f"; {limited.describe()}"
            retry_after = limited.wait
        else:
            retry_after = parse_retry_after(headers.get("retry-after"), now)
        raise TransientFailure(
            f"token endpoint answered HTTP {status}{reason}",
            retry_after=retry_after,
            rate_limit=limited,
        )
    if status != 200:
        error = _oauth_error(status, data)
        if error is not None:
            raise error
        raise InvalidTokenResponse(
            f"token endpoint answered HTTP {status} without an OAuth error body"
            f"{_content_hint(headers)}"
        )
    if data is None:
        raise InvalidTokenResponse(f"token response is not a JSON object{_content_hint(headers)}")
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise InvalidTokenResponse("token response has no string access_token")
    if not (access_token.isascii() and access_token.isprintable()):
        # RFC 6749 A.12: 1*VSCHAR (%x20-7E). Anything else cannot go in an Authorization
        # header: CR/LF/NUL make every API call fail in the HTTP stack for the token's whole
        # lifetime (and the fleet's, through a shared cache). Never echo the value.
        raise InvalidTokenResponse(
            "token response access_token has characters outside %x20-7E (RFC 6749 VSCHAR)"
        )
    token_type = data.get("token_type")
    # RFC 6749 §7.1: token_type is case-insensitive; we present Bearer, and DPoP (RFC 9449)
    # only when we sent a proof.
    kind = token_type.lower() if isinstance(token_type, str) else None
    if kind != "bearer" and not (dpop and kind == "dpop"):
        shown = token_type if isinstance(token_type, str) else type(token_type).__name__
        wanted = "Bearer or DPoP" if dpop else "Bearer"
        raise InvalidTokenResponse(f"token_type must be {wanted}, got {str(shown)[:40]!r}")
    expires_in = data.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isascii() and expires_in.isdigit():
        # Entra ID v1 (and some older servers) send "3599": RFC 6749 says a number, but the
        # meaning is unambiguous. Only plain ASCII digits: not "1e9", " 60", "-5" or "٣".
        expires_in = int(expires_in) if len(expires_in) < 12 else MAX_EXPIRES_IN + 1
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            raise InvalidTokenResponse("expires_in must be a number of seconds")
        # Below 1 s (0.5, 0, negative, NaN) a token is dead before it reaches an API, and
        # each call would fetch again (100 calls, 95 token requests): refused, and the
        # negative cache then bounds how often it is asked. Not clamped: RFC 6749 §5.1 gives
        # no meaning to such a value, so guessing one would hide a broken server.
        if not MIN_EXPIRES_IN <= expires_in <= MAX_EXPIRES_IN:
            shown = repr(expires_in) if isinstance(expires_in, float) else str(expires_in)[:20]
            raise InvalidTokenResponse(
                f"expires_in must be between {MIN_EXPIRES_IN} and {MAX_EXPIRES_IN} seconds, "
                f"got {shown}"
            )
    scope = data.get("scope")
    return policy.make_token(
        access_token=access_token,
        token_type="DPoP" if kind == "dpop" else "Bearer",
        expires_in=None if expires_in is None else float(expires_in),
        scope=scope if isinstance(scope, str) else None,
        sent_at=sent_at,
        rng=rng,
    )


def _content_hint(headers: Mapping[str, str]) -> str:
    content_type = headers.get("content-type")
    return f" (content-type {content_type[:60]!r})" if content_type else ""
