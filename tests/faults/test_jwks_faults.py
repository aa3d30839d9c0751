"""The verifiers' JWKS and discovery fetches against a misbehaving loopback server.

Each fault, sync and async: what the caller sees (a 503-class KeySetUnavailable, never a
foreign exception or a hang), how many fetches were made (one; a second verification within
the back-off fails fast without fetching) and how long it took (bounded by ``timeout``).
Durations inside the verifier run on a fake clock; the I/O and its deadlines are real.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from m2m_client._stacks import Stack, installed
from m2m_client.errors import KeySetUnavailable
from m2m_client.verify import AsyncTokenVerifier, TokenVerifier
from tests.unit._jwt_factory import (
    AUDIENCE,
    ISSUER,
    FakeClock,
    claims,
    jwks,
    public_jwk,
    rsa_key,
    sign,
)

from ._faults import (
    CONNECTIONS,
    SLOW_FAULTS,
    Fault,
    FaultServer,
    check_connections,
    closed_port,
    first_then,
)

# The deadline a test waits out (stall, stall_headers, drip): short, as each test pays it.
TIMEOUT = 0.5
# Every other fetch (fast faults, good keys) never reaches its deadline unless something is
# broken: a long one, so a loaded CI machine's scheduling delays are not mistaken for a timeout
# (at 0.5 s, a good JWKS fetch or a redirect timed out there now and then).
FAST_TIMEOUT = 5.0
SLOW = frozenset({"stall", "stall_headers", "drip"})
SLACK = 2.0  # scheduling slack on 2 shared, loaded cores
# Four callers of one stalled fetch: a deadline long enough that four in turn (4 s) would
# exceed CONCURRENT + SLACK.
CONCURRENT = 1.0
# A verifier that must first fetch good keys, then meet a slow fault: 0.5 s was too short for
# the good fetch on a loaded machine (a new HTTP client, its SSL context, within the deadline).
WARMED = 1.0
# The slow faults last far longer than TIMEOUT + SLACK (a stall 10 s, a drip 18 s and more),
# so a caller cut at its deadline is told apart from one that waited for the server.
OIDC = "/.well-known/openid-configuration"

FAULTS = [
    ("refuse", {}),
    ("reset", {}),
    ("stall", {"delay": 10.0}),
    ("stall_headers", {"delay": 10.0}),
    ("drip", {"delay": 0.2}),
    ("garbage", {}),
    ("huge", {}),
    ("huge_chunked", {}),
    ("gzip_bomb", {}),
    ("redirect", {}),
    ("http_500", {}),
    ("not_json", {}),
]
IDS = [f[0] for f in FAULTS]


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def _timeout(mode: str) -> float:
    return TIMEOUT if mode in SLOW else FAST_TIMEOUT


def _fault(mode: str, options: dict[str, Any]) -> Fault:
    if mode == "http_500":
        return Fault(status=500, body=b"oops")
    if mode == "not_json":
        return Fault(body=b"<html>WAF says no</html>", headers={"Content-Type": "text/html"})
    return Fault(mode=mode, **options)


def _setup(
    server: FaultServer, refused: str, mode: str, options: dict[str, Any], where: str
) -> dict[str, Any]:
    """Verifier options with the fault on the JWKS (``jwks``) or the discovery (``discovery``)."""
    base = server.url if mode != "refuse" else refused
    if where == "jwks":
        server.faults["/jwks"] = _fault(mode, options)
        return {"issuer": ISSUER, "jwks_url": base + "/jwks"}
    server.faults[OIDC] = _fault(mode, options)
    server.faults["/jwks"] = Fault.json(jwks(public_jwk(rsa_key(), "k1")))
    return {"issuer": base + "/", "jwks_url": None}


@pytest.fixture
def refused() -> Iterator[str]:
    with closed_port() as url:
        yield url.rstrip("/")


def _token(issuer: str, now: float) -> str:
    return sign(claims(now, iss=issuer))


def _fetches(server: FaultServer, where: str, expected: int = 1) -> int:
    """The requests the server recorded, once it has had up to 2 s to record ``expected``.

    The server records a request when it has read it whole; when the client's deadline ends
    the request first (a loaded machine), the server thread may read it only afterwards."""
    path = "/jwks" if where == "jwks" else OIDC
    until = time.monotonic() + 2.0
    while server.count(path) < expected and time.monotonic() < until:
        time.sleep(0.01)
    return server.count(path)


@pytest.mark.parametrize("where", ["jwks", "discovery"])
@pytest.mark.parametrize(("mode", "options"), FAULTS, ids=IDS)
def test_sync_verifier_under_fault(
    server: FaultServer, refused: str, mode: str, options: dict[str, Any], where: str
) -> None:
    setup = _setup(server, refused, mode, options, where)
    expected = 0 if mode == "refuse" else 1  # requests that reach the server
    clock = FakeClock(time.time())
    timeout = _timeout(mode)
    verifier = TokenVerifier(audience=AUDIENCE, timeout=timeout, clock=clock, **setup)
    tok = _token(setup["issuer"], clock.now)
    started = time.monotonic()
    with pytest.raises(KeySetUnavailable) as caught:
        verifier.verify(tok)
    elapsed = time.monotonic() - started
    assert caught.value.reason == "keys_unavailable"
    assert elapsed < timeout + SLACK, f"{mode}: {elapsed:.2f}s against a {timeout}s timeout"
    assert _fetches(server, where, expected) == expected
    again = time.monotonic()
    with pytest.raises(KeySetUnavailable):
        verifier.verify(tok)  # within the back-off: fails fast, no second fetch
    assert time.monotonic() - again < 0.2
    assert _fetches(server, where, expected) == expected
    assert 0 < verifier.retry_after() <= 5


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["jwks", "discovery"])
@pytest.mark.parametrize(("mode", "options"), FAULTS, ids=IDS)
async def test_async_verifier_under_fault(
    server: FaultServer, refused: str, mode: str, options: dict[str, Any], where: str
) -> None:
    setup = _setup(server, refused, mode, options, where)
    expected = 0 if mode == "refuse" else 1  # requests that reach the server
    clock = FakeClock(time.time())
    timeout = _timeout(mode)
    verifier = AsyncTokenVerifier(audience=AUDIENCE, timeout=timeout, clock=clock, **setup)
    tok = _token(setup["issuer"], clock.now)
    started = time.monotonic()
    with pytest.raises(KeySetUnavailable) as caught:
        await verifier.verify(tok)
    elapsed = time.monotonic() - started
    assert caught.value.reason == "keys_unavailable"
    assert elapsed < timeout + SLACK, f"{mode}: {elapsed:.2f}s against a {timeout}s timeout"
    assert _fetches(server, where, expected) == expected
    with pytest.raises(KeySetUnavailable):
        await verifier.verify(tok)
    assert _fetches(server, where, expected) == expected


def test_sync_four_concurrent_callers_against_a_stalled_jwks_one_fetch_one_timeout(
    server: FaultServer,
) -> None:
    server.faults["/jwks"] = Fault(mode="stall", delay=10.0)
    verifier = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, jwks_url=server.url + "/jwks", timeout=CONCURRENT
    )
    tok = _token(ISSUER, time.time())
    reasons: list[str] = []

    def work() -> None:
        try:
            verifier.verify(tok)
        except KeySetUnavailable as exc:
            reasons.append(exc.reason)

    threads = [threading.Thread(target=work) for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert reasons == ["keys_unavailable"] * 4
    assert server.count("/jwks") == 1
    assert time.monotonic() - started < CONCURRENT + SLACK  # not 4 x CONCURRENT in turn


@pytest.mark.anyio
async def test_async_four_concurrent_callers_against_a_stalled_jwks_one_fetch(
    server: FaultServer,
) -> None:
    server.faults["/jwks"] = Fault(mode="stall", delay=10.0)
    verifier = AsyncTokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, jwks_url=server.url + "/jwks", timeout=CONCURRENT
    )
    tok = _token(ISSUER, time.time())
    reasons: list[str] = []

    async def work() -> None:
        try:
            await verifier.verify(tok)
        except KeySetUnavailable as exc:
            reasons.append(exc.reason)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(work)
    assert reasons == ["keys_unavailable"] * 4
    assert server.count("/jwks") == 1
    assert time.monotonic() - started < CONCURRENT + SLACK


@pytest.mark.parametrize(("mode", "options"), FAULTS[1:6], ids=IDS[1:6])
def test_cached_keys_keep_verifying_at_once_when_the_refresh_meets_a_fault(
    server: FaultServer, mode: str, options: dict[str, Any]
) -> None:
    keys = Fault.json(jwks(public_jwk(rsa_key(), "k1")))
    keys.headers["Cache-Control"] = "max-age=60"
    server.faults["/jwks"] = keys
    clock = FakeClock(time.time())
    timeout = WARMED if mode in SLOW else FAST_TIMEOUT
    verifier = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_url=server.url + "/jwks",
        timeout=timeout,
        clock=clock,
    )
    verifier.verify(_token(ISSUER, clock.now))
    server.faults["/jwks"] = _fault(mode, options)
    clock.advance(3600)  # the set expired: this caller refetches and meets the fault
    started = time.monotonic()
    assert verifier.verify(sign(claims(clock.now, jti="a"))).subject == "worker@clients"
    assert time.monotonic() - started < timeout + SLACK  # one attempt, then the stale set
    tokens = [sign(claims(clock.now, jti=f"b{i}")) for i in range(20)]  # signing is not timed
    started = time.monotonic()
    for tok in tokens:  # during the back-off: at once (not an attempt each), no fetch
        verifier.verify(tok)
    assert time.monotonic() - started < 1.0
    assert server.count("/jwks") == 2


def test_the_discovered_jwks_uri_is_refused_when_it_is_plain_http_off_loopback(
    server: FaultServer,
) -> None:
    issuer = server.url + "/"
    server.faults[OIDC] = Fault.json({"issuer": issuer, "jwks_uri": "http://keys.example.com/j"})
    verifier = TokenVerifier(issuer=issuer, audience=AUDIENCE, timeout=FAST_TIMEOUT)
    with pytest.raises(KeySetUnavailable, match=re.escape("http://keys.example.com/j")):
        verifier.verify(_token(issuer, time.time()))
    assert server.count("/j") == 0


def test_a_redirecting_jwks_is_never_followed(server: FaultServer) -> None:
    server.faults["/jwks"] = Fault(mode="redirect", location=server.url + "/evil")
    server.faults["/evil"] = Fault.json(jwks(public_jwk(rsa_key("attacker"), "k1")))
    verifier = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, jwks_url=server.url + "/jwks", timeout=FAST_TIMEOUT
    )
    with pytest.raises(KeySetUnavailable, match="redirect"):
        verifier.verify(sign(claims(time.time()), rsa_key("attacker")))
    assert server.count("/evil") == 0
    assert json.dumps(server.requests[0].headers).count("authorization") == 0


# --- The verifiers' fetches on a fresh and on a reused connection (issue 19 item 1) ---
# A caller's client keeps connections alive: the JWKS fetch reuses the discovery's, the
# second metadata URL the first's. Each fetch meets a slow fault there (reused) or on a new
# connection (fresh); verify() ends within the refresh deadline (2 x timeout) with
# KeySetUnavailable, and once the issuer answers again (after the back-off) the next
# verification fetches and passes: nothing is left holding the lock.
ENTRY_TIMEOUT = 1.0
ENTRY_BOUND = 2 * ENTRY_TIMEOUT + SLACK  # the drip's whole answer takes > 20 s
AS_METADATA = "/.well-known/oauth-authorization-server"
ENTRY_STACKS = installed()


def _entry(server: FaultServer, entry: str, fault: str, reused: bool) -> str:
    """Set the faults for ``entry`` (``jwks`` or ``discovery``); the issuer to verify for."""
    issuer, slow = server.url + "/", SLOW_FAULTS[fault]
    if entry == "jwks":  # after discovery, on its connection
        server.faults[OIDC] = _metadata(issuer, keep_alive=reused)
        server.faults["/jwks"] = slow
    else:  # the second metadata URL, after a 503 on the first
        server.faults[OIDC] = first_then(Fault(status=503, body=b""), slow, reused=reused)
        server.faults[AS_METADATA] = slow
    return issuer


def _metadata(issuer: str, keep_alive: bool = False) -> Fault:
    return Fault.json({"issuer": issuer, "jwks_uri": issuer + "jwks"}, keep_alive=keep_alive)


def _heal(server: FaultServer, issuer: str) -> None:
    server.faults[OIDC] = _metadata(issuer)
    server.faults["/jwks"] = Fault.json(jwks(public_jwk(rsa_key(), "k1")))


def _check_entry(error: KeySetUnavailable, took: float, server: FaultServer, reused: bool) -> None:
    assert error.reason == "keys_unavailable"
    assert took < ENTRY_BOUND, f"verify() took {took:.1f}s against a {ENTRY_BOUND}s bound"
    check_connections(server, reused=reused)


@pytest.mark.parametrize("stack", ENTRY_STACKS, ids=[s.name for s in ENTRY_STACKS])
@pytest.mark.parametrize("fault", sorted(SLOW_FAULTS))
@pytest.mark.parametrize("connection", CONNECTIONS)
@pytest.mark.parametrize("entry", ["jwks", "discovery"])
def test_sync_verifier_fetches_end_at_their_deadline_on_fresh_and_reused_connections(
    server: FaultServer, entry: str, connection: str, fault: str, stack: Stack
) -> None:
    reused = connection == "reused"
    issuer = _entry(server, entry, fault, reused)
    clock = FakeClock(time.time())
    with stack.Client() as http:
        verifier = TokenVerifier(
            issuer=issuer, audience=AUDIENCE, timeout=ENTRY_TIMEOUT, clock=clock, http_client=http
        )
        started = time.monotonic()
        with pytest.raises(KeySetUnavailable) as caught:
            verifier.verify(_token(issuer, clock.now))
        _check_entry(caught.value, time.monotonic() - started, server, reused)
        _heal(server, issuer)
        clock.advance(10)  # past the back-off
        started = time.monotonic()
        assert verifier.verify(_token(issuer, clock.now)).subject == "worker@clients"
        assert time.monotonic() - started < ENTRY_BOUND


@pytest.mark.anyio
@pytest.mark.parametrize("stack", ENTRY_STACKS, ids=[s.name for s in ENTRY_STACKS])
@pytest.mark.parametrize("fault", sorted(SLOW_FAULTS))
@pytest.mark.parametrize("connection", CONNECTIONS)
@pytest.mark.parametrize("entry", ["jwks", "discovery"])
async def test_async_verifier_fetches_end_at_their_deadline_on_fresh_and_reused_connections(
    server: FaultServer, entry: str, connection: str, fault: str, stack: Stack
) -> None:
    reused = connection == "reused"
    issuer = _entry(server, entry, fault, reused)
    clock = FakeClock(time.time())
    async with stack.AsyncClient() as http:
        verifier = AsyncTokenVerifier(
            issuer=issuer, audience=AUDIENCE, timeout=ENTRY_TIMEOUT, clock=clock, http_client=http
        )
        started = time.monotonic()
        with pytest.raises(KeySetUnavailable) as caught:
            await verifier.verify(_token(issuer, clock.now))
        _check_entry(caught.value, time.monotonic() - started, server, reused)
        _heal(server, issuer)
        clock.advance(10)
        started = time.monotonic()
        assert (await verifier.verify(_token(issuer, clock.now))).subject == "worker@clients"
        assert time.monotonic() - started < ENTRY_BOUND


# --- Stale keys serve while a refresh is in flight (issue 19 item 12) ---
# The key set is past its expiry and the background refresh hangs: tokens whose key is in the
# held set verify at once (the refresh is already in flight; waiting for it gains nothing
# but its outcome), on both verifiers. Before, the async verifier made each of 4 concurrent
# tokens wait for the hung refresh (the refresh task had not marked itself fetching yet).
HUNG_TIMEOUT = 4.0  # the hung refresh lasts this long; callers must not wait for it
AT_ONCE = 2.0


def _stale_with_a_hung_refresh(server: FaultServer, clock: FakeClock) -> dict[str, Any]:
    keys = Fault.json(jwks(public_jwk(rsa_key(), "k1")))
    keys.headers["Cache-Control"] = "max-age=60"
    server.faults["/jwks"] = keys
    return {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_url": server.url + "/jwks",
        "timeout": HUNG_TIMEOUT,
        "clock": clock,
    }


def test_sync_stale_keys_serve_while_the_refresh_hangs(server: FaultServer) -> None:
    clock = FakeClock(time.time())
    verifier = TokenVerifier(**_stale_with_a_hung_refresh(server, clock))
    first = _token(ISSUER, clock.now)
    verifier.verify(first)
    server.faults["/jwks"] = Fault(mode="stall_headers", delay=10.0)
    clock.advance(50)  # past refresh_at (45 s): this verification starts the refresh behind
    verifier.verify(first)
    clock.advance(20)  # past the set's expiry (60 s): stale, the refresh still hanging
    tokens = [sign(claims(clock.now, jti=f"t{i}")) for i in range(4)]
    subjects: list[str] = []
    started = time.monotonic()
    threads = [
        threading.Thread(target=lambda t=t: subjects.append(verifier.verify(t).subject))
        for t in tokens
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HUNG_TIMEOUT * 3)
    took = time.monotonic() - started
    assert subjects == ["worker@clients"] * 4
    assert took < AT_ONCE, f"4 tokens took {took:.1f}s: they waited for the hung refresh"
    assert server.count("/jwks") <= 2  # the warm-up and the one refresh in flight
    assert verifier._lock.acquire(timeout=HUNG_TIMEOUT * 3)  # the refresh ends at its deadline
    verifier._lock.release()
    assert server.count("/jwks") == 2


@pytest.mark.anyio
async def test_async_stale_keys_serve_while_the_refresh_hangs(server: FaultServer) -> None:
    clock = FakeClock(time.time())
    verifier = AsyncTokenVerifier(**_stale_with_a_hung_refresh(server, clock))
    first = _token(ISSUER, clock.now)
    await verifier.verify(first)
    server.faults["/jwks"] = Fault(mode="stall_headers", delay=10.0)
    clock.advance(50)
    await verifier.verify(first)  # starts the refresh behind, in a task of its own
    clock.advance(20)
    tokens = [sign(claims(clock.now, jti=f"t{i}")) for i in range(4)]
    subjects: list[str] = []

    async def work(token: str) -> None:
        subjects.append((await verifier.verify(token)).subject)

    started = time.monotonic()
    with anyio.fail_after(HUNG_TIMEOUT * 3):
        async with anyio.create_task_group() as tg:
            for tok in tokens:
                tg.start_soon(work, tok)
    took = time.monotonic() - started
    assert subjects == ["worker@clients"] * 4
    assert took < AT_ONCE, f"4 tokens took {took:.1f}s: they waited for the hung refresh"
    assert server.count("/jwks") <= 2
    for _ in range(int(HUNG_TIMEOUT * 3 / 0.05)):  # the refresh ends at its deadline
        if not (verifier._behind or verifier._core.keys.fetching):
            break
        await anyio.sleep(0.05)
    assert server.count("/jwks") == 2
