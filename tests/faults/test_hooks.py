"""A caller's event hooks never decide what a token endpoint answer means (issue 19 item 7c).

A ``raise_for_status`` response hook on the caller's own client used to turn the server's
``401 invalid_client`` into ``InvalidTokenResponse`` (httpx closes the response, unread, when
a hook raises). Real loopback servers; sync and async; httpx and httpx2.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from m2m_client import (
    AsyncTokenClient,
    ClientCredentials,
    DiscoveryError,
    M2MError,
    RetryPolicy,
    TokenClient,
    TokenEndpointError,
    TokenEndpointUnavailable,
)
from m2m_client._stacks import Stack, installed
from m2m_client.errors import KeySetUnavailable
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier

from ._faults import Fault, FaultServer

STACKS = installed()
RETRY = RetryPolicy(max_attempts=2, initial_backoff=0.01, jitter=False, max_total_seconds=10)
ERRORS = [
    (401, "invalid_client", "Client authentication failed"),
    (400, "invalid_scope", "scope read:all is not granted"),
    (403, "unauthorized_client", "client may not use this grant"),
]


@pytest.fixture(params=STACKS, ids=[stack.name for stack in STACKS])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


def _creds(url: str) -> ClientCredentials:
    return ClientCredentials(token_url=url, client_id="worker", client_secret="hook-secret")


class Seen:
    def __init__(self) -> None:
        self.requests = 0
        self.bodies: list[bytes] = []

    def request(self, request: Any) -> None:
        self.requests += 1

    def response(self, response: Any) -> None:
        self.bodies.append(response.read())  # works: the copy the hooks get is read
        response.raise_for_status()

    async def arequest(self, request: Any) -> None:
        self.request(request)

    async def aresponse(self, response: Any) -> None:
        self.bodies.append(await response.aread())
        response.raise_for_status()


@pytest.mark.parametrize(("status", "error", "description"), ERRORS)
def test_sync_oauth_error_survives_a_raise_for_status_hook(
    server: FaultServer, stack: Stack, status: int, error: str, description: str
) -> None:
    body = {"error": error, "error_description": description}
    server.faults["/token"] = Fault.json(body, status=status)
    seen = Seen()
    hooks = {"request": [seen.request], "response": [seen.response]}
    with (
        stack.Client(event_hooks=hooks) as http,
        TokenClient(_creds(server.url + "/token"), http_client=http, retry=RETRY) as tokens,
        pytest.raises(TokenEndpointError) as info,
    ):
        tokens.get_token()
    assert (info.value.error, info.value.error_description) == (error, description)
    assert info.value.status_code == status
    assert seen.requests == 1  # the caller's hooks still run, once each
    assert len(seen.bodies) == 1
    assert error.encode() in seen.bodies[0]


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "error", "description"), ERRORS)
async def test_async_oauth_error_survives_a_raise_for_status_hook(
    server: FaultServer, stack: Stack, status: int, error: str, description: str
) -> None:
    body = {"error": error, "error_description": description}
    server.faults["/token"] = Fault.json(body, status=status)
    seen = Seen()
    hooks = {"request": [seen.arequest], "response": [seen.aresponse]}
    async with (
        stack.AsyncClient(event_hooks=hooks) as http,
        AsyncTokenClient(_creds(server.url + "/token"), http_client=http, retry=RETRY) as tokens,
    ):
        with pytest.raises(TokenEndpointError) as info:
            await tokens.get_token()
    assert (info.value.error, info.value.error_description) == (error, description)
    assert seen.requests == 1
    assert len(seen.bodies) == 1


def test_a_good_token_passes_through_a_raise_for_status_hook(
    server: FaultServer, stack: Stack
) -> None:
    good = {"access_token": "tok-hook", "token_type": "Bearer", "expires_in": 300}
    server.faults["/token"] = Fault.json(good)
    seen = Seen()
    with (
        stack.Client(event_hooks={"response": [seen.response]}) as http,
        TokenClient(_creds(server.url + "/token"), http_client=http) as tokens,
    ):
        assert tokens.get_token().access_token == "tok-hook"
    assert b"tok-hook" in seen.bodies[0]


def _boom(response: Any) -> None:
    raise ValueError("hook says no")


async def _aboom(response: Any) -> None:
    _boom(response)


def _assert_ours(exc: BaseException) -> None:
    assert isinstance(exc, M2MError)
    assert "ValueError" in str(exc)
    assert "hook" in str(exc)


def test_a_foreign_exception_from_a_hook_becomes_ours_on_every_sync_entry_point(
    stack: Stack,
) -> None:
    with LocalIssuer() as issuer:
        issuer.add_client("worker", "hook-secret")
        with stack.Client(event_hooks={"response": [_boom]}) as http:
            token_creds = _creds(issuer.token_url)
            with (
                TokenClient(token_creds, http_client=http, retry=RETRY) as tokens,
                pytest.raises(TokenEndpointUnavailable) as unavailable,
            ):
                tokens.get_token()
            _assert_ours(unavailable.value)
            discovery_creds = ClientCredentials(
                issuer=issuer.url, client_id="worker", client_secret="hook-secret"
            )
            with (
                TokenClient(discovery_creds, http_client=http, retry=RETRY) as tokens,
                pytest.raises(DiscoveryError) as discovery,
            ):
                tokens.get_token()
            _assert_ours(discovery.value)
            verifier = TokenVerifier(issuer=issuer.url, audience=issuer.audience, http_client=http)
            with pytest.raises(KeySetUnavailable) as keys:
                verifier.verify(issuer.mint(audience=issuer.audience))
            _assert_ours(keys.value)


@pytest.mark.anyio
async def test_a_foreign_exception_from_a_hook_becomes_ours_on_every_async_entry_point(
    stack: Stack,
) -> None:
    with LocalIssuer() as issuer:
        issuer.add_client("worker", "hook-secret")
        async with stack.AsyncClient(event_hooks={"response": [_aboom]}) as http:
            async with AsyncTokenClient(
                _creds(issuer.token_url), http_client=http, retry=RETRY
            ) as tokens:
                with pytest.raises(TokenEndpointUnavailable) as unavailable:
                    await tokens.get_token()
            _assert_ours(unavailable.value)
            verifier = AsyncTokenVerifier(
                issuer=issuer.url, audience=issuer.audience, http_client=http
            )
            with pytest.raises(KeySetUnavailable) as keys:
                await verifier.verify(issuer.mint(audience=issuer.audience))
            _assert_ours(keys.value)
