"""What a shared entry belongs to, against a real redis-server (issue 18, items 1-4 and 7).

An entry is found and opened only by a process that holds the same credential and asks for
the same thing; what is sealed carries its own expiry; an error never beats a valid token.
Several cache instances stand for several processes (Redis is all they share); one test runs
real processes. Each test here failed on the main branch before issue 18.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis
import redis.asyncio

from m2m_client import (
    AccessToken,
    AsyncTokenClient,
    ClientCredentials,
    RefreshPolicy,
    TokenClient,
    TokenEndpointError,
)
from m2m_client.cache import AsyncRedisTokenCache, RedisTokenCache
from m2m_client.cache._codec import Codec
from m2m_client.testing import LocalIssuer
from tests.redis._fleet import Fleet, client_worker, fetch_async, fetch_sync
from tests.redis.conftest import RedisServer
from tests.redis.test_fleet import FleetRun, make_fleet, merged

FLEET_KEY = "isolation-fleet-key-" + "k" * 24
POLICY = RefreshPolicy()
WRONG_SECRET = "rotated-out-secret-" + "w" * 20
ENCRYPTION = pytest.mark.parametrize(
    "encryption_key", [FLEET_KEY, None], ids=["encrypted", "unencrypted"]
)


@pytest.fixture
def fleet(redis_server: RedisServer, issuer: LocalIssuer) -> Fleet:
    return make_fleet(redis_server, issuer)


@pytest.fixture
def fleet_run() -> Iterator[list[FleetRun]]:
    runs: list[FleetRun] = []
    yield runs
    for run in runs:
        run.close()


_SYNC_CACHES: list[RedisTokenCache] = []


@pytest.fixture(autouse=True)
def close_sync_caches() -> Iterator[None]:
    yield
    while _SYNC_CACHES:
        _SYNC_CACHES.pop().close()


def sync_cache(url: str, encryption_key: str | None, **options: Any) -> RedisTokenCache:
    options.setdefault("operation_timeout", 2.0)  # a busy CI machine is not a Redis outage
    cache = RedisTokenCache(redis.Redis.from_url(url), encryption_key=encryption_key, **options)
    _SYNC_CACHES.append(cache)
    return cache


def redis_for(fleet: Fleet) -> redis.Redis:
    """A plain client, as someone who can read and write Redis (closed after the test)."""
    r = redis.Redis.from_url(fleet.redis_url)
    _CLIENTS.append(r)
    return r


_CLIENTS: list[redis.Redis] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def async_cache(url: str, encryption_key: str | None, **options: Any) -> AsyncRedisTokenCache:
    options.setdefault("operation_timeout", 2.0)
    return AsyncRedisTokenCache(
        redis.asyncio.Redis.from_url(url), encryption_key=encryption_key, **options
    )


def creds(fleet: Fleet, **changes: Any) -> ClientCredentials:
    base: dict[str, Any] = {
        "token_url": fleet.token_url,
        "client_id": fleet.client_id,
        "client_secret": fleet.client_secret,
        "audience": fleet.audience,
        "scope": "read:data",
    }
    return ClientCredentials(**{**base, **changes})


class Counting:
    """A fetch that counts its calls (and can fail)."""

    def __init__(self, fleet: Fleet, error: Exception | None = None) -> None:
        self.fleet, self.error, self.calls = fleet, error, 0

    def __call__(self) -> AccessToken:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return fetch_sync(self.fleet)


# --- the package's own token clients, sync and async (each a "process") ----------------


class Process:
    """One token client with its own shared-cache instance (Redis is all they share)."""

    def __init__(
        self, mode: str, fleet: Fleet, credentials: ClientCredentials, key: str | None
    ) -> None:
        self.mode = mode
        if mode == "sync":
            self.cache: Any = sync_cache(fleet.redis_url, key)
            self.client: Any = TokenClient(credentials, shared_cache=self.cache)
        else:
            self.cache = async_cache(fleet.redis_url, key)
            self.client = AsyncTokenClient(credentials, shared_cache=self.cache)

    async def get(self) -> AccessToken | TokenEndpointError:
        """A token, or the error ``get_token()`` raised."""
        try:
            if self.mode == "sync":
                token: AccessToken = await anyio.to_thread.run_sync(self.client.get_token)
            else:
                token = await self.client.get_token()
        except TokenEndpointError as exc:
            return exc
        return token

    async def close(self) -> None:
        if self.mode == "sync":
            self.client.close()
            self.cache.close()
        else:
            await self.client.aclose()
            await self.cache.aclose()


MODES = pytest.mark.parametrize(
    ("mode", "backend"),
    [("sync", "asyncio"), ("async", "asyncio"), ("async", "trio")],
    ids=["sync", "asyncio", "trio"],
)


def run_with(
    backend: str, body: Callable[[Callable[..., Process]], Awaitable[None]], mode: str, fleet: Fleet
) -> None:
    """Run ``body(make)`` on ``backend``; ``make(credentials, key)`` makes a process."""

    async def main() -> None:
        made: list[Process] = []

        def make(credentials: ClientCredentials, key: str | None) -> Process:
            made.append(Process(mode, fleet, credentials, key))
            return made[-1]

        try:
            await body(make)
        finally:
            for p in made:
                await p.close()

    anyio.run(main, backend=backend)


@MODES
@ENCRYPTION
def test_a_process_with_a_wrong_secret_gets_no_token_from_redis(
    fleet: Fleet, issuer: LocalIssuer, mode: str, backend: str, encryption_key: str | None
) -> None:
    async def body(make: Callable[..., Process]) -> None:
        right = make(creds(fleet), encryption_key)
        wrong = make(creds(fleet, client_secret=WRONG_SECRET), encryption_key)
        assert isinstance(await right.get(), AccessToken)
        refused = await wrong.get()
        # The issuer refused it: it never saw the right process's token.
        assert isinstance(refused, TokenEndpointError), refused
        assert refused.error == "invalid_client"
        assert issuer.token_requests == 2
        assert wrong.cache.stats.shared_hits == 0

    run_with(backend, body, mode, fleet)


@MODES
@ENCRYPTION
def test_a_wrong_secret_process_does_not_poison_the_right_ones(
    fleet: Fleet, issuer: LocalIssuer, mode: str, backend: str, encryption_key: str | None
) -> None:
    async def body(make: Callable[..., Process]) -> None:
        wrong = make(creds(fleet, client_secret=WRONG_SECRET), encryption_key)
        assert isinstance(await wrong.get(), TokenEndpointError)  # stored as an error entry
        right = [make(creds(fleet), encryption_key) for _ in range(4)]
        got = [await p.get() for p in right]
        assert all(isinstance(t, AccessToken) for t in got), got
        assert len({t.access_token for t in got if isinstance(t, AccessToken)}) == 1
        assert sum(p.cache.stats.negative_hits for p in right) == 0
        assert issuer.token_requests == 2  # the wrong one's, and one for all the right ones

    run_with(backend, body, mode, fleet)


def test_one_wrong_secret_process_next_to_right_processes_fails_none_of_them(
    redis_server: RedisServer, issuer: LocalIssuer, fleet_run: list[FleetRun]
) -> None:
    # Real processes (spawned), through the token clients: the field report of issue 18,
    # where 40 of 40 jobs failed next to one pod left on a rotated-out secret.
    fleet = make_fleet(redis_server, issuer, encryption_key=FLEET_KEY)
    wrong = FleetRun(
        dataclasses.replace(fleet, client_secret=WRONG_SECRET), ["threads"], target=client_worker
    )
    fleet_run.append(wrong)
    right = FleetRun(fleet, ["threads", "asyncio", "trio", "threads"], target=client_worker)
    fleet_run.append(right)
    for _ in range(2):
        refused = wrong.phase(5)
        assert len(refused[0].failures) == 5
        assert all("invalid_client" in f for f in refused[0].failures)
        wrong.send([0], 5)  # retrying while the right ones work
        tokens, failures = merged(right.phase(10))
        wrong.collect([0])
        assert failures == []
        assert sum(tokens.values()) == 40
        assert len(tokens) == 1


@MODES
@ENCRYPTION
def test_two_extra_params_values_never_share_a_token(
    fleet: Fleet, issuer: LocalIssuer, mode: str, backend: str, encryption_key: str | None
) -> None:
    def org(name: str) -> ClientCredentials:
        return creds(fleet, extra_params={"organization": name})

    async def body(make: Callable[..., Process]) -> None:
        a = await make(org("org_A"), encryption_key).get()
        b = await make(org("org_B"), encryption_key).get()
        a2 = await make(org("org_A"), encryption_key).get()
        assert isinstance(a, AccessToken)
        assert isinstance(b, AccessToken)
        assert isinstance(a2, AccessToken)
        assert a.access_token != b.access_token
        assert a2.access_token == a.access_token  # the same request still shares
        assert issuer.token_requests == 2

    run_with(backend, body, mode, fleet)


def test_clients_sharing_an_in_process_cache_never_share_across_credentials_or_params(
    fleet: Fleet, issuer: LocalIssuer
) -> None:
    from m2m_client import InMemoryTokenCache

    cache = InMemoryTokenCache()
    with (
        TokenClient(creds(fleet, extra_params={"organization": "org_A"}), cache=cache) as a,
        TokenClient(creds(fleet, extra_params={"organization": "org_B"}), cache=cache) as b,
        TokenClient(creds(fleet, client_secret=WRONG_SECRET), cache=cache) as wrong,
    ):
        token_a = a.get_token()
        assert b.get_token().access_token != token_a.access_token
        with pytest.raises(TokenEndpointError):
            wrong.get_token()
    assert issuer.token_requests == 3


# --- what is sealed carries its own expiry ---------------------------------------------


def _restore_with_long_ttl(r: redis.Redis, name: str) -> None:
    """What someone who can write Redis but has no key can do: put back an entry's bytes
    (captured earlier) with a TTL of their choosing."""
    dump = r.dump(name)
    assert dump is not None
    r.delete(name)
    r.restore(name, 10**8, dump)  # ~28 hours


@ENCRYPTION
def test_a_restored_old_token_entry_is_not_served_past_its_sealed_expiry(
    fleet: Fleet, encryption_key: str | None
) -> None:
    hour_ago = sync_cache(fleet.redis_url, encryption_key, clock=lambda: time.time() - 3600)
    then = time.time() - 3600
    old = POLICY.make_token(
        access_token="expired-an-hour-ago",
        token_type="Bearer",
        expires_in=600,
        scope=None,
        sent_at=then,
        rng=random.Random(),
    )
    hour_ago.obtain(fleet.key, lambda: old, policy=POLICY, stale=None)
    name = Codec("m2m", encryption_key).names(fleet.key).token
    r = redis_for(fleet)
    _restore_with_long_ttl(r, name)
    assert r.pttl(name) > 10**7
    now = sync_cache(fleet.redis_url, encryption_key)
    fetch = Counting(fleet)
    token = now.obtain(fleet.key, fetch, policy=POLICY, stale=None)
    assert token.access_token != "expired-an-hour-ago"
    assert fetch.calls == 1


@ENCRYPTION
def test_a_restored_old_error_entry_is_not_raised_past_its_sealed_expiry(
    fleet: Fleet, encryption_key: str | None
) -> None:
    hour_ago = sync_cache(fleet.redis_url, encryption_key, clock=lambda: time.time() - 3600)
    refused = Counting(fleet, TokenEndpointError("invalid_client", "old", status_code=401))
    with pytest.raises(TokenEndpointError):
        hour_ago.obtain(fleet.key, refused, policy=POLICY, stale=None)
    name = Codec("m2m", encryption_key).names(fleet.key).negative
    r = redis_for(fleet)
    _restore_with_long_ttl(r, name)
    now = sync_cache(fleet.redis_url, encryption_key)
    fetch = Counting(fleet)
    assert now.obtain(fleet.key, fetch, policy=POLICY, stale=None).access_token
    assert fetch.calls == 1
    assert now.stats.negative_hits == 0


@ENCRYPTION
def test_a_longer_ttl_never_extends_a_shared_token(
    fleet: Fleet, encryption_key: str | None
) -> None:
    # An opaque token (no JWT `exp` for the reader to fall back on), valid for 60 s.
    opaque = POLICY.make_token(
        access_token="opaque-" + "o" * 30,
        token_type="Bearer",
        expires_in=60,
        scope=None,
        sent_at=time.time(),
        rng=random.Random(),
    )
    writer = sync_cache(fleet.redis_url, encryption_key)
    writer.obtain(fleet.key, lambda: opaque, policy=POLICY, stale=None)
    name = Codec("m2m", encryption_key).names(fleet.key).token
    redis_for(fleet).pexpire(name, 10**8)
    reader = sync_cache(fleet.redis_url, encryption_key)
    seen = reader.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    assert seen.access_token == opaque.access_token
    assert seen.expires_at <= opaque.expires_at + 1.0  # not now + 28 hours


@ENCRYPTION
@pytest.mark.parametrize("target", ["other-audience", "other-credential", "error-entry"])
def test_an_entry_copied_under_another_name_is_rejected(
    fleet: Fleet, encryption_key: str | None, target: str
) -> None:
    codec = Codec("m2m", encryption_key)
    writer = sync_cache(fleet.redis_url, encryption_key)
    token = writer.obtain(fleet.key, Counting(fleet), policy=POLICY, stale=None)
    if target == "other-audience":
        other = fleet.key._replace(audience="https://other.api.test")
    elif target == "other-credential":
        other = dataclasses.replace(fleet, client_secret=WRONG_SECRET).key
    else:
        other = fleet.key
    r = redis_for(fleet)
    value = r.get(codec.names(fleet.key).token)
    assert value is not None
    names = codec.names(other)
    r.set(names.negative if target == "error-entry" else names.token, value, px=600_000)
    reader = sync_cache(fleet.redis_url, encryption_key)
    if target == "error-entry":
        # A token's bytes under the error name: no error (and the real token is still found).
        assert reader.obtain(other, Counting(fleet), policy=POLICY, stale=None).access_token
        assert reader.stats.negative_hits == 0
        return
    fetch = Counting(fleet)
    got = reader.obtain(other, fetch, policy=POLICY, stale=None)
    assert got.access_token != token.access_token
    assert fetch.calls == 1
    assert reader.stats.undecodable_entries >= 1


def test_without_an_encryption_key_a_planted_plain_token_is_refused(fleet: Fleet) -> None:
    # Someone who can write Redis (and read it: without a key tokens are in clear) but does
    # not hold the client's credential cannot forge an entry: plain values carry a MAC keyed
    # by the credential's fingerprint.
    names = Codec("m2m", None).names(fleet.key)
    payload = {"k": "token", "x": time.time() + 3600, "t": "planted", "y": "Bearer", "l": 3600}
    data = json.dumps(payload).encode()
    r = redis_for(fleet)
    for value in (b"\x01" + data, b"\x03" + data + b"\x00" * 32):
        r.set(names.token, value, px=600_000)
        reader = sync_cache(fleet.redis_url, None)
        fetch = Counting(fleet)
        assert reader.obtain(fleet.key, fetch, policy=POLICY, stale=None).access_token != "planted"
        assert fetch.calls == 1
        r.delete(names.token)


# --- an error never beats a still-valid token (item 7) ----------------------------------


@pytest.mark.parametrize("kind", ["sync", "asyncio", "trio"])
def test_a_stored_error_never_beats_a_still_valid_shared_token(fleet: Fleet, kind: str) -> None:
    # A token valid for 100 more seconds, already in every reader's refresh-ahead window.
    valid = POLICY.make_token(
        access_token="still-valid",
        token_type="Bearer",
        expires_in=3600,
        scope=None,
        sent_at=time.time() - 3500,
        rng=random.Random(),
    )
    one = sync_cache(fleet.redis_url, FLEET_KEY)
    one.obtain(fleet.key, lambda: valid, policy=POLICY, stale=None)
    # Its background refresh gets an OAuth error, which is stored for the fleet.
    refused = Counting(fleet, TokenEndpointError("temporarily_unavailable", "x", status_code=400))
    with pytest.raises(TokenEndpointError):
        one.obtain(fleet.key, refused, policy=POLICY, stale=valid)
    assert refused.calls == 1
    # A cold process gets the valid token, not the error.
    if kind == "sync":
        cold = sync_cache(fleet.redis_url, FLEET_KEY)
        fetch = Counting(fleet)
        got = cold.obtain(fleet.key, fetch, policy=POLICY, stale=None)
        assert fetch.calls == 0
    else:
        calls = []

        async def run() -> AccessToken:
            cache = async_cache(fleet.redis_url, FLEET_KEY)
            async with cache:

                async def fetch() -> AccessToken:
                    calls.append(1)
                    return await fetch_async(fleet)

                return await cache.obtain(fleet.key, fetch, policy=POLICY, stale=None)

        got = anyio.run(run, backend=kind)
        assert calls == []
    assert got.access_token == "still-valid"


# --- a holder's failure marker is sealed like every other entry -------------------------


@ENCRYPTION
@pytest.mark.parametrize("flavour", ["sync", "asyncio", "trio"])
def test_a_redis_writer_cannot_plant_a_holders_failure(
    fleet: Fleet, encryption_key: str | None, flavour: str
) -> None:
    """Someone who can write Redis, without the fleet key or the credential, holds the lease
    and leaves a failure marker naming it: the fleet must not raise that "failure" (sealed
    error entries exist precisely so that a Redis writer cannot make calls fail); it waits
    out the lease (``wait_timeout``) and fetches for itself."""
    wait_timeout = 1.5
    options = {"wait_timeout": wait_timeout, "poll_interval": 0.2, "lease_seconds": 2.0}
    r = redis_for(fleet)

    def plant(names_of: Callable[[], Any]) -> None:
        names = names_of()
        r.set(names.lease, b"attacker", px=600_000)
        r.set(f"{names.lease}:failed", b"attacker|TokenEndpointUnavailable", px=600_000)

    began = time.monotonic()
    if flavour == "sync":
        cache = sync_cache(fleet.redis_url, encryption_key, **options)
        with TokenClient(creds(fleet), shared_cache=cache) as tokens:
            key = tokens._core.key(None, None, None)
            plant(lambda: cache._core.codec.names(key))
            token = tokens.get_token()
    else:

        async def main() -> AccessToken:
            cache = async_cache(fleet.redis_url, encryption_key, **options)
            try:
                async with AsyncTokenClient(creds(fleet), shared_cache=cache) as tokens:
                    key = tokens._core.key(None, None, None)
                    plant(lambda: cache._core.codec.names(key))
                    return await tokens.get_token()
            finally:
                await cache.aclose()

        token = anyio.run(main, backend=flavour)
    assert token.access_token
    # It waited for the planted lease, then fetched on its own: no error, a bounded wait.
    assert time.monotonic() - began < wait_timeout + 10.0


@pytest.mark.parametrize("flavour", ["sync", "asyncio", "trio"])
def test_a_replayed_old_lease_and_failure_marker_do_not_fail_the_fleet(
    fleet: Fleet, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis writer without the fleet key or the credential, who once saw a real holder's
    lease value and the failure marker it left (both MACed, both genuine), puts them back
    with a long expiry: neither may make the fleet raise that old failure (or wait on it)."""
    from m2m_client.cache._lease import Lease
    from m2m_client.errors import TokenEndpointUnavailable

    options = {"wait_timeout": 1.5, "poll_interval": 0.2, "lease_seconds": 1.0}
    r = redis_for(fleet)

    def replay(names: Any) -> None:
        # What a genuine holder wrote ten minutes ago (captured then, replayed now).
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() - 600)
        try:
            old = Lease(names, 1.0)
            marker = old.failure_marker(TokenEndpointUnavailable("down"))
        finally:
            monkeypatch.setattr(time, "time", real_time)
        r.set(names.lease, old.value.encode(), px=600_000)
        r.set(f"{names.lease}:failed", marker, px=600_000)

    began = time.monotonic()
    if flavour == "sync":
        cache = sync_cache(fleet.redis_url, FLEET_KEY, **options)
        with TokenClient(creds(fleet), shared_cache=cache) as tokens:
            replay(cache._core.codec.names(tokens._core.key(None, None, None)))
            token = tokens.get_token()
    else:

        async def main() -> AccessToken:
            cache = async_cache(fleet.redis_url, FLEET_KEY, **options)
            try:
                async with AsyncTokenClient(creds(fleet), shared_cache=cache) as tokens:
                    replay(cache._core.codec.names(tokens._core.key(None, None, None)))
                    return await tokens.get_token()
            finally:
                await cache.aclose()

        token = anyio.run(main, backend=flavour)
    assert token.access_token
    # Not a wait on the replayed lease either (a live holder's lease is young).
    assert time.monotonic() - began < 5.0


def test_a_lease_nobody_in_the_fleet_could_write_does_not_stall_a_miss(fleet: Fleet) -> None:
    wait_timeout = 10.0
    cache = sync_cache(
        fleet.redis_url, FLEET_KEY, wait_timeout=wait_timeout, poll_interval=0.2, lease_seconds=1.0
    )
    r = redis_for(fleet)
    with TokenClient(creds(fleet), shared_cache=cache) as tokens:
        names = cache._core.codec.names(tokens._core.key(None, None, None))
        r.set(names.lease, b"attacker", px=600_000)
        began = time.monotonic()
        assert tokens.get_token().access_token
        took = time.monotonic() - began
    # A legitimate holder's lease lapses within lease_seconds if it dies; this one never does.
    assert took < 5.0, f"a cache miss waited {took:.1f} s behind a planted lease"


# --- a Redis writer cannot make a reader allocate what it likes -------------------------


@pytest.mark.parametrize("flavour", ["sync", "asyncio", "trio"])
@pytest.mark.parametrize("which", ["token", "negative", "lease", "marker"])
def test_a_huge_value_planted_in_redis_is_never_read_whole(
    fleet: Fleet, flavour: str, which: str
) -> None:
    """Values are refused above MAX_VALUE_BYTES, but only after the whole value was read:
    someone who can write Redis (no key needed) plants 512 MiB under a name, and every process
    of that credential downloads and holds it on each miss. Reads must be bounded in Redis."""
    import tracemalloc

    huge = 48 * 1024 * 1024
    r = redis_for(fleet)
    options = {"wait_timeout": 1.0, "poll_interval": 0.2, "lease_seconds": 1.0}

    def plant(names: Any) -> None:
        name = {
            "token": names.token,
            "negative": names.negative,
            "lease": names.lease,
            "marker": f"{names.lease}:failed",
        }[which]
        r.set(name, b"\x04" + b"x" * huge, px=120_000)
        if which == "marker":
            r.set(names.lease, b"x" * 32, px=120_000)  # a holder for the marker to name

    tracemalloc.start()
    try:
        if flavour == "sync":
            cache = sync_cache(fleet.redis_url, FLEET_KEY, **options)
            with TokenClient(creds(fleet), shared_cache=cache) as tokens:
                plant(cache._core.codec.names(tokens._core.key(None, None, None)))
                tracemalloc.reset_peak()
                token = tokens.get_token()
        else:

            async def main() -> AccessToken:
                cache = async_cache(fleet.redis_url, FLEET_KEY, **options)
                try:
                    async with AsyncTokenClient(creds(fleet), shared_cache=cache) as tokens:
                        plant(cache._core.codec.names(tokens._core.key(None, None, None)))
                        tracemalloc.reset_peak()
                        return await tokens.get_token()
                finally:
                    await cache.aclose()

            token = anyio.run(main, backend=flavour)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert token.access_token
    assert peak < 8 * 1024 * 1024, f"{peak / 2**20:.0f} MiB allocated for one get_token()"
