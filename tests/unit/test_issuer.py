"""LocalIssuer: the development authorization server behind the demo, the CLI and the plugin."""

from __future__ import annotations

import base64
import logging
import socket
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from m2m_client.errors import ConfigurationError
from m2m_client.testing import LocalIssuer

API = "https://api.example.com"
SECRET = "s3cret-value-123"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def running() -> Iterator[LocalIssuer]:
    issuer = LocalIssuer()
    issuer.add_client("worker", SECRET, scope="read:data write:data", roles=["admin"])
    with issuer:
        yield issuer


@pytest.fixture
def issuer() -> LocalIssuer:
    issuer = LocalIssuer(url="https://issuer.test/")
    issuer.add_client("worker", SECRET, scope="read:data write:data", roles=["admin"])
    return issuer


@pytest.fixture
def http(issuer: LocalIssuer) -> Iterator[httpx.Client]:
    with httpx.Client(transport=issuer.transport(), base_url=issuer.url) as client:
        yield client


def basic(client_id: str, secret: str) -> dict[str, str]:
    # RFC 6749 §2.3.1: form-urlencode each part, then Basic.
    raw = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}


def token_request(http: httpx.Client, **form: str) -> httpx.Response:
    form.setdefault("grant_type", "client_credentials")
    return http.post("oauth/token", data=form, headers=basic("worker", SECRET))


def verify(issuer: LocalIssuer, token: str, jwks: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    options = {"audience": API, "issuer": issuer.url, **kwargs}
    return jwt.decode(token, key.key, algorithms=[key.algorithm_name], **options)


# --- the real HTTP server ---------------------------------------------------------------


def test_http_server_issues_a_token_that_verifies_against_its_own_jwks(
    running: LocalIssuer,
) -> None:
    response = httpx.post(
        running.token_url,
        data={"grant_type": "client_credentials", "scope": "read:data"},
        headers=basic("worker", SECRET),
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "read:data"
    claims = verify(running, body["access_token"], httpx.get(running.jwks_url).json())
    assert claims["sub"] == "worker@clients"
    assert claims["azp"] == claims["client_id"] == "worker"
    assert claims["permissions"] == ["read:data"]
    assert claims[f"{API}/roles"] == ["admin"]
    assert claims["exp"] - claims["iat"] == body["expires_in"] == 3600
    assert jwt.get_unverified_header(body["access_token"])["typ"] == "at+jwt"


def test_http_server_publishes_both_discovery_documents_pointing_at_itself(
    running: LocalIssuer,
) -> None:
    oidc = httpx.get(running.url + ".well-known/openid-configuration").json()
    rfc8414 = httpx.get(running.url + ".well-known/oauth-authorization-server").json()
    assert oidc == rfc8414
    assert oidc["issuer"] == running.url
    assert oidc["token_endpoint"] == running.token_url
    assert oidc["jwks_uri"] == running.jwks_url
    assert oidc["grant_types_supported"] == ["client_credentials"]
    assert "client_secret_basic" in oidc["token_endpoint_auth_methods_supported"]
    assert running.url.startswith("http://127.0.0.1:")


def test_http_server_jwks_is_cacheable_and_lists_the_signing_key(running: LocalIssuer) -> None:
    response = httpx.get(running.jwks_url)
    assert response.headers["cache-control"] == "public, max-age=300"
    (key,) = response.json()["keys"]
    assert key["kid"] == running.kid
    assert key["alg"] == "RS256"
    assert "d" not in key  # never the private part
    assert httpx.get(running.url + "jwks.json").json() == response.json()


def test_http_server_refuses_a_body_over_the_limit_without_reading_it(
    running: LocalIssuer,
) -> None:
    response = httpx.post(
        running.token_url,
        content=b"grant_type=client_credentials&x=" + b"a" * 100_000,
        headers={"Content-Type": "application/x-www-form-urlencoded", **basic("worker", SECRET)},
    )
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"


def test_http_server_answers_a_burst_of_simultaneous_connections(running: LocalIssuer) -> None:
    # The stdlib's listen backlog of 5 made a burst like a fleet warming up lose handshakes:
    # callers then waited out SYN retransmits (1 s, 3 s, 7 s ...) and timed out.
    port = urllib.parse.urlsplit(running.url).port
    assert port is not None
    burst = 300
    barrier = threading.Barrier(burst)
    answers: list[bytes | str] = []

    def connect() -> None:
        barrier.wait()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
                sock.sendall(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
                answers.append(sock.recv(12))
        except OSError as exc:
            answers.append(repr(exc))

    threads = [threading.Thread(target=connect) for _ in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers == [b"HTTP/1.1 200"] * burst


def test_a_client_that_hangs_up_early_is_not_reported_on_stderr(
    running: LocalIssuer, capfd: pytest.CaptureFixture[str]
) -> None:
    port = urllib.parse.urlsplit(running.url).port
    assert port is not None
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            # SO_LINGER 0: close with a reset, so the server's write fails.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert httpx.get(running.jwks_url, timeout=5).status_code == 200
    assert "Traceback" not in capfd.readouterr().err


def test_stopping_the_server_releases_its_port() -> None:
    issuer = LocalIssuer()
    with issuer:
        url = issuer.jwks_url
        assert httpx.get(url).status_code == 200
    assert not issuer.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


def test_url_of_an_issuer_that_is_not_running_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="not running"):
        _ = LocalIssuer().url


@pytest.mark.anyio
async def test_async_context_manager_serves_over_http() -> None:
    issuer = LocalIssuer()
    issuer.add_client("worker", SECRET)
    async with issuer, httpx.AsyncClient() as http:
        response = await http.post(
            issuer.token_url,
            data={"grant_type": "client_credentials"},
            headers=basic("worker", SECRET),
        )
        assert response.status_code == 200
    assert not issuer.running


# --- the in-process transport ----------------------------------------------------------


def test_transport_issues_the_same_tokens_in_process(
    issuer: LocalIssuer, http: httpx.Client
) -> None:
    response = token_request(http)
    assert response.status_code == 200
    assert response.json()["scope"] == "read:data write:data"  # everything, when none asked
    claims = verify(issuer, response.json()["access_token"], http.get("jwks.json").json())
    assert claims["iss"] == "https://issuer.test/"
    assert issuer.token_requests == issuer.tokens_issued == 1


@pytest.mark.anyio
async def test_transport_works_with_the_async_client(issuer: LocalIssuer) -> None:
    async with httpx.AsyncClient(transport=issuer.transport(), base_url=issuer.url) as http:
        response = await http.post(
            "oauth/token",
            data={"grant_type": "client_credentials", "client_id": "worker"},
            headers=basic("worker", SECRET),
        )
    assert response.status_code == 200


def test_client_secret_post_is_accepted(http: httpx.Client) -> None:
    response = http.post(
        "oauth/token",
        data={"grant_type": "client_credentials", "client_id": "worker", "client_secret": SECRET},
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [("svc:reports", "p@ss:w/rd+ %é"), ("a+b c", "100%=ok&x"), ("plain", "colon:in:secret")],
)
def test_basic_credentials_are_form_urldecoded_after_base64(
    issuer: LocalIssuer, http: httpx.Client, client_id: str, secret: str
) -> None:
    issuer.add_client(client_id, secret)
    response = http.post(
        "oauth/token", data={"grant_type": "client_credentials"}, headers=basic(client_id, secret)
    )
    assert response.status_code == 200
    assert jwt.decode(response.json()["access_token"], options={"verify_signature": False})[
        "azp"
    ] == (client_id)


def test_expires_in_matches_the_token_lifetime_and_the_clock() -> None:
    clock = FakeClock()
    issuer = LocalIssuer(url="https://issuer.test/", clock=clock, token_lifetime=600)
    issuer.add_client("worker", SECRET)
    issuer.add_client("short", SECRET, expires_in=5)
    http = httpx.Client(transport=issuer.transport(), base_url=issuer.url)
    body = token_request(http).json()
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert body["expires_in"] == 600
    assert claims["iat"] == int(clock.now)
    assert claims["exp"] == int(clock.now) + 600
    short = http.post(
        "oauth/token", data={"grant_type": "client_credentials"}, headers=basic("short", SECRET)
    )
    assert short.json()["expires_in"] == 5


def test_audience_and_resource_select_one_of_the_allowed_apis(
    issuer: LocalIssuer, http: httpx.Client
) -> None:
    issuer.add_client("multi", SECRET, audiences=["https://a.test", "https://b.test"])
    headers = basic("multi", SECRET)
    form = {"grant_type": "client_credentials"}
    for extra, expected in [({}, "https://a.test"), ({"audience": "https://b.test"}, None)]:
        response = http.post("oauth/token", data={**form, **extra}, headers=headers)
        claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
        assert claims["aud"] == (expected or "https://b.test")
    refused = http.post("oauth/token", data={**form, "resource": API}, headers=headers)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_target"


# --- RFC 6749 §5.2 error responses ----------------------------------------------------------


def assert_oauth_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["error"] == error
    assert response.json()["error_description"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Basic realm=")


def test_wrong_secret_is_invalid_client_with_www_authenticate(http: httpx.Client) -> None:
    response = http.post(
        "oauth/token", data={"grant_type": "client_credentials"}, headers=basic("worker", "nope")
    )
    assert_oauth_error(response, 401, "invalid_client")


@pytest.mark.parametrize(
    ("form", "headers", "status", "error"),
    [
        ({"grant_type": "client_credentials"}, {}, 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, basic("nobody", SECRET), 401, "invalid_client"),
        (
            {"grant_type": "client_credentials"},
            {"Authorization": "Basic !!"},
            401,
            "invalid_client",
        ),
        (
            {"grant_type": "client_credentials"},
            {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
            401,
            "invalid_client",
        ),
        (
            {"grant_type": "client_credentials", "client_id": "worker", "client_secret": "x"},
            basic("worker", SECRET),
            400,
            "invalid_request",
        ),
        ({}, basic("worker", SECRET), 400, "invalid_request"),
        ({"grant_type": "password"}, basic("worker", SECRET), 400, "unsupported_grant_type"),
        (
            {"grant_type": "client_credentials", "scope": "read:data delete:all"},
            basic("worker", SECRET),
            400,
            "invalid_scope",
        ),
        (
            {"grant_type": "client_credentials", "client_id": "someone-else"},
            basic("worker", SECRET),
            400,
            "invalid_request",
        ),
    ],
)
def test_bad_token_requests_get_the_rfc_6749_error(
    http: httpx.Client, form: dict[str, str], headers: dict[str, str], status: int, error: str
) -> None:
    assert_oauth_error(http.post("oauth/token", data=form, headers=headers), status, error)


def test_repeated_parameters_are_invalid_request(http: httpx.Client) -> None:
    response = http.post(
        "oauth/token",
        content=b"grant_type=client_credentials&scope=a&scope=b",
        headers={"Content-Type": "application/x-www-form-urlencoded", **basic("worker", SECRET)},
    )
    assert_oauth_error(response, 400, "invalid_request")


def test_a_json_body_is_invalid_request(http: httpx.Client) -> None:
    response = http.post(
        "oauth/token", json={"grant_type": "client_credentials"}, headers=basic("worker", SECRET)
    )
    assert_oauth_error(response, 400, "invalid_request")


def test_client_without_the_grant_is_unauthorized_client(
    issuer: LocalIssuer, http: httpx.Client
) -> None:
    issuer.add_client("ui", SECRET, grant_types=["authorization_code"])
    response = http.post(
        "oauth/token", data={"grant_type": "client_credentials"}, headers=basic("ui", SECRET)
    )
    assert_oauth_error(response, 400, "unauthorized_client")


def test_client_limited_to_post_cannot_use_basic(issuer: LocalIssuer, http: httpx.Client) -> None:
    issuer.add_client("postonly", SECRET, auth_methods=["client_secret_post"])
    response = http.post(
        "oauth/token", data={"grant_type": "client_credentials"}, headers=basic("postonly", SECRET)
    )
    assert_oauth_error(response, 401, "invalid_client")


def test_unknown_paths_and_methods_are_refused(http: httpx.Client) -> None:
    assert http.get("nowhere").status_code == 404
    wrong_method = http.get("oauth/token")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"


def test_secrets_never_reach_the_logs(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="m2m_client")
    token = token_request(http).json()["access_token"]
    http.post(
        "oauth/token", data={"grant_type": "client_credentials"}, headers=basic("worker", "wrong1")
    )
    assert caplog.records  # something was logged ...
    assert SECRET not in caplog.text  # ... but no secret and no token
    assert "wrong1" not in caplog.text
    assert token not in caplog.text


# --- failure injection and counters --------------------------------------------------------


def test_fail_next_injects_outages_then_recovers(issuer: LocalIssuer, http: httpx.Client) -> None:
    issuer.fail_next(2, status=503, retry_after=1)
    first, second, third = (token_request(http) for _ in range(3))
    assert first.status_code == second.status_code == 503
    assert first.headers["retry-after"] == "1"
    assert third.status_code == 200
    assert issuer.token_requests == 3
    assert issuer.tokens_issued == 1
    issuer.fail_next(status=400, error="invalid_client", error_description="disabled")
    assert token_request(http).json() == {
        "error": "invalid_client",
        "error_description": "disabled",
    }
    issuer.reset_counters()
    assert issuer.token_requests == 0


# --- minting, keys and rotation ----------------------------------------------------------------


def test_mint_builds_auth0_like_claims_with_extras(issuer: LocalIssuer) -> None:
    token = issuer.mint(
        sub="svc@clients",
        scope="read:items",
        permissions=["read:dashboard"],
        roles=["admin"],
        tenant="acme",
    )
    claims = verify(issuer, token, issuer.jwks())
    assert claims["sub"] == "svc@clients"
    assert claims["azp"] == "svc"
    assert claims["scope"] == "read:items"
    assert claims["permissions"] == ["read:dashboard"]
    assert claims["https://api.example.com/roles"] == ["admin"]
    assert claims["tenant"] == "acme"


def test_mint_with_negative_lifetime_makes_an_expired_token(issuer: LocalIssuer) -> None:
    token = issuer.mint(expires_in=-60)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(issuer, token, issuer.jwks())


def test_roles_claim_is_configurable() -> None:
    issuer = LocalIssuer(url="https://issuer.test/", roles_claim="roles")
    claims = jwt.decode(issuer.mint(roles=["admin"]), options={"verify_signature": False})
    assert claims["roles"] == ["admin"]
    assert issuer.roles_claim == "roles"
    assert LocalIssuer(audience="https://x.test").roles_claim == "https://x.test/roles"


def test_rotation_publishes_the_new_key_and_keeps_the_old_one(issuer: LocalIssuer) -> None:
    old_kid, old_token = issuer.kid, issuer.mint()
    new_kid = issuer.rotate_keys()
    new_token = issuer.mint()
    assert new_kid != old_kid
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert [k["kid"] for k in issuer.jwks()["keys"]] == [new_kid, old_kid]
    verify(issuer, old_token, issuer.jwks())
    verify(issuer, new_token, issuer.jwks())
    issuer.retire_old_keys()
    assert [k["kid"] for k in issuer.jwks()["keys"]] == [new_kid]


def test_es256_issuer_signs_with_a_p256_key() -> None:
    issuer = LocalIssuer("ES256", url="https://issuer.test/")
    token = issuer.mint()
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    (key,) = issuer.jwks()["keys"]
    assert (key["kty"], key["crv"], key["alg"]) == ("EC", "P-256", "ES256")
    assert verify(issuer, token, issuer.jwks())["iss"] == "https://issuer.test/"


def test_unknown_algorithm_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        LocalIssuer("HS256")  # type: ignore[arg-type]


# --- private_key_jwt (RFC 7523) ---------------------------------------------------------------


def test_private_key_jwt_is_accepted_once_per_assertion(
    issuer: LocalIssuer, http: httpx.Client
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer.add_client("signer", public_key=key.public_key())
    now = int(time.time())
    assertion = jwt.encode(
        {
            "iss": "signer",
            "sub": "signer",
            "aud": issuer.token_url,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 60,
        },
        key,
        algorithm="ES256",
    )
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    assert http.post("oauth/token", data=form).status_code == 200
    assert_oauth_error(http.post("oauth/token", data=form), 401, "invalid_client")  # replay


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_fixed_loopback_url_binds_exactly_that_port() -> None:
    port = free_port()
    issuer = LocalIssuer(url=f"http://127.0.0.1:{port}/")
    with issuer:
        assert issuer.url == f"http://127.0.0.1:{port}/"
        document = httpx.get(issuer.discovery_url).json()
        assert document["issuer"] == issuer.url
        assert document["token_endpoint"] == f"http://127.0.0.1:{port}/oauth/token"


def test_a_fixed_port_that_is_taken_raises_instead_of_binding_another() -> None:
    with LocalIssuer() as first:
        taken = first.url
        second = LocalIssuer(url=taken)
        with pytest.raises(ConfigurationError, match="already in use"):
            second.start()
        assert not second.running


@pytest.mark.parametrize(
    "url", ["https://issuer.test/", "http://10.0.0.1:9011/", "http://127.0.0.1/"]
)
def test_a_url_that_cannot_be_served_on_loopback_refuses_to_start(url: str) -> None:
    issuer = LocalIssuer(url=url)
    with pytest.raises(ConfigurationError, match=r"127\.0\.0\.1"):
        issuer.start()
    assert not issuer.running


def test_a_dotted_roles_claim_mints_the_nested_keycloak_shape() -> None:
    issuer = LocalIssuer(url="https://issuer.test/", roles_claim="realm_access.roles")
    token = issuer.mint(roles=["admin"], realm_access={"other": 1})
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["realm_access"] == {"other": 1, "roles": ["admin"]}
    assert "realm_access.roles" not in payload


def test_a_namespaced_auth0_roles_claim_stays_one_literal_claim(issuer: LocalIssuer) -> None:
    payload = jwt.decode(issuer.mint(roles=["admin"]), options={"verify_signature": False})
    assert payload["https://api.example.com/roles"] == ["admin"]
