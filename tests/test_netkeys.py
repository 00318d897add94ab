"""The encrypted overlays' keyring from the managers (orchestrator/manager/netkeys.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh.state import state_from_dict, state_to_dict
from orchestrator.manager import netkeys
from orchestrator.manager.meshview import mesh_state
from orchestrator.raft.node import RaftNode
from orchestrator.raft.storage import on_disk
from orchestrator.raft.transport import MemoryNetwork
from orchestrator.store.objects import Cluster, Network, Node, NodeState, decode, encode
from orchestrator.store.store import Store

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_rotation_keeps_three_and_sends_with_the_second_newest() -> None:
    cluster = Cluster(id="c")
    assert netkeys.keyring(cluster) is None and netkeys.due(cluster, T0)
    first = netkeys.rotated(cluster, T0)
    ring = netkeys.keyring(first)
    assert ring is not None and len(ring.keys) == 1 and ring.primary == ring.keys[0].tag
    assert len(ring.keys[0].key) == 32
    c = first
    for i in range(4):
        c = netkeys.rotated(c, T0 + timedelta(hours=12 * (i + 1)))
    ring = netkeys.keyring(c)
    assert ring is not None and [k.tag for k in ring.keys] == [3, 4, 5] and ring.primary == 4
    assert len({k.key for k in ring.keys}) == 3
    # the store keeps it through its encoding
    again = decode(encode(c))
    assert isinstance(again, Cluster) and netkeys.keyring(again) == ring


def test_due_after_the_interval_which_the_spec_sets() -> None:
    c = netkeys.rotated(Cluster(id="c"), T0)
    assert not netkeys.due(c, T0 + timedelta(hours=11, minutes=59))
    assert netkeys.due(c, T0 + timedelta(hours=12))
    hourly = dataclasses.replace(
        c, spec={"EncryptionConfig": {"NetworkKeyRotation": 3600 * netkeys.SECOND}}
    )
    assert netkeys.due(hourly, T0 + timedelta(hours=1))
    netkeys.check_interval(hourly.spec)
    with pytest.raises(ValueError, match="at least 1 minute"):
        netkeys.check_interval({"EncryptionConfig": {"NetworkKeyRotation": netkeys.SECOND}})
    with pytest.raises(ValueError, match="nanoseconds"):
        netkeys.check_interval({"EncryptionConfig": {"NetworkKeyRotation": "12h"}})


def test_only_nodes_with_an_encrypted_network_get_the_keys() -> None:
    c = netkeys.rotated(netkeys.rotated(Cluster(id="c"), T0), T0 + timedelta(hours=12))
    nodes = [Node(id="n1", addr="192.0.2.1", state=NodeState.READY)]
    plain = Network(id="i", spec={"Name": "ingress"}, subnet="10.255.0.0/16", vni=4096)
    plain = dataclasses.replace(plain, ingress=True)
    secret = Network(id="s", spec={"Name": "secret"}, subnet="10.0.9.0/24", vni=4097)
    secret = dataclasses.replace(secret, encrypted=True)
    # n1 has no task on the encrypted network: it is not here, and neither are the keys
    without = mesh_state("n1", nodes, [], [], [plain, secret], 1, netkeys.for_mesh(c))
    assert without.encryption is None and "encryption" not in state_to_dict(without)
    # as if it were (the ingress network made encrypted): the keys come, and parse
    enc_ingress = dataclasses.replace(plain, encrypted=True)
    with_keys = mesh_state("n1", nodes, [], [], [enc_ingress], 1, netkeys.for_mesh(c))
    state = state_from_dict(state_to_dict(with_keys), "test")
    assert state == with_keys and state.encryption == netkeys.keyring(c)
    assert state.encryption is not None and state.encryption.primary == 1


def test_the_leader_loop_makes_the_first_key(tmp_path: Path) -> None:
    async def go() -> None:
        lone = MemoryNetwork().transport(1)
        store = Store(RaftNode(1, "", on_disk(tmp_path), lone, bootstrap=True))
        await store.log.start()
        await store.update(lambda tx: tx.put(Cluster(id="c")))
        loop = netkeys.NetworkKeyLoop(store, None)
        loop.start()
        try:
            for _ in range(100):
                cluster = store.get(Cluster, "c")
                if cluster is not None and netkeys.keyring(cluster) is not None:
                    break
                await asyncio.sleep(0.02)
            cluster = store.get(Cluster, "c")
            assert cluster is not None and netkeys.keyring(cluster) is not None
            assert not netkeys.due(cluster, datetime.now(UTC))
        finally:
            await loop.stop()
            await store.log.close()

    asyncio.run(go())
