"""The names a task can resolve, compiled into wire-format answers.

Names are scoped like Docker's: a task sees the services and tasks of the networks it is
attached to (its "view").
  <service> / <alias>         A: the VIP on each shared network (vip mode) or every task IP (dnsrr)
  tasks.<service>             A: every task IP
  <task name>                 A: the task's IP(s)
  _<port>._<proto>.<service>  SRV: one per task, target the task name, A records as additional
  <reversed IP>.in-addr.arpa  PTR: VIPs -> service name, task IPs -> task name
A name of the cluster with no record of the asked type gets an empty NOERROR; an unknown name
under `tasks.` or an unknown address of an overlay subnet gets NXDOMAIN; anything else is
forwarded to the node's resolvers.

Answers are pre-encoded: an answer RR's owner is a pointer to the question (0xC00C), so the
reply is header + the question as received + these bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.state import MeshState

TTL = 5  # seconds: short, so scaling shows up quickly; Docker's 600 s served stale answers
QTYPE_A = 1
QTYPE_PTR = 12
QTYPE_SRV = 33
QTYPE_ANY = 255
CLASS_IN = 1
_QNAME_PTR = b"\xc0\x0c"


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        raw = label.encode("ascii", errors="replace")[:63]
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def _rr(owner: bytes, rtype: int, rdata: bytes) -> bytes:
    return owner + struct.pack(">HHIH", rtype, CLASS_IN, TTL, len(rdata)) + rdata


def _a(owner: bytes, ip: ipaddress.IPv4Address) -> bytes:
    return _rr(owner, QTYPE_A, ip.packed)


def _reverse_name(ip: ipaddress.IPv4Address) -> str:
    return ".".join(reversed(str(ip).split("."))) + ".in-addr.arpa"


@dataclass
class Answer:
    answers: list[bytes]  # RRs (owner = pointer to the question)
    additional: list[bytes] = field(default_factory=list)  # RRs with full owner names
    rotate: bool = False  # round-robin the order per query


@dataclass
class Zone:
    """Answers for one view: (lowercase wire qname, qtype) -> Answer."""

    records: dict[tuple[bytes, int], Answer] = field(default_factory=dict)
    names: set[bytes] = field(default_factory=set)  # every name we know (for NODATA)
    subnets: tuple[ipaddress.IPv4Network, ...] = ()

    def add(
        self,
        name: str,
        qtype: int,
        rrs: Iterable[bytes],
        rotate: bool = False,
        additional: Iterable[bytes] = (),
    ) -> None:
        key = encode_name(name.lower())
        self.names.add(key)
        entry = self.records.setdefault((key, qtype), Answer([], [], rotate))
        entry.answers.extend(rrs)
        entry.additional.extend(additional)
        entry.rotate = entry.rotate or rotate

    def is_cluster_name(self, wire: bytes) -> bool:
        """Names we are authoritative for even when they do not exist."""
        if wire.startswith(b"\x05tasks"):
            return True
        if wire.endswith(b"\x07in-addr\x04arpa\x00"):
            labels = _labels(wire)[:-2]
            if len(labels) == 4:
                try:
                    ip = ipaddress.IPv4Address(".".join(reversed(labels)))
                except ValueError:
                    return False
                return any(ip in s for s in self.subnets)
        return False


def _labels(wire: bytes) -> list[str]:
    out, i = [], 0
    while i < len(wire) and wire[i]:
        n = wire[i]
        out.append(wire[i + 1 : i + 1 + n].decode("ascii", errors="replace"))
        i += 1 + n
    return out


def compile_zone(state: MeshState, networks: frozenset[str]) -> Zone:
    zone = Zone(subnets=tuple(n.subnet for n in state.networks if n.name in networks))
    task_ips: dict[str, list[ipaddress.IPv4Address]] = {}
    for ep in state.endpoints:
        if ep.network in networks:
            task_ips.setdefault(ep.task, []).append(ep.ip)
    for task, ips in task_ips.items():
        zone.add(task, QTYPE_A, (_a(_QNAME_PTR, ip) for ip in ips))
        for ip in ips:
            zone.add(_reverse_name(ip), QTYPE_PTR, [_rr(_QNAME_PTR, QTYPE_PTR, encode_name(task))])
    for svc in state.services:
        ips = [ip for t in svc.tasks for ip in task_ips.get(t, [])]
        names = [svc.name, *svc.aliases]
        vips = [vip for net, vip in svc.vips.items() if net in networks]
        if not vips and not ips:
            continue  # not on any network of this view
        for name in names:
            if svc.endpoint_mode == "vip":
                zone.add(name, QTYPE_A, (_a(_QNAME_PTR, v) for v in vips))
            else:
                zone.add(name, QTYPE_A, (_a(_QNAME_PTR, ip) for ip in ips), rotate=True)
            zone.add(f"tasks.{name}", QTYPE_A, (_a(_QNAME_PTR, ip) for ip in ips), rotate=True)
        for vip in vips:
            zone.add(
                _reverse_name(vip), QTYPE_PTR, [_rr(_QNAME_PTR, QTYPE_PTR, encode_name(svc.name))]
            )
        for port in svc.ports:
            if not port.name:
                continue
            srv, extra = [], []
            for task in svc.tasks:
                for ip in task_ips.get(task, []):
                    target = encode_name(task)
                    srv.append(
                        _rr(_QNAME_PTR, QTYPE_SRV, struct.pack(">HHH", 0, 0, port.target) + target)
                    )
                    extra.append(_a(target, ip))
            for name in names:
                zone.add(
                    f"_{port.name}._{port.protocol}.{name}",
                    QTYPE_SRV,
                    srv,
                    rotate=True,
                    additional=extra,
                )
    return zone
