"""DPoP (RFC 9449) against a real authorization server: node oidc-provider 8.8.1.

Our DPoPKey signs the token request proofs, the server checks them (its own RFC 9449
implementation, built on panva/jose) and binds the token to our key; then our proof
checker and binding check run on that real token. The token client wiring comes later:
these tests POST the client_credentials request with httpx directly.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest

from m2m_client._dpop import (
    DPOP_ALGORITHMS,
    DPoPKey,
    NonceStore,
    token_endpoint_nonce_challenge,
)
from m2m_client.errors import DPoPBindingError, DPoPProofError
from m2m_client.verify._proof import (
    DPoPChecker,
    check_token_binding,
    dpop_decision,
    token_jkt,
)
from tests.interop.conftest import DPOP_CLIENT, DPOP_NONCE_CLIENT, DPOP_RESOURCE, IdP

pytestmark = pytest.mark.interop

API_URL = "https://es256.api.test/data"
TIMEOUT = 10.0


def request_token(
    idp: IdP,
    client: tuple[str, str],
    proof: str | None,
) -> httpx.Response:
    headers = {"DPoP": proof} if proof is not None else {}
    return httpx.post(
        idp.token_url,
        data={"grant_type": "client_credentials", "resource": DPOP_RESOURCE, "scope": "read:data"},
        auth=client,
        headers=headers,
        timeout=TIMEOUT,
    )


def verified_claims(idp: IdP, token: str) -> dict[str, Any]:
    """The token's claims, its signature checked against the server's JWKS (PyJWT)."""
    keys = jwt.PyJWKSet.from_dict(httpx.get(idp.jwks_url, timeout=TIMEOUT).json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["ES256"], audience=DPOP_RESOURCE, issuer=idp.issuer
    )
    return claims


def bound_token(idp: IdP, key: DPoPKey) -> str:
    response = request_token(idp, DPOP_CLIENT, key.proof("POST", idp.token_url, now=time.time()))
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


@pytest.mark.parametrize("alg", DPOP_ALGORITHMS)
def test_server_binds_the_token_to_our_key(idp: IdP, alg: str) -> None:
    key = DPoPKey.generate(alg)
    response = request_token(idp, DPOP_CLIENT, key.proof("POST", idp.token_url, now=time.time()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"
    claims = verified_claims(idp, body["access_token"])
    assert claims["cnf"] == {"jkt": key.thumbprint}


def test_server_accepts_our_normalised_htu_for_an_unnormalised_url(idp: IdP) -> None:
    # The query is left out and the scheme/host case and default-port rules applied, the
    # way the server's WHATWG URL parser compares them.
    url = idp.token_url.replace("http://", "HTTP://") + "?ignored=1#fragment"
    key = DPoPKey.generate()
    response = request_token(idp, DPOP_CLIENT, key.proof("POST", url, now=time.time()))
    assert response.status_code == 200, response.text


def test_server_refuses_a_bound_client_without_proof(idp: IdP) -> None:
    response = request_token(idp, DPOP_CLIENT, None)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_server_refuses_our_proof_for_another_method_or_url(idp: IdP) -> None:
    key = DPoPKey.generate()
    for proof in (
        key.proof("GET", idp.token_url, now=time.time()),
        key.proof("POST", f"{idp.issuer}/other", now=time.time()),
    ):
        response = request_token(idp, DPOP_CLIENT, proof)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_dpop_proof"


def test_server_answers_an_old_proof_with_a_nonce_challenge(idp: IdP) -> None:
    # RFC 9449 §8 lets a server that issues nonces offer one instead of refusing outright
    # when iat is outside its window; oidc-provider does, and our decision helper sees it.
    key = DPoPKey.generate()
    response = request_token(
        idp, DPOP_CLIENT, key.proof("POST", idp.token_url, now=time.time() - 3600)
    )
    assert response.status_code == 400
    nonce = token_endpoint_nonce_challenge(
        400, response.json().get("error"), response.headers.get("DPoP-Nonce")
    )
    assert nonce is not None
    retried = request_token(
        idp, DPOP_CLIENT, key.proof("POST", idp.token_url, now=time.time(), nonce=nonce)
    )
    assert retried.status_code == 200, retried.text


def test_server_refuses_a_replayed_token_request_proof(idp: IdP) -> None:
    key = DPoPKey.generate()
    proof = key.proof("POST", idp.token_url, now=time.time())
    assert request_token(idp, DPOP_CLIENT, proof).status_code == 200
    replayed = request_token(idp, DPOP_CLIENT, proof)
    assert replayed.status_code == 400
    assert replayed.json()["error"] == "invalid_grant"


def test_nonce_challenge_is_recognised_and_answered_once(idp: IdP) -> None:
    key = DPoPKey.generate()
    nonces = NonceStore()
    first = request_token(idp, DPOP_NONCE_CLIENT, key.proof("POST", idp.token_url, now=time.time()))
    assert first.status_code == 400
    nonce = token_endpoint_nonce_challenge(
        first.status_code, first.json().get("error"), first.headers.get("DPoP-Nonce")
    )
    assert nonce is not None
    assert nonces.update(idp.token_url, first.headers.get("DPoP-Nonce"))
    assert nonces.get(idp.token_url) == nonce

    second = request_token(
        idp,
        DPOP_NONCE_CLIENT,
        key.proof("POST", idp.token_url, now=time.time(), nonce=nonces.get(idp.token_url)),
    )
    assert second.status_code == 200, second.text
    assert second.json()["token_type"] == "DPoP"
    claims = verified_claims(idp, second.json()["access_token"])
    assert claims["cnf"]["jkt"] == key.thumbprint


def test_a_wrong_nonce_is_another_challenge_not_a_token(idp: IdP) -> None:
    key = DPoPKey.generate()
    response = request_token(
        idp, DPOP_NONCE_CLIENT, key.proof("POST", idp.token_url, now=time.time(), nonce="stale")
    )
    assert response.status_code == 400
    assert token_endpoint_nonce_challenge(
        400, response.json().get("error"), response.headers.get("DPoP-Nonce")
    )


# --- our receiving side on the server's real token ---------------------------------------


def test_our_checker_accepts_the_real_token_with_our_proof(idp: IdP) -> None:
    key = DPoPKey.generate()
    token = bound_token(idp, key)
    claims = verified_claims(idp, token)
    assert dpop_decision("allowed", scheme="DPoP", token_jkt=token_jkt(claims)) == "dpop"
    now = time.time()
    proof = DPoPChecker().check(
        key.proof("GET", API_URL, now=now, access_token=token),
        method="GET",
        url=API_URL,
        now=now,
        access_token=token,
    )
    check_token_binding(claims, proof)


def test_the_real_bound_token_is_refused_as_a_bearer_token(idp: IdP) -> None:
    claims = verified_claims(idp, bound_token(idp, DPoPKey.generate()))
    for policy in ("allowed", "required"):
        with pytest.raises(DPoPBindingError):
            dpop_decision(policy, scheme="Bearer", token_jkt=token_jkt(claims))  # type: ignore[arg-type]


def test_our_checker_refuses_no_proof_or_one_for_another_key_method_url_or_token(idp: IdP) -> None:
    key = DPoPKey.generate()
    token = bound_token(idp, key)
    claims = verified_claims(idp, token)
    checker = DPoPChecker()
    now = time.time()

    thief = DPoPKey.generate()  # a stolen token, a proof by the thief's own key
    stolen = checker.check(
        thief.proof("GET", API_URL, now=now, access_token=token),
        method="GET",
        url=API_URL,
        now=now,
        access_token=token,
    )
    with pytest.raises(DPoPProofError):
        check_token_binding(claims, stolen)

    with pytest.raises(DPoPProofError, match="no DPoP header"):  # the token alone
        checker.check(None, method="GET", url=API_URL, now=now, access_token=token)

    for method, url, proof_token in (
        ("POST", API_URL, token),
        ("GET", "https://es256.api.test/admin", token),
        ("GET", API_URL, bound_token(idp, key)),  # the same key's other token
    ):
        with pytest.raises(DPoPProofError):
            checker.check(
                key.proof(method, url, now=now, access_token=proof_token),
                method="GET",
                url=API_URL,
                now=now,
                access_token=token,
            )


def test_our_checker_refuses_a_replayed_proof_for_the_real_token(idp: IdP) -> None:
    key = DPoPKey.generate()
    token = bound_token(idp, key)
    checker = DPoPChecker()
    now = time.time()
    proof = key.proof("GET", API_URL, now=now, access_token=token)
    checker.check(proof, method="GET", url=API_URL, now=now, access_token=token)
    with pytest.raises(DPoPProofError, match="replay"):
        checker.check(proof, method="GET", url=API_URL, now=now + 1, access_token=token)
