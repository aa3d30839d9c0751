"""The local stand-ins the worker examples use when no M2M_* settings are given.

`local_setup()` starts a LocalIssuer (m2m_client.testing: a development authorization server,
never for production) and a small API on 127.0.0.1 that accepts only tokens our TokenVerifier
passes, and yields the worker's credentials and the API's URL.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from m2m_client import ClientCredentials
from m2m_client.errors import VerificationError
from m2m_client.testing import LocalIssuer
from m2m_client.verify import TokenVerifier

AUDIENCE = "https://api.example.com"


class _Server(ThreadingHTTPServer):
    # The stdlib default backlog of 5 loses handshakes when a fleet's calls arrive at once.
    request_queue_size = 1024
    daemon_threads = True


@contextlib.contextmanager
def local_setup() -> Iterator[tuple[ClientCredentials, str]]:
    """A LocalIssuer plus a protected API that verifies the tokens it is sent."""
    issuer = LocalIssuer()
    issuer.add_client("demo-worker", "demo-secret", audience=AUDIENCE, scope="read:data")
    with issuer:
        verifier = TokenVerifier(issuer=issuer.url, audience=AUDIENCE)

        class Api(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                try:
                    claims = verifier.verify(token if scheme.lower() == "bearer" else "")
                    status, body = 200, {"data": [1, 2, 3], "caller": claims.subject}
                except VerificationError as exc:
                    status, body = 401, {"error": type(exc).__name__}
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        api = _Server(("127.0.0.1", 0), Api)
        threading.Thread(target=api.serve_forever, daemon=True).start()
        try:
            creds = ClientCredentials(
                issuer=issuer.url,  # token endpoint found by discovery
                client_id="demo-worker",
                client_secret="demo-secret",
                audience=AUDIENCE,
                scope="read:data",
            )
            yield creds, f"http://127.0.0.1:{api.server_address[1]}/data"
        finally:
            api.shutdown()
            api.server_close()
