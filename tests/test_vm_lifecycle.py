"""Updates without a dropped request on Debian's kernel, with IPVS (docs/updates.md): a 3-VM
lab (`shoal lab up --vm`, the native executor), service `life` (micro, with a health check)
and four client loops through it while it is updated, rolled back, drained off a node and
scaled down. Its own lab: the other VM modules' services and networks stay out of it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.lab import lab as labmod
from orchestrator.lab import vm
from orchestrator.lab.loadgen import Loop
from orchestrator.lab.record import FIRST_HOST, Lab
from tests.labutil import wait
from tests.netutil import answers
from tests.vmutil import vm_suite

pytestmark = [*vm_suite, pytest.mark.timeout(600)]

LAB = "tvmlife"
SUBNET = ipaddress.IPv4Network("192.168.78.0/24")
NODES = ["sw1", "sw2", "sw3"]
ADDR = {n: str(SUBNET.network_address + FIRST_HOST + i) for i, n in enumerate(NODES)}
OUTSIDE = vm.lab_netns(LAB)  # the lab's "host": 192.168.78.1 on its bridge


def lab_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def shoal_argv(node: str, *args: str) -> list[str]:
    """`shoal lab exec --name LAB NODE -- shoal ARGS...`: the CLI in the VM."""
    return [
        *(sys.executable, "-m", "orchestrator.cli.main", "lab", "exec", "--name", LAB),
        *(node, "--", "shoal", *args),
    ]


def shoal(node: str, *args: str) -> str:
    out = subprocess.run(shoal_argv(node, *args), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"shoal {' '.join(args)} on {node}: {out.stdout}{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def swarm() -> Iterator[Lab]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB)
    try:
        up = lab_cli("up", "--vm", "--name", LAB, "--nodes", "3", "--subnet", str(SUBNET))
        assert up.returncode == 0, up.stdout + up.stderr
        init = shoal("sw1", "swarm", "init", "--listen-addr", f"{ADDR['sw1']}:2377")
        found = re.search(r"shoal swarm join --token (\S+) (\S+)", init)
        assert found, init
        joins = [
            subprocess.Popen(
                shoal_argv(n, "swarm", "join", "--token", found[1], found[2]),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for n in ("sw2", "sw3")
        ]
        for j in joins:
            out, _ = j.communicate(timeout=300)
            assert j.returncode == 0 and "joined a swarm as a worker" in out, out
        wait(lambda: shoal("sw1", "node", "ls").count("Ready") == 3, "3 ready nodes", 120)
        lab = labmod.load(LAB)
        assert lab is not None
        yield lab
    finally:
        down = lab_cli("down", "--name", LAB)
        assert down.returncode == 0, down.stdout + down.stderr


# The client loops a task of `lifeclient` runs in its node (orchestrator/lab/loadgen.py), until
# a line arrives on stdin (or a time limit); what they saw, as JSON.
_LOOPS = """
import json, select, sys
from orchestrator.lab.loadgen import Loop
host, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
limit, timeout = float(sys.argv[4]), float(sys.argv[5])
loops = {f"VIP, {m}": Loop(None, host, port, rate, m == "keep-alive", timeout).start()
         for m in ("new connections", "keep-alive")}
print("started", flush=True)
select.select([sys.stdin], [], [], limit)
print(json.dumps({name: [loop.stop().sent, loop.result.failed, str(loop.result)]
                  for name, loop in loops.items()}))
"""
# What sw1 reads through the docker SDK for the lifecycle test.
_LIFE = """
import json, sys, docker
c = docker.from_env()
tasks = c.api.tasks(filters={"service": sys.argv[1]})
hosts = {n["ID"]: n["Description"]["Hostname"] for n in c.api.nodes()}
client = [t for t in c.api.tasks(filters={"service": "lifeclient", "desired-state": "running"})
          if t["Status"]["State"] == "running"]
net = c.api.inspect_network("lifenet")["Id"]
print(json.dumps({
    "tasks": [[t["DesiredState"], t["Status"]["State"], hosts.get(t.get("NodeID"), "")]
              for t in tasks],
    "client": [hosts[t["NodeID"]], t["ID"]]
              if (t := next(iter(client), None)) else None,
    "vip": [v["Addr"].split("/")[0] for v in c.api.inspect_service(sys.argv[1])["Endpoint"]
            ["VirtualIPs"] if v["NetworkID"] == net],
}))
"""
LIFE_PORT = 30900
# Requests/s per loop. Lower than the namespace lab's 100 (tests/test_lifecycle_lab.py): the
# VMs' CPUs are emulated (TCG, ~20x slower), and at 4 x 100 requests/s serving them takes the
# VMs' whole CPU, so a new task's Python needs minutes to start (measured: a 6-task update took
# 213 s). The loops inside a VM are Python on emulated CPUs too.
LIFE_RATE = 50.0  # from the lab's outside
LIFE_RATE_INSIDE = 10.0  # from the client task, inside its VM
LIFE_REPLICAS = 3
LIFE_SECONDS = 480.0  # at most this long for all the operations
# A request's timeout: an answer 3 s late on a native machine is a fault, on emulated CPUs busy
# starting Python it is ~150 ms of native time; a request to a task that is gone never gets one.
LIFE_TIMEOUT = 15.0


def _life(lab: Lab) -> dict[str, Any]:
    out = labmod.backend(lab).check(lab, "sw1", [sys.executable, "-c", _LIFE, "life"], timeout=180)
    found: dict[str, Any] = json.loads(out)
    return found


def _settled(lab: Lab, replicas: int, off: str | None) -> bool:
    """`replicas` tasks run (none on node `off`) and every other task has ended."""
    tasks = _life(lab)["tasks"]
    up = [(state, node) for desired, state, node in tasks if desired == "running"]
    ending = [state for desired, state, _ in tasks if desired != "running"]
    return (
        len(up) == replicas
        and {state for state, _ in up} == {"running"}
        and off not in {node for _, node in up}
        and not set(ending) - {"complete", "shutdown", "failed"}
    )


# What the test does to `life` under traffic, one after the other: (what, command, how many
# tasks then run, a node none of them may be on).
LIFE_OPERATIONS = [
    (
        "a rolling update",
        ("service", "update", "--env-add", "GENERATION=2", "life"),
        LIFE_REPLICAS,
        None,
    ),
    ("a rollback", ("service", "rollback", "life"), LIFE_REPLICAS, None),
    ("a drain of sw3", ("node", "update", "--availability", "drain", "sw3"), LIFE_REPLICAS, "sw3"),
    ("a scale-down", ("service", "scale", "life=1"), 1, "sw3"),
]


@pytest.mark.timeout(LIFE_SECONDS + 600)  # the operations, and the swarm's boot if first
def test_updates_rollbacks_drains_and_scale_downs_on_ipvs_drop_nothing(swarm: Lab) -> None:
    """docs/updates.md on Debian's kernel, with IPVS: four client loops (the published port
    from the lab's outside, the VIP from another service's task; new connection and
    keep-alive) through a rolling update of `life`, its rollback, a drain of the node holding a
    third of its tasks and a scale-down; every request must succeed."""
    # micro (Python) takes seconds to start on emulated CPUs: failed probes before it listens
    # do not count during the start period
    health = ["--health-cmd", "ss -Hltn 'sport = :8000' | grep -q .", "--health-interval", "1s",
              "--health-start-period", "60s"]  # fmt: skip
    shoal("sw1", "network", "create", "-d", "overlay", "lifenet")
    shoal("sw1", "service", "create", "--name", "lifeclient", "--network", "lifenet",
          "busybox", "sleep", "100000")  # fmt: skip
    shoal("sw1", "service", "create", "--name", "life", "--replicas", str(LIFE_REPLICAS),
          "--network", "lifenet", "--publish", f"{LIFE_PORT}:8000", *health,
          "--update-monitor", "1s", "micro")  # fmt: skip
    try:
        for node in NODES:
            wait(
                lambda: (
                    len(answers(OUTSIDE, ADDR[node], LIFE_PORT, 2 * LIFE_REPLICAS))  # noqa: B023
                    == LIFE_REPLICAS
                ),
                f"every task answering through {node}",
                120,
            )
        life = _life(swarm)
        client_node, client_id = life["client"]
        inside = subprocess.Popen(
            labmod.backend(swarm).exec_argv(
                swarm,
                client_node,
                [
                    "ip",
                    "netns",
                    "exec",
                    f"shoal-{client_id[:12]}",
                    sys.executable,
                    "-c",
                    _LOOPS,
                    life["vip"][0],
                    "8000",
                    str(LIFE_RATE_INSIDE),
                    str(LIFE_SECONDS + 60),
                    str(LIFE_TIMEOUT),
                ],
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert inside.stdout is not None
        if inside.stdout.readline() != "started\n":
            inside.kill()
            raise AssertionError(f"no loops in {client_node}: {inside.communicate()}")
        outside = {
            f"published, {m}": Loop(
                OUTSIDE, ADDR["sw2"], LIFE_PORT, LIFE_RATE, m == "keep-alive", LIFE_TIMEOUT
            )
            for m in ("new connections", "keep-alive")
        }
        for loop in outside.values():
            loop.start()
        started = time.monotonic()
        try:
            time.sleep(3)
            for what, command, replicas, off in LIFE_OPERATIONS:
                begun = time.monotonic()
                done = subprocess.run(
                    shoal_argv("sw1", *command), capture_output=True, text=True, timeout=300
                )
                ps = "" if done.returncode == 0 else shoal("sw1", "service", "ps", "life")
                assert done.returncode == 0, f"{what}: {done.stdout}{done.stderr}{ps}"
                wait(
                    lambda: _settled(swarm, replicas, off),  # noqa: B023
                    f"{what} to settle",
                    LIFE_SECONDS,
                )
                print(f"{what}: {time.monotonic() - begun:.0f} s")
            took = time.monotonic() - started
        finally:
            results = {name: loop.stop() for name, loop in outside.items()}
            for name, r in results.items():
                print(name, r)
        assert took < LIFE_SECONDS, f"the operations took {took:.0f} s: lengthen LIFE_SECONDS"
        out, err = inside.communicate("stop\n", timeout=LIFE_TIMEOUT * 3 + 60)
        assert inside.returncode == 0, err
        for name, r in results.items():
            # a loop sends one request at a time: a new connection to a VM on emulated CPUs
            # takes ~25 ms, so the new-connection loop keeps ~40 of its 50 requests/s
            assert r.failed == 0 and r.sent >= LIFE_RATE * took * 0.6, (name, str(r))
        for name, (sent, failed, text) in json.loads(out).items():
            print(name, text)
            # Python on emulated CPUs: half its rate is what the loop is asked to keep
            assert failed == 0 and sent >= LIFE_RATE_INSIDE * took * 0.5, (name, text)
    finally:
        shoal("sw1", "node", "update", "--availability", "active", "sw3")
        shoal("sw1", "service", "rm", "life", "lifeclient")
        shoal("sw1", "network", "rm", "lifenet")
