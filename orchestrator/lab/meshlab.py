"""Drive shoal-mesh daemons in a lab from hand-made desired state, without a control plane.

Used by the mesh's lab tests and benchmarks: it plays the orchestrator's part (allocating
addresses, writing each node's state file) so the data plane can be exercised alone.
Task namespaces are named `<node namespace>-<task>`, so `shoal lab down` removes them too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.lab.lab import Lab, LabError, add_process

_METRIC = re.compile(r"^(shoal_mesh_state_generation|shoal_mesh_sync_errors_total) (\S+)$", re.M)


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
    serving: bool = True  # False: drained, still attached but out of its service


@dataclass
class Svc:
    name: str
    ports: list[dict[str, object]]
    vips: dict[str, ipaddress.IPv4Address]
    endpoint_mode: str = "vip"
    networks: list[str] = field(default_factory=list)


class MeshLab:
    def __init__(
        self, lab: Lab, run_dir: Path | None = None, dns_upstreams: list[str] | None = None
    ):
        self.lab = lab
        self.run_dir = run_dir or lab.run_dir / "mesh"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.nets: dict[str, Net] = {}
        self.tasks: dict[str, Task] = {}
        self.services: dict[str, Svc] = {}
        self.generation = 0
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
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
        self._ip_netns(task.node, "del", task.netns, check=False)

    def _task_netns(self, node: str, name: str) -> str:
        return f"{self.lab.node(node).netns}-{name}"

    def _ip_netns(self, node: str, *args: str, check: bool = True) -> None:
        """`ip netns ARGS` where the node's task namespaces live: here, the host."""
        subprocess.run(["ip", "netns", *args], check=check, capture_output=True)

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
                for net, ip in t.ips.items()
            ],
            "services": [
                {
                    "name": s.name,
                    "endpoint_mode": s.endpoint_mode,
                    "vips": {k: str(v) for k, v in s.vips.items()},
                    "ports": s.ports,
                    "tasks": [
                        t.name for t in self.tasks.values() if t.service == s.name and t.serving
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
        cmd = [
            "ip",
            "netns",
            "exec",
            self.lab.node(node).netns,
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
        with open(self.run_dir / f"mesh-{node}.log", "ab") as log:
            self.daemons[node] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
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

    def signal_daemon(self, node: str, sig: int) -> None:
        self.daemons[node].send_signal(sig)

    def metrics(self, node: str) -> str:
        url = f"http://{self.lab.node(node).address}:9323/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            body: bytes = r.read()
        return body.decode()

    def wait_synced(
        self, generation: int | None = None, timeout: float = 30.0, nodes: list[str] | None = None
    ) -> None:
        """Until every daemon reports the generation applied."""
        want = self.generation if generation is None else generation
        deadline = time.monotonic() + timeout
        pending = set(nodes or self.daemons)
        last = ""
        while pending and time.monotonic() < deadline:
            for node in sorted(pending):
                proc = self.daemons.get(node)
                if proc is not None and proc.poll() is not None:
                    raise LabError(
                        f"shoal-mesh on {node} exited with {proc.returncode}; see "
                        f"{self.run_dir / f'mesh-{node}.log'}"
                    )
                try:
                    found = dict(_METRIC.findall(self.metrics(node)))
                except OSError as e:
                    last = str(e)
                    continue
                if float(found.get("shoal_mesh_state_generation", -1)) >= want:
                    pending.discard(node)
            if pending:
                time.sleep(0.05)
        if pending:
            raise LabError(
                f"nodes {sorted(pending)} did not apply generation {want} in {timeout:.0f} s {last}"
            )

    def start_workload(self, task: Task, argv: list[str] | None = None) -> None:
        argv = argv or [sys.executable, "-m", "orchestrator.apps.micro", "--udp"]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", task.netns, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        task.pids.append(proc.pid)
        add_process(self.lab.name, task.node, proc.pid)

    def wait_listening(self, task: Task, port: int = 8000, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["ip", "netns", "exec", task.netns, "ss", "-Hltn", f"sport = :{port}"],
                capture_output=True,
                text=True,
            ).stdout
            if out.strip():
                return
            time.sleep(0.05)
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
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    node.netns,
                    sys.executable,
                    "-m",
                    "mesh.cli",
                    "cleanup",
                    "--run-dir",
                    str(self.run_dir / f"run-{node.name}"),
                ],
                capture_output=True,
            )
