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
orchestrator/lab/daemons.py starts shoald in the VMs that way (`shoal lab up --vm`).
KVM is used when this machine offers a usable one, TCG (emulation) otherwise. The lab is
recorded like a namespace lab (orchestrator/lab/lab.py, kind "vm"); `down` stops the VMs and
deletes the namespace, with its bridge and taps.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mesh.netns import netns_exists, run_in_netns
from mesh.overlay import iproute
from orchestrator.lab import vmagent, vmimage
from orchestrator.lab.lab import (
    DEFAULT_LAB,
    DEFAULT_SUBNET,
    FIRST_HOST,
    Lab,
    LabError,
    Node,
    _ip,
    _kill,
    check_name,
    load,
    locked,
    running,
    save,
    start_time,
)

PROJECT = Path(__file__).resolve().parents[2]
AGENT_BASE_PORT = 7800
MEMORY_MB = 768
BOOT_TIMEOUT = 240.0
BRIDGE = "br0"
KIND = "vm"
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


def _index(node: str) -> int:
    return int(node.removeprefix("sw"))


def agent_port(node: str) -> int:
    return AGENT_BASE_PORT + _index(node)


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
        f"user,id=mg,restrict=on,hostfwd=tcp:127.0.0.1:{agent_port(node.name)}-"
        f"10.0.2.15:{vmagent.PORT}",
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


# ---- up / down -------------------------------------------------------------------------------


def up(
    name: str = DEFAULT_LAB,
    nodes: int = 3,
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET,
    say: Callable[[str], None] = print,
) -> Lab:
    """Make the VM lab have exactly `nodes` running VMs; idempotent."""
    check_name(name)
    if not 1 <= nodes <= 40:
        raise LabError(f"--nodes must be between 1 and 40 for a VM lab, not {nodes}")
    if subnet.prefixlen > 24:
        raise LabError(f"underlay subnet {subnet} is too small; use a /24 or larger")
    image = vmimage.ensure(say)
    accel = choose_accel()
    started: list[Node] = []
    with locked():
        lab = load(name)
        if lab is not None and lab.kind != KIND:
            raise LabError(
                f"lab {name} is a namespace lab; remove it with `shoal lab down --name {name}` "
                "first, or give the VM lab another --name"
            )
        if lab is not None and lab.subnet != str(subnet):
            raise LabError(
                f"lab {name} already exists on {lab.subnet}; run `shoal lab down "
                f"--name {name}` first to move it to {subnet}"
            )
        if lab is None:
            lab = Lab(name=name, subnet=str(subnet), bridge=BRIDGE, kind=KIND)
        save(lab)  # record first, so `down` can clean a half-made lab
        (lab.run_dir / "vm").mkdir(parents=True, exist_ok=True)
        info_path(lab).write_text(
            json.dumps({"accel": accel.describe(), "kernel": image.kernel_version})
        )
        _ensure_netns(lab)
        for i in range(1, nodes + 1):
            node_name = f"sw{i}"
            node = next((n for n in lab.nodes if n.name == node_name), None)
            if node is None:
                address = str(subnet.network_address + FIRST_HOST + i - 1)
                node = Node(node_name, lab_netns(name), address, f"tap-{node_name}")
                lab.nodes.append(node)
                save(lab)
            if not _qemu_running(lab, node.name):
                _start_vm(lab, node, image, accel)
                started.append(node)
                save(lab)
        for node in [n for n in lab.nodes if _index(n.name) > nodes]:
            _kill(lab.processes.pop(node.name, []))
            with iproute(lab_netns(name)) as ipr:
                for index in ipr.link_lookup(ifname=node.host_veth):
                    ipr.link("del", index=index)
            lab.nodes.remove(node)
            save(lab)
    if started:
        say(
            f"booting {len(started)} VM(s) with Debian's kernel {image.kernel_version} "
            f"under {accel.describe()}"
        )
    t0 = time.monotonic()
    for node in started:
        wait_agent(lab, node.name, deadline=t0 + BOOT_TIMEOUT)
    if started:
        say(f"VMs up in {time.monotonic() - t0:.1f} s")
    return lab


def _ensure_netns(lab: Lab) -> None:
    ns = lab_netns(lab.name)
    if not netns_exists(ns):
        _ip("netns", "add", ns)
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
    _kill(lab.processes.pop(node.name, []))
    with iproute(ns) as ipr:
        if not ipr.link_lookup(ifname=node.host_veth):
            _ip("-n", ns, "tuntap", "add", "dev", node.host_veth, "mode", "tap")
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
            if run(lab, node, ["true"], timeout=10).returncode == 0:
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


def remove(lab: Lab) -> None:
    """Stop every VM and process of the lab and delete its namespace (bridge and taps go
    with it). Called by lab.down, under the lab lock."""
    for node in lab.nodes:
        _kill(lab.processes.pop(node.name, []))
    for procs in lab.processes.values():
        _kill(procs)
    lab.processes.clear()
    ns = lab_netns(lab.name)
    if netns_exists(ns):
        _ip("netns", "del", ns)


# ---- running commands in a VM ----------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


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


def run(
    lab: Lab,
    node: str,
    argv: list[str],
    input: bytes | None = None,
    timeout: float | None = 60.0,
    env: dict[str, str] | None = None,
) -> Completed:
    """Run a command in a VM and collect its output (like subprocess.run; any thread)."""
    if not argv:
        raise LabError("nothing to run: give a command after --")
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


def check(lab: Lab, node: str, argv: list[str], timeout: float | None = 60.0) -> str:
    """run(), raising LabError with the command's stderr if it fails; returns its stdout."""
    done = run(lab, node, argv, timeout=timeout)
    if done.returncode != 0:
        raise LabError(
            f"`{' '.join(argv)}` failed on {node} ({done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout


def exec_interactive(lab: Lab, node: str, argv: list[str]) -> int:
    """Run a command in a VM with this process's stdin, stdout, stderr and signals."""
    if not argv:
        raise LabError("nothing to run: give a command after --")
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


def exec_argv(lab: Lab, node: str, argv: list[str]) -> list[str]:
    """A local command line that runs argv in a VM (see the module's docstring), or, for node
    `host`, in the lab's namespace: the outside of the lab, like the host of a namespace lab."""
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
