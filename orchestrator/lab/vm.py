"""The VM lab: nodes sw1..swN as QEMU VMs running Debian's kernel (`shoal lab up --vm`).

Same underlay as the namespace lab (192.168.56.11, .12, ... on one bridge), same verbs, but
each node is a VM with a kernel of its own, so the kernel paths this machine lacks (IPVS, ESP)
can be exercised. Layout on the host, all inside one namespace `<lab>-vm`, so no lab packet
can leave it:

    netns <lab>-vm: br0 (192.168.56.1, the lab's "host") + one tap per VM, and each VM's
                    QEMU process, whose agent port is forwarded to 127.0.0.1:78NN there
    VM swN:         eth0 on the tap (192.168.56.1N), mgmt0 (QEMU user networking, restricted:
                    it reaches nothing but the agent's forwarded port), the image's root
                    read-only under a tmpfs overlay, and over virtio-9p, read-only at the
                    same paths as here: the project, its virtualenv and its Python; read-write:
                    the lab's run directory (where the mesh state files are written)

The agent (orchestrator/lab/vmagent.py) runs commands in a VM; `exec_argv` gives a command
line that runs one there as a local process (signals are forwarded, and killing it kills
the remote command), so what drives processes in the namespace lab drives them here too:
orchestrator/lab/daemons.py starts shoald in the VMs that way, its socket and data root on
the VM's own tmpfs (a unix socket on the 9p-shared run dir would not connect), so only
commands in the VM reach it. KVM is used when this machine offers a usable one, TCG
(emulation) otherwise. `VmBackend` is the lab's backend (orchestrator/lab/backend.py, kind
"vm"); `down` stops the VMs and deletes the namespace, with its bridge and taps. Failures on
demand are not made here: `kill`, `start` and `partition` refuse. docs/vm-lab.md has the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mesh.netns import netns_exists, run_in_netns
from mesh.overlay import iproute
from orchestrator.lab import vmagent, vmimage
from orchestrator.lab.backend import (
    Completed,
    LabBackend,
    Say,
    exec_here,
    need_command,
)
from orchestrator.lab.record import (
    VM,
    Lab,
    LabError,
    Node,
    ip,
    load,
    locked,
    node_index,
    running,
    start_time,
    stop_recorded,
)

PROJECT = Path(__file__).resolve().parents[2]
AGENT_BASE_PORT = 7800
MEMORY_MB = 768
BOOT_TIMEOUT = 240.0
BRIDGE = "br0"
KIND = VM
# inside a VM (its /run and root are tmpfs); the agent points DOCKER_HOST at the socket
SHOALD_SOCKET = Path(vmagent.SHOALD_SOCKET)
SHOALD_DATA_ROOT = Path("/var/lib/shoal")
_NO_FAULTS = (
    "kill and start work on namespace labs; in a VM lab, stop a node's shoald with "
    "`shoal lab exec swN -- pkill -f orchestrator.daemon`"
)
HOST = "host"  # `shoal lab exec host -- ...`: the lab's namespace, where its bridge is
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


@dataclass(frozen=True)
class Accel:
    name: str  # kvm | tcg
    why: str

    def describe(self) -> str:
        if self.name == "kvm":
            return f"KVM ({self.why})"
        return f"TCG, software emulation ({self.why})"


def choose_accel() -> Accel:
    """KVM when this machine offers one that boots a stock kernel, TCG otherwise."""
    forced = os.environ.get("SHOAL_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return Accel(forced, "set by SHOAL_VM_ACCEL")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "no usable /dev/kvm")
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    if not flags & {"vmx", "svm"}:
        # e.g. kvm_pvm: a software KVM that only runs PVM-enlightened guest kernels
        return Accel(
            "tcg", "/dev/kvm exists but the CPU has no vmx/svm, so it cannot run a stock kernel"
        )
    return Accel("kvm", "/dev/kvm with hardware virtualization")


def lab_netns(name: str) -> str:
    return f"{name}-vm"


def agent_port(node: str) -> int:
    return AGENT_BASE_PORT + node_index(node)


def _mac(prefix: str, address: str) -> str:
    last = ipaddress.IPv4Address(address).packed[1:]
    return prefix + ":" + ":".join(f"{b:02x}" for b in last)


def _shares(lab: Lab) -> list[tuple[str, Path, str, str]]:
    """What the VMs mount over virtio-9p, in order: (tag, path, ro|rw, 9p cache mode).

    The sources are not cached in the VM, so an edit shows at once; the virtualenv and Python
    (mounted over the project if they are inside it) are, which makes imports ~25% faster
    under emulation; a change to them shows in VMs booted after it.
    """
    shares = [("project", PROJECT, "ro", "none")]
    if sys.prefix != sys.base_prefix:
        shares.append(("venv", Path(sys.prefix), "ro", "loose"))
    base = Path(sys.base_prefix)
    if base != Path("/usr"):  # the image has the host's Debian, so the same /usr/bin/python3
        shares.append(("python", base, "ro", "loose"))
    shares.append(("run", lab.run_dir, "rw", "none"))
    for _, path, _, _ in shares:
        if any(c in str(path) for c in " :\t\n"):
            raise LabError(
                f"{path} holds a space or a colon, which the VMs' boot command line cannot "
                "carry; move the project (or its virtualenv) to a plain path"
            )
    return shares


def _qemu_argv(lab: Lab, node: Node, image: vmimage.Image, accel: Accel) -> list[str]:
    plen = ipaddress.IPv4Network(lab.subnet).prefixlen
    shares = _shares(lab)
    cmdline = [
        "console=ttyS0",
        "panic=-1",
        "quiet",
        "loglevel=3",
        "mitigations=off",  # a lab VM; they cost dearly under emulation
        "ipv6.disable=1",
        f"shoal.node={node.name}",
        f"shoal.ip={node.address}/{plen}",
        f"shoal.gw={lab.gateway}",
        f"shoal.mac={_mac('52:54:00', node.address)}",
        f"shoal.mgmt_mac={_mac('52:55:00', node.address)}",
        f"shoal.mgmt_ip={vmagent.MGMT_IP}/{ipaddress.IPv4Network(vmagent.MGMT_NET).prefixlen}",
        f"shoal.python={sys.executable}",
        f"shoal.project={PROJECT}",
        *(f"shoal.share={tag}:{path}:{mode}:{cache}" for tag, path, mode, cache in shares),
    ]
    # under TCG, "max" has AES-NI and PCLMUL, which the kernel's fast AES-GCM wants
    accel_args = (
        ["-accel", "kvm", "-cpu", "host"]
        if accel.name == "kvm"
        else ["-accel", "tcg", "-cpu", "max"]
    )
    argv = [
        "qemu-system-x86_64",
        "-name",
        f"{lab.name}-{node.name}",
        *accel_args,
        "-smp",
        "1",
        "-m",
        str(MEMORY_MB),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console_path(lab, node.name)}",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        " ".join(cmdline),
        "-drive",
        f"file={image.rootfs},if=virtio,format=raw,readonly=on",
        "-netdev",
        f"tap,id=ul,ifname={node.host_veth},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev=ul,mac={_mac('52:54:00', node.address)}",
        "-netdev",
        f"user,id=mg,net={vmagent.MGMT_NET},restrict=on,"
        f"hostfwd=tcp:127.0.0.1:{agent_port(node.name)}-{vmagent.MGMT_IP}:{vmagent.PORT}",
        "-device",
        f"virtio-net-pci,netdev=mg,mac={_mac('52:55:00', node.address)}",
        "-device",
        "virtio-rng-pci",
    ]
    for tag, path, mode, _ in shares:
        argv += [
            "-virtfs",
            f"local,path={path},mount_tag={tag},security_model=none"
            + (",readonly=on" if mode == "ro" else ""),
        ]
    return argv


def console_path(lab: Lab, node: str) -> Path:
    return lab.run_dir / "vm" / f"{node}.console"


def info_path(lab: Lab) -> Path:
    return lab.run_dir / "vm" / "vm.json"


def info(lab: Lab) -> dict[str, str]:
    try:
        loaded: dict[str, str] = json.loads(info_path(lab).read_text())
        return loaded
    except (OSError, ValueError):
        return {}


# ---- the backend ---------------------------------------------------------------------------------


class VmBackend(LabBackend):
    kind = KIND
    executors: ClassVar[tuple[str, ...]] = ("native",)  # no engine in the image
    max_nodes = 40
    nodes_note = " for a VM lab"
    # shoald imports a lot: ~10-30 s under emulation, three VMs at once on a couple of cores
    shoald_timeout = 240.0
    shoald_poll = 1.0

    # ---- making and removing the lab -------------------------------------------------------------

    def up(
        self,
        name: str,
        nodes: int,
        subnet: ipaddress.IPv4Network,
        executor: str | None = None,
        say: Say = print,
    ) -> Lab:
        """Make the VM lab have exactly `nodes` running VMs; idempotent."""
        executor = self.check_up(name, nodes, subnet, executor)
        image = vmimage.ensure(say)  # before the lock: the first build takes a while
        accel = choose_accel()
        booting: list[Node] = []
        with locked():
            lab = self.open_record(name, subnet, executor)
            (lab.run_dir / "vm").mkdir(parents=True, exist_ok=True)
            info_path(lab).write_text(
                json.dumps({"accel": accel.describe(), "kernel": image.kernel_version})
            )
            _ensure_netns(lab)

            def ensure(node: Node) -> None:
                if not _qemu_running(lab, node.name):
                    _start_vm(lab, node, image, accel)
                    booting.append(node)

            self.resize(lab, nodes, ensure)
        if booting:
            say(
                f"booting {len(booting)} VM(s) with Debian's kernel {image.kernel_version} "
                f"under {accel.describe()}"
            )
        t0 = time.monotonic()
        for node in booting:
            wait_agent(lab, node.name, deadline=t0 + BOOT_TIMEOUT)
        if booting:
            say(f"VMs up in {time.monotonic() - t0:.1f} s")
        return lab

    def other_kind(self, name: str) -> str:
        return (
            f"lab {name} is a namespace lab; remove it with `shoal lab down --name {name}` "
            "first, or give the VM lab another --name"
        )

    def new_lab(self, name: str, subnet: ipaddress.IPv4Network, executor: str) -> Lab:
        return Lab(name=name, subnet=str(subnet), bridge=BRIDGE, kind=KIND, executor=executor)

    def new_node(self, lab: Lab, name: str, address: str) -> Node:
        return Node(name, lab_netns(lab.name), address, f"tap-{name}")

    def remove_node(self, lab: Lab, node: Node) -> None:
        stop_recorded(lab.processes.pop(node.name, []))
        with iproute(lab_netns(lab.name)) as ipr:
            for index in ipr.link_lookup(ifname=node.host_veth):
                ipr.link("del", index=index)

    def remove(self, lab: Lab) -> None:
        """Stop every VM and process of the lab and delete its namespace (bridge and taps go
        with it)."""
        for node in lab.nodes:
            stop_recorded(lab.processes.pop(node.name, []))
        for procs in lab.processes.values():
            stop_recorded(procs)
        lab.processes.clear()
        ns = lab_netns(lab.name)
        if netns_exists(ns):
            ip("netns", "del", ns)

    def start_engines(self, lab: Lab) -> None:
        """Nothing: VMs have no engine (their shoalds run the native executor)."""

    def start_engine(self, lab: Lab, node: str) -> None:
        """Nothing: VMs have no engine."""

    # ---- running commands in a VM ----------------------------------------------------------------

    def exec_argv(self, lab: Lab, node: str, argv: list[str]) -> list[str]:
        """A local command line that runs argv in a VM (see the module's docstring), or, for
        node `host`, in the lab's namespace: the outside of the lab, like the host of a
        namespace lab."""
        need_command(argv)
        if node == HOST:
            return ["ip", "netns", "exec", lab_netns(lab.name), *argv]
        lab.node(node)
        return [
            sys.executable,
            "-m",
            "orchestrator.cli.main",
            "lab",
            "exec",
            "--name",
            lab.name,
            node,
            "--",
            *argv,
        ]

    def daemon_argv(self, lab: Lab, node: str, argv: list[str]) -> list[str]:
        return self.exec_argv(lab, node, argv)

    def run(
        self,
        lab: Lab,
        node: str,
        argv: list[str],
        input: bytes | None = None,
        timeout: float | None = 60.0,
    ) -> Completed:
        return _run(lab, node, argv, input, timeout)

    def exec_interactive(self, lab: Lab, node: str, argv: list[str]) -> int:
        if node == HOST:
            exec_here(self.exec_argv(lab, node, argv))
        return _exec_interactive(lab, node, argv)

    def outside(self, lab: Lab) -> str | None:
        return lab_netns(lab.name)

    def netns_prefix(self, lab: Lab, node: str) -> str:
        return f"{lab.name}-{node}"

    def shares(self, lab: Lab, path: Path) -> bool:
        return path.resolve().is_relative_to(lab.run_dir.resolve())

    # ---- shoald ----------------------------------------------------------------------------------

    def shoald_socket(self, lab: Lab, node: str) -> Path:
        return SHOALD_SOCKET

    def shoald_data_root(self, lab: Lab, node: str) -> Path:
        return SHOALD_DATA_ROOT

    def shoald_options(self, lab: Lab, node: str) -> list[str]:
        return ["--executor", "native"]

    def shoald_answers(self, lab: Lab, node: str) -> bool:
        probe = ["curl", "-sf", "-m", "3", "--unix-socket", str(SHOALD_SOCKET), "http://x/_ping"]
        try:
            return _run(lab, node, probe, timeout=15).returncode == 0
        except OSError:
            return False

    def host_socket(self, lab: Lab, node: str) -> Path:
        lab.node(node)  # a clear error for an unknown node
        raise LabError(
            f"lab {lab.name} is a VM lab: {node}'s shoald listens on {SHOALD_SOCKET} inside "
            "its VM, which this machine cannot reach; run the CLI there, where DOCKER_HOST "
            f"points at it: `shoal lab exec --name {lab.name} {node} -- shoal node ls`"
        )

    # ---- failures on demand: not here ------------------------------------------------------------

    def kill(self, lab: Lab, node: str) -> list[int]:
        raise LabError(_NO_FAULTS)

    def check_start(self, lab: Lab, node: str) -> None:
        raise LabError(_NO_FAULTS)

    def partition(self, lab: Lab, nodes: list[str], from_nodes: list[str] | None) -> None:
        raise LabError("partitions are made with nftables in node namespaces: netns labs only")

    def heal(self, lab: Lab) -> None:
        """Nothing to heal: a VM lab has no cuts."""

    def cuts(self, lab: Lab) -> dict[str, bool]:
        return {n.name: False for n in lab.nodes}

    # ---- saying what there is --------------------------------------------------------------------

    def describe(self, lab: Lab, daemons: bool) -> list[str]:
        lines = [
            f"lab {lab.name}: {len(lab.nodes)} VM(s) on {lab.subnet} (bridge {lab.bridge} "
            f"{lab.gateway} in netns {lab_netns(lab.name)}; {info(lab).get('accel')})"
        ]
        lines += [f"  {n.name:6} {n.address:16} VM" for n in lab.nodes]
        if daemons:
            lines.append(
                f"shoald runs in every VM: `shoal lab exec --name {lab.name} sw1 -- shoal ...`"
            )
        return lines


# ---- the VMs -------------------------------------------------------------------------------------


def _ensure_netns(lab: Lab) -> None:
    ns = lab_netns(lab.name)
    if not netns_exists(ns):
        ip("netns", "add", ns)
    plen = ipaddress.IPv4Network(lab.subnet).prefixlen
    with iproute(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        if not ipr.link_lookup(ifname=BRIDGE):
            ipr.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0)
        index = ipr.link_lookup(ifname=BRIDGE)[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, index=index)}
        if lab.gateway not in have:
            ipr.addr("add", index=index, address=lab.gateway, prefixlen=plen)
        ipr.link("set", index=index, state="up")


def _qemu_running(lab: Lab, node: str) -> bool:
    """Is the node's QEMU alive? (Its recorded processes also hold the stand-ins of commands.)"""
    for pid in running(lab, node):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu-system"):
                return True
    return False


def _start_vm(lab: Lab, node: Node, image: vmimage.Image, accel: Accel) -> None:
    ns = lab_netns(lab.name)
    stop_recorded(lab.processes.pop(node.name, []))
    with iproute(ns) as ipr:
        if not ipr.link_lookup(ifname=node.host_veth):
            ip("-n", ns, "tuntap", "add", "dev", node.host_veth, "mode", "tap")
        index = ipr.link_lookup(ifname=node.host_veth)[0]
        bridge = ipr.link_lookup(ifname=BRIDGE)[0]
        ipr.link("set", index=index, master=bridge, state="up")
    console = console_path(lab, node.name)
    console.unlink(missing_ok=True)
    log = lab.run_dir / "vm" / f"{node.name}.qemu.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *_qemu_argv(lab, node, image, accel)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = start_time(proc.pid)
    if started is not None:
        lab.processes.setdefault(node.name, []).append([proc.pid, started])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "")
    except OSError:
        return "(nothing)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(nothing)"


def wait_agent(lab: Lab, node: str, deadline: float) -> None:
    """Until the node's agent answers; LabError with the VM's console if it never does."""
    while True:
        try:
            if _run(lab, node, ["true"], timeout=10).returncode == 0:
                return
        except OSError:
            pass
        qemu_alive = _qemu_running(load(lab.name) or lab, node)
        if not qemu_alive or time.monotonic() > deadline:
            why = "its QEMU exited" if not qemu_alive else "it did not answer in time"
            raise LabError(
                f"VM {node} of lab {lab.name} did not come up: {why}.\n"
                f"QEMU: {_tail(lab.run_dir / 'vm' / f'{node}.qemu.log', 5)}\n"
                f"console:\n{_tail(console_path(lab, node))}\n"
                f"Remove the half-made lab with `shoal lab down --name {lab.name}`."
            )
        time.sleep(0.3)


# ---- the agent's client --------------------------------------------------------------------------


def _connect(lab: Lab, node: str, timeout: float) -> socket.socket:
    lab.node(node)  # a clear error for an unknown node
    port = agent_port(node)
    return run_in_netns(
        lab_netns(lab.name), lambda: socket.create_connection(("127.0.0.1", port), timeout)
    )


def _request(argv: list[str], env: dict[str, str] | None) -> bytes:
    return (json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env or {}}) + "\n").encode()


def _exit_status(payload: bytes) -> int:
    code = int(payload)
    return 128 - code if code < 0 else code


def _run(
    lab: Lab,
    node: str,
    argv: list[str],
    input: bytes | None = None,
    timeout: float | None = 60.0,
    env: dict[str, str] | None = None,
) -> Completed:
    """Run a command in a VM through its agent and collect its output (any thread)."""
    need_command(argv)
    sock = _connect(lab, node, timeout or 10.0)
    with sock:
        sock.settimeout(timeout)
        sock.sendall(_request(argv, env))
        if input:
            sock.sendall(vmagent.frame(vmagent.STDIN, input))
        sock.sendall(vmagent.frame(vmagent.STDIN))
        out, err = bytearray(), bytearray()
        buf = sock.makefile("rb")
        while True:
            head = buf.read(vmagent.FRAME.size)
            if len(head) < vmagent.FRAME.size:
                raise ConnectionError(f"the agent of {node} closed the connection early")
            kind, length = vmagent.FRAME.unpack(head)
            payload = buf.read(length)
            if kind == vmagent.STDOUT:
                out += payload
            elif kind == vmagent.STDERR:
                err += payload
            elif kind == vmagent.EXIT:
                return Completed(
                    _exit_status(payload),
                    out.decode(errors="replace"),
                    err.decode(errors="replace"),
                )


def _exec_interactive(lab: Lab, node: str, argv: list[str]) -> int:
    """Run a command in a VM with this process's stdin, stdout, stderr and signals."""
    need_command(argv)
    try:
        sock = _connect(lab, node, 10.0)
    except OSError as e:
        raise LabError(
            f"cannot reach the agent of {node} in lab {lab.name} ({e}); is the lab up? "
            "(`shoal lab ls`)"
        ) from e
    return asyncio.run(_interactive(sock, argv, node))


async def _interactive(sock: socket.socket, argv: list[str], node: str) -> int:
    reader, writer = await asyncio.open_connection(sock=sock)
    loop = asyncio.get_running_loop()
    writer.write(_request(argv, None))

    def forward(sig: int) -> None:
        writer.write(vmagent.frame(vmagent.SIGNAL, str(sig).encode()))

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, int(sig))

    def pump_stdin() -> None:
        # A thread, as stdin may be a terminal or a file, which asyncio cannot watch.
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            loop.call_soon_threadsafe(writer.write, vmagent.frame(vmagent.STDIN, data))
            if not data:
                return

    threading.Thread(target=pump_stdin, daemon=True).start()
    while (got := await vmagent.read_frame(reader)) is not None:
        kind, payload = got
        if kind == vmagent.STDOUT:
            os.write(1, payload)
        elif kind == vmagent.STDERR:
            os.write(2, payload)
        elif kind == vmagent.EXIT:
            writer.close()
            return _exit_status(payload)
    os.write(2, f"shoal: lost the connection to {node}'s agent\n".encode())
    return 255
