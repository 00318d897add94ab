"""The CA service every manager serves, backed by the store (swarmkit's ca/server.go).

gRPC service `shoal.CA`:
  GetRootCACertificate()                      -> the root every node trusts (public; a joining
                                                 node checks it against its token's digest)
  IssueNodeCertificate(csr, token, ...)       -> a certificate chain for the CSR's key:
      - without a client certificate (the join port): the token decides the role, and a new
        node is made in the store (a manager also gets its Raft ID and the members);
      - with one (the control port): a renewal for that node, in the role the store gives it
        now (so a demoted manager gets a worker certificate and a promoted worker a manager's).

The root's key lives in the store (only managers have it), so any manager signs; during a
root rotation new certificates come from the new root, cross-signed by the old.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc

from orchestrator.ca.pki import (
    DEFAULT_NODE_CERT_EXPIRY,
    Identity,
    Issuer,
    PKIError,
    RootCA,
    RootRotation,
    check_expiry,
)
from orchestrator.ca.tls import peer_identity
from orchestrator.ca.tokens import TokenError, role_for_token
from orchestrator.images import reference
from orchestrator.rpc.jsonrpc import Context, Message, service
from orchestrator.store.ids import new_id, new_raft_id
from orchestrator.store.objects import Cluster, Node, NodeState, Role
from orchestrator.store.store import Store, Tx

log = logging.getLogger(__name__)

SERVICE = "shoal.CA"
SECOND = 1_000_000_000
EXECUTORS = ("container", "native")
MAX_NODE_IMAGES = 256  # a native executor runs a handful; bound what a node makes us store


def described(desc: Any) -> dict[str, Any]:
    """The Node fields a node's description sets: its executor, the images it runs, its
    capacity. Only what it gives, valid and bounded, so what an older agent does not send
    stays as stored (at join and at every session)."""
    out: dict[str, Any] = {}
    if not isinstance(desc, dict):
        return out
    executor = desc.get("executor")
    if isinstance(executor, str) and executor in EXECUTORS:
        out["executor"] = executor
    images = desc.get("images")
    if isinstance(images, list):
        repos = []
        for image in images[:MAX_NODE_IMAGES]:
            try:
                repos.append(reference.repository(image) if isinstance(image, str) else "")
            except reference.ReferenceError:
                continue  # not a repository: it could never match a service's image
        out["images"] = sorted({r for r in repos if r})
    elif "executor" in out:
        out["images"] = []  # an executor that says nothing of images runs any
    for key in ("nano_cpus", "memory_bytes"):
        value = desc.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = value
    return out


def root_of(cluster: Cluster) -> RootCA:
    return RootCA.from_pem(cluster.root_ca_cert.encode(), cluster.root_ca_key.encode() or None)


def rotation_of(cluster: Cluster) -> RootRotation | None:
    r = cluster.ca_rotation
    if not r:
        return None
    return RootRotation.from_pem(
        root_of(cluster), r["cert"].encode(), r["key"].encode(), r["cross_signed"].encode()
    )


def issuing_root_digest(cluster: Cluster) -> str:
    """Hex digest of the root new certificates come from (the new one while rotating)."""
    pem = cluster.ca_rotation["cert"] if cluster.ca_rotation else cluster.root_ca_cert
    return _digest(pem)


@functools.lru_cache(maxsize=4)
def _digest(pem: str) -> str:
    # Every node's assignment carries it, recomputed at each store change: parsing the
    # certificate each time cost ~130 us per node.
    return RootCA.from_pem(pem.encode()).digest.hex()


def cert_expiry(cluster: Cluster) -> timedelta:
    ns = (cluster.spec.get("CAConfig") or {}).get("NodeCertExpiry") or 0
    return check_expiry(timedelta(seconds=ns / SECOND)) if ns else DEFAULT_NODE_CERT_EXPIRY


def issuer_of(cluster: Cluster) -> Issuer:
    rotation = rotation_of(cluster)
    expiry = cert_expiry(cluster)
    return rotation.issuer(expiry) if rotation is not None else root_of(cluster).issuer(expiry)


class CAService:
    def __init__(self, store: Store, raft_members: Callable[[], dict[int, str]]):
        self.store = store
        self.raft_members = raft_members

    def handler(self) -> grpc.GenericRpcHandler:
        return service(
            SERVICE,
            unary={
                "GetRootCACertificate": self.get_root,
                "IssueNodeCertificate": self.issue,
            },
        )

    def _cluster(self) -> Cluster | None:
        return next(iter(self.store.list(Cluster)), None)

    async def get_root(self, req: Message, ctx: Context) -> Message:
        cluster = self._cluster()
        if cluster is None:
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "this manager has no swarm")
        assert cluster is not None
        return {"root": cluster.root_ca_cert}

    async def issue(self, req: Message, ctx: Context) -> Message:
        cluster = self._cluster()
        if cluster is None:
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "this manager has no swarm")
        assert cluster is not None
        csr = str(req.get("csr", "")).encode()
        caller = peer_identity(ctx)
        reply: Message
        joining = caller is None
        if caller is None:
            node, reply = await self._admit(cluster, req, ctx)
        else:
            node = await self._renewing(caller, ctx)
            reply = {"node_id": node.id, "cluster_id": cluster.id, "role": node.role}
        role = Role(node.role)
        try:
            chain = issuer_of(cluster).sign_csr(
                csr, node_id=node.id, role=role, cluster_id=cluster.id
            )
        except PKIError as e:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot issue a certificate: {e}")
            raise AssertionError from e  # abort raises
        leaf = Identity.from_pem(chain)

        def record(tx: Tx) -> None:
            if joining:  # only now, so that a refused CSR leaves no node behind
                tx.put(node)
            _record_issue(tx, node.id, cluster, leaf)

        await self.store.update(record)
        if joining:
            log.info("node %s (%s, %s) joined as %s", node.id, node.hostname, node.addr, node.role)
        reply.update(
            {
                "chain": chain.decode(),
                "trust": cluster.root_ca_cert,
                "cert_root": issuing_root_digest(cluster),
                "managers": self._manager_addrs(),
            }
        )
        return reply

    async def _admit(self, cluster: Cluster, req: Message, ctx: Context) -> tuple[Node, Message]:
        """A new node (not stored yet): the token says in which role."""
        try:
            role = role_for_token(
                str(req.get("token", "")),
                worker=cluster.worker_token,
                manager=cluster.manager_token,
            )
        except TokenError:
            log.warning("refused a join from %s: invalid token", ctx.peer())
            await ctx.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "invalid join token: check `swarm join-token worker|manager` on a manager",
            )
            raise
        listen = str(req.get("manager_addr", ""))
        if role is Role.MANAGER and not listen:
            await ctx.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a manager must say where its managers' listener is (manager_addr)",
            )
        desc = req.get("description") or {}
        manager = role is Role.MANAGER
        node = Node(
            id=new_id(),
            role=role,
            hostname=str(desc.get("hostname", "")),
            addr=str(req.get("addr", "")),
            state=NodeState.UNKNOWN,
            engine_version=str(desc.get("engine_version", "")),
            manager_addr=listen if manager else "",
            raft_id=new_raft_id() if manager else 0,
            **described(desc),
        )
        reply: Message = {"node_id": node.id, "cluster_id": cluster.id, "role": node.role}
        if manager:
            reply["raft_id"] = node.raft_id
            reply["raft_members"] = {str(k): v for k, v in self.raft_members().items()}
        return node, reply

    async def _renewing(self, caller: Identity, ctx: Context) -> Node:
        node = self.store.get(Node, caller.node_id)
        if node is None:
            await ctx.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {caller.node_id} is not part of this swarm (removed?); it cannot renew",
            )
        assert node is not None
        return node

    def _manager_addrs(self) -> list[str]:
        return sorted(
            n.manager_addr
            for n in self.store.list(Node)
            if n.role == Role.MANAGER and n.manager_addr
        )


def _record_issue(tx: Tx, node_id: str, cluster: Cluster, leaf: Identity) -> None:
    """Remember which root a node's certificate chains to (a rotation finishes when every
    node's does to the new one) and until when it is valid (for the deny list)."""
    node = tx.get(Node, node_id)
    if node is None:
        return
    tx.put(
        dataclasses.replace(
            node,
            cert_root=issuing_root_digest(cluster),
            cert_not_after=leaf.not_after.isoformat(),
        )
    )
