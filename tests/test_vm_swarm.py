"""The control plane in VMs on Debian's kernel (docs/vm-lab.md): `shoal lab up --vm` runs shoald in
every VM, the shoal CLI inside them (`shoal lab exec swN -- shoal ...`) builds a swarm, an
encrypted overlay made with `network create --opt encrypted` crosses the wire in ESP only with
keys from the managers, and IPVS (picked by `--lb-backend auto`) balances the published port.

One service, `web` (micro, 3 replicas: one per node), on the encrypted network `secnet` and
publishing 8000 on a port the managers allocate. Emulated VMs are slow: the CLI is started few
times, and one Python process in sw1 reads what the tests need through the docker SDK.

Last, updates without a dropped request on IPVS (docs/updates.md): service `life` (micro, with
a health check) and four client loops through it while it is updated, rolled back, drained off
a node and scaled down. It shares the swarm (a boot of three VMs is minutes on emulated CPUs)
and makes and removes its own services and network.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from orchestrator.lab import daemons, vm
from orchestrator.lab import lab as labmod
from orchestrator.lab.loadgen import Loop
from orchestrator.lab.record import FIRST_HOST, Lab
from tests.labutil import wait
from tests.netutil import answers, balanced
from tests.vmutil import capture, node_answers, vm_suite

# Booting three VMs, starting shoald in them and building the swarm is the first test's setup.
pytestmark = [*vm_suite, pytest.mark.timeout(600)]

LAB = "tvmswarm"
SUBNET = ipaddress.IPv4Network("192.168.77.0/24")
NODES = ["sw1", "sw2", "sw3"]
ADDR = {n: str(SUBNET.network_address + FIRST_HOST + i) for i, n in enumerate(NODES)}
OUTSIDE = vm.lab_netns(LAB)  # the lab's "host": 192.168.77.1 on its bridge


def lab_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def shoal_argv(node: str, *args: str) -> list[str]:
    """`shoal lab exec --name LAB NODE -- shoal ARGS...`: the CLI on the VM's PATH, talking to
    the VM's shoald."""
    return [
        *(sys.executable, "-m", "orchestrator.cli.main", "lab", "exec", "--name", LAB),
        *(node, "--", "shoal", *args),
    ]


def shoal(node: str, *args: str) -> str:
    out = subprocess.run(shoal_argv(node, *args), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"shoal {' '.join(args)} on {node}: {out.stdout}{out.stderr}"
    return out.stdout


@dataclass
class Swarm:
    lab: Lab
    node_ls: str


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB)
    try:
        up = lab_cli("up", "--vm", "--name", LAB, "--nodes", "3", "--subnet", str(SUBNET))
        assert up.returncode == 0, up.stdout + up.stderr
        assert "shoald runs in every VM" in up.stdout, up.stdout
        init = shoal("sw1", "swarm", "init", "--listen-addr", f"{ADDR['sw1']}:2377")
        found = re.search(r"shoal swarm join --token (\S+) (\S+)", init)
        assert found, init  # the worker's join command
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
        node_ls = ""
        for _ in range(20):  # a joined node is Ready once its session is up
            node_ls = shoal("sw1", "node", "ls")
            if node_ls.count("Ready") == 3:
                break
        lab = labmod.load(LAB)
        assert lab is not None
        yield Swarm(lab, node_ls)
    finally:
        down = lab_cli("down", "--name", LAB)
        assert down.returncode == 0, down.stdout + down.stderr
    # nothing left: the VMs, and the local stand-ins of their shoald
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [p for p in left.splitlines() if f"--name {LAB} " in p or f"-name {LAB}-" in p]
    assert not (labmod.RUN_DIR / LAB).exists()


# One process in sw1 (a manager) reads the service, its tasks and the network.
_DUMP = """
import json, docker
c = docker.from_env()
print(json.dumps({
    "service": c.api.inspect_service("web"),
    "tasks": c.api.tasks(filters={"service": "web", "desired-state": "running"}),
    "nodes": {n["ID"]: n["Description"]["Hostname"] for n in c.api.nodes()},
    "network": c.api.inspect_network("secnet"),
}))
"""


@dataclass
class Task:
    id: str
    node: str
    ips: dict[str, str]  # network name -> address

    @property
    def netns(self) -> str:  # shoald's default task namespace prefix, inside the VM
        return f"shoal-{self.id[:12]}"


@dataclass
class Web:
    tasks: list[Task]
    published: int
    vip: str  # on secnet
    subnet: ipaddress.IPv4Network  # secnet's
    vni: int  # secnet's

    def ips(self, network: str) -> set[str]:
        return {t.ips[network] for t in self.tasks}


def _backends(lab: Lab, node: str) -> set[str]:
    """The destinations of the node's IPVS services (the published port's: its tasks)."""
    table = labmod.backend(lab).check(lab, node, ["ipvsadm", "-Ln"])
    return set(re.findall(r"->\s+(\S+):8000\s+Masq\s", table))


@pytest.fixture(scope="module")
def web(swarm: Swarm) -> Web:
    shoal("sw1", "network", "create", "-d", "overlay", "--opt", "encrypted", "secnet")
    # waits until the 3 tasks run, as `docker service create` does
    shoal(
        "sw1",
        *("service", "create", "--name", "web", "--replicas", "3"),
        *("--network", "secnet", "--publish", "8000", "micro"),
    )
    in_vm = labmod.backend(swarm.lab)
    dump = json.loads(in_vm.check(swarm.lab, "sw1", [sys.executable, "-c", _DUMP], timeout=180))
    tasks = [
        Task(
            t["ID"],
            dump["nodes"][t["NodeID"]],
            {
                a["Network"]["Spec"]["Name"]: a["Addresses"][0].split("/")[0]
                for a in t["NetworksAttachments"]
            },
        )
        for t in dump["tasks"]
        if t["Status"]["State"] == "running"
    ]
    assert len(tasks) == 3, dump["tasks"]
    # running, as the service's tasks are: micro may still be starting, and the nodes' load
    # balancers get a task once it runs
    for t in tasks:
        listening = ["ip", "netns", "exec", t.netns, "ss", "-Hltn", "sport = :8000"]
        wait(lambda: bool(in_vm.run(swarm.lab, t.node, listening).stdout.strip()), t.id, 120)  # noqa: B023
    for node in NODES:
        wait(lambda: len(_backends(swarm.lab, node)) == 3, f"3 backends in {node}", 120)  # noqa: B023
    net = dump["network"]
    endpoint = dump["service"]["Endpoint"]
    (vip,) = [v["Addr"] for v in endpoint["VirtualIPs"] if v["NetworkID"] == net["Id"]]
    return Web(
        tasks,
        endpoint["Ports"][0]["PublishedPort"],
        vip.split("/")[0],
        ipaddress.IPv4Network(net["IPAM"]["Config"][0]["Subnet"]),
        int(net["Options"]["com.docker.network.driver.overlay.vxlanid_list"]),
    )


def test_the_cli_in_each_vm_talks_to_its_shoald_and_builds_a_swarm(swarm: Swarm) -> None:
    lines = [line for line in swarm.node_ls.splitlines() if "Ready" in line]
    assert len(lines) == 3, swarm.node_ls
    assert {n for n in NODES if any(f" {n} " in line for line in lines)} == set(NODES)
    assert any("sw1" in line and "Leader" in line for line in lines), swarm.node_ls
    # workers answer for themselves, not for the swarm
    worker = subprocess.run(shoal_argv("sw2", "node", "ls"), capture_output=True, text=True)
    assert worker.returncode != 0 and "not a swarm manager" in worker.stderr, worker
    # the host cannot reach a VM's shoald, and says so rather than print a broken DOCKER_HOST
    env = lab_cli("env", "--name", LAB, "sw1")
    assert env.returncode == 1 and "inside its VM" in env.stderr, env
    assert daemons.docker_host(swarm.lab, "sw1") == "unix:///run/shoal/shoal.sock"


def test_the_encrypted_overlay_carries_traffic_between_nodes_in_esp_only(
    swarm: Swarm, web: Web, tmp_path: Path
) -> None:
    assert {t.node for t in web.tasks} == set(NODES)  # one task per node
    here = next(t for t in web.tasks if t.node == "sw1")
    there = [t for t in web.tasks if t.node != "sw1"]
    targets = [f"{web.vip}:8000", *(f"{t.ips['secnet']}:8000" for t in there)]
    with capture(swarm.lab, tmp_path / "wire.pcap") as cap:
        got = node_answers(swarm.lab, "sw1", here.netns, targets, 9)
        answers(OUTSIDE, ADDR["sw2"], web.published, 6)  # plaintext ingress, as a control
    assert balanced(got[targets[0]], web.ips("secnet")), got  # the VIP, sw1's task included
    for target, t in zip(targets[1:], there, strict=True):
        assert set(got[target]) == {t.ips["secnet"]}, got

    packets = rdpcap(str(cap.path))
    esp = {(p[IP].src, p[IP].dst) for p in packets if IP in p and p[IP].proto == 50}
    for t in there:
        assert {(ADDR["sw1"], ADDR[t.node]), (ADDR[t.node], ADDR["sw1"])} <= esp, esp
    vnis = Counter(p[VXLAN].vni for p in packets if VXLAN in p)
    assert vnis and web.vni not in vnis, vnis  # the capture does see (ingress) VXLAN
    inner = [(p, p[VXLAN][IP]) for p in packets if VXLAN in p and IP in p[VXLAN]]
    leaked = [
        p.summary()
        for p, ip in inner
        if {ipaddress.IPv4Address(ip.src), ipaddress.IPv4Address(ip.dst)} & set(web.subnet)
    ]
    assert not leaked, leaked[:5]


def test_the_published_port_round_robins_over_every_task_through_ipvs(
    swarm: Swarm, web: Web
) -> None:
    assert 30000 <= web.published <= 32767
    for node in NODES:
        counts = answers(OUTSIDE, ADDR[node], web.published, 12)
        assert balanced(counts, web.ips("ingress")), (node, counts)
    table = labmod.backend(swarm.lab).check(swarm.lab, "sw2", ["ipvsadm", "-Ln"])
    assert len(re.findall(r"^FWM\s+\d+ rr", table, re.M)) == 1, table  # the published port
    assert _backends(swarm.lab, "sw2") == web.ips("ingress"), table


# ---- updates without a dropped request (docs/updates.md), on IPVS ----------------------------

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
print(json.dumps({name: [loop.stop().sent, loop.result.failed, str(loop.result),
                         loop.result.events] for name, loop in loops.items()}))
"""
LIFE_PORT = 30900
# Requests/s per loop. Lower than the namespace lab's 100 (tests/test_lifecycle_lab.py): the
# VMs' CPUs are emulated (TCG, ~20x slower), and at 4 x 100 requests/s serving them takes the
# VMs' whole CPU, so a new task's Python needs minutes to start (measured: a 6-task update took
# 213 s). The loops inside a VM are Python on emulated CPUs too.
LIFE_RATE = 50.0  # from the lab's outside
LIFE_RATE_INSIDE = 10.0  # from the client task, inside its VM
LIFE_REPLICAS = 3
# An update or rollback replaces every task in one round, new ones first: each of the three
# tasks in turn took ~45 s on emulated CPUs (mostly Python starting), and what is tested here
# is how the balancers let the old tasks go, which one round does to all three.
ONE_ROUND = [
    *("--update-parallelism", str(LIFE_REPLICAS), "--update-order", "start-first"),
    *("--rollback-parallelism", str(LIFE_REPLICAS), "--rollback-order", "start-first"),
]
LIFE_SECONDS = 480.0  # at most this long for all the operations
# A request's timeout: an answer 3 s late on a native machine is a fault, on emulated CPUs busy
# starting Python it is ~150 ms of native time; a request to a task that is gone never gets one.
LIFE_TIMEOUT = 15.0
MIN_SHARE = 0.2  # of its rate, what a loop must have sent (the test says why)


def _api(lab: Lab, node: str, paths: list[str]) -> list[Any]:
    """GETs of the node's shoald API, made inside its VM with curl (a Python with the docker SDK
    costs seconds of an emulated CPU per start; the tests poll), decoded here."""
    curl = f"curl -sf --unix-socket {vm.SHOALD_SOCKET} 'http://x/v1.44%s'; echo"
    script = "; ".join(curl % p for p in paths)
    out = labmod.backend(lab).check(lab, node, ["sh", "-c", script], timeout=180)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _filters(**kw: str) -> str:
    return "?filters=" + urllib.parse.quote(json.dumps({k: [v] for k, v in kw.items()}))


def _life(lab: Lab) -> dict[str, Any]:
    """`life`'s tasks (desired state, state, node), a running task of `lifeclient` (node, ID)
    and `life`'s VIP on lifenet."""
    tasks, nodes, clients, service, net = _api(
        lab,
        "sw1",
        [
            "/tasks" + _filters(service="life"),
            "/nodes",
            "/tasks" + _filters(service="lifeclient", **{"desired-state": "running"}),
            "/services/life",
            "/networks/lifenet",
        ],
    )
    hosts = {n["ID"]: n["Description"]["Hostname"] for n in nodes}
    client = next((t for t in clients if t["Status"]["State"] == "running"), None)
    return {
        "tasks": [
            [
                t["DesiredState"],
                t["Status"]["State"],
                hosts.get(t.get("NodeID"), ""),
                t["Status"].get("Err") or t["Status"].get("Message", ""),
            ]
            for t in tasks
        ],
        "client": [hosts[client["NodeID"]], client["ID"]] if client else None,
        "vip": [
            v["Addr"].split("/")[0]
            for v in service["Endpoint"]["VirtualIPs"]
            if v["NetworkID"] == net["Id"]
        ],
    }


def _placed(events: list[tuple[float, str]], begins: list[tuple[float, str]]) -> list[str]:
    """Failures as 'kind, N s into OPERATION': which operation (and which moment of it) lost
    requests, to line up with the nodes' logs."""
    out = []
    for at, kind in events[:20]:
        begun, what = max((b for b in begins if b[0] <= at), default=(at, "before the first"))
        out.append(f"{kind}, {at - begun:.1f} s into {what}")
    return out


def _settled(lab: Lab, replicas: int, off: str | None, seen: list[list[str]]) -> bool:
    """`replicas` tasks run (none on node `off`) and every other task has ended; `seen` gets
    the tasks looked at (a test that times out says in what state `life` was)."""
    tasks = _life(lab)["tasks"]
    seen[:] = tasks
    up = [(state, node) for desired, state, node, _ in tasks if desired == "running"]
    ending = [state for desired, state, _, _ in tasks if desired != "running"]
    return (
        len(up) == replicas
        and {state for state, _ in up} == {"running"}
        and off not in {node for _, node in up}
        and not set(ending) - {"complete", "shutdown", "failed", "rejected", "orphaned"}
    )


# What the test does to `life` under traffic, one after the other (detached: the test sees them
# settle, without the CLI polling on sw1 too): (what, command, how many
# tasks then run, a node none of them may be on).
LIFE_OPERATIONS = [
    (
        "a rolling update",
        ("service", "update", "--detach", "--env-add", "GENERATION=2", "life"),
        LIFE_REPLICAS,
        None,
    ),
    ("a rollback", ("service", "rollback", "--detach", "life"), LIFE_REPLICAS, None),
    ("a drain of sw3", ("node", "update", "--availability", "drain", "sw3"), LIFE_REPLICAS, "sw3"),
    ("a scale-down", ("service", "scale", "--detach", "life=1"), 1, "sw3"),
]


@pytest.mark.timeout(LIFE_SECONDS + 600)  # the operations, and the swarm's boot if first
def test_updates_rollbacks_drains_and_scale_downs_on_ipvs_drop_nothing(swarm: Swarm) -> None:
    """docs/updates.md on Debian's kernel, with IPVS: four client loops (the published port
    from the lab's outside, the VIP from another service's task; new connection and
    keep-alive) through a rolling update of `life`, its rollback, a drain of the node holding a
    third of its tasks and a scale-down; every request must succeed."""
    # micro (Python) takes seconds to start on emulated CPUs: failed probes before it listens
    # do not count during the start period. A node's mesh there takes seconds to apply a view,
    # and an ending task waits for every node's (docs/updates.md) at most its grace period.
    health = ["--health-cmd", "ss -Hltn 'sport = :8000' | grep -q .", "--health-interval", "1s",
              "--health-start-period", "60s"]  # fmt: skip
    shoal("sw1", "network", "create", "-d", "overlay", "lifenet")
    shoal("sw1", "service", "create", "--name", "lifeclient", "--network", "lifenet",
          "busybox", "sleep", "100000")  # fmt: skip
    shoal("sw1", "service", "create", "--name", "life", "--replicas", str(LIFE_REPLICAS),
          "--network", "lifenet", "--publish", f"{LIFE_PORT}:8000", *health,
          "--update-monitor", "1s", *ONE_ROUND, "--stop-grace-period", "30s",
          "micro")  # fmt: skip
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
        life = _life(swarm.lab)
        client_node, client_id = life["client"]
        inside = subprocess.Popen(
            labmod.backend(swarm.lab).exec_argv(
                swarm.lab,
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
        begins: list[tuple[float, str]] = []  # (time.time(), operation): to place failures
        try:
            time.sleep(3)
            for what, command, replicas, off in LIFE_OPERATIONS:
                begun = time.monotonic()
                begins.append((time.time(), what))
                done = subprocess.run(
                    shoal_argv("sw1", *command), capture_output=True, text=True, timeout=300
                )
                ps = "" if done.returncode == 0 else shoal("sw1", "service", "ps", "life")
                assert done.returncode == 0, f"{what}: {done.stdout}{done.stderr}{ps}"
                seen: list[list[str]] = []
                try:
                    wait(
                        lambda: _settled(swarm.lab, replicas, off, seen),  # noqa: B023
                        f"{what} to settle",
                        LIFE_SECONDS,
                        every=2,  # each look is work for sw1's emulated CPU, which runs tasks too
                    )
                except AssertionError as e:
                    last = "\n".join(" ".join(t) for t in seen)
                    nodes = shoal("sw1", "node", "ls")
                    why = f"{e}; life's tasks (desired, state, node, why):\n{last}\n{nodes}"
                    raise AssertionError(why) from None
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
            # A loop sends one request at a time, and a new connection to a VM on emulated
            # CPUs takes 25-70 ms as the host is busy: the new-connection loop has kept 15-40
            # of its 50 requests/s (CI: 25). What is asked is that it kept probing throughout.
            assert r.failed == 0 and r.sent >= LIFE_RATE * took * MIN_SHARE, (
                name,
                str(r),
                _placed(r.events, begins),
            )
        for name, (sent, failed, text, events) in json.loads(out).items():
            print(name, text)
            # Python on emulated CPUs, beside the tasks it calls: likewise. (The VM's clock is
            # the host's, from boot: its failures line up with the operations to a second.)
            assert failed == 0 and sent >= LIFE_RATE_INSIDE * took * MIN_SHARE, (
                name,
                f"from {client_node}",
                text,
                _placed([(at, kind) for at, kind in events], begins),
            )
    finally:
        shoal("sw1", "node", "update", "--availability", "active", "sw3")
        shoal("sw1", "service", "rm", "life", "lifeclient")
        shoal("sw1", "network", "rm", "lifenet")
