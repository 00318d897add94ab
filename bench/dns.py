"""bench/dns: queries per second of the embedded DNS server, on one core.

    python -m bench.dns [--services 1000] [--seconds 10]

One lab node runs shoal-mesh pinned to CPU 1 with a task attached to a network of N services;
dnsperf, pinned to CPU 0, queries 127.0.0.11 from inside the task: service names, tasks.<svc>
and task names (the fast path), and for comparison unknown names under tasks. (NXDOMAIN).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.lab import lab as labmod
from orchestrator.lab.meshlab import MeshLab

LAB = "bdns"
RESULTS = Path(__file__).resolve().parent / "results"


def _field(pattern: str, text: str) -> str:
    """The first group of `pattern` in dnsperf's output; an error naming it if it is not there."""
    found = re.search(pattern, text)
    if found is None:
        raise ValueError(f"no {pattern!r} in:\n{text}")
    return found.group(1)


def dnsperf(netns: str, queries: Path, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            "taskset",
            "-c",
            "0",
            "dnsperf",
            "-s",
            "127.0.0.11",
            "-d",
            str(queries),
            "-l",
            str(seconds),
            "-c",
            "4",
            "-q",
            "500",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    qps = float(_field(r"Queries per second:\s+([\d.]+)", out))
    lost = int(_field(r"Queries lost:\s+(\d+)", out))
    latency = float(_field(r"Average Latency \(s\):\s+([\d.]+)", out))
    return {"qps": round(qps), "lost": lost, "avg_latency_ms": round(latency * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.dns",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--seconds", type=int, default=10)
    args = p.parse_args(argv)
    if labmod.load(LAB) is not None:
        labmod.down(LAB)
    lab = labmod.up(LAB, 1, ipaddress.IPv4Network("192.168.59.0/24"))
    work = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    mesh = MeshLab(lab, work)
    try:
        mesh.add_network("ov", 4096, "10.128.0.0/12")
        for i in range(args.services):
            mesh.add_service(f"svc{i}", [{"protocol": "tcp", "target": 80}], ["ov"])
        client = mesh.add_task("svc0", "sw1")
        mesh.publish()
        mesh.start_daemon("sw1")
        mesh.wait_synced(timeout=120)
        pid = mesh.daemons["sw1"].pid
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "1", str(pid)], check=True, capture_output=True
        )
        fast = work / "fast.txt"
        names = [f"svc{i} A\ntasks.svc{i} A" for i in range(args.services)] + [f"{client.name} A"]
        fast.write_text("\n".join(names) + "\n")
        nx = work / "nx.txt"
        nx.write_text("\n".join(f"tasks.nosuch{i} A" for i in range(1000)) + "\n")
        dnsperf(client.netns, fast, 2)  # warm up
        result = {
            "services": args.services,
            "cluster_names": dnsperf(client.netns, fast, args.seconds),
            "nxdomain": dnsperf(client.netns, nx, args.seconds),
        }
        print(json.dumps(result, indent=1))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"dns-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result))
        return 0
    finally:
        mesh.close()
        labmod.down(LAB)


if __name__ == "__main__":
    sys.exit(main())
