"""The nftables table is what the desired state says, after any sequence of incremental syncs.

Each sync only sends what changed; this checks, against the kernel's own view (`nft -j list`),
that the table always equals the desired state, and that a refused batch changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def kernel_view(netns: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "ip", "shoal"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    items = json.loads(out)["nftables"]
    maps = {i["map"]["name"]: i["map"].get("elem", []) for i in items if "map" in i}
    rules: dict[str, list[str]] = {}
    for i in items:
        if "rule" in i:
            rules.setdefault(i["rule"]["chain"], []).append(json.dumps(i["rule"]["expr"]))
    entries: dict[str, str] = {}
    for name in ("published", "vips"):
        for key, verdict in maps.get(name, []):
            parts = key["concat"] if isinstance(key, dict) else [key]
            entries["/".join(str(p) for p in parts)] = verdict["goto"]["target"]
    chains: dict[str, Any] = {}
    for chain in set(entries.values()):
        (rule,) = rules[chain]
        if '"reject"' in rule:
            chains[chain] = "reject"
            continue
        mod_found = re.search(r'"mod": (\d+)', rule)
        map_found = re.search(r'"@(be-[^"]+)"', rule)
        assert mod_found is not None and map_found is not None, rule
        mod, backend_map = int(mod_found.group(1)), map_found.group(1)
        backends = {
            k: f"{v['concat'][0]}:{v['concat'][1]}" if isinstance(v, dict) else v
            for k, v in maps[backend_map]
        }
        chains[chain] = (mod, [backends[i] for i in range(mod)])
    counters = sorted(i["counter"]["name"] for i in items if "counter" in i)
    referenced = sorted(v for _, v in maps.get("backend-counters", []))
    return {"entries": entries, "chains": chains, "counters": counters, "referenced": referenced}


def expected_view(lb: NamespaceLB) -> dict[str, Any]:
    entries: dict[str, str] = {}
    chains: dict[str, Any] = {}
    counters = []
    for fe in lb.frontends.values():
        chain = f"fe-{fe.service}-{fe.network}-{fe.protocol}-{fe.target_port}"
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
        backends = draw(st.lists(st.sampled_from(POOL), unique=True, max_size=5))
        if not node:  # a VIP takes every port and keeps it
            backends = [b._replace(port=0) for b in backends]
        fe = Frontend(
            svc,
            "ingress",
            draw(st.sampled_from(["tcp", "udp"])),
            8000 if node else 0,
            None if node else ipaddress.IPv4Address(f"10.255.1.{i + 1}"),
            draw(st.sampled_from([30000 + i, 31000 + i])) if node else None,
            tuple(backends),
        )
        frontends[fe.key] = fe
    subnets = (ipaddress.IPv4Network("10.255.0.0/16"),) if draw(st.booleans()) else ()
    return NamespaceLB(frontends, node=node, overlay_subnets=subnets if node else ())


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_incremental_syncs_always_match_the_desired_state(netns: str, data: st.DataObject) -> None:
    node = data.draw(st.booleans())
    table = NamespaceTable(netns, NftablesBalancer())
    try:
        steps = data.draw(st.lists(desired(node), min_size=1, max_size=6))
        for i, lb in enumerate(steps):
            result = table.sync(lb)
            assert result.full == (i == 0)
            assert kernel_view(netns) == expected_view(lb)
    finally:
        table.remove()
        table.close()


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
        assert kernel_view(netns) == expected_view(NamespaceLB({fe2.key: fe2}, node=True))
    finally:
        table.remove()
        table.close()
