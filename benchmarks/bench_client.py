"""Calling side vs authlib and httpx-auth, in one run (about a minute).

    python benchmarks/bench_client.py

(a) per-request overhead of bearer auth with a warm token cache, over a plain httpx client
    through the same in-process transport (sync and async; medians of repeated rounds);
(b) token requests made by 1,000 concurrent cold callers (async) / 64 threads (sync), and by
    the same crowd when the cached token has expired.

authlib's httpx integration runs on httpx2 when httpx2 is installed (as in the dev install),
on httpx otherwise; each client is given a transport of its own stack (a transport of the
other stack fails inside the client), and its overhead is paired with a plain client of that
stack (with m2m_client on the same stack beside it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import anyio
import httpx

from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials, TokenClient

warnings.filterwarnings("ignore")
import httpx_auth  # noqa: E402
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuth2Client  # noqa: E402

TOKEN_URL = "https://as.example.com/oauth/token"
API = "https://api.example.com/data"
ROUNDS, PER_ROUND = 15, 1000
CREDS = ClientCredentials(token_url=TOKEN_URL, client_id="bench", client_secret="secret")


def client_stack(client_class: type) -> ModuleType:
    """The HTTP stack (the httpx or httpx2 module) a client class is built on."""
    for base in client_class.__mro__:
        top = base.__module__.partition(".")[0]
        if top in ("httpx", "httpx2") and base.__name__ in ("Client", "AsyncClient"):
            return sys.modules[top]
    raise RuntimeError(f"{client_class.__name__} is neither an httpx nor an httpx2 client")


# authlib (1.9) builds its clients on httpx2 when that is installed: its transports must be
# httpx2's (an httpx transport's responses fail httpx2's stream check, an AssertionError).
AUTHLIB_SYNC, AUTHLIB_ASYNC = client_stack(OAuth2Client), client_stack(AsyncOAuth2Client)


class Counter:
    """The authorization server + API, in process; counts token requests."""

    def __init__(self, pause: float = 0.0, stack: ModuleType = httpx) -> None:
        self.token_requests = 0
        self.pause = pause
        self.lock = threading.Lock()
        self.stack = stack  # answers with this stack's Response (httpx or httpx2)

    def _token(self) -> Any:
        with self.lock:
            self.token_requests += 1
            n = self.token_requests
        body = {"access_token": f"t{n}", "token_type": "Bearer", "expires_in": 3600}
        return self.stack.Response(200, json=body)

    def sync(self, request: Any) -> Any:
        if request.url.path == "/oauth/token":
            time.sleep(self.pause)
            return self._token()
        return self.stack.Response(200, content=b"ok")

    async def async_(self, request: Any) -> Any:
        if request.url.path == "/oauth/token":
            await anyio.sleep(self.pause)
            return self._token()
        return self.stack.Response(200, content=b"ok")


def median_us(run_round: Callable[[], float]) -> float:
    return statistics.median(run_round() for _ in range(ROUNDS)) / PER_ROUND * 1e6


def sync_overhead() -> dict[str, tuple[float, float]]:
    counter = Counter()
    transport = httpx.MockTransport(counter.sync)
    tokens = TokenClient(CREDS, http_client=httpx.Client(transport=transport))
    tokens.get_token()
    hauth = httpx_auth.OAuth2ClientCredentials(
        TOKEN_URL, "bench", "secret", client=httpx.Client(transport=transport)
    )
    clients = {
        "plain httpx": httpx.Client(transport=transport),
        "m2m_client": httpx.Client(transport=transport, auth=BearerAuth(tokens)),
        "httpx-auth": httpx.Client(transport=transport, auth=hauth),
    }
    stack = AUTHLIB_SYNC
    if stack is not httpx:  # a plain client and m2m_client on authlib's stack beside it
        transport = stack.MockTransport(Counter(stack=stack).sync)
        tokens = TokenClient(CREDS, http_client=stack.Client(transport=transport))
        clients[f"plain {stack.__name__}"] = stack.Client(transport=transport)
        clients[f"m2m_client {stack.__name__}"] = stack.Client(
            transport=transport, auth=BearerAuth(tokens)
        )
    authlib = OAuth2Client(
        "bench",
        "secret",
        token_endpoint=TOKEN_URL,
        transport=transport,
        grant_type="client_credentials",
    )
    authlib.fetch_token(TOKEN_URL, grant_type="client_credentials")
    clients[authlib_name(stack)] = authlib
    for c in clients.values():
        c.get(API)

    def bench(client: httpx.Client) -> Callable[[], float]:
        def one_round() -> float:
            start = time.perf_counter()
            for _ in range(PER_ROUND):
                client.get(API)
            return time.perf_counter() - start

        return one_round

    # interleave rounds so machine noise hits everybody alike
    samples: dict[str, list[float]] = {k: [] for k in clients}
    for _ in range(ROUNDS):
        for name, c in clients.items():
            samples[name].append(bench(c)())
    return summarise(samples)


def authlib_name(stack: ModuleType) -> str:
    return "authlib" if stack is httpx else f"authlib {stack.__name__}"


def plain_of(name: str) -> str:
    """The plain client a candidate's overhead is paired with: the one of its own stack."""
    return "plain httpx2" if name.endswith(" httpx2") else "plain httpx"


def summarise(samples: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Median µs/request, and the median over rounds of the overhead paired with the plain
    round of the same stack in the same pass (pairing cancels most of the drift on a noisy
    machine)."""
    return {
        name: (
            statistics.median(rounds) / PER_ROUND * 1e6,
            statistics.median(
                (r - b) / b for r, b in zip(rounds, samples[plain_of(name)], strict=True)
            )
            * 100,
        )
        for name, rounds in samples.items()
    }


async def async_overhead() -> dict[str, tuple[float, float]]:
    counter = Counter()
    transport = httpx.MockTransport(counter.async_)
    samples: dict[str, list[float]] = {}
    async with AsyncTokenClient(
        CREDS, http_client=httpx.AsyncClient(transport=transport)
    ) as tokens:
        await tokens.get_token()
        hauth = httpx_auth.OAuth2ClientCredentials(
            TOKEN_URL,
            "bench",
            "secret",
            client=httpx.Client(transport=httpx.MockTransport(counter.sync)),
        )
        clients = {
            "plain httpx": httpx.AsyncClient(transport=transport),
            "m2m_client": httpx.AsyncClient(transport=transport, auth=BearerAuth(tokens)),
            "httpx-auth": httpx.AsyncClient(transport=transport, auth=hauth),
        }
        stack = AUTHLIB_ASYNC
        if stack is not httpx:  # a plain client and m2m_client on authlib's stack beside it
            transport = stack.MockTransport(Counter(stack=stack).async_)
            other = AsyncTokenClient(CREDS, http_client=stack.AsyncClient(transport=transport))
            await other.get_token()
            clients[f"plain {stack.__name__}"] = stack.AsyncClient(transport=transport)
            clients[f"m2m_client {stack.__name__}"] = stack.AsyncClient(
                transport=transport, auth=BearerAuth(other)
            )
        authlib = AsyncOAuth2Client(
            "bench",
            "secret",
            token_endpoint=TOKEN_URL,
            transport=transport,
            grant_type="client_credentials",
        )
        await authlib.fetch_token(TOKEN_URL, grant_type="client_credentials")
        clients[authlib_name(stack)] = authlib
        for c in clients.values():
            await c.get(API)
        samples = {k: [] for k in clients}
        for _ in range(ROUNDS):
            for name, c in clients.items():
                start = time.perf_counter()
                for _ in range(PER_ROUND):
                    await c.get(API)
                samples[name].append(time.perf_counter() - start)
    return summarise(samples)


async def async_crowd(n: int = 1000) -> dict[str, tuple[int, int]]:
    """Token requests for n concurrent cold callers, then n callers at expiry."""
    results: dict[str, tuple[int, int]] = {}

    counter = Counter(pause=0.01)
    clock = [time.time()]
    transport = httpx.MockTransport(counter.async_)
    async with (
        AsyncTokenClient(
            CREDS, http_client=httpx.AsyncClient(transport=transport), clock=lambda: clock[0]
        ) as tokens,
        httpx.AsyncClient(transport=transport, auth=BearerAuth(tokens)) as http,
    ):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(http.get, API)
        cold = counter.token_requests
        clock[0] += 3600  # the cached token has expired
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(http.get, API)
    results["m2m_client"] = (cold, counter.token_requests - cold)

    counter = Counter(pause=0.01, stack=AUTHLIB_ASYNC)
    transport = AUTHLIB_ASYNC.MockTransport(counter.async_)
    client = AsyncOAuth2Client(
        "bench",
        "secret",
        token_endpoint=TOKEN_URL,
        transport=transport,
        grant_type="client_credentials",
    )

    async def authlib_call() -> None:
        if not client.token:  # authlib's documented pattern: fetch when there is no token
            await client.fetch_token(TOKEN_URL, grant_type="client_credentials")
        await client.get(API)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(authlib_call)
    cold = counter.token_requests
    # authlib's `token` getter hands out a copy: assign a whole expired token.
    client.token = {**client.token, "expires_at": time.time() - 10}
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(authlib_call)
    results[authlib_name(AUTHLIB_ASYNC)] = (cold, counter.token_requests - cold)

    counter = Counter(pause=0.01)
    httpx_auth.OAuth2.token_cache.clear()
    hauth = httpx_auth.OAuth2ClientCredentials(
        TOKEN_URL,
        "bench",
        "secret",
        client=httpx.Client(transport=httpx.MockTransport(counter.sync)),
    )
    http = httpx.AsyncClient(transport=httpx.MockTransport(counter.async_), auth=hauth)
    async with http, anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(http.get, API)
    results["httpx-auth"] = (counter.token_requests, -1)  # expiry not injectable (wall clock)
    return results


def thread_crowd(n: int = 64) -> dict[str, tuple[int, int]]:
    def crowd(call: Callable[[], Any]) -> None:
        barrier = threading.Barrier(n)

        def one() -> None:
            barrier.wait()
            call()

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    results: dict[str, tuple[int, int]] = {}
    counter = Counter(pause=0.01)
    clock = [time.time()]
    transport = httpx.MockTransport(counter.sync)
    tokens = TokenClient(
        CREDS, http_client=httpx.Client(transport=transport), clock=lambda: clock[0]
    )
    http = httpx.Client(transport=transport, auth=BearerAuth(tokens))
    crowd(lambda: http.get(API))
    cold = counter.token_requests
    clock[0] += 3600
    crowd(lambda: http.get(API))
    results["m2m_client"] = (cold, counter.token_requests - cold)

    counter = Counter(pause=0.01, stack=AUTHLIB_SYNC)
    transport = AUTHLIB_SYNC.MockTransport(counter.sync)
    client = OAuth2Client(
        "bench",
        "secret",
        token_endpoint=TOKEN_URL,
        transport=transport,
        grant_type="client_credentials",
    )

    def authlib_call() -> None:
        if not client.token:
            client.fetch_token(TOKEN_URL, grant_type="client_credentials")
        client.get(API)

    crowd(authlib_call)
    cold = counter.token_requests
    # authlib's `token` getter hands out a copy: assign a whole expired token.
    client.token = {**client.token, "expires_at": time.time() - 10}
    crowd(authlib_call)
    results[authlib_name(AUTHLIB_SYNC)] = (cold, counter.token_requests - cold)

    counter = Counter(pause=0.01)
    httpx_auth.OAuth2.token_cache.clear()
    transport = httpx.MockTransport(counter.sync)
    hauth = httpx_auth.OAuth2ClientCredentials(
        TOKEN_URL, "bench", "secret", client=httpx.Client(transport=transport)
    )
    http = httpx.Client(transport=transport, auth=hauth)
    crowd(lambda: http.get(API))
    results["httpx-auth"] = (counter.token_requests, -1)
    return results


def overhead_table(title: str, us: dict[str, tuple[float, float]]) -> None:
    print(f"\n{title}: median µs per request ({ROUNDS} rounds x {PER_ROUND} requests)")
    print("  (overhead: over the plain client of the same stack; the ratio: to m2m_client's)")
    print(f"  {'client':<20}{'µs/req':>10}{'overhead':>12}{'vs m2m_client':>16}")
    for name, (value, over) in us.items():
        ours = us["m2m_client" if plain_of(name) == "plain httpx" else "m2m_client httpx2"][1]
        mine = name.startswith(("plain", "m2m_client"))
        ratio = "" if mine else f"{over / max(ours, 1e-9):.1f}x"
        print(f"  {name:<20}{value:>10.1f}{over:>11.1f}%{ratio:>16}")


def crowd_table(title: str, counts: dict[str, tuple[int, int]]) -> None:
    print(f"\n{title}: token requests made")
    print(f"  {'client':<20}{'cold cache':>12}{'at expiry':>12}")
    for name, (cold, expiry) in counts.items():
        print(f"  {name:<20}{cold:>12}{(str(expiry) if expiry >= 0 else 'n/a'):>12}")


def main() -> None:
    global ROUNDS, PER_ROUND
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few requests and small crowds (a smoke run)"
    )
    args = parser.parse_args()
    tasks, threads = 1000, 64
    if args.quick:
        ROUNDS, PER_ROUND, tasks, threads = 2, 20, 20, 4
    started = time.perf_counter()
    overhead_table("sync  (httpx.Client)", sync_overhead())
    overhead_table("async (httpx.AsyncClient)", anyio.run(async_overhead))
    crowd_table(f"{tasks:,} concurrent async callers", anyio.run(async_crowd, tasks))
    crowd_table(f"{threads} threads", thread_crowd(threads))
    print(f"\nfinished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
