"""Drive shoal-mesh daemons in a lab from hand-made desired state, without a control plane.

Used by the mesh's lab tests and benchmarks: it plays the orchestrator's part (allocating
addresses, writing each node's state file, docs/mesh-state.md) so the data plane can be
exercised alone, in any lab: the lab's backend (orchestrator/lab/backend.py) runs shoal-mesh
in a node as `shoal lab exec` would, and makes the tasks' namespaces and starts their
workloads where shoald would. In a namespace lab they are the host's, named `<node
namespace>-<task>`, so `shoal lab down` removes them too; in a VM lab they are in the VM, and
the state files and run directories must be in the lab's run directory, which the VMs share.
orchestrator/lab/vmmesh.py adds encrypted networks, and waits sized for emulated VMs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mesh.netns import run_in_netns
from mesh.state import applied_path, read_applied
from orchestrator.lab.lab import backend
from orchestrator.lab.record import Lab, LabError, add_process


@dataclass
class Net:
    name: str
    vni: int
    subnet: ipaddress.IPv4Network
    ingress: bool
    gateways: dict[str, ipaddress.IPv4Address]
    next_host: int


@dataclass
class Task:
    name: str
    service: str
    node: str
    netns: str
    ips: dict[str, ipaddress.IPv4Address]  # network -> address
    pids: list[int] = field(default_factory=list)
    serving: bool = True  # False: ending, still attached but out of its service
    attached: bool = True  # False: gone from the state (its namespace and processes kept)


@dataclass
class Svc:
    name: str
    ports: list[dict[str, object]]
    vips: dict[str, ipaddress.IPv4Address]
    endpoint_mode: str = "vip"
    networks: list[str] = field(default_factory=list)


class MeshLab:
    # default waits, in seconds: for every daemon to apply a state, for a workload to listen;
    # and between two looks at a workload
    sync_timeout = 30.0
    listen_timeout = 10.0
    poll = 0.05

    def __init__(
        self, lab: Lab, run_dir: Path | None = None, dns_upstreams: list[str] | None = None
    ):
        self.lab = lab
        self.backend = backend(lab)
        self.run_dir = run_dir or lab.run_dir / "mesh"
        if not self.backend.shares(lab, self.run_dir):
            raise LabError(
                f"{self.run_dir} is not under {lab.run_dir}, the directory the nodes share; "
                "leave run_dir unset"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.nets: dict[str, Net] = {}
        self.tasks: dict[str, Task] = {}
        self.services: dict[str, Svc] = {}
        self.generation = 0
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.daemon_args: dict[str, tuple[str, ...]] = {}  # what each was started with
        self.dns_upstreams = dns_upstreams

    # ---- model ------------------------------------------------------------------------------

    def add_network(self, name: str, vni: int, subnet: str, ingress: bool = False) -> Net:
        net_addr = ipaddress.IPv4Network(subnet)
        hosts = net_addr.network_address
        gateways = {n.name: hosts + 2 + i for i, n in enumerate(self.lab.nodes)}
        net = Net(name, vni, net_addr, ingress, gateways, 2 + len(self.lab.nodes) + 8)
        self.nets[name] = net
        return net

    def _alloc(self, net: Net) -> ipaddress.IPv4Address:
        ip = net.subnet.network_address + net.next_host
        net.next_host += 1
        if ip not in net.subnet or ip == net.subnet.broadcast_address:
            raise LabError(f"network {net.name} is full")
        return ip

    def add_service(
        self,
        name: str,
        ports: list[dict[str, object]],
        networks: list[str],
        endpoint_mode: str = "vip",
    ) -> Svc:
        vips = {} if endpoint_mode == "dnsrr" else {n: self._alloc(self.nets[n]) for n in networks}
        svc = Svc(name, ports, vips, endpoint_mode, networks)
        self.services[name] = svc
        return svc

    def add_task(self, service: str, node: str, slot: int | None = None) -> Task:
        svc = self.services[service]
        slot = slot or 1 + sum(1 for t in self.tasks.values() if t.service == service)
        name = f"{service}.{slot}"
        netns = self._task_netns(node, name)
        self._ip_netns(node, "add", netns)
        task = Task(
            name, service, node, netns, {n: self._alloc(self.nets[n]) for n in svc.networks}
        )
        self.tasks[name] = task
        return task

    def remove_task(self, name: str) -> None:
        task = self.tasks.pop(name)
        self.stop_workload(task)
        self.backend.run(self.lab, task.node, ["ip", "netns", "del", task.netns])

    def _task_netns(self, node: str, name: str) -> str:
        return f"{self.backend.netns_prefix(self.lab, node)}-{name}"

    def _ip_netns(self, node: str, *args: str) -> None:
        """`ip netns ARGS` where the node's task namespaces are."""
        self.backend.check(self.lab, node, ["ip", "netns", *args])

    def run(self, node: str, argv: list[str], timeout: float = 120.0) -> str:
        """A command in a node; its stdout (LabError if it fails)."""
        return self.backend.check(self.lab, node, argv, timeout=timeout)

    def task_argv(self, task: Task, argv: list[str]) -> list[str]:
        """A command line of this machine that runs argv in the task's namespace."""
        return self.backend.daemon_argv(
            self.lab, task.node, ["ip", "netns", "exec", task.netns, *argv]
        )

    @property
    def outside(self) -> str | None:
        """The network namespace of the lab's outside (None: this machine's)."""
        return self.backend.outside(self.lab)

    def state(self, node: str) -> dict[str, object]:
        return {
            "version": 1,
            "node": node,
            "generation": self.generation,
            "peers": {n.name: n.address for n in self.lab.nodes},
            "networks": [
                {
                    "name": n.name,
                    "vni": n.vni,
                    "subnet": str(n.subnet),
                    "ingress": n.ingress,
                    "gateways": {k: str(v) for k, v in n.gateways.items()},
                }
                for n in self.nets.values()
            ],
            "endpoints": [
                {
                    "task": t.name,
                    "network": net,
                    "node": t.node,
                    "ip": str(ip),
                    **({"netns": t.netns} if t.node == node else {}),
                }
                for t in self.tasks.values()
                if t.attached
                for net, ip in t.ips.items()
            ],
            "services": [
                {
                    "name": s.name,
                    "endpoint_mode": s.endpoint_mode,
                    "vips": {k: str(v) for k, v in s.vips.items()},
                    "ports": s.ports,
                    "tasks": [
                        t.name
                        for t in self.tasks.values()
                        if t.service == s.name and t.serving and t.attached
                    ],
                }
                for s in self.services.values()
            ],
            **({"dns_upstreams": self.dns_upstreams} if self.dns_upstreams else {}),
        }

    def state_path(self, node: str) -> Path:
        return self.run_dir / f"{node}.json"

    def publish(self, nodes: list[str] | None = None) -> int:
        """Write every node's state (atomically); returns the new generation."""
        self.generation += 1
        for n in nodes or [n.name for n in self.lab.nodes]:
            path = self.state_path(n)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state(n), indent=1))
            tmp.replace(path)
        return self.generation

    # ---- processes --------------------------------------------------------------------------

    def start_daemon(self, node: str, *extra: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "mesh.cli",
            "run",
            "--state",
            str(self.state_path(node)),
            "--run-dir",
            str(self.run_dir / f"run-{node}"),
            *extra,
        ]
        # what a previous daemon applied is not what this one has
        applied_path(self.run_dir / f"run-{node}").unlink(missing_ok=True)
        with open(self.run_dir / f"mesh-{node}.log", "ab") as log:
            self.daemons[node] = subprocess.Popen(
                self.backend.exec_argv(self.lab, node, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.daemon_args[node] = extra
        add_process(self.lab.name, node, self.daemons[node].pid)

    def stop_daemon(self, node: str, sig: int = signal.SIGTERM) -> None:
        proc = self.daemons.pop(node, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart_daemon(self, node: str) -> None:
        """Stop the node's daemon and start another with the same options."""
        self.stop_daemon(node)
        self.start_daemon(node, *self.daemon_args.get(node, ()))

    def signal_daemon(self, node: str, sig: int) -> None:
        self.daemons[node].send_signal(sig)

    def metrics(self, node: str) -> str:
        """The node's daemon's /metrics, scraped from the lab's outside."""
        url = f"http://{self.lab.node(node).address}:9323/metrics"

        def get() -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                body: bytes = r.read()
            return body.decode()

        return run_in_netns(self.outside, get)

    def wait_synced(
        self,
        generation: int | None = None,
        timeout: float | None = None,
        nodes: list[str] | None = None,
    ) -> None:
        """Until every daemon (or those of `nodes`) has applied the generation (default: the
        last published), as the `applied` file each writes to its run directory says: read
        here, it costs the nodes nothing (a /metrics scrape costs an emulated VM a noticeable
        share of its CPU)."""
        want = self.generation if generation is None else generation
        timeout = self.sync_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = set(nodes or self.daemons)
        while pending:
            for node in sorted(pending):
                proc = self.daemons.get(node)
                if proc is not None and proc.poll() is not None:
                    raise LabError(
                        f"shoal-mesh on {node} exited with {proc.returncode}; see "
                        f"{self.run_dir / f'mesh-{node}.log'}"
                    )
                if read_applied(self.run_dir / f"run-{node}").generation >= want:
                    pending.discard(node)
            if pending and time.monotonic() > deadline:
                raise LabError(
                    f"nodes {sorted(pending)} did not apply generation {want} in {timeout:.0f} s"
                )
            time.sleep(0.05)

    def start_workload(self, task: Task, argv: list[str] | None = None) -> None:
        argv = argv or [sys.executable, "-m", "orchestrator.apps.micro", "--udp"]
        proc = subprocess.Popen(
            self.task_argv(task, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        task.pids.append(proc.pid)
        add_process(self.lab.name, task.node, proc.pid)

    def wait_listening(self, task: Task, port: int = 8000, timeout: float | None = None) -> None:
        timeout = self.listen_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        argv = ["ip", "netns", "exec", task.netns, "ss", "-Hltn", f"sport = :{port}"]
        while time.monotonic() < deadline:
            if self.backend.run(self.lab, task.node, argv).stdout.strip():
                return
            time.sleep(self.poll)
        raise LabError(f"{task.name} is not listening on {port}")

    def stop_workload(self, task: Task) -> None:
        for pid in task.pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        task.pids.clear()

    def close(self) -> None:
        """Stop everything, clean every node, delete the task namespaces."""
        for node_name in list(self.daemons):
            self.stop_daemon(node_name)
        for name in list(self.tasks):
            self.remove_task(name)
        for node in self.lab.nodes:
            cleanup = [sys.executable, "-m", "mesh.cli", "cleanup"]
            cleanup += ["--run-dir", str(self.run_dir / f"run-{node.name}")]
            self.backend.run(self.lab, node.name, cleanup)
