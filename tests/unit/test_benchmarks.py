"""The documented benchmark commands at least start and finish: each runs in a tiny mode.

The full runs take minutes; these take seconds and catch a benchmark that no longer runs
(a moved private import, a peer library that changed its HTTP stack under it).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bench_httpx2_quick_measures_both_stacks() -> None:
    result = _run(str(BENCHMARKS / "bench_httpx2.py"), "--quick")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BearerAuth httpx2" in result.stdout
    assert "BearerAuth httpx" in result.stdout


def test_bench_verify_small_run_reports_every_candidate() -> None:
    # ES256 and EdDSA: RS256 adds the python-jose peer, which only the bench extra installs.
    args = ("--tokens", "20", "--repeats", "1", "--algorithms", "ES256,EdDSA")
    result = _run(str(BENCHMARKS / "bench_verify.py"), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("m2m_client, new token each time") == 2
    assert result.stdout.count("raw signature check") >= 2


PEERS = ("authlib", "httpx_auth")


@pytest.mark.skipif(
    any(importlib.util.find_spec(peer) is None for peer in PEERS),
    reason="bench_client.py compares against authlib and httpx-auth: pip install -e '.[bench]'",
)
def test_bench_client_quick_runs_every_peer_on_its_own_stack() -> None:
    # authlib builds its httpx clients on httpx2 when that is installed (the dev install):
    # given an httpx transport it failed inside httpx2 with an AssertionError.
    result = _run(str(BENCHMARKS / "bench_client.py"), "--quick")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for name in ("m2m_client", "authlib", "httpx-auth"):
        assert name in result.stdout
    # the crowds: one token request for m2m_client, cold and at expiry
    crowd_rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    ours = [row for row in crowd_rows if row[:1] == ["m2m_client"] and row[-1].isdigit()]
    assert ours == [["m2m_client", "1", "1"]] * 2, result.stdout
