"""Test a FastAPI service protected by m2m-client without any identity provider.

Copy this file into your tests. The fixtures ``local_issuer``, ``async_token_verifier`` and
``bearer_headers`` come from m2m-client's pytest plugin, loaded automatically once the package
is installed. If your service reads roles from another claim, set ``m2m_roles_claim`` (and
``m2m_audience``) under ``[tool.pytest.ini_options]``.
"""

# No `from __future__ import annotations` here: FastAPI must evaluate the Annotated[...]
# dependencies of routes defined inside create_app(), where `auth` is a local name.
from collections.abc import Callable, Iterator
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from m2m_client.fastapi import JWTBearer
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, Claims

BearerHeaders = Callable[..., dict[str, str]]


def create_app(verifier: AsyncTokenVerifier) -> FastAPI:
    """Your application factory: it takes the verifier, so tests can hand it a local one."""
    app = FastAPI()
    auth = JWTBearer(verifier)

    @app.get("/protected")
    async def protected(claims: Annotated[Claims, Depends(auth)]) -> dict[str, object]:
        return {"client": claims.client_id}

    @app.get("/dashboard")
    async def dashboard(
        claims: Annotated[Claims, Depends(auth.require(permissions=["read:dashboard"]))],
    ) -> dict[str, object]:
        return {"permissions": sorted(claims.permissions)}

    @app.get("/admin")
    async def admin(
        claims: Annotated[Claims, Depends(auth.require(roles=["admin"]))],
    ) -> dict[str, str]:
        return {"hello": "admin"}

    return app


@pytest.fixture
def client(async_token_verifier: AsyncTokenVerifier) -> Iterator[TestClient]:
    # `with` keeps one event loop for the whole test, so the verifier's state stays valid.
    with TestClient(create_app(async_token_verifier)) as test_client:
        yield test_client


def test_protected_route_accepts_a_token_from_the_issuer(
    client: TestClient, bearer_headers: BearerHeaders
) -> None:
    response = client.get("/protected", headers=bearer_headers(sub="reports@clients"))
    assert response.status_code == 200
    assert response.json() == {"client": "reports"}


def test_protected_route_refuses_a_request_without_a_token(client: TestClient) -> None:
    response = client.get("/protected")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_dashboard_needs_the_read_dashboard_permission(
    client: TestClient, bearer_headers: BearerHeaders
) -> None:
    allowed = client.get("/dashboard", headers=bearer_headers(permissions=["read:dashboard"]))
    refused = client.get("/dashboard", headers=bearer_headers(permissions=["read:other"]))
    assert allowed.status_code == 200
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]


def test_admin_needs_the_admin_role(client: TestClient, bearer_headers: BearerHeaders) -> None:
    assert client.get("/admin", headers=bearer_headers(roles=["admin"])).status_code == 200
    assert client.get("/admin", headers=bearer_headers(roles=["viewer"])).status_code == 403


def test_an_expired_token_is_refused(client: TestClient, bearer_headers: BearerHeaders) -> None:
    response = client.get("/protected", headers=bearer_headers(expires_in=-120))
    assert response.status_code == 401


def test_a_key_rotation_needs_no_restart(
    client: TestClient, bearer_headers: BearerHeaders, local_issuer: LocalIssuer
) -> None:
    before = bearer_headers(sub="reports@clients")
    assert client.get("/protected", headers=before).status_code == 200
    local_issuer.rotate_keys()  # a new signing key; the old one stays published
    # A token naming the new key verifies at once: the verifier refetches the JWKS.
    assert client.get("/protected", headers=bearer_headers()).status_code == 200
    assert client.get("/protected", headers=before).status_code == 200  # signed before it
