"""The fleet-shared token cache: P processes x 100 callers, with and without Redis (~1 min).

    python benchmarks/bench_shared.py            # needs redis-server on PATH

For P = 1, 4, 8, 16 worker processes (BENCH_PROCESSES=1,4 to choose), each with 100 concurrent
``get_token()`` callers on a new AsyncTokenClient, on a cold cache and when the shared token has
just expired: token requests made, p50 / p99 latency of a caller (from the common start to its
token), and Redis round trips per process. "local" is ``AsyncTokenClient(creds)`` (one flight per
process: P requests), "shared" is ``AsyncTokenClient(creds, shared_cache=AsyncRedisTokenCache)``.
Token requests go over real HTTP to a LocalIssuer in this process; Redis is a redis-server
started here on 127.0.0.1. Numbers are medians of 3 rounds (2 shared cores: read ratios).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from m2m_client import AccessToken, RefreshPolicy
from m2m_client._token import CacheKey
from m2m_client.testing import LocalIssuer

CALLERS, ROUNDS = 100, 3
PROCESSES = tuple(int(p) for p in os.environ.get("BENCH_PROCESSES", "1,4,8,16").split(","))
POLICY = RefreshPolicy()
CACHE_KEY = "bench-shared-cache-key-" + "x" * 20


def worker(redis_url: str, token_url: str, secret: str, commands: Any, results: Any) -> None:
    import redis.asyncio

    from m2m_client import AsyncTokenClient, ClientCredentials
    from m2m_client.cache import AsyncRedisTokenCache

    creds = ClientCredentials(token_url=token_url, client_id="bench", client_secret=secret)
    cache = AsyncRedisTokenCache(redis.asyncio.Redis.from_url(redis_url), encryption_key=CACHE_KEY)

    async def round_(shared: bool, start_at: float) -> tuple[list[float], int]:
        before = cache.stats.redis_round_trips
        # A new client per round: its in-process level is cold, as in a fresh worker process.
        async with AsyncTokenClient(creds, shared_cache=cache if shared else None) as tokens:

            async def call() -> float:
                await tokens.get_token()
                return time.time() - start_at

            await asyncio.sleep(max(start_at - time.time(), 0))
            latencies = await asyncio.gather(*(call() for _ in range(CALLERS)))
        return list(latencies), cache.stats.redis_round_trips - before

    async def main() -> None:
        # Connect to Redis before the clock starts: a worker that just started is not the point.
        await cache.obtain(
            CacheKey("warm", str(os.getpid()), None, None, ()),
            fetch_warm,
            policy=POLICY,
            stale=None,
        )
        results.put(("ready", None))
        while (command := await asyncio.to_thread(commands.get)) is not None:
            results.put(("done", await round_(*command)))

    async def fetch_warm() -> AccessToken:
        return AccessToken("warm", expires_at=time.time() + 600, issued_at=time.time())

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = os.environ.get("M2M_BENCH_REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        sys.exit("redis-server not found (Debian package redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tempfile.gettempdir(),
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.02)
    return process, f"redis://127.0.0.1:{port}/0"


def run(p: int, redis_url: str, issuer: LocalIssuer) -> list[tuple[Any, ...]]:
    import redis

    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    commands = [ctx.Queue() for _ in range(p)]
    secret = issuer.client_secret("bench")
    procs = [
        ctx.Process(
            target=worker, args=(redis_url, issuer.token_url, secret, q, results), daemon=True
        )
        for q in commands
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert results.get(timeout=120)[0] == "ready"
    r = redis.Redis.from_url(redis_url)
    rows = []
    for shared in (False, True):
        for phase in ("cold", "expiry"):
            requests, p50s, p99s, rtts = [], [], [], []
            for _ in range(ROUNDS):
                if phase == "cold":
                    r.flushdb()
                else:  # the shared token is 3 s from expiry: inside everyone's safety margin
                    for name in r.scan_iter("m2m:*:token"):
                        r.pexpire(name, 3000)
                issuer.reset_counters()
                start_at = time.time() + 0.3
                for q in commands:
                    q.put((shared, start_at))
                latencies: list[float] = []
                round_trips = []
                seen = 0
                while seen < len(procs):
                    _, payload = results.get(timeout=120)
                    latencies.extend(payload[0])
                    round_trips.append(payload[1])
                    seen += 1
                latencies.sort()
                requests.append(issuer.token_requests)
                p50s.append(latencies[len(latencies) // 2] * 1000)
                p99s.append(latencies[int(len(latencies) * 0.99) - 1] * 1000)
                rtts.append(statistics.mean(round_trips))
            rows.append(
                (
                    p,
                    "shared" if shared else "local",
                    phase,
                    statistics.median(requests),
                    statistics.median(p50s),
                    statistics.median(p99s),
                    statistics.median(rtts),
                )
            )
    for q in commands:
        q.put(None)
    for proc in procs:
        proc.join(10)
    return rows


def hot_path(redis_url: str, issuer: LocalIssuer) -> None:
    import anyio
    import redis

    from m2m_client import AsyncTokenClient, ClientCredentials, TokenClient
    from m2m_client.cache import AsyncRedisTokenCache, RedisTokenCache

    creds = ClientCredentials(
        token_url=issuer.token_url, client_id="bench", client_secret=issuer.client_secret("bench")
    )
    calls, rounds = 20_000, 15

    admin = redis.Redis.from_url(redis_url)

    def commands_processed() -> int:
        # Two reads of it differ by one for an INFO itself: the deltas below subtract it.
        return int(admin.info("stats")["total_commands_processed"])

    def report(kind: str, plain: list[float], shared: list[float], commands: int) -> None:
        ratios = [s / p for p, s in zip(plain, shared, strict=True)]
        print(
            f"{kind}: warm get_token {statistics.median(plain) / calls * 1e9:.0f} ns without, "
            f"{statistics.median(shared) / calls * 1e9:.0f} ns with shared_cache= "
            f"(median ratio {statistics.median(ratios):.3f}); Redis commands during "
            f"{calls * rounds} warm calls with shared_cache=: {commands}"
        )

    with (
        TokenClient(creds) as a,
        TokenClient(creds, shared_cache=RedisTokenCache(redis.Redis.from_url(redis_url))) as b,
    ):
        a.get_token(), b.get_token()
        plain, shared = [], []
        commands = 0
        for _ in range(rounds):
            for client, out in ((a, plain), (b, shared)):
                before = commands_processed()
                began = time.perf_counter()
                for _ in range(calls):
                    client.get_token()
                out.append(time.perf_counter() - began)
                if client is b:
                    commands += commands_processed() - before - 1
        report("sync ", plain, shared, commands)

    async def run_async() -> None:
        cache = AsyncRedisTokenCache(redis.asyncio.Redis.from_url(redis_url))
        async with AsyncTokenClient(creds) as a, AsyncTokenClient(creds, shared_cache=cache) as b:
            await a.get_token()
            await b.get_token()
            plain, shared = [], []
            commands = 0
            for _ in range(rounds):
                for client, out in ((a, plain), (b, shared)):
                    before = commands_processed()
                    began = time.perf_counter()
                    for _ in range(calls):
                        await client.get_token()
                    out.append(time.perf_counter() - began)
                    if client is b:
                        commands += commands_processed() - before - 1
            report("async", plain, shared, commands)

    anyio.run(run_async)
    admin.close()


def main() -> None:
    redis_process, redis_url = start_redis()
    issuer = LocalIssuer()
    issuer.add_client("bench", "bench-secret-" + "s" * 24, expires_in=3600)
    try:
        with issuer:
            print(
                f"{'P':>3} {'level':>6} {'phase':>6} {'token requests':>15} "
                f"{'p50 ms':>8} {'p99 ms':>8} {'Redis RTT/proc':>15}"
            )
            for p in PROCESSES:
                for row in run(p, redis_url, issuer):
                    print(
                        f"{row[0]:>3} {row[1]:>6} {row[2]:>6} {row[3]:>15.0f} "
                        f"{row[4]:>8.1f} {row[5]:>8.1f} {row[6]:>15.1f}",
                        flush=True,
                    )
            hot_path(redis_url, issuer)
    finally:
        redis_process.kill()
        redis_process.wait()


if __name__ == "__main__":
    main()
