"""DPoP (RFC 9449) end to end: token clients, BearerAuth, the verifiers and JWTBearer.

The token side talks to LocalIssuer over real HTTP on 127.0.0.1; the API is a FastAPI app
(JWTBearer) served by uvicorn on 127.0.0.1. MockTransport only where a server behaviour
LocalIssuer does not have (a server that ignores proofs) is needed.
"""

# No `from __future__ import annotations`: FastAPI evaluates the Annotated[..., Depends(x)]
# hints of nested route functions at runtime.

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI, Request

from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials, DPoPKey, TokenClient
from m2m_client._stacks import Stack, installed
from m2m_client.errors import ConfigurationError, InvalidTokenResponse
from m2m_client.fastapi import JWTBearer
from m2m_client.testing import LocalIssuer
from m2m_client.verify import (
    AsyncTokenVerifier,
    Claims,
    DPoPChecker,
    HmacNonceSource,
    TokenVerifier,
)
from tests._asgi_server import serve

WORKER, SECRET = "dpop-worker", "dpop-worker-secret"


@pytest.fixture
def issuer(local_issuer: LocalIssuer) -> LocalIssuer:
    local_issuer.add_client(WORKER, SECRET, scope="read:data", permissions=["read:data"])
    return local_issuer


def creds(issuer: LocalIssuer, dpop: Any = True) -> ClientCredentials:
    return ClientCredentials(
        token_url=issuer.token_url, client_id=WORKER, client_secret=SECRET, dpop=dpop
    )


def unverified(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def verifier_options(issuer: LocalIssuer) -> dict[str, Any]:
    return {"issuer": issuer.url, "audience": issuer.audience, "algorithms": ["RS256"]}


class Api:
    """A FastAPI service on 127.0.0.1 protected by JWTBearer; records what it received."""

    def __init__(self, verifier: AsyncTokenVerifier | TokenVerifier, **options: Any) -> None:
        self.seen: list[dict[str, str]] = []
        app = FastAPI()
        auth = JWTBearer(verifier, **options)

        async def record(request: Request) -> None:
            self.seen.append(dict(request.headers))

        @app.get("/data", dependencies=[Depends(record)])
        async def data(claims: Annotated[Claims, Depends(auth)]) -> dict[str, Any]:
            return {"sub": claims.subject, "cnf": dict(claims.get("cnf") or {})}

        @app.post("/data", dependencies=[Depends(record)])
        async def post_data(claims: Annotated[Claims, Depends(auth)]) -> dict[str, Any]:
            return {"sub": claims.subject}

        self.app = app


@pytest.fixture
def api_factory() -> Iterator[Any]:
    servers: list[Any] = []

    def start(verifier: AsyncTokenVerifier | TokenVerifier, **options: Any) -> tuple[Api, str]:
        api = Api(verifier, **options)
        context = serve(api.app)
        url = context.__enter__()
        servers.append(context)
        return api, url

    yield start
    for context in servers:
        context.__exit__(None, None, None)


# --- calling side: the token request -------------------------------------------------------


def test_token_client_gets_a_token_bound_to_its_key(issuer: LocalIssuer) -> None:
    with TokenClient(creds(issuer)) as tokens:
        token = tokens.get_token()
        key = tokens._core.dpop
    assert key is not None
    assert token.token_type == "DPoP"
    assert token.authorization == f"DPoP {token.access_token}"
    assert unverified(token.access_token)["cnf"] == {"jkt": key.thumbprint}
    assert "DPoP" in repr(token)
    assert token.access_token not in repr(token)


@pytest.mark.anyio
async def test_async_token_client_gets_a_token_bound_to_a_given_key(issuer: LocalIssuer) -> None:
    key = DPoPKey.from_pem(DPoPKey.generate("ES384").private_key_pem())
    async with AsyncTokenClient(creds(issuer, key)) as tokens:
        token = await tokens.get_token()
    assert token.token_type == "DPoP"
    assert unverified(token.access_token)["cnf"] == {"jkt": key.thumbprint}


def test_dpop_true_is_a_fresh_key_per_client_and_the_cache_key_names_it(
    issuer: LocalIssuer,
) -> None:
    shared = creds(issuer)
    with TokenClient(shared) as one, TokenClient(shared) as two:
        assert one._core.dpop is not None
        assert two._core.dpop is not None
        assert one._core.dpop.thumbprint != two._core.dpop.thumbprint
        assert one._core.default_key.dpop_jkt == one._core.dpop.thumbprint
        assert one._core.default_key != two._core.default_key
        # One cache for both: each still gets a token bound to its own key.
        two._cache = two._core.cache = one._core.cache
        first, second = one.get_token(), two.get_token()
    assert first.access_token != second.access_token
    assert unverified(second.access_token)["cnf"]["jkt"] == two._core.dpop.thumbprint


def test_without_dpop_nothing_changes(issuer: LocalIssuer) -> None:
    with TokenClient(creds(issuer, False)) as tokens:
        token = tokens.get_token()
        assert tokens._core.dpop is None
        assert tokens._core.default_key.dpop_jkt is None
    assert token.token_type == "Bearer"
    assert token.authorization.startswith("Bearer ")
    assert "cnf" not in unverified(token.access_token)


def test_token_endpoint_nonce_challenge_is_answered_once_and_remembered(
    issuer: LocalIssuer,
) -> None:
    issuer.dpop_nonce = True
    with TokenClient(creds(issuer)) as tokens:
        token = tokens.get_token()
        assert token.token_type == "DPoP"
        assert issuer.token_requests == 2  # use_dpop_nonce, then the retry with it
        assert tokens._core.nonces.get(issuer.token_url) is not None
        tokens.get_token(force_refresh=True)
        assert issuer.token_requests == 3  # the remembered nonce is used at once
        assert tokens.stats.retries == 0  # not a back-off retry


@pytest.mark.anyio
async def test_async_nonce_challenge(issuer: LocalIssuer) -> None:
    issuer.dpop_nonce = True
    async with AsyncTokenClient(creds(issuer)) as tokens:
        token = await tokens.get_token()
    assert token.token_type == "DPoP"
    assert issuer.token_requests == 2


def test_a_refused_proof_is_an_oauth_error_not_a_retry_loop(issuer: LocalIssuer) -> None:
    issuer.dpop_nonce = True
    with TokenClient(creds(issuer)) as tokens:
        # A nonce the server never issued: the retry with it is refused again, and that
        # second use_dpop_nonce is the answer (one retry only).
        tokens._core.nonces.update(issuer.token_url, "not-the-servers-nonce")
        token = tokens.get_token()  # the challenge carries the right nonce: one retry
        assert token.token_type == "DPoP"
        assert issuer.token_requests == 2


def _token_response(token_type: str) -> httpx.MockTransport:
    def respond(request: httpx.Request) -> httpx.Response:
        body = {"access_token": "opaque-token", "token_type": token_type, "expires_in": 300}
        return httpx.Response(200, json=body, headers={"DPoP-Nonce": "n-1"})

    return httpx.MockTransport(respond)


def test_a_bearer_answer_to_a_proof_is_used_as_bearer_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = ClientCredentials(
        token_url="https://idp.test/token", client_id="c", client_secret="s", dpop=True
    )
    http = httpx.Client(transport=_token_response("Bearer"))
    with caplog.at_level(logging.WARNING, "m2m_client"), TokenClient(c, http_client=http) as t:
        token = t.get_token()
        assert t._core.nonces.get("https://idp.test/other") == "n-1"  # remembered per origin
    assert token.token_type == "Bearer"
    assert token.authorization == "Bearer opaque-token"
    assert "not bound to the DPoP key" in caplog.text


def test_a_dpop_token_type_without_a_proof_is_refused() -> None:
    c = ClientCredentials(token_url="https://idp.test/token", client_id="c", client_secret="s")
    http = httpx.Client(transport=_token_response("DPoP"))
    with TokenClient(c, http_client=http) as tokens, pytest.raises(InvalidTokenResponse):
        tokens.get_token()


def test_the_token_request_carries_a_proof_for_post_to_the_token_url() -> None:
    seen: list[httpx.Request] = []

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"access_token": "t", "token_type": "DPoP"})

    key = DPoPKey.generate()
    c = ClientCredentials(
        token_url="https://idp.test/oauth/token?x=1", client_id="c", client_secret="s", dpop=key
    )
    with TokenClient(c, http_client=httpx.Client(transport=httpx.MockTransport(respond))) as t:
        t.get_token()
    proof = seen[0].headers["dpop"]
    header = jwt.get_unverified_header(proof)
    payload = unverified(proof)
    assert header["typ"] == "dpop+jwt"
    assert header["jwk"] == key.public_jwk
    assert payload["htm"] == "POST"
    assert payload["htu"] == "https://idp.test/oauth/token"
    assert "ath" not in payload
    assert "nonce" not in payload


# --- calling side: BearerAuth against a FastAPI service -----------------------------------


@pytest.mark.parametrize("policy", ["allowed", "required"])
def test_bearer_auth_sends_token_and_fresh_proof_per_request(
    issuer: LocalIssuer, api_factory: Any, policy: Any
) -> None:
    api, base = api_factory(AsyncTokenVerifier(dpop=policy, **verifier_options(issuer)))
    with TokenClient(creds(issuer)) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
        first = http.get(f"{base}/data?page=1")
        second = http.post(f"{base}/data", json={"x": 1})
        key = tokens._core.dpop
    assert key is not None
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert first.json()["cnf"] == {"jkt": key.thumbprint}
    proofs = [seen["dpop"] for seen in api.seen]
    assert all(seen["authorization"].startswith("DPoP ") for seen in api.seen)
    assert proofs[0] != proofs[1]
    p1, p2 = unverified(proofs[0]), unverified(proofs[1])
    assert (p1["htm"], p1["htu"]) == ("GET", f"{base}/data")
    assert (p2["htm"], p2["htu"]) == ("POST", f"{base}/data")
    assert p1["ath"]
    assert p1["jti"] != p2["jti"]


@pytest.mark.anyio
async def test_async_bearer_auth_answers_a_resource_nonce_challenge_once(
    issuer: LocalIssuer, api_factory: Any
) -> None:
    checker = DPoPChecker(nonces=HmacNonceSource())
    # The service runs on uvicorn's asyncio loop; a TokenVerifier does not tie it to ours.
    verifier = TokenVerifier(dpop="required", dpop_checker=checker, **verifier_options(issuer))
    api, base = api_factory(verifier)
    tokens = AsyncTokenClient(creds(issuer))
    async with tokens, httpx.AsyncClient(auth=BearerAuth(tokens)) as http:
        first = await http.get(f"{base}/data")
        assert first.status_code == 200, first.text
        assert len(api.seen) == 2  # use_dpop_nonce, then the retry with the nonce
        assert "nonce" not in unverified(api.seen[0]["dpop"])
        assert "nonce" in unverified(api.seen[1]["dpop"])
        assert first.headers["dpop-nonce"]  # a fresh nonce with every success
        second = await http.get(f"{base}/data")
        assert second.status_code == 200
        assert len(api.seen) == 3
        assert unverified(api.seen[2]["dpop"])["nonce"] == first.headers["dpop-nonce"]
    assert issuer.token_requests == 1  # the nonce retry is not a token renewal


def test_sync_bearer_auth_answers_a_resource_nonce_challenge_once(
    issuer: LocalIssuer, api_factory: Any
) -> None:
    checker = DPoPChecker(nonces=HmacNonceSource())
    verifier = TokenVerifier(dpop="required", dpop_checker=checker, **verifier_options(issuer))
    api, base = api_factory(verifier)
    with TokenClient(creds(issuer)) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
        assert http.get(f"{base}/data").status_code == 200
        assert http.get(f"{base}/data").status_code == 200
    assert len(api.seen) == 3
    assert issuer.token_requests == 1


def test_a_stolen_token_is_refused_without_the_key(issuer: LocalIssuer, api_factory: Any) -> None:
    api, base = api_factory(AsyncTokenVerifier(dpop="allowed", **verifier_options(issuer)))
    with TokenClient(creds(issuer)) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
        assert http.get(f"{base}/data").status_code == 200
        token = tokens.get_token().access_token
    stolen_proof = api.seen[-1]["dpop"]
    thief_key = DPoPKey.generate()
    url = f"{base}/data"
    attempts = {
        "bearer": {"Authorization": f"Bearer {token}"},
        "no proof": {"Authorization": f"DPoP {token}"},
        "replayed proof": {"Authorization": f"DPoP {token}", "DPoP": stolen_proof},
        "thief's key": {
            "Authorization": f"DPoP {token}",
            "DPoP": thief_key.proof("GET", url, now=time.time(), access_token=token),
        },
    }
    for name, headers in attempts.items():
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401, name
        challenge = response.headers["www-authenticate"]
        assert "DPoP" in challenge, name
        assert 'algs="' in challenge, name
        assert token not in response.text + challenge, name
    assert (
        'DPoP error="invalid_dpop_proof"'
        in httpx.get(url, headers=attempts["no proof"]).headers["www-authenticate"]
    )
    assert (
        httpx.get(url, headers=attempts["bearer"])
        .headers["www-authenticate"]
        .startswith('Bearer error="invalid_token"')
    )


def test_bearer_auth_renews_a_refused_dpop_token_once(
    issuer: LocalIssuer, api_factory: Any
) -> None:
    with TokenClient(creds(issuer)) as tokens, httpx.Client(auth=BearerAuth(tokens)) as http:
        old = tokens.get_token()
        issuer.rotate_keys()
        issuer.retire_old_keys()  # the API will refuse the cached token: its key is gone
        api, base = api_factory(AsyncTokenVerifier(dpop="required", **verifier_options(issuer)))
        response = http.get(f"{base}/data")
        assert response.status_code == 200, response.text
        new = tokens.get_token()
    assert new.access_token != old.access_token
    assert issuer.token_requests == 2
    assert [seen["authorization"] for seen in api.seen] == [old.authorization, new.authorization]
    assert unverified(api.seen[1]["dpop"])["ath"] != unverified(api.seen[0]["dpop"])["ath"]


# --- receiving side: verify() -----------------------------------------------------------------


def _bound(issuer: LocalIssuer, key: DPoPKey) -> str:
    return issuer.mint(cnf={"jkt": key.thumbprint})


URL = "https://api.example.com/data"


def test_verify_policies(issuer: LocalIssuer) -> None:
    from m2m_client.errors import DPoPBindingError, DPoPProofError

    key = DPoPKey.generate()
    bound, unbound = _bound(issuer, key), issuer.mint()

    def proof(token: str) -> str:
        return key.proof("GET", URL, now=time.time(), access_token=token)

    disabled = TokenVerifier(**verifier_options(issuer))
    allowed = TokenVerifier(dpop="allowed", **verifier_options(issuer))
    required = TokenVerifier(dpop="required", **verifier_options(issuer))
    assert disabled.verify(bound)["cnf"] == {"jkt": key.thumbprint}  # as before DPoP
    with pytest.raises(DPoPBindingError):
        disabled.verify(bound, dpop_proof=proof(bound), method="GET", url=URL)
    assert allowed.verify(unbound).subject
    with pytest.raises(DPoPBindingError):
        allowed.verify(bound)  # the downgrade
    assert allowed.verify(bound, dpop_proof=proof(bound), method="GET", url=URL).subject
    for token in (bound, unbound):
        with pytest.raises(DPoPBindingError):
            required.verify(token)
    with pytest.raises(DPoPBindingError):
        required.verify(unbound, dpop_proof=proof(unbound), method="GET", url=URL)
    assert required.verify(bound, dpop_proof=proof(bound), method="GET", url=URL).subject
    for wrong in ({"method": "POST", "url": URL}, {"method": "GET", "url": URL + "/x"}):
        with pytest.raises(DPoPProofError):
            required.verify(bound, dpop_proof=proof(bound), **wrong)
    with pytest.raises(DPoPProofError):
        required.verify(bound, dpop_proof=proof(unbound), method="GET", url=URL)  # ath
    with pytest.raises(DPoPProofError):
        required.verify(bound, dpop_proof=[proof(bound), proof(bound)], method="GET", url=URL)
    with pytest.raises(ConfigurationError):
        required.verify(bound, dpop_proof=proof(bound))  # no method/url: a programming error
    with pytest.raises(ConfigurationError):
        TokenVerifier(dpop="sometimes", **verifier_options(issuer))  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_cached_claims_never_skip_the_proof(issuer: LocalIssuer) -> None:
    from m2m_client.errors import DPoPBindingError, DPoPProofError

    key = DPoPKey.generate()
    token = _bound(issuer, key)
    verifier = AsyncTokenVerifier(dpop="allowed", **verifier_options(issuer))
    proof = key.proof("GET", URL, now=time.time(), access_token=token)
    await verifier.verify(token, dpop_proof=proof, method="GET", url=URL)
    assert len(verifier._core.tokens) == 1  # the claims are cached now
    with pytest.raises(DPoPProofError, match="already used"):
        await verifier.verify(token, dpop_proof=proof, method="GET", url=URL)
    with pytest.raises(DPoPBindingError):
        await verifier.verify(token)
    other = DPoPKey.generate().proof("GET", URL, now=time.time(), access_token=token)
    with pytest.raises(DPoPProofError):
        await verifier.verify(token, dpop_proof=other, method="GET", url=URL)
    fresh = key.proof("GET", URL, now=time.time(), access_token=token)
    assert (await verifier.verify(token, dpop_proof=fresh, method="GET", url=URL)).subject


def test_sync_jwtbearer_cached_path_checks_the_proof(issuer: LocalIssuer, api_factory: Any) -> None:
    _api, base = api_factory(TokenVerifier(dpop="required", **verifier_options(issuer)))
    key = DPoPKey.generate()
    token = _bound(issuer, key)
    url = f"{base}/data"
    proof = key.proof("GET", url, now=time.time(), access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    assert httpx.get(url, headers=headers).status_code == 200
    replay = httpx.get(url, headers=headers)  # the claims are cached; the jti is spent
    assert replay.status_code == 401
    assert 'error="invalid_dpop_proof"' in replay.headers["www-authenticate"]


# --- receiving side: JWTBearer edge cases -------------------------------------------------


def test_jwtbearer_challenges_and_bad_requests(issuer: LocalIssuer, api_factory: Any) -> None:
    _api, base = api_factory(AsyncTokenVerifier(dpop="required", **verifier_options(issuer)))
    url = f"{base}/data"
    none = httpx.get(url)
    assert none.status_code == 401
    assert none.headers["www-authenticate"].startswith('DPoP algs="')
    key = DPoPKey.generate()
    token = _bound(issuer, key)
    cases: dict[str, Any] = {
        "garbage proof": [("Authorization", f"DPoP {token}"), ("DPoP", "not.a.jwt")],
        "two proofs": [
            ("Authorization", f"DPoP {token}"),
            ("DPoP", key.proof("GET", url, now=time.time(), access_token=token)),
            ("DPoP", key.proof("GET", url, now=time.time(), access_token=token)),
        ],
        "non-ascii proof": [("Authorization", f"DPoP {token}"), ("DPoP", "é".encode("latin-1"))],
        "huge proof": [("Authorization", f"DPoP {token}"), ("DPoP", "a" * 20000)],
        "bad host": [
            ("Authorization", f"DPoP {token}"),
            ("Host", "evil/path"),
            ("DPoP", key.proof("GET", url, now=time.time(), access_token=token)),
        ],
    }
    for name, headers in cases.items():
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401, (name, response.status_code, response.text)
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('DPoP error="invalid_dpop_proof"'), name
        assert 'algs="ES256 ' in challenge, name


def test_jwtbearer_behind_a_proxy_trusts_forwarded_headers_only_when_told(
    issuer: LocalIssuer, api_factory: Any
) -> None:
    public = "https://api.example.com/data"
    key = DPoPKey.generate()
    token = _bound(issuer, key)

    def headers() -> dict[str, str]:
        return {
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", public, now=time.time(), access_token=token),
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "api.example.com",
        }

    options = verifier_options(issuer)
    _, direct = api_factory(AsyncTokenVerifier(dpop="required", **options))
    assert httpx.get(f"{direct}/data", headers=headers()).status_code == 401
    _, proxied = api_factory(AsyncTokenVerifier(dpop="required", **options), trust_forwarded=True)
    assert httpx.get(f"{proxied}/data", headers=headers()).status_code == 200
    _, fixed = api_factory(
        AsyncTokenVerifier(dpop="required", **options), request_url=lambda request: public
    )
    assert httpx.get(f"{fixed}/data", headers=headers()).status_code == 200


def test_jwtbearer_disabled_policy_keeps_bearer_behaviour(
    issuer: LocalIssuer, api_factory: Any
) -> None:
    _, base = api_factory(AsyncTokenVerifier(**verifier_options(issuer)))
    key = DPoPKey.generate()
    token = _bound(issuer, key)
    url = f"{base}/data"
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    dpop = httpx.get(
        url,
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", url, now=time.time(), access_token=token),
        },
    )
    assert dpop.status_code == 401
    assert dpop.headers["www-authenticate"] == "Bearer"


def test_dpop_headers_fixture(dpop_headers: Any, async_token_verifier: AsyncTokenVerifier) -> None:
    from fastapi.testclient import TestClient

    verifier = AsyncTokenVerifier(
        issuer=async_token_verifier.issuer,
        audience=async_token_verifier._core.claims_policy.audiences,  # type: ignore[arg-type]
        algorithms=sorted(async_token_verifier._core.algorithms),
        dpop="required",
    )
    api = Api(verifier)
    client = TestClient(api.app)
    ok = client.get("/data", headers=dpop_headers("GET", "http://testserver/data"))
    assert ok.status_code == 200, ok.text
    wrong = client.get("/data", headers=dpop_headers("POST", "http://testserver/data"))
    assert wrong.status_code == 401
    assert json.loads(wrong.text)["detail"].startswith("DPoP proof refused")


def test_jwtbearer_allowed_offers_both_schemes_and_nonces(
    issuer: LocalIssuer, api_factory: Any
) -> None:
    checker = DPoPChecker(nonces=HmacNonceSource())
    verifier = AsyncTokenVerifier(dpop="allowed", dpop_checker=checker, **verifier_options(issuer))
    _, base = api_factory(verifier)
    url = f"{base}/data"
    none = httpx.get(url)
    assert none.status_code == 401
    assert none.headers["www-authenticate"].startswith('Bearer, DPoP algs="')
    unbound = issuer.mint()
    assert httpx.get(url, headers={"Authorization": f"Bearer {unbound}"}).status_code == 200
    key = DPoPKey.generate()
    token = _bound(issuer, key)
    proof = key.proof("GET", url, now=time.time(), access_token=token)
    challenge = httpx.get(url, headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    assert challenge.status_code == 401
    assert challenge.headers["www-authenticate"].startswith('DPoP error="use_dpop_nonce"')
    assert challenge.headers["www-authenticate"].endswith(", Bearer")
    nonce = challenge.headers["dpop-nonce"]
    retry = key.proof("GET", url, now=time.time(), access_token=token, nonce=nonce)
    answer = httpx.get(url, headers={"Authorization": f"DPoP {token}", "DPoP": retry})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("served", ["http", "in-process"])
def test_local_issuer_refuses_two_dpop_headers(issuer: LocalIssuer, served: str) -> None:
    # RFC 9449 §4.3 step 1: not more than one DPoP header. Over HTTP the server used to
    # bind the token to the first of two proofs (node oidc-provider answers 400).
    if served == "http":
        target, http = issuer, httpx.Client(timeout=10)
    else:
        target = LocalIssuer(url="http://127.0.0.1:1/")
        target.add_client(WORKER, SECRET, scope="read:data")
        http = httpx.Client(transport=target.transport())
    key, other = DPoPKey.generate(), DPoPKey.generate()
    now = target.clock()

    def post(headers: Any) -> httpx.Response:
        return http.post(
            target.token_url,
            data={"grant_type": "client_credentials"},
            auth=(WORKER, SECRET),
            headers=headers,
        )

    with http:
        one = key.proof("POST", target.token_url, now=now)
        two = other.proof("POST", target.token_url, now=now)
        refused = post([("DPoP", one), ("DPoP", two)])
        accepted = post({"DPoP": one})
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_dpop_proof"
    assert "exactly one DPoP header" in refused.json()["error_description"]
    # The first proof alone is good (and its jti was not burnt by the refusal).
    assert accepted.status_code == 200, accepted.text
    assert unverified(accepted.json()["access_token"])["cnf"] == {"jkt": key.thumbprint}


class _RequestTargets:
    """A loopback HTTP/1.1 server that records each request's target and DPoP header, as
    the bytes arrived, and answers 200 with an empty body."""

    def __init__(self) -> None:
        import socketserver

        seen = self.seen = []  # type: list[tuple[str, str]]

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request_line = self.rfile.readline(65536).decode("latin-1")
                dpop = ""
                while True:
                    line = self.rfile.readline(65536).decode("latin-1")
                    if line in ("\r\n", "\n", ""):
                        break
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "dpop":
                        dpop = value.strip()
                seen.append((request_line.split(" ")[1], dpop))
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


ODD_PATHS = ["/a|b", "/%7euser/x", "/caf\u00e9 x", "/a^b/{c}/`d`", "/x/./y/../z", "/q?p=%7e|"]


@pytest.mark.parametrize("stack", installed(), ids=lambda stack: stack.name)
def test_bearer_auth_htu_is_the_request_target_on_the_wire(
    issuer: LocalIssuer, stack: Stack
) -> None:
    # Issue 19 item 11: htu was RFC 3986-normalised (/a%7Cb, /~user) while httpx sent /a|b
    # and /%7euser, so a server comparing htu with the URI it received (oidc-provider) refused.
    server = _RequestTargets()
    try:
        with TokenClient(creds(issuer)) as tokens, stack.Client(auth=BearerAuth(tokens)) as http:
            for path in ODD_PATHS:
                assert http.get(server.origin + path).status_code == 200
    finally:
        server.close()
    assert len(server.seen) == len(ODD_PATHS)
    for target, proof in server.seen:
        assert unverified(proof)["htu"] == server.origin + target.partition("?")[0]


@pytest.mark.anyio
async def test_async_bearer_auth_htu_is_the_request_target_on_the_wire(
    issuer: LocalIssuer,
) -> None:
    server = _RequestTargets()
    try:
        tokens = AsyncTokenClient(creds(issuer))
        async with tokens, httpx.AsyncClient(auth=BearerAuth(tokens)) as http:
            for path in ODD_PATHS:
                assert (await http.get(server.origin + path)).status_code == 200
    finally:
        server.close()
    for target, proof in server.seen:
        assert unverified(proof)["htu"] == server.origin + target.partition("?")[0]


def test_a_4090_character_path_passes_jwtbearer(issuer: LocalIssuer) -> None:
    # docs/dpop.md: htu up to 8192 characters. A 4,090-character path was refused with
    # "its 'htu' is missing or not a string" (the limit was 4096 for the whole URL).
    app = FastAPI()
    auth = JWTBearer(TokenVerifier(dpop="required", **verifier_options(issuer)))

    @app.get("/long/{rest:path}")
    async def long(rest: str, claims: Annotated[Claims, Depends(auth)]) -> dict[str, int]:
        return {"length": len(rest)}

    path = "/long/" + "p" * 4084
    assert len(path) == 4090
    tokens = TokenClient(creds(issuer))
    with serve(app) as base, tokens, httpx.Client(auth=BearerAuth(tokens), timeout=10) as http:
        response = http.get(base + path)
    assert response.status_code == 200, response.text
    assert response.json() == {"length": 4084}
