"""bench/mesh: the routing mesh against going straight to a task and against HAProxy.

    python -m bench.mesh data   # HTTP through the mesh vs direct vs HAProxy, one lab, one run
    python -m bench.mesh sync   # nftables sync time for 100 / 1,000 / 10,000 services
    python -m bench.mesh attach # one sync attaching 100 / 1,000 new task endpoints (veths)

Data path: a 3-node lab, 4 nginx tasks on sw1 and sw3, nothing on sw2. The client (wrk, in the
root namespace) always enters through sw2 and crosses the VXLAN overlay to a task:
  mesh    192.168.56.12:30000   published port, DNAT round-robin over the 4 tasks
  direct  10.255.0.x:80         one task's address, routed through sw2 (test-only routes), no NAT
  haproxy 192.168.56.12:3008x   HAProxy in sw2 (http and tcp mode), round-robin over the 4 tasks
Every case runs one wrk per task (4 x 8 connections; c1: one connection) pinned to CPU 0, with
nginx pinned to CPU 1 (HAProxy is not pinned). Cases are interleaved, repeated, and reported as
medians and ratios (this machine is noisy).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.attach import attach
from bench.sync import sync
from orchestrator.lab import lab as labmod
from orchestrator.lab.meshlab import MeshLab

LAB = "bmesh"
# Clients on one CPU, backends on the other: every case gets the same placement,
# so the scheduler's choices do not decide the comparison (unpinned, a client talking to four
# backends loses ~10% to wake-up placement whatever the path).
CLIENT_CPU, SERVER_CPU = "0", "1"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Run:
    case: str
    mode: str
    rps: float
    p50_us: float
    p99_us: float
    errors: int


def _field(pattern: str, text: str) -> str:
    """The first group of `pattern` in a tool's output; an error naming it if it is not there."""
    found = re.search(pattern, text)
    if found is None:
        raise ValueError(f"no {pattern!r} in:\n{text}")
    return found.group(1)


def _us(value: str) -> float:
    found = re.match(r"([\d.]+)(\w+)", value)
    if found is None:
        raise ValueError(f"not a wrk latency: {value!r}")
    number, unit = found.groups()
    return float(number) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def wrk(
    urls: list[str], connections: int, seconds: float, close: bool
) -> tuple[float, float, float, int]:
    """wrk against each URL at once (same client load in every case); summed req/s, the median
    p50 and the worst p99 of the processes, and socket errors."""
    procs = []
    for url in urls:
        cmd = [
            "taskset",
            "-c",
            CLIENT_CPU,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            "--latency",
            url,
        ]
        if close:
            cmd[4:4] = ["-H", "Connection: close"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    results = [_parse(p.communicate()[0]) for p in procs]
    return (
        sum(r[0] for r in results),
        statistics.median(r[1] for r in results),
        max(r[2] for r in results),
        sum(r[3] for r in results),
    )


def _parse(out: str) -> tuple[float, float, float, int]:
    rps = float(_field(r"Requests/sec:\s+([\d.]+)", out))
    dist = out.split("Latency Distribution", 1)[1]
    p50 = _us(_field(r"50%\s+(\S+)", dist))
    p99 = _us(_field(r"99%\s+(\S+)", dist))
    err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = (sum(int(x) for x in err.groups()) if err else 0) + (
        int(non2xx.group(1)) if non2xx else 0
    )
    return rps, p50, p99, errors


NGINX_CONF = """
worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {dir}/cb; proxy_temp_path {dir}/pt; fastcgi_temp_path {dir}/ft;
  uwsgi_temp_path {dir}/ut; scgi_temp_path {dir}/st;
  server {{ listen 80 backlog=4096 reuseport; location / {{ return 200 "{name}\\n"; }} }}
}}
"""

HAPROXY_CONF = """
global
  nbthread 1
  maxconn 8000
defaults
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe_http
  mode http
  bind {addr}:30080
  default_backend be_http
backend be_http
  mode http
  balance roundrobin
{servers}
frontend fe_tcp
  mode tcp
  bind {addr}:30081
  default_backend be_tcp
backend be_tcp
  mode tcp
  balance roundrobin
{servers}
"""


def data(seconds: float, reps: int) -> dict[str, object]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB)
    lab = labmod.up(LAB, 3, ipaddress.IPv4Network("192.168.56.0/24"))
    work = Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    mesh = MeshLab(lab, work)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        mesh.add_network("ingress", 4096, "10.255.0.0/16", ingress=True)
        mesh.add_service(
            "web", [{"protocol": "tcp", "target": 80, "published": 30000}], ["ingress"]
        )
        for node in ("sw1", "sw3", "sw1", "sw3"):
            mesh.add_task("web", node)
        mesh.publish()
        for node in ("sw1", "sw2", "sw3"):
            mesh.start_daemon(node)
        mesh.wait_synced()
        for t in mesh.tasks.values():
            d = work / t.name
            d.mkdir()
            (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, name=t.name))
            mesh.start_workload(
                t,
                [
                    "taskset",
                    "-c",
                    SERVER_CPU,
                    "nginx",
                    "-e",
                    str(d / "error.log"),
                    "-c",
                    str(d / "nginx.conf"),
                ],
            )
        for t in mesh.tasks.values():
            mesh.wait_listening(t, 80)
        sw2 = lab.node("sw2")
        gw2 = mesh.nets["ingress"].gateways["sw2"]
        # direct: the client reaches task addresses through sw2 too, and they answer back
        # the same way (test-only routes), so the only difference from the mesh is its NAT.
        subprocess.run(["ip", "route", "replace", "10.255.0.0/16", "via", sw2.address], check=True)
        for t in mesh.tasks.values():
            subprocess.run(
                ["ip", "-n", t.netns, "route", "replace", f"{lab.gateway}/32", "via", str(gw2)],
                check=True,
            )
        tasks = list(mesh.tasks.values())
        servers = "\n".join(f"  server {t.name} {t.ips['ingress']}:80" for t in mesh.tasks.values())
        (work / "haproxy.cfg").write_text(HAPROXY_CONF.format(addr=sw2.address, servers=servers))
        # HAProxy is left to the scheduler: the mesh's own work runs in softirq on both CPUs
        # (requests on the client's, replies on the servers'), so neither pin would be fair.
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", sw2.netns, "haproxy", "-f", str(work / "haproxy.cfg")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        time.sleep(1)
        # One wrk per task in every case: 4 x 8 connections, the same client work everywhere.
        cases = {
            "mesh": [f"http://{sw2.address}:30000/"] * len(tasks),
            "direct": [f"http://{t.ips['ingress']}:80/" for t in tasks],
            "haproxy-http": [f"http://{sw2.address}:30080/"] * len(tasks),
            "haproxy-tcp": [f"http://{sw2.address}:30081/"] * len(tasks),
        }
        for urls in cases.values():  # warm ARP, FDB, pools
            wrk(urls, 2, 1, False)
        runs: list[Run] = []
        for rep in range(reps):
            for mode, conns, close in (
                ("keep-alive c32", 8, False),
                ("new connection c32", 8, True),
                ("keep-alive c1", 1, False),
            ):
                for case, urls in cases.items():
                    # c1: one connection in flight, to the first task (latency, not load)
                    rps, p50, p99, errors = wrk(
                        urls if conns > 1 else urls[:1], conns, seconds, close
                    )
                    runs.append(Run(case, mode, rps, p50, p99, errors))
                    print(
                        f"rep {rep + 1} {mode:20} {case:13} {rps:10.0f} req/s  p50 {p50:7.0f} us"
                        f"  p99 {p99:7.0f} us  errors {errors}",
                        flush=True,
                    )
        return summarize(runs, cases)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        subprocess.run(["ip", "route", "del", "10.255.0.0/16"], capture_output=True)
        mesh.close()
        labmod.down(LAB)


def summarize(runs: list[Run], cases: dict[str, list[str]]) -> dict[str, object]:
    modes = list(dict.fromkeys(r.mode for r in runs))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        table[mode] = {}
        for case in cases:
            sel = [r for r in runs if r.mode == mode and r.case == case]
            table[mode][case] = {
                "rps": statistics.median(r.rps for r in sel),
                "p50_us": statistics.median(r.p50_us for r in sel),
                "p99_us": statistics.median(r.p99_us for r in sel),
                "errors": sum(r.errors for r in sel),
            }
    print("\nmedians")
    print(f"{'mode':20} {'case':13} {'req/s':>10} {'p50 us':>8} {'p99 us':>8}")
    for mode, row in table.items():
        for case, v in row.items():
            print(f"{mode:20} {case:13} {v['rps']:10.0f} {v['p50_us']:8.0f} {v['p99_us']:8.0f}")
    print("\nratios (throughput: higher is better for the mesh)")
    ratios: dict[str, dict[str, float]] = {}
    for mode, row in table.items():
        mesh = row["mesh"]["rps"]
        ratios[mode] = {f"mesh/{c}": mesh / row[c]["rps"] for c in row if c != "mesh"}
        print(f"{mode:20} " + "  ".join(f"{k} {v:.2f}" for k, v in ratios[mode].items()))
    return {"table": table, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.mesh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data")
    d.add_argument("--seconds", type=float, default=5)
    d.add_argument("--reps", type=int, default=3)
    s = sub.add_parser("sync")
    s.add_argument("--sizes", default="100,1000,10000")
    s.add_argument("--backends", type=int, default=10)
    s.add_argument("--reps", type=int, default=15)
    a = sub.add_parser("attach")
    a.add_argument("--sizes", default="100,1000")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    # The machine is shared: how busy it was says how far wall-clock figures can be trusted.
    load_start = os.getloadavg()
    if args.what == "data":
        result = data(args.seconds, args.reps)
    elif args.what == "attach":
        result = attach([int(x) for x in args.sizes.split(",")])
    else:
        result = sync([int(x) for x in args.sizes.split(",")], args.backends, args.reps)
    result["loadavg"] = {"start": load_start, "end": os.getloadavg()}
    print(f"\nload average (1, 5, 15 min): start {load_start}, end {os.getloadavg()}")
    out = RESULTS / f"mesh-{args.what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
