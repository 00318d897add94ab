"""bench/lifecycle: requests lost while a service's tasks are replaced, and how long it takes.

    python -m bench.lifecycle [--reps 3] [--rate 100] [--replicas 10]

A 3-node lab `blife` (192.168.83.0/24) with the container executor runs `web` (micro serving
a static page, with a health check: orchestrator/lab/lifecycle.py) and a client service. Four
client loops, each at --rate requests/s, go through the service while one operation runs:
the published port from the host to sw2, and the VIP from the client's task, each with a new
connection per request and with one keep-alive connection (orchestrator/lab/loadgen.py).

Operations (each on a freshly deployed `web` of --replicas tasks):
  update stop-first p1 / p3, update start-first p1 / p3   `service update --env-add ...`
  scale down                                               `service scale web=2`
  drain a node                                             `node update --availability drain sw3`
  rollback                                                 `service rollback web` after an update
Timed from the command to every replaced task having ended; traffic runs from a second before
to a second after. Printed per operation: the median time, requests sent, failed, and failures
per 10,000 requests per loop; raw JSON in bench/results/.

Docker's own swarm is not measured beside it on this machine: its routing mesh balances
published ports and VIPs with IPVS only, and this kernel has none (docs/benchmarks.md says
what Docker's published behaviour is).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.lab import lab as labmod
from orchestrator.lab.lifecycle import (
    WEB,
    Cluster,
    Outcome,
    Traffic,
    deploy,
    docker_cli,
    remove,
    swarm,
)
from orchestrator.lab.record import Lab

LAB = "blife"
SUBNET = ipaddress.IPv4Network("192.168.83.0/24")
PUBLISHED = 30800
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    name: str
    prepare: Callable[[Cluster], object]  # untimed, before the traffic starts
    operation: Callable[[Cluster], object]
    settle: Callable[[Cluster, int], bool]  # (cluster, replicas)
    undo: Callable[[Cluster], object]


def _nothing(_: Cluster) -> None:
    pass


def _state(c: Cluster) -> str:
    return str(c.sdk.services.get(WEB).attrs.get("UpdateStatus", {}).get("State", ""))


def _update(order: str, parallelism: int) -> Case:
    return Case(
        f"update {order} p{parallelism}",
        _nothing,
        lambda c: docker_cli(
            c.lab,
            "service",
            "update",
            "--update-order",
            order,
            "--update-parallelism",
            str(parallelism),
            "--update-delay",
            "0s",
            "--env-add",
            f"GENERATION={time.time_ns()}",
            WEB,
        ),
        lambda c, n: c.settled(WEB, n) and _state(c) != "updating",
        _nothing,
    )


def _off_sw3(c: Cluster) -> bool:
    sw3 = next(n.id for n in c.sdk.nodes.list() if n.attrs["Description"]["Hostname"] == "sw3")
    return not any(t["NodeID"] == sw3 for t in c.serving(WEB))


CASES = [
    _update("stop-first", 1),
    _update("stop-first", 3),
    _update("start-first", 1),
    _update("start-first", 3),
    Case(
        "scale down to 2",
        _nothing,
        lambda c: docker_cli(c.lab, "service", "scale", f"{WEB}=2"),
        lambda c, n: c.settled(WEB, 2),
        _nothing,
    ),
    Case(
        "drain a node",
        _nothing,
        lambda c: docker_cli(c.lab, "node", "update", "--availability", "drain", "sw3"),
        lambda c, n: c.settled(WEB, n) and _off_sw3(c),
        lambda c: docker_cli(c.lab, "node", "update", "--availability", "active", "sw3"),
    ),
    Case(
        "rollback",
        lambda c: docker_cli(
            c.lab,
            "service",
            "update",
            "--update-parallelism",
            "3",
            "--env-add",
            "ROLLED=forward",
            WEB,
        ),
        lambda c: docker_cli(c.lab, "service", "rollback", WEB),
        lambda c, n: c.settled(WEB, n) and _state(c) != "rollback_started",
        _nothing,
    ),
]


def _lab() -> Lab:
    if labmod.load(LAB) is not None or (labmod.DATA_DIR / LAB).exists():
        labmod.down(LAB, purge=True)
    return swarm(labmod.up(LAB, 3, SUBNET))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.lifecycle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rate", type=float, default=100.0, help="requests/s per loop")
    p.add_argument("--replicas", type=int, default=10)
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    runs: list[dict[str, Any]] = []
    lab = _lab()
    cluster = Cluster(lab)
    try:
        for rep in range(args.reps):
            for case in CASES:
                deploy(cluster, args.replicas, PUBLISHED)
                try:
                    case.prepare(cluster)
                    traffic = Traffic(cluster, lab.node("sw2").address, PUBLISHED, args.rate)
                    outcome: Outcome = traffic.run(
                        functools.partial(case.operation, cluster),
                        functools.partial(case.settle, cluster, args.replicas),
                    )
                finally:
                    case.undo(cluster)
                    remove(cluster)
                print(f"rep {rep + 1} {case.name}: {outcome}", flush=True)
                runs.append(
                    {
                        "rep": rep,
                        "case": case.name,
                        "seconds": outcome.seconds,
                        "loops": {
                            name: {
                                "sent": r.sent,
                                "failed": r.failed,
                                "failures": dict(r.failures),
                                "tasks_answered": len(r.answered),
                            }
                            for name, r in outcome.results.items()
                        },
                    }
                )
    finally:
        cluster.close()
        labmod.down(LAB, purge=True)
    out = RESULTS / f"lifecycle-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(f"\n{args.reps} repetitions, {args.replicas} tasks, 4 loops of {args.rate:g} req/s")
    print("| operation | time (median) | requests | failed | failures per 10,000 |")
    print("|---|---|---|---|---|")
    for case in CASES:
        mine = [r for r in runs if r["case"] == case.name]
        sent = sum(loop["sent"] for r in mine for loop in r["loops"].values())
        failed = sum(loop["failed"] for r in mine for loop in r["loops"].values())
        seconds = statistics.median(r["seconds"] for r in mine)
        per = 10_000 * failed / sent if sent else 0.0
        print(f"| {case.name} | {seconds:.1f} s | {sent} | {failed} | {per:.1f} |")
    print(f"raw: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
