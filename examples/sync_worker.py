"""A threaded worker calling a protected API with client-credentials tokens.

Run it with no arguments: unless M2M_TOKEN_URL / M2M_ISSUER (or AUTH0_DOMAIN) is set, it starts
a local authorization server (m2m_client.testing.LocalIssuer) and a small protected API on
127.0.0.1, so the whole flow runs on a fresh machine. With your own settings::

    M2M_TOKEN_URL=https://tenant.example.com/oauth/token M2M_CLIENT_ID=... \
    M2M_CLIENT_SECRET=... M2M_AUDIENCE=https://api.example.com \
    M2M_API_URL=https://api.example.com/data python examples/sync_worker.py
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt

from m2m_client import BearerAuth, ClientCredentials, TokenClient, TokenEvent

AUDIENCE = "https://api.example.com"


@contextlib.contextmanager
def local_setup() -> Iterator[tuple[ClientCredentials, str]]:
    """A LocalIssuer plus a stand-in protected API that checks the tokens it issues."""
    from m2m_client.testing import LocalIssuer

    issuer = LocalIssuer()
    issuer.add_client("demo-worker", "demo-secret", audience=AUDIENCE, scope="read:data")
    with issuer:
        public_key = issuer.private_key.public_key()

        class Api(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                try:
                    claims = jwt.decode(
                        token,
                        public_key,
                        algorithms=["RS256"],
                        audience=AUDIENCE,
                        issuer=issuer.url,
                    )
                    status, body = 200, {"data": [1, 2, 3], "caller": claims["sub"]}
                except jwt.PyJWTError as exc:
                    status, body = 401, {"error": type(exc).__name__}
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        api = ThreadingHTTPServer(("127.0.0.1", 0), Api)
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


def report(event: TokenEvent) -> None:
    print(f"  [event] {event.kind}" + (f" ({event.error})" if event.error else ""))


def work(creds: ClientCredentials, api_url: str | None) -> None:
    with TokenClient(creds, on_event=report) as tokens:
        token = tokens.get_token()
        print(f"got a token: {token!r}")
        if api_url is None:
            print("set M2M_API_URL to call your API with it")
            return
        with httpx.Client(auth=BearerAuth(tokens), timeout=10) as http:
            with ThreadPoolExecutor(max_workers=8) as pool:  # 20 calls on 8 threads, one token
                results = list(pool.map(lambda _: http.get(api_url).status_code, range(20)))
            print(f"20 API calls from 8 threads -> statuses {sorted(set(results))}")
            print(f"token requests made: {tokens.stats.token_requests}")
            if set(results) != {200}:
                raise SystemExit(1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    api_url = os.environ.get("M2M_API_URL")
    if any(os.environ.get(v) for v in ("M2M_TOKEN_URL", "M2M_ISSUER", "AUTH0_DOMAIN")):
        print("using the authorization server from the environment")
        work(ClientCredentials.from_env(), api_url)
        return
    print("no M2M_* settings: starting a local authorization server and API on 127.0.0.1")
    with local_setup() as (creds, local_api):
        print(f"issuer {creds.issuer}, API {local_api}")
        work(creds, local_api)
    print("done")


if __name__ == "__main__":
    main()
