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

Issue 23 adds: a minimal Starlette app under uvicorn with and without
``m2m_client.asgi.JWTMiddleware`` (same token repeated), and Flask and Django apps with and
without their integration. The WSGI apps are called in-process (no server: wsgiref serves
one request per connection, which would drown the app in socket set-up), N1 and N2 times
with the same environ, so their figures are the framework's cost per request, without any
server's. ``--only fastapi|starlette|wsgi`` runs one group.
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
from typing import Any

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
# Starlette, served by uvicorn: (app, header sent).
STARLETTE = {
    "Starlette, no auth": ("plain", False),
    "Starlette, no auth, the token header sent": ("plain", True),
    "Starlette + JWTMiddleware, same token repeated": ("middleware", True),
}
# WSGI apps called in-process: (framework, protected).
WSGI = {
    "Flask, no auth, the token header sent": ("flask", False),
    "Flask + JWTAuth.require(), same token": ("flask", True),
    "Django, no auth, the token header sent": ("django", False),
    "Django + JWTMiddleware, same token": ("django", True),
}


def build_starlette(jwks_url: str, protected: bool) -> Any:
    from bench_served import AUDIENCE, ISSUER
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from m2m_client.asgi import JWTMiddleware
    from m2m_client.verify import AsyncTokenVerifier

    async def endpoint(request: Request) -> JSONResponse:
        claims = getattr(request.state, "claims", None)
        return JSONResponse({"sub": claims.subject if claims else "anonymous"})

    app: Any = Starlette(routes=[Route("/none", endpoint)])
    if protected:
        verifier = AsyncTokenVerifier(
            issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks_url, timeout=120
        )
        app = JWTMiddleware(app, verifier=verifier)
    return app


def build_wsgi(framework: str, protected: bool, jwks_url: str) -> Any:
    from bench_served import AUDIENCE, ISSUER

    from m2m_client.verify import TokenVerifier

    # valgrind runs ~50x slower: the first JWKS fetch needs more than the default 5 s.
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks_url, timeout=120)
    if framework == "flask":
        from flask import Flask, g

        from m2m_client.flask import JWTAuth

        app = Flask("bench")
        auth = JWTAuth(app, verifier=verifier)

        def endpoint() -> Any:
            claims = g.get("claims")
            return {"sub": claims.subject if claims else "anonymous"}

        app.add_url_rule("/none", "none", auth.require()(endpoint) if protected else endpoint)
        return app
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["127.0.0.1"],
        MIDDLEWARE=["m2m_client.django.JWTMiddleware"] if protected else [],
        M2M_VERIFIER=verifier,
    )
    django.setup()
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def _django_view(request: Any) -> Any:
    from django.http import JsonResponse

    claims = getattr(request, "claims", None)
    return JsonResponse({"sub": claims.subject if claims else "anonymous"})


def __getattr__(name: str) -> Any:
    # ROOT_URLCONF=__name__: Django reads urlpatterns from this module, lazily.
    if name == "urlpatterns":
        from django.urls import path

        return [path("none", _django_view)]
    raise AttributeError(name)


def call_wsgi(framework: str, protected: bool, count: int) -> None:
    """Build the app, then call it ``count`` times (run under valgrind by wsgi_instructions)."""
    app = build_wsgi(framework, protected, os.environ["BENCH_JWKS_URL"])
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/none",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_AUTHORIZATION": f"Bearer {os.environ['BENCH_TOKEN']}",
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.errors": sys.stderr,
    }
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    import io

    for _ in range(64 + count):
        env = dict(environ, **{"wsgi.input": io.BytesIO(b"")})
        body = b"".join(app(env, start_response))
        if not statuses[-1].startswith("200") or (b"c0@clients" not in body and protected):
            raise RuntimeError(f"{framework}: {statuses[-1]} {body[:200]!r}")


def wsgi_instructions(env: dict[str, str], framework: str, protected: bool, count: int) -> int:
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    args = ["--wsgi", framework, "--count", str(count)] + (["--protected"] if protected else [])
    done = subprocess.run(
        [*command, sys.executable, __file__, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    found = re.search(r"I\s+refs:\s+([0-9,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{framework}: {done.stderr[-800:]}")
    return int(found.group(1).replace(",", ""))


def serve(port: int, kind: str = "fastapi") -> None:
    """The served app; exits cleanly (so valgrind reports) when stdin closes."""
    import uvicorn
    from bench_served import build_app

    jwks_url = os.environ["BENCH_JWKS_URL"]
    if kind == "fastapi":
        app = build_app(jwks_url, json.loads(os.environ["BENCH_JWKS"]))
    else:
        app = build_starlette(jwks_url, protected=kind == "middleware")
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


def instructions(
    env: dict[str, str], path: str, token: str | None, requests: int, kind: str = "fastapi"
) -> int:
    """Instructions the server executed from start to exit, serving ``requests`` (+ 64 warm-up)."""
    port = free_port()
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    child = subprocess.Popen(
        [*command, sys.executable, __file__, "--serve", str(port), "--app", kind],
        env=env,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600  # valgrind start-up on 2 busy cores
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
    parser.add_argument("--app", default="fastapi", help=argparse.SUPPRESS)
    parser.add_argument("--wsgi", help=argparse.SUPPRESS)
    parser.add_argument("--protected", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--small", type=int, default=320, help="requests in the short run")
    parser.add_argument("--large", type=int, default=1600, help="requests in the long run")
    parser.add_argument("--only", choices=["fastapi", "starlette", "wsgi"], help="one group")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.app)
        return
    if args.wsgi:
        call_wsgi(args.wsgi, args.protected, args.count)
        return
    jwks, tokens = mint(1)
    with jwks_server(jwks) as jwks_url:
        env = dict(
            os.environ,
            BENCH_JWKS_URL=jwks_url,
            BENCH_JWKS=json.dumps(jwks),
            BENCH_TOKEN=tokens[0],
            PYTHONHASHSEED="0",
        )
        if args.only in (None, "fastapi"):
            report_fastapi(env, tokens[0], args.small, args.large)
        if args.only in (None, "starlette"):
            report_starlette(env, tokens[0], args.small, args.large)
        if args.only in (None, "wsgi"):
            report_wsgi(env, args.small, args.large)


def report_fastapi(env: dict[str, str], token: str, small_n: int, large_n: int) -> None:
    per_request: dict[str, float] = {}
    for name, (path, header) in SCENARIOS.items():
        sent = token if header else None
        small = instructions(env, path, sent, small_n)
        large = instructions(env, path, sent, large_n)
        per_request[name] = (large - small) / (large_n - small_n)
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
        f"({bearer_alone / noop_alone:.2f}x); JWTBearer per request / no-op dependency per "
        f"request (same bytes): "
        f"{per_request[REPEATED] / per_request['the no-op dependency, the token header sent']:.3f}x"
    )


def report_starlette(env: dict[str, str], token: str, small_n: int, large_n: int) -> None:
    per_request: dict[str, float] = {}
    for name, (kind, header) in STARLETTE.items():
        sent = token if header else None
        small = instructions(env, "/none", sent, small_n, kind)
        large = instructions(env, "/none", sent, large_n, kind)
        per_request[name] = (large - small) / (large_n - small_n)
    header = per_request["Starlette, no auth, the token header sent"]
    print("uvicorn (1 worker) + Starlette + h11 under valgrind: server instructions per request")
    for name, count in per_request.items():
        print(f"{name:50} {count:12,.0f} {count / header - 1:+8.1%} vs no auth, same bytes")


def report_wsgi(env: dict[str, str], small_n: int, large_n: int) -> None:
    per_request: dict[str, float] = {}
    for name, (framework, protected) in WSGI.items():
        small = wsgi_instructions(env, framework, protected, small_n)
        large = wsgi_instructions(env, framework, protected, large_n)
        per_request[name] = (large - small) / (large_n - small_n)
    print("WSGI apps called in-process (no server) under valgrind: instructions per request")
    for name, count in per_request.items():
        framework = WSGI[name][0]
        base = per_request[f"{framework.capitalize()}, no auth, the token header sent"]
        print(f"{name:50} {count:12,.0f} {count / base - 1:+8.1%} vs no auth, same bytes")


if __name__ == "__main__":
    main()
