"""MeshLab with encrypted networks, and MeshLab for the VM lab.

`KeyedMeshLab` adds what MeshLab's hand-made control plane lacks for encrypted overlays: the
`encrypted` flag of a network and the cluster's keyring in every node's state, rotated like
the managers will rotate it (mesh/ipsec.py `rotate`). `VmMeshLab` runs the same control plane
against a VM lab (orchestrator/lab/vm.py): the state files are written to the lab's run
directory, which the VMs mount at the same path, and every process (shoal-mesh, workloads)
runs in a VM through a local stand-in process that forwards signals, so MeshLab's process
handling (stop, signal, wait) works unchanged.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mesh.daemon import read_applied
from mesh.ipsec import rotate
from mesh.netns import run_in_netns
from mesh.state import Encryption
from orchestrator.lab import vm
from orchestrator.lab.lab import Lab, LabError, add_process
from orchestrator.lab.meshlab import MeshLab, Net, Task


class KeyedMeshLab(MeshLab):
    def __init__(
        self, lab: Lab, run_dir: Path | None = None, dns_upstreams: list[str] | None = None
    ):
        super().__init__(lab, run_dir, dns_upstreams)
        self.encrypted: set[str] = set()
        self.encryption: Encryption | None = None

    def add_encrypted_network(self, name: str, vni: int, subnet: str, ingress: bool = False) -> Net:
        net = self.add_network(name, vni, subnet, ingress)
        self.encrypted.add(name)
        if self.encryption is None:
            self.encryption = rotate(None)
        return net

    def rotate_keys(self) -> Encryption:
        """A new key (what the managers do every 12 h); publish() hands it out."""
        self.encryption = rotate(self.encryption)
        return self.encryption

    def state(self, node: str) -> dict[str, object]:
        doc = super().state(node)
        networks = doc["networks"]
        assert isinstance(networks, list)
        for net in networks:
            net["encrypted"] = net["name"] in self.encrypted
        if self.encryption is not None:
            doc["encryption"] = {
                "keys": [{"tag": k.tag, "key": k.key.hex()} for k in self.encryption.keys],
                "primary": self.encryption.primary,
            }
        return doc


class VmMeshLab(KeyedMeshLab):
    def __init__(
        self, lab: Lab, run_dir: Path | None = None, dns_upstreams: list[str] | None = None
    ):
        if lab.kind != vm.KIND:
            raise LabError(f"lab {lab.name} is not a VM lab; use MeshLab")
        run_dir = run_dir or lab.run_dir / "mesh"
        if not run_dir.resolve().is_relative_to(lab.run_dir.resolve()):
            raise LabError(
                f"{run_dir} is not under {lab.run_dir}, the directory the VMs share; "
                "leave run_dir unset"
            )
        super().__init__(lab, run_dir, dns_upstreams)

    def run(self, node: str, argv: list[str], timeout: float = 120.0) -> str:
        """A command in a node's VM; its stdout (LabError if it fails)."""
        return vm.check(self.lab, node, argv, timeout=timeout)

    def _task_netns(self, node: str, name: str) -> str:
        return f"{self.lab.name}-{node}-{name}"

    def _ip_netns(self, node: str, *args: str, check: bool = True) -> None:
        """`ip netns ARGS` in the node's VM."""
        if check:
            self.run(node, ["ip", "netns", *args])
        else:
            vm.run(self.lab, node, ["ip", "netns", *args])

    def _popen(self, node: str, argv: list[str], log: Path | None) -> subprocess.Popen[bytes]:
        cmd = vm.exec_argv(self.lab, node, argv)
        if log is None:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        else:
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        add_process(self.lab.name, node, proc.pid)
        return proc

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
        (self.run_dir / f"run-{node}" / "applied").unlink(missing_ok=True)
        self.daemons[node] = self._popen(node, argv, self.run_dir / f"mesh-{node}.log")

    def metrics(self, node: str) -> str:
        url = f"http://{self.lab.node(node).address}:9323/metrics"

        def get() -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                body: bytes = r.read()
            return body.decode()

        return run_in_netns(vm.lab_netns(self.lab.name), get)

    def wait_synced(
        self, generation: int | None = None, timeout: float = 60.0, nodes: list[str] | None = None
    ) -> None:
        """As MeshLab's, but from the `applied` file each daemon writes to its run directory,
        which the host reads without disturbing the VMs: a /metrics scrape costs an emulated
        VM a noticeable share of its CPU."""
        want = self.generation if generation is None else generation
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
                if read_applied(self.run_dir / f"run-{node}")[0] >= want:
                    pending.discard(node)
            if pending and time.monotonic() > deadline:
                raise LabError(
                    f"nodes {sorted(pending)} did not apply generation {want} in {timeout:.0f} s"
                )
            time.sleep(0.1)

    def start_workload(self, task: Task, argv: list[str] | None = None) -> None:
        argv = argv or [sys.executable, "-m", "orchestrator.apps.micro", "--udp"]
        proc = self._popen(task.node, ["ip", "netns", "exec", task.netns, *argv], None)
        task.pids.append(proc.pid)

    def wait_listening(self, task: Task, port: int = 8000, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        argv = ["ip", "netns", "exec", task.netns, "ss", "-Hltn", f"sport = :{port}"]
        while time.monotonic() < deadline:
            if vm.run(self.lab, task.node, argv).stdout.strip():
                return
            time.sleep(0.3)
        raise LabError(f"{task.name} is not listening on {port}")

    def close(self) -> None:
        for node_name in list(self.daemons):
            self.stop_daemon(node_name)
        for name in list(self.tasks):
            self.remove_task(name)
        for node in self.lab.nodes:
            vm.run(
                self.lab,
                node.name,
                [
                    sys.executable,
                    "-m",
                    "mesh.cli",
                    "cleanup",
                    "--run-dir",
                    str(self.run_dir / f"run-{node.name}"),
                ],
            )
