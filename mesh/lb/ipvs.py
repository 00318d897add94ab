"""Round-robin in IPVS (pyroute2), the way Docker's routing mesh does it.

The frontend chain marks a connection's first packet with a firewall mark of the frontend's
own; an IPVS service for that mark (scheduler rr) forwards it to the backends in NAT mode.
IPVS sees a published port's connection in LOCAL_IN (the mark matches any local address, so
from outside, from the node's address and hairpin alike) and a connection made on the node,
or in a task's namespace to a VIP, in LOCAL_OUT (our nat chains run at -100, before IPVS at
-98). The node masquerades marked traffic onto the overlays (the chain `ipvs-postrouting`):
IPVS leaves no trace in conntrack's status, so the table's `ct status dnat` rule misses it.
A VXLAN device keeps the mark of the frame it encapsulates, and IPVS would take the VXLAN
datagram for a new connection to the service (it did, in the VM lab): the chain `ipvs-vxlan`
clears our marks on VXLAN datagrams before IPVS sees them. When IPVS hands a connection made
in a task to that same task (its VIP, balanced to itself), it rewrites the destination of
every packet of the connection but keeps the route towards the VIP, so they would leave for
nowhere: the route chain `ipvs-local`, after IPVS, marks a packet for a local address that
is not routed to lo, which makes the kernel route it again, locally.
IPVS sysctls as Docker and kube-proxy set them: conntrack on (so netfilter NAT composes with
IPVS), expire_nodest_conn (a deleted backend's connections are rescheduled or fail fast),
conn_reuse_mode 0 (no 1 s stalls on port reuse, moby#35082).

A mark is derived from the frontend's key, not from the order frontends were added, so a
restarted daemon finds its services where it left them; a full sync diffs IPVS against the
desired state instead of rebuilding it, and established connections survive restarts.
A TCP backend that leaves is drained (weight 0: no new connections, current ones finish) and
deleted once IPVS holds no connection to it (closed ones linger ~2 min), or after
DRAIN_SECONDS; a UDP backend is deleted at
once (a UDP flow has no end to wait for; its next datagram is scheduled afresh once the mesh
has deleted the flow's conntrack entry).

Proven on Debian's kernel in the VM lab (docs/kernels.md).
"""

from __future__ import annotations

import errno
import hashlib
import socket
import time
from collections.abc import Callable
from typing import Any

from pyroute2 import IPVS, IPVSDest, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from mesh.lb.base import BackendCount, Balancer, FrontendSlot
from mesh.lb.model import Frontend
from mesh.naming import BRIDGE_PREFIX, VXLAN_PORT
from mesh.netns import run_in_netns
from mesh.nft import expr as E
from mesh.nft.transaction import HOOK_OUTPUT, HOOK_POSTROUTING, Hook, Transaction

FWMARK_BASE = 0x5E000000
FWMARK_MASK = 0xFF000000
IP_VS_CONN_F_MASQ = 0  # pyroute2's default is 3, direct routing
NETLINK_GENERIC = 16
DRAIN_SECONDS = 600.0
STATS_SECONDS = 1.0  # IPVS itself sums its counters every 2 s
MASQ_CHAIN = "ipvs-postrouting"
VXLAN_CHAIN = "ipvs-vxlan"
LOCAL_CHAIN = "ipvs-local"
REROUTE_MARK = FWMARK_BASE  # no service's: _assign never hands it out
_SYSCTLS = {
    "conntrack": "1",
    "expire_nodest_conn": "1",
    "conn_reuse_mode": "0",
    "expire_quiescent_template": "1",
}
_GONE = {errno.ENOENT, errno.ESRCH}


def mark_for(key: str) -> int:
    """The preferred firewall mark of a frontend: stable across restarts."""
    return FWMARK_BASE | int.from_bytes(hashlib.sha256(key.encode()).digest()[:3], "big")


def _service(mark: int) -> Any:
    # The kernel wants a netmask on every new service (EINVAL without); pyroute2 adds one
    # only to address services.
    return IPVSService(fwmark=mark, af=socket.AF_INET, sched_name="rr", netmask="255.255.255.255")


def _dest(ip: str, port: int, weight: int = 1) -> Any:
    return IPVSDest(addr=ip, port=port, fwd_method=IP_VS_CONN_F_MASQ, weight=weight)


def _attr(msg: Any, name: str) -> Any:
    return msg.get_nested("IPVS_CMD_ATTR_DEST", name)


class IpvsBalancer(Balancer):
    name = "ipvs"

    def __init__(self, netns: str | None = None, clock: Callable[[], float] = time.monotonic):
        super().__init__(netns)
        self._clock = clock
        self._marks: dict[str, int] = {}  # frontend key -> mark
        self._old_marks: dict[str, int] = {}  # before the last full sync
        self._want: dict[int, Frontend] = {}  # mark -> frontend, as committed to nftables
        self._dirty: set[int] = set()
        self._full = False
        self._draining: dict[tuple[int, str, int], float] = {}  # (mark, ip, port) -> since
        # one read of every service's counters serves a whole scrape
        self._stats: tuple[float, dict[int, dict[tuple[str, int], int]]] | None = None

    def masquerade_match(self) -> list[E.Expr]:
        return [
            E.meta_load(E.META_MARK, E.REG_1),
            E.bitwise(E.REG_1, E.REG_1, E.u32_host(FWMARK_MASK), E.u32_host(0)),
            E.cmp(E.CMP_EQ, E.REG_1, E.u32_host(FWMARK_BASE)),
        ]

    def mark(self, fe: Frontend) -> int:
        return self._marks[fe.key]

    def _assign(self, key: str) -> int:
        if key in self._marks:
            return self._marks[key]
        taken = set(self._marks.values())
        mark = self._old_marks.get(key, mark_for(key))
        while mark in taken or mark == REROUTE_MARK:  # a hash collision: the next free mark
            mark = FWMARK_BASE | ((mark + 1) & ~FWMARK_MASK)
        self._marks[key] = mark
        return mark

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
        # A full sync: the table is rebuilt, and IPVS is compared with it afterwards.
        tx.add_chain(MASQ_CHAIN, Hook(HOOK_POSTROUTING, 100))
        tx.add_rule(
            MASQ_CHAIN,
            [*self.masquerade_match(), *E.match_oifname_prefix(BRIDGE_PREFIX), E.masquerade()],
            comment="IPVS traffic onto overlays",
        )
        tx.add_chain(VXLAN_CHAIN, Hook(HOOK_OUTPUT, -300, "filter"))
        tx.add_rule(
            VXLAN_CHAIN,
            [
                *E.match_l4proto(17),
                E.payload(E.TRANSPORT_HEADER, 2, 2, E.REG_1),
                E.cmp(E.CMP_EQ, E.REG_1, VXLAN_PORT.to_bytes(2, "big")),
                *self.masquerade_match(),
                E.immediate(E.REG_1, E.u32_host(0)),
                E.meta_set(E.META_MARK, E.REG_1),
            ],
            comment="VXLAN keeps the mark of what it carries; not for IPVS",
        )
        tx.add_chain(LOCAL_CHAIN, Hook(HOOK_OUTPUT, -97, "route"))
        tx.add_rule(
            LOCAL_CHAIN,
            [
                *E.match_fib_daddr_local(),
                E.meta_load(E.META_OIFNAME, E.REG_1),
                E.cmp(E.CMP_NEQ, E.REG_1, b"lo\0"),
                E.immediate(E.REG_1, E.u32_host(REROUTE_MARK)),
                E.meta_set(E.META_MARK, E.REG_1),
            ],
            comment="IPVS sent it to this namespace itself: a changed mark routes it again",
        )
        self._full = True
        self._old_marks, self._marks = self._marks, {}
        self._want = {}
        self._dirty = set()

    def declare_table(self, tx: Transaction) -> None:
        """Nothing: a frontend's chain only marks, and the chains `declare` adds serve every
        table."""

    def add_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        mark = self._assign(fe.key)
        tx.add_rule(
            slot.chain,
            [E.immediate(E.REG_1, E.u32_host(mark)), E.meta_set(E.META_MARK, E.REG_1)],
            comment=f"{fe.describe()} -> IPVS fwmark {mark:#x}",
        )
        self._want[mark] = fe
        self._dirty.add(mark)

    def update_backends(
        self, tx: Transaction, old: Frontend, new: Frontend, slot: FrontendSlot
    ) -> None:
        mark = self._marks[new.key]
        self._want[mark] = new
        self._dirty.add(mark)

    def remove_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        tx.flush_chain(slot.chain)
        mark = self._marks.pop(fe.key)
        self._want.pop(mark, None)
        self._dirty.add(mark)

    def after_commit(self) -> None:
        """Bring IPVS in line with what was just committed to nftables; sweep drained backends."""
        now = self._clock()
        due = [k for k, since in self._draining.items() if k[0] not in self._dirty]
        if not (self._full or self._dirty or due):
            return
        full, dirty = self._full, self._dirty
        self._full, self._dirty = False, set()
        try:
            self._run(lambda ipvs: self._apply(ipvs, full, dirty, now))
        except BaseException:
            self._full = True  # try everything again on the next sync
            raise

    def _apply(self, ipvs: Any, full: bool, dirty: set[int], now: float) -> None:
        marks = set(dirty)
        if full:
            for key, value in _SYSCTLS.items():
                with open(f"/proc/sys/net/ipv4/vs/{key}", "w") as f:
                    f.write(value)
            existing = set()
            for msg in ipvs.service("dump"):
                mark = msg.get_nested("IPVS_CMD_ATTR_SERVICE", "IPVS_SVC_ATTR_FWMARK") or 0
                if mark & FWMARK_MASK == FWMARK_BASE:
                    existing.add(mark)
            marks |= existing | set(self._want)
            self._draining = {k: v for k, v in self._draining.items() if k[0] in self._want}
        for mark in sorted(marks):
            fe = self._want.get(mark)
            if fe is None:
                self._ignore_gone(ipvs.service, "del", service=_service(mark))
                self._draining = {k: v for k, v in self._draining.items() if k[0] != mark}
            else:
                self._sync_service(ipvs, mark, fe, now)
        for drained in [k for k in self._draining if k[0] not in marks]:
            self._sweep(ipvs, drained, now)

    @staticmethod
    def _ignore_gone(call: Callable[..., Any], *args: Any, **kw: Any) -> None:
        try:
            call(*args, **kw)
        except NetlinkError as e:
            if e.code not in _GONE:
                raise

    def _dests(self, ipvs: Any, mark: int) -> dict[tuple[str, int], tuple[int, int]]:
        """(ip, port) -> (weight, connections) of a service's destinations. Connections count
        the inactive too: one still in its handshake is inactive, and deleting its
        destination would drop its next packet."""
        out = {}
        for msg in ipvs.dest("dump", service=_service(mark)):
            ip = str(_attr(msg, "IPVS_DEST_ATTR_ADDR"))
            port = int(_attr(msg, "IPVS_DEST_ATTR_PORT"))
            out[(ip, port)] = (
                int(_attr(msg, "IPVS_DEST_ATTR_WEIGHT") or 0),
                int(_attr(msg, "IPVS_DEST_ATTR_ACTIVE_CONNS") or 0)
                + int(_attr(msg, "IPVS_DEST_ATTR_INACT_CONNS") or 0),
            )
        return out

    def _sync_service(self, ipvs: Any, mark: int, fe: Frontend, now: float) -> None:
        try:
            ipvs.service("add", service=_service(mark))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        have = self._dests(ipvs, mark)
        want = {(str(b.ip), b.port) for b in fe.backends}
        for ip, port in sorted(want):
            self._draining.pop((mark, ip, port), None)
            if (ip, port) not in have:
                ipvs.dest("add", service=_service(mark), dest=_dest(ip, port))
            elif have[(ip, port)][0] != 1:
                ipvs.dest("set", service=_service(mark), dest=_dest(ip, port))
        for (ip, port), (weight, conns) in sorted(have.items()):
            if (ip, port) in want:
                continue
            key = (mark, ip, port)
            if fe.protocol == "udp" or conns == 0:
                self._draining.pop(key, None)
                self._ignore_gone(ipvs.dest, "del", service=_service(mark), dest=_dest(ip, port))
            else:
                if weight != 0:
                    ipvs.dest("set", service=_service(mark), dest=_dest(ip, port, weight=0))
                self._draining.setdefault(key, now)

    def _sweep(self, ipvs: Any, key: tuple[int, str, int], now: float) -> None:
        mark, ip, port = key
        try:
            conns = self._dests(ipvs, mark).get((ip, port), (0, 0))[1]
        except NetlinkError as e:
            if e.code not in _GONE:
                raise
            conns = 0
        if conns == 0 or now - self._draining[key] > DRAIN_SECONDS:
            self._draining.pop(key)
            self._ignore_gone(ipvs.dest, "del", service=_service(mark), dest=_dest(ip, port))

    def counts(
        self, counters: dict[str, tuple[int, int]], fe: Frontend, slot: FrontendSlot
    ) -> list[BackendCount]:
        mark = self._marks.get(fe.key)
        if mark is None:
            return []
        found = self._read_stats().get(mark, {})
        return [BackendCount(fe, b, found.get((str(b.ip), b.port), 0)) for b in fe.backends]

    def _read_stats(self) -> dict[int, dict[tuple[str, int], int]]:
        """mark -> (ip, port) -> connections scheduled, for every service of ours."""
        now = self._clock()
        if self._stats is not None and now - self._stats[0] < STATS_SECONDS:
            return self._stats[1]
        marks = sorted(self._marks.values())

        def read(ipvs: Any) -> dict[int, dict[tuple[str, int], int]]:
            out: dict[int, dict[tuple[str, int], int]] = {}
            for mark in marks:
                here = out[mark] = {}
                try:
                    dests = ipvs.dest("dump", service=_service(mark))
                except NetlinkError as e:
                    if e.code not in _GONE:
                        raise
                    continue
                for msg in dests:
                    stats = _attr(msg, "IPVS_DEST_ATTR_STATS64") or _attr(
                        msg, "IPVS_DEST_ATTR_STATS"
                    )
                    conns = stats.get_attr("IPVS_STATS_ATTR_CONNS") if stats is not None else 0
                    ip, port = _attr(msg, "IPVS_DEST_ATTR_ADDR"), _attr(msg, "IPVS_DEST_ATTR_PORT")
                    here[(str(ip), int(port))] = int(conns or 0)
            return out

        found: dict[int, dict[tuple[str, int], int]] = self._run(read)
        self._stats = (now, found)
        return found
