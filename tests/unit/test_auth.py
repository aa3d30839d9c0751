"""BearerAuth: attaches the token, recovers once from a 401, refuses sync/async mix-ups."""

from __future__ import annotations

import threading

import anyio
import httpx
import pytest

from m2m_client import AsyncTokenClient, BearerAuth, ConfigurationError, TokenClient

from ._calling import FakeClock, TokenEndpoint, credentials


class Api:
    """A protected API accepting only the tokens in ``valid``."""

    def __init__(self, server: TokenEndpoint) -> None:
        self.server = server
        self.valid: set[str] = set()
        self.seen: list[str | None] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "as.example.com":
            return self.server.sync_handler(request)
        auth = request.headers.get("authorization")
        self.seen.append(auth)
        if auth is not None and auth.removeprefix("Bearer ") in self.valid:
            return httpx.Response(200, json={"ok": True, "body": request.content.decode()})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def async_handler(self, request: httpx.Request) -> httpx.Response:
        return self.handler(request)


def test_sync_requests_carry_the_bearer_token() -> None:
    server = TokenEndpoint()
    api = Api(server)
    api.valid = {"tok-1"}
    transport = httpx.MockTransport(api.handler)
    with (
        TokenClient(
            credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        for _ in range(3):
            assert http.get("https://api.example.com/data").status_code == 200
    assert api.seen == ["Bearer tok-1"] * 3
    assert len(server.requests) == 1


def test_a_401_drops_the_token_fetches_a_new_one_and_replays_the_body_once() -> None:
    server = TokenEndpoint()
    api = Api(server)
    api.valid = {"tok-2"}  # tok-1 was revoked
    transport = httpx.MockTransport(api.handler)
    with (
        TokenClient(
            credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        response = http.post("https://api.example.com/data", content=b"payload")
        assert response.status_code == 200
        assert response.json()["body"] == "payload"
        assert tokens.get_token().access_token == "tok-2"
    assert api.seen == ["Bearer tok-1", "Bearer tok-2"]


def test_a_second_401_is_returned_as_is() -> None:
    server = TokenEndpoint()
    api = Api(server)  # accepts nothing
    transport = httpx.MockTransport(api.handler)
    with (
        TokenClient(
            credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        response = http.get("https://api.example.com/data")
    assert response.status_code == 401
    assert len(api.seen) == 2
    assert len(server.requests) == 2


def test_a_401_does_not_drop_a_newer_token_fetched_meanwhile() -> None:
    server = TokenEndpoint()
    transport = httpx.MockTransport(server.sync_handler)
    with TokenClient(
        credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
    ) as tokens:
        auth = BearerAuth(tokens)
        flow = auth.sync_auth_flow(httpx.Request("GET", "https://api.example.com/"))
        request = next(flow)
        assert request.headers["authorization"] == "Bearer tok-1"
        newer = tokens.get_token(force_refresh=True)  # another request already renewed it
        replay = flow.send(httpx.Response(401))
        assert replay.headers["authorization"] == "Bearer tok-2"
        assert tokens.get_token() is newer
    assert len(server.requests) == 2


@pytest.mark.anyio
async def test_async_client_401_recovery_and_audience_override() -> None:
    server = TokenEndpoint()
    api = Api(server)
    api.valid = {"tok-2"}
    transport = httpx.MockTransport(api.async_handler)
    async with AsyncTokenClient(
        credentials(), http_client=httpx.AsyncClient(transport=transport), clock=FakeClock()
    ) as tokens:
        auth = BearerAuth(tokens, audience="https://other.example.com", scope=["x"])
        async with httpx.AsyncClient(transport=transport, auth=auth) as http:
            response = await http.get("https://api.example.com/data")
    assert response.status_code == 200
    assert api.seen == ["Bearer tok-1", "Bearer tok-2"]
    assert server.form(0)["audience"] == "https://other.example.com"
    assert server.form(0)["scope"] == "x"


@pytest.mark.anyio
async def test_a_token_client_with_an_async_http_client_is_a_clear_error() -> None:
    with TokenClient(credentials()) as tokens:
        transport = httpx.MockTransport(lambda r: httpx.Response(200))
        async with httpx.AsyncClient(transport=transport, auth=BearerAuth(tokens)) as http:
            with pytest.raises(ConfigurationError, match="AsyncTokenClient"):
                await http.get("https://api.example.com/")


@pytest.mark.anyio
async def test_an_async_token_client_with_a_sync_http_client_is_a_clear_error() -> None:
    async with AsyncTokenClient(credentials()) as tokens:
        transport = httpx.MockTransport(lambda r: httpx.Response(200))
        with (
            httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
            pytest.raises(ConfigurationError, match="TokenClient"),
        ):
            http.get("https://api.example.com/")  # noqa: ASYNC212 - the mismatch under test


def test_bearer_auth_needs_a_token_client() -> None:
    with pytest.raises(ConfigurationError):
        BearerAuth("not a client")  # type: ignore[arg-type]


def test_sync_bearer_auth_resource_override_is_requested_and_cached_apart() -> None:
    server = TokenEndpoint()
    api = Api(server)
    api.valid = {"tok-1", "tok-2"}
    transport = httpx.MockTransport(api.handler)
    with (
        TokenClient(
            credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.Client(
            transport=transport, auth=BearerAuth(tokens, resource="https://rs.example.com")
        ) as http,
    ):
        assert http.get("https://api.example.com/data").status_code == 200
        assert http.get("https://api.example.com/data").status_code == 200
        assert tokens.get_token().access_token == "tok-2"  # the default key is another entry
        assert tokens.get_token(resource="https://rs.example.com").access_token == "tok-1"
    assert server.form(0)["resource"] == "https://rs.example.com"
    assert "resource" not in server.form(1)
    assert api.seen == ["Bearer tok-1"] * 2


@pytest.mark.anyio
async def test_async_bearer_auth_401_with_resource_drops_only_that_token() -> None:
    server = TokenEndpoint()
    api = Api(server)
    api.valid = {"tok-3"}
    transport = httpx.MockTransport(api.async_handler)
    async with AsyncTokenClient(
        credentials(), http_client=httpx.AsyncClient(transport=transport), clock=FakeClock()
    ) as tokens:
        default = await tokens.get_token()
        auth = BearerAuth(tokens, resource="https://rs.example.com")
        async with httpx.AsyncClient(transport=transport, auth=auth) as http:
            response = await http.get("https://api.example.com/data")
        assert await tokens.get_token() is default
    assert response.status_code == 200
    assert api.seen == ["Bearer tok-2", "Bearer tok-3"]
    assert [server.form(i).get("resource") for i in range(3)] == [
        None,
        "https://rs.example.com",
        "https://rs.example.com",
    ]


@pytest.mark.anyio
async def test_async_a_401_replays_once_with_a_new_token_and_a_second_401_is_returned() -> None:
    server = TokenEndpoint()
    api = Api(server)  # accepts nothing: every request is refused
    transport = httpx.MockTransport(api.async_handler)
    async with (
        AsyncTokenClient(
            credentials(), http_client=httpx.AsyncClient(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.AsyncClient(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        response = await http.get("https://api.example.com/data")
    assert response.status_code == 401
    assert api.seen == ["Bearer tok-1", "Bearer tok-2"]
    assert len(server.requests) == 2


@pytest.mark.anyio
async def test_async_a_401_drops_the_token_and_the_replay_succeeds_with_the_body() -> None:
    server = TokenEndpoint()
    api = Api(server)
    api.valid = {"tok-2"}  # tok-1 was revoked
    transport = httpx.MockTransport(api.async_handler)
    async with (
        AsyncTokenClient(
            credentials(), http_client=httpx.AsyncClient(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.AsyncClient(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        response = await http.post("https://api.example.com/data", content=b"payload")
        assert response.status_code == 200
        assert response.json()["body"] == "payload"
        assert (await tokens.get_token()).access_token == "tok-2"
    assert api.seen == ["Bearer tok-1", "Bearer tok-2"]


# --- issue 8 regressions ------------------------------------------------------------------


def test_an_api_refusing_every_token_costs_a_handful_of_token_requests_not_one_per_call() -> None:
    # Before: 100 calls -> 101 token requests.
    server = TokenEndpoint()
    api = Api(server)  # accepts nothing (wrong audience, API clock off)
    transport = httpx.MockTransport(api.handler)
    with (
        TokenClient(
            credentials(), http_client=httpx.Client(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.Client(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        statuses = [http.get("https://api.example.com/data").status_code for _ in range(100)]
    assert statuses == [401] * 100  # the 401 still reaches the caller
    assert len(server.requests) <= 3
    assert len(api.seen) <= 100 + 3  # at most one replay per renewal


@pytest.mark.anyio
async def test_async_an_api_refusing_every_token_costs_a_handful_of_token_requests() -> None:
    server = TokenEndpoint()
    api = Api(server)
    transport = httpx.MockTransport(api.async_handler)
    async with (
        AsyncTokenClient(
            credentials(), http_client=httpx.AsyncClient(transport=transport), clock=FakeClock()
        ) as tokens,
        httpx.AsyncClient(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        statuses = [(await http.get("https://api.example.com/d")).status_code for _ in range(100)]
    assert statuses == [401] * 100
    assert len(server.requests) <= 3


def test_one_httpx_client_as_both_http_client_and_bearer_auth_client_does_not_deadlock() -> None:
    # Before: the token request went through the client's own BearerAuth, which waited on
    # the very flight it belonged to.
    server = TokenEndpoint()
    api = Api(server)
    api.valid = {"tok-1"}
    http = httpx.Client(transport=httpx.MockTransport(api.handler))
    tokens = TokenClient(credentials(), http_client=http, clock=FakeClock())
    http.auth = BearerAuth(tokens)
    outcome: list[int] = []
    worker = threading.Thread(
        target=lambda: outcome.append(http.get("https://api.example.com/data").status_code),
        daemon=True,
    )
    worker.start()
    worker.join(10)
    assert outcome == [200]
    assert server.requests[0].headers.get("authorization", "").startswith("Basic ")
    tokens.close()
    http.close()


@pytest.mark.anyio
async def test_async_one_httpx_client_as_both_http_client_and_bearer_auth_client() -> None:
    server = TokenEndpoint()
    api = Api(server)
    api.valid = {"tok-1"}
    http = httpx.AsyncClient(transport=httpx.MockTransport(api.async_handler))
    async with AsyncTokenClient(credentials(), http_client=http, clock=FakeClock()) as tokens:
        http.auth = BearerAuth(tokens)
        with anyio.fail_after(10):
            response = await http.get("https://api.example.com/data")
    assert response.status_code == 200
    assert server.requests[0].headers.get("authorization", "").startswith("Basic ")
    await http.aclose()


def test_bearer_auth_calls_only_the_token_clients_seam() -> None:
    """BearerAuth uses the clients' documented seam for auths, never their private members
    (a refactoring of the clients must not break it silently)."""
    import ast
    import inspect

    from m2m_client import _auth

    used: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(_auth))):
        if isinstance(node, ast.Attribute) and (
            (isinstance(node.value, ast.Name) and node.value.id == "tokens")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "_tokens")
        ):
            used.add(node.attr)
    assert used, "the test no longer sees how BearerAuth calls its token client"
    private = sorted(name for name in used if name.startswith("_"))
    assert not private, f"BearerAuth reaches into the token clients' privates: {private}"
    seam = {"cache_key", "cached_token", "fetch_token", "token_refused", "dpop_proof", "dpop_nonce"}
    assert used <= seam
    for cls in (TokenClient, AsyncTokenClient):
        assert all(callable(getattr(cls, name, None)) for name in seam)
