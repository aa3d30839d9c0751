"""No stored secret (issue 21): client assertions from files and callables, secret and key
files that rotate, all against a LocalIssuer serving real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from m2m_client import AsyncTokenClient, ClientCredentials, TokenClient
from m2m_client.assertions import (
    CallableAssertion,
    FileAssertion,
    GitHubActionsAssertion,
    SpiffeAssertion,
)
from m2m_client.errors import (
    AssertionExpired,
    ConfigurationError,
    CredentialUnavailable,
    TokenEndpointError,
)
from m2m_client.testing import LocalIssuer, ProjectedTokenFile

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def issuer() -> Iterator[LocalIssuer]:
    issuer = LocalIssuer()
    issuer.add_client("worker", public_key=KEY.public_key())
    with issuer:
        yield issuer


def self_signed(issuer: LocalIssuer, directory: Path, lifetime: int = 600) -> ProjectedTokenFile:
    """Assertions LocalIssuer accepts as private_key_jwt: iss = sub = client_id, its key."""
    return ProjectedTokenFile(
        issuer="worker",
        subject="worker",
        audience=issuer.token_url,
        directory=directory,
        lifetime=lifetime,
        private_key=KEY,
    )


def creds(issuer: LocalIssuer, **kwargs: Any) -> ClientCredentials:
    return ClientCredentials(token_url=issuer.token_url, client_id="worker", **kwargs)


# --- assertion files -----------------------------------------------------------------


def test_a_rotated_assertion_file_is_read_again_and_the_new_assertion_sent(
    issuer: LocalIssuer, tmp_path: Path
) -> None:
    # LocalIssuer refuses a replayed jti: the second token request succeeds only if the
    # assertion written by the symlink swap was read and sent.
    projected = self_signed(issuer, tmp_path)
    with TokenClient(creds(issuer, client_assertion=projected.path)) as client:
        client.get_token()
        projected.rotate()
        client.get_token(force_refresh=True)
        projected.rotate()
        client.get_token(force_refresh=True)
    assert issuer.token_requests == issuer.tokens_issued == 3


@pytest.mark.anyio
async def test_async_client_reads_a_rotated_assertion_file(
    issuer: LocalIssuer, tmp_path: Path
) -> None:
    projected = self_signed(issuer, tmp_path)
    async with AsyncTokenClient(creds(issuer, client_assertion=projected.path)) as client:
        await client.get_token()
        projected.rotate()
        await client.get_token(force_refresh=True)
    assert issuer.token_requests == issuer.tokens_issued == 2


def test_the_same_assertion_is_not_read_again_while_the_file_is_unchanged(
    tmp_path: Path,
) -> None:
    projected = ProjectedTokenFile(issuer="i", subject="s", audience="a", directory=tmp_path)
    source = FileAssertion(projected.path)
    first = source.get(time.time())
    assert first == projected.token
    os.chmod(projected.path.resolve(), 0)  # unreadable, but unchanged: no read needed
    try:
        assert source.get(time.time()) == first
    finally:
        os.chmod(projected.path.resolve(), 0o600)
    projected.rotate()
    assert source.get(time.time()) == projected.token != first


def test_an_assertion_about_to_expire_is_never_sent(issuer: LocalIssuer, tmp_path: Path) -> None:
    projected = self_signed(issuer, tmp_path, lifetime=20)  # below the 30 s margin
    with (
        TokenClient(creds(issuer, client_assertion=projected.path)) as client,
        pytest.raises(AssertionExpired) as caught,
    ):
        client.get_token()
    assert str(projected.path) in str(caught.value)
    assert projected.token not in str(caught.value)
    assert issuer.token_requests == 0


def test_an_expired_cached_assertion_is_read_again_before_it_is_refused(tmp_path: Path) -> None:
    projected = ProjectedTokenFile(
        issuer="i", subject="s", audience="a", directory=tmp_path, lifetime=100
    )
    source = FileAssertion(projected.path)
    now = time.time()
    assert source.get(now) == projected.token
    # 80 s later the cached one is within the margin: the file is read again.
    later = now + 80
    projected.clock = lambda: later
    projected.rotate()
    assert source.get(later) == projected.token


@pytest.mark.parametrize("problem", ["missing", "directory", "empty", "huge", "binary"])
def test_an_unreadable_assertion_file_is_a_typed_error_naming_the_file(
    issuer: LocalIssuer, tmp_path: Path, problem: str
) -> None:
    path = tmp_path / "token"
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_text("")
    elif problem == "huge":
        path.write_text("eyJ" + "a" * 20000)
    elif problem == "binary":
        path.write_bytes(b"\xff\xfe secret-ish")
    with (
        TokenClient(creds(issuer, client_assertion=path)) as client,
        pytest.raises(CredentialUnavailable) as caught,
    ):
        client.get_token()
    assert str(path) in str(caught.value)
    assert "secret-ish" not in str(caught.value)
    assert issuer.token_requests == 0


# --- callables -----------------------------------------------------------------------


def test_a_sync_callable_is_called_once_per_assertion_lifetime(
    issuer: LocalIssuer, tmp_path: Path
) -> None:
    projected = self_signed(issuer, tmp_path)
    calls = []

    def fetch() -> str:
        calls.append(1)
        return projected.rotate()

    with TokenClient(creds(issuer, client_assertion=fetch)) as client:
        client.get_token()
        assert client.get_token() is not None
    assert len(calls) == 1
    assert issuer.tokens_issued == 1


@pytest.mark.anyio
async def test_an_async_callable_is_awaited(issuer: LocalIssuer, tmp_path: Path) -> None:
    projected = self_signed(issuer, tmp_path)

    async def fetch() -> str:
        return projected.rotate()

    async with AsyncTokenClient(creds(issuer, client_assertion=fetch)) as client:
        await client.get_token()
        await client.get_token(force_refresh=True)  # cached assertion replayed: refused
    # ... so the second request was refused, read again (invalid_client) and re-sent.
    assert issuer.tokens_issued == 2


def test_an_async_callable_with_a_sync_client_says_so(issuer: LocalIssuer) -> None:
    async def fetch() -> str:
        return "x"

    with (
        TokenClient(creds(issuer, client_assertion=fetch)) as client,
        pytest.raises(ConfigurationError, match="AsyncTokenClient"),
    ):
        client.get_token()


@pytest.mark.parametrize("result", [RuntimeError("leaked-secret"), None, "", 42])
def test_a_failing_callable_is_a_typed_error_naming_it(issuer: LocalIssuer, result: Any) -> None:
    def fetch_assertion() -> Any:
        if isinstance(result, Exception):
            raise result
        return result

    with (
        TokenClient(creds(issuer, client_assertion=fetch_assertion)) as client,
        pytest.raises(CredentialUnavailable, match="fetch_assertion") as caught,
    ):
        client.get_token()
    assert "leaked-secret" not in str(caught.value)
    assert issuer.token_requests == 0


# --- secret and key files that rotate ------------------------------------------------


def _rewrite_unseen(path: Path, text: str) -> None:
    """Rewrite in place keeping size and mtime: a rotation a stat cannot see (coarse mtime,
    a copy that preserves it). Only an ``invalid_client`` reveals it."""
    before = os.stat(path)
    assert len(text.encode()) == before.st_size
    with open(path, "r+", encoding="utf-8") as f:
        f.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("unseen", [False, True], ids=["new-file", "rewritten-unseen"])
def test_a_rotated_secret_file_loses_no_request(tmp_path: Path, unseen: bool) -> None:
    # The worker runs; the secret is rotated at the server (the old one revoked) and in the
    # file. No get_token fails. A rotation the file's stat shows costs nothing; one it hides
    # costs one invalid_client, read again, success.
    issuer = LocalIssuer()
    issuer.add_client("worker", "old-secret-0001")
    secret = tmp_path / "client-secret"
    secret.write_text("old-secret-0001\n")
    with issuer, TokenClient(creds(issuer, client_secret_file=secret)) as client:
        client.get_token()
        issuer.add_client("worker", "new-secret-0002")  # the old secret is revoked
        if unseen:
            _rewrite_unseen(secret, "new-secret-0002\n")
        else:
            replacement = tmp_path / "new"
            replacement.write_text("new-secret-0002\n")
            os.replace(replacement, secret)
        for _ in range(3):
            client.get_token(force_refresh=True)
        refused = issuer.token_requests - issuer.tokens_issued
        assert refused == (1 if unseen else 0)
        assert issuer.tokens_issued == 4


@pytest.mark.anyio
async def test_async_client_survives_a_secret_rotated_unseen(tmp_path: Path) -> None:
    issuer = LocalIssuer()
    issuer.add_client("worker", "old-secret-0001")
    secret = tmp_path / "client-secret"
    secret.write_text("old-secret-0001")
    async with issuer, AsyncTokenClient(creds(issuer, client_secret_file=secret)) as client:
        await client.get_token()
        issuer.add_client("worker", "new-secret-0002")
        _rewrite_unseen(secret, "new-secret-0002")
        await client.get_token(force_refresh=True)
    assert (issuer.token_requests, issuer.tokens_issued) == (3, 2)


def test_a_rotated_secret_is_a_new_credential_with_new_cache_entries(tmp_path: Path) -> None:
    issuer = LocalIssuer()
    issuer.add_client("worker", "old-secret-0001")
    secret = tmp_path / "client-secret"
    secret.write_text("old-secret-0001")
    with issuer, TokenClient(creds(issuer, client_secret_file=secret)) as client:
        old_token = client.get_token()
        old_key = client._core.key(None, None, None)
        issuer.add_client("worker", "new-secret-0002")
        replacement = tmp_path / "new"
        replacement.write_text("new-secret-0002")
        os.replace(replacement, secret)
        client.get_token(force_refresh=True)
        new_key = client._core.key(None, None, None)
        assert new_key.credential != old_key.credential
        assert client.get_token() != old_token


def test_a_secret_that_did_not_change_is_not_sent_twice(tmp_path: Path) -> None:
    # invalid_client with an unchanged file: read again, nothing new, no second request.
    issuer = LocalIssuer()
    issuer.add_client("worker", "right-secret")
    secret = tmp_path / "client-secret"
    secret.write_text("wrong-secret")
    with (
        issuer,
        TokenClient(creds(issuer, client_secret_file=secret)) as client,
        pytest.raises(TokenEndpointError, match="invalid_client"),
    ):
        client.get_token()
    assert issuer.token_requests == 1


def test_a_rotated_private_key_file_is_read_again(tmp_path: Path) -> None:
    issuer = LocalIssuer()
    issuer.add_client("worker", public_key=KEY.public_key())
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem(KEY))
    with issuer, TokenClient(creds(issuer, private_key_file=key_file)) as client:
        client.get_token()
        issuer.add_client("worker", public_key=KEY_B.public_key())
        replacement = tmp_path / "new.pem"
        replacement.write_text(pem(KEY_B))
        os.replace(replacement, key_file)
        client.get_token(force_refresh=True)
    assert issuer.token_requests == issuer.tokens_issued == 2


def test_a_secret_file_that_disappears_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    issuer = LocalIssuer()
    issuer.add_client("worker", "s3cret-value")
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret-value")
    with issuer, TokenClient(creds(issuer, client_secret_file=secret)) as client:
        secret.unlink()
        with pytest.raises(CredentialUnavailable, match="client-secret") as caught:
            client.get_token()
    assert "s3cret-value" not in str(caught.value)


# --- configuration -------------------------------------------------------------------


def test_file_fields_are_checked_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="client_secret_file"):
        ClientCredentials(
            token_url="https://idp.test/t", client_id="w", client_secret_file=tmp_path / "no"
        )
    (tmp_path / "key.pem").write_text("not a key")
    with pytest.raises(ConfigurationError, match="private_key_file"):
        ClientCredentials(
            token_url="https://idp.test/t",
            client_id="w",
            private_key_file=tmp_path / "key.pem",
        )
    (tmp_path / "s").write_text("x")
    with pytest.raises(ConfigurationError, match="not both"):
        ClientCredentials(
            token_url="https://idp.test/t",
            client_id="w",
            client_secret="x",
            client_secret_file=tmp_path / "s",
        )
    with pytest.raises(ConfigurationError, match="client_assertion"):
        ClientCredentials(
            token_url="https://idp.test/t",
            client_id="w",
            client_secret="x",
            client_assertion=tmp_path / "s",
        )
    with pytest.raises(ConfigurationError, match="private_key_jwt"):
        ClientCredentials(
            token_url="https://idp.test/t",
            client_id="w",
            auth_method="client_secret_basic",
            client_assertion=tmp_path / "s",
        )
    with pytest.raises(ConfigurationError, match="client_assertion"):
        ClientCredentials(token_url="https://idp.test/t", client_id="w", client_assertion=42)


def test_a_jwt_given_as_client_assertion_is_refused_without_echoing_it() -> None:
    jwt_value = ProjectedTokenFile(issuer="i", subject="s", audience="a").token
    with pytest.raises(ConfigurationError, match="not a path") as caught:
        ClientCredentials(token_url="https://idp.test/t", client_id="w", client_assertion=jwt_value)
    assert jwt_value not in str(caught.value)
    assert jwt_value.split(".")[1] not in str(caught.value)


def test_from_env_reads_the_file_variables(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret")
    creds = ClientCredentials.from_env(
        {
            "M2M_TOKEN_URL": "https://idp.test/t",
            "M2M_CLIENT_ID": "w",
            "M2M_CLIENT_SECRET_FILE": str(tmp_path / "secret"),
        }
    )
    assert creds.client_secret_file == tmp_path / "secret"
    creds = ClientCredentials.from_env(
        {
            "M2M_TOKEN_URL": "https://idp.test/t",
            "M2M_CLIENT_ID": "w",
            "M2M_CLIENT_ASSERTION_FILE": "/var/run/secrets/tokens/idp",
        }
    )
    assert creds.client_assertion == FileAssertion("/var/run/secrets/tokens/idp")
    assert creds.auth_method == "private_key_jwt"


def test_azure_workload_identity_needs_no_m2m_variable_but_the_scope() -> None:
    azure = {
        "AZURE_CLIENT_ID": "11111111-2222",
        "AZURE_TENANT_ID": "tenant-guid",
        "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
    }
    creds = ClientCredentials.from_env({**azure, "M2M_SCOPE": "api://orders/.default"})
    assert creds.token_url == "https://login.microsoftonline.com/tenant-guid/oauth2/v2.0/token"
    assert creds.client_id == "11111111-2222"
    assert creds.client_assertion == FileAssertion(azure["AZURE_FEDERATED_TOKEN_FILE"])
    assert creds.scope == ("api://orders/.default",)
    with pytest.raises(ConfigurationError, match="M2M_SCOPE"):
        ClientCredentials.from_env(azure)
    # M2M_* wins; a secret from M2M_* means the Azure variables are not used at all.
    creds = ClientCredentials.from_env(
        {**azure, "M2M_SCOPE": "x", "M2M_TOKEN_URL": "https://idp.test/t"}
    )
    assert creds.token_url == "https://idp.test/t"
    creds = ClientCredentials.from_env(
        {
            **azure,
            "M2M_CLIENT_ID": "w",
            "M2M_CLIENT_SECRET": "s",
            "M2M_TOKEN_URL": "https://idp.test/t",
        }
    )
    assert creds.client_assertion is None
    assert creds.client_id == "w"
    without_tenant = {k: v for k, v in azure.items() if k != "AZURE_TENANT_ID"}
    with pytest.raises(ConfigurationError, match="AZURE_TENANT_ID"):
        ClientCredentials.from_env({**without_tenant, "M2M_SCOPE": "x"})


@pytest.fixture
def workload_api(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A SPIFFE Workload API stand-in on a unix socket (the published gRPC protocol: the
    ``workload.spiffe.io: true`` metadata is required; FetchJWTSVID answers JWT-SVIDs)."""
    import warnings
    from concurrent import futures

    import grpc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from spiffe._proto import workload_pb2, workload_pb2_grpc

    state: dict[str, Any] = {"requests": [], "svid": ""}

    class Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
        def FetchJWTSVID(self, request: Any, context: Any) -> Any:
            metadata = dict(context.invocation_metadata())
            if metadata.get("workload.spiffe.io") != "true":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
            state["requests"].append((list(request.audience), request.spiffe_id))
            return workload_pb2.JWTSVIDResponse(
                svids=[
                    workload_pb2.JWTSVID(
                        spiffe_id="spiffe://example.org/worker", svid=state["svid"]
                    )
                ]
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(Servicer(), server)
    socket = f"unix://{tmp_path}/agent.sock"
    server.add_insecure_port(socket)
    server.start()
    try:
        yield socket, state
    finally:
        server.stop(grace=None).wait(5)


@pytest.mark.parametrize("kind", ["jwt-bearer", "jwt-spiffe"])
def test_spiffe_assertion_fetches_a_jwt_svid_from_the_workload_api(
    cluster: LocalIssuer, tmp_path: Path, workload_api: tuple[str, dict[str, Any]], kind: str
) -> None:
    socket, state = workload_api
    spiffe_id = "spiffe://example.org/worker"
    sent: list[str] = []
    with LocalIssuer(trust=[(cluster, spiffe_id, "worker")]) as idp:
        projected = ProjectedTokenFile(
            issuer=cluster.url,
            subject=spiffe_id,
            audience=idp.url,
            signer=cluster,
            directory=tmp_path / "svid",
        )
        state["svid"] = projected.token
        source = SpiffeAssertion(idp.url, socket_path=socket, assertion_type=kind)

        def record(request: httpx.Request) -> None:
            sent.append(parse_qs(request.read().decode())["client_assertion_type"][0])

        http = httpx.Client(event_hooks={"request": [record]})
        with TokenClient(creds(idp, client_assertion=source), http_client=http) as client:
            client.get_token()
            client.get_token(force_refresh=True)  # the SVID is kept while usable
        http.close()
        assert idp.tokens_issued == 2
        assert state["requests"] == [([idp.url], "")]  # one Workload API call
    assert sent == [f"urn:ietf:params:oauth:client-assertion-type:{kind}"] * 2
    assert projected.token not in repr(source)


def test_spiffe_assertion_without_an_agent_is_a_typed_error(tmp_path: Path) -> None:
    source = SpiffeAssertion(
        "https://idp.test/", socket_path=f"unix://{tmp_path}/none.sock", timeout=2
    )
    with pytest.raises(CredentialUnavailable, match="SPIFFE Workload API"):
        source.get(time.time())


def test_no_assertion_secret_or_key_in_reprs_or_logs(
    issuer: LocalIssuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    projected = self_signed(issuer, tmp_path)
    credentials = creds(issuer, client_assertion=projected.path)
    with TokenClient(credentials) as client:
        client.get_token()
        shown = [repr(credentials), str(credentials), repr(client), repr(client._core)]
        shown += [repr(client._core.authenticator), repr(credentials.client_assertion)]
        shown += [repr(client._core.default_key), repr(projected)]
    shown.append(caplog.text)
    payload = projected.token.split(".")[1]
    for text in shown:
        assert projected.token not in text
        assert payload not in text
    secret = tmp_path / "s"
    secret.write_text("file-secret-value")
    file_creds = creds(issuer, client_secret_file=secret)
    assert "file-secret-value" not in repr(file_creds)
    assert "file-secret-value" not in repr(CallableAssertion(lambda: "file-secret-value"))


# --- GitHub Actions, against a stand-in that follows the published protocol ----------


class _ActionsOIDC(BaseHTTPRequestHandler):
    """GitHub's ACTIONS_ID_TOKEN_REQUEST_URL: GET with the request token as a bearer,
    ``audience`` as a query parameter; answers ``{"count": ..., "value": "<JWT>"}``."""

    token = ""
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        type(self).seen.append(
            {"auth": self.headers.get("Authorization"), "query": query, "path": self.path}
        )
        if self.headers.get("Authorization") != "bearer request-token":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"count": 1, "value": type(self).token}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def actions() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ActionsOIDC)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ActionsOIDC.seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/_apis/token?api-version=2.0"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_github_actions_assertion_follows_the_oidc_protocol(
    issuer: LocalIssuer, tmp_path: Path, actions: str, mode: str
) -> None:
    projected = self_signed(issuer, tmp_path)
    _ActionsOIDC.token = projected.token
    source = GitHubActionsAssertion(
        audience="https://idp.test",
        environ={
            "ACTIONS_ID_TOKEN_REQUEST_URL": actions,
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "request-token",
        },
    )
    credentials = creds(issuer, client_assertion=source)
    if mode == "sync":
        with TokenClient(credentials) as client:
            client.get_token()
    else:
        import anyio

        async def run() -> None:
            async with AsyncTokenClient(credentials) as client:
                await client.get_token()

        anyio.run(run)
    assert issuer.tokens_issued == 1
    (request,) = _ActionsOIDC.seen
    assert request["query"] == {"api-version": ["2.0"], "audience": ["https://idp.test"]}
    assert "request-token" not in repr(source)


class _Redirecting(_ActionsOIDC):
    """Answers with a redirect to another (recording) server."""

    target = ""

    def do_GET(self) -> None:
        type(self).seen.append({"auth": self.headers.get("Authorization"), "path": self.path})
        if self.server.server_address[1] == int(urlsplit(type(self).target).port or 0):
            self.send_response(200)
            self.end_headers()
            return
        self.send_response(302)
        self.send_header("Location", type(self).target)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_github_actions_request_token_never_follows_a_redirect() -> None:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    _Redirecting.seen = []
    _Redirecting.target = f"http://127.0.0.1:{servers[1].server_address[1]}/elsewhere"
    try:
        source = GitHubActionsAssertion(
            environ={
                "ACTIONS_ID_TOKEN_REQUEST_URL": f"http://127.0.0.1:{servers[0].server_address[1]}/t",
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "request-token",
            }
        )
        with pytest.raises(CredentialUnavailable, match="HTTP 302"):
            source.get(time.time())
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert [seen["path"] for seen in _Redirecting.seen] == ["/t"]  # never /elsewhere


def test_github_actions_assertion_errors_are_typed(actions: str) -> None:
    missing = GitHubActionsAssertion(environ={})
    with pytest.raises(CredentialUnavailable, match="id-token: write"):
        missing.get(time.time())
    refused = GitHubActionsAssertion(
        environ={
            "ACTIONS_ID_TOKEN_REQUEST_URL": actions,
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "wrong-request-token",
        }
    )
    with pytest.raises(CredentialUnavailable, match="HTTP 401") as caught:
        refused.get(time.time())
    assert "wrong-request-token" not in str(caught.value)


# --- LocalIssuer(trust=...): federated client authentication -------------------------

SA = "system:serviceaccount:payments:worker"


@pytest.fixture
def cluster() -> Iterator[LocalIssuer]:
    """The cluster's service-account issuer (what signs projected tokens)."""
    with LocalIssuer() as cluster:
        yield cluster


@pytest.mark.parametrize("by", ["object", "url"])
def test_local_issuer_trusts_another_issuers_tokens_for_a_chosen_subject(
    cluster: LocalIssuer, tmp_path: Path, by: str
) -> None:
    source: Any = cluster if by == "object" else cluster.url
    with LocalIssuer(trust=[(source, SA, "worker")]) as idp:
        projected = ProjectedTokenFile(
            issuer=cluster.url, subject=SA, audience=idp.url, directory=tmp_path, signer=cluster
        )
        with TokenClient(creds(idp, client_assertion=projected.path)) as client:
            token = client.get_token()
            # A projected token is reused until the kubelet rotates it: no one-use jti.
            client.get_token(force_refresh=True)
            projected.rotate()
            client.get_token(force_refresh=True)
        assert idp.tokens_issued == idp.token_requests == 3
        claims = pyjwt.decode(token.access_token, options={"verify_signature": False})
        assert claims["client_id"] == "worker"


@pytest.mark.parametrize("problem", ["subject", "audience", "signer", "client_id"])
def test_local_issuer_refuses_what_it_does_not_trust(
    cluster: LocalIssuer, tmp_path: Path, problem: str
) -> None:
    with LocalIssuer(trust=[(cluster, SA, "worker")]) as idp:
        idp.add_client("other", "other-secret")
        options: dict[str, Any] = {
            "issuer": cluster.url,
            "subject": SA,
            "audience": idp.url,
            "signer": cluster,
        }
        if problem == "subject":
            options["subject"] = "system:serviceaccount:payments:intruder"
        elif problem == "audience":
            options["audience"] = "https://elsewhere.test/"
        elif problem == "signer":
            options["signer"] = None  # a key of its own, not the cluster's
        projected = ProjectedTokenFile(directory=tmp_path, **options)
        client_id = "other" if problem == "client_id" else "worker"
        credentials = ClientCredentials(
            token_url=idp.token_url, client_id=client_id, client_assertion=projected.path
        )
        with (
            TokenClient(credentials) as client,
            pytest.raises(TokenEndpointError, match="invalid_client"),
        ):
            client.get_token()
        assert idp.tokens_issued == 0


def test_trust_specs_of_the_cli_parse_subjects_with_colons() -> None:
    from m2m_client.testing._clients import parse_trust

    assert parse_trust(f"http://127.0.0.1:9012/:{SA}=worker") == (
        "http://127.0.0.1:9012/",
        SA,
        "worker",
    )
    assert parse_trust("https://token.actions.githubusercontent.com:repo:o/r:ref:main=ci") == (
        "https://token.actions.githubusercontent.com",
        "repo:o/r:ref:main",
        "ci",
    )
    for bad in ["worker", "https://k8s.test=worker", "k8s:sa=worker", "https://k8s.test:sa="]:
        with pytest.raises(ConfigurationError, match="ISSUER_URL:SUBJECT=CLIENT_ID"):
            parse_trust(bad)


def test_cli_issuer_trust_and_token_client_assertion_file(
    cluster: LocalIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from m2m_client.cli import main

    from .test_cli_issuer import free_port, start_issuer, stop

    port = free_port()
    process, _ = start_issuer(
        "--port", str(port), "--client", "worker", "--trust", f"{cluster.url}:{SA}=worker"
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        projected = ProjectedTokenFile(
            issuer=cluster.url, subject=SA, audience=url, directory=tmp_path, signer=cluster
        )
        code = main(
            [
                "token",
                "--token-url",
                f"{url}oauth/token",
                "--client-id",
                "worker",
                "--client-assertion-file",
                str(projected.path),
            ]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out.count(".") == 2
        assert projected.token not in out + err
    finally:
        stop(process)


def _replacement_key(kind: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if kind == "rsa-1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if kind == "ec-p256":  # a fine key, but the client signs RS256 (derived from the first)
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


@pytest.mark.parametrize("kind", ["rsa-1024", "ec-p256", "ec-p384", "ed25519"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_private_key_file_rotated_to_a_key_the_configuration_refuses_is_a_typed_error(
    tmp_path: Path, kind: str, asynchronous: bool
) -> None:
    # The rules ClientCredentials applies to private_key_file at construction (RSA of 2048
    # bits or more, EC on P-256, a key matching signing_algorithm) hold for every key the
    # file is rotated to: a bad one is CredentialUnavailable naming the field, and no
    # request is sent with it.
    import anyio

    issuer = LocalIssuer()
    issuer.add_client("worker", public_key=KEY.public_key())
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem(KEY))
    replacement = tmp_path / "new.pem"
    replacement.write_text(pem(_replacement_key(kind)))
    with issuer:
        credentials = creds(issuer, private_key_file=key_file)
        if asynchronous:

            async def run() -> None:
                async with AsyncTokenClient(credentials) as client:
                    await client.get_token()
                    os.replace(replacement, key_file)
                    await client.get_token(force_refresh=True)

            with pytest.raises(CredentialUnavailable, match="private_key_file") as caught:
                anyio.run(run)
        else:
            with TokenClient(credentials) as client:
                client.get_token()
                os.replace(replacement, key_file)
                with pytest.raises(CredentialUnavailable, match="private_key_file") as caught:
                    client.get_token(force_refresh=True)
    assert issuer.token_requests == 1
    assert "PRIVATE KEY" not in str(caught.value)
