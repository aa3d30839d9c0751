"""Several worker processes sharing one token through Redis: one token request for the fleet.

Run it with no arguments: it starts a local redis-server (Debian package ``redis-server``), a
local authorization server and a protected API on 127.0.0.1, then 4 worker processes that each
make 25 concurrent API calls. With your own settings::

    M2M_REDIS_URL=redis://cache:6379/0 M2M_CACHE_KEY=... \
    M2M_TOKEN_URL=https://tenant.example.com/oauth/token M2M_CLIENT_ID=... \
    M2M_CLIENT_SECRET=... M2M_AUDIENCE=https://api.example.com \
    M2M_API_URL=https://api.example.com/data python examples/fleet_worker.py

Each worker is an ordinary ``AsyncTokenClient`` + ``BearerAuth``; ``shared_cache=`` is the only
change. Its in-process cache stays the hot path; only its one flight owner talks to Redis.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx

from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials
from m2m_client.cache import AsyncRedisTokenCache

WORKERS, CALLS = 4, 25


async def work(
    creds: ClientCredentials, redis_url: str, cache_key: str, api_url: str | None
) -> tuple[int, list[int], set[str], dict[str, int]]:
    shared = AsyncRedisTokenCache.from_url(
        redis_url,
        encryption_key=cache_key,
        namespace="m2m-example",
        operation_timeout=1.0,  # the default 0.25 s suits a server; this demo may share a laptop
    )
    statuses: list[int] = []
    fingerprints: set[str] = set()
    async with (
        shared,
        AsyncTokenClient(creds, shared_cache=shared) as tokens,
        httpx.AsyncClient(auth=BearerAuth(tokens), timeout=10) as http,
    ):

        async def call() -> None:
            fingerprints.add((await tokens.get_token()).fingerprint)
            if api_url is not None:
                statuses.append((await http.get(api_url)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(CALLS):
                tg.start_soon(call)
        return (
            tokens.stats.token_requests,
            sorted(set(statuses)),
            fingerprints,
            shared.stats.as_dict(),
        )


def worker(
    creds: ClientCredentials,
    redis_url: str,
    cache_key: str,
    api_url: str | None,
    name: str,
    results: Any,  # a multiprocessing queue
) -> None:
    try:
        outcome = anyio.run(work, creds, redis_url, cache_key, api_url)
    except BaseException as exc:
        # Tell the parent at once rather than leave it waiting on a result that never comes.
        results.put((name, f"{type(exc).__name__}: {exc}"))
        raise
    results.put((name, outcome))


def run_fleet(creds: ClientCredentials, redis_url: str, cache_key: str, api_url: str | None) -> int:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=worker, args=(creds, redis_url, cache_key, api_url, f"worker-{i}", results)
        )
        for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    total_requests, every_fingerprint, every_status = 0, set(), set()
    failed = False
    for _ in procs:
        name, outcome = results.get(timeout=60)
        if isinstance(outcome, str):
            print(f"{name} failed: {outcome}")
            failed = True
            continue
        requests, statuses, fingerprints, stats = outcome
        total_requests += requests
        every_fingerprint |= fingerprints
        every_status |= set(statuses)
        print(
            f"{name}: {CALLS} calls (API statuses {statuses}), token {sorted(fingerprints)}, "
            f"token requests {requests}, shared hits {stats['shared_hits']}, waits woken "
            f"{stats['waits_woken']}"
        )
    for p in procs:
        p.join(10)
    print(f"token requests made by the fleet: {total_requests}")
    ok = not failed and len(every_fingerprint) == 1 and every_status <= {200}
    return 0 if ok else 1


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        sys.exit("set M2M_REDIS_URL, or install redis-server (Debian package redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
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
    try:
        for _ in range(250):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait()


def main() -> None:
    # Without a key the values in Redis are bearer tokens in clear: use one in production.
    cache_key = os.environ.get("M2M_CACHE_KEY") or secrets.token_urlsafe(32)
    api_url = os.environ.get("M2M_API_URL")
    with contextlib.ExitStack() as stack:
        redis_url = os.environ.get("M2M_REDIS_URL") or stack.enter_context(local_redis())
        if any(os.environ.get(v) for v in ("M2M_TOKEN_URL", "M2M_ISSUER", "AUTH0_DOMAIN")):
            creds = ClientCredentials.from_env()
        else:
            print("no M2M_* settings: starting a local authorization server and API on 127.0.0.1")
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from _local import local_setup  # examples/_local.py, beside this file

            creds, api_url = stack.enter_context(local_setup())
        code = run_fleet(creds, redis_url, cache_key, api_url)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
