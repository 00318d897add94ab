"""The control plane in VMs on Debian's kernel (docs/vm-lab.md): `shoal lab up --vm` runs shoald in
every VM, the shoal CLI inside them (`shoal lab exec swN -- shoal ...`) builds a swarm, an
encrypted overlay made with `network create --opt encrypted` crosses the wire in ESP only with
keys from the managers, and IPVS (picked by `--lb-backend auto`) balances the published port.

One service, `web` (micro, 3 replicas: one per node), on the encrypted network `secnet` and
publishing 8000 on a port the managers allocate. Emulated VMs are slow: the CLI is started few
times, and one Python process in sw1 reads what the tests need through the docker SDK.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from orchestrator.lab import daemons, vm
from orchestrator.lab import lab as labmod
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
