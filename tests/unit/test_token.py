"""AccessToken and the pure fresh / refresh-ahead / expired policy."""

from __future__ import annotations

import base64
import json
import random
import time

import pytest

from m2m_client import AccessToken, Freshness, InMemoryTokenCache, RefreshPolicy
from m2m_client._token import freshness, jwt_expiry

T0 = 1_700_000_000.0


def jwt_with(payload: object) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(b'{}')}.{b64(json.dumps(payload).encode())}.sig"


def make(expires_in: float | None, token: str = "opaque", seed: int = 1) -> AccessToken:
    return RefreshPolicy().make_token(
        access_token=token,
        token_type="Bearer",
        expires_in=expires_in,
        scope=None,
        sent_at=T0,
        rng=random.Random(seed),
    )


def test_token_is_fresh_then_refresh_ahead_then_expired() -> None:
    token = make(3600)
    assert token.expires_at == T0 + 3600
    assert freshness(token, T0) is Freshness.FRESH
    assert freshness(token, token.refresh_at - 0.001) is Freshness.FRESH
    assert freshness(token, token.refresh_at) is Freshness.REFRESH_AHEAD
    assert freshness(token, token.usable_until) is Freshness.EXPIRED
    # 30 s safety margin before the real expiry.
    assert token.usable_until == T0 + 3600 - 30


def test_refresh_point_lies_in_the_first_half_of_a_window_of_20_percent_capped() -> None:
    points = {make(1000, seed=s).refresh_at for s in range(50)}
    window_start = T0 + 970 - 200
    assert all(window_start <= p <= window_start + 100 for p in points)
    long_lived = make(86400)  # the window is capped at 10 minutes
    assert T0 + 86370 - 600 <= long_lived.refresh_at <= T0 + 86370 - 300
    assert len(points) > 40  # randomised, so a fleet does not refresh in lockstep


def test_refresh_point_is_decided_once_and_reproducible_with_a_seed() -> None:
    assert make(3600, seed=7).refresh_at == make(3600, seed=7).refresh_at
    token = make(3600, seed=7)
    assert [freshness(token, token.refresh_at + 1) for _ in range(3)] == [
        Freshness.REFRESH_AHEAD
    ] * 3


def test_missing_expires_in_uses_the_documented_default_lifetime() -> None:
    assert make(None).expires_at == T0 + RefreshPolicy().default_lifetime == T0 + 300


def test_earlier_jwt_exp_wins_over_expires_in() -> None:
    assert make(3600, jwt_with({"exp": T0 + 600})).expires_at == T0 + 600
    assert make(None, jwt_with({"exp": T0 + 120})).expires_at == T0 + 120
    # later exp: expires_in (counted from the send time) is the stricter bound
    assert make(60, jwt_with({"exp": T0 + 600})).expires_at == T0 + 60


def test_jwt_exp_already_past_is_treated_as_clock_skew() -> None:
    assert make(3600, jwt_with({"exp": T0 - 10})).expires_at == T0 + 3600


@pytest.mark.parametrize(
    "token",
    [
        "opaque",
        "a.b.c",
        "a.!!!.c",
        jwt_with([1]),
        jwt_with({"exp": "soon"}),
        jwt_with({"exp": True}),
    ],
)
def test_non_jwt_or_odd_payloads_never_fail(token: str) -> None:
    assert jwt_expiry(token) is None
    assert make(3600, token).expires_at == T0 + 3600


def test_short_tokens_keep_most_of_their_lifetime() -> None:
    token = make(20)
    assert token.usable_until == T0 + 18  # margin is 10 % of a short lifetime, not 30 s
    assert T0 < token.refresh_at < token.usable_until
    assert freshness(token, T0 + 1) is Freshness.FRESH


def test_failed_refresh_is_retried_later_not_in_a_tight_loop() -> None:
    token = make(3600)
    now = token.refresh_at + 1
    assert RefreshPolicy().next_refresh_attempt(token, now) == now + 10
    near_end = token.usable_until - 4
    assert RefreshPolicy().next_refresh_attempt(token, near_end) == near_end + 1


def test_repr_shows_a_fingerprint_never_the_token() -> None:
    token = make(3600, "super-secret-token-value")
    assert "super-secret-token-value" not in repr(token)
    assert "super-secret-token-value" not in str(token)
    assert token.fingerprint in repr(token)
    assert token.authorization == "Bearer super-secret-token-value"


def test_in_memory_cache_deletes_only_the_same_token() -> None:
    cache = InMemoryTokenCache()
    old, new = make(60, "old"), make(60, "new")
    cache.set("k", new)
    assert cache.delete("k", old) is False
    assert cache.get("k") is new
    assert cache.delete("k", new) is True
    assert cache.get("k") is None


@pytest.mark.parametrize("exp", ["1" + "0" * 400, "1e400", "NaN", "-Infinity"])
def test_an_absurd_jwt_exp_is_ignored_not_a_crash(exp: str) -> None:
    # Before: exp 10**400 failed the fetch with OverflowError.
    payload = base64.urlsafe_b64encode(f'{{"exp": {exp}}}'.encode()).rstrip(b"=").decode()
    token = f"eyJhbGciOiJub25lIn0.{payload}.sig"
    assert jwt_expiry(token) is None
    made = RefreshPolicy().make_token(
        access_token=token,
        token_type="Bearer",
        expires_in=600,
        scope=None,
        sent_at=1_700_000_000.0,
        rng=random.Random(1),
    )
    assert made.expires_at == 1_700_000_600.0


def test_the_in_memory_cache_is_bounded_and_drops_expired_tokens_first() -> None:
    # 50: below SWEEP_MIN_ENTRIES, so the bound (not a sweep) is what drops them here.
    cache = InMemoryTokenCache(max_entries=50)
    now = time.time()
    live = AccessToken("live", expires_at=now + 3600)
    cache.set("keep", live)
    for i in range(49):
        cache.set(i, AccessToken(f"old-{i}", expires_at=now - 1))
    cache.set("new", AccessToken("new", expires_at=now + 3600))  # full: expired ones go
    assert len(cache) == 2
    assert cache.get("keep") is live
    for i in range(10_000):
        cache.set(("k", i), AccessToken(f"t-{i}", expires_at=now + 3600))
    assert len(cache) <= 50


class CountingClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now, self.calls = now, 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def test_expired_tokens_of_one_off_keys_are_swept_long_before_the_bound() -> None:
    # Before: 3,000 one-off scopes kept every expired token until the 10,000-entry bound.
    clock = CountingClock()
    cache = InMemoryTokenCache(clock=clock)
    for i in range(3_000):
        cache.set(("one-off", i), AccessToken(f"t-{i}", expires_at=clock.now + 60))
        clock.now += 1.0  # one new key a second, each token living 60 s
    # What is left: the live tokens (60) and at most as many dead ones again, or the floor.
    assert len(cache) <= max(2 * 61, InMemoryTokenCache.SWEEP_MIN_ENTRIES)
    assert cache.get(("one-off", 2_999)) is not None  # a live token is never swept


def test_sweeping_is_amortised_and_never_on_a_warm_hit() -> None:
    clock = CountingClock()
    cache = InMemoryTokenCache(clock=clock)
    for i in range(4_000):  # none expires: every sweep finds nothing to drop
        cache.set(i, AccessToken(f"t-{i}", expires_at=clock.now + 3600))
    sets_and_sweeps = clock.calls - 1  # the constructor read it once
    sweeps = sets_and_sweeps - 4_000
    assert sweeps <= 7  # at 64, 128, ... 4096 entries: O(1) per store on average
    before = clock.calls
    for i in range(1_000):
        assert cache.get(i % 4_000) is not None
    assert clock.calls == before  # a warm hit reads no clock and sweeps nothing


def test_a_token_client_with_one_off_scopes_keeps_its_cache_small() -> None:
    from m2m_client import TokenClient

    from ._calling import FakeClock, TokenEndpoint, credentials

    server, clock = TokenEndpoint(expires_in=60), FakeClock()
    with TokenClient(
        credentials(), http_client=server.client(), clock=clock, monotonic=clock
    ) as tokens:
        for i in range(3_000):
            tokens.get_token(scope=f"one-off:{i}")
            clock.advance(1.0)
        assert len(tokens._cache) <= 2 * 61 + 1  # type: ignore[arg-type]


def _exit_status_of_child(check: object) -> int:
    """Fork, run ``check()`` in the child (killed by SIGALRM after 10 s: a deadlock is a
    failure, not a hang), and return its exit status."""
    import os
    import signal

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        signal.alarm(10)
        try:
            code = 0 if check() else 3  # type: ignore[operator]
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only")
def test_a_child_forked_while_the_cache_lock_is_held_can_store_and_delete_tokens() -> None:
    cache = InMemoryTokenCache()
    token = make(300, "child's")

    def child_uses_the_cache() -> bool:
        cache.set("key", token)
        return cache.get("key") is token and cache.delete("key", token)

    with cache._lock:  # another thread of the parent, mid-store, at fork()
        assert _exit_status_of_child(child_uses_the_cache) == 0
