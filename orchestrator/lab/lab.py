"""A one-machine lab: nodes sw1..swN as network namespaces on one underlay bridge.

The bridge lives in the root namespace with the first address of the underlay subnet, so the
nodes (192.168.56.11, .12, ... by default, the blog's VirtualBox host-only network) are
reachable from the host. Everything a lab makes is named after the lab (`shoal-sw1`,
`shoal-br`, ...) and recorded in /run/shoal/lab/<lab>.json; `down` removes exactly that.

A lab's executor says how its shoalds run tasks. "container" (the default): each node has its
own container engine (orchestrator/lab/engines.py) and the lab a registry on its gateway
(orchestrator/lab/registry.py), seeded with images built here; they start with the daemons
(`shoal lab up`, daemons.start_all) or with `up(..., engines=True)`. "native": neither. Data
that outlives the run dir (engines' images and containers, the registry's storage) is under
/var/lib/shoal/lab/<lab>/; `down` removes it, but for the registry's storage unless purged.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from mesh.netns import netns_exists, processes_in, run_in_netns
from mesh.overlay import iproute, netns_fd, write_sysctl

DEFAULT_LAB = os.environ.get("SHOAL_LAB", "shoal")
DEFAULT_SUBNET = ipaddress.IPv4Network("192.168.56.0/24")
FIRST_HOST = 11
RUN_DIR = Path("/run/shoal/lab")
DATA_DIR = Path("/var/lib/shoal/lab")
EXECUTORS = ("container", "native")
_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class LabError(RuntimeError):
    """A lab operation failed; the message says what to do."""


@dataclass
class Node:
    name: str  # sw1
    netns: str  # shoal-sw1
    address: str  # 192.168.56.11
    host_veth: str  # root-namespace end of its underlay link


@dataclass
class Lab:
    name: str
    subnet: str
    bridge: str
    nodes: list[Node] = field(default_factory=list)
    # node -> [pid, start time] of processes started in it; the start time guards against
    # signalling a recycled pid
    processes: dict[str, list[list[int]]] = field(default_factory=dict)
    # "netns", or "vm": nodes are VMs whose bridge and taps live in a namespace of the lab's
    # own (orchestrator/lab/vm.py)
    kind: str = "netns"
    # how its shoalds run tasks: "container" (an engine per node, the lab's registry) or
    # "native"; records made before executors were a choice, and VM labs, are native
    executor: str = "native"

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.IPv4Network(self.subnet).hosts()))

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise LabError(f"lab {self.name} has no node {name!r} (nodes: {known})")

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / self.name

    @property
    def data_dir(self) -> Path:
        """What outlives the run dir: engines' data, the registry's storage."""
        return DATA_DIR / self.name

    @property
    def containers(self) -> bool:
        """Do this lab's nodes run an engine, and the lab a registry?"""
        return self.kind == "netns" and self.executor == "container"


def _record(name: str) -> Path:
    return RUN_DIR / f"{name}.json"


def check_name(name: str) -> None:
    if not _LAB_NAME.match(name):
        raise LabError(
            f"invalid lab name {name!r}: use 1-10 lowercase letters and digits, "
            "starting with a letter"
        )


def load(name: str) -> Lab | None:
    path = _record(name)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    nodes = [Node(**n) for n in raw.pop("nodes")]
    return Lab(nodes=nodes, **raw)


def save(lab: Lab) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = _record(lab.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(lab), indent=2))
    tmp.replace(_record(lab.name))


def all_labs() -> list[Lab]:
    if not RUN_DIR.is_dir():
        return []
    labs = [load(p.stem) for p in sorted(RUN_DIR.glob("*.json"))]
    return [lab for lab in labs if lab is not None]


@contextlib.contextmanager
def locked() -> Iterator[None]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _subnet_in_use(subnet: ipaddress.IPv4Network, own_bridge: str) -> str | None:
    with iproute(None) as ipr:
        for addr in ipr.get_addr(family=2):
            ip = ipaddress.IPv4Address(addr.get_attr("IFA_ADDRESS"))
            if ip in subnet:
                link = ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME")
                if link != own_bridge:
                    return f"{ip} on {link}"
    return None


def up(
    name: str = DEFAULT_LAB,
    nodes: int = 3,
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET,
    executor: str = "container",
    engines: bool = False,
) -> Lab:
    """Make the lab have exactly `nodes` nodes; idempotent. With engines (and the container
    executor), also start what its shoalds will need: the lab's registry, seeded, and every
    node's engine (as `shoal lab up` does before the daemons)."""
    check_name(name)
    if not 1 <= nodes <= 99:
        raise LabError(f"--nodes must be between 1 and 99, not {nodes}")
    if executor not in EXECUTORS:
        raise LabError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if subnet.prefixlen > 24:
        raise LabError(f"underlay subnet {subnet} is too small; use a /24 or larger")
    with locked():
        lab = load(name)
        if lab is not None and lab.kind != "netns":
            raise LabError(
                f"lab {name} is a VM lab; resize it with `shoal lab up --vm --name {name}`, or "
                f"remove it with `shoal lab down --name {name}` first"
            )
        if lab is not None and lab.subnet != str(subnet):
            raise LabError(
                f"lab {name} already exists on {lab.subnet}; run `shoal lab down "
                f"--name {name}` first to move it to {subnet}"
            )
        if lab is not None and lab.executor != executor:
            raise LabError(
                f"lab {name} runs the {lab.executor} executor; give --executor {lab.executor}, "
                f"or run `shoal lab down --name {name}` first to make it {executor}"
            )
        if lab is None:
            bridge = f"{name}-br"
            clash = _subnet_in_use(subnet, bridge)
            if clash:
                raise LabError(
                    f"the underlay {subnet} is already in use ({clash}); pick another "
                    "with --subnet or remove what uses it"
                )
            lab = Lab(name=name, subnet=str(subnet), bridge=bridge, executor=executor)
        save(lab)  # record first, so `down` can clean a half-made lab
        _ensure_bridge(lab)
        for i in range(1, nodes + 1):
            node_name = f"sw{i}"
            node = next((n for n in lab.nodes if n.name == node_name), None)
            if node is None:
                host_ip = subnet.network_address + FIRST_HOST + i - 1
                node = Node(node_name, f"{name}-{node_name}", str(host_ip), f"{name}-{node_name}")
                lab.nodes.append(node)
                save(lab)
            _ensure_node(lab, node)
        for node in [n for n in lab.nodes if int(n.name[2:]) > nodes]:
            _remove_node(lab, node)
            lab.nodes.remove(node)
            save(lab)
    if engines:
        start_engines(lab)  # not under the lock: what it starts is recorded under it
        lab = load(name) or lab
    return lab


def start_engines(lab: Lab) -> None:
    """For a container lab: its registry (started, seeded) and every node's engine, up and
    answering; idempotent. Nothing for native and VM labs."""
    if not lab.containers:
        return
    from orchestrator.lab import engines, registry  # noqa: PLC0415 - they build on this module

    registry.start(lab)
    registry.seed(lab)
    for node in lab.nodes:
        engines.start(lab, node.name)
    for node in lab.nodes:
        engines.wait_ready(lab, node.name)


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
        _ip("netns", "add", node.netns)
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


def _remove_node(lab: Lab, node: Node) -> None:
    from orchestrator.lab import engines  # noqa: PLC0415 - engines builds on this module

    # the engine first, and at once: its containers have nothing to save, and shoald then
    # finds no task to stop on its way out
    engines.stop(lab, node.name)
    _kill(lab.processes.pop(node.name, []))
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


def node_namespaces(lab: Lab, node: Node) -> list[str]:
    """The node's namespace and those made for it (tasks are named <node netns>-...)."""
    run = Path("/run/netns")
    names = [p.name for p in run.iterdir()] if run.is_dir() else []
    return sorted(n for n in names if n == node.netns or n.startswith(node.netns + "-"))


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _kill(procs: list[list[int]]) -> None:
    stop_pids([pid for pid, started in procs if start_time(pid) == started])


def stop_pids(pids: list[int], first: signal.Signals = signal.SIGTERM) -> None:
    """Signal the processes (then SIGKILL those still there after 5 s) and wait for them."""
    for sig in dict.fromkeys((first, signal.SIGKILL)):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.append(pid)
        if not alive:
            return
        deadline = time.monotonic() + 5
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.05)
        pids = alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.split(")")[-1].split()[0] == "Z":
            return False
    return True


def down(name: str = DEFAULT_LAB, purge: bool = False) -> bool:
    """Remove the lab and all it made but its registry's storage (images pushed to it), which
    purge removes too; False if there was nothing to remove."""
    check_name(name)
    data_dir = DATA_DIR / name
    with locked():
        lab = load(name)
        if lab is None:
            if purge and data_dir.exists():  # the storage an earlier `down` kept
                shutil.rmtree(data_dir)
                return True
            return False
        if lab.kind == "vm":
            from orchestrator.lab import vm  # noqa: PLC0415 - vm builds on this module

            vm.remove(lab)
        else:
            from orchestrator.lab import registry  # noqa: PLC0415 - it builds on this module

            for node in list(lab.nodes):
                _remove_node(lab, node)
            registry.stop(lab)
            with iproute(None) as ipr:
                for index in ipr.link_lookup(ifname=lab.bridge):
                    ipr.link("del", index=index)
        if purge:
            if data_dir.exists():
                shutil.rmtree(data_dir)
        else:
            for d in (data_dir / "nodes", data_dir):  # left only if empty
                with contextlib.suppress(OSError):
                    d.rmdir()
        if lab.run_dir.is_dir():
            for p in sorted(lab.run_dir.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
            lab.run_dir.rmdir()
        _record(name).unlink()
        return True


def add_process(lab_name: str, node: str, pid: int) -> None:
    """Remember a process started in a node, so `down` stops it."""
    started = start_time(pid)
    if started is None:
        return
    with locked():
        lab = load(lab_name)
        if lab is None:
            raise LabError(f"no lab named {lab_name}")
        lab.processes.setdefault(node, []).append([pid, started])
        save(lab)


def running(lab: Lab, node: str) -> list[int]:
    return [
        pid
        for pid, started in lab.processes.get(node, [])
        if start_time(pid) == started and _alive(pid)
    ]


def exec_argv(lab: Lab, node: str, argv: list[str]) -> list[str]:
    """The command line running argv inside a node (as `ip netns exec` does)."""
    if not argv:
        raise LabError("nothing to run: give a command after --")
    if lab.kind == "vm":
        from orchestrator.lab import vm  # noqa: PLC0415 - vm builds on this module

        return vm.exec_argv(lab, node, argv)
    return ["ip", "netns", "exec", lab.node(node).netns, *argv]
