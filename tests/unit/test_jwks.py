"""Key set parsing and refresh policy, driven without any I/O (m2m_client/verify/_jwks.py)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from m2m_client._http import HttpAnswer, TransportFailure
from m2m_client.errors import ConfigurationError, InvalidToken, KeySetUnavailable
from m2m_client.verify._jwks import (
    MAX_JWKS_BYTES,
    JwksPolicy,
    has_roca_fingerprint,
    parse_jwks,
    ttl_from_headers,
)
from m2m_client.verify._keyset import Answer, KeySetState

from ._jwt_factory import (
    ISSUER,
    JWKS_URL,
    NOW,
    FakeClock,
    ec_key,
    ed_key,
    jwks,
    public_jwk,
    refused,
    rsa_key,
)

VECTORS = Path(__file__).parent.parent / "vectors"
POLICY = JwksPolicy(min_ttl=60, max_ttl=3600, default_ttl=600, unknown_kid_cooldown=30)


def body(*keys: dict[str, Any]) -> bytes:
    return json.dumps(jwks(*keys)).encode()


def answer(status: int, content: bytes = b"", **headers: str) -> HttpAnswer:
    return HttpAnswer(status, {k.replace("_", "-"): v for k, v in headers.items()}, content, "")


def ok(*keys: dict[str, Any], cache_control: str = "max-age=300") -> HttpAnswer:
    return answer(200, body(*keys), cache_control=cache_control)


def drive(
    flow: Generator[Any, Answer, bool],
    responses: dict[str, Answer],
    clock: FakeClock | None = None,
    took: float = 0.0,
) -> bool:
    """Answer each request from ``responses`` (404 when absent); each takes ``took`` s."""
    try:
        request = next(flow)
        while True:
            if clock is not None:
                clock.advance(took)
            request = flow.send(responses.get(request.url, answer(404)))
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
    with refused("algorithm"):
        keys.find("r", "ES256")
    with refused("algorithm"):
        keys.find("e", "RS256")
    with refused("algorithm"):
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
    with refused("unknown_kid"):
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
    assert ttl_from_headers({"cache-control": header} if header else {}, POLICY) == ttl


@pytest.mark.parametrize(("age", "ttl"), [("3590", 60), ("100", 3500), ("x", 3600), ("", 3600)])
def test_ttl_subtracts_the_age_a_cache_already_held_the_response(age: str, ttl: float) -> None:
    # RFC 9111 §4.2.3: max-age=3600 with Age: 3590 has 10 s left (clamped to min_ttl here).
    headers = {"cache-control": "max-age=3600", "age": age}
    assert ttl_from_headers(headers, POLICY) == ttl


@pytest.mark.parametrize(
    "key_ops",
    [None, ["verify", "verify"], ["verify", 1], "verify", [], ["sign"]],
    ids=["null", "repeated", "non-string", "a-string", "empty", "sign-only"],
)
def test_a_key_whose_key_ops_is_not_a_list_of_unique_strings_with_verify_is_unusable(
    key_ops: object,
) -> None:
    jwk = public_jwk(rsa_key(), "k1")
    jwk["key_ops"] = key_ops
    with pytest.raises(ValueError, match="no usable"):
        parse_jwks(body(jwk))


def test_a_jwks_with_more_than_100_keys_keeps_the_signing_key_at_the_end() -> None:
    filler = public_jwk(ec_key(), "filler")
    entries = [dict(filler, kid=f"old-{i}") for i in range(150)]
    keys = parse_jwks(body(*entries, public_jwk(rsa_key(), "signing")))
    assert keys.find("signing", "RS256") is not None
    assert len(keys) == 151


def test_roca_fingerprint_is_refused_and_ordinary_keys_pass() -> None:
    vectors = json.loads((VECTORS / "json_web_key_test.json").read_text())
    (group,) = [g for g in vectors["testGroups"] if g["comment"] == "jws_rsa_roca_key"]
    with pytest.raises(ValueError, match="no usable"):
        parse_jwks(json.dumps(group["public"]).encode())
    for name in "abcdefgh":
        assert not has_roca_fingerprint(rsa_key(name).public_key().public_numbers().n)


def state(jwks_url: str | None = JWKS_URL, clock: FakeClock | None = None) -> KeySetState:
    return KeySetState(ISSUER, jwks_url, POLICY, monotonic=clock or FakeClock())


K1 = public_jwk(rsa_key(), "k1")
K2 = public_jwk(rsa_key("b"), "k2")


def test_first_use_fetches_then_fresh_keys_are_used_and_refreshed_ahead() -> None:
    clock = FakeClock()
    s = state(clock=clock)
    assert s.choose("k1", "RS256", clock.now).key is None  # cold: fetch
    assert drive(s.refresh_flow(), {JWKS_URL: ok(K1)}) is True
    fresh = s.choose("k1", "RS256", NOW + 224)
    assert fresh.key is not None
    assert not fresh.refresh_behind
    ahead = s.choose("k1", "RS256", NOW + 225)  # 75% of max-age=300: refresh behind
    assert ahead.key is not None
    assert ahead.refresh_behind
    assert s.choose("k1", "RS256", NOW + 300).key is None  # expired, idle: the caller waits


def test_the_first_unknown_kid_after_any_fetch_refetches_at_once() -> None:
    clock = FakeClock()
    s = state(clock=clock)
    drive(s.refresh_flow(), {JWKS_URL: ok(K1)})
    # A rotation right after a (scheduled) fetch: the new kid must not wait a cooldown.
    choice = s.choose("k2", "RS256", NOW + 1)
    assert choice.key is None
    assert choice.unknown_kid
    drive(s.refresh_flow(unknown_kid=True), {JWKS_URL: ok(K1, K2)})
    assert s.after_fetch("k2", "RS256").kid == "k2"


def test_repeated_unknown_kids_refetch_at_most_once_per_cooldown_from_the_end() -> None:
    clock = FakeClock()
    s = state(clock=clock)
    drive(s.refresh_flow(), {JWKS_URL: ok(K1)})
    fetches = refused = 0
    for i in range(50):
        try:
            choice = s.choose(f"random-{i}", "RS256", clock.now)
        except InvalidToken as exc:
            refused += exc.reason == "unknown_kid"
            continue
        fetches += 1
        drive(s.refresh_flow(unknown_kid=choice.unknown_kid), {JWKS_URL: ok(K1)}, clock, 2.0)
        with pytest.raises(InvalidToken):
            s.after_fetch(f"random-{i}", "RS256")
        clock.advance(0.5)
    assert fetches == 1
    assert refused == 49
    assert s.kid_refetch_at == NOW + 2.0 + POLICY.unknown_kid_cooldown  # from the end


def test_a_cancelled_unknown_kid_fetch_starts_no_cooldown_and_no_back_off() -> None:
    s = state()
    drive(s.refresh_flow(), {JWKS_URL: ok(K1)})
    flow = s.refresh_flow(unknown_kid=True)
    next(flow)
    assert s.fetching
    flow.close()  # the caller was cancelled mid-fetch
    assert not s.fetching
    assert s.kid_refetch_at == -math.inf
    assert s.retry_at == -math.inf
    assert s.choose("k2", "RS256", NOW + 1).unknown_kid  # the next one may fetch at once


def test_the_error_back_off_counts_from_the_end_of_a_hanging_attempt() -> None:
    clock = FakeClock()
    s = state(clock=clock)
    failure = TransportFailure("request to the JWKS did not complete within its deadline")
    drive(s.refresh_flow(), {JWKS_URL: failure}, clock, took=5.0)  # hung for the 5 s timeout
    assert s.retry_at == NOW + 5.0 + POLICY.error_retry
    # Requests queued behind the hung fetch decide now: they fail fast, none fetches again.
    with pytest.raises(KeySetUnavailable, match="deadline"):
        s.choose("k1", "RS256", clock.now)
    assert s.retry_after(clock.now) == POLICY.error_retry


def test_during_a_fetch_or_back_off_cached_keys_verify_at_once_and_others_fail_fast() -> None:
    clock = FakeClock()
    s = state(clock=clock)
    drive(s.refresh_flow(), {JWKS_URL: ok(K1)})
    clock.advance(400)  # the set expired
    flow = s.refresh_flow()
    next(flow)  # a fetch is in flight
    assert s.choose("k1", "RS256", clock.now).key is not None  # stale, but no waiting
    assert s.choose("k2", "RS256", clock.now).key is None  # unknown: wait for the fetch
    with pytest.raises(StopIteration):
        flow.send(TransportFailure("reset"))
    assert s.choose("k1", "RS256", clock.now).key is not None  # backing off: stale set
    with pytest.raises(KeySetUnavailable):
        s.choose("k2", "RS256", clock.now)
    assert not s.refresh_due(clock.now)
    clock.advance(POLICY.error_retry)
    assert s.refresh_due(clock.now)


@pytest.mark.parametrize(
    "result",
    [
        answer(500),
        answer(200, b"nope"),
        answer(200, b'{"keys": []}'),
        TransportFailure("x"),
        KeySetUnavailable("response exceeds the limit"),
    ],
)
def test_no_key_set_at_all_is_key_set_unavailable(result: Answer) -> None:
    s = state()
    drive(s.refresh_flow(), {JWKS_URL: result})
    with pytest.raises(KeySetUnavailable):
        s.after_fetch("k1", "RS256")
    with pytest.raises(KeySetUnavailable):
        s.raise_if_failed()


def test_a_failed_refresh_keeps_the_last_good_key_set() -> None:
    clock = FakeClock()
    s = state(clock=clock)
    drive(s.refresh_flow(), {JWKS_URL: ok(K1)})
    clock.advance(1000)
    assert drive(s.refresh_flow(), {JWKS_URL: TransportFailure("ConnectError")}) is False
    assert s.after_fetch("k1", "RS256") is not None  # stale-while-error
    with pytest.raises(KeySetUnavailable, match="ConnectError"):
        s.after_fetch("unknown", "RS256")


def test_refresh_reports_whether_the_key_set_changed() -> None:
    s = state()
    assert drive(s.refresh_flow(), {JWKS_URL: ok(K1)}) is True
    assert drive(s.refresh_flow(), {JWKS_URL: ok(K1)}) is False
    assert drive(s.refresh_flow(), {JWKS_URL: ok(K1, K2)}) is True


META = "https://issuer.test/.well-known/openid-configuration"


def metadata(**document: Any) -> HttpAnswer:
    return answer(200, json.dumps({"issuer": ISSUER, **document}).encode())


def test_discovery_finds_the_jwks_uri_and_remembers_it() -> None:
    s = state(jwks_url=None)
    responses: dict[str, Answer] = {META: metadata(jwks_uri=JWKS_URL), JWKS_URL: ok(K1)}
    assert drive(s.refresh_flow(), responses) is True
    assert s.source.discovery.metadata is not None
    responses.pop(META)
    assert drive(s.refresh_flow(), responses) is False  # no second discovery


def test_discovery_falls_back_to_oauth_authorization_server_metadata() -> None:
    s = state(jwks_url=None)
    responses: dict[str, Answer] = {
        "https://issuer.test/.well-known/oauth-authorization-server": metadata(jwks_uri=JWKS_URL),
        JWKS_URL: ok(K1),
    }
    assert drive(s.refresh_flow(), responses) is True


@pytest.mark.parametrize(
    "jwks_uri",
    [
        "file:///etc/passwd",
        "http://idp.example.com/jwks",  # plain http off loopback: anyone on the path
        "https://issuer.test:99999/jwks",  # a bad port: httpx.InvalidURL before
        "https://exa mple.com/jwks",
        None,
    ],
)
def test_a_discovered_jwks_uri_that_fails_the_url_policy_is_unavailable_and_rediscovered(
    jwks_uri: str | None,
) -> None:
    clock = FakeClock()
    s = state(jwks_url=None, clock=clock)
    document = {"jwks_uri": jwks_uri} if jwks_uri is not None else {}
    assert drive(s.refresh_flow(), {META: metadata(**document)}) is False
    with pytest.raises(KeySetUnavailable, match="jwks_uri"):
        s.after_fetch("k1", "RS256")
    clock.advance(POLICY.error_retry)
    fixed: dict[str, Answer] = {META: metadata(jwks_uri=JWKS_URL), JWKS_URL: ok(K1)}
    assert drive(s.refresh_flow(), fixed) is True  # discovery retried after the back-off


def test_discovery_for_another_issuer_is_a_configuration_error_with_both_values() -> None:
    s = state(jwks_url=None)
    evil = answer(200, json.dumps({"issuer": "https://evil.test/", "jwks_uri": "x"}).encode())
    assert drive(s.refresh_flow(), {META: evil}) is False
    with pytest.raises(ConfigurationError) as caught:
        s.after_fetch("k1", "RS256")
    assert "https://evil.test/" in str(caught.value)
    assert ISSUER in str(caught.value)


def test_discovery_that_finds_nothing_is_unavailable_naming_every_url() -> None:
    s = state(jwks_url=None)
    assert drive(s.refresh_flow(), {}) is False
    with pytest.raises(KeySetUnavailable, match="oauth-authorization-server"):
        s.after_fetch("k1", "RS256")


def test_stale_keys_serve_through_an_outage_only_up_to_max_stale() -> None:
    clock = FakeClock()
    s = state(clock=clock)
    drive(s.refresh_flow(), {JWKS_URL: ok(K1)})  # fresh for 300 s
    clock.advance(300 + POLICY.max_stale - 10)
    drive(s.refresh_flow(), {JWKS_URL: TransportFailure("down")})
    assert s.choose("k1", "RS256", clock.now).key is not None  # stale-while-error
    clock.advance(POLICY.error_retry + 10)  # now past expiry + max_stale
    drive(s.refresh_flow(), {JWKS_URL: TransportFailure("down")})
    assert not s.usable(clock.now)
    with pytest.raises(KeySetUnavailable):
        s.choose("k1", "RS256", clock.now)  # a withdrawn key must not live forever
