"""The async cache's connections: none outlives its event loop, none leaks per cancelled call.

Counted on the server (``CLIENT LIST``, by the client name the cache copies from the client
passed to it), so a connection the process forgot but the server still holds counts too. The
autouse fixture of ``conftest.py`` fails each test that leaves one to the garbage collector.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import anyio
import pytest
import redis
import redis.asyncio

from m2m_client import AccessToken, RefreshPolicy
from m2m_client._token import CacheKey
from m2m_client.cache import AsyncRedisTokenCache
from tests.redis.conftest import RedisServer

KEY = "connections-test-key-" + "c" * 20
NAME = "m2m-connection-probe"
ADMIN = "m2m-test-admin"
POLICY = RefreshPolicy()


def admin_client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5, client_name=ADMIN)


def open_connections(server: RedisServer) -> int:
    """Connections the server holds, but for the test's own: named or not (a connection
    cancelled before it sent its CLIENT SETNAME has no name yet)."""
    admin = admin_client(server)
    try:
        return sum(1 for c in admin.client_list() if c.get("name") != ADMIN)
    finally:
        admin.close()


def settled_connections(server: RedisServer, at_most: int, timeout: float = 5.0) -> int:
    """open_connections() once it is at most ``at_most``, or when ``timeout`` runs out: the
    server notices a closed socket on a later turn of its event loop, later still under load."""
    deadline = time.monotonic() + timeout
    while (count := open_connections(server)) > at_most and time.monotonic() < deadline:
        time.sleep(0.01)
    return count


def make_cache(server: RedisServer, **options: object) -> AsyncRedisTokenCache:
    client = redis.asyncio.Redis(host="127.0.0.1", port=server.port, client_name=NAME)
    return AsyncRedisTokenCache(client, encryption_key=KEY, operation_timeout=2.0, **options)  # type: ignore[arg-type]


def key(n: int = 0) -> CacheKey:
    return CacheKey("https://issuer.test/token", "conn-client", f"https://api-{n}.test", None, ())


async def fetch(delay: float = 0.0) -> AccessToken:
    await anyio.sleep(delay)
    return POLICY.make_token(
        access_token=f"token-{random.random()}",
        token_type="Bearer",
        expires_in=60,
        scope=None,
        sent_at=time.time(),
        rng=random.Random(),
    )


def test_an_event_loop_that_ends_takes_the_caches_connections_with_it(
    redis_server: RedisServer,
) -> None:
    # A service that runs asyncio.run() per job, never calling aclose(): each run used to
    # leave its connections open until a garbage collection (then ResourceWarnings).
    cache = make_cache(redis_server)

    async def job() -> str:
        token = await cache.obtain(key(), fetch, policy=POLICY, stale=None)
        assert open_connections(redis_server) >= 1
        return token.access_token

    first = asyncio.run(job())
    assert settled_connections(redis_server, 0) == 0
    assert asyncio.run(job()) == first  # the next loop opens its own and shares the token
    assert settled_connections(redis_server, 0) == 0
    assert cache.stats.shared_hits == 1


@pytest.mark.anyio
async def test_cancelled_calls_leave_no_connection_behind(redis_server: RedisServer) -> None:
    # Two caches stand for two processes, so calls also wait on another's lease (pub/sub).
    # Every call is cancelled at some point: mid-command, mid-wait, or mid-fetch.
    caches = [make_cache(redis_server, lease_seconds=1.0, poll_interval=0.05) for _ in range(2)]
    admin = admin_client(redis_server)
    rng = random.Random(7)
    cancelled = 0

    async def call(cache: AsyncRedisTokenCache, n: int) -> None:
        nonlocal cancelled
        # Short deadlines end calls mid-connect or mid-command, longer ones mid-fetch or
        # mid-wait (the fetch takes up to 30 ms).
        deadline = rng.uniform(0, 0.003) if rng.random() < 0.5 else rng.uniform(0.005, 0.04)
        with anyio.move_on_after(deadline) as scope:
            await cache.obtain(
                key(n % 3), lambda: fetch(rng.uniform(0, 0.03)), policy=POLICY, stale=None
            )
        cancelled += scope.cancelled_caught

    def exercised() -> bool:
        return (
            cancelled >= 40
            and sum(c.stats.fetches for c in caches) >= 5
            and sum(c.stats.waits_woken + c.stats.waits_polled for c in caches) >= 1
        )

    try:
        # At least 40 rounds; on a loaded machine more calls are cut before they get to wait
        # on the other's lease, so go on (up to 400 rounds) until every kind of cut happened.
        for round_ in range(400):
            if round_ >= 40 and exercised():
                break
            if round_ % 4 == 0:
                admin.flushall()  # misses again: leases, fetches, commits, waits
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(call, caches[i % 2], i)
        # The run did what it is meant to: calls cancelled, fetches, waits on the other's lease.
        assert cancelled >= 40  # of 240 (about 150 on asyncio, 90 under trio here)
        assert sum(c.stats.fetches for c in caches) >= 5
        assert sum(c.stats.waits_woken + c.stats.waits_polled for c in caches) >= 1
        # What is left is the pools' idle connections, not one per cancelled call.
        assert settled_connections(redis_server, 12) <= 12
    finally:
        for cache in caches:
            await cache.aclose()
        admin.close()
    assert settled_connections(redis_server, 0) == 0


def test_aclose_closes_the_connections_of_a_loop_running_in_another_thread(
    redis_server: RedisServer,
) -> None:
    cache = make_cache(redis_server)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(
            cache.obtain(key(), fetch, policy=POLICY, stale=None), loop
        ).result(timeout=10)
        assert settled_connections(redis_server, 1) == 1
        asyncio.run(cache.aclose())  # from another loop: closed on theirs
        assert settled_connections(redis_server, 0) == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
