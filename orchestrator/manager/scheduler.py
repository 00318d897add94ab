"""The scheduler: PENDING tasks get a node and become ASSIGNED.

Filters first (the node is ready and active, the constraints hold, its executor runs the image,
its CPUs and memory hold the task's reservations on top of its other tasks', none of its tasks
holds a host-mode port the task publishes: swarmkit's HostPortFilter), then spread: the
node running the fewest tasks of the same service wins, ties broken by fewest tasks overall. A
task no node can take stays PENDING with the reason in its error, and is tried again on the next
change (a node joining, a label added, a task ending).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from orchestrator.images import reference
from orchestrator.manager.spec import Constraint, Resources, reservations_of, view
from orchestrator.store.ids import now_rfc3339
from orchestrator.store.objects import Availability, Node, NodeState, Service, Task, TaskState
from orchestrator.store.store import Tx

LISTED_IMAGES = 8  # of a native node's images, in a pending task's error


def eligible(node: Node) -> bool:
    return node.state == NodeState.READY and node.availability == Availability.ACTIVE


def satisfies(node: Node, constraints: tuple[Constraint, ...]) -> bool:
    for c in constraints:
        if c.key == "node.id":
            actual = node.id
        elif c.key == "node.hostname":
            actual = node.hostname
        elif c.key == "node.role":
            actual = node.role
        elif c.key == "node.platform.os":
            actual = node.os
        elif c.key == "node.platform.arch":
            actual = node.arch
        else:  # node.labels.<key>
            label = c.key[len("node.labels.") :]
            if label not in node.labels:
                if c.equal:
                    return False
                continue
            actual = node.labels[label]
        if (actual == c.value) != c.equal:
            return False
    return True


def active(task: Task) -> bool:
    """Counts towards a node's load: wanted running and not finished."""
    return task.desired_state <= TaskState.RUNNING and not task.state.terminal


def runs_image(node: Node, repository: str) -> bool:
    """Whether the node's executor runs the image: a native executor runs the few it lists
    (Node.images), a container engine any."""
    return not node.images or repository in node.images


def fits(node: Node, used: Resources, wanted: Resources) -> bool:
    """Whether the node's capacity (0: unknown, no limit) holds a task's reservations on top of
    what its tasks reserve already (`used`)."""
    return not (
        (node.nano_cpus and wanted.nano_cpus and used.nano_cpus + wanted.nano_cpus > node.nano_cpus)
        or (
            node.memory_bytes
            and wanted.memory_bytes
            and used.memory_bytes + wanted.memory_bytes > node.memory_bytes
        )
    )


def _plus(a: Resources, b: Resources) -> Resources:
    return Resources(a.nano_cpus + b.nano_cpus, a.memory_bytes + b.memory_bytes)


@dataclasses.dataclass(frozen=True)
class _Wants:
    """What a pending task needs of a node, beyond being available."""

    constraints: tuple[Constraint, ...]
    image: str
    repository: str  # "" when the image is no reference (a spec stored before they were checked)
    reservations: Resources
    node_id: str  # global tasks come with their node
    host_ports: frozenset[tuple[str, int]]  # (protocol, port) it takes on its node


def _host_ports(task: Task) -> frozenset[tuple[str, int]]:
    return frozenset(
        (str(p.get("Protocol") or "tcp"), int(p["PublishedPort"]))
        for p in task.host_ports
        if p.get("PublishedPort")
    )


def schedule(tx: Tx) -> int:
    all_nodes = tx.list(Node)
    nodes = [n for n in all_nodes if eligible(n)]
    tasks = tx.list(Task)
    load: Counter[str] = Counter()
    per_service: Counter[tuple[str, str]] = Counter()
    used: dict[str, Resources] = {}
    ports: dict[str, set[tuple[str, int]]] = {}  # node -> host-mode ports its tasks hold
    for t in tasks:
        if t.node_id and active(t):
            load[t.node_id] += 1
            per_service[(t.service_id, t.node_id)] += 1
            # A task holds its reservations and host ports once placed; a global task waiting
            # for its node does not yet (else it would count against itself).
            if t.state >= TaskState.ASSIGNED:
                ports.setdefault(t.node_id, set()).update(_host_ports(t))
                used[t.node_id] = _plus(used.get(t.node_id, Resources()), reservations_of(t.spec))
    placed = 0
    pending = sorted(
        (t for t in tasks if t.state == TaskState.PENDING and t.desired_state <= TaskState.RUNNING),
        key=lambda t: (t.service_id, t.slot),
    )
    specs: dict[str, Service | None] = {}
    repositories: dict[str, str] = {}
    for task in pending:
        if task.service_id not in specs:
            specs[task.service_id] = tx.get(Service, task.service_id)
        svc = specs[task.service_id]
        if svc is None:
            continue
        # The task runs its own template (the service's when it was made).
        template = task.spec or svc.spec.get("TaskTemplate", {})
        image = str((template.get("ContainerSpec") or {}).get("Image") or "")
        if image not in repositories:
            repositories[image] = _repository(image)
        wants = _Wants(
            view(svc.spec).constraints,
            image,
            repositories[image],
            reservations_of(template),
            task.node_id,
            _host_ports(task),
        )
        candidates = [n for n in nodes if _refusal(n, wants, used, ports) is None]
        if not candidates:
            reason = _explain(all_nodes, wants, used, ports)
            if task.err != reason:
                tx.put(dataclasses.replace(task, err=reason))
            continue
        best = min(
            candidates,
            key=lambda n: (per_service[(task.service_id, n.id)], load[n.id], n.hostname, n.id),
        )
        load[best.id] += 1
        per_service[(task.service_id, best.id)] += 1
        used[best.id] = _plus(used.get(best.id, Resources()), wants.reservations)
        ports.setdefault(best.id, set()).update(wants.host_ports)
        tx.put(
            dataclasses.replace(
                task,
                node_id=best.id,
                state=TaskState.ASSIGNED,
                timestamp=now_rfc3339(),
                message="scheduler assigned task to node",
                err="",
            )
        )
        placed += 1
    return placed


def _repository(image: str) -> str:
    try:
        return reference.repository(image)
    except reference.ReferenceError:
        return ""


def _refusal(
    node: Node,
    wants: _Wants,
    used: dict[str, Resources],
    ports: dict[str, set[tuple[str, int]]],
) -> str | None:
    """Why the node cannot take the task (the first filter it fails), or None."""
    if not eligible(node) or (wants.node_id and node.id != wants.node_id):
        return "unavailable"
    if not satisfies(node, wants.constraints):
        return "constraints"
    if not runs_image(node, wants.repository):
        return "executor"
    if not fits(node, used.get(node.id, Resources()), wants.reservations):
        return "resources"
    if wants.host_ports & ports.get(node.id, set()):
        return "host ports"
    return None


def _nodes(count: int) -> str:
    return f"{count} node{'s' * (count != 1)}"


def _explain(
    nodes: list[Node],
    wants: _Wants,
    used: dict[str, Resources],
    ports: dict[str, set[tuple[str, int]]],
) -> str:
    if not nodes:
        return "no suitable node (no nodes in the swarm)"
    refused: dict[str, list[Node]] = {}
    for n in nodes:
        if wants.node_id and n.id != wants.node_id:
            continue  # a global task is about its own node only
        reason = _refusal(n, wants, used, ports)
        if reason is not None:
            refused.setdefault(reason, []).append(n)
    parts = []
    if unmet := len(refused.get("constraints", ())):
        parts.append(f"scheduling constraints not satisfied on {_nodes(unmet)}")
    if short := len(refused.get("resources", ())):
        parts.append(f"insufficient resources on {_nodes(short)}")
    if busy := len(refused.get("host ports", ())):
        parts.append(f"host-mode port already in use on {_nodes(busy)}")  # swarmkit's words
    if not_ready := len(refused.get("unavailable", ())):
        parts.append(f"{_nodes(not_ready)} not available for new tasks")
    native = refused.get("executor", [])
    if native:
        images = sorted({i for n in native for i in n.images})
        listed = ", ".join(images[:LISTED_IMAGES]) + (
            ", ..." if len(images) > LISTED_IMAGES else ""
        )
        verb = "runs" if len(native) == 1 else "run"
        runs = (
            f"image {wants.image!r} runs on no available node: {_nodes(len(native))} {verb} the "
            f"native executor, which runs {listed}; start shoald with a container engine on a "
            "node, see docs/container-executor.md"
        )
        return f"no suitable node ({'; '.join(parts)}); {runs}" if parts else runs
    if wants.node_id and not parts:
        parts.append("its node is not available")
    return f"no suitable node ({'; '.join(parts)})"
