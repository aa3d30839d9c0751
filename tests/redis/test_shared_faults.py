"""Issue 18, items 5, 6, 8, 9, 10, 11: how the fleet's Redis level behaves when a part of it
misbehaves (a client the cache cannot copy, a late reply, the issuer down, scripts refused, an
invalidation, a replay around an outage). Each test runs against a real redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection

from m2m_client import (
    AccessToken,
    AsyncTokenClient,
    ClientCredentials,
    RefreshPolicy,
    RetryPolicy,
    TokenClient,
    TokenError,
)
from m2m_client.cache import AsyncRedisTokenCache, RedisReplayCache, RedisTokenCache
from m2m_client.cache._executors import scripting_refused
from m2m_client.testing import LocalIssuer
from tests.redis._fleet import Fleet, fetch_sync
from tests.redis.conftest import AUDIENCE, CLIENT_ID, RedisServer, _free_port

KEY = "shared-faults-test-key-" + "f" * 20
POLICY = RefreshPolicy()


@pytest.fixture
def fleet(redis_server: RedisServer, issuer: LocalIssuer) -> Fleet:
    return Fleet(
        redis_url=redis_server.url,
        token_url=issuer.token_url,
        client_id=CLIENT_ID,
        client_secret=issuer.client_secret(CLIENT_ID),
        audience=AUDIENCE,
    )


def creds_for(fleet: Fleet, token_url: str | None = None) -> ClientCredentials:
    return ClientCredentials(
        token_url=token_url or fleet.token_url,
        client_id=fleet.client_id,
        client_secret=fleet.client_secret,
        audience=fleet.audience,
        scope="read:data",
    )


# --- 5: a client the cache cannot copy, across event loops ------------------------------


class CustomAsyncPool(redis.asyncio.connection.ConnectionPool):
    """A pool class of the application's own: the cache cannot rebuild it, uses it as is."""


class CustomSyncPool(redis.connection.ConnectionPool):
    pass


@pytest.mark.parametrize("kind", ["redis.asyncio custom pool", "redis custom pool"])
def test_a_client_the_cache_cannot_copy_works_across_asyncio_runs_and_trio(
    kind: str, fleet: Fleet, redis_server: RedisServer, issuer: LocalIssuer
) -> None:
    client: Any
    if kind.startswith("redis.asyncio"):
        pool = CustomAsyncPool(host="127.0.0.1", port=redis_server.port, socket_timeout=2)
        client = redis.asyncio.Redis(connection_pool=pool)
    else:
        client = redis.Redis(
            connection_pool=CustomSyncPool(host="127.0.0.1", port=redis_server.port)
        )
    cache = AsyncRedisTokenCache(client, encryption_key=KEY, operation_timeout=2.0)
    assert cache._connections.params is None  # really used as it is

    async def job() -> str:
        async with AsyncTokenClient(creds_for(fleet), shared_cache=cache) as tokens:
            return (await tokens.get_token()).access_token

    # One asyncio.run per job (a CLI, a cron task, Celery with asyncio.run in each task).
    seen = {asyncio.run(job()) for _ in range(4)}
    assert len(seen) == 1  # every job shared the one token
    assert issuer.token_requests == 1
    assert anyio.run(job, backend="trio")  # and trio: a token, whatever the client
    assert cache.stats.redis_errors == 0
    if kind.startswith("redis.asyncio"):
        # redis.asyncio cannot run under trio: that job fetched for itself, and said why.
        assert issuer.token_requests == 2
        asyncio.run(cache.aclose())
        asyncio.run(client.aclose())
    else:
        assert issuer.token_requests == 1
        asyncio.run(cache.aclose())
        client.close()


def test_any_exception_from_the_redis_client_is_a_miss_never_a_failed_call(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    class Broken(redis.Redis):
        def pipeline(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in somebody's Redis wrapper")

    client = Broken(connection_pool=CustomSyncPool(host="127.0.0.1", port=_free_port()))
    cache = RedisTokenCache(client, encryption_key=KEY)
    with TokenClient(creds_for(fleet), shared_cache=cache) as tokens:
        token = tokens.get_token()
        assert tokens.invalidate(token)  # never raises either
        assert tokens.get_token().access_token
    assert cache.stats.redis_errors >= 1
    assert issuer.token_requests == 2
    client.close()


# --- 6: a late reply to the lease SET NX -----------------------------------------------


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 in front of redis-server that delays the reply to the first
    command containing ``trigger`` by ``delay`` seconds (once, over all connections)."""

    def __init__(self, port: int, trigger: bytes, delay: float) -> None:
        self.target = port
        self.trigger = trigger
        self.delay = delay
        self.fired = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                downstream = self._listener.accept()[0]
            except OSError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [downstream, upstream]
            delay_next = threading.Event()
            for args in (
                (downstream, upstream, delay_next, True),
                (upstream, downstream, delay_next, False),
            ):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, delay_next: threading.Event, up: bool
    ) -> None:
        try:
            while data := src.recv(65536):
                if up:
                    with self._lock:
                        if self.trigger in data and not self.fired:
                            self.fired += 1
                            delay_next.set()
                elif delay_next.is_set():
                    delay_next.clear()
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads[:1]:
            thread.join(timeout=5)
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[1:]:
            thread.join(timeout=5)
        for s in self._sockets:
            s.close()
        self._listener.close()


@pytest.fixture
def late_lease_reply(redis_server: RedisServer) -> Iterator[DelayingProxy]:
    # Past operation_timeout (1 s, generous for a loaded CI machine): redis-py retries the SET.
    proxy = DelayingProxy(redis_server.port, trigger=b"NX", delay=1.5)
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_lease_set_retried_after_a_late_reply_is_still_our_lease_sync(
    late_lease_reply: DelayingProxy, fleet: Fleet
) -> None:
    cache = RedisTokenCache(
        redis.Redis(host="127.0.0.1", port=late_lease_reply.port),
        encryption_key=KEY,
        operation_timeout=1.0,
        lease_seconds=8.0,
    )
    calls = 0

    def fetch() -> AccessToken:
        nonlocal calls
        calls += 1
        return fetch_sync(fleet)

    began = time.monotonic()
    token = cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    elapsed = time.monotonic() - began
    cache.close()
    assert late_lease_reply.fired == 1
    assert token.access_token
    # Our own retried SET found our own value: we hold the lease, no wait for it to lapse.
    assert (cache.stats.leases_won, cache.stats.leases_lost, calls) == (1, 0, 1)
    assert elapsed < 5.0  # on main: the lease's 8 s


@pytest.mark.anyio
async def test_a_lease_set_retried_after_a_late_reply_is_still_our_lease_async(
    late_lease_reply: DelayingProxy, fleet: Fleet
) -> None:
    cache = AsyncRedisTokenCache(
        redis.asyncio.Redis(host="127.0.0.1", port=late_lease_reply.port),
        encryption_key=KEY,
        operation_timeout=1.0,
        lease_seconds=8.0,
    )

    async def fetch() -> AccessToken:
        return await anyio.to_thread.run_sync(fetch_sync, fleet)

    began = time.monotonic()
    token = await cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    elapsed = time.monotonic() - began
    await cache.aclose()
    assert late_lease_reply.fired == 1
    assert token.access_token
    assert (cache.stats.leases_won, cache.stats.leases_lost, cache.stats.fetches) == (1, 0, 1)
    assert elapsed < 5.0


# --- 8: the issuer down: waiters get the holder's outcome ------------------------------


def test_with_the_issuer_down_every_process_fails_within_its_own_budget_sync(
    fleet: Fleet,
) -> None:
    budget = 3.0
    down = f"http://127.0.0.1:{_free_port()}/token"  # nothing listens: refused at once
    caches = [
        RedisTokenCache(
            redis.Redis.from_url(fleet.redis_url),
            encryption_key=KEY,
            operation_timeout=2.0,
            poll_interval=0.2,
        )
        for _ in range(6)
    ]
    clients = [
        TokenClient(
            creds_for(fleet, down), shared_cache=c, retry=RetryPolicy(max_total_seconds=budget)
        )
        for c in caches
    ]
    outcomes: list[tuple[float, BaseException | None]] = []
    start = threading.Barrier(len(clients))

    def process(tokens: TokenClient) -> None:
        start.wait()
        began = time.monotonic()
        try:
            tokens.get_token()
        except BaseException as exc:
            outcomes.append((time.monotonic() - began, exc))
        else:
            outcomes.append((time.monotonic() - began, None))

    threads = [threading.Thread(target=process, args=(t,)) for t in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for tokens in clients:
        tokens.close()
    for cache in caches:
        cache.close()
    assert len(outcomes) == 6
    assert all(isinstance(exc, TokenError) for _, exc in outcomes), outcomes
    # The documented bound: max_total_seconds (+ a second); on main the k-th waited k budgets.
    assert max(t for t, _ in outcomes) < budget + 2.0, sorted(t for t, _ in outcomes)
    assert sum(c.stats.holder_failures for c in caches) >= 1


@pytest.mark.anyio
async def test_with_the_issuer_down_every_process_fails_within_its_own_budget_async(
    fleet: Fleet,
) -> None:
    budget = 3.0
    down = f"http://127.0.0.1:{_free_port()}/token"
    caches = [
        AsyncRedisTokenCache(
            redis.asyncio.Redis.from_url(fleet.redis_url),
            encryption_key=KEY,
            operation_timeout=2.0,
            poll_interval=0.2,
        )
        for _ in range(6)
    ]
    times: list[float] = []
    errors: list[BaseException] = []

    async def process(cache: AsyncRedisTokenCache) -> None:
        began = time.monotonic()
        async with AsyncTokenClient(
            creds_for(fleet, down), shared_cache=cache, retry=RetryPolicy(max_total_seconds=budget)
        ) as tokens:
            try:
                await tokens.get_token()
            except TokenError as exc:
                errors.append(exc)
        times.append(time.monotonic() - began)

    async with anyio.create_task_group() as tg:
        for cache in caches:
            tg.start_soon(process, cache)
    for cache in caches:
        await cache.aclose()
    assert len(errors) == 6
    assert max(times) < budget + 2.0, sorted(times)
    assert sum(c.stats.holder_failures for c in caches) >= 1


# --- 9: Lua scripts refused -------------------------------------------------------------


@pytest.fixture
def no_scripting_url(redis_server: RedisServer) -> str:
    admin = redis_server.client()
    admin.acl_setuser(
        "noscript",
        enabled=True,
        passwords=["+noscript-password"],
        keys=["~*"],
        channels=["*"],
        commands=["+@all", "-@scripting"],
    )
    admin.close()
    return f"redis://noscript:noscript-password@127.0.0.1:{redis_server.port}/0"


def test_a_redis_that_refuses_scripts_still_shares_at_once_with_one_warning(
    no_scripting_url: str, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="m2m_client.cache")
    caches = [
        RedisTokenCache(
            redis.Redis.from_url(no_scripting_url),
            encryption_key=KEY,
            operation_timeout=2.0,
            lease_seconds=8.0,
            poll_interval=0.5,
        )
        for _ in range(4)
    ]
    calls = 0
    got: list[str] = []
    start = threading.Barrier(len(caches))

    def fetch() -> AccessToken:
        nonlocal calls
        calls += 1
        return fetch_sync(fleet, delay=0.3)

    def process(cache: RedisTokenCache) -> None:
        start.wait()
        got.append(cache.obtain(fleet.key, fetch, policy=POLICY, stale=None).access_token)

    threads = [threading.Thread(target=process, args=(c,)) for c in caches]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    elapsed = time.monotonic() - began
    assert len(got) == 4
    assert len(set(got)) == 1
    assert calls == 1
    assert elapsed < 5.0  # on main: the holder's lease (8 s) blocked every other process
    assert sum(c.stats.redis_errors for c in caches) == 0

    # Compare-and-delete without Lua too; one WARNING per cache however often it meets it.
    token = caches[0].obtain(fleet.key, fetch, policy=POLICY, stale=None)
    for _ in range(3):
        caches[0].invalidate(fleet.key, token)
    again = caches[1].obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert again.access_token != token.access_token
    assert calls == 2
    warnings = [r for r in caplog.records if "refuses Lua scripts" in r.getMessage()]
    # Each cache that met the refusal said so once (three invalidates by caches[0]: one line).
    assert caches[0]._connections.scripting.refused
    assert len(warnings) == sum(c._connections.scripting.refused for c in caches)
    assert sum(c.stats.redis_errors for c in caches) == 0
    for cache in caches:
        cache.close()


@pytest.mark.anyio
async def test_an_async_cache_on_a_redis_that_refuses_scripts_commits_at_once(
    no_scripting_url: str, fleet: Fleet
) -> None:
    cache = AsyncRedisTokenCache(
        redis.asyncio.Redis.from_url(no_scripting_url), encryption_key=KEY, operation_timeout=2.0
    )
    other = AsyncRedisTokenCache(
        redis.asyncio.Redis.from_url(no_scripting_url), encryption_key=KEY, operation_timeout=2.0
    )

    async def fetch() -> AccessToken:
        return await anyio.to_thread.run_sync(fetch_sync, fleet)

    token = await cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    with anyio.fail_after(2):  # the lease was released by the commit, not left to lapse
        shared = await other.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert shared.access_token == token.access_token
    assert (cache.stats.redis_errors, other.stats.fetches) == (0, 0)
    await cache.aclose()
    await other.aclose()


@pytest.mark.parametrize(
    ("message", "refused"),
    [
        ("NOPERM User noscript has no permissions to run the 'evalsha' command", True),
        ("unknown command 'EVALSHA', with args beginning with: ", True),
        ("ERR unknown command 'SCRIPT'", True),
        ("ERR Error running script (call to f_x): @user_script:1: oops", False),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ],
)
def test_which_replies_mean_scripts_are_refused(message: str, refused: bool) -> None:
    import redis.exceptions

    assert scripting_refused(redis.exceptions.ResponseError(message)) is refused
    assert scripting_refused(redis.exceptions.NoPermissionError("x")) is True
    assert scripting_refused(redis.exceptions.ConnectionError("x")) is False


# --- 10: invalidate() reaches the other processes' memory -------------------------------


def wait_for_listeners(url: str, channel: str, n: int) -> None:
    r = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if dict(r.pubsub_numsub(channel)).get(channel.encode(), 0) >= n:
                return
            time.sleep(0.02)
        raise AssertionError("the invalidation listeners did not subscribe")
    finally:
        r.close()


def test_an_invalidated_token_leaves_the_other_processes_memory_within_a_second(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    def shared() -> RedisTokenCache:
        return RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)

    spy = redis.Redis.from_url(fleet.redis_url).pubsub()
    spy.subscribe("m2m:invalidated")
    with (
        TokenClient(creds_for(fleet), shared_cache=shared()) as one,
        TokenClient(creds_for(fleet), shared_cache=shared()) as two,
    ):
        token = one.get_token()
        assert two.get_token().access_token == token.access_token  # a shared hit, now in memory
        wait_for_listeners(fleet.redis_url, "m2m:invalidated", 3)
        assert one.invalidate(token)
        began = time.monotonic()
        while two.get_token().access_token == token.access_token:
            assert time.monotonic() - began < 1.0, "the other process still serves the token"
            time.sleep(0.01)
        # One new token for both: the second process's own memory was dropped, not Redis's.
        assert one.get_token().access_token == two.get_token().access_token
    assert issuer.token_requests == 2
    # The announcement names the entry and a keyed hash of the token, never the token.
    messages = []
    while (m := spy.get_message(timeout=0.5)) is not None:
        if m["type"] == "message":
            messages.append(m["data"])
    assert len(messages) == 1
    assert token.access_token.encode() not in messages[0]
    for part in token.access_token.split("."):
        assert part.encode() not in messages[0]
    spy.close()


@pytest.mark.anyio
async def test_an_invalidated_token_leaves_other_async_clients_memory_too(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    def shared() -> AsyncRedisTokenCache:
        return AsyncRedisTokenCache(
            redis.asyncio.Redis.from_url(fleet.redis_url), encryption_key=KEY
        )

    caches = [shared(), shared()]
    async with (
        AsyncTokenClient(creds_for(fleet), shared_cache=caches[0]) as one,
        AsyncTokenClient(creds_for(fleet), shared_cache=caches[1]) as two,
    ):
        token = await one.get_token()
        assert (await two.get_token()).access_token == token.access_token
        await anyio.to_thread.run_sync(wait_for_listeners, fleet.redis_url, "m2m:invalidated", 2)
        assert await one.ainvalidate(token)
        began = time.monotonic()
        while (await two.get_token()).access_token == token.access_token:
            assert time.monotonic() - began < 1.0, "the other process still serves the token"
            await anyio.sleep(0.01)
    for cache in caches:
        await cache.aclose()
    assert issuer.token_requests == 2


def test_a_closed_cache_stops_its_listener(fleet: Fleet) -> None:
    cache = RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)
    with TokenClient(creds_for(fleet), shared_cache=cache) as tokens:
        tokens.get_token()
        wait_for_listeners(fleet.redis_url, "m2m:invalidated", 1)
        thread = cache._invalidations.thread
        assert thread is not None
        assert thread.is_alive()
    cache.close()
    assert not thread.is_alive()


# --- 11: on_unavailable="memory" remembers what it saw, either way ----------------------


def test_memory_fallback_refuses_replays_across_the_start_and_end_of_an_outage(
    redis_server: RedisServer,
) -> None:
    cache = RedisReplayCache(
        redis.Redis.from_url(redis_server.url), on_unavailable="memory", breaker_reset_seconds=0.2
    )
    now = time.time()
    assert cache.first_use("jkt:before", expires_at=now + 60, now=now)
    redis_server.stop()
    # Used before the outage, replayed to this instance during it.
    assert not cache.first_use("jkt:before", expires_at=now + 60, now=now)
    assert cache.first_use("jkt:during", expires_at=now + 60, now=now)
    redis_server.start()  # same port, empty
    time.sleep(0.3)  # past breaker_reset_seconds
    # Used during the outage, replayed to this instance after it.
    assert not cache.first_use("jkt:during", expires_at=now + 60, now=now)
    assert cache.stats.breaker_closed == 1
    assert cache.first_use("jkt:after", expires_at=now + 60, now=now)
    assert not cache.first_use("jkt:after", expires_at=now + 60, now=now)
    cache.close()


@pytest.mark.anyio
async def test_async_memory_fallback_refuses_replays_across_an_outage(
    redis_server: RedisServer,
) -> None:
    cache = RedisReplayCache(
        redis.asyncio.Redis.from_url(redis_server.url),
        on_unavailable="memory",
        breaker_reset_seconds=0.2,
    )
    now = time.time()
    assert await cache.first_use_async("jkt:before", expires_at=now + 60, now=now)
    redis_server.stop()
    with anyio.fail_after(3):
        assert not await cache.first_use_async("jkt:before", expires_at=now + 60, now=now)
        assert await cache.first_use_async("jkt:during", expires_at=now + 60, now=now)
    redis_server.start()
    await anyio.sleep(0.3)
    assert not await cache.first_use_async("jkt:during", expires_at=now + 60, now=now)
    assert cache.stats.breaker_closed == 1
    await cache.aclose()


def test_a_forked_child_listens_on_its_own_connection(fleet: Fleet) -> None:
    import os

    cache = RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)
    with TokenClient(creds_for(fleet), shared_cache=cache) as tokens:
        tokens.get_token()
        wait_for_listeners(fleet.redis_url, "m2m:invalidated", 1)
        parents = cache._invalidations.thread
        pid = os.fork()
        if pid == 0:  # the child: its own listener, the parent's left alone
            code = 1
            try:
                tokens.get_token(force_refresh=True)  # through the cache: starts listening
                wait_for_listeners(fleet.redis_url, "m2m:invalidated", 2)
                mine = cache._invalidations.thread
                code = 0 if mine is not None and mine is not parents and mine.is_alive() else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert parents is not None
        assert parents.is_alive()
    cache.close()
