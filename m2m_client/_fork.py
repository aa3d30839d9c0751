"""The one fork registry: what the package must redo in a forked child.

Processes fork (gunicorn ``--preload``, multiprocessing, Celery prefork). A child inherits locks
that another thread held at ``fork()``, references to background threads that do not exist in it,
and sockets its parent goes on using. Every module or object holding such state registers here,
and a single ``os.register_at_fork`` hook resets them all: module hooks first (in registration
order), then live objects. A hook that raises does not keep the others from running.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Protocol, TypeVar

__all__ = ["ForkAware", "at_fork", "track"]

logger = logging.getLogger("m2m_client")


class ForkAware(Protocol):
    """An object with per-process state to rebuild in a forked child."""

    def _after_fork(self) -> None: ...


HookT = TypeVar("HookT", bound=Callable[[], None])

_hooks: list[Callable[[], None]] = []
_objects: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def at_fork(hook: HookT) -> HookT:
    """Run ``hook()`` in every forked child (usable as a decorator on a module-level function)."""
    _hooks.append(hook)
    return hook


def track(obj: ForkAware) -> None:
    """Call ``obj._after_fork()`` in every forked child for as long as ``obj`` lives."""
    _objects.add(obj)


def _after_fork_in_child() -> None:
    for hook in list(_hooks):
        _run(hook)
    for obj in list(_objects):
        _run(obj._after_fork)


def _run(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:  # one broken reset must not leave the others' locks held in the child
        logger.warning("m2m_client: a fork reset failed in the child process", exc_info=True)


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
