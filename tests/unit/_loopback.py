"""A real HTTP server on 127.0.0.1 playing token endpoint and protected API at once, for the
BearerAuth tests that need real connections (concurrent 401s, redirects between origins)."""

from __future__ import annotations

import importlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType
from typing import Any

from m2m_client import ClientCredentials
from tests._stack_guard import need

# (method, path, headers, body) -> (status, headers, body)
Route = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # a burst of 50 connections must not overflow the backlog
    daemon_threads = True


class Loopback:
    """``/token`` issues ``tok-1``, ``tok-2`` ... (after ``token_delay`` s from the
    ``delay_from``-th on);
    every other path goes to ``route``. ``seen`` records (path, Authorization, DPoP)."""

    def __init__(
        self, route: Route | None = None, *, token_delay: float = 0.0, delay_from: int = 2
    ) -> None:
        self.route = route
        self.token_delay, self.delay_from = token_delay, delay_from
        self.token_requests = 0
        self.seen: list[tuple[str, str | None, str | None]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, extra, payload = owner._answer(self.command, self.path, headers, body)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _handle

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def credentials(self, **extra: Any) -> ClientCredentials:
        return ClientCredentials(
            token_url=f"{self.url}/token", client_id="worker", client_secret="s3cret-7f2a", **extra
        )

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if path == "/token":
            with self.lock:
                self.token_requests += 1
                number = self.token_requests
            if number >= self.delay_from:
                time.sleep(self.token_delay)
            token_type = "DPoP" if "dpop" in headers else "Bearer"
            answer = {"access_token": f"tok-{number}", "token_type": token_type, "expires_in": 3600}
            return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()
        with self.lock:
            self.seen.append((path, headers.get("authorization"), headers.get("dpop")))
        assert self.route is not None
        return self.route(method, path, headers, body)

    def __enter__(self) -> Loopback:
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def stack(name: str) -> ModuleType:
    """The HTTP stack module ``name`` (httpx or httpx2); skips when this run hides it."""
    need(name)
    return importlib.import_module(name)


@contextmanager
def serving(route: Route | None = None, **options: Any) -> Iterator[Loopback]:
    with Loopback(route, **options) as server:
        yield server
