"""The I/O drivers against a misbehaving loopback server: every fault ends in our error, in time.

These are the guarantees every flow (token, discovery, JWKS) inherits; the token and JWKS
fault tests check what a caller of each flow sees on top. Every test runs on each installed
HTTP stack (httpx, httpx2): the ``stack`` fixture is a caller's client of that stack, or the
driver's own client when only that stack is installed.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from m2m_client._http import AsyncDriver, HttpAnswer, HttpRequest, SyncDriver, TransportFailure
from m2m_client._stacks import Stack, installed
from m2m_client.errors import ConfigurationError, InvalidTokenResponse

from ._faults import Fault, FaultServer, check_connections, closed_port

LIMIT = 64 * 1024
# Scheduling slack on 2 shared, loaded cores. The slow faults last far longer than a deadline
# plus SLACK (a stall 10 s, a drip 18 s), so a driver that waited for the server still fails.
SLACK = 2.0
SECRET = "s3cr3t-basic-credentials"


STACKS = installed()


@pytest.fixture(params=STACKS, ids=[stack.name for stack in STACKS])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def _request(url: str) -> HttpRequest:
    return HttpRequest(
        "POST",
        url,
        headers={"Authorization": f"Basic {SECRET}", "Content-Type": "x"},
        content=b"grant_type=client_credentials&client_secret=" + SECRET.encode(),
    )


def _sync(
    url: str, timeout: float = 1.0, client: Any = None, stack: Stack | None = None
) -> HttpAnswer:
    # A caller's client of `stack` (the driver's own client is the default stack's).
    if client is None and stack is not None:
        with stack.Client() as own:
            return _sync(url, timeout, own)
    driver = SyncDriver(client, timeout=timeout)
    try:
        return driver.send(_request(url), limit=LIMIT, refuse=InvalidTokenResponse)
    finally:
        driver.close()


async def _async(
    url: str, timeout: float = 1.0, client: Any = None, stack: Stack | None = None
) -> HttpAnswer:
    if client is None and stack is not None:
        async with stack.AsyncClient() as own:
            return await _async(url, timeout, own)
    driver = AsyncDriver(client, timeout=timeout)
    try:
        return await driver.send(_request(url), limit=LIMIT, refuse=InvalidTokenResponse)
    finally:
        await driver.aclose()


@dataclass(frozen=True)
class Case:
    mode: str
    options: dict[str, float]  # the Fault's other fields
    error: type[Exception]
    text: str  # in the message

    def fault(self) -> Fault:
        return Fault(mode=self.mode, **self.options)  # type: ignore[arg-type]


FAULTS = [
    Case("reset", {}, TransportFailure, "talking to"),
    Case("stall", {"delay": 10.0}, TransportFailure, "deadline"),
    Case("stall_headers", {"delay": 10.0}, TransportFailure, "deadline"),
    Case("drip", {"delay": 0.2}, TransportFailure, "deadline"),
    Case("garbage", {}, TransportFailure, "talking to"),
    Case("huge", {}, InvalidTokenResponse, "exceeds"),
    Case("huge_chunked", {}, InvalidTokenResponse, "exceeds"),
    Case("gzip_bomb", {}, InvalidTokenResponse, "exceeds"),
    Case("redirect", {}, InvalidTokenResponse, "attacker.example.net"),
]
EACH_FAULT = pytest.mark.parametrize("case", FAULTS, ids=[case.mode for case in FAULTS])


@EACH_FAULT
def test_sync_driver_fault(server: FaultServer, stack: Stack, case: Case) -> None:
    server.faults["/token"] = case.fault()
    started = time.monotonic()
    with pytest.raises(case.error) as caught:
        _sync(server.url + "/token", timeout=1.0, stack=stack)
    elapsed = time.monotonic() - started
    assert case.text in str(caught.value)
    assert elapsed < 1.0 + SLACK, (
        f"{case.mode}: the attempt took {elapsed:.2f}s against a 1s deadline"
    )
    assert server.count("/token") == 1
    assert SECRET not in str(caught.value)


@pytest.mark.anyio
@EACH_FAULT
async def test_async_driver_fault(server: FaultServer, stack: Stack, case: Case) -> None:
    server.faults["/token"] = case.fault()
    started = time.monotonic()
    with pytest.raises(case.error) as caught:
        await _async(server.url + "/token", timeout=1.0, stack=stack)
    elapsed = time.monotonic() - started
    assert case.text in str(caught.value)
    assert elapsed < 1.0 + SLACK, (
        f"{case.mode}: the attempt took {elapsed:.2f}s against a 1s deadline"
    )
    assert SECRET not in str(caught.value)


@EACH_FAULT
def test_sync_driver_fault_on_a_reused_connection(
    server: FaultServer, stack: Stack, case: Case
) -> None:
    # Issue 19 item 1: a reused keep-alive connection had no deadline (a drip held the
    # caller for as long as it lasted). The first answer keeps the connection open.
    server.faults["/warm"] = Fault.json({}, keep_alive=True)
    server.faults["/token"] = case.fault()
    with stack.Client() as client:
        assert _sync(server.url + "/warm", timeout=5.0, client=client).status == 200
        started = time.monotonic()
        with pytest.raises(case.error) as caught:
            _sync(server.url + "/token", timeout=1.0, client=client)
        elapsed = time.monotonic() - started
    assert case.text in str(caught.value)
    assert elapsed < 1.0 + SLACK, (
        f"{case.mode}: the attempt took {elapsed:.2f}s against a 1s deadline"
    )
    check_connections(server, reused=True)


@pytest.mark.anyio
@EACH_FAULT
async def test_async_driver_fault_on_a_reused_connection(
    server: FaultServer, stack: Stack, case: Case
) -> None:
    server.faults["/warm"] = Fault.json({}, keep_alive=True)
    server.faults["/token"] = case.fault()
    async with stack.AsyncClient() as client:
        assert (await _async(server.url + "/warm", timeout=5.0, client=client)).status == 200
        started = time.monotonic()
        with pytest.raises(case.error) as caught:
            await _async(server.url + "/token", timeout=1.0, client=client)
        elapsed = time.monotonic() - started
    assert case.text in str(caught.value)
    assert elapsed < 1.0 + SLACK, (
        f"{case.mode}: the attempt took {elapsed:.2f}s against a 1s deadline"
    )
    check_connections(server, reused=True)


def test_drip_is_cut_at_the_deadline_not_per_read(server: FaultServer, stack: Stack) -> None:
    # Issue 8 defect 5: a byte every 0.15 s held get_token() for 11 s with timeout=1.
    server.faults["/token"] = Fault(mode="drip", delay=0.15)
    started = time.monotonic()
    with pytest.raises(TransportFailure, match="deadline"):
        _sync(server.url + "/token", timeout=1.0, stack=stack)
    assert 0.9 < time.monotonic() - started < 1.0 + SLACK  # the whole answer takes 13 s


def test_absolute_deadline_wins_over_timeout(server: FaultServer, stack: Stack) -> None:
    server.faults["/token"] = Fault(mode="stall", delay=10.0)
    driver = SyncDriver(stack.Client(), timeout=10.0)
    started = time.monotonic()
    with pytest.raises(TransportFailure, match="deadline"):
        driver.send(
            _request(server.url + "/token"),
            limit=LIMIT,
            refuse=InvalidTokenResponse,
            deadline=time.monotonic() + 0.5,
        )
    assert time.monotonic() - started < 0.5 + SLACK  # not the 10 s timeout
    with pytest.raises(TransportFailure, match="deadline"):
        driver.send(
            _request(server.url + "/token"),
            limit=LIMIT,
            refuse=InvalidTokenResponse,
            deadline=time.monotonic() - 1,
        )
    driver.close()


def test_refused_connection(stack: Stack) -> None:
    with closed_port() as url, pytest.raises(TransportFailure, match="ConnectError"):
        _sync(url + "/token", stack=stack)


@pytest.mark.anyio
async def test_refused_connection_async(stack: Stack) -> None:
    with closed_port() as url, pytest.raises(TransportFailure, match="ConnectError"):
        await _async(url + "/token", stack=stack)


def test_caller_client_redirects_auth_headers_and_cookies_are_ignored(
    server: FaultServer, stack: Stack
) -> None:
    # Issue 8 defect 4: a caller's client with follow_redirects=True re-POSTed the secret.
    server.faults["/token"] = Fault(mode="redirect", location=server.url + "/elsewhere")
    server.faults["/elsewhere"] = Fault.json({"ok": True})
    client = stack.Client(
        follow_redirects=True,
        auth=("user", "their-own-password"),
        headers={"X-Api-Key": "their-own-key"},
        cookies={"session": "their-session"},
    )
    with client, pytest.raises(InvalidTokenResponse, match="never followed"):
        _sync(server.url + "/token", client=client)
    assert server.count("/elsewhere") == 0
    sent = server.requests[0].headers
    assert sent["authorization"] == f"Basic {SECRET}"
    assert "x-api-key" not in sent
    assert "cookie" not in sent
    assert sent["accept-encoding"] == "identity"


@pytest.mark.anyio
async def test_caller_async_client_redirect_is_refused(server: FaultServer, stack: Stack) -> None:
    server.faults["/token"] = Fault(mode="redirect", location=server.url + "/elsewhere")
    async with stack.AsyncClient(follow_redirects=True, auth=("u", "p")) as client:
        with pytest.raises(InvalidTokenResponse, match="redirect"):
            await _async(server.url + "/token", client=client)
    assert server.count("/elsewhere") == 0
    assert server.requests[0].headers["authorization"] == f"Basic {SECRET}"


def test_plain_http_to_a_remote_host_is_refused_before_sending() -> None:
    with pytest.raises(InvalidTokenResponse, match="https"):
        _sync("http://idp.example.com/token")


def test_invalid_url_is_ours_not_httpx() -> None:
    with pytest.raises(InvalidTokenResponse, match="invalid host or port"):
        _sync("https://idp.example.com:99999/token")


def test_small_gzip_body_is_inflated(server: FaultServer, stack: Stack) -> None:
    import gzip

    body = b'{"access_token": "abc"}'
    server.faults["/token"] = Fault(body=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert _sync(server.url + "/token", stack=stack).body == body


def test_unknown_encoding_is_refused(server: FaultServer, stack: Stack) -> None:
    server.faults["/token"] = Fault(body=b"??", headers={"Content-Encoding": "br"})
    with pytest.raises(InvalidTokenResponse, match="content-encoding"):
        _sync(server.url + "/token", stack=stack)


def test_error_statuses_come_back_as_answers(server: FaultServer, stack: Stack) -> None:
    server.faults["/token"] = Fault.json({"error": "invalid_client"}, status=401)
    answer = _sync(server.url + "/token", stack=stack)
    assert answer.status == 401
    assert b"invalid_client" in answer.body
    assert answer.headers["content-type"] == "application/json"


def test_transport_failure_holds_no_httpx_frames(server: FaultServer, stack: Stack) -> None:
    # Issue 8 defect 9: __cause__/__context__ chains kept frames whose locals held the
    # Basic header and the form body.
    server.faults["/token"] = Fault(mode="reset")
    with pytest.raises(TransportFailure) as caught:
        _sync(server.url + "/token", stack=stack)
    error = caught.value
    assert error.__cause__ is None
    assert error.__context__ is None
    rendered = "".join(traceback.format_exception(error))
    assert SECRET not in rendered
    frames = traceback.walk_tb(error.__traceback__)
    for frame, _ in frames:
        for value in frame.f_locals.values():
            assert not isinstance(value, stack.Request), "a Request is still reachable"
    gc.collect()


def test_send_after_close_is_a_clear_error(server: FaultServer) -> None:
    server.faults["/token"] = Fault.json({})
    driver = SyncDriver(timeout=1.0)
    assert driver.send(_request(server.url + "/token"), limit=LIMIT, refuse=InvalidTokenResponse)
    driver.close()
    with pytest.raises(ConfigurationError, match="closed"):
        driver.send(_request(server.url + "/token"), limit=LIMIT, refuse=InvalidTokenResponse)


def test_status_hook_of_a_caller_client_does_not_turn_4xx_into_a_transport_error(
    server: FaultServer, stack: Stack
) -> None:
    server.faults["/token"] = Fault.json({"error": "invalid_client"}, status=401)
    client = stack.Client(event_hooks={"response": [lambda r: r.raise_for_status()]})
    with client:
        answer = _sync(server.url + "/token", client=client)
    assert answer.status == 401


def test_non_persistent_driver_closes_its_client_each_time(server: FaultServer) -> None:
    server.faults["/jwks"] = Fault.json({"keys": []})
    driver = SyncDriver(timeout=1.0, persistent=False)
    for _ in range(3):
        assert (
            driver.send(
                _request(server.url + "/jwks"), limit=LIMIT, refuse=InvalidTokenResponse
            ).status
            == 200
        )
    assert driver._client is None


def test_sync_deadlines_share_one_thread(server: FaultServer) -> None:
    # A thread per attempt cost ~0.7 ms and ~3 KiB each; one daemon thread serves them all.
    import threading

    server.faults["/token"] = Fault.json({})
    driver = SyncDriver(timeout=5.0)
    for _ in range(20):
        driver.send(_request(server.url + "/token"), limit=LIMIT, refuse=InvalidTokenResponse)
    driver.close()
    threads = threading.enumerate()
    assert not any(isinstance(t, threading.Timer) for t in threads)
    assert [t.name for t in threads].count("m2m-client-deadlines") == 1


# --- HTTP/2: one connection, many requests (issue 19 item 7) ---
# The sync deadline used to shut the socket: on a caller's HTTP/2 client the socket carries
# every request to that origin, so a late token request killed a concurrent download; and a
# late request on an HTTP/2 connection someone else had opened had no deadline at all. Now
# only the late request's stream is cut: it ends at its deadline, the download completes.
H2_CHUNKS, H2_INTERVAL = 40, 0.1  # the download lasts 4 s, well past the 1 s deadline


def _download(client: Any, url: str, into: list[object]) -> None:
    try:
        into.append(len(client.get(url + "/download").content))
    except Exception as exc:  # what the test reports
        into.append(exc)


@pytest.mark.parametrize("order", ["late_request_first", "download_first", "alone"])
def test_sync_deadline_on_a_shared_http2_connection_cuts_only_the_late_request(
    stack: Stack, order: str
) -> None:
    import threading

    from ._faults import H2Server

    with H2Server(H2_CHUNKS, H2_INTERVAL) as h2, stack.Client(http1=False, http2=True) as client:
        downloaded: list[object] = []
        downloader = threading.Thread(target=_download, args=(client, h2.url, downloaded))
        if order == "download_first":
            downloader.start()
            while "/download" not in h2.paths and downloader.is_alive():
                time.sleep(0.01)
        elif order == "late_request_first":
            threading.Timer(0.3, downloader.start).start()
        started = time.monotonic()
        with pytest.raises(TransportFailure, match="deadline"):
            _sync(h2.url + "/stall", timeout=1.0, client=client)
        elapsed = time.monotonic() - started
        if order != "alone":
            downloader.join(H2_CHUNKS * H2_INTERVAL + 10)
            assert downloaded == [H2_CHUNKS * 1024], "the concurrent download was cut"
            assert h2.connections == 1  # one shared connection
    assert elapsed < 1.0 + SLACK, f"the late request took {elapsed:.2f}s against a 1s deadline"


@pytest.mark.anyio
@pytest.mark.parametrize("order", ["late_request_first", "download_first"])
async def test_async_deadline_on_a_shared_http2_connection_cuts_only_the_late_request(
    stack: Stack, order: str
) -> None:
    import anyio

    from ._faults import H2Server

    downloaded: list[int] = []

    async def download(client: Any) -> None:
        downloaded.append(len((await client.get(h2.url + "/download")).content))

    with H2Server(H2_CHUNKS, H2_INTERVAL) as h2:
        async with (
            stack.AsyncClient(http1=False, http2=True) as client,
            anyio.create_task_group() as tg,
        ):
            if order == "download_first":
                tg.start_soon(download, client)
                for _ in range(500):  # until its request is on the connection
                    if "/download" in h2.paths:
                        break
                    await anyio.sleep(0.01)
            else:
                tg.start_soon(_later, 0.3, download, client)
            started = time.monotonic()
            with pytest.raises(TransportFailure, match="deadline"):
                await _async(h2.url + "/stall", timeout=1.0, client=client)
            elapsed = time.monotonic() - started
    assert downloaded == [H2_CHUNKS * 1024]
    assert h2.connections == 1
    assert elapsed < 1.0 + SLACK


def test_sync_deadline_on_a_silent_http2_connection_shuts_it_after_the_grace(
    stack: Stack,
) -> None:
    # The late request waits for the connection's reader: another request, blocked in a
    # read with a 30 s timeout on a connection that delivers nothing. Cutting the stream
    # cannot wake it; H2_SILENT_GRACE after its deadline the silent connection is shut (the
    # other request ends too: nothing was arriving for it either).
    import threading

    from m2m_client._http import H2_SILENT_GRACE

    from ._faults import H2Server

    with H2Server() as h2, stack.Client(http1=False, http2=True, timeout=30) as client:
        other: list[object] = []
        reader = threading.Thread(target=lambda: other.append(_try_get(client, h2.url + "/stall")))
        reader.start()
        while "/stall" not in h2.paths:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(TransportFailure):
            _sync(h2.url + "/stall", timeout=1.0, client=client)
        elapsed = time.monotonic() - started
        reader.join(15)
    assert elapsed < 1.0 + H2_SILENT_GRACE + SLACK, f"{elapsed:.2f}s"
    assert len(other) == 1
    assert isinstance(other[0], stack.module.TransportError)


def _try_get(client: Any, url: str) -> object:
    try:
        return client.get(url)
    except Exception as exc:  # what the test reports
        return exc


async def _later(delay: float, function: Any, *args: Any) -> None:
    import anyio

    await anyio.sleep(delay)
    await function(*args)
