"""The shared cache against a real redis-server, in one process (issue 10, tests 2, 4, 5).

Several cache instances stand for several processes: each has its own connections, breaker
and counters, and Redis is all they share.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis

from m2m_client import AccessToken, ConfigurationError, RefreshPolicy, TokenEndpointError
from m2m_client._token import CacheKey, CredentialId
from m2m_client.cache import AsyncRedisTokenCache, RedisTokenCache
from m2m_client.cache._codec import Codec
from m2m_client.testing import LocalIssuer
from tests.redis._fleet import Fleet, fetch_async, fetch_sync
from tests.redis.conftest import AUDIENCE, CLIENT_ID, RedisServer

KEY_A = "shared-cache-test-key-" + "a" * 20
KEY_B = "shared-cache-test-key-" + "b" * 20
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


def sync_cache(url: str, **options: Any) -> RedisTokenCache:
    options.setdefault("encryption_key", KEY_A)
    options.setdefault("operation_timeout", 2.0)  # a busy CI machine is not a Redis outage
    return RedisTokenCache(redis.Redis.from_url(url), **options)


class Counting:
    """A fetch that counts its calls (and can fail)."""

    def __init__(self, fleet: Fleet, error: Exception | None = None) -> None:
        self.fleet = fleet
        self.calls = 0
        self.error = error

    def __call__(self) -> AccessToken:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return fetch_sync(self.fleet)


def everything_in(r: redis.Redis) -> bytes:
    """Every key name and value in Redis, concatenated (for 'nothing in clear' checks)."""
    out = []
    for name in r.scan_iter(count=1000):
        out.append(name)
        if r.type(name) == b"string":
            out.append(r.get(name) or b"")
    return b"\n".join(out)


# --- sharing --------------------------------------------------------------------------


def test_a_second_process_gets_the_shared_token_without_a_request(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    one, two = sync_cache(fleet.redis_url), sync_cache(fleet.redis_url)
    fetch_one, fetch_two = Counting(fleet), Counting(fleet)
    token = one.obtain(fleet.key, fetch_one, policy=POLICY, stale=None)
    shared = two.obtain(fleet.key, fetch_two, policy=POLICY, stale=None)
    assert (fetch_one.calls, fetch_two.calls) == (1, 0)
    assert shared.access_token == token.access_token
    assert shared.scope == token.scope
    assert abs(shared.expires_at - token.expires_at) < 1.0
    assert two.stats.shared_hits == 1
    assert one.stats.leases_won == 1


def test_expiry_is_the_sooner_of_the_sealed_expiry_and_the_remaining_ttl(fleet: Fleet) -> None:
    # Issue 18: the sealed expiry bounds an entry, the TTL (Redis's clock) only shortens it.
    writer = sync_cache(fleet.redis_url)
    token = writer.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    # A host whose clock is an hour behind: the TTL is the sooner end, in its own clock.
    behind = sync_cache(fleet.redis_url, clock=lambda: time.time() - 3600)
    fetch = Counting(fleet)
    seen = behind.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert fetch.calls == 0
    assert seen.access_token == token.access_token
    assert abs(seen.expires_at - (token.expires_at - 3600)) < 1.0
    assert token.issued_at - 3600 - 1 < seen.refresh_at < seen.usable_until
    # A host 10 s ahead shares it, with the sealed end (its clock says 10 s less remain).
    ahead = sync_cache(fleet.redis_url, clock=lambda: time.time() + 10)
    seen = ahead.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert fetch.calls == 0
    assert abs(seen.expires_at - token.expires_at) < 1.0
    # A host an hour ahead sees the sealed expiry passed: a miss, it fetches its own.
    far_ahead = sync_cache(fleet.redis_url, clock=lambda: time.time() + 3600)
    seen = far_ahead.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert fetch.calls == 1
    assert seen.access_token != token.access_token


def test_the_token_a_caller_refuses_as_stale_is_a_miss(fleet: Fleet) -> None:
    one, two = sync_cache(fleet.redis_url), sync_cache(fleet.redis_url)
    first = one.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    fetch = Counting(fleet)
    second = two.obtain(fleet.key, fetch, policy=POLICY, stale=first)
    assert fetch.calls == 1
    assert second.access_token != first.access_token
    # ... and the fleet now shares the new one.
    third = one.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=first)
    assert third.access_token == second.access_token


def test_an_oauth_error_is_shared_for_negative_seconds(fleet: Fleet) -> None:
    one = sync_cache(fleet.redis_url, negative_seconds=0.5)
    two = sync_cache(fleet.redis_url, negative_seconds=0.5)
    refused = Counting(fleet, TokenEndpointError("invalid_client", "unknown", status_code=401))
    with pytest.raises(TokenEndpointError) as first:
        one.obtain(fleet.key, refused, policy=POLICY, stale=None)
    fetch = Counting(fleet)
    with pytest.raises(TokenEndpointError) as second:
        two.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert first.value.error == second.value.error == "invalid_client"
    assert second.value.status_code == 401
    assert fetch.calls == 0
    assert two.stats.negative_hits == 1
    time.sleep(0.6)
    assert two.obtain(fleet.key, fetch, policy=POLICY, stale=None).access_token
    assert fetch.calls == 1


def test_a_failed_fetch_releases_the_lease_at_once(fleet: Fleet) -> None:
    cache = sync_cache(fleet.redis_url, lease_seconds=30)
    r = redis.Redis.from_url(fleet.redis_url)
    with pytest.raises(RuntimeError):
        cache.obtain(fleet.key, Counting(fleet, RuntimeError("down")), policy=POLICY, stale=None)
    lease = Codec("m2m", KEY_A).names(fleet.key).lease
    assert not r.exists(lease)
    fetch = Counting(fleet)
    cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)  # no 30 s wait
    assert fetch.calls == 1


def test_invalidate_deletes_only_the_token_that_got_the_401(fleet: Fleet) -> None:
    cache = sync_cache(fleet.redis_url)
    token = cache.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    name = Codec("m2m", KEY_A).names(fleet.key).token
    r = redis.Redis.from_url(fleet.redis_url)
    cache.invalidate(fleet.key, AccessToken("some-other-token"))
    assert r.exists(name)
    cache.invalidate(fleet.key, token)
    assert not r.exists(name)


def test_concurrent_callers_in_one_process_share_one_call(fleet: Fleet) -> None:
    cache = sync_cache(fleet.redis_url)
    fetch = Counting(fleet)
    barrier = threading.Barrier(32)
    tokens: list[str] = []

    def call() -> None:
        barrier.wait()
        tokens.append(cache.obtain(fleet.key, fetch, policy=POLICY, stale=None).access_token)

    threads = [threading.Thread(target=call) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert fetch.calls == 1
    assert len(tokens) == 32
    assert len(set(tokens)) == 1


@pytest.mark.anyio
async def test_async_caches_share_one_token_on_asyncio_and_trio(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    caches = [
        AsyncRedisTokenCache(client, encryption_key=KEY_A, operation_timeout=2.0)
        for client in [redis.asyncio.Redis.from_url(fleet.redis_url)] * 3
        + [redis.Redis.from_url(fleet.redis_url)]  # a sync client works too (worker threads)
    ]
    issuer.reset_counters()
    tokens: list[str] = []

    async def call(cache: AsyncRedisTokenCache) -> None:
        token = await cache.obtain(
            fleet.key, lambda: fetch_async(fleet, 0.2), policy=POLICY, stale=None
        )
        tokens.append(token.access_token)

    async with anyio.create_task_group() as tg:
        for cache in caches:
            for _ in range(25):
                tg.start_soon(call, cache)
    assert issuer.token_requests == 1
    assert len(tokens) == 100
    assert len(set(tokens)) == 1
    assert sum(c.stats.leases_lost for c in caches) == 3
    assert sum(c.stats.waits_woken for c in caches) >= 1
    for cache in caches:
        await cache.aclose()


# --- bad values: a miss, never an exception (test 4) ---------------------------------


def _sealed_with(
    key: str | None, name: str, cache_key: CacheKey, payload: dict[str, Any] | None = None
) -> bytes:
    codec = Codec("m2m", key)
    return codec.seal(codec.names(cache_key), name, payload or good_payload())


def good_payload() -> dict[str, Any]:
    return {"k": "token", "x": time.time() + 60, "t": "planted-token", "y": "Bearer", "l": 60}


def _other_credential(key: CacheKey) -> CacheKey:
    return key._replace(credential=CredentialId.of("client_secret", "another secret"))


@pytest.mark.parametrize(
    "make_value",
    [
        pytest.param(lambda name, key: b"garbage \xff\x00", id="garbage"),
        pytest.param(lambda name, key: b"", id="empty"),
        pytest.param(
            lambda name, key: b'{"access_token": "x", "expires_in": 60}', id="foreign-json"
        ),
        pytest.param(lambda name, key: b"\x03[1, 2]" + b"\x00" * 32, id="plain-not-an-object"),
        pytest.param(lambda name, key: b'\x01{"t": 5, "l": 60}', id="plain-bad-fields"),
        pytest.param(lambda name, key: b"\x04" + b"\x00" * 40, id="sealed-garbage"),
        # What m2m-client wrote before issue 18 (a rolling upgrade): a miss, never an error.
        pytest.param(
            lambda name, key: b'\x01{"t":"planted-token","y":"Bearer","s":null,"l":60}',
            id="older-plain-token",
        ),
        pytest.param(
            lambda name, key: b'\x01{"e":"invalid_client","d":null,"c":401,"u":null}',
            id="older-plain-error",
        ),
        pytest.param(lambda name, key: b"\x02" + bytes(range(60)), id="older-sealed"),
        pytest.param(lambda name, key: _sealed_with(KEY_B, name, key), id="another-key"),
        pytest.param(lambda name, key: _sealed_with(None, name, key), id="plain-when-keyed"),
        pytest.param(
            lambda name, key: _sealed_with(KEY_A, name + "x", key), id="sealed-for-other-name"
        ),
        pytest.param(
            lambda name, key: _sealed_with(KEY_A, name, _other_credential(key)),
            id="sealed-for-another-credential",
        ),
    ],
)
def test_an_unreadable_token_entry_is_a_miss(
    fleet: Fleet, make_value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = sync_cache(fleet.redis_url)
    names = Codec("m2m", KEY_A).names(fleet.key)
    r = redis.Redis.from_url(fleet.redis_url)
    r.set(names.token, make_value(names.token, fleet.key), px=60_000)
    r.set(names.negative, make_value(names.negative, fleet.key), px=60_000)
    fetch = Counting(fleet)
    with caplog.at_level(logging.DEBUG, logger="m2m_client.cache"):
        token = cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
        assert fetch.calls == 1
        assert token.access_token != "planted-token"
        r.set(names.token, make_value(names.token, fleet.key), px=60_000)
        assert cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    if make_value(names.token, fleet.key) == b"":
        # Reads are bounded GETRANGEs, which answer b"" for a missing key too: an empty
        # value is no entry (a miss all the same), not an unreadable one.
        assert (cache.stats.undecodable_entries, len(warnings)) == (0, 0)
        return
    assert cache.stats.undecodable_entries >= 3
    assert len(warnings) == 1  # logged once, however often it is seen


def test_an_encrypted_entry_is_unreadable_without_the_key_and_plain_ones_without_are_read(
    fleet: Fleet,
) -> None:
    keyed = sync_cache(fleet.redis_url, namespace="ns1")
    unkeyed = sync_cache(fleet.redis_url, namespace="ns1", encryption_key=None)
    one = keyed.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    fetch = Counting(fleet)
    two = unkeyed.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert fetch.calls == 1  # different key names: the unkeyed cache never sees keyed entries
    assert two.access_token != one.access_token
    again = sync_cache(fleet.redis_url, namespace="ns1", encryption_key=None)
    assert again.obtain(fleet.key, fetch, policy=POLICY, stale=None).access_token == (
        two.access_token
    )


# --- secrets (test 5) ----------------------------------------------------------------


def test_nothing_in_redis_shows_the_token_the_secret_or_the_client_in_clear(
    fleet: Fleet,
) -> None:
    cache = sync_cache(fleet.redis_url)
    r = redis.Redis.from_url(fleet.redis_url)
    snapshots: list[bytes] = []

    def fetch_and_look() -> AccessToken:
        token = fetch_sync(fleet)
        snapshots.append(everything_in(r))  # while the lease is held
        return token

    token = cache.obtain(fleet.key, fetch_and_look, policy=POLICY, stale=None)
    other_key = CacheKey(fleet.token_url, "refused-client", AUDIENCE, None, ("admin",))
    with pytest.raises(TokenEndpointError):
        cache.obtain(
            other_key,
            Counting(fleet, TokenEndpointError("invalid_client", "client refused-client")),
            policy=POLICY,
            stale=None,
        )
    snapshots.append(everything_in(r))
    dump = b"\n".join(snapshots)
    for kind in (b"}:lease", b"}:token", b"}:error"):  # every kind of entry was looked at
        assert kind in dump
    payload = token.access_token.split(".")[1].encode()
    for secret in (
        token.access_token.encode(),
        payload,
        fleet.client_secret.encode(),
        CLIENT_ID.encode(),
        b"refused-client",
        AUDIENCE.encode(),
        b"127.0.0.1",
        b"read:data",
    ):
        assert secret not in dump


def test_without_a_key_names_hide_the_client_but_values_hold_the_bearer_token(
    fleet: Fleet,
) -> None:
    cache = sync_cache(fleet.redis_url, encryption_key=None)
    token = cache.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    r = redis.Redis.from_url(fleet.redis_url)
    names = b"\n".join(r.scan_iter())
    assert CLIENT_ID.encode() not in names
    assert AUDIENCE.encode() not in names
    # The documented trade-off: a Redis dump hands out bearer tokens.
    assert token.access_token.encode() in everything_in(r)


# --- Redis failing (test 2) ----------------------------------------------------------


def test_a_dead_redis_costs_no_call_and_logs_once_per_transition(
    redis_server: RedisServer, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    cache = sync_cache(fleet.redis_url, breaker_reset_seconds=0.3)
    fetch = Counting(fleet)
    cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="m2m_client.cache"):
        began = time.monotonic()
        for _ in range(10):
            assert cache.obtain(fleet.key, fetch, policy=POLICY, stale=None).access_token
        took = time.monotonic() - began
        # Connection refused: fast, one quick retry at most. The bound also covers the 11 token
        # requests over HTTP (2.1 s in all once on a loaded 2-core CI machine).
        assert took < 4.0
        assert fetch.calls == 11
        assert cache.stats.breaker_opened == 1
        redis_server.start()
        time.sleep(0.35)
        cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)  # probe: cold Redis, fetch
        other = sync_cache(fleet.redis_url)
        shared = other.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    assert cache.stats.breaker_closed == 1
    assert other.stats.shared_hits == 1
    assert shared.access_token
    messages = [r.getMessage() for r in caplog.records if r.name == "m2m_client.cache"]
    assert len(messages) == 2, messages  # opened once, closed once


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a hung or partitioned Redis)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(2)
    for s in accepted:
        s.close()
    server.close()


def test_a_redis_that_never_answers_does_not_hang_a_call(black_hole: int, fleet: Fleet) -> None:
    cache = RedisTokenCache(redis.Redis(host="127.0.0.1", port=black_hole), encryption_key=KEY_A)
    fetch = Counting(fleet)
    began = time.monotonic()
    for _ in range(3):
        assert cache.obtain(fleet.key, fetch, policy=POLICY, stale=None).access_token
    # 0.25 s per operation, one retry, then the breaker (~0.5 s); the rest is the token
    # requests over HTTP, 2.9 s in all once on a loaded 2-core CI machine.
    assert time.monotonic() - began < 4.0
    assert fetch.calls == 3
    assert cache.stats.breaker_opened == 1


@pytest.mark.anyio
async def test_an_async_cache_on_a_silent_redis_does_not_hang_either(
    black_hole: int, fleet: Fleet
) -> None:
    cache = AsyncRedisTokenCache(
        redis.asyncio.Redis(host="127.0.0.1", port=black_hole), encryption_key=KEY_A
    )
    began = time.monotonic()
    for _ in range(3):
        token = await cache.obtain(fleet.key, lambda: fetch_async(fleet), policy=POLICY, stale=None)
        assert token.access_token
    assert time.monotonic() - began < 4.0  # as above
    assert cache.stats.fallbacks == 3


# --- fork safety, optional dependency -------------------------------------------------


def test_a_forked_child_opens_its_own_connections(fleet: Fleet) -> None:
    import multiprocessing

    cache = sync_cache(fleet.redis_url)
    cache.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    parent_client = (
        cache._connections.sync_executor.client if cache._connections.sync_executor else None
    )
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()

    def child() -> None:
        fresh = cache._connections.sync_executor is None  # dropped at fork
        token = cache.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
        executor = cache._connections.sync_executor
        results.put(
            (
                fresh,
                executor is not None and executor.client is not parent_client,
                token.access_token,
            )
        )

    process = ctx.Process(target=child)
    process.start()
    for _ in range(50):  # the parent keeps using its connections meanwhile
        cache.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    fresh, other_client, token = results.get(timeout=20)
    process.join(10)
    assert process.exitcode == 0
    assert fresh
    assert other_client
    assert token == cache.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None).access_token


def test_without_redis_py_importing_works_and_constructing_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import m2m_client.cache as c\n"
        "try:\n"
        "    c.RedisTokenCache(object())\n"
        "except c.__dict__.get('ConfigurationError', Exception) as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.startswith("ConfigurationError")
    assert "pip install 'm2m-client[redis]'" in out


def test_bad_options_are_configuration_errors(fleet: Fleet) -> None:
    client = redis.Redis.from_url(fleet.redis_url)
    with pytest.raises(ConfigurationError, match="encryption_key"):
        RedisTokenCache(client, encryption_key="short")
    with pytest.raises(ConfigurationError, match="namespace"):
        RedisTokenCache(client, namespace="a{b}")
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        RedisTokenCache(client, lease_seconds=0)
    with pytest.raises(ConfigurationError, match="poll_interval"):
        RedisTokenCache(client, lease_seconds=1, poll_interval=2)
    # A finite but absurd number of seconds is no deadline either (1e300 crashed the lease
    # keep-alive thread with OverflowError); NaN and bool are not seconds at all.
    for name in (
        "lease_seconds",
        "wait_timeout",
        "operation_timeout",
        "connect_timeout",
        "breaker_reset_seconds",
        "negative_seconds",
    ):
        for value in (1e300, 86_401, float("nan"), True):
            with pytest.raises(ConfigurationError, match=name):
                RedisTokenCache(client, **{name: value})
    RedisTokenCache(client, wait_timeout=86_400, negative_seconds=86_400)
    with pytest.raises(ConfigurationError, match="AsyncRedisTokenCache"):
        RedisTokenCache(redis.asyncio.Redis.from_url(fleet.redis_url))

    class CustomPool(redis.ConnectionPool):
        """A pool the cache cannot copy: used as it is, so it must return bytes."""

    with pytest.raises(ConfigurationError, match="decode_responses"):
        RedisTokenCache(redis.Redis(connection_pool=CustomPool(decode_responses=True)))


def test_repr_shows_no_key(fleet: Fleet) -> None:
    cache = sync_cache(fleet.redis_url)
    assert KEY_A not in repr(cache)
    assert "encrypted=True" in repr(cache)


@pytest.mark.anyio
async def test_a_holder_cancelled_mid_fetch_hands_the_lease_back_at_once(fleet: Fleet) -> None:
    cache = AsyncRedisTokenCache(
        redis.asyncio.Redis.from_url(fleet.redis_url), encryption_key=KEY_A, lease_seconds=30
    )
    lease = Codec("m2m", KEY_A).names(fleet.key).lease
    r = redis.Redis.from_url(fleet.redis_url)
    with anyio.move_on_after(0.5):
        await cache.obtain(fleet.key, lambda: fetch_async(fleet, 30), policy=POLICY, stale=None)
    assert not r.exists(lease)  # not 30 s of a lease nobody holds
    fetch_calls = 0

    async def fetch() -> AccessToken:
        nonlocal fetch_calls
        fetch_calls += 1
        return await fetch_async(fleet)

    with anyio.fail_after(5):
        assert await cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert fetch_calls == 1
