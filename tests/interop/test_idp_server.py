"""The test authorization server itself, checked with plain httpx and PyJWT.

These pin down what the other interop tests rely on (endpoints, clients, token format), so that a
failure there points at our code, not at the fixture.
"""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pytest

from tests.interop.conftest import DEFAULT_RESOURCE, RESOURCE_BY_ALG, IdP

pytestmark = pytest.mark.interop


def _token(idp: IdP, **form: str) -> httpx.Response:
    return httpx.post(
        idp.token_url,
        data={"grant_type": "client_credentials", **form},
        auth=httpx.BasicAuth(*idp.basic_client),
        timeout=5.0,
    )


def test_discovery_advertises_the_endpoints_and_auth_methods_the_tests_use(idp: IdP) -> None:
    metadata = httpx.get(f"{idp.issuer}/.well-known/openid-configuration", timeout=5.0).json()

    assert metadata["issuer"] == idp.issuer
    assert metadata["token_endpoint"] == idp.token_url
    assert metadata["jwks_uri"] == idp.jwks_url
    assert "client_credentials" in metadata["grant_types_supported"]
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt"} <= set(
        metadata["token_endpoint_auth_methods_supported"]
    )


def test_server_listens_on_loopback_only(idp: IdP) -> None:
    assert idp.issuer.startswith("http://127.0.0.1:")


@pytest.mark.parametrize(("alg", "resource"), sorted(RESOURCE_BY_ALG.items()))
def test_each_resource_gets_a_jwt_access_token_signed_with_its_algorithm(
    idp: IdP, alg: str, resource: str
) -> None:
    response = _token(idp, resource=resource, scope="read:data")

    assert response.status_code == 200, response.text
    body = response.json()
    header = jwt.get_unverified_header(body["access_token"])
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert header["alg"] == alg
    assert header["typ"] == "at+jwt"
    assert claims["aud"] == resource
    assert claims["iss"] == idp.issuer
    assert claims["client_id"] == "basic-client"
    assert body["scope"] == claims["scope"] == "read:data"


def test_a_request_without_resource_gets_the_default_resource(idp: IdP) -> None:
    response = _token(idp)

    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == DEFAULT_RESOURCE


def test_an_unknown_resource_is_refused_with_invalid_target(idp: IdP) -> None:
    response = _token(idp, resource="https://unknown.api.test/")

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"


def test_client_secret_post_client_gets_a_token(idp: IdP) -> None:
    client_id, secret = idp.post_client
    response = httpx.post(
        idp.token_url,
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
        timeout=5.0,
    )

    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer"


def test_private_key_jwt_client_gets_a_token_with_a_hand_made_assertion(idp: IdP) -> None:
    client = idp.key_client
    now = int(time.time())
    assertion = jwt.encode(
        {
            "iss": client.client_id,
            "sub": client.client_id,
            "aud": idp.token_url,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "exp": now + 60,
        },
        client.ec_private_pem,
        algorithm="ES256",
        headers={"kid": client.ec_kid},
    )
    response = httpx.post(
        idp.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": client.client_id,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=5.0,
    )

    assert response.status_code == 200, response.text


def test_wrong_secret_is_refused_with_invalid_client(idp: IdP) -> None:
    response = httpx.post(
        idp.token_url,
        data={"grant_type": "client_credentials"},
        auth=httpx.BasicAuth(idp.basic_client[0], "wrong-secret"),
        timeout=5.0,
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_rotation_publishes_new_keys_first_and_keeps_the_old_ones(idp: IdP) -> None:
    before = [key["kid"] for key in httpx.get(idp.jwks_url, timeout=5.0).json()["keys"]]

    new_kids = idp.rotate()

    after = [key["kid"] for key in httpx.get(idp.jwks_url, timeout=5.0).json()["keys"]]
    assert after[: len(new_kids)] == new_kids
    assert set(before) < set(after)
    token = _token(idp, resource=RESOURCE_BY_ALG["ES256"]).json()["access_token"]
    assert jwt.get_unverified_header(token)["kid"] in new_kids


def test_rotation_hook_refuses_callers_without_the_admin_token(idp: IdP) -> None:
    response = httpx.post(f"{idp.issuer}/__test__/rotate", timeout=5.0)

    assert response.status_code == 403
