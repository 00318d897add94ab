"""A node's swarm membership: what shoald runs once it is part of a swarm.

Every node runs an agent and a shoal-mesh; a manager also runs the store, the control loops and
the dispatcher behind its gRPC listener. The membership (node ID, role, how to reach a manager)
is kept in <data-root>/node.json, so a restarted shoald picks up where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grpc import aio

from orchestrator.agent.agent import Agent, AgentConfig, node_description
from orchestrator.agent.meshfeed import MeshFeed
from orchestrator.api.convert import default_cluster_spec
from orchestrator.api.docker import ENGINE_VERSION
from orchestrator.manager import allocator
from orchestrator.manager.dispatcher import Dispatcher
from orchestrator.manager.manager import Manager
from orchestrator.rpc import jsonrpc
from orchestrator.store.ids import new_id
from orchestrator.store.log import LocalLog
from orchestrator.store.objects import Cluster, Node
from orchestrator.store.store import Store, Tx

log = logging.getLogger("shoal.node")

DEFAULT_PORT = 2377
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
    manager: str  # host:port the agent dials
    addr: str  # this node's advertised address
    listen: str  # host:port managers listen on


class ManagerRuntime:
    """The store, the control loops and the gRPC listener of a manager."""

    def __init__(self, data_dir: Path):
        self.store = Store(LocalLog(data_dir / "raft"))
        self.manager = Manager(self.store)
        self.dispatcher = Dispatcher(self.store)
        self.server: aio.Server | None = None

    async def start(self, listen: str) -> None:
        await self.store.log.start()
        self.server = jsonrpc.server()
        self.server.add_generic_rpc_handlers([self.dispatcher.handler()])
        if self.server.add_insecure_port(listen) == 0:
            raise OSError(f"cannot listen on {listen}")
        await self.server.start()
        self.dispatcher.start()
        self.manager.start()

    async def stop(self) -> None:
        await self.manager.stop()
        await self.dispatcher.stop()
        if self.server is not None:
            await self.server.stop(grace=1)
        await self.store.log.close()


class MeshProcess:
    """The node's shoal-mesh, restarted if it dies."""

    def __init__(self, state: Path, run_dir: Path, metrics_addr: str, lb_backend: str):
        self.state, self.run_dir = state, run_dir
        self.cmd = [
            sys.executable,
            "-m",
            "mesh.cli",
            "run",
            "--state",
            str(state),
            "--run-dir",
            str(run_dir),
            "--metrics-addr",
            metrics_addr,
            "--lb-backend",
            lb_backend,
        ]
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._started_at = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise())

    def nudge(self) -> None:
        """Wake shoal-mesh now for a new state (SIGHUP) rather than at its next poll of the
        file. Only once it has synced since it started: before, SIGHUP would kill it."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            if (self.run_dir / "applied").stat().st_mtime < self._started_at:
                return
        except OSError:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)

    async def _supervise(self) -> None:
        backoff = 0.5
        log_path = self.run_dir / "shoal-mesh.log"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            out = await asyncio.to_thread(open, log_path, "ab")
            with out:
                self._started_at = time.time()
                self.proc = await asyncio.create_subprocess_exec(
                    *self.cmd, stdout=out, stderr=out, start_new_session=True
                )
            code = await self.proc.wait()
            log.warning(
                "shoal-mesh exited with %s; restarting in %.1f s (log: %s)", code, backoff, log_path
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10)

    async def stop(self, cleanup: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        if cleanup:
            await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "mesh.cli",
                    "cleanup",
                    "--state",
                    str(self.state),
                    "--run-dir",
                    str(self.run_dir),
                ],
                capture_output=True,
            )


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


class NodeRuntime:
    """A node's membership and everything it runs."""

    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.membership: Membership | None = None
        self.manager: ManagerRuntime | None = None
        self.agent: Agent | None = None
        self.mesh: MeshProcess | None = None
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self.cfg.data_root / "node.json"

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
        m = Membership(**json.loads(self.path.read_text()))
        await self._run(m)
        log.info("resumed as %s %s of cluster %s", m.role, m.node_id, m.cluster_id)

    async def _run(self, m: Membership) -> None:
        self.membership = m
        if m.role == "manager":
            self.manager = ManagerRuntime(self.cfg.data_root / "manager")
            await self.manager.start(m.listen)
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
                manager=m.manager,
                addr=m.addr,
                data_dir=self.cfg.data_root,
                netns_prefix=self.cfg.netns_prefix,
                description=node_description(self.cfg.hostname, ENGINE_VERSION),
            ),
            feed,
        )
        self.agent.start()

    def _save(self, m: Membership) -> None:
        self.cfg.data_root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(m), indent=1))
        tmp.replace(self.path)

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
                manager=advertise,
                addr=advertise.rsplit(":", 1)[0],
                listen=listen,
            )
            runtime = ManagerRuntime(self.cfg.data_root / "manager")
            shutil.rmtree(self.cfg.data_root / "manager", ignore_errors=True)
            await runtime.store.log.start()

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
                        state="unknown",
                        engine_version=ENGINE_VERSION,
                    )
                )

            await runtime.store.update(bootstrap)
            await runtime.store.log.close()
            self._save(m)
            try:
                await self._run(m)
            except OSError as e:
                await self._teardown(cleanup=True)
                raise SwarmError(400, f"cannot start the manager: {e}") from e
            return node_id

    async def join(self, remote: str, token: str, addr: str) -> None:
        async with self._lock:
            if self.membership is not None:
                raise SwarmError(
                    503,
                    'This node is already part of a swarm. Use "docker '
                    'swarm leave" to leave this swarm and join another one.',
                )
            client = jsonrpc.Client(remote)
            try:
                reply = await client.call(
                    "shoal.Dispatcher",
                    "Join",
                    {
                        "token": token,
                        "addr": addr,
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
                manager=remote,
                addr=addr,
                listen="",
            )
            self._save(m)
            await self._run(m)

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
            shutil.rmtree(self.cfg.data_root / "manager", ignore_errors=True)
            shutil.rmtree(self.cfg.data_root / "tasks", ignore_errors=True)

    async def _teardown(self, cleanup: bool) -> None:
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
