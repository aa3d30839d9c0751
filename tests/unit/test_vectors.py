"""External vectors (tests/vectors/, provenance in its README) through the verifier's own path.

Wycheproof's JWS/JWK/JWE cases and the RFC examples run through the same functions
``verify()`` uses: ``parse_compact`` -> ``check_header`` -> ``parse_jwks`` / ``KeySet.find``
-> ``check_signature``. Their payloads ("foo", empty, binary) are not access tokens, so
they are signature-layer-only; the RFC 7515 A.2 / A.3 JWTs also go through the whole
``TokenVerifier.verify``. The raw signature vectors (ECDSA P-256/P-384, RSA PKCS#1 and PSS
2048, Ed25519) sign arbitrary bytes that no compact JWS can carry, so they go through
``check_signature`` with their key parsed by ``parse_jwks``. Where an access-token verifier's
verdict differs from the vector's, the reason is written next to the case (``-v`` shows it).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from m2m_client.errors import InvalidToken, VerificationError
from m2m_client.verify import TokenVerifier
from m2m_client.verify._jwks import SUPPORTED_ALGORITHMS, parse_jwks
from m2m_client.verify._jws import ParsedToken, check_header, check_signature, parse_compact

from ._jwt_factory import FakeClock, streamed

VECTORS = Path(__file__).parent.parent / "vectors"
ALL_ALGORITHMS = frozenset(SUPPORTED_ALGORITHMS)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def signature_layer(jws: object, jwks: dict[str, Any]) -> tuple[bool, str]:
    """The verifier's verdict on a JWS, without the claims (accepted, reason)."""
    if not isinstance(jws, str):
        return False, "malformed"  # JSON serialization as a parsed object
    try:
        parsed = parse_compact(jws)
        alg, kid = check_header(parsed.header, ALL_ALGORITHMS, None)
        try:
            keys = parse_jwks(json.dumps(jwks).encode())
        except ValueError:
            return False, "no usable key"
        key = keys.find(kid, alg)
        if key is None:
            return False, "unknown_kid"
        check_signature(parsed, alg, key.key)
    except InvalidToken as exc:
        return False, exc.reason
    return True, ""


def _group_keys(group: dict[str, Any]) -> dict[str, Any]:
    key = group.get("public") or group.get("private") or {}
    return key if "keys" in key else {"keys": [key]}


def _header_alg(jws: object) -> str:
    if not isinstance(jws, str) or jws.count(".") != 2:
        return ""
    segment = jws.split(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        return ""
    return str(header.get("alg", "")) if isinstance(header, dict) else ""


def our_expectation(case: dict[str, Any], group: dict[str, Any]) -> tuple[bool, str]:
    """The vector's verdict, or where an access-token verifier must differ, ours and why."""
    jws = case.get("jws", case.get("jwe"))
    vector_accepts = case["result"] == "valid"
    if "jwe" in case:
        return False, "JWE: only signed (JWS) access tokens are accepted"
    if not isinstance(jws, str) or jws.lstrip().startswith("{"):
        return False, "JSON serialization: access tokens use the compact serialization"
    alg = _header_alg(jws)
    if alg.upper().startswith("HS") or alg.lower() == "none":
        return False, "HMAC / none: the issuer's keys are public, symmetric algs are refused"
    if not vector_accepts:
        return False, "the vector's own verdict"
    if jws.split(".")[1] == "":
        return False, "empty payload: an access token always has claims"
    if group.get("comment", "").startswith("rfc7520") and case["comment"] in (
        "Figure20",
        "Figure27",
    ):
        return False, "the JWK's alg (PS256 / ES521) is not the token's: key-algorithm binding"
    return True, "the vector's own verdict"


def wycheproof_jose_cases() -> list[Any]:
    cases = []
    for name in ("json_web_signature_test.json", "json_web_key_test.json"):
        for group in load(name)["testGroups"]:
            for case in group["tests"]:
                cases.append(
                    pytest.param(case, group, id=f"{name.split('_test')[0]}-{case['tcId']}")
                )
    for group in load("json_web_crypto_test.json")["testGroups"]:
        for case in group["tests"]:
            cases.append(pytest.param(case, group, id=f"json_web_crypto-{case['tcId']}"))
    return cases


@pytest.mark.parametrize(("case", "group"), wycheproof_jose_cases())
def test_wycheproof_jose_vectors(case: dict[str, Any], group: dict[str, Any]) -> None:
    accept, why = our_expectation(case, group)
    accepted, reason = signature_layer(case.get("jws", case.get("jwe")), _group_keys(group))
    assert accepted is accept, f"{case['comment']}: expected {accept} ({why}), got {reason}"


def rfc_cases() -> list[Any]:
    return [pytest.param(v, id=v["id"]) for v in load("rfc_examples.json")["vectors"]]


@pytest.mark.parametrize("vector", rfc_cases())
def test_rfc_examples(vector: dict[str, Any]) -> None:
    jwks = vector["jwks"] if isinstance(vector["jwks"], dict) else {"keys": vector["jwks"]}
    accepted, reason = signature_layer(vector["token"], jwks)
    assert accepted is (vector["expect"] == "accept"), vector.get("why", reason)


@pytest.mark.parametrize("vector_id", ["rfc7515-A.2", "rfc7515-A.3"])
def test_rfc_7515_jwts_pass_the_whole_verify_path(vector_id: str) -> None:
    (vector,) = [v for v in load("rfc_examples.json")["vectors"] if v["id"] == vector_id]
    jwks = {"keys": vector["jwks"]} if isinstance(vector["jwks"], list) else vector["jwks"]
    transport = httpx.MockTransport(lambda request: streamed(200, jwks))
    # The RFC's JWT: {"iss":"joe","exp":1300819380,"http://example.com/is_root":true}, no aud.
    verifier = TokenVerifier(
        issuer="joe",
        audience=None,
        expected_claims={"iss": "joe"},
        jwks_url="https://issuer.test/jwks",
        algorithms=["RS256", "ES256"],
        clock=FakeClock(1300819380 - 60),
        http_client=httpx.Client(transport=transport),
    )
    claims = verifier.verify(vector["token"])
    assert claims["http://example.com/is_root"] is True
    verifier._core.clock = FakeClock(1300819380 + 60)  # past exp + leeway
    verifier.clear_cache()
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(vector["token"])
    assert caught.value.reason == "expired"


RAW_FILES = {
    "ecdsa_secp256r1_sha256_p1363_test.json": "ES256",
    "ecdsa_secp384r1_sha384_p1363_test.json": "ES384",
    "rsa_signature_2048_sha256_test.json": "RS256",
    "rsa_pss_2048_sha256_mgf1_32_test.json": "PS256",
    "ed25519_test.json": "EdDSA",
}
# Wycheproof "acceptable" (either verdict is allowed) and what this verifier decides.
ACCEPTABLE = {
    ("rsa_signature_2048_sha256_test.json", 8): (False, "DigestInfo without NULL: refused"),
}


def _jwk_of(group: dict[str, Any]) -> dict[str, Any]:
    jwk = group.get("publicKeyJwk") or group.get("keyJwk")
    if jwk is None:  # an EC group given only as a point (e.g. off the curve)
        point, size = group["publicKey"], (group["publicKey"]["keySize"] + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[point["curve"]]
        coords = [bytes.fromhex(point[c][-2 * size :].rjust(2 * size, "0")) for c in ("wx", "wy")]
        x, y = (base64.urlsafe_b64encode(c).rstrip(b"=").decode() for c in coords)
        jwk = {"kty": "EC", "crv": crv, "x": x, "y": y}
    jwk = dict(jwk)
    jwk.pop("kid", None)
    return jwk


def raw_cases() -> list[Any]:
    cases = []
    for name, alg in RAW_FILES.items():
        for group in load(name)["testGroups"]:
            for case in group["tests"]:
                cases.append(
                    pytest.param(
                        name, alg, group, case, id=f"{name.split('_test')[0]}-{case['tcId']}"
                    )
                )
    return cases


@pytest.mark.parametrize(("name", "alg", "group", "case"), raw_cases())
def test_wycheproof_raw_signatures(
    name: str, alg: str, group: dict[str, Any], case: dict[str, Any]
) -> None:
    if case["result"] == "acceptable":
        accept, why = ACCEPTABLE[(name, case["tcId"])]
    else:
        accept, why = case["result"] == "valid", "the vector's own verdict"
    try:
        keys = parse_jwks(json.dumps({"keys": [_jwk_of(group)]}).encode())
    except ValueError:
        assert not accept, "a valid vector's key was refused"
        return
    parsed = ParsedToken({}, bytes.fromhex(case["msg"]), "", bytes.fromhex(case["sig"]))
    try:
        check_signature(parsed, alg, keys.keys[0].key)
        accepted = True
    except InvalidToken:
        accepted = False
    assert accepted is accept, f"{case['comment']} {case['flags']}: {why}"


# --- malicious tokens of the kinds PyJWT's, panva/jose's and joserfc's suites hold --------
# Re-signed with our keys, run through the whole verify(). Each names the attack.

from ._jwt_factory import (  # noqa: E402
    JwksEndpoint,
    b64,
    claims,
    ec_key,
    jwks,
    public_jwk,
    raw_token,
    rsa_key,
    sign,
    token,
    verifier_options,
)


def _hs256_with_public_key_pem() -> str:
    # CVE-2022-29217 / CVE-2015-9235: HMAC "signed" with the RSA public key's PEM.
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization

    pem = (
        rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    head = b64(json.dumps({"alg": "HS256", "kid": "k1"}))
    body = b64(json.dumps(claims()))
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def _embedded_jwk() -> str:
    # CVE-2018-0114: the token carries its own key in "jwk" (signed with the attacker's key).
    attacker = rsa_key("attacker")
    return sign(claims(), attacker, headers={"jwk": public_jwk(attacker, None)})


MALICIOUS = {
    "alg-none": (lambda: raw_token({"alg": "none", "kid": "k1"}, claims(), b""), "malformed"),
    "alg-None-mixed-case": (
        lambda: raw_token({"alg": "nOnE", "kid": "k1"}, claims(), b"x"),
        "algorithm",
    ),
    "hs256-with-public-key-pem": (_hs256_with_public_key_pem, "algorithm"),
    "embedded-jwk": (_embedded_jwk, "header"),
    "jku-header": (
        lambda: sign(claims(), headers={"jku": "https://evil.test/jwks"}),
        "header",
    ),
    "x5u-header": (lambda: sign(claims(), headers={"x5u": "https://evil.test/c"}), "header"),
    "unknown-crit": (
        lambda: sign(claims(), headers={"crit": ["exp"], "exp": 1}),
        "header",
    ),
    "b64-false": (
        lambda: _signed_raw_payload(
            json.dumps(claims()).encode(),
            {"alg": "RS256", "kid": "k1", "b64": False, "crit": ["b64"]},
        ),
        "header",
    ),
    "es256-alg-on-rsa-key": (
        lambda: sign(claims(), ec_key(), alg="ES256", kid="k1"),
        "algorithm",
    ),
    "signature-of-other-key": (lambda: sign(claims(), rsa_key("other")), "signature"),
    "payload-is-a-json-array": (lambda: _signed_raw_payload(b"[1, 2]"), "malformed"),
    "payload-not-json": (lambda: _signed_raw_payload(b"not json"), "malformed"),
    "payload-utf16": (
        lambda: _signed_raw_payload(json.dumps(claims()).encode("utf-16")),
        "malformed",
    ),
    "four-segments": (lambda: token() + ".x", "malformed"),
    "trailing-newline": (lambda: token() + "\n", "malformed"),
    "padded-segment": (lambda: token() + "==", "malformed"),
    "non-canonical-base64-last-char": (lambda: _non_canonical(), "malformed"),
    "exp-as-string": (lambda: token(exp=str(int(1e10))), "claim_type"),
    "exp-true": (lambda: token(exp=True), "claim_type"),
    "exp-400-digits": (lambda: token(exp=10**400), "claim_type"),
    "nbf-null": (lambda: token(nbf=None), "claim_type"),
    "iat-string": (lambda: token(iat="now"), "claim_type"),
    "sub-number": (lambda: token(sub=1), "claim_type"),
    "jti-list": (lambda: token(jti=["a"]), "claim_type"),
    "aud-list-with-number": (lambda: token(aud=["https://api.test", 1]), "audience"),
    "aud-object": (lambda: token(aud={"x": 1}), "audience"),
    "iss-trailing-slash-missing": (lambda: token(iss="https://issuer.test"), "issuer"),
    "kid-path-traversal": (lambda: sign(claims(), kid="../../dev/null"), "header"),
    "typ-id-token-as-access-token": (lambda: sign(claims(), headers={"typ": "JWT"}), "token_type"),
    # PyJWT test_api_jws: non-mapping header, non-string kid, a missing signature.
    "header-is-a-json-list": (
        lambda: f"{b64('[]')}.{token().split('.')[1]}.{b64(b's')}",
        "malformed",
    ),
    "kid-integer": (
        lambda: _signed_raw_payload(json.dumps(claims()).encode(), {"alg": "RS256", "kid": 1}),
        "header",
    ),
    "empty-signature-segment": (lambda: token().rsplit(".", 1)[0] + ".", "malformed"),
    # x5c is ignored, never trusted: the attacker's certificate does not make its key ours.
    "x5c-of-the-attackers-key": (
        lambda: sign(claims(), rsa_key("attacker"), headers={"x5c": ["MIIB..."]}),
        "signature",
    ),
}


def _signed_raw_payload(payload: bytes, header: dict[str, Any] | None = None) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    head = header or {"alg": "RS256", "kid": "k1"}
    signing_input = f"{b64(json.dumps(head))}.{b64(payload)}"
    signature = rsa_key().sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def _non_canonical() -> str:
    # GHSA-hxm8-2xgr-2p9m: the last character carries unused bits; flipping them gives a
    # second spelling of the same bytes.
    head, body, sig = token().split(".")
    canonical = {2: "AQgw", 3: "AEIMQUYcgkosw048"}[len(sig) % 4]
    last = sig[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(last)
    for candidate in alphabet[index : index + 4]:
        if candidate != last and candidate not in canonical:
            return f"{head}.{body}.{sig[:-1]}{candidate}"
    raise AssertionError("no non-canonical spelling")


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_malicious_tokens_are_refused_with_their_reason(name: str) -> None:
    make, reason = MALICIOUS[name]
    ep = JwksEndpoint(keys=jwks(public_jwk(rsa_key(), "k1")))
    verifier = TokenVerifier(
        http_client=httpx.Client(transport=ep.transport()),
        **verifier_options(FakeClock(), algorithms=["RS256", "ES256"], token_type=None),
    )
    tok = make()
    if name == "typ-id-token-as-access-token":
        verifier = TokenVerifier(
            http_client=httpx.Client(transport=ep.transport()),
            **verifier_options(FakeClock(), token_type="at+jwt"),
        )
    with pytest.raises(VerificationError) as caught:
        verifier.verify(tok)
    assert caught.value.reason == reason, str(caught.value)
