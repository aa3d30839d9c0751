"""The HTTP-flow vocabulary of ``m2m_client._http`` and its one driver pair (issue 20).

A flow is written once, as a generator; ``SyncDriver.run`` and ``AsyncDriver.run`` only make
its steps. Each test runs the same flow through both drivers (async on asyncio and trio), on
each installed HTTP stack, with the stack's in-process ``MockTransport`` (our logic only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from m2m_client._http import (
    AsyncDriver,
    Call,
    Exchange,
    Flow,
    HttpRequest,
    SyncDriver,
    answer_of,
)
from m2m_client._stacks import Stack, installed
from m2m_client.errors import InvalidTokenResponse

STACKS = installed()
URL = "https://idp.example.com/thing"
SECRET = "flow-secret-value"


@pytest.fixture(params=STACKS, ids=[stack.name for stack in STACKS])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.param  # type: ignore[no-any-return]


def _transport(stack: Stack) -> Any:
    def handle(request: Any) -> Any:
        if request.url.path == "/moved":
            return stack.Response(302, headers={"location": "https://elsewhere.example.net/"})
        return stack.Response(200, json={"path": request.url.path})

    return stack.MockTransport(handle)


async def _await(value: Any) -> Any:
    return value


def _run_both(stack: Stack, make: Callable[[], Flow[Any]]) -> tuple[Any, Any]:
    """The result of ``make()`` run by the sync driver, and by the async one (asyncio)."""
    with stack.Client(transport=_transport(stack)) as client:
        sync = SyncDriver(client, timeout=5.0).run(make(), limit=1000, refuse=InvalidTokenResponse)

    async def main() -> Any:
        async with stack.AsyncClient(transport=_transport(stack)) as client:
            driver = AsyncDriver(client, timeout=5.0)
            return await driver.run(make(), limit=1000, refuse=InvalidTokenResponse)

    return sync, anyio.run(main)


def test_a_flow_receives_each_answer_and_its_result_is_the_runs(stack: Stack) -> None:
    def flow() -> Flow[list[Any]]:
        first = answer_of((yield HttpRequest("GET", f"{URL.rsplit('/', 1)[0]}/a")))
        second = answer_of((yield HttpRequest("POST", f"{URL.rsplit('/', 1)[0]}/b")))
        return [first.status, json.loads(first.body), json.loads(second.body)]

    expected = [200, {"path": "/a"}, {"path": "/b"}]
    assert _run_both(stack, flow) == (expected, expected)


def test_a_refused_answer_is_the_requests_reply_not_raised_past_the_flow(stack: Stack) -> None:
    # The flow decides what a failed request means (the verifier records it, the token
    # client retries it): the driver hands it over as a value.
    def flow() -> Flow[str]:
        reply = yield HttpRequest("GET", "https://idp.example.com/moved")
        assert isinstance(reply, InvalidTokenResponse)
        return "redirect refused: " + ("elsewhere.example.net" in str(reply)) * "named"

    assert _run_both(stack, flow) == ("redirect refused: named",) * 2


def test_a_call_is_made_by_the_sync_driver_and_awaited_by_the_async_one(stack: Stack) -> None:
    def flow() -> Flow[Any]:
        made = yield Call(lambda: "sync", lambda: _await("async"))
        answer = answer_of((yield HttpRequest("GET", URL)))
        return made, answer.status

    assert _run_both(stack, flow) == (("sync", 200), ("async", 200))


def test_what_a_call_raises_is_thrown_into_the_flow_at_its_yield(stack: Stack) -> None:
    def boom() -> Any:
        raise LookupError("no credential")

    async def aboom() -> Any:
        boom()

    def flow() -> Flow[str]:
        try:
            yield Call(boom, aboom)
        except LookupError as exc:
            # Thrown outside the driver's except block: nothing chained to it.
            return f"caught {exc}, context {exc.__context__!r}"
        return "not thrown"

    assert _run_both(stack, flow) == ("caught no credential, context None",) * 2


def test_an_exchange_reads_its_answer_and_raises_its_send_failure(stack: Stack) -> None:
    found = Exchange(HttpRequest("GET", URL), lambda answer: json.loads(answer.body)["path"])
    assert _run_both(stack, found.flow) == ("/thing", "/thing")
    moved = Exchange(HttpRequest("GET", "https://idp.example.com/moved"), lambda a: a.status)
    with stack.Client(transport=_transport(stack)) as client:
        driver = SyncDriver(client, timeout=5.0)
        with pytest.raises(InvalidTokenResponse, match="redirect"):
            driver.run(moved.flow(), limit=1000, refuse=InvalidTokenResponse)

    async def main() -> None:
        async with stack.AsyncClient(transport=_transport(stack)) as client:
            driver = AsyncDriver(client, timeout=5.0)
            await driver.run(moved.flow(), limit=1000, refuse=InvalidTokenResponse)

    with pytest.raises(InvalidTokenResponse, match="redirect"):
        anyio.run(main)


@pytest.mark.anyio
async def test_cancelling_a_run_throws_into_the_flow_and_ends_it(stack: Stack) -> None:
    seen: list[str] = []
    released = anyio.Event()

    async def wait_forever() -> None:
        released.set()
        await anyio.sleep(60)

    def flow() -> Flow[None]:
        try:
            yield Call(lambda: None, wait_forever)
        except BaseException as exc:  # the cancellation itself, not GeneratorExit
            seen.append(type(exc).__name__)
            raise
        finally:
            seen.append("finally")

    async with stack.AsyncClient(transport=_transport(stack)) as client:
        driver = AsyncDriver(client, timeout=5.0)
        with anyio.move_on_after(10) as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(
                    lambda: driver.run(flow(), limit=1000, refuse=InvalidTokenResponse)
                )
                await released.wait()
                group.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert seen[-1] == "finally"
    assert seen[0] not in ("GeneratorExit", "finally")


def test_a_request_repr_shows_neither_headers_nor_body() -> None:
    request = HttpRequest(
        "POST", URL, headers={"Authorization": f"Basic {SECRET}"}, content=SECRET.encode()
    )
    assert SECRET not in repr(request)
    assert URL in repr(request)


def test_http_does_not_import_oauth_config_or_pydantic() -> None:
    # Issue 20: the receiving side sends its JWKS GETs through _http; the token client's
    # OAuth (and its configuration, on pydantic) must not come along. The package's
    # __init__ imports everything, so _http is imported as a submodule of a bare package.
    package = Path(__import__("m2m_client").__file__).parent
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('m2m_client')\n"
        f"pkg.__path__ = [{str(package)!r}]\n"
        "sys.modules['m2m_client'] = pkg\n"
        "import m2m_client._http\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'"
        " or m in ('m2m_client._oauth', 'm2m_client.config', 'm2m_client._token',"
        " 'm2m_client.assertions', 'm2m_client._discovery')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
