"""One SDK for both HTTP stacks (issue 11): every public entry point with httpx and httpx2.

Token requests and JWKS fetches go to a real LocalIssuer on 127.0.0.1 (the plugin's
``local_issuer``); the protected API is in process (``either_transport``): what is tested
there is our own replay logic. Each test runs once per installed stack; the single-stack CI
runs (``M2M_TEST_STACK``, see tests/_stack_guard.py) run this file with the other hidden.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from m2m_client import (
    AsyncTokenClient,
    BearerAuth,
    ClientCredentials,
    ConfigurationError,
    TokenClient,
)
from m2m_client._stacks import Stack, either_transport, installed, stack_of
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier
from tests._stack_guard import need

STACKS = installed()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=STACKS, ids=[stack.name for stack in STACKS])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.param  # type: ignore[no-any-return]


class Api:
    """A protected API that rejects the first token it sees (as if it had been revoked)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.bodies: list[bytes] = []
        self.reject_all = False

    def respond(self, request: Any) -> tuple[int, dict[str, str], bytes]:
        token = request.headers.get("authorization", "")
        self.seen.append(token)
        self.bodies.append(request.content)
        if token.startswith("Bearer ") and token != self.seen[0] and not self.reject_all:
            return 200, {"content-type": "text/plain"}, b"ok " + request.content
        return 401, {"www-authenticate": 'Bearer error="invalid_token"'}, b""


def _sent_through(stack: Stack, seen: list[Any]) -> dict[str, Any]:
    # Event hooks record what went through the caller's own client.
    return {"event_hooks": {"request": [seen.append]}}


def _sent_through_async(stack: Stack, seen: list[Any]) -> dict[str, Any]:
    async def hook(request: Any) -> None:
        seen.append(request)

    return {"event_hooks": {"request": [hook]}}


# --- BearerAuth -----------------------------------------------------------------------


def test_bearer_auth_is_an_auth_of_every_installed_stack(
    local_client_credentials: ClientCredentials,
) -> None:
    with TokenClient(local_client_credentials) as tokens:
        auth = BearerAuth(tokens)
        for stack in STACKS:
            assert isinstance(auth, stack.Auth)
            with stack.Client(auth=auth) as client:  # httpx2 raised TypeError here
                assert client.auth is auth


@pytest.mark.parametrize("reject_all", [False, True], ids=["renewed", "second-401"])
def test_bearer_auth_renews_and_replays_once_sync(
    stack: Stack,
    local_client_credentials: ClientCredentials,
    local_issuer: LocalIssuer,
    reject_all: bool,
) -> None:
    api = Api()
    api.reject_all = reject_all
    seen: list[Any] = []
    with (
        TokenClient(
            local_client_credentials, http_client=stack.Client(**_sent_through(stack, seen))
        ) as tokens,
        stack.Client(transport=either_transport(api.respond), auth=BearerAuth(tokens)) as http,
    ):
        response = http.post("https://api.example.com/data", content=b"payload")
    _check_replayed_once(stack, api, response, seen, local_issuer)


@pytest.mark.anyio
@pytest.mark.parametrize("reject_all", [False, True], ids=["renewed", "second-401"])
async def test_bearer_auth_renews_and_replays_once_async(
    stack: Stack,
    local_client_credentials: ClientCredentials,
    local_issuer: LocalIssuer,
    reject_all: bool,
) -> None:
    api = Api()
    api.reject_all = reject_all
    seen: list[Any] = []
    async with (
        AsyncTokenClient(
            local_client_credentials,
            http_client=stack.AsyncClient(**_sent_through_async(stack, seen)),
        ) as tokens,
        stack.AsyncClient(transport=either_transport(api.respond), auth=BearerAuth(tokens)) as http,
    ):
        response = await http.post("https://api.example.com/data", content=b"payload")
    _check_replayed_once(stack, api, response, seen, local_issuer)


def _check_replayed_once(
    stack: Stack, api: Api, response: Any, seen: list[Any], issuer: LocalIssuer
) -> None:
    assert type(response) is stack.Response
    if api.reject_all:  # a second 401 is returned as it is: one replay, not a loop
        assert response.status_code == 401
    else:
        assert (response.status_code, response.text) == (200, "ok payload")
    assert len(api.seen) == 2
    assert api.seen[0] != api.seen[1]  # the rejected token was dropped, a new one fetched
    assert api.bodies == [b"payload", b"payload"]  # the body was replayed
    assert issuer.token_requests == 2
    # Token requests went through the caller's client, on its stack.
    assert [type(request) for request in seen] == [stack.Request] * 2


def test_bearer_auth_with_the_wrong_kind_of_token_client_says_so(
    stack: Stack, local_client_credentials: ClientCredentials
) -> None:
    tokens = AsyncTokenClient(local_client_credentials)
    with (
        stack.Client(transport=either_transport(Api().respond), auth=BearerAuth(tokens)) as http,
        pytest.raises(ConfigurationError, match="TokenClient"),
    ):
        http.get("https://api.example.com/data")


# --- token clients and verifiers on a caller's client ----------------------------------


def test_token_client_on_either_stack(
    stack: Stack, local_client_credentials: ClientCredentials, local_issuer: LocalIssuer
) -> None:
    seen: list[Any] = []
    with TokenClient(
        local_client_credentials, http_client=stack.Client(**_sent_through(stack, seen))
    ) as tokens:
        token = tokens.get_token()
    verifier = TokenVerifier(**_verifier_options(local_issuer))
    assert verifier.verify(token.access_token).subject == "test-client@clients"
    assert local_issuer.tokens_issued == 1
    assert [type(request) for request in seen] == [stack.Request]


@pytest.mark.anyio
async def test_async_token_client_on_either_stack(
    stack: Stack, local_client_credentials: ClientCredentials
) -> None:
    seen: list[Any] = []
    client = stack.AsyncClient(**_sent_through_async(stack, seen))
    async with AsyncTokenClient(local_client_credentials, http_client=client) as tokens:
        assert (await tokens.get_token()).access_token
    assert [type(request) for request in seen] == [stack.Request]
    await client.aclose()


def _verifier_options(issuer: LocalIssuer) -> dict[str, Any]:
    return {"issuer": issuer.url, "audience": issuer.audience, "jwks_url": issuer.jwks_url}


def test_token_verifier_on_either_stack(stack: Stack, local_issuer: LocalIssuer) -> None:
    seen: list[Any] = []
    with stack.Client(**_sent_through(stack, seen)) as client:
        verifier = TokenVerifier(**_verifier_options(local_issuer), http_client=client)
        claims = verifier.verify(local_issuer.mint(permissions=["read:data"]))
    assert claims.permissions == {"read:data"}
    assert [request.url.path for request in seen] == ["/.well-known/jwks.json"]
    assert {type(request) for request in seen} == {stack.Request}


@pytest.mark.anyio
async def test_async_token_verifier_on_either_stack(
    stack: Stack, local_issuer: LocalIssuer
) -> None:
    seen: list[Any] = []
    async with stack.AsyncClient(**_sent_through_async(stack, seen)) as client:
        verifier = AsyncTokenVerifier(**_verifier_options(local_issuer), http_client=client)
        claims = await verifier.verify(local_issuer.mint(permissions=["read:data"]))
    assert claims.permissions == {"read:data"}
    assert {type(request) for request in seen} == {stack.Request}


@pytest.mark.parametrize(
    ("make", "sync_client", "needed"),
    [
        (TokenClient, False, "httpx.Client or httpx2.Client"),
        (AsyncTokenClient, True, "AsyncClient"),
    ],
    ids=["sync-owner", "async-owner"],
)
def test_wrong_kind_of_client_is_refused_at_construction(
    stack: Stack,
    local_client_credentials: ClientCredentials,
    make: Any,
    sync_client: bool,
    needed: str,
) -> None:
    client = stack.Client() if sync_client else stack.AsyncClient()
    with pytest.raises(ConfigurationError, match=make.__name__):
        make(local_client_credentials, http_client=client)


def test_verifiers_refuse_the_wrong_kind_of_client(stack: Stack, local_issuer: LocalIssuer) -> None:
    with pytest.raises(ConfigurationError, match=r"AsyncTokenVerifier needs an \w+\.AsyncClient"):
        AsyncTokenVerifier(**_verifier_options(local_issuer), http_client=stack.Client())
    with pytest.raises(ConfigurationError, match=r"TokenVerifier needs an \w+\.Client"):
        TokenVerifier(**_verifier_options(local_issuer), http_client=stack.AsyncClient())


def test_an_httpx_transport_in_an_httpx2_client_is_refused_at_construction(
    local_client_credentials: ClientCredentials, local_issuer: LocalIssuer
) -> None:
    need("httpx", "httpx2")
    httpx, httpx2 = STACKS
    mixed = httpx2.Client(transport=httpx.module.HTTPTransport())
    with pytest.raises(ConfigurationError, match="do not mix"):
        TokenClient(local_client_credentials, http_client=mixed)
    with pytest.raises(ConfigurationError, match="do not mix"):
        TokenVerifier(**_verifier_options(local_issuer), http_client=mixed)
    amixed = httpx.AsyncClient(transport=httpx2.module.AsyncHTTPTransport())
    with pytest.raises(ConfigurationError, match="do not mix"):
        AsyncTokenClient(local_client_credentials, http_client=amixed)


# --- LocalIssuer in process, and Starlette's TestClient ---------------------------------


@pytest.fixture
def in_process_issuer() -> LocalIssuer:
    issuer = LocalIssuer(url="https://issuer.example.com/")
    issuer.add_client("worker", "worker-secret", permissions=["read:data"])
    return issuer


def test_local_issuer_transport_answers_either_stack(
    stack: Stack, in_process_issuer: LocalIssuer
) -> None:
    issuer = in_process_issuer
    with stack.Client(transport=issuer.transport()) as http:
        response = http.get(issuer.discovery_url)
        assert type(response) is stack.Response
        assert response.json()["issuer"] == issuer.url
    credentials = ClientCredentials(
        token_url=issuer.token_url,
        client_id="worker",
        client_secret="worker-secret",
        audience=issuer.audience,
    )
    with TokenClient(credentials, http_client=stack.Client(transport=issuer.transport())) as tokens:
        token = tokens.get_token().access_token
    with stack.Client(transport=issuer.transport()) as http:
        options = {"http_client": http, **_verifier_options(issuer)}
        assert TokenVerifier(**options).verify(token).permissions == {"read:data"}


@pytest.mark.anyio
async def test_local_issuer_transport_answers_either_stack_async(
    stack: Stack, in_process_issuer: LocalIssuer
) -> None:
    issuer = in_process_issuer
    async with stack.AsyncClient(transport=issuer.transport()) as http:
        response = await http.get(issuer.jwks_url)
        assert type(response) is stack.Response
        assert response.json()["keys"]


def test_starlette_test_client_takes_bearer_auth(
    local_issuer: LocalIssuer, local_client_credentials: ClientCredentials
) -> None:
    from fastapi import FastAPI, Security
    from fastapi.testclient import TestClient

    from m2m_client.fastapi import JWTBearer
    from m2m_client.verify import Claims

    app = FastAPI()
    auth = JWTBearer(TokenVerifier(**_verifier_options(local_issuer)))

    @app.get("/whoami")
    def whoami(claims: Claims = Security(auth)) -> dict[str, str]:  # noqa: B008
        return {"sub": claims.subject}

    with TokenClient(local_client_credentials) as tokens, TestClient(app) as test_client:
        # Starlette's TestClient is an httpx2 client when httpx2 is installed.
        names = [stack.name for stack in STACKS]
        assert (
            stack_of(test_client) is STACKS[names.index("httpx2" if "httpx2" in names else "httpx")]
        )
        assert test_client.get("/whoami").status_code == 401
        test_client.auth = BearerAuth(tokens)
        response = test_client.get("/whoami")
    assert response.status_code == 200
    assert response.json() == {"sub": "test-client@clients"}


# --- process-wide set-ups, in a fresh interpreter ---------------------------------------

_END_TO_END = """
import anyio
from m2m_client import AsyncTokenClient, BearerAuth, ClientCredentials, TokenClient
from m2m_client._stacks import installed, either_transport
from m2m_client.testing import LocalIssuer
from m2m_client.verify import TokenVerifier

issuer = LocalIssuer()
issuer.add_client("worker", "worker-secret")
with issuer:
    creds = ClientCredentials(token_url=issuer.token_url, client_id="worker",
                              client_secret="worker-secret", audience=issuer.audience)
    api = either_transport(lambda r: (200, {}, r.headers["authorization"].encode()))
    with TokenClient(creds) as tokens, httpx2.Client(transport=api, auth=BearerAuth(tokens)) as h:
        token = h.get("https://api.example.com/").text.removeprefix("Bearer ")
    verifier = TokenVerifier(issuer=issuer.url, audience=issuer.audience)
    assert verifier.verify(token).subject == "worker@clients"

    async def main():
        async with AsyncTokenClient(creds, http_client=httpx2.AsyncClient()) as tokens:
            async with httpx2.AsyncClient(transport=api, auth=BearerAuth(tokens)) as h:
                assert (await h.get("https://api.example.com/")).status_code == 200
    anyio.run(main)
print("stacks:", ",".join(stack.name for stack in installed()))
"""


def _run(prelude: str) -> str:
    code = textwrap.dedent(prelude) + _END_TO_END
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("M2M_TEST_STACK", None)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_alias_httpx_application() -> None:
    # The application made `import httpx` resolve to httpx2 before importing anything.
    need("httpx2")
    out = _run(
        """
        import httpx2
        httpx2.alias_httpx()
        import httpx
        assert httpx is httpx2
        """
    )
    assert out.strip().endswith("stacks: httpx2")


def test_package_works_without_httpx() -> None:
    # An httpx2-only install (httpx uninstalled): nothing in the package may import httpx.
    need("httpx2")
    out = _run(
        """
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("httpx", "httpcore"):
                    raise ModuleNotFoundError(name, name=name)
        sys.meta_path.insert(0, Hide())
        import httpx2
        import m2m_client, m2m_client.fastapi, m2m_client.testing, m2m_client.cli, m2m_client._demo
        """
    )
    assert out.strip().endswith("stacks: httpx2")
