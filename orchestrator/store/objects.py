"""The objects of the cluster store: nodes, services, tasks, networks, the cluster.

They are plain dataclasses. Specs the user writes (ServiceSpec, NetworkSpec, ...) are kept as the
Docker-shaped dicts the API accepted, normalised, so they round-trip exactly (the docker CLI posts
back the Spec it read); the fields the managers act on are typed attributes next to them.

Objects in the store are shared and must not be mutated: make a changed copy
(`dataclasses.replace`, and a copy of any dict you change) and put it in a transaction.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar, cast


class TaskState(enum.IntEnum):
    """Task states in swarmkit's order; a task's state only ever increases."""

    NEW = 0
    PENDING = 64
    ASSIGNED = 192
    ACCEPTED = 256
    PREPARING = 320
    READY = 384
    STARTING = 448
    RUNNING = 512
    COMPLETE = 576
    SHUTDOWN = 640
    FAILED = 704
    REJECTED = 768
    REMOVE = 800
    ORPHANED = 832

    @property
    def api(self) -> str:
        return self.name.lower()

    @property
    def terminal(self) -> bool:
        return self >= TaskState.COMPLETE

    @classmethod
    def parse(cls, text: str) -> TaskState:
        return cls[text.upper()]


class Role(enum.StrEnum):
    """A node's role. StrEnums here keep the strings the store and the API have always held."""

    MANAGER = "manager"
    WORKER = "worker"


class Availability(enum.StrEnum):
    """Whether a node takes tasks (Docker's NodeSpec.Availability)."""

    ACTIVE = "active"
    PAUSE = "pause"  # keeps its tasks, gets no new ones
    DRAIN = "drain"  # its tasks move elsewhere


class NodeState(enum.StrEnum):
    """A node's status, as its session and heartbeats tell the dispatcher."""

    UNKNOWN = "unknown"
    DOWN = "down"
    READY = "ready"
    DISCONNECTED = "disconnected"


@dataclass
class Meta:
    version: int = 0  # the log index of the last write (Version.Index)
    created_at: str = ""
    updated_at: str = ""


@dataclass
class Node:
    KIND: ClassVar[str] = "node"
    id: str
    meta: Meta = field(default_factory=Meta)
    role: Role = Role.WORKER  # desired role
    availability: Availability = Availability.ACTIVE
    labels: dict[str, str] = field(default_factory=dict)
    name: str = ""  # Spec.Name
    hostname: str = ""
    addr: str = ""  # the node's address as managers see it
    engine_version: str = ""
    os: str = "linux"
    arch: str = "x86_64"
    nano_cpus: int = 0  # capacity for reservations; 0: unknown, no limit
    memory_bytes: int = 0
    executor: str = ""  # container | native | "" (unknown: a node from before executors)
    images: list[str] = field(default_factory=list)  # repositories it runs; empty: any
    state: NodeState = NodeState.UNKNOWN
    message: str = ""
    manager_addr: str = ""  # ip:port of its manager listener, for managers
    cert_root: str = ""  # hex digest of the root its certificate chains to (root rotation)
    cert_not_after: str = ""  # RFC 3339: when its latest certificate expires
    raft_id: int = 0  # its member ID in the managers' Raft group, for managers
    gateways: dict[str, str] = field(default_factory=dict)  # network id -> this node's address


@dataclass
class Service:
    KIND: ClassVar[str] = "service"
    id: str
    meta: Meta = field(default_factory=Meta)
    spec: dict[str, Any] = field(default_factory=dict)  # ServiceSpec, normalised
    spec_version: int = 1  # bumped on every spec change; tasks record the one they run
    previous_spec: dict[str, Any] | None = None
    ports: list[dict[str, Any]] = field(default_factory=list)  # Endpoint.Ports, allocated
    vips: dict[str, str] = field(default_factory=dict)  # network id -> "a.b.c.d/len"
    update_status: dict[str, Any] | None = None
    # jobs (Mode ReplicatedJob or GlobalJob): the run under way, bumped by every update of the
    # service (JobStatus.JobIteration.Index), and when it began (JobStatus.LastExecution)
    job_iteration: int = 0
    job_started_at: str = ""
    # X-Registry-Auth of the client that created or last updated it with
    # --with-registry-auth: handed to nodes to pull its image, never shown by the API
    registry_auth: str = ""

    @property
    def name(self) -> str:
        name: str = self.spec.get("Name", "")
        return name


@dataclass
class Task:
    KIND: ClassVar[str] = "task"
    id: str
    meta: Meta = field(default_factory=Meta)
    service_id: str = ""
    slot: int = 0  # 1..N for replicated services, 0 for global ones
    node_id: str = ""
    spec: dict[str, Any] = field(default_factory=dict)  # the service's TaskTemplate
    spec_version: int = 0
    desired_state: TaskState = TaskState.RUNNING
    state: TaskState = TaskState.NEW
    timestamp: str = ""  # of the last state change
    message: str = ""
    err: str = ""
    container: dict[str, Any] = field(default_factory=dict)  # ContainerID, PID, ExitCode
    addresses: dict[str, str] = field(default_factory=dict)  # network id -> "a.b.c.d/len"
    networks: list[str] = field(default_factory=list)  # network ids, in attachment order
    job_iteration: int | None = None  # a job's task: the run of the job it belongs to
    # the host-mode ports it holds on its node, as its service published them when it was
    # made (swarmkit's Task.Endpoint): what the scheduler keeps apart, and its PortStatus
    host_ports: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Network:
    KIND: ClassVar[str] = "network"
    id: str
    meta: Meta = field(default_factory=Meta)
    spec: dict[str, Any] = field(default_factory=dict)  # Name, Labels, DriverConfiguration, ...
    subnet: str = ""
    gateway: str = ""
    vni: int = 0
    ingress: bool = False
    encrypted: bool = False

    @property
    def name(self) -> str:
        name: str = self.spec.get("Name", "")
        return name


DEFAULT_ADDR_POOL = ("10.0.0.0/8",)  # Docker's defaults for a swarm's networks
DEFAULT_SUBNET_SIZE = 24
DEFAULT_DATA_PATH_PORT = 4789


@dataclass
class Cluster:
    KIND: ClassVar[str] = "cluster"
    id: str
    meta: Meta = field(default_factory=Meta)
    spec: dict[str, Any] = field(default_factory=dict)
    worker_token: str = ""
    manager_token: str = ""
    root_ca_cert: str = ""  # PEM: the root every node trusts
    root_ca_key: str = ""  # PEM: its key, which lives in the store and so only on managers
    # a root rotation under way: {"cert", "key", "cross_signed"} PEMs of the new root
    ca_rotation: dict[str, str] = field(default_factory=dict)
    # removed nodes, whose certificates are refused until they expire: node ID -> RFC 3339
    denied_nodes: dict[str, str] = field(default_factory=dict)
    # SWMKEY-1-...: with autolock, every manager's Raft data key is sealed under it
    unlock_key: str = ""
    # encrypted overlays' keyring (manager/netkeys.py): {"keys": [{tag, key}], "primary",
    # "rotated_at"}
    network_keys: dict[str, Any] = field(default_factory=dict)
    # where overlay networks' subnets come from (swarm init --default-addr-pool,
    # --default-addr-pool-mask-length), and the VXLAN port (--data-path-port); a cluster stored
    # before they were kept has Docker's defaults, which it used
    default_addr_pool: list[str] = field(default_factory=lambda: list(DEFAULT_ADDR_POOL))
    subnet_size: int = DEFAULT_SUBNET_SIZE
    data_path_port: int = DEFAULT_DATA_PATH_PORT


Object = Node | Service | Task | Network | Cluster
KINDS: dict[str, type[Any]] = {c.KIND: c for c in (Node, Service, Task, Network, Cluster)}
T = TypeVar("T")


# ---- encoding (for the log and snapshots) --------------------------------------------------


def to_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = to_dict(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        out[f.name] = value
    return out


def _decoding_plan(cls: type[Any]) -> tuple[tuple[str, Any], ...]:
    """Each field, with the dataclass or enum its JSON value becomes (None: kept as is)."""
    hints = typing.get_type_hints(cls)
    plan = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        nested = dataclasses.is_dataclass(hint) or (
            isinstance(hint, type) and issubclass(hint, enum.Enum)
        )
        plan.append((f.name, hint if nested else None))
    return tuple(plan)


# Resolving type hints costs ~200 µs a class, and every manager decodes every object written:
# done once here (profiled: half of a leader's time under write load went to it).
_PLANS: Mapping[type[Any], tuple[tuple[str, Any], ...]] = MappingProxyType(
    {c: _decoding_plan(c) for c in [cast(type[Any], Meta), *KINDS.values()]}
)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    plan = _PLANS.get(cls) or _decoding_plan(cls)
    kwargs: dict[str, Any] = {}
    for name, convert in plan:
        if name not in data:
            continue
        value = data[name]
        if convert is not None:
            if isinstance(convert, type) and dataclasses.is_dataclass(convert):
                if isinstance(value, dict):
                    value = from_dict(convert, value)
            else:
                value = convert(value)
        kwargs[name] = value
    return cls(**kwargs)


def encode(obj: Object) -> dict[str, Any]:
    return {"kind": obj.KIND, **to_dict(obj)}


def _moby_spelling(template: Any) -> Any:
    """A TaskTemplate whose ContainerSpec spells its health check as moby does (Healthcheck):
    specs stored before the API did so hold it as HealthCheck."""
    cs = template.get("ContainerSpec") if isinstance(template, dict) else None
    if not isinstance(cs, dict) or "HealthCheck" not in cs:
        return template
    renamed = {("Healthcheck" if k == "HealthCheck" else k): v for k, v in cs.items()}
    return {**template, "ContainerSpec": renamed}


def decode(data: dict[str, Any]) -> Object:
    data = dict(data)
    cls = KINDS[data.pop("kind")]
    if cls is Service:
        for key in ("spec", "previous_spec"):
            spec = data.get(key)
            if isinstance(spec, dict) and "TaskTemplate" in spec:
                data[key] = {**spec, "TaskTemplate": _moby_spelling(spec["TaskTemplate"])}
    elif cls is Task and "spec" in data:
        data["spec"] = _moby_spelling(data["spec"])
    obj: Object = from_dict(cls, data)
    return obj
