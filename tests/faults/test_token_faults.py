"""The token clients against a misbehaving token endpoint on 127.0.0.1, sync and async.

For each fault: what the caller sees (one of our errors), how many requests reached the
server, and how long the caller waited. Budget for every case: 2 attempts, 0.5 s each where the
test waits the deadline out (stall, stall_headers, drip) and 5 s for the others (never reached
unless something is broken: a loaded CI machine's scheduling delays are not a timeout), within
``max_total_seconds=5``. The slow faults last far longer than that (a stall 10 s, a drip 20 s).
"""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from m2m_client import (
    AsyncTokenClient,
    ClientCredentials,
    InvalidTokenResponse,
    RetryPolicy,
    TokenClient,
    TokenEndpointUnavailable,
    TokenError,
)
from m2m_client._stacks import Stack, installed

from ._faults import (
    CONNECTIONS,
    SLOW_FAULTS,
    Fault,
    FaultServer,
    check_connections,
    closed_port,
    first_then,
)

SECRET = "fault-suite-secret-7e1"
SLOW_TIMEOUT = 0.5  # per attempt, for the faults whose deadline the test waits out
FAST_TIMEOUT = 5.0  # per attempt, for the others
MAX_TOTAL = 5.0
RETRY = RetryPolicy(max_attempts=2, initial_backoff=0.05, jitter=False, max_total_seconds=MAX_TOTAL)
SLACK = 2.0  # scheduling slack on 2 shared, loaded cores
BOUND = MAX_TOTAL + SLACK  # nobody waits longer
GOOD = {"access_token": "tok-fault", "token_type": "Bearer", "expires_in": 300}


@dataclass(frozen=True)
class Case:
    fault: Fault
    error: type[TokenError]
    requests: int  # requests that reached the server
    says: str = ""
    timeout: float = FAST_TIMEOUT  # per attempt


def _fault(base: Fault, **changes: Any) -> Fault:
    return Fault(**{**base.__dict__, **changes})


CASES: dict[str, Case] = {
    "reset": Case(Fault(mode="reset"), TokenEndpointUnavailable, 2),
    "stall": Case(
        Fault(mode="stall", delay=10), TokenEndpointUnavailable, 2, "deadline", SLOW_TIMEOUT
    ),
    "stall_headers": Case(
        Fault(mode="stall_headers", delay=10), TokenEndpointUnavailable, 2, "", SLOW_TIMEOUT
    ),
    "drip": Case(
        _fault(Fault.json(GOOD), mode="drip", delay=0.15),
        TokenEndpointUnavailable,
        2,
        "deadline",
        SLOW_TIMEOUT,
    ),
    "garbage": Case(Fault(mode="garbage"), TokenEndpointUnavailable, 2),
    "huge": Case(Fault(mode="huge"), InvalidTokenResponse, 1, "exceeds"),
    "huge_chunked": Case(Fault(mode="huge_chunked"), InvalidTokenResponse, 1, "exceeds"),
    "gzip_bomb": Case(Fault(mode="gzip_bomb"), InvalidTokenResponse, 1, "exceeds"),
    "redirect": Case(Fault(mode="redirect"), InvalidTokenResponse, 1, "attacker.example.net"),
    "html_404": Case(
        Fault(status=404, body=b"<html>Not Found</html>", headers={"Content-Type": "text/html"}),
        InvalidTokenResponse,
        1,
        "HTTP 404",
    ),
    "waf_403": Case(
        Fault(
            status=403, body=b"<html>Request blocked</html>", headers={"Content-Type": "text/html"}
        ),
        InvalidTokenResponse,
        1,
        "HTTP 403",
    ),
    "503_garbage_retry_after": Case(
        Fault(status=503, body=b"", headers={"Retry-After": "\u00b2"}),
        TokenEndpointUnavailable,
        2,
        "HTTP 503",
    ),
}


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def _creds(url: str, timeout: float = FAST_TIMEOUT) -> ClientCredentials:
    return ClientCredentials(
        token_url=f"{url}/token", client_id="worker", client_secret=SECRET, timeout=timeout
    )


def _check(case: Case, error: BaseException, server: FaultServer | None, took: float) -> None:
    assert type(error) is case.error or isinstance(error, case.error), repr(error)
    assert case.says in str(error)
    assert SECRET not in str(error)
    if server is not None:
        assert server.count("/token") == case.requests
    assert took < BOUND


@pytest.mark.parametrize("name", sorted(CASES))
def test_sync_client_through_each_fault(name: str, server: FaultServer) -> None:
    case = CASES[name]
    server.faults["/token"] = case.fault
    with TokenClient(_creds(server.url, case.timeout), retry=RETRY) as tokens:
        started = time.monotonic()
        with pytest.raises(TokenError) as info:
            tokens.get_token()
        took = time.monotonic() - started
        _check(case, info.value, server, took)
        # The same failure is not repeated by the next caller (negative cache).
        with pytest.raises(case.error):
            tokens.get_token()
        assert server.count("/token") == case.requests


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(CASES))
async def test_async_client_through_each_fault(name: str, server: FaultServer) -> None:
    case = CASES[name]
    server.faults["/token"] = case.fault
    async with AsyncTokenClient(_creds(server.url, case.timeout), retry=RETRY) as tokens:
        started = time.monotonic()
        with pytest.raises(TokenError) as info:
            await tokens.get_token()
        took = time.monotonic() - started
        _check(case, info.value, server, took)
        with pytest.raises(case.error):
            await tokens.get_token()
        assert server.count("/token") == case.requests


def test_sync_refused_connection_is_unavailable_after_the_retries() -> None:
    with closed_port() as url, TokenClient(_creds(url), retry=RETRY) as tokens:
        started = time.monotonic()
        with pytest.raises(TokenEndpointUnavailable) as info:
            tokens.get_token()
    assert info.value.attempts == 2
    assert time.monotonic() - started < BOUND


@pytest.mark.anyio
async def test_async_refused_connection_is_unavailable_after_the_retries() -> None:
    with closed_port() as url:
        async with AsyncTokenClient(_creds(url), retry=RETRY) as tokens:
            started = time.monotonic()
            with pytest.raises(TokenEndpointUnavailable) as info:
                await tokens.get_token()
    assert info.value.attempts == 2
    assert time.monotonic() - started < BOUND


def test_max_total_seconds_bounds_the_attempt_in_progress(server: FaultServer) -> None:
    # Before: timeout=1 bounded each read, and a dripping server held get_token() for 11 s;
    # max_total_seconds=2 let a call run 2.6 s. Here: per-attempt timeout 30 s, total 1 s.
    server.faults["/token"] = _fault(Fault.json(GOOD), mode="drip", delay=0.15)
    retry = RetryPolicy(max_attempts=5, initial_backoff=0.05, jitter=False, max_total_seconds=1)
    with TokenClient(_creds(server.url, timeout=30), retry=retry) as tokens:
        started = time.monotonic()
        with pytest.raises(TokenEndpointUnavailable):
            tokens.get_token()
    assert time.monotonic() - started < 1.0 + SLACK  # the drip's answer takes 20 s
    assert server.count("/token") == 1


@pytest.mark.anyio
async def test_async_max_total_seconds_bounds_the_attempt_in_progress(server: FaultServer) -> None:
    server.faults["/token"] = _fault(Fault.json(GOOD), mode="drip", delay=0.15)
    retry = RetryPolicy(max_attempts=5, initial_backoff=0.05, jitter=False, max_total_seconds=1)
    async with AsyncTokenClient(_creds(server.url, timeout=30), retry=retry) as tokens:
        started = time.monotonic()
        with pytest.raises(TokenEndpointUnavailable):
            await tokens.get_token()
    assert time.monotonic() - started < 1.0 + SLACK  # the drip's answer takes 20 s
    assert server.count("/token") == 1


def test_a_redirect_never_carries_the_secret_anywhere(server: FaultServer) -> None:
    server.faults["/token"] = Fault(mode="redirect", location=f"{server.url}/collect")
    with (
        TokenClient(_creds(server.url), retry=RETRY) as tokens,
        pytest.raises(InvalidTokenResponse),
    ):
        tokens.get_token()
    assert server.count("/collect") == 0
    assert server.count("/token") == 1


@pytest.mark.anyio
async def test_waiters_on_a_stalled_flight_all_return_within_the_bound(server: FaultServer) -> None:
    server.faults["/token"] = Fault(mode="stall_headers", delay=10)
    retry = RetryPolicy(max_attempts=2, initial_backoff=0.05, jitter=False, max_total_seconds=2)
    async with AsyncTokenClient(_creds(server.url, timeout=30), retry=retry) as tokens:
        errors: list[BaseException] = []

        async def call() -> None:
            try:
                await tokens.get_token()
            except TokenError as exc:
                errors.append(exc)

        started = time.monotonic()
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(call)
    assert len(errors) == 50
    assert time.monotonic() - started < 2 + SLACK  # max_total_seconds; the stall lasts 10 s
    assert server.count("/token") == 1


def test_a_callers_client_following_redirects_still_never_follows_one(server: FaultServer) -> None:
    # Before: http_client=httpx.Client(follow_redirects=True) re-POSTed the secret to the
    # redirect target, even over plain http.
    server.faults["/token"] = Fault(mode="redirect", location=f"{server.url}/collect")
    http = httpx.Client(follow_redirects=True)
    with (
        TokenClient(_creds(server.url), http_client=http, retry=RETRY) as tokens,
        pytest.raises(InvalidTokenResponse, match="/collect"),
    ):
        tokens.get_token()
    assert server.count("/collect") == 0
    http.close()


def _frames_holding_the_secret(error: BaseException) -> list[str]:
    """Frames reachable from ``error`` (its tracebacks, causes, contexts) whose locals hold
    the secret: in a string, a header or a request body."""
    basic = base64.b64encode(f"worker:{SECRET}".encode()).decode()
    found: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        todo += [exc.__cause__, exc.__context__, getattr(exc, "last_cause", None)]
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            for name, value in frame.f_locals.items():
                texts = [repr(value)]
                for attr in ("headers", "content"):
                    inner = getattr(value, attr, None)
                    if isinstance(inner, dict | bytes | httpx.Headers):
                        texts.append(repr(dict(inner) if isinstance(inner, dict) else inner))
                if any(SECRET in t or basic in t for t in texts):
                    found.append(f"{frame.f_code.co_name}:{name}")
            tb = tb.tb_next
    return found


@pytest.mark.parametrize(
    "name", ["reset", "garbage", "stall", "503_garbage_retry_after", "redirect", "huge"]
)
def test_no_frame_reachable_from_the_error_holds_the_secret(name: str, server: FaultServer) -> None:
    case = CASES[name]
    server.faults["/token"] = case.fault
    with (
        TokenClient(_creds(server.url, case.timeout), retry=RETRY) as tokens,
        pytest.raises(TokenError) as info,
    ):
        tokens.get_token()
    assert _frames_holding_the_secret(info.value) == []


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["reset", "redirect"])
async def test_async_no_frame_reachable_from_the_error_holds_the_secret(
    name: str, server: FaultServer
) -> None:
    server.faults["/token"] = CASES[name].fault
    async with AsyncTokenClient(_creds(server.url), retry=RETRY) as tokens:
        with pytest.raises(TokenError) as info:
            await tokens.get_token()
    assert _frames_holding_the_secret(info.value) == []


# --- Every network entry point of the token clients, on a fresh and on a reused connection ---
# Issue 19 item 1: on a reused keep-alive connection the sync deadline never fired (the
# watchdog learned sockets from connect events only): a dripping token endpoint held
# get_token() 84 s with timeout=1 and max_total_seconds=3, and its flight was never cleared.
# Each entry point is met by a slow fault after an earlier answer of the same flow, on that
# answer's connection (reused) or on a new one (fresh); the call ends within its budget with
# our error, and the next call (the fault gone) gets a token: nothing is left in flight.
OIDC = "/.well-known/openid-configuration"
ENTRY_TIMEOUT = 1.0  # per attempt
ENTRY_RETRY = RetryPolicy(
    max_attempts=2,  # one for the 503 of token_retry and discovery; else one is enough
    initial_backoff=0.05,
    jitter=False,
    max_total_seconds=3.0,
    negative_cache_seconds=0,  # the second call asks again: it shows the flight was cleared
)
ENTRY_BOUND = ENTRY_RETRY.max_total_seconds + SLACK  # the drip's whole answer takes > 20 s
ENTRY_POINTS = ("token", "token_retry", "discovery", "dpop_nonce")
ENTRY_STACKS = installed()


def _retry(entry: str) -> RetryPolicy:
    if entry in ("token_retry", "discovery"):
        return ENTRY_RETRY
    return dataclasses.replace(ENTRY_RETRY, max_attempts=1)


def _entry(server: FaultServer, entry: str, fault: str, reused: bool) -> ClientCredentials:
    """Credentials whose flow meets ``fault`` at ``entry`` after an earlier answer."""
    slow, url = SLOW_FAULTS[fault], server.url
    metadata = Fault.json({"issuer": url, "token_endpoint": f"{url}/token"}, keep_alive=reused)
    options: dict[str, Any] = {"client_id": "worker", "client_secret": SECRET}
    if entry == "token":  # the token request after discovery (on its connection)
        server.faults[OIDC] = metadata
        server.faults["/token"] = slow
        options["issuer"] = url
    elif entry == "token_retry":  # the retry after a 503
        server.faults["/token"] = first_then(Fault(status=503, body=b""), slow, reused=reused)
        options["token_url"] = f"{url}/token"
    elif entry == "discovery":  # the retry of a metadata request after a 503
        server.faults[OIDC] = first_then(Fault(status=503, body=b""), slow, reused=reused)
        options["issuer"] = url
    else:  # dpop_nonce: the token request re-sent at once with the server's DPoP nonce
        challenge = Fault.json({"error": "use_dpop_nonce"}, status=400, **{"DPoP-Nonce": "n-1"})
        server.faults["/token"] = first_then(challenge, slow, reused=reused)
        options.update(token_url=f"{url}/token", dpop=True)
    return ClientCredentials(timeout=ENTRY_TIMEOUT, **options)


def _heal(server: FaultServer, entry: str) -> None:
    url = server.url
    server.faults[OIDC] = Fault.json({"issuer": url, "token_endpoint": f"{url}/token"})
    token_type = "DPoP" if entry == "dpop_nonce" else "Bearer"
    server.faults["/token"] = Fault.json({**GOOD, "token_type": token_type})


def _check_entry(error: BaseException, took: float, server: FaultServer, reused: bool) -> None:
    assert isinstance(error, TokenError), repr(error)
    assert SECRET not in str(error)
    assert took < ENTRY_BOUND, f"the call took {took:.1f}s against a {ENTRY_BOUND}s bound"
    check_connections(server, reused=reused)


@pytest.mark.parametrize("stack", ENTRY_STACKS, ids=[s.name for s in ENTRY_STACKS])
@pytest.mark.parametrize("fault", sorted(SLOW_FAULTS))
@pytest.mark.parametrize("connection", CONNECTIONS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_sync_every_entry_point_ends_at_its_deadline_on_fresh_and_reused_connections(
    server: FaultServer, entry: str, connection: str, fault: str, stack: Stack
) -> None:
    reused = connection == "reused"
    creds = _entry(server, entry, fault, reused)
    with (
        stack.Client() as http,
        TokenClient(creds, http_client=http, retry=_retry(entry)) as tokens,
    ):
        started = time.monotonic()
        with pytest.raises(TokenError) as info:
            tokens.get_token()
        _check_entry(info.value, time.monotonic() - started, server, reused)
        _heal(server, entry)
        started = time.monotonic()
        assert tokens.get_token().access_token == GOOD["access_token"]  # not stranded
        assert time.monotonic() - started < ENTRY_BOUND


@pytest.mark.anyio
@pytest.mark.parametrize("stack", ENTRY_STACKS, ids=[s.name for s in ENTRY_STACKS])
@pytest.mark.parametrize("fault", sorted(SLOW_FAULTS))
@pytest.mark.parametrize("connection", CONNECTIONS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
async def test_async_every_entry_point_ends_at_its_deadline_on_fresh_and_reused_connections(
    server: FaultServer, entry: str, connection: str, fault: str, stack: Stack
) -> None:
    reused = connection == "reused"
    creds = _entry(server, entry, fault, reused)
    async with (
        stack.AsyncClient() as http,
        AsyncTokenClient(creds, http_client=http, retry=_retry(entry)) as tokens,
    ):
        started = time.monotonic()
        with pytest.raises(TokenError) as info:
            await tokens.get_token()
        _check_entry(info.value, time.monotonic() - started, server, reused)
        _heal(server, entry)
        started = time.monotonic()
        assert (await tokens.get_token()).access_token == GOOD["access_token"]
        assert time.monotonic() - started < ENTRY_BOUND
