"""The DPoP replay check: per-process MemoryReplayCache vs the fleet-shared RedisReplayCache.

    python benchmarks/bench_replay.py            # ~30 s; needs redis-server on PATH

Per check (one proof's ``jti`` recorded): ``MemoryReplayCache.first_use``; a raw redis-py
``SET NX PX`` with a plain client (the floor: one round trip to a redis-server on
127.0.0.1) and the same with redis.asyncio; ``RedisReplayCache.first_use`` (sync);
``first_use_async`` on asyncio (redis.asyncio) and on trio (worker threads). Then what a
DPoP request costs a ``TokenVerifier`` (token in its verified-token cache, fresh proof)
with each cache.
Rounds interleave the candidates; each figure is the median over rounds of the
per-operation time in one round (2 noisy shared cores: read ratios, not absolutes).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
from bench_shared import start_redis  # the same throwaway redis-server (run from benchmarks/)

from m2m_client._dpop import DPoPKey
from m2m_client.cache import RedisReplayCache
from m2m_client.testing import LocalIssuer
from m2m_client.verify import DPoPChecker, MemoryReplayCache, TokenVerifier

URL = "https://api.bench.test/data"
_keys = itertools.count()


def per_op(run: Callable[[int], None], n: int) -> float:
    started = time.perf_counter()
    run(n)
    return (time.perf_counter() - started) / n


def main() -> None:
    import redis
    import redis.asyncio

    process, url = start_redis()
    try:
        memory = MemoryReplayCache(max_entries=1_000_000)
        shared = RedisReplayCache.from_url(url)
        raw = redis.Redis.from_url(url)

        def memory_checks(n: int) -> None:
            now = time.time()
            for _ in range(n):
                memory.first_use(f"k{next(_keys)}", expires_at=now + 300, now=now)

        def raw_checks(n: int) -> None:
            for _ in range(n):
                raw.set(f"raw:{next(_keys)}", b"1", nx=True, px=300_000)

        def raw_async_checks(n: int) -> None:
            async def go() -> None:
                client = redis.asyncio.Redis.from_url(url)
                for _ in range(n):
                    await client.set(f"raw:{next(_keys)}", b"1", nx=True, px=300_000)
                await client.aclose()

            anyio.run(go, backend="asyncio")

        def shared_checks(n: int) -> None:
            now = time.time()
            for _ in range(n):
                shared.first_use(f"k{next(_keys)}", expires_at=now + 300, now=now)

        def async_checks(backend: str) -> Callable[[int], None]:
            def run(n: int) -> None:
                async def go() -> None:
                    cache = RedisReplayCache.from_url(url)  # connections of this loop
                    now = time.time()
                    for _ in range(n):
                        await cache.first_use_async(
                            f"k{next(_keys)}", expires_at=now + 300, now=now
                        )
                    await cache.aclose()

                anyio.run(go, backend=backend)

            return run

        issuer = LocalIssuer(audience="https://api.bench.test")
        with issuer:
            options: dict[str, Any] = {
                "issuer": issuer.url,
                "audience": issuer.audience,
                "algorithms": sorted({k["alg"] for k in issuer.jwks()["keys"]}),
                "dpop": "required",
            }
            key = DPoPKey.generate()
            token = issuer.mint(permissions=[], sub="bench@clients", cnf={"jkt": key.thumbprint})
            verifiers = {
                "memory": TokenVerifier(**options),
                "redis": TokenVerifier(
                    **options,
                    dpop_checker=DPoPChecker(replay_cache=RedisReplayCache.from_url(url)),
                ),
            }

            def verify_with(verifier: TokenVerifier) -> Callable[[int], None]:
                def run(n: int) -> None:
                    proofs = [
                        key.proof("GET", URL, now=time.time(), access_token=token) for _ in range(n)
                    ]
                    started = time.perf_counter()
                    for proof in proofs:
                        verifier.verify(token, dpop_proof=proof, method="GET", url=URL)
                    # Only the verification is timed: proofs are made before.
                    run.elapsed = time.perf_counter() - started  # type: ignore[attr-defined]

                return run

            candidates: dict[str, tuple[Callable[[int], None], int]] = {
                "MemoryReplayCache.first_use": (memory_checks, 20_000),
                "raw redis-py SET NX PX (floor)": (raw_checks, 2_000),
                "RedisReplayCache.first_use": (shared_checks, 2_000),
                "raw redis.asyncio SET NX PX": (raw_async_checks, 2_000),
                "RedisReplayCache.first_use_async, asyncio": (async_checks("asyncio"), 2_000),
                "RedisReplayCache.first_use_async, trio": (async_checks("trio"), 1_000),
            }
            verify_runs = {name: verify_with(v) for name, v in verifiers.items()}
            for run in verify_runs.values():  # warm: keys fetched, token cached
                run(5)
            results: dict[str, list[float]] = {name: [] for name in candidates}
            verify_results: dict[str, list[float]] = {name: [] for name in verify_runs}
            for _ in range(7):
                for name, (run, n) in candidates.items():
                    results[name].append(per_op(run, n))
                for name, vrun in verify_runs.items():
                    vrun(1_000)
                    verify_results[name].append(vrun.elapsed / 1_000)  # type: ignore[attr-defined]
        medians = {name: statistics.median(times) for name, times in results.items()}
        floor = medians["raw redis-py SET NX PX (floor)"]
        print(f"{'per check':<45} {'median':>10} {'vs floor':>9}")
        for name, value in medians.items():
            print(f"{name:<45} {value * 1e6:>8.1f}µs {value / floor:>8.2f}x")
        vm = {name: statistics.median(times) for name, times in verify_results.items()}
        print(f"\n{'TokenVerifier.verify, DPoP, token cached':<45} {'median':>10}")
        for name, value in vm.items():
            print(f"{name + ' replay cache':<45} {value * 1e6:>8.1f}µs")
        print(f"redis / memory: {vm['redis'] / vm['memory']:.2f}x")
        shared.close()
    finally:
        process.kill()
        process.wait(timeout=10)


if __name__ == "__main__":
    main()
