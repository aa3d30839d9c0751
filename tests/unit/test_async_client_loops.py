"""One AsyncTokenClient, several event loops (issue 19, item 3): threads each running their own
loop (asyncio and asyncio, asyncio and trio) share one token request and wake at once; the
same client in asyncio.run() twice and then trio.run() works without a failed attempt."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import anyio
import httpx
import pytest

from m2m_client import AccessToken, AsyncTokenClient, ConfigurationError, RetryPolicy, TokenEvent

from ._loopback import serving

# A long budget: a waiter that is not woken waits for it (21 s) instead of ~1 s.
SLOW_BUDGET = RetryPolicy(max_total_seconds=20, max_attempts=2)


def _run(backend: str, fn: Any) -> Any:
    return anyio.run(fn, backend=backend)


@pytest.mark.parametrize(
    ("first", "second"), [("asyncio", "asyncio"), ("asyncio", "trio"), ("trio", "asyncio")]
)
def test_two_threads_with_their_own_loops_share_one_token_request_and_both_wake_at_once(
    first: str, second: str
) -> None:
    # Before: the waiter in the other thread woke only at its timeout (30.9 s by default).
    with serving(token_delay=1.0, delay_from=1) as server:
        tokens = AsyncTokenClient(server.credentials(), retry=SLOW_BUDGET)
        got: dict[str, tuple[AccessToken, float]] = {}

        def worker(name: str, backend: str, delay: float) -> None:
            async def ask() -> None:
                await anyio.sleep(delay)
                started = time.monotonic()
                token = await tokens.get_token()
                got[name] = (token, time.monotonic() - started)

            _run(backend, ask)

        threads = [
            threading.Thread(target=worker, args=("owner", first, 0.0)),
            threading.Thread(target=worker, args=("waiter", second, 0.3)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        asyncio.run(tokens.aclose())
    assert server.token_requests == 1
    assert got["owner"][0] is got["waiter"][0]
    assert got["waiter"][1] < 8.0, f"the waiter woke after {got['waiter'][1]:.1f}s"


def test_the_same_client_in_asyncio_run_twice_then_trio_run_never_fails_an_attempt() -> None:
    # Before: each asyncio.run() after the first paid a failed attempt (the pool belonged to
    # the first loop); trio.run() then failed every attempt and negative-cached the error.
    events: list[TokenEvent] = []
    with serving() as server:
        tokens = AsyncTokenClient(server.credentials(), on_event=events.append)

        async def ask() -> AccessToken:
            return await tokens.get_token(force_refresh=True)

        fetched = [_run(backend, ask) for backend in ("asyncio", "asyncio", "trio", "asyncio")]
        asyncio.run(tokens.aclose())
    assert [token.access_token for token in fetched] == ["tok-1", "tok-2", "tok-3", "tok-4"]
    assert server.token_requests == 4
    assert (tokens.stats.retries, tokens.stats.fetch_failures) == (0, 0)
    assert [event.kind for event in events] == ["token_fetched"] * 4


def test_a_callers_http_client_used_from_another_loop_is_refused_at_once() -> None:
    with serving() as server:
        http = httpx.AsyncClient()
        tokens = AsyncTokenClient(server.credentials(), http_client=http)

        async def first() -> None:
            await tokens.get_token()
            await http.aclose()

        asyncio.run(first())

        async def again() -> None:
            with pytest.raises(ConfigurationError, match="another event loop"):
                await tokens.get_token(force_refresh=True)

        started = time.monotonic()
        _run("trio", again)
        asyncio.run(again())
    assert time.monotonic() - started < 5
    assert server.token_requests == 1  # refused before any request, nothing negative-cached
    assert tokens.stats.fetch_failures == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_caller_in_another_loop_than_the_async_with_block_fetches_itself(backend: str) -> None:
    # The block's task group belongs to its loop: a caller in another thread must not start
    # its token request there (that loop may not look at it for a long time).
    with serving() as server:
        tokens = AsyncTokenClient(server.credentials(), retry=SLOW_BUDGET)
        inside, release = threading.Event(), threading.Event()

        async def block() -> None:
            async with tokens:
                inside.set()
                await anyio.to_thread.run_sync(release.wait, 30)

        thread = threading.Thread(target=_run, args=("asyncio", block))
        thread.start()
        assert inside.wait(10)

        async def other() -> tuple[AccessToken, float]:
            started = time.monotonic()
            token = await tokens.get_token(scope="other")
            return token, time.monotonic() - started

        try:
            token, elapsed = _run(backend, other)
        finally:
            release.set()
            thread.join(30)
    assert token.access_token == "tok-1"
    assert elapsed < 8.0, f"the token came after {elapsed:.1f}s"
    assert server.token_requests == 1
