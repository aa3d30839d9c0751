"""RedisReplayCache (m2m_client/cache/_replay.py): a DPoP replay cache shared by a fleet.

Against a real redis-server on 127.0.0.1 (started by the fixture), with tokens and proofs
from LocalIssuer over real HTTP: verifiers sharing one Redis refuse a proof replayed from
one to the other (RFC 9449 §11.1), entries expire with their proof's ``iat`` window, key
names stay bounded whatever the ``jti``, and a Redis that is down, absent or silent gives
the configured answer (503-style ``ReplayCacheUnavailable``, or a per-process check) within
the timeouts, never a hang or a foreign exception.
"""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime.

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI

from m2m_client._dpop import DPoPKey
from m2m_client.cache import RedisReplayCache
from m2m_client.cache._replay import _set_sync, replay_name
from m2m_client.errors import DPoPProofError, ReplayCacheUnavailable, VerificationError
from m2m_client.fastapi import JWTBearer
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, Claims, DPoPChecker, TokenVerifier
from tests._asgi_server import serve
from tests.redis.conftest import RedisServer, _free_port

URL = "https://api.fleet.test/data"
Headers = Callable[..., dict[str, str]]


def verifier_options(issuer: LocalIssuer) -> dict[str, Any]:
    return {
        "issuer": issuer.url,
        "audience": issuer.audience,
        "algorithms": sorted({key["alg"] for key in issuer.jwks()["keys"]}),
        "dpop": "required",
    }


def split(headers: dict[str, str]) -> tuple[str, str]:
    """(token, proof) of ``dpop_headers(...)``."""
    return headers["Authorization"].split(" ", 1)[1], headers["DPoP"]


@pytest.fixture
def caches() -> Iterator[list[RedisReplayCache]]:
    made: list[RedisReplayCache] = []
    yield made
    for cache in made:
        cache.close()


@pytest.fixture
async def acaches() -> Any:
    """For async tests: closed with aclose(), so this event loop's connections close too."""
    made: list[RedisReplayCache] = []
    yield made
    for cache in made:
        await cache.aclose()


def shared(made: list[RedisReplayCache], url: str, **options: Any) -> RedisReplayCache:
    cache = RedisReplayCache.from_url(url, **options)
    made.append(cache)
    return cache


def fleet(
    issuer: LocalIssuer, made: list[RedisReplayCache], url: str, kind: Any, **options: Any
) -> list[Any]:
    """Two verifiers of ``kind``, each with its own RedisReplayCache on the same Redis."""
    return [
        kind(
            **verifier_options(issuer),
            dpop_checker=DPoPChecker(replay_cache=shared(made, url, **options)),
        )
        for _ in range(2)
    ]


# --- a fleet of verifiers --------------------------------------------------------------------


def test_a_proof_replayed_to_another_sync_verifier_is_refused(
    redis_server: RedisServer, local_issuer: LocalIssuer, dpop_headers: Headers, caches: Any
) -> None:
    first, second = fleet(local_issuer, caches, redis_server.url, TokenVerifier)
    key = DPoPKey.generate()
    token, proof = split(dpop_headers("GET", URL, key=key))
    assert first.verify(token, dpop_proof=proof, method="GET", url=URL).subject
    with pytest.raises(DPoPProofError, match="already used") as refused:
        second.verify(token, dpop_proof=proof, method="GET", url=URL)
    assert refused.value.reason == "dpop_proof"
    # The same token with a fresh proof is fine at either instance.
    fresh = key.proof("GET", URL, now=local_issuer.clock(), access_token=token)
    assert second.verify(token, dpop_proof=fresh, method="GET", url=URL).subject
    assert caches[0].stats.checks == 1
    assert caches[1].stats.replays == 1


def test_without_the_shared_cache_the_other_instance_would_accept_the_replay(
    local_issuer: LocalIssuer, dpop_headers: Headers
) -> None:
    # The control for the test above: per-process caches each accept the proof once.
    first, second = (TokenVerifier(**verifier_options(local_issuer)) for _ in range(2))
    token, proof = split(dpop_headers("GET", URL))
    first.verify(token, dpop_proof=proof, method="GET", url=URL)
    assert second.verify(token, dpop_proof=proof, method="GET", url=URL).subject


@pytest.mark.anyio
async def test_a_proof_replayed_to_another_async_verifier_is_refused(
    redis_server: RedisServer, local_issuer: LocalIssuer, dpop_headers: Headers, acaches: Any
) -> None:
    first, second = fleet(local_issuer, acaches, redis_server.url, AsyncTokenVerifier)
    token, proof = split(dpop_headers("GET", URL))
    assert (await first.verify(token, dpop_proof=proof, method="GET", url=URL)).subject
    with pytest.raises(DPoPProofError, match="already used"):
        await second.verify(token, dpop_proof=proof, method="GET", url=URL)
    with pytest.raises(DPoPProofError, match="already used"):
        await first.verify(token, dpop_proof=proof, method="GET", url=URL)
    assert [c.stats.checks for c in acaches] == [2, 1]


def test_one_proof_sent_to_the_fleet_at_once_passes_exactly_once(
    redis_server: RedisServer, local_issuer: LocalIssuer, dpop_headers: Headers, caches: Any
) -> None:
    verifiers = fleet(local_issuer, caches, redis_server.url, TokenVerifier)
    token, proof = split(dpop_headers("GET", URL))
    for verifier in verifiers:
        verifier.refresh()
    outcomes: list[str] = []
    start = threading.Barrier(16)

    def attempt(verifier: TokenVerifier) -> None:
        start.wait(timeout=10)
        try:
            verifier.verify(token, dpop_proof=proof, method="GET", url=URL)
            outcomes.append("accepted")
        except DPoPProofError:
            outcomes.append("replay")

    threads = [threading.Thread(target=attempt, args=(verifiers[i % 2],)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(outcomes) == ["accepted"] + ["replay"] * 15


@pytest.mark.anyio
async def test_concurrent_async_checks_of_one_proof_pass_exactly_once(
    redis_server: RedisServer, local_issuer: LocalIssuer, dpop_headers: Headers, acaches: Any
) -> None:
    verifiers = fleet(local_issuer, acaches, redis_server.url, AsyncTokenVerifier)
    token, proof = split(dpop_headers("GET", URL))
    outcomes: list[str] = []

    async def attempt(verifier: AsyncTokenVerifier) -> None:
        try:
            await verifier.verify(token, dpop_proof=proof, method="GET", url=URL)
            outcomes.append("accepted")
        except DPoPProofError:
            outcomes.append("replay")

    for verifier in verifiers:
        await verifier.refresh()
    async with anyio.create_task_group() as tasks:
        for i in range(16):
            tasks.start_soon(attempt, verifiers[i % 2])
    assert sorted(outcomes) == ["accepted"] + ["replay"] * 15


# --- entries: names, expiry --------------------------------------------------------------------


def test_entry_lives_for_the_proof_window_plus_the_clock_skew(
    redis_server: RedisServer, caches: Any
) -> None:
    cache = shared(caches, redis_server.url, clock_skew=5)
    now = time.time()
    assert cache.first_use("jkt:jti-1", expires_at=now + 301, now=now)
    client = redis_server.client()
    ttl = client.pttl(replay_name("m2m", "jkt:jti-1"))
    assert 305_000 <= ttl <= 306_000


def test_an_entry_expires_and_the_key_is_then_new_again(
    redis_server: RedisServer, caches: Any
) -> None:
    cache = shared(caches, redis_server.url, clock_skew=0)
    now = time.time()
    assert cache.first_use("jkt:short", expires_at=now + 0.2, now=now)
    assert not cache.first_use("jkt:short", expires_at=now + 0.2, now=now)
    time.sleep(0.4)  # Redis expires in real time: nothing to inject
    assert redis_server.client().exists(replay_name("m2m", "jkt:short")) == 0
    later = time.time()
    assert cache.first_use("jkt:short", expires_at=later + 0.2, now=later)


def test_key_names_are_bounded_and_hide_the_jti(redis_server: RedisServer, caches: Any) -> None:
    cache = shared(caches, redis_server.url, namespace="api-7")
    now = time.time()
    huge = "thumbprint:" + "x" * 1_000_000
    surrogate = "thumbprint:\ud800"  # a valid JSON escape, not encodable as UTF-8
    for key in (huge, surrogate, "thumbprint:short"):
        assert cache.first_use(key, expires_at=now + 60, now=now)
        assert not cache.first_use(key, expires_at=now + 60, now=now)
    names = redis_server.client().keys("*")
    assert len(names) == 3
    assert {len(name) for name in names} == {len("api-7:dpop-jti:") + 43}
    assert all(name.startswith(b"api-7:dpop-jti:") and b"xxxx" not in name for name in names)


def test_namespaces_keep_their_entries_apart(redis_server: RedisServer, caches: Any) -> None:
    now = time.time()
    one = shared(caches, redis_server.url, namespace="one")
    two = shared(caches, redis_server.url, namespace="two")
    assert one.first_use("k", expires_at=now + 60, now=now)
    assert two.first_use("k", expires_at=now + 60, now=now)
    assert not two.first_use("k", expires_at=now + 60, now=now)


def test_a_retried_set_that_had_already_landed_is_not_taken_for_a_replay(
    redis_server: RedisServer,
) -> None:
    # redis-py retries once after a lost connection; the first SET may have been executed.
    client = redis_server.client()
    assert _set_sync(client, "n:dpop-jti:x", b"ours", 60_000)
    assert _set_sync(client, "n:dpop-jti:x", b"ours", 60_000)  # the retry of that SET
    assert not _set_sync(client, "n:dpop-jti:x", b"someone else", 60_000)


# --- Redis down ----------------------------------------------------------------------------------


def nothing_listening() -> str:
    return f"redis://127.0.0.1:{_free_port()}/0"


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.mark.parametrize("where", ["nothing listening", "never answers"])
def test_refuses_within_the_timeouts_when_redis_cannot_answer(
    where: str, silent_server: str, caches: Any
) -> None:
    url = nothing_listening() if where == "nothing listening" else silent_server
    cache = shared(caches, url, operation_timeout=0.2, connect_timeout=0.2)
    now = time.time()
    started = time.monotonic()
    with pytest.raises(ReplayCacheUnavailable) as unavailable:
        cache.first_use("jkt:a", expires_at=now + 60, now=now)
    # 0.2 s per attempt, one retry: well under a second, never a hang.
    assert time.monotonic() - started < 1.5
    assert unavailable.value.reason == "replay_cache_unavailable"
    assert isinstance(unavailable.value, VerificationError)
    assert unavailable.value.retry_after == 5.0
    # A second failure opens the breaker; after that no check waits for Redis at all.
    with pytest.raises(ReplayCacheUnavailable):
        cache.first_use("jkt:b", expires_at=now + 60, now=now)
    started = time.monotonic()
    for i in range(20):
        with pytest.raises(ReplayCacheUnavailable):
            cache.first_use(f"jkt:c{i}", expires_at=now + 60, now=now)
    assert time.monotonic() - started < 0.2
    assert cache.stats.breaker_opened == 1
    assert cache.stats.redis_errors == 2
    assert cache.stats.unavailable == 22


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["nothing listening", "never answers"])
async def test_async_refuses_within_the_timeouts_when_redis_cannot_answer(
    where: str, silent_server: str, acaches: Any
) -> None:
    url = nothing_listening() if where == "nothing listening" else silent_server
    cache = shared(acaches, url, operation_timeout=0.2, connect_timeout=0.2)
    now = time.time()
    started = time.monotonic()
    for key in ("jkt:a", "jkt:b"):
        with pytest.raises(ReplayCacheUnavailable):
            await cache.first_use_async(key, expires_at=now + 60, now=now)
    assert time.monotonic() - started < 3.0
    assert cache.stats.breaker_opened == 1


def _outage_is_reported_once(cache: RedisReplayCache, caplog: Any) -> None:
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("DPoP replay cache: Redis failed (")
    assert "DPoP requests are refused (503)" in warnings[0]
    assert cache.stats.redis_errors == 5  # two to open it, then three failed probes
    assert cache.stats.breaker_opened == 1  # one outage: one transition counted
    assert cache.stats.unavailable == 5


def test_a_dead_redis_opens_the_breaker_once_however_many_probes_fail(
    caches: Any, caplog: Any
) -> None:
    # "Transitions are logged once each" (docs/dpop.md): a probe that fails while Redis stays
    # down re-opens the breaker without counting or warning again (as the token cache does).
    cache = shared(caches, nothing_listening(), breaker_reset_seconds=0.05)
    now = time.time()
    with caplog.at_level(logging.DEBUG, logger="m2m_client.cache"):
        for i in range(5):
            if i >= 2:
                time.sleep(0.1)  # past breaker_reset_seconds: this check is the probe
            with pytest.raises(ReplayCacheUnavailable):
                cache.first_use(f"jkt:{i}", expires_at=now + 60, now=now)
    _outage_is_reported_once(cache, caplog)


@pytest.mark.anyio
async def test_async_a_dead_redis_opens_the_breaker_once_however_many_probes_fail(
    acaches: Any, caplog: Any
) -> None:
    cache = shared(acaches, nothing_listening(), breaker_reset_seconds=0.05)
    now = time.time()
    with caplog.at_level(logging.DEBUG, logger="m2m_client.cache"):
        for i in range(5):
            if i >= 2:
                await anyio.sleep(0.1)
            with pytest.raises(ReplayCacheUnavailable):
                await cache.first_use_async(f"jkt:{i}", expires_at=now + 60, now=now)
    _outage_is_reported_once(cache, caplog)


@pytest.mark.anyio
async def test_a_verifier_whose_redis_died_refuses_with_a_typed_error(
    redis_server: RedisServer, local_issuer: LocalIssuer, dpop_headers: Headers, acaches: Any
) -> None:
    (verifier, _) = fleet(local_issuer, acaches, redis_server.url, AsyncTokenVerifier)
    token, proof = split(dpop_headers("GET", URL))
    await verifier.refresh()
    redis_server.stop()
    with anyio.fail_after(3), pytest.raises(ReplayCacheUnavailable):
        await verifier.verify(token, dpop_proof=proof, method="GET", url=URL)


def test_memory_fallback_keeps_each_instance_checking_and_sharing_resumes(
    redis_server: RedisServer, local_issuer: LocalIssuer, dpop_headers: Headers, caches: Any
) -> None:
    options = {"on_unavailable": "memory", "breaker_reset_seconds": 0.2}
    first, second = fleet(local_issuer, caches, redis_server.url, TokenVerifier, **options)
    key = DPoPKey.generate()
    token, proof = split(dpop_headers("GET", URL, key=key))
    first.verify(token, dpop_proof=proof, method="GET", url=URL)
    redis_server.stop()

    during = key.proof("GET", URL, now=local_issuer.clock(), access_token=token)
    started = time.monotonic()
    assert first.verify(token, dpop_proof=during, method="GET", url=URL).subject
    assert time.monotonic() - started < 1.5
    with pytest.raises(DPoPProofError, match="already used"):  # the same instance: caught
        first.verify(token, dpop_proof=during, method="GET", url=URL)
    # The price of "memory": meanwhile, a replay to another instance passes.
    assert second.verify(token, dpop_proof=during, method="GET", url=URL).subject

    redis_server.start()  # same port
    time.sleep(0.3)  # past breaker_reset_seconds: the next check probes Redis
    after = key.proof("GET", URL, now=local_issuer.clock(), access_token=token)
    first.verify(token, dpop_proof=after, method="GET", url=URL)
    with pytest.raises(DPoPProofError, match="already used"):
        second.verify(token, dpop_proof=after, method="GET", url=URL)
    assert caches[0].stats.breaker_opened == 1
    assert caches[0].stats.breaker_closed == 1


@pytest.mark.anyio
async def test_async_memory_fallback_when_redis_is_killed(
    redis_server: RedisServer, acaches: Any
) -> None:
    cache = shared(acaches, redis_server.url, on_unavailable="memory")
    now = time.time()
    assert await cache.first_use_async("jkt:1", expires_at=now + 60, now=now)
    redis_server.stop()
    with anyio.fail_after(3):
        assert await cache.first_use_async("jkt:2", expires_at=now + 60, now=now)
        assert not await cache.first_use_async("jkt:2", expires_at=now + 60, now=now)
    assert cache.stats.unavailable == 2
    assert cache.stats.replays == 1


def test_a_full_redis_with_noeviction_refuses_rather_than_passing(
    redis_server: RedisServer, caches: Any
) -> None:
    client = redis_server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # every write is now an OOM error
    client.close()
    cache = shared(caches, redis_server.url)
    now = time.time()
    with pytest.raises(ReplayCacheUnavailable):
        cache.first_use("jkt:oom", expires_at=now + 60, now=now)
    assert cache.stats.redis_errors == 1


def test_a_closed_cache_refuses_rather_than_passing_proofs_unchecked(
    redis_server: RedisServer,
) -> None:
    cache = RedisReplayCache.from_url(redis_server.url)
    cache.close()
    now = time.time()
    with pytest.raises(ReplayCacheUnavailable):
        cache.first_use("jkt:x", expires_at=now + 60, now=now)


# --- FastAPI -------------------------------------------------------------------------------------


class Recording(RedisReplayCache):
    """Records the thread of every sync check, and counts the async ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync_threads: list[int] = []
        self.async_calls = 0

    def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        self.sync_threads.append(threading.get_ident())
        return super().first_use(key, expires_at=expires_at, now=now)

    async def first_use_async(self, key: str, *, expires_at: float, now: float) -> bool:
        self.async_calls += 1
        return await super().first_use_async(key, expires_at=expires_at, now=now)


def api(verifier: TokenVerifier | AsyncTokenVerifier, loop_threads: list[int]) -> FastAPI:
    app = FastAPI()
    # Behind a load balancer every instance is addressed by the same public URL.
    auth = JWTBearer(verifier, request_url=lambda request: URL)

    @app.get("/data")
    async def data(claims: Annotated[Claims, Depends(auth)]) -> dict[str, Any]:
        loop_threads.append(threading.get_ident())
        return {"sub": claims.subject}

    return app


@pytest.mark.parametrize("kind", [AsyncTokenVerifier, TokenVerifier])
def test_jwtbearer_fleet_refuses_a_replay_across_instances_and_answers_503_without_redis(
    kind: Any, redis_server: RedisServer, local_issuer: LocalIssuer, dpop_headers: Headers
) -> None:
    import redis

    caches = [Recording(redis.Redis.from_url(redis_server.url)) for _ in range(2)]
    verifiers = [
        kind(**verifier_options(local_issuer), dpop_checker=DPoPChecker(replay_cache=c))
        for c in caches
    ]
    loop_threads: list[int] = []
    key = DPoPKey.generate()
    token, _ = split(dpop_headers("GET", URL, key=key))

    def headers() -> dict[str, str]:
        proof = key.proof("GET", URL, now=local_issuer.clock(), access_token=token)
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    try:
        with (
            serve(api(verifiers[0], loop_threads)) as one,
            serve(api(verifiers[1], loop_threads)) as two,
        ):
            # Warm both instances' token caches (the sync verifier's hot path), then replay.
            assert httpx.get(f"{one}/data", headers=headers(), timeout=5).status_code == 200
            assert httpx.get(f"{two}/data", headers=headers(), timeout=5).status_code == 200
            sent = headers()
            assert httpx.get(f"{one}/data", headers=sent, timeout=5).status_code == 200
            replay = httpx.get(f"{two}/data", headers=sent, timeout=5)
            assert replay.status_code == 401
            assert 'error="invalid_dpop_proof"' in replay.headers["www-authenticate"]

            redis_server.stop()
            started = time.monotonic()
            down = httpx.get(f"{one}/data", headers=headers(), timeout=5)
            assert time.monotonic() - started < 2
            assert down.status_code == 503
            assert down.headers["retry-after"] == "5"
            assert token not in down.text
    finally:
        # No aclose() on the servers' loops: their connections closed when each loop shut
        # down (the conftest fails a test that leaves them to the garbage collector).
        for cache in caches:
            cache.close()
    assert len(loop_threads) == 3
    if kind is AsyncTokenVerifier:
        assert all(not c.sync_threads for c in caches)
        assert sum(c.async_calls for c in caches) == 5
    else:
        # Never on the event loop's thread, cached token or not.
        assert sum(len(c.sync_threads) for c in caches) == 5
        assert not set(loop_threads) & {t for c in caches for t in c.sync_threads}


def test_an_event_loops_connections_close_when_the_loop_ends(
    redis_server: RedisServer, caches: Any
) -> None:
    import asyncio

    cache = shared(caches, redis_server.url)
    observer = redis_server.client()
    baseline = len(observer.client_list())

    async def requests(job: int) -> int:
        now = time.time()
        for i in range(5):
            assert await cache.first_use_async(f"jkt:{job}:{i}", expires_at=now + 60, now=now)
        return len(observer.client_list())

    def settled() -> int:
        # The server notices a closed socket on a later turn of its loop, later under load.
        deadline = time.monotonic() + 5
        while (count := len(observer.client_list())) > baseline and time.monotonic() < deadline:
            time.sleep(0.01)
        return count

    for job in range(3):  # asyncio.run per job: each loop's connections go with it
        assert asyncio.run(requests(job)) > baseline
        assert settled() == baseline
    observer.close()


# --- processes, options --------------------------------------------------------------------------


def test_a_forked_child_opens_its_own_connections_and_shares_the_entries(
    redis_server: RedisServer, caches: Any
) -> None:
    import multiprocessing

    cache = shared(caches, redis_server.url)
    now = time.time()
    assert cache.first_use("jkt:parent", expires_at=now + 60, now=now)
    sync = cache._connections.sync_executor
    parent_client = sync.client if sync else None
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()

    def child() -> None:
        replay = cache.first_use("jkt:parent", expires_at=now + 60, now=now)
        first = cache.first_use("jkt:child", expires_at=now + 60, now=now)
        sync = cache._connections.sync_executor
        fresh = sync is not None and sync.client is not parent_client
        results.put((replay, first, fresh))

    process = ctx.Process(target=child)
    process.start()
    for i in range(50):  # the parent keeps using its connections meanwhile
        assert cache.first_use(f"jkt:p{i}", expires_at=now + 60, now=now)
    replay, first, fresh = results.get(timeout=20)
    process.join(10)
    assert process.exitcode == 0
    assert (replay, first, fresh) == (False, True, True)
    assert not cache.first_use("jkt:child", expires_at=now + 60, now=now)


@pytest.mark.parametrize(
    "options",
    [
        {"namespace": ""},
        {"namespace": "a b"},
        {"namespace": "{tag}"},
        {"namespace": "n" * 65},
        {"on_unavailable": "ignore"},
        {"operation_timeout": 0},
        {"connect_timeout": float("inf")},
        {"breaker_reset_seconds": -1},
        {"clock_skew": -1},
        {"clock_skew": float("nan")},
        {"on_unavailable": "memory", "fallback_entries": 0},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    from m2m_client.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        RedisReplayCache.from_url("redis://127.0.0.1:1/0", **options)


def test_repr_names_the_policy_and_never_the_password() -> None:
    cache = RedisReplayCache.from_url("redis://:hunter2-secret@127.0.0.1:1/0", namespace="api")
    assert repr(cache) == (
        "RedisReplayCache(namespace='api', on_unavailable='refuse', breaker='closed')"
    )
