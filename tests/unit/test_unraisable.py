"""A finalizer's warning whose traceback has no line number fails its test, not the session.

Run in a separate pytest session (pytester) with this suite's unraisable hook
(``tests/_unraisable.py``) and its ``filterwarnings = error``: the warning is reported the way
an unclosed socket collected in the cleanup of an ``except ... as name`` block is (its frame at
an instruction without a line number, ``tb_lineno`` None on Python 3.11+). Without the hook,
pytest crashed with an INTERNALERROR in ``pytest_runtest_makereport`` and reported nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HOOK = Path(__file__).parent.parent / "_unraisable.py"

LINELESS = '''
import sys
import types


def lineless_traceback():
    """A traceback entry for this frame at an instruction without a line number, if any."""
    try:
        raise ValueError
    except ValueError as exc:  # its cleanup (exc = None; del exc) has no line number on 3.11+
        del exc
    frame = sys._getframe()
    offset = next((start for start, _, line in frame.f_code.co_lines() if line is None), 0)
    return types.TracebackType(None, frame, offset, -1)


class Unraisable:
    def __init__(self, exc_value):
        self.exc_type, self.exc_value = type(exc_value), exc_value
        self.exc_traceback, self.err_msg, self.object = exc_value.__traceback__, None, "a socket"


def test_a_socket_collected_where_there_is_no_line():
    warning = ResourceWarning("unclosed <socket.socket fd=13>")
    sys.unraisablehook(Unraisable(warning.with_traceback(lineless_traceback())))


def test_the_next_test_still_runs():
    pass
'''


def test_an_unraisable_warning_without_a_line_fails_its_test_only(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n")
    pytester.makeconftest(HOOK.read_text())
    pytester.makepyfile(test_lineless=LINELESS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*unclosed <socket.socket fd=13>*"])
    result.stdout.fnmatch_lines(["FAILED *test_a_socket_collected_where_there_is_no_line*"])
