"""A caller's event hooks, run around the package's requests without deciding their outcome.

httpx runs a client's response hooks before the body is read, and closes the response when a
hook raises: a ``raise_for_status`` hook turned the token endpoint's ``400 invalid_client``
into a body-less answer, so the caller got ``InvalidTokenResponse`` instead of the server's
``error`` / ``error_description``. So the drivers send without the client's hook loop (httpx's
and httpx2's ``_send_single_request``: the transport the client picks for the URL, its
cookies, its logging), then run

* the request hooks before sending, as the client would;
* the response hooks on a copy of the answer whose body is already read (``response.read()``
  and ``raise_for_status()`` work in them), after the answer is complete.

A hook's ``HTTPStatusError`` changes nothing: the package interprets the status itself. Any
other exception a hook raises becomes a :class:`~m2m_client._retry.TransientFailure` (ours,
naming the hook's exception type), never a foreign exception through the public API.

The logic is written once, as generators of calls (:func:`sending`, :func:`response_hooks`);
:func:`run_hooks` and :func:`run_hooks_async` only make each call (awaiting it, for an async
client) and send back its result, or the exception it raised, as a value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from ._retry import TransientFailure

if TYPE_CHECKING:
    from ._http import HttpAnswer
    from ._stacks import Stack

__all__ = ["response_hooks", "run_hooks", "run_hooks_async", "sending"]

T = TypeVar("T")
#: Yields calls to make; receives each one's result, or the exception it raised.
Calls = Generator[Callable[[], Any], Any, T]


def run_hooks(calls: Calls[T]) -> T:
    """Drive ``calls`` for a sync client."""
    try:
        call = next(calls)
        while True:
            call = calls.send(_outcome(call))  # no local: a failure's frames keep no hook's
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_hooks_async(calls: Calls[T]) -> T:
    """Drive ``calls`` for an async client (each call's result is awaited)."""
    try:
        call = next(calls)
        while True:
            call = calls.send(await _outcome_async(call))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:
        return exc


async def _outcome_async(call: Callable[[], Any]) -> Any:
    try:
        return await call()
    except Exception as exc:
        return exc


def _hooks(client: Any, kind: str) -> list[Any]:
    hooks = getattr(client, "event_hooks", None)
    return list(hooks.get(kind, ())) if isinstance(hooks, dict) else []


def _failure(exc: Exception, url: str) -> TransientFailure:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return TransientFailure(
        f"an event hook of your http_client raised {type(exc).__name__} for {url}"
        + (f": {first}" if first else "")
    )


def _raised(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


def sending(client: Any, request: Any) -> Calls[Any]:
    """Send ``request`` (streamed, no auth, no redirects), running the request hooks only.

    Returns the response; what a hook or the send raised is raised.
    """
    single = getattr(client, "_send_single_request", None)
    if not callable(single):  # not httpx's or httpx2's own client class: its send() as is
        send = functools.partial(
            client.send, request, stream=True, auth=None, follow_redirects=False
        )
        return _raised((yield send))
    for hook in _hooks(client, "request"):
        _raised((yield functools.partial(hook, request)))
    return _raised((yield functools.partial(single, request)))


def _read_copy(stack: Stack, request: Any, answer: HttpAnswer) -> Any:
    # Headers as received, but the body is what we read (decoded), so no encoding header.
    items = getattr(answer.headers, "multi_items", answer.headers.items)()
    kept = [(k, v) for k, v in items if k.lower() not in ("content-encoding", "content-length")]
    return stack.Response(answer.status, headers=kept, content=answer.body, request=request)


def response_hooks(client: Any, stack: Stack, request: Any, answer: HttpAnswer) -> Calls[None]:
    """Run the response hooks on a read copy of the answer (see the module docstring)."""
    if not callable(getattr(client, "_send_single_request", None)):
        return  # client.send() ran its response hooks already
    hooks = _hooks(client, "response")
    if not hooks:
        return
    response = _read_copy(stack, request, answer)
    failure: TransientFailure | None = None
    for hook in hooks:
        raised = yield functools.partial(hook, response)
        if isinstance(raised, Exception) and not isinstance(raised, stack.HTTPStatusError):
            failure = _failure(raised, answer.url)
            break
    raised = None  # the failure's frames keep no reference to the hook's exception
    if failure is not None:
        raise failure
