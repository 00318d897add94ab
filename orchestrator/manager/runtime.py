"""A manager as shoald runs it: its Raft member and store, its gRPC listener, and, while it
leads, the control loops.

Every manager serves the store (reads after a read barrier, writes forwarded to the leader)
and the dispatcher's Join and Managers calls. Only the leader runs the orchestrators,
allocator, scheduler and reaper (`Manager`), the node sessions (`Dispatcher`) and Raft
membership changes (`RaftMembers`), each started for the term it won and fenced by it: once
the term is over their writes are refused, and the loops are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from grpc import aio

from orchestrator.manager.dispatcher import SERVICE as DISPATCHER_SERVICE
from orchestrator.manager.dispatcher import Dispatcher, ManagerInfo
from orchestrator.manager.manager import Manager
from orchestrator.manager.members import RaftMembers
from orchestrator.rpc import jsonrpc
from orchestrator.store.raftlog import RaftLog, RaftSettings
from orchestrator.store.store import Store

log = logging.getLogger("shoal.manager")


class ManagerRuntime:
    def __init__(
        self,
        data_dir: Path,
        raft_id: int,
        advertise: str,
        bootstrap: bool = False,
        known: dict[int, str] | None = None,
        settings: RaftSettings | None = None,
    ):
        self.raft = RaftLog(
            data_dir / "raft", raft_id, advertise, settings, bootstrap=bootstrap, known=known
        )
        self.store = Store(self.raft)
        self.dispatcher = Dispatcher(
            self.store,
            ManagerInfo(
                leader_addr=self.leader_addr,
                raft_members=lambda: dict(self.raft.members),
                reachability=self.reachability,
            ),
        )
        self.manager: Manager | None = None
        self.members: RaftMembers | None = None
        self.server: aio.Server | None = None
        self._leadership = asyncio.Lock()
        self._changes: set[asyncio.Task[None]] = set()

    def leader_addr(self) -> str:
        return self.raft.members.get(self.raft.leader, "")

    def reachability(self) -> dict[int, str]:
        """Leader only (else empty): each Raft member as this leader sees it."""
        if not self.raft.is_leader:
            return {}
        return {
            rid: "reachable" if self.raft.reachable(rid) else "unreachable"
            for rid in self.raft.voters() | self.raft.learners()
        }

    async def manager_statuses(self) -> dict[int, str]:
        """Raft ID -> reachable | unreachable | unknown for every member, from the leader."""
        if self.raft.is_leader:
            return self.reachability()
        members = self.raft.voters() | self.raft.learners()
        out = dict.fromkeys(members, "unknown")
        out[self.raft.id] = "reachable"
        addr = self.leader_addr()
        if not addr:
            return out
        client = jsonrpc.Client(addr)
        try:
            reply = await client.call(DISPATCHER_SERVICE, "Managers", {}, deadline=2)
        except aio.AioRpcError:
            return out
        finally:
            await client.close()
        for rid, status in (reply.get("reachability") or {}).items():
            out[int(rid)] = str(status)
        return out

    async def start(self, listen: str) -> None:
        self.server = jsonrpc.server()
        self.server.add_generic_rpc_handlers([self.dispatcher.handler(), *self.raft.handlers()])
        if self.server.add_insecure_port(listen) == 0:
            raise OSError(f"cannot listen on {listen}")
        await self.server.start()
        self.raft.on_leadership(self._on_leadership)
        await self.raft.start()

    async def wait_leader(self, within: float) -> None:
        """Until some manager leads (this one, for a new cluster); NoQuorum-like OSError if not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self.leader_addr():
            if loop.time() > deadline:
                raise OSError("no manager was elected leader; are more than half online?")
            await asyncio.sleep(0.05)

    def _on_leadership(self, leading: bool, term: int) -> None:
        change = asyncio.create_task(self._switch(leading, term))
        self._changes.add(change)
        change.add_done_callback(self._changes.discard)

    async def _switch(self, leading: bool, term: int) -> None:
        async with self._leadership:
            await self._stop_loops()
            if not leading or self.raft.term != term or not self.raft.is_leader:
                return
            log.info("leading in term %d: starting the control loops", term)
            self.manager = Manager(self.store, term)
            self.members = RaftMembers(self.store, self.raft)
            self.dispatcher.start(term)
            self.manager.start()
            self.members.start()

    async def _stop_loops(self) -> None:
        if self.manager is not None:
            log.info("stopping the control loops")
            await self.manager.stop()
            self.manager = None
        if self.members is not None:
            await self.members.stop()
            self.members = None
        if self.dispatcher.active:
            await self.dispatcher.stop()

    async def stop(self) -> None:
        for change in list(self._changes):
            change.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await change
        async with self._leadership:
            await self._stop_loops()
        if self.server is not None:
            await self.server.stop(grace=1)
        await self.raft.close()
