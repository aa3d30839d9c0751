"""One shape suite, every integration: FastAPI (JWTBearer), ASGI (JWTMiddleware on Starlette),
Flask (JWTAuth) and Django (JWTMiddleware), each through its own test client and once
through a real server on loopback. The answers -- status, WWW-Authenticate, DPoP -- must be
the same everywhere, byte for byte, because one core decides them (verify/_receive.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, DPoPSettings, TokenVerifier

from . import _services
from ._services import FRAMEWORKS, METADATA_URL, RESOURCE, TestService

META = f'resource_metadata="{METADATA_URL}"'
ALGS = f'algs="{DPoPSettings().algs_parameter}"'


def _options(issuer: LocalIssuer, dpop: str) -> dict[str, Any]:
    return {
        "issuer": issuer.url,
        "audience": issuer.audience,
        "roles_claim": issuer.roles_claim,
        "dpop": dpop,
    }


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_service(framework: str, local_issuer: LocalIssuer) -> Iterator[Callable[..., TestService]]:
    made: list[TestService] = []

    def make(dpop: str = "disabled") -> TestService:
        options = _options(local_issuer, dpop)
        service = TestService(framework, TokenVerifier(**options), AsyncTokenVerifier(**options))
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def test_a_valid_token_is_served_and_its_claims_reach_the_view(
    make_service: Callable[..., TestService], local_issuer: LocalIssuer
) -> None:
    service = make_service()
    answer = service.get("/protected", _bearer(local_issuer.mint(sub="svc@clients")))
    assert answer.status == 200, answer.body
    assert answer.body == {"subject": "svc@clients"}


def test_no_token_gets_401_with_the_bearer_challenge_naming_the_metadata(
    make_service: Callable[..., TestService],
) -> None:
    answer = make_service().get("/protected")
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == f"Bearer {META}"
    assert "detail" in answer.body


@pytest.mark.parametrize(
    "kind",
    ["malformed", "non-ASCII", "expired", "wrong audience", "wrong issuer", "unknown scheme"],
)
def test_a_bad_token_gets_401_invalid_token(
    make_service: Callable[..., TestService], local_issuer: LocalIssuer, kind: str
) -> None:
    token = {
        "malformed": lambda: "not-a-jwt",
        "non-ASCII": lambda: "ey\xe9\xff.\x85.\xa0",
        "expired": lambda: local_issuer.mint(expires_in=-600),
        "wrong audience": lambda: local_issuer.mint(audience="https://other.example.com"),
        "wrong issuer": lambda: local_issuer.mint(iss="https://evil.example.com/"),
        "unknown scheme": lambda: local_issuer.mint(),
    }[kind]()
    headers = [("Authorization", f"Basic {token}")] if kind == "unknown scheme" else _bearer(token)
    answer = make_service().get("/protected", headers)
    assert answer.status == 401
    challenge = answer.headers["www-authenticate"]
    if kind == "unknown scheme":  # RFC 6750 §3.1: no credentials we know -> no error code
        assert challenge == f"Bearer {META}"
    else:
        assert challenge.startswith('Bearer error="invalid_token", error_description="')
        assert challenge.endswith(f", {META}")
    assert token not in str(answer.headers)
    assert token not in str(answer.body)


def test_missing_role_and_missing_scope_get_403_insufficient_scope(
    make_service: Callable[..., TestService], local_issuer: LocalIssuer
) -> None:
    service = make_service()
    plain = _bearer(local_issuer.mint(roles=["reader"], scope="other"))
    admin = service.get("/admin", plain)
    assert admin.status == 403
    assert admin.headers["www-authenticate"].startswith(
        'Bearer error="insufficient_scope", error_description="'
    )
    assert "admin" in admin.headers["www-authenticate"]
    items = service.get("/items", plain)
    assert items.status == 403
    assert 'scope="read:items"' in items.headers["www-authenticate"]
    assert service.get("/admin", _bearer(local_issuer.mint(roles=["admin"]))).status == 200
    assert service.get("/items", _bearer(local_issuer.mint(scope="read:items"))).status == 200


def test_two_authorization_headers_are_refused_never_served(
    make_service: Callable[..., TestService], local_issuer: LocalIssuer
) -> None:
    service = make_service()
    token = local_issuer.mint(roles=["admin"])
    answer = service.get("/protected", [*_bearer(token), *_bearer(token)])
    # ASGI sees two headers: 400 invalid_request. A WSGI server folds them into one value
    # ("Bearer t,Bearer t"), which no token matches: 401 invalid_token.
    expected = 400 if service.framework in ("fastapi", "asgi") else 401
    assert answer.status == expected
    code = "invalid_request" if expected == 400 else "invalid_token"
    assert answer.headers["www-authenticate"].startswith(f'Bearer error="{code}"')


def test_public_paths_are_served_without_a_token_but_route_rights_still_hold(
    make_service: Callable[..., TestService], local_issuer: LocalIssuer
) -> None:
    service = make_service()
    assert service.get("/public").status == 200
    refused = service.get("/public-admin")
    assert refused.status == 401
    assert refused.headers["www-authenticate"] == f"Bearer {META}"
    # A public path is no way around a route's requirement: a token is not even read there.
    assert service.get("/public-admin", _bearer(local_issuer.mint(roles=["reader"]))).status in (
        401,
        403,
    )


def test_the_metadata_document_is_served_at_the_well_known_path(
    make_service: Callable[..., TestService], local_issuer: LocalIssuer
) -> None:
    answer = make_service().get("/.well-known/oauth-protected-resource")
    assert answer.status == 200
    assert answer.body == {
        "resource": RESOURCE,
        "authorization_servers": [local_issuer.url],
        "scopes_supported": ["read:items"],
        "bearer_methods_supported": ["header"],
    }


def test_dpop_required_refuses_bearer_and_serves_a_bound_token_with_its_proof(
    make_service: Callable[..., TestService],
    local_issuer: LocalIssuer,
    dpop_headers: Callable[..., dict[str, str]],
) -> None:
    service = make_service("required")
    missing = service.get("/protected")
    assert missing.status == 401
    assert missing.headers["www-authenticate"] == f"DPoP {ALGS}, {META}"
    bearer = service.get("/protected", _bearer(local_issuer.mint()))
    assert bearer.status == 401
    assert bearer.headers["www-authenticate"].startswith('DPoP error="invalid_token"')
    headers = dpop_headers("GET", f"{service.base}/protected", sub="bound@clients")
    served = service.get("/protected", list(headers.items()))
    assert served.status == 200, served.body
    assert served.body == {"subject": "bound@clients"}
    replayed = service.get("/protected", list(headers.items()))  # the same proof again
    assert replayed.status == 401
    assert replayed.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    wrong_url = dpop_headers("GET", f"{service.base}/elsewhere")
    assert service.get("/protected", list(wrong_url.items())).status == 401
    # Two DPoP headers (RFC 9449 §4.3 step 1), each a valid proof: refused, never served.
    fresh = dpop_headers("GET", f"{service.base}/protected")
    other = dpop_headers("GET", f"{service.base}/protected")
    two = service.get("/protected", [*fresh.items(), ("DPoP", other["DPoP"])])
    assert two.status == 401
    assert two.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')


def test_dpop_allowed_serves_both_schemes_but_refuses_a_bound_token_sent_as_bearer(
    make_service: Callable[..., TestService],
    local_issuer: LocalIssuer,
    dpop_headers: Callable[..., dict[str, str]],
) -> None:
    service = make_service("allowed")
    missing = service.get("/protected")
    assert missing.headers["www-authenticate"] == f"Bearer {META}, DPoP {ALGS}, {META}"
    assert service.get("/protected", _bearer(local_issuer.mint())).status == 200
    headers = dpop_headers("GET", f"{service.base}/protected")
    assert service.get("/protected", list(headers.items())).status == 200
    downgraded = [("Authorization", headers["Authorization"].replace("DPoP ", "Bearer ", 1))]
    answer = service.get("/protected", downgraded)
    assert answer.status == 401
    assert "invalid_token" in answer.headers["www-authenticate"]


# --- once through a real server on loopback ---------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS, indirect=True)
def test_through_a_real_server_on_loopback(framework: str, local_issuer: LocalIssuer) -> None:
    from tests._asgi_server import serve

    options = _options(local_issuer, "disabled")
    sync, async_ = TokenVerifier(**options), AsyncTokenVerifier(**options)
    if framework == "fastapi":
        server = serve(_services.fastapi_app(async_))
    elif framework == "asgi":
        server = serve(_services.starlette_app(async_))
    elif framework == "flask":
        server = _services.serve_wsgi(_services.flask_app(sync))
    else:
        from django.core.wsgi import get_wsgi_application

        with _services.django_settings(sync):
            app = get_wsgi_application()
        server = _services.serve_wsgi(app)
    settings_context = _services.django_settings(sync) if framework == "django" else None
    if settings_context is not None:
        settings_context.__enter__()
    try:
        with server as base, httpx.Client(base_url=base, timeout=30) as client:
            tokens = {f"w{i}@clients": local_issuer.mint(sub=f"w{i}@clients") for i in range(8)}
            wrong: list[str] = []

            def worker(sub: str, token: str) -> None:
                for _ in range(5):
                    with httpx.Client(base_url=base, timeout=30) as own:
                        answer = own.get("/protected", headers={"Authorization": f"Bearer {token}"})
                    if answer.status_code != 200 or answer.json() != {"subject": sub}:
                        wrong.append(f"{sub}: {answer.status_code} {answer.text[:200]}")

            threads = [threading.Thread(target=worker, args=item) for item in tokens.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert not wrong  # every thread saw its own caller's claims, never another's
            missing = client.get("/protected")
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == f"Bearer {META}"
            token = local_issuer.mint()
            twice = client.get(
                "/protected",
                headers=[
                    ("Authorization", f"Bearer {token}"),
                    ("Authorization", f"Bearer {token}"),
                ],
            )
            assert twice.status_code in (400, 401)
            assert twice.headers["www-authenticate"].startswith('Bearer error="invalid_')
            assert client.get("/public").status_code == 200
            meta = client.get("/.well-known/oauth-protected-resource")
            assert meta.status_code == 200
            assert meta.json()["resource"] == RESOURCE
    finally:
        if settings_context is not None:
            settings_context.__exit__(None, None, None)
