"""Traffic through a service while its tasks are replaced: what proves that an update, a
scale-down, a node drain or a rollback drops no request (docs/updates.md).

`Traffic` runs four client loops (orchestrator/lab/loadgen.py) at a steady rate against one
service, for as long as an operation takes: through a published port from outside the cluster
(the host, to a node's address) and through the service's VIP from another service's task (in
that task's network namespace), each with a new connection per request and with one keep-alive
connection. tests/test_lifecycle_lab.py asserts that none of them fails; bench/lifecycle.py
records the failures and the time each operation takes.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import docker

from orchestrator.lab import daemons, engines
from orchestrator.lab.lab import exec_argv, load
from orchestrator.lab.loadgen import Loop, Result
from orchestrator.lab.record import Lab

# Debian's docker.io CLI, as the engines are (`make test` installs it)
DOCKER = "/usr/bin/docker"
WEB = "web"
CLIENT = "client"
NETWORK = "life"
WEB_PORT = 8000
# Docker's own advice for updates without errors: a health check, so a task takes traffic only
# once it answers. Every second: each probe is an exec in the container, which costs the engine
# tens of milliseconds of CPU, and twenty tasks probed five times a second starve the clients.
HEALTH = (
    "--health-cmd", f"wget -qO /dev/null http://127.0.0.1:{WEB_PORT}/",
    "--health-interval", "1s", "--health-timeout", "2s", "--health-retries", "3",
)  # fmt: skip


# micro, serving a static page naming the task (busybox httpd forks per connection, and a
# static page keeps up with four loops of 100 requests/s on two CPUs, micro's CGI does not),
# and draining as a well-behaved server does: on SIGTERM it stops listening and exits once
# the requests in flight are answered.
WEB_COMMAND = (
    f"hostname > /tmp/index.html && httpd -f -p 0.0.0.0:{WEB_PORT} -h /tmp & pid=$!; "
    "trap 'kill $pid; while pidof httpd >/dev/null; do sleep 0.05; done; exit 0' TERM; wait"
)


class LifecycleError(AssertionError):
    """A command or a wait of the scenario failed; the message says which and what it printed."""


def in_node(
    lab: Lab, node: str, argv: list[str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """A command inside a node, talking to its shoald (DOCKER_HOST)."""
    env = dict(os.environ, DOCKER_HOST=daemons.docker_host(lab, node))
    out = subprocess.run(
        exec_argv(lab, node, argv), capture_output=True, text=True, env=env, timeout=600
    )
    if check and out.returncode != 0:
        raise LifecycleError(f"{' '.join(argv)} in {node}: {out.stdout}{out.stderr}")
    return out


def docker_cli(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The docker CLI inside sw1 (a manager), talking to its shoald."""
    return in_node(lab, "sw1", [DOCKER, *args], check=check)


def swarm(lab: Lab) -> Lab:
    """shoald on every node, sw1 the manager, the others workers; the lab's fresh record."""
    daemons.start_all(lab)
    shoal = [sys.executable, "-m", "orchestrator.cli.main"]
    listen = f"{lab.node('sw1').address}:2377"
    in_node(lab, "sw1", [*shoal, "swarm", "init", "--listen-addr", listen,
                         "--dispatcher-heartbeat", "1"])  # fmt: skip
    token = in_node(lab, "sw1", [*shoal, "swarm", "join-token", "-q", "worker"]).stdout.strip()
    for node in lab.nodes[1:]:
        in_node(lab, node.name, [*shoal, "swarm", "join", "--token", token, listen])
    record = load(lab.name)
    if record is None:
        raise LifecycleError(f"lab {lab.name} is gone")
    cluster = Cluster(record)
    try:
        wait_for(lambda: len(cluster.sdk.nodes.list()) == len(lab.nodes), "every node to join")
        wait_for(
            lambda: all(n.attrs["Status"]["State"] == "ready" for n in cluster.sdk.nodes.list()),
            "every node to be ready",
        )
    finally:
        cluster.close()
    return record


def wait_for(cond: Callable[[], bool], what: str, within: float = 120.0) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise LifecycleError(f"timed out after {within:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


@dataclass
class Cluster:
    """The lab's swarm, seen through the docker SDK on sw1."""

    lab: Lab
    sdk: Any = field(init=False)

    def __post_init__(self) -> None:
        self.sdk = docker.DockerClient(base_url=daemons.docker_host(self.lab, "sw1"))

    def close(self) -> None:
        self.sdk.close()

    def tasks(self, service: str) -> list[dict[str, Any]]:
        return list(self.sdk.services.get(service).tasks())

    def serving(self, service: str) -> list[dict[str, Any]]:
        return [
            t
            for t in self.tasks(service)
            if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
        ]

    def settled(self, service: str, replicas: int) -> bool:
        """`replicas` tasks run and are meant to, and every other task has ended."""
        tasks = self.tasks(service)
        up = [t for t in tasks if t["DesiredState"] == "running"]
        return (
            len(up) == replicas
            and all(t["Status"]["State"] == "running" for t in up)
            and all(
                t["Status"]["State"] in ("complete", "failed", "shutdown", "rejected", "orphaned")
                for t in tasks
                if t["DesiredState"] != "running"
            )
        )

    def vip(self, service: str, network: str) -> str:
        net_id = self.sdk.networks.get(network).id
        for v in self.sdk.services.get(service).attrs["Endpoint"].get("VirtualIPs", []):
            if v["NetworkID"] == net_id:
                return str(ipaddress.IPv4Interface(v["Addr"]).ip)
        raise LifecycleError(f"{service} has no VIP on {network}")

    def task_netns(self, service: str) -> str:
        """The network namespace of one running task of the service (its container's)."""
        for t in self.serving(service):
            node = self.sdk.nodes.get(t["NodeID"]).attrs["Description"]["Hostname"]
            api = docker.APIClient(base_url=engines.socket_url(self.lab, node))
            try:
                found = api.containers(filters={"label": f"com.docker.swarm.task.id={t['ID']}"})
                if found:
                    pid = api.inspect_container(found[0]["Id"])["State"]["Pid"]
                    return f"/proc/{pid}/ns/net"
            finally:
                api.close()
        raise LifecycleError(f"no running container of {service}")


def deploy(cluster: Cluster, replicas: int, published: int) -> None:
    """The overlay network, the client service and `web` (micro, with a health check)."""
    lab = cluster.lab
    docker_cli(lab, "network", "create", "-d", "overlay", NETWORK)
    docker_cli(lab, "service", "create", "--name", CLIENT, "--network", NETWORK,
               "busybox", "sleep", "100000")  # fmt: skip
    docker_cli(lab, "service", "create", "--name", WEB, "--replicas", str(replicas),
               "--network", NETWORK, "--publish", f"{published}:{WEB_PORT}", *HEALTH,
               "--update-monitor", "1s", "--rollback-monitor", "1s",
               "micro", "sh", "-c", WEB_COMMAND)  # fmt: skip
    wait_for(lambda: cluster.settled(WEB, replicas), f"{replicas} tasks of {WEB}")


def remove(cluster: Cluster) -> None:
    for service in (WEB, CLIENT):
        docker_cli(cluster.lab, "service", "rm", service, check=False)
    wait_for(
        lambda: not any(c for n in cluster.lab.nodes for c in _containers(cluster.lab, n.name)),
        "every task's container to be gone",
    )
    docker_cli(cluster.lab, "network", "rm", NETWORK, check=False)


def _containers(lab: Lab, node: str) -> list[dict[str, Any]]:
    api = docker.APIClient(base_url=engines.socket_url(lab, node))
    try:
        found: list[dict[str, Any]] = api.containers(
            filters={"label": f"com.docker.swarm.service.name={WEB}"}
        )
        return found
    finally:
        api.close()


@dataclass
class Outcome:
    seconds: float  # the operation, from its command to every old task ended
    results: dict[str, Result]

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.results.values())

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.results.values())

    def __str__(self) -> str:
        return f"{self.seconds:.1f} s; " + "; ".join(
            f"{name}: {r}" for name, r in self.results.items()
        )


class Traffic:
    """The four loops, started and stopped around an operation."""

    def __init__(self, cluster: Cluster, node_address: str, published: int, rate: float):
        client_ns = cluster.task_netns(CLIENT)
        vip = cluster.vip(WEB, NETWORK)
        self.loops = {
            "published, new connections": Loop(None, node_address, published, rate, False),
            "published, keep-alive": Loop(None, node_address, published, rate, True),
            "VIP, new connections": Loop(client_ns, vip, WEB_PORT, rate, False),
            "VIP, keep-alive": Loop(client_ns, vip, WEB_PORT, rate, True),
        }

    def run(self, operation: Callable[[], object], settle: Callable[[], bool]) -> Outcome:
        """Traffic for a second before, during the operation until `settle` holds, and for a
        second after: every request of it is counted."""
        for loop in self.loops.values():
            loop.start()
        time.sleep(1.0)
        started = time.monotonic()
        try:
            operation()
            wait_for(settle, "the operation to settle")
            seconds = time.monotonic() - started
            time.sleep(1.0)
        finally:
            results = {name: loop.stop() for name, loop in self.loops.items()}
        return Outcome(seconds, results)
