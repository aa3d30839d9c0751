"""The shared cache's pure parts: key names, the value codec, the breaker, the obtain flow.

No Redis here: the flow is a generator of operations, fed by hand (tests/redis runs it
against a real redis-server).
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from m2m_client import AccessToken, ConfigurationError, RefreshPolicy, TokenEndpointError
from m2m_client._token import CacheKey
from m2m_client.cache._breaker import BreakerState, CircuitBreaker
from m2m_client.cache._codec import Codec, UndecodableEntry
from m2m_client.cache._decisions import (
    Commit,
    CommitError,
    Fetch,
    Read,
    SharedCore,
    Snapshot,
    Subscribe,
    Wait,
)
from m2m_client.cache._lease import LeaseAndRead, Release
from m2m_client.cache._options import SharedOptions as Options

KEY = CacheKey("https://idp.test/oauth/token", "worker-7", "https://api.test", None, ("read",))
SECRET = "unit-test-encryption-key-0123456789"
POLICY = RefreshPolicy()
NOW = 1_800_000_000.0


def make_token(value: str = "tok-1", lifetime: float = 600.0) -> AccessToken:
    return POLICY.make_token(
        access_token=value,
        token_type="Bearer",
        expires_in=lifetime,
        scope="read",
        sent_at=NOW,
        rng=random.Random(1),
    )


# --- names and values -----------------------------------------------------------------


def test_names_hide_the_cache_key_and_share_one_cluster_hash_tag() -> None:
    names = Codec("m2m", SECRET).names(KEY)
    all_names = (names.token, names.lease, names.negative, names.channel)
    tags = {n[n.index("{") : n.index("}") + 1] for n in all_names}
    assert len(tags) == 1
    assert len(set(all_names)) == 4
    for n in all_names:
        assert n.startswith("m2m:{")
        for part in ("worker-7", "idp.test", "api.test", "read"):
            assert part not in n


def test_names_depend_on_namespace_key_and_every_part_of_the_cache_key() -> None:
    base = Codec("m2m", SECRET).names(KEY).token
    assert Codec("other", SECRET).names(KEY).token != base
    assert Codec("m2m", SECRET + "x").names(KEY).token != base
    assert Codec("m2m", None).names(KEY).token != base
    assert Codec("m2m", SECRET).names(KEY._replace(scopes=("read", "write"))).token != base
    assert Codec("m2m", SECRET).names(KEY).token == base


@pytest.mark.parametrize("secret", [SECRET, SECRET.encode(), None])
def test_a_token_entry_round_trips_as_a_lifetime(secret: str | bytes | None) -> None:
    codec = Codec("m2m", secret)
    names = codec.names(KEY)
    value = codec.encode_token(names, make_token())
    entry = codec.decode_token(names, value)
    assert (entry.access_token, entry.token_type, entry.scope) == ("tok-1", "Bearer", "read")
    assert entry.lifetime == pytest.approx(600.0)
    assert entry.expires_at == pytest.approx(NOW + 600.0)
    assert value[0] == (0x03 if secret is None else 0x04)
    assert (b"tok-1" in value) is (secret is None)


def test_a_sealed_value_is_bound_to_its_key_name() -> None:
    codec = Codec("m2m", SECRET)
    names = codec.names(KEY)
    value = codec.encode_token(names, make_token())
    other = codec.names(KEY._replace(client_id="worker-8"))
    with pytest.raises(UndecodableEntry):
        codec.decode_token(other, value)


def test_sealing_twice_gives_different_bytes() -> None:
    codec = Codec("m2m", SECRET)
    names = codec.names(KEY)
    assert codec.encode_token(names, make_token()) != codec.encode_token(names, make_token())


def test_an_error_entry_round_trips() -> None:
    codec = Codec("m2m", SECRET)
    names = codec.names(KEY)
    error = TokenEndpointError("invalid_client", "nope", status_code=401, error_uri="u")
    entry = codec.decode_error(names, codec.encode_error(names, error, NOW + 10))
    assert entry.expires_at == NOW + 10
    again = entry.exception()
    assert (again.error, again.error_description, again.status_code, again.error_uri) == (
        "invalid_client",
        "nope",
        401,
        "u",
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"k": "token", "x": NOW, "t": "", "y": "Bearer", "l": 60},
        {"k": "token", "x": NOW, "t": "x", "y": None, "l": 60},
        {"k": "token", "x": NOW, "t": "x", "y": "Bearer", "l": 0},
        {"k": "token", "x": NOW, "t": "x", "y": "Bearer", "l": True},
        {"k": "token", "x": NOW, "t": "x", "y": "Bearer", "l": "60"},
        {"k": "token", "x": NOW, "t": "x", "y": "Bearer", "l": 60, "s": 5},
        {"k": "token", "t": "x", "y": "Bearer", "l": 60},  # no sealed expiry
        {"k": "token", "x": "soon", "t": "x", "y": "Bearer", "l": 60},
        {"k": "token", "x": float("inf"), "t": "x", "y": "Bearer", "l": 60},
        {"x": NOW, "t": "x", "y": "Bearer", "l": 60},  # no kind
        {"k": "error", "x": NOW, "t": "x", "y": "Bearer", "l": 60, "e": "invalid_client"},
    ],
)
@pytest.mark.parametrize("secret", [SECRET, None])
def test_a_token_entry_with_bad_fields_is_undecodable(
    payload: dict[str, Any], secret: str | None
) -> None:
    codec = Codec("m2m", secret)
    names = codec.names(KEY)
    with pytest.raises(UndecodableEntry):
        codec.decode_token(names, codec.seal(names, names.token, payload))


@pytest.mark.parametrize("namespace", ["", "a b", "x{y", "x}"])
def test_a_bad_namespace_is_a_configuration_error(namespace: str) -> None:
    with pytest.raises(ConfigurationError):
        Codec(namespace, None)


# --- breaker --------------------------------------------------------------------------


def test_the_breaker_opens_after_the_threshold_and_probes_once_after_the_reset() -> None:
    b = CircuitBreaker(threshold=2, reset_seconds=5)
    assert b.allow(0)
    assert b.failed(0) is None
    assert b.failed(0) is BreakerState.OPEN
    assert not b.allow(4.9)
    assert b.allow(5.0)  # the probe
    assert not b.allow(5.1)  # only one
    assert b.failed(5.2) is BreakerState.OPEN  # probe failed: open again, a new period
    assert not b.allow(10.0)
    assert b.allow(10.3)
    assert b.succeeded() is BreakerState.CLOSED
    assert b.allow(10.4)
    assert b.succeeded() is None


def test_a_probe_that_never_reports_does_not_keep_the_breaker_half_open() -> None:
    b = CircuitBreaker(threshold=1, reset_seconds=1)
    b.failed(0)
    assert b.allow(1.0)
    assert not b.allow(1.5)
    assert b.allow(2.1)


def test_a_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(threshold=2, reset_seconds=1)
    b.failed(0)
    b.succeeded()
    assert b.failed(0) is None
    assert b.state is BreakerState.CLOSED


# --- the flow, fed by hand ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def core(clock: Clock | None = None, **options: Any) -> SharedCore:
    return SharedCore(Codec("m2m", SECRET), Options(**options), clock=clock or Clock())


def stored(c: SharedCore, token: AccessToken, pttl: int) -> Snapshot:
    names = c.codec.names(KEY)
    return Snapshot(c.codec.encode_token(names, token), pttl, None)


EMPTY = Snapshot(None, -2, None)


def test_a_fresh_shared_token_is_a_hit_in_one_round_trip() -> None:
    c = core()
    flow = c.obtain_flow(KEY, POLICY, None)
    assert isinstance(next(flow), Read)
    with pytest.raises(StopIteration) as done:
        flow.send(stored(c, make_token(), 500_000))
    token = done.value.value
    assert token.access_token == "tok-1"
    assert token.expires_at == pytest.approx(NOW + 500)
    assert c.stats.shared_hits == 1


def test_a_miss_takes_the_lease_fetches_commits_and_returns() -> None:
    c = core()
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    op = flow.send(EMPTY)
    assert isinstance(op, LeaseAndRead)
    assert op.lease_ms == 5000
    fetch = flow.send((True, EMPTY))
    assert isinstance(fetch, Fetch)
    assert fetch.names is not None
    assert fetch.lease == op.lease
    commit = flow.send(make_token("new"))
    assert isinstance(commit, Commit)
    assert commit.lease == op.lease
    assert commit.ttl_ms == pytest.approx(600_000, abs=5)
    with pytest.raises(StopIteration) as done:
        flow.send(True)
    assert done.value.value.access_token == "new"
    assert (c.stats.leases_won, c.stats.fetches) == (1, 1)


def test_an_oauth_error_is_committed_for_negative_seconds_and_re_raised() -> None:
    c = core(negative_seconds=7)
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    flow.send(EMPTY)
    flow.send((True, EMPTY))
    op = flow.throw(TokenEndpointError("invalid_client"))
    assert isinstance(op, CommitError)
    assert op.ttl_ms == 7000
    with pytest.raises(TokenEndpointError):
        flow.send(None)


def test_another_failure_releases_the_lease_and_is_re_raised() -> None:
    c = core()
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    flow.send(EMPTY)
    flow.send((True, EMPTY))
    assert isinstance(flow.throw(RuntimeError("boom")), Release)
    with pytest.raises(RuntimeError):
        flow.send(True)


def test_a_loser_subscribes_looks_again_then_waits_and_takes_a_lapsed_lease() -> None:
    c = core(poll_interval=0.25)
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    flow.send(EMPTY)
    assert isinstance(flow.send((False, EMPTY)), Subscribe)
    assert isinstance(flow.send(None), LeaseAndRead)  # a commit may have come before SUBSCRIBE
    wait = flow.send((False, EMPTY))
    assert isinstance(wait, Wait)
    assert wait.seconds == 0.25
    assert isinstance(flow.send(False), LeaseAndRead)  # polled, not woken
    assert isinstance(flow.send((True, EMPTY)), Fetch)  # the holder vanished: we fetch
    assert (c.stats.leases_lost, c.stats.waits_polled, c.stats.leases_expired) == (1, 1, 1)


def test_a_loser_woken_by_the_commit_returns_the_shared_token() -> None:
    c = core()
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    flow.send(EMPTY)
    flow.send((False, EMPTY))
    flow.send(None)
    flow.send((False, EMPTY))
    assert isinstance(flow.send(True), LeaseAndRead)
    with pytest.raises(StopIteration) as done:
        flow.send((False, stored(c, make_token("shared"), 600_000)))
    assert done.value.value.access_token == "shared"
    assert c.stats.waits_woken == 1


def test_in_refresh_ahead_a_loser_uses_the_valid_token_and_the_holder_refreshes() -> None:
    c = core()
    # 60 s left of 600: usable for 30 s more, and past the refresh point whatever the jitter
    # (100 s left was before it one time in six: the core draws its own jitter).
    ahead = stored(c, make_token("old"), 60_000)
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    assert isinstance(flow.send(ahead), LeaseAndRead)  # due: try to refresh for the fleet
    with pytest.raises(StopIteration) as done:
        flow.send((False, ahead))  # someone else is refreshing: use the old one meanwhile
    assert done.value.value.access_token == "old"


def test_the_stale_token_is_never_returned() -> None:
    c = core()
    same = stored(c, make_token("old"), 500_000)
    flow = c.obtain_flow(KEY, POLICY, make_token("old"))
    next(flow)
    assert isinstance(flow.send(same), LeaseAndRead)
    assert isinstance(flow.send((False, same)), Subscribe)


def test_a_waiter_gives_up_after_wait_timeout_and_fetches_itself() -> None:
    c = core(wait_timeout=0.001)
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    flow.send(EMPTY)
    flow.send((False, EMPTY))
    time.sleep(0.01)
    op = flow.send(None)
    assert isinstance(op, LeaseAndRead)
    fetch = flow.send((False, EMPTY))
    assert isinstance(fetch, Fetch)
    assert fetch.names is None  # no lease: we do not hold one
    assert c.stats.wait_timeouts == 1


def test_with_the_breaker_open_the_flow_only_fetches() -> None:
    c = core(breaker_threshold=1)
    c.redis_failed(OSError("down"))
    flow = c.obtain_flow(KEY, POLICY, None)
    op = next(flow)
    assert isinstance(op, Fetch)
    assert op.names is None
    assert c.stats.fallbacks == 1


def test_a_value_larger_than_the_bound_is_undecodable_without_parsing() -> None:
    codec = Codec("m2m", None)
    names = codec.names(KEY)
    huge = codec.seal(names, names.token, {"t": "x" * 70_000, "y": "Bearer", "l": 60})
    with pytest.raises(UndecodableEntry, match="more than"):
        codec.decode_token(names, huge)


def test_on_event_hears_every_counter_and_its_failures_are_contained() -> None:
    heard: list[str] = []

    def hook(name: str) -> None:
        heard.append(name)
        raise RuntimeError("a broken metrics hook")

    c = SharedCore(Codec("m2m", SECRET), Options(), clock=Clock(), on_event=hook)
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    with pytest.raises(StopIteration):
        flow.send(stored(c, make_token(), 500_000))
    c.redis_ok()  # round trips are counted, not announced (one per Redis call)
    assert heard == ["shared_hits"]
    assert c.stats.shared_hits == 1
    assert c.stats.redis_round_trips == 1


# --- issue 18: an error never beats a valid token; sealed expiries bound entries ---------


def _token_and_error(c: SharedCore, pttl: int) -> tuple[Snapshot, Snapshot]:
    names = c.codec.names(KEY)
    token = c.codec.encode_token(names, make_token("valid"))
    error = c.codec.encode_error(names, TokenEndpointError("invalid_grant"), NOW + 10)
    return Snapshot(token, pttl, None), Snapshot(token, pttl, error)


@pytest.mark.parametrize("branch", ["first-read", "under-the-lease"])
def test_a_stored_error_never_beats_a_still_valid_token(branch: str) -> None:
    c = core()
    ahead, with_error = _token_and_error(c, 60_000)  # refresh-ahead: 60 s of 600 left
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    if branch == "first-read":
        with pytest.raises(StopIteration) as done:
            flow.send(with_error)
    else:
        assert isinstance(flow.send(ahead), LeaseAndRead)  # no error yet: refresh it
        assert isinstance(flow.send((True, with_error)), Release)  # someone failed meanwhile
        with pytest.raises(StopIteration) as done:
            flow.send(True)
    assert done.value.value.access_token == "valid"
    assert c.stats.negative_hits == 0


def test_the_error_is_raised_to_the_caller_refreshing_that_token_and_once_it_expired() -> None:
    c = core()
    _, with_error = _token_and_error(c, 60_000)
    flow = c.obtain_flow(KEY, POLICY, make_token("valid"))  # the refresh of that very token
    next(flow)
    with pytest.raises(TokenEndpointError):
        flow.send(with_error)
    _, expired = _token_and_error(c, 20_000)  # inside the safety margin
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    with pytest.raises(TokenEndpointError):
        flow.send(expired)


def test_an_entry_ends_at_its_sealed_expiry_whatever_its_ttl() -> None:
    clock = Clock()
    c = core(clock)
    snap = stored(c, make_token("sealed"), 10**9)  # a TTL of 11 days on a 600 s token
    clock.now = NOW + 601
    assert c.token_from(c.codec.names(KEY), snap, POLICY, clock.now) is None
    clock.now = NOW + 100
    token = c.token_from(c.codec.names(KEY), snap, POLICY, clock.now)
    assert token is not None
    assert token.expires_at == pytest.approx(NOW + 600)
    names = c.codec.names(KEY)
    error = Snapshot(None, -2, c.codec.encode_error(names, TokenEndpointError("x"), NOW + 10))
    assert c.error_from(names, error) is None  # an error sealed to end at NOW + 10
