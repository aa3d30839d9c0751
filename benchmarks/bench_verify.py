"""Verifications per second on one core: m2m_client's verifier vs PyJWT, PyJWKClient,
the guide's python-jose path, and the raw RSA signature check (the physical limit).

    python benchmarks/bench_verify.py            # ~1 minute; prints medians and ratios

Every candidate checks an RS256 (RSA-2048) token with the same claims (iss, aud, exp).
No network: the JWKS is served from memory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwt.algorithms import RSAAlgorithm

from m2m_client.verify import TokenVerifier

ISSUER = "https://issuer.bench/"
AUDIENCE = "https://api.bench"
KID = "bench-key"


def mint(private_key: rsa.RSAPrivateKey, count: int) -> list[str]:
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
            algorithm="RS256",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1500, help="distinct tokens per pass")
    parser.add_argument("--repeats", type=int, default=5, help="passes per candidate")
    args = parser.parse_args()

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_key = private_key.public_key()
    jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True) | {"kid": KID, "use": "sig", "alg": "RS256"}
    jwks = {"keys": [jwk]}
    tokens = mint(private_key, args.tokens)
    repeated = [tokens[0]] * len(tokens)

    # --- ours (cache cleared before each pass, so every token is new to it) --------------
    def serve_jwks(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=jwks, headers={"cache-control": "max-age=86400"})

    ours = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_url="https://issuer.bench/jwks.json",
        http_client=httpx.Client(transport=httpx.MockTransport(serve_jwks)),
        cache_size=len(tokens) * 2,
    )
    ours.verify(tokens[0])

    def ours_verify(tok: str) -> Any:
        return ours.verify(tok)

    # --- PyJWT, pre-parsed key (the floor) ------------------------------------------------
    def pyjwt_decode(tok: str) -> Any:
        return jwt.decode(tok, public_key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)

    # --- PyJWT PyJWKClient ------------------------------------------------------------------
    jwk_client = jwt.PyJWKClient("https://issuer.bench/jwks.json")
    jwk_client.fetch_data = lambda: jwks  # type: ignore[method-assign]

    def pyjwk_client(tok: str) -> Any:
        key = jwk_client.get_signing_key_from_jwt(tok)
        return jwt.decode(tok, key.key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)

    # --- the guide: python-jose, header + loop over the JWKS keys + decode ----------------
    from jose import jwt as jose_jwt

    def guide_jose(tok: str) -> Any:
        header = jose_jwt.get_unverified_header(tok)
        rsa_key = {}
        for key in jwks["keys"]:
            if key["kid"] == header["kid"]:
                rsa_key = {k: key[k] for k in ("kty", "kid", "use", "n", "e")}
        return jose_jwt.decode(tok, rsa_key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER)

    # --- raw signature check only -------------------------------------------------------
    split = {}
    for tok in tokens:
        signing_input, _, sig = tok.rpartition(".")
        split[tok] = (signing_input.encode(), jwt.utils.base64url_decode(sig))
    pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()

    def raw(tok: str) -> None:
        signing_input, sig = split[tok]
        public_key.verify(sig, signing_input, pkcs1, sha256)

    results: dict[str, float] = {}
    rates = []
    for _ in range(args.repeats):
        ours.clear_cache()
        rates.append(measure(ours_verify, tokens, 1))
    results["m2m_client, new token each time"] = statistics.median(rates)
    results["m2m_client, repeated token (cache)"] = measure(ours_verify, repeated, args.repeats)
    results["PyJWT jwt.decode, pre-parsed key"] = measure(pyjwt_decode, tokens, args.repeats)
    results["PyJWT PyJWKClient + decode"] = measure(pyjwk_client, tokens, args.repeats)
    results["guide: python-jose header+loop+decode"] = measure(guide_jose, tokens, args.repeats)
    results["raw cryptography RSA verify"] = measure(raw, tokens, args.repeats)

    floor = results["PyJWT jwt.decode, pre-parsed key"]
    raw_rate = results["raw cryptography RSA verify"]
    print(f"RS256 / RSA-2048, {args.tokens} tokens x {args.repeats} passes, one core")
    print(f"{'candidate':42} {'verif/s':>12} {'vs decode':>10} {'vs raw':>8}")
    for name, rate in results.items():
        print(f"{name:42} {rate:12,.0f} {rate / floor:9.2f}x {rate / raw_rate:7.2f}x")
    new = results["m2m_client, new token each time"]
    rep = results["m2m_client, repeated token (cache)"]
    checks = [
        ("new >= 1.5x decode", new / floor, 1.5),
        ("new >= 0.5x raw", new / raw_rate, 0.5),
        ("repeated >= 20x decode", rep / floor, 20.0),
    ]
    print(
        "targets: " + "; ".join(f"{n}: {r:.2f}x {'OK' if r >= t else 'MISS'}" for n, r, t in checks)
    )


if __name__ == "__main__":
    main()
