"""Shared test configuration.

Async tests use anyio's pytest plugin and run on every backend (asyncio and trio):
mark them with ``@pytest.mark.anyio`` (or module-level ``pytestmark``).
"""

from __future__ import annotations

import os

import pytest

from tests._unraisable import pytest_configure  # noqa: F401 (a hook: see the module)

IN_CI = bool(os.environ.get("CI"))

# The install commands the skip/fail messages point at (docs/testing.md, "The servers this
# project's tests start"; .ci/run installs the same packages).
NODE_INSTALL = (
    "install Node.js 20+ (Debian: `apt-get install nodejs npm`), then run "
    "`npm ci --prefix tests/interop/idp --no-audit --no-fund`"
)
REDIS_INSTALL = "install Debian's redis-server package: `apt-get install redis-server`"


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
    pytest.skip(f"{what_is_missing} (docs/testing.md: the servers this project's tests start)")
