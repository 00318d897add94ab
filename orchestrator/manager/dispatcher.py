"""The dispatcher: the managers' side of every node's session.

gRPC service `shoal.Dispatcher`, on every manager (joining is the CA's: orchestrator/ca/server.py):
  Managers()                    -> the leader's address and every manager's
  Session(node_id, description) -> a stream: the node's assignments (its tasks, its mesh
                                   state, its role, the root it must trust and be issued
                                   from) whenever they change, and log requests
  Heartbeat(node_id)            -> the period to the next one; 3 missed and the node is DOWN
  UpdateTaskStatus(updates)     -> task states reported by the agent (never backwards)
  PublishLogs(request, frames)  -> log lines answering a log request

Sessions, heartbeats and statuses are the leader's: another manager answers them with
FAILED_PRECONDITION and the agent asks `Managers` where the leader is. A new leader gives
every node a full heartbeat grace period before it can be declared down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Histogram

from mesh.state import state_to_dict
from orchestrator.ca.server import described, issuing_root_digest
from orchestrator.ca.tls import peer_identity
from orchestrator.manager import netkeys
from orchestrator.manager.meshview import mesh_state
from orchestrator.manager.orchestrator.tasks import task_name
from orchestrator.rpc.jsonrpc import Context, Message, service
from orchestrator.store.ids import new_id, now_rfc3339, parse_rfc3339
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import (
    Cluster,
    Network,
    Node,
    NodeState,
    Role,
    Service,
    Task,
    TaskState,
)
from orchestrator.store.store import Store, Tx

log = logging.getLogger(__name__)

SERVICE = "shoal.Dispatcher"
DEFAULT_PERIOD = 5.0
MISSED_BEATS = 3
STATUS_BATCH = 0.1
MAX_STATUS_BACKOFF = 2.0


@dataclass
class ProgressClock:
    """Seconds that pass only while this process runs: a gap longer than `max_step` between
    two readings (its event loop, or the whole machine, stalled) counts as `max_step`.
    Heartbeat deadlines measured on it never blame the nodes for the manager's own stall,
    whose end finds their heartbeats still queued: the deadlines measure progress."""

    max_step: float
    _real: float = dataclasses.field(default_factory=time.monotonic)
    _now: float = 0.0

    def now(self) -> float:
        real = time.monotonic()
        self._now += min(max(real - self._real, 0.0), self.max_step)
        self._real = real
        return self._now


def heartbeat_period(store: Store) -> float:
    cluster = next(iter(store.list(Cluster)), None)
    ns = (cluster.spec.get("Dispatcher", {}).get("HeartbeatPeriod") if cluster else None) or 0
    return ns / 1e9 if ns else DEFAULT_PERIOD


@dataclass
class ManagerInfo:
    """What the dispatcher needs to know of the managers' Raft group."""

    leader_addr: Callable[[], str] = lambda: ""
    raft_members: Callable[[], dict[int, str]] = dict
    reachability: Callable[[], dict[int, str]] = dict  # the leader's view of each member


class Dispatcher:
    def __init__(
        self,
        store: Store,
        managers: ManagerInfo | None = None,
        registry: CollectorRegistry | None = None,
    ):
        """`registry`: where its metrics go (default: a registry of its own)."""
        self.store = store
        self.scheduling_delay = Histogram(
            "swarm_dispatcher_scheduling_delay_seconds",
            "Scheduling delay is the time a task takes to go from NEW to RUNNING state.",
            registry=registry if registry is not None else CollectorRegistry(),
            # an image pull and a health check may take minutes
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.managers = managers or ManagerInfo()
        self.term: int | None = None  # the leadership term it serves sessions in
        self.active = False
        self._sessions: dict[str, asyncio.Queue[Message]] = {}
        self._beats: dict[str, float] = {}  # node -> its last heartbeat, on self._clock
        self._clock = ProgressClock(DEFAULT_PERIOD)
        # node -> the newest store index its mesh has applied: a task being stopped gets its
        # stop signal once every ready node's load balancers have let it go
        self._applied: dict[str, int] = {}
        self._updates: list[tuple[str, Message]] = []
        self._log_streams: dict[str, asyncio.Queue[Message | None]] = {}
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def handler(self) -> grpc.GenericRpcHandler:
        return service(
            SERVICE,
            unary={
                "Managers": self.list_managers,
                "Heartbeat": self.heartbeat,
                "UpdateTaskStatus": self.update_task_status,
                "PublishLogs": self.publish_logs,
                "MeshApplied": self.mesh_applied,
            },
            streaming={"Session": self.session},
        )

    def start(self, term: int | None = None) -> None:
        """Serve sessions as the leader of `term`."""
        self.term = term
        self.active = True
        self._beats.clear()
        self._applied.clear()
        self._tasks = [
            asyncio.create_task(self._watch()),
            asyncio.create_task(self._monitor()),
            asyncio.create_task(self._write_statuses()),
        ]

    async def stop(self) -> None:
        self.active = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._updates.clear()
        for q in self._sessions.values():
            q.put_nowait({"closing": True})

    async def _leader_only(self, ctx: Context) -> None:
        if not self.active:
            leader = self.managers.leader_addr()
            await ctx.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this manager is not the leader (leader: {leader or 'unknown'})",
            )

    async def _caller(self, req: Message, ctx: Context) -> str:
        """The node a session, heartbeat or status report is from (leader only): the one its
        certificate names; a node speaks only for itself."""
        await self._leader_only(ctx)
        node_id = str(req.get("node_id", ""))
        caller = peer_identity(ctx)
        if caller is not None and caller.node_id != node_id:
            log.warning("node %s tried to speak for node %s: refused", caller.node_id, node_id)
            await ctx.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this certificate is node {caller.node_id}'s; it cannot speak for {node_id}",
            )
        return node_id

    def manager_addrs(self) -> list[str]:
        return sorted(
            n.manager_addr
            for n in self.store.list(Node)
            if n.role == Role.MANAGER and n.manager_addr
        )

    async def list_managers(self, req: Message, ctx: Context) -> Message:
        return {
            "leader": self.managers.leader_addr(),
            "managers": self.manager_addrs(),
            "reachability": {str(k): v for k, v in self.managers.reachability().items()},
        }

    # ---- sessions -----------------------------------------------------------------------

    async def session(self, req: Message, ctx: Context) -> AsyncIterator[Message]:
        node_id = await self._caller(req, ctx)
        node = self.store.get(Node, node_id)
        if node is None:
            await ctx.abort(
                grpc.StatusCode.NOT_FOUND,
                f"node {node_id} is not part of this swarm (removed?); leave and join again",
            )
        desc = req.get("description") or {}

        def ready(tx: Tx) -> None:
            current = tx.get(Node, node_id)
            if current is not None:
                tx.put(
                    dataclasses.replace(
                        current,
                        state=NodeState.READY,
                        message="",
                        addr=str(req.get("addr") or current.addr),
                        hostname=str(desc.get("hostname") or current.hostname),
                        engine_version=str(desc.get("engine_version") or current.engine_version),
                        **described(desc),
                    )
                )

        await self.store.update(ready, self.term)
        self.beat(node_id)
        queue: asyncio.Queue[Message] = asyncio.Queue()
        old = self._sessions.get(node_id)
        if old is not None:
            old.put_nowait({"closing": True})
        self._sessions[node_id] = queue
        log.info("session opened for node %s", node_id)
        last = ""
        try:
            yield {"period": heartbeat_period(self.store), "managers": self.manager_addrs()}
            queue.put_nowait({"recompute": True})
            while True:
                msg = await queue.get()
                if msg.get("closing"):
                    return
                if msg.get("recompute"):
                    if self.store.get(Node, node_id) is None:
                        return  # removed from the swarm: its session ends here
                    assignment = self.assignment(node_id)
                    encoded = json.dumps(assignment, sort_keys=True)
                    if encoded != last:
                        last = encoded
                        yield {"assignment": assignment}
                    continue
                yield msg
        finally:
            if self._sessions.get(node_id) is queue:
                del self._sessions[node_id]

    def assignment(self, node_id: str) -> Message:
        nodes, services = self.store.list(Node), self.store.list(Service)
        tasks, networks = self.store.list(Task), self.store.list(Network)
        names = {s.id: s.name for s in services}
        net_names = {n.id: n.name for n in networks}
        auths = {s.id: s.registry_auth for s in services if s.registry_auth}
        mine = []
        retained = []  # its tasks with nothing left to do, whose remains (logs) it keeps
        # Every ready node, with a session or between two: a node whose session dropped still
        # balances over its last view until it reconnects and applies a newer one.
        meshes = [n.id for n in nodes if n.state == NodeState.READY]
        for t in tasks:
            if t.node_id != node_id or t.state < TaskState.ASSIGNED:
                continue
            if t.desired_state > TaskState.RUNNING and t.state.terminal:
                retained.append(t.id)
                continue
            mine.append(
                {
                    "id": t.id,
                    "service_id": t.service_id,
                    "service_name": names.get(t.service_id, "unknown"),
                    "name": task_name(names.get(t.service_id, "unknown"), t),
                    "slot": t.slot,
                    "spec": t.spec,
                    **({"registry_auth": auths[t.service_id]} if t.service_id in auths else {}),
                    "desired_state": t.desired_state.api,
                    "state": t.state.api,
                    **({"drained": True} if self._drained(t, meshes) else {}),
                    "networks": [net_names.get(n, n) for n in t.networks],
                    "addresses": {net_names.get(k, k): v for k, v in t.addresses.items()},
                }
            )
        generation = self.store.index
        me = next((n for n in nodes if n.id == node_id), None)
        cluster = next(iter(self.store.list(Cluster)), None)
        out: Message = {
            "tasks": sorted(mine, key=lambda m: m["id"]),
            "retained": sorted(retained),
            "mesh": state_to_dict(
                mesh_state(
                    node_id, nodes, services, tasks, networks, generation, netkeys.for_mesh(cluster)
                )
            ),
            "role": me.role if me is not None else Role.WORKER,
        }
        if cluster is not None and cluster.root_ca_cert:
            out["trust"] = cluster.root_ca_cert
            out["cert_root"] = issuing_root_digest(cluster)
        if me is not None and me.role == Role.MANAGER:
            out["raft_id"] = me.raft_id
            out["raft_members"] = {str(k): v for k, v in self.managers.raft_members().items()}
        return out

    def _drained(self, task: Task, meshes: list[str]) -> bool:
        """A task being stopped that no load balancer sends new connections to any more: every
        ready node's mesh applied a view from after it was told to stop (the views leave out
        tasks not wanted running)."""
        if task.desired_state <= TaskState.RUNNING:
            return False
        return all(self._applied.get(nid, -1) >= task.meta.version for nid in meshes)

    async def mesh_applied(self, req: Message, ctx: Context) -> Message:
        node_id = await self._caller(req, ctx)
        index = req.get("index")
        if isinstance(index, int) and index > self._applied.get(node_id, -1):
            self._applied[node_id] = index
            stopping = {
                t.node_id
                for t in self.store.list(Task)
                if t.desired_state > TaskState.RUNNING and not t.state.terminal
            }
            for nid in stopping:  # their tasks may be drained now
                session = self._sessions.get(nid)
                if session is not None:
                    session.put_nowait({"recompute": True})
        return {}

    async def _watch(self) -> None:
        q = self.store.watch()
        try:
            while True:
                await q.get()
                while not q.empty():
                    q.get_nowait()
                for sq in self._sessions.values():
                    sq.put_nowait({"recompute": True})
                await asyncio.sleep(0.05)  # batch bursts of changes into one assignment
        finally:
            self.store.unwatch(q)

    # ---- health -------------------------------------------------------------------------

    async def heartbeat(self, req: Message, ctx: Context) -> Message:
        node_id = await self._caller(req, ctx)
        node = self.store.get(Node, node_id)
        if node is None:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"node {node_id} is not in this swarm")
        self.beat(node_id)
        # A node whose executor cannot run tasks (its container engine is gone) is down until
        # it can: the managers place its tasks elsewhere.
        trouble = str(req.get("executor_error") or "")[:1024]
        state, message = (NodeState.DOWN, trouble) if trouble else (NodeState.READY, "")
        if (
            node is not None
            and node_id in self._sessions
            and (node.state, node.message)
            != (
                state,
                message,
            )
        ):
            if trouble:
                log.warning("node %s cannot run tasks: %s", node_id, trouble)
            await self.store.update(lambda tx: self._mark(tx, node_id, state, message), self.term)
        return {"period": heartbeat_period(self.store)}

    def beat(self, node_id: str) -> None:
        """The node is alive now (a heartbeat, or its session opened)."""
        self._beats[node_id] = self._clock.now()

    @staticmethod
    def _mark(tx: Tx, node_id: str, state: NodeState, message: str) -> None:
        node = tx.get(Node, node_id)
        if node is not None and (node.state, node.message) != (state, message):
            tx.put(dataclasses.replace(node, state=state, message=message))

    async def _monitor(self) -> None:
        while True:
            period = heartbeat_period(self.store)
            self._clock.max_step = period
            await asyncio.sleep(period / 2)
            now = self._clock.now()
            late = []
            for node in self.store.list(Node):
                last = self._beats.get(node.id)
                if last is None:
                    # not heard from since this leader started: its grace starts now (a node
                    # that just joined has not opened its session yet)
                    last = self._beats[node.id] = now
                if node.state != NodeState.DOWN and now - last > period * MISSED_BEATS:
                    late.append(node.id)
            if late:
                log.warning("nodes %s missed %d heartbeats: down", late, MISSED_BEATS)

                def down(tx: Tx, late: list[str] = late) -> None:
                    for nid in late:
                        self._mark(tx, nid, NodeState.DOWN, "heartbeat failure")

                try:
                    await self.store.update(down, self.term)
                except NotLeader as e:  # the next look marks them, if still silent
                    log.warning("nodes %s not marked down (%s)", late, e)

    # ---- task status --------------------------------------------------------------------

    async def update_task_status(self, req: Message, ctx: Context) -> Message:
        node_id = await self._caller(req, ctx)
        for u in req.get("updates", []):
            if isinstance(u, dict):
                self._updates.append((node_id, u))
        return {}

    async def _write_statuses(self) -> None:
        """Agents' reports, written in batches. A batch whose write fails (the managers too
        busy to commit it in time, or between leaders) is written again with the next: it
        was once lost with the loop that wrote them, and every task's state froze."""
        backoff = STATUS_BATCH
        while True:
            await asyncio.sleep(backoff)
            if not self._updates:
                continue
            batch, self._updates = self._updates, []
            try:
                running = await self.store.update(
                    functools.partial(apply_statuses, batch=batch), self.term
                )
            except NotLeader as e:  # NoQuorum too; a report only ever moves a task forward
                self._updates = batch + self._updates
                backoff = min(backoff * 2, MAX_STATUS_BACKOFF)
                log.warning("task states not written (%s); again in %.1f s", e, backoff)
                continue
            backoff = STATUS_BATCH
            now = time.time()
            for created_at in running:
                self.scheduling_delay.observe(max(now - parse_rfc3339(created_at), 0.0))

    # ---- logs ---------------------------------------------------------------------------

    def request_logs(self, node_id: str, request: Message) -> asyncio.Queue[Message | None]:
        """Ask a node for task logs; frames arrive on the returned queue, None at the end."""
        rid = new_id()
        q: asyncio.Queue[Message | None] = asyncio.Queue()
        self._log_streams[rid] = q
        session = self._sessions.get(node_id)
        if session is None:
            q.put_nowait(None)
        else:
            session.put_nowait({"logs": {**request, "request_id": rid}})
        return q

    def cancel_logs(self, q: asyncio.Queue[Message | None]) -> None:
        for rid, stream in list(self._log_streams.items()):
            if stream is q:
                del self._log_streams[rid]
                for session in self._sessions.values():
                    session.put_nowait({"logs_cancel": rid})

    async def publish_logs(self, req: Message, ctx: Context) -> Message:
        q = self._log_streams.get(str(req.get("request_id", "")))
        if q is None:
            return {"cancel": True}
        for frame in req.get("frames", []):
            q.put_nowait(frame)
        if req.get("done"):
            q.put_nowait(None)
            self._log_streams.pop(str(req.get("request_id")), None)
        return {}

    def connected(self, node_id: str) -> bool:
        return node_id in self._sessions


def apply_statuses(tx: Tx, batch: list[tuple[str, Message]]) -> list[str]:
    """Agents' reports, kept only when they move a task forward, on the node that runs it.
    Returns when each task it moved to RUNNING was created (its scheduling delay)."""
    running = []
    for node_id, u in batch:
        task = tx.get(Task, str(u.get("id", "")))
        if task is None or task.node_id != node_id:
            continue
        try:
            state = TaskState.parse(str(u.get("state", "")))
        except KeyError:
            continue
        if state <= task.state:
            continue
        container = u.get("container") if isinstance(u.get("container"), dict) else {}
        tx.put(
            dataclasses.replace(
                task,
                state=state,
                timestamp=str(u.get("timestamp") or now_rfc3339()),
                message=str(u.get("message", "")),
                err=str(u.get("err", "")),
                container={**task.container, **(container or {})},
            )
        )
        if state == TaskState.RUNNING and task.meta.created_at:
            running.append(task.meta.created_at)
    return running
