"""The HTTP stacks the package speaks: httpx and httpx2, whichever are installed.

httpx is the package's dependency and the default stack for the package's own requests;
httpx2 (httpx's maintained continuation, Python >= 3.11) is used for a caller's httpx2 client,
and by default only when httpx is not installed. Both may be installed in one process
(``fastapi[standard]`` brings both), so everything here answers per object, never per process.
After ``httpx2.alias_httpx()`` the module ``httpx`` *is* httpx2: one stack, not two.

Nothing imports a stack at module import time: :func:`installed` imports what is there on
first use. Everything that differs between the stacks is looked up here, so no other module
needs ``import httpx`` at run time (only for type annotations), and the package works with
httpx uninstalled.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import ConfigurationError

if TYPE_CHECKING:
    import httpx
    import httpx2

    SyncHttpClient: TypeAlias = httpx.Client | httpx2.Client
    AsyncHttpClient: TypeAlias = httpx.AsyncClient | httpx2.AsyncClient
    HttpClient: TypeAlias = SyncHttpClient | AsyncHttpClient

    class AuthBase(httpx.Auth, httpx2.Auth):  # type: ignore[misc, unused-ignore]
        """For type checkers: an ``Auth`` of both stacks (see :func:`auth_base`)."""

    class _Httpx2Transport(httpx2.BaseTransport, httpx2.AsyncBaseTransport):  # type: ignore[misc, unused-ignore]
        pass

    class EitherTransport(httpx.BaseTransport, httpx.AsyncBaseTransport, _Httpx2Transport):  # type: ignore[misc, unused-ignore]
        """For type checkers: a transport of both stacks (see :func:`either_transport`)."""

        def __init__(self, respond: Responder) -> None: ...
        def handle_request(self, request: Any) -> Any: ...
        async def handle_async_request(self, request: Any) -> Any: ...

else:
    # Run-time stand-ins, so typing.get_type_hints() on annotations using them still works.
    SyncHttpClient = AsyncHttpClient = HttpClient = Any

    def __getattr__(name: str) -> Any:
        # The classes deriving from the stacks' own are made on first use (see installed()).
        if name == "AuthBase":
            return auth_base()
        if name == "EitherTransport":
            return _in_process_class()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# An in-process responder: (a request of either stack) -> (status, headers, body).
Responder = Callable[[Any], tuple[int, Any, bytes]]

__all__ = [
    "AsyncHttpClient",
    "AuthBase",
    "EitherTransport",
    "HttpClient",
    "Responder",
    "Stack",
    "SyncHttpClient",
    "auth_base",
    "auth_bases",
    "check_client",
    "default",
    "either_transport",
    "installed",
    "stack_of",
]

# Import names, in order of preference for the package's own requests.
_NAMES = ("httpx", "httpx2")


@dataclass(frozen=True, slots=True, eq=False)
class Stack:
    """One installed HTTP stack: its module and the classes the package uses from it."""

    name: str  # "httpx" or "httpx2": the module's real name (httpx2 also when aliased)
    module: ModuleType
    Client: type[Any]
    AsyncClient: type[Any]
    Request: type[Any]
    Response: type[Any]
    Headers: type[Any]
    URL: type[Any]
    Timeout: type[Any]
    Auth: type[Any]
    ByteStream: type[Any]
    BaseTransport: type[Any]
    AsyncBaseTransport: type[Any]
    MockTransport: type[Any]
    HTTPError: type[Exception]
    HTTPStatusError: type[Exception]
    InvalidURL: type[Exception]

    @classmethod
    def of(cls, module: ModuleType) -> Stack:
        return cls(
            name=module.__name__,
            module=module,
            **{
                name: getattr(module, name)
                for name in cls.__dataclass_fields__
                if name not in ("name", "module")
            },
        )

    def __repr__(self) -> str:
        return f"<HTTP stack {self.name} {getattr(self.module, '__version__', '?')}>"


_lock = threading.Lock()
_installed: tuple[Stack, ...] | None = None


def _load() -> tuple[Stack, ...]:
    stacks: list[Stack] = []
    for name in _NAMES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        # alias_httpx(): "httpx" imports httpx2 itself; one stack, listed once.
        if all(stack.module is not module for stack in stacks):
            stacks.append(Stack.of(module))
    return tuple(stacks)


def installed() -> tuple[Stack, ...]:
    """The importable stacks, httpx first; after ``alias_httpx()`` only httpx2."""
    global _installed
    if _installed is None:
        with _lock:
            if _installed is None:
                _installed = _load()
    return _installed


def default() -> Stack:
    """The stack for clients the package creates itself: httpx, else httpx2."""
    stacks = installed()
    if not stacks:
        raise ConfigurationError(
            "m2m-client needs an HTTP stack: install httpx (pip install httpx) "
            "or httpx2 (pip install 'm2m-client[httpx2]')"
        )
    return stacks[0]


def stack_of(value: object) -> Stack | None:
    """The stack ``value`` (a client, request, response, transport or auth) belongs to."""
    for stack in installed():
        if isinstance(
            value,
            (
                stack.Client,
                stack.AsyncClient,
                stack.Request,
                stack.Response,
                stack.BaseTransport,
                stack.AsyncBaseTransport,
                stack.Auth,
            ),
        ):
            return stack
    return None


def auth_bases() -> tuple[type[Any], ...]:
    """The ``Auth`` base class of every installed stack, for a class usable with all of them."""
    return tuple(stack.Auth for stack in installed()) or (object,)


@functools.cache
def auth_base() -> type[Any]:
    """One class deriving from every installed stack's ``Auth``: subclass it to be accepted as
    ``auth=`` by the clients of both (each checks ``isinstance(auth, <its own> Auth)``)."""
    bases = auth_bases()
    return bases[0] if len(bases) == 1 else type("AuthBase", bases, {"__module__": __name__})


class _InProcess:
    """The methods of :func:`either_transport`'s class (its bases are found at run time)."""

    def __init__(self, respond: Responder) -> None:
        self._respond = respond

    def handle_request(self, request: Any) -> Any:
        request.read()
        return self._answer(request)

    async def handle_async_request(self, request: Any) -> Any:
        await request.aread()
        return self._answer(request)

    def _answer(self, request: Any) -> Any:
        # The response of the request's own stack: each client asserts on its own types.
        stack = stack_of(request)
        if stack is None:
            raise TypeError(f"not an httpx or httpx2 request: {type(request).__qualname__}")
        status, headers, body = self._respond(request)
        return stack.Response(status, headers=headers, content=body)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@functools.cache
def _in_process_class() -> type[Any]:
    bases = [_InProcess]
    for stack in installed():
        bases += [stack.BaseTransport, stack.AsyncBaseTransport]
    return type("EitherTransport", tuple(bases), {"__module__": __name__})


def either_transport(respond: Responder) -> EitherTransport:
    """An in-process transport for sync and async clients of every installed stack.

    ``respond(request)`` gets the request (of the client's stack, body read) and returns
    ``(status, headers, body)``; the transport builds the response on the same stack.
    """
    transport: EitherTransport = _in_process_class()(respond)
    return transport


def _kind(value: object) -> str:
    cls = type(value)
    stack = stack_of(value)
    if stack is not None and getattr(stack.module, cls.__name__, None) is cls:
        return f"{stack.name}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _transports(client: object) -> list[object]:
    # Private attributes, read defensively: the same in httpx 0.28 and httpx2 2.x.
    found: list[object] = []
    transport = getattr(client, "_transport", None)
    if transport is not None:
        found.append(transport)
    mounts = getattr(client, "_mounts", None)
    if isinstance(mounts, dict):
        found.extend(value for value in mounts.values() if value is not None)
    return found


def check_client(client: object, *, asynchronous: bool, owner: str) -> Stack:
    """The stack of ``client``, a caller's ``http_client`` argument, or ConfigurationError.

    Refuses, when the object is built and not at its first request: something that is not
    an httpx/httpx2 client, a sync client where an async one is needed (and the reverse),
    and a client whose transport belongs to the other stack or the other kind (httpx2's
    client asserts on an httpx response; a sync transport has no ``handle_async_request``).
    """
    want = "AsyncClient" if asynchronous else "Client"
    other = "Client" if asynchronous else "AsyncClient"
    names = " or ".join(f"{stack.name}.{want}" for stack in installed()) or f"httpx.{want}"
    stack = stack_of(client)
    if stack is None or not isinstance(client, (stack.Client, stack.AsyncClient)):
        raise ConfigurationError(f"{owner} needs http_client to be an {names}, got {_kind(client)}")
    if not isinstance(client, getattr(stack, want)):
        sibling = owner.removeprefix("Async") if asynchronous else f"Async{owner}"
        raise ConfigurationError(
            f"{owner} needs an {stack.name}.{want}, got an {stack.name}.{other}; "
            f"use {sibling} with {'a' if asynchronous else 'an'} {stack.name}.{other}"
        )
    base = stack.AsyncBaseTransport if asynchronous else stack.BaseTransport
    for transport in _transports(client):
        if isinstance(transport, base):
            continue
        theirs = stack_of(transport)
        if theirs is not None and theirs is not stack:
            raise ConfigurationError(
                f"{owner} was given an {stack.name}.{want} whose transport is an "
                f"{_kind(transport)}: the two stacks' transports and clients do not mix; "
                f"use an {theirs.name}.{want}, or a transport from {stack.name}"
            )
        if theirs is stack:
            kind = "sync" if asynchronous else "async"
            raise ConfigurationError(
                f"{owner} was given an {stack.name}.{want} with a {kind} transport "
                f"({_kind(transport)}); an {want} needs "
                f"{'an async' if asynchronous else 'a sync'} transport"
            )
        # Neither stack's class: a duck-typed transport, trusted as httpx itself does.
    return stack
