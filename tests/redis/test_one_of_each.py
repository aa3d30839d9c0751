"""Issue 20 for the Redis caches: one single flight, one owner of connections, one validator.

- Calls of one cache joining a call already in flight wait through the package's single
  flight (``m2m_client._singleflight``): each raises its own copy of the owner's error, never
  one shared exception object (whose traceback every raiser would grow).
- The token cache and the replay cache validate their options by one rule (``_options``):
  every number of seconds finite and > 0, the breaker threshold an int >= 1.
- Both refuse a client they must use as it is when it decodes responses (they compare bytes).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest
import redis

from m2m_client import AccessToken, ConfigurationError, RefreshPolicy, TokenEndpointUnavailable
from m2m_client.cache import AsyncRedisTokenCache, RedisReplayCache, RedisTokenCache
from m2m_client.testing import LocalIssuer
from tests.redis._fleet import Fleet
from tests.redis.conftest import AUDIENCE, CLIENT_ID, RedisServer

KEY = "one-of-each-test-key-" + "c" * 20
POLICY = RefreshPolicy()
CALLERS = 5


@pytest.fixture
def fleet(redis_server: RedisServer, issuer: LocalIssuer) -> Fleet:
    return Fleet(
        redis_url=redis_server.url,
        token_url=issuer.token_url,
        client_id=CLIENT_ID,
        client_secret=issuer.client_secret(CLIENT_ID),
        audience=AUDIENCE,
    )


def _assert_own_copies(errors: list[BaseException], calls: int) -> None:
    assert calls == 1  # one call in flight: the others joined it
    assert len(errors) == CALLERS
    assert all(isinstance(e, TokenEndpointUnavailable) for e in errors)
    assert len({id(e) for e in errors}) == CALLERS  # each its own instance


def test_sync_callers_joining_a_call_in_flight_each_raise_their_own_copy_of_its_error(
    fleet: Fleet,
) -> None:
    cache = RedisTokenCache(
        redis.Redis.from_url(fleet.redis_url), encryption_key=KEY, operation_timeout=2.0
    )
    started, release = threading.Event(), threading.Event()
    calls = 0
    errors: list[BaseException] = []

    def fetch() -> AccessToken:
        nonlocal calls
        calls += 1
        started.set()
        release.wait(30)
        raise TokenEndpointUnavailable("the issuer is down", attempts=3)

    def call() -> None:
        try:
            cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
        except TokenEndpointUnavailable as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(CALLERS)]
    threads[0].start()
    assert started.wait(30)
    for thread in threads[1:]:
        thread.start()
    time.sleep(1.0)  # the others join the call in flight (generous under load)
    release.set()
    for thread in threads:
        thread.join(30)
    _assert_own_copies(errors, calls)
    assert cache.stats.coalesced == 0  # counted for tokens served, not for errors
    cache.close()


@pytest.mark.anyio
async def test_async_callers_joining_a_call_in_flight_each_raise_their_own_copy_of_its_error(
    fleet: Fleet,
) -> None:
    cache = AsyncRedisTokenCache(
        redis.Redis.from_url(fleet.redis_url), encryption_key=KEY, operation_timeout=2.0
    )
    started, release = anyio.Event(), anyio.Event()
    calls = 0
    errors: list[BaseException] = []

    async def fetch() -> AccessToken:
        nonlocal calls
        calls += 1
        started.set()
        with anyio.fail_after(30):
            await release.wait()
        raise TokenEndpointUnavailable("the issuer is down", attempts=3)

    async def call() -> None:
        try:
            await cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
        except TokenEndpointUnavailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(30):
            await started.wait()
        for _ in range(CALLERS - 1):
            tg.start_soon(call)
        await anyio.sleep(0.5)  # no await between joining and waiting: they have joined
        release.set()
    _assert_own_copies(errors, calls)
    await cache.aclose()


def _make(kind: str, url: str, **options: Any) -> Any:
    if kind == "replay":
        return RedisReplayCache(redis.Redis.from_url(url), **options)
    if kind == "async token":
        return AsyncRedisTokenCache(redis.asyncio.Redis.from_url(url), **options)
    return RedisTokenCache(redis.Redis.from_url(url), **options)


BAD_SECONDS = [0, -1.0, float("inf"), float("nan"), "1", True]
KINDS = ["token", "async token", "replay"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "option", ["operation_timeout", "connect_timeout", "breaker_reset_seconds"]
)
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_every_cache_refuses_the_same_bad_seconds(
    redis_server: RedisServer, kind: str, option: str, value: object
) -> None:
    with pytest.raises(ConfigurationError, match=option):
        _make(kind, redis_server.url, **{option: value})


@pytest.mark.parametrize("kind", KINDS[:2])
@pytest.mark.parametrize("option", ["lease_seconds", "poll_interval", "wait_timeout"])
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_the_token_caches_refuse_waits_without_a_bound(
    redis_server: RedisServer, kind: str, option: str, value: object
) -> None:
    with pytest.raises(ConfigurationError, match=option):
        _make(kind, redis_server.url, **{option: value})


@pytest.mark.parametrize("value", [-1, float("inf"), float("nan"), "10"])
def test_negative_seconds_is_finite_and_not_below_zero(
    redis_server: RedisServer, value: object
) -> None:
    with pytest.raises(ConfigurationError, match="negative_seconds"):
        _make("token", redis_server.url, negative_seconds=value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [0, -1, 1.5, "2", None])
def test_every_cache_refuses_a_breaker_threshold_that_is_no_count(
    redis_server: RedisServer, kind: str, value: object
) -> None:
    with pytest.raises(ConfigurationError, match="breaker_threshold"):
        _make(kind, redis_server.url, breaker_threshold=value)


@pytest.mark.parametrize("kind", KINDS)
def test_every_cache_refuses_a_client_used_as_it_is_that_decodes_responses(
    redis_server: RedisServer, kind: str
) -> None:
    class CustomPool(redis.ConnectionPool):
        """A pool no cache can copy: used as it is, so it must return bytes."""

    client = redis.Redis(connection_pool=CustomPool(port=redis_server.port, decode_responses=True))
    make = {"token": RedisTokenCache, "async token": AsyncRedisTokenCache}
    with pytest.raises(ConfigurationError, match="decode_responses"):
        make.get(kind, RedisReplayCache)(client)
