"""`shoal lab demo`: Docker 1.12's swarm-mode blog post, replayed on Shoal in a 3-node lab.

Each step prints the command as a user would type it on a node, then its real output:
init a swarm on sw1, join sw2 and sw3 with the token, list the nodes, run `helloworld`
(alpine pinging a lab address: there is no internet here), scale it to 10, inspect a task,
publish `gianarb/micro` on the routing mesh, then curl every node's port 30000 until every one
of the 10 tasks has answered through each node. Tasks are containers of real images, which
every node's engine pulls from the lab's registry (its Docker Hub mirror). The lab stays up
afterwards, to play with.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import docker

from orchestrator.lab import daemons, engines, registry
from orchestrator.lab import lab as labmod
from orchestrator.lab.record import Lab, LabError
from orchestrator.node import DEFAULT_PORT

REPLICAS = 10
PUBLISHED = 30000
IMAGE = "gianarb/micro"  # the blog's; the lab registry has it (built here from busybox)


def _say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def _shoal(lab: Lab, node: str, *args: str, show: bool = True, check: bool = True) -> str:
    """Run `shoal ARGS` inside a node, against its shoald, printing it like a terminal."""
    if show:
        print(f"[{node}] $ shoal {shlex.join(args)}", flush=True)
    env = dict(
        os.environ,
        DOCKER_HOST=daemons.docker_host(lab, node),
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    out = subprocess.run(
        labmod.exec_argv(lab, node, [sys.executable, "-m", "orchestrator.cli.main", *args]),
        capture_output=True,
        text=True,
        env=env,
    )
    text = out.stdout.rstrip()
    if show and text:
        print(text, flush=True)
    if out.returncode != 0 and check:
        raise LabError(f"`shoal {shlex.join(args)}` on {node} failed: {out.stderr.strip()}")
    return text


def run(
    name: str = labmod.DEFAULT_LAB, subnet: ipaddress.IPv4Network = labmod.DEFAULT_SUBNET
) -> int:
    _say("Three hosts, sw1..sw3, on the 192.168.56.0/24 host-only network; shoald on each")
    print("$ shoal lab up --nodes 3")
    if labmod.load(name) is not None:
        labmod.down(name)
    lab = labmod.up(name, 3, subnet)
    daemons.start_all(lab)
    for n in lab.nodes:
        print(f"  {n.name:6} {n.address}   its engine: {engines.socket_url(lab, n.name)}")
    print(f"  registry {registry.address(lab)} (the nodes' Docker Hub mirror)")
    sw1 = lab.node("sw1")

    _say("Create the swarm on sw1, the first manager")
    _shoal(lab, "sw1", "swarm", "init", "--listen-addr", f"{sw1.address}:{DEFAULT_PORT}")
    token = _shoal(lab, "sw1", "swarm", "join-token", "-q", "worker")

    _say("Join sw2 and sw3 as workers, with the worker token")
    for worker in ("sw2", "sw3"):
        _shoal(lab, worker, "swarm", "join", "--token", token, f"{sw1.address}:{DEFAULT_PORT}")
    _wait(
        lambda: (
            _shoal(lab, "sw1", "node", "ls", "--format", "STATUS", show=False).count("Ready") == 3
        ),
        "the nodes to be ready",
    )
    _shoal(lab, "sw1", "node", "ls")

    _say("A first service: one task pinging a lab address (the blog pinged docker.com)")
    _shoal(
        lab,
        "sw1",
        "service",
        "create",
        "--name",
        "helloworld",
        "--replicas",
        "1",
        "alpine",
        "ping",
        lab.gateway,
    )
    _shoal(lab, "sw1", "service", "ls")
    print("[sw1] $ shoal service inspect helloworld   (excerpt)")
    spec = json.loads(_shoal(lab, "sw1", "service", "inspect", "helloworld", show=False))[0]
    print(
        json.dumps(
            {
                "ID": spec["ID"],
                "Spec": {
                    "Name": spec["Spec"]["Name"],
                    "Mode": spec["Spec"]["Mode"],
                    "TaskTemplate": spec["Spec"]["TaskTemplate"],
                },
            },
            indent=4,
        )
    )
    _shoal(lab, "sw1", "service", "ps", "helloworld")

    _say("Scale it to 10 tasks: they spread over the three nodes")
    _shoal(lab, "sw1", "service", "scale", "helloworld=10")
    _shoal(lab, "sw1", "service", "ps", "helloworld")
    task = _shoal(lab, "sw1", "service", "ps", "-q", "helloworld", show=False).split()[0]
    _say("A task, in detail")
    _shoal(lab, "sw1", "inspect", task)

    _say("gianarb/micro answers with its IP and hostname; publish it on the routing mesh")
    _shoal(
        lab,
        "sw1",
        "service",
        "create",
        "--name",
        "micro",
        "--replicas",
        str(REPLICAS),
        "--publish",
        "8000/tcp",
        IMAGE,
    )
    svc = json.loads(_shoal(lab, "sw1", "service", "inspect", "micro", show=False))[0]
    print("[sw1] $ shoal service inspect micro   (the endpoint)")
    print(json.dumps(svc["Endpoint"], indent=4))
    port = svc["Endpoint"]["Ports"][0]["PublishedPort"]
    vip = svc["Endpoint"]["VirtualIPs"][0]["Addr"]
    if port != PUBLISHED or ipaddress.IPv4Interface(vip).network != ipaddress.IPv4Network(
        "10.255.0.0/16"
    ):
        raise LabError(f"unexpected endpoint: port {port}, VIP {vip}")
    _shoal(lab, "sw1", "service", "ps", "micro")
    _say("Every node's engine pulled the image from the lab's registry")
    for node in lab.nodes:
        print(f"[{node.name}] $ docker images {IMAGE}")
        print(_images(lab, node.name))

    _say(f"Any node's port {PUBLISHED} reaches any task, round-robin")
    for node in lab.nodes:
        seen: Counter[str] = Counter()
        print(f"$ for i in $(seq {2 * REPLICAS}); do curl -s {node.address}:{PUBLISHED}; done")
        for _ in range(2 * REPLICAS):
            body = _curl(node.address)
            seen[body] += 1
            print(f"  {body}")
        hosts = {json.loads(b)["hostname"] for b in seen}
        print(f"  -> {node.name} ({node.address}) answered by {len(hosts)} of {REPLICAS} tasks")
        if len(hosts) != REPLICAS:
            raise LabError(f"{node.name} did not reach every task: {sorted(hosts)}")
    _say(
        "The lab stays up. Point docker or shoal at a node with `eval $(shoal lab env sw1)`; "
        "`shoal lab down` removes everything."
    )
    return 0


def _images(lab: Lab, node: str) -> str:
    """`docker images IMAGE` against the node's own engine."""
    client = docker.APIClient(base_url=engines.socket_url(lab, node), version="1.41")
    try:
        found = client.images(name=IMAGE)
    finally:
        client.close()
    if not found:
        raise LabError(f"{node}'s engine has no {IMAGE}")
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "SIZE")]
    for image in found:
        for tag in image.get("RepoTags") or [f"{IMAGE}:<none>"]:
            repo, _, version = tag.rpartition(":")
            size = f"{image['Size'] / 1e6:.1f}MB"
            rows.append((repo, version, image["Id"].split(":")[1][:12], size))
    widths = [max(len(r[i]) for r in rows) + 3 for i in range(3)]
    return "\n".join(
        "".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + r[3] for r in rows
    )


def _curl(address: str) -> str:
    out = subprocess.run(
        ["curl", "-s", "-m", "3", f"http://{address}:{PUBLISHED}/"], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise LabError(f"curl {address}:{PUBLISHED} failed ({out.returncode})")
    return out.stdout.strip()


def _wait(ok: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise LabError(f"timed out waiting for {what}")
        time.sleep(0.3)
