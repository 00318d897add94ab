"""A container engine per lab node: Debian's dockerd, in the node's network namespace, for the
container executor (`shoald --executor container --engine unix://...`). Part of the namespace
backend (orchestrator/lab/netns.py), which starts and removes them; docs/lab-registry.md.

Each node's dockerd is its own Docker host, as each node of the blog's swarm had one:
  API        unix:///run/shoal/lab/<lab>/<node>/docker.sock
             (`docker -H unix:///run/shoal/lab/shoal/sw1/docker.sock ps` from the host)
  data root  /var/lib/shoal/lab/<lab>/nodes/<node>/docker (images, containers)
  exec root  /run/shoal/lab/<lab>/<node>/docker (containerd, its socket, runtime state)
  log        /run/shoal/lab/<lab>/<node>/dockerd.log
  registry   the lab's (orchestrator/lab/registry.py), as mirror and insecure registry
It leaves the node's network alone (--bridge=none, no iptables, no forwarding or masquerade
changes, no userland proxy): the node's data plane is shoal-mesh's. Containers' cgroups are
under `<the node's netns name>` (--cgroup-parent, cgroupfs driver): a relative parent, so on
each hierarchy it is below dockerd's own cgroup, e.g. /sys/fs/cgroup/pids/shoal-sw1/<id>, and
for memory on a machine that puts its sessions in memory cgroups
/sys/fs/cgroup/memory/<dockerd's memory cgroup>/shoal-sw1/<id>. Where that is, is recorded
when dockerd starts, so `cleanup` finds every one.

dockerd runs under `nsenter --net`, not `ip netns exec`: that gives it a mount namespace and a
/sys of its own, without the cgroup hierarchies, and its mounts (container root filesystems)
would be invisible to the host. A crash (`stop`, `shoal lab kill`) leaves the engine's state as
a dead host would: containers, images, stale mounts. `start` comes up over it as after a reboot
(leftover mounts and shim sockets removed first; dockerd marks the dead containers exited).
`cleanup` removes all of it: processes left in the containers' cgroups, the cgroups, mounts,
the data and exec roots.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator.lab.record import NETNS, Lab, LabError, add_process, stop_pids

DOCKERD = "/usr/sbin/dockerd"
READY_TIMEOUT = 30.0
# containerd (1.5+) puts each shim's socket here, named by a hash of containerd's address, the
# namespace and the container: a crash leaves them behind
SHIM_SOCKETS = Path("/run/containerd/s")
SHIM_NAMESPACES = ("moby", "plugins.moby")
MNT_DETACH = 2
_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
_ENGINE_PROGRAMS = {
    b"dockerd",
    b"containerd",
    b"containerd-shim",
    b"containerd-shim-runc-v1",
    b"containerd-shim-runc-v2",
}


class EngineError(LabError):
    """A node's engine failed; the message says what to do."""


def node_dir(lab: Lab, node: str) -> Path:
    return lab.run_dir / node


def socket_path(lab: Lab, node: str) -> Path:
    return node_dir(lab, node) / "docker.sock"


def socket_url(lab: Lab, node: str) -> str:
    """The node's engine API, for `docker -H` and `shoald --engine`."""
    lab.node(node)  # a clear error for an unknown node
    return f"unix://{socket_path(lab, node)}"


def exec_root(lab: Lab, node: str) -> Path:
    return node_dir(lab, node) / "docker"


def data_root(lab: Lab, node: str) -> Path:
    return lab.data_dir / "nodes" / node / "docker"


def config_path(lab: Lab, node: str) -> Path:
    return node_dir(lab, node) / "daemon.json"


def log_path(lab: Lab, node: str) -> Path:
    return node_dir(lab, node) / "dockerd.log"


def _pidfile(lab: Lab, node: str) -> Path:
    return exec_root(lab, node) / "dockerd.pid"


def _cgroup_record(lab: Lab, node: str) -> Path:
    return node_dir(lab, node) / "docker.cgroups"


def cgroup_parent(lab: Lab, node: str) -> str:
    return lab.node(node).netns


def daemon_config(lab: Lab, node: str) -> dict[str, Any]:
    registry = f"{lab.gateway}:5000"  # orchestrator/lab/registry.py
    return {
        # the lab's registry, and any other a test or a user runs on the lab's network
        "insecure-registries": [registry, lab.subnet],
        "registry-mirrors": [f"http://{registry}"],
        # dockerd 20.10 resolves a registry's name before every pull and push to match it
        # against this list's CIDRs (none); listed by name, docker.io is not looked up: a
        # lab node has no resolver it can reach, and each pull would wait out DNS (10 s)
        "allow-nondistributable-artifacts": ["docker.io", "index.docker.io"],
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "3"},
        # cgroupfs whatever the host's default (systemd on cgroup v2 hosts, which would want a
        # .slice for --cgroup-parent)
        "exec-opts": ["native.cgroupdriver=cgroupfs"],
        # the engine's identity key, per node (the default is the host's /etc/docker/key.json)
        "deprecated-key-path": str(data_root(lab, node).parent / "key.json"),
    }


def argv(lab: Lab, node: str) -> list[str]:
    root = exec_root(lab, node)
    return [
        "nsenter",
        f"--net=/run/netns/{lab.node(node).netns}",
        DOCKERD,
        "--data-root",
        str(data_root(lab, node)),
        "--exec-root",
        str(root),
        "--pidfile",
        str(_pidfile(lab, node)),
        "-H",
        socket_url(lab, node),
        "--bridge=none",
        "--iptables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--userland-proxy=false",
        f"--cgroup-parent={cgroup_parent(lab, node)}",
        "--config-file",
        str(config_path(lab, node)),
    ]


def _netns_lab(lab: Lab) -> None:
    if lab.kind != NETNS:
        raise EngineError(
            f"lab {lab.name} is a {lab.kind} lab: only namespace labs run an engine per node"
        )


def start(lab: Lab, node: str) -> int | None:
    """Start the node's dockerd unless it runs already, recorded with the node's processes so
    `down` and `kill` find it; returns its pid (None if it was running). Over the state a crash
    left, it comes up as after a reboot."""
    _netns_lab(lab)
    lab.node(node)
    if answers(lab, node) or _dockerd_alive(lab, node):
        return None  # running, or still starting: wait_ready waits for it
    if not Path(DOCKERD).is_file():
        raise EngineError(
            f"{DOCKERD} not found: install it with `apt-get install docker.io` (or make the lab "
            "with --executor native, which needs no engine)"
        )
    if not pids(lab, node, containers=False):
        # Nothing of the engine is alive (a containerd that is, the new dockerd takes up
        # again): clear what a crash left and a reboot would not have (mounts, pid files,
        # shims' sockets).
        _unmount_all(lab, node)
        _remove_shim_sockets(lab, node)
        for stale in (_pidfile(lab, node), exec_root(lab, node) / "containerd" / "containerd.pid"):
            stale.unlink(missing_ok=True)
    node_dir(lab, node).mkdir(parents=True, exist_ok=True)
    data_root(lab, node).mkdir(parents=True, exist_ok=True)
    config_path(lab, node).write_text(json.dumps(daemon_config(lab, node), indent=2) + "\n")
    socket_path(lab, node).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k.upper() not in _PROXY_ENV}
    # its containerd, runc and shims are looked up on PATH
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    log = open(log_path(lab, node), "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            argv(lab, node),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    finally:
        log.close()
    # until nsenter has become dockerd: before, wait_ready would not find it and say it exited
    deadline = time.monotonic() + 5
    while _comm(proc.pid) == "nsenter" and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    add_process(lab.name, node, proc.pid)
    _record_cgroups(lab, node, proc.pid)
    return proc.pid


def wait_ready(lab: Lab, node: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not answers(lab, node):
        if not _dockerd_alive(lab, node):
            raise EngineError(
                f"the engine (dockerd) of {node} exited; see {log_path(lab, node)}:\n"
                f"{_tail(log_path(lab, node))}"
            )
        if time.monotonic() > deadline:
            raise EngineError(
                f"the engine (dockerd) of {node} did not answer within {timeout:.0f} s; "
                f"see {log_path(lab, node)}"
            )
        time.sleep(0.05)


def answers(lab: Lab, node: str) -> bool:
    path = socket_path(lab, node)
    return path.exists() and ping(path)


def pids(lab: Lab, node: str, containers: bool = True) -> list[int]:
    """The engine's processes: its dockerd, containerd and shims (those programs with the
    node's exec root on their command line), and with containers, every process in its
    containers' cgroups."""
    root = str(exec_root(lab, node)).encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if os.path.basename(args[0]) in _ENGINE_PROGRAMS and any(
            a == root or a.startswith(root + b"/") for a in args[1:]
        ):
            found.add(int(entry.name))
    if containers:
        for d in _cgroup_dirs(lab, node):
            found.update(_procs_under(d))
    found.discard(os.getpid())
    return sorted(found)


def _dockerd_alive(lab: Lab, node: str) -> bool:
    return any(_comm(p) == "dockerd" for p in pids(lab, node, containers=False))


def stop(lab: Lab, node: str) -> list[int]:
    """SIGKILL the node's engine and every container process, as a power cut would: the
    engine's state stays as it was. Returns the pids killed."""
    killed: set[int] = set()
    # again until none is left: a container's process may fork while its siblings die
    for _ in range(10):
        alive = pids(lab, node)
        if not alive:
            break
        stop_pids(alive, signal.SIGKILL)
        killed.update(alive)
    return sorted(killed)


def cleanup(lab: Lab, node: str) -> None:
    """Remove all the node's engine made, once its processes are dead (`stop`): processes left
    in its containers' cgroups (a container whose shim died keeps running otherwise), those
    cgroups, every mount under its data and exec roots, both roots and its files."""
    stop(lab, node)
    for d in _cgroup_dirs(lab, node):
        _remove_cgroup(d)
    _unmount_all(lab, node)
    _remove_shim_sockets(lab, node)
    left = _mounts_under(lab, node)
    if left:
        # never delete through a mount: that would delete what it shows
        raise EngineError(
            f"cannot remove {node}'s engine data: still mounted: {', '.join(left)}; unmount "
            "them (umount -l) and run `shoal lab down` again"
        )
    for d in (exec_root(lab, node), data_root(lab, node).parent):
        try:
            if d.exists():
                shutil.rmtree(d)
        except OSError as e:
            raise EngineError(f"cannot remove {node}'s engine data {d}: {e}") from None
    for f in (socket_path(lab, node), config_path(lab, node), _cgroup_record(lab, node)):
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        data_root(lab, node).parent.parent.rmdir()  # nodes/, when it was the last node


# ---- cgroups ----------------------------------------------------------------------------


def _hierarchies() -> list[tuple[str, set[str], Path]]:
    """Mounted cgroup hierarchies: (root within the hierarchy, controllers or {""} for v2,
    mount point)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup2":
            out.append((fields[3], {""}, Path(_unescape(fields[4]))))
        elif fstype == "cgroup":
            ctrls = {o for o in options.split(",") if o not in ("rw", "ro")}
            out.append((fields[3], ctrls, Path(_unescape(fields[4]))))
    return out


def _record_cgroups(lab: Lab, node: str, pid: int) -> None:
    """Where this dockerd's containers' cgroups will be, on every hierarchy: below dockerd's
    own cgroup there. Merged with what earlier starts recorded (a restart from another session
    may be in another memory cgroup, and earlier containers' cgroups stay where they were)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    parent = cgroup_parent(lab, node)
    hierarchies = _hierarchies()
    dirs = set(_recorded_cgroups(lab, node))
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        wanted = set(ctrls.split(",")) if ctrls else {""}
        for root, have, mount in hierarchies:
            if wanted <= have and (path + "/").startswith(root.rstrip("/") + "/"):
                rel = path[len(root.rstrip("/")) :].strip("/")
                dirs.add(str(mount / rel / parent))
    _cgroup_record(lab, node).write_text(json.dumps(sorted(dirs), indent=1) + "\n")


def _recorded_cgroups(lab: Lab, node: str) -> list[str]:
    try:
        dirs: list[str] = json.loads(_cgroup_record(lab, node).read_text())
    except (OSError, ValueError):
        return []
    return dirs


def _cgroup_dirs(lab: Lab, node: str) -> list[Path]:
    """The node's containers' parent cgroups that exist: as recorded, and at each hierarchy's
    root (where they are when dockerd ran in the root cgroup)."""
    parent = cgroup_parent(lab, node)
    candidates = {Path(d) for d in _recorded_cgroups(lab, node)}
    candidates |= {mount / parent for _, _, mount in _hierarchies()}
    return sorted(d for d in candidates if d.is_dir())


def _procs_under(top: Path) -> set[int]:
    procs: set[int] = set()
    for d, _, _ in os.walk(top):
        with contextlib.suppress(OSError):
            procs.update(int(p) for p in (Path(d) / "cgroup.procs").read_text().split())
    return procs


def _remove_cgroup(top: Path) -> None:
    """Remove a cgroup and those below it, deepest first; a cgroup whose last process has just
    been killed may be busy a moment longer."""
    deadline = time.monotonic() + 5
    while top.is_dir():
        for d, _, _ in os.walk(top, topdown=False):
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.rmdir(d)
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise EngineError(
                            f"cannot remove the cgroup {d}: {e}; processes in it: "
                            f"{sorted(_procs_under(Path(d))) or 'none'}"
                        ) from None
        if top.is_dir():
            stop_pids(sorted(_procs_under(top)), signal.SIGKILL)
            time.sleep(0.05)


# ---- mounts, shims ------------------------------------------------------------------------


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), path)


def _mounts_under(lab: Lab, node: str) -> list[str]:
    """Mount points at or under the node's data and exec roots, deepest (then newest) first."""
    roots = [str(data_root(lab, node)), str(exec_root(lab, node))]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = _unescape(fields[4])
        if any(point == r or point.startswith(r + "/") for r in roots):
            found.append((point.count("/"), int(fields[0]), point))
    return [p for _, _, p in sorted(found, reverse=True)]


def _unmount_all(lab: Lab, node: str) -> None:
    """Lazily unmount everything under the node's roots (overlay merged dirs, shm, netns
    files, dockerd's bind mount of its data root), deepest first, stacked mounts included."""
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(10):  # a mount point may have mounts stacked on it
        points = _mounts_under(lab, node)
        if not points:
            return
        for point in points:
            if libc.umount2(point.encode(), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.ENOENT):  # already gone
                    raise EngineError(f"cannot unmount {point}: {os.strerror(err)}")


def _remove_shim_sockets(lab: Lab, node: str) -> None:
    """The sockets of the node's dead shims in /run/containerd/s (a shim removes its own when
    it exits cleanly; a killed one cannot)."""
    address = exec_root(lab, node) / "containerd" / "containerd.sock"
    ids: set[str] = set()
    for d in (
        data_root(lab, node) / "containers",
        exec_root(lab, node) / "containerd",
        exec_root(lab, node) / "runtime-runc" / "moby",
    ):
        with contextlib.suppress(OSError):
            ids.update(p.name for p in d.iterdir() if len(p.name) == 64)
    for cid in ids:
        for ns in SHIM_NAMESPACES:
            name = hashlib.sha256(f"{address}/{ns}/{cid}".encode()).hexdigest()
            (SHIM_SOCKETS / name).unlink(missing_ok=True)


# ---- the API ------------------------------------------------------------------------------


def ping(path: Path) -> bool:
    """Does the Docker Engine API (dockerd's, or shoald's) on this unix socket answer /_ping?"""
    conn = _UnixConnection(str(path))
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=2)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        sock.connect(self.path)
        self.sock = sock


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
