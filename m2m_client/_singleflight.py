"""Single flight: one token request per cache key at a time; every other caller waits on it.

The one in-process single flight of the package: the token clients (``_client``), the shared
caches used directly (``cache._redis``) and the JWKS fetch all wait through it.

A :class:`Flight` is the request in progress: the owner runs it and lands it (token or
error), which wakes every waiter. Waiters never wait without a deadline (one rule,
:meth:`Flight.wait_seconds`): each flight carries the time by which its owner must have
landed it (its retry budget), and a waiter gives up a moment after that. Each waiter raises
its own copy of a landed error (one rule, :func:`clone_error`). The table is reset in a forked
child, whose copy of a flight would never land (the thread running it was not copied).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Generic, TypeVar

import anyio

from ._loops import LoopEvent
from ._token import AccessToken
from .errors import M2MError, TokenEndpointError, TokenEndpointUnavailable, TokenError

__all__ = [
    "WAIT_GRACE",
    "Flight",
    "Interrupted",
    "SingleFlight",
    "clone_error",
    "wait_for",
    "wait_for_async",
]

WAIT_GRACE = 1.0
"""How long past a flight's deadline a waiter still waits (the owner's last landing step)."""

EventT = TypeVar("EventT", threading.Event, anyio.Event, LoopEvent)


class Interrupted(TokenError):
    """The flight's owner was cancelled (or interrupted) before it landed."""


class Flight(Generic[EventT]):
    """One token request in progress; ``deadline`` is on :func:`time.monotonic`."""

    __slots__ = ("deadline", "done", "error", "shared", "token")

    def __init__(self, done: EventT, deadline: float) -> None:
        self.done: EventT = done
        self.deadline = deadline
        self.token: AccessToken | None = None
        self.error: BaseException | None = None
        self.shared = False  # the token came from the shared cache level (telemetry)

    def wait_seconds(self) -> float:
        """How long a waiter may still wait for this flight to land."""
        return max(self.deadline - time.monotonic(), 0.0) + WAIT_GRACE

    def outcome(self) -> AccessToken:
        """The landed token, or a copy of the landed error (raised)."""
        if self.token is not None:
            return self.token
        if self.error is None:
            raise TokenEndpointUnavailable(
                "gave up waiting for the token request in progress (it passed its deadline)"
            )
        raise clone_error(self.error)

    def joined(self) -> AccessToken | None:
        """For a waiter that can go on alone: the landed token, a copy of the landed error
        (raised), or None when the owner was interrupted or did not land in time."""
        if self.token is not None:
            return self.token
        if self.error is None or isinstance(self.error, Interrupted):
            return None
        raise clone_error(self.error)


def wait_for(flight: Flight[threading.Event]) -> None:
    """Wait (blocking) until ``flight`` lands or its deadline passes."""
    flight.done.wait(flight.wait_seconds())


async def wait_for_async(flight: Flight[anyio.Event] | Flight[LoopEvent]) -> None:
    """Wait until ``flight`` lands or its deadline passes (cancel from outside to stop)."""
    with anyio.move_on_after(flight.wait_seconds()):
        await flight.done.wait()


def _nothing(token: AccessToken | None, error: BaseException | None) -> None:
    """No bookkeeping (a flight whose owner records nothing)."""


class SingleFlight(Generic[EventT]):
    """The flights in progress, by cache key."""

    __slots__ = ("_flights", "_new_event")

    def __init__(self, new_event: Callable[[], EventT]) -> None:
        self._new_event: Callable[[], EventT] = new_event
        self._flights: dict[Hashable, Flight[EventT]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: Hashable) -> Flight[EventT] | None:
        return self._flights.get(key)

    def start(self, key: Hashable, deadline: float) -> Flight[EventT]:
        flight = Flight(self._new_event(), deadline)
        self._flights[key] = flight
        return flight

    def join(self, key: Hashable, deadline: float) -> tuple[Flight[EventT], bool]:
        """The flight in progress for ``key`` and ``False`` (wait for it), or a new flight
        this caller owns and ``True``. Atomic under the caller's lock (or without an await)."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight, False
        return self.start(key, deadline), True

    def land(
        self,
        key: Hashable,
        flight: Flight[EventT],
        token: AccessToken | None,
        error: BaseException | None,
    ) -> None:
        """Record the outcome and wake every waiter (``Event.set`` is sync for both kinds)."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.token, flight.error = token, error
        flight.done.set()

    @contextmanager
    def landing(
        self,
        key: Hashable,
        flight: Flight[EventT],
        record: Callable[[AccessToken | None, BaseException | None], None] = _nothing,
        lock: AbstractContextManager[Any] | None = None,
        *,
        propagate: bool = False,
    ) -> Iterator[Flight[EventT]]:
        """Run a flight's fetch inside; whatever happens, land it and wake every waiter.

        The owner sets ``flight.token``; an ``Exception`` becomes the flight's error (each
        waiter raises a copy; the owner too, from :meth:`Flight.outcome`, or, with
        ``propagate``, the original propagates to the owner); cancellation lands it as
        :class:`Interrupted`, then propagates. ``record`` (the policy's bookkeeping, under
        ``lock``) may fail: the waiters are woken all the same.
        """
        error: BaseException | None = Interrupted("token request interrupted")
        try:
            yield flight
            error = None
        except Exception as exc:
            error = exc
            if propagate:
                raise
        finally:
            token = flight.token if error is None else None
            try:
                with lock if lock is not None else nullcontext():
                    record(token, error)
            finally:
                self.land(key, flight, token, error)

    def reset(self) -> None:
        """Forget every flight (in a forked child: their owners do not exist there)."""
        self._flights = {}


def clone_error(error: BaseException, *, with_cause: bool = True) -> M2MError:
    """A fresh copy of a flight's error for one waiter, without the owner's traceback.

    Each waiter raises its own instance: one shared exception object raised from a thousand
    tasks would tangle their tracebacks. ``with_cause=False`` (the negative cache) keeps no
    reference to anything that holds frames.
    """
    clone = _copy(error, with_cause)
    if with_cause:
        clone.__cause__ = error.__cause__
    return clone


def _copy(error: BaseException, with_cause: bool) -> M2MError:
    if isinstance(error, TokenEndpointError):
        return TokenEndpointError(
            error.error,
            error.error_description,
            status_code=error.status_code,
            error_uri=error.error_uri,
        )
    if isinstance(error, TokenEndpointUnavailable):
        cause = error.last_cause if with_cause else None
        return TokenEndpointUnavailable(
            str(error), attempts=error.attempts, last_cause=cause, retry_after=error.retry_after
        )
    if isinstance(error, Interrupted):
        return Interrupted(str(error))
    if isinstance(error, M2MError):
        try:
            return type(error)(str(error))
        except TypeError:  # a subclass with another constructor
            return TokenError(str(error))
    return TokenError(f"token request failed unexpectedly ({type(error).__name__})")
