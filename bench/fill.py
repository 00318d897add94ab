"""bench/fill: many tasks on one node, the native executor (issue #14's per-node targets).

    python -m bench.fill [--sizes 1000,5000] [--reps 1]

A 1-node namespace lab `bfill` (192.168.88.0/24, heartbeat period 1 s) runs one service of
N `busybox sleep` tasks (orchestrator/lab/taskfill.py), created through the Engine API, then
removed. Recorded: the time from the create to every task running; tasks ever rejected or
failed; whether the node was ever anything but ready; the slowest of the `service ps`
requests made once a second meanwhile; and the time from `service rm` until the node holds no
task namespace. Targets: 1,000 tasks running in <= 20 s, 5,000 in <= 120 s, none rejected,
the node ready throughout, `service ps` < 1 s. Raw JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import time
from pathlib import Path

from orchestrator.lab import lab as labmod
from orchestrator.lab import lifecycle
from orchestrator.lab.taskfill import fill

LAB = "bfill"
SUBNET = ipaddress.IPv4Network("192.168.88.0/24")
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {1000: 20.0, 5000: 120.0}  # s to all running (issue #14)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.fill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default="1000,5000", help="tasks per run, comma-separated")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--within", type=float, default=600.0, help="s to wait for a run")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    RESULTS.mkdir(exist_ok=True)
    if labmod.load(LAB) is not None:
        labmod.down(LAB, purge=True)
    lab = lifecycle.swarm(labmod.up(LAB, 1, SUBNET, "native"))
    runs = []
    try:
        for rep in range(args.reps):
            for n in sizes:
                result = fill(lab, "sw1", n, args.within)
                print(f"rep {rep + 1}: {result.describe()}", flush=True)
                runs.append({"rep": rep, **dataclasses.asdict(result)})
    finally:
        labmod.down(LAB, purge=True)
    out = RESULTS / f"fill-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print("\n| tasks | to all running | target | rejected | node not ready | worst ps | rm |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        took = f"{r['seconds']:.1f} s" if r["seconds"] is not None else "not all"
        target = TARGETS.get(r["tasks"])
        rm = f"{r['removed_seconds']:.1f} s" if r["removed_seconds"] is not None else "-"
        worst = max(r["ps_seconds"], default=0.0)
        print(
            f"| {r['tasks']} | {took} | {f'{target:.0f} s' if target else '-'} | "
            f"{r['rejected']} | {len(r['node_not_ready'])} | {worst:.2f} s | {rm} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
