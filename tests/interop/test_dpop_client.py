"""DPoP end to end against node oidc-provider 8.8.1: our token clients, BearerAuth, verifier.

The server binds tokens to the key of OUR TokenClient/AsyncTokenClient (dpop=True), including
the client that must answer a nonce challenge; then a FastAPI service on 127.0.0.1 with
JWTBearer over our verifier (dpop="required") accepts those tokens with BearerAuth's proofs
and refuses every way of using them without the key.
"""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime.

import time
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI, Request

from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials, DPoPKey, TokenClient
from m2m_client.fastapi import JWTBearer
from m2m_client.verify import Claims, TokenVerifier
from tests._asgi_server import serve
from tests.interop.conftest import DPOP_CLIENT, DPOP_NONCE_CLIENT, DPOP_RESOURCE, IdP

pytestmark = pytest.mark.interop


def credentials(
    idp: IdP, client: tuple[str, str], dpop: Any = True, *, token_url: str | None = None
) -> ClientCredentials:
    return ClientCredentials(
        token_url=token_url or idp.token_url,
        client_id=client[0],
        client_secret=client[1],
        resource=DPOP_RESOURCE,
        scope="read:data",
        dpop=dpop,
    )


def cnf(token: str) -> Any:
    return jwt.decode(token, options={"verify_signature": False}).get("cnf")


@pytest.mark.parametrize("client", [DPOP_CLIENT, DPOP_NONCE_CLIENT], ids=["plain", "nonce"])
def test_token_client_gets_a_token_bound_to_its_key(idp: IdP, client: tuple[str, str]) -> None:
    with TokenClient(credentials(idp, client)) as tokens:
        token = tokens.get_token()
        key = tokens._core.dpop
        assert key is not None
        assert tokens.stats.token_requests == (2 if client == DPOP_NONCE_CLIENT else 1)
    assert token.token_type == "DPoP"
    assert token.authorization == f"DPoP {token.access_token}"
    assert cnf(token.access_token) == {"jkt": key.thumbprint}


@pytest.mark.anyio
@pytest.mark.parametrize("client", [DPOP_CLIENT, DPOP_NONCE_CLIENT], ids=["plain", "nonce"])
async def test_async_token_client_gets_a_token_bound_to_a_given_key(
    idp: IdP, client: tuple[str, str]
) -> None:
    key = DPoPKey.generate("EdDSA")
    async with AsyncTokenClient(credentials(idp, client, key)) as tokens:
        token = await tokens.get_token()
        # A second fetch uses the remembered nonce at once: one request, not two.
        before = tokens.stats.token_requests
        again = await tokens.get_token(force_refresh=True)
        assert tokens.stats.token_requests == before + 1
    assert token.token_type == again.token_type == "DPoP"
    assert cnf(again.access_token) == {"jkt": key.thumbprint}


def test_a_bound_client_without_dpop_gets_the_servers_refusal(idp: IdP) -> None:
    from m2m_client.errors import TokenEndpointError

    tokens = TokenClient(credentials(idp, DPOP_CLIENT, False))
    with tokens, pytest.raises(TokenEndpointError) as refused:
        tokens.get_token()
    assert refused.value.error == "invalid_grant"


@pytest.fixture
def api(idp: IdP) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A FastAPI service on 127.0.0.1 accepting only DPoP-bound tokens of the server."""
    verifier = TokenVerifier(
        issuer=idp.issuer, audience=DPOP_RESOURCE, algorithms=["ES256"], dpop="required"
    )
    auth = JWTBearer(verifier)
    seen: list[dict[str, str]] = []
    app = FastAPI()

    async def record(request: Request) -> None:
        seen.append(dict(request.headers))

    @app.get("/data", dependencies=[Depends(record)])
    async def data(claims: Annotated[Claims, Depends(auth)]) -> dict[str, Any]:
        return {"client_id": claims.client_id, "jkt": claims["cnf"]["jkt"]}

    with serve(app) as base:
        yield base, seen


def test_our_verifier_accepts_the_servers_token_with_bearer_auth_proofs(
    idp: IdP, api: tuple[str, list[dict[str, str]]]
) -> None:
    base, seen = api
    with TokenClient(credentials(idp, DPOP_NONCE_CLIENT)) as tokens:
        with httpx.Client(auth=BearerAuth(tokens), timeout=10) as http:
            responses = [http.get(f"{base}/data?n={n}") for n in range(3)]
        key = tokens._core.dpop
        assert key is not None
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.json() == {"client_id": DPOP_NONCE_CLIENT[0], "jkt": key.thumbprint}
    assert len({headers["dpop"] for headers in seen}) == 3  # a fresh proof per request


def test_our_verifier_refuses_the_servers_token_without_the_key(
    idp: IdP, api: tuple[str, list[dict[str, str]]]
) -> None:
    base, seen = api
    url = f"{base}/data"
    with TokenClient(credentials(idp, DPOP_CLIENT)) as tokens:
        with httpx.Client(auth=BearerAuth(tokens), timeout=10) as http:
            assert http.get(url).status_code == 200
        token = tokens.get_token().access_token
        key = tokens._core.dpop
        assert key is not None
    with TokenClient(credentials(idp, DPOP_CLIENT, key)) as same_key:
        other_token = same_key.get_token().access_token
    used = seen[-1]["dpop"]
    now = time.time()
    attempts = {
        "as a bearer token": {"Authorization": f"Bearer {token}"},
        "without a proof": {"Authorization": f"DPoP {token}"},
        "with a replayed proof": {"Authorization": f"DPoP {token}", "DPoP": used},
        "with a proof for POST": {
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("POST", url, now=now, access_token=token),
        },
        "with a proof for another URL": {
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", f"{base}/other", now=now, access_token=token),
        },
        "with a proof for another token": {
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", url, now=now, access_token=other_token),
        },
        "with a proof by another key": {
            "Authorization": f"DPoP {token}",
            "DPoP": DPoPKey.generate().proof("GET", url, now=now, access_token=token),
        },
    }
    for name, headers in attempts.items():
        response = httpx.get(url, headers=headers, timeout=10)
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"].startswith("DPoP "), name
        assert 'algs="' in response.headers["www-authenticate"], name


# Issue 19 item 11: our htu was RFC 3986-normalised ("/a%7Cb", "/~user", "/x%5Ey") while
# httpx sends "/a|b", "/%7euser", "/x^y"; oidc-provider compares htu with the URI it
# received, and answered 400 invalid_dpop_proof ("DPoP proof htu mismatch").
ODD_MOUNTS = ["/a|b", "/%7euser", "/x^y"]


@pytest.mark.parametrize("mount", ODD_MOUNTS)
@pytest.mark.parametrize("client", [DPOP_CLIENT, DPOP_NONCE_CLIENT], ids=["plain", "nonce"])
def test_a_token_url_with_characters_sent_literally_gets_a_bound_token(
    idp: IdP, client: tuple[str, str], mount: str
) -> None:
    with TokenClient(credentials(idp, client, token_url=f"{idp.issuer}{mount}/token")) as tokens:
        token = tokens.get_token()
        key = tokens._core.dpop
    assert key is not None
    assert token.token_type == "DPoP"
    assert cnf(token.access_token) == {"jkt": key.thumbprint}


@pytest.mark.anyio
@pytest.mark.parametrize("mount", ODD_MOUNTS)
async def test_async_token_url_with_characters_sent_literally_gets_a_bound_token(
    idp: IdP, mount: str
) -> None:
    creds = credentials(idp, DPOP_NONCE_CLIENT, token_url=f"{idp.issuer}{mount}/token")
    async with AsyncTokenClient(creds) as tokens:
        token = await tokens.get_token()
        key = tokens._core.dpop
    assert key is not None
    assert cnf(token.access_token) == {"jkt": key.thumbprint}


def test_two_dpop_headers_are_refused_by_oidc_provider_as_by_local_issuer(idp: IdP) -> None:
    # RFC 9449 §4.3 step 1. LocalIssuer now answers as oidc-provider does (it bound the
    # token to the first proof); this pins the reference behaviour it copies.
    key = DPoPKey.generate()
    now = time.time()
    one, two = (key.proof("POST", idp.token_url, now=now) for _ in range(2))
    response = httpx.post(
        idp.token_url,
        data={"grant_type": "client_credentials", "resource": DPOP_RESOURCE},
        auth=DPOP_CLIENT,
        headers=[("DPoP", one), ("DPoP", two)],
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_dpop_proof"
