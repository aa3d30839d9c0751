"""The receiving core's own pieces: the one challenge renderer, public paths, RFC 9728
metadata, and what only the ASGI middleware does (WebSocket, lifespan, DPoP nonces,
require() without the middleware)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from m2m_client import protected_resource_metadata
from m2m_client.errors import ConfigurationError, DPoPProofError, InvalidToken
from m2m_client.testing import LocalIssuer
from m2m_client.verify import (
    AsyncTokenVerifier,
    DPoPChecker,
    HmacNonceSource,
    TokenVerifier,
    dpop_challenge,
)
from m2m_client.verify._metadata import metadata_url
from m2m_client.verify._receive import Gate, PublicPaths
from m2m_client.verify._www_authenticate import quoted

# RFC 6750 §3 / RFC 9110 §5.6.4: what a challenge parameter value may hold.
SAFE_QUOTED = re.compile(r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"')
HOSTILE = 'bad "x"\r\nSet-Cookie: a=b\\ é\u2028\x00'


@given(st.text())
@example("%80")  # found by hypothesis: not UTF-8 once unquoted
def test_every_value_renders_as_a_safe_quoted_string_that_keeps_its_text(value: str) -> None:
    out = quoted(value, limit=10_000)
    assert SAFE_QUOTED.fullmatch(out)
    # A "%" already in the value is left as it is (RFC 6750 allows it), so only a value
    # without one decodes back exactly; "%80" would not even decode as UTF-8.
    assert "%" in value or unquote(out[1:-1], errors="surrogatepass") == value


def test_a_long_value_is_cut_without_splitting_an_escape() -> None:
    out = quoted("é" * 400)
    assert SAFE_QUOTED.fullmatch(out)
    assert out.endswith('..."')
    assert re.search(r"%[0-9A-F]?\.\.\.", out) is None


def _verifier(dpop: str = "allowed") -> AsyncTokenVerifier:
    return AsyncTokenVerifier(issuer="https://issuer.test/", audience="https://api.test", dpop=dpop)


def test_bearer_and_dpop_challenges_escape_the_same_text_the_same_way() -> None:
    # Before: JWTBearer percent-encoded, dpop_challenge dropped characters.
    gate = Gate(_verifier("required"))
    via_gate = gate.refusal(DPoPProofError(HOSTILE), "dpop").headers["WWW-Authenticate"]
    via_function = dpop_challenge("invalid_dpop_proof", description=HOSTILE)
    description = re.search(r'error_description=("[^"]*")', via_gate)
    assert description is not None
    assert description.group(1) in via_function
    bearer = Gate(_verifier("disabled")).refusal(InvalidToken(HOSTILE), "bearer")
    assert description.group(1) in bearer.headers["WWW-Authenticate"]
    for value in (via_gate, via_function, bearer.headers["WWW-Authenticate"]):
        assert value.isascii()
        assert "\r" not in value
        assert "\n" not in value
        assert "\x00" not in value


def test_every_challenge_names_the_resource_metadata() -> None:
    url = "https://api.test/.well-known/oauth-protected-resource"
    gate = Gate(_verifier("allowed"), resource_metadata=url)
    values = [
        gate.no_token_challenge(),
        gate.malformed().headers["WWW-Authenticate"],
        gate.refusal(InvalidToken("x"), "bearer").headers["WWW-Authenticate"],
        gate.refusal(DPoPProofError("x"), "dpop").headers["WWW-Authenticate"],
    ]
    for value in values:
        for scheme in re.split(r", (?=Bearer|DPoP)", value):
            assert f'resource_metadata="{url}"' in scheme, value


@pytest.mark.parametrize(
    ("path", "public"),
    [
        ("/health", True),
        ("/health/", False),
        ("/healthz", False),
        ("/static/app.js", True),
        ("/static/", True),
        ("/static/../admin", False),
        ("/static/./x", False),
        ("/static//admin", False),
        ("/static/..", False),
        ("/admin", False),
    ],
)
def test_public_paths_match_exactly_or_under_a_prefix_never_by_dot_segments(
    path: str, public: bool
) -> None:
    assert (path in PublicPaths(["/health", "/static/"])) is public


def test_public_paths_must_be_absolute() -> None:
    with pytest.raises(ConfigurationError):
        PublicPaths(["health"])


def test_metadata_document_follows_rfc9728_and_the_verifier_policy() -> None:
    verifier = _verifier("required")
    document = protected_resource_metadata(
        resource="https://api.test", verifier=verifier, scopes_supported=["read"]
    )
    assert document == {
        "resource": "https://api.test",
        "authorization_servers": ["https://issuer.test/"],
        "scopes_supported": ["read"],
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": sorted(verifier.dpop_checker.settings.algorithms),
        "dpop_bound_access_tokens_required": True,
    }
    assert metadata_url("https://api.test") == (
        "https://api.test/.well-known/oauth-protected-resource"
    )
    # RFC 9728 §3.1: the well-known segment goes between the host and the path, and only a
    # slash right after the host is dropped: ``/v1/`` keeps its slash, where clients read it.
    assert metadata_url("https://api.test/v1/") == (
        "https://api.test/.well-known/oauth-protected-resource/v1/"
    )
    assert metadata_url("https://api.test/") == (
        "https://api.test/.well-known/oauth-protected-resource"
    )


@pytest.mark.parametrize(
    "resource",
    ["", "api.test", "http://api.test", "https://api.test/#x", "https://api.test/?a=1", "ftp://x"],
)
def test_metadata_refuses_a_resource_that_is_not_an_https_url(resource: str) -> None:
    with pytest.raises(ConfigurationError):
        protected_resource_metadata(resource=resource)


# --- ASGI only ---------------------------------------------------------------------------------


def _starlette(verifier: AsyncTokenVerifier, **options: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket

    from m2m_client.asgi import JWTMiddleware

    async def who(request: Request) -> JSONResponse:
        return JSONResponse({"sub": request.state.claims.subject})

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"sub": websocket.scope["m2m_client.claims"].subject})
        await websocket.close()

    lifespan_ran: list[str] = []

    async def lifespan(app: Any) -> Any:
        lifespan_ran.append("started")
        yield {"shared": "lifespan state"}

    from contextlib import asynccontextmanager

    app = Starlette(
        routes=[Route("/who", who), WebSocketRoute("/ws", ws)],
        lifespan=asynccontextmanager(lifespan),
    )
    wrapped = JWTMiddleware(app, verifier=verifier, **options)
    wrapped.lifespan_ran = lifespan_ran  # type: ignore[attr-defined]
    return wrapped


def _async_verifier(issuer: LocalIssuer, **options: Any) -> AsyncTokenVerifier:
    return AsyncTokenVerifier(
        issuer=issuer.url, audience=issuer.audience, roles_claim=issuer.roles_claim, **options
    )


def test_asgi_lifespan_passes_through_and_its_state_never_holds_claims(
    local_issuer: LocalIssuer,
) -> None:
    from starlette.testclient import TestClient

    app = _starlette(_async_verifier(local_issuer))
    token = local_issuer.mint(sub="a@clients")
    with TestClient(app) as client:
        assert app.lifespan_ran == ["started"]
        answer = client.get("/who", headers={"Authorization": f"Bearer {token}"})
        assert answer.json() == {"sub": "a@clients"}
        # The next request (no token) must not see the previous caller's claims.
        assert client.get("/who").status_code == 401


def test_asgi_websocket_is_verified_at_the_handshake(local_issuer: LocalIssuer) -> None:
    from starlette.testclient import TestClient, WebSocketDenialResponse

    app = _starlette(_async_verifier(local_issuer))
    token = local_issuer.mint(sub="ws@clients")
    with TestClient(app) as client:
        with client.websocket_connect("/ws", headers={"Authorization": f"Bearer {token}"}) as ws:
            assert ws.receive_json() == {"sub": "ws@clients"}
        # The test client speaks the websocket.http.response extension: the full 401.
        with pytest.raises(WebSocketDenialResponse) as refused:  # noqa: SIM117
            with client.websocket_connect("/ws"):
                pass
        assert refused.value.status_code == 401
        assert refused.value.headers["www-authenticate"] == "Bearer"


def test_asgi_dpop_nonce_is_asked_for_then_sent_with_every_answer(
    local_issuer: LocalIssuer, dpop_headers: Any
) -> None:
    from starlette.testclient import TestClient

    nonces = HmacNonceSource()
    verifier = _async_verifier(
        local_issuer, dpop="required", dpop_checker=DPoPChecker(nonces=nonces)
    )
    from m2m_client._dpop import DPoPKey

    key = DPoPKey.generate()
    with TestClient(_starlette(verifier)) as client:
        first = client.get("/who", headers=dpop_headers("GET", "http://testserver/who", key=key))
        assert first.status_code == 401
        assert first.headers["www-authenticate"].startswith('DPoP error="use_dpop_nonce"')
        nonce = first.headers["dpop-nonce"]
        headers = dpop_headers("GET", "http://testserver/who", key=key, nonce=nonce)
        served = client.get("/who", headers=headers)
        assert served.status_code == 200, served.text
        assert served.headers["dpop-nonce"]


def test_asgi_require_without_the_middleware_refuses_instead_of_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from m2m_client.asgi import require

    async def secret(request: Request) -> JSONResponse:
        return JSONResponse({"secret": True})

    app = Starlette(routes=[Route("/secret", require(roles=["admin"])(secret))])
    with TestClient(app) as client:
        answer = client.get("/secret")
    assert answer.status_code == 503
    assert "without JWTMiddleware" in caplog.text


def test_asgi_require_wraps_a_plain_asgi_app(local_issuer: LocalIssuer) -> None:
    from starlette.testclient import TestClient

    from m2m_client.asgi import JWTMiddleware, require

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = JWTMiddleware(require(roles="admin")(raw), verifier=_async_verifier(local_issuer))
    client = TestClient(app)  # no lifespan: the raw app speaks only HTTP
    reader = local_issuer.mint(roles=["reader"])
    admin = local_issuer.mint(roles=["admin"])
    assert client.get("/", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
    assert client.get("/", headers={"Authorization": f"Bearer {admin}"}).text == "ok"


def test_asgi_middleware_refuses_a_sync_verifier() -> None:
    from m2m_client.asgi import JWTMiddleware

    sync = TokenVerifier(issuer="https://issuer.test/", audience="https://api.test")
    with pytest.raises(ConfigurationError):
        JWTMiddleware(lambda s, r, q: None, verifier=sync)  # type: ignore[arg-type]


def test_a_wsgi_proof_url_is_the_target_as_sent_when_the_server_keeps_it() -> None:
    from m2m_client.verify._receive import environ_url

    environ = {
        "wsgi.url_scheme": "https",
        "HTTP_HOST": "api.test",
        "SCRIPT_NAME": "/app",
        "PATH_INFO": "/a/b",  # decoded: %2F became /
        "RAW_URI": "/app/a%2Fb?x=1",
    }
    assert environ_url(environ) == "https://api.test/app/a%2Fb"
    del environ["RAW_URI"]
    # Without it, the decoded path is escaped again (PEP 3333: latin-1 bytes).
    environ["PATH_INFO"] = "/caf\xc3\xa9"
    assert environ_url(environ) == "https://api.test/app/caf%C3%A9"


@pytest.mark.parametrize("framework", ["asgi", "fastapi", "flask", "django"])
def test_a_cached_token_takes_no_shortcut_around_the_header_rules(
    local_issuer: LocalIssuer, framework: str
) -> None:
    # The cache fast path must answer exactly as the core: two headers stay refused even
    # when the token was verified before; other spellings of the scheme are still served.
    from ._services import TestService

    options = {
        "issuer": local_issuer.url,
        "audience": local_issuer.audience,
        "roles_claim": local_issuer.roles_claim,
    }
    service = TestService(framework, TokenVerifier(**options), AsyncTokenVerifier(**options))
    try:
        token = local_issuer.mint(sub="c@clients")
        bearer = ("Authorization", f"Bearer {token}")
        assert service.get("/protected", [bearer]).status == 200
        twice = service.get("/protected", [bearer, bearer])
        assert twice.status == (400 if framework in ("asgi", "fastapi") else 401)
        for spelling in (f"bearer {token}", f"Bearer   {token}  ", f"BEARER {token}"):
            answer = service.get("/protected", [("Authorization", spelling)])
            assert answer.body == {"subject": "c@clients"}, spelling
        assert service.get("/protected", [("Authorization", "Bearer ")]).status == 401
        assert service.get("/admin", [bearer]).status == 403  # cached, rights still checked
    finally:
        service.close()


def test_django_require_guards_async_views_too(local_issuer: LocalIssuer) -> None:
    from ._services import TestService

    options = {
        "issuer": local_issuer.url,
        "audience": local_issuer.audience,
        "roles_claim": local_issuer.roles_claim,
    }
    service = TestService("django", TokenVerifier(**options), AsyncTokenVerifier(**options))
    try:
        reader = [("Authorization", f"Bearer {local_issuer.mint(roles=['reader'])}")]
        admin = [("Authorization", f"Bearer {local_issuer.mint(sub='a@clients', roles=['admin'])}")]
        assert service.get("/async-admin", reader).status == 403
        assert service.get("/async-admin", admin).body == {"subject": "a@clients"}
    finally:
        service.close()
