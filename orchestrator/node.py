"""A node's swarm membership: what shoald runs once it is part of a swarm.

Every node runs an agent and a shoal-mesh; a manager also runs a member of the managers' Raft
group with the store, and while it leads the control loops (orchestrator/manager/runtime.py).
The membership (node ID, role, Raft ID, the managers' addresses) is kept in
<data-root>/node.json, so a restarted shoald picks up where it was.

A role can change under a running node (`node promote`, `node demote`): the managers say so in
the node's assignments, and the node starts or stops its manager runtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from grpc import aio

from orchestrator.agent.agent import Agent, AgentConfig, node_description
from orchestrator.agent.meshfeed import MeshFeed
from orchestrator.agent.meshprocess import MeshProcess
from orchestrator.api.convert import default_cluster_spec
from orchestrator.api.docker import ENGINE_VERSION
from orchestrator.manager import allocator
from orchestrator.manager.dispatcher import new_raft_id
from orchestrator.manager.runtime import ManagerRuntime
from orchestrator.rpc import jsonrpc
from orchestrator.rpc.jsonrpc import Message
from orchestrator.store.ids import new_id
from orchestrator.store.objects import Cluster, Node
from orchestrator.store.store import Tx

log = logging.getLogger("shoal.node")

DEFAULT_PORT = 2377
JOIN_CATCH_UP = 30.0  # seconds a joining manager may take to receive the store
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(raw: bytes, width: int) -> str:
    n = int.from_bytes(raw, "big")
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = _B36[r] + out
    return out.rjust(width, "0")[-width:]


def join_token(cluster_id: str) -> str:
    """SWMTKN-1-<digest>-<secret>. The digest pins the cluster (its root CA once #5 lands)."""
    digest = _base36(hashlib.sha256(cluster_id.encode()).digest(), 50)
    return f"SWMTKN-1-{digest}-{_base36(secrets.token_bytes(16), 25)}"


@dataclass
class Membership:
    node_id: str
    cluster_id: str
    role: str  # manager | worker
    managers: list[str]  # host:port of the managers it knows, the one to try first first
    addr: str  # this node's advertised address
    listen: str  # host:port its manager listens on ("": the default, when promoted)
    raft_id: int = 0  # its member ID in the managers' Raft group (managers)
    advertise: str = ""  # host:port other managers reach its listener at (managers)

    @staticmethod
    def load(path: Path) -> Membership:
        doc = json.loads(path.read_text())
        if "manager" in doc:  # written before managers were replicated
            doc.setdefault("managers", [doc.pop("manager")])
        names = {f.name for f in fields(Membership)}
        return Membership(**{k: v for k, v in doc.items() if k in names})


class SwarmError(RuntimeError):
    """Refused with 503 (membership state) or 400 (bad request)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class NodeConfig:
    data_root: Path
    hostname: str
    netns_prefix: str
    lb_backend: str = "auto"
    metrics_port: int = 9323


@dataclass
class _RoleChange:
    role: str
    raft_id: int = 0
    raft_members: dict[int, str] = field(default_factory=dict)


class NodeRuntime:
    """A node's membership and everything it runs."""

    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.membership: Membership | None = None
        self.manager: ManagerRuntime | None = None
        self.agent: Agent | None = None
        self.mesh: MeshProcess | None = None
        self._lock = asyncio.Lock()
        self._role_task: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path:
        return self.cfg.data_root / "node.json"

    @property
    def manager_dir(self) -> Path:
        return self.cfg.data_root / "manager"

    @property
    def state(self) -> str:
        if self.membership is None:
            return "inactive"
        if self.agent is not None and not self.agent.connected:
            return "pending"
        return "active"

    async def resume(self) -> None:
        """Rejoin what node.json says we are part of (after a restart)."""
        if not self.path.exists():
            return
        m = Membership.load(self.path)
        if m.role == "manager":
            await self._start_manager(m, bootstrap=False, known={})
        await self._run(m)
        log.info("resumed as %s %s of cluster %s", m.role, m.node_id, m.cluster_id)

    async def _start_manager(self, m: Membership, bootstrap: bool, known: dict[int, str]) -> None:
        runtime = ManagerRuntime(
            self.manager_dir, m.raft_id, m.advertise, bootstrap=bootstrap, known=known
        )
        await runtime.start(m.listen or f"0.0.0.0:{DEFAULT_PORT}")
        self.manager = runtime

    async def _run(self, m: Membership) -> None:
        self.membership = m
        mesh_dir = self.cfg.data_root / "mesh"
        feed = MeshFeed(mesh_dir / "state.json", mesh_dir / "run", m.node_id, m.addr)
        feed.update(None, lambda _: None)
        self.mesh = MeshProcess(
            mesh_dir / "state.json",
            mesh_dir / "run",
            f"{m.addr}:{self.cfg.metrics_port}",
            self.cfg.lb_backend,
        )
        self.mesh.start()
        feed.on_write = self.mesh.nudge
        self.agent = Agent(
            AgentConfig(
                node_id=m.node_id,
                managers=m.managers,
                addr=m.addr,
                data_dir=self.cfg.data_root,
                netns_prefix=self.cfg.netns_prefix,
                description=node_description(self.cfg.hostname, ENGINE_VERSION),
                on_managers=self._managers_changed,
                on_role=self._role_said,
            ),
            feed,
        )
        self.agent.start()

    def _save(self, m: Membership) -> None:
        self.cfg.data_root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(m), indent=1))
        tmp.replace(self.path)

    def _managers_changed(self, managers: list[str]) -> None:
        m = self.membership
        if m is not None and managers and sorted(managers) != sorted(m.managers):
            m.managers = managers
            self._save(m)

    def _role_said(self, msg: Message) -> None:
        m = self.membership
        if m is None:
            return
        change = _RoleChange(
            str(msg.get("role", m.role)),
            int(msg.get("raft_id") or 0),
            {int(k): str(v) for k, v in (msg.get("raft_members") or {}).items()},
        )
        wants_manager = change.role == "manager"
        if wants_manager == (self.manager is not None):
            return
        if self._role_task is not None and not self._role_task.done():
            return  # one change at a time; the next assignment says it again
        self._role_task = asyncio.create_task(self._change_role(change))

    async def _change_role(self, change: _RoleChange) -> None:
        async with self._lock:
            m = self.membership
            if m is None:
                return
            if change.role == "manager" and self.manager is None:
                if not change.raft_id:
                    return
                m.role, m.raft_id = "manager", change.raft_id
                m.advertise = m.advertise or f"{m.addr}:{DEFAULT_PORT}"
                log.info("promoted: starting a manager (raft member %d)", m.raft_id)
                shutil.rmtree(self.manager_dir, ignore_errors=True)
                try:
                    await self._start_manager(m, bootstrap=False, known=change.raft_members)
                except OSError as e:
                    log.error("cannot start the manager: %s", e)
                    return
                self._save(m)
            elif change.role == "worker" and self.manager is not None:
                log.info("demoted: stopping the manager")
                runtime, self.manager = self.manager, None
                await runtime.stop()
                shutil.rmtree(self.manager_dir, ignore_errors=True)
                m.role, m.raft_id = "worker", 0
                self._save(m)

    async def init(self, listen: str, advertise: str, spec: dict[str, Any]) -> str:
        async with self._lock:
            if self.membership is not None:
                raise SwarmError(
                    503,
                    'This node is already part of a swarm. Use "docker '
                    'swarm leave" to leave this swarm and join another one.',
                )
            cluster_id, node_id = new_id(), new_id()
            m = Membership(
                node_id=node_id,
                cluster_id=cluster_id,
                role="manager",
                managers=[advertise],
                addr=advertise.rsplit(":", 1)[0],
                listen=listen,
                raft_id=new_raft_id(),
                advertise=advertise,
            )
            shutil.rmtree(self.manager_dir, ignore_errors=True)
            try:
                await self._start_manager(m, bootstrap=True, known={})
                assert self.manager is not None
                await self.manager.wait_leader(10)
            except OSError as e:
                await self._teardown(cleanup=True)
                raise SwarmError(400, f"cannot start the manager: {e}") from e

            def bootstrap(tx: Tx) -> None:
                tx.put(
                    Cluster(
                        id=cluster_id,
                        spec=default_cluster_spec(spec),
                        worker_token=join_token(cluster_id),
                        manager_token=join_token(cluster_id),
                    )
                )
                tx.put(
                    allocator.new_network(tx, allocator.ingress_spec(), allocator.INGRESS_SUBNET)
                )
                tx.put(
                    Node(
                        id=node_id,
                        role="manager",
                        hostname=self.cfg.hostname,
                        addr=m.addr,
                        manager_addr=advertise,
                        raft_id=m.raft_id,
                        state="unknown",
                        engine_version=ENGINE_VERSION,
                    )
                )

            await self.manager.store.update(bootstrap)
            self._save(m)
            await self._run(m)
            return node_id

    async def join(self, remote: str, token: str, addr: str, listen: str) -> None:
        async with self._lock:
            if self.membership is not None:
                raise SwarmError(
                    503,
                    'This node is already part of a swarm. Use "docker '
                    'swarm leave" to leave this swarm and join another one.',
                )
            advertise = f"{addr}:{listen.rsplit(':', 1)[-1] if listen else DEFAULT_PORT}"
            client = jsonrpc.Client(remote)
            try:
                reply = await client.call(
                    "shoal.Dispatcher",
                    "Join",
                    {
                        "token": token,
                        "addr": addr,
                        "manager_addr": advertise,
                        "description": node_description(self.cfg.hostname, ENGINE_VERSION),
                    },
                    deadline=15,
                )
            except aio.AioRpcError as e:
                raise SwarmError(400, f"cannot join the swarm at {remote}: {e.details()}") from e
            finally:
                await client.close()
            m = Membership(
                node_id=reply["node_id"],
                cluster_id=reply["cluster_id"],
                role=reply["role"],
                managers=[remote, *[a for a in reply.get("managers", []) if a != remote]],
                addr=addr,
                listen=listen if reply["role"] == "manager" else "",
                raft_id=int(reply.get("raft_id") or 0),
                advertise=advertise if reply["role"] == "manager" else "",
            )
            if m.role == "manager":
                shutil.rmtree(self.manager_dir, ignore_errors=True)
                known = {int(k): str(v) for k, v in (reply.get("raft_members") or {}).items()}
                try:
                    await self._start_manager(m, bootstrap=False, known=known)
                    await self._caught_up(m)
                except (OSError, TimeoutError) as e:
                    await self._teardown(cleanup=True)
                    raise SwarmError(
                        400,
                        f"joined the swarm but could not become a manager: {e}; "
                        "`swarm leave --force` here and check that the managers can reach "
                        f"{advertise}",
                    ) from e
            self._save(m)
            await self._run(m)

    async def _caught_up(self, m: Membership) -> None:
        """A joining manager returns once Raft counts it as a voter and its store has it."""
        assert self.manager is not None
        raft, store = self.manager.raft, self.manager.store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + JOIN_CATCH_UP
        while not (m.raft_id in raft.voters() and store.get(Node, m.node_id) is not None):
            if loop.time() > deadline:
                raise TimeoutError(
                    f"the managers did not take this node in within {JOIN_CATCH_UP:.0f} s"
                )
            await asyncio.sleep(0.1)

    async def leave(self, force: bool) -> None:
        async with self._lock:
            if self.membership is None:
                raise SwarmError(503, "This node is not part of a swarm")
            if self.membership.role == "manager" and not force:
                raise SwarmError(
                    503,
                    "You are attempting to leave the swarm on a node that is "
                    "participating as a manager. Removing the last manager "
                    "erases all current state of the swarm. Use `--force` to "
                    "ignore this message.",
                )
            await self._teardown(cleanup=True)
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.manager_dir, ignore_errors=True)
            shutil.rmtree(self.cfg.data_root / "tasks", ignore_errors=True)

    async def _teardown(self, cleanup: bool) -> None:
        if self._role_task is not None:
            self._role_task.cancel()
            self._role_task = None
        if self.agent is not None:
            log.info("stopping the agent and its tasks")
            await self.agent.stop()
            self.agent = None
        if self.mesh is not None:
            log.info("stopping shoal-mesh%s", " and removing the data plane" if cleanup else "")
            await self.mesh.stop(cleanup)
            self.mesh = None
        if self.manager is not None:
            log.info("stopping the manager")
            await self.manager.stop()
            self.manager = None
        self.membership = None

    async def shutdown(self) -> None:
        """shoald stops: tasks stop, the data plane stays (established connections live on)."""
        async with self._lock:
            await self._teardown(cleanup=False)


def default_hostname() -> str:
    return os.uname().nodename
