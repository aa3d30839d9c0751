"""`m2m-client token` with M2M_REDIS_URL: separate runs share one token through a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from m2m_client.testing import LocalIssuer
from tests.redis.conftest import AUDIENCE, CLIENT_ID, RedisServer

SECRET = "fleet-secret-" + "x" * 24
CACHE_KEY = "cli-shared-cache-key-" + "k" * 16


def _run(issuer: LocalIssuer, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M2M_", "AUTH0_"))}
    env.update(
        M2M_ISSUER=issuer.url,
        M2M_CLIENT_ID=CLIENT_ID,
        M2M_CLIENT_SECRET=SECRET,
        M2M_AUDIENCE=AUDIENCE,
        **extra,
    )
    return subprocess.run(
        [sys.executable, "-m", "m2m_client", "token"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_two_cli_runs_share_one_token_request_through_redis(
    redis_server: RedisServer, issuer: LocalIssuer
) -> None:
    first = _run(issuer, M2M_REDIS_URL=redis_server.url, M2M_CACHE_KEY=CACHE_KEY)
    second = _run(issuer, M2M_REDIS_URL=redis_server.url, M2M_CACHE_KEY=CACHE_KEY)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout  # the same token, printed as asked
    assert issuer.token_requests == 1
    assert "warning" not in first.stderr + second.stderr
    stored = redis.Redis(host="127.0.0.1", port=redis_server.port)
    values = [stored.get(k) or b"" for k in stored.scan_iter()]
    assert values, "the token was not shared"
    token = first.stdout.strip().encode()
    assert all(token not in v for v in values)  # encrypted with M2M_CACHE_KEY


def test_without_a_cache_key_the_cli_warns_that_redis_holds_the_token_in_clear(
    redis_server: RedisServer, issuer: LocalIssuer
) -> None:
    result = _run(issuer, M2M_REDIS_URL=redis_server.url)
    assert result.returncode == 0, result.stderr
    assert "unencrypted" in result.stderr
    assert result.stdout.strip() not in result.stderr


def test_a_dead_redis_costs_the_cli_nothing_but_sharing(issuer: LocalIssuer) -> None:
    result = _run(issuer, M2M_REDIS_URL="redis://127.0.0.1:1/0", M2M_CACHE_KEY=CACHE_KEY)
    assert result.returncode == 0, result.stderr
    assert issuer.token_requests == 1


def test_a_bad_redis_url_is_a_configuration_error(issuer: LocalIssuer) -> None:
    result = _run(issuer, M2M_REDIS_URL="mysql://nowhere", M2M_CACHE_KEY=CACHE_KEY)
    assert result.returncode == 2
    assert "M2M_REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
