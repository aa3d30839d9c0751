"""Verifications per second on one core: m2m_client's verifier vs PyJWT and the raw signature
check (the physical limit), for RS256, ES256 and EdDSA; for RS256 also PyJWKClient and the
guide's python-jose path. The async verifier's new-token path is measured too (issue 23's
target: a new token at >= 0.5x the raw signature check, sync and async).

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/bench_verify.py            # ~1-2 minutes; medians and ratios
    .venv/bin/python benchmarks/bench_verify.py --stages   # ns per step of a new token

Every candidate checks tokens with the same claims (iss, aud, exp). The verifier fetches its
JWKS once from a loopback HTTP server; nothing else touches the network. Candidates take turns
within each pass (2 shared, noisy cores: a slow spell hits every candidate of that pass), and
ratios are the medians of the per-pass ratios, not ratios of separately taken medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from m2m_client.verify import AsyncTokenVerifier, TokenVerifier

ISSUER = "https://issuer.bench/"
AUDIENCE = "https://api.bench"
KID = "bench-key"


def mint(private_key: Any, alg: str, count: int) -> list[str]:
    now = int(time.time())
    return [
        jwt.encode(
            {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": f"client-{i}@clients",
                "iat": now,
                "exp": now + 3600,
                "scope": "read:data write:data",
                "azp": f"client-{i}",
            },
            private_key,
            algorithm=alg,
            headers={"kid": KID},
        )
        for i in range(count)
    ]


def measure(fn: Callable[[str], Any], tokens: list[str], repeats: int) -> float:
    """Median verifications per second over ``repeats`` passes over ``tokens``."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for tok in tokens:
            fn(tok)
        rates.append(len(tokens) / (time.perf_counter() - start))
    return statistics.median(rates)


@contextmanager
def jwks_server(document: dict[str, Any]) -> Iterator[str]:
    """A JWKS on 127.0.0.1 (the verifier fetches it once)."""
    body = json.dumps(document).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "max-age=86400")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


KEYS: dict[str, Callable[[], Any]] = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
}


def public_jwk(public_key: Any, alg: str) -> dict[str, Any]:
    algorithm = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    jwk: dict[str, Any] = algorithm.to_jwk(public_key, as_dict=True)
    return jwk | {"kid": KID, "use": "sig", "alg": alg}


def raw_check(alg: str, public_key: Any, tokens: list[str]) -> Callable[[str], None]:
    """The bare signature check of ``alg`` on pre-split tokens (no parsing, no claims)."""
    split = {}
    for tok in tokens:
        signing_input, _, sig = tok.rpartition(".")
        split[tok] = (signing_input.encode(), jwt.utils.base64url_decode(sig))
    if alg == "RS256":
        pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()

        def raw(tok: str) -> None:
            signing_input, sig = split[tok]
            public_key.verify(sig, signing_input, pkcs1, sha256)

    elif alg == "ES256":
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        ecdsa = ec.ECDSA(hashes.SHA256())
        der = {
            tok: encode_dss_signature(int.from_bytes(s[:32], "big"), int.from_bytes(s[32:], "big"))
            for tok, (_, s) in split.items()
        }

        def raw(tok: str) -> None:
            public_key.verify(der[tok], split[tok][0], ecdsa)

    else:

        def raw(tok: str) -> None:
            signing_input, sig = split[tok]
            public_key.verify(sig, signing_input)

    return raw


def bench_algorithm(
    alg: str, count: int, repeats: int
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(median rate, median per-pass ratio to jwt.decode, ... to the raw check) by candidate."""
    private_key = KEYS[alg]()
    public_key = private_key.public_key()
    jwks = {"keys": [public_jwk(public_key, alg)]}
    tokens = mint(private_key, alg, count)
    repeated = [tokens[0]] * len(tokens)
    candidates: dict[str, tuple[Callable[[str], Any], list[str]]] = {}
    with jwks_server(jwks) as url:
        ours = TokenVerifier(
            issuer=ISSUER,
            audience=AUDIENCE,
            algorithms=[alg],
            jwks_url=url,
            cache_size=len(tokens) * 2,
        )
        ours.verify(tokens[0])  # the JWKS fetch, once; the server is not needed after it

        ours_async = AsyncTokenVerifier(
            issuer=ISSUER,
            audience=AUDIENCE,
            algorithms=[alg],
            jwks_url=url,
            cache_size=len(tokens) * 2,
        )
        asyncio.run(ours_async.verify(tokens[0]))

    def new_each_time(tok: str) -> Any:
        if tok is tokens[0]:  # each pass starts with an empty cache: every token is new
            ours.clear_cache()
        return ours.verify(tok)

    def async_new_each_time(tok: str) -> Any:
        # The coroutine driven by hand: with the key held it completes without suspending,
        # so this is the async path's own cost, without an event loop's per-call overhead.
        if tok is tokens[0]:
            ours_async.clear_cache()
        coro = ours_async.verify(tok)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        raise RuntimeError("the async verifier suspended with the key held")

    candidates["m2m_client, new token each time"] = (new_each_time, tokens)
    candidates["m2m_client async, new token each time"] = (async_new_each_time, tokens)
    candidates["m2m_client, repeated token (cache)"] = (ours.verify, repeated)

    def pyjwt_decode(tok: str) -> Any:
        return jwt.decode(tok, public_key, algorithms=[alg], audience=AUDIENCE, issuer=ISSUER)

    candidates[FLOOR] = (pyjwt_decode, tokens)
    if alg == "RS256":
        jwk_client = jwt.PyJWKClient("https://issuer.bench/jwks.json")
        jwk_client.fetch_data = lambda: jwks  # type: ignore[method-assign]

        def pyjwk_client(tok: str) -> Any:
            key = jwk_client.get_signing_key_from_jwt(tok)
            return jwt.decode(tok, key.key, algorithms=[alg], audience=AUDIENCE, issuer=ISSUER)

        from jose import jwt as jose_jwt

        def guide_jose(tok: str) -> Any:  # the guide's verify_token, minus FastAPI
            header = jose_jwt.get_unverified_header(tok)
            rsa_key = {}
            for key in jwks["keys"]:
                if key["kid"] == header["kid"]:
                    rsa_key = {k: key[k] for k in ("kty", "kid", "use", "n", "e")}
            return jose_jwt.decode(
                tok, rsa_key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER
            )

        candidates["PyJWT PyJWKClient + decode"] = (pyjwk_client, tokens)
        candidates["guide: python-jose header+loop+decode"] = (guide_jose, tokens)
    candidates[RAW] = (raw_check(alg, public_key, tokens), tokens)
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for fn, sample in candidates.values():  # warm-up
        measure(fn, sample[:50], 1)
    for _ in range(repeats):  # candidates take turns within each pass
        for name, (fn, sample) in candidates.items():
            rates[name].append(measure(fn, sample, 1))
    medians = {name: statistics.median(values) for name, values in rates.items()}

    def paired(base: str) -> dict[str, float]:
        return {
            name: statistics.median(a / b for a, b in zip(values, rates[base], strict=True))
            for name, values in rates.items()
        }

    return medians, paired(FLOOR), paired(RAW)


FLOOR = "PyJWT jwt.decode, pre-parsed key"
RAW = "raw signature check (cryptography)"


def stages(alg: str, rounds: int) -> list[tuple[str, float]]:
    """Nanoseconds per token of each step of a new token's verification (``--stages``).

    Each step runs alone over 20 tokens, ``rounds`` times; the best round counts (the
    least disturbed by other load). Steps measured alone run warmer than inside a whole
    verification, where the signature check and the interpreter evict each other's caches:
    compare the last rows (whole verifications, same method) with the raw check.
    """
    from m2m_client.verify._claims import Claims, validate_payload
    from m2m_client.verify._jws import check_header, check_signature, parse_compact

    private_key = KEYS[alg]()
    public_key = private_key.public_key()
    tokens = mint(private_key, alg, 20)
    with jwks_server({"keys": [public_jwk(public_key, alg)]}) as url:
        options: dict[str, Any] = {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "algorithms": [alg],
            "jwks_url": url,
        }
        ours, ours_async = TokenVerifier(**options), AsyncTokenVerifier(**options)
        ours.verify(tokens[0])
        asyncio.run(ours_async.verify(tokens[0]))
    core = ours._core
    verified = core.tokens._entries
    alg_kid = check_header(parse_compact(tokens[0]).header, core.algorithms, core.token_type)
    key = core.keys.fresh_key(alg_kid[1], alg, time.monotonic())
    assert key is not None
    parsed = [parse_compact(tok, core.headers) for tok in tokens]
    payloads = [p.payload() for p in parsed]
    now = time.time()
    raw = raw_check(alg, public_key, tokens)

    def sync_new(tok: str) -> Any:
        verified.pop(tok, None)
        return ours.verify(tok)

    def async_new(tok: str) -> Any:
        ours_async._core.tokens._entries.pop(tok, None)
        coro = ours_async.verify(tok)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        raise RuntimeError("the async verifier suspended with the key held")

    claims = [validate_payload(d, core.claims_policy, now) for d in payloads]

    def cache_step(i: int) -> None:
        verified.pop(tokens[i], None)
        core.cached(tokens[i])
        core.tokens.remember(tokens[i], claims[i], key, core._current_keys)

    def clocks(_: object) -> None:
        time.time(), time.time(), time.time(), time.monotonic(), time.monotonic()

    # No telemetry row: without an OpenTelemetry SDK, verify is not wrapped at all.
    steps: list[tuple[str, Callable[[Any], Any], list[Any]]] = [
        (
            "split, alphabet, base64 (header cached)",
            lambda t: parse_compact(t, core.headers),
            tokens,
        ),
        (
            "header checks (skipped: header cached)",
            lambda p: check_header(p.header, core.algorithms, core.token_type),
            parsed,
        ),
        ("key lookup", lambda p: core.keys.fresh_key(alg_kid[1], alg, time.monotonic()), parsed),
        ("signature (check_signature)", lambda p: check_signature(p, alg, key.key), parsed),
        ("payload: base64 + JSON", lambda p: p.payload(), parsed),
        ("claim checks + Claims", lambda d: validate_payload(d, core.claims_policy, now), payloads),
        ("  of which Claims()", lambda d: Claims(d), payloads),
        ("verified-token cache: lookup (a miss) + insertion", cache_step, list(range(20))),
        ("clock reads (3 time.time, 2 time.monotonic)", clocks, tokens),
        ("whole verify, sync", sync_new, tokens),
        ("whole verify, async", async_new, tokens),
        (RAW, raw, tokens),
    ]
    results = []
    for name, fn, items in steps:
        best = math.inf
        for _ in range(rounds):
            start = time.perf_counter_ns()
            for item in items:
                fn(item)
            best = min(best, (time.perf_counter_ns() - start) / len(items))
        results.append((name, best))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1500, help="distinct tokens per pass")
    parser.add_argument("--repeats", type=int, default=7, help="passes per candidate")
    parser.add_argument("--algorithms", default="RS256,ES256,EdDSA")
    parser.add_argument(
        "--stages", action="store_true", help="ns per step of a new token's verification instead"
    )
    args = parser.parse_args()
    if args.stages:
        for alg in args.algorithms.split(","):
            print(f"\n{alg}: ns per token, best of {args.repeats * 30} rounds of 20 tokens")
            for name, ns in stages(alg, args.repeats * 30):
                print(f"{name:52} {ns:9,.0f}")
        return

    for alg in args.algorithms.split(","):
        results, vs_floor, vs_raw = bench_algorithm(alg, args.tokens, args.repeats)
        print(
            f"\n{alg}: {args.tokens} tokens x {args.repeats} interleaved passes, one core "
            "(medians; ratios: medians of per-pass ratios)"
        )
        print(f"{'candidate':42} {'verif/s':>12} {'vs decode':>10} {'vs raw':>8}")
        for name, rate in results.items():
            print(f"{name:42} {rate:12,.0f} {vs_floor[name]:9.2f}x {vs_raw[name]:7.2f}x")


if __name__ == "__main__":
    main()
