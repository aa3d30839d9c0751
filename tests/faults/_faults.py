"""The fault suite's loopback servers on 127.0.0.1: one accept loop, two behaviours.

:class:`FaultServer` speaks HTTP/1.1 on raw sockets (not http.server) so it can misbehave in
every way a real network does: refuse, reset mid-response, stall, drip bytes, send garbage,
send a huge or a gzip-bomb body, redirect. Each path has its own :class:`Fault`; every
request is recorded. :class:`H2Server` speaks HTTP/2 (h2c) for the shared-connection tests.
Both are a :class:`_LoopbackServer` (socket, accept thread, a thread per connection, stop).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "CONNECTIONS",
    "SLOW_FAULTS",
    "Fault",
    "FaultServer",
    "Recorded",
    "check_connections",
    "closed_port",
    "first_then",
]


@dataclass
class Fault:
    """What the server does for one path.

    ``mode``: ``ok`` (send ``status``/``headers``/``body``), ``reset`` (send part of the
    answer, then RST), ``stall`` (headers, then nothing for ``delay`` s), ``stall_headers``
    (nothing at all for ``delay`` s), ``drip`` (the answer one byte every ``delay`` s),
    ``garbage`` (bytes that are not HTTP), ``huge`` (a ``size``-byte body), ``gzip_bomb``
    (a small gzip body that inflates to ``size`` bytes), ``redirect`` (307 to ``location``).
    ``keep_alive`` (``ok`` only): answer without ``Connection: close`` and serve the client's
    next request on the same connection.
    """

    mode: str = "ok"
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.2
    size: int = 10 * 1024 * 1024
    location: str = "https://attacker.example.net/collect"
    keep_alive: bool = False

    def __post_init__(self) -> None:
        if self.mode == "gzip_bomb":
            _gzip_bomb(self.size)  # now, in the test's thread: not inside a client's deadline

    @classmethod
    def json(cls, data: Any, status: int = 200, keep_alive: bool = False, **headers: str) -> Fault:
        return cls(
            status=status,
            body=json.dumps(data).encode(),
            headers={"Content-Type": "application/json", **headers},
            keep_alive=keep_alive,
        )


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int = 0  # which accepted connection (1, 2, ...) it came on


def _answer(fault: Fault, body: bytes | None = None, extra: dict[str, str] | None = None) -> bytes:
    payload = fault.body if body is None else body
    headers = {**fault.headers, **(extra or {}), "Content-Length": str(len(payload))}
    head = f"HTTP/1.1 {fault.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    close = b"" if fault.keep_alive and fault.mode == "ok" else b"Connection: close\r\n"
    return head.encode() + close + b"\r\n" + payload


class _LoopbackServer:
    """What both test servers share: a listening socket on 127.0.0.1, an accept thread, one
    daemon thread per connection (``_serve``, the behaviour), the connection count, and a stop
    that every wait of the behaviour honours (``_wait``)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0  # accepted so far; the n-th is served as number n
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self: _Server) -> _Server:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        # A short accept timeout: the loop sees the stop within 0.1 s of __exit__.
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._connection, args=(conn, number), daemon=True).start()

    def _connection(self, conn: socket.socket, number: int) -> None:
        with contextlib.closing(conn):
            self._serve(conn, number)

    def _serve(self, conn: socket.socket, number: int) -> None:
        """Serve the connection ``number`` until done (the base closes it)."""
        raise NotImplementedError

    def _wait(self, seconds: float) -> bool:
        """Sleep unless the server stops; False when stopped."""
        return not self._stop.wait(seconds)


_Server = TypeVar("_Server", bound=_LoopbackServer)


class FaultServer(_LoopbackServer):
    """``with FaultServer() as server: server.faults["/token"] = Fault(...)``; ``server.url``."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: dict[str, Fault | list[Fault]] = {}
        self.requests: list[Recorded] = []

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.split("?")[0] == path)

    def _read_request(self, conn: socket.socket) -> Recorded | None:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        return Recorded(method, path, headers, rest[:length])

    def _next_fault(self, path: str) -> Fault:
        # Under the lock: the request is recorded and its fault taken in one step.
        fault = self.faults.get(path, Fault(status=404, body=b""))
        if isinstance(fault, list):
            fault = fault.pop(0) if len(fault) > 1 else fault[0]
        return fault

    def _serve(self, conn: socket.socket, number: int) -> None:
        while not self._stop.is_set():
            try:
                request = self._read_request(conn)
            except (OSError, ValueError):
                return
            if request is None:
                return
            request = dataclasses.replace(request, connection=number)
            with self._lock:
                self.requests.append(request)
                fault = self._next_fault(request.path.split("?")[0])
            with contextlib.suppress(OSError):
                self._misbehave(conn, fault)
            if not (fault.keep_alive and fault.mode == "ok"):
                return

    def _misbehave(self, conn: socket.socket, fault: Fault) -> None:
        mode = fault.mode
        if mode == "ok":
            conn.sendall(_answer(fault))
        elif mode == "redirect":
            conn.sendall(_answer(Fault(status=307, body=b"", headers={"Location": fault.location})))
        elif mode == "reset":
            answer = _answer(fault, body=b'{"access_token": "' + b"x" * 2000 + b'"}')
            conn.sendall(answer[: len(answer) // 2])
            time.sleep(0.05)
            # SO_LINGER 0 turns close() into an RST.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "stall":
            conn.sendall(_answer(fault).split(b"\r\n\r\n")[0] + b"\r\n\r\n")
            self._wait(fault.delay)
        elif mode == "stall_headers":
            self._wait(fault.delay)
        elif mode == "drip":
            for byte in _answer(fault):
                conn.sendall(bytes([byte]))
                if not self._wait(fault.delay):
                    return
        elif mode == "garbage":
            conn.sendall(b"\x00\xffNOT HTTP AT ALL\r\n\r\n" * 50)
        elif mode == "huge":
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {fault.size}\r\n\r\n".encode())
            block = b"x" * 65536
            sent = 0
            while sent < fault.size:
                conn.sendall(block)
                sent += len(block)
        elif mode == "huge_chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            block = b"x" * 65536
            for _ in range(fault.size // len(block)):
                conn.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            conn.sendall(b"0\r\n\r\n")
        elif mode == "gzip_bomb":
            body = _gzip_bomb(fault.size)
            conn.sendall(_answer(fault, body=body, extra={"Content-Encoding": "gzip"}))
        else:
            raise ValueError(f"unknown fault mode {mode!r}")


@functools.lru_cache(maxsize=4)
def _gzip_bomb(size: int) -> bytes:
    # Made once, not per request: compressing 10 MB took over half a second of the client's
    # deadline on a loaded machine (same process, same GIL), and the client then saw a
    # timeout instead of the bomb.
    return gzip.compress(b"\x00" * size, compresslevel=9)


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """A loopback URL on which nothing listens (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    yield f"http://127.0.0.1:{port}"


# The faults that hold a request until its deadline: nothing at all, and the answer a byte at
# a time (a per-read timeout never fires; the whole answer takes over 20 s).
SLOW_FAULTS: dict[str, Fault] = {
    "stall_headers": Fault(mode="stall_headers", delay=10.0),
    "drip": Fault(
        mode="drip",
        delay=0.15,
        body=b'{"access_token": "tok-drip", "token_type": "Bearer", "expires_in": 300}',
    ),
}
# Where the fault meets the request: on a connection of its own, or on a keep-alive
# connection an earlier request of the same flow opened (a retry, discovery before the token
# request, a DPoP nonce challenge).
CONNECTIONS = ("fresh", "reused")


def first_then(first: Fault, then: Fault, *, reused: bool) -> list[Fault]:
    """``first`` for a path's first request, ``then`` for every later one; the second on the
    first's connection when ``reused`` (``first`` keeps it open), else on a new one."""
    return [dataclasses.replace(first, keep_alive=reused), then]


def check_connections(server: FaultServer, *, reused: bool) -> None:
    """The fault met the flow's second request on the kind of connection the test is about:
    the first request's (reused) or a new one (fresh)."""
    first, second = server.requests[0], server.requests[1]
    if reused:
        assert second.connection == first.connection, "the connection was not reused"
    else:
        assert second.connection != first.connection, "the connection was reused"


class H2Server(_LoopbackServer):
    """HTTP/2 over plain TCP (h2c, prior knowledge) on 127.0.0.1, one thread per stream.

    ``/download`` streams ``chunks`` DATA frames of 1 KiB, one every ``interval`` s;
    ``/stall`` answers nothing for 10 s; anything else is a 404. Every stream a connection
    carries shares its socket: what one request's deadline does to the connection, the
    others see. Needs the ``h2`` package (httpx's HTTP/2 support).
    """

    def __init__(self, chunks: int = 40, interval: float = 0.1) -> None:
        super().__init__()
        self.chunks, self.interval = chunks, interval
        self.paths: list[str] = []

    def _serve(self, conn: socket.socket, number: int) -> None:
        import h2.config
        import h2.connection
        import h2.events

        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        lock = threading.Lock()

        def flush() -> None:
            with lock:
                data = h2c.data_to_send()
            with contextlib.suppress(OSError):
                conn.sendall(data)

        with lock:
            h2c.initiate_connection()
        flush()
        paths: dict[int, str] = {}
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            with lock:
                events = h2c.receive_data(data)
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    headers = {bytes(k): bytes(v) for k, v in event.headers}
                    paths[event.stream_id] = headers[b":path"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    with lock:
                        h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    path = paths.get(event.stream_id, "")
                    self.paths.append(path)
                    threading.Thread(
                        target=self._respond,
                        args=(h2c, lock, flush, event.stream_id, path),
                        daemon=True,
                    ).start()
            flush()

    def _respond(self, h2c: Any, lock: threading.Lock, flush: Any, stream: int, path: str) -> None:
        if path == "/stall":
            self._wait(10.0)
            return
        status = "200" if path == "/download" else "404"
        with contextlib.suppress(Exception):
            with lock:
                h2c.send_headers(stream, [(":status", status)], end_stream=path != "/download")
            flush()
            if path != "/download":
                return
            for index in range(self.chunks):
                if not self._wait(self.interval):
                    return
                with lock:
                    h2c.send_data(stream, b"x" * 1024, end_stream=index == self.chunks - 1)
                flush()
