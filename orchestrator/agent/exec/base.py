"""What every executor shares: the task it is given, and the interfaces it implements.

As swarmkit's agent/exec splits it: one generic task state machine (`runner.py`) drives a
`Controller` per task, which does the I/O of one executor (prepare, start, wait, signal,
remove). An `Executor` makes controllers, describes the node, reads logs and cleans up what an
earlier shoald left.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.agent.exec.health import Check
from orchestrator.manager.spec import ContainerView, container_view
from orchestrator.manager.templates import TemplateContext

# Labels on everything an executor makes for a task: Docker's own, so that tools that read
# them (`docker ps --filter label=com.docker.swarm.service.name=web`) work, and ours.
LABEL_SERVICE_NAME = "com.docker.swarm.service.name"
LABEL_SERVICE_ID = "com.docker.swarm.service.id"
LABEL_TASK_ID = "com.docker.swarm.task.id"
LABEL_TASK_NAME = "com.docker.swarm.task.name"
LABEL_NODE_ID = "com.docker.swarm.node.id"


class Rejected(Exception):
    """The task cannot be prepared on this node (REJECTED, with this message)."""


class StartFailed(Exception):
    """The task was prepared but could not start (FAILED, with this message)."""


class EngineUnavailable(Exception):
    """The container engine does not answer: the node cannot run or watch tasks now."""


@dataclass(frozen=True)
class Exit:
    """How a task's process ended."""

    code: int
    oom: bool = False  # killed by the kernel for lack of memory (its memory limit)
    error: str = ""  # what the engine said, if anything

    def describe(self, memory_limit: int = 0) -> str:
        """The ERROR column of `service ps`, as swarmkit words it, with the cause if known."""
        text = f"task: non-zero exit ({self.code})"
        if self.oom:
            limit = f", memory limit {memory_limit // 2**20} MiB" if memory_limit else ""
            return f"{text}: killed by the kernel for lack of memory (OOM{limit})"
        return f"{text}: {self.error}" if self.error else text


@dataclass(frozen=True)
class TaskInfo:
    """One task of an assignment, as an executor needs it."""

    id: str
    name: str  # <service>.<slot>.<id>, or <service>.<node id>.<id> for global services
    service_id: str
    service_name: str
    slot: int
    node_id: str
    node_hostname: str
    template: dict[str, Any]  # the TaskTemplate the managers stored
    addresses: dict[str, str]  # network name -> "a.b.c.d/len"
    registry_auth: str = ""  # X-Registry-Auth of the client that made the service, if given
    spec: ContainerView = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", container_view(self.template))

    @classmethod
    def from_message(cls, msg: dict[str, Any], node_id: str, node_hostname: str) -> TaskInfo:
        name = str(msg.get("name") or msg["id"])
        return cls(
            id=str(msg["id"]),
            name=name,
            service_id=str(msg.get("service_id", "")),
            service_name=str(msg.get("service_name") or name.split(".", 1)[0]),
            slot=int(msg.get("slot") or 0),
            node_id=node_id,
            node_hostname=node_hostname,
            template=dict(msg.get("spec") or {}),
            addresses=dict(msg.get("addresses") or {}),
            registry_auth=str(msg.get("registry_auth") or ""),
        )

    @property
    def template_context(self) -> TemplateContext:
        return TemplateContext(
            service_id=self.service_id,
            service_name=self.service_name,
            node_id=self.node_id,
            node_hostname=self.node_hostname,
            task_id=self.id,
            task_name=self.name,
            task_slot=str(self.slot) if self.slot else self.node_id,
        )

    @property
    def ips(self) -> list[str]:
        return [a.split("/")[0] for a in self.addresses.values()]

    @property
    def labels(self) -> dict[str, str]:
        """Docker's swarm labels, on top of the service's container labels."""
        return {
            **dict(self.spec.labels),
            LABEL_SERVICE_NAME: self.service_name,
            LABEL_SERVICE_ID: self.service_id,
            LABEL_TASK_ID: self.id,
            LABEL_TASK_NAME: self.name,
            LABEL_NODE_ID: self.node_id,
        }


def default_hostname(task_id: str) -> str:
    """A task's hostname unless its spec names one: the first 12 characters of its ID."""
    return task_id[:12]


@dataclass(frozen=True)
class LogEntry:
    time_ns: int
    stream: int  # 1 stdout, 2 stderr
    line: str  # with its newline


class Controller(Protocol):
    """One task's I/O in one executor. Every method may be called once, in this order; remove()
    at any time, more than once."""

    @property
    def netns(self) -> str:
        """The name (under /run/netns) of the task's network namespace, which the mesh plugs."""
        ...

    @property
    def netns_made(self) -> bool: ...

    async def prepare(self) -> None:
        """Everything before the network is plugged: the image, the namespace, the container.
        Raises Rejected."""

    async def start(self) -> dict[str, Any]:
        """Start the task's process; its ContainerStatus (ContainerID, PID). Raises
        StartFailed."""
        ...

    async def wait(self) -> Exit:
        """Until the process ends. Raises EngineUnavailable if it cannot be watched."""
        ...

    def health_check(self) -> Check | None:
        """The task's health check (the spec's, else its image's), once it has started."""
        ...

    async def probe(self, argv: list[str]) -> int:
        """Run a health check command inside the task; its exit status (cancelled when its
        timeout runs out)."""
        ...

    async def terminate(self) -> None:
        """Send the process its stop signal (the spec's, else the image's, else SIGTERM)."""

    async def kill(self) -> None:
        """SIGKILL the process (its whole tree)."""

    async def remove(self) -> None:
        """Release what the task holds on this node (process killed, network namespace),
        keeping what its logs need until the executor's sweep."""


class Executor(Protocol):
    kind: str  # "container" | "native"

    async def start(self, node_id: str) -> None:
        """Ready to run tasks for this node: what an earlier shoald left is removed."""

    async def close(self) -> None: ...

    def controller(self, task: TaskInfo) -> Controller: ...

    def description(self) -> dict[str, Any]:
        """What the managers need to know of it: {"executor", "images"} (images: the
        repositories it can run; empty: any)."""
        ...

    def info(self) -> dict[str, Any]:
        """Fields of `docker info` it fills: OperatingSystem, Driver, Containers, Images..."""
        ...

    def health(self) -> str | None:
        """None when it can run tasks, else why not (the node is then reported down)."""
        ...

    def logs(
        self, task_id: str, tail: int | None, since_ns: int, follow: bool
    ) -> AsyncIterator[LogEntry]:
        """A task's log lines (its last `tail`, from `since_ns`), then new ones while it runs
        if `follow`."""
        ...

    async def distribution(self, image: str, auth: str) -> dict[str, Any]:
        """What the registry says of an image (`GET /distribution/{name}/json`: its
        Descriptor, with the digest); raises LookupError with the reason."""
        ...

    async def sweep(self, keep: set[str]) -> None:
        """Remove the remains (logs, stopped containers) of every task not in `keep`: the
        managers deleted them."""
