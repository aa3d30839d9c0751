"""A real authorization server for the interop tests: node oidc-provider on 127.0.0.1.

The fixture installs nothing: `.ci/run` runs ``npm ci --prefix tests/interop/idp`` first. When
Node or the package is missing, :func:`tests.conftest.require` fails the tests in CI and skips
them elsewhere.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import NODE_INSTALL, require

IDP_DIR = Path(__file__).parent / "idp"
STARTUP_TIMEOUT = 20.0

# What tests/interop/idp/server.mjs configures (fixed, test-only values).
RESOURCE_BY_ALG = {
    "RS256": "https://rs256.api.test/",
    "PS256": "https://ps256.api.test/",
    "ES256": "https://es256.api.test/",
}
DEFAULT_RESOURCE = RESOURCE_BY_ALG["RS256"]
RESOURCE_SCOPES = ("read:data", "write:data")
INSTALL_HINT = NODE_INSTALL


@dataclass(frozen=True)
class KeyClient:
    """The private_key_jwt client: its keys are made here; only the public half goes to node."""

    client_id: str
    rsa_private_pem: str
    rsa_kid: str
    ec_private_pem: str
    ec_kid: str


@dataclass(frozen=True)
class IdP:
    """A running oidc-provider: its issuer URL, endpoints and registered clients."""

    issuer: str
    admin_token: str
    key_client: KeyClient
    basic_client: tuple[str, str] = ("basic-client", "basic-secret")
    post_client: tuple[str, str] = ("post-client", "post-secret")

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    def rotate(self) -> list[str]:
        """Publish the server's next signing keys; tokens issued from now on use their kids."""
        response = httpx.post(
            f"{self.issuer}/__test__/rotate",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=5.0,
        )
        response.raise_for_status()
        kids: list[str] = response.json()["kids"]
        return kids


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _key_client() -> tuple[KeyClient, dict[str, Any]]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    ec_jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    rsa_jwk.update(kid="jwt-client-rsa", use="sig")
    ec_jwk.update(kid="jwt-client-ec", use="sig")
    client = KeyClient(
        client_id="jwt-client",
        rsa_private_pem=_pem(rsa_key),
        rsa_kid="jwt-client-rsa",
        ec_private_pem=_pem(ec_key),
        ec_kid="jwt-client-ec",
    )
    return client, {"keys": [rsa_jwk, ec_jwk]}


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _stderr_of(log: IO[str]) -> str:
    log.flush()
    log.seek(0)
    return log.read()


@pytest.fixture(scope="session")
def idp() -> Iterator[IdP]:
    """Start tests/interop/idp/server.mjs once per session; stop it (SIGTERM) at the end."""
    node = shutil.which("node")
    require(node is not None, f"Node.js (`node`) is not on PATH; {INSTALL_HINT}")
    require(
        (IDP_DIR / "node_modules" / "oidc-provider" / "package.json").is_file(),
        f"oidc-provider is not installed in {IDP_DIR}; {INSTALL_HINT}",
    )
    assert node is not None
    key_client, client_jwks = _key_client()
    admin_token = secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "IDP_CLIENT_JWKS": json.dumps(client_jwks),
        "IDP_ADMIN_TOKEN": admin_token,
        "IDP_ROTATIONS": "8",  # each rotation test uses one (sync + async on two backends)
    }
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as stderr_log:
        process = subprocess.Popen(
            [node, "server.mjs"],
            cwd=IDP_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_log,
            text=True,
        )
        reader: threading.Thread | None = None
        try:
            assert process.stdout is not None
            lines: queue.Queue[str | None] = queue.Queue()
            reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
            reader.start()
            issuer = _wait_for_listening(lines, process, stderr_log)
            yield IdP(issuer=issuer, admin_token=admin_token, key_client=key_client)
        finally:
            process.terminate()
            try:
                returncode = process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait()
            if reader is not None:  # EOF once the process is gone; then close our end
                reader.join(timeout=5)
            if process.stdout is not None:
                process.stdout.close()
            if returncode != 0:
                sys.stderr.write(
                    f"\noidc-provider exited with {returncode}; its stderr:\n"
                    f"{_stderr_of(stderr_log)}\n"
                )


def _wait_for_listening(
    lines: queue.Queue[str | None], process: subprocess.Popen[str], stderr_log: IO[str]
) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            process.kill()
            process.wait()
            pytest.fail(
                f"oidc-provider did not print LISTENING within {STARTUP_TIMEOUT:.0f} s "
                f"(exit code {process.returncode}); its stderr:\n{_stderr_of(stderr_log)}",
                pytrace=False,
            )
        if line.startswith("LISTENING "):
            return line.split()[1]


# DPoP (RFC 9449) clients of server.mjs: both must send a proof; the second also a nonce.
DPOP_CLIENT = ("dpop-client", "dpop-secret")
DPOP_NONCE_CLIENT = ("dpop-nonce-client", "dpop-nonce-secret")
DPOP_RESOURCE = RESOURCE_BY_ALG["ES256"]
