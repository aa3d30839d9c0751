"""DPoP, calling side (m2m_client/_dpop.py): keys, thumbprints, proofs, nonces.

Outside truth: the RFC 7638 and RFC 9449 example values (tests/vectors/dpop_rfc9449.json),
RFC 3986's own URL equivalence examples, and PyJWT (an independent JOSE implementation)
verifying every proof we sign.
"""

from __future__ import annotations

import base64
import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from m2m_client._dpop import (
    DPOP_ALGORITHMS,
    DPoPKey,
    NonceStore,
    access_token_hash,
    jwk_thumbprint,
    normalize_htu,
    resource_nonce_challenge,
    token_endpoint_nonce_challenge,
)
from m2m_client._refusal import parse_www_authenticate
from m2m_client.errors import ConfigurationError

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "dpop_rfc9449.json").read_text("utf-8")
)
NOW = 1_700_000_000.0
URL = "https://api.example.com/data"


def _segment(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def _pyjwt_verify(proof: str) -> dict[str, Any]:
    """Verify a proof with PyJWT, using the key its own header carries."""
    header = jwt.get_unverified_header(proof)
    jwk = json.dumps(header["jwk"])
    algorithm = {"EC": ECAlgorithm, "RSA": RSAAlgorithm, "OKP": OKPAlgorithm}[header["jwk"]["kty"]]
    key = algorithm.from_jwk(jwk)
    claims: dict[str, Any] = jwt.decode(
        proof, key, algorithms=[header["alg"]], options={"verify_iat": False}
    )
    return claims


@pytest.fixture(scope="module", params=DPOP_ALGORITHMS)
def any_key(request: pytest.FixtureRequest) -> DPoPKey:
    return DPoPKey.generate(request.param)


# --- outside vectors ---------------------------------------------------------------------


def test_rfc7638_example_thumbprint() -> None:
    vector = VECTORS["rfc7638"]
    assert jwk_thumbprint(vector["jwk"]) == vector["thumbprint"]


def test_rfc9449_example_key_thumbprint_is_the_published_jkt() -> None:
    vector = VECTORS["rfc9449"]
    assert jwk_thumbprint(vector["jwk"]) == vector["jkt"]


def test_rfc9449_example_ath() -> None:
    vector = VECTORS["rfc9449"]
    assert access_token_hash(vector["access_token"]) == vector["ath"]


def test_thumbprint_ignores_optional_members_and_member_order() -> None:
    vector = VECTORS["rfc9449"]
    decorated = {"kid": "k1", "use": "sig", "alg": "ES256", **dict(reversed(vector["jwk"].items()))}
    assert jwk_thumbprint(decorated) == vector["jkt"]


@pytest.mark.parametrize(
    "jwk", [{}, {"kty": "oct", "k": "c2VjcmV0"}, {"kty": "EC", "crv": "P-256"}]
)
def test_thumbprint_of_an_incomplete_jwk_is_a_configuration_error(jwk: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        jwk_thumbprint(jwk)


# --- proofs ------------------------------------------------------------------------------


def test_proof_verifies_with_pyjwt_and_has_the_rfc9449_header(any_key: DPoPKey) -> None:
    proof = any_key.proof("GET", URL, now=NOW)
    header = jwt.get_unverified_header(proof)
    assert header["typ"] == "dpop+jwt"
    assert header["alg"] == any_key.alg
    assert header["jwk"] == any_key.public_jwk
    assert jwk_thumbprint(header["jwk"]) == any_key.thumbprint
    claims = _pyjwt_verify(proof)
    assert claims["htm"] == "GET"
    assert claims["htu"] == URL
    assert claims["iat"] == int(NOW)
    assert set(claims) == {"jti", "htm", "htu", "iat"}


def test_proof_header_carries_only_public_key_members(any_key: DPoPKey) -> None:
    jwk = _segment(any_key.proof("POST", URL, now=NOW), 0)["jwk"]
    assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(jwk)
    assert set(jwk) in ({"kty", "crv", "x", "y"}, {"kty", "n", "e"}, {"kty", "crv", "x"})


def test_es256_signature_is_raw_r_s_of_64_bytes() -> None:
    key = DPoPKey.generate()
    signature = key.proof("GET", URL, now=NOW).split(".")[2]
    assert len(base64.urlsafe_b64decode(signature + "==")) == 64


def test_proof_with_token_and_nonce_carries_ath_and_nonce() -> None:
    key = DPoPKey.generate()
    vector = VECTORS["rfc9449"]
    claims = _pyjwt_verify(
        key.proof("GET", URL, now=NOW, access_token=vector["access_token"], nonce="eyJ7S_zG.eyJH0")
    )
    assert claims["ath"] == vector["ath"]
    assert claims["nonce"] == "eyJ7S_zG.eyJH0"


def test_ath_follows_the_token_when_it_changes() -> None:
    key = DPoPKey.generate()
    first = _segment(key.proof("GET", URL, now=NOW, access_token="token-1"), 1)["ath"]
    second = _segment(key.proof("GET", URL, now=NOW, access_token="token-2"), 1)["ath"]
    assert first == access_token_hash("token-1")
    assert second == access_token_hash("token-2")


def test_every_proof_has_a_new_jti() -> None:
    key = DPoPKey.generate()
    jtis = {_segment(key.proof("GET", URL, now=NOW), 1)["jti"] for _ in range(500)}
    assert len(jtis) == 500


def test_htu_drops_query_and_fragment() -> None:
    key = DPoPKey.generate()
    claims = _segment(key.proof("GET", f"{URL}?page=2&token=x#frag", now=NOW), 1)
    assert claims["htu"] == URL


@pytest.mark.parametrize(
    ("variant", "normal"),
    [
        # RFC 3986 §6.2.2.1: scheme and host are case-insensitive.
        ("HTTP://www.Example.com/", "http://www.example.com/"),
        # RFC 3986 §6.2.3: these four are equivalent; the last is the normal form.
        ("http://example.com", "http://example.com/"),
        ("http://example.com:/", "http://example.com/"),
        ("http://example.com:80/", "http://example.com/"),
        ("https://example.com:443/x", "https://example.com/x"),
        ("https://example.com:8443/x", "https://example.com:8443/x"),
        # RFC 3986 §6.2.2.1-2: hex digits upper case, unreserved escapes decoded.
        ("http://a/b/c/%7bfoo%7d", "http://a/b/c/%7Bfoo%7D"),
        ("http://a/%7euser/%41", "http://a/~user/A"),
        # RFC 3986 §6.2.2.3 / §5.2.4: dot segments removed.
        ("http://a/./b/../b/%63/", "http://a/b/c/"),
        ("http://a/b/c/./../../g", "http://a/g"),
        # No user info in htu; IPv6 literals keep their brackets.
        ("https://user:pw@api.test/x", "https://api.test/x"),
        ("http://[::1]:8080/token", "http://[::1]:8080/token"),
        # What a WHATWG URL parser does with characters a URL cannot carry literally.
        ("https://h/caf\u00e9 au lait", "https://h/caf%C3%A9%20au%20lait"),
    ],
)
def test_htu_normalisation_follows_rfc3986(variant: str, normal: str) -> None:
    assert normalize_htu(variant) == normal
    assert normalize_htu(normal) == normal


@pytest.mark.parametrize(
    "url", ["ftp://a/b", "/relative", "https://", "http://a:99999/", "mailto:x"]
)
def test_a_url_that_is_not_absolute_http_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        DPoPKey.generate().proof("GET", url, now=NOW)


@pytest.mark.parametrize("method", ["", "GET POST", "G\u00c9T", "GET\r\n"])
def test_a_method_that_is_not_a_token_is_a_configuration_error(method: str) -> None:
    with pytest.raises(ConfigurationError):
        DPoPKey.generate().proof(method, URL, now=NOW)


@pytest.mark.parametrize("nonce", ["", 'a"b', "a\\b", "a b", "\u00e9"])
def test_a_nonce_outside_the_rfc_syntax_is_refused_before_signing(nonce: str) -> None:
    with pytest.raises(ConfigurationError):
        DPoPKey.generate().proof("GET", URL, now=NOW, nonce=nonce)


# --- keys --------------------------------------------------------------------------------


def test_repr_and_errors_never_show_the_private_key() -> None:
    key = DPoPKey.generate()
    pem = key.private_key_pem().decode()
    body = "".join(pem.splitlines()[1:-1])
    assert "DPoPKey(alg='ES256', thumbprint=" in repr(key)
    assert body[:40] not in repr(key)
    assert body[:40] not in str(key)


def test_a_key_cannot_be_pickled_by_accident() -> None:
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(DPoPKey.generate())


def test_pem_round_trip_keeps_the_thumbprint_and_signs_verifiable_proofs() -> None:
    key = DPoPKey.generate("ES384")
    again = DPoPKey.from_pem(key.private_key_pem("pw"), password="pw")
    assert again.thumbprint == key.thumbprint
    assert again.alg == "ES384"
    assert _pyjwt_verify(again.proof("GET", URL, now=NOW))["htu"] == URL


def test_wrong_pem_password_is_a_configuration_error_without_the_password() -> None:
    pem = DPoPKey.generate().private_key_pem("right-password")
    with pytest.raises(ConfigurationError) as caught:
        DPoPKey.from_pem(pem, password="wrong-password")
    assert "password" in str(caught.value)
    assert "wrong-password" not in str(caught.value)


def test_garbage_pem_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        DPoPKey.from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_rsa_keys_below_2048_bits_are_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigurationError, match="2048"):
        DPoPKey(small)


def test_an_alg_that_does_not_fit_the_key_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        DPoPKey(ec.generate_private_key(ec.SECP256R1()), alg="ES384")
    with pytest.raises(ConfigurationError):
        DPoPKey.generate("HS256")


def test_rsa_key_can_sign_with_pss() -> None:
    key = DPoPKey(rsa.generate_private_key(public_exponent=65537, key_size=2048), alg="PS256")
    assert jwt.get_unverified_header(key.proof("GET", URL, now=NOW))["alg"] == "PS256"
    assert _pyjwt_verify(key.proof("GET", URL, now=NOW))["htm"] == "GET"


# --- nonces ------------------------------------------------------------------------------


def test_nonce_store_keeps_the_latest_nonce_per_origin() -> None:
    store = NonceStore()
    assert store.get("https://as.test/token") is None
    assert store.update("https://as.test/token", "n1")
    assert store.update("https://AS.test:443/other", "n2")  # same origin
    assert store.update("https://api.test/data", "a1")
    assert store.get("https://as.test/token?x") == "n2"
    assert store.get("https://api.test/") == "a1"
    assert store.get("http://as.test/token") is None  # another scheme, another origin


def test_nonce_store_ignores_missing_and_malformed_nonces() -> None:
    store = NonceStore()
    store.update("https://as.test/", "good")
    assert not store.update("https://as.test/", None)
    assert not store.update("https://as.test/", 'bad"nonce')
    assert not store.update("not a url", "n")
    assert store.get("https://as.test/") == "good"


def test_nonce_store_is_bounded() -> None:
    store = NonceStore(max_origins=3)
    for i in range(10):
        store.update(f"https://h{i}.test/", f"n{i}")
    assert len(store) == 3
    assert store.get("https://h9.test/") == "n9"
    assert store.get("https://h0.test/") is None


def test_token_endpoint_nonce_challenge_is_400_use_dpop_nonce_with_a_nonce() -> None:
    # RFC 9449 §8 example: 400, {"error": "use_dpop_nonce"}, DPoP-Nonce: eyJ7S_zG.eyJH0-Z.HX4w-7v
    assert token_endpoint_nonce_challenge(400, "use_dpop_nonce", "eyJ7S_zG.eyJH0-Z.HX4w-7v") == (
        "eyJ7S_zG.eyJH0-Z.HX4w-7v"
    )
    assert token_endpoint_nonce_challenge(400, "use_dpop_nonce", None) is None
    assert token_endpoint_nonce_challenge(400, "invalid_dpop_proof", "n") is None
    assert token_endpoint_nonce_challenge(401, "use_dpop_nonce", "n") is None


def test_resource_nonce_challenge_reads_the_dpop_challenge() -> None:
    # RFC 9449 §9 example.
    value = (
        'DPoP error="use_dpop_nonce", '
        'error_description="Resource server requires nonce in DPoP proof"'
    )
    assert resource_nonce_challenge(401, value, "eyJ7S_zG.eyJbYu3.xQmBj-1") == (
        "eyJ7S_zG.eyJbYu3.xQmBj-1"
    )
    both = ['Bearer realm="api"', 'dpop algs="ES256", error="use_dpop_nonce"']
    assert resource_nonce_challenge(401, both, "n") == "n"
    assert resource_nonce_challenge(401, 'Bearer error="use_dpop_nonce"', "n") is None
    assert resource_nonce_challenge(401, 'DPoP error="invalid_token"', "n") is None
    assert resource_nonce_challenge(403, value, "n") is None
    assert resource_nonce_challenge(401, value, None) is None
    assert resource_nonce_challenge(401, None, "n") is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Bearer realm="a", error="x"', [("bearer", {"realm": "a", "error": "x"})]),
        ("Basic abc==, DPoP algs=ES256", [("basic", {}), ("dpop", {"algs": "ES256"})]),
        ("Bearer, DPoP", [("bearer", {}), ("dpop", {})]),
        (
            'DPoP error_description="a \\"quoted\\" word"',
            [("dpop", {"error_description": 'a "quoted" word'})],
        ),
        ('=,,"', []),
    ],
)
def test_www_authenticate_parsing(header: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    assert parse_www_authenticate(header) == expected


@pytest.mark.parametrize("now", [float("nan"), float("inf"), "now"])
def test_a_time_that_is_not_a_number_is_a_configuration_error(now: object) -> None:
    with pytest.raises(ConfigurationError):
        DPoPKey.generate().proof("GET", URL, now=now)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.lists(st.text(max_size=60), max_size=3))
def test_www_authenticate_parsing_never_raises(header: str | list[str]) -> None:
    for scheme, params in parse_www_authenticate(header):
        assert scheme == scheme.lower()
        assert all(name == name.lower() for name in params)
    assert resource_nonce_challenge(401, header, "n") in (None, "n")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.text(max_size=40))
def test_nonce_store_never_raises_on_odd_urls_or_nonces(url: str, nonce: str) -> None:
    store = NonceStore(max_origins=4)
    if store.update(url, nonce):
        assert store.get(url) == nonce


def test_proofs_from_many_threads_are_all_valid_and_distinct() -> None:
    key = DPoPKey.generate()
    urls = [f"https://api{i % 5}.test/path/{i % 7}?q={i}" for i in range(400)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        proofs = list(pool.map(lambda u: key.proof("GET", u, now=NOW, access_token=u), urls))
    for url, proof in zip(urls, proofs, strict=True):
        claims = _pyjwt_verify(proof)
        assert claims["htu"] == url.partition("?")[0]
        assert claims["ath"] == access_token_hash(url)
    assert len({_segment(p, 1)["jti"] for p in proofs}) == len(proofs)


# --- htu: the URI exactly as the HTTP stack sends it (issue 19 item 11) --------------------


def _stacks_installed() -> list[Any]:
    from m2m_client import _stacks

    return [stack.module for stack in _stacks.installed()]


@pytest.mark.parametrize(
    ("url", "htu"),
    [
        # httpx sends "|" and "^" literally and keeps escapes as written: node oidc-provider
        # compares htu with the URI it received, so /a%7Cb or /~user would be refused.
        ("http://127.0.0.1:8000/a|b", "http://127.0.0.1:8000/a|b"),
        ("http://127.0.0.1:8000/%7euser/x", "http://127.0.0.1:8000/%7euser/x"),
        ("http://127.0.0.1:8000/a^b/{c}", "http://127.0.0.1:8000/a^b/%7Bc%7D"),
        ("https://API.example.com:443/caf\u00e9 x?q=1#f", "https://api.example.com/caf%C3%A9%20x"),
        ("http://[::1]:80/a/./b/../c", "http://[::1]/a/c"),
        ("http://fa\u00df.de/x", "http://xn--fa-hia.de/x"),
    ],
)
def test_htu_is_the_uri_httpx_sends(url: str, htu: str) -> None:
    claims = _segment(DPoPKey.generate().proof("GET", url, now=NOW), 1)
    assert claims["htu"] == htu
    for module in _stacks_installed():
        sent = module.Request("GET", url).url
        port = f":{sent.port}" if sent.port else ""
        host = sent.raw_host.decode()
        host = f"[{host}]" if ":" in host else host
        target = sent.raw_path.partition(b"?")[0].decode()
        assert f"{sent.scheme}://{host}{port}{target}" == htu, module.__name__


# No control characters: httpx and httpx2 refuse to send a URL with one.
WIRE_PATH = st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(WIRE_PATH, st.sampled_from(["http://127.0.0.1:8000", "https://api.example.com"]))
def test_htu_path_is_the_request_target_each_stack_sends(path: str, origin: str) -> None:
    url = f"{origin}/{path}"
    htu = _segment(DPoPKey.generate().proof("GET", url, now=NOW), 1)["htu"]
    for module in _stacks_installed():
        target = module.Request("GET", url).url.raw_path.partition(b"?")[0]
        assert htu == origin + target.decode("ascii"), module.__name__
    # Whatever the path, the verifier's normalisation maps htu and the URL to one form.
    assert normalize_htu(htu) == normalize_htu(url.partition("#")[0].partition("?")[0])


def test_a_non_ascii_host_is_its_uts46_a_label_not_idna_2003() -> None:
    # IDNA 2003 (Python's "idna" codec) maps "faß.de" to "fass.de": another domain.
    assert normalize_htu("https://fa\u00df.de/x") == "https://xn--fa-hia.de/x"
    assert normalize_htu("https://FA\u00df.de/x") == "https://xn--fa-hia.de/x"
    assert normalize_htu("https://\u00fcber.example/") == "https://xn--ber-goa.example/"
    for module in _stacks_installed():
        assert module.URL("https://fa\u00df.de/x").raw_host == b"xn--fa-hia.de"


def test_an_htu_beyond_the_verifiers_limit_is_refused_with_the_limit() -> None:
    from m2m_client._dpop import MAX_HTU

    key = DPoPKey.generate()
    origin = "https://api.example.com/"
    assert (
        len(_segment(key.proof("GET", origin + "a" * (MAX_HTU - len(origin)), now=NOW), 1)["htu"])
        == MAX_HTU
    )
    with pytest.raises(ConfigurationError, match=f"longer than {MAX_HTU} characters"):
        key.proof("GET", origin + "a" * (MAX_HTU - len(origin) + 1), now=NOW)


def test_rsa_keys_above_8192_bits_are_refused() -> None:
    # Every proof of such a key would be refused by the verifier (RSA 2048-8192 bits).
    # A stand-in for a 8200-bit key: generating one takes 20 s.
    from unittest import mock

    big = mock.Mock(spec=rsa.RSAPrivateKey)
    big.key_size = 8200
    with pytest.raises(ConfigurationError, match="2048 to 8192 bits"):
        DPoPKey(big)
    big.sign.assert_not_called()


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30), st.booleans())
def test_normalize_htu_of_any_host_is_a_url_or_a_configuration_error(
    host: str, uts46_lookalike: bool
) -> None:
    # The verifier normalises the URL it rebuilds from the Host header with this: whatever a
    # client puts there, the answer is ConfigurationError (a 401 there), never IDNAError & co.
    if uts46_lookalike:
        host = host + ".\uff21\u00df\u0130"  # full-width A, sharp s, dotted capital I
    try:
        normalized = normalize_htu(f"https://{host}/x")
    except ConfigurationError:
        return
    assert normalized.isascii()
    assert normalized.startswith("https://")
