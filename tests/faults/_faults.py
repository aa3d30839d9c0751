"""A fault-injecting HTTP/1.1 server on 127.0.0.1, for the fault suite.

Raw sockets (not http.server) so it can misbehave in every way a real network does:
refuse, reset mid-response, stall, drip bytes, send garbage, send a huge or a gzip-bomb body,
redirect. Each path has its own :class:`Fault`; every request is recorded.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Fault", "FaultServer", "Recorded", "closed_port"]


@dataclass
class Fault:
    """What the server does for one path.

    ``mode``: ``ok`` (send ``status``/``headers``/``body``), ``reset`` (send part of the
    answer, then RST), ``stall`` (headers, then nothing for ``delay`` s), ``stall_headers``
    (nothing at all for ``delay`` s), ``drip`` (the answer one byte every ``delay`` s),
    ``garbage`` (bytes that are not HTTP), ``huge`` (a ``size``-byte body), ``gzip_bomb``
    (a small gzip body that inflates to ``size`` bytes), ``redirect`` (307 to ``location``).
    """

    mode: str = "ok"
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.2
    size: int = 10 * 1024 * 1024
    location: str = "https://attacker.example.net/collect"

    def __post_init__(self) -> None:
        if self.mode == "gzip_bomb":
            _gzip_bomb(self.size)  # now, in the test's thread: not inside a client's deadline

    @classmethod
    def json(cls, data: Any, status: int = 200, **headers: str) -> Fault:
        return cls(
            status=status,
            body=json.dumps(data).encode(),
            headers={"Content-Type": "application/json", **headers},
        )


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def _answer(fault: Fault, body: bytes | None = None, extra: dict[str, str] | None = None) -> bytes:
    payload = fault.body if body is None else body
    headers = {**fault.headers, **(extra or {}), "Content-Length": str(len(payload))}
    head = f"HTTP/1.1 {fault.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"Connection: close\r\n\r\n" + payload


class FaultServer:
    """``with FaultServer() as server: server.faults["/token"] = Fault(...)``; ``server.url``."""

    def __init__(self) -> None:
        self.faults: dict[str, Fault] = {}
        self.requests: list[Recorded] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.split("?")[0] == path)

    def __enter__(self) -> FaultServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

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

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.closing(conn):
            try:
                request = self._read_request(conn)
            except (OSError, ValueError):
                return
            if request is None:
                return
            with self._lock:
                self.requests.append(request)
            fault = self.faults.get(request.path.split("?")[0], Fault(status=404, body=b""))
            with contextlib.suppress(OSError):
                self._misbehave(conn, fault)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops; False when stopped."""
        return not self._stop.wait(seconds)

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
            self._sleep(fault.delay)
        elif mode == "stall_headers":
            self._sleep(fault.delay)
        elif mode == "drip":
            for byte in _answer(fault):
                conn.sendall(bytes([byte]))
                if not self._sleep(fault.delay):
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
