"""Instructions per call of the hot paths, under valgrind (~5-10 minutes; needs valgrind).

    .venv/bin/python benchmarks/bench_instructions.py            # all operations
    .venv/bin/python benchmarks/bench_instructions.py --only verify_new,raw_rsa

Time on this project's 2 shared cores moves by 10-50% between runs; instruction counts do
not depend on load, so before/after comparisons of a few percent are read here. Each
operation runs in a child under ``valgrind --tool=cachegrind`` twice, ``--small`` and
``--large`` times after the same set-up and warm-up; the difference divided by the
difference in calls is the count per call (start-up, imports and set-up cancel out).

* ``get_token``: a warm ``TokenClient.get_token()`` (sync, token cached);
* ``plain_request`` / ``bearer_request``: a request through a plain ``httpx.Client`` and
  through one with ``BearerAuth`` and a warm token, over the same in-process transport;
* ``verify_cached``: ``TokenVerifier.verify()`` of the same token again (verified-token cache);
* ``verify_new`` / ``verify_new_async``: RS256 / RSA-2048, a token not verified before
  (the cache is cleared before each pass over a pool of tokens, as in ``bench_verify.py``);
  the async verifier's coroutine is driven by hand (no event loop), as in ``bench_verify.py``;
* ``raw_rsa``: the bare ``public_key.verify`` of the same tokens' signing input (the limit).

Only public names are used, so the same script measures an older checkout too: run it with
that checkout's interpreter (``/path/to/old/.venv/bin/python benchmarks/bench_instructions.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import jwt

OPS = (
    "get_token",
    "plain_request",
    "bearer_request",
    "verify_cached",
    "verify_new",
    "verify_new_async",
    "raw_rsa",
)
POOL = 50  # distinct tokens; counts are multiples of it


def child(op: str, count: int) -> None:
    """Set up, warm up, then run ``op`` ``count`` times (under valgrind)."""
    import httpx

    from m2m_client import BearerAuth, ClientCredentials, TokenClient
    from m2m_client.verify import AsyncTokenVerifier, TokenVerifier

    if op in ("get_token", "plain_request", "bearer_request"):

        def handle(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/oauth/token":
                body = {"access_token": "t1", "token_type": "Bearer", "expires_in": 3600}
                return httpx.Response(200, json=body)
            return httpx.Response(200, content=b"ok")

        transport = httpx.MockTransport(handle)
        creds = ClientCredentials(
            token_url="https://as.example.com/oauth/token", client_id="bench", client_secret="s"
        )
        tokens = TokenClient(creds, http_client=httpx.Client(transport=transport))
        if op == "get_token":
            call: Any = tokens.get_token
        else:
            auth = BearerAuth(tokens) if op == "bearer_request" else None
            client = httpx.Client(transport=transport, auth=auth)

            def call() -> Any:
                return client.get("https://api.example.com/data")

        for _ in range(50):
            call()
        for _ in range(count):
            call()
        return

    setup = json.loads(os.environ["BENCH_SETUP"])
    pool: list[str] = setup["tokens"]
    if op == "raw_rsa":
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        public_key: Any = serialization.load_pem_public_key(setup["public_pem"].encode())
        pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()
        split = []
        for tok in pool:
            signing_input, _, sig = tok.rpartition(".")
            split.append((signing_input.encode(), jwt.utils.base64url_decode(sig)))
        for _ in range(2):
            for sig_input, sig in split:
                public_key.verify(sig, sig_input, pkcs1, sha256)
        for i in range(count):
            sig_input, sig = split[i % POOL]
            public_key.verify(sig, sig_input, pkcs1, sha256)
        return

    options: dict[str, Any] = {
        "issuer": setup["issuer"],
        "audience": setup["audience"],
        "algorithms": ["RS256"],
        "jwks_url": setup["jwks_url"],
        "cache_size": 4 * POOL,
        "timeout": 300.0,  # the one JWKS fetch runs under valgrind
    }
    if op == "verify_new_async":
        import asyncio

        verifier: Any = AsyncTokenVerifier(**options)
        asyncio.run(verifier.verify(pool[0]))  # the JWKS fetch, once

        def verify(tok: str) -> Any:
            coro = verifier.verify(tok)
            try:
                coro.send(None)
            except StopIteration as done:
                return done.value
            raise RuntimeError("the async verifier suspended with the key held")

    else:
        verifier = TokenVerifier(**options)
        verifier.verify(pool[0])  # the JWKS fetch, once
        verify = verifier.verify
    if op == "verify_cached":
        for _ in range(50 + count):
            verify(pool[0])
        return
    for _ in range(2):  # warm-up: two passes of new tokens
        verifier.clear_cache()
        for tok in pool:
            verify(tok)
    for i in range(count):
        if i % POOL == 0:
            verifier.clear_cache()
        verify(pool[i % POOL])


def count_instructions(op: str, count: int, env: dict[str, str]) -> int:
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    done = subprocess.run(
        [*command, sys.executable, __file__, "--op", op, "--count", str(count)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    found = re.search(r"I\s+refs:\s+([0-9,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{op}: {done.stderr[-800:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=OPS, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--only", default=",".join(OPS), help="comma-separated operations")
    parser.add_argument("--small", type=int, default=100, help="calls in the short run")
    parser.add_argument("--large", type=int, default=400, help="calls in the long run")
    args = parser.parse_args()
    if args.op:
        child(args.op, args.count)
        return
    ops = [op for op in args.only.split(",") if op]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"unknown operations: {', '.join(sorted(unknown))}")

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_verify import AUDIENCE, ISSUER, KID, jwks_server, mint

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    jwks = {"keys": [jwk | {"kid": KID, "use": "sig", "alg": "RS256"}]}
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    started = time.perf_counter()
    print(f"instructions per call (valgrind; ({args.large} - {args.small} calls) difference)")
    with jwks_server(jwks) as url:
        setup = {
            "tokens": mint(private_key, "RS256", POOL),
            "public_pem": public_pem.decode(),
            "jwks_url": url,
            "issuer": ISSUER,
            "audience": AUDIENCE,
        }
        env = dict(os.environ, BENCH_SETUP=json.dumps(setup), PYTHONHASHSEED="0")
        per_call: dict[str, float] = {}
        for op in ops:
            small = count_instructions(op, args.small, env)
            large = count_instructions(op, args.large, env)
            per_call[op] = (large - small) / (args.large - args.small)
            print(f"  {op:<18}{per_call[op]:>14,.0f}", flush=True)
    if "verify_new" in per_call and "raw_rsa" in per_call:
        ratio = per_call["raw_rsa"] / per_call["verify_new"]
        print(f"  raw RSA verify / new-token verify: {ratio:.2f}x (issue 23: >= 0.5x)")
    if "verify_new_async" in per_call and "raw_rsa" in per_call:
        ratio = per_call["raw_rsa"] / per_call["verify_new_async"]
        print(f"  raw RSA verify / new-token async verify: {ratio:.2f}x")
    if "bearer_request" in per_call and "plain_request" in per_call:
        extra = per_call["bearer_request"] / per_call["plain_request"] - 1
        print(f"  BearerAuth over a plain request: {extra:+.1%}")
    print(f"finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
