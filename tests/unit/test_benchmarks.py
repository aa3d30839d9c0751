"""The documented benchmark commands at least start and finish: each runs in a tiny mode.

The full runs take minutes; these take seconds and catch a benchmark that no longer runs
(a moved private import, a peer library that changed its HTTP stack under it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


# bench_client.py compares against authlib and httpx-auth, which only the bench extra installs
# (httpx-auth pins an older httpx): its smoke run is `python benchmarks/bench_client.py --quick`
# after `pip install -e '.[bench]'` (docs/benchmarks.md), not a test here, where it could only skip.
