"""The embedded DNS server: 127.0.0.11:53 (UDP and TCP) inside every local task namespace.

One asyncio loop serves every namespace: the listening sockets are created inside each task's
namespace (by a thread that enters it) and then served here; upstream queries go out from the
node's own namespace. Known names are answered from pre-encoded records without a general
DNS parser (the fast path); everything else is forwarded as received.

Nothing a client sends can stop the server: every packet is bounds-checked, and a handler
that fails drops that one query and logs it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh.dns.zone import QTYPE_ANY, Zone
from mesh.netns import NetnsError, run_in_netns

log = logging.getLogger(__name__)

LISTEN_ADDR = "127.0.0.11"
LISTEN_PORT = 53
UPSTREAM_TIMEOUT = 2.0
MAX_UPSTREAMS = 3
MAX_FORWARDS = 1024
TCP_IDLE = 10.0
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP = 0, 1, 2, 3, 4
_HDR = struct.Struct(">HHHHHH")
_OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"  # root, OPT, 1232 bytes, no options
_EDNS_MAX = 1232


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    question_end: int  # offset just past qtype/qclass
    qname: bytes  # lowercase wire format
    qtype: int
    qclass: int
    edns_size: int | None


def parse_query(data: bytes) -> Query | int:
    """A query, or the rcode to answer with (FORMERR, NOTIMP); -1 when not even a header."""
    if len(data) < 12:
        return -1
    qid, flags, qd, an, ns, ar = _HDR.unpack_from(data)
    if flags & 0x8000:
        return -1  # a response: never answer those (reflection loops)
    if (flags >> 11) & 0xF != 0:
        return NOTIMP
    if qd != 1 or an or ns or ar > 1:
        return FORMERR
    i, n = 12, len(data)
    labels = bytearray()
    while True:
        if i >= n:
            return FORMERR
        length = data[i]
        if length == 0:
            i += 1
            break
        if length > 63 or i + 1 + length > n:
            return FORMERR  # includes compression pointers, invalid in a question
        labels += data[i : i + 1 + length]
        i += 1 + length
        if len(labels) > 254:
            return FORMERR
    if i + 4 > n:
        return FORMERR
    qtype, qclass = struct.unpack_from(">HH", data, i)
    end = i + 4
    edns = None
    if ar:
        # A single OPT record: root name, type 41, class = the client's UDP size.
        if end + 11 > n or data[end] != 0 or struct.unpack_from(">H", data, end + 1)[0] != 41:
            return FORMERR
        edns = struct.unpack_from(">H", data, end + 3)[0]
    return Query(qid, flags, end, bytes(labels).lower() + b"\0", qtype, qclass, edns)


def error_reply(data: bytes, rcode: int) -> bytes | None:
    if len(data) < 12:
        return None
    qid, flags = struct.unpack_from(">HH", data)
    return _HDR.pack(qid, 0x8000 | (flags & 0x7900) | 0x0080 | rcode, 0, 0, 0, 0)


def build_reply(data: bytes, q: Query, zone: Zone, limit: int) -> bytes | None:
    """The authoritative reply, or None when the name is not ours (forward it)."""
    if q.qtype == QTYPE_ANY:
        found = [a for (name, _t), a in zone.records.items() if name == q.qname]
        entry = None
        answers = [rr for a in found for rr in a.answers]
        additional: list[bytes] = []
    else:
        entry = zone.records.get((q.qname, q.qtype))
        answers = entry.answers if entry else []
        additional = entry.additional if entry else []
    if answers:
        rcode = NOERROR
        if entry is not None and entry.rotate and len(answers) > 1:
            k = random.randrange(len(answers))
            answers = answers[k:] + answers[:k]
    elif q.qname in zone.names:
        rcode = NOERROR  # the name exists, not with this type
    elif zone.is_cluster_name(q.qname):
        rcode = NXDOMAIN
    else:
        return None
    flags = 0x8000 | 0x0400 | (q.flags & 0x0100) | 0x0080 | rcode  # QR AA RD RA
    question = data[12 : q.question_end]
    opt = _OPT if q.edns_size is not None else b""
    size = 12 + len(question) + len(opt)
    body = []
    for rr in answers:
        if size + len(rr) > limit:
            flags |= 0x0200  # TC: the client retries over TCP
            additional = []
            break
        body.append(rr)
        size += len(rr)
    extra = []
    for rr in additional:
        if size + len(rr) > limit:
            break
        extra.append(rr)
        size += len(rr)
    header = _HDR.pack(q.id, flags, 1, len(body), 0, len(extra) + (1 if opt else 0))
    return b"".join((header, question, *body, *extra, opt))


def read_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    servers = []
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and parts[1] != LISTEN_ADDR:
                servers.append(parts[1])
    except OSError:
        pass
    return servers[:MAX_UPSTREAMS]


@dataclass
class DnsStats:
    rcodes: list[int] = field(default_factory=lambda: [0] * 16)
    forwarded: int = 0
    dropped: int = 0


class DnsServer:
    def __init__(self, upstreams: Callable[[], list[str]]):
        self.upstreams = upstreams
        self.stats = DnsStats()
        self.zones: dict[frozenset[str], Zone] = {}
        self._listeners: dict[
            str, tuple[frozenset[str], list[asyncio.BaseTransport | asyncio.Server]]
        ] = {}
        self._forward_slots = asyncio.Semaphore(MAX_FORWARDS)
        self._last_error_log = 0.0

    # ---- namespaces -------------------------------------------------------------------------

    async def set_views(
        self, views: dict[str, frozenset[str]], zones: dict[frozenset[str], Zone]
    ) -> dict[str, str]:
        """Serve exactly these namespaces; returns errors by namespace."""
        self.zones = zones
        errors: dict[str, str] = {}
        for ns in list(self._listeners):
            if ns not in views:
                await self._close(ns)
        for ns, view in views.items():
            current = self._listeners.get(ns)
            if current is not None:
                if current[0] != view:
                    self._listeners[ns] = (view, current[1])
                    for t in current[1]:
                        if isinstance(t, asyncio.BaseTransport):
                            proto = t.get_protocol()
                            if isinstance(proto, _Udp):
                                proto.view = view
                continue
            try:
                self._listeners[ns] = (view, await self._open(ns, view))
            except (OSError, NetnsError) as e:
                errors[ns] = f"cannot listen on {LISTEN_ADDR}:53 in {ns}: {e}"
                log.error("dns: %s", errors[ns])
        return errors

    async def _open(
        self, ns: str, view: frozenset[str]
    ) -> list[asyncio.BaseTransport | asyncio.Server]:
        def make() -> tuple[socket.socket, socket.socket]:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                for s in (udp, tcp):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.setblocking(False)
                udp.bind((LISTEN_ADDR, LISTEN_PORT))
                tcp.bind((LISTEN_ADDR, LISTEN_PORT))
                tcp.listen(128)
            except OSError:
                udp.close()
                tcp.close()
                raise
            return udp, tcp

        udp, tcp = await asyncio.to_thread(run_in_netns, ns, make)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self, view), sock=udp)
        server = await asyncio.start_server(lambda r, w: self._tcp(r, w, ns), sock=tcp)
        return [transport, server]

    async def _close(self, ns: str) -> None:
        _, handles = self._listeners.pop(ns)
        for h in handles:
            h.close()

    async def close(self) -> None:
        for ns in list(self._listeners):
            await self._close(ns)

    @property
    def namespaces(self) -> list[str]:
        return sorted(self._listeners)

    # ---- queries ----------------------------------------------------------------------------

    def answer_local(self, data: bytes, view: frozenset[str], limit: int) -> bytes | Query | None:
        """A reply we can give at once, the parsed query to forward, or None (drop)."""
        q = parse_query(data)
        if isinstance(q, int):
            if q < 0:
                self.stats.dropped += 1
                return None
            self.stats.rcodes[q] += 1
            return error_reply(data, q)
        zone = self.zones.get(view)
        if zone is not None and q.qclass == 1:
            if q.edns_size is not None:
                limit = max(limit, min(q.edns_size, _EDNS_MAX))
            reply = build_reply(data, q, zone, limit)
            if reply is not None:
                self.stats.rcodes[reply[3] & 0xF] += 1
                return reply
        return q

    async def forward(self, data: bytes, q: Query, tcp: bool) -> bytes | None:
        upstreams = self.upstreams()
        self.stats.forwarded += 1
        if upstreams and not self._forward_slots.locked():
            async with self._forward_slots:
                for server in upstreams[:MAX_UPSTREAMS]:
                    try:
                        reply = await asyncio.wait_for(
                            _ask_tcp(server, data) if tcp else _ask_udp(server, data),
                            UPSTREAM_TIMEOUT,
                        )
                    except (TimeoutError, OSError, asyncio.IncompleteReadError):
                        continue
                    if len(reply) >= 12 and reply[:2] == data[:2]:
                        self.stats.rcodes[reply[3] & 0xF] += 1
                        return reply
        self.stats.rcodes[SERVFAIL] += 1
        return error_reply(data, SERVFAIL)

    def log_failure(self, what: str, err: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 5:  # a flood of bad packets must not flood the log
            self._last_error_log = now
            log.warning("dns: %s: %r", what, err)

    async def _tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ns: str
    ) -> None:
        view = self._listeners.get(ns, (frozenset(), []))[0]
        try:
            while True:
                size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE))[
                    0
                ]
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                result = self.answer_local(data, view, 65535)
                if isinstance(result, Query):
                    result = await self.forward(data, result, tcp=True)
                if result is None:
                    break
                writer.write(struct.pack(">H", len(result)) + result)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as e:
            self.log_failure("tcp query failed", e)
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer, view: frozenset[str]):
        self.server = server
        self.view = view
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            result = self.server.answer_local(data, self.view, 512)
        except Exception as e:
            self.server.log_failure("udp query failed", e)
            return
        if isinstance(result, Query):
            task = asyncio.ensure_future(self._forward(data, result, addr))
            self.pending.add(task)  # a reference, so the task is not collected mid-flight
            task.add_done_callback(self.pending.discard)
        elif result is not None and self.transport is not None:
            self.transport.sendto(result, addr)

    async def _forward(self, data: bytes, q: Query, addr: tuple[str, int]) -> None:
        try:
            reply = await self.server.forward(data, q, tcp=False)
        except Exception as e:
            self.server.log_failure("forward failed", e)
            return
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


async def _ask_udp(server: str, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, (server, 53))
        await loop.sock_sendall(s, data)
        while True:
            reply = await loop.sock_recv(s, 65535)
            if reply[:2] == data[:2]:
                return reply


async def _ask_tcp(server: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(server, 53)
    try:
        writer.write(struct.pack(">H", len(data)) + data)
        await writer.drain()
        size = struct.unpack(">H", await reader.readexactly(2))[0]
        return await reader.readexactly(size)
    finally:
        writer.close()
