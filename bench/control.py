"""bench/control: the control plane, `service create` and `service scale`, against Docker's own.

    python -m bench.control [--sizes 10,50,100] [--scale 10,100] [--reps 3] [--no-docker]

The time from the API call to N tasks running *and answering*, on both systems, driven by the
same client (the docker SDK), side by side in one run, interleaved, repeated; medians and
ratios printed, raw JSON written to bench/results/.

Shoal: a 3-node lab `bctl` (192.168.81.0/24) running shoald on every node, native executor,
service `micro` (the demo app) with `--publish 30000:8000`.

Docker: Debian's docker.io (dockerd 20.10), a single-node swarm, started by this bench in a
network namespace of its own (`bctl-dock`, address 10.199.0.1 on a bridge) so that its
iptables rules and sysctls never touch the host's; data root /var/lib/docker-bench (removed
afterwards). The image `bbench` is made with `docker import` of a busybox-static rootfs; the
task writes its hostname to /www/index.html and runs `busybox httpd -f -p 8000`, with
`--publish 30000:8000`.

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
they go, so the client's load barely competes with the systems while they converge.

Cases: `create N` for each size (a new service per run, removed after it, waiting until every
task's container/namespace is gone); `scale A -> B` (create with A, wait until A answer, then
scale to B and time that).
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from mesh.netns import run_in_netns
from orchestrator.lab import daemons
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab

LAB = "bctl"
SUBNET = ipaddress.IPv4Network("192.168.81.0/24")
PUBLISHED, TARGET = 30000, 8000
RESULTS = Path(__file__).resolve().parent / "results"
TIMEOUT = 240.0

DOCKER_NS = "bctl-dock"
DOCKER_ADDR = "10.199.0.1"
DOCKER_SOCK = "/run/docker-bench.sock"
DOCKER_ROOT = Path("/var/lib/docker-bench")
DOCKER_EXEC_ROOT = "/run/docker-bench"
DOCKER_IMAGE = "bbench:latest"
# sh stays PID 1 to exit on SIGTERM, as micro does (httpd as PID 1 would ignore it, and every
# removal would wait out Docker's 10 s grace period).
DOCKER_CMD = [
    "sh",
    "-c",
    "hostname > /www/index.html; trap 'exit 0' TERM; httpd -f -p 8000 -h /www & wait",
]

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

    def __init__(self, name: str, netns: str | None, mesh_target: tuple[str, int] | None):
        self.name = name
        self.netns = netns
        self.mesh_target = mesh_target
        self.direct_targets: dict[str, str] = {}  # address -> the task's hostname
        self.seen: dict[str, float] = {}
        self.requests = 0
        self.failures = 0
        self.fast = threading.Event()
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
    command: list[str] | None = None

    def tasks(self, service: str) -> TaskView:
        raise NotImplementedError

    def leftovers(self) -> int:
        """Task containers / namespaces that still exist."""
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
    image = "micro"

    def __init__(self) -> None:
        if labmod.load(LAB) is not None:
            labmod.down(LAB)
        self.lab: Lab = labmod.up(LAB, 3, SUBNET)
        daemons.start_all(self.lab)
        sw1 = self.lab.node("sw1")
        self._cli("sw1", "swarm", "init", "--listen-addr", f"{sw1.address}:2377")
        token = self._cli("sw1", "swarm", "join-token", "-q", "worker").strip()
        for n in ("sw2", "sw3"):
            self._cli(n, "swarm", "join", "--token", token, f"{sw1.address}:2377")
        self.client = docker.DockerClient(base_url=daemons.docker_host(self.lab, "sw1"))
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

    def tasks(self, service: str) -> TaskView:
        running = _running(self.client, service)
        ips = {}
        for t in running:
            for att in t.get("NetworksAttachments") or []:
                for a in att.get("Addresses") or []:
                    ips[a.split("/")[0]] = t["ID"][:12]
        return TaskView(len(running), {t["ID"][:12] for t in running}, ips)

    def leftovers(self) -> int:
        prefixes = tuple(f"{n.netns}-" for n in self.lab.nodes)
        return sum(p.name.startswith(prefixes) for p in Path("/run/netns").iterdir())

    def close(self) -> None:
        super().close()
        labmod.down(LAB)


class Docker(System):
    name = "docker"
    image = DOCKER_IMAGE
    command = DOCKER_CMD

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
        if not self.client.images.list(name=DOCKER_IMAGE.split(":", maxsplit=1)[0]):
            self._import_image()
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

    def _import_image(self) -> None:
        busybox = shutil.which("busybox") or "/bin/busybox"
        root = self.work / "rootfs"
        for d in ("bin", "www", "etc", "tmp"):
            (root / d).mkdir(parents=True)
        shutil.copy(busybox, root / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
        for applet in applets.stdout.split():
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True)
        shutil.rmtree(root)
        self.client.api.import_image_from_data(
            tar.stdout, repository=DOCKER_IMAGE.split(":", maxsplit=1)[0], tag="latest"
        )

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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DOCKER_SOCK)
        log(f"dockerd stopped; its log: {self.work / 'dockerd.log'}")


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


def _teardown(sysm: System, service: str, run: Run) -> None:
    t = time.monotonic()
    with contextlib.suppress(docker.errors.NotFound):
        sysm.client.services.get(service).remove()
    _wait(lambda: sysm.leftovers() == 0, f"{sysm.name} tasks of {service} gone", 180)
    run.teardown_s = time.monotonic() - t
    time.sleep(2)  # let the last clean-ups (mesh syncs, conntrack) settle


def _reset(sysm: System) -> None:
    for p in sysm.probers():
        p.reset()
        p.requests = p.failures = 0


def _create(sysm: System, service: str, n: int) -> None:
    sysm.client.services.create(
        sysm.image,
        command=sysm.command,
        name=service,
        mode=docker.types.ServiceMode("replicated", replicas=n),
        endpoint_spec=docker.types.EndpointSpec(ports={PUBLISHED: TARGET}),
    )


def measure_create(sysm: System, n: int, rep: int) -> Run:
    service = f"bc{rep}c{n}"
    run = Run(sysm.name, f"create {n}", rep, n)
    _reset(sysm)
    t0 = time.monotonic()
    _create(sysm, service, n)
    run.api_s = time.monotonic() - t0
    try:
        _converge(sysm, service, n, t0, run)
    finally:
        _teardown(sysm, service, run)
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


def summarize(runs: list[Run]) -> dict[str, Any]:
    cases = list(dict.fromkeys(r.case for r in runs))
    systems = list(dict.fromkeys(r.system for r in runs))
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for case in cases:
        table[case] = {}
        for s in systems:
            sel = [r for r in runs if r.case == case and r.system == s]
            row: dict[str, float | None] = {}
            for metric in ("running_s", "direct_s", "mesh_s", "teardown_s"):
                vals = [getattr(r, metric) for r in sel]
                ok = [v for v in vals if v is not None]
                row[metric] = statistics.median(ok) if ok and len(ok) == len(vals) else None
            table[case][s] = row
    print("\nmedians (seconds from the API call)")
    print(f"{'case':16} {'system':7} {'running':>8} {'direct':>8} {'mesh':>8} {'teardown':>9}")
    for case, row in table.items():
        for s, v in row.items():
            print(
                f"{case:16} {s:7} {_fmt(v['running_s']):>8} {_fmt(v['direct_s']):>8} "
                f"{_fmt(v['mesh_s']):>8} {_fmt(v['teardown_s']):>9}"
            )
    ratios: dict[str, dict[str, float | None]] = {}
    if {"shoal", "docker"} <= set(systems):
        print("\nratios shoal/docker (lower is better for Shoal)")
        for case, row in table.items():
            sh, dk = row["shoal"], row["docker"]

            def ratio(a: float | None, b: float | None) -> float | None:
                return None if a is None or b is None or b == 0 else a / b

            ratios[case] = {
                "running": ratio(sh["running_s"], dk["running_s"]),
                "direct": ratio(sh["direct_s"], dk["direct_s"]),
                "shoal mesh / docker direct": ratio(sh["mesh_s"], dk["direct_s"]),
                "mesh": ratio(sh["mesh_s"], dk["mesh_s"]),
            }
            print(f"{case:16} " + "  ".join(f"{k} {_fmt(v)}" for k, v in ratios[case].items()))
    return {"table": table, "ratios": ratios}


@contextlib.contextmanager
def _systems(with_docker: bool) -> Iterator[list[System]]:
    made: list[System] = []
    try:
        log("building the Shoal lab (3 nodes) and its swarm")
        made.append(Shoal())
        missing = [p for p in ("dockerd", "busybox") if not shutil.which(p)]
        if with_docker and missing:
            log(f"no {' or '.join(missing)} (apt-get install docker.io busybox-static): Shoal only")
        elif with_docker:
            log("starting dockerd in its own namespace and a single-node swarm")
            made.append(Docker())
        yield made
    finally:
        for s in reversed(made):
            log(f"tearing down {s.name}")
            with contextlib.suppress(Exception):
                s.close()
        if not with_docker or len(made) < 2:
            # a failed Docker start may leave its namespace and data behind
            subprocess.run(["ip", "netns", "del", DOCKER_NS], capture_output=True)


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
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    scale = [int(x) for x in args.scale.split(",") if x]
    RESULTS.mkdir(exist_ok=True)
    runs: list[Run] = []
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)}
    started = time.monotonic()
    with _systems(not args.no_docker) as systems:
        if len(systems) > 1:
            meta["docker_version"] = systems[1].version  # type: ignore[attr-defined]
            meta["docker_ipvs"] = systems[1].ipvs  # type: ignore[attr-defined]
        for rep in range(args.reps):
            # interleaved: every case on both systems before the next, alternating who starts
            order = systems if rep % 2 == 0 else list(reversed(systems))
            cases: list[Callable[[System], Run]] = [
                (lambda s, n=n, rep=rep: measure_create(s, n, rep)) for n in sizes
            ]
            if len(scale) == 2:
                cases.append(lambda s, rep=rep: measure_scale(s, scale[0], scale[1], rep))
            for case in cases:
                for s in order:
                    r = case(s)
                    runs.append(r)
                    log(
                        f"rep {rep + 1} {r.case:15} {r.system:6} api {r.api_s:5.2f}  running "
                        f"{_fmt(r.running_s):>6}  direct {_fmt(r.direct_s):>6}  mesh "
                        f"{_fmt(r.mesh_s):>6}  teardown {r.teardown_s:5.1f}  "
                        f"requests {r.requests} failed {r.failures} {' '.join(r.notes)}"
                    )
    result = summarize(runs)
    meta["wall_s"] = round(time.monotonic() - started)
    out = RESULTS / f"control-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({**meta, **result, "runs": [asdict(r) for r in runs]}, indent=1))
    print(f"\nraw results: {out}  (wall {meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
