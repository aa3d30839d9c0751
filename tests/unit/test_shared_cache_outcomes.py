"""Issue 18, items 6 and 8, the pure parts: who owns a lease, and who gets a holder's failure.

The flow is fed by hand (tests/redis/test_shared_faults.py runs it against redis-server).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import pytest

from m2m_client import AccessToken, RefreshPolicy, TokenEndpointUnavailable, TokenError
from m2m_client._token import CacheKey
from m2m_client.cache._codec import Codec
from m2m_client.cache._decisions import (
    Announce,
    Fetch,
    Get,
    Read,
    SharedCore,
    Snapshot,
    Subscribe,
)
from m2m_client.cache._executors import plan_for
from m2m_client.cache._lease import Lease, LeaseAndRead, Release, ReleaseFailed, _marker_mac
from m2m_client.cache._options import SharedOptions as Options

KEY = CacheKey("https://idp.test/oauth/token", "worker-7", "https://api.test", None, ("read",))
POLICY = RefreshPolicy()
EMPTY = Snapshot(None, -2, None)


def core() -> SharedCore:
    return SharedCore(Codec("m2m", "unit-test-encryption-key-0123456789"), Options())


NAMES = core().codec.names(KEY)
# Lease values as processes of this credential write them (MACed: see Lease.vouched).
HOLDER_0, HOLDER_1 = Lease(NAMES, 5).value, Lease(NAMES, 5).value


@pytest.fixture(autouse=True)
def _fresh_holders() -> None:
    # Lease values are dated and Lease.vouched refuses old ones: make them as each test starts,
    # not at import, which comes many minutes earlier in a whole-suite run.
    global HOLDER_0, HOLDER_1
    HOLDER_0, HOLDER_1 = Lease(NAMES, 5).value, Lease(NAMES, 5).value


@pytest.mark.parametrize(
    ("set_reply", "holder", "ours"),
    [
        (True, b"ours", True),  # set now
        (None, b"ours", True),  # not set, but ours: our own first attempt, retried
        (None, b"someone else", False),
        (None, None, False),  # gone again between SET and GET
    ],
)
def test_the_lease_is_ours_when_it_holds_our_value(
    set_reply: bool | None, holder: bytes | None, ours: bool
) -> None:
    names = core().codec.names(KEY)
    plan = plan_for(LeaseAndRead(names, "ours", 5000, "failed"))
    commands = [c[0] for c in plan.commands]
    assert commands[:2] == ["set", "getrange"]  # SET NX, then a bounded GET of the lease
    won, snap, seen, marker = plan.finish([set_reply, holder, None, None, -2, None])
    assert won is ours
    assert seen == holder
    assert marker is None
    assert snap == EMPTY


def waiting_flow(c: SharedCore, holder: bytes) -> tuple[Generator[Any, Any, Any], LeaseAndRead]:
    flow = c.obtain_flow(KEY, POLICY, None)
    assert isinstance(next(flow), Read)
    op = flow.send(EMPTY)
    assert isinstance(op, LeaseAndRead)
    assert isinstance(flow.send((False, EMPTY, holder, None)), Subscribe)
    assert isinstance(flow.send(None), LeaseAndRead)
    return flow, op


def test_a_waiter_raises_the_failure_of_the_holder_it_waited_for() -> None:
    c = core()
    flow, op = waiting_flow(c, HOLDER_1.encode())
    wait = flow.send((False, EMPTY, HOLDER_1.encode(), None))
    # Woken: the lease is free (we win it), and the holder we saw left its failure.
    assert isinstance(flow.send(True), LeaseAndRead)
    marker = Lease(NAMES, 5, HOLDER_1).failure_marker(TokenEndpointUnavailable("down"))
    release = flow.send((True, EMPTY, op.lease.encode(), marker))
    assert isinstance(release, Release)  # the lease we just took goes back at once
    assert release.lease == op.lease
    with pytest.raises(TokenEndpointUnavailable, match="shares that outcome"):
        flow.send(True)
    assert c.stats.holder_failures == 1
    assert c.stats.fetches == 0
    assert wait is not None


def test_another_attempts_failure_is_not_ours_we_take_our_turn() -> None:
    c = core()
    flow, op = waiting_flow(c, HOLDER_1.encode())
    flow.send((False, EMPTY, HOLDER_1.encode(), None))
    flow.send(True)
    marker = Lease(NAMES, 5, HOLDER_0).failure_marker(TokenEndpointUnavailable("down"))  # not seen
    fetch = flow.send((True, EMPTY, op.lease.encode(), marker))
    assert isinstance(fetch, Fetch)
    assert c.stats.holder_failures == 0


def test_a_holder_whose_fetch_fails_leaves_a_marker_naming_its_lease_and_no_secret() -> None:
    c = core()
    flow = c.obtain_flow(KEY, POLICY, None)
    next(flow)
    op = flow.send(EMPTY)
    assert isinstance(flow.send((True, EMPTY, op.lease.encode(), None)), Fetch)
    error = TokenEndpointUnavailable("https://idp.test/oauth/token refused: secret-ish detail")
    released = flow.throw(error)
    assert isinstance(released, ReleaseFailed)
    assert released.lease == op.lease
    assert released.marker.startswith(f"{op.lease}|TokenEndpointUnavailable|".encode())
    assert b"idp.test" not in released.marker
    assert 1000 <= released.marker_ms <= 10_000  # outlives a poll, not the next attempt
    with pytest.raises(TokenEndpointUnavailable):
        flow.send(None)


@pytest.mark.parametrize(
    "marker",
    [
        b"",
        b"|",
        b"x|y",
        b"holder-1|NoSuchError",
        b"\xff|\xfe",
        Lease(NAMES, 5, HOLDER_1).failure_marker(TokenError("x"))[:-1] + b"|",
        Lease(NAMES, 5, HOLDER_1).failure_marker(TokenError("x")) + b"\xff",
        b"holder-1|NoSuchError|" + _marker_mac(NAMES, b"holder-1|NoSuchError"),
        b"holder-1|\xfe|" + _marker_mac(NAMES, b"holder-1|\xfe"),
    ],
)
def test_garbage_markers_never_crash(marker: bytes) -> None:
    failure = Lease.failure_from(NAMES, marker, {HOLDER_1.encode()})
    assert failure is None or type(failure) is TokenError


def test_an_invalidation_announces_a_keyed_hash_never_the_token() -> None:
    c = core()
    token = AccessToken("secret-token", expires_at=time.time() + 60, issued_at=time.time())
    flow = c.invalidate_flow(KEY, token)
    get = next(flow)
    assert isinstance(get, Get)
    assert get.name == c.codec.names(KEY).token
    announce = flow.send(None)
    assert isinstance(announce, Announce)
    assert announce.channel == "m2m:invalidated"
    assert b"secret-token" not in announce.message
    assert announce.message.startswith(c.codec.names(KEY).token.encode() + b"|")


def test_a_marker_without_the_credentials_mac_is_no_failure() -> None:
    """Whoever can write Redis but holds neither the fleet key nor the credential cannot
    make waiters raise: a marker naming the lease it holds, unsigned or signed for another
    credential, is ignored (the waiter waits out the lease and fetches for itself)."""
    other = core().codec.names(KEY._replace(client_id="worker-8"))
    assert (
        Lease.failure_from(NAMES, b"holder-1|TokenEndpointUnavailable", {HOLDER_1.encode()}) is None
    )
    foreign = Lease(other, 5, HOLDER_1).failure_marker(TokenEndpointUnavailable("down"))
    assert Lease.failure_from(NAMES, foreign, {HOLDER_1.encode()}) is None
    ours = Lease(NAMES, 5, HOLDER_1).failure_marker(TokenEndpointUnavailable("down"))
    assert isinstance(
        Lease.failure_from(NAMES, ours, {HOLDER_1.encode()}), TokenEndpointUnavailable
    )


def test_a_lease_nobody_of_this_credential_wrote_is_no_reason_to_wait() -> None:
    """A Redis writer without the fleet key or the credential plants a lease: the flow
    fetches at once instead of waiting wait_timeout on every miss."""
    c = core()
    flow = c.obtain_flow(KEY, POLICY, None)
    assert isinstance(next(flow), Read)
    assert isinstance(flow.send(EMPTY), LeaseAndRead)
    assert isinstance(flow.send((False, EMPTY, b"planted", None)), Fetch)
    assert c.stats.fallbacks == 1
    assert Lease.vouched(NAMES, HOLDER_1.encode())
    assert not Lease.vouched(NAMES, b"planted")
    other = core().codec.names(KEY._replace(audience="https://other.test"))
    assert not Lease.vouched(other, HOLDER_1.encode())  # bound to its name too


@pytest.mark.parametrize("age", [-3600.0, 3600.0, 10**9])
def test_a_genuine_lease_value_is_vouched_for_only_while_young(
    age: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value a process of this credential wrote long ago (or "in the future"): whoever saw
    it once in Redis could otherwise put it back, with its failure marker, at any time."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - age)
    old = Lease(NAMES, 5)
    marker = old.failure_marker(TokenEndpointUnavailable("down"))
    monkeypatch.setattr(time, "time", real_time)
    assert not Lease.vouched(NAMES, old.value.encode())
    c = core()
    flow = c.obtain_flow(KEY, POLICY, None)
    assert isinstance(next(flow), Read)
    assert isinstance(flow.send(EMPTY), LeaseAndRead)
    # Not a wait, and not the old failure: this caller fetches for itself.
    assert isinstance(flow.send((False, EMPTY, old.value.encode(), marker)), Fetch)
    assert Lease.vouched(NAMES, Lease(NAMES, 5).value.encode())  # a fresh one still is
