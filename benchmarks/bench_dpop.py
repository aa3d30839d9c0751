"""DPoP proof cost: m2m_client's DPoPKey.proof vs the raw ES256 signature vs PyJWT.

    python benchmarks/bench_dpop.py            # ~20 s; prints medians and ratios

Calling side: every API request through BearerAuth will carry a fresh proof, so its
cost is per-request overhead. The floor is one ES256 (P-256) signature made with
``cryptography`` directly; the issue's target is at most 2x that floor. PyJWT's
``jwt.encode`` building the same proof (same header with the jwk, same claims) is what a
user would write without us.

Receiving side: DPoPChecker.check (parse, every RFC 9449 §4.3 check, replay cache) vs a
raw ES256 signature verification; and what a request costs a resource server: a bearer
token (TokenVerifier.verify, the token already in its verified-token cache, as in the
common M2M case) vs the same DPoP-bound token with its proof checked and the binding.

BearerAuth: what a warm request (token cached) costs in the auth flow, with a DPoP-bound
token (fresh proof, nonce lookup, headers) and with a bearer token; the difference is the
DPoP overhead per request, compared with the raw ES256 signature (target: <= 2x).
``verify(dpop_proof=)`` is the verifier's own DPoP path (policy, proof, binding, replay).

Rounds interleave the candidates (a noisy shared machine slows all of them alike) and
each figure is the median over rounds of the per-operation time in one round.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import httpx
import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from m2m_client._dpop import DPoPKey, access_token_hash
from m2m_client.verify import TokenVerifier
from m2m_client.verify._proof import (
    DPoPChecker,
    MemoryReplayCache,
    check_token_binding,
    dpop_decision,
    token_jkt,
)

URL = "https://api.example.com/v1/orders?page=2"
ISSUER = "https://issuer.bench/"
AUDIENCE = "https://api.example.com"
TOKEN = "eyJhbGciOiJFUzI1NiIsInR5cCI6ImF0K2p3dCJ9." + "x" * 600 + ".sig"


def per_op(fn: Callable[[], object], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=400, help="operations per round")
    args = parser.parse_args()

    # One P-256 key for every candidate, so only the work around the signature differs.
    private = ec.generate_private_key(ec.SECP256R1())
    key = DPoPKey(private)
    ecdsa = ec.ECDSA(hashes.SHA256())
    # A signing input of a real proof's size, so the raw figure hashes the same bytes.
    sample = key.proof("GET", URL, now=time.time(), access_token=TOKEN)
    signing_input = sample.rsplit(".", 1)[0].encode()
    jwk = key.public_jwk
    ath = access_token_hash(TOKEN)

    def raw_sign() -> object:
        return private.sign(signing_input, ecdsa)

    def ours() -> object:
        return key.proof("GET", URL, now=time.time(), access_token=TOKEN)

    def pyjwt_proof() -> object:
        claims = {
            "jti": base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode(),
            "htm": "GET",
            "htu": URL.partition("?")[0],
            "iat": int(time.time()),
            "ath": ath,
        }
        return jwt.encode(claims, private, "ES256", headers={"typ": "dpop+jwt", "jwk": jwk})

    # Receiving side: a pool of distinct proofs (the replay cache refuses repeats).
    now = time.time()
    checker = DPoPChecker(replay_cache=MemoryReplayCache(max_entries=10_000_000))
    public = private.public_key()
    der = private.sign(signing_input, ecdsa)

    def raw_verify() -> object:
        public.verify(der, signing_input, ecdsa)
        return None

    # A resource server: one issuer key, one access token bound to the client's key.
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    issuer_jwk = {
        **jwt.algorithms.ECAlgorithm.to_jwk(issuer_key.public_key(), as_dict=True),
        "kid": "k1",
        "alg": "ES256",
    }
    access_token = jwt.encode(
        {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "worker@clients",
            "iat": int(now),
            "exp": int(now) + 3600,
            "cnf": {"jkt": key.thumbprint},
        },
        issuer_key,
        "ES256",
        headers={"kid": "k1"},
    )
    verifier = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=["ES256"],
        jwks_url="https://issuer.bench/jwks.json",
        http_client=httpx.Client(
            transport=httpx.MockTransport(
                lambda request: httpx.Response(200, json={"keys": [issuer_jwk]})
            )
        ),
    )
    verifier.verify(access_token)  # fetch the key set, cache the verdict

    def bearer_request() -> object:
        return verifier.verify(access_token)

    # BearerAuth with a warm token: one client with DPoP (the key above), one without.
    from m2m_client import BearerAuth, ClientCredentials, TokenClient

    def token_endpoint(token_type: str) -> httpx.Client:
        body = {"access_token": access_token, "token_type": token_type, "expires_in": 3600}
        return httpx.Client(
            transport=httpx.MockTransport(lambda request: httpx.Response(200, json=body))
        )

    def warm_flow(dpop: object, token_type: str) -> Callable[[], object]:
        creds = ClientCredentials(
            token_url="https://issuer.bench/token", client_id="c", client_secret="s", dpop=dpop
        )
        tokens = TokenClient(creds, http_client=token_endpoint(token_type))
        tokens.get_token()
        auth = BearerAuth(tokens)
        request = httpx.Request("GET", URL)
        response = httpx.Response(200, request=request)

        def one_request() -> object:
            flow = auth.sync_auth_flow(request)
            next(flow)
            with contextlib.suppress(StopIteration):
                flow.send(response)
            return None

        return one_request

    dpop_auth, bearer_auth = warm_flow(key, "DPoP"), warm_flow(False, "Bearer")
    dpop_verifier = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=["ES256"],
        jwks_url="https://issuer.bench/jwks.json",
        http_client=httpx.Client(
            transport=httpx.MockTransport(
                lambda request: httpx.Response(200, json={"keys": [issuer_jwk]})
            )
        ),
        dpop="allowed",
        dpop_checker=DPoPChecker(replay_cache=MemoryReplayCache(max_entries=10_000_000)),
    )
    dpop_verifier.verify(
        access_token,
        dpop_proof=key.proof("GET", URL, now=time.time(), access_token=access_token),
        method="GET",
        url=URL,
    )

    calling: dict[str, list[float]] = {
        "raw ES256 sign": [],
        "DPoPKey.proof": [],
        "PyJWT": [],
        "BearerAuth bearer": [],
        "BearerAuth DPoP": [],
    }
    receiving: dict[str, list[float]] = {
        "raw ES256 verify": [],
        "DPoPChecker.check": [],
        "bearer request": [],
        "DPoP request": [],
        "verify(dpop_proof=)": [],
    }
    for _ in range(args.rounds):
        calling["raw ES256 sign"].append(per_op(raw_sign, args.iterations))
        calling["DPoPKey.proof"].append(per_op(ours, args.iterations))
        calling["PyJWT"].append(per_op(pyjwt_proof, args.iterations))
        calling["BearerAuth bearer"].append(per_op(bearer_auth, args.iterations))
        calling["BearerAuth DPoP"].append(per_op(dpop_auth, args.iterations))

        proofs = iter([ours() for _ in range(args.iterations)])

        def check(proofs: Iterator[str] = proofs) -> object:
            return checker.check(next(proofs), method="GET", url=URL, now=now, access_token=TOKEN)

        receiving["raw ES256 verify"].append(per_op(raw_verify, args.iterations))
        receiving["DPoPChecker.check"].append(per_op(check, args.iterations))

        bound = iter(
            [
                key.proof("GET", URL, now=now, access_token=access_token)
                for _ in range(args.iterations)
            ]
        )

        def dpop_request(proofs: Iterator[str] = bound) -> object:
            claims = verifier.verify(access_token)
            dpop_decision("allowed", scheme="DPoP", token_jkt=token_jkt(claims))
            proof = checker.check(
                next(proofs), method="GET", url=URL, now=now, access_token=access_token
            )
            check_token_binding(claims, proof)
            return claims

        receiving["bearer request"].append(per_op(bearer_request, args.iterations))
        receiving["DPoP request"].append(per_op(dpop_request, args.iterations))
        fresh = iter(
            [
                key.proof("GET", URL, now=time.time(), access_token=access_token)
                for _ in range(args.iterations)
            ]
        )

        def verify_dpop(proofs: Iterator[str] = fresh) -> object:
            return dpop_verifier.verify(
                access_token, dpop_proof=next(proofs), method="GET", url=URL
            )

        receiving["verify(dpop_proof=)"].append(per_op(verify_dpop, args.iterations))

    def report(title: str, results: dict[str, list[float]], floor: str) -> None:
        medians = {name: statistics.median(times) for name, times in results.items()}
        print(f"\n{title} (median of {args.rounds} rounds x {args.iterations} ops)")
        for name, value in medians.items():
            ratio = value / medians[floor]
            print(f"  {name:<20} {value * 1e6:8.1f} us/op   {ratio:5.2f}x {floor}")

    report("Calling side: one proof per request", calling, "raw ES256 sign")
    overhead = statistics.median(
        d - b
        for d, b in zip(calling["BearerAuth DPoP"], calling["BearerAuth bearer"], strict=False)
    )
    floor = statistics.median(calling["raw ES256 sign"])
    print(
        f"  DPoP overhead of a warm BearerAuth request: {overhead * 1e6:.1f} us/op = "
        f"{overhead / floor:.2f}x raw ES256 sign (target <= 2x)"
    )
    report("Receiving side: one proof check per request", receiving, "raw ES256 verify")
    print(
        "  (bearer/DPoP request: TokenVerifier.verify of a token already in its cache, plus\n"
        "   for DPoP the policy decision, DPoPChecker.check and check_token_binding)"
    )


if __name__ == "__main__":
    main()
