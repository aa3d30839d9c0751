"""Real-world client-credentials access tokens: the claim layouts of the big providers.

Each fixture copies the layout that Auth0, Okta, Entra ID (v1 and v2 tokens), Keycloak and
Amazon Cognito put in a machine-to-machine access token (from their documentation and decoded
sample tokens; identifiers are made up). They are signed by our LocalIssuer with the provider's
header shape, and verified with the settings README recommends for that provider. The claims are
signed exactly as written (``LocalIssuer.sign``): ``mint`` always adds ``aud``, ``azp`` and
``client_id``, which would hide the differences these tests are about.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from m2m_client.errors import ConfigurationError, InvalidToken
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier

TENANT = "4f5c7a2e-9d1b-4c3e-8a6f-2b7d9e0c1a34"  # Entra tenant id
API_APP_ID = "6e8d1c2b-3a4f-4e5d-9c8b-7a6f5e4d3c2b"  # Entra app registration of the API
CLIENT_APP_ID = "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e"  # Entra app registration of the worker


@dataclass(frozen=True)
class Shape:
    """One provider's token layout and the verifier settings that accept it."""

    provider: str
    issuer: str
    claims: dict[str, Any]
    header: dict[str, Any]
    settings: dict[str, Any]
    client_id: str
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    permissions: frozenset[str] = frozenset()
    other_audience: str | None = "https://other-api.example.com"
    extra: dict[str, Any] = field(default_factory=dict)


SHAPES = [
    Shape(
        provider="auth0",
        issuer="https://tenant.eu.auth0.com/",
        claims={
            "sub": "Xq7Lw2mN9pR4sT6v@clients",
            "aud": "https://api.example.com",
            "azp": "Xq7Lw2mN9pR4sT6v",
            "scope": "read:data write:data",
            "gty": "client-credentials",
            # RBAC with "Add Permissions in the Access Token" on:
            "permissions": ["read:data", "write:data"],
            # Roles need an Action, and custom claims must be namespaced:
            "https://api.example.com/roles": ["admin"],
        },
        header={"typ": "JWT"},
        settings={
            "audience": "https://api.example.com",
            "roles_claim": "https://api.example.com/roles",
        },
        client_id="Xq7Lw2mN9pR4sT6v",
        scopes=frozenset({"read:data", "write:data"}),
        roles=frozenset({"admin"}),
        permissions=frozenset({"read:data", "write:data"}),
    ),
    Shape(
        # Tokens that also name /userinfo (the API was requested with openid) list both.
        provider="auth0-aud-list",
        issuer="https://tenant.eu.auth0.com/",
        claims={
            "sub": "Xq7Lw2mN9pR4sT6v@clients",
            "aud": ["https://api.example.com", "https://tenant.eu.auth0.com/userinfo"],
            "azp": "Xq7Lw2mN9pR4sT6v",
            "scope": "openid read:data",
            "gty": "client-credentials",
        },
        header={"typ": "JWT"},
        settings={"audience": "https://api.example.com"},
        client_id="Xq7Lw2mN9pR4sT6v",
        scopes=frozenset({"openid", "read:data"}),
    ),
    Shape(
        # Custom authorization server "default"; no `uid` (no user), `scp` is a JSON array.
        provider="okta",
        issuer="https://dev-123456.okta.com/oauth2/default",
        claims={
            "ver": 1,
            "jti": "AT.k3LbmnQ1x9yFzW8rTn2VdP4sYh6uJc0e",
            "sub": "0oa8f5j3ecb5w1Tyq4x7",
            "aud": "api://default",
            "cid": "0oa8f5j3ecb5w1Tyq4x7",
            "scp": ["read:data", "write:data"],
        },
        header={},
        settings={"audience": "api://default"},
        client_id="0oa8f5j3ecb5w1Tyq4x7",
        scopes=frozenset({"read:data", "write:data"}),
    ),
    Shape(
        # v1.0 tokens (the default unless the API's manifest sets accessTokenAcceptedVersion 2):
        # sts.windows.net issuer, App ID URI audience, `appid`; app roles in `roles`, no `scp`.
        provider="entra-v1",
        issuer=f"https://sts.windows.net/{TENANT}/",
        claims={
            "aud": "api://m2m-example-api",
            "idp": f"https://sts.windows.net/{TENANT}/",
            "appid": CLIENT_APP_ID,
            "appidacr": "1",
            "oid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            "roles": ["Data.Read", "Data.Write"],
            "sub": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            "tid": TENANT,
            "uti": "Kx2bQp0sXkO3Fh1YvWc9AA",
            "ver": "1.0",
        },
        header={"typ": "JWT", "x5t": "nOo3ZDrODXEK1jKWhXslHR_KXEg"},
        settings={"audience": "api://m2m-example-api", "roles_claim": "roles"},
        client_id=CLIENT_APP_ID,
        roles=frozenset({"Data.Read", "Data.Write"}),
    ),
    Shape(
        # v2.0 tokens: login.microsoftonline.com/{tid}/v2.0 issuer, audience = the API's
        # application (client) id GUID, `azp` instead of `appid`.
        provider="entra-v2",
        issuer=f"https://login.microsoftonline.com/{TENANT}/v2.0",
        claims={
            "aud": API_APP_ID,
            "azp": CLIENT_APP_ID,
            "azpacr": "1",
            "oid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            "roles": ["Data.Read"],
            "sub": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            "tid": TENANT,
            "uti": "Kx2bQp0sXkO3Fh1YvWc9AA",
            "ver": "2.0",
        },
        header={"typ": "JWT"},
        settings={"audience": API_APP_ID, "roles_claim": "roles"},
        client_id=CLIENT_APP_ID,
        roles=frozenset({"Data.Read"}),
        other_audience="00000003-0000-0000-c000-000000000000",  # Microsoft Graph
    ),
    Shape(
        # Service-account token with an audience mapper for the API (without one, `aud` is
        # only "account", or absent: see the tests below). Realm roles are nested.
        provider="keycloak",
        issuer="https://sso.example.com/realms/services",
        claims={
            "jti": "3f0c1d2e-4b5a-4c6d-8e7f-9a0b1c2d3e4f",
            "sub": "7d3e1f2a-6b5c-4d4e-9f8a-0b1c2d3e4f5a",
            "aud": ["m2m-example-api", "account"],
            "typ": "Bearer",
            "azp": "billing-worker",
            "acr": "1",
            "realm_access": {"roles": ["default-roles-services", "offline_access", "admin"]},
            "resource_access": {
                "m2m-example-api": {"roles": ["data-reader"]},
                "account": {"roles": ["manage-account", "view-profile"]},
            },
            "scope": "profile email",
            "clientHost": "10.0.0.7",
            "email_verified": False,
            "preferred_username": "service-account-billing-worker",
            "clientAddress": "10.0.0.7",
            "client_id": "billing-worker",
        },
        header={"typ": "JWT"},
        settings={"audience": "m2m-example-api", "roles_claim": "realm_access.roles"},
        client_id="billing-worker",
        scopes=frozenset({"profile", "email"}),
        roles=frozenset({"default-roles-services", "offline_access", "admin"}),
    ),
    Shape(
        # Cognito access tokens carry no `aud` at all: the app client is `client_id`, and
        # `token_use` tells access tokens from ID tokens. Custom scopes are resource-server
        # identifier + "/" + scope name.
        provider="cognito",
        issuer="https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123",
        claims={
            "sub": "5hq3kd7a1fhp0m6r4e9t2u8c1o",
            "token_use": "access",
            "scope": "https://api.example.com/read https://api.example.com/write",
            "auth_time": 0,  # replaced by the issue time
            "version": 2,
            "jti": "8c4e2a1b-3d5f-4e6a-9b7c-0d1e2f3a4b5c",
            "client_id": "5hq3kd7a1fhp0m6r4e9t2u8c1o",
        },
        header={},
        # No aud to check: pin the app client and the token use instead (AWS's own checklist).
        settings={
            "audience": None,
            "required_claims": ["client_id", "token_use"],
            "expected_claims": {
                "token_use": "access",
                "client_id": ["5hq3kd7a1fhp0m6r4e9t2u8c1o"],
            },
        },
        client_id="5hq3kd7a1fhp0m6r4e9t2u8c1o",
        scopes=frozenset({"https://api.example.com/read", "https://api.example.com/write"}),
        other_audience=None,
    ),
]


def shape_params(*, exclude: tuple[str, ...] = ()) -> list[Any]:
    """SHAPES as pytest params, named by provider."""
    return [
        pytest.param(shape, id=shape.provider) for shape in SHAPES if shape.provider not in exclude
    ]


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    """One LocalIssuer serving its JWKS on 127.0.0.1; its tokens claim each provider's issuer."""
    # typ=None: the header carries what each provider sends (RFC 9068's at+jwt is rare here).
    with LocalIssuer("RS256", typ=None) as local:
        yield local


def token_for(issuer: LocalIssuer, shape: Shape, *, lifetime: int = 3600, **changes: Any) -> str:
    """Sign ``shape``'s claims as the provider would, issued now; ``changes`` edit the claims
    (a value of None removes the claim)."""
    now = int(time.time())
    claims = {"iss": shape.issuer, "iat": now, "nbf": now, "exp": now + lifetime, **shape.claims}
    if "auth_time" in claims:
        claims["auth_time"] = now
    if shape.provider.startswith("auth0") or shape.provider in {"okta", "cognito"}:
        del claims["nbf"]  # these providers send no nbf
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return issuer.sign(claims, headers=shape.header)


def verifier_for(issuer: LocalIssuer, shape: Shape, **overrides: Any) -> TokenVerifier:
    """The provider's recommended settings; JWKS from the LocalIssuer (no discovery)."""
    settings: dict[str, Any] = {
        "issuer": shape.issuer,
        "jwks_url": issuer.jwks_url,
        "algorithms": ["RS256"],
        **shape.settings,
        **overrides,
    }
    return TokenVerifier(**settings)


def assert_claims_match(claims: Claims, shape: Shape) -> None:
    assert claims.scopes == shape.scopes
    assert claims.roles == shape.roles
    assert claims.permissions == shape.permissions
    assert claims.issuer == shape.issuer


# --- every layout verifies with its provider's settings ---------------------------------------


@pytest.mark.parametrize("shape", shape_params())
def test_each_provider_token_verifies_with_its_documented_settings(
    issuer: LocalIssuer, shape: Shape
) -> None:
    claims = verifier_for(issuer, shape).verify(token_for(issuer, shape))

    assert_claims_match(claims, shape)


@pytest.mark.anyio
@pytest.mark.parametrize("shape", shape_params())
async def test_each_provider_token_verifies_with_the_async_verifier(
    issuer: LocalIssuer, shape: Shape
) -> None:
    settings: dict[str, Any] = {
        "issuer": shape.issuer,
        "jwks_url": issuer.jwks_url,
        "algorithms": ["RS256"],
        **shape.settings,
    }
    verifier = AsyncTokenVerifier(**settings)

    claims = await verifier.verify(token_for(issuer, shape))

    assert_claims_match(claims, shape)


@pytest.mark.parametrize("shape", shape_params(exclude=("cognito",)))
def test_each_provider_token_is_rejected_by_an_api_with_another_audience(
    issuer: LocalIssuer, shape: Shape
) -> None:
    verifier = verifier_for(issuer, shape, audience=shape.other_audience)

    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, shape))


@pytest.mark.parametrize("shape", shape_params())
def test_each_provider_token_is_rejected_when_the_issuer_differs(
    issuer: LocalIssuer, shape: Shape
) -> None:
    token = token_for(issuer, shape, iss=shape.issuer.rstrip("/") + "-evil/")

    with pytest.raises(InvalidToken):
        verifier_for(issuer, shape).verify(token)


# --- the differences that bite ------------------------------------------------------------------


def _shape(provider: str) -> Shape:
    return next(shape for shape in SHAPES if shape.provider == provider)


def test_okta_scp_list_and_entra_v1_appid_feed_the_same_claims_view(issuer: LocalIssuer) -> None:
    okta, entra = _shape("okta"), _shape("entra-v1")

    okta_claims = verifier_for(issuer, okta).verify(token_for(issuer, okta))
    entra_claims = verifier_for(issuer, entra).verify(token_for(issuer, entra))

    assert okta_claims.scopes == {"read:data", "write:data"}
    assert okta_claims["cid"] == okta_claims.subject  # for M2M, sub is the client too
    assert "uid" not in okta_claims
    assert entra_claims.client_id == entra_claims["appid"]


def test_entra_v1_token_is_rejected_by_a_verifier_set_up_for_v2(issuer: LocalIssuer) -> None:
    v1, v2 = _shape("entra-v1"), _shape("entra-v2")
    verifier = verifier_for(issuer, v2, audience=v1.settings["audience"])

    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, v1))


def test_entra_v2_api_may_accept_both_its_guid_and_its_app_id_uri(issuer: LocalIssuer) -> None:
    v2 = _shape("entra-v2")
    verifier = verifier_for(issuer, v2, audience=[API_APP_ID, "api://m2m-example-api"])

    claims = verifier.verify(token_for(issuer, v2, aud="api://m2m-example-api"))

    assert claims.audience == ("api://m2m-example-api",)


def test_keycloak_token_without_an_audience_mapper_is_rejected_by_the_api(
    issuer: LocalIssuer,
) -> None:
    keycloak = _shape("keycloak")
    verifier = verifier_for(issuer, keycloak)

    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, keycloak, aud="account"))
    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, keycloak, aud=None))


def test_keycloak_client_roles_are_read_from_resource_access(issuer: LocalIssuer) -> None:
    keycloak = _shape("keycloak")
    verifier = verifier_for(issuer, keycloak, roles_claim="resource_access.m2m-example-api.roles")

    claims = verifier.verify(token_for(issuer, keycloak))

    assert claims.roles == {"data-reader"}


def test_auth0_roles_are_empty_when_the_namespaced_claim_is_not_configured(
    issuer: LocalIssuer,
) -> None:
    auth0 = _shape("auth0")
    settings = {k: v for k, v in auth0.settings.items() if k != "roles_claim"}
    verifier = TokenVerifier(
        issuer=auth0.issuer, jwks_url=issuer.jwks_url, algorithms=["RS256"], **settings
    )

    claims = verifier.verify(token_for(issuer, auth0))

    assert claims.roles == frozenset()
    assert claims["gty"] == "client-credentials"


def test_auth0_layout_minted_by_local_issuer_mint_verifies_the_same(issuer: LocalIssuer) -> None:
    # LocalIssuer.mint produces Auth0's layout (plus client_id); its issuer is its own URL.
    token = issuer.mint(
        sub="Xq7Lw2mN9pR4sT6v@clients",
        audience="https://api.example.com",
        scope="read:data",
        permissions=["read:data"],
        roles=["admin"],
        gty="client-credentials",
    )
    verifier = TokenVerifier(
        issuer=issuer.url,
        jwks_url=issuer.jwks_url,
        audience="https://api.example.com",
        roles_claim=issuer.roles_claim_for("https://api.example.com"),
    )

    claims = verifier.verify(token)

    assert claims.client_id == "Xq7Lw2mN9pR4sT6v"
    assert claims.roles == {"admin"}
    assert claims.permissions == {"read:data"}


def test_cognito_token_without_aud_is_rejected_when_an_audience_is_configured(
    issuer: LocalIssuer,
) -> None:
    cognito = _shape("cognito")
    verifier = TokenVerifier(
        issuer=cognito.issuer, jwks_url=issuer.jwks_url, audience="https://api.example.com"
    )

    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, cognito))


def test_cognito_settings_still_require_the_client_id_and_token_use(issuer: LocalIssuer) -> None:
    cognito = _shape("cognito")
    verifier = verifier_for(issuer, cognito)

    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, cognito, client_id=None))
    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, cognito, token_use=None))


def test_cognito_id_tokens_and_other_app_clients_are_refused(issuer: LocalIssuer) -> None:
    # Without an aud, token_use and client_id are what keep out ID tokens and tokens issued
    # to another app client of the same user pool.
    cognito = _shape("cognito")
    verifier = verifier_for(issuer, cognito)

    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, cognito, token_use="id"))
    with pytest.raises(InvalidToken):
        verifier.verify(token_for(issuer, cognito, client_id="another-app-client"))


def test_an_audience_free_verifier_is_never_the_default() -> None:
    # Skipping the aud check must be asked for: a verifier built without it refuses to start.
    with pytest.raises((ConfigurationError, TypeError)):
        TokenVerifier(issuer="https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123")


# --- client id: azp (Auth0, Entra v2, Keycloak), appid (Entra v1), cid (Okta), client_id ------


@pytest.mark.parametrize("shape", shape_params())
def test_client_id_comes_from_each_providers_own_claim(issuer: LocalIssuer, shape: Shape) -> None:
    claims = verifier_for(issuer, shape).verify(token_for(issuer, shape))

    assert claims.client_id == shape.client_id


def test_cognito_client_id_claim_is_the_client_id() -> None:
    # Cognito needs no aud-free verifier to show this: Claims reads client_id directly.
    claims = Claims(dict(_shape("cognito").claims, iss="x", exp=0))

    assert claims.client_id == "5hq3kd7a1fhp0m6r4e9t2u8c1o"


# --- token endpoint response shapes (the calling side) --------------------------------------

ENTRA_V1_TOKEN_RESPONSE = {
    # The v1 endpoint (https://login.microsoftonline.com/{tenant}/oauth2/token) sends every
    # number as a string; shape copied from a real response, token shortened.
    "token_type": "Bearer",
    "expires_in": "3599",
    "ext_expires_in": "3599",
    "expires_on": "1700003599",
    "not_before": "1700000000",
    "resource": f"api://{API_APP_ID}",
    "access_token": "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.e30.c2ln",
}


def test_an_entra_v1_token_response_with_string_numbers_is_accepted() -> None:
    # Before: "expires_in": "3599" was refused as InvalidTokenResponse.
    import httpx

    from m2m_client import ClientCredentials, TokenClient

    from ._calling import streamed

    sent: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return streamed(httpx.Response(200, json=ENTRA_V1_TOKEN_RESPONSE))

    creds = ClientCredentials(
        token_url=f"https://login.microsoftonline.com/{TENANT}/oauth2/token",
        client_id=CLIENT_APP_ID,
        client_secret="entra-secret",
        resource=f"api://{API_APP_ID}",
        auth_method="client_secret_post",
    )
    http = httpx.Client(transport=httpx.MockTransport(endpoint))
    with TokenClient(creds, http_client=http, clock=lambda: 1_700_000_000.0) as tokens:
        token = tokens.get_token()
    assert token.access_token == ENTRA_V1_TOKEN_RESPONSE["access_token"]
    assert token.expires_at == 1_700_000_000.0 + 3599
    assert b"resource=api" in sent[0].content
