"""The namespace lab: nodes sw1..swN as network namespaces on one underlay bridge.

The bridge lives in the root namespace with the first address of the underlay subnet, so the
nodes (192.168.56.11, .12, ... by default, the blog's VirtualBox host-only network) are
reachable from the host. Everything a lab makes is named after the lab (`shoal-sw1`,
`shoal-br`, ...) and recorded (orchestrator/lab/record.py); `down` removes exactly that.

A lab's executor says how its shoalds run tasks. "container" (the default): each node has its
own container engine (orchestrator/lab/engines.py) and the lab a registry on its gateway
(orchestrator/lab/registry.py), seeded with images built here; they start with the daemons
(`shoal lab up`, daemons.start_all) or with `lab.up(..., engines=True)`. "native": neither.
Data that outlives the run dir (engines' images and containers, the registry's storage) is
under /var/lib/shoal/lab/<lab>/; `down` removes it, but for the registry's storage unless
purged (docs/lab-registry.md).

A node's shoald runs under `nsenter --net` (daemon_argv), not `ip netns exec`: that gives the
process a mount namespace of its own, and the task namespaces shoald creates (bind mounts in
/run/netns) would be invisible to the host: `ip netns exec <task>` from the host would fail.
Its socket and data root are in the node's run dir, /run/shoal/lab/<lab>/swN/, so the host
reaches it too (`shoal lab env swN`). Failures on demand (`shoal lab kill | start |
partition | heal`) work on these labs; partitions are orchestrator/lab/partitions.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

from pyroute2.netlink.exceptions import NetlinkError

from mesh.netns import netns_exists, processes_in, run_in_netns
from mesh.overlay import iproute, netns_fd, write_sysctl
from orchestrator.lab import engines, partitions, registry
from orchestrator.lab.backend import (
    Completed,
    LabBackend,
    Say,
    exec_here,
    need_command,
)
from orchestrator.lab.record import (
    NETNS,
    Lab,
    LabError,
    Node,
    ip,
    locked,
    running,
    stop_pids,
    stop_recorded,
)

KIND = NETNS


class NetnsBackend(LabBackend):
    kind = KIND
    executors: ClassVar[tuple[str, ...]] = ("container", "native")
    max_nodes = 99
    shoald_timeout = 20.0
    shoald_poll = 0.1

    # ---- making and removing the lab -------------------------------------------------------------

    def up(
        self,
        name: str,
        nodes: int,
        subnet: ipaddress.IPv4Network,
        executor: str | None = None,
        say: Say = print,
    ) -> Lab:
        executor = self.check_up(name, nodes, subnet, executor)
        with locked():
            lab = self.open_record(name, subnet, executor)
            _ensure_bridge(lab)
            self.resize(lab, nodes, lambda node: _ensure_node(lab, node))
        return lab

    def other_kind(self, name: str) -> str:
        return (
            f"lab {name} is a VM lab; resize it with `shoal lab up --vm --name {name}`, or "
            f"remove it with `shoal lab down --name {name}` first"
        )

    def new_lab(self, name: str, subnet: ipaddress.IPv4Network, executor: str) -> Lab:
        bridge = f"{name}-br"
        clash = _subnet_in_use(subnet, bridge)
        if clash:
            raise LabError(
                f"the underlay {subnet} is already in use ({clash}); pick another "
                "with --subnet or remove what uses it"
            )
        return Lab(name=name, subnet=str(subnet), bridge=bridge, kind=KIND, executor=executor)

    def new_node(self, lab: Lab, name: str, address: str) -> Node:
        return Node(name, f"{lab.name}-{name}", address, f"{lab.name}-{name}")

    def remove_node(self, lab: Lab, node: Node) -> None:
        # the engine first, and at once: its containers have nothing to save, and shoald then
        # finds no task to stop on its way out
        engines.stop(lab, node.name)
        stop_recorded(lab.processes.pop(node.name, []))
        # and whatever the node's daemons started and left behind (shoal-mesh runs in its own
        # session; tasks in their own namespaces)
        stop_pids(processes_in(node_namespaces(lab, node)), signal.SIGKILL)
        engines.cleanup(lab, node.name)
        for ns in node_namespaces(lab, node):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        # what `ip netns exec` binds into task namespaces (nameserver, hostname)
        etc = Path("/etc/netns")
        if etc.is_dir():
            for d in etc.iterdir():
                if d.name == node.netns or d.name.startswith(node.netns + "-"):
                    shutil.rmtree(d, ignore_errors=True)
        with iproute(None) as ipr:
            for index in ipr.link_lookup(ifname=node.host_veth):
                # deleting the namespace takes the veth pair with it, asynchronously
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=index)

    def remove(self, lab: Lab) -> None:
        for node in list(lab.nodes):
            self.remove_node(lab, node)
        registry.stop(lab)
        with iproute(None) as ipr:
            for index in ipr.link_lookup(ifname=lab.bridge):
                ipr.link("del", index=index)

    def start_engines(self, lab: Lab) -> None:
        if not lab.containers:
            return
        registry.start(lab)
        registry.seed(lab)
        for node in lab.nodes:
            engines.start(lab, node.name)
        for node in lab.nodes:
            engines.wait_ready(lab, node.name)

    def start_engine(self, lab: Lab, node: str) -> None:
        if not lab.containers:
            return
        if not registry.is_running(lab):
            registry.start(lab)
            registry.seed(lab)
        engines.start(lab, node)
        engines.wait_ready(lab, node)

    # ---- running commands in a node --------------------------------------------------------------

    def exec_argv(self, lab: Lab, node: str, argv: list[str]) -> list[str]:
        need_command(argv)
        return ["ip", "netns", "exec", lab.node(node).netns, *argv]

    def daemon_argv(self, lab: Lab, node: str, argv: list[str]) -> list[str]:
        need_command(argv)
        return ["nsenter", f"--net=/run/netns/{lab.node(node).netns}", *argv]

    def run(
        self,
        lab: Lab,
        node: str,
        argv: list[str],
        input: bytes | None = None,
        timeout: float | None = 60.0,
    ) -> Completed:
        done = subprocess.run(
            self.daemon_argv(lab, node, argv), input=input, capture_output=True, timeout=timeout
        )
        return Completed(
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )

    def exec_interactive(self, lab: Lab, node: str, argv: list[str]) -> int:
        cmd = self.exec_argv(lab, node, argv)
        socket = self.shoald_socket(lab, node)
        if socket.exists():
            os.environ["DOCKER_HOST"] = f"unix://{socket}"
        exec_here(cmd)

    def outside(self, lab: Lab) -> str | None:
        return None

    def netns_prefix(self, lab: Lab, node: str) -> str:
        return lab.node(node).netns

    def shares(self, lab: Lab, path: Path) -> bool:
        return True

    # ---- shoald ----------------------------------------------------------------------------------

    def shoald_socket(self, lab: Lab, node: str) -> Path:
        return lab.run_dir / node / "shoal.sock"

    def shoald_data_root(self, lab: Lab, node: str) -> Path:
        return lab.run_dir / node / "data"

    def shoald_options(self, lab: Lab, node: str) -> list[str]:
        if lab.containers:
            executor = ["--executor", "container", "--engine", engines.socket_url(lab, node)]
        else:
            executor = ["--executor", "native"]
        return ["--netns-prefix", lab.node(node).netns, *executor]

    def shoald_answers(self, lab: Lab, node: str) -> bool:
        path = self.shoald_socket(lab, node)
        return path.exists() and engines.ping(path)

    def host_socket(self, lab: Lab, node: str) -> Path:
        lab.node(node)  # a clear error for an unknown node
        return self.shoald_socket(lab, node)

    # ---- failures on demand ----------------------------------------------------------------------

    def kill(self, lab: Lab, node: str) -> list[int]:
        netns = lab.node(node).netns
        pids = set(running(lab, node)) | set(processes_in([netns])) | set(engines.pids(lab, node))
        stop_pids(sorted(pids), signal.SIGKILL)
        # and what forked meanwhile (a container's process while its siblings died)
        pids |= set(engines.stop(lab, node))
        return sorted(pids)

    def check_start(self, lab: Lab, node: str) -> None:
        if running(lab, node):
            raise LabError(f"{node} is already running (shoal lab kill {node} first)")

    def partition(self, lab: Lab, nodes: list[str], from_nodes: list[str] | None) -> None:
        partitions.partition(lab, nodes, from_nodes)

    def heal(self, lab: Lab) -> None:
        partitions.heal(lab)

    def cuts(self, lab: Lab) -> dict[str, bool]:
        return partitions.cuts(lab)

    # ---- saying what there is --------------------------------------------------------------------

    def describe(self, lab: Lab, daemons: bool) -> list[str]:
        lines = [
            f"lab {lab.name}: {len(lab.nodes)} node(s) on {lab.subnet} (bridge {lab.bridge}, "
            f"{lab.gateway}), {lab.executor} executor"
        ]
        lines += [f"  {n.name:6} {n.address:16} netns {n.netns}" for n in lab.nodes]
        if lab.containers and daemons:
            lines.append(
                f"registry {registry.address(lab)}; a node's engine: `docker -H "
                f"{engines.socket_url(lab, lab.nodes[0].name)} ...` (sw1's)"
            )
        return lines


def node_namespaces(lab: Lab, node: Node) -> list[str]:
    """The node's namespace and those made for it (tasks are named <node netns>-...)."""
    run = Path("/run/netns")
    names = [p.name for p in run.iterdir()] if run.is_dir() else []
    return sorted(n for n in names if n == node.netns or n.startswith(node.netns + "-"))


def _subnet_in_use(subnet: ipaddress.IPv4Network, own_bridge: str) -> str | None:
    with iproute(None) as ipr:
        for addr in ipr.get_addr(family=2):
            address = ipaddress.IPv4Address(addr.get_attr("IFA_ADDRESS"))
            if address in subnet:
                link = ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME")
                if link != own_bridge:
                    return f"{address} on {link}"
    return None


def _ensure_bridge(lab: Lab) -> None:
    plen = ipaddress.IPv4Network(lab.subnet).prefixlen
    with iproute(None) as ipr:
        if not ipr.link_lookup(ifname=lab.bridge):
            # nf_call_iptables off: the host's firewall (Docker's FORWARD policy DROP, say) must
            # not filter traffic between lab nodes, whatever br_netfilter is set to globally.
            ipr.link(
                "add",
                ifname=lab.bridge,
                kind="bridge",
                br_stp_state=0,
                br_forward_delay=0,
                br_nf_call_iptables=0,
            )
        index = ipr.link_lookup(ifname=lab.bridge)[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, index=index)}
        if lab.gateway not in have:
            ipr.addr("add", index=index, address=lab.gateway, prefixlen=plen)
        ipr.link("set", index=index, state="up")


def _ensure_node(lab: Lab, node: Node) -> None:
    if not netns_exists(node.netns):
        ip("netns", "add", node.netns)
    plen = ipaddress.IPv4Network(lab.subnet).prefixlen
    with iproute(None) as ipr, iproute(node.netns) as nipr:
        if not nipr.link_lookup(ifname="eth0"):
            stale = ipr.link_lookup(ifname=node.host_veth)
            if stale:
                ipr.link("del", index=stale[0])
            tmp = f"{node.host_veth[:14]}p"  # the node's end, until it is renamed eth0
            ipr.link("add", ifname=node.host_veth, kind="veth", peer={"ifname": tmp})
            peer = ipr.link_lookup(ifname=tmp)[0]
            with netns_fd(node.netns) as fd:
                ipr.link("set", index=peer, net_ns_fd=fd)
            index = nipr.link_lookup(ifname=tmp)[0]
            nipr.link("set", index=index, ifname="eth0")
        host = ipr.link_lookup(ifname=node.host_veth)[0]
        bridge = ipr.link_lookup(ifname=lab.bridge)[0]
        ipr.link("set", index=host, master=bridge, state="up")
        eth0 = nipr.link_lookup(ifname="eth0")[0]
        have = {a.get_attr("IFA_ADDRESS") for a in nipr.get_addr(family=2, index=eth0)}
        if node.address not in have:
            nipr.addr("add", index=eth0, address=node.address, prefixlen=plen)
        nipr.link("set", index=eth0, state="up")
        nipr.link("set", index=nipr.link_lookup(ifname="lo")[0], state="up")
        routes = nipr.get_routes(family=2, dst_len=0, table=254)
        if not routes:
            nipr.route("add", dst="0.0.0.0/0", gateway=lab.gateway)

    def tune() -> None:
        # What a host would have: forwarding, no reverse-path filter, and bridged traffic
        # not run through the node's netfilter (the mesh sets what it needs itself too).
        write_sysctl("net.ipv4.conf.all.rp_filter", "0")
        write_sysctl("net.ipv4.conf.default.rp_filter", "0")
        if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
            write_sysctl("net.bridge.bridge-nf-call-iptables", "0")

    run_in_netns(node.netns, tune)
