"""The token clients with ``shared_cache=``: the whole stack, across real processes.

The clients' own single flight sends one caller per process to the shared level; the shared
level makes that one token request for the fleet; a warm in-process token does no Redis I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import pytest
import redis

from m2m_client import AsyncTokenClient, ClientCredentials, ConfigurationError, TokenClient
from m2m_client.cache import AsyncRedisTokenCache, RedisTokenCache
from m2m_client.cache._codec import Codec
from m2m_client.testing import LocalIssuer
from tests.redis._fleet import Fleet, client_worker
from tests.redis.conftest import RedisServer
from tests.redis.test_fleet import FleetRun, make_fleet, merged

KEY = "client-integration-key-" + "z" * 20


@pytest.fixture
def runs() -> Iterator[list[FleetRun]]:
    started: list[FleetRun] = []
    yield started
    for run in started:
        run.close()


def test_client_processes_share_one_token_and_warm_calls_touch_no_redis(
    redis_server: RedisServer, issuer: LocalIssuer, runs: list[FleetRun]
) -> None:
    fleet = make_fleet(redis_server, issuer)
    run = FleetRun(fleet, ["asyncio", "trio", "threads", "threads"], target=client_worker)
    runs.append(run)
    issuer.reset_counters()

    cold = run.phase(100)
    tokens, failures = merged(cold)
    assert failures == []
    assert issuer.token_requests == 1
    assert len(tokens) == 1
    assert sum(tokens.values()) == 400
    # Each process sent one caller (its flight owner) to Redis, not a hundred.
    assert sum(r.stats["coalesced"] for r in cold) == 0

    warm = run.phase(100)
    tokens, failures = merged(warm)
    assert failures == []
    assert issuer.token_requests == 1
    assert sum(tokens.values()) == 400
    for before, after in zip(cold, warm, strict=True):
        assert after.stats["redis_round_trips"] == before.stats["redis_round_trips"]


def creds_for(fleet: Fleet) -> ClientCredentials:
    return ClientCredentials(
        token_url=fleet.token_url,
        client_id=fleet.client_id,
        client_secret=fleet.client_secret,
        audience=fleet.audience,
        scope="read:data",
    )


@pytest.fixture
def fleet(redis_server: RedisServer, issuer: LocalIssuer) -> Fleet:
    return make_fleet(redis_server, issuer)


def test_a_401_invalidation_deletes_the_shared_entry_holding_that_token(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    def shared() -> RedisTokenCache:
        return RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)

    r = redis.Redis.from_url(fleet.redis_url)
    with TokenClient(creds_for(fleet), shared_cache=shared()) as one:
        token = one.get_token()
        names = [n for n in r.scan_iter("m2m:*:token")]
        assert len(names) == 1
        assert one.invalidate(token)
        assert not r.exists(names[0])
        with TokenClient(creds_for(fleet), shared_cache=shared()) as two:
            assert two.get_token().access_token != token.access_token
    assert issuer.token_requests == 2


@pytest.mark.anyio
async def test_async_clients_refuse_the_token_that_got_a_401_and_share_the_new_one(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    def shared() -> AsyncRedisTokenCache:
        return AsyncRedisTokenCache(
            redis.asyncio.Redis.from_url(fleet.redis_url), encryption_key=KEY
        )

    async with AsyncTokenClient(creds_for(fleet), shared_cache=shared()) as one:
        first = await one.get_token()
        assert one.invalidate(first)
        second = await one.get_token()  # passes `first` as stale: a shared hit would be wrong
        assert second.access_token != first.access_token
        async with AsyncTokenClient(creds_for(fleet), shared_cache=shared()) as two:
            assert (await two.get_token()).access_token == second.access_token
    assert issuer.token_requests == 2


def test_a_client_whose_redis_is_down_still_gets_tokens(
    redis_server: RedisServer, fleet: Fleet, issuer: LocalIssuer
) -> None:
    redis_server.stop()
    shared = RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)
    with TokenClient(creds_for(fleet), shared_cache=shared) as tokens:
        began = time.monotonic()
        assert tokens.get_token().access_token
        assert tokens.get_token(force_refresh=True).access_token
        assert time.monotonic() - began < 3
    assert shared.stats.breaker_opened == 1
    assert issuer.token_requests == 2


def test_the_clients_refuse_a_shared_cache_of_the_other_kind(fleet: Fleet) -> None:
    sync_shared = RedisTokenCache(redis.Redis.from_url(fleet.redis_url))
    async_shared = AsyncRedisTokenCache(redis.asyncio.Redis.from_url(fleet.redis_url))
    with pytest.raises(ConfigurationError):
        AsyncTokenClient(creds_for(fleet), shared_cache=sync_shared)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        TokenClient(creds_for(fleet), shared_cache=async_shared)  # type: ignore[arg-type]


def test_the_shared_entry_is_named_after_the_clients_cache_key(fleet: Fleet) -> None:
    shared = RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)
    with TokenClient(creds_for(fleet), shared_cache=shared) as tokens:
        tokens.get_token()
    r = redis.Redis.from_url(fleet.redis_url)
    names = list(r.scan_iter("m2m:*:token"))
    assert names == [Codec("m2m", KEY).names(fleet.key).token.encode()]


@pytest.mark.anyio
async def test_in_the_refresh_window_one_client_refreshes_for_the_fleet(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    now = [time.time()]

    def clock() -> float:
        return now[0]

    def client() -> AsyncTokenClient:
        shared = AsyncRedisTokenCache(
            redis.asyncio.Redis.from_url(fleet.redis_url), encryption_key=KEY, clock=clock
        )
        return AsyncTokenClient(creds_for(fleet), shared_cache=shared, clock=clock)

    async with client() as one, client() as two:
        old = await one.get_token()
        assert (await two.get_token()).access_token == old.access_token
        assert issuer.token_requests == 1
        now[0] += 50  # 60 s tokens: refresh points are drawn in [42, 48], usable until 54
        # Both keep serving the valid token at once, and each starts a background refresh.
        assert (await one.get_token()).access_token == old.access_token
        assert (await two.get_token()).access_token == old.access_token
        for _ in range(500):  # the background refreshes land within a few round trips
            seen = {(await one.get_token()).access_token, (await two.get_token()).access_token}
            if old.access_token not in seen:
                break
            await anyio.sleep(0.02)
        assert (await one.get_token()).access_token == (await two.get_token()).access_token
    assert issuer.token_requests == 2


def test_shared_cache_metrics_reach_the_clients_on_event_and_stats(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    from m2m_client import TokenEvent

    events: list[TokenEvent] = []
    shared = RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)
    with TokenClient(creds_for(fleet), shared_cache=shared, on_event=events.append) as one:
        one.get_token()
        with TokenClient(creds_for(fleet), shared_cache=shared) as two:  # no on_event: silent
            two.get_token()
        assert one.stats.shared is shared.stats
    details = [e.detail for e in events if e.kind == "shared_cache"]
    assert "leases_won" in details  # the first client fetched for the fleet
    assert "shared_hits" in details  # the second found it (reported to the listener too)
    assert all(e.token is None and e.error is None for e in events if e.kind == "shared_cache")
    assert issuer.token_requests == 1


def test_a_cache_does_not_keep_a_closed_client_alive(fleet: Fleet) -> None:
    import gc
    import weakref

    shared = RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)
    client = TokenClient(creds_for(fleet), shared_cache=shared, on_event=lambda e: None)
    ref = weakref.ref(client)
    client.close()
    del client
    gc.collect()
    assert ref() is None


# --- invalidate(): the fleet forgets the refused token, never a newer one ---------------


def shared_entry(fleet: Fleet) -> str | None:
    """The access token the fleet's shared entry holds now (None: no entry)."""
    names = Codec("m2m", KEY).names(fleet.key)
    value = redis.Redis.from_url(fleet.redis_url).get(names.token)
    return None if value is None else Codec("m2m", KEY).decode_token(names, value).access_token


def sync_shared(fleet: Fleet) -> RedisTokenCache:
    return RedisTokenCache(redis.Redis.from_url(fleet.redis_url), encryption_key=KEY)


def async_shared(fleet: Fleet) -> AsyncRedisTokenCache:
    return AsyncRedisTokenCache(redis.asyncio.Redis.from_url(fleet.redis_url), encryption_key=KEY)


def test_invalidate_never_deletes_a_newer_token_another_process_stored(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    with (
        TokenClient(creds_for(fleet), shared_cache=sync_shared(fleet)) as one,
        TokenClient(creds_for(fleet), shared_cache=sync_shared(fleet)) as two,
    ):
        old = one.get_token()
        assert two.get_token().access_token == old.access_token  # a shared hit
        new = two.get_token(force_refresh=True)  # the other process renews first
        assert shared_entry(fleet) == new.access_token
        assert one.invalidate(old)  # this process's 401 with the old token comes late
        assert shared_entry(fleet) == new.access_token
        assert one.get_token().access_token == new.access_token  # from Redis, no request
    assert issuer.token_requests == 2


def test_invalidate_with_redis_down_drops_the_token_and_raises_nothing(
    redis_server: RedisServer, fleet: Fleet, issuer: LocalIssuer
) -> None:
    with TokenClient(creds_for(fleet), shared_cache=sync_shared(fleet)) as tokens:
        old = tokens.get_token()
        redis_server.stop()
        began = time.monotonic()
        assert tokens.invalidate(old)
        assert time.monotonic() - began < 1.5
        assert tokens.get_token().access_token != old.access_token
    assert issuer.token_requests == 2


async def wait_for_entry(fleet: Fleet, value: str | None) -> None:
    for _ in range(500):  # up to ~5 s
        if shared_entry(fleet) == value:
            return
        await anyio.sleep(0.01)
    assert shared_entry(fleet) == value


@pytest.mark.anyio
async def test_async_invalidate_inside_async_with_deletes_the_shared_entry(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    cache = async_shared(fleet)
    async with AsyncTokenClient(creds_for(fleet), shared_cache=cache) as one:
        old = await one.get_token()
        assert shared_entry(fleet) == old.access_token
        assert one.invalidate(old)  # not awaited: a background task of the client
        await wait_for_entry(fleet, None)
        async with AsyncTokenClient(creds_for(fleet), shared_cache=async_shared(fleet)) as two:
            new = await two.get_token()  # another process: not handed the refused token
        assert new.access_token != old.access_token
        assert (await one.get_token()).access_token == new.access_token  # shared hit
    await cache.aclose()
    assert issuer.token_requests == 2


@pytest.mark.anyio
async def test_ainvalidate_deletes_only_the_refused_token(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    one = AsyncTokenClient(creds_for(fleet), shared_cache=async_shared(fleet))
    two = AsyncTokenClient(creds_for(fleet), shared_cache=async_shared(fleet))
    old = await one.get_token()  # outside `async with`: the caller runs the fetch
    assert await one.ainvalidate(old)
    assert shared_entry(fleet) is None  # done when ainvalidate returns
    new = await two.get_token()
    assert new.access_token != old.access_token
    assert await one.ainvalidate(old) is False  # not cached any more: nothing to drop
    assert await two.ainvalidate(old) is False
    assert shared_entry(fleet) == new.access_token  # a stale invalidate leaves the new one
    await one.aclose()
    await two.aclose()
    assert issuer.token_requests == 2


@pytest.mark.anyio
async def test_async_invalidate_outside_async_with_reaches_redis_at_the_next_fetch(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    cache = async_shared(fleet)
    one = AsyncTokenClient(creds_for(fleet), shared_cache=cache)
    old = await one.get_token()
    assert one.invalidate(old)  # no task group to run the delete in: it waits for the fetch
    assert shared_entry(fleet) == old.access_token
    before = cache.stats.redis_round_trips
    new = await one.get_token()
    assert new.access_token != old.access_token
    assert shared_entry(fleet) == new.access_token
    # The pending delete (a GET, then a compare-and-delete) ran before the shared lookup.
    assert cache.stats.redis_round_trips - before >= 5
    await one.aclose()
    await cache.aclose()
    assert issuer.token_requests == 2


@pytest.mark.anyio
async def test_async_invalidate_with_redis_down_raises_nothing(
    redis_server: RedisServer, fleet: Fleet, issuer: LocalIssuer
) -> None:
    cache = async_shared(fleet)
    async with AsyncTokenClient(creds_for(fleet), shared_cache=cache) as one:
        first = await one.get_token()
        redis_server.stop()
        assert one.invalidate(first)  # its background delete fails quietly
        second = await one.get_token()
        with anyio.fail_after(1.5):
            assert await one.ainvalidate(second) is False  # rate limit: one drop per 5 s
    other = AsyncTokenClient(creds_for(fleet), shared_cache=async_shared(fleet))
    token = await other.get_token()
    with anyio.fail_after(1.5):
        assert await other.ainvalidate(token)
    await other.aclose()
    await cache.aclose()
    assert issuer.token_requests == 3
