"""Errors and log lines that tell the user what to do (issue 24), each class with its siblings."""

from __future__ import annotations

import importlib.metadata
import itertools
import logging
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from m2m_client import (
    AsyncTokenClient,
    BearerAuth,
    ClientCredentials,
    ConfigurationError,
    RetryPolicy,
    TokenClient,
    TokenError,
)
from m2m_client.cli import main
from m2m_client.errors import VerificationError
from m2m_client.fastapi import JWTBearer
from m2m_client.testing import LocalIssuer
from m2m_client.verify import AsyncTokenVerifier, Claims, TokenVerifier
from tests.unit.test_cli_issuer import COMMAND, exports, free_port, start_issuer, stop

_unique = itertools.count()


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    issuer = LocalIssuer()
    issuer.add_client("worker", "worker-secret-value", scope="read:data")
    with issuer:
        yield issuer


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("M2M_", "AUTH0_")):
            monkeypatch.delenv(name)


# --- a misspelt variable: the hint rides on the error, exactly when the settings are invalid ---

TYPOS = [
    ("M2M_CLIENT_SECRT", "M2M_CLIENT_SECRET"),
    ("M2M_CLEINT_ID", "M2M_CLIENT_ID"),
    ("M2M_TOKN_URL", "M2M_TOKEN_URL"),
]


def _env_with_typo(issuer: LocalIssuer, typo: str, value: str) -> dict[str, str]:
    env = {
        "M2M_TOKEN_URL": issuer.token_url,
        "M2M_CLIENT_ID": "worker",
        "M2M_CLIENT_SECRET": "worker-secret-value",
    }
    right = dict(TYPOS)[typo]
    del env[right]
    env[typo] = value
    return env


@pytest.mark.parametrize(("typo", "right"), TYPOS)
def test_configuration_error_names_the_misspelt_variable(
    issuer: LocalIssuer, typo: str, right: str
) -> None:
    env = _env_with_typo(issuer, typo, issuer.token_url if "URL" in typo else "worker")
    with pytest.warns(UserWarning, match=typo), pytest.raises(ConfigurationError) as caught:
        ClientCredentials.from_env(env)
    assert f"{typo} is set: did you mean {right}?" in str(caught.value)
    assert "worker-secret-value" not in str(caught.value)


def test_a_misspelt_variable_that_breaks_nothing_is_a_warning_not_an_error(
    issuer: LocalIssuer,
) -> None:
    env = {
        "M2M_TOKEN_URL": issuer.token_url,
        "M2M_CLIENT_ID": "worker",
        "M2M_CLIENT_SECRET": "worker-secret-value",
        "M2M_AUDEINCE": "https://api.example.com",
    }
    with pytest.warns(UserWarning, match="did you mean M2M_AUDIENCE"):
        assert ClientCredentials.from_env(env).client_id == "worker"


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(("typo", "right"), TYPOS)
def test_cli_token_shows_the_hint_when_the_configuration_is_invalid(
    issuer: LocalIssuer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    typo: str,
    right: str,
) -> None:
    value = issuer.token_url if "URL" in typo else "worker-secret-value"
    if typo == "M2M_CLEINT_ID":
        value = "worker"
    for name, env_value in _env_with_typo(issuer, typo, value).items():
        monkeypatch.setenv(name, env_value)
    assert main(["token"]) == 2
    err = capsys.readouterr().err
    assert f"did you mean {right}?" in err
    assert "worker-secret-value" not in err


# --- M2M_DPOP: a key that dies with the command, and words that are not booleans -------------


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("word", ["true", "1", "yes"])
def test_cli_token_refuses_a_dpop_key_that_dies_with_the_process(
    issuer: LocalIssuer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    word: str,
) -> None:
    monkeypatch.setenv("M2M_CLIENT_SECRET", "worker-secret-value")
    monkeypatch.setenv("M2M_DPOP", word)
    before = issuer.token_requests
    assert main(["token", "--token-url", issuer.token_url, "--client-id", "worker"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no token printed
    assert "M2M_DPOP_KEY_FILE" in err
    assert issuer.token_requests == before  # refused before asking for a token


@pytest.mark.usefixtures("clean_env")
def test_cli_token_with_a_dpop_key_file_binds_the_token_to_that_key(
    issuer: LocalIssuer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    (tmp_path / "dpop.pem").write_text(pem)
    monkeypatch.setenv("M2M_CLIENT_SECRET", "worker-secret-value")
    monkeypatch.setenv("M2M_DPOP", "true")
    monkeypatch.setenv("M2M_DPOP_KEY_FILE", str(tmp_path / "dpop.pem"))
    assert main(["token", "--token-url", issuer.token_url, "--client-id", "worker"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "jkt" in claims["cnf"]  # bound to the key in the file, which outlives the command


@pytest.mark.parametrize("word", ["ture", "2", "maybe", "enabled"])
@pytest.mark.parametrize("source", ["env", "argument"])
def test_a_dpop_value_that_is_not_a_boolean_names_the_accepted_values(
    word: str, source: str
) -> None:
    def build() -> None:
        if source == "env":
            ClientCredentials.from_env(
                {
                    "M2M_TOKEN_URL": "https://idp.example.com/token",
                    "M2M_CLIENT_ID": "worker",
                    "M2M_CLIENT_SECRET": "s3cret-value",
                    "M2M_DPOP": word,
                }
            )
        else:
            ClientCredentials(
                token_url="https://idp.example.com/token",
                client_id="worker",
                client_secret="s3cret-value",
                dpop=word,
            )

    with pytest.raises(ConfigurationError) as caught:
        build()
    message = str(caught.value)
    assert "true or false" in message
    assert "M2M_DPOP_KEY_FILE" in message
    for internal in ("is-instance", "dpop.bool", "Input should be"):
        assert internal not in message
    if source == "env":
        assert "M2M_DPOP" in message


@pytest.mark.parametrize(("word", "expected"), [("On", True), ("0", False), (1, True)])
def test_the_boolean_words_pydantic_took_still_work(word: object, expected: bool) -> None:
    creds = ClientCredentials(
        token_url="https://idp.example.com/token",
        client_id="worker",
        client_secret="s3cret-value",
        dpop=word,
    )
    assert (creds.dpop is not False) is expected


# --- an issuer that differs from the tokens' iss by a trailing slash: WARNING once ------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("slash", ["verifier_without", "verifier_with"])
@pytest.mark.anyio
async def test_a_trailing_slash_mismatch_is_logged_once_with_both_values(
    caplog: pytest.LogCaptureFixture, flavour: str, slash: str, anyio_backend: str
) -> None:
    n = next(_unique)
    if slash == "verifier_without":
        local = LocalIssuer(url=f"https://slash-{n}.example.com/")  # iss ends with "/"
        configured = local.url.rstrip("/")
    else:
        local = LocalIssuer(url=f"https://slash-{n}.example.com/")
        configured = local.url + "/"  # "//" at the end: one slash too many
    tokens = [local.mint() for _ in range(3)]
    common: dict[str, Any] = {
        "issuer": configured,
        "audience": local.audience,
        "jwks_url": local.jwks_url,
    }
    caplog.set_level(logging.DEBUG, logger="m2m_client.verify")
    if flavour == "sync":
        with httpx.Client(transport=local.transport()) as http:
            verifier = TokenVerifier(**common, http_client=http)
            for token in tokens:
                with pytest.raises(VerificationError) as caught:
                    verifier.verify(token)
                assert getattr(caught.value, "reason", None) == "issuer"
    else:
        async with httpx.AsyncClient(transport=local.transport()) as http:
            averifier = AsyncTokenVerifier(**common, http_client=http)
            for token in tokens:
                with pytest.raises(VerificationError) as caught:
                    await averifier.verify(token)
                assert getattr(caught.value, "reason", None) == "issuer"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert repr(configured) in message
    assert repr(local.url) in message
    for token in tokens:
        assert token not in message


def test_a_really_foreign_issuer_is_not_called_a_slash_mistake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    local = LocalIssuer(url=f"https://foreign-{next(_unique)}.example.com/")
    with httpx.Client(transport=local.transport()) as http:
        verifier = TokenVerifier(
            issuer="https://other.example.com/",
            audience=local.audience,
            jwks_url=local.jwks_url,
            http_client=http,
        )
        caplog.set_level(logging.DEBUG, logger="m2m_client.verify")
        with pytest.raises(VerificationError):
            verifier.verify(local.mint())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- roles under another claim than roles_claim: the 403's log says where ---------------------


def _app(verifier: AsyncTokenVerifier) -> FastAPI:
    admin_only = Depends(JWTBearer(verifier).require(roles=["admin"]))
    app = FastAPI()

    @app.get("/admin")
    async def admin(claims: Claims = admin_only) -> dict[str, str]:
        return {"client": str(claims.client_id)}

    return app


@pytest.mark.parametrize("shape", ["auth0", "keycloak", "keycloak_client"])
def test_a_403_for_roles_in_another_claim_logs_where_the_roles_are(
    caplog: pytest.LogCaptureFixture, shape: str
) -> None:
    n = next(_unique)
    audience = f"https://api-{n}.example.com"
    url = f"https://roles-{n}.example.com/"
    if shape == "auth0":
        local = LocalIssuer(url=url, audience=audience)  # roles in "<audience>/roles"
        token = local.mint(roles=["admin"])
        where = f"{audience}/roles"
    elif shape == "keycloak":
        local = LocalIssuer(url=url, audience=audience, roles_claim="realm_access.roles")
        token = local.mint(roles=["admin"])
        where = "realm_access.roles"
    else:
        local = LocalIssuer(url=url, audience=audience)
        token = local.mint(resource_access={f"api-{n}": {"roles": ["admin"]}})
        where = f"resource_access.api-{n}.roles"
    http = httpx.AsyncClient(transport=local.transport())
    verifier = AsyncTokenVerifier(issuer=local.url, audience=audience, http_client=http)
    caplog.set_level(logging.DEBUG, logger="m2m_client.verify")
    with TestClient(_app(verifier)) as client:
        for _ in range(3):
            answer = client.get("/admin", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 403
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # once, not once per request
    assert repr(where) in warnings[0]
    assert "roles_claim='roles'" in warnings[0]
    assert token not in warnings[0]


def test_a_403_for_a_role_nobody_granted_logs_nothing_above_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = next(_unique)
    audience = f"https://api-{n}.example.com"
    local = LocalIssuer(url=f"https://roles-{n}.example.com/", audience=audience)
    http = httpx.AsyncClient(transport=local.transport())
    verifier = AsyncTokenVerifier(
        issuer=local.url, audience=audience, roles_claim=f"{audience}/roles", http_client=http
    )
    caplog.set_level(logging.DEBUG, logger="m2m_client.verify")
    with TestClient(_app(verifier)) as client:
        token = local.mint(roles=["viewer"])
        assert client.get("/admin", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- BearerAuth on the wrong kind of client: a sentence ----------------------------------------


def _stacks() -> list[Any]:
    stacks: list[Any] = [httpx]
    try:
        import httpx2

        stacks.append(httpx2)
    except ImportError:
        pass
    return stacks


@pytest.mark.parametrize("stack", _stacks(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("tokens_kind", ["sync", "async"])
@pytest.mark.anyio
async def test_bearer_auth_on_the_wrong_client_kind_reads_as_english(
    issuer: LocalIssuer, stack: Any, tokens_kind: str, anyio_backend: str
) -> None:
    creds = ClientCredentials(
        token_url=issuer.token_url, client_id="worker", client_secret="worker-secret-value"
    )

    async def use() -> None:
        if tokens_kind == "sync":
            with TokenClient(creds) as tokens:
                async with stack.AsyncClient(auth=BearerAuth(tokens)) as http:
                    await http.get(issuer.url)
        else:
            async with AsyncTokenClient(creds) as atokens:
                with stack.Client(auth=BearerAuth(atokens)) as http:
                    http.get(issuer.url)

    with pytest.raises(ConfigurationError) as caught:
        await use()
    message = str(caught.value)
    assert "an Client" not in message
    assert "a AsyncClient" not in message
    assert "a TokenClient" in message or "an AsyncTokenClient" in message
    if tokens_kind == "sync":
        assert "given a TokenClient but is used with an AsyncClient" in message
        assert "use an AsyncTokenClient with an AsyncClient" in message
    else:
        assert "given an AsyncTokenClient but is used with a Client" in message
        assert "use a TokenClient with a Client" in message


# --- a failed token request: raised, not also logged at WARNING ---------------------------------


@pytest.mark.parametrize("fault", ["invalid_client", "unavailable"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.anyio
async def test_a_token_error_reaches_the_user_once_raised_not_also_logged(
    caplog: pytest.LogCaptureFixture, fault: str, flavour: str, anyio_backend: str
) -> None:
    local = LocalIssuer(url=f"https://once-{next(_unique)}.example.com/")
    local.add_client("worker", "right-secret-value")
    secret = "wrong-secret-value" if fault == "invalid_client" else "right-secret-value"
    if fault == "unavailable":
        local.fail_next(5, status=503)
    creds = ClientCredentials(token_url=local.token_url, client_id="worker", client_secret=secret)
    retry = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
    caplog.set_level(logging.DEBUG, logger="m2m_client")
    if flavour == "sync":
        with (
            httpx.Client(transport=local.transport()) as http,
            TokenClient(creds, http_client=http, retry=retry) as tokens,
            pytest.raises(TokenError),
        ):
            tokens.get_token()
    else:
        async with (
            httpx.AsyncClient(transport=local.transport()) as ahttp,
            AsyncTokenClient(creds, http_client=ahttp, retry=retry) as atokens,
        ):
            with pytest.raises(TokenError):
                await atokens.get_token()
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    quiet = [r.getMessage() for r in caplog.records if "token request failed" in r.getMessage()]
    assert quiet, "still traceable at DEBUG"


# --- m2m-client issuer: grants per client ------------------------------------------------------


@pytest.fixture
def graded_issuer() -> Iterator[tuple[list[str], int]]:
    port = free_port()
    process, lines = start_issuer(
        "--port",
        str(port),
        "--client",
        "admin:admin-secret-123",
        "--client",
        "viewer:viewer-secret-123",
        "--client",
        "plain:plain-secret-123",
        "--permissions",
        "read:data",
        "--roles",
        "reader",
        "--grant",
        "admin:roles=admin,reader",
        "--grant",
        "admin:permissions=read:data,read:dashboard",
        "--grant",
        "viewer:roles=",
    )
    yield lines, port
    stop(process)


def test_issuer_grants_permissions_and_roles_per_client(
    graded_issuer: tuple[list[str], int],
) -> None:
    lines, port = graded_issuer
    url = f"http://127.0.0.1:{port}/"
    verifier = TokenVerifier(
        issuer=url, audience="https://api.example.com", roles_claim="https://api.example.com/roles"
    )
    got = {}
    for settings in exports(lines):
        with TokenClient(ClientCredentials.from_env(settings)) as tokens:
            claims = verifier.verify(tokens.get_token().access_token)
        got[claims.client_id] = (set(claims.permissions), set(claims.roles))
    assert got == {
        "admin": ({"read:data", "read:dashboard"}, {"admin", "reader"}),
        "viewer": ({"read:data"}, set()),  # its own (empty) roles, the shared permissions
        "plain": ({"read:data"}, {"reader"}),  # no --grant: --permissions and --roles
    }
    text = "\n".join(lines)
    assert "# client 'admin': permissions ['read:data', 'read:dashboard']" in text
    assert "# client 'viewer': permissions ['read:data'], roles none" in text


@pytest.mark.parametrize(
    ("grant", "says"),
    [
        ("ghost:roles=admin", "no client 'ghost'"),
        ("worker:role=admin", "ID:permissions=A,B or ID:roles=A,B"),
        ("worker", "ID:permissions=A,B or ID:roles=A,B"),
    ],
)
def test_issuer_refuses_a_grant_it_cannot_apply(grant: str, says: str) -> None:
    result = subprocess.run(
        [*COMMAND, "issuer", "--port", str(free_port()), "--client", "worker:s", "--grant", grant],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr


# --- the testing extra brings httpx2 where it installs -----------------------------------------


def test_the_testing_extra_brings_httpx2_for_starlettes_test_client() -> None:
    requires = importlib.metadata.requires("m2m-client") or []
    testing = [r for r in requires if "extra == 'testing'" in r or 'extra == "testing"' in r]
    assert any(r.startswith("httpx2") and "3.11" in r for r in testing), testing
    assert any(r.startswith("fastapi") for r in testing), testing
