"""Key set parsing and refresh policy, driven without any I/O (m2m_client/verify/_jwks.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Generator
from typing import Any

import pytest

from m2m_client.errors import InvalidToken, KeySetUnavailable
from m2m_client.verify._jwks import (
    MAX_JWKS_BYTES,
    HttpResult,
    JwksPolicy,
    KeySetState,
    discovery_urls,
    parse_jwks,
    ttl_from_cache_control,
)

from ._jwt_factory import ISSUER, JWKS_URL, NOW, ec_key, ed_key, jwks, public_jwk, rsa_key

POLICY = JwksPolicy(min_ttl=60, max_ttl=3600, default_ttl=600, unknown_kid_cooldown=30)


def body(*keys: dict[str, Any]) -> bytes:
    return json.dumps(jwks(*keys)).encode()


def ok(*keys: dict[str, Any], cache_control: str | None = "max-age=300") -> HttpResult:
    return HttpResult(200, body(*keys), cache_control)


def drive(flow: Generator[str, HttpResult, bool], responses: dict[str, HttpResult]) -> bool:
    """Answer each URL the flow asks for from ``responses`` (404 when absent)."""
    try:
        url = next(flow)
        while True:
            url = flow.send(responses.get(url, HttpResult(404)))
    except StopIteration as stop:
        return bool(stop.value)


def test_rsa_ec_and_okp_keys_are_parsed_once_into_key_objects() -> None:
    keys = parse_jwks(
        body(
            public_jwk(rsa_key(), "r"),
            public_jwk(ec_key(), "e"),
            public_jwk(ec_key("b", "P-384"), "e384"),
            public_jwk(ed_key(), "o"),
        )
    )
    assert len(keys) == 4
    assert keys.find("r", "RS256") is not None
    assert keys.find("r", "PS256") is not None
    assert keys.find("e", "ES256") is not None
    assert keys.find("e384", "ES384") is not None
    assert keys.find("o", "EdDSA") is not None
    assert keys.find("missing", "RS256") is None


def test_algorithm_must_match_the_key_type() -> None:
    keys = parse_jwks(body(public_jwk(rsa_key(), "r"), public_jwk(ec_key(), "e")))
    with pytest.raises(InvalidToken, match="does not match"):
        keys.find("r", "ES256")
    with pytest.raises(InvalidToken, match="does not match"):
        keys.find("e", "RS256")
    with pytest.raises(InvalidToken, match="does not match"):
        keys.find("e", "ES384")  # P-256 key, P-384 algorithm


def test_jwk_alg_binds_the_key_to_one_algorithm() -> None:
    keys = parse_jwks(body(public_jwk(rsa_key(), "r", alg="PS256")))
    assert keys.find("r", "PS256") is not None
    with pytest.raises(InvalidToken):
        keys.find("r", "RS256")


def test_bad_keys_are_skipped_with_a_log_line_and_good_ones_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = public_jwk(rsa_key(), "good")
    bad = [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        public_jwk(rsa_key(), "enc", use="enc"),
        public_jwk(rsa_key(), "ops", key_ops=["encrypt"]),
        public_jwk(rsa_key(), "wrongalg", alg="ES256"),
        public_jwk(rsa_key("small", 1024), "small"),
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        {"kty": "RSA", "kid": "missing-n", "e": "AQAB"},
        {"kty": "EC", "kid": "curve", "crv": "P-999", "x": "AA", "y": "AA"},
        "not an object",
        {"kty": "RSA", "kid": 5, "n": good["n"], "e": "AQAB"},
    ]
    with caplog.at_level(logging.WARNING, logger="m2m_client.verify"):
        keys = parse_jwks(body(good, *bad))
    assert [k.kid for k in keys.keys] == ["good"]
    assert len([r for r in caplog.records if "skipping JWKS key" in r.getMessage()]) == len(bad)


def test_private_key_members_in_a_jwks_are_never_used() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    private = RSAAlgorithm.to_jwk(rsa_key(), as_dict=True)
    private["kid"] = "leaky"
    private.pop("key_ops", None)
    keys = parse_jwks(body(dict(private)))
    assert isinstance(keys.keys[0].key, rsa.RSAPublicKey)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[]", b'{"keys": {}}', b'{"nokeys": []}', b'{"keys": []}', b'{"keys": [1]}'],
)
def test_unusable_documents_are_refused_as_a_whole(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_jwks(raw)


def test_oversized_jwks_is_refused() -> None:
    with pytest.raises(ValueError, match="larger"):
        parse_jwks(b" " * (MAX_JWKS_BYTES + 1))


def test_key_without_kid_is_used_only_when_unambiguous() -> None:
    single = parse_jwks(body(public_jwk(rsa_key(), None)))
    assert single.find(None, "RS256") is not None
    double = parse_jwks(body(public_jwk(rsa_key(), None), public_jwk(rsa_key("b"), None)))
    with pytest.raises(InvalidToken, match="several"):
        double.find(None, "RS256")


@pytest.mark.parametrize(
    ("header", "ttl"),
    [
        (None, 600),
        ("max-age=300", 300),
        ("public, max-age=15, stale-while-revalidate=15", 60),
        ("max-age=999999", 3600),
        ("no-store", 60),
        ("no-cache, max-age=900", 60),
        ("garbage", 600),
        ('max-age="120"', 120),
    ],
)
def test_ttl_honours_cache_control_within_bounds(header: str | None, ttl: float) -> None:
    assert ttl_from_cache_control(header, POLICY) == ttl


def test_discovery_tries_openid_configuration_then_rfc8414() -> None:
    assert discovery_urls("https://idp.test/realms/x/") == [
        "https://idp.test/realms/x/.well-known/openid-configuration",
        "https://idp.test/.well-known/oauth-authorization-server/realms/x",
    ]


def state(jwks_url: str | None = JWKS_URL) -> KeySetState:
    return KeySetState(ISSUER, jwks_url, POLICY)


def test_first_use_fetches_then_fresh_keys_are_used_without_fetching() -> None:
    s = state()
    assert s.lookup("k1", "RS256", NOW) is None
    assert s.should_fetch("k1", "RS256", NOW)
    assert drive(s.refresh_flow(NOW), {JWKS_URL: ok(public_jwk(rsa_key(), "k1"))}) is True
    assert s.lookup("k1", "RS256", NOW + 299) is not None
    assert not s.should_fetch("k1", "RS256", NOW + 299)
    assert s.lookup("k1", "RS256", NOW + 300) is None  # TTL over: refresh due
    assert s.should_fetch("k1", "RS256", NOW + 300)


def test_unknown_kid_refetches_at_most_once_per_cooldown() -> None:
    s = state()
    drive(s.refresh_flow(NOW), {JWKS_URL: ok(public_jwk(rsa_key(), "k1"))})
    assert not s.should_fetch("new", "RS256", NOW + 10)
    assert s.should_fetch("new", "RS256", NOW + 30)
    drive(s.refresh_flow(NOW + 30), {JWKS_URL: ok(public_jwk(rsa_key(), "k1"))})
    assert not s.should_fetch("new", "RS256", NOW + 31)
    with pytest.raises(InvalidToken, match="kid"):
        s.key_after_refresh("new", "RS256")


def test_a_failed_refresh_keeps_the_last_good_key_set() -> None:
    s = state()
    drive(s.refresh_flow(NOW), {JWKS_URL: ok(public_jwk(rsa_key(), "k1"))})
    later = NOW + 1000
    assert drive(s.refresh_flow(later), {JWKS_URL: HttpResult(error="ConnectError")}) is False
    assert s.key_after_refresh("k1", "RS256") is not None  # stale-while-error
    assert not s.should_fetch("k1", "RS256", later + 1)  # no hammering during the outage
    assert s.should_fetch("k1", "RS256", later + POLICY.error_retry)
    assert s.retry_after(later + 1) == POLICY.error_retry - 1
    with pytest.raises(KeySetUnavailable, match="cannot be refreshed"):
        s.key_after_refresh("unknown", "RS256")


@pytest.mark.parametrize(
    "result",
    [
        HttpResult(500),
        HttpResult(200, b"nope"),
        HttpResult(200, b'{"keys": []}'),
        HttpResult(error="x"),
    ],
)
def test_no_key_set_at_all_is_key_set_unavailable(result: HttpResult) -> None:
    s = state()
    drive(s.refresh_flow(NOW), {JWKS_URL: result})
    with pytest.raises(KeySetUnavailable):
        s.key_after_refresh("k1", "RS256")


def test_a_changed_key_set_bumps_the_generation_and_an_identical_one_does_not() -> None:
    s = state()
    drive(s.refresh_flow(NOW), {JWKS_URL: ok(public_jwk(rsa_key(), "k1"))})
    generation = s.generation
    assert drive(s.refresh_flow(NOW + 1), {JWKS_URL: ok(public_jwk(rsa_key(), "k1"))}) is False
    assert s.generation == generation
    rotated = ok(public_jwk(rsa_key(), "k1"), public_jwk(rsa_key("b"), "k2"))
    assert drive(s.refresh_flow(NOW + 2), {JWKS_URL: rotated}) is True
    assert s.generation == generation + 1


def test_discovery_finds_the_jwks_uri_and_remembers_it() -> None:
    s = state(jwks_url=None)
    meta = HttpResult(200, json.dumps({"issuer": ISSUER, "jwks_uri": JWKS_URL}).encode())
    responses = {
        "https://issuer.test/.well-known/openid-configuration": meta,
        JWKS_URL: ok(public_jwk(rsa_key(), "k1")),
    }
    assert drive(s.refresh_flow(NOW), responses) is True
    assert s.jwks_url == JWKS_URL


def test_discovery_falls_back_to_oauth_authorization_server_metadata() -> None:
    s = state(jwks_url=None)
    meta = HttpResult(200, json.dumps({"issuer": ISSUER, "jwks_uri": JWKS_URL}).encode())
    responses = {
        "https://issuer.test/.well-known/oauth-authorization-server": meta,
        JWKS_URL: ok(public_jwk(rsa_key(), "k1")),
    }
    assert drive(s.refresh_flow(NOW), responses) is True


@pytest.mark.parametrize(
    "metadata",
    [
        {"issuer": "https://evil.test/", "jwks_uri": JWKS_URL},
        {"issuer": ISSUER, "jwks_uri": "file:///etc/passwd"},
        {"issuer": ISSUER},
        ["not", "an", "object"],
    ],
)
def test_discovery_metadata_for_another_issuer_or_without_jwks_uri_is_refused(
    metadata: object,
) -> None:
    s = state(jwks_url=None)
    meta = HttpResult(200, json.dumps(metadata).encode())
    responses = {"https://issuer.test/.well-known/openid-configuration": meta}
    assert drive(s.refresh_flow(NOW), responses) is False
    assert s.jwks_url is None
    assert s.last_error is not None
    assert "discovery" in s.last_error
    with pytest.raises(KeySetUnavailable):
        s.key_after_refresh("k1", "RS256")
