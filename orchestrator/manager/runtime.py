"""A manager as shoald runs it: its Raft member and store, its listeners, and, while it
leads, the control loops.

Two gRPC listeners (docs/security.md says why two):
- the control port (`--listen-addr`, 2377): mutual TLS, every caller presents a node
  certificate of this swarm, and `POLICY` says which role may call what (Raft is for
  managers; the dispatcher for any node);
- the join port (2378): TLS without a client certificate, serving only the CA, where a node
  without a certificate yet fetches the root and trades its join token for one.

Every manager serves the store (reads after a read barrier, writes forwarded to the leader),
the CA and the dispatcher's Managers call. Only the leader runs the orchestrators, allocator,
scheduler and reaper (`Manager`), the node sessions (`Dispatcher`), Raft membership changes
(`RaftMembers`) and root rotations (`RootRotationLoop`), each started for the term it won and
fenced by it: once the term is over their writes are refused, and the loops are stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from pathlib import Path

from grpc import aio
from prometheus_client import CollectorRegistry

from orchestrator.ca.authz import Access, AuthInterceptor, Authorizer, DenyList, Policy
from orchestrator.ca.certs import NodeCertificates
from orchestrator.ca.rotation import RootRotationLoop
from orchestrator.ca.server import CAService
from orchestrator.ca.tls import join_address
from orchestrator.manager.autolock import KeySealer
from orchestrator.manager.dispatcher import SERVICE as DISPATCHER_SERVICE
from orchestrator.manager.dispatcher import Dispatcher, ManagerInfo
from orchestrator.manager.manager import Manager
from orchestrator.manager.members import RaftMembers
from orchestrator.manager.metrics import SwarmCollector
from orchestrator.manager.netkeys import NetworkKeyLoop
from orchestrator.raft.grpc_transport import CONTROL_SERVICE as RAFT_CONTROL_SERVICE
from orchestrator.raft.grpc_transport import LINK_OPTIONS, RAFT_SERVICE, GrpcTransport
from orchestrator.raft.node import RaftNode, RaftSettings
from orchestrator.raft.storage import on_disk
from orchestrator.rpc import jsonrpc
from orchestrator.store.objects import Cluster
from orchestrator.store.store import Store

log = logging.getLogger(__name__)

# Who may call what on a manager; a method not named here is refused to everyone.
POLICY = Policy(
    {
        "/shoal.CA/GetRootCACertificate": Access.JOIN,
        "/shoal.CA/IssueNodeCertificate": Access.JOIN,  # a certificate, if shown, is checked
        f"/{DISPATCHER_SERVICE}/*": Access.NODES,
        f"/{RAFT_SERVICE}/*": Access.MANAGERS,
        f"/{RAFT_CONTROL_SERVICE}/*": Access.MANAGERS,
    }
)


class ManagerRuntime:
    def __init__(
        self,
        data_dir: Path,
        raft_id: int,
        advertise: str,
        certs: NodeCertificates,
        bootstrap: bool = False,
        known: dict[int, str] | None = None,
        settings: RaftSettings | None = None,
        unlock_key: bytes | None = None,
    ):
        self.certs = certs
        # this manager's metrics for as long as it runs (the control loops' own, of the
        # term they run in, are in `self.manager.registry`: see registries())
        self.registry = CollectorRegistry(auto_describe=False)
        self.transport = GrpcTransport(lambda target: certs.channel(target, LINK_OPTIONS))
        self.raft = RaftNode(
            raft_id,
            advertise,
            on_disk(self.raft_dir(data_dir), unlock_key),
            self.transport,
            settings,
            bootstrap=bootstrap,
            known=known,
            registry=self.registry,
        )
        self.store = Store(self.raft, self.registry)
        self.registry.register(SwarmCollector(self.store, lambda: self.raft.is_leader))
        self.sealer = KeySealer(self.store, self.raft, unlock_key)
        info = ManagerInfo(
            leader_addr=self.leader_addr,
            raft_members=lambda: dict(self.raft.members),
            reachability=self.reachability,
        )
        self.dispatcher = Dispatcher(self.store, info, self.registry)
        self.ca = CAService(self.store, info.raft_members)
        self.authorizer = Authorizer(certs.identity.cluster_id, POLICY, self.deny_list)
        self.manager: Manager | None = None
        self.members: RaftMembers | None = None
        self.rotation: RootRotationLoop | None = None
        self.network_keys: NetworkKeyLoop | None = None
        self.server: aio.Server | None = None
        self.join_server: aio.Server | None = None
        self._leadership = asyncio.Lock()
        self._changes: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None

    def registries(self) -> list[CollectorRegistry]:
        """Where this manager's metrics are now: its own, and its control loops' while it
        leads."""
        loops = self.manager
        return [self.registry] + ([loops.registry] if loops is not None else [])

    @staticmethod
    def raft_dir(data_dir: Path) -> Path:
        return data_dir / "raft"

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
        client = jsonrpc.Client(addr, self.certs.channel(addr))
        try:
            reply = await client.call(DISPATCHER_SERVICE, "Managers", {}, deadline=2)
        except aio.AioRpcError:
            return out
        finally:
            await client.close()
        for rid, status in (reply.get("reachability") or {}).items():
            out[int(rid)] = str(status)
        return out

    def deny_list(self) -> DenyList:
        """Removed nodes, refused until their last certificate expires (from the store)."""
        cluster = next(iter(self.store.list(Cluster)), None)
        if cluster is None:
            return DenyList()
        return DenyList(
            node_ids={
                node: datetime.fromisoformat(until) if until else None
                for node, until in cluster.denied_nodes.items()
            }
        )

    async def start(self, listen: str) -> None:
        guard = [AuthInterceptor(self.authorizer)]
        self.server = jsonrpc.server(guard)
        self.server.add_generic_rpc_handlers(
            [self.dispatcher.handler(), self.ca.handler(), *self.transport.handlers()]
        )
        if self.server.add_secure_port(listen, self.certs.source.control_server_credentials()) == 0:
            raise OSError(f"cannot listen on {listen}")
        self.join_server = jsonrpc.server(guard)
        self.join_server.add_generic_rpc_handlers([self.ca.handler()])
        joins = join_address(listen)
        join_creds = self.certs.source.join_server_credentials()
        if self.join_server.add_secure_port(joins, join_creds) == 0:
            raise OSError(f"cannot listen on {joins} (the join port)")
        await self.server.start()
        await self.join_server.start()
        self.raft.on_leadership(self._on_leadership)
        await self.raft.start()
        self._watch = asyncio.create_task(self._watch_raft(), name="raft-watch")
        self.sealer.start()

    async def _watch_raft(self) -> None:
        """A Raft node that stops on its own broke an invariant (or lost its storage): this
        manager stops serving, as etcd's panic stops etcd, rather than answer from a log that
        may have diverged. shoald goes on as a node and does not start it again (its role is
        still manager, so the upkeep leaves it be): restarting shoald does, once the cause is
        dealt with."""
        try:
            await self.raft.wait()
        except Exception:
            log.critical(
                "%s; this manager stops serving (restart shoald to start it again)",
                self.raft.failure,
                exc_info=True,
            )
            await self.stop()

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
            self.rotation = RootRotationLoop(self.store, term)
            self.network_keys = NetworkKeyLoop(self.store, term)
            self.dispatcher.start(term)
            self.manager.start()
            self.members.start()
            self.rotation.start()
            self.network_keys.start()

    async def _stop_loops(self) -> None:
        if self.manager is not None:
            log.info("stopping the control loops")
            await self.manager.stop()
            self.manager = None
        if self.members is not None:
            await self.members.stop()
            self.members = None
        if self.rotation is not None:
            await self.rotation.stop()
            self.rotation = None
        if self.network_keys is not None:
            await self.network_keys.stop()
            self.network_keys = None
        if self.dispatcher.active:
            await self.dispatcher.stop()

    async def stop(self) -> None:
        """Stop everything (once: later calls wait for the first to finish)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        for change in list(self._changes):
            change.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await change
        async with self._leadership:
            await self._stop_loops()
        await self.sealer.stop()
        for server in (self.server, self.join_server):
            if server is not None:
                await server.stop(grace=1)
        await self.raft.close()
