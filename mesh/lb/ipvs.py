"""Round-robin in IPVS (pyroute2), the way Docker's routing mesh does it.

The frontend chain marks the connection's first packet with a firewall mark unique to the
frontend (0x5E000000 | fid); an IPVS service for that mark, scheduler rr, forwards it to the
backends in NAT (masquerade) mode. The node table masquerades marked traffic onto the overlay.
IPVS sysctls as Docker and kube-proxy set them: conntrack on (so netfilter NAT composes),
expire_nodest_conn (a removed backend's connections fail fast instead of hanging),
conn_reuse_mode 0 (no 1 s stalls on port reuse, moby#35082).

IPVS is absent from the kernel Shoal is developed on; this backend is proven in the VM lab
(docs/kernels.md).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from pyroute2 import IPVS, IPVSDest, IPVSService

from mesh.lb.base import BackendCount, Balancer, FrontendSlot
from mesh.lb.model import Backend, Frontend
from mesh.netns import run_in_netns
from mesh.nft import expr as E
from mesh.nft.transaction import Transaction

log = logging.getLogger("shoal.mesh.ipvs")

FWMARK_BASE = 0x5E000000
FWMARK_MASK = 0xFF000000
IP_VS_CONN_F_MASQ = 0
NETLINK_GENERIC = 16
_SYSCTLS = {
    "conntrack": "1",
    "expire_nodest_conn": "1",
    "conn_reuse_mode": "0",
    "expire_quiescent_template": "1",
}


def fwmark(slot: FrontendSlot) -> int:
    return FWMARK_BASE | (slot.fid & ~FWMARK_MASK)


def _service(slot: FrontendSlot) -> Any:
    return IPVSService(fwmark=fwmark(slot), af=socket.AF_INET, sched_name="rr")


def _dest(b: Backend) -> Any:
    return IPVSDest(addr=str(b.ip), port=b.port, fwd_method=IP_VS_CONN_F_MASQ, weight=1)


class IpvsBalancer(Balancer):
    name = "ipvs"

    def __init__(self, netns: str | None = None):
        super().__init__(netns)
        self._pending: list[Callable[[Any], None]] = []

    def masquerade_match(self) -> list[E.Expr]:
        # IPVS does not mark its NAT in conntrack's status; our firewall mark says it all.
        return [
            E.meta_load(E.META_MARK, E.REG_1),
            E.bitwise(E.REG_1, E.REG_1, E.u32_host(FWMARK_MASK), E.u32_host(0)),
            E.cmp(E.CMP_EQ, E.REG_1, E.u32_host(FWMARK_BASE)),
        ]

    def _ipvs(self) -> Any:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_GENERIC)
        return IPVS(fileno=sock.detach())

    def _run(self, work: Callable[[Any], Any]) -> Any:
        def inside() -> Any:
            ipvs = self._ipvs()
            try:
                return work(ipvs)
            finally:
                ipvs.close()

        return run_in_netns(self.netns, inside)

    def declare(self, tx: Transaction) -> None:
        # A full sync: forget IPVS services of ours left from before, then rebuild.
        def reset(ipvs: Any) -> None:
            for key, value in _SYSCTLS.items():
                with open(f"/proc/sys/net/ipv4/vs/{key}", "w") as f:
                    f.write(value)
            for msg in ipvs.service("dump"):
                svc = IPVSService.from_message(msg)
                mark = svc.get("fwmark") if hasattr(svc, "get") else None
                if mark and (mark & FWMARK_MASK) == FWMARK_BASE:
                    ipvs.service("del", service=svc)

        self._pending = [reset]

    def add_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        tx.add_rule(
            slot.chain,
            [E.immediate(E.REG_1, E.u32_host(fwmark(slot))), E.meta_set(E.META_MARK, E.REG_1)],
            comment=f"{fe.describe()} -> IPVS fwmark {fwmark(slot):#x}",
        )

        def add(ipvs: Any) -> None:
            ipvs.service("add", service=_service(slot))
            for b in fe.backends:
                ipvs.dest("add", service=_service(slot), dest=_dest(b))

        self._pending.append(add)

    def update_backends(
        self, tx: Transaction, old: Frontend, new: Frontend, slot: FrontendSlot
    ) -> None:
        gone = [b for b in old.backends if b not in new.backends]
        added = [b for b in new.backends if b not in old.backends]

        def update(ipvs: Any) -> None:
            for b in gone:
                ipvs.dest("del", service=_service(slot), dest=_dest(b))
            for b in added:
                ipvs.dest("add", service=_service(slot), dest=_dest(b))

        self._pending.append(update)

    def remove_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        tx.flush_chain(slot.chain)
        self._pending.append(lambda ipvs: ipvs.service("del", service=_service(slot)))

    def after_commit(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._run(lambda ipvs: [step(ipvs) for step in pending])

    def counts(
        self, counters: dict[str, tuple[int, int]], fe: Frontend, slot: FrontendSlot
    ) -> list[BackendCount]:
        def read(ipvs: Any) -> dict[tuple[str, int], int]:
            out = {}
            for msg in ipvs.dest("dump", service=_service(slot)):
                dest = IPVSDest.from_message(msg)
                stats = msg.get_nested(
                    "IPVS_CMD_ATTR_DEST", "IPVS_DEST_ATTR_STATS64"
                ) or msg.get_nested("IPVS_CMD_ATTR_DEST", "IPVS_DEST_ATTR_STATS")
                conns = stats.get_attr("IPVS_STATS_ATTR_CONNS") if stats is not None else 0
                out[(str(dest.get("addr")), int(dest.get("port")))] = int(conns or 0)
            return out

        found = self._run(read)
        return [BackendCount(fe, b, found.get((str(b.ip), b.port), 0)) for b in fe.backends]
