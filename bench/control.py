"""bench/control: the control plane, `service create` and `service scale`, against Docker's own.

    python -m bench.control [--sizes 10,50,100] [--scale 10,100] [--reps 3] [--no-docker]

The time from the API call to N tasks running *and answering*, on both systems, driven by the
same client (the docker SDK), side by side in one run, interleaved, repeated; medians and
ratios printed, raw JSON written to bench/results/. Both systems run real containers of the
same image, `micro` (orchestrator/images/rootfs.py: busybox httpd on 8000 answering JSON
{"ip", "hostname"}), with its own command (the image's Cmd) and `--publish 30000:8000`.

Shoal: a 3-node lab `bctl` (192.168.81.0/24) with the container executor: every node runs
shoald, shoal-mesh and its own dockerd, and the lab a registry (192.168.81.1:5000) seeded with
`micro`, which each node's engine pulls the first time one of its tasks needs it. The service
names `micro`; shoald pins it to the registry's digest at create, as Docker does.

Docker: Debian's docker.io (dockerd 20.10), a single-node swarm, started by this bench in a
network namespace of its own (`bctl-dock`, address 10.199.0.1 on a bridge) so that its
iptables rules and sysctls never touch the host's; data root /var/lib/docker-bench (removed
afterwards). The same image is loaded into it (`docker load` of rootfs.save_archive(micro));
the service names it by image ID, so no task asks a registry first.

Before anything is timed, a warm-up `create 10` (not counted) runs on both systems, so every
Shoal node's engine has pulled `micro` and both measure with the image already present.

What "answering" means (all measured from the API call that creates or scales):
  running  the API lists N tasks of the service in state running;
  direct   every one of the N tasks answered HTTP, with its own hostname, on its own address
           (Shoal: its overlay address, asked from sw1; Docker: its docker_gwbridge address,
           asked from dockerd's namespace);
  mesh     through the routing mesh: for every node, N distinct tasks of the service answered
           requests sent to that node's published port (Shoal: from the host to each of the 3
           nodes' addresses; Docker: to 10.199.0.1:30000 in its namespace). Requests go
           round-robin, so once every backend is programmed N requests reach all N.
Probes run slowly (one round per 50 ms) until the API lists N running tasks, then as fast as
they go, so the client's load barely competes with the systems while they converge; once a
case has converged they pause (teardown and memory are measured without them).

Cases: `create N` for each size (a new service per run, removed after it: "teardown" is the
time until every task's processes and namespace are gone, on Docker its container;
Shoal's agent removes the tasks' stopped containers, kept for their logs, at its next sweep,
which the bench waits for untimed); `scale A -> B` (create with A, wait until A answer, then
scale to B and time that).

Floor (`engines`, unless --no-floor): in each repetition, for each size N, N bare containers of
the same image on Shoal's three engines, no orchestration at all (network none, created and
started through the SDK, 48 at a time, round-robin over the engines), timed to all started:
what the engines alone cost on this machine, under Shoal's `create N`.

Memory: once after the warm-up (no service: idle), and after every `create N` of the largest
size has converged (before its removal), the proportional set size (PSS, from
/proc/<pid>/smaps_rollup; RSS too, in the JSON) summed per group of processes:
  Shoal   control plane: every node's shoald and shoal-mesh; engine: every node's dockerd,
          containerd and shims; tasks: the processes of the tasks' containers;
  Docker  control plane: dockerd (the swarm lives in it); engine: containerd and shims; tasks:
          the containers' processes (everything below the shims).
Printed: idle, at N tasks (median over the repetitions), and the growth per 100 tasks
((at N - idle) * 100 / N).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from mesh.netns import run_in_netns
from orchestrator.images import rootfs
from orchestrator.lab import daemons, engines
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab

LAB = "bctl"
SUBNET = ipaddress.IPv4Network("192.168.81.0/24")
PUBLISHED, TARGET = 30000, rootfs.MICRO_PORT
RESULTS = Path(__file__).resolve().parent / "results"
TIMEOUT = 240.0
IMAGE = "micro"  # Shoal: by name, from the lab's registry; Docker: loaded, by ID
# stopped containers of removed tasks: Shoal's agent removes them at its sweep (every 5 s)
REMAINS_TIMEOUT = 15.0
WARMUP = 10  # replicas of the warm-up create (not counted): every Shoal node pulls micro

DOCKER_NS = "bctl-dock"
DOCKER_ADDR = "10.199.0.1"
DOCKER_SOCK = "/run/docker-bench.sock"
DOCKER_ROOT = Path("/var/lib/docker-bench")
DOCKER_EXEC_ROOT = "/run/docker-bench"
DOCKER_IMAGE = f"{IMAGE}:latest"
# its containers' cgroups, on every hierarchy (not /docker: a host's own dockerd's), removed
# afterwards
DOCKER_CGROUP = "bctl-dock"

# `ip netns exec` gives dockerd a fresh /sys without the cgroup hierarchies: mount them again
# (v1 or v2, as the host has them), then run dockerd.
DOCKERD_WRAPPER = """#!/bin/sh
set -e
if ! mountpoint -q /sys/fs/cgroup; then
  if [ "$CGROUP_V2" = 1 ]; then
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
  else
    mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
    for c in $CGROUPS; do
      mkdir -p /sys/fs/cgroup/$c
      mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
    done
    mkdir -p /sys/fs/cgroup/systemd
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
  fi
fi
exec dockerd "$@"
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- probing -------------------------------------------------------------------------------


def http_get(host: str, port: int, timeout: float = 0.5) -> str | None:
    """One request on a fresh connection; the answering task's hostname, None on failure."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
        return None
    text = body.decode(errors="replace").strip()
    if text.startswith("{"):
        try:
            return str(json.loads(text)["hostname"])
        except (ValueError, KeyError):
            return None
    return text or None


class Prober:
    """A thread (in a network namespace, or the host's) asking targets again and again and
    remembering when each answer was first seen.

    mesh: one fixed target, the published port; answers are keyed by hostname.
    direct: the tasks' own addresses (set by the caller as they become known); keyed by
    address, each asked until it has answered once.
    """

    def __init__(self, name: str, netns: str | None, mesh_target: tuple[str, int] | None) -> None:
        self.name = name
        self.netns = netns
        self.mesh_target = mesh_target
        self.direct_targets: dict[str, str] = {}  # address -> the task's hostname
        self.seen: dict[str, float] = {}
        self.requests = 0
        self.failures = 0
        self.fast = threading.Event()
        self.hold = threading.Event()  # set: ask nothing (between cases)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"probe {name}", daemon=True)

    def start(self) -> Prober:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def reset(self) -> None:
        with self.lock:
            self.seen = {}
            self.direct_targets = {}
            self.fast.clear()
            self.hold.clear()

    def set_targets(self, targets: dict[str, str]) -> None:
        with self.lock:
            self.direct_targets = dict(targets)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return dict(self.seen)

    def _run(self) -> None:
        run_in_netns(self.netns, self._loop)

    def _loop(self) -> None:
        while not self.stop.is_set():
            if self.hold.is_set():
                self.stop.wait(0.05)
                continue
            if self.mesh_target is not None:
                targets = [self.mesh_target]
            else:
                with self.lock:
                    targets = [
                        (ip, TARGET)
                        for ip, host in self.direct_targets.items()
                        if host not in self.seen
                    ]
            for host, port in targets:
                answer = http_get(host, port)
                now = time.monotonic()
                self.requests += 1
                if answer is None:
                    self.failures += 1
                    if self.fast.is_set():
                        time.sleep(0.01)  # refused at once: do not spin
                    continue
                with self.lock:
                    # keyed by the answering task's hostname (an address may be reused by a
                    # later task), for direct probes only when it is the task expected there
                    if self.mesh_target is not None or self.direct_targets.get(host) == answer:
                        self.seen.setdefault(answer, now)
            if not self.fast.is_set():
                self.fast.wait(0.05)  # converging: one round per 50 ms
            elif not targets:
                time.sleep(0.01)


# --- memory --------------------------------------------------------------------------------


@dataclass
class Group:
    """Processes of one kind and their memory, summed (KiB)."""

    procs: int = 0
    rss_kib: int = 0
    pss_kib: int = 0


MemSample = dict[str, Group]  # group name -> its processes' memory


@dataclass
class Proc:
    ppid: int
    argv: list[bytes]

    @property
    def program(self) -> bytes:
        return os.path.basename(self.argv[0]) if self.argv else b""


def _processes() -> dict[int, Proc]:
    """Every process now: pid -> parent and command line."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        table[int(entry.name)] = Proc(int(stat.rsplit(")", 1)[1].split()[1]), argv)
    return table


def _descendants(roots: Iterable[int], table: dict[int, Proc]) -> set[int]:
    """The roots (those alive) and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p.ppid, []).append(pid)
    found: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of a process in KiB; None if it is gone. PSS splits each shared page among
    the processes mapping it, so PSS sums over many processes (shims sharing their binary,
    shoalds sharing the interpreter) count every page once; RSS sums count shared pages again
    for each."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except FileNotFoundError:
        text = ""
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss") and rest.split():
            fields[key] = int(rest.split()[0])
    if "Rss" not in fields:  # no smaps_rollup (kernel < 4.14), or a kernel thread
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        rss = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")),
            0,
        )
        return rss, rss
    return fields["Rss"], fields.get("Pss", fields["Rss"])


def _add(sample: MemSample, group: str, pids: Iterable[int]) -> None:
    g = sample.setdefault(group, Group())
    for pid in pids:
        mem = _memory_kib(pid)
        if mem is not None:
            g.procs += 1
            g.rss_kib += mem[0]
            g.pss_kib += mem[1]


def _is_shim(p: Proc) -> bool:
    return p.program.startswith(b"containerd-shim")


def _engine_groups(pids: Iterable[int], table: dict[int, Proc]) -> dict[str, list[int]]:
    """An engine's processes by program: dockerd, containerd, shims."""
    out: dict[str, list[int]] = {"dockerd": [], "containerd": [], "shims": []}
    for pid in pids:
        p = table.get(pid)
        if p is None:
            continue
        if _is_shim(p):
            out["shims"].append(pid)
        elif p.program == b"dockerd":
            out["dockerd"].append(pid)
        else:
            out["containerd"].append(pid)
    return out


# --- the two systems -----------------------------------------------------------------------


@dataclass
class TaskView:
    running: int
    hostnames: set[str]  # of the running tasks
    ips: dict[str, str]  # addresses to ask directly -> the hostname expected there


class System:
    name = ""
    client: Any
    mesh: list[Prober]
    direct: Prober
    image = ""
    # the printed memory columns: column -> the groups summed in it
    columns: dict[str, tuple[str, ...]] = {}

    def tasks(self, service: str) -> TaskView:
        raise NotImplementedError

    def leftovers(self) -> int:
        """What of removed tasks still exists and counts as the task not gone yet: their
        processes, containers to be removed with them, network namespaces."""
        raise NotImplementedError

    def remains(self) -> list[str]:
        """What removed tasks leave for later clean-up (Shoal: stopped task containers, kept
        for their logs until the agent's sweep); names."""
        return []

    def remove_remains(self) -> None:
        """Remove what remains() lists."""

    def memory(self) -> MemSample:
        """Memory of the system's processes now, by group."""
        raise NotImplementedError

    def probers(self) -> list[Prober]:
        return [*self.mesh, self.direct]

    def close(self) -> None:
        for p in self.probers():
            p.close()
        with contextlib.suppress(Exception):
            self.client.close()


def _running(client: Any, service: str) -> list[dict[str, Any]]:
    try:
        svc = client.services.get(service)
        tasks = svc.tasks(filters={"desired-state": "running"})
    except docker.errors.NotFound:
        return []
    return [t for t in tasks if t["Status"]["State"] == "running"]


class Shoal(System):
    name = "shoal"
    image = IMAGE
    columns = {
        "control": ("shoald", "shoal-mesh"),
        "engine": ("dockerd", "containerd", "shims"),
        "tasks": ("tasks",),
    }

    def __init__(self) -> None:
        self.mesh = []
        self.engines: dict[str, Any] = {}  # node -> a client of its engine
        # an earlier run's lab, or the registry storage its `down` kept
        labmod.down(LAB, purge=True)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        self.lab: Lab = labmod.up(LAB, 3, SUBNET, executor="container")
        daemons.start_all(self.lab)  # the registry (seeded), every node's engine, shoald
        self.engines = {
            n.name: docker.DockerClient(
                base_url=engines.socket_url(self.lab, n.name), version="1.41", timeout=60
            )
            for n in self.lab.nodes
        }
        sw1 = self.lab.node("sw1")
        self._cli("sw1", "swarm", "init", "--listen-addr", f"{sw1.address}:2377")
        token = self._cli("sw1", "swarm", "join-token", "-q", "worker").strip()
        for n in ("sw2", "sw3"):
            self._cli(n, "swarm", "join", "--token", token, f"{sw1.address}:2377")
        self.client = docker.DockerClient(base_url=daemons.docker_host(self.lab, "sw1"))
        self.version = self.client.version()["Version"]
        _wait(
            lambda: (
                sum(n.attrs["Status"]["State"] == "ready" for n in self.client.nodes.list()) == 3
            ),
            "3 shoal nodes ready",
        )
        self.mesh = [
            Prober(f"shoal {n.name}", None, (n.address, PUBLISHED)).start() for n in self.lab.nodes
        ]
        self.direct = Prober("shoal direct", sw1.netns, None).start()

    def _cli(self, node: str, *args: str) -> str:
        env = dict(os.environ, DOCKER_HOST=daemons.docker_host(self.lab, node))
        out = subprocess.run(
            labmod.exec_argv(
                self.lab, node, [sys.executable, "-m", "orchestrator.cli.main", *args]
            ),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"shoal {' '.join(args)} on {node}: {out.stderr.strip()}")
        return out.stdout

    def nodes_with_image(self) -> list[str]:
        """The nodes whose engine has micro (the image the registry was seeded with)."""
        have = []
        for node, engine in self.engines.items():
            with contextlib.suppress(docker.errors.ImageNotFound):
                engine.images.get(rootfs.micro().id)
                have.append(node)
        return have

    def tasks(self, service: str) -> TaskView:
        running = _running(self.client, service)
        ips = {}
        for t in running:
            for att in t.get("NetworksAttachments") or []:
                for a in att.get("Addresses") or []:
                    ips[a.split("/")[0]] = t["ID"][:12]
        return TaskView(len(running), {t["ID"][:12] for t in running}, ips)

    def _containers(self) -> list[tuple[Any, dict[str, Any]]]:
        """Every container of every node's engine, running or not, with its engine."""
        return [(e, c) for e in self.engines.values() for c in e.api.containers(all=True)]

    def leftovers(self) -> int:
        """Task namespaces and running containers."""
        prefixes = tuple(f"{n.netns}-" for n in self.lab.nodes)
        namespaces = sum(p.name.startswith(prefixes) for p in Path("/run/netns").iterdir())
        live: int = sum(bool(c["State"] == "running") for _, c in self._containers())
        return namespaces + live

    def remains(self) -> list[str]:
        """Stopped task containers: the agent removes them once the managers have deleted
        their tasks (its sweep, every few seconds)."""
        return [
            str((c.get("Names") or [c["Id"][:12]])[0]).lstrip("/") for _, c in self._containers()
        ]

    def remove_remains(self) -> None:
        for engine, c in self._containers():
            with contextlib.suppress(docker.errors.NotFound):
                engine.api.remove_container(c["Id"], force=True, v=True)

    def memory(self) -> MemSample:
        record = labmod.load(LAB) or self.lab  # with the processes started since `up`
        table = _processes()
        sample: MemSample = {}
        groups: dict[str, list[int]] = {}
        for node in record.nodes:
            shoalds = [
                pid
                for pid in labmod.running(record, node.name)
                if pid in table and b"orchestrator.daemon" in table[pid].argv
            ]
            for pid in _descendants(shoalds, table):  # shoal-mesh is shoald's child
                group = "shoal-mesh" if b"mesh.cli" in table[pid].argv else "shoald"
                groups.setdefault(group, []).append(pid)
            engine = set(engines.pids(record, node.name, containers=False))
            for group, pids in _engine_groups(engine, table).items():
                groups.setdefault(group, []).extend(pids)
            for pid in set(engines.pids(record, node.name)) - engine:
                groups.setdefault("tasks", []).append(pid)
        for group in ("shoald", "shoal-mesh", "dockerd", "containerd", "shims"):
            _add(sample, group, groups.get(group, []))
        _add(sample, "tasks", groups.get("tasks", []))
        return sample

    def close(self) -> None:
        for p in [*self.mesh, *([self.direct] if hasattr(self, "direct") else [])]:
            p.close()
        for c in [*self.engines.values(), *([self.client] if hasattr(self, "client") else [])]:
            with contextlib.suppress(Exception):
                c.close()
        labmod.down(LAB, purge=True)  # and the registry's storage


class Docker(System):
    name = "docker"
    image = DOCKER_IMAGE
    columns = {
        "control": ("dockerd",),
        "engine": ("containerd", "shims"),
        "tasks": ("tasks",),
    }

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="bench-control-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.mesh = []
        self.client = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        if not shutil.which("dockerd"):
            raise RuntimeError("no dockerd: apt-get install docker.io")
        if Path(f"/run/netns/{DOCKER_NS}").exists():
            raise RuntimeError(f"namespace {DOCKER_NS} exists: another run, or a leftover")
        _ip("netns", "add", DOCKER_NS)
        _ip("-n", DOCKER_NS, "link", "set", "lo", "up")
        _ip("-n", DOCKER_NS, "link", "add", "bd0", "type", "bridge")
        _ip("-n", DOCKER_NS, "addr", "add", f"{DOCKER_ADDR}/24", "dev", "bd0")
        _ip("-n", DOCKER_NS, "link", "set", "bd0", "up")
        wrapper = self.work / "dockerd.sh"
        wrapper.write_text(DOCKERD_WRAPPER)
        cgroups = " ".join(
            sorted(
                p.name
                for p in Path("/sys/fs/cgroup").iterdir()
                if p.is_dir() and p.name not in ("systemd", "unified") and os.path.ismount(p)
            )
        )
        env = dict(
            os.environ,
            CGROUPS=cgroups,
            CGROUP_V2="1" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "0",
        )
        logf = open(self.work / "dockerd.log", "wb")  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                DOCKER_NS,
                "sh",
                str(wrapper),
                "--data-root",
                str(DOCKER_ROOT),
                "--exec-root",
                DOCKER_EXEC_ROOT,
                "--pidfile",
                f"{DOCKER_EXEC_ROOT}.pid",
                "-H",
                f"unix://{DOCKER_SOCK}",
                f"--cgroup-parent=/{DOCKER_CGROUP}",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        logf.close()
        self.client = docker.DockerClient(
            base_url=f"unix://{DOCKER_SOCK}", version="1.41", timeout=120
        )
        _wait(self._ping, f"dockerd (log: {self.work / 'dockerd.log'})", 30)
        self.version = self.client.version()["Version"]
        # The image Shoal's registry serves, built the same way (same layer, same config: the
        # same image ID), loaded as `docker load` would.
        self.client.images.load(rootfs.save_archive(rootfs.micro(), DOCKER_IMAGE))
        # By ID: a task then uses the local image without asking a registry first (by name,
        # every task tries to pull, fails — no route out of the namespace — and goes on).
        self.image = self.client.images.get(DOCKER_IMAGE).id
        self.client.swarm.init(advertise_addr=DOCKER_ADDR, listen_addr=f"{DOCKER_ADDR}:2377")
        # Docker's routing mesh balances with IPVS (in its ingress sandbox): without it in the
        # kernel, published ports never answer, so there is no mesh to wait for.
        self.ipvs = Path("/proc/net/ip_vs").exists()
        if self.ipvs:
            self.mesh = [Prober("docker node", DOCKER_NS, (DOCKER_ADDR, PUBLISHED)).start()]
        else:
            log("no IPVS in this kernel: Docker's routing mesh cannot answer; timing 'direct'")
        self.direct = Prober("docker direct", DOCKER_NS, None).start()

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"dockerd exited: {(self.work / 'dockerd.log').read_text()[-2000:]}"
                ) from None
            return False

    def tasks(self, service: str) -> TaskView:
        running = _running(self.client, service)
        ids = {t["Status"].get("ContainerStatus", {}).get("ContainerID", "")[:12] for t in running}
        ips = {}
        try:
            gw = self.client.api.inspect_network("docker_gwbridge")
        except docker.errors.NotFound:
            gw = {}
        for cid, c in (gw.get("Containers") or {}).items():
            if cid[:12] in ids and c.get("IPv4Address"):
                ips[c["IPv4Address"].split("/")[0]] = cid[:12]
        return TaskView(len(running), ids, ips)

    def leftovers(self) -> int:
        return len(self.client.api.containers(all=True))

    def memory(self) -> MemSample:
        table = _processes()
        root = DOCKER_EXEC_ROOT.encode()
        # the engine's programs with its exec root on their command line: dockerd
        # (--exec-root), containerd (--config <root>/containerd/...), shims (-address ...)
        engine = {
            pid
            for pid, p in table.items()
            if (p.program in (b"dockerd", b"containerd") or _is_shim(p))
            and any(a == root or a.startswith(root + b"/") for a in p.argv[1:])
        }
        groups = _engine_groups(engine, table)
        sample: MemSample = {}
        for group in ("dockerd", "containerd", "shims"):
            _add(sample, group, groups[group])
        _add(sample, "tasks", _descendants(groups["shims"], table) - engine)
        return sample

    def close(self) -> None:
        for p in [*self.mesh, *([self.direct] if hasattr(self, "direct") else [])]:
            p.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                for s in self.client.services.list():
                    s.remove()
            with contextlib.suppress(Exception):
                self.client.swarm.leave(force=True)
            with contextlib.suppress(Exception):
                _wait(lambda: self.leftovers() == 0, "docker containers gone", 120)
            with contextlib.suppress(Exception):
                self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["ip", "netns", "del", DOCKER_NS], capture_output=True)
        shutil.rmtree(DOCKER_ROOT, ignore_errors=True)
        shutil.rmtree(DOCKER_EXEC_ROOT, ignore_errors=True)
        _remove_cgroups(DOCKER_CGROUP)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DOCKER_SOCK)
        log(f"dockerd stopped; its log: {self.work / 'dockerd.log'}")


def _remove_cgroups(name: str) -> None:
    """Remove the cgroup `name` (at the root of every hierarchy) and those below it, once
    empty: what the bench's dockerd made for its containers."""
    root = Path("/sys/fs/cgroup")
    for top in [root / name, *root.glob(f"*/{name}")]:
        if not top.is_dir():
            continue
        for d, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(d)
            except OSError as e:
                log(f"cannot remove the cgroup {d}: {e}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _wait(ok: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


# --- one measurement -----------------------------------------------------------------------


@dataclass
class Run:
    system: str
    case: str
    rep: int
    replicas: int
    api_s: float = 0.0  # the create/scale call returned
    running_s: float | None = None
    direct_s: float | None = None
    mesh_s: float | None = None  # None: the mesh never answered for all (Docker without IPVS)
    teardown_s: float = 0.0
    requests: int = 0
    failures: int = 0
    notes: list[str] = field(default_factory=list)
    memory: MemSample | None = None  # once converged, for the largest `create N`


def _converge(sysm: System, service: str, n: int, t0: float, run: Run) -> None:
    """Poll until N tasks run and answer directly and (if it ever works) through the mesh."""
    deadline = t0 + TIMEOUT
    view = TaskView(0, set(), {})
    mesh_ok = True
    while time.monotonic() < deadline:
        view = sysm.tasks(service)
        now = time.monotonic()
        if view.running >= n and run.running_s is None:
            run.running_s = now - t0
            for p in sysm.probers():
                p.fast.set()
        sysm.direct.set_targets(view.ips)
        if view.running >= n and len(view.hostnames) >= n and len(view.ips) >= n:
            direct = sysm.direct.snapshot()
            if view.hostnames <= set(direct) and run.direct_s is None:
                run.direct_s = max(direct[h] for h in view.hostnames) - t0
            meshes = [p.snapshot() for p in sysm.mesh]
            if meshes and all(view.hostnames <= set(m) for m in meshes) and run.mesh_s is None:
                run.mesh_s = max(m[h] for m in meshes for h in view.hostnames) - t0
            if run.direct_s is not None and (run.mesh_s is not None or not sysm.mesh):
                break
            # A mesh that has answered nothing 20 s after every task answered directly does
            # not work here (Docker's needs IPVS): stop waiting for it.
            if run.direct_s is not None and not any(meshes) and now - t0 > run.direct_s + 20:
                mesh_ok = False
                break
        time.sleep(0.25)
    if run.direct_s is None:
        run.notes.append(f"timeout: {view.running} running, direct {len(sysm.direct.seen)}")
    if not mesh_ok:
        run.notes.append("the routing mesh never answered")
    run.requests = sum(p.requests for p in sysm.probers())
    run.failures = sum(p.failures for p in sysm.probers())
    for p in sysm.probers():
        p.hold.set()  # nothing asked during what follows (teardown, memory, the next case)


def _teardown(sysm: System, service: str, run: Run) -> None:
    """Remove the service; timed until its tasks are gone (processes, namespaces,
    and on Docker the containers). Then, untimed, until what the system cleans up later is
    gone too (Shoal: stopped containers, at the agent's next sweep); what is still there after
    REMAINS_TIMEOUT is noted and removed, so that the next case starts clean."""
    t = time.monotonic()
    with contextlib.suppress(docker.errors.NotFound):
        sysm.client.services.get(service).remove()
    _wait(lambda: sysm.leftovers() == 0, f"{sysm.name} tasks of {service} gone", 180)
    run.teardown_s = time.monotonic() - t
    with contextlib.suppress(TimeoutError):
        _wait(lambda: not sysm.remains(), "", REMAINS_TIMEOUT)
    left = sysm.remains()
    if left:
        note = (
            f"{len(left)} stopped container(s) still there {REMAINS_TIMEOUT:.0f} s after the "
            f"tasks were gone, removed by the bench: {', '.join(left[:3])}"
            + (" ..." if len(left) > 3 else "")
        )
        run.notes.append(note)
        log(f"{sysm.name} {service}: {note}")
        sysm.remove_remains()
    time.sleep(2)  # let the last clean-ups (mesh syncs, conntrack) settle


def _reset(sysm: System) -> None:
    for p in sysm.probers():
        p.reset()
        p.requests = p.failures = 0


def _create(sysm: System, service: str, n: int) -> None:
    sysm.client.services.create(
        sysm.image,  # and the image's own command
        name=service,
        mode=docker.types.ServiceMode("replicated", replicas=n),
        endpoint_spec=docker.types.EndpointSpec(ports={PUBLISHED: TARGET}),
    )


def measure_create(sysm: System, n: int, rep: int | str, memory: bool = False) -> Run:
    """Create a service of N tasks, time it to answering; with memory, then sample the
    system's memory (with the N tasks up, before the removal)."""
    service = f"bc{rep}c{n}"
    run = Run(sysm.name, f"create {n}", -1 if isinstance(rep, str) else rep, n)
    _reset(sysm)
    t0 = time.monotonic()
    _create(sysm, service, n)
    run.api_s = time.monotonic() - t0
    try:
        _converge(sysm, service, n, t0, run)
        if memory and run.direct_s is not None:
            time.sleep(0.5)  # the probes' last requests (a CGI each) done
            run.memory = sysm.memory()
    finally:
        _teardown(sysm, service, run)
    return run


def measure_engines(shoal: Shoal, n: int, rep: int) -> Run:
    """The floor under Shoal's create: N bare containers of the same image on the same three
    engines, with no orchestration (no API, Raft, scheduling, mesh or gate), created and
    started through the SDK, 48 at a time, spread round-robin; timed to all started."""
    run = Run("engines", f"create {n}", rep, n)
    image = rootfs.micro().id
    nodes = sorted(shoal.engines)

    def one(i: int) -> tuple[Any, str]:
        api = shoal.engines[nodes[i % len(nodes)]].api
        cid = api.create_container(
            image, name=f"floor{rep}-{i}", host_config=api.create_host_config(network_mode="none")
        )["Id"]
        api.start(cid)
        return api, str(cid)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        made = list(pool.map(one, range(n)))
    run.running_s = time.monotonic() - t0
    t1 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        list(pool.map(lambda m: m[0].remove_container(m[1], force=True), made))
    run.teardown_s = time.monotonic() - t1
    return run


def _scale(client: Any, service_id: str, replicas: int) -> None:
    """What `docker service scale` does: the spec as stored, only the replicas changed.

    Not docker-py's Service.scale(), which sends a spec without the command, nor
    update_service(fetch_current_spec=True), which sends it with the defaults inserted: on
    both systems either changes the task template, and every existing task is replaced too.
    """
    api = client.api
    current = api.inspect_service(service_id)
    spec = current["Spec"]
    spec["Mode"] = {"Replicated": {"Replicas": replicas}}
    url = api._url("/services/{0}/update", service_id)
    resp = api._post_json(url, data=spec, params={"version": current["Version"]["Index"]})
    api._raise_for_status(resp)


def measure_scale(sysm: System, a: int, b: int, rep: int) -> Run:
    service = f"bc{rep}s{a}"
    run = Run(sysm.name, f"scale {a} -> {b}", rep, b)
    try:
        _reset(sysm)
        t = time.monotonic()
        _create(sysm, service, a)
        first = Run(sysm.name, "", rep, a)
        _converge(sysm, service, a, t, first)
        if first.direct_s is None:
            run.notes.append("the initial service did not converge")
            return run
        _reset(sysm)
        svc = sysm.client.services.get(service)
        t0 = time.monotonic()
        _scale(sysm.client, svc.id, b)
        run.api_s = time.monotonic() - t0
        _converge(sysm, service, b, t0, run)
    finally:
        _teardown(sysm, service, run)
    return run


# --- the whole bench -----------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(runs: list[Run]) -> dict[str, Any]:
    cases = list(dict.fromkeys(r.case for r in runs))
    systems = list(dict.fromkeys(r.system for r in runs))
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for case in cases:
        table[case] = {}
        for s in systems:
            sel = [r for r in runs if r.case == case and r.system == s]
            medians: dict[str, float | None] = {}
            for metric in ("running_s", "direct_s", "mesh_s", "teardown_s"):
                vals = [getattr(r, metric) for r in sel]
                ok = [v for v in vals if v is not None]
                medians[metric] = statistics.median(ok) if ok and len(ok) == len(vals) else None
            table[case][s] = medians
    print("\nmedians (seconds from the API call)")
    print(f"{'case':16} {'system':7} {'running':>8} {'direct':>8} {'mesh':>8} {'teardown':>9}")
    for case, row in table.items():
        for s, v in row.items():
            if all(x is None for x in v.values()):
                continue  # no run of this system in this case (engines: creates only)
            print(
                f"{case:16} {s:7} {_fmt(v['running_s']):>8} {_fmt(v['direct_s']):>8} "
                f"{_fmt(v['mesh_s']):>8} {_fmt(v['teardown_s']):>9}"
            )
    ratios: dict[str, dict[str, float | None]] = {}
    if {"shoal", "docker"} <= set(systems):
        print("\nratios shoal/docker (lower is better for Shoal)")
        for case, row in table.items():
            sh, dk = row["shoal"], row["docker"]
            ratios[case] = {
                "running": _ratio(sh["running_s"], dk["running_s"]),
                "direct": _ratio(sh["direct_s"], dk["direct_s"]),
                "shoal mesh / docker direct": _ratio(sh["mesh_s"], dk["direct_s"]),
                "mesh": _ratio(sh["mesh_s"], dk["mesh_s"]),
            }
            print(f"{case:16} " + "  ".join(f"{k} {_fmt(v)}" for k, v in ratios[case].items()))
    return {"table": table, "ratios": ratios}


MIB = 1024.0


def _columns(sysm: System, sample: MemSample) -> dict[str, float]:
    """A sample's PSS in MiB by printed column (control, engine, tasks, total)."""
    out = {
        col: sum(sample[g].pss_kib for g in groups if g in sample) / MIB
        for col, groups in sysm.columns.items()
    }
    out["total"] = sum(g.pss_kib for g in sample.values()) / MIB
    return out


def summarize_memory(
    systems: list[System], idle: dict[str, MemSample], runs: list[Run]
) -> dict[str, Any]:
    """Idle, at N tasks (the median over the runs that sampled it) and the growth per 100
    tasks, by column; every group's processes and KiB (RSS, PSS) in the JSON."""
    out: dict[str, Any] = {}
    lines = []
    for sysm in systems:
        sampled = [r for r in runs if r.system == sysm.name and r.memory is not None]
        if not sampled or sysm.name not in idle:
            continue
        n = sampled[0].replicas
        at_n = [_columns(sysm, r.memory) for r in sampled if r.memory is not None]
        base = _columns(sysm, idle[sysm.name])
        median = {col: statistics.median(c[col] for c in at_n) for col in base}
        per_100 = {col: (median[col] - base[col]) * 100 / n for col in base}
        out[sysm.name] = {
            "tasks": n,
            "samples": len(at_n),
            "idle_mib": base,
            "at_n_mib": median,
            "per_100_tasks_mib": per_100,
            "columns": sysm.columns,
            "idle": _sample_dict(idle[sysm.name]),
            "at_n": [_sample_dict(r.memory) for r in sampled if r.memory is not None],
        }
        procs = ", ".join(
            f"{g} {v.procs}" for g, v in (sampled[-1].memory or {}).items() if v.procs
        )
        lines.append((sysm.name, "idle", base))
        lines.append((sysm.name, f"{n} tasks", median))
        lines.append((sysm.name, "per 100 tasks", per_100))
        lines.append((sysm.name, f"  processes at {n}: {procs}", {}))
    if not out:
        return out
    print(
        "\nmemory, MiB PSS (idle: after the warm-up, no service; at N tasks answering: median "
        "of the runs; per 100 tasks: (at N - idle) x 100 / N)"
    )
    print("control: shoal = every node's shoald + shoal-mesh, docker = dockerd")
    print("engine: shoal = every node's dockerd + containerd + shims, docker = containerd + shims")
    cols = ("control", "engine", "tasks", "total")
    print(f"{'system':7} {'':14}" + "".join(f"{c:>10}" for c in cols))
    for name, what, vals in lines:
        if not vals:
            print(f"{name:7} {what}")
            continue
        print(f"{name:7} {what:14}" + "".join(f"{vals[c]:10.1f}" for c in cols))
    return out


def _sample_dict(sample: MemSample) -> dict[str, dict[str, int]]:
    return {g: asdict(v) for g, v in sample.items()}


@contextlib.contextmanager
def _systems(with_docker: bool) -> Iterator[list[System]]:
    made: list[System] = []
    try:
        log("building the Shoal lab (3 nodes, container executor, registry) and its swarm")
        made.append(Shoal())
        if with_docker and not shutil.which("dockerd"):
            log("no dockerd (apt-get install docker.io): Shoal only")
        elif with_docker:
            log("starting dockerd in its own namespace and a single-node swarm")
            made.append(Docker())
        yield made
    finally:
        for s in reversed(made):
            log(f"tearing down {s.name}")
            try:
                s.close()
            except Exception as e:  # the other system must still go
                log(f"tearing down {s.name} failed: {e}")
        if not with_docker or len(made) < 2:
            # a failed Docker start may leave its namespace and data behind
            subprocess.run(["ip", "netns", "del", DOCKER_NS], capture_output=True)


def _log_run(r: Run, label: str) -> None:
    log(
        f"{label} {r.case:15} {r.system:6} api {r.api_s:5.2f}  running "
        f"{_fmt(r.running_s):>6}  direct {_fmt(r.direct_s):>6}  mesh "
        f"{_fmt(r.mesh_s):>6}  teardown {r.teardown_s:5.1f}  "
        f"requests {r.requests} failed {r.failures} {' '.join(r.notes)}"
    )


def warm_up(systems: list[System]) -> list[Run]:
    """A create that is not counted, on both systems: every Shoal node's engine pulls micro
    from the lab's registry (and each engine makes its first containers) before the runs."""
    runs = []
    for s in systems:
        r = measure_create(s, WARMUP, "warm")
        _log_run(r, "warm-up")
        runs.append(r)
        if isinstance(s, Shoal):
            have = s.nodes_with_image()
            log(f"micro present on the engines of {', '.join(have) or 'no node'}")
            missing = [n.name for n in s.lab.nodes if n.name not in have]
            if missing:
                r.notes.append(f"micro not pulled on {', '.join(missing)}")
                log(f"warning: micro is not on {', '.join(missing)}: their first run pulls it")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.control",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default="10,50,100", help="replicas for `create N`")
    p.add_argument("--scale", default="10,100", help="A,B for `scale A -> B` ('' to skip)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-docker", action="store_true", help="Shoal only")
    p.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip `engines`: N bare containers on Shoal's engines, no orchestration",
    )
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    scale = [int(x) for x in args.scale.split(",") if x]
    memory_at = max(sizes) if sizes else None  # memory sampled after these creates
    RESULTS.mkdir(exist_ok=True)
    runs: list[Run] = []
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
        "executor": "container",
        "image": IMAGE,
        "image_id": rootfs.micro().id,
    }
    started = time.monotonic()
    idle: dict[str, MemSample] = {}
    with _systems(not args.no_docker) as systems:
        for s in systems:
            if isinstance(s, Docker):
                meta["docker_version"] = s.version
                meta["docker_ipvs"] = s.ipvs
            elif isinstance(s, Shoal):
                meta["shoal_engine_version"] = s.engines["sw1"].version()["Version"]
        meta["warmup"] = [asdict(r) for r in warm_up(systems)]
        for s in systems:
            idle[s.name] = s.memory()
        for rep in range(args.reps):
            # interleaved: every case on both systems before the next, alternating who starts
            order = systems if rep % 2 == 0 else list(reversed(systems))
            cases: list[Callable[[System], Run]] = [
                functools.partial(measure_create, n=n, rep=rep, memory=n == memory_at)
                for n in sizes
            ]
            if len(scale) == 2:
                cases.append(functools.partial(measure_scale, a=scale[0], b=scale[1], rep=rep))
            for case in cases:
                for s in order:
                    r = case(s)
                    runs.append(r)
                    _log_run(r, f"rep {rep + 1}")
            if args.floor:
                shoal = next(s for s in systems if isinstance(s, Shoal))
                for n in sizes:
                    r = measure_engines(shoal, n, rep)
                    runs.append(r)
                    _log_run(r, f"rep {rep + 1}")
    result = summarize(runs)
    result["memory"] = summarize_memory(systems, idle, runs)
    meta["wall_s"] = round(time.monotonic() - started)
    out = RESULTS / f"control-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({**meta, **result, "runs": [asdict(r) for r in runs]}, indent=1))
    print(f"\nraw results: {out}  (wall {meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
