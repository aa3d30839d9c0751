"""`m2m-client demo`: the README's first command, run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    # A proxy in the environment (nothing listens there) must not matter: the demo's calls
    # are plain http on loopback, which never goes through a proxy (issue 19 item 4).
    proxy = "http://127.0.0.1:9"
    return subprocess.run(
        [sys.executable, "-m", "m2m_client", "demo"],
        env={**os.environ, "HTTP_PROXY": proxy, "ALL_PROXY": proxy, "NO_PROXY": ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_exits_0_without_errors(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Traceback" not in demo.stderr


def test_demo_shows_one_token_fetched_reused_and_refreshed(
    demo: subprocess.CompletedProcess[str],
) -> None:
    out = demo.stdout
    assert "fetched from the issuer (token request #1)" in out
    assert "reused from the cache (no token request)" in out
    assert "refreshed from the issuer (token request #2)" in out
    assert "7 calls, 2 token requests (issuer counted 2), 1 refused with 403" in out


def test_demo_calls_every_route_and_admin_is_refused(
    demo: subprocess.CompletedProcess[str],
) -> None:
    statuses = dict(re.findall(r"GET (/\w*)\s+-> (\d{3})", demo.stdout))
    assert statuses == {
        "/": "200",
        "/protected": "200",
        "/dashboard": "200",
        "/admin": "403",
        "/profile": "200",
    }


def test_demo_never_prints_a_token_and_cleans_up(demo: subprocess.CompletedProcess[str]) -> None:
    assert "eyJ" not in demo.stdout + demo.stderr  # no JWT (header or payload) anywhere
    assert re.search(r"token [0-9a-f]{12} ", demo.stdout)  # fingerprints instead
    assert "servers stopped, ports released" in demo.stdout
    assert demo.stdout.rstrip().endswith("(README: 'From the demo to your own system')")
