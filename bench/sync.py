"""Sync cost of the mesh: how long the kernel takes to match a desired state.

Two levels, each in scratch namespaces (bsync-*), for N services with B backends each:
  table  one task namespace's nftables table with N VIP frontends (the biggest table a node has:
         every service of the task's networks), full sync, then one service added, changed
         (a backend replaced; a backend added) and removed
  mesh   Mesh.apply on a node with one local task, the N services' backends on other nodes:
         full, then the same incremental changes, through the whole reconcile (overlay, tables,
         conntrack); the state is already parsed (parsing the file is reported on its own)
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from mesh.lb.model import NamespaceLB, task_lb
from mesh.lb.nftables import NftablesBalancer
from mesh.lb.table import NamespaceTable
from mesh.reconcile import Mesh
from mesh.state import MeshState, state_from_dict, state_to_dict

NODE_NS = "bsync-node"
TASK_NS = "bsync-node-task"


def make_state(services: int, backends: int) -> dict[str, Any]:
    """Node n1 with one local task (t0) on a /8 overlay; every service's backends on n2..n9."""
    base = ipaddress.IPv4Address("10.0.0.0")
    endpoints = [
        {"task": "t0", "network": "ov", "node": "n1", "ip": "10.255.255.1", "netns": TASK_NS}
    ]
    svcs = []
    for s in range(services):
        tasks = []
        for b in range(backends):
            name = f"s{s}.{b}"
            endpoints.append(
                {
                    "task": name,
                    "network": "ov",
                    "node": f"n{2 + (s + b) % 8}",
                    "ip": str(base + 256 + s * backends + b),
                }
            )
            tasks.append(name)
        svcs.append(
            {
                "name": f"s{s}",
                "vips": {"ov": str(base + 2**23 + s)},
                "ports": [{"protocol": "tcp", "target": 80}],
                "tasks": tasks,
            }
        )
    return {
        "node": "n1",
        "peers": {f"n{i}": f"192.168.99.{i}" for i in range(1, 10)},
        "networks": [
            {
                "name": "ov",
                "vni": 4096,
                "subnet": "10.0.0.0/8",
                "gateways": {f"n{i}": f"10.255.254.{i}" for i in range(1, 10)},
            }
        ],
        "endpoints": endpoints,
        "services": svcs,
    }


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def _time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _ns(*names: str) -> None:
    for n in names:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)
        subprocess.run(["ip", "netns", "add", n], check=True)


def bench_table(state: MeshState, reps: int) -> dict[str, float]:
    _ns(TASK_NS)
    table = NamespaceTable(TASK_NS, NftablesBalancer(TASK_NS))
    try:
        lb = task_lb(state, {"ov"})
        out = {"full_ms": round(_time(lambda: table.sync(lb)) * 1000, 1)}
        spare = [ipaddress.IPv4Address("10.254.0.0") + i for i in range(10 * reps)]
        fes = dict(lb.frontends)
        samples: dict[str, list[float]] = {
            "add_service_ms": [],
            "replace_backend_ms": [],
            "add_backend_ms": [],
            "remove_service_ms": [],
        }
        for r in range(reps):
            new = next(iter(fes.values()))._replace(service=f"extra{r}", vip=spare.pop())
            fes[new.key] = new
            samples["add_service_ms"].append(
                _time(lambda: table.sync(NamespaceLB(dict(fes), False)))
            )
            victim = list(fes)[r]
            fe = fes[victim]
            b0 = fe.backends[0]._replace(ip=spare.pop())
            fes[victim] = fe._replace(backends=(b0, *fe.backends[1:]))
            samples["replace_backend_ms"].append(
                _time(lambda: table.sync(NamespaceLB(dict(fes), False)))
            )
            fe = fes[victim]
            b1 = fe.backends[0]._replace(ip=spare.pop())
            fes[victim] = fe._replace(backends=(*fe.backends, b1))
            samples["add_backend_ms"].append(
                _time(lambda: table.sync(NamespaceLB(dict(fes), False)))
            )
            del fes[new.key]
            samples["remove_service_ms"].append(
                _time(lambda: table.sync(NamespaceLB(dict(fes), False)))
            )
        out.update({k: _median_ms(v) for k, v in samples.items()})
        return out
    finally:
        table.remove()
        table.close()
        subprocess.run(["ip", "netns", "del", TASK_NS], capture_output=True)


def _with_service(doc: dict[str, Any], name: str, vip: str, tasks: list[str]) -> dict[str, Any]:
    return {
        **doc,
        "services": [
            *doc["services"],
            {
                "name": name,
                "vips": {"ov": vip},
                "ports": [{"protocol": "tcp", "target": 80}],
                "tasks": tasks,
            },
        ],
    }


def bench_mesh(doc: dict[str, Any], reps: int) -> dict[str, float]:
    _ns(NODE_NS, TASK_NS)
    subprocess.run(
        ["ip", "-n", NODE_NS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
        check=True,
    )
    subprocess.run(
        ["ip", "-n", NODE_NS, "addr", "add", "192.168.99.1/24", "dev", "eth0"], check=True
    )
    subprocess.run(["ip", "-n", NODE_NS, "link", "set", "eth0", "up"], check=True)
    mesh = Mesh(NftablesBalancer, NODE_NS)
    try:
        parse_started = time.perf_counter()
        state = state_from_dict(json.loads(json.dumps(doc)))
        out = {"parse_ms": round((time.perf_counter() - parse_started) * 1000, 1)}
        report = mesh.apply(state)
        assert report.ok, report.errors
        out["full_ms"] = round(report.seconds * 1000, 1)
        samples: dict[str, list[float]] = {
            "add_service_ms": [],
            "replace_backend_ms": [],
            "remove_service_ms": [],
        }
        current = doc
        for r in range(reps):
            tasks = [f"x{r}.{b}" for b in range(10)]
            eps = [
                {"task": t, "network": "ov", "node": "n2", "ip": f"10.253.{r}.{b + 1}"}
                for b, t in enumerate(tasks)
            ]
            added = _with_service(
                {**current, "endpoints": [*current["endpoints"], *eps]},
                f"x{r}",
                f"10.252.0.{r + 1}",
                tasks,
            )
            samples["add_service_ms"].append(_apply(mesh, added))
            moved = json.loads(json.dumps(added))
            moved["endpoints"][-1]["ip"] = f"10.253.{r}.200"
            samples["replace_backend_ms"].append(_apply(mesh, moved))
            samples["remove_service_ms"].append(_apply(mesh, current))
        out.update({k: _median_ms(v) for k, v in samples.items()})
        return out
    finally:
        mesh.cleanup()
        subprocess.run(["ip", "netns", "del", NODE_NS], capture_output=True)
        subprocess.run(["ip", "netns", "del", TASK_NS], capture_output=True)


def _apply(mesh: Mesh, doc: dict[str, Any]) -> float:
    state = state_from_dict(doc)
    report = mesh.apply(state)
    assert report.ok, report.errors
    return report.seconds


def sync(sizes: list[int], backends: int, reps: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in sizes:
        doc = make_state(n, backends)
        state = state_from_dict(doc)
        assert state_to_dict(state)
        results[str(n)] = {"table": bench_table(state, reps), "mesh": bench_mesh(doc, reps)}
        print(f"{n:>6} services x {backends} backends: {json.dumps(results[str(n)])}", flush=True)
    print("\nmilliseconds (medians of the incremental changes)")
    cols = [
        "full_ms",
        "add_service_ms",
        "replace_backend_ms",
        "add_backend_ms",
        "remove_service_ms",
    ]
    print(f"{'services':>8} {'level':6} " + " ".join(f"{c[:-3]:>16}" for c in cols))
    for size, r in results.items():
        for level in ("table", "mesh"):
            print(
                f"{size:>8} {level:6} "
                + " ".join(f"{r[level].get(c, float('nan')):>16}" for c in cols)
            )
    return results
