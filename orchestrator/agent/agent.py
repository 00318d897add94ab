"""The agent: every node's side of its session with the managers.

It holds the session stream open (reconnecting with backoff when a manager goes away, without
touching running tasks), heartbeats at the period the dispatcher asks for, runs the tasks it is
assigned through its executor (orchestrator/agent/exec/), reports their states in batches, keeps
the node's shoal-mesh fed, and answers log requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge

from orchestrator.agent.exec.base import Executor, TaskInfo
from orchestrator.agent.exec.runner import Hooks, TaskRunner
from orchestrator.agent.meshfeed import MeshFeed
from orchestrator.rpc.jsonrpc import Client, Message
from orchestrator.store.ids import now_rfc3339
from orchestrator.store.objects import TaskState

log = logging.getLogger(__name__)

DISPATCHER = "shoal.Dispatcher"
STATUS_BATCH = 0.1
# Tasks making their namespaces together hand them to shoal-mesh in one state (one sync for
# all of them rather than one per task), waiting at most this long for the slowest.
FEED_BATCH = 0.25
MAX_BACKOFF = 8.0
HEARTBEAT_GRACE = 3  # periods: the dispatcher marks a node down after this many missed
LOG_BATCH = 200
LOG_FLUSH = 0.2  # seconds between batches of a followed log
SWEEP_EVERY = 5.0  # seconds between removals of deleted tasks' remains
MESH_REPORT = 0.05  # seconds between looks at what the node's mesh has applied


@dataclass
class AgentConfig:
    node_id: str
    managers: list[str]  # host:port of the managers it knows, the one to try first first
    addr: str  # this node's address
    data_dir: Path
    hostname: str
    executor: Executor
    description: dict[str, Any]
    # a mutual-TLS channel to a manager, with the node's current certificate
    channel: Callable[[str], aio.Channel] | None = None
    # told the managers' addresses whenever they change (the node keeps them for restarts)
    on_managers: Callable[[list[str]], None] | None = None
    # told what each assignment says of this node: {"role", "raft_id", "raft_members",
    # "trust", "cert_root"}
    on_node: Callable[[Message], None] | None = None


class Agent:
    def __init__(self, cfg: AgentConfig, feed: MeshFeed, registry: CollectorRegistry | None = None):
        """`registry`: where its metrics go (default: a registry of its own)."""
        self.cfg = cfg
        self.registry = registry if registry is not None else CollectorRegistry()
        self.session_reconnects = Counter(
            "shoal_agent_session_reconnects_total",
            "Times the node's session with the managers ended (a manager gone, a new "
            "leader, a network cut) and the agent went to open another.",
            registry=self.registry,
        )
        self.heartbeat_failures = Counter(
            "shoal_agent_heartbeat_failures_total",
            "Heartbeats the managers did not answer in time or refused (each sent again).",
            registry=self.registry,
        )
        Gauge(
            "shoal_agent_session_connected",
            "1 while the node's session with the managers is open, else 0.",
            registry=self.registry,
        ).set_function(lambda: 1 if self.connected else 0)
        self.feed = feed
        self.runners: dict[str, TaskRunner] = {}
        self.connected = False
        self.period = 5.0
        self._statuses: list[Message] = []
        self._status_ready = asyncio.Event()
        self._log_tasks: dict[str, asyncio.Task[None]] = {}
        self._removals: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._client: Client | None = None
        self.managers = list(cfg.managers)
        self.manager = self.managers[0] if self.managers else ""  # the one it talks to
        self._feed_flush: asyncio.Future[int] | None = None
        self._netns_done = asyncio.Event()  # a task has made its namespace
        self.hooks = Hooks(report=self.report, network_ready=self.network_ready)
        self.executor = cfg.executor
        # tasks the managers still have (running or history); None until they have said
        self._keep: set[str] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._mesh_reporter: asyncio.Task[None] | None = None
        self._mesh_reported = -1  # the applied store index the managers were last told

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop everything: tasks (gracefully), the session."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await asyncio.gather(*(r.remove() for r in self.runners.values()), return_exceptions=True)
        self.runners.clear()
        for t in self._log_tasks.values():
            t.cancel()
        for loop in (self._sweeper, self._mesh_reporter):
            if loop is not None:
                loop.cancel()
        if self._client is not None:
            await self._client.close()

    # ---- the session --------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.5
        await self.executor.start(self.cfg.node_id)
        self._sweeper = asyncio.create_task(self._sweep())
        self._mesh_reporter = asyncio.create_task(self._report_mesh())
        sender = asyncio.create_task(self._send_statuses())
        try:
            while True:
                try:
                    await self._session()
                    backoff = 0.5
                except (grpc.aio.AioRpcError, OSError) as e:
                    self.connected = False
                    code = e.code() if isinstance(e, grpc.aio.AioRpcError) else None
                    if isinstance(e, grpc.aio.AioRpcError) and code == grpc.StatusCode.NOT_FOUND:
                        log.error("the managers do not know this node: %s", e.details())
                    else:
                        log.warning(
                            "session with %s lost: %s",
                            self.manager,
                            e.details() if isinstance(e, grpc.aio.AioRpcError) else e,
                        )
                self.connected = False
                self.session_reconnects.inc()
                if await self._find_leader():
                    backoff = 0.5
                    continue
                await asyncio.sleep(backoff + random.random() * backoff / 2)
                backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            sender.cancel()

    async def _find_leader(self) -> bool:
        """Ask the managers it knows where the leader is; switch to it. True if it did."""
        for addr in [self.manager, *[m for m in self.managers if m != self.manager]]:
            client = self._client_for(addr)
            try:
                reply = await client.call(DISPATCHER, "Managers", {}, deadline=2)
            except grpc.aio.AioRpcError:
                continue
            finally:
                await client.close()
            self._set_managers([str(m) for m in reply.get("managers", [])])
            leader = str(reply.get("leader") or "")
            if leader and leader != self.manager:
                log.info("the leader is at %s now", leader)
                self.manager = leader
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                return True
            return False
        return False

    def _client_for(self, addr: str) -> Client:
        channel = self.cfg.channel(addr) if self.cfg.channel is not None else None
        return Client(addr, channel)

    def _set_managers(self, managers: list[str]) -> None:
        if managers and sorted(managers) != sorted(self.managers):
            self.managers = managers
            if self.cfg.on_managers is not None:
                self.cfg.on_managers(list(managers))

    async def _session(self) -> None:
        if self._client is None:
            self._client = self._client_for(self.manager)
        call = self._client.stream(
            DISPATCHER,
            "Session",
            {
                "node_id": self.cfg.node_id,
                "addr": self.cfg.addr,
                "description": self.cfg.description,
            },
        )
        beat: asyncio.Task[None] | None = None
        try:
            async for msg in call:
                if "period" in msg:
                    self.period = float(msg["period"])
                    self.connected = True
                    self._mesh_reported = -1  # this manager may not know it yet
                    self._set_managers([str(m) for m in msg.get("managers", [])])
                    log.info("session open with %s", self.manager)
                    if beat is None:
                        beat = asyncio.create_task(self._heartbeat())
                elif "assignment" in msg:
                    await self._assign(msg["assignment"])
                elif "logs" in msg:
                    req = msg["logs"]
                    rid = str(req.get("request_id"))
                    self._log_tasks[rid] = asyncio.create_task(self._send_logs(req))
                elif "logs_cancel" in msg:
                    task = self._log_tasks.pop(str(msg["logs_cancel"]), None)
                    if task is not None:
                        task.cancel()
        finally:
            if beat is not None:
                beat.cancel()

    async def _heartbeat(self) -> None:
        """Heartbeats for as long as the session lasts. One that fails (a manager too busy to
        answer in time, a stream reset) is sent again soon: a node that stopped beating while
        its session stayed open would be marked down and stay down."""
        assert self._client is not None
        while True:
            try:
                reply = await self._client.call(
                    DISPATCHER,
                    "Heartbeat",
                    {"node_id": self.cfg.node_id, "executor_error": self.executor.health() or ""},
                    # a late answer still counts: wait as long as the managers' grace
                    deadline=self.period * HEARTBEAT_GRACE,
                )
            except grpc.aio.AioRpcError as e:
                self.heartbeat_failures.inc()
                log.warning("heartbeat to %s failed (%s); sending another", self.manager, e.code())
                await asyncio.sleep(min(1.0, self.period / 5))
                continue
            self.period = float(reply.get("period", self.period))
            await asyncio.sleep(self.period * (0.9 + random.random() * 0.1))

    # ---- assignments --------------------------------------------------------------------

    async def _assign(self, assignment: Message) -> None:
        if self.cfg.on_node is not None and "role" in assignment:
            keys = ("role", "raft_id", "raft_members", "trust", "cert_root")
            self.cfg.on_node({k: assignment[k] for k in keys if k in assignment})
        tasks = {t["id"]: t for t in assignment.get("tasks", [])}
        for tid in [t for t in self.runners if t not in tasks]:
            gone = self.runners.pop(tid)
            removal = asyncio.create_task(gone.remove())
            self._removals.add(removal)  # a reference until it is done
            removal.add_done_callback(self._removals.discard)
        for tid, msg in tasks.items():
            existing = self.runners.get(tid)
            if existing is not None:
                existing.update(str(msg.get("desired_state", "running")), bool(msg.get("drained")))
                continue
            try:
                task = TaskInfo.from_message(msg, self.cfg.node_id, self.cfg.hostname)
                runner = TaskRunner(
                    self.hooks,
                    task,
                    self.executor.controller(task),
                    str(msg.get("state", "assigned")),
                    str(msg["desired_state"]),
                )
            except (KeyError, TypeError, ValueError) as e:  # never from a manager of ours
                log.error("task %s: unreadable assignment: %s", tid, e)
                self.report(tid, TaskState.REJECTED, "unreadable assignment", str(e), {})
                continue
            self.runners[tid] = runner
            runner.start()
        self._keep = set(tasks) | {str(t) for t in assignment.get("retained", [])}
        self.feed.update(assignment.get("mesh"), self._netns_of)

    async def _report_mesh(self) -> None:
        """Tell the managers which view this node's mesh has applied, as soon as it has: a task
        being stopped gets its stop signal once every node's load balancers have let it go
        (the dispatcher says so in its assignment)."""
        while True:
            await asyncio.sleep(MESH_REPORT)
            if not self.connected or self._client is None:
                continue
            index = self.feed.applied_index()
            if index <= self._mesh_reported:
                continue
            try:
                await self._client.call(
                    DISPATCHER, "MeshApplied", {"node_id": self.cfg.node_id, "index": index}
                )
                self._mesh_reported = index
            except (grpc.aio.AioRpcError, OSError):
                pass  # next round

    async def _sweep(self) -> None:
        """Now and then, the remains of tasks the managers deleted go (their stopped
        containers, their logs), once the managers have said what they still have."""
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            if not self.connected or self._keep is None:
                continue
            # every round, not only when `keep` changes: a task still being released in one
            # round is swept in the next (the executor skips what it still holds)
            try:
                await self.executor.sweep(self._keep | set(self.runners))
            except Exception:  # the next round tries again
                log.exception("removing the remains of deleted tasks")

    def _netns_of(self, task_id: str) -> str | None:
        runner = self.runners.get(task_id)
        return runner.netns if runner is not None and runner.netns_made else None

    async def network_ready(self, task_id: str) -> str | None:
        self._netns_done.set()
        if self._feed_flush is None or self._feed_flush.done():
            self._feed_flush = asyncio.ensure_future(self._flush_feed())
        generation = await asyncio.shield(self._feed_flush)
        return await self.feed.wait(generation, task_id)

    async def _flush_feed(self) -> int:
        """Write the state once every namespace being made is there (or FEED_BATCH passed):
        its generation is the one the tasks waiting on it wait for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FEED_BATCH
        while any(r.making_netns for r in self.runners.values()):
            left = deadline - loop.time()
            if left <= 0:
                break
            self._netns_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._netns_done.wait(), left)
        return self.feed.update(None, self._netns_of)

    # ---- task status --------------------------------------------------------------------

    def report(
        self, task_id: str, state: TaskState, message: str, err: str, container: dict[str, Any]
    ) -> None:
        self._statuses.append(
            {
                "id": task_id,
                "state": state.api,
                "message": message,
                "err": err,
                "container": container,
                "timestamp": now_rfc3339(),
            }
        )
        self._status_ready.set()

    async def _send_statuses(self) -> None:
        while True:
            await self._status_ready.wait()
            await asyncio.sleep(STATUS_BATCH)
            if not self.connected or self._client is None:
                continue
            batch, self._statuses = self._statuses, []
            self._status_ready.clear()
            try:
                await self._client.call(
                    DISPATCHER, "UpdateTaskStatus", {"node_id": self.cfg.node_id, "updates": batch}
                )
            except (grpc.aio.AioRpcError, OSError):
                self._statuses = batch + self._statuses  # sent again once reconnected
                self._status_ready.set()
                await asyncio.sleep(0.5)

    # ---- logs ---------------------------------------------------------------------------

    async def _send_logs(self, req: Message) -> None:
        """Frames for a log request: each task's lines (its tail), then new ones if it
        follows, in batches."""
        assert self._client is not None
        rid = str(req.get("request_id"))
        tail = req.get("tail")
        since = int(req.get("since_ns") or 0)
        follow = bool(req.get("follow"))
        frames: list[Message] = []
        sending = asyncio.Lock()
        cancelled = asyncio.Event()  # the client went away

        async def flush(done: bool = False) -> None:
            nonlocal frames
            assert self._client is not None
            async with sending:
                batch, frames = frames, []
                reply = await self._client.call(
                    DISPATCHER, "PublishLogs", {"request_id": rid, "frames": batch, "done": done}
                )
            if reply.get("cancel"):
                cancelled.set()

        async def read(tid: str) -> None:
            lines = self.executor.logs(tid, tail if isinstance(tail, int) else None, since, follow)
            async for e in lines:
                frames.append({"task_id": tid, "t": e.time_ns, "s": e.stream, "l": e.line})
                if len(frames) >= LOG_BATCH:
                    await flush()
                if cancelled.is_set():
                    return

        readers = [asyncio.create_task(read(str(t))) for t in req.get("task_ids", [])]
        try:
            pending = set(readers)
            while pending and not cancelled.is_set():
                _, pending = await asyncio.wait(pending, timeout=LOG_FLUSH)
                if frames:
                    await flush()
            if cancelled.is_set():
                return
            for r in readers:
                if r.exception() is not None:
                    log.warning("reading logs of a task: %s", r.exception())
            await flush(done=True)
        except (grpc.aio.AioRpcError, OSError) as e:
            log.warning("sending logs: %s", e)
        except asyncio.CancelledError:
            with contextlib.suppress(grpc.aio.AioRpcError, OSError):
                await flush(done=True)
            raise
        finally:
            for r in readers:
                r.cancel()
            self._log_tasks.pop(rid, None)


def node_description(hostname: str, engine_version: str, executor: Executor) -> dict[str, Any]:
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "hostname": hostname,
        "engine_version": engine_version,
        "nano_cpus": (os.cpu_count() or 1) * 1_000_000_000,
        "memory_bytes": mem,
        **executor.description(),
    }
