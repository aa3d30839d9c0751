"""A rate-limited token endpoint on 127.0.0.1 (issue 19 item 8), sync and async.

The server answers 429 (or 503) with the IETF, Auth0 or Okta rate-limit headers: the client
waits what they say within its retry budget, reports what it read to ``on_event``, and fails
at once, saying when to come back, when the wait would not fit in the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from m2m_client import (
    AsyncTokenClient,
    ClientCredentials,
    RetryPolicy,
    TokenClient,
    TokenEndpointUnavailable,
    TokenEvent,
)
from m2m_client.testing import LocalIssuer

SECRET = "rate-limit-secret-31"
RETRY = RetryPolicy(max_attempts=3, max_total_seconds=8, max_retry_after=5, jitter=False)
SLACK = 4.0  # scheduling slack on 2 shared, loaded cores


def _ietf(wait: int) -> dict[str, str]:
    return {"RateLimit": f'"client";r=0;t={wait}', "RateLimit-Policy": '"client";q=10;w=60'}


def _auth0(wait: int) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(int(time.time()) + wait),
    }


def _okta(wait: int) -> dict[str, str]:
    return {
        "X-Rate-Limit-Limit": "10",
        "X-Rate-Limit-Remaining": "0",
        "X-Rate-Limit-Reset": str(int(time.time()) + wait),
    }


def _older_draft(wait: int) -> dict[str, str]:
    return {"RateLimit-Limit": "10", "RateLimit-Remaining": "0", "RateLimit-Reset": str(wait)}


ABSOLUTE = {"auth0", "okta"}
"""Flavours whose reset is a wall-clock time, fixed when the header is made: the wait they ask for
shrinks by however long the client takes to send its request, so it is counted from then."""

FLAVOURS: dict[str, Callable[[int], dict[str, str]]] = {
    "ietf": _ietf,
    "auth0": _auth0,
    "okta": _okta,
    "older_draft": _older_draft,
}


@pytest.fixture
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer() as issuer:
        issuer.add_client("worker", SECRET)
        yield issuer


def _creds(issuer: LocalIssuer) -> ClientCredentials:
    return ClientCredentials(token_url=issuer.token_url, client_id="worker", client_secret=SECRET)


def _check_event(events: list[TokenEvent], wait: int, lag: float) -> None:
    limited = [e for e in events if e.kind == "rate_limited"]
    assert len(limited) == 1
    event = limited[0]
    assert event.rate_limit is not None
    assert event.rate_limit.remaining == 0
    assert event.rate_limit.limit == 10
    assert event.delay is not None
    assert wait - 1.5 - lag <= event.delay <= wait
    assert event.detail is not None
    assert "remaining 0/10" in event.detail


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sync_client_waits_what_the_rate_limit_headers_say(
    issuer: LocalIssuer, flavour: str, status: int
) -> None:
    wait = 2
    made = time.monotonic()
    issuer.fail_next(1, status=status, headers=FLAVOURS[flavour](wait))
    events: list[TokenEvent] = []
    with TokenClient(_creds(issuer), retry=RETRY, on_event=events.append) as tokens:
        started = time.monotonic()
        assert tokens.get_token().access_token
        waited = time.monotonic() - started
    lag = started - made if flavour in ABSOLUTE else 0.0
    assert wait - 1.5 <= waited + lag <= wait + SLACK
    _check_event(events, wait, lag)
    assert [e.kind for e in events].count("retry") == 1


@pytest.mark.anyio
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_async_client_waits_what_the_rate_limit_headers_say(
    issuer: LocalIssuer, flavour: str
) -> None:
    wait = 2
    made = time.monotonic()
    issuer.fail_next(1, status=429, headers=FLAVOURS[flavour](wait))
    events: list[TokenEvent] = []
    async with AsyncTokenClient(_creds(issuer), retry=RETRY, on_event=events.append) as tokens:
        started = time.monotonic()
        assert (await tokens.get_token()).access_token
        waited = time.monotonic() - started
    lag = started - made if flavour in ABSOLUTE else 0.0
    assert wait - 1.5 <= waited + lag <= wait + SLACK
    _check_event(events, wait, lag)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_wait_beyond_the_budget_fails_at_once_saying_when_to_retry(
    issuer: LocalIssuer, flavour: str
) -> None:
    issuer.fail_next(5, status=429, headers=FLAVOURS[flavour](120))
    with TokenClient(_creds(issuer), retry=RETRY) as tokens:
        started = time.monotonic()
        with pytest.raises(TokenEndpointUnavailable) as info:
            tokens.get_token()
        waited = time.monotonic() - started
    assert waited < SLACK  # no sleeping toward a retry that could not be made in time
    assert info.value.attempts == 1
    assert info.value.retry_after is not None
    assert 118 <= info.value.retry_after <= 120
    assert "wait 1" in str(info.value)  # "wait 119s" / "wait 120s"


@pytest.mark.anyio
async def test_async_a_wait_beyond_the_budget_fails_at_once(issuer: LocalIssuer) -> None:
    issuer.fail_next(5, status=429, headers=_ietf(120))
    events: list[TokenEvent] = []
    async with AsyncTokenClient(_creds(issuer), retry=RETRY, on_event=events.append) as tokens:
        started = time.monotonic()
        with pytest.raises(TokenEndpointUnavailable) as info:
            await tokens.get_token()
        waited = time.monotonic() - started
    assert waited < SLACK
    assert info.value.retry_after == 120
    assert [e.kind for e in events].count("rate_limited") == 1


def test_retry_after_wins_over_the_rate_limit_reset(issuer: LocalIssuer) -> None:
    issuer.fail_next(1, status=429, retry_after=1, headers=_ietf(60))
    events: list[TokenEvent] = []
    with TokenClient(_creds(issuer), retry=RETRY, on_event=events.append) as tokens:
        started = time.monotonic()
        assert tokens.get_token().access_token
        assert time.monotonic() - started <= 1 + SLACK
    (event,) = [e for e in events if e.kind == "rate_limited"]
    assert event.rate_limit is not None
    assert (event.rate_limit.retry_after, event.rate_limit.reset) == (1.0, 60.0)
    assert event.delay == 1.0


def test_garbage_rate_limit_headers_fall_back_to_backoff(issuer: LocalIssuer) -> None:
    garbage = {
        "RateLimit": '"x";r=0;t=-9, ;;;',
        "X-RateLimit-Reset": "tomorrow",
        "X-Rate-Limit-Reset": "99999999999999999999999",
    }
    issuer.fail_next(1, status=429, headers=garbage)
    events: list[TokenEvent] = []
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.05, jitter=False)
    with TokenClient(_creds(issuer), retry=retry, on_event=events.append) as tokens:
        started = time.monotonic()
        assert tokens.get_token().access_token
        assert time.monotonic() - started <= SLACK
    assert not [e for e in events if e.kind == "rate_limited"]
