"""DPoP, receiving side (m2m_client/verify/_proof.py): RFC 9449 §4.3 proof checks.

Outside truth: the RFC 9449 example proofs (tests/vectors/dpop_rfc9449.json) and proofs
signed by PyJWT, an independent JOSE implementation. Each entry of the bad-proof corpus
violates exactly one check and must raise DPoPProofError (or the subclass named), never
another exception; hypothesis then throws random and mutated proofs at the checker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from m2m_client._dpop import DPOP_ALGORITHMS, DPoPKey, access_token_hash
from m2m_client._jose import (
    MAX_HTU,
    MAX_PROOF_HEADER_SEGMENT,
    MAX_PROOF_LENGTH,
    MAX_PROOF_PAYLOAD_SEGMENT,
    MAX_PROOF_SIGNATURE_SEGMENT,
)
from m2m_client.errors import (
    ConfigurationError,
    DPoPBindingError,
    DPoPNonceRequired,
    DPoPProofError,
    InvalidToken,
    ReplayCacheUnavailable,
)
from m2m_client.verify._proof import (
    DPoPChecker,
    DPoPProof,
    DPoPSettings,
    HmacNonceSource,
    MemoryReplayCache,
    check_proof,
    check_token_binding,
    dpop_challenge,
    dpop_decision,
    request_url,
    token_jkt,
)

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "dpop_rfc9449.json").read_text("utf-8")
)["rfc9449"]
NOW = 1_700_000_000.0
URL = "https://api.example.com/data"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3b3JrZXIifQ.c2lnbmF0dXJl"

EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any) -> dict[str, Any]:
    algorithm = ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) else RSAAlgorithm
    jwk: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)
    return jwk


def _claims(**overrides: Any) -> dict[str, Any]:
    claims = {
        "jti": "jti-1",
        "htm": "GET",
        "htu": URL,
        "iat": int(NOW),
        "ath": access_token_hash(TOKEN),
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not _DROP}


_DROP = object()


def pyjwt_proof(
    claims: dict[str, Any] | None = None,
    *,
    key: Any = EC_KEY,
    alg: str = "ES256",
    header: dict[str, Any] | None = None,
) -> str:
    """A proof signed by PyJWT (not by our DPoPKey): an independent signer."""
    fields: dict[str, Any] = {"typ": "dpop+jwt", "jwk": _jwk(key)}
    fields.update(header or {})
    fields = {k: v for k, v in fields.items() if v is not _DROP}
    return jwt.encode(claims if claims is not None else _claims(), key, alg, headers=fields)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"sig") -> str:
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)]
    )


def check(proof: Any, **kwargs: Any) -> DPoPProof:
    options: dict[str, Any] = {"method": "GET", "url": URL, "now": NOW, "access_token": TOKEN}
    options.update(kwargs)
    return check_proof(proof, **options)


# --- RFC 9449 examples and round trips -----------------------------------------------------


def test_rfc9449_token_request_proof_is_accepted() -> None:
    vector = VECTORS["token_request"]
    proof = check_proof(
        vector["proof"], method="POST", url=vector["url"], now=vector["claims"]["iat"] + 2
    )
    assert proof.jkt == VECTORS["jkt"]
    assert proof.jti == vector["claims"]["jti"]
    assert proof.htu == vector["claims"]["htu"]


def test_rfc9449_resource_request_proof_is_accepted_with_its_token() -> None:
    vector = VECTORS["resource_request"]
    proof = check_proof(
        vector["proof"],
        method="GET",
        url=vector["url"],
        now=vector["claims"]["iat"],
        access_token=VECTORS["access_token"],
    )
    assert proof.jkt == VECTORS["jkt"]
    check_token_binding({"cnf": {"jkt": VECTORS["jkt"]}}, proof)


def test_rfc9449_resource_proof_is_refused_for_another_token_method_url_or_time() -> None:
    vector = VECTORS["resource_request"]
    base = {
        "method": "GET",
        "url": vector["url"],
        "now": vector["claims"]["iat"],
        "access_token": VECTORS["access_token"],
    }
    for change in (
        {"access_token": "another-token"},
        {"method": "POST"},
        {"url": "https://resource.example.org/other"},
        {"now": vector["claims"]["iat"] + 3600},
    ):
        with pytest.raises(DPoPProofError):
            check_proof(vector["proof"], **{**base, **change})


@pytest.mark.parametrize("alg", DPOP_ALGORITHMS)
def test_our_proofs_pass_our_checker_for_every_algorithm(alg: str) -> None:
    key = DPoPKey.generate(alg)
    proof = check(key.proof("GET", URL + "?q=1", now=NOW, access_token=TOKEN))
    assert proof.jkt == key.thumbprint


def test_a_pyjwt_signed_rsa_proof_passes() -> None:
    proof = check(pyjwt_proof(key=RSA_KEY, alg="PS256"))
    assert proof.htm == "GET"


def test_htu_is_compared_after_normalisation_and_without_query() -> None:
    proof = pyjwt_proof(_claims(htu="HTTPS://API.example.com:443/./data?x=1#f"))
    assert check(proof, url="https://api.example.com/data?other=2").htu == URL


def test_typ_is_case_insensitive_and_may_carry_the_media_type_prefix() -> None:
    check(pyjwt_proof(header={"typ": "application/DPoP+JWT"}))


def test_token_endpoint_proof_needs_no_ath() -> None:
    check(pyjwt_proof(_claims(ath=_DROP)), access_token=None)


LARGE = json.loads(
    (Path(__file__).parent.parent / "vectors" / "dpop_large_rsa.json").read_text("utf-8")
)


@pytest.mark.parametrize(
    "vector",
    LARGE["proofs"],
    ids=[f"{v['alg']}-{v['bits']}-{len(v['url'])}" for v in LARGE["proofs"]],
)
def test_proofs_at_the_size_limits_pass(vector: dict[str, Any]) -> None:
    # RSA 2048-8192 bits and an htu up to MAX_HTU, as docs/dpop.md says; these were
    # refused ("not a compact JWS", "'htu' is missing") above RSA-6144 or a ~4,070-char path.
    assert len(vector["proof"]) <= MAX_PROOF_LENGTH
    proof = check_proof(
        vector["proof"],
        method=vector["method"],
        url=vector["url"],
        now=float(LARGE["iat"]),
        access_token=LARGE["token"],
    )
    assert proof.jkt == vector["jkt"]


# --- the bad-proof corpus: each RFC 9449 §4.3 check violated once ---------------------------

NONE_HEADER = {"typ": "dpop+jwt", "alg": "none", "jwk": _jwk(EC_KEY)}
GOOD = pyjwt_proof()
HEADER, PAYLOAD, SIGNATURE = GOOD.split(".")
PRIVATE_JWK = {**_jwk(EC_KEY), "d": b64(EC_KEY.private_numbers().private_value.to_bytes(32, "big"))}
RAW_SIGNATURE = base64.urlsafe_b64decode(SIGNATURE + "==")


def _der_signature() -> str:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    r = int.from_bytes(RAW_SIGNATURE[:32], "big")
    s = int.from_bytes(RAW_SIGNATURE[32:], "big")
    return f"{HEADER}.{PAYLOAD}.{b64(encode_dss_signature(r, s))}"


def _signed_by_other_key_with_our_jwk() -> str:
    return pyjwt_proof(key=OTHER_EC_KEY, header={"jwk": _jwk(EC_KEY)})


def _small_rsa_proof() -> str:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with warnings.catch_warnings():  # PyJWT warns about the short key we want to test
        warnings.simplefilter("ignore")
        return jwt.encode(
            _claims(), small, "RS256", headers={"typ": "dpop+jwt", "jwk": _jwk(small)}
        )


def _off_curve_jwk() -> str:
    jwk = {**_jwk(EC_KEY), "y": b64((1).to_bytes(32, "big"))}
    return pyjwt_proof(header={"jwk": jwk})


BAD_PROOFS: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    # step 1: exactly one DPoP header
    "no DPoP header": (lambda: None, {}),
    "two DPoP headers": (lambda: [GOOD, GOOD], {}),
    "empty header list": (lambda: [], {}),
    "folded headers": (lambda: f"{GOOD}, {GOOD}", {}),
    "header value not text": (lambda: [b"bytes"], {}),
    # step 2: a compact JWS
    "not a JWS": (lambda: "not-a-jws", {}),
    "five segments (JWE)": (lambda: f"{GOOD}.AAAA.AAAA", {}),
    "non-ASCII": (lambda: GOOD[:-2] + "\u00e9\u00e9", {}),
    "too long": (lambda: f"{HEADER}.{'A' * MAX_PROOF_LENGTH}.{SIGNATURE}", {}),
    "header segment too long": (
        lambda: f"{'A' * (MAX_PROOF_HEADER_SEGMENT + 4)}.{PAYLOAD}.{SIGNATURE}",
        {},
    ),
    "payload segment too long": (
        lambda: f"{HEADER}.{'A' * (MAX_PROOF_PAYLOAD_SEGMENT + 4)}.{SIGNATURE}",
        {},
    ),
    "signature longer than an RSA-8192 one": (
        lambda: f"{HEADER}.{PAYLOAD}.{'A' * (MAX_PROOF_SIGNATURE_SEGMENT + 4)}",
        {},
    ),
    "header is not JSON": (lambda: f"{b64(b'{nope')}.{PAYLOAD}.{SIGNATURE}", {}),
    "header is a JSON array": (lambda: f"{b64(b'[1]')}.{PAYLOAD}.{SIGNATURE}", {}),
    "non-canonical base64 in the signature": (lambda: GOOD[:-1] + "h", {}),
    # step 3: typ
    "typ missing": (lambda: pyjwt_proof(header={"typ": _DROP}), {}),
    "typ JWT": (lambda: pyjwt_proof(header={"typ": "JWT"}), {}),
    "typ at+jwt (an access token)": (lambda: pyjwt_proof(header={"typ": "at+jwt"}), {}),
    # step 4: asymmetric algorithm in the allowlist
    "alg none": (lambda: unsigned(NONE_HEADER, _claims()), {}),
    "alg HS256 with a symmetric jwk": (
        lambda: jwt.encode(
            _claims(),
            "s" * 32,
            "HS256",
            headers={"typ": "dpop+jwt", "jwk": {"kty": "oct", "k": b64(b"s" * 32)}},
        ),
        {},
    ),
    "alg outside the configured allowlist": (
        lambda: pyjwt_proof(key=RSA_KEY, alg="RS256"),
        {"settings": DPoPSettings(algorithms=frozenset({"ES256"}))},
    ),
    "alg not the key's (ES384 header, P-256 key)": (
        lambda: unsigned({**NONE_HEADER, "alg": "ES384"}, _claims(), RAW_SIGNATURE),
        {},
    ),
    "alg ES256 with an RSA jwk": (
        lambda: pyjwt_proof(header={"jwk": _jwk(RSA_KEY)}),
        {},
    ),
    "crit header": (lambda: pyjwt_proof(header={"crit": ["exp"], "exp": 1}), {}),
    # steps 5-6: the jwk (public, valid) and the signature
    "jwk missing": (lambda: pyjwt_proof(header={"jwk": _DROP}), {}),
    "jwk not an object": (lambda: pyjwt_proof(header={"jwk": "key"}), {}),
    "jwk with the private key": (lambda: pyjwt_proof(header={"jwk": PRIVATE_JWK}), {}),
    "jwk point not on the curve": (_off_curve_jwk, {}),
    "RSA jwk below 2048 bits": (_small_rsa_proof, {}),
    "RSA jwk above 8192 bits": (
        lambda: unsigned(
            {
                "typ": "dpop+jwt",
                "alg": "RS256",
                "jwk": {"kty": "RSA", "e": "AQAB", "n": b64(b"\xff" * 1026)},
            },
            _claims(),
        ),
        {},
    ),
    "signed by another key": (_signed_by_other_key_with_our_jwk, {}),
    "signature truncated": (lambda: f"{HEADER}.{PAYLOAD}.{b64(RAW_SIGNATURE[:40])}", {}),
    "signature DER-encoded instead of r||s": (_der_signature, {}),
    "payload changed after signing": (
        lambda: f"{HEADER}.{b64(json.dumps(_claims(htm='POST')).encode())}.{SIGNATURE}",
        {},
    ),
    "payload not an object": (lambda: pyjwt_proof_raw_payload(b"[]"), {}),
    # jti
    "jti missing": (lambda: pyjwt_proof(_claims(jti=_DROP)), {}),
    "jti empty": (lambda: pyjwt_proof(_claims(jti="")), {}),
    "jti a number": (lambda: pyjwt_proof(_claims(jti=7)), {}),
    "jti too long": (lambda: pyjwt_proof(_claims(jti="j" * 300)), {}),
    # step 7: htm
    "htm another method": (lambda: pyjwt_proof(_claims(htm="POST")), {}),
    "htm lower case": (lambda: pyjwt_proof(_claims(htm="get")), {}),
    "htm missing": (lambda: pyjwt_proof(_claims(htm=_DROP)), {}),
    # step 8: htu
    "htu another path": (lambda: pyjwt_proof(_claims(htu="https://api.example.com/admin")), {}),
    "htu another host": (lambda: pyjwt_proof(_claims(htu="https://evil.example/data")), {}),
    "htu another scheme": (lambda: pyjwt_proof(_claims(htu="http://api.example.com/data")), {}),
    "htu another port": (lambda: pyjwt_proof(_claims(htu="https://api.example.com:8443/data")), {}),
    "htu missing": (lambda: pyjwt_proof(_claims(htu=_DROP)), {}),
    "htu not a URL": (lambda: pyjwt_proof(_claims(htu="data")), {}),
    "htu a list": (lambda: pyjwt_proof(_claims(htu=[URL])), {}),
    "htu too long": (
        lambda: pyjwt_proof(_claims(htu=URL + "/" + "a" * MAX_HTU)),
        {"url": URL + "/" + "a" * MAX_HTU},
    ),
    "htu with a lone surrogate": (
        lambda: pyjwt_proof_raw_payload(
            json.dumps(_claims(htu="https://api.example.com/\ud800")).encode()
        ),
        {},
    ),
    # step 10: iat window
    "iat missing": (lambda: pyjwt_proof(_claims(iat=_DROP)), {}),
    "iat a string": (lambda: pyjwt_proof(_claims(iat=str(int(NOW)))), {}),
    "iat a boolean": (lambda: pyjwt_proof(_claims(iat=True)), {}),
    "iat too large for a float": (lambda: pyjwt_proof(_claims(iat=10**400)), {}),
    "iat too old": (lambda: pyjwt_proof(_claims(iat=int(NOW) - 301)), {}),
    "iat too far in the future": (lambda: pyjwt_proof(_claims(iat=int(NOW) + 61)), {}),
    # step 12: ath
    "ath missing at a resource": (lambda: pyjwt_proof(_claims(ath=_DROP)), {}),
    "ath of another token": (lambda: pyjwt_proof(_claims(ath=access_token_hash("other"))), {}),
    "ath of the token, unhashed": (lambda: pyjwt_proof(_claims(ath=TOKEN)), {}),
    "ath non-ASCII": (lambda: pyjwt_proof(_claims(ath="\u00e9" * 43)), {}),
    "ath a lone surrogate": (
        lambda: pyjwt_proof_raw_payload(json.dumps(_claims(ath="\ud800")).encode()),
        {},
    ),
    # nonce syntax
    "nonce not a string": (lambda: pyjwt_proof(_claims(nonce=5)), {}),
    "nonce with a quote": (lambda: pyjwt_proof(_claims(nonce='a"b')), {}),
}


def pyjwt_proof_raw_payload(payload: bytes) -> str:
    signing_input = f"{HEADER}.{b64(payload)}".encode()
    der = EC_KEY.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(der)
    return f"{signing_input.decode()}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# The check that must catch each case (a fragment of its message): a case refused for
# another reason than the one it names would prove nothing.
EXPECTED = {
    "no DPoP header": "no DPoP header",
    "two DPoP headers": "exactly one",
    "empty header list": "exactly one",
    "folded headers": "exactly one DPoP header",
    "header value not text": "not text",
    "not a JWS": "compact JWS",
    "five segments (JWE)": "compact JWS",
    "non-ASCII": "compact JWS",
    "too long": f"longer than {MAX_PROOF_LENGTH} characters, the limit for a proof",
    "header segment too long": f"its header is longer than {MAX_PROOF_HEADER_SEGMENT} characters",
    "payload segment too long": (
        f"its payload is longer than {MAX_PROOF_PAYLOAD_SEGMENT} characters"
    ),
    "signature longer than an RSA-8192 one": "its signature (an RSA-8192 one) is longer than",
    "header is not JSON": "header is not JSON",
    "header is a JSON array": "header is not a JSON object",
    "non-canonical base64 in the signature": "canonical base64url",
    "typ missing": "'typ'",
    "typ JWT": "'typ'",
    "typ at+jwt (an access token)": "'typ'",
    "alg none": "'alg'",
    "alg HS256 with a symmetric jwk": "'alg'",
    "alg outside the configured allowlist": "'alg'",
    "alg not the key's (ES384 header, P-256 key)": "not a key for its alg",
    "alg ES256 with an RSA jwk": "not a key for its alg",
    "crit header": "crit",
    "jwk missing": "no 'jwk'",
    "jwk not an object": "no 'jwk'",
    "jwk with the private key": "private key members",
    "jwk point not on the curve": "not a valid public key",
    "RSA jwk below 2048 bits": "2048",
    "RSA jwk above 8192 bits": "between 2048 and 8192 bits",
    "signed by another key": "signature does not verify",
    "signature truncated": "signature does not verify",
    "signature DER-encoded instead of r||s": "signature does not verify",
    "payload changed after signing": "signature does not verify",
    "payload not an object": "payload is not a JSON object",
    "jti missing": "'jti'",
    "jti empty": "'jti'",
    "jti a number": "'jti'",
    "jti too long": "'jti'",
    "htm another method": "'htm'",
    "htm lower case": "'htm'",
    "htm missing": "'htm'",
    "htu another path": "'htu' does not match",
    "htu another host": "'htu' does not match",
    "htu another scheme": "'htu' does not match",
    "htu another port": "'htu' does not match",
    "htu missing": "'htu' is missing",
    "htu not a URL": "not an http(s) URL",
    "htu a list": "'htu' is missing",
    "htu too long": f"its 'htu' is longer than {MAX_HTU} characters",
    "htu with a lone surrogate": "not an http(s) URL",
    "iat missing": "'iat' is not a number",
    "iat a string": "'iat' is not a number",
    "iat a boolean": "'iat' is not a number",
    "iat too large for a float": "'iat' is not a number",
    "iat too old": "too old",
    "iat too far in the future": "in the future",
    "ath missing at a resource": "'ath'",
    "ath of another token": "'ath'",
    "ath of the token, unhashed": "'ath'",
    "ath non-ASCII": "'ath' does not match",
    "ath a lone surrogate": "'ath' does not match",
    "nonce not a string": "'nonce'",
    "nonce with a quote": "'nonce'",
}


@pytest.mark.parametrize("case", sorted(BAD_PROOFS))
def test_bad_proof_is_refused_with_dpop_proof_error(case: str) -> None:
    make, kwargs = BAD_PROOFS[case]
    with pytest.raises(DPoPProofError) as caught:
        check(make(), **kwargs)
    assert EXPECTED[case] in str(caught.value)
    assert caught.value.error_code == "invalid_dpop_proof"
    assert isinstance(caught.value, InvalidToken)
    assert TOKEN not in str(caught.value)


def test_every_corpus_case_names_the_check_it_violates() -> None:
    assert set(EXPECTED) == set(BAD_PROOFS)


def test_the_corpus_baseline_passes() -> None:
    # Each corpus entry differs from this in one respect: it must pass, or the corpus
    # proves nothing.
    check(GOOD)
    check(pyjwt_proof_raw_payload(json.dumps(_claims()).encode()))


# --- nonces --------------------------------------------------------------------------------


def test_missing_nonce_asks_for_one() -> None:
    nonces = HmacNonceSource(b"k" * 32)
    with pytest.raises(DPoPNonceRequired) as caught:
        check(GOOD, nonces=nonces)
    assert caught.value.error_code == "use_dpop_nonce"
    assert caught.value.nonce == nonces.current(NOW)
    proof = check(pyjwt_proof(_claims(nonce=caught.value.nonce)), nonces=nonces)
    assert proof.nonce == caught.value.nonce


def test_stale_or_foreign_nonce_asks_for_a_fresh_one() -> None:
    nonces = HmacNonceSource(b"k" * 32, step=60, window=2)
    old = nonces.current(NOW - 600)
    foreign = HmacNonceSource(b"x" * 32).current(NOW)
    for nonce in (old, foreign):
        with pytest.raises(DPoPNonceRequired):
            check(pyjwt_proof(_claims(nonce=nonce)), nonces=nonces)
    # Within the window (one step back) the nonce still passes.
    check(pyjwt_proof(_claims(nonce=nonces.current(NOW - 60))), nonces=nonces)


@pytest.mark.parametrize("nonce", ["\u00e9", "\ud800", "", "x" * 10_000])
def test_a_nonce_source_answers_no_to_any_string(nonce: str) -> None:
    # Public API (NonceSource): a caller checking nonces itself may pass what a client sent.
    assert HmacNonceSource(b"k" * 32).accepts(nonce, NOW) is False


def test_nonce_secret_must_be_long_enough() -> None:
    with pytest.raises(ConfigurationError):
        HmacNonceSource(b"short")


# --- replay --------------------------------------------------------------------------------


def test_a_replayed_proof_is_refused() -> None:
    checker = DPoPChecker()
    proof = DPoPKey.generate().proof("GET", URL, now=NOW, access_token=TOKEN)
    checker.check(proof, method="GET", url=URL, now=NOW, access_token=TOKEN)
    with pytest.raises(DPoPProofError, match="replay"):
        checker.check(proof, method="GET", url=URL, now=NOW + 1, access_token=TOKEN)


def test_the_same_jti_from_another_key_is_not_a_replay() -> None:
    checker = DPoPChecker()
    checker.check(pyjwt_proof(), method="GET", url=URL, now=NOW, access_token=TOKEN)
    checker.check(pyjwt_proof(key=OTHER_EC_KEY), method="GET", url=URL, now=NOW, access_token=TOKEN)


def test_replay_cache_forgets_entries_after_they_expire() -> None:
    cache = MemoryReplayCache()
    assert cache.first_use("k", expires_at=NOW + 10, now=NOW)
    assert not cache.first_use("k", expires_at=NOW + 10, now=NOW + 9)
    assert cache.first_use("k", expires_at=NOW + 30, now=NOW + 11)


def test_replay_cache_is_bounded_and_counts_evictions() -> None:
    cache = MemoryReplayCache(max_entries=3)
    for i in range(10):
        assert cache.first_use(f"k{i}", expires_at=NOW + 100 + i, now=NOW)
    assert len(cache) == 3
    assert cache.evicted == 7
    assert not cache.first_use("k9", expires_at=NOW + 200, now=NOW)


def test_replay_cache_drops_expired_entries_before_evicting_live_ones() -> None:
    cache = MemoryReplayCache(max_entries=2)
    cache.first_use("a", expires_at=NOW + 1, now=NOW)
    cache.first_use("b", expires_at=NOW + 1, now=NOW)
    cache.first_use("c", expires_at=NOW + 100, now=NOW + 5)
    assert cache.evicted == 0
    assert len(cache) == 1


def test_a_proof_refused_for_another_reason_does_not_burn_its_jti() -> None:
    checker = DPoPChecker()
    proof = DPoPKey.generate().proof("GET", URL, now=NOW, access_token=TOKEN)
    with pytest.raises(DPoPProofError):
        checker.check(proof, method="POST", url=URL, now=NOW, access_token=TOKEN)
    checker.check(proof, method="GET", url=URL, now=NOW, access_token=TOKEN)


class SyncOnlyCache:
    """A replay cache of the user's own with only the sync method (it might block)."""

    def __init__(self) -> None:
        self.inner = MemoryReplayCache()
        self.threads: list[int] = []

    def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        self.threads.append(threading.get_ident())
        return self.inner.first_use(key, expires_at=expires_at, now=now)


class AsyncCache(SyncOnlyCache):
    """A replay cache with the async method too: async code must await that one."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited = 0

    async def first_use_async(self, key: str, *, expires_at: float, now: float) -> bool:
        self.awaited += 1
        await anyio.lowlevel.checkpoint()
        return self.inner.first_use(key, expires_at=expires_at, now=now)


def test_only_the_memory_cache_is_taken_for_one_without_io() -> None:
    assert not DPoPChecker().replay_does_io
    assert DPoPChecker(replay_cache=SyncOnlyCache()).replay_does_io
    assert DPoPChecker(replay_cache=AsyncCache()).replay_does_io


@pytest.mark.anyio
async def test_check_async_awaits_an_async_replay_cache_and_refuses_a_replay() -> None:
    cache = AsyncCache()
    checker = DPoPChecker(replay_cache=cache)
    proof = DPoPKey.generate().proof("GET", URL, now=NOW, access_token=TOKEN)
    checked = await checker.check_async(proof, method="GET", url=URL, now=NOW, access_token=TOKEN)
    with pytest.raises(DPoPProofError, match="replay"):
        await checker.check_replay_async(checked, now=NOW + 1)
    assert cache.awaited == 2
    assert cache.threads == []


@pytest.mark.anyio
async def test_a_sync_only_cache_of_ones_own_runs_off_the_event_loop() -> None:
    cache = SyncOnlyCache()
    checker = DPoPChecker(replay_cache=cache)
    proof = DPoPKey.generate().proof("GET", URL, now=NOW, access_token=TOKEN)
    await checker.check_async(proof, method="GET", url=URL, now=NOW, access_token=TOKEN)
    with pytest.raises(DPoPProofError, match="replay"):
        await checker.check_async(proof, method="GET", url=URL, now=NOW, access_token=TOKEN)
    assert len(cache.threads) == 2
    assert threading.get_ident() not in cache.threads


@pytest.mark.anyio
async def test_the_memory_cache_is_checked_inline_in_async_code() -> None:
    checker = DPoPChecker()
    proof = DPoPKey.generate().proof("GET", URL, now=NOW, access_token=TOKEN)
    await checker.check_async(proof, method="GET", url=URL, now=NOW, access_token=TOKEN)
    with pytest.raises(DPoPProofError, match="replay"):
        await checker.check_async(proof, method="GET", url=URL, now=NOW, access_token=TOKEN)


def test_a_replay_cache_error_is_not_swallowed_into_a_pass() -> None:
    class Down:
        def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
            raise ReplayCacheUnavailable("down", retry_after=3)

    checker = DPoPChecker(replay_cache=Down())
    proof = DPoPKey.generate().proof("GET", URL, now=NOW, access_token=TOKEN)
    with pytest.raises(ReplayCacheUnavailable) as raised:
        checker.check(proof, method="GET", url=URL, now=NOW, access_token=TOKEN)
    assert raised.value.retry_after == 3
    assert raised.value.reason == "replay_cache_unavailable"


# --- token binding and policy ---------------------------------------------------------------


def test_token_bound_to_another_key_is_refused() -> None:
    proof = check(GOOD)
    check_token_binding({"cnf": {"jkt": proof.jkt}}, proof)
    with pytest.raises(DPoPProofError):
        check_token_binding({"cnf": {"jkt": VECTORS["jkt"]}}, proof)


def test_binding_reads_verified_claims_objects() -> None:
    # The verifier hands out Claims, whose nested objects are read-only mappings.
    from m2m_client.verify import Claims

    proof = check(GOOD)
    claims = Claims({"iss": "https://issuer.test/", "cnf": {"jkt": proof.jkt}})
    assert token_jkt(claims) == proof.jkt
    check_token_binding(claims, proof)


@pytest.mark.parametrize(
    "claims", [{}, {"cnf": "x"}, {"cnf": {"x5t#S256": "t"}}, {"cnf": {"jkt": 1}}]
)
def test_unbound_or_oddly_bound_token_with_a_proof_is_a_binding_error(
    claims: dict[str, Any],
) -> None:
    with pytest.raises(DPoPBindingError):
        check_token_binding(claims, check(GOOD))


@pytest.mark.parametrize(
    ("policy", "scheme", "jkt", "outcome"),
    [
        ("disabled", "Bearer", None, "bearer"),
        ("disabled", "Bearer", "jkt", "bearer"),
        ("disabled", "DPoP", "jkt", DPoPBindingError),
        ("allowed", "bearer", None, "bearer"),
        ("allowed", "Bearer", "jkt", DPoPBindingError),  # the downgrade
        ("allowed", "DPoP", "jkt", "dpop"),
        ("allowed", "DPoP", None, DPoPBindingError),
        ("required", "Bearer", None, DPoPBindingError),
        ("required", "Bearer", "jkt", DPoPBindingError),
        ("required", "dpop", "jkt", "dpop"),
        ("required", "DPoP", None, DPoPBindingError),
        ("allowed", "Basic", None, DPoPBindingError),
    ],
)
def test_policy_decisions(policy: Any, scheme: str, jkt: str | None, outcome: Any) -> None:
    if isinstance(outcome, str):
        assert dpop_decision(policy, scheme=scheme, token_jkt=jkt) == outcome
    else:
        with pytest.raises(outcome):
            dpop_decision(policy, scheme=scheme, token_jkt=jkt)


def test_unknown_policy_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        dpop_decision("sometimes", scheme="Bearer", token_jkt=None)  # type: ignore[arg-type]


# --- answers ---------------------------------------------------------------------------------


def test_challenge_values_follow_rfc9449_section_7_1() -> None:
    # RFC 9449 §7.1: 'WWW-Authenticate: DPoP algs="ES256 PS256"' for a request without a token.
    assert dpop_challenge(algs=["PS256", "ES256"]) == 'DPoP algs="ES256 PS256"'
    assert dpop_challenge(DPoPProofError("x"), algs=["ES256"]) == (
        'DPoP error="invalid_dpop_proof", algs="ES256"'
    )
    assert dpop_challenge(DPoPBindingError("x"), algs=["ES256"]) == (
        'DPoP error="invalid_token", algs="ES256"'
    )
    assert dpop_challenge(DPoPNonceRequired("x", nonce="n"), algs=["ES256"]).startswith(
        'DPoP error="use_dpop_nonce"'
    )


def test_challenge_description_cannot_break_the_header() -> None:
    value = dpop_challenge("invalid_dpop_proof", description='bad "x"\r\nSet-Cookie: a=b\\')
    assert "\r" not in value
    assert "\n" not in value
    # Percent-encoded, as every integration's challenges are (one renderer): nothing dropped.
    assert 'error_description="bad %22x%22%0D%0ASet-Cookie: a=b%5C"' in value


def test_checker_challenge_names_its_algorithms() -> None:
    checker = DPoPChecker(DPoPSettings(algorithms=frozenset({"ES256", "EdDSA"})))
    assert checker.challenge() == 'DPoP algs="ES256 EdDSA"'


def test_request_url_uses_forwarded_headers_only_when_trusted() -> None:
    parts = {"scheme": "http", "host": "app:8000", "path": "/data"}
    forwarded = {"forwarded_proto": "https, http", "forwarded_host": "api.example.com"}
    assert request_url(**parts, **forwarded) == "http://app:8000/data"
    assert request_url(**parts, **forwarded, trust_forwarded=True) == URL
    assert request_url(**parts, root_path="/v1") == "http://app:8000/v1/data"


@pytest.mark.parametrize("host", ["", "evil.example/x", "a@b", "a b"])
def test_request_url_refuses_a_host_header_that_is_not_a_host(host: str) -> None:
    with pytest.raises(DPoPProofError):
        request_url(scheme="https", host=host, path="/")


def test_settings_refuse_symmetric_or_unknown_algorithms() -> None:
    for algorithms in ({"HS256"}, {"none"}, set()):
        with pytest.raises(ConfigurationError):
            DPoPSettings(algorithms=frozenset(algorithms))
    with pytest.raises(ConfigurationError):
        DPoPSettings(max_age=float("nan"))


# --- hypothesis: never anything but DPoPProofError ---------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**400)
    | st.floats()
    | st.text(max_size=20)
    | st.text(st.characters(categories=["Cs"]), max_size=2),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _only_dpop_errors(proof: Any, **kwargs: Any) -> None:
    with contextlib.suppress(DPoPProofError):
        check(proof, **kwargs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300) | st.lists(st.text(max_size=50), max_size=3))
def test_random_text_raises_only_dpop_proof_errors(proof: Any) -> None:
    _only_dpop_errors(proof)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.sampled_from("AQgw-_.=+/ \u00e9eyJ0"), st.booleans())
def test_mutated_proof_is_refused(position: int, char: str, insert: bool) -> None:
    mutated = GOOD[:position] + char + GOOD[position + (0 if insert else 1) :]
    if mutated.strip(" \t") == GOOD:
        return  # optional whitespace around a header value is not part of it (RFC 9110 §5.5)
    with pytest.raises(DPoPProofError):
        check(mutated)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce", "x"]), JSON),
    st.dictionaries(st.sampled_from(["typ", "alg", "jwk", "crit", "b64", "kid"]), JSON),
)
def test_signed_proofs_with_random_claims_and_headers_raise_only_dpop_errors(
    claims: dict[str, Any], header: dict[str, Any]
) -> None:
    base_header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": _jwk(EC_KEY)}
    base_header.update(header)
    signing_input = f"{b64(json.dumps(base_header).encode())}.{b64(json.dumps(claims).encode())}"
    der = EC_KEY.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(der)
    _only_dpop_errors(f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
    _only_dpop_errors(
        f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}",
        nonces=HmacNonceSource(b"k" * 32),
    )


# No control characters: httpx refuses to send a URL with one (so no proof is made for it).
PATH_CHARS = st.characters(codec="utf-8", exclude_characters="?#", exclude_categories=["Cc"])


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["http", "https", "HTTPS"]),
    st.sampled_from(["api.example.com", "API.Example.com", "127.0.0.1:8443", "[::1]"]),
    st.text(PATH_CHARS, max_size=30),
    st.text(max_size=10),
    st.sampled_from(["GET", "POST", "DELETE", "PATCH"]),
)
def test_our_proof_for_any_url_passes_the_check_for_that_url(
    scheme: str, host: str, path: str, query: str, method: str
) -> None:
    # Both sides normalise htu the same way, whatever the path holds.
    url = f"{scheme}://{host}/{path}?{query}"
    proof = KEY.proof(method, url, now=NOW, access_token=TOKEN)
    check(proof, method=method, url=url)
    check(proof, method=method, url=url.partition("?")[0])


KEY = DPoPKey.generate()
