"""JWTBearer: status codes, WWW-Authenticate challenges and OpenAPI (m2m_client/fastapi.py)."""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime, and `x` is a local name there.

import logging
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
    ISSUER,
    NOW,
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
    challenge = response.headers["www-authenticate"]
    # RFC 6750 §3: scope= lists scopes only; a missing role is named in the description.
    assert "scope=" not in challenge
    assert 'error_description="the token lacks role admin"' in challenge
    ok = client.get("/admin", headers=bearer(token(**{f"{NS}/roles": ["admin"]})))
    assert ok.status_code == 200


def test_missing_permission_gives_403_and_granted_permission_passes(client: TestClient) -> None:
    response = client.get("/dashboard", headers=bearer(token()))
    assert response.status_code == 403
    assert "scope=" not in response.headers["www-authenticate"]
    assert "read:dashboard" in response.headers["www-authenticate"]
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


def test_two_authorization_headers_are_a_400_invalid_request(client: TestClient) -> None:
    # RFC 6750 §3.1: "Bearer good" then "Bearer bad" must not be read as the first one.
    response = client.get(
        "/protected",
        headers=[("Authorization", f"Bearer {token()}"), ("Authorization", "Bearer bad")],
    )
    assert response.status_code == 400
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_request"'


def _rights_app(kind: str, **needed: Any) -> TestClient:
    ep = JwksEndpoint()
    options = verifier_options(FakeClock())
    verifier: AsyncTokenVerifier | TokenVerifier
    if kind == "async":
        verifier = AsyncTokenVerifier(
            http_client=httpx.AsyncClient(transport=ep.transport()), **options
        )
    else:
        verifier = TokenVerifier(http_client=httpx.Client(transport=ep.transport()), **options)
    from fastapi import FastAPI

    app, auth = FastAPI(), JWTBearer(verifier)

    @app.get("/r")
    async def route(claims: Annotated[Claims, Depends(auth.require(**needed))]) -> Any:
        return {"ok": True}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_bare_string_in_require_is_one_role_not_its_characters(kind: str) -> None:
    client = _rights_app(kind, roles="admin")
    assert client.get("/r", headers=bearer(token(roles=["admin"]))).status_code == 200
    assert (
        client.get("/r", headers=bearer(token(roles=["a", "d", "m", "i", "n"]))).status_code == 403
    )


def test_require_refuses_a_non_string_list_at_route_definition() -> None:
    from m2m_client.errors import ConfigurationError

    auth = JWTBearer(TokenVerifier(**verifier_options(FakeClock())))
    with pytest.raises(ConfigurationError):
        auth.require(roles=[1])  # type: ignore[list-item]


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_403_lists_only_scopes_and_escapes_other_names_instead_of_stripping(kind: str) -> None:
    client = _rights_app(kind, scopes="read:items", permissions=['say "hi" \\ now'], roles="ops")
    response = client.get("/r", headers=bearer(token()))
    assert response.status_code == 403
    challenge = response.headers["www-authenticate"]
    assert 'scope="read:items"' in challenge
    assert "ops" not in challenge.split("scope=")[1]
    description = challenge.split('error_description="')[1].split('"')[0]
    assert "say %22hi%22 %5C now" in description  # escaped, never silently dropped
    assert "role ops" in description
    assert response.json()["detail"].count('"hi"') == 1  # the JSON body keeps the real name


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_discovery_issuer_mismatch_is_a_logged_configuration_error_not_an_outage(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    ep = JwksEndpoint(metadata_issuer="https://evil.test/")
    options = verifier_options(FakeClock(), jwks_url=None)
    verifier: AsyncTokenVerifier | TokenVerifier
    if kind == "async":
        verifier = AsyncTokenVerifier(
            http_client=httpx.AsyncClient(transport=ep.transport()), **options
        )
    else:
        verifier = TokenVerifier(http_client=httpx.Client(transport=ep.transport()), **options)
    from fastapi import FastAPI

    app, auth = FastAPI(), JWTBearer(verifier)

    @app.get("/r")
    async def route(claims: Annotated[Claims, Depends(auth)]) -> Any:
        return {"ok": True}

    with caplog.at_level(logging.ERROR, logger="m2m_client.verify"):
        response = TestClient(app, raise_server_exceptions=False).get("/r", headers=bearer(token()))
    # Never a 500; not "retry later" either: no Retry-After, and the log says what to fix.
    assert response.status_code == 503
    assert "Retry-After" not in response.headers
    assert "misconfigured" in response.json()["detail"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("https://evil.test/" in m and ISSUER in m for m in errors), errors


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_claim_of_400_digits_is_a_401_not_a_500(kind: str) -> None:
    client = build(kind)[0]
    for name in ("exp", "nbf", "iat"):
        response = client.get("/protected", headers=bearer(token(**{name: 10**400})))
        assert response.status_code == 401, name


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_deeply_nested_claims_are_a_401_not_a_500(kind: str) -> None:
    nested: Any = []
    for _ in range(499):
        nested = [nested]
    response = build(kind)[0].get("/protected", headers=bearer(token(deep=nested)))
    assert response.status_code == 401


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_during_a_jwks_outage_cached_keys_give_200_and_unknown_keys_a_fast_503(kind: str) -> None:
    from fastapi import FastAPI

    ep, clock = JwksEndpoint(cache_control="max-age=60"), FakeClock()
    options = verifier_options(clock)
    verifier: AsyncTokenVerifier | TokenVerifier
    if kind == "async":
        verifier = AsyncTokenVerifier(
            http_client=httpx.AsyncClient(transport=ep.transport()), **options
        )
    else:
        verifier = TokenVerifier(http_client=httpx.Client(transport=ep.transport()), **options)
    app, auth = FastAPI(), JWTBearer(verifier)

    @app.get("/p")
    async def route(claims: Annotated[Claims, Depends(auth)]) -> Any:
        return {"sub": claims.subject}

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/p", headers=bearer(token())).status_code == 200
    ep.fail = True
    clock.advance(3600)  # the set expired and the issuer is down
    ok = client.get("/p", headers=bearer(token(clock.now, jti="a")))
    assert ok.status_code == 200  # stale-while-error: the key is known
    fetches = ep.jwks_fetches
    other = sign(claims(clock.now), rsa_key("b"), kid="k2")
    unavailable = client.get("/p", headers=bearer(other))
    assert unavailable.status_code == 503
    assert 1 <= int(unavailable.headers["retry-after"]) <= 5
    assert ep.jwks_fetches == fetches  # within the back-off: no new fetch


def _hot_path_app(kind: str) -> tuple[TestClient, AsyncTokenVerifier | TokenVerifier, FakeClock]:
    from fastapi import FastAPI

    ep, clock = JwksEndpoint(cache_control="max-age=86400"), FakeClock()
    options = verifier_options(clock, leeway=0)
    verifier: AsyncTokenVerifier | TokenVerifier
    if kind == "async":
        verifier = AsyncTokenVerifier(
            http_client=httpx.AsyncClient(transport=ep.transport()), **options
        )
    else:
        verifier = TokenVerifier(http_client=httpx.Client(transport=ep.transport()), **options)
    app, auth = FastAPI(), JWTBearer(verifier)

    @app.get("/any")
    async def any_token(claims: Annotated[Claims, Depends(auth)]) -> Any:
        return {"sub": claims.subject}

    @app.get("/scoped")
    async def scoped(claims: Annotated[Claims, Security(auth, scopes=["read:items"])]) -> Any:
        return {"sub": claims.subject}

    @app.get("/admin")
    async def admin(claims: Annotated[Claims, Depends(auth.require(roles="admin"))]) -> Any:
        return {"sub": claims.subject}

    return TestClient(app, raise_server_exceptions=False), verifier, clock


def _full_path(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a repeated bearer token must be answered from the cache")


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_repeated_bearer_token_skips_the_verifier_but_not_the_route_demands(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, verifier, clock = _hot_path_app(kind)
    plain, admin = token(exp=int(NOW) + 100), token(exp=int(NOW) + 100, roles=["admin"])
    for tok in (plain, admin):
        assert client.get("/any", headers=bearer(tok)).status_code == 200
    for name in ("verify", "verify_cached"):
        monkeypatch.setattr(verifier, name, _full_path, raising=False)
    monkeypatch.setattr(verifier._core, "begin", _full_path)
    assert client.get("/any", headers=bearer(plain)).status_code == 200
    assert client.get("/admin", headers=bearer(admin)).status_code == 200
    # Scopes and roles the route demands are still checked on the cached claims.
    lacking_scope = client.get("/scoped", headers=bearer(plain))
    assert lacking_scope.status_code == 403
    assert 'scope="read:items"' in lacking_scope.headers["www-authenticate"]
    assert client.get("/admin", headers=bearer(plain)).status_code == 403
    monkeypatch.undo()
    clock.advance(100)  # exp is checked at each use, cached or not
    expired = client.get("/any", headers=bearer(plain))
    assert expired.status_code == 401
    assert "expired" in expired.headers["www-authenticate"]


def test_the_quick_scope_check_only_passes_what_the_full_check_would() -> None:
    from m2m_client.fastapi import _granted

    assert _granted(frozenset({"a", "b"}), ["a"])
    assert not _granted(frozenset({"a"}), ["a", "b"])
    # What names() refuses as configuration goes to the full check, which says so.
    assert not _granted(frozenset({""}), [""])
    assert not _granted(frozenset({"a"}), [["a"]])  # type: ignore[list-item]
