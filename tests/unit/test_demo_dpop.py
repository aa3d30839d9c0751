"""`m2m-client demo --dpop`: DPoP-bound tokens work for the worker, a stolen copy does not."""

from __future__ import annotations

import subprocess
import sys


def test_demo_dpop_shows_the_stolen_token_refused() -> None:
    demo = subprocess.run(
        [sys.executable, "-m", "m2m_client", "demo", "--dpop"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = demo.stdout
    assert demo.returncode == 0, out + demo.stderr
    assert "Traceback" not in demo.stderr
    assert "DPoP required" in out
    assert "1. worker: GET /protected" in out
    assert "-> 200" in out.split("1. worker: GET /protected")[1].splitlines()[0]
    attacks = [line for line in out.splitlines() if line[:1].isdigit() and "attacker" in line]
    assert len(attacks) == 3
    assert all("-> 401" in line for line in attacks)
    assert 'DPoP error="invalid_dpop_proof"' in out
    assert 'DPoP error="invalid_token"' in out
    assert "the stolen token is useless without the key" in out
