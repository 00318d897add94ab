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
import contextlib
import dataclasses
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from grpc import aio
from prometheus_client import CollectorRegistry

from orchestrator.agent.agent import Agent, AgentConfig, node_description
from orchestrator.agent.exec.base import Executor
from orchestrator.agent.exec.select import DEFAULT_ENGINE, make_executor
from orchestrator.agent.meshfeed import MeshFeed
from orchestrator.agent.meshprocess import MeshProcess
from orchestrator.ca.certs import NodeCertificates
from orchestrator.ca.pki import NodeCSR, PKIError, RootCA, verify_chain
from orchestrator.ca.server import SERVICE as CA_SERVICE
from orchestrator.ca.server import cert_expiry
from orchestrator.ca.tls import NodeCredentials, fetch_root_ca, join_address, join_channel
from orchestrator.ca.tokens import JoinToken, TokenError, UnlockKey
from orchestrator.manager import allocator
from orchestrator.manager.autolock import autolocked
from orchestrator.manager.runtime import ManagerRuntime
from orchestrator.manager.spec import NetworkDefaults, default_cluster_spec
from orchestrator.metrics import (
    NodeIdentity,
    NodeInfoCollector,
    NodeMetricsServer,
    RegistriesCollector,
)
from orchestrator.raft import sealing
from orchestrator.rpc import jsonrpc
from orchestrator.rpc.jsonrpc import Message
from orchestrator.store.ids import new_id, new_raft_id
from orchestrator.store.objects import Cluster, Node, NodeState, Role
from orchestrator.store.store import Tx

log = logging.getLogger(__name__)

DEFAULT_PORT = 2377
ENGINE_VERSION = "28.2.2-shoal"  # the Docker Engine release whose API shoald serves
JOIN_CATCH_UP = 30.0  # seconds a joining manager may take to receive the store
INIT_SETTLE = 10.0  # seconds init waits for its node's first session


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
    cert_root: str = ""  # hex digest of the root CA its certificate was issued under

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
    executor: str = "auto"  # auto | container | native
    engine: str = DEFAULT_ENGINE  # the container engine's API


@dataclass
class _Told:
    """What the managers last said about this node in its assignments."""

    role: str
    raft_id: int = 0
    raft_members: dict[int, str] = field(default_factory=dict)
    trust: str = ""  # PEM of the root every node must trust
    cert_root: str = ""  # digest of the root certificates are issued under (rotation)

    @staticmethod
    def parse(msg: Message, role: str) -> _Told:
        return _Told(
            str(msg.get("role") or role),
            int(msg.get("raft_id") or 0),
            {int(k): str(v) for k, v in (msg.get("raft_members") or {}).items()},
            str(msg.get("trust") or ""),
            str(msg.get("cert_root") or ""),
        )


class NodeRuntime:
    """A node's membership and everything it runs."""

    def __init__(self, cfg: NodeConfig, registry: CollectorRegistry | None = None):
        """`registry`: shoald's metrics (the API's go there too); the node adds its own and
        reads its agent's and manager's through it, served on :9323 while in a swarm."""
        self.cfg = cfg
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(NodeInfoCollector(self._metrics_membership))
        self.registry.register(RegistriesCollector(self._component_registries))
        self.metrics: NodeMetricsServer | None = None
        self.membership: Membership | None = None
        self.manager: ManagerRuntime | None = None
        self.agent: Agent | None = None
        self.mesh: MeshProcess | None = None
        self.certs: NodeCertificates | None = None
        self._lock = asyncio.Lock()
        self._told: _Told | None = None
        self._told_changed = asyncio.Event()
        self._upkeep_task: asyncio.Task[None] | None = None
        self._executor: Executor | None = None
        # a manager whose Raft data is sealed under the unlock key, waiting for `swarm unlock`
        self.locked = False

    @property
    def path(self) -> Path:
        return self.cfg.data_root / "node.json"

    @property
    def executor(self) -> Executor:
        """How this node runs tasks, chosen once when shoald starts (resume)."""
        if self._executor is None:
            raise RuntimeError("the executor is chosen in resume()")
        return self._executor

    def _metrics_membership(self) -> NodeIdentity | None:
        m = self.membership
        if m is None:
            return None
        return NodeIdentity(m.cluster_id, m.node_id, m.role == "manager")

    def _component_registries(self) -> list[CollectorRegistry]:
        agent, manager = self.agent, self.manager
        return ([agent.registry] if agent is not None else []) + (
            manager.registries() if manager is not None else []
        )

    def _description(self) -> dict[str, Any]:
        return node_description(self.cfg.hostname, ENGINE_VERSION, self.executor)

    @property
    def task_dir(self) -> Path:
        """The native executor's task logs."""
        return self.cfg.data_root / "tasks"

    @property
    def manager_dir(self) -> Path:
        return self.cfg.data_root / "manager"

    @property
    def cert_dir(self) -> Path:
        return self.cfg.data_root / "certificates"

    @property
    def state(self) -> str:
        if self.membership is None:
            return "inactive"
        if self.locked:
            return "locked"
        if self.agent is not None and not self.agent.connected:
            return "pending"
        return "active"

    async def resume(self) -> None:
        """Choose the executor; rejoin what node.json says we are part of (after a
        restart)."""
        if self._executor is None:
            self._executor = await make_executor(
                self.cfg.executor, self.cfg.engine, self.cfg.netns_prefix, self.cfg.data_root
            )
        if not self.path.exists():
            return
        m = Membership.load(self.path)
        self.certs = NodeCertificates.load(self.cert_dir)
        if self.certs is None:
            log.error(
                "node.json says this node is in swarm %s but its certificate is missing from "
                "%s: `swarm leave --force` and join again",
                m.cluster_id,
                self.cert_dir,
            )
            return
        if m.role == "manager" and sealing.is_locked(ManagerRuntime.raft_dir(self.manager_dir)):
            self.membership, self.locked = m, True
            log.warning(
                "this manager is locked (autolock): its Raft data is encrypted; nothing runs "
                "until `shoal swarm unlock` gives it the unlock key"
            )
            return
        if m.role == "manager":
            await self._start_manager(m, bootstrap=False, known={})
        await self._run(m)
        log.info("resumed as %s %s of cluster %s", m.role, m.node_id, m.cluster_id)

    async def unlock(self, text: str) -> None:
        """`swarm unlock`: open a locked manager's Raft data with the unlock key and run."""
        async with self._lock:
            m = self.membership
            if m is None:
                raise SwarmError(503, "This node is not part of a swarm")
            if not self.locked:
                raise SwarmError(503, "swarm is not locked")
            try:
                key = UnlockKey.parse(text)
                # checked before anything starts listening; reads only
                await asyncio.to_thread(
                    sealing.load, ManagerRuntime.raft_dir(self.manager_dir), key.key
                )
            except (TokenError, sealing.WrongUnlockKey) as e:
                raise SwarmError(400, f"swarm could not be unlocked: {e}") from e
            await self._start_manager(m, bootstrap=False, known={}, unlock_key=key.key)
            self.locked = False
            await self._run(m)
            log.info("unlocked: running as manager %s of cluster %s", m.node_id, m.cluster_id)

    async def _start_manager(
        self,
        m: Membership,
        bootstrap: bool,
        known: dict[int, str],
        unlock_key: bytes | None = None,
    ) -> None:
        assert self.certs is not None
        runtime = ManagerRuntime(
            self.manager_dir,
            m.raft_id,
            m.advertise,
            self.certs,
            bootstrap=bootstrap,
            known=known,
            unlock_key=unlock_key,
        )
        await runtime.start(m.listen or f"0.0.0.0:{DEFAULT_PORT}")
        self.manager = runtime

    async def _run(self, m: Membership) -> None:
        self.membership = m
        mesh_dir = self.cfg.data_root / "mesh"
        feed = MeshFeed(mesh_dir / "state.json", mesh_dir / "run", m.node_id, m.addr)
        feed.update(None, lambda _: None)
        self.mesh = self._mesh_process(m)
        self.mesh.start()
        feed.on_write = self.mesh.nudge
        self.metrics = NodeMetricsServer(
            self.registry, self.mesh.metrics_socket, m.addr, self.cfg.metrics_port
        )
        try:
            await self.metrics.start()
        except OSError as e:  # the node runs without its metrics rather than not at all
            log.error("cannot serve metrics on %s:%d: %s", m.addr, self.cfg.metrics_port, e)
        self.agent = Agent(
            AgentConfig(
                node_id=m.node_id,
                managers=m.managers,
                addr=m.addr,
                data_dir=self.cfg.data_root,
                hostname=self.cfg.hostname,
                executor=self.executor,
                description=self._description(),
                channel=self._channel,
                on_managers=self._managers_changed,
                on_node=self._told_about_me,
            ),
            feed,
        )
        self.agent.start()
        self._upkeep_task = asyncio.create_task(self._upkeep(), name="node-upkeep")

    def _mesh_process(self, m: Membership) -> MeshProcess:
        mesh_dir = self.cfg.data_root / "mesh"
        return MeshProcess(mesh_dir / "state.json", mesh_dir / "run", self.cfg.lb_backend)

    def _channel(self, target: str) -> aio.Channel:
        assert self.certs is not None
        return self.certs.channel(target)

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

    def _told_about_me(self, msg: Message) -> None:
        m = self.membership
        if m is None:
            return
        told = _Told.parse(msg, m.role)
        if told != self._told:
            self._told = told
            self._told_changed.set()

    async def _upkeep(self) -> None:
        """Keep the node's certificate and role in line with what the managers say: renew at
        50-80% of the lifetime, or at once for a new role or a root rotation; trust the new
        root once the certificate chains to it; start or stop the manager."""
        assert self.certs is not None
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self.certs.renew_in()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._told_changed.wait(), max(renew_at - loop.time(), 0.0))
            self._told_changed.clear()
            try:
                if await self._renew_if_needed(loop.time() >= renew_at):
                    renew_at = loop.time() + self.certs.renew_in()
                if self._told is not None:
                    if self._told.trust:
                        self.certs.trust(self._told.trust)
                    await self._apply_role(self._told)
            except Exception as e:  # the managers may be away: try again soon
                log.warning("node upkeep failed (%s); retrying", e)
                renew_at = loop.time() + 5
                await asyncio.sleep(1)

    async def _renew_if_needed(self, due: bool) -> bool:
        assert self.certs is not None and self.agent is not None
        m, told = self.membership, self._told
        if m is None:
            return False
        reason = "it is time" if due else None
        if told is not None and told.role != self.certs.identity.role.value:
            reason = f"the node is now a {told.role}"
        elif told is not None and told.cert_root and told.cert_root != m.cert_root:
            reason = "the swarm's root CA is being rotated"
        if reason is None:
            return False
        log.info("renewing the node certificate: %s", reason)
        managers = [
            self.agent.manager,
            *[a for a in self.agent.managers if a != self.agent.manager],
        ]
        m.cert_root = await self.certs.renew(managers)
        self._save(m)
        return True

    async def _apply_role(self, told: _Told) -> None:
        async with self._lock:
            m = self.membership
            if m is None or self.certs is None:
                return
            if told.role == "manager" and self.manager is None:
                if not told.raft_id or self.certs.identity.role.value != "manager":
                    return  # its manager certificate first
                m.role, m.raft_id = "manager", told.raft_id
                m.advertise = m.advertise or f"{m.addr}:{DEFAULT_PORT}"
                log.info("promoted: starting a manager (raft member %d)", m.raft_id)
                shutil.rmtree(self.manager_dir, ignore_errors=True)
                await self._start_manager(m, bootstrap=False, known=told.raft_members)
                self._save(m)
            elif told.role == "worker" and self.manager is not None:
                log.info("demoted: stopping the manager")
                runtime, self.manager = self.manager, None
                await runtime.stop()
                shutil.rmtree(self.manager_dir, ignore_errors=True)
                m.role, m.raft_id = "worker", 0
                self._save(m)

    async def init(
        self,
        listen: str,
        advertise: str,
        spec: dict[str, Any],
        networking: NetworkDefaults,
    ) -> str:
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
            cluster = Cluster(
                id=cluster_id,
                spec=default_cluster_spec(spec),
                default_addr_pool=list(networking.addr_pool),
                subnet_size=networking.subnet_size,
                data_path_port=networking.data_path_port,
            )
            try:
                expiry = cert_expiry(cluster)
            except PKIError as e:
                raise SwarmError(400, f"invalid certificate expiry: {e}") from e
            # The swarm's root CA, and this first manager's certificate from it.
            root = RootCA.create()
            csr = NodeCSR.generate()
            chain = root.issuer(expiry).sign_csr(
                csr.pem, node_id=node_id, role=Role.MANAGER, cluster_id=cluster_id
            )
            shutil.rmtree(self.cert_dir, ignore_errors=True)
            certs = self.certs = NodeCertificates.create(
                self.cert_dir, NodeCredentials(csr.key_pem, chain, root.cert_pem)
            )
            m.cert_root = root.digest.hex()
            unlock = UnlockKey.generate() if autolocked(cluster) else None
            shutil.rmtree(self.manager_dir, ignore_errors=True)
            try:
                await self._start_manager(
                    m, bootstrap=True, known={}, unlock_key=unlock.key if unlock else None
                )
                assert self.manager is not None
                await self.manager.wait_leader(10)
            except OSError as e:
                await self._teardown(cleanup=True)
                raise SwarmError(400, f"cannot start the manager: {e}") from e

            def bootstrap(tx: Tx) -> None:
                tx.put(
                    dataclasses.replace(
                        cluster,
                        root_ca_cert=root.cert_pem.decode(),
                        root_ca_key=root.key_pem.decode(),
                        worker_token=str(JoinToken.generate(root)),
                        manager_token=str(JoinToken.generate(root)),
                        unlock_key=str(unlock) if unlock else "",
                    )
                )
                tx.put(
                    allocator.new_network(tx, allocator.ingress_spec(), allocator.INGRESS_SUBNET)
                )
                tx.put(
                    Node(
                        id=node_id,
                        role=Role.MANAGER,
                        hostname=self.cfg.hostname,
                        addr=m.addr,
                        manager_addr=advertise,
                        raft_id=m.raft_id,
                        state=NodeState.UNKNOWN,
                        engine_version=ENGINE_VERSION,
                        cert_root=m.cert_root,
                        cert_not_after=certs.identity.not_after.isoformat(),
                    )
                )
                # its address on ingress now rather than in the first reconcile pass: one
                # write less to the node after init
                allocator.allocate_gateways(tx)

            await self.manager.store.update(bootstrap)
            self._save(m)
            await self._run(m)
            await self._settled(node_id)
            return node_id

    async def _settled(self, node_id: str) -> None:
        """Init answers once its node is as the managers keep it: its first session has marked
        it ready with what its agent describes. A client reading the node right after init
        can then update it with the version it read (Docker's init answers once the node
        runs). Past INIT_SETTLE it answers anyway: the swarm is made."""
        assert self.manager is not None
        store = self.manager.store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INIT_SETTLE
        while (node := store.get(Node, node_id)) is None or node.state != NodeState.READY:
            if loop.time() > deadline:
                log.warning(
                    "swarm init: this node's agent did not open its session within %.0f s; "
                    "answering anyway (its node object changes once it does)",
                    INIT_SETTLE,
                )
                return
            await asyncio.sleep(0.05)

    async def join(self, remote: str, token: str, addr: str, listen: str) -> None:
        async with self._lock:
            if self.membership is not None:
                raise SwarmError(
                    503,
                    'This node is already part of a swarm. Use "docker '
                    'swarm leave" to leave this swarm and join another one.',
                )
            advertise = f"{addr}:{listen.rsplit(':', 1)[-1] if listen else DEFAULT_PORT}"
            reply, creds = await self._admission(
                remote,
                token,
                {
                    "addr": addr,
                    "manager_addr": advertise,
                    "description": self._description(),
                },
            )
            shutil.rmtree(self.cert_dir, ignore_errors=True)
            self.certs = NodeCertificates.create(self.cert_dir, creds)
            m = Membership(
                node_id=reply["node_id"],
                cluster_id=reply["cluster_id"],
                role=reply["role"],
                managers=[remote, *[a for a in reply.get("managers", []) if a != remote]],
                addr=addr,
                listen=listen if reply["role"] == "manager" else "",
                raft_id=int(reply.get("raft_id") or 0),
                advertise=advertise if reply["role"] == "manager" else "",
                cert_root=str(reply.get("cert_root", "")),
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

    async def _admission(
        self, remote: str, token: str, about: dict[str, Any]
    ) -> tuple[Message, NodeCredentials]:
        """Swarm's join: fetch the root CA from the manager's join port and accept it only if
        it matches the token's digest, then trade the token and a CSR for a certificate over a
        channel verified against that root (docs/security.md)."""
        try:
            parsed = JoinToken.parse(token)
        except TokenError as e:
            raise SwarmError(400, str(e)) from e
        joins = join_address(remote)

        async def get_root(channel: aio.Channel) -> bytes:
            reply = await jsonrpc.Client(joins, channel).call(
                CA_SERVICE, "GetRootCACertificate", {}, deadline=10
            )
            return str(reply["root"]).encode()

        try:
            root = await fetch_root_ca(joins, parsed, get_root)
        except TokenError as e:
            raise SwarmError(400, f"refusing to join the swarm at {remote}: {e}") from e
        except (OSError, aio.AioRpcError, PKIError) as e:
            detail = e.details() if isinstance(e, aio.AioRpcError) else str(e)
            raise SwarmError(
                400, f"cannot join the swarm at {remote} (join port {joins}): {detail}"
            ) from e
        csr = NodeCSR.generate()
        client = jsonrpc.Client(joins, join_channel(joins, root))
        try:
            reply = await client.call(
                CA_SERVICE,
                "IssueNodeCertificate",
                {"token": token, "csr": csr.pem.decode(), **about},
                deadline=30,
            )
        except aio.AioRpcError as e:
            raise SwarmError(400, f"cannot join the swarm at {remote}: {e.details()}") from e
        finally:
            await client.close()
        chain = str(reply["chain"]).encode()
        try:
            verify_chain(chain, root)
            creds = NodeCredentials(csr.key_pem, chain, root.cert_pem)
        except PKIError as e:
            raise SwarmError(400, f"the manager issued an unusable certificate: {e}") from e
        return reply, creds

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
            shutil.rmtree(self.cert_dir, ignore_errors=True)
            self.certs = None
            await self.executor.sweep(set())  # the stopped tasks' remains
            shutil.rmtree(self.task_dir, ignore_errors=True)

    async def _teardown(self, cleanup: bool) -> None:
        if self._upkeep_task is not None:
            self._upkeep_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep_task
            self._upkeep_task = None
        if self.agent is not None:
            log.info("stopping the agent and its tasks")
            await self.agent.stop()
            self.agent = None
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        if self.mesh is not None:
            log.info("stopping shoal-mesh%s", " and removing the data plane" if cleanup else "")
            await self.mesh.stop(cleanup)
            self.mesh = None
        elif cleanup and self.membership is not None:  # locked: what it made before is there
            await self._mesh_process(self.membership).stop(cleanup)
        if self.manager is not None:
            log.info("stopping the manager")
            await self.manager.stop()
            self.manager = None
        self.membership, self.locked = None, False

    async def shutdown(self) -> None:
        """shoald stops: tasks stop, the data plane stays (established connections live on)."""
        async with self._lock:
            await self._teardown(cleanup=False)
            if self._executor is not None:
                await self._executor.close()
