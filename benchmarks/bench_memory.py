"""Memory: what the caches hold, next to the peers' equivalents, in one run (a few seconds).

    python benchmarks/bench_memory.py

Measured with tracemalloc (Python allocations retained after a full collection):
(a) the receiving side's verified-token cache filled to its default size (4,096 tokens): bytes per
    cached token, against PyJWT's PyJWKClient key cache for the same key set;
(b) the calling side: one warm client holding a cached token, against authlib and httpx-auth
    clients holding theirs (each without its HTTP connection pool: same in-process transport).
Targets: <= 4 KiB per verified-token cache entry (16 MiB for a full default cache); a warm token
client within 2x of the lightest peer.
"""

from __future__ import annotations

import gc
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from m2m_client import ClientCredentials, TokenClient
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


if __name__ == "__main__":
    verifier_cache()
    warm_clients()
