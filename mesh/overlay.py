"""VXLAN overlays and task endpoints, reconciled over netlink (pyroute2).

Per network, in the node namespace: a bridge `sh-br<vni>` holding this node's gateway address,
and a VXLAN device `sh-vx<vni>` enslaved to it, with learning off and ARP proxying on. Every
remote endpoint (tasks and other nodes' gateways) gets a static neighbour entry (IP -> MAC)
and a static FDB entry (MAC -> that node's underlay address) on the VXLAN device; nothing is
flooded. Per local endpoint: a veth pair, one end on the bridge, the other in the task's
namespace as ethN with the endpoint's MAC and address, and a static entry for that MAC on the
bridge's port (an address, and so its MAC, may move between nodes as tasks are replaced).

Reconcile reads what exists and changes only the difference; it touches only links named
`sh-...` and the entries on our own VXLAN devices.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
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
from mesh.netlink.rtnl import Neigh, RtnlError, RtnlSocket
from mesh.netns import netns_path, run_in_netns
from mesh.state import ESP_OVERHEAD, VXLAN_OVERHEAD, Endpoint, MeshState, Network, mac_for_ip

log = logging.getLogger(__name__)

AF_INET = 2
AF_BRIDGE = socket.AF_BRIDGE
NUD_NOARP = 0x40  # a static entry (NUD_PERMANENT would make the bridge take the frames itself)
NTF_MASTER = 0x04  # an entry in the bridge's own table, not the port's


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


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _vxlan_data(link: Any) -> dict[str, Any]:
    info = link.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    if data is None:
        return {}
    return {
        k: data.get_attr(k)
        for k in (
            "IFLA_VXLAN_ID",
            "IFLA_VXLAN_LOCAL",
            "IFLA_VXLAN_PORT",
            "IFLA_VXLAN_LEARNING",
            "IFLA_VXLAN_PROXY",
            "IFLA_VXLAN_LINK",
        )
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


class Overlay:
    """Reconciles overlays and endpoints of one node. netns None = the current namespace."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        # VNIs of encrypted networks whose ESP protection is in place (mesh/ipsec.py); any
        # other encrypted network is refused.
        self.protected: set[int] = set()
        # Endpoints applied and how: an unchanged one is not re-checked inside its namespace
        # (opening a namespace costs ~10 ms) unless the sync is full.
        self._applied: dict[str, tuple[Endpoint, str, int, int]] = {}
        # Remote ARP/FDB entries applied per VNI, and the VXLAN device they are on.
        self._entries: dict[int, set[Neigh]] = {}
        self._vxlan_index: dict[int, int] = {}
        # networks whose subnet was checked against the node's routes, and those that clash
        self._checked: dict[str, ipaddress.IPv4Network] = {}
        self._clashing: dict[str, str] = {}

    def reconcile(self, state: MeshState, full: bool = True) -> OverlayReport:
        report = OverlayReport()
        with iproute(self.netns) as ipr:
            links = {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}
            underlay = self._underlay(ipr, state)
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
                    self._network(ipr, links, state, net, ul_index, mtu, full, report)
                except (NetlinkError, OSError, OverlayError, RtnlError) as e:
                    self._entries.pop(net.vni, None)
                    failed.add(net.name)
                    report.error(f"network {net.name}", str(e))
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
                try:
                    self._endpoint(ipr, links, state, ep, host, mtu, report)
                    self._applied[host] = done
                except (NetlinkError, OSError, OverlayError) as e:
                    report.error(f"endpoint {ep.task} on {ep.network}", str(e))
            links = {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}
            for name, link in links.items():
                if is_owned_link(name) and name not in desired_links:
                    self._applied.pop(name, None)
                    log.info("removing stale link %s", name)
                    try:
                        ipr.link("del", index=link["index"])
                        report.changes += 1
                    except NetlinkError as e:
                        report.error(f"link {name}", f"cannot delete: {e}")
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
    def _underlay(ipr: Any, state: MeshState) -> tuple[int, int] | None:
        for addr in ipr.get_addr(family=AF_INET):
            if addr.get_attr("IFA_ADDRESS") == str(state.address):
                index = addr["index"]
                link = ipr.get_links(index)[0]
                return index, link.get_attr("IFLA_MTU")
        return None

    def _network(
        self,
        ipr: Any,
        links: dict[str, Any],
        state: MeshState,
        net: Network,
        ul_index: int,
        mtu: int,
        full: bool,
        report: OverlayReport,
    ) -> None:
        br, vx = bridge_name(net.vni), vxlan_name(net.vni)
        gw = net.gateways[state.node]
        # bridge
        link = links.get(br)
        if link is not None and _kind(link) != "bridge":
            ipr.link("del", index=link["index"])
            link = None
        if link is None:
            ipr.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0)
            report.changes += 1
            link = ipr.get_links(ipr.link_lookup(ifname=br)[0])[0]
        br_index = link["index"]
        if link.get_attr("IFLA_MTU") != mtu:
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
        if link.get_attr("IFLA_ADDRESS") != mac_for_ip(gw):
            ipr.link("set", index=br_index, address=mac_for_ip(gw))
            report.changes += 1
        if link.get_attr("IFLA_OPERSTATE") == "DOWN" or not link["flags"] & 1:
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
        if link is not None and (_kind(link) != "vxlan" or _vxlan_data(link) != wanted):
            log.info("recreating %s: its settings differ", vx)
            ipr.link("del", index=link["index"])
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
            link = ipr.get_links(ipr.link_lookup(ifname=vx)[0])[0]
        vx_index = link["index"]
        if link.get_attr("IFLA_MTU") != mtu or link.get_attr("IFLA_MASTER") != br_index:
            ipr.link("set", index=vx_index, mtu=mtu, master=br_index)
            report.changes += 1
        if not link["flags"] & 1:
            ipr.link("set", index=vx_index, state="up")
        if self._vxlan_index.get(net.vni) != vx_index:
            self._entries.pop(net.vni, None)  # a new device: what we knew is gone with the old
            self._vxlan_index[net.vni] = vx_index
        self._remote_entries(state, net, vx_index, full, report)

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

    def _endpoint(
        self,
        ipr: Any,
        links: dict[str, Any],
        state: MeshState,
        ep: Endpoint,
        host: str,
        mtu: int,
        report: OverlayReport,
    ) -> None:
        assert ep.netns is not None
        if not netns_path(ep.netns).exists():
            raise OverlayError(f"network namespace {ep.netns} does not exist")
        net = state.networks_by_name[ep.network]
        br_index = ipr.link_lookup(ifname=bridge_name(net.vni))[0]
        position = state.attachment_rank[ep]
        ifname = ep.ifname or f"eth{position}"
        gateway = net.gateways[state.node] if position == 0 else None
        link = links.get(host)
        with iproute(ep.netns) as tipr:
            plen = net.subnet.prefixlen
            if link is not None and not self._task_side_ok(tipr, ifname, ep, mtu, plen):
                log.info("recreating endpoint %s of %s", host, ep.task)
                ipr.link("del", index=link["index"])
                link = None
            attached = link is None
            if link is None:
                self._create_veth(ipr, tipr, host, ifname, ep, mtu, plen)
                report.changes += 1
                link = ipr.get_links(ipr.link_lookup(ifname=host)[0])[0]
            if link.get_attr("IFLA_MASTER") != br_index or link.get_attr("IFLA_MTU") != mtu:
                ipr.link("set", index=link["index"], master=br_index, mtu=mtu)
                report.changes += 1
                attached = True
            if attached:
                # The bridge may have learned this MAC on the VXLAN port while its address
                # belonged to a task on another node; until the new task sends a frame, the
                # bridge would keep sending its traffic there (to a node that dropped it).
                # A static entry on the task's port settles it now.
                ipr.neigh(
                    "replace",
                    family=AF_BRIDGE,
                    ifindex=link["index"],
                    lladdr=ep.mac,
                    state=NUD_NOARP,
                    flags=NTF_MASTER,
                )
            if not link["flags"] & 1:
                ipr.link("set", index=link["index"], state="up")
            lo = tipr.link_lookup(ifname="lo")[0]
            tipr.link("set", index=lo, state="up")
            if gateway is not None:
                index = tipr.link_lookup(ifname=ifname)[0]
                routes = tipr.get_routes(family=AF_INET, dst_len=0, table=254)
                have = {(r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF")) for r in routes}
                if have != {(str(gateway), index)}:
                    tipr.route("replace", dst="0.0.0.0/0", gateway=str(gateway), oif=index)
                    report.changes += 1

    @staticmethod
    def _task_side_ok(tipr: Any, ifname: str, ep: Endpoint, mtu: int, prefixlen: int) -> bool:
        found = tipr.link_lookup(ifname=ifname)
        if not found:
            return False
        link = tipr.get_links(found[0])[0]
        if _kind(link) != "veth" or link.get_attr("IFLA_ADDRESS") != ep.mac:
            return False
        if link.get_attr("IFLA_MTU") != mtu or not link["flags"] & 1:
            return False
        addrs = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in tipr.get_addr(family=AF_INET, index=found[0])
        }
        return addrs == {(str(ep.ip), prefixlen)}

    @staticmethod
    def _create_veth(
        ipr: Any, tipr: Any, host: str, ifname: str, ep: Endpoint, mtu: int, prefixlen: int
    ) -> None:
        if tipr.link_lookup(ifname=ifname):
            raise OverlayError(
                f"interface {ifname} already exists in {ep.netns} and is not "
                "ours; set endpoints[].ifname to another name"
            )
        tmp = f"sh-t{os.getpid() % 100000:05d}{host[-4:]}"[:15]
        ipr.link("add", ifname=host, kind="veth", peer={"ifname": tmp}, mtu=mtu)
        peer = ipr.link_lookup(ifname=tmp)[0]
        with netns_fd(ep.netns or "") as fd:
            ipr.link("set", index=peer, net_ns_fd=fd)
        index = tipr.link_lookup(ifname=tmp)[0]
        tipr.link("set", index=index, ifname=ifname, address=ep.mac, mtu=mtu)
        tipr.addr("add", index=index, address=str(ep.ip), prefixlen=prefixlen)
        tipr.link("set", index=index, state="up")

    def cleanup(self) -> int:
        """Delete every link we own in this namespace; returns how many."""
        removed = 0
        with iproute(self.netns) as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                if is_owned_link(name) and _kind(link) in ("bridge", "vxlan", "veth"):
                    try:
                        ipr.link("del", index=link["index"])
                        removed += 1
                    except NetlinkError as e:
                        if e.code != 19:  # ENODEV: went with its veth peer
                            raise
        return removed
