"""Every ```python sample in README.md, CONTRIBUTING.md and docs/*.md runs: none drifts.

How a page runs (one test per page): its ```python blocks run in order in one namespace, as a
reader pastes them one after another. A block may use top-level ``await`` (as in ``python -m
asyncio``); all of a page's async blocks share one event loop. A block that defines ``test_*``
functions is a pytest file: it runs in a subprocess with pytest, the way a user's own tests run
(with this package's plugin), and must pass.

A block whose first line is a file name comment (``# app.py``) is also saved under that name,
so a later test file can import it, as in a reader's project.

Where the samples send requests: the hosts they name are served in process, never over the
network. ``tenant.example.com`` is a :class:`LocalIssuer` (discovery, JWKS, token endpoint; client
``worker`` / ``s3cret``), ``api.example.com`` a small API that verifies the token (DPoP included)
and answers 200 or 401, and serves its RFC 9728 metadata; any other host is refused. A page that
needs Redis gets a real redis-server on 127.0.0.1 through ``M2M_REDIS_URL``.

Blocks that cannot run are not ```python: shell commands are ```bash, manifests ```yaml,
output ```text. Nothing is skipped by marking a python block.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from m2m_client import protected_resource_metadata
from m2m_client._stacks import either_transport
from m2m_client.errors import VerificationError
from m2m_client.testing import LocalIssuer
from m2m_client.verify import TokenVerifier
from tests.redis.conftest import redis_server  # noqa: F401 - the fixture, for pages using Redis

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")],
    key=lambda p: str(p.relative_to(ROOT)),
)
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"]
ISSUER_URL = "https://tenant.example.com/"
API = "api.example.com"
AUDIENCE = "https://api.example.com"


@dataclass
class Sample:
    page: Path
    line: int
    source: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def file_name(self) -> str | None:
        """``app.py`` for a block whose first line is ``# app.py``: the reader saves it so."""
        match = re.match(r"# ([\w-]+\.py)\b", self.source)
        return match[1] if match else None

    @property
    def is_pytest_file(self) -> bool:
        return re.search(r"^(async )?def test_", self.source, re.M) is not None


def samples(page: Path) -> list[Sample]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        if match["lang"] != "python":
            continue
        line = text.count("\n", 0, match.start()) + 2
        found.append(Sample(page, line, textwrap.dedent(match["body"])))
    return found


def test_every_page_with_python_is_collected() -> None:
    """The fence pattern finds the samples (an indented one included): the test is not empty."""
    counts = {p.name: len(samples(p)) for p in PAGES}
    assert counts["README.md"] >= 3, counts  # call, protect, test
    assert sum(counts.values()) >= 15, counts


# --- the in-process world the samples talk to ------------------------------------------------


class World:
    """tenant.example.com (a LocalIssuer) and api.example.com (a verifying API), in process."""

    def __init__(self) -> None:
        self.issuer = LocalIssuer(url=ISSUER_URL, audience=AUDIENCE)
        self.issuer.add_client(
            "worker",
            "s3cret",
            scope="read:data write:data",
            permissions=["read:data", "read:dashboard"],
            roles=["admin"],
        )
        self.verifier = TokenVerifier(
            issuer=ISSUER_URL,
            audience=AUDIENCE,
            dpop="allowed",
            http_client=httpx.Client(transport=self.issuer.transport()),
        )
        self.api_calls: list[tuple[str, int]] = []
        # Its RFC 9728 metadata: the samples that find the issuer from the API read it.
        self.metadata = protected_resource_metadata(resource=AUDIENCE, verifier=self.verifier)

    def respond(self, request: Any) -> tuple[int, Any, bytes]:
        host = request.url.host
        if host == "tenant.example.com":
            target = request.url.raw_path.decode("ascii")
            answer = self.issuer.handle_request(
                request.method, target, request.headers, request.content
            )
            return answer.status, answer.headers, answer.body
        if host == API and request.url.path == "/.well-known/oauth-protected-resource":
            return 200, [("content-type", "application/json")], json.dumps(self.metadata).encode()
        if host == API:
            status, body = self._api(request)
            self.api_calls.append((str(request.url), status))
            return status, [("content-type", "application/json")], json.dumps(body).encode()
        raise httpx.ConnectError(f"the doc samples reach only {ISSUER_URL} and {API}, not {host}")

    def _api(self, request: Any) -> tuple[int, dict[str, Any]]:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("bearer", "dpop") or not token:
            return 401, {"detail": "Not authenticated"}
        try:
            claims = self.verifier.verify(
                token,
                dpop_proof=request.headers.get("dpop") if scheme.lower() == "dpop" else None,
                method=request.method,
                url=str(request.url),
            )
        except VerificationError as exc:
            return 401, {"detail": exc.reason}
        return 200, {"client": claims.client_id, "path": request.url.path}


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    world = World()
    routed = either_transport(world.respond)
    stacks = [httpx]
    try:
        import httpx2

        stacks.append(httpx2)
    except ImportError:
        pass
    for stack in stacks:
        # Every client a sample (or the package) creates without a transport of its own.
        monkeypatch.setattr(
            stack.HTTPTransport, "handle_request", lambda self, req: routed.handle_request(req)
        )
        monkeypatch.setattr(
            stack.AsyncHTTPTransport,
            "handle_async_request",
            lambda self, req: routed.handle_async_request(req),
        )
    return world


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    server = request.getfixturevalue("redis_server")
    monkeypatch.setenv("M2M_REDIS_URL", server.url)
    return str(server.url)


# --- running a page ---------------------------------------------------------------------------


def run_block(sample: Sample, namespace: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    code = compile(sample.source, sample.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # our own documentation's samples
    if inspect.iscoroutine(result):
        loop.run_until_complete(result)


def run_pytest_block(sample: Sample, tmp_path: Path) -> None:
    test_file = tmp_path / (sample.file_name or f"test_sample_{sample.line}.py")
    test_file.write_text(sample.source, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    result = subprocess.run(
        [*PYTEST, test_file.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"{sample.where}:\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout, result.stdout


def _needs_redis(page: Path) -> bool:
    return any("M2M_REDIS_URL" in s.source for s in samples(page))


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if samples(p)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_pages_python_samples_run(
    page: Path,
    world: World,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if any(re.search(r"^import .*\bhttpx2\b", s.source, re.M) for s in samples(page)):
        pytest.importorskip("httpx2", reason="httpx2 installs on Python 3.11+ only")
    # ClientCredentials.from_env() in a sample reads the client the world registered.
    for name in os.environ:
        if name.startswith(("M2M_", "AUTH0_")) and name != "M2M_TEST_STACK":
            monkeypatch.delenv(name)
    monkeypatch.setenv("M2M_ISSUER", ISSUER_URL)
    monkeypatch.setenv("M2M_CLIENT_ID", "worker")
    monkeypatch.setenv("M2M_CLIENT_SECRET", "s3cret")
    monkeypatch.setenv("M2M_AUDIENCE", AUDIENCE)
    if _needs_redis(page):
        request.getfixturevalue("redis_url")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("M2M_CACHE_KEY", "a-cache-key-of-32-bytes-or-more-for-the-samples")
    namespace: dict[str, Any] = {"__name__": "__doc_sample__"}
    loop = asyncio.new_event_loop()
    try:
        for sample in samples(page):
            if sample.file_name and not sample.is_pytest_file:
                # A module a later test file imports (``from app import create_app``).
                (tmp_path / sample.file_name).write_text(sample.source, encoding="utf-8")
            if sample.is_pytest_file:
                run_pytest_block(sample, tmp_path)
                continue
            try:
                run_block(sample, namespace, loop)
            except Exception as exc:
                raise AssertionError(f"the sample at {sample.where} failed: {exc!r}") from exc
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    # The samples that call the API got answers, not refusals.
    refused = [call for call in world.api_calls if call[1] != 200]
    assert not refused, refused
