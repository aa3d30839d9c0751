"""The one fork registry runs every hook and every live object's reset in a real forked child."""

from __future__ import annotations

import os
import sys

from m2m_client import _fork


class _Holder:
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name

    def _after_fork(self) -> None:
        self.log.append(self.name)


def _in_child(check: object) -> int:
    """Fork, run ``check()`` in the child, and return the child's exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            code = 0 if check() else 3  # type: ignore[operator]
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_hooks_then_objects_run_in_the_child_and_a_failing_hook_does_not_stop_them() -> None:
    log: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    def first() -> None:
        log.append("hook")

    _fork.at_fork(broken)
    _fork.at_fork(first)
    holder = _Holder(log, "object")
    _fork.track(holder)
    try:
        assert _in_child(lambda: log == ["hook", "object"]) == 0
        assert log == []  # the parent ran nothing
    finally:
        _fork._hooks.remove(broken)
        _fork._hooks.remove(first)


def test_a_collected_object_is_not_kept_alive_by_the_registry() -> None:
    holder = _Holder([], "gone")
    _fork.track(holder)
    count = len(_fork._objects)
    del holder
    if sys.implementation.name == "cpython":
        assert len(_fork._objects) == count - 1


def test_token_clients_and_their_jitter_source_reset_through_the_one_registry() -> None:
    """The token clients hold no fork hook of their own: each live client is tracked by
    ``_fork`` (its flights dropped in the child), and the shared refresh-ahead jitter source
    is reseeded by a ``_fork`` hook (no worker of a pre-forking server draws its parent's)."""
    import random
    import time

    from m2m_client import ClientCredentials, TokenClient

    tokens = TokenClient(
        ClientCredentials(token_url="https://as.example.com/t", client_id="c", client_secret="s")
    )
    _decisions = sys.modules[type(tokens._core).__module__]  # the module of the core's state
    assert tokens in set(_fork._objects)
    assert any(hook.__module__ == _decisions.__name__ for hook in _fork._hooks)
    tokens._core.flights.start(tokens._core.default_key, time.monotonic() + 60)
    parents_next = random.Random()
    parents_next.setstate(_decisions._SHARED_RNG.getstate())
    expected = parents_next.random()  # what the child would draw without a reseed

    def child() -> bool:
        return len(tokens._core.flights) == 0 and _decisions._SHARED_RNG.random() != expected

    assert _in_child(child) == 0
    assert len(tokens._core.flights) == 1  # the parent's flight is untouched
    tokens.close()
