"""Endpoint attachment cost: N new task endpoints plugged into an overlay in one sync.

In scratch namespaces (battach-*): a node namespace with an underlay interface, N task
namespaces, one overlay network with N local endpoints (one per task). Timed through
Overlay.reconcile, the part of a sync that makes the veths:
  attach     the first sync: every endpoint is new (a veth each, its address, route, FDB entry)
  verify     a full sync of the same state: every endpoint exists and is checked in its namespace
  unchanged  an incremental sync of the same state (what most syncs are)
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from typing import Any

from mesh.overlay import Overlay
from mesh.state import state_from_dict

NODE_NS = "battach-node"
TASK_PREFIX = "battach-t"


def make_state(endpoints: int) -> dict[str, Any]:
    """Node n1 holding N tasks, each with one endpoint on a /16 overlay."""
    base = ipaddress.IPv4Address("10.20.0.10")
    return {
        "node": "n1",
        "peers": {"n1": "192.168.98.1", "n2": "192.168.98.2"},
        "networks": [
            {
                "name": "ov",
                "vni": 4200,
                "subnet": "10.20.0.0/16",
                "gateways": {"n1": "10.20.0.1", "n2": "10.20.0.2"},
            }
        ],
        "endpoints": [
            {
                "task": f"t{i}",
                "network": "ov",
                "node": "n1",
                "ip": str(base + i),
                "netns": f"{TASK_PREFIX}{i}",
            }
            for i in range(endpoints)
        ],
        "services": [],
    }


def _ip_batch(lines: list[str]) -> None:
    """Many `ip` commands in one process (1,000 `ip netns add` processes take seconds)."""
    subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input="\n".join(lines) + "\n",
        text=True,
        capture_output=True,  # deleting what is not there (before a run) is not news
    )


def _setup(endpoints: int) -> None:
    _teardown(endpoints)
    _ip_batch([f"netns add {NODE_NS}"] + [f"netns add {TASK_PREFIX}{i}" for i in range(endpoints)])
    for cmd in (
        ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
        ["addr", "add", "192.168.98.1/24", "dev", "eth0"],
        ["link", "set", "eth0", "up"],
    ):
        subprocess.run(["ip", "-n", NODE_NS, *cmd], check=True)


def _teardown(endpoints: int) -> None:
    _ip_batch([f"netns del {NODE_NS}"] + [f"netns del {TASK_PREFIX}{i}" for i in range(endpoints)])


def bench_attach(endpoints: int) -> dict[str, float]:
    _setup(endpoints)
    overlay = Overlay(NODE_NS)
    state = state_from_dict(make_state(endpoints))
    out: dict[str, float] = {}
    try:
        for case, full in (("attach", True), ("verify", True), ("unchanged", False)):
            started = time.perf_counter()
            report = overlay.reconcile(state, full=full)
            seconds = time.perf_counter() - started
            assert not report.errors, report.errors
            out[f"{case}_s"] = round(seconds, 3)
            out[f"{case}_ms_per_endpoint"] = round(seconds * 1000 / endpoints, 3)
            out[f"{case}_changes"] = report.changes
        return out
    finally:
        overlay.cleanup()
        _teardown(endpoints)


def attach(sizes: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in sizes:
        results[str(n)] = bench_attach(n)
        print(f"{n:>6} endpoints: {results[str(n)]}", flush=True)
    print("\nper endpoint, ms (whole sync, s)")
    print(f"{'endpoints':>9} {'attach':>18} {'verify (full)':>18} {'unchanged':>18}")
    for size, r in results.items():
        cells = [
            f"{r[f'{c}_ms_per_endpoint']:>8.3f} ({r[f'{c}_s']:>6.2f})"
            for c in ("attach", "verify", "unchanged")
        ]
        print(f"{size:>9} " + " ".join(f"{c:>18}" for c in cells))
    return results
