"""Event loops an :class:`AsyncTokenClient` may be used from: which one is running, and an
event that a flight's owner in one loop (thread) sets and waiters in any other loop see.

One ``AsyncTokenClient`` may serve several event loops: two threads each running their own
(asyncio and asyncio, or asyncio and trio), or ``asyncio.run()`` called twice and then
``trio.run()``. asyncio and trio primitives belong to the loop that uses them first, so what
crosses loops here is a ``threading.Event``; each loop's waiters are woken in their own loop.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from typing import Any

import anyio
import anyio.to_thread

__all__ = ["LoopEvent", "LoopRef", "current_loop"]

# A waiter in another loop blocks a worker thread on the threading.Event for at most this
# long at a time: a cancelled waiter's thread ends within it.
_FOREIGN_WAIT_SLICE = 0.5


def current_loop() -> object | None:
    """The running event loop: an asyncio loop or a trio token; ``None`` outside one."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token: object = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return token
    return None


class LoopRef:
    """A weak reference to an event loop (no loop kept alive by a client that outlived it)."""

    __slots__ = ("_ref",)

    def __init__(self, loop: object | None) -> None:
        self._ref: Any = None if loop is None else weakref.ref(loop)

    def get(self) -> object | None:
        return None if self._ref is None else self._ref()

    def is_current(self) -> bool:
        loop = self.get()
        return loop is not None and loop is current_loop()


def _wake(loop: object | None, callback: Any) -> None:
    """Run ``callback`` in ``loop``'s own thread, soon; nothing if that loop has ended."""
    try:
        if isinstance(loop, asyncio.AbstractEventLoop):
            loop.call_soon_threadsafe(callback)
        elif loop is not None:
            loop.run_sync_soon(callback)  # type: ignore[attr-defined]  # a trio token
    except Exception:  # noqa: S110 - the loop is closed (RuntimeError, trio.RunFinishedError):
        pass  # nobody is left waiting in it


class LoopEvent:
    """An event set from any thread and awaited from any event loop (asyncio or trio).

    Waiters in the loop that created it wait on an ``anyio.Event``; waiters in another loop
    wait on the ``threading.Event`` in a worker thread, so :meth:`set` wakes them all at once.
    """

    __slots__ = ("_flag", "_local", "_loop")

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._loop = LoopRef(current_loop())
        self._local = anyio.Event()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def set(self) -> None:
        """Set it (sync, from any thread); waiters in every loop wake."""
        self._flag.set()
        if self._loop.is_current():
            self._local.set()
        else:
            _wake(self._loop.get(), self._local.set)

    async def wait(self) -> None:
        """Wait until it is set (cancel it from outside to stop waiting)."""
        if self._flag.is_set():
            return
        if self._loop.is_current():
            await self._local.wait()
            return
        while not self._flag.is_set():
            await anyio.to_thread.run_sync(
                self._flag.wait, _FOREIGN_WAIT_SLICE, abandon_on_cancel=True
            )
