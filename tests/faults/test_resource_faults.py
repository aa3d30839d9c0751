"""discover_resource / adiscover_resource against a misbehaving API on 127.0.0.1.

For each fault: the caller gets a ResourceMetadataError (a DiscoveryError), within the
discovery's ``timeout`` (retries included) plus scheduling slack, after the number of requests
the retry policy allows; a redirect is never followed. Sync, asyncio and trio; on a fresh
connection, and on a keep-alive one the caller's own client opened before.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from m2m_client import ResourceMetadata, adiscover_resource, discover_resource
from m2m_client._stacks import Stack, installed
from m2m_client.errors import ResourceMetadataError

from ._faults import CONNECTIONS, SLOW_FAULTS, Fault, FaultServer, closed_port

WELL_KNOWN = "/.well-known/oauth-protected-resource"
MODES = ["sync", "asyncio", "trio"]
TIMEOUT = 1.5  # the whole discovery, for the faults whose deadline the test waits out
SLACK = 3.0  # scheduling slack on 2 shared, loaded cores


def discover(mode: str, resource: str, **options: Any) -> ResourceMetadata:
    if mode == "sync":
        return discover_resource(resource, **options)
    return anyio.run(functools.partial(adiscover_resource, resource, **options), backend=mode)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def document(server: FaultServer) -> dict[str, Any]:
    return {"resource": server.url, "authorization_servers": ["https://tenant.example.com/"]}


# (fault, requests that reach the server, what the message says)
CASES: dict[str, tuple[Fault, int, str]] = {
    "redirect": (Fault(mode="redirect"), 1, "redirects are never followed"),
    "huge": (Fault(mode="huge"), 1, "exceeds"),
    "huge_chunked": (Fault(mode="huge_chunked"), 1, "exceeds"),
    "gzip_bomb": (Fault(mode="gzip_bomb"), 1, "exceeds"),
    "html_200": (Fault(body=b"<html>hi</html>", headers={"Content-Type": "text/html"}), 1, "JSON"),
    "html_404": (Fault(status=404, body=b"<html>no</html>"), 1, "HTTP 404"),
    "reset": (Fault(mode="reset"), 3, "3 attempt"),
    "garbage": (Fault(mode="garbage"), 3, "3 attempt"),
    "503": (Fault(status=503, body=b""), 3, "HTTP 503"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_fault_is_a_typed_error_after_a_bounded_number_of_requests(
    name: str, mode: str, server: FaultServer
) -> None:
    fault, requests, says = CASES[name]
    server.faults[WELL_KNOWN] = fault
    started = time.monotonic()
    with pytest.raises(ResourceMetadataError, match=says):
        discover(mode, server.url, timeout=10)
    assert time.monotonic() - started < 10 + SLACK
    assert server.count(WELL_KNOWN) == requests


@pytest.mark.parametrize("mode", MODES)
def test_a_redirect_to_a_good_document_elsewhere_is_not_followed(mode: str) -> None:
    # The API's well-known path sends the client to a document of someone else's choosing.
    with FaultServer() as api, FaultServer() as elsewhere:
        elsewhere.faults[WELL_KNOWN] = Fault.json(document(api))
        api.faults[WELL_KNOWN] = Fault(mode="redirect", location=f"{elsewhere.url}{WELL_KNOWN}")
        with pytest.raises(ResourceMetadataError, match=elsewhere.url):
            discover(mode, api.url)
    assert elsewhere.requests == []


@pytest.mark.parametrize("mode", MODES)
def test_a_transient_failure_is_retried_and_then_the_document_read(
    mode: str, server: FaultServer
) -> None:
    server.faults[WELL_KNOWN] = [
        Fault(status=503, body=b"", headers={"Retry-After": "0"}),
        Fault.json(document(server)),
    ]
    api = discover(mode, server.url)
    assert api.authorization_servers == ("https://tenant.example.com/",)
    assert server.count(WELL_KNOWN) == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_wait_longer_than_the_timeout_fails_at_once(mode: str, server: FaultServer) -> None:
    server.faults[WELL_KNOWN] = Fault(status=429, body=b"", headers={"Retry-After": "3600"})
    started = time.monotonic()
    with pytest.raises(ResourceMetadataError, match="3600"):
        discover(mode, server.url, timeout=5)
    assert time.monotonic() - started < SLACK
    assert server.count(WELL_KNOWN) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_refused_connection_is_a_typed_error(mode: str) -> None:
    with closed_port() as url, pytest.raises(ResourceMetadataError, match="attempt"):
        discover(mode, url, timeout=5)


@pytest.mark.parametrize("connection", CONNECTIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SLOW_FAULTS))
def test_a_slow_api_is_cut_off_at_the_discovery_timeout(
    name: str, mode: str, connection: str, server: FaultServer
) -> None:
    server.faults["/warm"] = Fault(keep_alive=True)
    server.faults[WELL_KNOWN] = SLOW_FAULTS[name]
    reused = connection == "reused"

    def sync() -> None:
        with httpx.Client() as http:
            if reused:
                http.get(f"{server.url}/warm")
            discover_resource(server.url, timeout=TIMEOUT, http_client=http if reused else None)

    async def asynchronous() -> None:
        async with httpx.AsyncClient() as http:
            if reused:
                await http.get(f"{server.url}/warm")
            await adiscover_resource(
                server.url, timeout=TIMEOUT, http_client=http if reused else None
            )

    started = time.monotonic()
    with pytest.raises(ResourceMetadataError, match=r"deadline|attempt"):
        sync() if mode == "sync" else anyio.run(asynchronous, backend=mode)
    assert time.monotonic() - started < TIMEOUT + SLACK  # the drip's answer takes 10+ s
    if reused:  # the discovery met the fault on the connection the caller's client kept
        first = next(r for r in server.requests if r.path == WELL_KNOWN)
        assert first.connection == server.requests[0].connection


def test_a_callers_client_adds_no_redirects_auth_headers_or_status_hooks(
    server: FaultServer,
) -> None:
    # The caller's client follows redirects, authenticates, sends default headers and raises
    # for status in a hook: none of it applies to the discovery, and no httpx error escapes.
    with FaultServer() as elsewhere:
        server.faults[WELL_KNOWN] = Fault(mode="redirect", location=f"{elsewhere.url}/x")
        with httpx.Client(
            follow_redirects=True,
            auth=("user", "caller-password"),
            headers={"X-Api-Key": "caller-key"},
            event_hooks={"response": [lambda r: r.raise_for_status()]},
        ) as http:
            with pytest.raises(ResourceMetadataError, match="redirect"):
                discover_resource(server.url, http_client=http)
            server.faults[WELL_KNOWN] = Fault(status=404, body=b"")
            with pytest.raises(ResourceMetadataError, match="HTTP 404"):
                discover_resource(server.url, http_client=http)
        assert elsewhere.requests == []
    for request in server.requests:
        assert "authorization" not in request.headers
        assert "x-api-key" not in request.headers


def test_a_client_of_the_wrong_kind_is_a_configuration_error() -> None:
    from m2m_client.errors import ConfigurationError

    with httpx.Client() as sync_client, pytest.raises(ConfigurationError):
        anyio.run(
            functools.partial(
                adiscover_resource, "https://api.example.com", http_client=sync_client
            )
        )

    async def with_async_client() -> None:
        async with httpx.AsyncClient() as async_client:
            with pytest.raises(ConfigurationError):
                discover_resource("https://api.example.com", http_client=async_client)

    anyio.run(with_async_client)


@pytest.mark.parametrize("stack", installed(), ids=lambda stack: stack.name)
def test_a_callers_client_of_either_stack_reads_the_document(
    stack: Stack, server: FaultServer
) -> None:
    server.faults[WELL_KNOWN] = Fault.json(document(server))
    with stack.Client() as http:
        assert discover_resource(server.url, http_client=http).resource == server.url

    async def asynchronous() -> ResourceMetadata:
        async with stack.AsyncClient() as client:
            return await adiscover_resource(server.url, http_client=client)

    assert anyio.run(asynchronous).resource == server.url
    assert server.count(WELL_KNOWN) == 2
