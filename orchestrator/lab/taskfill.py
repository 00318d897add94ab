"""Many tasks on one node: what it takes to start them, and whether the node holds up meanwhile
(issue #14: a 1,000-task service on one node once had every task rejected in a loop, the node
marked down and the manager's writes timing out).

`fill` creates, in a namespace lab's swarm, one replicated service of `busybox sleep` tasks
pinned to a node, and watches it every `every` s until all run, through the Engine API as the
docker CLI would: the tasks' states (`service ps`'s request, timed: the API must keep
answering) and the node's state (it must stay ready). tests/test_many_tasks_lab.py asserts
what a user needs (every task running, none rejected, the node ready throughout);
bench/fill.py records the times.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import docker

from mesh.netns import list_netns
from orchestrator.lab import daemons
from orchestrator.lab.lab import backend
from orchestrator.lab.record import Lab

SERVICE = "fill"


@dataclass
class Fill:
    tasks: int
    seconds: float | None = None  # from the create to every task running; None: not in time
    rejected: int = 0  # tasks that ever ended rejected or failed
    errors: list[str] = field(default_factory=list)  # their distinct errors, a few
    node_not_ready: list[str] = field(default_factory=list)  # each state seen but ready
    ps_seconds: list[float] = field(default_factory=list)  # each `service ps` request
    states: dict[str, int] = field(default_factory=dict)  # the last look's tasks by state
    removed_seconds: float | None = None  # from `service rm` to no task namespace left

    @property
    def worst_ps(self) -> float:
        return max(self.ps_seconds, default=0.0)

    def describe(self) -> str:
        took = f"{self.seconds:.1f} s" if self.seconds is not None else "not all running"
        return (
            f"{self.tasks} tasks: {took}; rejected or failed {self.rejected} {self.errors[:3]}; "
            f"node not ready: {sorted(set(self.node_not_ready))}; service ps worst "
            f"{self.worst_ps:.2f} s over {len(self.ps_seconds)}; last look {self.states}"
        )


def fill(lab: Lab, node: str, tasks: int, within: float, every: float = 1.0) -> Fill:
    """`tasks` replicas of `busybox sleep` on `node` (the swarm's manager is sw1); removed
    afterwards, waiting (at most `within` s) until the node holds none of their namespaces."""
    client = docker.DockerClient(base_url=daemons.docker_host(lab, "sw1"), timeout=120)
    out = Fill(tasks)
    try:
        nodes = {n["Description"]["Hostname"]: n["ID"] for n in client.api.nodes()}
        node_id = nodes[node]
        start = time.monotonic()
        client.api.create_service(
            docker.types.TaskTemplate(
                container_spec=docker.types.ContainerSpec("busybox", ["sleep", "100000"]),
                placement=docker.types.Placement(constraints=[f"node.hostname=={node}"]),
                restart_policy=docker.types.RestartPolicy(condition="any", delay=1_000_000_000),
            ),
            name=SERVICE,
            mode=docker.types.ServiceMode("replicated", replicas=tasks),
        )
        seen_bad: dict[str, str] = {}
        while time.monotonic() - start < within:
            asked = time.monotonic()
            listed: list[dict[str, Any]] = client.api.tasks(filters={"service": SERVICE})
            out.ps_seconds.append(time.monotonic() - asked)
            state = next(n for n in client.api.nodes() if n["ID"] == node_id)["Status"]["State"]
            if state != "ready":
                out.node_not_ready.append(state)
            for t in listed:
                if t["Status"]["State"] in ("rejected", "failed"):
                    seen_bad[t["ID"]] = str(t["Status"].get("Err") or t["Status"]["State"])
            out.states = dict(Counter(t["Status"]["State"] for t in listed))
            running = sum(
                1
                for t in listed
                if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
            )
            if running >= tasks:
                out.seconds = time.monotonic() - start
                break
            time.sleep(every)
        out.rejected = len(seen_bad)
        out.errors = sorted(set(seen_bad.values()))
    finally:
        removing = time.monotonic()
        try:
            client.api.remove_service(SERVICE)
        except docker.errors.NotFound:
            pass
        finally:
            client.close()
        if _wait_no_task_namespaces(lab, node, within):
            out.removed_seconds = time.monotonic() - removing
    return out


def _wait_no_task_namespaces(lab: Lab, node: str, within: float) -> bool:
    """The node's task namespaces are all gone (a namespace lab's: they are this machine's)."""
    prefix = backend(lab).netns_prefix(lab, node)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not [n for n in list_netns() if n.startswith(prefix + "-")]:
            return True
        time.sleep(0.5)
    return False
