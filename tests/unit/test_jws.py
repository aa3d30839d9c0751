"""Compact JWS parsing and header checks (m2m_client/verify/_jws.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from m2m_client._jose import EC_SCHEMES, MAX_TOKEN_LENGTH, RSA_HASHES, RSA_SCHEMES
from m2m_client.errors import InvalidToken
from m2m_client.verify._jws import (
    HeaderCache,
    b64url_decode,
    check_header,
    json_object,
    parse_compact,
)

from ._jwt_factory import b64, claims, raw_token, refused, token

ALGS = frozenset({"RS256", "ES256"})


def test_a_valid_token_is_split_into_header_signing_input_and_signature() -> None:
    tok = token()
    parsed = parse_compact(tok)
    assert parsed.header == {"alg": "RS256", "kid": "k1", "typ": "JWT"}
    assert parsed.signing_input == tok.rsplit(".", 1)[0].encode()
    assert len(parsed.signature) == 256
    assert parsed.payload()["sub"] == "worker@clients"


@pytest.mark.parametrize(
    ("tok", "message"),
    [
        ("a.b", "segments"),
        ("a.b.c.d", "segments"),
        ("aaaa.bbbb.cccc.dddd.eeee", "JWE"),
        ("eyJhbGciOiJSUzI1NiJ9..c2ln", "payload is empty"),
        ("eyJhbGciOiJSUzI1NiJ9.e30.", "signature is empty"),
        ("eyJhbGciOiJSUzI1NiJ9.e30=.c2ln", "base64url"),
        ("eyJhbGciOiJSUzI1NiJ9.e3+0.c2ln", "base64url"),
        ("eyJhbGciOiJSUzI1NiJ9.e30.c2l n", "base64url"),
    ],
)
def test_malformed_compact_forms_are_rejected_with_a_clear_reason(tok: str, message: str) -> None:
    with refused("malformed", match=message):
        parse_compact(tok)


def test_non_canonical_last_character_is_rejected_so_each_token_has_one_spelling() -> None:
    # "e30" decodes to "{}"; "e31" decodes to the same bytes with non-zero unused bits.
    assert b64url_decode("e30", "x") == b"{}"
    with refused("malformed"):
        b64url_decode("e31", "x")
    with refused("malformed"):
        b64url_decode("QR", "x")  # 'R' leaves 4 unused bits set
    assert b64url_decode("QQ", "x") == b"A"


def test_a_segment_of_length_4k_plus_1_is_never_valid() -> None:
    with pytest.raises(InvalidToken):
        b64url_decode("abcde", "x")


def test_non_canonical_signature_and_payload_are_rejected() -> None:
    h, p, s = token().split(".")
    last = s[-1]
    other = "B" if last == "A" else chr(ord(last) + 1)
    if len(s) % 4:
        with refused("malformed"):
            parse_compact(f"{h}.{p}.{s[:-1]}{other}")
    with refused("malformed"):
        parse_compact(f"{h}.e31.{s}")


def test_oversized_token_and_header_are_rejected_before_decoding() -> None:
    with refused("malformed"):
        parse_compact("a" * (MAX_TOKEN_LENGTH + 1))
    big_header = b64(json.dumps({"alg": "RS256", "x": "y" * 3000}))
    with refused("malformed"):
        parse_compact(f"{big_header}.e30.c2ln")


@pytest.mark.parametrize("header", ["bm90IGpzb24", b64("[1,2]"), b64('"str"'), b64(b"\xff\xfe")])
def test_header_must_be_a_json_object(header: str) -> None:
    with refused("malformed"):
        parse_compact(f"{header}.e30.c2ln")


def test_payload_that_is_not_a_json_object_is_rejected_after_the_signature() -> None:
    parsed = parse_compact(raw_token({"alg": "RS256"}, b64("[1]")))
    with refused("malformed"):
        parsed.payload()
    parsed = parse_compact(raw_token({"alg": "RS256"}, b64("{nope")))
    with refused("malformed"):
        parsed.payload()


@pytest.mark.parametrize(
    "obj",
    [None, 42, ["a.b.c"], "é.b.c", b"\xff.b.c"],
    ids=["none", "int", "list", "nonascii", "bytes"],
)
def test_non_string_or_non_ascii_tokens_are_rejected(obj: object) -> None:
    with pytest.raises(InvalidToken):
        parse_compact(obj)


def test_ascii_bytes_tokens_are_accepted() -> None:
    assert parse_compact(token().encode()).header["alg"] == "RS256"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_case_is_rejected(alg: str) -> None:
    with refused("algorithm"):
        check_header({"alg": alg}, ALGS, None)


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "hs256"])
def test_hmac_algorithms_are_rejected_as_algorithm_confusion(alg: str) -> None:
    with refused("algorithm"):
        check_header({"alg": alg}, ALGS, None)


@pytest.mark.parametrize("header", [{}, {"alg": 256}, {"alg": None}, {"alg": "PS256"}])
def test_missing_wrong_type_or_unlisted_alg_is_rejected(header: dict[str, object]) -> None:
    with refused("algorithm"):
        check_header(header, ALGS, None)


@pytest.mark.parametrize("name", ["jku", "jwk", "x5u", "zip"])
def test_headers_that_name_their_own_key_are_rejected_never_followed(name: str) -> None:
    with pytest.raises(InvalidToken):
        check_header({"alg": "RS256", name: "https://attacker.example/jwks"}, ALGS, None)


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "b64"])
def test_any_crit_header_is_rejected_because_no_extension_is_supported(crit: object) -> None:
    with refused("header"):
        check_header({"alg": "RS256", "crit": crit}, ALGS, None)


@pytest.mark.parametrize("b64_value", [False, 0, "false"])
def test_unencoded_payload_b64_false_is_rejected(b64_value: object) -> None:
    with refused("header"):
        check_header({"alg": "RS256", "b64": b64_value}, ALGS, None)


@pytest.mark.parametrize(
    "kid", ["", 7, "a" * 257, "../../etc/passwd", "k\n1", 'k"1', "k 1", "k\\1", "kid\x00"]
)
def test_kid_must_be_a_short_printable_identifier(kid: object) -> None:
    with refused("header"):
        check_header({"alg": "RS256", "kid": kid}, ALGS, None)


@pytest.mark.parametrize("kid", ["k1", "nOo3ZDrODXEK1jKWhXslHR_KXEg", "abc+/def=", "urn:key:1"])
def test_real_world_kid_shapes_are_accepted(kid: str) -> None:
    assert check_header({"alg": "RS256", "kid": kid}, ALGS, None) == ("RS256", kid)


def test_x5c_and_x5t_headers_are_ignored() -> None:
    assert check_header({"alg": "ES256", "x5t": "abc", "x5c": ["MII"]}, ALGS, None) == (
        "ES256",
        None,
    )


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/At+JWT"])
def test_typ_at_jwt_is_accepted_when_configured(typ: str) -> None:
    assert check_header({"alg": "RS256", "typ": typ}, ALGS, "at+jwt")[0] == "RS256"


@pytest.mark.parametrize("typ", [None, "JWT", "id+jwt", 1])
def test_other_typ_is_rejected_when_at_jwt_is_configured(typ: object) -> None:
    header: dict[str, object] = {"alg": "RS256"}
    if typ is not None:
        header["typ"] = typ
    with refused("token_type"):
        check_header(header, ALGS, "at+jwt")


def test_typ_is_not_checked_when_not_configured() -> None:
    assert check_header({"alg": "RS256", "typ": "JWT"}, ALGS, None) == ("RS256", None)


def test_error_messages_never_contain_the_token() -> None:
    tok = token(scope="secret-scope-value")
    h, p, s = tok.split(".")
    for bad in (f"{h}.{p}", f"{h}.{p}.{s}.{s}", f"{h}.{p}x.{s}", f"{h}!.{p}.{s}"):
        with pytest.raises(InvalidToken) as info:
            parse_compact(bad)
        assert p not in str(info.value)
        assert s[:20] not in str(info.value)


def test_claims_helper_builds_payload() -> None:
    assert claims()["iss"].startswith("https://")


def test_header_cache_is_filled_only_by_verified_tokens_and_evicts_the_oldest() -> None:
    cache = HeaderCache(size=4)
    first = parse_compact(token(), cache)
    assert len(cache) == 0  # parsing alone (no signature checked yet) caches nothing
    cache.add(first.header_segment, first.header)
    second = parse_compact(token(jti="x"), cache)
    assert second.header is first.header
    for i in range(10):
        parsed = parse_compact(raw_token({"alg": "RS256", "kid": f"k{i}"}, {}), cache)
        cache.add(parsed.header_segment, parsed.header)
    assert len(cache) == 4
    assert cache.get(first.header_segment) is None  # oldest evicted, newest kept
    assert cache.get(parsed.header_segment) is parsed.header


def test_junk_headers_never_reach_the_verifiers_header_cache() -> None:
    from m2m_client.verify import TokenVerifier

    from ._jwt_factory import FakeClock, verifier_options

    verifier = TokenVerifier(**verifier_options(FakeClock()))
    for i in range(300):
        with pytest.raises(InvalidToken):
            verifier.verify(raw_token({"alg": "HS256", "kid": f"k{i}"}, {}))
    assert len(verifier._core.headers) == 0


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b'{"a": 1}', True),
        (b' {"a": 1} \n', True),
        (b'{"a": 1} x', False),
        ('{"a": 1}'.encode("utf-16"), False),
        (b'{"a": "\xff"}', False),
        (b"[" * 5000 + b"]" * 5000, False),
    ],
)
def test_json_must_be_one_utf8_object(raw: bytes, ok: bool) -> None:
    if ok:
        assert json_object(raw, "header") == {"a": 1}
    else:
        with pytest.raises(InvalidToken):
            json_object(raw, "header")


# --- signatures with more than one spelling ---------------------------------------------


def _ps256_token_whose_signature_starts_with_zero() -> tuple[str, Any]:
    from ._jwt_factory import rsa_key, sign

    key = rsa_key()
    for i in range(5000):  # about 1 in 256 PSS signatures starts with a zero byte
        tok = sign(claims(jti=str(i)), key, alg="PS256")
        if jwt_b64decode(tok.split(".")[2])[0] == 0:
            return tok, key
    raise AssertionError("no signature with a leading zero byte found")


def jwt_b64decode(segment: str) -> bytes:
    import jwt.utils

    return jwt.utils.base64url_decode(segment)


def test_an_rsa_signature_one_byte_short_is_refused_though_openssl_accepts_it() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from m2m_client.verify._jws import check_signature

    tok, key = _ps256_token_whose_signature_starts_with_zero()
    header, payload, signature = tok.split(".")
    short = jwt_b64decode(signature)[1:]
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=hashes.SHA256.digest_size)
    # The library underneath accepts the short spelling: the length check is ours.
    key.public_key().verify(short, f"{header}.{payload}".encode(), pss, hashes.SHA256())
    check_signature(parse_compact(tok), "PS256", key.public_key())
    with pytest.raises(InvalidToken) as caught:
        check_signature(
            parse_compact(f"{header}.{payload}.{b64(short)}"), "PS256", key.public_key()
        )
    assert caught.value.reason == "signature"


def test_es256_high_s_is_a_second_accepted_spelling_and_takes_a_second_cache_entry() -> None:
    # JWS (RFC 7518 §3.4) does not require low S, so (r, n - s) verifies too; the cache
    # is keyed by the token string, so the two spellings are two entries.
    from m2m_client.verify import TokenVerifier

    from ._jwt_factory import (
        FakeClock,
        JwksEndpoint,
        ec_key,
        jwks,
        public_jwk,
        sign,
        verifier_options,
    )

    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    low = sign(claims(), ec_key(), alg="ES256")
    header, payload, signature = low.split(".")
    raw = jwt_b64decode(signature)
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    high = f"{header}.{payload}.{b64(r + (n - s).to_bytes(32, 'big'))}"
    ep = JwksEndpoint(keys=jwks(public_jwk(ec_key(), "k1")))
    verifier = TokenVerifier(
        http_client=httpx.Client(transport=ep.transport()),
        **verifier_options(FakeClock(), algorithms="ES256"),
    )
    assert verifier.verify(low).subject == verifier.verify(high).subject
    assert len(verifier._core.tokens) == 2


def test_a_token_with_the_bearer_prefix_gets_a_message_that_says_so() -> None:
    with pytest.raises(InvalidToken, match="without the 'Bearer ' prefix") as caught:
        parse_compact(f"Bearer {token()}")
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"alg": "HS256"}, "algorithm"),
        ({"alg": "none"}, "algorithm"),
        ({"alg": "RS256", "jku": "https://evil.test/"}, "header"),
        ({"alg": "RS256", "crit": ["exp"]}, "header"),
        ({"alg": "RS256", "kid": "../../etc"}, "header"),
        ({"alg": "RS256", "typ": "JWT"}, "token_type"),
    ],
)
def test_header_rejections_carry_a_stable_reason(header: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        check_header(header, frozenset({"RS256"}), "at+jwt")
    assert caught.value.reason == reason


def test_a_header_checked_on_a_verified_token_is_not_checked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from m2m_client.verify import TokenVerifier, _decisions

    from ._jwt_factory import FakeClock, JwksEndpoint, verifier_options

    ep = JwksEndpoint()
    verifier = TokenVerifier(
        http_client=httpx.Client(transport=ep.transport()), **verifier_options(FakeClock())
    )
    verifier.verify(token(jti="first"))
    calls: list[object] = []
    real = _decisions.check_header
    monkeypatch.setattr(_decisions, "check_header", lambda *a: calls.append(a) or real(*a))
    assert verifier.verify(token(jti="second")).subject == "worker@clients"
    assert calls == []  # same header segment, same policy: the verdict is remembered
    # ... but only the header's: a token with that header and a bad signature is refused.
    h, p, _ = token(jti="third").split(".")
    with refused("signature"):
        verifier.verify(f"{h}.{p}.{token(jti='first').split('.')[2]}")
    other = token(jti="fourth", x=1)
    with refused("algorithm"):
        verifier.verify(raw_token({"alg": "HS256", "kid": "k1"}, claims()))
    assert len(calls) == 1  # a header never seen on a verified token is checked
    assert verifier.verify(other).subject == "worker@clients"


@pytest.mark.parametrize(
    "bad",
    [
        "ab.cd",
        "ab.cd.ef.gh",
        "a.cd.ef",
        "ab.c.ef",
        "ab.cd.e",
        ".cd.ef",
        "ab..ef",
        "ab.cd.",
        "ab.cd.ef=",
        "ab.c+.ef",
        "ab.cd.e/",
        "ab.cd.éé",
        "ab.cd.e f",
        "a" * 2049 + ".cd.ef",
    ],
)
def test_every_shape_or_alphabet_fault_is_invalid_token_before_any_decoding(bad: str) -> None:
    with refused("malformed"):
        parse_compact(bad)


_EC_ORDERS = {  # the group orders, for the (r, n - s) spelling of a signature
    "P-256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "P-384": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "P-521": int(
        "01FF"
        + "FFFFFFFF" * 7
        + "FFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}


@pytest.mark.parametrize(
    ("alg", "curve"),
    [
        ("ES256", "P-256"),
        ("ES256K", "secp256k1"),
        ("ES384", "P-384"),
        ("ES512", "P-521"),
        ("ES521", "P-521"),
    ],
)
def test_ecdsa_verdicts_are_pyjwts_on_every_spelling(alg: str, curve: str) -> None:
    """check_signature verifies ECDSA through cryptography directly (no PyJWT algorithm
    object per call); on every spelling of a signature its verdict must stay PyJWT's."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from jwt.algorithms import get_default_algorithms

    from m2m_client.verify._jws import ParsedToken

    curves = {"P-256": ec.SECP256R1, "secp256k1": ec.SECP256K1, "P-384": ec.SECP384R1}
    private = ec.generate_private_key(curves.get(curve, ec.SECP521R1)())
    public = private.public_key()
    header, payload, encoded = jwt.encode({"sub": "x"}, private, algorithm=alg).split(".")
    signature = jwt_b64decode(encoded)
    size = len(signature) // 2
    r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    spellings = {
        "as signed": signature,
        "(r, n - s)": signature[:size] + (_EC_ORDERS[curve] - s).to_bytes(size, "big"),
        "one byte short": signature[:-1],
        "one byte long": signature + b"\0",
        "DER": encode_dss_signature(r, s),
        "a bit flipped": signature[:-1] + bytes([signature[-1] ^ 1]),
        "r and s swapped": signature[size:] + signature[:size],
        "zeros": bytes(len(signature)),
        "empty": b"",
    }
    pyjwt = get_default_algorithms()[alg]
    verdicts = {}
    for name, spelling in spellings.items():
        parsed = ParsedToken({}, f"{header}.{payload}".encode(), payload, spelling)
        verdicts[name] = _refusal_reason(parsed, alg, public)
        assert verdicts[name] in (None, "signature"), name
        assert (verdicts[name] is None) is pyjwt.verify(parsed.signing_input, public, spelling), (
            name
        )
    accepted = {name for name, reason in verdicts.items() if reason is None}
    assert accepted == {"as signed", "(r, n - s)"}


def _refusal_reason(parsed: Any, alg: str, key: Any) -> str | None:
    from m2m_client.verify._jws import check_signature

    try:
        check_signature(parsed, alg, key)
    except InvalidToken as exc:
        return exc.reason
    return None


def test_the_signature_schemes_are_pyjwts_choices() -> None:
    # _jose's tables replace PyJWT's algorithm objects on the hot path: same names, same hash
    # (EC aliases included), PSS with PyJWT's MGF1/digest-length salt, PKCS#1 v1.5 otherwise.
    from cryptography.hazmat.primitives.asymmetric import padding
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm, RSAPSSAlgorithm, get_default_algorithms

    pyjwt = get_default_algorithms()
    ec = {name: alg.hash_alg.name for name, alg in pyjwt.items() if isinstance(alg, ECAlgorithm)}
    assert {name: scheme.algorithm.name for name, scheme in EC_SCHEMES.items()} == ec
    rsa = {name: alg for name, alg in pyjwt.items() if isinstance(alg, RSAAlgorithm)}
    assert set(RSA_SCHEMES) == set(rsa) == set(RSA_HASHES)
    for name, (pad, digest) in RSA_SCHEMES.items():
        assert digest.name == rsa[name].hash_alg.name
        pss = isinstance(rsa[name], RSAPSSAlgorithm)
        assert isinstance(pad, padding.PSS if pss else padding.PKCS1v15)
