"""pytest fixtures for testing services protected by m2m-client, with no identity provider.

Loaded automatically (``pytest11`` entry point) once m2m-client is installed. Fixtures:

``local_issuer``
    A running :class:`~m2m_client.testing.LocalIssuer` (real HTTP on 127.0.0.1). One server per
    test session; whatever a test changes (settings, clients, keys, injected failures,
    counters) is undone after it.
``token_verifier`` / ``async_token_verifier``
    A fresh ``TokenVerifier`` / ``AsyncTokenVerifier`` trusting ``local_issuer`` (its issuer,
    audience, algorithm and roles claim).
``bearer_headers``
    ``bearer_headers(permissions=[...], roles=[...], scope="...", **claims)`` returns
    ``{"Authorization": "Bearer <token>"}`` for a token minted by ``local_issuer``.
``dpop_headers``
    ``dpop_headers("GET", "http://testserver/data", roles=[...], ...)`` returns
    ``{"Authorization": "DPoP <token>", "DPoP": <proof>}``: a DPoP-bound token (``cnf.jkt``)
    minted by ``local_issuer`` and a fresh proof for that request (RFC 9449).
``local_client_credentials``
    ``ClientCredentials`` for a client registered at ``local_issuer``, for testing callers.

Configure in ``pytest.ini`` / ``pyproject.toml`` (``[tool.pytest.ini_options]``):
``m2m_audience`` (default ``https://api.example.com``), ``m2m_roles_claim`` (default
``<audience>/roles``, as in Auth0's guides) and ``m2m_algorithm`` (``RS256`` or ``ES256``).

Nothing heavy is imported until a fixture is used: this module loads in every pytest run.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from m2m_client._dpop import DPoPKey
    from m2m_client.config import ClientCredentials
    from m2m_client.testing import LocalIssuer
    from m2m_client.verify import AsyncTokenVerifier, TokenVerifier

__all__ = [
    "async_token_verifier",
    "bearer_headers",
    "dpop_headers",
    "local_client_credentials",
    "local_issuer",
    "token_verifier",
]

#: Client registered at the session's LocalIssuer for ``local_client_credentials``.
LOCAL_CLIENT_ID = "test-client"

BearerHeaders = Callable[..., dict[str, str]]
DPoPHeaders = Callable[..., dict[str, str]]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "m2m_audience", "audience of LocalIssuer tokens", default="https://api.example.com"
    )
    parser.addini("m2m_roles_claim", "claim holding roles (default: <audience>/roles)")
    parser.addini("m2m_algorithm", "LocalIssuer signing algorithm: RS256 or ES256", default="RS256")


@pytest.fixture(scope="session")
def _m2m_session_issuer(pytestconfig: pytest.Config) -> Iterator[LocalIssuer]:
    from m2m_client.testing import LocalIssuer

    roles_claim = str(pytestconfig.getini("m2m_roles_claim") or "") or None
    issuer = LocalIssuer(
        pytestconfig.getini("m2m_algorithm") or "RS256",
        audience=str(pytestconfig.getini("m2m_audience")),
        roles_claim=roles_claim,
    )
    # A random secret per session: nothing to leak, nothing to hard-code.
    issuer.add_client(LOCAL_CLIENT_ID, secrets.token_urlsafe(24))
    with issuer:
        yield issuer


@pytest.fixture
def local_issuer(_m2m_session_issuer: LocalIssuer) -> Iterator[LocalIssuer]:
    """A running LocalIssuer shared by the session; each test starts from its initial state.

    What a test changes (settings such as ``token_lifetime``, clients it adds, keys it
    rotates, failures it injects, counters) is undone after it, so tests stay independent.
    """
    issuer = _m2m_session_issuer
    state = issuer._save_state()
    issuer.reset_counters()
    issuer.clear_failures()
    try:
        yield issuer
    finally:
        issuer._restore_state(state)


def _verifier_options(issuer: LocalIssuer) -> dict[str, Any]:
    return {
        "issuer": issuer.url,
        "audience": issuer.audience,
        "algorithms": sorted({key["alg"] for key in issuer.jwks()["keys"]}),
        "roles_claim": issuer.roles_claim,
    }


@pytest.fixture
def token_verifier(local_issuer: LocalIssuer) -> TokenVerifier:
    """A TokenVerifier that trusts ``local_issuer``."""
    from m2m_client.verify import TokenVerifier

    return TokenVerifier(**_verifier_options(local_issuer))


@pytest.fixture
def async_token_verifier(local_issuer: LocalIssuer) -> AsyncTokenVerifier:
    """An AsyncTokenVerifier that trusts ``local_issuer`` (e.g. for ``JWTBearer``)."""
    from m2m_client.verify import AsyncTokenVerifier

    return AsyncTokenVerifier(**_verifier_options(local_issuer))


@pytest.fixture
def bearer_headers(local_issuer: LocalIssuer) -> BearerHeaders:
    """Make an ``Authorization: Bearer`` header for a token with the rights you need.

    >>> client.get("/admin", headers=bearer_headers(roles=["admin"]))
    """

    def make(
        permissions: Iterable[str] | None = None,
        roles: Iterable[str] | None = None,
        scope: str | Iterable[str] | None = None,
        **claims: Any,
    ) -> dict[str, str]:
        claims.setdefault("sub", f"{LOCAL_CLIENT_ID}@clients")
        token = local_issuer.mint(
            permissions=[] if permissions is None else permissions,
            roles=roles,
            scope=scope,
            **claims,
        )
        return {"Authorization": f"Bearer {token}"}

    return make


@pytest.fixture
def dpop_headers(local_issuer: LocalIssuer) -> DPoPHeaders:
    """Make ``Authorization: DPoP`` and ``DPoP`` headers for one request (RFC 9449).

    The token is bound to ``key`` (a fresh ES256 key unless given) and the proof is made
    for ``method`` and ``url`` (the URL the service sees: ``http://testserver/...`` with
    Starlette's TestClient and Django's test Client, ``http://localhost/...`` with Flask's
    test_client). ``nonce`` goes into the proof; the other arguments are those of
    ``bearer_headers``.

    >>> client.get("/data", headers=dpop_headers("GET", "http://testserver/data"))
    """
    from m2m_client._dpop import DPoPKey

    def make(
        method: str = "GET",
        url: str = "http://testserver/",
        *,
        key: DPoPKey | None = None,
        nonce: str | None = None,
        permissions: Iterable[str] | None = None,
        roles: Iterable[str] | None = None,
        scope: str | Iterable[str] | None = None,
        **claims: Any,
    ) -> dict[str, str]:
        key = key if key is not None else DPoPKey.generate()
        claims.setdefault("sub", f"{LOCAL_CLIENT_ID}@clients")
        claims["cnf"] = {"jkt": key.thumbprint}
        token = local_issuer.mint(
            permissions=[] if permissions is None else permissions,
            roles=roles,
            scope=scope,
            **claims,
        )
        proof = key.proof(method, url, now=local_issuer.clock(), access_token=token, nonce=nonce)
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    return make


@pytest.fixture
def local_client_credentials(local_issuer: LocalIssuer) -> ClientCredentials:
    """ClientCredentials for ``test-client`` at ``local_issuer`` (for TokenClient tests)."""
    from m2m_client.config import ClientCredentials

    return ClientCredentials(
        token_url=local_issuer.token_url,
        client_id=LOCAL_CLIENT_ID,
        client_secret=local_issuer.client_secret(LOCAL_CLIENT_ID),
        audience=local_issuer.audience,
    )
