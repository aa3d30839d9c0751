"""Memory: what the caches hold, next to the peers' equivalents, in one run (a few seconds).

    python benchmarks/bench_memory.py

Measured with tracemalloc (Python allocations retained after a full collection):
(a) the receiving side's verified-token cache filled to its default size (4,096 tokens): bytes per
    cached token, against PyJWT's PyJWKClient key cache for the same key set;
(b) the calling side: one warm client holding a cached token, against authlib and httpx-auth
    clients holding theirs (each without its HTTP connection pool: same in-process transport).
(c) the calling side's caches under 100,000 distinct keys: 100,000 audiences each fetched once,
    then 100,000 audiences the server refuses (the token request goes through the whole client;
    only the socket is replaced by an in-process answer, which holds no per-key state).
Targets: <= 4 KiB per verified-token cache entry (16 MiB for a full default cache); a warm token
client within 2x of the lightest peer; (c) bounded: at most 10,000 entries per table whatever
the number of keys (before issue 8: 10,000 refused keys held 159 MiB, unbounded).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from m2m_client import ClientCredentials, TokenClient, TokenError
from m2m_client._client._decisions import MAX_KEYS
from m2m_client._http import HttpAnswer
from m2m_client.testing import LocalIssuer
from m2m_client.verify import TokenVerifier

warnings.filterwarnings("ignore")
import httpx_auth  # noqa: E402
from authlib.integrations.httpx_client import OAuth2Client  # noqa: E402

AUDIENCE = "https://api.example.com"
CACHE_SIZE = 4096


def retained(build: Callable[[], Any]) -> tuple[Any, int]:
    """Bytes still allocated by ``build()`` once it returns (the result is kept alive)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    result = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return result, after - before


def verifier_cache() -> None:
    issuer = LocalIssuer(url="http://127.0.0.1/")  # served in process, no socket
    transport = issuer.transport()
    tokens = [
        issuer.mint(sub=f"svc-{i}@clients", audience=AUDIENCE, scope="read:data write:data")
        for i in range(CACHE_SIZE)
    ]
    verifier = TokenVerifier(
        issuer=issuer.url,
        audience=AUDIENCE,
        roles_claim=issuer.roles_claim_for(AUDIENCE),
        http_client=httpx.Client(transport=transport),
    )
    verifier.verify(tokens[0])  # key set loaded before measuring
    verifier.clear_cache()

    def fill() -> int:
        for token in tokens:
            verifier.verify(token)
        return len(tokens)

    _, used = retained(fill)
    per_token = used / CACHE_SIZE
    token_len = sum(map(len, tokens)) / len(tokens)
    print(f"(a) verified-token cache, {CACHE_SIZE} tokens of ~{token_len:.0f} chars")
    print(f"    m2m_client: {used / 2**20:6.2f} MiB in all, {per_token / 1024:5.2f} KiB per token")
    print("        (each entry holds the token string, the frozen claims and their views)")
    jwks = issuer.jwks()

    def pyjwk_client() -> Any:
        client = jwt.PyJWKClient("http://127.0.0.1/jwks.json", cache_jwk_set=True)
        client.fetch_data = lambda: jwks  # type: ignore[method-assign]
        client.get_signing_key_from_jwt(tokens[0])
        return client

    _, pyjwk = retained(pyjwk_client)
    print(f"    PyJWKClient caches keys only (no verified tokens): {pyjwk / 1024:.1f} KiB")
    verdict = "OK" if per_token <= 4096 else "MISSED"
    print(f"    target <= 4 KiB per cached token: {per_token / 1024:.2f} KiB {verdict}")


def warm_clients() -> None:
    def api(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            body = {"access_token": "a" * 800, "token_type": "Bearer", "expires_in": 3600}
            return httpx.Response(200, json=body)
        return httpx.Response(200)

    transport = httpx.MockTransport(api)
    url = "https://as.example.com/oauth/token"

    def ours() -> Any:
        creds = ClientCredentials(token_url=url, client_id="bench", client_secret="secret")
        client = TokenClient(creds, http_client=httpx.Client(transport=transport))
        client.get_token()
        return client

    def authlib() -> Any:
        client = OAuth2Client(
            "bench",
            "secret",
            token_endpoint=url,
            transport=transport,
            grant_type="client_credentials",
        )
        client.fetch_token(url, grant_type="client_credentials")
        return client

    def httpx_auth_client() -> Any:
        httpx_auth.OAuth2.token_cache.clear()
        auth = httpx_auth.OAuth2ClientCredentials(
            url, "bench", "secret", client=httpx.Client(transport=transport)
        )
        with httpx.Client(transport=transport, auth=auth) as http:
            http.get("https://api.example.com/data")
        return auth

    results = {
        name: retained(fn)[1]
        for name, fn in (
            ("m2m_client", ours),
            ("authlib", authlib),
            ("httpx-auth", httpx_auth_client),
        )
    }
    print("(b) one warm client holding a cached token (incl. its httpx.Client)")
    for name, used in results.items():
        print(f"    {name:<12} {used / 1024:7.1f} KiB")
    lightest = min(v for k, v in results.items() if k != "m2m_client")
    ratio = results["m2m_client"] / lightest
    verdict = "OK" if ratio <= 2 else "MISSED"
    print(f"    target within 2x of the lightest peer: {ratio:.2f}x {verdict}")


class _AnswerInProcess:
    """Stands in for the I/O driver: the same answer for every token request."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, json.dumps(body).encode()

    def send(self, request: Any, *, limit: int, refuse: Any, deadline: Any = None) -> Any:
        return HttpAnswer(self.status, {"content-type": "application/json"}, self.body, request.url)

    def close(self) -> None:
        pass


def distinct_keys(count: int = 100_000) -> None:
    creds = ClientCredentials(
        token_url="https://as.example.com/oauth/token", client_id="bench", client_secret="secret"
    )
    good = {"access_token": "a" * 800, "token_type": "Bearer", "expires_in": 3600}
    refused = {"error": "invalid_target", "error_description": "unknown audience"}
    print(f"(c) {count:,} distinct keys through one TokenClient")
    for label, status, body in (("tokens", 200, good), ("refused", 400, refused)):
        client = TokenClient(creds)
        client._fetcher.driver = _AnswerInProcess(status, body)  # type: ignore[assignment]
        logging.getLogger("m2m_client").setLevel(logging.CRITICAL)

        def fill(client: TokenClient = client) -> None:
            for i in range(count):
                with contextlib.suppress(TokenError):
                    client.get_token(audience=f"https://api-{i}.example.com")

        started = time.perf_counter()
        _, used = retained(fill)
        took = time.perf_counter() - started
        core = client._core
        held = len(core.cache) if label == "tokens" else len(core.failures.negative)  # type: ignore[arg-type]
        print(
            f"    {label:<8} {used / 2**20:6.2f} MiB retained, {held:,} entries kept "
            f"(bound {MAX_KEYS:,}), {took / count * 1e6:.0f} us per key"
        )
        verdict = "OK" if held <= MAX_KEYS else "MISSED"
        print(f"    target <= {MAX_KEYS:,} entries: {verdict}")


if __name__ == "__main__":
    verifier_cache()
    warm_clients()
    distinct_keys()
