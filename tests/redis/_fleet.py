"""Code that runs inside the worker processes of the fleet tests (importable by spawn)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from m2m_client import AccessToken, ClientCredentials, RefreshPolicy, TokenEndpointError
from m2m_client._client._decisions import make_key
from m2m_client._oauth import ClientAuthenticator
from m2m_client._token import CacheKey

POLICY = RefreshPolicy()


@dataclass(frozen=True)
class Fleet:
    """Everything a worker process needs (picklable)."""

    redis_url: str
    token_url: str
    client_id: str
    client_secret: str
    audience: str
    encryption_key: str | None = "fleet-test-key-" + "k" * 32
    lease_seconds: float = 2.0
    poll_interval: float = 0.2
    breaker_reset_seconds: float = 0.5
    fetch_delay: float = 0.0

    @property
    def credentials(self) -> ClientCredentials:
        return ClientCredentials(
            token_url=self.token_url,
            client_id=self.client_id,
            client_secret=self.client_secret,
            audience=self.audience,
            scope="read:data",
        )

    @property
    def key(self) -> CacheKey:
        """The cache key a token client of :attr:`credentials` uses (credential id included)."""
        creds = self.credentials
        return make_key(creds, None, None, None, None, ClientAuthenticator(creds).credential_id())

    def options(self) -> dict[str, Any]:
        return {
            "encryption_key": self.encryption_key,
            "lease_seconds": self.lease_seconds,
            "poll_interval": self.poll_interval,
            "breaker_reset_seconds": self.breaker_reset_seconds,
            "breaker_threshold": 1,
            # Generous: CI machines run these 8-process tests on 2 busy cores, and a timed-out
            # Redis call would (correctly) make a process fetch on its own.
            "operation_timeout": 2.0,
            "connect_timeout": 2.0,
        }


def _token_from(response: httpx.Response, sent_at: float) -> AccessToken:
    body = response.json()
    if response.status_code >= 400:
        raise TokenEndpointError(
            body.get("error", "invalid_request"),
            body.get("error_description"),
            status_code=response.status_code,
        )
    return POLICY.make_token(
        access_token=body["access_token"],
        token_type=body.get("token_type", "Bearer"),
        expires_in=body.get("expires_in"),
        scope=body.get("scope"),
        sent_at=sent_at,
        rng=random.Random(),
    )


def fetch_sync(fleet: Fleet, delay: float | None = None) -> AccessToken:
    """A real token request to the loopback issuer (which counts them)."""
    time.sleep(fleet.fetch_delay if delay is None else delay)
    sent_at = time.time()
    response = httpx.post(
        fleet.token_url,
        data={"grant_type": "client_credentials", "audience": fleet.audience},
        auth=(fleet.client_id, fleet.client_secret),
        timeout=10,
    )
    return _token_from(response, sent_at)


async def fetch_async(fleet: Fleet, delay: float | None = None) -> AccessToken:
    import anyio

    await anyio.sleep(fleet.fetch_delay if delay is None else delay)
    sent_at = time.time()
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            fleet.token_url,
            data={"grant_type": "client_credentials", "audience": fleet.audience},
            auth=(fleet.client_id, fleet.client_secret),
        )
    return _token_from(response, sent_at)


@dataclass
class PhaseResult:
    tokens: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)


def worker(fleet: Fleet, index: int, mode: str, commands: Any, results: Any) -> None:
    """Run phases on command: each phase is ``callers`` concurrent obtain() calls.

    ``mode``: "threads" (RedisTokenCache), "asyncio" or "trio" (AsyncRedisTokenCache).
    A command is ``(callers, stale_token_or_None, fetch_delay)``; ``None`` ends the worker.
    """
    import redis

    from m2m_client.cache import AsyncRedisTokenCache, RedisTokenCache

    if mode == "threads":
        cache: Any = RedisTokenCache(redis.Redis.from_url(fleet.redis_url), **fleet.options())
    else:
        cache = AsyncRedisTokenCache(
            redis.asyncio.Redis.from_url(fleet.redis_url), **fleet.options()
        )
    results.put((index, "ready", None))
    while (command := commands.get()) is not None:
        callers, stale_token, delay = command
        stale = None if stale_token is None else AccessToken(stale_token, expires_at=1.0)
        if mode == "threads":
            result = _phase_threads(cache, fleet, callers, stale, delay)
        else:
            import anyio

            result = anyio.run(_phase_async, cache, fleet, callers, stale, delay, backend=mode)
        result.stats = cache.stats.as_dict()
        results.put((index, "done", result))


def _phase_threads(cache: Any, fleet: Fleet, callers: int, stale: Any, delay: float) -> PhaseResult:
    result = PhaseResult()
    lock = threading.Lock()
    start = threading.Barrier(callers)

    def call() -> None:
        start.wait()
        try:
            token = cache.obtain(
                fleet.key, lambda: fetch_sync(fleet, delay), policy=POLICY, stale=stale
            )
        except Exception as exc:
            with lock:
                result.failures.append(repr(exc))
        else:
            with lock:
                result.tokens[token.access_token] += 1

    began = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    result.seconds = time.monotonic() - began
    return result


async def _phase_async(
    cache: Any, fleet: Fleet, callers: int, stale: Any, delay: float
) -> PhaseResult:
    import anyio

    result = PhaseResult()

    async def call() -> None:
        try:
            token = await cache.obtain(
                fleet.key, lambda: fetch_async(fleet, delay), policy=POLICY, stale=stale
            )
        except Exception as exc:
            result.failures.append(repr(exc))
        else:
            result.tokens[token.access_token] += 1

    began = time.monotonic()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(call)
    result.seconds = time.monotonic() - began
    return result


def client_worker(fleet: Fleet, index: int, mode: str, commands: Any, results: Any) -> None:
    """Like :func:`worker`, through the real token clients with ``shared_cache=``.

    ``mode``: "threads" (TokenClient + RedisTokenCache), "asyncio" or "trio"
    (AsyncTokenClient + AsyncRedisTokenCache). A command is ``(callers, _, _)``; ``None`` ends
    it.
    """
    import redis

    from m2m_client import AsyncTokenClient, TokenClient
    from m2m_client.cache import AsyncRedisTokenCache, RedisTokenCache

    creds = fleet.credentials
    if mode == "threads":
        shared: Any = RedisTokenCache(redis.Redis.from_url(fleet.redis_url), **fleet.options())
        client: Any = TokenClient(creds, shared_cache=shared)
    else:
        shared = AsyncRedisTokenCache(
            redis.asyncio.Redis.from_url(fleet.redis_url), **fleet.options()
        )
        client = AsyncTokenClient(creds, shared_cache=shared)
    results.put((index, "ready", None))
    while (command := commands.get()) is not None:
        began = time.monotonic()
        if mode == "threads":
            result = _client_phase_threads(client, command[0])
        else:
            import anyio

            result = anyio.run(_client_phase_async, client, command[0], backend=mode)
        result.seconds = time.monotonic() - began
        result.stats = shared.stats.as_dict()
        results.put((index, "done", result))


def _client_phase_threads(client: Any, callers: int) -> PhaseResult:
    result = PhaseResult()
    lock = threading.Lock()

    def call() -> None:
        try:
            token = client.get_token()
        except Exception as exc:
            with lock:
                result.failures.append(repr(exc))
        else:
            with lock:
                result.tokens[token.access_token] += 1

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return result


async def _client_phase_async(client: Any, callers: int) -> PhaseResult:
    import anyio

    result = PhaseResult()

    async def call() -> None:
        try:
            token = await client.get_token()
        except Exception as exc:
            result.failures.append(repr(exc))
        else:
            result.tokens[token.access_token] += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(call)
    return result
