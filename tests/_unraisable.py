"""Unraisable exceptions fail the test they happen in, never the whole pytest session.

A finalizer's ResourceWarning (an unclosed socket collected) is "unraisable": pytest's
unraisableexception plugin collects it and, with ``filterwarnings = error``, fails the test in
whose phase it was collected. Its traceback holds the frame that was running when the object
was collected, at that moment's instruction; on Python 3.11+ that may be one without a line
number (the cleanup of ``except ... as name``), whose ``tb_lineno`` is ``None``. pytest's
report of the failure then computes ``tb_lineno - 1``: a TypeError inside
``pytest_runtest_makereport``, an INTERNALERROR that ends the session and loses every result.
This hook gives such entries their code's first line before pytest's own hook sees them.
Loaded by ``tests/conftest.py`` (and by ``tests/unit/test_unraisable.py``'s pytester runs).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest


def with_lines(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb``, with each entry that has no line number given its code's first line."""
    entries: list[types.TracebackType] = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    if all(entry.tb_lineno is not None for entry in entries):
        return entries[0] if entries else None
    rebuilt: types.TracebackType | None = None
    for entry in reversed(entries):
        line = entry.tb_lineno
        if line is None:
            line = entry.tb_frame.f_code.co_firstlineno
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, line)
    return rebuilt


@pytest.hookimpl(trylast=True)  # after pytest's unraisableexception plugin installed its hook
def pytest_configure(config: pytest.Config) -> None:
    collect = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        seen: set[int] = set()
        exc: BaseException | None = unraisable.exc_value
        while exc is not None and id(exc) not in seen:  # the exception and its chain
            seen.add(id(exc))
            try:
                exc.with_traceback(with_lines(exc.__traceback__))
            except Exception:  # never lose the report over this
                break
            exc = exc.__cause__ or exc.__context__
        collect(unraisable)

    sys.unraisablehook = hook
