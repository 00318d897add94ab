"""micro: the demo workload, a tiny HTTP server that answers with the task's IP and hostname.

Like the blog's gianarb/micro: `curl node:30000` shows which task answered. The IP is the
address the connection arrived on, so through the mesh it is the task's overlay address.
It also answers UDP datagrams on the same port (for the mesh's UDP tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
from typing import cast


def _body(ip: str) -> bytes:
    return (json.dumps({"ip": ip, "hostname": socket.gethostname()}) + "\n").encode()


class _Http(asyncio.Protocol):
    def __init__(self, open_: set[_Http], stopping: asyncio.Event, none_open: asyncio.Event):
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.body = b""
        self.open = open_
        self.stopping = stopping
        self.none_open = none_open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.body = _body(transport.get_extra_info("sockname")[0])
        self.open.add(self)
        self.none_open.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open.discard(self)
        if not self.open:
            self.none_open.set()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            close = (
                b"connection: close" in head.lower()
                or head.startswith(b"GET / HTTP/1.0")
                or self.stopping.is_set()  # draining: the client's next request goes elsewhere
            )
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(self.body)).encode()
                + (b"\r\nConnection: close" if close else b"")
                + b"\r\n\r\n"
                + self.body
            )
            if close:
                self.transport.close()
                return
        if len(self.buf) > 65536:
            self.transport.close()


class _Udp(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.body = _body(transport.get_extra_info("sockname")[0])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] != "0.0.0.0":
            self.transport.sendto(self.body, addr)


# On SIGTERM, how long idle keep-alive connections get to send one more request (answered with
# "Connection: close"), and how long micro waits for its connections to end before it exits.
IDLE_GRACE = 1.0
DRAIN_LIMIT = 5.0


async def serve(host: str, port: int, udp: bool) -> None:
    """Serve until SIGTERM/SIGINT, then drain as a well-behaved server does: stop accepting,
    answer what arrives on open connections with "Connection: close", close the idle ones, and
    exit once none is left (docs/updates.md)."""
    loop = asyncio.get_running_loop()
    open_: set[_Http] = set()
    stopping, none_open = asyncio.Event(), asyncio.Event()
    server = await loop.create_server(
        lambda: _Http(open_, stopping, none_open), host, port, reuse_address=True, backlog=1024
    )
    if udp:
        # One socket per local address, so replies leave from the address asked.
        addrs = {a for a in _local_addresses() if host in ("0.0.0.0", a)}
        for a in addrs:
            await loop.create_datagram_endpoint(_Udp, local_addr=(a, port))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    server.close()
    if not open_:
        return
    await asyncio.sleep(IDLE_GRACE)
    for conn in list(open_):
        if conn.transport is not None and not conn.buf:
            conn.transport.close()  # idle: its client reconnects, to another task
    if open_:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(none_open.wait(), DRAIN_LIMIT - IDLE_GRACE)


def _local_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def query(host: str, port: int = 8000, timeout: float = 3.0) -> str:
    """Ask micro (on a fresh connection) which task answers; returns that task's IP."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: micro\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    ip: str = json.loads(data.split(b"\r\n\r\n", 1)[1])["ip"]
    return ip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--udp", action="store_true", help="also answer UDP on the same port")
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.udp))


if __name__ == "__main__":
    main()
