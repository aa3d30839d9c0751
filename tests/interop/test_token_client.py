"""The calling side against node oidc-provider: auth methods, discovery, resource, scope, errors.

oidc-provider speaks RFC 8707: the API is named with ``resource=`` (``audience`` is Auth0's own
parameter, which it ignores), and the token's ``aud`` is that resource.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest

from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials, TokenClient
from m2m_client.errors import TokenEndpointError
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier
from tests.interop.conftest import DEFAULT_RESOURCE, RESOURCE_BY_ALG, IdP

pytestmark = pytest.mark.interop

# (auth method, assertion algorithm for private_key_jwt)
AUTH_METHODS = [
    ("client_secret_basic", None),
    ("client_secret_post", None),
    ("private_key_jwt", "RS256"),
    ("private_key_jwt", "PS256"),
    ("private_key_jwt", "ES256"),
]
AUTH_IDS = [method if alg is None else f"{method}-{alg}" for method, alg in AUTH_METHODS]


def credentials(idp: IdP, method: str, alg: str | None = None, **options: Any) -> ClientCredentials:
    """ClientCredentials for one of the server's clients (token_url unless issuer= is given)."""
    options.setdefault("token_url", idp.token_url)
    if method == "client_secret_basic":
        client_id, secret = idp.basic_client
        return ClientCredentials(
            client_id=client_id, client_secret=secret, auth_method=method, **options
        )
    if method == "client_secret_post":
        client_id, secret = idp.post_client
        return ClientCredentials(
            client_id=client_id, client_secret=secret, auth_method=method, **options
        )
    key = idp.key_client
    pem, kid = (
        (key.ec_private_pem, key.ec_kid) if alg == "ES256" else (key.rsa_private_pem, key.rsa_kid)
    )
    return ClientCredentials(
        client_id=key.client_id,
        private_key=pem,
        private_key_id=kid,
        signing_algorithm=alg,
        auth_method="private_key_jwt",
        **options,
    )


def unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


# --- each auth method gets a token ---------------------------------------------------------


@pytest.mark.parametrize(("method", "alg"), AUTH_METHODS, ids=AUTH_IDS)
def test_each_auth_method_gets_a_token_sync(idp: IdP, method: str, alg: str | None) -> None:
    creds = credentials(idp, method, alg)
    before = time.time()

    with TokenClient(creds) as tokens:
        token = tokens.get_token()

    claims = unverified_claims(token.access_token)
    assert claims["client_id"] == creds.client_id
    assert claims["aud"] == DEFAULT_RESOURCE
    assert token.token_type.lower() == "bearer"
    # The server grants 300 s; expiry counts from when the request was sent.
    assert before + 250 <= token.expires_at <= time.time() + 300


@pytest.mark.anyio
@pytest.mark.parametrize(("method", "alg"), AUTH_METHODS, ids=AUTH_IDS)
async def test_each_auth_method_gets_a_token_async(idp: IdP, method: str, alg: str | None) -> None:
    creds = credentials(idp, method, alg)

    async with AsyncTokenClient(creds) as tokens:
        token = await tokens.get_token()

    assert unverified_claims(token.access_token)["client_id"] == creds.client_id


def test_a_cached_token_is_reused_and_force_refresh_gets_a_new_one(idp: IdP) -> None:
    with TokenClient(credentials(idp, "client_secret_basic")) as tokens:
        first = tokens.get_token()
        again = tokens.get_token()
        fresh = tokens.get_token(force_refresh=True)

    assert again.access_token == first.access_token
    assert (
        unverified_claims(fresh.access_token)["jti"] != unverified_claims(first.access_token)["jti"]
    )


# --- discovery ------------------------------------------------------------------------------


def test_discovery_from_the_issuer_finds_the_token_endpoint_sync(idp: IdP) -> None:
    creds = credentials(idp, "client_secret_basic", token_url=None, issuer=idp.issuer)

    with TokenClient(creds) as tokens:
        token = tokens.get_token()

    assert unverified_claims(token.access_token)["iss"] == idp.issuer


@pytest.mark.anyio
async def test_discovery_from_the_issuer_finds_the_token_endpoint_async(idp: IdP) -> None:
    creds = credentials(idp, "private_key_jwt", "ES256", token_url=None, issuer=idp.issuer)

    async with AsyncTokenClient(creds) as tokens:
        token = await tokens.get_token()

    assert unverified_claims(token.access_token)["iss"] == idp.issuer


# --- resource and scope reach the token -------------------------------------------------------


@pytest.mark.parametrize(("alg", "resource"), sorted(RESOURCE_BY_ALG.items()))
def test_resource_and_scope_reach_the_token(idp: IdP, alg: str, resource: str) -> None:
    creds = credentials(idp, "client_secret_post", resource=resource, scope="read:data write:data")

    with TokenClient(creds) as tokens:
        token = tokens.get_token()

    claims = unverified_claims(token.access_token)
    assert jwt.get_unverified_header(token.access_token)["alg"] == alg
    assert claims["aud"] == resource
    assert set(claims["scope"].split()) == {"read:data", "write:data"}
    assert token.scope is not None
    assert set(token.scope.split()) == {"read:data", "write:data"}


@pytest.mark.anyio
async def test_per_call_scope_is_requested_and_cached_apart(idp: IdP) -> None:
    creds = credentials(idp, "client_secret_basic", resource=RESOURCE_BY_ALG["ES256"])

    async with AsyncTokenClient(creds) as tokens:
        read = await tokens.get_token(scope="read:data")
        write = await tokens.get_token(scope="write:data")

    assert unverified_claims(read.access_token)["scope"] == "read:data"
    assert unverified_claims(write.access_token)["scope"] == "write:data"


def test_scopes_the_resource_does_not_define_are_not_granted(idp: IdP) -> None:
    creds = credentials(idp, "client_secret_basic", scope="read:data admin:everything")

    with TokenClient(creds) as tokens:
        token = tokens.get_token()

    assert unverified_claims(token.access_token)["scope"] == "read:data"
    assert token.scope == "read:data"


def test_auth0_style_audience_is_not_a_resource_for_an_rfc8707_server(idp: IdP) -> None:
    # `audience` is Auth0's parameter; oidc-provider ignores it and issues for its default
    # resource, which is why README says to use `resource=` with RFC 8707 servers.
    creds = credentials(idp, "client_secret_basic", audience=RESOURCE_BY_ALG["ES256"])

    with TokenClient(creds) as tokens:
        token = tokens.get_token()

    assert unverified_claims(token.access_token)["aud"] == DEFAULT_RESOURCE


# --- errors -----------------------------------------------------------------------------------


def test_wrong_secret_gives_invalid_client_sync(idp: IdP) -> None:
    client_id, _ = idp.basic_client
    creds = ClientCredentials(
        token_url=idp.token_url, client_id=client_id, client_secret="not-the-secret"
    )

    with TokenClient(creds) as tokens, pytest.raises(TokenEndpointError) as caught:
        tokens.get_token()

    assert caught.value.error == "invalid_client"
    assert caught.value.status_code == 401
    assert "not-the-secret" not in str(caught.value)


@pytest.mark.anyio
async def test_wrong_secret_gives_invalid_client_async(idp: IdP) -> None:
    client_id, _ = idp.post_client
    creds = ClientCredentials(
        token_url=idp.token_url,
        client_id=client_id,
        client_secret="not-the-secret",
        auth_method="client_secret_post",
    )

    async with AsyncTokenClient(creds) as tokens:
        with pytest.raises(TokenEndpointError) as caught:
            await tokens.get_token()

    assert caught.value.error == "invalid_client"


def test_an_assertion_signed_with_an_unregistered_key_gives_invalid_client(idp: IdP) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    stranger = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    creds = ClientCredentials(
        token_url=idp.token_url,
        client_id=idp.key_client.client_id,
        private_key=stranger.decode(),
        private_key_id=idp.key_client.ec_kid,
    )

    with TokenClient(creds) as tokens, pytest.raises(TokenEndpointError) as caught:
        tokens.get_token()

    assert caught.value.error == "invalid_client"


def test_an_unknown_resource_gives_invalid_target(idp: IdP) -> None:
    creds = credentials(idp, "client_secret_basic", resource="https://unknown.api.test/")

    with TokenClient(creds) as tokens, pytest.raises(TokenEndpointError) as caught:
        tokens.get_token()

    assert caught.value.error == "invalid_target"


# --- BearerAuth end to end: real IdP token, verified by a resource server -----------------------


def _protected_api(verifier: TokenVerifier) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return httpx.Response(401)
        claims = verifier.verify(token)
        return httpx.Response(200, json={"client_id": claims.client_id})

    return httpx.MockTransport(handler)


def test_bearer_auth_calls_an_api_that_verifies_the_token_sync(idp: IdP) -> None:
    resource = RESOURCE_BY_ALG["PS256"]
    creds = credentials(idp, "client_secret_basic", resource=resource)
    verifier = TokenVerifier(issuer=idp.issuer, audience=resource, algorithms=["PS256"])

    with (
        TokenClient(creds) as tokens,
        httpx.Client(auth=BearerAuth(tokens), transport=_protected_api(verifier)) as api,
    ):
        response = api.get("https://api.test/data")

    assert response.status_code == 200
    assert response.json() == {"client_id": "basic-client"}


@pytest.mark.anyio
async def test_bearer_auth_calls_an_api_that_verifies_the_token_async(idp: IdP) -> None:
    resource = RESOURCE_BY_ALG["ES256"]
    creds = credentials(idp, "private_key_jwt", "ES256", resource=resource)
    verifier = AsyncTokenVerifier(issuer=idp.issuer, audience=resource, algorithms=["ES256"])
    seen: list[str | None] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        seen.append((await verifier.verify(token)).client_id)
        return httpx.Response(200)

    async with (
        AsyncTokenClient(creds) as tokens,
        httpx.AsyncClient(auth=BearerAuth(tokens), transport=httpx.MockTransport(handler)) as api,
    ):
        response = await api.get("https://api.test/data")

    assert response.status_code == 200
    assert seen == ["jwt-client"]
