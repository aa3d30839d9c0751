"""Hide one HTTP stack from import: the "httpx only" and "httpx2 only" test runs.

Both stacks are installed in the dev venv; ``M2M_TEST_STACK`` makes one of them unimportable,
as if it were not installed. It must act before anything imports httpx (pytest loads plugin
entry points, among them m2m_client's own, before any conftest), so load it with ``-p``::

    M2M_TEST_STACK=httpx2-only python -m pytest -p tests._stack_guard -p no:respx tests/faults
    M2M_TEST_STACK=httpx-only  python -m pytest -p tests._stack_guard tests/faults

(respx imports httpx: it is disabled in the httpx2-only run.) Unset or ``both``: nothing hidden.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

import pytest

_HIDDEN: dict[str, tuple[str, ...]] = {
    "": (),
    "both": (),
    "httpx-only": ("httpx2", "httpcore2"),
    "httpx2-only": ("httpx", "httpcore", "respx"),
}

MODE = os.environ.get("M2M_TEST_STACK", "").strip().lower()


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, hidden: tuple[str, ...]) -> None:
        self.hidden = frozenset(hidden)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.hidden:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (hidden: M2M_TEST_STACK={MODE})", name=fullname
            )
        return None


def _install() -> None:
    if MODE not in _HIDDEN:
        raise pytest.UsageError(
            f"M2M_TEST_STACK={MODE!r}: use one of httpx-only, httpx2-only, both"
        )
    hidden = _HIDDEN[MODE]
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in hidden)
    if loaded:
        raise pytest.UsageError(
            f"M2M_TEST_STACK={MODE}: {', '.join(loaded[:3])} already imported; load this "
            "guard first (python -m pytest -p tests._stack_guard -p no:respx ...)"
        )
    if hidden:
        sys.meta_path.insert(0, _Hide(hidden))


_install()


def pytest_report_header() -> str:
    from m2m_client._stacks import installed

    names = ", ".join(stack.name for stack in installed()) or "none"
    return f"m2m-client HTTP stacks: {names} (M2M_TEST_STACK={MODE or 'both'})"


def hidden(name: str) -> bool:
    """Is the stack ``name`` hidden in this run (so a test needing it skips, also in CI)?"""
    return name in _HIDDEN.get(MODE, ())


def need(*names: str) -> None:
    """Skip unless each named stack is importable: hidden by this run, or (outside CI) absent.

    In CI an absent stack that this run does not hide fails: the dev install has both.
    """
    from m2m_client._stacks import installed

    from .conftest import require

    have = {stack.name for stack in installed()}
    for name in names:
        if hidden(name):
            pytest.skip(f"{name} is hidden in this run (M2M_TEST_STACK={MODE})")
        if sys.version_info < (3, 11) and name == "httpx2":
            pytest.skip("httpx2 needs Python >= 3.11")
        require(name in have, f"{name} is not installed (pip install -e '.[dev]')")
