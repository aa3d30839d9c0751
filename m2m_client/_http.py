"""HTTP flows, sans-IO, and the one driver pair that runs them against the network.

The vocabulary (no OAuth here: the token, discovery and JWKS flows are written in it):

* :class:`HttpRequest` what to send, :class:`HttpAnswer` the complete answer;
* a *flow* (:data:`Flow`) is a generator, in the style of httpx's ``Auth.auth_flow``: it yields
  steps and receives their replies. A step is an :class:`HttpRequest` (answered with its
  :class:`HttpAnswer`, or with the :data:`SendFailure` the send ended in, as a value: the flow
  decides what a failed request means) or a :class:`Call` (a blocking function and its async
  twin, answered with its result);
* an :class:`Exchange` is the common flow of one request and the reading of its answer.

:meth:`SyncDriver.run` and :meth:`AsyncDriver.run` are the only two places a flow is driven.
Anything else that ends a step (cancellation, a :class:`Call` that raised) is thrown into the
flow at its ``yield``, so its ``finally`` and ``except`` blocks see it.

Every request (token request, discovery, JWKS) is sent by :meth:`SyncDriver.send` or
:meth:`AsyncDriver.send`, so what must hold for all of them is written once here:

* the URL passes the URL policy (:func:`m2m_client._urls.check_url`) before anything is sent;
* redirects are never followed and the caller's client never adds its own ``auth``, default
  headers or cookies: credentials and keys go to the configured URL and nowhere else;
  plain http never crosses a proxy (:mod:`m2m_client._proxy`), and the caller's event hooks
  run without deciding what an answer means (:mod:`m2m_client._hooks`);
* each attempt has an overall deadline (not just per-read timeouts: a server that drips a
  byte at a time is cut off), also bounded by an absolute deadline the caller passes;
* the body is bounded while it streams, counting both received and decoded bytes
  (``Accept-Encoding: identity`` is asked; a gzip body is inflated with a bounded inflater);
* every exception of the HTTP stack becomes a :class:`TransportFailure`, raised outside the
  ``except`` block so no frame holding the request (its ``Authorization`` header, its form
  body) stays reachable from the exception.

The drivers speak httpx and httpx2 (see :mod:`m2m_client._stacks`): a caller's client is
checked when the driver is made (:func:`sync_driver`, :func:`async_driver`: a client of the
wrong kind, or whose transport is of the other stack, is a ConfigurationError then, not an
AssertionError at the first request), each request is built on that client's own stack, and
a driver without a client creates one on the default stack (httpx, else httpx2).

The sans-IO code decides what an answer means; the drivers return 4xx/5xx as they came.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import anyio

from ._fork import at_fork
from ._hooks import response_hooks, run_hooks, run_hooks_async, sending
from ._proxy import check_route, own_client
from ._retry import TransientFailure
from ._stacks import check_client
from ._stacks import default as default_stack
from ._urls import check_url
from .errors import ConfigurationError, M2MError

if TYPE_CHECKING:
    from ._stacks import AsyncHttpClient, Stack, SyncHttpClient

__all__ = [
    "AsyncDriver",
    "Call",
    "Exchange",
    "Flow",
    "HttpAnswer",
    "HttpRequest",
    "SendFailure",
    "SyncDriver",
    "TransportFailure",
    "answer_of",
    "async_driver",
    "sync_driver",
]

_USER_AGENT = "m2m-client"
_CONNECT_TIMEOUT = 5.0

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True, repr=False)
class HttpRequest:
    """An HTTP request ready to send. ``repr`` omits headers and body: they may hold credentials.

    An empty ``content`` means no body (a ``GET``).
    """

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""

    def __repr__(self) -> str:
        return f"HttpRequest(method={self.method!r}, url={self.url!r})"


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A complete HTTP answer: status, headers (case-insensitive), the whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str


class TransportFailure(TransientFailure):
    """The request did not complete (connect, reset, timeout, deadline, protocol error)."""


Refuse = type[M2MError]
"""The error an answer the driver refuses raises (too large, a redirect, undecodable)."""
SendFailure = M2MError | TransientFailure
"""What a send may end in, handed to the flow as its request's reply (a value, not raised)."""


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """A flow step that is not a request: the sync driver answers it with ``sync()``, the async
    driver with ``await asynchronous()`` (e.g. re-reading a credential from an async source)."""

    sync: Callable[[], R]
    asynchronous: Callable[[], Awaitable[R]]


Flow = Generator[HttpRequest | Call[Any], Any, T]
"""A sans-IO flow: yields requests and calls, receives their replies, returns its result."""


def answer_of(reply: object) -> HttpAnswer:
    """The :class:`HttpAnswer` a request step was answered with; its send's failure, raised."""
    if isinstance(reply, BaseException):
        raise reply
    assert isinstance(reply, HttpAnswer)
    return reply


@dataclass(frozen=True, slots=True)
class Exchange(Generic[T]):
    """One request and what its answer means (``interpret`` returns the result or raises).

    :meth:`flow` sends it once; a caller that retries runs a new ``flow()`` per attempt.
    """

    request: HttpRequest
    interpret: Callable[[HttpAnswer], T]

    def flow(self) -> Flow[T]:
        return self.interpret(answer_of((yield self.request)))


class _Body:
    """Collects a body, bounded in received and in decoded bytes."""

    __slots__ = ("_chunks", "_inflater", "_limit", "_raw", "_refuse", "_size", "_url")

    def __init__(self, url: str, encoding: str | None, limit: int, refuse: type[M2MError]) -> None:
        self._url, self._limit, self._refuse = url, limit, refuse
        self._chunks: list[bytes] = []
        self._raw = self._size = 0
        coding = (encoding or "identity").strip().lower()
        if coding in ("identity", ""):
            self._inflater = None
        elif coding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._inflater = zlib.decompressobj()
        else:
            raise refuse(f"response from {url} uses content-encoding {coding[:30]!r}, refused")

    def check_length(self, value: str | None) -> None:
        if value is not None and value.strip().isdigit() and int(value) > self._limit:
            raise self._refuse(
                f"response from {self._url} of {int(value)} bytes exceeds the "
                f"{self._limit}-byte limit"
            )

    def feed(self, raw: bytes) -> None:
        self._raw += len(raw)
        if self._raw > self._limit:
            self._too_large()
        if self._inflater is None:
            self._add(raw)
            return
        try:
            data = raw
            while data:
                # max_length: never inflate more than we may keep (a gzip bomb stops here).
                self._add(self._inflater.decompress(data, self._limit - self._size + 1))
                data = self._inflater.unconsumed_tail
        except zlib.error:
            raise self._refuse(f"response from {self._url} could not be decoded") from None

    def body(self) -> bytes:
        if self._inflater is not None:
            try:
                self._add(self._inflater.flush())
            except zlib.error:
                raise self._refuse(f"response from {self._url} could not be decoded") from None
        return b"".join(self._chunks)

    def _add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limit:
            self._too_large()
        if chunk:
            self._chunks.append(chunk)

    def _too_large(self) -> None:
        raise self._refuse(f"response from {self._url} exceeds the {self._limit}-byte limit")


def _checked_url(url: str, refuse: type[M2MError]) -> str:
    try:
        return check_url(url, what="URL")
    except ValueError as exc:
        raise refuse(str(exc)) from None


def _build(stack: Stack, request: HttpRequest, url: str, seconds: float, trace: Any = None) -> Any:
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity", **request.headers}
    extensions: dict[str, Any] = {
        "timeout": stack.Timeout(seconds, connect=min(seconds, _CONNECT_TIMEOUT)).as_dict()
    }
    if trace is not None:
        extensions["trace"] = trace
    # A bare Request, sent with client.send(): the client's default headers, cookies and
    # base_url are not merged in (they could carry the caller's own credentials).
    # On the client's own stack: httpx2's client cannot send an httpx.Request (and back).
    return stack.Request(
        request.method,
        url,
        headers=headers,
        content=request.content or None,
        extensions=extensions,
    )


def _redirect(response: Any, url: str, refuse: type[M2MError]) -> M2MError:
    location = response.headers.get("location", "")[:200]
    return refuse(
        f"{url} answered HTTP {response.status_code}, a redirect to {location!r}; redirects "
        "are never followed (they could carry credentials or keys elsewhere): configure "
        "the final URL"
    )


def _body(response: Any, url: str, limit: int, refuse: type[M2MError]) -> _Body:
    """A bounded body for ``response``; already fed when the transport built it in memory.

    An in-memory transport (``MockTransport``, ``LocalIssuer.transport()``) hands back a
    response that the stack has read (and decoded) already: its stream cannot be iterated
    again, so its content is taken as it is, still within ``limit``.
    """
    if response.is_stream_consumed:
        body = _Body(url, None, limit, refuse)
        body.feed(response.content)
        return body
    body = _Body(url, response.headers.get("content-encoding"), limit, refuse)
    body.check_length(response.headers.get("content-length"))
    return body


def _describe(exc: BaseException, url: str) -> str:
    message = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__} talking to {url}" + (f": {message}" if message else "")


def _status_error_answer(exc: BaseException, stack: Stack, url: str) -> HttpAnswer | None:
    # A caller's client may raise for status in a response hook: read the answer from it.
    if isinstance(exc, stack.HTTPStatusError):
        response = exc.response  # type: ignore[attr-defined]
        return HttpAnswer(response.status_code, response.headers, b"", url)
    return None


def _stack_for(client: object | None, *, asynchronous: bool, owner: str) -> Stack:
    if client is None:
        return default_stack()
    return check_client(client, asynchronous=asynchronous, owner=owner)


def sync_driver(
    http_client: object | None, *, timeout: float, owner: str, persistent: bool = True
) -> SyncDriver:
    """A :class:`SyncDriver` for a caller's ``http_client`` argument (``None``: its own).

    The one check every sync shell runs on ``http_client``: an ``httpx.Client`` or an
    ``httpx2.Client`` whose transports are of the same stack, else ConfigurationError
    naming ``owner`` (e.g. ``"TokenClient"``).
    """
    client = cast("SyncHttpClient | None", http_client)  # checked by the constructor
    return SyncDriver(client, timeout=timeout, persistent=persistent, owner=owner)


def async_driver(
    http_client: object | None, *, timeout: float, owner: str, persistent: bool = True
) -> AsyncDriver:
    """An :class:`AsyncDriver` for a caller's ``http_client``; see :func:`sync_driver`."""
    client = cast("AsyncHttpClient | None", http_client)  # checked by the constructor
    return AsyncDriver(client, timeout=timeout, persistent=persistent, owner=owner)


class _Budget:
    """The end of one attempt on the monotonic clock: ``timeout`` from when the attempt has its
    HTTP client, never past the caller's absolute ``deadline``.

    Building a client (a TLS context) is not time on the network, and on a loaded machine it
    took all of a 0.5 s attempt, so the request never left; the absolute deadline still
    bounds everything.
    """

    __slots__ = ("end", "seconds")

    def __init__(self, timeout: float, deadline: float | None) -> None:
        now = time.monotonic()
        self.end = now + timeout if deadline is None else min(now + timeout, deadline)
        self.seconds = self.end - now

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def failure(self, url: str) -> TransportFailure:
        return TransportFailure(f"request to {url} did not complete within its deadline")


class _Deadlines:
    """One daemon thread that fires every sync attempt's watchdog at its deadline.

    A thread per request cost ~0.7 ms and ~3 KiB each; one thread serves all. Cancelled
    watchdogs leave the heap when their deadline comes, so it holds at most the attempts
    of the last ``timeout`` seconds.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Watchdog]] = []
        self._count = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, watchdog: _Watchdog) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._count), watchdog))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="m2m-client-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, watchdog = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            watchdog.fire()


_DEADLINES = _Deadlines()


@at_fork
def _new_deadlines_after_fork() -> None:
    # The child has no deadline thread, and its lock may have been held mid-fork.
    global _DEADLINES
    _DEADLINES = _Deadlines()


# Trace events naming a new connection's stream (return_value), and those that start a
# request on a connection, new or reused (emitted by the connection itself: see _sender).
_CONNECTED = frozenset({"connection.connect_tcp.complete", "connection.start_tls.complete"})
_HTTP11_REQUEST = "http11.send_request_headers.started"
_HTTP2_REQUEST = "http2.send_request_headers.started"
# An HTTP/2 stream cut at its deadline whose request still has not ended this much later is
# on a connection that delivered nothing since (a moving connection wakes its reader, which
# then sees the cut): that connection is shut, as a silent HTTP/1.1 one is at the deadline.
H2_SILENT_GRACE = 1.0


def _sender() -> Any:
    """The httpcore connection whose ``handle_request`` emitted the trace event in progress.

    httpcore's per-request trace events carry the request but not the connection, and a
    reused keep-alive connection emits no connect event: its ``handle_request`` frame (a
    few frames up: Trace.__enter__, Trace.trace, the watchdog) is where the connection is
    known. Found by what it has (a network stream), on httpcore and httpcore2 alike.
    """
    frame: FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code.co_name == "handle_request":
            owner = frame.f_locals.get("self")
            if callable(getattr(getattr(owner, "_network_stream", None), "get_extra_info", None)):
                return owner
        frame = frame.f_back
    return None


def _socket_of(stream: Any) -> Any:
    get = getattr(stream, "get_extra_info", None)
    return get("socket") if callable(get) else None


def _same_socket(a: Any, b: Any) -> bool:
    # A TLS stream's socket is a wrapper of the TCP one (which is detached: fileno -1).
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return a is b or a.fileno() in (-1, b.fileno())
    return False


class _Watchdog:
    """Ends a sync attempt at its deadline (sync only).

    A blocking read cannot be interrupted otherwise: per-read timeouts let a server that
    drips one byte per read hold the caller for as long as it likes. The watchdog learns
    the connection of every request, on a new connection (connect/TLS events) and on a
    reused keep-alive one (the request's own events, see :func:`_sender`). At the deadline:

    * HTTP/1.1: the connection carries this request alone; its socket is shut.
    * HTTP/2 (a caller's client with ``http2=True``): the socket is shared with other
      requests, so only this request's stream is cut (the reader of the connection sees a
      reset for it; every other stream goes on). If the request has still not ended
      :data:`H2_SILENT_GRACE` later, the connection delivered nothing in that time, and is
      shut like a silent HTTP/1.1 one.
    """

    __slots__ = ("_cancelled", "_cut", "_fired", "_lock", "_sockets", "_streams")

    def __init__(self, budget: _Budget) -> None:
        self._sockets: list[Any] = []
        self._streams: list[tuple[Any, int]] = []  # (HTTP/2 connection, stream id)
        self._lock = threading.Lock()
        self._fired = False
        self._cut = False  # HTTP/2 streams cut; the next fire shuts their connections
        self._cancelled = False
        _DEADLINES.schedule(budget.end, self)

    def trace(self, name: str, info: Mapping[str, Any]) -> None:
        if name in _CONNECTED:
            self.watch(info.get("return_value"))
        elif name == _HTTP11_REQUEST:
            connection = _sender()
            if connection is not None:
                self.watch(connection._network_stream)
        elif name == _HTTP2_REQUEST:
            connection, stream_id = _sender(), info.get("stream_id")
            if connection is not None and isinstance(stream_id, int):
                self._watch_stream(connection, stream_id)

    def watch(self, stream: Any) -> None:
        """Shut ``stream``'s socket at the deadline (an HTTP/1.1 or a new connection's)."""
        sock = _socket_of(stream)
        if sock is None:
            return
        with self._lock:
            if self._cancelled or any(_same_socket(sock, known) for known in self._sockets):
                return
            self._sockets.append(sock)
            fired = self._fired
        if fired:
            self._shut(sock)

    def _watch_stream(self, connection: Any, stream_id: int) -> None:
        shared = _socket_of(connection._network_stream)
        with self._lock:
            if self._cancelled:
                return
            # The connect event's socket is this shared connection's: never shut it first.
            self._sockets = [s for s in self._sockets if not _same_socket(s, shared)]
            self._streams.append((connection, stream_id))
            fired = self._fired
        if fired:
            _cut_stream(connection, stream_id)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            # The connection may go back to the pool: never shut it.
            self._sockets.clear()
            self._streams.clear()

    def fire(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._fired = True
            sockets, streams = list(self._sockets), list(self._streams)
            cut, self._cut = self._cut, bool(streams)
        for sock in sockets:
            self._shut(sock)
        if not streams:
            return
        if not cut:
            for connection, stream_id in streams:
                _cut_stream(connection, stream_id)
            _DEADLINES.schedule(time.monotonic() + H2_SILENT_GRACE, self)
            return
        for connection, _ in streams:  # still not ended: a silent connection
            self._shut(_socket_of(connection._network_stream))

    @staticmethod
    def _shut(sock: Any) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sock.shutdown(socket.SHUT_RDWR)


def _cut_stream(connection: Any, stream_id: int) -> None:
    """End one HTTP/2 request on a shared connection, leaving the others running.

    httpcore's HTTP/2 connection hands each stream the events its reader received; a
    stream waiting for its answer raises RemoteProtocolError on a reset, and its request
    ends without touching the connection. The reset is queued as if the server had sent
    it (list.append is atomic; a stream already ended has no queue any more).
    """
    # An HTTP/2 connection exists, so h2 (httpcore's HTTP/2 library) is imported already.
    h2_events, h2_errors = sys.modules.get("h2.events"), sys.modules.get("h2.errors")
    with contextlib.suppress(Exception):
        events = connection._events.get(stream_id)
        if events is not None and h2_events is not None and h2_errors is not None:
            cancel = h2_errors.ErrorCodes.CANCEL
            try:
                reset = h2_events.StreamReset(
                    stream_id=stream_id, error_code=cancel, remote_reset=False
                )
            except TypeError:  # h2 < 4.2: events take no arguments
                reset = h2_events.StreamReset()
                reset.stream_id, reset.error_code, reset.remote_reset = stream_id, cancel, False
            events.append(reset)


class _Driver:
    """What both drivers share: the client they use, its stack, checks, outcomes, closing."""

    _asynchronous: bool

    def __init__(
        self,
        client: Any = None,
        *,
        timeout: float,
        persistent: bool = True,
        owner: str | None = None,
    ) -> None:
        name = owner or type(self).__name__
        self._stack = _stack_for(client, asynchronous=self._asynchronous, owner=name)
        self._client = client
        self._owns = client is None
        self._persistent = persistent
        self._timeout = timeout
        self._closed = False
        self._lock = threading.Lock()

    def _begin(
        self, request: HttpRequest, refuse: type[M2MError], deadline: float | None
    ) -> tuple[str, _Budget]:
        """The checked URL and the attempt's budget (raises if no time is left)."""
        url = _checked_url(request.url, refuse)
        if not self._owns:  # ours never proxy plain http (own_client); the caller's may
            check_route(self._client, self._stack, url)
        budget = _Budget(self._timeout, deadline)
        if budget.seconds <= 0:
            raise budget.failure(url)
        return url, budget

    def _lease(self) -> tuple[Any, bool]:
        """The HTTP client to send with, and whether it is this send's own (to close after)."""
        raise NotImplementedError

    def _start(
        self, request: HttpRequest, refuse: type[M2MError], deadline: float | None
    ) -> tuple[str, Any, bool, _Budget]:
        """The checked URL, the client (and whether it is this send's own), and the attempt's
        budget, which starts once the client exists (see :class:`_Budget`)."""
        url, _ = self._begin(request, refuse, deadline)
        client, temporary = self._lease()
        return url, client, temporary, _Budget(self._timeout, deadline)

    def _failed(self, exc: Exception, url: str) -> HttpAnswer | str:
        """What an exception of the HTTP stack means: an answer after all, or a failure."""
        answer = _status_error_answer(exc, self._stack, url)
        return answer if answer is not None else _describe(exc, url)

    @staticmethod
    def _settle(outcome: HttpAnswer | str | None, budget: _Budget, url: str) -> HttpAnswer:
        """The answer, or the failure raised: here, outside any ``except`` block, so no
        ``__context__`` holds the HTTP stack's frames (and the request in them)."""
        if isinstance(outcome, HttpAnswer):
            return outcome
        if not outcome or budget.expired():
            raise budget.failure(url)
        raise TransportFailure(outcome)

    def _closing(self) -> Any:
        """Mark closed; the client to close, if this driver created it."""
        self._closed = True
        client, self._client = (self._client, None) if self._owns else (None, self._client)
        return client


class _FlowState(Generic[T]):
    """A flow being driven: the reply to send it next (or the exception to throw into it at
    its ``yield``) and, once it has returned, its result. A driver only makes the replies::

        with _FlowState(flow) as state:  # closes the flow, however the run ends
            while (step := state.next()) is not None:
                with state.replying(step):  # what making the reply raises goes to the flow
                    state.reply = <the step's reply>
        return state.result
    """

    __slots__ = ("_flow", "_thrown", "reply", "result")

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self._thrown: BaseException | None = None
        self.reply: Any = None
        self.result: T = cast("T", None)

    def __enter__(self) -> _FlowState[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._flow.close()

    def next(self) -> HttpRequest | Call[Any] | None:
        """The flow's next step, ``None`` when it has returned (its result is set then)."""
        thrown, self._thrown = self._thrown, None
        try:
            # Outside the driver's except block: what the flow raises gets no __context__.
            if thrown is not None:
                return self._flow.throw(thrown)
            return self._flow.send(self.reply)
        except StopIteration as done:
            self.result = done.value
            return None

    @contextlib.contextmanager
    def replying(self, step: HttpRequest | Call[Any]) -> Iterator[None]:
        """A request's send failure becomes its reply; anything else (a call that raised, a
        cancellation) is thrown into the flow by the next :meth:`next`."""
        try:
            yield
        except (M2MError, TransientFailure) as exc:
            if isinstance(step, HttpRequest):
                self.reply = exc
            else:
                self._thrown = exc
        except BaseException as exc:
            self._thrown = exc


class SyncDriver(_Driver):
    """Sends requests with an ``httpx.Client`` or ``httpx2.Client`` (the caller's, or its own).

    ``persistent=False`` (and no client given): a client per request, closed after it, for
    owners without a close method (the verifiers' rare JWKS fetches). A client that cannot
    work (see :func:`m2m_client._stacks.check_client`) raises ConfigurationError here.
    """

    _asynchronous = False
    _client: SyncHttpClient | None

    def run(self, flow: Flow[T], *, limit: int, refuse: Refuse, deadline: float | None = None) -> T:
        """Run ``flow`` to its end (see the module docstring); its result."""
        with _FlowState(flow) as state:
            while (step := state.next()) is not None:
                with state.replying(step):
                    state.reply = self._reply(step, limit, refuse, deadline)
        return state.result

    def send(
        self,
        request: HttpRequest,
        *,
        limit: int,
        refuse: type[M2MError],
        deadline: float | None = None,
    ) -> HttpAnswer:
        """Send ``request``; the whole answer, or raise (see the module docstring)."""
        url, client, temporary, budget = self._start(request, refuse, deadline)
        outcome: HttpAnswer | str | None = None
        watchdog = _Watchdog(budget)
        try:
            outcome = self._exchange(client, request, url, budget, watchdog, limit, refuse)
        except (M2MError, TransientFailure):
            raise
        except Exception as exc:
            outcome = self._failed(exc, url)
        finally:
            watchdog.cancel()
            if temporary:
                client.close()
        return self._settle(outcome, budget, url)

    def _exchange(
        self,
        client: SyncHttpClient,
        request: HttpRequest,
        url: str,
        budget: _Budget,
        watchdog: _Watchdog,
        limit: int,
        refuse: type[M2MError],
    ) -> HttpAnswer:
        seconds = budget.remaining()
        if seconds <= 0:
            # Never hand the stack a timeout <= 0: httpcore's connect (socket.create_connection)
            # would create the socket, fail in settimeout() with a ValueError, and leak it.
            raise budget.failure(url)
        built = _build(self._stack, request, url, seconds, watchdog.trace)
        response = run_hooks(sending(client, built))  # the caller's response hooks: below
        try:
            if "stream_id" not in response.extensions:  # HTTP/2: its stream is watched
                watchdog.watch(response.extensions.get("network_stream"))
            if 300 <= response.status_code < 400:
                raise _redirect(response, url, refuse)
            body = _body(response, url, limit, refuse)
            if not response.is_stream_consumed:
                for chunk in response.iter_raw():
                    body.feed(chunk)
                    if budget.expired():
                        raise budget.failure(url)
            answer = HttpAnswer(response.status_code, response.headers, body.body(), url)
        finally:
            response.close()
        run_hooks(response_hooks(client, self._stack, built, answer))
        return answer

    def _lease(self) -> tuple[SyncHttpClient, bool]:
        if self._closed:
            raise ConfigurationError("this client is closed; create a new one")
        if self._client is not None:
            return self._client, False
        if not self._persistent:
            return own_client(self._stack, asynchronous=False), True
        with self._lock:
            if self._client is None:
                self._client = own_client(self._stack, asynchronous=False)
            return self._client, False

    def _reply(
        self, step: HttpRequest | Call[Any], limit: int, refuse: Refuse, deadline: float | None
    ) -> Any:
        if isinstance(step, Call):
            return step.sync()
        return self.send(step, limit=limit, refuse=refuse, deadline=deadline)

    def close(self) -> None:
        """Close the HTTP client if this driver created it; later sends raise."""
        client = self._closing()
        if client is not None:
            client.close()


class AsyncDriver(_Driver):
    """Sends requests with an ``httpx.AsyncClient`` or ``httpx2.AsyncClient``; see SyncDriver."""

    _asynchronous = True
    _client: AsyncHttpClient | None

    async def run(
        self, flow: Flow[T], *, limit: int, refuse: Refuse, deadline: float | None = None
    ) -> T:
        """Run ``flow`` to its end (see the module docstring); its result."""
        with _FlowState(flow) as state:
            while (step := state.next()) is not None:
                with state.replying(step):
                    state.reply = await self._reply(step, limit, refuse, deadline)
        return state.result

    async def send(
        self,
        request: HttpRequest,
        *,
        limit: int,
        refuse: type[M2MError],
        deadline: float | None = None,
    ) -> HttpAnswer:
        """Send ``request``; the whole answer, or raise (see the module docstring)."""
        url, client, temporary, budget = self._start(request, refuse, deadline)
        outcome: HttpAnswer | str | None = None
        try:
            with anyio.fail_after(max(budget.seconds, 0.0)):
                try:
                    outcome = await self._exchange(client, request, url, budget, limit, refuse)
                finally:
                    if temporary:
                        with anyio.CancelScope(shield=True):
                            await client.aclose()
        except (M2MError, TransientFailure):
            raise
        except TimeoutError:
            outcome = ""  # the deadline
        except Exception as exc:
            outcome = self._failed(exc, url)
        return self._settle(outcome, budget, url)

    async def _exchange(
        self,
        client: AsyncHttpClient,
        request: HttpRequest,
        url: str,
        budget: _Budget,
        limit: int,
        refuse: type[M2MError],
    ) -> HttpAnswer:
        built = _build(self._stack, request, url, budget.seconds)
        response = await run_hooks_async(sending(client, built))  # the response hooks: below
        try:
            if 300 <= response.status_code < 400:
                raise _redirect(response, url, refuse)
            body = _body(response, url, limit, refuse)
            if not response.is_stream_consumed:
                # aclosing: a body refused half way closes the stream's generators now, not
                # at garbage collection (trio warns about unexhausted async generators).
                chunks: Any = response.aiter_raw()  # an async generator (typed AsyncIterator)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        body.feed(chunk)
            answer = HttpAnswer(response.status_code, response.headers, body.body(), url)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        await run_hooks_async(response_hooks(client, self._stack, built, answer))
        return answer

    def _lease(self) -> tuple[AsyncHttpClient, bool]:
        if self._closed:
            raise ConfigurationError("this client is closed; create a new one")
        if self._client is not None:
            return self._client, False
        client = own_client(self._stack, asynchronous=True)
        if self._persistent:
            self._client = client
        return client, not self._persistent

    async def _reply(
        self, step: HttpRequest | Call[Any], limit: int, refuse: Refuse, deadline: float | None
    ) -> Any:
        if isinstance(step, Call):
            return await step.asynchronous()
        return await self.send(step, limit=limit, refuse=refuse, deadline=deadline)

    async def aclose(self) -> None:
        """Close the HTTP client if this driver created it; later sends raise."""
        client = self._closing()
        if client is not None:
            await client.aclose()
