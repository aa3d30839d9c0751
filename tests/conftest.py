"""Shared test configuration.

Async tests use anyio's pytest plugin and run on every backend (asyncio and trio):
mark them with ``@pytest.mark.anyio`` (or module-level ``pytestmark``).
"""

from __future__ import annotations

import os

import pytest

IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def require(condition: bool, what_is_missing: str) -> None:
    """Skip (outside CI) or fail (in CI) when a real server a test needs is missing.

    A skipped interop test must never count as passed in CI, so there it fails.
    """
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what_is_missing} (CI must install it: see .ci/run)", pytrace=False)
    pytest.skip(f"{what_is_missing}; install it to run this test (see README, 'Testing')")
