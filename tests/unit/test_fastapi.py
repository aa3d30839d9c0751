"""JWTBearer: status codes, WWW-Authenticate challenges and OpenAPI (m2m_client/fastapi.py)."""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime, and `x` is a local name there.

from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, Security
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2m_client._demo_app import create_app
from m2m_client.fastapi import JWTBearer
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier

from ._jwt_factory import (
    FakeClock,
    JwksEndpoint,
    claims,
    rsa_key,
    sign,
    token,
    verifier_options,
)

NS = "https://api.test"


def build(kind: str = "async", ep: JwksEndpoint | None = None) -> tuple[TestClient, JwksEndpoint]:
    ep = ep or JwksEndpoint()
    options = verifier_options(FakeClock(), roles_claim=f"{NS}/roles")
    verifier: AsyncTokenVerifier | TokenVerifier
    if kind == "async":
        verifier = AsyncTokenVerifier(
            http_client=httpx.AsyncClient(transport=ep.transport()), **options
        )
    else:
        verifier = TokenVerifier(http_client=httpx.Client(transport=ep.transport()), **options)
    app = create_app(verifier, claims_namespace=NS)
    auth = JWTBearer(verifier)

    @app.get("/items")
    async def items(claims: Annotated[Claims, Security(auth, scopes=["read:items"])]) -> Any:
        return {"sub": claims.subject}

    @app.get("/optional")
    async def optional(
        claims: Annotated[Claims | None, Depends(JWTBearer(verifier, auto_error=False))],
    ) -> Any:
        return {"anonymous": claims is None}

    return TestClient(app, raise_server_exceptions=False), ep


@pytest.fixture(params=["async", "sync"])
def client(request: pytest.FixtureRequest) -> TestClient:
    return build(request.param)[0]


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def test_public_route_needs_no_token(client: TestClient) -> None:
    assert client.get("/").status_code == 200


def test_a_valid_token_reaches_the_protected_route(client: TestClient) -> None:
    response = client.get("/protected", headers=bearer(token()))
    assert response.status_code == 200
    assert response.json()["subject"] == "worker@clients"
    again = client.get("/protected", headers=bearer(token()))  # cached path
    assert again.status_code == 200


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Basic dTpw"}, {"Authorization": "Bearer"}]
)
def test_no_bearer_token_gives_401_without_an_error_code(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.get("/protected", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_an_invalid_token_gives_401_invalid_token_without_echoing_it(client: TestClient) -> None:
    bad = sign(claims(), rsa_key("other"))
    response = client.get("/protected", headers=bearer(bad))
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    for part in bad.split("."):
        assert part not in response.text
        assert part not in challenge


def test_an_expired_token_gives_401(client: TestClient) -> None:
    response = client.get("/protected", headers=bearer(token(exp=1)))
    assert response.status_code == 401
    assert "expired" in response.headers["www-authenticate"]


def test_missing_role_gives_403_insufficient_scope(client: TestClient) -> None:
    response = client.get("/admin", headers=bearer(token()))
    assert response.status_code == 403
    assert response.headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')
    assert 'scope="admin"' in response.headers["www-authenticate"]
    ok = client.get("/admin", headers=bearer(token(**{f"{NS}/roles": ["admin"]})))
    assert ok.status_code == 200


def test_missing_permission_gives_403_and_granted_permission_passes(client: TestClient) -> None:
    response = client.get("/dashboard", headers=bearer(token()))
    assert response.status_code == 403
    assert 'scope="read:dashboard"' in response.headers["www-authenticate"]
    good = token(permissions=["read:dashboard"])
    assert client.get("/dashboard", headers=bearer(good)).status_code == 200


def test_security_scopes_are_checked_against_the_token_scopes(client: TestClient) -> None:
    response = client.get("/items", headers=bearer(token()))
    assert response.status_code == 403
    assert 'scope="read:items"' in response.headers["www-authenticate"]
    assert client.get("/items", headers=bearer(token(scope="read:items"))).status_code == 200


def test_profile_route_returns_custom_claims(client: TestClient) -> None:
    tok = token(email="w@example.com", **{f"{NS}/organization": "acme"})
    body = client.get("/profile", headers=bearer(tok)).json()
    assert body["email"] == "w@example.com"
    assert body["organization"] == "acme"


def test_auto_error_false_gives_none_without_a_token_but_still_refuses_bad_ones(
    client: TestClient,
) -> None:
    assert client.get("/optional").json() == {"anonymous": True}
    assert client.get("/optional", headers=bearer(token())).json() == {"anonymous": False}
    assert client.get("/optional", headers=bearer("x.y.z")).status_code == 401


def test_jwks_outage_with_no_keys_gives_503_with_retry_after() -> None:
    client, _ = build("async", JwksEndpoint(fail=True))
    response = client.get("/protected", headers=bearer(token()))
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "temporarily unavailable" in response.json()["detail"]


def test_openapi_shows_an_http_bearer_scheme(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["JWTBearer"]
    assert scheme == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert schema["paths"]["/protected"]["get"]["security"] == [{"JWTBearer": []}]
    assert schema["paths"]["/items"]["get"]["security"] == [{"JWTBearer": ["read:items"]}]


_header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300),
    st.builds(
        lambda s: "Bearer " + s,
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=400),
    ),
    st.builds(lambda s: "Bearer " + s, st.from_regex(r"[A-Za-z0-9_.\-]{0,300}", fullmatch=True)),
)
_fuzz_client, _ = build("async")
_sync_fuzz_client, _ = build("sync")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_header_values, route=st.sampled_from(["/protected", "/admin", "/items"]))
def test_any_authorization_header_gives_401_or_403_never_500(value: str, route: str) -> None:
    for fuzz_client in (_fuzz_client, _sync_fuzz_client):
        response = fuzz_client.get(route, headers={"Authorization": value})
        assert response.status_code in (401, 403)
        assert response.headers["www-authenticate"].startswith("Bearer")
        stripped = value.removeprefix("Bearer ").strip()
        if len(stripped) > 8:
            assert stripped not in response.text
