"""AsyncTokenClient: cache, single flight, refresh-ahead, retry, negative cache, discovery."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio
import httpx
import pytest

from m2m_client import (
    AccessToken,
    AsyncTokenClient,
    ClientCredentials,
    ConfigurationError,
    DiscoveryError,
    InvalidTokenResponse,
    RefreshPolicy,
    RetryPolicy,
    TokenEndpointError,
    TokenEndpointUnavailable,
    TokenEvent,
)

from ._calling import (
    FAST_RETRY,
    ISSUER,
    TOKEN_URL,
    FakeClock,
    TokenEndpoint,
    credentials,
    loopback_token_endpoint,
    oauth_error,
)

pytestmark = pytest.mark.anyio


def make_client(
    server: TokenEndpoint, clock: FakeClock, events: list[TokenEvent] | None = None, **kw: object
) -> AsyncTokenClient:
    return AsyncTokenClient(
        kw.pop("creds", None) or credentials(),  # type: ignore[arg-type]
        http_client=server.async_client(),
        clock=clock,
        monotonic=clock,
        sleep=clock.async_sleep,
        retry=kw.pop("retry", FAST_RETRY),  # type: ignore[arg-type]
        on_event=events.append if events is not None else None,
        seed=1,
        **kw,  # type: ignore[arg-type]
    )


async def gather(n: int, fn: object) -> list[object]:
    results: list[object] = [None] * n

    async def one(i: int) -> None:
        results[i] = await fn()  # type: ignore[operator]

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return results


async def test_a_token_is_fetched_once_then_served_from_the_cache() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    async with make_client(server, clock) as tokens:
        first = await tokens.get_token()
        second = await tokens.get_token()
    assert first is second
    assert first.access_token == "tok-1"
    assert first.expires_at == clock.now + 3600
    assert len(server.requests) == 1
    assert server.form() == {
        "grant_type": "client_credentials",
        "scope": "read:data",
        "audience": "https://api.example.com",
    }


async def test_thousand_concurrent_callers_on_a_cold_cache_cause_one_request() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.async_gate = anyio.Event()
    async with make_client(server, clock) as tokens, anyio.create_task_group() as tg:
        results: list[object] = []

        async def call() -> None:
            results.append(await tokens.get_token())

        for _ in range(1000):
            tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        server.async_gate.set()
    assert len(server.requests) == 1
    assert len(results) == 1000
    assert {id(r) for r in results} == {id(results[0])}


async def test_at_expiry_thousand_callers_wait_for_one_new_token() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    async with make_client(server, clock) as tokens:
        old = await tokens.get_token()
        clock.now = old.usable_until  # inside the safety margin: expired
        results = await gather(1000, tokens.get_token)
    assert len(server.requests) == 2
    assert {r.access_token for r in results} == {"tok-2"}  # type: ignore[attr-defined]


async def test_in_refresh_ahead_one_caller_refreshes_in_background_others_get_the_old_token() -> (
    None
):
    server, clock, events = TokenEndpoint(), FakeClock(), []
    async with make_client(server, clock, events) as tokens:
        old = await tokens.get_token()
        clock.now = old.refresh_at + 1
        server.async_gate = anyio.Event()
        results = await gather(200, tokens.get_token)
        assert all(r is old for r in results)  # nobody waited for the refresh
        server.async_gate.set()
        await anyio.wait_all_tasks_blocked()
        new = await tokens.get_token()
    assert len(server.requests) == 2
    assert new.access_token == "tok-2"
    assert [e.kind for e in events].count("token_refresh_started") == 1


async def test_failed_background_refresh_fails_nobody_and_is_retried_later() -> None:
    server, clock, events = TokenEndpoint(), FakeClock(), []
    async with make_client(server, clock, events, retry=RetryPolicy(max_attempts=1)) as tokens:
        old = await tokens.get_token()
        clock.now = old.refresh_at + 1
        server.script = [httpx.Response(503)]
        assert await tokens.get_token() is old
        await anyio.wait_all_tasks_blocked()
        for _ in range(20):  # no tight loop: no new attempt before the retry delay
            assert await tokens.get_token() is old
        assert len(server.requests) == 2
        assert tokens.stats.refresh_failures == 1
        assert "token_refresh_failed" in [e.kind for e in events]
        clock.advance(10)
        await tokens.get_token()
        await anyio.wait_all_tasks_blocked()
        assert len(server.requests) == 3
        assert (await tokens.get_token()).access_token == "tok-3"


async def test_without_async_with_the_triggering_caller_refreshes_inline() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    tokens = make_client(server, clock)
    old = await tokens.get_token()
    clock.now = old.refresh_at + 1
    assert await tokens.get_token() is old
    assert (await tokens.get_token()).access_token == "tok-2"
    await tokens.aclose()


@pytest.mark.parametrize("use_context", [True, False])
async def test_a_cancelled_waiter_does_not_cancel_the_fetch_for_others(use_context: bool) -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.async_gate = anyio.Event()
    tokens = make_client(server, clock)
    if use_context:
        await tokens.__aenter__()
    got: list[object] = []

    async with anyio.create_task_group() as tg:
        first_scope = anyio.CancelScope()

        async def impatient() -> None:
            with first_scope:
                await tokens.get_token()

        async def patient() -> None:
            got.append(await tokens.get_token())

        tg.start_soon(impatient)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(patient)
        await anyio.wait_all_tasks_blocked()
        first_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        server.async_gate.set()
    assert len(got) == 1
    assert got[0].access_token == "tok-1"  # type: ignore[attr-defined]
    assert len(server.requests) == 1
    if use_context:
        await tokens.__aexit__(None, None, None)
    else:
        await tokens.aclose()


async def test_a_waiter_timing_out_leaves_the_token_cached_for_the_next_call() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.async_gate = anyio.Event()
    async with make_client(server, clock) as tokens:
        with anyio.move_on_after(0.01) as scope:
            await tokens.get_token()
        assert scope.cancelled_caught
        server.async_gate.set()
        token = await tokens.get_token()
    assert token.access_token == "tok-1"
    assert len(server.requests) == 1


async def test_transient_failures_are_retried_with_backoff_and_retry_after() -> None:
    server, clock, events = TokenEndpoint(), FakeClock(), []
    server.script = [
        httpx.ConnectError("refused"),
        httpx.Response(429, headers={"Retry-After": "2"}),
        httpx.ReadTimeout("slow"),
    ]
    retry = RetryPolicy(max_attempts=4, initial_backoff=0.5, jitter=False)
    async with make_client(server, clock, events, retry=retry) as tokens:
        token = await tokens.get_token()
    assert token.access_token == "tok-4"
    assert clock.sleeps == [0.5, 2.0, 2.0]
    assert [e.attempt for e in events if e.kind == "retry"] == [1, 2, 3]
    assert tokens.stats.retries == 3


async def test_expiry_counts_from_when_the_request_was_sent() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    sent_at = clock.now
    server.script = [httpx.Response(500), lambda r: server.issue()]
    async with make_client(server, clock, retry=RetryPolicy(jitter=False, initial_backoff=4)) as t:
        token = await t.get_token()
    assert token.expires_at == sent_at + 4 + 3600  # second attempt sent 4 s later


async def test_exhausted_retries_raise_unavailable_with_the_last_cause() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.script = [httpx.Response(502)] * 3
    async with make_client(server, clock) as tokens:
        with pytest.raises(TokenEndpointUnavailable) as info:
            await tokens.get_token()
    assert info.value.attempts == 3
    assert "HTTP 502" in str(info.value.last_cause)
    assert len(server.requests) == 3


async def test_an_oversized_response_is_refused() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    big = b'{"access_token": "' + b"a" * 70_000 + b'", "token_type": "Bearer"}'
    server.script = [httpx.Response(200, content=big)]
    async with make_client(server, clock) as tokens:
        with pytest.raises(InvalidTokenResponse, match="limit"):
            await tokens.get_token()


async def test_discovery_falls_back_to_rfc_8414_and_runs_once() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.publish_metadata(f"{ISSUER}.well-known/oauth-authorization-server")
    creds = credentials(token_url=None, issuer=ISSUER)
    async with make_client(server, clock, creds=creds) as tokens:
        await gather(50, tokens.get_token)
        await tokens.get_token(audience="https://other")
    assert server.metadata_requests == [
        f"{ISSUER}.well-known/openid-configuration",
        f"{ISSUER}.well-known/oauth-authorization-server",
    ]
    assert str(server.requests[0].url) == TOKEN_URL


async def test_discovery_rejects_metadata_for_another_issuer() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.publish_metadata(f"{ISSUER}.well-known/openid-configuration", issuer="https://evil/")
    async with make_client(server, clock, creds=credentials(token_url=None, issuer=ISSUER)) as t:
        with pytest.raises(DiscoveryError, match="not the configured issuer"):
            await t.get_token()
    assert server.requests == []


async def test_discovery_without_any_metadata_says_to_set_token_url() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    async with make_client(server, clock, creds=credentials(token_url=None, issuer=ISSUER)) as t:
        with pytest.raises(DiscoveryError, match="token_url"):
            await t.get_token()


async def test_a_failing_event_hook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    server, clock = TokenEndpoint(), FakeClock()

    def broken(event: TokenEvent) -> None:
        raise RuntimeError("metrics down")

    async with AsyncTokenClient(
        credentials(), http_client=server.async_client(), clock=clock, on_event=broken
    ) as t:
        with caplog.at_level(logging.ERROR, logger="m2m_client"):
            assert (await t.get_token()).access_token == "tok-1"
    assert "on_event hook raised" in caplog.text


async def test_a_user_supplied_http_client_is_not_closed() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    http = server.async_client()
    async with AsyncTokenClient(credentials(), http_client=http, clock=clock) as tokens:
        await tokens.get_token()
    assert not http.is_closed
    await http.aclose()


def _record_flight_drivers(tokens: AsyncTokenClient) -> list[Any]:
    """The drivers (each with its own HTTP client) the client opens for its token requests."""
    opened: list[Any] = []
    open_driver = tokens._fetcher._open

    def record() -> Any:
        driver = open_driver()
        opened.append(driver)
        return driver

    tokens._fetcher._open = record  # type: ignore[method-assign]
    return opened


async def test_our_own_http_client_is_closed_and_then_refuses_calls() -> None:
    with loopback_token_endpoint() as url:
        tokens = AsyncTokenClient(
            ClientCredentials(token_url=url, client_id="w", client_secret="s")
        )
        opened = _record_flight_drivers(tokens)
        async with tokens:
            await tokens.get_token()
            # Issue 19: each token request's own client is closed at its end, in its loop.
            assert [driver._closed for driver in opened] == [True]
    assert tokens._fetcher.driver is None
    with pytest.raises(ConfigurationError, match="closed"):
        await tokens.get_token()


async def test_a_sync_http_client_is_refused() -> None:
    from m2m_client import ConfigurationError

    with pytest.raises(ConfigurationError):
        AsyncTokenClient(credentials(), http_client=httpx.Client())  # type: ignore[arg-type]


async def test_invalidate_drops_only_the_cached_token() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    async with make_client(server, clock) as tokens:
        old = await tokens.get_token()
        new = await tokens.get_token(force_refresh=True)
        assert tokens.invalidate(old) is False
        assert await tokens.get_token() is new
        assert tokens.invalidate(new) is True
        assert (await tokens.get_token()).access_token == "tok-3"


async def test_resource_is_a_per_call_override_cached_apart_from_audience() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    async with make_client(server, clock) as tokens:
        default = await tokens.get_token()
        res = await tokens.get_token(resource="https://rs.example.com")
        again = await tokens.get_token(resource="https://rs.example.com")
        assert tokens.invalidate(res, resource="https://rs.example.com") is True
        assert tokens.invalidate(default, resource="https://rs.example.com") is False
        assert await tokens.get_token() is default
        renewed = await tokens.get_token(resource="https://rs.example.com")
    assert again is res
    assert (default.access_token, res.access_token, renewed.access_token) == (
        "tok-1",
        "tok-2",
        "tok-3",
    )
    assert "resource" not in server.form(0)
    assert server.form(1)["resource"] == "https://rs.example.com"
    assert server.form(1)["audience"] == "https://api.example.com"  # the default still goes


async def test_a_failed_discovery_is_not_repeated_by_every_caller() -> None:
    server, clock, events = TokenEndpoint(), FakeClock(), []
    creds = credentials(token_url=None, issuer=ISSUER)
    async with make_client(server, clock, events, creds=creds) as tokens:
        with pytest.raises(DiscoveryError, match="token_url"):
            await tokens.get_token()
        tried = len(server.metadata_requests)
        for _ in range(5):
            with pytest.raises(DiscoveryError, match="token_url"):
                await tokens.get_token(scope="other")
        assert len(server.metadata_requests) == tried == 2  # OIDC, then RFC 8414
        assert "negative_cache_hit" in [e.kind for e in events]
        clock.advance(RetryPolicy().negative_cache_seconds)
        server.publish_metadata(f"{ISSUER}.well-known/openid-configuration")
        assert (await tokens.get_token()).access_token == "tok-1"
    assert len(server.metadata_requests) == tried + 1


async def test_unreachable_metadata_is_a_discovery_error_naming_the_issuer() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.metadata[f"{ISSUER}.well-known/openid-configuration"] = httpx.Response(503)
    creds = credentials(token_url=None, issuer=ISSUER)
    async with make_client(server, clock, creds=creds) as tokens:
        with pytest.raises(DiscoveryError, match="failed after") as info:
            await tokens.get_token()
        with pytest.raises(DiscoveryError, match="failed after"):
            await tokens.get_token()
    assert "HTTP 503" in str(info.value)
    oidc = f"{ISSUER}.well-known/openid-configuration"
    assert server.metadata_requests.count(oidc) == FAST_RETRY.max_attempts
    assert len(server.metadata_requests) == FAST_RETRY.max_attempts + 1  # then RFC 8414, once


# --- issue 8 regressions ------------------------------------------------------------------


async def test_async_with_raises_the_blocks_own_exception_unwrapped_and_closes() -> None:
    # Before: every exception raised in the block came out as an ExceptionGroup, and the
    # owned HTTP client stayed open.
    with loopback_token_endpoint() as url:
        creds = ClientCredentials(token_url=url, client_id="w", client_secret="s")
        tokens = AsyncTokenClient(creds)
        opened = _record_flight_drivers(tokens)

        async def block() -> None:
            async with tokens:
                await tokens.get_token()
                raise KeyError("mine")

        with pytest.raises(KeyError) as info:
            await block()
    assert type(info.value) is KeyError
    assert [driver._closed for driver in opened] == [True]


async def test_async_with_raises_the_clients_own_error_unwrapped() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.script = [oauth_error(401, "invalid_client")]

    async def block() -> None:
        async with make_client(server, clock) as tokens:
            await tokens.get_token()

    with pytest.raises(TokenEndpointError) as info:
        await block()
    assert type(info.value) is TokenEndpointError
    assert info.value.error == "invalid_client"


async def test_async_with_a_refresh_in_flight_still_exits_promptly_with_the_error() -> None:
    server, clock = TokenEndpoint(), FakeClock()

    async def block() -> None:
        async with make_client(server, clock) as tokens:
            old = await tokens.get_token()
            clock.now = old.refresh_at + 1
            server.async_gate = anyio.Event()  # the background refresh hangs
            assert await tokens.get_token() is old
            await anyio.wait_all_tasks_blocked()
            raise ValueError("mine")

    with anyio.fail_after(5), pytest.raises(ValueError, match="mine"):
        await block()


class _SetFails:
    """A TokenCache whose set raises (Redis blipping while a flight lands)."""

    def __init__(self) -> None:
        self.sets = 0

    def get(self, key: object) -> None:
        return None

    def set(self, key: object, token: object) -> None:
        self.sets += 1
        raise ConnectionError("redis down")

    def delete(self, key: object, token: object) -> bool:
        return False


@pytest.mark.parametrize("use_context", [True, False])
async def test_a_cache_failing_while_a_flight_lands_wakes_every_waiter(use_context: bool) -> None:
    # Before: the error escaped into the client's task group (async) / waiters hung (sync).
    server, clock = TokenEndpoint(), FakeClock()
    server.async_gate = anyio.Event()
    cache = _SetFails()
    tokens = make_client(server, clock, cache=cache)
    results: list[object] = []

    async def call() -> None:
        results.append((await tokens.get_token()).access_token)

    async with contextlib.AsyncExitStack() as stack:
        if use_context:
            await stack.enter_async_context(tokens)
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            server.async_gate.set()
    assert results == ["tok-1"] * 20
    assert cache.sets == 1
    await tokens.aclose()


async def test_discovery_failing_is_one_discovery_for_every_cache_key() -> None:
    # Before: 5 scopes -> 20 metadata requests; the 404 HTML kind was not negative-cached.
    server, clock = TokenEndpoint(), FakeClock()
    creds = credentials(token_url=None, issuer=ISSUER)
    server.async_gate = anyio.Event()
    async with make_client(server, clock, creds=creds) as tokens:
        errors: list[BaseException] = []

        async def call(scope: str) -> None:
            try:
                await tokens.get_token(scope=scope)
            except DiscoveryError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                for _ in range(4):
                    tg.start_soon(call, f"scope-{i}")
        for i in range(200):
            with pytest.raises(DiscoveryError):
                await tokens.get_token(scope=f"later-{i}")
    assert len(errors) == 20
    assert len(server.metadata_requests) == 2  # OIDC, then RFC 8414: once for everyone


async def test_every_wait_on_a_flight_that_never_lands_has_a_deadline() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    async with make_client(server, clock) as tokens:
        key = tokens._core.default_key
        # A flight whose owner vanished (what a fork leaves behind), already past its deadline.
        tokens._core.flights.start(key, deadline=0.0)
        with anyio.fail_after(5), pytest.raises(TokenEndpointUnavailable, match="gave up"):
            await tokens.get_token()


async def test_a_shared_cache_level_is_asked_by_the_one_flight_owner_only() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    shared = FakeSharedCache()
    async with make_client(server, clock, shared_cache=shared) as tokens:
        results = await gather(50, tokens.get_token)
        token = results[0]
        assert isinstance(token, AccessToken)
        assert shared.obtains == [None]  # one obtain, nothing stale
        assert await tokens.token_refused(tokens._core.default_key, token) is True
        assert shared.invalidated == [token.access_token]
        again = await tokens.get_token()
        assert shared.obtains == [None, token.access_token]  # the refused token is stale
    assert again.access_token == "tok-2"
    assert len(server.requests) == 2


class FakeSharedCache:
    """A tiny in-memory AsyncSharedTokenCache (the Redis level is tested on its own)."""

    def __init__(self) -> None:
        self.entries: dict[object, AccessToken] = {}
        self.obtains: list[str | None] = []
        self.invalidated: list[str] = []

    async def obtain(
        self, key: Any, fetch: Any, *, policy: RefreshPolicy, stale: AccessToken | None
    ) -> AccessToken:
        self.obtains.append(stale.access_token if stale else None)
        entry = self.entries.get(key)
        if entry is not None and (stale is None or entry.access_token != stale.access_token):
            return entry
        token: AccessToken = await fetch()
        self.entries[key] = token
        return token

    async def invalidate(self, key: Any, token: AccessToken) -> None:
        self.invalidated.append(token.access_token)
        if self.entries.get(key) == token:
            del self.entries[key]
