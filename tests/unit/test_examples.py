"""The examples a user copies from keep working: each runs as a user would run it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from m2m_client.testing import LocalIssuer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
AUDIENCE = "https://api.example.com"


def _run_example(name: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "AUTH0_"))}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("name", ["async_worker.py", "sync_worker.py"])
def test_worker_example_runs_against_its_own_local_issuer_and_exits_zero(name: str) -> None:
    result = _run_example(name)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "token requests made: 1" in result.stdout
    assert "statuses [200]" in result.stdout
    assert "Traceback" not in result.stderr


def _load_fastapi_example(monkeypatch: pytest.MonkeyPatch, issuer: LocalIssuer) -> ModuleType:
    monkeypatch.setenv("M2M_ISSUER", issuer.url)
    monkeypatch.setenv("M2M_AUDIENCE", AUDIENCE)
    spec = importlib.util.spec_from_file_location(
        "fastapi_service", EXAMPLES / "fastapi_service.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fastapi_example_serves_the_guides_routes_with_401_403_and_200() -> None:
    from fastapi.testclient import TestClient

    issuer = LocalIssuer()
    with issuer, pytest.MonkeyPatch.context() as monkeypatch:
        example = _load_fastapi_example(monkeypatch, issuer)
        reader = issuer.mint(
            sub="reports@clients",
            audience=AUDIENCE,
            permissions=["read:dashboard"],
            roles=["reader"],
            organization="acme",
        )
        admin = issuer.mint(sub="ops@clients", audience=AUDIENCE, roles=["admin"])
        with TestClient(example.app) as client:
            assert client.get("/").status_code == 200
            assert client.get("/protected").status_code == 401
            bearer = {"Authorization": f"Bearer {reader}"}
            assert client.get("/protected", headers=bearer).json()["subject"] == "reports@clients"
            assert client.get("/dashboard", headers=bearer).status_code == 200
            assert client.get("/admin", headers=bearer).status_code == 403
            admin_bearer = {"Authorization": f"Bearer {admin}"}
            assert client.get("/admin", headers=admin_bearer).status_code == 200
            profile = client.get("/profile", headers=bearer).json()
            assert profile["roles"] == ["reader"]
            assert profile["permissions"] == ["read:dashboard"]


def test_fastapi_example_without_configuration_exits_with_a_message_not_a_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "AUTH0_"))}
    result = subprocess.run(
        [sys.executable, "-c", "import runpy; runpy.run_path('fastapi_service.py')"],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode != 0
    assert "set M2M_ISSUER" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_readme_recipe_issuer_service_worker_runs_end_to_end() -> None:
    # README, "From the demo to your own system", steps 1-3 as real processes on free ports.
    import signal
    import socket
    import time

    import httpx

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    root = Path(__file__).resolve().parents[2]
    issuer_port, api_port = free_port(), free_port()
    issuer_url = f"http://127.0.0.1:{issuer_port}/"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "AUTH0_"))}
    command = [sys.executable, "-m", "m2m_client", "issuer", "--port", str(issuer_port)]
    command += ["--client", "worker:dev-secret-change-me", "--roles", "admin"]
    command += [
        "--permissions",
        "read:data,read:dashboard",
        "--audience",
        "https://api.example.com",
    ]
    issuer = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    api_env = {**base_env, "M2M_ISSUER": issuer_url, "M2M_AUDIENCE": "https://api.example.com"}
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_service:app", "--port", str(api_port)],
        cwd=root,
        env=api_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(issuer_url + ".well-known/jwks.json", timeout=1)
                httpx.get(f"http://127.0.0.1:{api_port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        worker_env = {
            **api_env,
            "M2M_CLIENT_ID": "worker",
            "M2M_CLIENT_SECRET": "dev-secret-change-me",
            "M2M_API_URL": f"http://127.0.0.1:{api_port}/dashboard",
        }
        worker = subprocess.run(
            [sys.executable, "examples/async_worker.py"],
            cwd=root,
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr
        assert "200" in worker.stdout
    finally:
        for process in (api, issuer):
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=15)
    assert issuer.returncode == 0


def _load_example(monkeypatch: pytest.MonkeyPatch, issuer: LocalIssuer, name: str) -> ModuleType:
    monkeypatch.setenv("M2M_ISSUER", issuer.url)
    monkeypatch.setenv("M2M_AUDIENCE", AUDIENCE)
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _guide_requests(issuer: LocalIssuer) -> list[tuple[str, dict[str, str]]]:
    """The FastAPI example's checks, as requests, for the same routes on another framework."""
    reader = issuer.mint(
        sub="reports@clients", audience=AUDIENCE, permissions=["read:dashboard"], roles=["reader"]
    )
    admin = issuer.mint(sub="ops@clients", audience=AUDIENCE, roles=["admin"])
    bearer = {"Authorization": f"Bearer {reader}"}
    return [
        ("/", {}),
        ("/protected", {}),
        ("/protected", bearer),
        ("/dashboard", bearer),
        ("/admin", bearer),
        ("/admin", {"Authorization": f"Bearer {admin}"}),
        ("/profile", bearer),
        ("/.well-known/oauth-protected-resource", {}),
    ]


def _check_guide_answers(answers: list[tuple[int, Any, Any]], issuer: LocalIssuer) -> None:
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 401, 200, 200, 403, 200, 200, 200]
    assert (
        'resource_metadata="https://api.example.com/.well-known/oauth-protected-resource"'
        in (answers[1][1]["www-authenticate"])
    )
    assert answers[2][2]["subject"] == "reports@clients"
    assert answers[6][2]["roles"] == ["reader"]
    assert answers[6][2]["permissions"] == ["read:dashboard"]
    assert answers[7][2]["resource"] == AUDIENCE
    assert answers[7][2]["authorization_servers"] == [issuer.url]


def test_starlette_example_serves_the_guides_routes_like_the_fastapi_one() -> None:
    from starlette.testclient import TestClient

    issuer = LocalIssuer(roles_claim=f"{AUDIENCE}/roles")
    with issuer, pytest.MonkeyPatch.context() as monkeypatch:
        example = _load_example(monkeypatch, issuer, "starlette_service")
        with TestClient(example.app) as client:
            answers = []
            for path, headers in _guide_requests(issuer):
                answer = client.get(path, headers=headers)
                answers.append((answer.status_code, answer.headers, answer.json()))
            _check_guide_answers(answers, issuer)


def test_flask_example_serves_the_guides_routes_like_the_fastapi_one() -> None:
    issuer = LocalIssuer(roles_claim=f"{AUDIENCE}/roles")
    with issuer, pytest.MonkeyPatch.context() as monkeypatch:
        example = _load_example(monkeypatch, issuer, "flask_service")
        client = example.app.test_client()
        answers = []
        for path, headers in _guide_requests(issuer):
            answer = client.get(path, headers=headers)
            lowered = {k.lower(): v for k, v in answer.headers.items()}
            answers.append((answer.status_code, lowered, answer.get_json()))
        _check_guide_answers(answers, issuer)


_DJANGO_CLIENT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import django_service  # configures Django, as gunicorn examples.django_service would
from django.test import Client
client = Client()
out = []
for path, headers in json.loads(sys.stdin.read()):
    answer = client.get(path, headers=headers)
    out.append([answer.status_code, {k.lower(): v for k, v in answer.items()}, answer.json()])
print(json.dumps(out))
"""


def test_django_example_serves_the_guides_routes_like_the_fastapi_one() -> None:
    # Its own process: the example configures Django's (process-global) settings.
    import json

    issuer = LocalIssuer(roles_claim=f"{AUDIENCE}/roles")
    with issuer:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "AUTH0_"))}
        env.update(M2M_ISSUER=issuer.url, M2M_AUDIENCE=AUDIENCE)
        result = subprocess.run(
            [sys.executable, "-c", _DJANGO_CLIENT, str(EXAMPLES)],
            input=json.dumps(_guide_requests(issuer)),
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        _check_guide_answers([tuple(a) for a in json.loads(result.stdout)], issuer)
