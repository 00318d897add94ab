"""`shoal lab demo --vm`: the blog's published port, balanced by IPVS in VMs on Debian's kernel.

The routing mesh part of the blog (`docker service create -p 30000:8000 --replicas 10 micro`,
then `curl` any node) in a VM lab: the hand-made control plane (orchestrator/lab/vmmesh.py)
writes each node's mesh state, shoal-mesh starts with the default `--lb-backend auto`, which
picks IPVS on this kernel, and every node's port 30000 is curled from the lab's host. The
lab stays up; `shoal lab down` removes it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections import Counter

from orchestrator.lab import lab as labmod
from orchestrator.lab import vm
from orchestrator.lab.record import LabError
from orchestrator.lab.vmmesh import VmMeshLab

PUBLISHED = 30000


def _say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def _run(argv: list[str], shown: str) -> str:
    print(f"$ {shown}", flush=True)
    out = subprocess.run(argv, capture_output=True, text=True)
    text = (out.stdout + out.stderr).rstrip()
    if text:
        print(text, flush=True)
    if out.returncode != 0:
        raise LabError(f"`{shown}` failed")
    return text


def run(name: str = labmod.DEFAULT_LAB, replicas: int = 10, rounds: int = 2) -> int:
    shoal = [sys.executable, "-m", "orchestrator.cli.main", "lab"]
    _say("Three VMs running Debian's kernel, on 192.168.56.0/24")
    if labmod.load(name) is not None:
        _run([*shoal, "down", "--name", name], f"shoal lab down --name {name}")
    # no shoald: this demo plays the control plane itself (VmMeshLab)
    _run(
        [*shoal, "up", "--vm", "--nodes", "3", "--name", name, "--no-daemons"],
        f"shoal lab up --vm --nodes 3 --name {name} --no-daemons",
    )
    lab = labmod.load(name)
    assert lab is not None
    mesh = VmMeshLab(lab)
    mesh.add_network("ingress", 4096, "10.255.0.0/16", ingress=True)
    mesh.add_service(
        "micro", [{"protocol": "tcp", "target": 8000, "published": PUBLISHED}], ["ingress"]
    )
    for i in range(replicas):
        mesh.add_task("micro", "sw1" if i % 2 == 0 else "sw3")
    mesh.publish()
    _say(f"shoal-mesh on every VM (--lb-backend auto), micro as {replicas} tasks on sw1 and sw3")
    for node in lab.nodes:
        mesh.start_daemon(node.name)
    mesh.wait_synced(timeout=300)
    for t in mesh.tasks.values():
        mesh.start_workload(t)
    for t in mesh.tasks.values():
        mesh.wait_listening(t, timeout=180)
    exec_ = [*shoal, "exec", "--name", name]
    _run([*exec_, "sw2", "--", "ipvsadm", "-Ln"], "shoal lab exec sw2 -- ipvsadm -Ln")

    _say(f"curl every node's :{PUBLISHED} from the lab's host: any node reaches any task")
    tasks = {str(t.ips["ingress"]): t.name for t in mesh.tasks.values()}
    for node in lab.nodes:
        seen: Counter[str] = Counter()
        url = f"{node.address}:{PUBLISHED}"
        argv = labmod.exec_argv(lab, vm.HOST, ["curl", "-s", url])
        for _ in range(rounds * replicas):
            body = _run(argv, f"shoal lab exec host -- curl -s {url}")
            seen[body.split('"ip": "')[1].split('"')[0]] += 1
        print(
            f"  -> {url} answered by {len(seen)} of {replicas} tasks "
            f"({', '.join(sorted(tasks[ip] for ip in seen))})",
            flush=True,
        )
        if len(seen) != replicas:
            raise LabError(f"{node.name} did not reach every task: {dict(seen)}")
    time.sleep(2.5)  # IPVS sums its counters every 2 s
    _run(
        [*exec_, "sw2", "--", "ipvsadm", "-Ln", "--stats"],
        "shoal lab exec sw2 -- ipvsadm -Ln --stats",
    )
    _say(
        f"The lab stays up: `shoal lab exec --name {shlex.quote(name)} host -- curl "
        f"{lab.nodes[0].address}:{PUBLISHED}`; `shoal lab down --name {name}` removes it."
    )
    return 0
