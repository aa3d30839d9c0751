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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._retry import TransientFailure

if TYPE_CHECKING:
    from ._http import HttpAnswer
    from ._stacks import Stack

__all__ = ["run_response_hooks", "run_response_hooks_async", "send", "send_async"]


def _hooks(client: Any, kind: str) -> list[Any]:
    hooks = getattr(client, "event_hooks", None)
    return list(hooks.get(kind, ())) if isinstance(hooks, dict) else []


def _failure(exc: Exception, url: str) -> TransientFailure:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return TransientFailure(
        f"an event hook of your http_client raised {type(exc).__name__} for {url}"
        + (f": {first}" if first else "")
    )


def send(client: Any, request: Any) -> Any:
    """Send ``request`` (streamed, no auth, no redirects), running the request hooks only."""
    single = getattr(client, "_send_single_request", None)
    if not callable(single):  # not httpx's or httpx2's own client class: its send() as is
        return client.send(request, stream=True, auth=None, follow_redirects=False)
    for hook in _hooks(client, "request"):
        hook(request)
    return single(request)


async def send_async(client: Any, request: Any) -> Any:
    """:func:`send` for an async client (its hooks are awaited)."""
    single = getattr(client, "_send_single_request", None)
    if not callable(single):
        return await client.send(request, stream=True, auth=None, follow_redirects=False)
    for hook in _hooks(client, "request"):
        await hook(request)
    return await single(request)


def _read_copy(stack: Stack, request: Any, answer: HttpAnswer) -> Any:
    # Headers as received, but the body is what we read (decoded), so no encoding header.
    items = getattr(answer.headers, "multi_items", answer.headers.items)()
    kept = [(k, v) for k, v in items if k.lower() not in ("content-encoding", "content-length")]
    return stack.Response(answer.status, headers=kept, content=answer.body, request=request)


def run_response_hooks(client: Any, stack: Stack, request: Any, answer: HttpAnswer) -> None:
    """Run the response hooks on a read copy of the answer (see the module docstring)."""
    if not callable(getattr(client, "_send_single_request", None)):
        return  # client.send() ran its response hooks already
    hooks = _hooks(client, "response")
    if not hooks:
        return
    response = _read_copy(stack, request, answer)
    failure: TransientFailure | None = None
    for hook in hooks:
        try:
            hook(response)
        except stack.HTTPStatusError:
            continue
        except Exception as exc:
            failure = _failure(exc, answer.url)
            break
    if failure is not None:  # raised here: no __context__ holding the hook's frames
        raise failure


async def run_response_hooks_async(
    client: Any, stack: Stack, request: Any, answer: HttpAnswer
) -> None:
    """:func:`run_response_hooks` for an async client."""
    if not callable(getattr(client, "_send_single_request", None)):
        return  # client.send() ran its response hooks already
    hooks = _hooks(client, "response")
    if not hooks:
        return
    response = _read_copy(stack, request, answer)
    failure: TransientFailure | None = None
    for hook in hooks:
        try:
            await hook(response)
        except stack.HTTPStatusError:
            continue
        except Exception as exc:
            failure = _failure(exc, answer.url)
            break
    if failure is not None:  # raised here: no __context__ holding the hook's frames
        raise failure
