"""A steady HTTP client loop, for proving that lifecycle operations drop nothing.

`Loop` sends GET / at a fixed rate from a thread (in a network namespace, or the host's), in
one of two modes: a new connection per request, or one keep-alive connection reused for as
long as the server keeps it (a connection the server closed while idle is reopened and the
request sent again, as every HTTP client does: not a failure; a reset or an error once the
request is on its way is). Every answer must be a 200 naming the task that answered.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from mesh.netns import run_in_netns

TIMEOUT = 3.0
MAX_EVENTS = 100
CATCH_UP = 1.0  # a loop behind its schedule by less than this sends at once to catch up


@dataclass
class Result:
    sent: int = 0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # kind -> count
    answered: Counter[str] = field(default_factory=Counter)  # who answered -> count
    reopened: int = 0  # keep-alive connections the server had closed while idle
    # when each failure happened (time.time()) and what it was, the first MAX_EVENTS of them:
    # what a failing test prints, to line failures up with the cluster's events
    events: list[tuple[float, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def __str__(self) -> str:
        return (
            f"{self.sent} sent, {self.ok} ok, failures {dict(self.failures)}, "
            f"{len(self.answered)} tasks answered, {self.reopened} idle connections reopened"
        )


class _Closed(Exception):
    """The server had closed the reused connection before this request (nothing was read)."""


class Loop:
    def __init__(
        self,
        netns: str | None,
        host: str,
        port: int,
        rate: float,
        keepalive: bool,
        timeout: float = TIMEOUT,
    ):
        self.netns, self.host, self.port = netns, host, port
        self.timeout = timeout  # for connecting, and for each answer
        self.interval = 1.0 / rate
        self.keepalive = keepalive
        self.result = Result()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="loadgen")
        self._sock: socket.socket | None = None

    def start(self) -> Loop:
        self._thread.start()
        return self

    def stop(self) -> Result:
        self._stop.set()
        self._thread.join(self.timeout * 3)
        return self.result

    def _run(self) -> None:
        run_in_netns(self.netns, self._loop)

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.result.sent += 1
            try:
                who = self._request()
                self.result.ok += 1
                self.result.answered[who] += 1
            except OSError as e:
                self._failed(_kind(e))
            except ValueError as e:
                self._failed(f"bad answer: {e}")
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -CATCH_UP:
                next_at = time.monotonic()  # far behind (a stall): start afresh, no burst
        self._close()

    def _request(self) -> str:
        if not self.keepalive:
            with self._connect() as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: loadgen\r\n\r\n")
                return _answer(_read_all(s))
        if self._sock is not None:
            try:
                return self._exchange(self._sock, reused=True)
            except _Closed:
                self.result.reopened += 1
                self._close()
        self._sock = self._connect()
        return self._exchange(self._sock, reused=False)

    def _connect(self) -> socket.socket:
        try:
            return socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise (
                type(e)(e.errno, f"connecting: {e.strerror or e}")
                if e.errno
                else type(e)(f"connecting: {e}")
            ) from e

    def _exchange(self, s: socket.socket, reused: bool) -> str:
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: loadgen\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    if reused and not head:
                        raise _Closed()
                    raise ConnectionError("closed mid-answer")
                head += chunk
        except (ConnectionResetError, BrokenPipeError):
            if reused and not head:
                raise _Closed() from None  # it closed while idle: our request never arrived
            raise
        header, _, body = head.partition(b"\r\n\r\n")
        length = None
        close = not header.startswith(b"HTTP/1.1")  # HTTP/1.1 keeps it unless it says close
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            if name.strip().lower() == b"connection":
                close = value.strip().lower() == b"close"
        if length is None:
            body += _read_all(s)
            close = True
        else:
            while len(body) < length:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("closed mid-body")
                body += chunk
        if close:
            self._close()
        return _answer(header + b"\r\n\r\n" + body)

    def _failed(self, kind: str) -> None:
        self.result.failures[kind] += 1
        if len(self.result.events) < MAX_EVENTS:
            self.result.events.append((time.time(), kind))
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def _answer(data: bytes) -> str:
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise ValueError(status.decode(errors="replace"))
    text = body.decode(errors="replace").strip()
    if not text:
        raise ValueError("empty body")
    return text


def _kind(e: OSError) -> str:
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout connecting" if "connecting" in str(e) else "timeout"
    return type(e).__name__ + (f": {e}" if str(e) else "")
