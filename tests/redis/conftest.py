"""A real redis-server for the shared-cache tests, started and stopped by the tests.

Persistence off, bound to 127.0.0.1 on a free port. Without ``redis-server`` (Debian package
``redis-server``) the tests skip outside CI and fail in CI (``.ci/run`` installs it).
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator

import pytest

from m2m_client.testing import LocalIssuer
from tests.conftest import REDIS_INSTALL, require

SERVER_BINARIES = ("redis-server", "valkey-server")


@pytest.fixture(autouse=True)
def no_resource_leaks() -> Iterator[None]:
    """Fail any test here that leaves a connection, socket or transport to the garbage collector.

    A Redis connection left open after its event loop ended is what a long-running service
    would leak. The collections make each leak show in the test that caused it, not in
    whichever later test happens to collect it.
    """
    gc.collect()  # what ran before is not this test's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    leaks = []
    for w in caught:
        if issubclass(w.category, ResourceWarning):
            leaks.append(f"{w.filename}:{w.lineno}: {w.message}")
        else:  # hand the others back to pytest's own handling
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if leaks:
        pytest.fail("ResourceWarning (left to the garbage collector):\n" + "\n".join(leaks))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; ``stop()`` and ``start()`` again keep the same port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir = tempfile.mkdtemp(prefix="m2m-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.binary} did not start on port {self.port}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def server_binary() -> str | None:
    override = os.environ.get("M2M_TEST_REDIS_SERVER")  # e.g. a valkey-server binary
    if override:
        return shutil.which(override) or override
    return shutil.which("redis-server")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    binary = server_binary()
    require(binary is not None, f"redis-server is not on PATH; {REDIS_INSTALL}")
    assert binary is not None
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


CLIENT_ID = "fleet-worker"
AUDIENCE = "https://fleet.api.test"


@pytest.fixture
def issuer() -> Iterator[LocalIssuer]:
    """A LocalIssuer over real HTTP on 127.0.0.1 that counts token requests."""
    local = LocalIssuer(audience=AUDIENCE)
    local.add_client(CLIENT_ID, "fleet-secret-" + "x" * 24, scope="read:data", expires_in=60)
    with local:
        yield local
