"""The DNS fast path: parsing queries and building answers, without sockets."""

from __future__ import annotations

import ipaddress

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from mesh.dns.server import FORMERR, NOTIMP, Query, build_reply, parse_query
from mesh.dns.zone import compile_zone
from mesh.state import state_from_dict

STATE = state_from_dict(
    {
        "node": "sw1",
        "peers": {"sw1": "192.168.56.11"},
        "networks": [
            {
                "name": "ingress",
                "vni": 4096,
                "subnet": "10.255.0.0/16",
                "gateways": {"sw1": "10.255.0.2"},
            }
        ],
        "endpoints": [
            {"task": f"web.{i}", "network": "ingress", "node": "sw1", "ip": f"10.255.0.{10 + i}"}
            for i in range(1, 61)
        ],
        "services": [
            {
                "name": "web",
                "vips": {"ingress": "10.255.0.5"},
                "aliases": ["www"],
                "ports": [{"protocol": "tcp", "target": 80, "name": "http"}],
                "tasks": [f"web.{i}" for i in range(1, 61)],
            }
        ],
    }
)
ZONE = compile_zone(STATE, frozenset({"ingress"}))


def ask(
    name: str, rdtype: str = "A", limit: int = 512, edns: int | None = None, case: str | None = None
) -> dns.message.Message | None:
    q = dns.message.make_query(name, rdtype, use_edns=edns is not None, payload=edns or 512)
    wire = q.to_wire()
    if case:
        wire = wire.replace(name.encode(), case.encode())
    parsed = parse_query(wire)
    assert isinstance(parsed, Query)
    reply = build_reply(wire, parsed, ZONE, limit)
    return None if reply is None else dns.message.from_wire(reply, ignore_trailing=True)


def test_service_alias_and_case() -> None:
    r = ask("WeB", case="WeB")
    assert r is not None and r.answer[0].name.to_text() == "WeB."
    assert [x.to_text() for x in r.answer[0]] == ["10.255.0.5"]
    assert r.flags & dns.flags.AA
    alias = ask("www")
    assert alias is not None and [x.to_text() for x in alias.answer[0]] == ["10.255.0.5"]


def test_large_answers_truncate_over_udp_and_fit_with_edns_or_tcp() -> None:
    small = ask("tasks.web")
    assert small is not None and small.flags & dns.flags.TC
    assert sum(len(rr) for rr in small.answer) < 60
    edns = ask("tasks.web", edns=4096, limit=1232)
    assert edns is not None and not edns.flags & dns.flags.TC
    tcp = ask("tasks.web", limit=65535)
    assert tcp is not None and sum(len(rr) for rr in tcp.answer) == 60


def test_unknown_names() -> None:
    assert ask("example.org") is None  # not ours: forward
    nx = ask("tasks.nope")
    assert nx is not None and nx.rcode() == dns.rcode.NXDOMAIN
    nodata = ask("web", "MX")
    assert nodata is not None and nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert ask("9.9.9.9.in-addr.arpa", "PTR") is None  # outside the overlays: forward
    ours = ask("9.9.255.10.in-addr.arpa", "PTR")
    assert ours is not None and ours.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"", -1),
        (b"\x00" * 11, -1),
        (b"\x12\x34\x80\x00" + b"\x00\x01" + b"\x00" * 6, -1),  # a response: never answered
        (b"\x12\x34\x28\x00" + b"\x00\x01" + b"\x00" * 6 + b"\x00\x00\x01\x00\x01", NOTIMP),
        (b"\x12\x34\x01\x00" + b"\x00\x02" + b"\x00" * 6, FORMERR),
        (b"\x12\x34\x01\x00" + b"\x00\x01" + b"\x00" * 6 + b"\xc0\x0c\x00\x01\x00\x01", FORMERR),
        (b"\x12\x34\x01\x00" + b"\x00\x01" + b"\x00" * 6 + b"\x05ab", FORMERR),
        (b"\x12\x34\x01\x00" + b"\x00\x01" + b"\x00" * 6 + b"\x00\x00\x01", FORMERR),
    ],
)
def test_malformed_queries(wire: bytes, expected: int) -> None:
    assert parse_query(wire) == expected


def test_srv_has_targets_and_glue() -> None:
    r = ask("_http._tcp.web", "SRV", limit=65535)
    assert r is not None and len(r.answer[0]) == 60
    assert {rr.port for rr in r.answer[0]} == {80}
    assert len(r.additional) == 60
    assert ipaddress.IPv4Address(r.additional[0][0].to_text()) in ipaddress.IPv4Network(
        "10.255.0.0/16"
    )
