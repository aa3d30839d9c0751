"""Sync deadlines in a forked child (gunicorn ``--preload``, multiprocessing with fork).

The sync drivers cut every attempt at its deadline from one shared daemon thread
(``m2m-client-deadlines`` in ``m2m_client._http``). A forked child has none of the parent's
threads, and inherits that thread's lock in whatever state it was at the fork. Each test runs
a sync TokenClient made in the parent inside a forked child against a server that drips its
answer a byte at a time (far slower than the deadline), and checks the child gives up at its
deadline with our typed error. The parent waits for the child's report with a timeout and
kills it on expiry, so a regression fails here instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest

from m2m_client import ClientCredentials, RetryPolicy, TokenClient, TokenEndpointUnavailable, _http

from ._faults import Fault, FaultServer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")

SECRET = "fork-suite-secret-51c"
TIMEOUT = 0.5  # the child's per-attempt deadline
DRIP = 0.2  # a byte every 0.2 s: the ~130-byte answer takes ~26 s without a deadline
# Generous for a loaded CI machine, yet far below the drip's ~26 s: the deadline did it.
GAVE_UP_WITHIN = TIMEOUT + 2.5
CHILD_HUNG_AFTER = 15.0  # the parent's own bound on waiting for the child
ONE_ATTEMPT = RetryPolicy(max_attempts=1, jitter=False, max_total_seconds=5)
GOOD = {"access_token": "tok-fork", "token_type": "Bearer", "expires_in": 300}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        srv.faults["/warm"] = Fault.json(GOOD)
        srv.faults["/token"] = Fault(
            mode="drip", body=json.dumps(GOOD).encode(), headers={}, delay=DRIP
        )
        yield srv


def _client(url: str, timeout: float = TIMEOUT) -> TokenClient:
    creds = ClientCredentials(token_url=url, client_id="w", client_secret=SECRET, timeout=timeout)
    return TokenClient(creds, retry=ONE_ATTEMPT)


def _deadline_threads() -> int:
    return [t.name for t in threading.enumerate()].count("m2m-client-deadlines")


def _in_child(work: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run ``work`` in a forked child; its report, or ``{"hung": ...}`` after the bound."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock the child:
        # that is the very case under test (gunicorn --preload forks one, too).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            os.close(read_end)
            try:
                report = work()
            except BaseException as exc:  # reported to the parent, which fails the test
                report = {"unexpected": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], CHILD_HUNG_AFTER)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return {"hung": f"no report from the child within {CHILD_HUNG_AFTER} s"}
        return dict(json.loads(os.read(read_end, 65536).decode()))
    finally:
        os.waitpid(pid, 0)
        os.close(read_end)


def _fetch_in_child(tokens: TokenClient) -> Callable[[], dict[str, object]]:
    def work() -> dict[str, object]:
        threads_at_start = _deadline_threads()
        started = time.monotonic()
        try:
            tokens.get_token()
            outcome, message = "a token", ""
        except TokenEndpointUnavailable as exc:
            outcome, message = type(exc).__name__, str(exc)
        return {
            "outcome": outcome,
            "message": message,
            "took": time.monotonic() - started,
            "threads_at_start": threads_at_start,
            "threads_after": _deadline_threads(),
        }

    return work


def _check(report: dict[str, object]) -> None:
    assert "hung" not in report, report
    assert "unexpected" not in report, report
    assert report["outcome"] == "TokenEndpointUnavailable", report
    assert "deadline" in str(report["message"]), report
    assert SECRET not in str(report["message"])
    took = report["took"]
    assert isinstance(took, float)
    assert TIMEOUT * 0.9 <= took < GAVE_UP_WITHIN, report
    # The parent's deadline thread is not in the child; the child started its own.
    assert report["threads_at_start"] == 0, report
    assert report["threads_after"] == 1, report


def test_a_forked_child_cuts_a_dripping_server_at_its_deadline(server: FaultServer) -> None:
    # The warm-up only starts the parent's deadline thread; a process's first request also pays
    # for imports, so it gets a deadline a loaded machine cannot miss.
    with _client(f"{server.url}/warm", 10) as warm, _client(f"{server.url}/token") as tokens:
        assert warm.get_token().access_token == "tok-fork"
        assert _deadline_threads() == 1  # the parent's thread exists at the fork
        report = _in_child(_fetch_in_child(tokens))
        _check(report)
        assert server.count("/token") == 1  # the child's one attempt reached the server
        # The fork handler replaced the child's deadline state only: the parent's thread
        # still cuts the parent's own attempts.
        started = time.monotonic()
        with pytest.raises(TokenEndpointUnavailable, match="deadline"):
            tokens.get_token()
        assert time.monotonic() - started < GAVE_UP_WITHIN
        assert _deadline_threads() == 1


def test_a_child_forked_while_the_deadline_lock_is_held_still_cuts_the_drip(
    server: FaultServer,
) -> None:
    # The deadline thread holds its lock between waits, and other threads hold it while they
    # schedule an attempt; a fork at that moment gives the child a lock nobody will release.
    # Held here by a parent thread for the whole fork, so the child gets it locked for sure.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _http._DEADLINES._cond:
            held.set()
            release.wait(CHILD_HUNG_AFTER + 5)

    # The warm-up only starts the parent's deadline thread; a process's first request also pays
    # for imports, so it gets a deadline a loaded machine cannot miss.
    with _client(f"{server.url}/warm", 10) as warm, _client(f"{server.url}/token") as tokens:
        warm.get_token()
        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        try:
            assert held.wait(5)
            report = _in_child(_fetch_in_child(tokens))
        finally:
            release.set()
            holder.join(5)
    _check(report)
    assert not holder.is_alive()
