"""The examples a user copies from keep working: each runs as a user would run it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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
