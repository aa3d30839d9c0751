"""End-to-end cost of token verification in a served app: requests/s side by side.

A minimal FastAPI app runs under uvicorn (one worker) on 127.0.0.1 with four routes:
no auth; ``JWTBearer`` with the same token on every request; ``JWTBearer`` with a new token
on every request; and the guide's python-jose dependency
(../shared/reference/fastapi-auth0-guide.md: HTTPBearer + get_unverified_header + a loop over
the JWKS + jose.jwt.decode). Tokens are RS256 (RSA-2048), as in the guide.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/bench_served.py            # ~1 minute

The load comes from this process: keep-alive connections with pipelined requests (cheap to
make, so the served app is the bottleneck); the server is the other process. Scenarios are
interleaved over several rounds and reported as medians, with the ratio to the no-auth route
(2 shared cores: read the ratios), and the server's own CPU time per request, which other
load on the machine barely moves, as the capacity figure. A route with a no-op dependency of
JWTBearer's signature separates what FastAPI charges for any such dependency from
verification; the no-auth route with the token header sent shows what the header costs (the
server parses ~700 bytes more per request, whatever the app does with them). JWTBearer's
own cost is read against the same request bytes: the routes with the header sent.
"""

# No `from __future__ import annotations`: FastAPI resolves the route and dependency
# annotations at run time, and they name classes imported inside build_app().

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench_verify import jwks_server  # the same local JWKS (run from benchmarks/)

ISSUER = "https://issuer.bench/"
AUDIENCE = "https://api.bench"
KID = "bench-key"


# --- the served app (run in the child process) ----------------------------------------------


def build_app(jwks_url: str, jwks: dict[str, Any]) -> Any:
    from fastapi import Depends, FastAPI, HTTPException, Request, status
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
    from jose import JWTError
    from jose import jwt as jose_jwt

    from m2m_client.fastapi import JWTBearer
    from m2m_client.verify import AsyncTokenVerifier, Claims

    app = FastAPI()
    auth = JWTBearer(AsyncTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks_url))
    security = HTTPBearer()

    def guide_verify_token(token: HTTPAuthorizationCredentials = Depends(security)) -> Any:  # noqa: B008
        # The guide's verify_token, with its lru_cache'd JWKS already in memory.
        try:
            unverified_header = jose_jwt.get_unverified_header(token.credentials)
            rsa_key = {}
            for key in jwks["keys"]:
                if key["kid"] == unverified_header["kid"]:
                    rsa_key = {k: key[k] for k in ("kty", "kid", "use", "n", "e")}
            if rsa_key:
                return jose_jwt.decode(
                    token.credentials,
                    rsa_key,
                    algorithms=["RS256"],
                    audience=AUDIENCE,
                    issuer=ISSUER,
                )
        except JWTError:
            pass
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Could not validate credentials",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def same_shape(request: Request, security_scopes: SecurityScopes) -> str:
        # JWTBearer's signature, no work: what FastAPI itself charges for such a dependency.
        return "anonymous"

    @app.get("/none")
    async def no_auth() -> dict[str, str]:
        return {"sub": "anonymous"}

    @app.get("/dependency")
    async def dependency(sub: str = Depends(same_shape)) -> dict[str, str]:
        return {"sub": sub}

    @app.get("/bearer")
    async def bearer(claims: Claims = Depends(auth)) -> dict[str, str | None]:  # noqa: B008
        return {"sub": claims.subject}

    @app.get("/guide")
    async def guide(payload: Any = Depends(guide_verify_token)) -> dict[str, str]:  # noqa: B008
        return {"sub": payload["sub"]}

    return app


def serve(port: int) -> None:
    import uvicorn

    app = build_app(os.environ["BENCH_JWKS_URL"], json.loads(os.environ["BENCH_JWKS"]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- the load generator (this process) -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def served_app(jwks_url: str, jwks: dict[str, Any]) -> Iterator[tuple[int, int]]:
    port = free_port()
    env = dict(os.environ, BENCH_JWKS_URL=jwks_url, BENCH_JWKS=json.dumps(jwks))
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise RuntimeError("the benchmark app did not start") from None
                time.sleep(0.1)
        yield port, child.pid
    finally:
        child.terminate()
        child.wait(10)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TokenSource:
    """Hands out a token per request: the same one, or the next unused one."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = tokens
        self._index = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            token = self._tokens[self._index % len(self._tokens)]
            self._index += 1
            return token


def _batch(path: str, tokens: TokenSource | None, size: int) -> bytes:
    requests = []
    for _ in range(size):
        auth = f"Authorization: Bearer {tokens.next()}\r\n" if tokens else ""
        requests.append(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n")
    return "".join(requests).encode()


def run_load(
    port: int, path: str, tokens: TokenSource | None, seconds: float, connections: int
) -> tuple[int, float]:
    """(requests, elapsed seconds) for ``seconds`` over keep-alive connections.

    Requests are pipelined in batches of 32 (HTTP/1.1), so building and reading them costs
    this process little and the served app is what is measured.
    """
    counts = [0] * connections
    failures: list[str] = []
    stop = time.monotonic() + seconds
    size = 32

    def worker(index: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            done = 0
            while time.monotonic() < stop and not failures:
                sock.sendall(_batch(path, tokens, size))
                data = b""
                while data.count(b"HTTP/1.1 ") < size or not data.endswith(b"}"):
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        failures.append(f"{path}: connection closed")
                        return
                    data += chunk
                if data.count(b"HTTP/1.1 200 ") != size:
                    failures.append(f"{path}: not every answer was 200: {data[:200]!r}")
                    return
                done += size
            counts[index] = done

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failures:
        raise RuntimeError(failures[0])
    return sum(counts), time.monotonic() - started


def mint(count: int) -> tuple[dict[str, Any], list[str]]:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks = {"keys": [jwk | {"kid": KID, "use": "sig", "alg": "RS256"}]}
    now = int(time.time())
    tokens = [
        jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": f"c{i}@clients", "iat": now, "exp": now + 3600},
            key,
            algorithm="RS256",
            headers={"kid": KID},
        )
        for i in range(count)
    ]
    return jwks, tokens


NOOP = "a no-op dependency of JWTBearer's shape"
NOOP_HEADER = "the no-op dependency, the token header sent"
HEADER = "no auth, the token header sent anyway"
REPEATED = "JWTBearer, same token repeated"


def in_process_costs(
    jwks_url: str, jwks: dict[str, Any], token: str, calls: int = 2000
) -> dict[str, float]:
    """Seconds per request of each route called as an ASGI app in this process (no HTTP
    server, no network): what the app itself spends, steadier than a served figure."""
    import asyncio

    app = build_app(jwks_url, jwks)

    async def call(path: str, auth: bool) -> None:
        headers = [(b"host", b"127.0.0.1")]
        if auth:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
        }
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        if statuses != [200]:
            raise RuntimeError(f"{path}: {statuses}")

    async def run() -> dict[str, float]:
        costs: dict[str, list[float]] = {}
        routes = {
            "no auth": ("/none", False),
            HEADER: ("/none", True),
            NOOP: ("/dependency", False),
            NOOP_HEADER: ("/dependency", True),
            REPEATED: ("/bearer", True),
            "guide: python-jose dependency": ("/guide", True),
        }
        for path, auth in routes.values():
            await call(path, auth)
        for _ in range(5):  # interleaved rounds, medians
            for name, (path, auth) in routes.items():
                start = time.perf_counter()
                for _ in range(calls):
                    await call(path, auth)
                costs.setdefault(name, []).append((time.perf_counter() - start) / calls)
        return {name: statistics.median(values) for name, values in costs.items()}

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0, help="per scenario per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="client connections")
    parser.add_argument("--tokens", type=int, default=12000, help="distinct tokens minted")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    jwks, tokens = mint(args.tokens)
    scenarios: dict[str, tuple[str, TokenSource | None]] = {
        "no auth": ("/none", None),
        HEADER: ("/none", TokenSource(tokens[:1])),
        NOOP: ("/dependency", None),
        NOOP_HEADER: ("/dependency", TokenSource(tokens[:1])),
        REPEATED: ("/bearer", TokenSource(tokens[:1])),
        "JWTBearer, new token each request": ("/bearer", TokenSource(tokens[1:])),
        "guide: python-jose dependency": ("/guide", TokenSource(tokens[:1])),
    }
    rates: dict[str, list[float]] = {name: [] for name in scenarios}
    cpu: dict[str, list[float]] = {name: [0.0, 0.0] for name in scenarios}  # seconds, requests
    with jwks_server(jwks) as jwks_url:
        in_process = in_process_costs(jwks_url, jwks, tokens[0])
    with jwks_server(jwks) as jwks_url, served_app(jwks_url, jwks) as (port, pid):
        for path, source in scenarios.values():  # warm up every route (and the JWKS fetch)
            run_load(port, path, source, 0.5, args.threads)
        for _ in range(args.rounds):
            for name, (path, source) in scenarios.items():
                before = cpu_seconds(pid)
                done, elapsed = run_load(port, path, source, args.seconds, args.threads)
                cpu[name][0] += cpu_seconds(pid) - before
                cpu[name][1] += done
                rates[name].append(done / elapsed)
    # Wall-clock req/s moves with whatever else runs on a shared machine; the server
    # process's own CPU time per request does not (much): capacity = 1 / CPU per request.
    base_rounds = rates["no auth"]
    base = statistics.median(base_rounds)
    base_cpu = cpu["no auth"][0] / cpu["no auth"][1]
    print(
        f"uvicorn (1 worker) + FastAPI on 127.0.0.1, RS256, {args.threads} keep-alive "
        f"connections (pipelined), {args.rounds} rounds x {args.seconds:g}s per scenario"
    )
    print(
        f"{'scenario':42} {'req/s':>7} {'vs no auth':>11} {'server CPU/req':>15} "
        f"{'capacity vs no auth':>20}"
    )
    capacity: dict[str, float] = {}
    for name, values in rates.items():
        rate = statistics.median(values)
        per_request = cpu[name][0] / cpu[name][1]
        capacity[name] = base_cpu / per_request
        print(
            f"{name:42} {rate:7,.0f} {rate / base:11.1%} {per_request * 1e6:12.0f} us "
            f"{capacity[name]:20.1%}"
        )
    print(
        "JWTBearer with a repeated token costs "
        f"{1 - capacity[REPEATED]:.1%} of the no-auth capacity "
        f"(server CPU per request; goal: <= 5%); a no-op dependency of the same shape "
        f"costs {1 - capacity[NOOP]:.1%}"
    )
    # Like for like: each against the no-auth route receiving the same bytes (the header).
    bearer_cost = 1 - capacity[REPEATED] / capacity[HEADER]
    noop_cost = 1 - capacity[NOOP_HEADER] / capacity[HEADER]
    print(
        f"same request bytes (the token header sent to every route): JWTBearer costs "
        f"{bearer_cost:.1%}, the no-op dependency {noop_cost:.1%}: "
        f"{bearer_cost / noop_cost:.2f}x (target: within ~2x)"
    )
    base_app = in_process["no auth"]
    print("\nthe same app called in process (ASGI, no server): what the app itself spends")
    for name, cost in in_process.items():
        print(f"{name:42} {cost * 1e6:7.1f} us  {cost / base_app - 1:+7.1%} vs no auth")
    over = in_process[REPEATED] - in_process[NOOP_HEADER]
    print(f"JWTBearer over the no-op dependency, same request: {over * 1e6:+.1f} us")


if __name__ == "__main__":
    main()
