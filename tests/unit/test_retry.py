"""The retry policy: backoff, Retry-After, bounds; run through tenacity without sleeping."""

from __future__ import annotations

import email.utils
import random
from typing import NoReturn

import pytest
import tenacity

from m2m_client import RefreshPolicy, RetryPolicy, TokenEndpointUnavailable
from m2m_client._oauth import interpret_token_response
from m2m_client._retry import TransientFailure, parse_retry_after

NOW = 1_700_000_000.0


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("7", NOW) == 7.0
    date = email.utils.formatdate(NOW + 42, usegmt=True)
    assert parse_retry_after(date, NOW) == pytest.approx(42.0)
    assert parse_retry_after(email.utils.formatdate(NOW - 100, usegmt=True), NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "soon",
        "-5",
        "1.5e9x",
        "\u00b2",  # a superscript two: str.isdigit() says yes, float() says ValueError
        "\u0663",  # an Arabic-Indic three
        "9" * 400,
        "Fri, 31 Dec 99999999 23:59:59 GMT",  # OverflowError before the fix
        "Fri, 31 Dec 9999 23:59:59",  # no zone
    ],
)
def test_unparseable_retry_after_is_ignored(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


class FakeTime:
    def __init__(self) -> None:
        self.now = NOW
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def run(policy: RetryPolicy, failures: list[BaseException]) -> tuple[object, FakeTime, list[int]]:
    fake = FakeTime()
    retries: list[int] = []
    remaining = list(failures)

    def attempt() -> str:
        if remaining:
            raise remaining.pop(0)
        return "ok"

    kwargs = policy.tenacity_kwargs(
        clock=fake.clock, on_retry=lambda n, delay, exc: retries.append(n)
    )
    try:
        result: object = tenacity.Retrying(sleep=fake.sleep, **kwargs)(attempt)
    except tenacity.RetryError as exc:
        result = RetryPolicy.exhausted(exc, "token request")
    return result, fake, retries


def test_transient_failures_are_retried_with_capped_exponential_backoff() -> None:
    policy = RetryPolicy(max_attempts=5, jitter=False, initial_backoff=1, max_backoff=3)
    result, fake, retries = run(policy, [TransientFailure("503")] * 4)
    assert result == "ok"
    assert fake.sleeps == [1, 2, 3, 3]
    assert retries == [1, 2, 3, 4]


def test_full_jitter_waits_stay_within_the_exponential_bound() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff=1, max_backoff=4)
    _, fake, _ = run(policy, [TransientFailure("503")] * 4)
    assert all(0 <= s <= b for s, b in zip(fake.sleeps, [1, 2, 4, 4], strict=True))


def test_retry_after_from_the_server_wins_and_one_beyond_the_cap_fails_at_once() -> None:
    # Before: a 600 s Retry-After was cut to max_retry_after (5 s) and the request repeated
    # long before the server allowed it (another 429). Now the wait is never shortened: too
    # long a wait fails at once, saying when to ask again.
    policy = RetryPolicy(max_attempts=3, max_retry_after=5, max_total_seconds=100)
    result, fake, _ = run(
        policy, [TransientFailure("429", retry_after=2), TransientFailure("429", retry_after=600)]
    )
    assert fake.sleeps == [2]
    assert isinstance(result, TokenEndpointUnavailable)
    assert result.retry_after == 600
    assert "wait 600s" in str(result)


def test_a_server_wait_beyond_the_remaining_budget_fails_at_once() -> None:
    policy = RetryPolicy(max_attempts=5, max_retry_after=30, max_total_seconds=10)
    result, fake, _ = run(policy, [TransientFailure("429", retry_after=20)] * 5)
    assert fake.sleeps == []
    assert isinstance(result, TokenEndpointUnavailable)
    assert result.attempts == 1
    assert result.retry_after == 20


def test_exhausted_attempts_raise_unavailable_with_the_last_cause() -> None:
    last = TransientFailure("HTTP 502")
    result, _, _ = run(
        RetryPolicy(max_attempts=3, jitter=False), [TransientFailure("x")] * 2 + [last]
    )
    assert isinstance(result, TokenEndpointUnavailable)
    assert result.attempts == 3
    assert result.last_cause is last
    assert "HTTP 502" in str(result)


def test_total_time_bounds_retries_before_attempts_run_out() -> None:
    policy = RetryPolicy(max_attempts=50, max_total_seconds=10, jitter=False, initial_backoff=2)
    result, fake, _ = run(policy, [TransientFailure("x")] * 50)
    assert isinstance(result, TokenEndpointUnavailable)
    assert sum(fake.sleeps) <= 10
    assert fake.sleeps == [2, 4]  # the next wait (8) would pass the 10 s budget


def test_other_errors_are_not_retried() -> None:
    with pytest.raises(ValueError, match="boom"):
        run(RetryPolicy(), [ValueError("boom")])


def test_give_up_replaces_the_retry_error_with_the_callers_own() -> None:
    fake = FakeTime()

    def give_up(exc: tenacity.RetryError) -> NoReturn:
        raise RetryPolicy.exhausted(exc, "metadata request") from exc.last_attempt.exception()

    kwargs = RetryPolicy(max_attempts=2, jitter=False).tenacity_kwargs(
        clock=fake.clock, on_retry=lambda n, delay, exc: None, give_up=give_up
    )

    def attempt() -> str:
        raise TransientFailure("HTTP 503")

    with pytest.raises(TokenEndpointUnavailable, match="metadata request failed after 2") as info:
        tenacity.Retrying(sleep=fake.sleep, **kwargs)(attempt)
    assert isinstance(info.value.__cause__, TransientFailure)


def test_a_garbage_retry_after_from_a_5xx_is_ignored_not_a_crash() -> None:
    for value in ("\u00b2", "Fri, 31 Dec 99999999 23:59:59 GMT"):
        with pytest.raises(TransientFailure) as info:
            interpret_token_response(
                503,
                {"retry-after": value},
                b"",
                sent_at=NOW,
                now=NOW,
                policy=RefreshPolicy(),
                rng=random.Random(1),
            )
        assert info.value.retry_after is None
