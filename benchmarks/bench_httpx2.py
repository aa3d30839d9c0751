"""BearerAuth on httpx2 (and on httpx, for comparison), in one run (about 30 seconds).

    python benchmarks/bench_httpx2.py          # needs httpx2 (pip install -e '.[dev]')

Per-request overhead of ``BearerAuth`` with a warm token cache over a plain client of the
same stack, through the same in-process transport (the stack's own ``MockTransport``), sync
and async: medians of interleaved rounds, and the median over rounds of the overhead paired
with the plain round of the same pass (pairing cancels most of the drift on a noisy machine).
The bar is the same as for httpx: <= 5 % overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials, TokenClient
from m2m_client._stacks import Stack, installed

TOKEN_URL = "https://as.example.com/oauth/token"
API = "https://api.example.com/data"
ROUNDS, PER_ROUND = 15, 1000
CREDS = ClientCredentials(token_url=TOKEN_URL, client_id="bench", client_secret="secret")


def handler(stack: Stack) -> Callable[[Any], Any]:
    """The authorization server + API, in process, answering with ``stack``'s Response."""

    def handle(request: Any) -> Any:
        if request.url.path == "/oauth/token":
            body = {"access_token": "t1", "token_type": "Bearer", "expires_in": 3600}
            return stack.Response(200, json=body)
        return stack.Response(200, content=b"ok")

    return handle


def summarise(samples: dict[str, list[float]], base_name: str) -> dict[str, tuple[float, float]]:
    base = samples[base_name]
    return {
        name: (
            statistics.median(rounds) / PER_ROUND * 1e6,
            statistics.median((r - b) / b for r, b in zip(rounds, base, strict=True)) * 100,
        )
        for name, rounds in samples.items()
    }


def sync_overhead(stacks: tuple[Stack, ...]) -> dict[str, tuple[float, float]]:
    clients: dict[str, Any] = {}
    for stack in stacks:
        transport = stack.MockTransport(handler(stack))
        tokens = TokenClient(CREDS, http_client=stack.Client(transport=transport))
        tokens.get_token()
        clients[f"plain {stack.name}"] = stack.Client(transport=transport)
        clients[f"BearerAuth {stack.name}"] = stack.Client(
            transport=transport, auth=BearerAuth(tokens)
        )
    for client in clients.values():
        client.get(API)
    samples: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(ROUNDS):  # interleaved, so machine noise hits every client alike
        for name, client in clients.items():
            start = time.perf_counter()
            for _ in range(PER_ROUND):
                client.get(API)
            samples[name].append(time.perf_counter() - start)
    return paired(samples, stacks)


async def async_overhead(stacks: tuple[Stack, ...]) -> dict[str, tuple[float, float]]:
    clients: dict[str, Any] = {}
    token_clients = []
    for stack in stacks:
        transport = stack.MockTransport(handler(stack))
        tokens = AsyncTokenClient(CREDS, http_client=stack.AsyncClient(transport=transport))
        await tokens.get_token()
        token_clients.append(tokens)
        clients[f"plain {stack.name}"] = stack.AsyncClient(transport=transport)
        clients[f"BearerAuth {stack.name}"] = stack.AsyncClient(
            transport=transport, auth=BearerAuth(tokens)
        )
    get: dict[str, Callable[[str], Awaitable[Any]]] = {n: c.get for n, c in clients.items()}
    for name in clients:
        await get[name](API)
    samples: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(ROUNDS):
        for name in clients:
            start = time.perf_counter()
            for _ in range(PER_ROUND):
                await get[name](API)
            samples[name].append(time.perf_counter() - start)
    for tokens in token_clients:
        await tokens.aclose()
    return paired(samples, stacks)


def paired(
    samples: dict[str, list[float]], stacks: tuple[Stack, ...]
) -> dict[str, tuple[float, float]]:
    result: dict[str, tuple[float, float]] = {}
    for stack in stacks:  # each stack's BearerAuth against its own plain client
        names = [f"plain {stack.name}", f"BearerAuth {stack.name}"]
        result.update(summarise({n: samples[n] for n in names}, names[0]))
    return result


def table(title: str, us: dict[str, tuple[float, float]]) -> None:
    print(f"\n{title}: median µs per request ({ROUNDS} rounds x {PER_ROUND} requests)")
    print(f"  {'client':<20}{'µs/req':>10}{'overhead':>12}")
    for name, (value, over) in us.items():
        print(f"  {name:<20}{value:>10.1f}{'' if name.startswith('plain') else f'{over:.1f}%':>12}")


def main() -> None:
    global ROUNDS, PER_ROUND
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few requests (a smoke run)")
    if parser.parse_args().quick:
        ROUNDS, PER_ROUND = 2, 20
    stacks = installed()
    if "httpx2" not in {stack.name for stack in stacks}:
        raise SystemExit("httpx2 is not installed: pip install -e '.[dev]' (Python >= 3.11)")
    started = time.perf_counter()
    table("sync  (Client)", sync_overhead(stacks))
    table("async (AsyncClient)", anyio.run(async_overhead, stacks))
    versions = ", ".join(f"{s.name} {s.module.__version__}" for s in stacks)
    print(f"\n{versions}; finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
