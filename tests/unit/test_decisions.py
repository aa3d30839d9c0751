"""The token clients' decisions (``_client/_decisions.py``), driven directly: a fake clock,
no threads, no tasks, no I/O.

Each scenario here used to be written twice (once per shell); the shell tests keep only what
is about threads, tasks, cancellation and HTTP.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Hashable
from typing import Any

import pytest

from m2m_client import RefreshPolicy, RetryPolicy
from m2m_client._client._decisions import (
    MAX_KEYS,
    RENEWAL_INTERVAL,
    Fetch,
    RefreshBehind,
    Renewals,
    TokenEvent,
    Use,
    Wait,
    _ClientCore,
)
from m2m_client._singleflight import WAIT_GRACE, Flight, SingleFlight, clone_error
from m2m_client._token import AccessToken, InMemoryTokenCache
from m2m_client.errors import (
    DiscoveryError,
    InvalidTokenResponse,
    TokenEndpointError,
    TokenEndpointUnavailable,
    TokenError,
)

from ._calling import NOW, FakeClock, credentials

POLICY = RefreshPolicy()


class Core:
    """A core with a fake wall clock and a separate fake monotonic clock."""

    def __init__(self, cache: Any = None, **kw: Any) -> None:
        self.wall, self.mono = FakeClock(), FakeClock(1000.0)
        self.events: list[TokenEvent] = []
        self.core = _ClientCore(
            credentials(),
            flights=SingleFlight(threading.Event),
            clock=self.wall,
            monotonic=self.mono,
            cache=cache,
            on_event=self.events.append,
            seed=1,
            **kw,
        )
        self.renewals = Renewals(self.core)  # the 401 decisions, beside the core as in a shell
        self.key = self.core.default_key
        self.issued = 0

    def token(self, lifetime: float = 3600) -> AccessToken:
        self.issued += 1
        return POLICY.make_token(
            access_token=f"tok-{self.issued}",
            token_type="Bearer",
            expires_in=lifetime,
            scope=None,
            sent_at=self.wall.now,
            rng=self.core.rng,
        )

    def land(
        self, flight: Flight[Any], token: AccessToken | None = None, error: Any = None
    ) -> None:
        """What a shell does: run the fetch inside ``landing``."""
        try:
            with self.core.landing(self.key, flight, threading.Lock()):
                if error is not None:
                    raise error
                flight.token = token
        except BaseException:
            if not isinstance(error, BaseException) or isinstance(error, Exception):
                raise

    def fetched(self, force: bool = False) -> AccessToken:
        decision = self.core.begin(self.key, force)
        assert isinstance(decision, Fetch)
        token = self.token()
        self.land(decision.flight, token)
        return token

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def test_a_cold_cache_is_fetched_by_one_caller_while_the_others_wait() -> None:
    c = Core()
    owner = c.core.begin(c.key)
    assert isinstance(owner, Fetch)
    assert owner.stale is None
    waiters = [c.core.begin(c.key) for _ in range(100)]
    assert all(isinstance(w, Wait) and w.flight is owner.flight for w in waiters)
    token = c.token()
    c.land(owner.flight, token)
    assert owner.flight.done.is_set()
    assert owner.flight.outcome() is token
    assert c.core.begin(c.key) == Use(token)
    assert c.kinds() == ["token_fetched"]


def test_fresh_then_refresh_ahead_once_then_expired() -> None:
    c = Core()
    token = c.fetched()
    assert c.core.begin(c.key) == Use(token)
    c.wall.now = token.refresh_at + 1
    behind = c.core.begin(c.key)
    assert isinstance(behind, RefreshBehind)
    assert behind.token is token
    assert c.core.begin(c.key) == Use(token)  # only one refresh runs; the rest use the old
    c.wall.now = token.usable_until
    assert isinstance(c.core.begin(c.key), Wait)  # expired: wait for the refresh in flight
    new = c.token()
    c.land(behind.flight, new)
    assert c.core.begin(c.key) == Use(new)


def test_a_failed_refresh_keeps_serving_the_old_token_and_retries_later_on_monotonic_time() -> None:
    c = Core()
    token = c.fetched()
    c.wall.now = token.refresh_at + 1
    behind = c.core.begin(c.key)
    assert isinstance(behind, RefreshBehind)
    c.land(behind.flight, error=TokenEndpointUnavailable("down", attempts=4))
    assert c.core.stats.refresh_failures == 1
    for _ in range(20):  # no tight loop
        assert c.core.begin(c.key) == Use(token)
    c.wall.now -= 3600  # a wall clock stepped back does not stretch the delay
    c.mono.advance(RefreshPolicy().failed_refresh_delay)
    c.wall.now += 3600
    assert isinstance(c.core.begin(c.key), RefreshBehind)
    assert "token_refresh_failed" in c.kinds()


def test_force_refresh_fetches_with_the_current_token_as_stale() -> None:
    c = Core()
    token = c.fetched()
    decision = c.core.begin(c.key, force=True)
    assert isinstance(decision, Fetch)
    assert decision.stale is token


def test_each_audience_resource_and_scope_set_is_its_own_key() -> None:
    core = Core().core
    assert core.key(None, None, None) is core.default_key
    assert core.key(None, None, "read:data") == core.default_key
    assert core.key(None, None, ["b a", "a"]) == core.key(None, None, "a,b")
    keys = {
        core.key("https://other", None, None),
        core.key(None, "https://rs", None),
        core.key(None, None, "write:data"),
        core.default_key,
    }
    assert len(keys) == 4


FAILURES = [
    TokenEndpointError("invalid_client", "bad secret", status_code=401),
    InvalidTokenResponse("token endpoint answered HTTP 404 without an OAuth error body"),
    InvalidTokenResponse("token response is not a JSON object (content-type 'text/html')"),
    TokenEndpointUnavailable("token request failed after 4 attempt(s): HTTP 503", attempts=4),
    TokenEndpointUnavailable("ConnectError talking to https://as.example.com", attempts=4),
    DiscoveryError("no authorization server metadata found"),
]


@pytest.mark.parametrize("error", FAILURES, ids=lambda e: type(e).__name__)
def test_every_failure_kind_is_negatively_cached_for_a_while(error: Exception) -> None:
    c = Core()
    decision = c.core.begin(c.key)
    assert isinstance(decision, Fetch)
    c.land(decision.flight, error=error)
    for _ in range(1000):  # before: 1,000 calls -> 1,000 token requests for non-OAuth failures
        with pytest.raises(type(error)) as info:
            c.core.begin(c.key)
        assert str(info.value) == str(error)
        assert info.value is not error
    assert c.kinds().count("negative_cache_hit") == 1000
    c.wall.now -= 3600  # stepping the wall clock back an hour changes nothing
    c.mono.advance(RetryPolicy().negative_cache_seconds)
    assert isinstance(c.core.begin(c.key), Fetch)


def test_an_interrupted_flight_wakes_waiters_and_is_not_negatively_cached() -> None:
    c = Core()
    owner = c.core.begin(c.key)
    waiter = c.core.begin(c.key)
    assert isinstance(owner, Fetch)
    assert isinstance(waiter, Wait)
    c.land(owner.flight, error=KeyboardInterrupt())
    assert waiter.flight.done.is_set()
    with pytest.raises(TokenError, match="interrupted"):
        waiter.flight.outcome()
    assert isinstance(c.core.begin(c.key), Fetch)


def test_a_foreign_exception_in_a_fetch_reaches_waiters_as_a_token_error() -> None:
    c = Core()
    owner = c.core.begin(c.key)
    assert isinstance(owner, Fetch)
    c.land(owner.flight, error=RuntimeError("boom"))
    with pytest.raises(TokenError, match="RuntimeError"):
        owner.flight.outcome()


class BrokenCache:
    """A TokenCache whose store is down (Redis blipping)."""

    def __init__(self, get: bool = True, set: bool = True) -> None:
        self.fail_get, self.fail_set = get, set
        self.inner = InMemoryTokenCache()

    def get(self, key: Hashable) -> AccessToken | None:
        if self.fail_get:
            raise ConnectionError("cache down")
        return self.inner.get(key)

    def set(self, key: Hashable, token: AccessToken) -> None:
        if self.fail_set:
            raise ConnectionError("cache down")
        self.inner.set(key, token)

    def delete(self, key: Hashable, token: AccessToken) -> bool:
        raise ConnectionError("cache down")


def test_a_failing_cache_counts_as_a_miss_and_still_wakes_every_waiter() -> None:
    c = Core(cache=BrokenCache())
    owner = c.core.begin(c.key)  # get raised: a miss
    assert isinstance(owner, Fetch)
    waiters = [c.core.begin(c.key) for _ in range(10)]
    token = c.token()
    c.land(owner.flight, token)  # set raises inside the landing
    for waiter in waiters:
        assert waiter.flight.done.is_set()
        assert waiter.flight.outcome() is token
    assert c.renewals.invalidate(c.key, token) is False  # delete raised: nothing dropped


def test_401_driven_drops_are_limited_to_one_per_key_per_interval() -> None:
    c = Core()
    token = c.fetched()
    assert c.renewals.refused(c.key, token) == (True, True)  # replay; this caller dropped it
    fetch = c.core.begin(c.key)
    assert isinstance(fetch, Fetch)
    assert fetch.stale is token  # a shared level must not hand the refused token back
    new = c.token()
    c.land(fetch.flight, new)
    drops = [c.renewals.refused(c.key, new) for _ in range(100)]
    assert drops == [(False, False)] * 100  # the young token stays: the 401 reaches the caller
    assert c.kinds().count("token_invalidated") == 1
    c.mono.advance(RENEWAL_INTERVAL)
    assert c.renewals.refused(c.key, new) == (True, True)


def test_a_401_for_a_token_another_caller_dropped_replays_whatever_the_renewal_limit() -> None:
    # Issue 19: 49 of 50 callers refused with a revoked token were refused a replay.
    c = Core()
    token = c.fetched()
    assert c.renewals.refused(c.key, token) == (True, True)  # this caller drops it
    waiters = [c.renewals.refused(c.key, token) for _ in range(49)]
    assert waiters == [(True, False)] * 49  # the rest replay with the renewal, drop nothing
    assert c.kinds().count("token_invalidated") == 1


def test_a_401_for_a_token_already_replaced_does_not_drop_the_new_one() -> None:
    c = Core()
    old = c.fetched()
    new = c.fetched(force=True)
    assert c.renewals.refused(c.key, old) == (True, False)  # the replay will carry `new`
    assert c.core.begin(c.key) == Use(new)


def test_per_key_tables_stay_bounded_with_25_000_refused_keys() -> None:
    c = Core()
    for i in range(25_000):  # benchmarks/bench_memory.py does 100,000
        key = c.core.key(f"https://api-{i}.example.com", None, None)
        decision = c.core.begin(key)
        assert isinstance(decision, Fetch)
        with c.core.landing(key, decision.flight, threading.Lock()):
            raise TokenEndpointError("invalid_target", status_code=400)
    assert len(c.core.failures.negative) <= MAX_KEYS
    assert len(c.core.flights) == 0
    error, _ = next(iter(c.core.failures.negative.values()))
    assert error.__traceback__ is None
    assert error.__cause__ is None


def test_negative_entries_hold_no_frames() -> None:
    c = Core()
    decision = c.core.begin(c.key)
    assert isinstance(decision, Fetch)
    try:
        raise TokenEndpointUnavailable("down", attempts=3, last_cause=ValueError("x"))
    except TokenEndpointUnavailable as exc:
        c.land(decision.flight, error=exc)
    stored, _ = c.core.failures.negative[c.key]
    assert stored.__traceback__ is None
    assert isinstance(stored, TokenEndpointUnavailable)
    assert stored.last_cause is None


def test_each_waiter_raises_its_own_copy_of_the_error() -> None:
    error = TokenEndpointError("invalid_scope", "no", status_code=400, error_uri="https://x")
    first, second = clone_error(error), clone_error(error)
    assert first is not second
    assert isinstance(first, TokenEndpointError)
    assert (first.error, first.error_description, first.status_code, first.error_uri) == (
        "invalid_scope",
        "no",
        400,
        "https://x",
    )


def test_a_flight_that_never_lands_gives_up_after_its_deadline() -> None:
    flight: Flight[threading.Event] = Flight(threading.Event(), deadline=0.0)
    assert flight.wait_seconds() == WAIT_GRACE
    with pytest.raises(TokenEndpointUnavailable, match="gave up waiting"):
        flight.outcome()


def test_a_fork_forgets_the_parents_flights_but_keeps_the_negative_cache() -> None:
    c = Core()
    other = c.core.key("https://other", None, None)
    refused = c.core.begin(other)
    assert isinstance(refused, Fetch)
    with c.core.landing(other, refused.flight, threading.Lock()):
        raise TokenEndpointError("invalid_target")
    assert isinstance(c.core.begin(c.key), Fetch)  # a flight in progress at fork time
    c.core.after_fork()
    assert isinstance(c.core.begin(c.key), Fetch)  # not Wait on an owner that is not here
    with pytest.raises(TokenEndpointError):
        c.core.begin(other)


def test_events_never_expose_the_token_even_through_asdict() -> None:
    c = Core()
    token = c.fetched()
    fetched = next(e for e in c.events if e.kind == "token_fetched")
    assert fetched.token is not None
    assert fetched.token.fingerprint == token.fingerprint
    assert fetched.token.expires_at == token.expires_at
    assert token.access_token not in repr(dataclasses.asdict(fetched))
    assert token.access_token not in repr(fetched)


def test_a_closed_core_says_so() -> None:
    c = Core()
    c.core.closed = True
    with pytest.raises(Exception, match="closed"):
        c.core.check_open("TokenClient")


def test_expiry_counts_from_when_the_request_was_sent() -> None:
    c = Core()
    token = c.token(lifetime=600)
    assert token.issued_at == NOW
    assert token.expires_at == NOW + 600
