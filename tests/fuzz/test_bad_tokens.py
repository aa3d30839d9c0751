"""A corpus of malformed and malicious tokens, each rejected with the right error, plus
hypothesis: random input and mutated valid tokens never raise anything but VerificationError."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2m_client.errors import ExpiredToken, InvalidToken, VerificationError
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier
from tests.unit._jwt_factory import (
    AUDIENCE,
    ISSUER,
    NOW,
    FakeClock,
    JwksEndpoint,
    b64,
    claims,
    ec_key,
    jwks,
    public_jwk,
    rsa_key,
    sign,
    verifier_options,
)

ENDPOINT = JwksEndpoint(keys=jwks(public_jwk(rsa_key(), "k1"), public_jwk(ec_key(), "ec1")))
OPTIONS = verifier_options(FakeClock(), algorithms=["RS256", "ES256"])


def verifier() -> TokenVerifier:
    return TokenVerifier(http_client=httpx.Client(transport=ENDPOINT.transport()), **OPTIONS)


def signed_raw(header: dict[str, Any], payload: bytes) -> str:
    """RS256-sign arbitrary payload bytes with the trusted key (valid signature)."""
    signing_input = f"{b64(json.dumps(header))}.{b64(payload)}"
    sig = rsa_key().sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(sig)}"


def hs256_with_public_key(kid: str = "k1") -> str:
    pem = (
        rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': kid}))}.{b64(json.dumps(claims()))}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def unsigned(alg: str, signature: str = "") -> str:
    return f"{b64(json.dumps({'alg': alg, 'kid': 'k1'}))}.{b64(json.dumps(claims()))}.{signature}"


def with_header(**header: Any) -> str:
    return sign(claims(), headers=header)


def attacker_signed(**header: Any) -> str:
    return sign(claims(), rsa_key("attacker"), headers=header)


VALID = sign(claims())
H, P, S = VALID.split(".")


def _flip_signature() -> str:
    middle = len(S) // 2
    return f"{H}.{P}.{S[:middle]}{'A' if S[middle] != 'A' else 'B'}{S[middle + 1 :]}"


def _noncanonical_signature() -> str:
    # 256-byte signature -> 342 chars, 4k+2: last char carries 4 unused bits.
    return f"{H}.{P}.{S[:-1]}{'B' if S[-1] != 'B' else 'C'}"


CORPUS: dict[str, tuple[Callable[[], object], type[VerificationError]]] = {
    "empty": (lambda: "", InvalidToken),
    "just_dots": (lambda: "..", InvalidToken),
    "not_a_string": (lambda: 12345, InvalidToken),
    "truncated": (lambda: VALID[: len(VALID) // 2], InvalidToken),
    "two_segments": (lambda: f"{H}.{P}", InvalidToken),
    "stripped_signature": (lambda: f"{H}.{P}.", InvalidToken),
    "extra_segment": (lambda: f"{VALID}.{S}", InvalidToken),
    "jwe_five_segments": (lambda: f"{H}.{P}.{S}.{S}.{S}", InvalidToken),
    "bad_base64_char": (lambda: f"{H}.{P}+.{S}", InvalidToken),
    "padded_segment": (lambda: f"{H}.{P}.{S}==", InvalidToken),
    "whitespace_inside": (lambda: f"{H}. {P}.{S}", InvalidToken),
    "bearer_prefix_included": (lambda: f"Bearer {VALID}", InvalidToken),
    "non_ascii": (lambda: f"{H}.{P}é.{S}", InvalidToken),
    "non_json_header": (lambda: f"{b64('not json')}.{P}.{S}", InvalidToken),
    "array_header": (lambda: f"{b64('[]')}.{P}.{S}", InvalidToken),
    "deeply_nested_header": (lambda: f"{b64('[' * 1000 + ']' * 1000)}.{P}.{S}", InvalidToken),
    "huge_header": (lambda: with_header(pad="x" * 4000), InvalidToken),
    "huge_token": (lambda: sign(claims(pad="x" * 20000)), InvalidToken),
    "alg_none_unsigned": (lambda: unsigned("none"), InvalidToken),
    "alg_none_with_signature": (lambda: unsigned("none", S), InvalidToken),
    "alg_None": (lambda: unsigned("None", S), InvalidToken),
    "alg_NONE": (lambda: unsigned("NONE", S), InvalidToken),
    "alg_missing": (lambda: f"{b64(json.dumps({'kid': 'k1'}))}.{P}.{S}", InvalidToken),
    "alg_not_string": (lambda: f"{b64(json.dumps({'alg': ['RS256']}))}.{P}.{S}", InvalidToken),
    "hs256_signed_with_public_key": (hs256_with_public_key, InvalidToken),
    "alg_not_allowed_ps256": (lambda: sign(claims(), alg="PS256"), InvalidToken),
    "rs256_claiming_ec_key": (lambda: sign(claims(), kid="ec1"), InvalidToken),
    "es256_claiming_rsa_key": (lambda: sign(claims(), ec_key(), alg="ES256"), InvalidToken),
    "es256_der_signature": (
        lambda: (
            f"{H.replace(H, b64(json.dumps({'alg': 'ES256', 'kid': 'ec1'})))}.{P}.{b64(b'0' * 70)}"
        ),
        InvalidToken,
    ),
    "wrong_kid": (lambda: sign(claims(), kid="unknown-kid"), InvalidToken),
    "kid_path_traversal": (lambda: sign(claims(), kid="../../../../dev/null"), InvalidToken),
    "kid_sql_injection": (lambda: sign(claims(), kid="' OR '1'='1"), InvalidToken),
    "kid_not_string": (
        lambda: signed_raw({"alg": "RS256", "kid": 7}, json.dumps(claims()).encode()),
        InvalidToken,
    ),
    "signature_from_another_key": (lambda: attacker_signed(), InvalidToken),
    "signature_bit_flipped": (_flip_signature, InvalidToken),
    "signature_non_canonical": (_noncanonical_signature, InvalidToken),
    "payload_swapped": (lambda: f"{H}.{b64(json.dumps(claims(sub='admin')))}.{S}", InvalidToken),
    "jku_header": (lambda: attacker_signed(jku="https://attacker.example/jwks"), InvalidToken),
    "jwk_header_embedded_key": (
        lambda: attacker_signed(jwk=public_jwk(rsa_key("attacker"), "k1")),
        InvalidToken,
    ),
    "x5u_header": (lambda: attacker_signed(x5u="https://attacker.example/cert"), InvalidToken),
    "crit_unknown": (lambda: with_header(crit=["exp"]), InvalidToken),
    "b64_false": (lambda: with_header(b64=False, crit=["b64"]), InvalidToken),
    "expired": (lambda: sign(claims(exp=int(NOW) - 3600)), ExpiredToken),
    "expired_just_beyond_leeway": (lambda: sign(claims(exp=int(NOW) - 30)), ExpiredToken),
    "not_yet_valid": (lambda: sign(claims(nbf=int(NOW) + 3600)), InvalidToken),
    "issued_in_the_future": (lambda: sign(claims(iat=int(NOW) + 86400)), InvalidToken),
    "wrong_issuer": (lambda: sign(claims(iss="https://evil.test/")), InvalidToken),
    "issuer_without_trailing_slash": (lambda: sign(claims(iss=ISSUER.rstrip("/"))), InvalidToken),
    "wrong_audience": (lambda: sign(claims(aud="https://other.api")), InvalidToken),
    "audience_as_object": (lambda: sign(claims(aud={"aud": AUDIENCE})), InvalidToken),
    "audience_list_with_number": (lambda: sign(claims(aud=[1, AUDIENCE])), InvalidToken),
    "exp_as_string": (lambda: sign(claims(exp=str(int(NOW) + 3600))), InvalidToken),
    "exp_as_bool": (lambda: sign(claims(exp=True)), InvalidToken),
    "exp_missing": (lambda: sign({k: v for k, v in claims().items() if k != "exp"}), InvalidToken),
    "payload_not_json": (lambda: signed_raw({"alg": "RS256", "kid": "k1"}, b"{nope"), InvalidToken),
    "payload_json_array": (lambda: signed_raw({"alg": "RS256", "kid": "k1"}, b"[1]"), InvalidToken),
    "permissions_not_a_list": (lambda: sign(claims(permissions="admin")), InvalidToken),
}


def test_the_corpus_has_at_least_40_tokens() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_token_is_rejected_with_the_right_error(name: str) -> None:
    make, expected = CORPUS[name]
    with pytest.raises(VerificationError) as info:
        verifier().verify(make())  # type: ignore[arg-type]
    assert type(info.value) is expected, str(info.value)


def test_the_valid_control_token_verifies() -> None:
    assert verifier().verify(VALID).subject == "worker@clients"


@pytest.mark.anyio
async def test_the_async_verifier_rejects_the_whole_corpus_the_same_way() -> None:
    async_verifier = AsyncTokenVerifier(
        http_client=httpx.AsyncClient(transport=ENDPOINT.transport()), **OPTIONS
    )
    for name, (make, expected) in CORPUS.items():
        with pytest.raises(VerificationError) as info:
            await async_verifier.verify(make())  # type: ignore[arg-type]
        assert type(info.value) is expected, name


SHARED = verifier()
SHARED.verify(VALID)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_verification_errors(value: object) -> None:
    with contextlib.suppress(VerificationError):
        SHARED.verify(value)  # type: ignore[arg-type]


@FUZZ
@given(st.text(max_size=400))
def test_random_text_never_raises_anything_but_verification_error(value: str) -> None:
    _only_verification_errors(value)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_never_raise_anything_but_verification_error(value: bytes) -> None:
    _only_verification_errors(value)


@FUZZ
@given(st.lists(st.from_regex(r"[A-Za-z0-9_-]{0,60}", fullmatch=True), min_size=1, max_size=6))
def test_random_base64url_segments_never_raise_anything_but_verification_error(
    segments: list[str],
) -> None:
    _only_verification_errors(".".join(segments))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64", "x"]), _json),
    payload=_json,
)
def test_random_json_headers_and_payloads_never_raise_anything_but_verification_error(
    header: dict[str, Any], payload: Any
) -> None:
    _only_verification_errors(f"{b64(json.dumps(header))}.{b64(json.dumps(payload))}.{S}")


@FUZZ
@given(
    position=st.integers(min_value=0, max_value=len(VALID) - 1),
    replacement=st.text(max_size=3),
    delete=st.integers(min_value=0, max_value=3),
)
def test_mutated_valid_tokens_are_rejected_and_nothing_but_verification_error_escapes(
    position: int, replacement: str, delete: int
) -> None:
    mutated = VALID[:position] + replacement + VALID[position + delete :]
    if mutated == VALID:
        assert SHARED.verify(mutated).subject == "worker@clients"
        return
    with pytest.raises(VerificationError):
        SHARED.verify(mutated)


# Signed tokens with arbitrary values in the registered and authorization claims: the
# signature verifies, so every claim check sees the value (400-digit numbers, null, nesting).
_claim_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children)
    ),
    max_leaves=8,
)
_NESTED = st.integers(min_value=0, max_value=600).map(
    lambda depth: json.loads("[" * depth + "1" + "]" * depth)
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    overrides=st.dictionaries(
        st.sampled_from(
            [
                "exp",
                "nbf",
                "iat",
                "sub",
                "jti",
                "aud",
                "iss",
                "scope",
                "scp",
                "permissions",
                "roles",
                "azp",
                "client_id",
                "cid",
                "deep",
            ]
        ),
        _claim_value | _NESTED,
        max_size=4,
    )
)
def test_signed_tokens_with_arbitrary_claim_values_raise_only_verification_errors(
    overrides: dict[str, Any],
) -> None:
    from jwt.algorithms import ECAlgorithm

    signing_input = (
        f"{b64(json.dumps({'alg': 'ES256', 'kid': 'ec1'}))}.{b64(json.dumps(claims(**overrides)))}"
    )
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), ec_key())
    tok = f"{signing_input}.{b64(signature)}"
    if not overrides:  # the control: the construction itself makes valid tokens
        assert SHARED.verify(tok).subject == "worker@clients"
    with contextlib.suppress(VerificationError):
        SHARED.verify(tok)
