"""Shared fakes for the calling-side tests: a clock, and a scripted token endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx

from m2m_client import ClientCredentials, RetryPolicy

TOKEN_URL = "https://as.example.com/oauth/token"
ISSUER = "https://as.example.com/"
SECRET = "s3cret-Value-7f2a"
NOW = 1_700_000_000.0
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=1, jitter=False)


def credentials(**overrides: Any) -> ClientCredentials:
    kwargs: dict[str, Any] = {
        "token_url": TOKEN_URL,
        "client_id": "worker",
        "client_secret": SECRET,
        "audience": "https://api.example.com",
        "scope": "read:data",
    }
    kwargs.update(overrides)
    return ClientCredentials(**kwargs)


class FakeClock:
    """Time that only moves when told; ``sleep`` advances it (so retries take no time)."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


Reply = httpx.Response | BaseException | Callable[[httpx.Request], httpx.Response]


class TokenEndpoint:
    """A scripted authorization server for httpx.MockTransport.

    Replies are taken from ``script`` in order; when it is empty, a fresh Bearer token
    ``tok-N`` with ``expires_in`` is returned. ``requests`` records every token request.
    """

    def __init__(self, expires_in: int | None = 3600) -> None:
        self.expires_in = expires_in
        self.script: list[Reply] = []
        self.requests: list[httpx.Request] = []
        self.metadata: dict[str, httpx.Response] = {}
        self.metadata_requests: list[str] = []
        self.gate: threading.Event | None = None  # sync: block token replies until set
        self.async_gate: Any = None  # anyio.Event: same for async

    def issue(self) -> httpx.Response:
        body: dict[str, Any] = {"access_token": f"tok-{len(self.requests)}", "token_type": "Bearer"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return httpx.Response(200, json=body)

    def form(self, index: int = -1) -> dict[str, str]:
        content = self.requests[index].content.decode()
        return {k: v[0] for k, v in parse_qs(content).items()}

    def _reply(self, request: httpx.Request) -> httpx.Response:
        return streamed(self._scripted(request))

    def _scripted(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            self.metadata_requests.append(str(request.url))
            return self.metadata.get(str(request.url), httpx.Response(404))
        self.requests.append(request)
        if not self.script:
            return self.issue()
        reply = self.script.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, httpx.Response):
            return reply
        return reply(request)

    def sync_handler(self, request: httpx.Request) -> httpx.Response:
        if self.gate is not None and request.method == "POST":
            self.gate.wait(10)
        return self._reply(request)

    async def async_handler(self, request: httpx.Request) -> httpx.Response:
        if self.async_gate is not None and request.method == "POST":
            await self.async_gate.wait()
        return self._reply(request)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.sync_handler))

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.async_handler))

    def publish_metadata(self, url: str, issuer: str = ISSUER, **extra: Any) -> None:
        body = {"issuer": issuer, "token_endpoint": TOKEN_URL, **extra}
        self.metadata[url] = httpx.Response(200, content=json.dumps(body).encode())


def streamed(response: httpx.Response) -> httpx.Response:
    """``response`` with an unread body, as a server's would be (the drivers stream raw bytes)."""
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(response.content),
    )


def oauth_error(status: int, error: str, description: str = "") -> httpx.Response:
    return httpx.Response(status, json={"error": error, "error_description": description})


class _Handler(BaseHTTPRequestHandler):
    issued = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length).decode()
        if "grant_type=client_credentials" not in body or not self.headers.get("Authorization"):
            self._send(400, {"error": "invalid_request"})
            return
        type(self).issued += 1
        self._send(
            200, {"access_token": f"real-{self.issued}", "token_type": "Bearer", "expires_in": 60}
        )

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def loopback_token_endpoint() -> Iterator[str]:
    """A real token endpoint on 127.0.0.1 (threads): Basic auth in, ``real-N`` tokens out."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/oauth/token"
    finally:
        server.shutdown()
        server.server_close()
