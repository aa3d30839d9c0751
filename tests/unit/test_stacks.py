"""Which HTTP stacks are installed, which one an object belongs to, and which clients work.

The checks here are what makes "mixing stacks" a ConfigurationError when a token client or
verifier is built, rather than an AssertionError or TypeError at its first request.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import pytest

from m2m_client import _stacks
from m2m_client._http import AsyncDriver, HttpRequest, SyncDriver, async_driver, sync_driver
from m2m_client._stacks import Stack, check_client, installed, stack_of
from m2m_client.errors import ConfigurationError, InvalidTokenResponse
from tests._stack_guard import hidden, need

STACKS = installed()
IDS = [stack.name for stack in STACKS]


def _stack(name: str) -> Stack:
    need(name)
    return next(stack for stack in STACKS if stack.name == name)


@pytest.fixture(params=STACKS, ids=IDS)
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.param  # type: ignore[no-any-return]


def test_installed_stacks_are_the_importable_ones_httpx_first() -> None:
    names = [stack.name for stack in STACKS]
    expected = [
        name
        for name in ("httpx", "httpx2")
        if not hidden(name) and importlib.util.find_spec(name) is not None
    ]
    assert names == expected
    assert installed() is STACKS  # computed once
    assert _stacks.default() is STACKS[0]
    for stack in STACKS:
        assert stack.module is sys.modules[stack.name]
        assert stack.Request.__module__ == stack.name
        assert repr(stack).startswith(f"<HTTP stack {stack.name} ")


def test_dev_install_has_both_stacks() -> None:
    # The main test run is on both stacks (the dev extra installs httpx2); if httpx2 went
    # missing, every httpx2 test below would skip silently outside CI.
    need("httpx", "httpx2")
    assert len(STACKS) == 2


def test_stack_of_objects(stack: Stack) -> None:
    request = stack.Request("GET", "https://example.com/")
    response = stack.Response(200, request=request)
    transport = stack.MockTransport(lambda r: stack.Response(204))
    for value in (stack.Client(), stack.AsyncClient(), request, response, transport):
        assert stack_of(value) is stack
    assert stack_of("https://example.com/") is None
    assert stack_of(object()) is None


def test_auth_bases_are_each_stacks_auth() -> None:
    assert _stacks.auth_bases() == tuple(stack.Auth for stack in STACKS)
    bases = _stacks.auth_bases()
    combined = type("Combined", bases, {})  # the stacks' Auth classes can share one subclass
    for stack in STACKS:
        assert isinstance(combined(), stack.Auth)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_check_client_accepts_each_stacks_client(stack: Stack, asynchronous: bool) -> None:
    kind = stack.AsyncClient if asynchronous else stack.Client
    mock = stack.MockTransport(lambda r: stack.Response(200))
    for client in (kind(), kind(transport=mock), kind(mounts={"https://": mock})):
        assert check_client(client, asynchronous=asynchronous, owner="TokenClient") is stack


def test_not_a_client_is_refused_naming_the_owner() -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_client("http://127.0.0.1", asynchronous=False, owner="TokenVerifier")
    message = str(caught.value)
    assert message.startswith("TokenVerifier needs http_client to be an ")
    assert "builtins.str" in message
    for stack in STACKS:
        assert f"{stack.name}.Client" in message


def test_sync_client_for_an_async_owner_and_back(stack: Stack) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_client(stack.Client(), asynchronous=True, owner="AsyncTokenClient")
    assert str(caught.value) == (
        f"AsyncTokenClient needs an {stack.name}.AsyncClient, got an {stack.name}.Client; "
        f"use TokenClient with a {stack.name}.Client"
    )
    with pytest.raises(ConfigurationError, match=r"use AsyncTokenVerifier with an \w+\.Async"):
        check_client(stack.AsyncClient(), asynchronous=False, owner="TokenVerifier")


def test_async_transport_in_a_sync_client_is_refused(stack: Stack) -> None:
    # httpx only fails at the first request (no handle_request on an async transport).
    client = stack.Client(transport=stack.module.AsyncHTTPTransport())
    with pytest.raises(ConfigurationError, match="needs a sync transport"):
        check_client(client, asynchronous=False, owner="TokenClient")
    aclient = stack.AsyncClient(mounts={"https://idp.example.com": stack.module.HTTPTransport()})
    with pytest.raises(ConfigurationError, match="needs an async transport"):
        check_client(aclient, asynchronous=True, owner="AsyncTokenClient")


def test_duck_typed_transport_is_trusted(stack: Stack) -> None:
    class Transport:  # neither stack's class: httpx itself accepts it without a check
        def handle_request(self, request: Any) -> Any:
            return stack.Response(200, content=b"{}")

        def close(self) -> None:
            pass

    client = stack.Client(transport=Transport())
    assert check_client(client, asynchronous=False, owner="TokenClient") is stack


def test_mixing_stacks_fails_at_the_first_request_without_the_check() -> None:
    # Why the check exists: httpx2's client asserts on an httpx response at request time.
    httpx, httpx2 = _stack("httpx"), _stack("httpx2")
    mixed = httpx2.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    with pytest.raises((AssertionError, TypeError, AttributeError)):
        mixed.get("https://idp.example.com/")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_transport_of_the_other_stack_is_a_configuration_error(asynchronous: bool) -> None:
    httpx, httpx2 = _stack("httpx"), _stack("httpx2")
    for client_stack, transport_stack in ((httpx2, httpx), (httpx, httpx2)):
        mock = transport_stack.MockTransport(lambda r: None)
        kind = client_stack.AsyncClient if asynchronous else client_stack.Client
        for client in (kind(transport=mock), kind(mounts={"https://": mock})):
            with pytest.raises(ConfigurationError) as caught:
                check_client(client, asynchronous=asynchronous, owner="TokenClient")
            message = str(caught.value)
            assert f"{client_stack.name}.{kind.__name__} whose transport is an " in message
            assert f"{transport_stack.name}.MockTransport" in message
            assert "do not mix" in message


def test_driver_helpers_check_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="TokenClient needs http_client"):
        sync_driver(object(), timeout=1.0, owner="TokenClient")
    with pytest.raises(ConfigurationError, match="AsyncTokenVerifier needs"):
        async_driver(_stacks.default().Client(), timeout=1.0, owner="AsyncTokenVerifier")
    assert isinstance(sync_driver(None, timeout=1.0, owner="TokenClient"), SyncDriver)
    assert isinstance(async_driver(None, timeout=1.0, owner="TokenClient"), AsyncDriver)


def _recording(stack: Stack, seen: list[Any]) -> Any:
    def handle(request: Any) -> Any:
        seen.append(request)
        return stack.Response(200, json={"ok": True})

    return stack.MockTransport(handle)


def _token_request() -> HttpRequest:
    return HttpRequest("POST", "https://idp.example.com/token", headers={}, content=b"a=b")


def test_sync_driver_builds_the_request_on_the_clients_stack(stack: Stack) -> None:
    seen: list[Any] = []
    with stack.Client(transport=_recording(stack, seen)) as client:
        driver = sync_driver(client, timeout=2.0, owner="TokenClient")
        answer = driver.send(_token_request(), limit=1000, refuse=InvalidTokenResponse)
    assert answer.status == 200
    assert answer.body == b'{"ok":true}' or answer.body == b'{"ok": true}'
    assert type(seen[0]) is stack.Request
    assert seen[0].headers["accept-encoding"] == "identity"
    assert seen[0].content == b"a=b"


@pytest.mark.anyio
async def test_async_driver_builds_the_request_on_the_clients_stack(stack: Stack) -> None:
    seen: list[Any] = []
    async with stack.AsyncClient(transport=_recording(stack, seen)) as client:
        driver = async_driver(client, timeout=2.0, owner="AsyncTokenClient")
        answer = await driver.send(_token_request(), limit=1000, refuse=InvalidTokenResponse)
    assert answer.status == 200
    assert type(seen[0]) is stack.Request


def test_drivers_own_client_is_the_default_stacks() -> None:
    driver = SyncDriver(timeout=1.0)
    client, temporary = driver._lease()
    assert type(client) is _stacks.default().Client
    assert not temporary
    driver.close()


def test_no_stack_installed_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_stacks, "_installed", ())
    with pytest.raises(ConfigurationError, match=r"install httpx .* or httpx2"):
        _stacks.default()
    with pytest.raises(ConfigurationError, match="install httpx"):
        SyncDriver(timeout=1.0)


def test_in_memory_answer_is_still_bounded(stack: Stack) -> None:
    # A MockTransport's response is read by the stack already: the limit still applies.
    big = stack.MockTransport(lambda r: stack.Response(200, content=b"x" * 5000))
    with stack.Client(transport=big) as client:
        driver = sync_driver(client, timeout=2.0, owner="TokenClient")
        with pytest.raises(InvalidTokenResponse, match="exceeds the 1000-byte limit"):
            driver.send(_token_request(), limit=1000, refuse=InvalidTokenResponse)


def test_auth_base_is_an_auth_of_every_stack() -> None:
    base = _stacks.AuthBase
    assert base is _stacks.auth_base()
    for stack in STACKS:
        assert issubclass(base, stack.Auth)
        with stack.Client(auth=type("Custom", (base,), {})()):  # accepted as auth=
            pass


def test_either_transport_answers_each_stack_in_its_own_types(stack: Stack) -> None:
    def respond(request: Any) -> tuple[int, dict[str, str], bytes]:
        return 201, {"x-seen": type(request).__module__}, request.content[::-1]

    transport = _stacks.either_transport(respond)
    assert isinstance(transport, (stack.BaseTransport, stack.AsyncBaseTransport))
    assert check_client(stack.Client(transport=transport), asynchronous=False, owner="T")
    with stack.Client(transport=transport) as client:
        response = client.post("https://anywhere.example/", content=b"abc")
    assert type(response) is stack.Response
    assert (response.status_code, response.content) == (201, b"cba")
    assert response.headers["x-seen"] == stack.name


@pytest.mark.anyio
async def test_either_transport_async(stack: Stack) -> None:
    transport = _stacks.either_transport(lambda request: (200, {}, b"ok"))
    async with stack.AsyncClient(transport=transport) as client:
        response = await client.get("https://anywhere.example/")
    assert type(response) is stack.Response
    assert response.text == "ok"


def test_either_transport_refuses_a_foreign_request() -> None:
    transport = _stacks.either_transport(lambda request: (200, {}, b""))
    with pytest.raises(TypeError, match="not an httpx or httpx2 request"):
        transport._answer(object())  # type: ignore[attr-defined, unused-ignore]
