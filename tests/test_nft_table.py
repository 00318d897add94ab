"""The nftables tables are what the desired state says, after any sequence of incremental syncs.

Each sync only sends what changed; this checks, against the kernel's own view (`nft -j list`),
that the tables always equal the desired state, spread over tables of at most SHARD_SIZE
frontends (with a small SHARD_SIZE, so that the tests have several), and that a refused batch
changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.lb import table as table_module
from mesh.lb.model import Backend, Frontend, NamespaceLB
from mesh.lb.nftables import NftablesBalancer, counter_name
from mesh.lb.table import NamespaceTable
from mesh.netns import run_in_netns
from mesh.nft import expr as E
from mesh.nft.transaction import Transaction
from mesh.nft.wire import NftError, NftSocket

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    name = "tnft-table"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def kernel_items(netns: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset", "ip"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ours = re.compile(r"shoal(-[1-9][0-9]*)?")
    items: list[dict[str, Any]] = []
    for item in json.loads(out)["nftables"]:
        ((kind, body),) = item.items()
        if kind != "metainfo" and ours.fullmatch(body["name" if kind == "table" else "table"]):
            items.append(item)
    return items


def tables_in(netns: str) -> set[str]:
    """Our tables in the namespace."""
    return {i["table"]["name"] for i in kernel_items(netns) if "table" in i}


def kernel_view(netns: str) -> dict[str, Any]:
    """What the kernel balances, whichever of our tables each frontend is in; and how many
    frontends each table holds."""
    items = kernel_items(netns)
    maps: dict[tuple[str, str], list[Any]] = {}
    for i in items:
        if "map" in i:
            maps[(i["map"]["table"], i["map"]["name"])] = i["map"].get("elem", [])
    rules: dict[tuple[str, str], list[str]] = {}
    for i in items:
        if "rule" in i:
            where = (i["rule"]["table"], i["rule"]["chain"])
            rules.setdefault(where, []).append(json.dumps(i["rule"]["expr"]))
    entries: dict[str, str] = {}
    sizes = {i["table"]["name"]: 0 for i in items if "table" in i}
    chains: dict[str, Any] = {}
    for (table, name), elements in maps.items():
        if name not in ("published", "vips"):
            continue
        for key, verdict in elements:
            parts = key["concat"] if isinstance(key, dict) else [key]
            chain = verdict["goto"]["target"]
            entries["/".join(str(p) for p in parts)] = chain
            sizes[table] += 1
            (rule,) = rules[(table, chain)]
            if '"reject"' in rule:
                chains[chain] = "reject"
                continue
            mod_found = re.search(r'"mod": (\d+)', rule)
            map_found = re.search(r'"@(be-[^"]+)"', rule)
            assert mod_found is not None and map_found is not None, rule
            mod, backend_map = int(mod_found.group(1)), map_found.group(1)
            backends = {
                k: f"{v['concat'][0]}:{v['concat'][1]}" if isinstance(v, dict) else v
                for k, v in maps[(table, backend_map)]
            }
            chains[chain] = (mod, [backends[i] for i in range(mod)])
    counters = sorted(i["counter"]["name"] for i in items if "counter" in i)
    referenced = sorted(
        v for (_, name), elements in maps.items() if name == "backend-counters" for _, v in elements
    )
    return {
        "entries": entries,
        "chains": chains,
        "counters": counters,
        "referenced": referenced,
        "sizes": sizes,
    }


def assert_matches(netns: str, lb: NamespaceLB) -> None:
    """The kernel balances as `lb` says, from `shoal` and tables of at most SHARD_SIZE
    frontends that hold some, each frontend whole in one (its map entry, chain, backend map)."""
    view = kernel_view(netns)
    sizes = view.pop("sizes")
    assert view == expected_view(lb)
    assert "shoal" in sizes  # the others: shoal-N, each holding frontends
    assert all(size <= table_module.SHARD_SIZE for size in sizes.values()), sizes
    assert all(size > 0 for table, size in sizes.items() if table != "shoal"), sizes


def expected_view(lb: NamespaceLB) -> dict[str, Any]:
    entries: dict[str, str] = {}
    chains: dict[str, Any] = {}
    counters = []
    for fe in lb.frontends.values():
        # a published port's chain is named by that port (several may share a target)
        where = "host" if fe.host_mode else fe.network
        chain = f"fe-{fe.service}-{where}-{fe.protocol}-{fe.published or fe.target_port}"
        if fe.published is not None:
            entries[f"{fe.protocol}/{fe.published}"] = chain
        if fe.vip is not None:
            entries[f"{fe.vip}/{fe.protocol}"] = chain
        chains[chain] = (
            (len(fe.backends), [f"{b.ip}:{b.port}" if b.port else str(b.ip) for b in fe.backends])
            if fe.backends
            else "reject"
        )
        counters += [counter_name(fe, b) for b in fe.backends]
    return {
        "entries": entries,
        "chains": chains,
        "counters": sorted(counters),
        "referenced": sorted(counters),
    }


SERVICES = ["web", "api", "db"]
POOL = [Backend(ipaddress.IPv4Address(f"10.255.0.{10 + i}"), 8000, f"t{i}") for i in range(6)]


@st.composite
def desired(draw: st.DrawFn, node: bool) -> NamespaceLB:
    frontends = {}
    for i, svc in enumerate(SERVICES):
        if not draw(st.booleans()):
            continue
        if not node:  # a VIP takes every port and keeps it
            backends = draw(st.lists(st.sampled_from(POOL), unique=True, max_size=5))
            fe = Frontend(
                svc,
                "ingress",
                draw(st.sampled_from(["tcp", "udp"])),
                0,
                ipaddress.IPv4Address(f"10.255.1.{i + 1}"),
                None,
                tuple(b._replace(port=0) for b in backends),
            )
            frontends[fe.key] = fe
            continue
        # published ports: several to the one target port, in ingress or host mode
        for published in draw(st.lists(st.sampled_from([30000 + i, 31000 + i]), unique=True)):
            backends = draw(st.lists(st.sampled_from(POOL), unique=True, max_size=5))
            fe = Frontend(
                svc,
                "ingress",
                draw(st.sampled_from(["tcp", "udp"])),
                8000,
                None,
                published,
                tuple(backends),
                host_mode=draw(st.booleans()),
            )
            frontends[fe.key] = fe
    subnets = (ipaddress.IPv4Network("10.255.0.0/16"),) if draw(st.booleans()) else ()
    return NamespaceLB(frontends, node=node, overlay_subnets=subnets if node else ())


@pytest.mark.parametrize("shard_size", [1, 2, table_module.SHARD_SIZE])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_incremental_syncs_always_match_the_desired_state(
    netns: str, data: st.DataObject, shard_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(table_module, "SHARD_SIZE", shard_size)
    node = data.draw(st.booleans())
    table = NamespaceTable(netns, NftablesBalancer())
    try:
        steps = data.draw(st.lists(desired(node), min_size=1, max_size=6))
        for i, lb in enumerate(steps):
            result = table.sync(lb)
            assert result.full == (i == 0)
            assert_matches(netns, lb)
    finally:
        table.remove()
        table.close()
    assert tables_in(netns) == set()


def _vip_frontends(count: int) -> dict[str, Frontend]:
    backends = tuple(b._replace(port=0) for b in POOL[:2])
    fes = [
        Frontend(
            f"s{i}", "ingress", "tcp", 0, ipaddress.IPv4Address(f"10.255.1.{i + 1}"), None, backends
        )
        for i in range(count)
    ]
    return {fe.key: fe for fe in fes}


def test_tables_come_and_go_with_their_frontends(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(table_module, "SHARD_SIZE", 2)
    table = NamespaceTable(netns, NftablesBalancer())
    try:
        fes = _vip_frontends(5)
        table.sync(NamespaceLB(dict(fes), node=False))
        assert tables_in(netns) == {"shoal", "shoal-1", "shoal-2"}
        # emptied shards go; a new frontend fills the first table with room
        for key in list(fes)[1:4]:
            del fes[key]
        assert not table.sync(NamespaceLB(dict(fes), node=False)).full
        assert tables_in(netns) == {"shoal", "shoal-2"}
        fes.update(_vip_frontends(7))
        assert not table.sync(NamespaceLB(dict(fes), node=False)).full
        assert_matches(netns, NamespaceLB(fes, node=False))
        assert table.exists()
        # and one of them gone is noticed (the daemon then syncs in full)
        subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "delete", "table", "ip", "shoal-1"], check=True
        )
        assert not table.exists()
    finally:
        table.remove()
        table.close()
    assert tables_in(netns) == set()


def test_a_full_sync_replaces_the_shards_it_finds(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted daemon starts with a full sync: it owns whatever shards its predecessor
    left, and only those (another table whose name starts with shoal- is not one)."""
    monkeypatch.setattr(table_module, "SHARD_SIZE", 1)
    before = NamespaceTable(netns, NftablesBalancer())
    before.sync(NamespaceLB(_vip_frontends(3), node=False))
    before.close()
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "add", "table", "ip", "shoal-lab"], check=True
    )
    table = NamespaceTable(netns, NftablesBalancer())
    try:
        lb = NamespaceLB(_vip_frontends(1), node=False)
        assert table.sync(lb).full
        assert tables_in(netns) == {"shoal"}
        assert (
            "shoal-lab"
            in subprocess.run(
                ["ip", "netns", "exec", netns, "nft", "list", "tables"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert_matches(netns, lb)
    finally:
        table.remove()
        table.close()
        subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "delete", "table", "ip", "shoal-lab"], check=True
        )


def test_each_table_balances_its_own_frontends(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packets, not just the kernel's listing: a new flow to any VIP, whichever table holds
    it, is DNATed round-robin over its backends (each DNAT counts on the backend's counter)."""
    monkeypatch.setattr(table_module, "SHARD_SIZE", 1)
    ip = ["ip", "-n", netns]
    subprocess.run(
        [*ip, "link", "add", "vipnet", "type", "veth", "peer", "name", "vipnet-peer"], check=True
    )
    subprocess.run([*ip, "addr", "add", "10.255.0.1/16", "dev", "vipnet"], check=True)
    subprocess.run([*ip, "link", "set", "vipnet-peer", "up"], check=True)
    subprocess.run([*ip, "link", "set", "vipnet", "up"], check=True)
    table = NamespaceTable(netns, NftablesBalancer())
    try:
        fes = {
            key: fe._replace(protocol="udp")
            for key, fe in _vip_frontends(3).items()  # in shoal, shoal-1 and shoal-2
        }
        table.sync(NamespaceLB(fes, node=False))
        assert tables_in(netns) == {"shoal", "shoal-1", "shoal-2"}

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for fe in fes.values():
                    for port in range(4000, 4004):  # a new flow each: conntrack asks nat
                        s.sendto(b"x", (str(fe.vip), port))

        run_in_netns(netns, send)
        counts = {(c.frontend.service, str(c.backend.ip)): c.connections for c in table.counts()}
        assert counts == {(fe.service, str(b.ip)): 2 for fe in fes.values() for b in fe.backends}
    finally:
        table.remove()
        table.close()
        subprocess.run([*ip, "link", "del", "vipnet"], check=True)


def test_a_refused_batch_changes_nothing(netns: str) -> None:
    table = NamespaceTable(netns, NftablesBalancer())
    try:
        fe = Frontend("web", "ingress", "tcp", 8000, None, 30000, tuple(POOL[:2]))
        lb = NamespaceLB({fe.key: fe}, node=True)
        table.sync(lb)
        before = kernel_view(netns)
        tx = Transaction("shoal")
        tx.add_chain("fe-extra")
        tx.add_rule("fe-extra", [E.lookup("no-such-map", E.REG32_00)])
        with pytest.raises(NftError) as err, run_in_netns(netns, NftSocket) as sock:
            tx.commit(sock)
        assert "add rule shoal fe-extra" in str(err.value)
        assert kernel_view(netns) == before
        # and the table object still syncs incrementally afterwards
        fe2 = Frontend("web", "ingress", "tcp", 8000, None, 30000, tuple(POOL[:3]))
        assert not table.sync(NamespaceLB({fe2.key: fe2}, node=True)).full
        assert_matches(netns, NamespaceLB({fe2.key: fe2}, node=True))
    finally:
        table.remove()
        table.close()
