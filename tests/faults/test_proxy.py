"""Plain http to loopback never crosses a proxy (issue 19 item 4).

A real ``LocalIssuer`` on 127.0.0.1 and a real loopback "proxy" (a :class:`FaultServer` that
records every request it gets and answers 502): with ``HTTP_PROXY`` / ``http_proxy`` /
``ALL_PROXY`` pointing at it, every request the package makes itself (token, discovery, JWKS,
the DPoP nonce retry) goes straight to the issuer, and the proxy hears nothing. A caller's
own client that would route plain http through a proxy is refused before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from m2m_client import (
    AsyncTokenClient,
    ClientCredentials,
    ConfigurationError,
    TokenClient,
)
from m2m_client._proxy import DIRECT_HTTP, _proxied, own_client
from m2m_client._stacks import Stack, installed
from m2m_client.errors import KeySetUnavailable
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier

from ._faults import FaultServer

SECRET = "proxy-suite-secret-5c3"
VARIABLES = ["HTTP_PROXY", "http_proxy", "ALL_PROXY"]
ENTRIES = ["token", "discovery", "jwks", "dpop_nonce"]
STACKS = installed()


@pytest.fixture
def proxy() -> Iterator[FaultServer]:
    with FaultServer() as server:
        server.faults = {}  # every path (an absolute URI, when proxied): 404
        yield server


@pytest.fixture
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer(dpop_nonce=True) as issuer:
        issuer.add_client("worker", SECRET)
        yield issuer


def _set_proxy(monkeypatch: pytest.MonkeyPatch, variable: str, proxy: FaultServer) -> None:
    for name in ("NO_PROXY", "no_proxy", *VARIABLES, "HTTPS_PROXY", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, proxy.url)


def _credentials(issuer: LocalIssuer, entry: str) -> ClientCredentials:
    where = {"issuer": issuer.url} if entry == "discovery" else {"token_url": issuer.token_url}
    return ClientCredentials(
        **where,
        client_id="worker",
        client_secret=SECRET,
        audience=issuer.audience,
        dpop=entry == "dpop_nonce",
    )


def _assert_not_proxied(proxy: FaultServer, issuer: LocalIssuer) -> None:
    assert proxy.requests == [], [r.path for r in proxy.requests]
    assert all(SECRET.encode() not in r.body for r in proxy.requests)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variable", VARIABLES)
def test_sync_requests_to_loopback_never_go_through_an_environment_proxy(
    monkeypatch: pytest.MonkeyPatch,
    proxy: FaultServer,
    issuer: LocalIssuer,
    variable: str,
    entry: str,
) -> None:
    _set_proxy(monkeypatch, variable, proxy)
    if entry == "jwks":
        token = issuer.mint(audience=issuer.audience)
        verifier = TokenVerifier(issuer=issuer.url, audience=issuer.audience, timeout=5)
        assert verifier.verify(token).subject
        assert issuer.jwks_requests == 1
    else:
        with TokenClient(_credentials(issuer, entry)) as tokens:
            token_value = tokens.get_token()
        assert token_value.token_type == ("DPoP" if entry == "dpop_nonce" else "Bearer")
    if entry == "discovery":
        assert issuer.metadata_requests >= 1
    _assert_not_proxied(proxy, issuer)


@pytest.mark.anyio
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variable", VARIABLES)
async def test_async_requests_to_loopback_never_go_through_an_environment_proxy(
    monkeypatch: pytest.MonkeyPatch,
    proxy: FaultServer,
    issuer: LocalIssuer,
    variable: str,
    entry: str,
) -> None:
    _set_proxy(monkeypatch, variable, proxy)
    with anyio.fail_after(30):
        if entry == "jwks":
            token = issuer.mint(audience=issuer.audience)
            verifier = AsyncTokenVerifier(issuer=issuer.url, audience=issuer.audience, timeout=5)
            assert (await verifier.verify(token)).subject
            assert issuer.jwks_requests == 1
        else:
            async with AsyncTokenClient(_credentials(issuer, entry)) as tokens:
                token_value = await tokens.get_token()
            assert token_value.token_type == ("DPoP" if entry == "dpop_nonce" else "Bearer")
    _assert_not_proxied(proxy, issuer)


@pytest.fixture(params=STACKS, ids=[stack.name for stack in STACKS])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.param  # type: ignore[no-any-return]


@pytest.mark.parametrize("variable", VARIABLES)
def test_the_package_own_client_of_each_stack_sends_plain_http_directly(
    monkeypatch: pytest.MonkeyPatch,
    proxy: FaultServer,
    issuer: LocalIssuer,
    stack: Stack,
    variable: str,
) -> None:
    # The package creates its clients on the default stack; own_client is what it uses, so
    # it is checked on each stack (httpx2's own client is the default in an httpx2-only
    # install).
    _set_proxy(monkeypatch, variable, proxy)
    with own_client(stack, asynchronous=False) as client:
        assert client.get(issuer.jwks_url).status_code == 200
    _assert_not_proxied(proxy, issuer)


@pytest.mark.anyio
@pytest.mark.parametrize("variable", VARIABLES)
async def test_the_package_own_async_client_of_each_stack_sends_plain_http_directly(
    monkeypatch: pytest.MonkeyPatch,
    proxy: FaultServer,
    issuer: LocalIssuer,
    stack: Stack,
    variable: str,
) -> None:
    _set_proxy(monkeypatch, variable, proxy)
    async with own_client(stack, asynchronous=True) as client:
        assert (await client.get(issuer.jwks_url)).status_code == 200
    _assert_not_proxied(proxy, issuer)


@pytest.mark.parametrize("variable", VARIABLES)
def test_a_caller_client_that_would_proxy_plain_http_is_refused_before_sending(
    monkeypatch: pytest.MonkeyPatch,
    proxy: FaultServer,
    issuer: LocalIssuer,
    stack: Stack,
    variable: str,
) -> None:
    _set_proxy(monkeypatch, variable, proxy)
    with (
        stack.Client() as http,  # trust_env: it picks up the proxy variable
        TokenClient(_credentials(issuer, "token"), http_client=http) as tokens,
        pytest.raises(ConfigurationError, match="through a proxy") as info,
    ):
        tokens.get_token()
    assert "NO_PROXY" in str(info.value)
    assert SECRET not in str(info.value)
    _assert_not_proxied(proxy, issuer)
    # The remedy the message names works.
    with (
        stack.Client(mounts=DIRECT_HTTP) as http,
        TokenClient(_credentials(issuer, "token"), http_client=http) as tokens,
    ):
        assert tokens.get_token().access_token
    _assert_not_proxied(proxy, issuer)


@pytest.mark.anyio
async def test_a_caller_async_client_with_an_explicit_proxy_is_refused_for_plain_http(
    proxy: FaultServer, issuer: LocalIssuer, stack: Stack
) -> None:
    kwargs: dict[str, Any] = {"proxy": proxy.url}
    async with (
        stack.AsyncClient(**kwargs) as http,
        AsyncTokenClient(_credentials(issuer, "token"), http_client=http) as tokens,
    ):
        with pytest.raises(ConfigurationError, match="through a proxy"):
            await tokens.get_token()
    async with stack.AsyncClient(**kwargs) as http:
        verifier = AsyncTokenVerifier(issuer=issuer.url, audience=issuer.audience, http_client=http)
        with pytest.raises(KeySetUnavailable, match="through a proxy"):
            await verifier.verify(issuer.mint(audience=issuer.audience))
    _assert_not_proxied(proxy, issuer)


def test_https_keeps_the_environment_proxy(monkeypatch: pytest.MonkeyPatch, stack: Stack) -> None:
    # Only plain http bypasses it: https tunnels through the proxy (CONNECT), which reads
    # nothing, and corporate networks need it.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with own_client(stack, asynchronous=False) as client:
        assert _proxied(client, stack, "https://idp.example.com/token")
        assert not _proxied(client, stack, "http://127.0.0.1:8080/token")
