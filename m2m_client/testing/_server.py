"""Where LocalIssuer is served: its URLs, and the I/O shells around its one request handler
(a stdlib HTTP server on 127.0.0.1 and an in-process httpx/httpx2 transport). The shells decide
nothing; they only move bytes.
"""

from __future__ import annotations

import errno
import http.server
import logging
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import anyio.to_thread

from m2m_client._stacks import EitherTransport, either_transport
from m2m_client.errors import ConfigurationError
from m2m_client.testing._responses import IssuerResponse

logger = logging.getLogger("m2m_client.testing")

Handler = Callable[[str, str, Mapping[str, str], bytes], IssuerResponse]

# Beyond the body limit, drain up to this much so the client reads our 413 instead of a reset.
_DRAIN_LIMIT = 1024 * 1024


class _Server(http.server.ThreadingHTTPServer):
    # The stdlib's listen backlog is 5: a burst of connections (a worker pool warming up, a
    # fleet of processes) overflows it, the kernel drops the handshakes, and callers wait
    # out SYN retransmits until they time out. The kernel caps this at net.core.somaxconn.
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up before reading its answer is the client's business; anything
        # else is a bug in a handler and keeps the stdlib's report on stderr.
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.debug("client %s went away before its answer", client_address)
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 that feeds every request to ``handle``."""

    def __init__(self, handle: Handler, max_body_bytes: Callable[[], int]) -> None:
        self._handle = handle
        self._max_body_bytes = max_body_bytes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port while running, else None."""
        return None if self._server is None else int(self._server.server_address[1])

    def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:``port`` (0: a free port) in a daemon thread; return the port.

        A port that cannot be bound raises ConfigurationError: never silently another one.
        """
        if self._server is not None:
            raise ConfigurationError("LocalIssuer is already running")
        try:
            server = _Server(("127.0.0.1", port), self._request_class())
        except OSError as exc:
            busy = exc.errno == errno.EADDRINUSE
            reason = "the port is already in use" if busy else (exc.strerror or type(exc).__name__)
            raise ConfigurationError(
                f"LocalIssuer cannot listen on 127.0.0.1:{port}: {reason}"
            ) from None
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.name = f"LocalIssuer-{server.server_address[1]}"
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop serving and release the port (no-op when not running)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def _request_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        handle, max_body_bytes = self._handle, self._max_body_bytes

        class RequestHandler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "LocalIssuer"
            timeout = 10  # an idle or slow client cannot hold a handler thread for ever

            def _serve(self) -> None:
                limit = max_body_bytes()
                length_header = self.headers.get("Content-Length", "0")
                length = int(length_header) if length_header.isdigit() else 0
                # Read at most one byte past the limit: enough for the handler to refuse it,
                # and a client announcing gigabytes cannot make us buffer them.
                body = self.rfile.read(min(length, limit + 1)) if length else b""
                if limit < length <= _DRAIN_LIMIT:
                    self.rfile.read(length - len(body))
                response = handle(self.command, self.path, _joined(self.headers.items()), body)
                self.close_connection = True
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(response.body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                # Never the stdlib's stderr access log: request lines are all we would log
                # anyway (no bodies, so no secrets).
                logger.debug("%s %s", self.command, urllib.parse.urlsplit(self.path).path)

        return RequestHandler


def _joined(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header fields by lower-cased name, repeated ones joined with ", " (RFC 9110 §5.3).

    As httpx's ``Headers`` does for the in-process transport, so both shells hand the
    handler the same thing; ``dict(message)`` would keep only the first of two ``DPoP``
    headers, and the token endpoint could not refuse them (RFC 9449 §4.3 step 1).
    """
    joined: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    return joined


def mock_transport(handle: Handler) -> EitherTransport:
    """A transport answering every request in process through ``handle``, for sync and
    async clients of httpx and httpx2 alike (each gets responses of its own stack)."""

    def respond(request: Any) -> tuple[int, Any, bytes]:
        target = request.url.raw_path.decode("ascii")
        response = handle(request.method, target, request.headers, request.content)
        return response.status, response.headers, response.body

    return either_transport(respond)


_S = TypeVar("_S", bound="IssuerServing")


class IssuerServing:
    """LocalIssuer's methods that serve it: over HTTP on 127.0.0.1, or in process."""

    _server: LoopbackServer
    _fixed_url: str | None

    def handle_request(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> IssuerResponse:
        raise NotImplementedError

    def _url_or_none(self) -> str | None:
        if self._fixed_url is not None:
            return self._fixed_url
        port = self._server.port
        return None if port is None else f"http://127.0.0.1:{port}/"

    @property
    def url(self) -> str:
        """The issuer identifier (``iss`` of its tokens), with a trailing slash."""
        url = self._url_or_none()
        if url is None:
            raise ConfigurationError(
                "LocalIssuer is not running: start it with `with issuer:` / `async with issuer:`, "
                "or pass url=... to use it in-process through issuer.transport()"
            )
        return url

    @property
    def token_url(self) -> str:
        """The token endpoint (``<url>oauth/token``, Auth0's path)."""
        return self.url + "oauth/token"

    @property
    def jwks_url(self) -> str:
        """The JWKS document (``<url>.well-known/jwks.json``)."""
        return self.url + ".well-known/jwks.json"

    @property
    def discovery_url(self) -> str:
        """The OpenID Connect discovery document (``<url>.well-known/openid-configuration``)."""
        return self.url + ".well-known/openid-configuration"

    def transport(self) -> EitherTransport:
        """A transport serving the issuer in-process, for sync and async clients of httpx and
        httpx2 (``httpx2.Client(transport=issuer.transport())``).

        Every host is answered; set ``url=`` on the issuer to the base URL the clients use.
        """
        return mock_transport(self.handle_request)

    @property
    def running(self) -> bool:
        """Whether the HTTP server is running."""
        return self._server.port is not None

    def start(self) -> None:
        """Start the HTTP server on 127.0.0.1 (``url=``'s port, else a free one), in a thread."""
        self._server.start(_loopback_port(self._fixed_url))

    def stop(self) -> None:
        """Stop the HTTP server and release its port (no-op when not running)."""
        self._server.stop()

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self: _S) -> _S:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)


def _loopback_port(url: str | None) -> int:
    if url is None:
        return 0
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or not port:
        raise ConfigurationError(
            f"LocalIssuer serves plain HTTP on 127.0.0.1 only; url={url!r} cannot be served. "
            "Use url='http://127.0.0.1:PORT/', no url (a free port), or issuer.transport()"
        )
    return port
