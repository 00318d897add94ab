"""VXLAN overlays and task endpoints, reconciled over netlink.

Per network, in the node namespace: a bridge `sh-br<vni>` holding this node's gateway address,
and a VXLAN device `sh-vx<vni>` enslaved to it, with learning off and ARP proxying on. Every
remote endpoint (tasks and other nodes' gateways) gets a static neighbour entry (IP -> MAC)
and a static FDB entry (MAC -> that node's underlay address) on the VXLAN device; nothing is
flooded. Per local endpoint: a veth pair, one end on the bridge, the other in the task's
namespace as ethN with the endpoint's MAC and address, and a static entry for that MAC on the
bridge's port (an address, and so its MAC, may move between nodes as tasks are replaced).

Reconcile reads what exists and changes only the difference; it touches only links named
`sh-...` and the entries on our own VXLAN devices. Endpoints go in batches (mesh/netlink/links.py:
a thousand new ones are a few requests in the node's namespace, and one dump and one batch in
each task's), as do the remote entries (mesh/netlink/rtnl.py); the few bridges and VXLAN
devices are changed through pyroute2.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mesh.naming import (
    VXLAN_PORT,
    bridge_name,
    is_owned_link,
    veth_name,
    vxlan_name,
)
from mesh.netlink.core import NetlinkRefused
from mesh.netlink.links import (
    IF_OPER_DOWN,
    Link,
    LinkSocket,
    Request,
    Veth,
    add_address,
    bridge_entry,
    delete_link,
    replace_default_route,
    set_link,
)
from mesh.netlink.rtnl import Neigh, RtnlSocket
from mesh.netns import NetnsError, netns_path, run_in_each_netns, run_in_netns
from mesh.state import ESP_OVERHEAD, VXLAN_OVERHEAD, Endpoint, MeshState, Network, mac_for_ip

log = logging.getLogger(__name__)

AF_INET = 2


class OverlayError(RuntimeError):
    pass


@dataclass
class OverlayReport:
    changes: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # what -> why

    def error(self, what: str, why: str) -> None:
        log.error("overlay reconcile: %s: %s", what, why)
        self.errors[what] = why


@contextmanager
def iproute(netns: str | None) -> Iterator[Any]:
    """An rtnetlink handle inside a namespace.

    The socket is made by a thread that enters the namespace: pyroute2's own netns support
    forks a helper process, whose exit would reach an asyncio parent as a spurious signal.
    """
    sock = run_in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0))
    ipr = IPRoute(fileno=sock.detach())
    try:
        yield ipr
    finally:
        ipr.close()


@contextmanager
def netns_fd(netns: str) -> Iterator[int]:
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


# IFLA_VXLAN_* attribute types (the keys are pyroute2's names for them)
_VXLAN_ID, _VXLAN_LINK, _VXLAN_LOCAL, _VXLAN_LEARNING = 1, 3, 4, 7
_VXLAN_PROXY, _VXLAN_PORT = 11, 15


def _vxlan_data(link: Link) -> dict[str, Any]:
    data = link.info_data

    def u32(kind: int) -> int | None:
        raw = data.get(kind)
        return int.from_bytes(raw[:4], sys.byteorder) if raw and len(raw) >= 4 else None

    def u8(kind: int) -> int | None:
        raw = data.get(kind)
        return raw[0] if raw else None

    local, port = data.get(_VXLAN_LOCAL), data.get(_VXLAN_PORT)
    return {
        "IFLA_VXLAN_ID": u32(_VXLAN_ID),
        "IFLA_VXLAN_LOCAL": socket.inet_ntoa(local) if local and len(local) == 4 else None,
        "IFLA_VXLAN_PORT": int.from_bytes(port[:2], "big") if port and len(port) >= 2 else None,
        "IFLA_VXLAN_LEARNING": u8(_VXLAN_LEARNING),
        "IFLA_VXLAN_PROXY": u8(_VXLAN_PROXY),
        "IFLA_VXLAN_LINK": u32(_VXLAN_LINK),
    }


def write_sysctl(name: str, value: str) -> None:
    """Set a sysctl of the calling thread's network namespace."""
    with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
        f.write(value)


def network_mtu(net: Network, underlay_mtu: int) -> int:
    if net.mtu:
        return net.mtu
    if net.encrypted:
        # rounded down to 4 bytes: ESP pads its payload to that
        return (underlay_mtu - VXLAN_OVERHEAD - ESP_OVERHEAD) & ~3
    return underlay_mtu - VXLAN_OVERHEAD


@dataclass
class _Attachment:
    """A local endpoint plugged in, or checked, by this sync."""

    ep: Endpoint
    netns: str
    host: str  # the veth's end on the bridge
    ifname: str  # its end in the task
    mtu: int
    prefixlen: int
    gateway: str | None  # the task's default route goes through it: its first attachment only
    bridge: int
    applied: tuple[Endpoint, str, int, int]
    host_link: Link | None  # the host end, when it exists
    created: bool = False
    error: str | None = None


class Overlay:
    """Reconciles overlays and endpoints of one node. netns None = the current namespace."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        # VNIs of encrypted networks whose ESP protection is in place (mesh/ipsec.py); any
        # other encrypted network is refused.
        self.protected: set[int] = set()
        # Endpoints applied and how: an unchanged one is not re-checked inside its namespace
        # unless the sync is full.
        self._applied: dict[str, tuple[Endpoint, str, int, int]] = {}
        # Remote ARP/FDB entries applied per VNI, and the VXLAN device they are on.
        self._entries: dict[int, set[Neigh]] = {}
        self._vxlan_index: dict[int, int] = {}
        # networks whose subnet was checked against the node's routes, and those that clash
        self._checked: dict[str, ipaddress.IPv4Network] = {}
        self._clashing: dict[str, str] = {}

    def reconcile(self, state: MeshState, full: bool = True) -> OverlayReport:
        report = OverlayReport()
        with iproute(self.netns) as ipr, closing(run_in_netns(self.netns, LinkSocket)) as node:
            links = {link.name: link for link in node.links()}
            underlay = self._underlay(node, links, state)
            if underlay is None:
                report.error(
                    "underlay",
                    f"this node's address {state.address} is not on any "
                    "interface; check peers in the mesh state",
                )
                return report
            ul_index, ul_mtu = underlay
            local = state.local_endpoints()
            nets_here = self._networks_here(state)
            desired_links: set[str] = set()
            failed: set[str] = set()
            bridges: dict[str, int] = {}
            for net in nets_here:
                if net.encrypted and net.vni not in self.protected:
                    # fail closed: its links (if any) go as stale ones
                    failed.add(net.name)
                    report.error(
                        f"network {net.name}",
                        f"network {net.name} is encrypted, and its ESP protection is not in "
                        "place; refusing to attach it rather than send its traffic in the clear",
                    )
                    continue
                desired_links |= {bridge_name(net.vni), vxlan_name(net.vni)}
                mtu = network_mtu(net, ul_mtu)
                try:
                    bridges[net.name] = self._network(
                        ipr, node, links, state, net, ul_index, mtu, full, report
                    )
                except (NetlinkError, NetlinkRefused, OSError, OverlayError) as e:
                    self._entries.pop(net.vni, None)
                    failed.add(net.name)
                    report.error(f"network {net.name}", str(e))
            wanted: list[_Attachment] = []
            for ep in local:
                if ep.netns is None:
                    continue
                net = state.networks_by_name[ep.network]
                if net not in nets_here:
                    continue
                host = veth_name(ep.netns, ep.network)
                desired_links.add(host)
                if net.name in failed:
                    continue  # no bridge to attach to; what exists stays until it has one
                mtu = network_mtu(net, ul_mtu)
                done = (ep, str(net.gateways[state.node]), mtu, state.attachment_rank[ep])
                if not full and host in links and self._applied.get(host) == done:
                    continue
                self._applied.pop(host, None)
                position = state.attachment_rank[ep]
                wanted.append(
                    _Attachment(
                        ep=ep,
                        netns=ep.netns,
                        host=host,
                        ifname=ep.ifname or f"eth{position}",
                        mtu=mtu,
                        prefixlen=net.subnet.prefixlen,
                        gateway=str(net.gateways[state.node]) if position == 0 else None,
                        bridge=bridges[net.name],
                        applied=done,
                        host_link=links.get(host),
                    )
                )
            if wanted:
                for a in _Endpoints(node, wanted, report).apply():
                    self._applied[a.host] = a.applied
            # The links read first name every stale one: what this sync made or remade is
            # desired (re-reading 1,000 links would be a good part of a sync that changes nothing).
            stale = [
                link
                for name, link in links.items()
                if is_owned_link(name) and name not in desired_links
            ]
            for link in stale:
                self._applied.pop(link.name, None)
                log.info("removing stale link %s", link.name)
            outcomes = node.run([delete_link(link.index, link.name) for link in stale])
            for link, err in zip(stale, outcomes, strict=True):
                if err is None:
                    report.changes += 1
                elif err.errno != errno.ENODEV:  # ENODEV: gone meanwhile (with its peer's netns)
                    report.error(f"link {link.name}", f"cannot delete: {err}")
        return report

    def clashes(self, state: MeshState) -> dict[str, str]:
        """Networks to attach here whose subnet overlaps one of the node's own routes (one
        not through a device of ours), and why: attaching one would route that traffic into
        the overlay. A VM's NAT network (VirtualBox's and QEMU's 10.0.2.0/24) lies in the
        swarm's default address pool. Networks already checked keep their verdict."""
        wanted = {n.name: n.subnet for n in self._networks_here(state)}
        new = {name: net for name, net in wanted.items() if self._checked.get(name) != net}
        self._checked = {name: net for name, net in self._checked.items() if wanted.get(name)}
        if not new:
            return {name: why for name, why in self._clashing.items() if name in wanted}
        found: dict[str, str] = {}
        with iproute(self.netns) as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            routes = [
                (
                    ipaddress.IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}"),
                    names.get(r.get_attr("RTA_OIF"), "?"),
                )
                for r in ipr.get_routes(family=AF_INET, table=254)
                if r["dst_len"] > 0
            ]
        for name, subnet in new.items():
            theirs = [
                f"{dst} on {dev}"
                for dst, dev in routes
                if dst.overlaps(subnet) and not is_owned_link(dev)
            ]
            self._checked[name] = subnet
            if theirs:
                found[name] = (
                    f"its subnet {subnet} overlaps this node's route to {', '.join(theirs)}: "
                    "attaching it would take that traffic; remove the network and create it "
                    "with --subnet elsewhere (or init the swarm with another "
                    "--default-addr-pool)"
                )
            else:
                self._clashing.pop(name, None)
        self._clashing.update(found)
        return {name: why for name, why in self._clashing.items() if name in wanted}

    @staticmethod
    def _networks_here(state: MeshState) -> list[Network]:
        """Networks this node takes part in: those with a gateway here."""
        return [n for n in state.networks if state.node in n.gateways]

    @staticmethod
    def _underlay(
        node: LinkSocket, links: dict[str, Link], state: MeshState
    ) -> tuple[int, int] | None:
        by_index = {link.index: link for link in links.values()}
        for addr in node.addresses():
            if addr.address == str(state.address) and addr.index in by_index:
                return addr.index, by_index[addr.index].mtu
        return None

    def _network(
        self,
        ipr: Any,
        node: LinkSocket,
        links: dict[str, Link],
        state: MeshState,
        net: Network,
        ul_index: int,
        mtu: int,
        full: bool,
        report: OverlayReport,
    ) -> int:
        """Makes the network's bridge and VXLAN device right; returns the bridge's index."""
        br, vx = bridge_name(net.vni), vxlan_name(net.vni)
        gw = net.gateways[state.node]
        # bridge
        link = links.get(br)
        if link is not None and link.kind != "bridge":
            ipr.link("del", index=link.index)
            link = None
        if link is None:
            ipr.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0)
            report.changes += 1
            link = self._read_link(node, br)
        br_index = link.index
        if link.mtu != mtu:
            ipr.link("set", index=br_index, mtu=mtu)
            report.changes += 1
        want = {(str(gw), net.subnet.prefixlen)}
        have = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(family=AF_INET, index=br_index)
        }
        for addr, plen in have - want:
            ipr.addr("del", index=br_index, address=addr, prefixlen=plen)
            report.changes += 1
        for addr, plen in want - have:
            ipr.addr("add", index=br_index, address=addr, prefixlen=plen)
            report.changes += 1
        if link.mac != mac_for_ip(gw):
            ipr.link("set", index=br_index, address=mac_for_ip(gw))
            report.changes += 1
        if link.operstate == IF_OPER_DOWN or not link.up:
            ipr.link("set", index=br_index, state="up")
        # vxlan
        link = links.get(vx)
        wanted = {
            "IFLA_VXLAN_ID": net.vni,
            "IFLA_VXLAN_LOCAL": str(state.address),
            "IFLA_VXLAN_PORT": VXLAN_PORT,
            "IFLA_VXLAN_LEARNING": 0,
            "IFLA_VXLAN_PROXY": 1,
            "IFLA_VXLAN_LINK": ul_index,
        }
        if link is not None and (link.kind != "vxlan" or _vxlan_data(link) != wanted):
            log.info("recreating %s: its settings differ", vx)
            ipr.link("del", index=link.index)
            link = None
        if link is None:
            ipr.link(
                "add",
                ifname=vx,
                kind="vxlan",
                vxlan_id=net.vni,
                vxlan_local=str(state.address),
                vxlan_link=ul_index,
                vxlan_port=VXLAN_PORT,
                vxlan_learning=0,
                vxlan_proxy=1,
                mtu=mtu,
            )
            report.changes += 1
            link = self._read_link(node, vx)
        vx_index = link.index
        if link.mtu != mtu or link.master != br_index:
            ipr.link("set", index=vx_index, mtu=mtu, master=br_index)
            report.changes += 1
        if not link.up:
            ipr.link("set", index=vx_index, state="up")
        if self._vxlan_index.get(net.vni) != vx_index:
            self._entries.pop(net.vni, None)  # a new device: what we knew is gone with the old
            self._vxlan_index[net.vni] = vx_index
        self._remote_entries(state, net, vx_index, full, report)
        return br_index

    @staticmethod
    def _read_link(node: LinkSocket, name: str) -> Link:
        for link in node.links():
            if link.name == name:
                return link
        raise OverlayError(f"{name} is gone once made")

    def _remote_entries(
        self, state: MeshState, net: Network, vx_index: int, full: bool, report: OverlayReport
    ) -> None:
        """Static ARP and FDB entries for every endpoint of the network on other nodes."""
        peers = {node: int(ip) for node, ip in state.peers.items()}
        here = state.node
        want: set[Neigh] = set()
        for node, gw in net.gateways.items():
            if node != here:
                mac = mac_for_ip(gw)
                want.add(("arp", vx_index, int(gw), mac))
                want.add(("fdb", vx_index, mac, peers[node]))
        # One pass building tuples: this runs over every endpoint of the network on each sync.
        remote = [
            (int(ep.ip), ep.mac, peers[ep.node])
            for ep in state.endpoints_on(net.name)
            if ep.node != here
        ]
        want.update([("arp", vx_index, ip, mac) for ip, mac, _ in remote])
        want.update([("fdb", vx_index, mac, dst) for _, mac, dst in remote])
        have = self._entries.get(net.vni)
        if have == want and not full:
            return
        with run_in_netns(self.netns, RtnlSocket) as rtnl:
            if full or have is None:
                have = rtnl.dump("arp", vx_index) | rtnl.dump("fdb", vx_index)
            # FDB entries are keyed by MAC; a changed one is replaced, not deleted and re-added.
            stale = have - want
            wanted_keys = {(n[0], n[2]) for n in want}
            stale = {n for n in stale if (n[0], n[2]) not in wanted_keys}
            self._entries.pop(net.vni, None)
            report.changes += rtnl.change(add=want - have, delete=stale)
        self._entries[net.vni] = want

    def cleanup(self) -> int:
        """Delete every link we own in this namespace; returns how many."""
        with closing(run_in_netns(self.netns, LinkSocket)) as node:
            owned = [
                link
                for link in node.links()
                if is_owned_link(link.name) and link.kind in ("bridge", "vxlan", "veth")
            ]
            outcomes = node.run([delete_link(link.index, link.name) for link in owned])
        errors = [e for e in outcomes if e is not None and e.errno != errno.ENODEV]
        if errors:  # ENODEV: went with its veth peer
            raise NetlinkRefused(errors)
        return sum(1 for e in outcomes if e is None)


class _Endpoints:
    """Plugs in (or checks) a sync's endpoints in batches: a handful of requests to the node's
    namespace for all of them, and one dump and one batch per task namespace.

    A refused request fails its endpoint alone; the others go on."""

    def __init__(self, node: LinkSocket, wanted: list[_Attachment], report: OverlayReport):
        self.node = node
        self.wanted = wanted
        self.report = report
        # each task namespace's links as read before any change: reused where nothing is made
        self.task_links: dict[str, dict[str, Link]] = {}

    def fail(self, a: _Attachment, why: str) -> None:
        if a.error is None:  # the first failure is the cause; later ones follow from it
            a.error = why
            self.report.error(f"endpoint {a.ep.task} on {a.ep.network}", why)

    def live(self) -> list[_Attachment]:
        return [a for a in self.wanted if a.error is None]

    def apply(self) -> list[_Attachment]:
        """Returns the endpoints now in place."""
        for a in self.wanted:
            try:
                if not netns_path(a.netns).exists():
                    self.fail(a, f"network namespace {a.netns} does not exist")
            except NetnsError as e:
                self.fail(a, str(e))
        opened = run_in_each_netns(sorted({a.netns for a in self.live()}), LinkSocket)
        sockets = {ns: s for ns, s in opened.items() if isinstance(s, LinkSocket)}
        try:
            for a in self.live():
                s = opened[a.netns]
                if not isinstance(s, LinkSocket):
                    self.fail(a, f"cannot open network namespace {a.netns}: {s}")
            by_netns: dict[str, list[_Attachment]] = {}
            for a in self.live():
                by_netns.setdefault(a.netns, []).append(a)
            try:
                self._check_existing(sockets, by_netns)
                self._create()
                self._host_side()
                for ns, group in by_netns.items():
                    self._task_side(sockets[ns], group)
            except (NetlinkRefused, OSError) as e:  # the node's socket failed: nothing is known
                for a in self.live():
                    self.fail(a, str(e))
        finally:
            for s in sockets.values():
                s.close()
        return self.live()

    def _check_existing(
        self, sockets: dict[str, LinkSocket], by_netns: dict[str, list[_Attachment]]
    ) -> None:
        """Endpoints whose veth exists: is their task side right? If not, the veth goes (and
        is made afresh below)."""
        wrong: list[_Attachment] = []
        for ns, group in by_netns.items():
            existing = [a for a in group if a.host_link is not None]
            if not existing:
                continue
            try:
                task_links = {link.name: link for link in sockets[ns].links()}
                self.task_links[ns] = task_links
                addrs: dict[int, set[tuple[str, int]]] = {}
                for addr in sockets[ns].addresses():
                    addrs.setdefault(addr.index, set()).add((addr.address, addr.prefixlen))
            except (NetlinkRefused, OSError) as e:
                for a in existing:
                    self.fail(a, f"cannot read network namespace {ns}: {e}")
                continue
            for a in existing:
                if not self._task_side_ok(a, task_links.get(a.ifname), addrs):
                    log.info("recreating endpoint %s of %s", a.host, a.ep.task)
                    wrong.append(a)
        outcomes = self.node.run(
            [delete_link(a.host_link.index, a.host) for a in wrong if a.host_link]
        )
        for a, err in zip(wrong, outcomes, strict=True):
            if err is not None and err.errno != errno.ENODEV:
                self.fail(a, str(err))
            else:
                a.host_link = None

    @staticmethod
    def _task_side_ok(
        a: _Attachment, link: Link | None, addrs: dict[int, set[tuple[str, int]]]
    ) -> bool:
        if link is None or link.kind != "veth" or link.mac != a.ep.mac:
            return False
        if link.mtu != a.mtu or not link.up:
            return False
        return addrs.get(link.index, set()) == {(str(a.ep.ip), a.prefixlen)}

    def _create(self) -> None:
        """One batch of veths, each peer made in its task's namespace with its final name,
        MAC and MTU, each host end on its bridge and up."""
        new = [a for a in self.live() if a.host_link is None]
        veths = [
            Veth(a.host, a.bridge, a.mtu, a.ifname, a.ep.mac, str(netns_path(a.netns))) for a in new
        ]
        for a, err in zip(new, self.node.create_veths(veths), strict=True):
            if err is None:
                a.created = True
                self.report.changes += 1
            elif err.errno == errno.EEXIST:
                # our host end did not exist, so the name taken is the task's
                self.fail(
                    a,
                    f"interface {a.ifname} already exists in {a.netns} and is not "
                    "ours; set endpoints[].ifname to another name",
                )
            else:
                self.fail(a, str(err))

    def _host_side(self) -> None:
        """The host ends: on the right bridge with the right MTU, up, with a static bridge
        entry for the task's MAC when the port is new to it."""
        if any(a.created for a in self.live()):
            links = {link.name: link for link in self.node.links()}
            for a in self.live():
                if a.created:
                    a.host_link = links.get(a.host)
                    if a.host_link is None:
                        self.fail(a, f"veth {a.host} vanished once made")
        requests: list[tuple[_Attachment, Request, bool]] = []  # bool: counts as a change
        for a in self.live():
            link = a.host_link
            assert link is not None
            attached = a.created
            if link.master != a.bridge or link.mtu != a.mtu:
                requests.append((a, set_link(link.index, master=a.bridge, mtu=a.mtu), True))
                attached = True
            if attached:
                # The bridge may have learned this MAC on the VXLAN port while its address
                # belonged to a task on another node; until the new task sends a frame, the
                # bridge would keep sending its traffic there (to a node that dropped it).
                # A static entry on the task's port settles it now.
                requests.append((a, bridge_entry(link.index, a.ep.mac), False))
            if not link.up:
                requests.append((a, set_link(link.index, up=True), False))
        self._run(self.node, requests)

    def _task_side(self, sock: LinkSocket, group: list[_Attachment]) -> None:
        """In one task namespace: each new end's address and up, lo up, the default route."""
        group = [a for a in group if a.error is None]
        if not group:
            return
        try:
            links = self.task_links.get(group[0].netns, {})
            if not links or any(a.created for a in group):
                links = {link.name: link for link in sock.links()}
            routes = (
                {(r.gateway, r.oif) for r in sock.default_routes()}
                if any(a.gateway and not a.created for a in group)
                else set()
            )
        except (NetlinkRefused, OSError) as e:
            for a in group:
                self.fail(a, f"cannot read network namespace {a.netns}: {e}")
            return
        requests: list[tuple[_Attachment, Request, bool]] = []
        lo = links.get("lo")
        if lo is not None and not lo.up:
            requests += [(a, set_link(lo.index, up=True), False) for a in group[:1]]
        for a in group:
            link = links.get(a.ifname)
            if link is None:
                self.fail(a, f"interface {a.ifname} is gone from {a.netns}")
                continue
            if a.created:
                requests.append((a, add_address(link.index, str(a.ep.ip), a.prefixlen), False))
                requests.append((a, set_link(link.index, up=True), False))
            if a.gateway is not None and (a.created or routes != {(a.gateway, link.index)}):
                requests.append((a, replace_default_route(a.gateway, link.index), True))
        self._run(sock, requests)

    def _run(self, sock: LinkSocket, requests: list[tuple[_Attachment, Request, bool]]) -> None:
        try:
            outcomes = sock.run([r for _, r, _ in requests])
        except OSError as e:
            for a, _, _ in requests:
                self.fail(a, str(e))
            return
        for (a, _, change), err in zip(requests, outcomes, strict=True):
            if err is not None:
                self.fail(a, str(err))
            elif change:
                self.report.changes += 1
