"""The served app's cost per request in CPU instructions (valgrind), not seconds.

bench_served.py's server CPU time moves by several percent between runs on 2 shared, noisy
cores, which drowns differences of a few percent (a FastAPI dependency, a header). Here the
same app (bench_served.build_app, uvicorn + h11, one worker) runs under valgrind's cachegrind,
which counts the instructions the server executes; the count barely depends on other load.
Each scenario is served twice, with N1 and N2 pipelined requests over one keep-alive
connection, and (I(N2) - I(N1)) / (N2 - N1) is the cost of one request (start-up cancels out).

    apt-get install valgrind; .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/bench_served_instructions.py     # ~5 minutes

Instructions are not time (an RSA verify runs more instructions per nanosecond than the
interpreter), but for code paths that are all interpreter work, as here, they track it.
"""

# No `from __future__ import annotations`: see bench_served.py.

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

from bench_served import free_port, mint
from bench_verify import jwks_server

NOOP = "a no-op dependency of JWTBearer's shape"
REPEATED = "JWTBearer, same token repeated"
SCENARIOS = {
    "no auth": ("/none", False),
    "no auth, the token header sent anyway": ("/none", True),
    NOOP: ("/dependency", False),
    "the no-op dependency, the token header sent": ("/dependency", True),
    REPEATED: ("/bearer", True),
}


def serve(port: int) -> None:
    """The served app; exits cleanly (so valgrind reports) when stdin closes."""
    import uvicorn
    from bench_served import build_app

    app = build_app(os.environ["BENCH_JWKS_URL"], json.loads(os.environ["BENCH_JWKS"]))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)

    def stop_when_stdin_closes() -> None:
        sys.stdin.read()  # blocks, no polling: no instructions that depend on wall time
        server.should_exit = True

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    config.access_log = False
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    server.run()


def _send(sock: socket.socket, path: str, token: str | None, total: int, size: int = 32) -> None:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    left = total
    while left:
        count = min(size, left)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode() * count)
        data = b""
        while data.count(b"HTTP/1.1 ") < count or not data.endswith(b"}"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise RuntimeError(f"{path}: connection closed")
            data += chunk
        if data.count(b"HTTP/1.1 200 ") != count:
            raise RuntimeError(f"{path}: not every answer was 200: {data[:200]!r}")
        left -= count


def instructions(env: dict[str, str], path: str, token: str | None, requests: int) -> int:
    """Instructions the server executed from start to exit, serving ``requests`` (+ 64 warm-up)."""
    port = free_port()
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    child = subprocess.Popen(
        [*command, sys.executable, __file__, "--serve", str(port)],
        env=env,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=120)
                break
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise RuntimeError("the app did not start under valgrind") from None
                time.sleep(0.3)
        with sock:
            _send(sock, path, token, 64 + requests)
        err = child.communicate(input="", timeout=300)[1]  # stdin closed: the server stops
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    found = re.search(r"I\s+refs:\s+([0-9,]+)", err)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind: {err[-500:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--small", type=int, default=320, help="requests in the short run")
    parser.add_argument("--large", type=int, default=1600, help="requests in the long run")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    jwks, tokens = mint(1)
    per_request: dict[str, float] = {}
    with jwks_server(jwks) as jwks_url:
        env = dict(
            os.environ, BENCH_JWKS_URL=jwks_url, BENCH_JWKS=json.dumps(jwks), PYTHONHASHSEED="0"
        )
        for name, (path, header) in SCENARIOS.items():
            token = tokens[0] if header else None
            small = instructions(env, path, token, args.small)
            large = instructions(env, path, token, args.large)
            per_request[name] = (large - small) / (args.large - args.small)
    base = per_request["no auth"]
    header = per_request["no auth, the token header sent anyway"]
    print("uvicorn (1 worker) + FastAPI + h11 under valgrind: server instructions per request")
    print(f"{'scenario':45} {'instructions':>12} {'vs no auth':>11} {'vs same bytes':>14}")
    for name, count in per_request.items():
        same = header if SCENARIOS[name][1] else base
        print(f"{name:45} {count:12,.0f} {count / base - 1:+11.1%} {count / same - 1:+14.1%}")
    bearer = per_request[REPEATED] / header - 1
    bearer_alone, noop_alone = per_request[REPEATED] / base - 1, per_request[NOOP] / base - 1
    noop = per_request["the no-op dependency, the token header sent"] / header - 1
    print(
        f"same request bytes: JWTBearer costs {bearer:.1%}, a no-op dependency {noop:.1%} "
        f"({bearer / noop:.2f}x); against a no-auth request without the header, JWTBearer "
        f"costs {bearer_alone:.1%} and the no-op dependency (no header) {noop_alone:.1%} "
        f"({bearer_alone / noop_alone:.2f}x)"
    )


if __name__ == "__main__":
    main()
