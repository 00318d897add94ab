"""`shoal lab demo`: the routing mesh, shown step by step in a 3-node lab.

It plays the control plane's part by hand (the orchestrator arrives with issue #3): it writes
each node's desired mesh state, starts shoal-mesh on every node and the demo app `micro` as 10
tasks on sw1 and sw3, then curls every node's published port to show the answering task rotate.
The lab stays up afterwards, to play with; `shoal lab down` removes it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections import Counter

from mesh.netns import run_in_netns
from orchestrator.apps import micro
from orchestrator.lab import lab as labmod
from orchestrator.lab.meshlab import MeshLab

PUBLISHED = 30000


def _say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def _run(argv: list[str], shown: str | None = None) -> str:
    print(f"$ {shown or shlex.join(argv)}", flush=True)
    out = subprocess.run(argv, capture_output=True, text=True)
    text = (out.stdout + out.stderr).rstrip()
    if text:
        print(text, flush=True)
    if out.returncode != 0:
        raise labmod.LabError(f"`{shown or shlex.join(argv)}` failed")
    return text


def run(name: str = labmod.DEFAULT_LAB, replicas: int = 10, rounds: int = 2) -> int:
    shoal = [sys.executable, "-m", "orchestrator.cli.main"]
    _say("A lab of three nodes: network namespaces sw1..sw3 on 192.168.56.0/24")
    if labmod.load(name) is not None:
        _run([*shoal, "lab", "down", "--name", name], f"shoal lab down --name {name}")
    _run([*shoal, "lab", "up", "--nodes", "3", "--name", name], "shoal lab up --nodes 3")
    lab = labmod.load(name)
    assert lab is not None
    mesh = MeshLab(lab)
    mesh.add_network("ingress", 4096, "10.255.0.0/16", ingress=True)
    mesh.add_service(
        "micro",
        [{"protocol": "tcp", "target": 8000, "published": PUBLISHED, "name": "http"}],
        ["ingress"],
    )
    for i in range(replicas):
        mesh.add_task("micro", "sw1" if i % 2 == 0 else "sw3")
    mesh.publish()

    _say("Each node's desired mesh state (what the orchestrator will write); sw2's:")
    _run(["sed", "-n", "1,20p", str(mesh.state_path("sw2"))], f"head -20 {mesh.state_path('sw2')}")
    _say("Start the mesh daemon on every node, and micro as 10 tasks on sw1 and sw3")
    for name_ in ("sw1", "sw2", "sw3"):
        print(f"$ shoal lab exec {name_} -- shoal-mesh run --state {mesh.state_path(name_)} &")
        mesh.start_daemon(name_)
    mesh.wait_synced()
    for t in mesh.tasks.values():
        mesh.start_workload(t)
    for t in mesh.tasks.values():
        mesh.wait_listening(t)

    _say("What shoal-mesh made on sw2 (no task runs there): the overlay and the published port")
    _run(
        ["ip", "netns", "exec", lab.node("sw2").netns, "ip", "-br", "link"],
        "shoal lab exec sw2 -- ip -br link",
    )
    _run(
        [
            "ip",
            "netns",
            "exec",
            lab.node("sw2").netns,
            "nft",
            "list",
            "chain",
            "ip",
            "shoal",
            "prerouting",
        ],
        "shoal lab exec sw2 -- nft list chain ip shoal prerouting",
    )

    _say(f"curl every node's :{PUBLISHED}: any node reaches any task, round-robin")
    tasks = {str(t.ips["ingress"]): t.name for t in mesh.tasks.values()}
    for node in lab.nodes:
        seen: Counter[str] = Counter()
        for _ in range(rounds * replicas):
            body = _run(["curl", "-s", f"{node.address}:{PUBLISHED}"])
            seen[body.split('"ip": "')[1].split('"')[0]] += 1
        print(
            f"  -> {node.address} answered by {len(seen)} of {replicas} tasks "
            f"({', '.join(sorted(tasks[ip] for ip in seen))})",
            flush=True,
        )
        if len(seen) != replicas:
            raise labmod.LabError(f"{node.name} did not reach every task: {dict(seen)}")

    _say("Inside a task: the service's VIP and DNS name (embedded DNS at 127.0.0.11)")
    first = next(iter(mesh.tasks.values()))
    shown = f"shoal lab exec sw1 -- ip netns exec {first.netns}"
    _run(
        ["ip", "netns", "exec", first.netns, "dig", "+short", "@127.0.0.11", "micro"],
        f"{shown} dig +short micro",
    )
    _run(
        ["ip", "netns", "exec", first.netns, "dig", "+short", "@127.0.0.11", "tasks.micro"],
        f"{shown} dig +short tasks.micro",
    )
    vip = str(mesh.services["micro"].vips["ingress"])
    answers = run_in_netns(first.netns, lambda: [micro.query(vip) for _ in range(replicas)])
    print(f"$ {shown} curl {vip}:8000   (x{replicas})\n  -> {len(set(answers))} tasks answered")

    _say("Prometheus metrics of each node (connections per backend, sync times, DNS)")
    metrics = mesh.metrics("sw2").splitlines()
    print("$ curl -s 192.168.56.12:9323/metrics | grep backend_connections_total | head -3")
    print("\n".join([m for m in metrics if m.startswith("shoal_mesh_backend_connections")][:3]))
    _say(f"The lab stays up: try `curl 192.168.56.11:{PUBLISHED}`; `shoal lab down` removes it.")
    return 0
