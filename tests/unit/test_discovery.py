"""The shared discovery (both sides): URLs, issuer check, negative cache, URL policy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from m2m_client._discovery import (
    Discovery,
    discovery_urls,
    interpret_metadata,
    metadata_endpoint,
)
from m2m_client._http import Exchange, HttpAnswer
from m2m_client._retry import TransientFailure
from m2m_client.errors import DiscoveryError

ISSUER = "https://idp.example.com/tenant/"


def _answer(status: int, data: Any = None, **headers: str) -> HttpAnswer:
    body = b"" if data is None else json.dumps(data).encode()
    return HttpAnswer(status, headers, body, "https://idp.example.com/x")


def test_urls_oidc_then_rfc8414_inserted_then_appended() -> None:
    assert discovery_urls(ISSUER) == [
        "https://idp.example.com/tenant/.well-known/openid-configuration",
        "https://idp.example.com/.well-known/oauth-authorization-server/tenant",
        "https://idp.example.com/tenant/.well-known/oauth-authorization-server",
    ]
    assert discovery_urls("https://idp.example.com") == [
        "https://idp.example.com/.well-known/openid-configuration",
        "https://idp.example.com/.well-known/oauth-authorization-server",
    ]


def test_issuer_mismatch_names_both_values() -> None:
    with pytest.raises(DiscoveryError) as caught:
        interpret_metadata(
            200, {}, b'{"issuer": "https://evil.example.net/"}', issuer=ISSUER, url="u", now=0
        )
    assert "https://evil.example.net/" in str(caught.value)
    assert ISSUER in str(caught.value)


@pytest.mark.parametrize("body", [b"<html>", b"[]", b"null", b"\xff", b"[" * 100_000])
def test_not_a_json_object(body: bytes) -> None:
    with pytest.raises(DiscoveryError, match="not a JSON object"):
        interpret_metadata(200, {}, body, issuer=ISSUER, url="u", now=0)


def test_5xx_and_429_are_transient_with_retry_after() -> None:
    with pytest.raises(TransientFailure) as caught:
        interpret_metadata(429, {"retry-after": "7"}, b"", issuer=ISSUER, url="u", now=0)
    assert caught.value.retry_after == 7
    assert interpret_metadata(404, {}, b"nope", issuer=ISSUER, url="u", now=0) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "no jwks_uri"),
        (5, "no jwks_uri"),
        ("http://idp.example.com/jwks", "https"),
        ("https://idp.example.com:99999/jwks", "invalid host or port"),
        ("https://u:p@idp.example.com/jwks", "user name"),
    ],
)
def test_discovered_endpoint_passes_the_url_policy(value: object, message: str) -> None:
    with pytest.raises(DiscoveryError, match=message):
        metadata_endpoint({"jwks_uri": value}, "jwks_uri", issuer=ISSUER)


def test_dev_host_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("M2M_INSECURE_HTTP_HOSTS", "keycloak, other")
    url = "http://keycloak:8080/realms/x/protocol/openid-connect/certs"
    assert metadata_endpoint({"jwks_uri": url}, "jwks_uri", issuer=ISSUER) == url


def _drive(discovery: Discovery, answers: list[HttpAnswer | Exception]) -> dict[str, Any]:
    flow = discovery.flow()
    result: object = None
    try:
        step = flow.send(None)
        while True:
            assert isinstance(step, Exchange)
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                result = answer
            else:
                try:
                    result = step.interpret(answer)
                except DiscoveryError as exc:
                    result = exc
            step = flow.send(result)
    except StopIteration as done:
        return dict(done.value)


def test_flow_falls_through_to_rfc8414_and_remembers() -> None:
    discovery = Discovery(ISSUER)
    found = _drive(discovery, [_answer(404), _answer(200, {"issuer": ISSUER, "x": 1})])
    assert found["x"] == 1
    assert _drive(discovery, []) == found  # no request once found


def test_flow_failure_is_negative_cached_on_the_monotonic_clock() -> None:
    now = [100.0]
    discovery = Discovery(ISSUER, negative_seconds=10, monotonic=lambda: now[0])
    with pytest.raises(DiscoveryError) as caught:
        _drive(discovery, [_answer(404), TransientFailure("HTTP 503"), _answer(404)])
    text = str(caught.value)
    assert "openid-configuration: not found" in text
    assert "HTTP 503" in text
    with pytest.raises(DiscoveryError):
        _drive(discovery, [])  # no answers needed: the failure is cached
    now[0] += 10.5
    assert _drive(discovery, [_answer(200, {"issuer": ISSUER})]) == {"issuer": ISSUER}


def test_flow_stops_at_an_issuer_mismatch() -> None:
    discovery = Discovery(ISSUER)
    with pytest.raises(DiscoveryError, match="configured issuer"):
        _drive(discovery, [_answer(200, {"issuer": "https://other/"})])
