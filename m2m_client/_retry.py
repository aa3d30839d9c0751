"""The one retry policy for token and discovery requests, shared by the sync and async shells.

Built on tenacity: the shells run ``tenacity.Retrying`` / ``AsyncRetrying`` with the keyword
arguments from :meth:`RetryPolicy.tenacity_kwargs`; only the sleep function differs.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import tenacity

from .errors import TokenEndpointUnavailable

__all__ = ["RetryPolicy", "TransientFailure", "parse_retry_after"]


class TransientFailure(Exception):
    """A failure worth retrying: transport error, timeout, 5xx or 429. Never escapes."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, rate_limit: Any = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.rate_limit = rate_limit  # a _ratelimit.RateLimit: what the server said


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3), or ``None``.

    Accepts delta-seconds and HTTP-dates; garbage is ignored rather than trusted.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone accepts "²" and other digits
        return float(value) if len(value) < 12 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        return max(when.timestamp() - now, 0.0)
    except (TypeError, ValueError, IndexError, OverflowError):  # year 99999999 overflows
        return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient failures of the authorization server are retried.

    Exponential backoff with full jitter (``initial_backoff * 2**n``, capped at
    ``max_backoff``). A wait the server asks for (``Retry-After``, or on a 429/503 its
    rate-limit reset: see :mod:`m2m_client._ratelimit`) wins and is never shortened: when it
    is longer than ``max_retry_after`` or than what is left of ``max_total_seconds``, the
    call fails at once with :class:`TokenEndpointUnavailable` whose ``retry_after`` says
    when to ask again (asking earlier only earns another 429).
    Stops after ``max_attempts`` requests or when the next wait would pass
    ``max_total_seconds`` since the first attempt; the token clients also cut the attempt in
    progress at that deadline, so it bounds the whole call (discovery included). OAuth errors
    are never retried; an identical one is re-raised for ``negative_cache_seconds`` without
    asking the server again, so a misconfigured fleet does not hammer it.
    """

    max_attempts: int = 4
    max_total_seconds: float = 30.0
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    jitter: bool = True
    max_retry_after: float = 30.0
    negative_cache_seconds: float = 10.0

    def backoff(self) -> tenacity.wait.wait_base:
        """The tenacity wait strategy for attempts without ``Retry-After``."""
        if self.jitter:
            return tenacity.wait_random_exponential(
                multiplier=self.initial_backoff, max=self.max_backoff
            )
        return tenacity.wait_exponential(multiplier=self.initial_backoff, max=self.max_backoff)

    def tenacity_kwargs(
        self,
        *,
        clock: Callable[[], float],
        on_retry: Callable[[int, float, BaseException | None], None],
        give_up: Callable[[tenacity.RetryError], NoReturn] | None = None,
        started: float | None = None,
    ) -> dict[str, Any]:
        """Arguments for ``tenacity.Retrying``/``AsyncRetrying`` (add ``sleep=``).

        Without ``give_up`` an exhausted run raises ``tenacity.RetryError``; with it,
        ``give_up`` raises the caller's own error instead (see :meth:`exhausted`).
        ``clock`` must be monotonic; ``started`` (default: now) is when the budget began.
        """
        started = clock() if started is None else started
        backoff = self.backoff()

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                return float(max(retry_after, 0.0))  # stop() refuses one that is too long
            return float(backoff(state))

        def stop(state: tenacity.RetryCallState) -> bool:
            # Our clock, not tenacity's, so a fake one bounds total time in tests.
            if state.attempt_number >= self.max_attempts:
                return True
            if state.upcoming_sleep > self.max_retry_after:
                return True  # the server's wait, longer than we may wait: fail now
            return clock() - started + state.upcoming_sleep > self.max_total_seconds

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            on_retry(state.attempt_number, state.upcoming_sleep, exc)

        kwargs: dict[str, Any] = {
            "retry": tenacity.retry_if_exception_type(TransientFailure),
            "wait": wait,
            "stop": stop,
            "before_sleep": before_sleep,
            "reraise": False,
        }
        if give_up is not None:

            def retry_error_callback(state: tenacity.RetryCallState) -> NoReturn:
                assert state.outcome is not None
                give_up(tenacity.RetryError(state.outcome))

            kwargs["retry_error_callback"] = retry_error_callback
        return kwargs

    @staticmethod
    def exhausted(error: tenacity.RetryError, what: str) -> TokenEndpointUnavailable:
        """The error raised when every attempt failed (cause: the last failure)."""
        last = error.last_attempt
        cause = last.exception() if last.failed else None
        detail = f": {cause}" if cause is not None else ""
        retry_after = getattr(cause, "retry_after", None)
        if retry_after is not None:
            detail += f"; the server asks to wait {retry_after:g}s before the next request"
        return TokenEndpointUnavailable(
            f"{what} failed after {last.attempt_number} attempt(s){detail}",
            attempts=last.attempt_number,
            last_cause=cause,
            retry_after=retry_after,
        )
