"""A stand-in for the node's upstream resolver: answers one name, NXDOMAIN otherwise."""

from __future__ import annotations

from typing import Any

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

UPSTREAM_NAME = "example.test."
UPSTREAM_ADDR = "203.0.113.7"


# dnslib has no type information: its classes are Any to mypy, hence the ignores on subclassing
class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.seen: list[str] = []

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        q = request.q
        self.seen.append(str(q.qname).lower())
        if str(q.qname).lower() == UPSTREAM_NAME and q.qtype == QTYPE.A:
            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(UPSTREAM_ADDR), ttl=60))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class _Quiet(DNSLogger):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")


class FakeUpstream:
    def __init__(self, address: str, port: int = 53):
        self.resolver = _Resolver()
        self.servers = [
            DNSServer(self.resolver, address=address, port=port, tcp=tcp, logger=_Quiet())
            for tcp in (False, True)
        ]

    @property
    def seen(self) -> list[str]:
        return self.resolver.seen

    def __enter__(self) -> FakeUpstream:
        for s in self.servers:
            s.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.servers:
            s.stop()
            s.server.server_close()
