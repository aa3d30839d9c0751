"""The receiving side against node oidc-provider: discovery, RS256/PS256/ES256, audience, rotation.

Tokens are fetched with plain httpx here, so a failure points at the verifier alone.
"""

from __future__ import annotations

import time

import anyio
import httpx
import jwt
import pytest

from m2m_client.errors import InvalidToken
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier
from tests.interop.conftest import RESOURCE_BY_ALG, IdP

pytestmark = pytest.mark.interop

ALGS = sorted(RESOURCE_BY_ALG)
COOLDOWN = 30.0  # the verifier's unknown-kid refetch cooldown in the rotation tests


def fetch_token(idp: IdP, resource: str, scope: str = "read:data") -> str:
    response = httpx.post(
        idp.token_url,
        data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
        auth=httpx.BasicAuth(*idp.basic_client),
        timeout=5.0,
    )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


class FakeClock:
    """Real time plus an offset the test advances: iat/exp of real tokens stay valid."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.parametrize("alg", ALGS)
def test_verifier_with_issuer_discovery_accepts_the_servers_tokens(idp: IdP, alg: str) -> None:
    resource = RESOURCE_BY_ALG[alg]
    verifier = TokenVerifier(issuer=idp.issuer, audience=resource, algorithms=[alg])

    claims = verifier.verify(fetch_token(idp, resource, scope="read:data write:data"))

    assert claims.client_id == "basic-client"
    assert claims.subject == "basic-client"
    assert claims.scopes == {"read:data", "write:data"}
    assert claims.audience == (resource,)
    assert claims.issuer == idp.issuer


@pytest.mark.anyio
@pytest.mark.parametrize("alg", ALGS)
async def test_async_verifier_accepts_the_servers_tokens(idp: IdP, alg: str) -> None:
    resource = RESOURCE_BY_ALG[alg]
    verifier = AsyncTokenVerifier(issuer=idp.issuer, audience=resource, algorithms=[alg])

    claims = await verifier.verify(fetch_token(idp, resource))

    assert claims.client_id == "basic-client"
    assert claims.scopes == {"read:data"}


@pytest.mark.parametrize("alg", ALGS)
def test_verifier_rejects_a_token_for_another_audience(idp: IdP, alg: str) -> None:
    other = next(r for a, r in RESOURCE_BY_ALG.items() if a != alg)
    verifier = TokenVerifier(issuer=idp.issuer, audience=other, algorithms=ALGS)

    with pytest.raises(InvalidToken):
        verifier.verify(fetch_token(idp, RESOURCE_BY_ALG[alg]))


@pytest.mark.anyio
async def test_async_verifier_rejects_a_token_for_another_audience(idp: IdP) -> None:
    verifier = AsyncTokenVerifier(
        issuer=idp.issuer, audience="https://unrelated.api.test/", algorithms=ALGS
    )

    with pytest.raises(InvalidToken):
        await verifier.verify(fetch_token(idp, RESOURCE_BY_ALG["ES256"]))


def test_verifier_rejects_an_algorithm_outside_its_allowlist(idp: IdP) -> None:
    # The server's RSA key has no `alg` in its JWK, so only our allowlist stops PS256 here.
    resource = RESOURCE_BY_ALG["PS256"]
    verifier = TokenVerifier(issuer=idp.issuer, audience=resource, algorithms=["RS256"])

    with pytest.raises(InvalidToken):
        verifier.verify(fetch_token(idp, resource))


def test_verifier_requiring_at_jwt_accepts_the_servers_rfc9068_tokens(idp: IdP) -> None:
    resource = RESOURCE_BY_ALG["RS256"]
    verifier = TokenVerifier(issuer=idp.issuer, audience=resource, token_type="at+jwt")

    claims = verifier.verify(fetch_token(idp, resource))

    assert claims["client_id"] == "basic-client"


def test_verifier_rejects_a_token_from_the_same_server_under_another_issuer_name(
    idp: IdP,
) -> None:
    # oidc-provider's issuer has no trailing slash; "iss" must match exactly (RFC 9068 §4).
    resource = RESOURCE_BY_ALG["RS256"]
    verifier = TokenVerifier(issuer=idp.issuer + "/", jwks_url=idp.jwks_url, audience=resource)

    with pytest.raises(InvalidToken):
        verifier.verify(fetch_token(idp, resource))


# --- key rotation ------------------------------------------------------------------------------
# oidc-provider signs with a new key as soon as it publishes it (as Keycloak does): the
# first unknown kid after any fetch refetches at once, without waiting for a cooldown.


def test_after_rotation_new_tokens_verify_at_once_without_waiting_for_a_cooldown(
    idp: IdP,
) -> None:
    resource = RESOURCE_BY_ALG["RS256"]
    verifier = TokenVerifier(issuer=idp.issuer, audience=resource, unknown_kid_cooldown=COOLDOWN)
    old_token = fetch_token(idp, resource)
    verifier.verify(old_token)

    new_kids = idp.rotate()
    new_token = fetch_token(idp, resource)

    assert jwt.get_unverified_header(new_token)["kid"] in new_kids
    assert verifier.verify(new_token).client_id == "basic-client"
    assert verifier.verify(old_token).client_id == "basic-client"  # old key still published


@pytest.mark.anyio
async def test_after_rotation_200_concurrent_new_kid_tokens_cost_one_fetch_async(
    idp: IdP,
) -> None:
    resource = RESOURCE_BY_ALG["ES256"]
    jwks_fetches = 0

    async def count(request: httpx.Request) -> None:
        nonlocal jwks_fetches
        jwks_fetches += request.url.path.endswith("/jwks")

    async with httpx.AsyncClient(event_hooks={"request": [count]}) as client:
        verifier = AsyncTokenVerifier(
            issuer=idp.issuer,
            audience=resource,
            algorithms=["ES256"],
            unknown_kid_cooldown=COOLDOWN,
            http_client=client,
        )
        await verifier.verify(fetch_token(idp, resource))
        new_kids = idp.rotate()
        new_token = fetch_token(idp, resource)
        assert jwt.get_unverified_header(new_token)["kid"] in new_kids
        verifier.clear_cache()
        clients: list[str | None] = []

        async def work() -> None:
            clients.append((await verifier.verify(new_token)).client_id)

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(work)
    assert clients == ["basic-client"] * 200
    assert jwks_fetches == 2  # start-up + one for the new kid


def test_a_second_rotation_within_the_cooldown_waits_for_it_random_kids_cannot_hammer(
    idp: IdP,
) -> None:
    # Only *repeated* unknown-kid refetches are rate-limited: the first rotation is picked
    # up at once, a second one inside the cooldown once the cooldown has passed.
    resource = RESOURCE_BY_ALG["PS256"]
    clock = FakeClock()
    verifier = TokenVerifier(
        issuer=idp.issuer,
        audience=resource,
        algorithms=["PS256"],
        unknown_kid_cooldown=COOLDOWN,
        clock=clock,
    )
    verifier.verify(fetch_token(idp, resource))
    idp.rotate()
    assert verifier.verify(fetch_token(idp, resource)).client_id == "basic-client"
    idp.rotate()
    second = fetch_token(idp, resource)
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(second)
    assert caught.value.reason == "unknown_kid"
    clock.offset += COOLDOWN + 1
    assert verifier.verify(second).client_id == "basic-client"
