"""TokenClient (threads), and both clients against a real loopback HTTP token endpoint."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from m2m_client import (
    AsyncTokenClient,
    ClientCredentials,
    ConfigurationError,
    DiscoveryError,
    InvalidTokenResponse,
    RetryPolicy,
    TokenClient,
    TokenEndpointUnavailable,
    TokenEvent,
)

from ._calling import (
    FAST_RETRY,
    ISSUER,
    NOW,
    FakeClock,
    TokenEndpoint,
    credentials,
    loopback_token_endpoint,
)


def make_client(
    server: TokenEndpoint, clock: FakeClock, events: list[TokenEvent] | None = None, **kw: Any
) -> TokenClient:
    return TokenClient(
        kw.pop("creds", None) or credentials(),
        http_client=server.client(),
        clock=clock,
        monotonic=clock,
        sleep=clock.sleep,
        retry=kw.pop("retry", FAST_RETRY),
        on_event=events.append if events is not None else None,
        seed=1,
        **kw,
    )


def run_threads(n: int, fn: Any, release: threading.Event | None = None) -> list[Any]:
    results: list[Any] = [None] * n
    start = threading.Barrier(n + 1)

    def one(i: int) -> None:
        start.wait()
        results[i] = fn()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    if release is not None:
        release.wait(0.05)  # let the threads pile up behind the one request (not asserted on)
        release.set()
    for t in threads:
        t.join(10)
    return results


def test_sixty_four_threads_on_a_cold_cache_cause_one_request() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.gate = threading.Event()
    with make_client(server, clock) as tokens:
        results = run_threads(64, tokens.get_token, release=server.gate)
    assert len(server.requests) == 1
    assert {r.access_token for r in results} == {"tok-1"}


def test_sixty_four_threads_at_expiry_cause_one_request() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    with make_client(server, clock) as tokens:
        old = tokens.get_token()
        clock.now = old.usable_until + 1
        server.gate = threading.Event()
        results = run_threads(64, tokens.get_token, release=server.gate)
    assert len(server.requests) == 2
    assert {r.access_token for r in results} == {"tok-2"}


def test_refresh_ahead_runs_in_a_background_thread_while_callers_get_the_old_token() -> None:
    server, clock, events = TokenEndpoint(), FakeClock(), []
    fetched = threading.Event()
    with make_client(server, clock, events) as tokens:
        old = tokens.get_token()
        clock.now = old.refresh_at + 1
        server.gate = threading.Event()
        tokens._core.reporter.on_event = lambda e: (
            events.append(e),
            e.kind == "token_fetched" and fetched.set(),
        )
        results = run_threads(16, tokens.get_token)
        assert all(r is old for r in results)
        server.gate.set()
        assert fetched.wait(10)
        assert tokens.get_token().access_token == "tok-2"
    assert len(server.requests) == 2
    assert [e.kind for e in events].count("token_refresh_started") == 1


def test_retries_then_succeeds_without_real_sleeping() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.script = [httpx.Response(503), httpx.ConnectTimeout("t")]
    with make_client(server, clock) as tokens:
        assert tokens.get_token().access_token == "tok-3"
    assert clock.sleeps == [0.1, 0.2]


def test_exhausted_retries_raise_unavailable() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.script = [httpx.ConnectError("refused")] * 3
    with make_client(server, clock) as tokens, pytest.raises(TokenEndpointUnavailable) as info:
        tokens.get_token()
    assert isinstance(info.value.__cause__, Exception)
    assert info.value.attempts == 3


def test_discovery_uses_openid_configuration_first() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.publish_metadata(f"{ISSUER}.well-known/openid-configuration")
    with make_client(server, clock, creds=credentials(token_url=None, issuer=ISSUER)) as tokens:
        run_threads(8, tokens.get_token)
        tokens.get_token(scope="other")
    assert server.metadata_requests == [f"{ISSUER}.well-known/openid-configuration"]


def test_user_http_client_is_left_open_and_ours_is_closed_and_then_refuses_calls() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    http = server.client()
    with TokenClient(credentials(), http_client=http, clock=clock) as tokens:
        tokens.get_token()
    assert not http.is_closed
    with loopback_token_endpoint() as url:
        ours = TokenClient(ClientCredentials(token_url=url, client_id="w", client_secret="s"))
        ours.get_token()
        assert ours._fetcher.driver is not None
        owned = ours._fetcher.driver._client
        ours.close()
    assert owned is not None
    assert owned.is_closed
    # Before: a call after close() silently opened a new connection pool.
    with pytest.raises(ConfigurationError, match="closed"):
        ours.get_token()


def test_an_async_http_client_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        TokenClient(credentials(), http_client=httpx.AsyncClient())  # type: ignore[arg-type]


def test_credentials_must_be_client_credentials() -> None:
    with pytest.raises(ConfigurationError):
        TokenClient({"client_id": "x"})  # type: ignore[arg-type]


# --- a real token endpoint on 127.0.0.1 -------------------------------------------------


@pytest.fixture
def loopback_token_url() -> Iterator[str]:
    with loopback_token_endpoint() as url:
        yield url


def test_sync_client_gets_a_token_over_real_http(loopback_token_url: str) -> None:
    creds = ClientCredentials(token_url=loopback_token_url, client_id="w", client_secret="s")
    with TokenClient(creds, retry=RetryPolicy(max_attempts=1)) as tokens:
        token = tokens.get_token()
        assert token.access_token.startswith("real-")
        assert tokens.get_token() is token


@pytest.mark.anyio
async def test_async_client_gets_a_token_over_real_http(loopback_token_url: str) -> None:
    creds = ClientCredentials(token_url=loopback_token_url, client_id="w", client_secret="s")
    async with AsyncTokenClient(creds, retry=RetryPolicy(max_attempts=1)) as tokens:
        results = []
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(lambda: tokens.get_token())
        token = await tokens.get_token()
        results.append(token)
    assert token.access_token.startswith("real-")
    assert tokens.stats.token_requests == 1


def test_resource_override_is_sent_and_cached_apart() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    with make_client(server, clock) as tokens:
        default = tokens.get_token()
        res = tokens.get_token(resource="https://rs.example.com", scope="a b")
        assert tokens.get_token(resource="https://rs.example.com", scope=["b", "a"]) is res
        assert tokens.get_token() is default
        assert tokens.invalidate(res, resource="https://rs.example.com") is False  # other scopes
        assert tokens.invalidate(res, resource="https://rs.example.com", scope="a b") is True
    assert res.access_token == "tok-2"
    assert server.form(1)["resource"] == "https://rs.example.com"
    assert server.form(1)["scope"] == "a b"


def _error_of(call: Any) -> BaseException | None:
    try:
        call()
    except Exception as exc:
        return exc
    return None


def test_a_failed_discovery_is_negatively_cached_across_threads() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    server.publish_metadata(f"{ISSUER}.well-known/openid-configuration", issuer="https://evil/")
    with make_client(server, clock, creds=credentials(token_url=None, issuer=ISSUER)) as tokens:
        results = run_threads(8, lambda: _error_of(tokens.get_token))
        assert all(
            isinstance(r, DiscoveryError) and "not the configured issuer" in str(r) for r in results
        )
        assert server.metadata_requests == [f"{ISSUER}.well-known/openid-configuration"]
        clock.advance(RetryPolicy().negative_cache_seconds)
        with pytest.raises(DiscoveryError, match="not the configured issuer"):
            tokens.get_token()
    assert len(server.metadata_requests) == 2


# --- issue 8 regressions ------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_does_not_wait_on_the_parents_flight() -> None:
    # Before: the child inherited the in-flight record, not the thread that would land it,
    # and its get_token waited forever.
    server, clock = TokenEndpoint(), FakeClock()
    server.gate = threading.Event()
    tokens = make_client(server, clock)
    parent = threading.Thread(target=tokens.get_token, daemon=True)
    parent.start()
    deadline = time.monotonic() + 5
    while not len(tokens._core.flights) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # let the owner block on the server (not asserted on)
    assert len(tokens._core.flights) == 1  # the parent's flight is in progress
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            server.gate = None
            reply = "ok " + tokens.get_token().access_token
        except BaseException as exc:
            reply = f"error {type(exc).__name__}: {exc}"
        os.write(write_end, reply.encode())
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 15)
        reply = os.read(read_end, 1000).decode() if ready else "the child hung"
    finally:
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        server.gate.set()
        parent.join(5)
        tokens.close()
    assert reply == "ok tok-1"  # its own token request, not the parent's flight
    assert not parent.is_alive()


def test_a_cache_failing_while_a_flight_lands_wakes_every_waiting_thread() -> None:
    # Before: the owner saw a raw ConnectionError and every waiter waited forever.
    class SetFails:
        def get(self, key: object) -> None:
            return None

        def set(self, key: object, token: object) -> None:
            raise ConnectionError("redis down")

        def delete(self, key: object, token: object) -> bool:
            return False

    server, clock = TokenEndpoint(), FakeClock()
    server.gate = threading.Event()
    with make_client(server, clock, cache=SetFails()) as tokens:
        results = run_threads(16, lambda: _error_of(tokens.get_token) or "ok", server.gate)
    assert results == ["ok"] * 16
    assert len(server.requests) == 1


def test_a_shared_cache_level_is_asked_by_the_one_flight_owner_only() -> None:
    class Shared:
        def __init__(self) -> None:
            self.obtains: list[str | None] = []
            self.invalidated: list[str] = []

        def obtain(self, key: Any, fetch: Any, *, policy: Any, stale: Any) -> Any:
            self.obtains.append(stale.access_token if stale else None)
            return fetch()

        def invalidate(self, key: Any, token: Any) -> None:
            self.invalidated.append(token.access_token)

    server, clock, shared = TokenEndpoint(), FakeClock(), Shared()
    server.gate = threading.Event()
    with make_client(server, clock, shared_cache=shared) as tokens:
        results = run_threads(16, tokens.get_token, server.gate)
        assert shared.obtains == [None]
        assert tokens.invalidate(results[0]) is True
        assert shared.invalidated == ["tok-1"]
        assert tokens.get_token().access_token == "tok-2"
    assert shared.obtains == [None, "tok-1"]


def test_a_shared_cache_of_the_wrong_kind_is_refused() -> None:
    class AsyncShared:
        async def obtain(self, key: Any, fetch: Any, *, policy: Any, stale: Any) -> Any: ...

        async def invalidate(self, key: Any, token: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="shared_cache"):
        TokenClient(credentials(), shared_cache=AsyncShared())  # type: ignore[arg-type]


def test_a_shared_level_making_the_owner_wait_leaves_the_fetch_its_whole_budget() -> None:
    class SlowShared:
        wait_timeout = 1.0  # the level's own bound on its lease wait

        def obtain(self, key: Any, fetch: Any, *, policy: Any, stale: Any) -> Any:
            time.sleep(0.4)  # another process holds the fleet's lease for a while
            return fetch()

        def invalidate(self, key: Any, token: Any) -> None:
            pass

    server, clock = TokenEndpoint(), FakeClock()
    retry = RetryPolicy(max_attempts=1, max_total_seconds=0.3)
    with make_client(server, clock, retry=retry, shared_cache=SlowShared()) as tokens:
        results = run_threads(8, lambda: _error_of(tokens.get_token) or "ok")
    assert results == ["ok"] * 8  # waiters allow for the lease wait; the fetch has 0.3 s
    assert len(server.requests) == 1


def test_a_wait_for_the_discovery_lock_ends_with_the_fetch_budget() -> None:
    server, clock = TokenEndpoint(), FakeClock()
    creds = credentials(token_url=None, issuer=ISSUER)
    retry = RetryPolicy(max_attempts=1, max_total_seconds=0.3)
    with make_client(server, clock, creds=creds, retry=retry) as tokens:
        tokens._fetcher.discovery_lock.acquire()  # a discovery that never ends
        started = time.monotonic()
        with pytest.raises(TokenEndpointUnavailable, match="discovery in progress"):
            tokens.get_token()
        assert time.monotonic() - started < 0.3 + 1.0
        tokens._fetcher.discovery_lock.release()


@pytest.mark.parametrize("expires_in", [0.5, 0, -30])
def test_a_sub_second_expires_in_does_not_turn_every_call_into_a_token_request(
    expires_in: float,
) -> None:
    # Before: expires_in 0.5 was accepted, so 100 calls a few ms apart made 95 token requests.
    server, clock = TokenEndpoint(expires_in=expires_in), FakeClock()  # type: ignore[arg-type]
    tokens = make_client(server, clock)
    for _ in range(100):
        with pytest.raises(InvalidTokenResponse, match="expires_in must be between 1 and"):
            tokens.get_token()
        clock.advance(0.05)  # 100 calls in 5 s: inside the 10 s negative cache
    assert len(server.requests) == 1


def _refresh_points_after_fork(
    tokens: TokenClient, server: TokenEndpoint, n: int
) -> tuple[list[float], list[float]]:
    """Fetch ``n`` tokens in the parent and in a forked child; both lists of refresh_at."""

    def draw() -> list[float]:
        points = []
        for i in range(n):
            points.append(tokens.get_token(audience=f"https://api-{i}.example.com").refresh_at)
        return points

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            reply = repr(draw())
        except BaseException as exc:
            reply = f"error {type(exc).__name__}: {exc}"
        os.write(write_end, reply.encode())
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 15)
        reply = os.read(read_end, 100_000).decode() if ready else "the child hung"
    finally:
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
    parent = draw()
    assert reply.startswith("["), reply
    return parent, [float(x) for x in reply.strip("[]").split(",")]


def test_forked_workers_draw_their_own_refresh_ahead_jitter() -> None:
    # Before: the unseeded clients' shared Random was copied into every forked worker, so a
    # gunicorn --preload fleet refreshed each token at the very same instant.
    server, clock = TokenEndpoint(), FakeClock()
    tokens = TokenClient(credentials(), http_client=server.client(), clock=clock, monotonic=clock)
    with tokens:
        parent, child = _refresh_points_after_fork(tokens, server, 5)
    assert len(parent) == len(child) == 5
    assert parent != child
    assert all(NOW < point < NOW + 3600 for point in parent + child)


def test_a_rate_limit_beyond_the_budget_holds_callers_until_the_server_allows() -> None:
    # Every caller is answered from the negative cache until the server's reset (bounded),
    # not one 429 every negative_cache_seconds.
    server, clock = TokenEndpoint(), FakeClock()
    limited = httpx.Response(429, headers={"RateLimit": '"client";r=0;t=60'})
    server.script = [limited]
    tokens = make_client(server, clock)
    for _ in range(5):
        with pytest.raises(TokenEndpointUnavailable) as info:
            tokens.get_token()
        assert info.value.retry_after == 60
        clock.advance(11)  # past negative_cache_seconds (10), inside the server's 60 s
    assert len(server.requests) == 1
    clock.advance(10)  # 65 s after the answer: the server's wait is over
    assert tokens.get_token().access_token
    assert len(server.requests) == 2
