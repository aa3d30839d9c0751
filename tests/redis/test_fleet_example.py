"""examples/fleet_worker.py runs as a user would run it: 4 processes, one token request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.redis.conftest import RedisServer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet_worker.py"


def test_fleet_example_makes_one_token_request_for_four_processes(
    redis_server: RedisServer,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "AUTH0_"))}
    env["M2M_REDIS_URL"] = redis_server.url
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "token requests made by the fleet: 1" in result.stdout, result.stdout
    assert result.stdout.count("API statuses [200]") == 4
    assert "Traceback" not in result.stderr
