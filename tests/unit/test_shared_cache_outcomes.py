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
from m2m_client.cache._core import (
    Announce,
    Fetch,
    Get,
    LeaseAndRead,
    Options,
    Read,
    Release,
    ReleaseFailed,
    SharedCore,
    Snapshot,
    Subscribe,
    failure_from,
    failure_marker,
)
from m2m_client.cache._executors import plan_for

KEY = CacheKey("https://idp.test/oauth/token", "worker-7", "https://api.test", None, ("read",))
POLICY = RefreshPolicy()
EMPTY = Snapshot(None, -2, None)


def core() -> SharedCore:
    return SharedCore(Codec("m2m", "unit-test-encryption-key-0123456789"), Options())


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
    assert commands[:2] == ["set", "get"]  # SET NX, then GET of the lease, one round trip
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
    flow, op = waiting_flow(c, b"holder-1")
    wait = flow.send((False, EMPTY, b"holder-1", None))
    # Woken: the lease is free (we win it), and the holder we saw left its failure.
    assert isinstance(flow.send(True), LeaseAndRead)
    marker = failure_marker("holder-1", TokenEndpointUnavailable("down"))
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
    flow, op = waiting_flow(c, b"holder-1")
    flow.send((False, EMPTY, b"holder-1", None))
    flow.send(True)
    marker = failure_marker("holder-0", TokenEndpointUnavailable("down"))  # never saw it
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
    assert released.marker == f"{op.lease}|TokenEndpointUnavailable".encode()
    assert b"idp.test" not in released.marker
    assert 1000 <= released.marker_ms <= 10_000  # outlives a poll, not the next attempt
    with pytest.raises(TokenEndpointUnavailable):
        flow.send(None)


@pytest.mark.parametrize("marker", [b"", b"|", b"x|y", b"holder-1|NoSuchError", b"\xff|\xfe"])
def test_garbage_markers_never_crash(marker: bytes) -> None:
    failure = failure_from(marker, {b"holder-1"})
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
