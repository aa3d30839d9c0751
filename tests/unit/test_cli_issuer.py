"""`m2m-client issuer` and the command's edges, run as the real command in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from m2m_client import ClientCredentials, TokenClient
from m2m_client.testing import LocalIssuer
from m2m_client.verify import TokenVerifier

COMMAND = [sys.executable, "-m", "m2m_client"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_issuer(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen(
        [*COMMAND, "issuer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 30
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Serving"):
            return process, lines
    process.kill()
    _, err = process.communicate(timeout=10)
    pytest.fail(f"issuer did not start: {lines} {err}")


def stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str, str]:
    process.send_signal(sig)
    out, err = process.communicate(timeout=15)
    return process.returncode, out, err


@pytest.fixture
def issuer_process() -> Iterator[tuple[subprocess.Popen[str], list[str], int]]:
    port = free_port()
    process, lines = start_issuer(
        "--port",
        str(port),
        "--client",
        "worker:worker-secret-123",
        "--client",
        "billing",
        "--permissions",
        "read:data",
        "--roles",
        "reader",
        "--audience",
        "https://api.example.com",
    )
    yield process, lines, port
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=10)


def exports(lines: list[str]) -> list[dict[str, str]]:
    clients: list[dict[str, str]] = []
    for line in lines:
        if line.startswith("# client "):
            clients.append({})
        elif line.startswith("export ") and clients:
            name, _, value = line.removeprefix("export ").partition("=")
            clients[-1][name] = value.strip("'")
    return clients


def test_issuer_prints_urls_and_pasteable_settings_that_get_a_verifiable_token(
    issuer_process: tuple[subprocess.Popen[str], list[str], int],
) -> None:
    _, lines, port = issuer_process
    url = f"http://127.0.0.1:{port}/"
    text = "\n".join(lines)
    assert f"issuer     {url}" in text
    assert f"discovery  {url}.well-known/openid-configuration" in text
    worker, billing = exports(lines)
    assert worker["M2M_CLIENT_ID"] == "worker"
    assert worker["M2M_CLIENT_SECRET"] == "worker-secret-123"
    assert len(billing["M2M_CLIENT_SECRET"]) >= 24  # generated
    creds = ClientCredentials.from_env(billing)
    with TokenClient(creds) as tokens:
        token = tokens.get_token().access_token
    verifier = TokenVerifier(
        issuer=url, audience="https://api.example.com", roles_claim="https://api.example.com/roles"
    )
    claims = verifier.verify(token)
    assert claims.client_id == "billing"
    assert claims.permissions == {"read:data"}
    assert set(claims.roles) == {"reader"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_issuer_stops_cleanly_on_a_signal_and_releases_its_port(
    issuer_process: tuple[subprocess.Popen[str], list[str], int], sig: int
) -> None:
    process, _, port = issuer_process
    code, out, err = stop(process, sig)
    assert code == 0
    assert "stopped" in out
    assert "Traceback" not in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=2)


def test_issuer_on_a_taken_port_exits_2_with_the_reason() -> None:
    with LocalIssuer() as taken:
        port = taken.url.rsplit(":", 1)[1].strip("/")
        result = subprocess.run(
            [*COMMAND, "issuer", "--port", port],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def run(*args: str, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=60, check=False, **options
    )  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer() as issuer:
        yield issuer


def test_verbose_flag_is_accepted_after_the_subcommand(issuer: LocalIssuer) -> None:
    result = run("decode", issuer.mint(), "-v")
    assert result.returncode == 0, result.stderr
    assert "NOT VERIFIED" in result.stdout


def test_verify_accepts_a_bearer_prefix_and_says_to_drop_it(issuer: LocalIssuer) -> None:
    token = issuer.mint(sub="svc@clients")
    result = run("verify", f"Bearer {token}", "--issuer", issuer.url, "--audience", issuer.audience)
    assert result.returncode == 0, result.stderr
    assert "'Bearer ' prefix" in result.stderr
    assert '"sub": "svc@clients"' in result.stdout


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        (
            {"audience": "https://other.test"},
            "expected audience 'https://api.example.com', the token's aud is 'https://other.test'",
        ),
        (
            {"iss": "https://evil.test/"},
            "the token's iss is 'https://evil.test/'",
        ),
    ],
)
def test_verify_shows_expected_and_actual_issuer_or_audience_without_the_token(
    issuer: LocalIssuer, claims: dict[str, str], expected: str
) -> None:
    token = issuer.mint(**claims)  # type: ignore[arg-type]
    result = run("verify", token, "--issuer", issuer.url, "--audience", issuer.audience)
    assert result.returncode == 1
    assert expected in result.stderr
    assert token not in result.stderr
    assert token.split(".")[1] not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("head") is None, reason="needs head(1)")
def test_a_closed_pipe_ends_quietly(issuer: LocalIssuer) -> None:
    claims = {f"claim_{i}": "x" * 200 for i in range(400)}  # more than a pipe buffer
    token = issuer.mint(**claims)
    shell = f"{' '.join(COMMAND)} decode {token} | head -1"
    result = subprocess.run(
        ["/bin/sh", "-c", shell], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.startswith("# NOT VERIFIED")
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr


def test_token_warns_about_a_misspelt_variable_naming_the_right_one(
    issuer: LocalIssuer,
) -> None:
    issuer.add_client("cli-env", "cli-env-secret-value")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "AUTH0_"))},
        "M2M_TOKEN_URL": issuer.token_url,
        "M2M_CLIENT_ID": "cli-env",
        "M2M_CLIENT_SECRET": "cli-env-secret-value",
        "M2M_AUDEINCE": "https://api.example.com",
    }
    result = run("token", env=env, cwd=str(Path.cwd()))
    assert result.returncode == 0, result.stderr
    assert "M2M_AUDEINCE" in result.stderr
    assert "M2M_AUDIENCE" in result.stderr
    assert "cli-env-secret-value" not in result.stderr
