"""The store replicated by Raft (orchestrator/raft/node.py) as managers run it: three members in
one process on the gRPC transport over loopback, real disks. Members join as learners and are
promoted; writes go through any member; a dead leader is replaced and nothing acknowledged is
lost. (The driver's logic, deterministically and without sockets: test_raft_driver.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from grpc import aio

from orchestrator.ca.certs import NodeCertificates
from orchestrator.ca.pki import NodeCSR, RootCA
from orchestrator.ca.tls import NodeCredentials
from orchestrator.manager.runtime import ManagerRuntime
from orchestrator.raft.grpc_transport import GrpcTransport
from orchestrator.raft.node import NoQuorum, RaftNode, RaftSettings
from orchestrator.raft.storage import RaftStorage, StorageError, on_disk
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import Cluster, Role
from orchestrator.store.store import Store

FAST = RaftSettings(tick=0.05, election_tick=10, propose_timeout=3.0)


@dataclasses.dataclass
class Member:
    raft_id: int
    addr: str
    log: RaftNode
    store: Store
    server: aio.Server


class Cluster3:
    def __init__(self, tmp: Path, settings: RaftSettings = FAST):
        self.tmp = tmp
        self.settings = settings
        self.members: dict[int, Member] = {}
        self.ports: dict[int, int] = {}

    async def start_member(
        self, raft_id: int, bootstrap: bool = False, known: dict[int, str] | None = None
    ) -> Member:
        server = aio.server()
        port = server.add_insecure_port(f"127.0.0.1:{self.ports.get(raft_id, 0)}")
        self.ports[raft_id] = port
        addr = f"127.0.0.1:{port}"
        transport = GrpcTransport()
        rlog = RaftNode(
            raft_id,
            addr,
            on_disk(self.tmp / f"m{raft_id}"),
            transport,
            self.settings,
            random.Random(raft_id),
            bootstrap=bootstrap,
            known=known,
        )
        store = Store(rlog)
        server.add_generic_rpc_handlers(transport.handlers())
        await server.start()
        await rlog.start()
        m = Member(raft_id, addr, rlog, store, server)
        self.members[raft_id] = m
        return m

    async def stop_member(self, raft_id: int) -> None:
        m = self.members.pop(raft_id)
        await m.server.stop(None)
        await m.log.close()

    async def form(self) -> None:
        first = await self.start_member(1, bootstrap=True)
        await until(lambda: first.log.is_leader, 5)
        for rid in (2, 3):
            m = await self.start_member(rid, known={1: first.addr})
            await first.log.add_learner(rid, m.addr)
            await until(functools.partial(first.log.caught_up, rid), 5)
            await first.log.promote(rid)
        assert first.log.voters() == {1, 2, 3}

    def leader(self) -> Member | None:
        leaders = [m for m in self.members.values() if m.log.is_leader]
        return leaders[0] if len(leaders) == 1 else None

    async def close(self) -> None:
        for rid in list(self.members):
            await self.stop_member(rid)


async def until(cond: Callable[[], bool], within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def put_label(store: Store, key: str, value: str) -> None:
    """A write: the cluster object's labels as a key-value register."""

    def fn(tx: object) -> None:
        from orchestrator.store.store import Tx  # noqa: PLC0415

        assert isinstance(tx, Tx)
        clusters = tx.list(Cluster)
        cluster = clusters[0] if clusters else Cluster(id="c", spec={})
        spec = dict(cluster.spec)
        labels = dict(spec.get("Labels") or {})
        labels[key] = value
        spec["Labels"] = labels
        tx.put(dataclasses.replace(cluster, spec=spec))

    await store.update(fn)


def labels(store: Store) -> dict[str, str]:
    clusters = store.list(Cluster)
    return dict(clusters[0].spec.get("Labels") or {}) if clusters else {}


def run(tmp_path: Path, body: Callable[[Cluster3], Awaitable[None]]) -> None:
    async def main() -> None:
        cluster = Cluster3(tmp_path)
        try:
            await cluster.form()
            await body(cluster)
        finally:
            await cluster.close()

    asyncio.run(main())


def test_writes_through_any_member_reach_every_store(tmp_path: Path) -> None:
    async def body(c: Cluster3) -> None:
        for i, m in enumerate(c.members.values()):
            await put_label(m.store, f"k{i}", f"v{i}")
            # a writer reads its own write at once
            assert labels(m.store)[f"k{i}"] == f"v{i}"
        want = {"k0": "v0", "k1": "v1", "k2": "v2"}
        await until(lambda: all(labels(m.store) == want for m in c.members.values()), 3)
        # concurrent writers on every member: all land, conflicts retried
        await asyncio.gather(
            *(
                put_label(m.store, f"c{m.raft_id}-{j}", "x")
                for m in c.members.values()
                for j in range(10)
            )
        )
        await until(lambda: all(len(labels(m.store)) == 33 for m in c.members.values()), 3)
        for m in c.members.values():
            await m.log.read_barrier()

    run(tmp_path, body)


def test_leader_loss_elects_another_and_keeps_acknowledged_writes(tmp_path: Path) -> None:
    async def body(c: Cluster3) -> None:
        acked: dict[str, str] = {}
        leader = c.leader()
        assert leader is not None
        for i in range(20):
            await put_label(leader.store, f"a{i}", "1")
            acked[f"a{i}"] = "1"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await c.stop_member(leader.raft_id)
        await until(lambda: c.leader() is not None, 5)
        failover = loop.time() - t0
        assert failover < 3.0, failover
        survivor = next(iter(c.members.values()))
        await put_label(survivor.store, "after", "1")
        acked["after"] = "1"
        for m in c.members.values():
            await m.log.read_barrier()
            assert acked.items() <= labels(m.store).items()
        # the old leader comes back from its disk and catches up
        back = await c.start_member(leader.raft_id)
        await until(lambda: acked.items() <= labels(back.store).items(), 5)
        assert not back.log.is_leader or c.leader() is back

    run(tmp_path, body)


def test_without_quorum_writes_fail_fast_and_clearly(tmp_path: Path) -> None:
    async def body(c: Cluster3) -> None:
        leader = c.leader()
        assert leader is not None
        others = [rid for rid in c.members if rid != leader.raft_id]
        for rid in others:
            await c.stop_member(rid)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(NotLeader) as err:
            await put_label(leader.store, "lost", "1")
        assert isinstance(err.value, NoQuorum) and "quorum" in str(err.value)
        assert loop.time() - t0 < c.settings.propose_timeout + 1
        with pytest.raises(NoQuorum):
            await leader.log.read_barrier()

    run(tmp_path, body)


def test_a_lagging_member_catches_up_from_a_snapshot(tmp_path: Path) -> None:
    async def main() -> None:
        c = Cluster3(tmp_path, dataclasses.replace(FAST, snapshot_every=20, keep_entries=5))
        try:
            await c.form()
            leader = c.leader()
            assert leader is not None
            lagging = next(rid for rid in c.members if rid != leader.raft_id)
            await c.stop_member(lagging)
            for i in range(60):
                await put_label(leader.store, f"s{i}", str(i))
            assert leader.log.raft is not None and leader.log.raft.log.first_index() > 10
            back = await c.start_member(lagging)
            await until(lambda: len(labels(back.store)) == 60, 5)
            assert labels(back.store) == labels(leader.store)
        finally:
            await c.close()

    asyncio.run(main())


def two_free_ports() -> int:
    """A port P with P+1 free too (a manager's control and join ports)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


def test_a_manager_whose_raft_breaks_an_invariant_stops_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As shoald runs it: the Raft node stops, the manager runtime logs why and stops serving
    (its listeners close), and the store answers NotLeader with the reason, instead of going on
    with a log that may have diverged."""
    root = RootCA.create()
    csr = NodeCSR.generate()
    chain = root.issuer().sign_csr(csr.pem, node_id="m1", role=Role.MANAGER, cluster_id="c1")
    certs = NodeCertificates.create(
        tmp_path / "certificates", NodeCredentials(csr.key_pem, chain, root.cert_pem)
    )
    port = two_free_ports()
    addr = f"127.0.0.1:{port}"

    def broken(*args: object, **kwargs: object) -> None:
        raise StorageError("entries from 9 do not follow the log (0, 3]")

    async def main() -> None:
        runtime = ManagerRuntime(tmp_path / "manager", 1, addr, certs, bootstrap=True)
        await runtime.start(addr)
        try:
            await runtime.wait_leader(10)
            await put_label(runtime.store, "before", "1")
            monkeypatch.setattr(RaftStorage, "save", broken)
            with pytest.raises(NotLeader, match="raft invariant broken: entries from 9"):
                await put_label(runtime.store, "after", "1")

            def closed() -> bool:
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", port)) != 0

            await until(closed, 10)  # it no longer serves its peers or its nodes
            with pytest.raises(NotLeader, match="this manager stopped: raft invariant broken"):
                await runtime.raft.read_barrier()
            assert not runtime.raft.is_leader and runtime.manager is None
        finally:
            await asyncio.wait_for(runtime.stop(), 10)  # again: a no-op

    with caplog.at_level(logging.CRITICAL, logger="orchestrator.manager.runtime"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any(
        line.startswith("raft invariant broken: entries from 9 do not follow the log")
        and "this manager stops serving" in line
        for line in lines
    ), lines
