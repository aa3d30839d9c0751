"""Sans-IO OAuth: token requests for each auth method, token/error/discovery responses."""

from __future__ import annotations

import base64
import json
import random
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from m2m_client import (
    ClientCredentials,
    ConfigurationError,
    InvalidTokenResponse,
    RefreshPolicy,
    TokenEndpointError,
)
from m2m_client._oauth import (
    ASSERTION_LIFETIME,
    ClientAuthenticator,
    interpret_token_response,
)
from m2m_client._retry import TransientFailure

URL = "https://as.example.com/oauth/token"
NOW = 1_700_000_000.0


def form(content: bytes) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(content.decode(), keep_blank_values=True).items()}


def request_for(creds: ClientCredentials, **kw: Any) -> tuple[dict[str, str], dict[str, str]]:
    args: dict[str, Any] = {"audience": None, "resource": None, "scopes": (), "now": NOW}
    args.update(kw)
    req = ClientAuthenticator(creds).token_request(URL, **args)
    assert req.method == "POST"
    assert req.url == URL
    return req.headers, form(req.content)


def test_client_secret_basic_form_urlencodes_id_and_secret_before_base64() -> None:
    creds = ClientCredentials(token_url=URL, client_id="svc:a b", client_secret="p@ss:wörd+/")
    headers, body = request_for(creds, audience="https://api", scopes=("read", "write"))
    scheme, _, encoded = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    raw_id, raw_secret = base64.b64decode(encoded).decode().split(":")
    assert raw_id == "svc%3Aa+b"  # RFC 6749 §2.3.1: ':' inside the id must not split the pair
    assert (unquote_plus(raw_id), unquote_plus(raw_secret)) == ("svc:a b", "p@ss:wörd+/")
    assert body == {
        "grant_type": "client_credentials",
        "scope": "read write",
        "audience": "https://api",
    }
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_client_secret_post_sends_credentials_in_the_body_with_resource() -> None:
    creds = ClientCredentials(
        token_url=URL,
        client_id="svc",
        client_secret="s",
        auth_method="client_secret_post",
        extra_params={"organization": "org_1"},
    )
    headers, body = request_for(creds, resource="https://res")
    assert "Authorization" not in headers
    assert body == {
        "grant_type": "client_credentials",
        "resource": "https://res",
        "organization": "org_1",
        "client_id": "svc",
        "client_secret": "s",
    }


def keypair(kind: str) -> tuple[str, Any]:
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, key.public_key()


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("rsa", "PS256"), ("ec", "ES256")])
def test_private_key_jwt_assertion_follows_rfc_7523(kind: str, alg: str) -> None:
    pem, public = keypair(kind)
    creds = ClientCredentials(
        token_url=URL,
        client_id="svc",
        private_key=pem,
        private_key_id="kid-1",
        signing_algorithm=alg,  # type: ignore[arg-type]
    )
    headers, body = request_for(creds)
    assert "Authorization" not in headers
    assert body["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert body["client_id"] == "svc"
    assertion = body["client_assertion"]
    assert jwt.get_unverified_header(assertion)["kid"] == "kid-1"
    assert jwt.get_unverified_header(assertion)["alg"] == alg
    claims = jwt.decode(
        assertion, public, algorithms=[alg], audience=URL, options={"verify_exp": False}
    )
    assert claims["iss"] == claims["sub"] == "svc"
    assert claims["iat"] == int(NOW)
    assert claims["exp"] - claims["iat"] == ASSERTION_LIFETIME <= 120
    _, second = request_for(creds)
    assert (
        jwt.decode(second["client_assertion"], options={"verify_signature": False})["jti"]
        != claims["jti"]
    )


def test_assertion_audience_can_be_set_to_the_issuer() -> None:
    pem, _ = keypair("ec")
    creds = ClientCredentials(
        token_url=URL,
        client_id="svc",
        private_key=pem,
        assertion_audience="https://as.example.com/",
    )
    _, body = request_for(creds)
    claims = jwt.decode(body["client_assertion"], options={"verify_signature": False})
    assert claims["aud"] == "https://as.example.com/"
    assert "kid" not in jwt.get_unverified_header(body["client_assertion"])


def interpret(status: int, body: Any, headers: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return interpret_token_response(
        status,
        httpx.Headers(headers or {}),
        raw,
        sent_at=NOW,
        now=NOW + 1,
        policy=RefreshPolicy(),
        rng=random.Random(0),
    )


def test_a_good_response_becomes_an_access_token_expiring_from_the_send_time() -> None:
    token = interpret(
        200, {"access_token": "abc", "token_type": "bearer", "expires_in": 600, "scope": "a b"}
    )
    assert (token.access_token, token.token_type, token.scope) == ("abc", "Bearer", "a b")
    assert token.expires_at == NOW + 600
    assert token.issued_at == NOW


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"<html>Bad gateway</html>", "not a JSON object"),
        (b"", "not a JSON object"),
        (b"[1,2]", "not a JSON object"),
        (b"\xff\xfe", "not a JSON object"),
        ({"token_type": "Bearer"}, "access_token"),
        ({"access_token": 42, "token_type": "Bearer"}, "access_token"),
        ({"access_token": "", "token_type": "Bearer"}, "access_token"),
        ({"access_token": "a", "token_type": "mac"}, "token_type"),
        ({"access_token": "a"}, "token_type"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": -5}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": 0}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": 10**12}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": "1e3"}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": " 60"}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": "-5"}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": "\u0663"}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": "9" * 40}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": True}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": False}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": 0.5}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": 0.999}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": -0.0}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": "0"}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": "0.5"}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": "abc"}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": [60]}, "expires_in"),
        ({"access_token": "a", "token_type": "Bearer", "expires_in": 10**400}, "expires_in"),
        (b'{"access_token": "a", "token_type": "Bearer", "expires_in": NaN}', "expires_in"),
        (b'{"access_token": "a", "token_type": "Bearer", "expires_in": Infinity}', "expires_in"),
        (b'{"access_token": "a", "token_type": "Bearer", "expires_in": -Infinity}', "expires_in"),
        (b'{"access_token": "a", "token_type": "Bearer", "expires_in": 1e400}', "expires_in"),
    ],
)
def test_every_malformed_response_is_an_invalid_token_response(body: Any, fragment: str) -> None:
    with pytest.raises(InvalidTokenResponse, match=fragment):
        interpret(200, body, {"content-type": "text/html"})


@pytest.mark.parametrize("value", [1, 1.5, "3599", 366 * 24 * 3600])
def test_expires_in_from_one_second_to_a_year_is_accepted(value: object) -> None:
    token = interpret(200, {"access_token": "a", "token_type": "Bearer", "expires_in": value})
    assert token.expires_at == NOW + float(value)  # type: ignore[arg-type]


def test_a_jwt_exp_less_than_a_second_after_sending_is_skew_not_the_expiry() -> None:
    # The sibling of expires_in 0.5: a JWT whose exp is 0.5 s after our send time would make
    # every call fetch again; like an exp already past, it is taken as clock skew.
    claims = base64.urlsafe_b64encode(json.dumps({"exp": NOW + 0.5}).encode()).decode()
    access = f"e30.{claims.rstrip('=')}.sig"
    token = interpret(200, {"access_token": access, "token_type": "Bearer", "expires_in": 600})
    assert token.expires_at == NOW + 600


def test_oauth_error_body_becomes_token_endpoint_error() -> None:
    with pytest.raises(TokenEndpointError) as info:
        interpret(401, {"error": "invalid_client", "error_description": "Unknown client"})
    assert (info.value.error, info.value.error_description, info.value.status_code) == (
        "invalid_client",
        "Unknown client",
        401,
    )
    assert "invalid_client" in str(info.value)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 302])
def test_a_non_200_without_oauth_error_body_is_invalid_not_a_key_error(status: int) -> None:
    with pytest.raises(InvalidTokenResponse, match=f"HTTP {status}"):
        interpret(status, b"<html>nope</html>", {"content-type": "text/html"})


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_429_and_5xx_are_transient_and_carry_retry_after(status: int) -> None:
    with pytest.raises(TransientFailure) as info:
        interpret(status, {"error": "temporarily_unavailable"}, {"retry-after": "3"})
    assert info.value.retry_after == 3.0


@pytest.mark.parametrize(
    ("token_url", "issuer", "choice", "expected"),
    [
        # RFC 7523bis: the issuer identifier, a single string, when the issuer is known.
        ("https://as.example.com/oauth/token", "https://as.example.com/", None, "issuer"),
        ("https://as.example.com/oauth/token", None, None, "token_endpoint"),
        # Entra ID and Okta document the token endpoint: kept by default on their hosts.
        (
            "https://login.microsoftonline.com/t/oauth2/v2.0/token",
            "https://login.microsoftonline.com/t/v2.0",
            None,
            "token_endpoint",
        ),
        ("https://acme.okta.com/oauth2/v1/token", "https://acme.okta.com", None, "token_endpoint"),
        ("https://evil-okta.com/oauth2/v1/token", "https://evil-okta.com/", None, "issuer"),
        # Chosen explicitly.
        ("https://acme.okta.com/oauth2/v1/token", "https://acme.okta.com", "issuer", "issuer"),
        (
            "https://as.example.com/oauth/token",
            "https://as.example.com/",
            "token_endpoint",
            "token_endpoint",
        ),
    ],
)
def test_assertion_audience_is_the_issuer_when_known(
    token_url: str, issuer: str | None, choice: str | None, expected: str
) -> None:
    pem, _ = keypair("ec")
    creds = ClientCredentials(
        token_url=token_url,
        issuer=issuer,
        client_id="svc",
        private_key=pem,
        assertion_audience=choice,
    )
    request = ClientAuthenticator(creds).token_request(
        token_url, audience=None, resource=None, scopes=(), now=NOW
    )
    body = form(request.content)
    claims = jwt.decode(body["client_assertion"], options={"verify_signature": False})
    assert claims["aud"] == (issuer if expected == "issuer" else token_url)
    assert isinstance(claims["aud"], str)  # a single string, never a list


def test_assertion_audience_issuer_needs_an_issuer() -> None:
    pem, _ = keypair("ec")
    with pytest.raises(ConfigurationError, match="assertion_audience"):
        ClientCredentials(
            token_url=URL, client_id="svc", private_key=pem, assertion_audience="issuer"
        )
