"""The routing mesh on IPVS, and encrypted overlays, in VMs running Debian's kernel
(docs/vm-lab.md).

The scenarios every lab passes (tests/test_mesh_lab.py's `RoutingMesh`), with shoal-mesh on
IPVS in a 3-VM lab: sw1 and sw2 run `--lb-backend ipvs`, sw3 `auto`, which must pick IPVS
there; then what only this kernel has: IPVS's own view, and network `secure`, encrypted, whose
VXLAN must cross the lab's bridge in ESP only.

Service `web` (4 tasks on sw1 and sw3) publishes 30000/tcp and 30001/udp; service `vault` has
a task on sw1 and one on sw3, on `secure` only. Clients "from outside" run in the lab's
namespace on the host, the others in the VMs.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from mesh import ipsec
from mesh.netns import run_in_netns
from orchestrator.lab import lab as labmod
from orchestrator.lab import vm
from orchestrator.lab.record import VM, Lab
from orchestrator.lab.vmmesh import VmMeshLab
from tests.netutil import answers
from tests.test_mesh_lab import RoutingMesh, task, vip, web_ips
from tests.vmutil import capture, node_answers, vm_suite

pytestmark = vm_suite

LAB = "tvm"
NODES = ["sw1", "sw2", "sw3"]
ADDR = {"sw1": "192.168.56.11", "sw2": "192.168.56.12", "sw3": "192.168.56.13"}
FRESH_PORTS = 20100  # source ports no other test uses (below the ephemeral range)
OUTSIDE = vm.lab_netns(LAB)  # the lab's "host": 192.168.56.1 on its bridge
SECURE_VNI = 4200
RESYNC = ["--resync-interval", "10"]


@pytest.fixture(scope="module")
def vmlab() -> Iterator[Lab]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB)
    lab = labmod.up(LAB, 3, ipaddress.IPv4Network("192.168.56.0/24"), kind=VM)
    try:
        yield lab
    finally:
        labmod.down(LAB)


@pytest.fixture(scope="module")
def mesh(vmlab: Lab) -> Iterator[VmMeshLab]:
    # No clean-up of its own: what it starts and makes lives in the VMs, which `down` stops.
    m = VmMeshLab(vmlab)
    m.add_network("ingress", 4096, "10.255.0.0/16", ingress=True)
    m.add_encrypted_network("secure", SECURE_VNI, "10.0.42.0/24")
    m.add_service(
        "web",
        [
            {"protocol": "tcp", "target": 8000, "published": 30000},
            {"protocol": "udp", "target": 8000, "published": 30001},
        ],
        ["ingress"],
    )
    m.add_service("vault", [{"protocol": "tcp", "target": 8000}], ["secure"])
    for node in ("sw1", "sw3", "sw1", "sw3"):
        m.add_task("web", node)
    for node in ("sw1", "sw3"):
        m.add_task("vault", node)
    m.publish()
    m.start_daemon("sw1", "--lb-backend", "ipvs", *RESYNC)
    m.start_daemon("sw2", "--lb-backend", "ipvs", *RESYNC)
    m.start_daemon("sw3", *RESYNC)  # auto
    m.wait_synced(timeout=240)
    for t in m.tasks.values():
        m.start_workload(t)
    for t in m.tasks.values():
        m.wait_listening(t)
    yield m


class TestRoutingMeshOnVms(RoutingMesh):
    """In VMs, balanced by IPVS; emulated, so slower to answer and to apply a change."""

    query_timeout = 5.0
    settle = 1.0
    watch = 3.0
    min_after = 30
    udp_flows_stay_while_ending = False  # mesh/lb/ipvs.py: a UDP destination goes at once


# ---- IPVS ----------------------------------------------------------------------------------------


def test_auto_picks_ipvs_on_debians_kernel(mesh: VmMeshLab) -> None:
    for node in NODES:  # sw3 was started with the default, auto
        assert 'shoal_mesh_info{lb_backend="ipvs"} 1.0' in mesh.metrics(node), node
    table = mesh.run("sw2", ["ipvsadm", "-Ln"])
    services = re.findall(r"^FWM\s+(\d+) rr", table, re.M)
    assert len(services) == 2, table  # 30000/tcp and 30001/udp
    assert all(int(s) >> 24 == 0x5E for s in services)
    assert len(re.findall(r"->\s+10\.255\.\S+\s+Masq\s+1\s", table)) == 8, table


def test_metrics_count_connections_from_ipvs(mesh: VmMeshLab) -> None:
    def published_total() -> dict[str, float]:
        out: dict[str, float] = {}
        for line in mesh.metrics("sw2").splitlines():
            if (
                line.startswith("shoal_mesh_backend_connections_total{")
                and 'frontend="published"' in line
                and 'protocol="tcp"' in line
            ):
                backend = line.split('backend="')[1].split(":")[0]
                out[backend] = float(line.rsplit(" ", 1)[1])
        return out

    def from_fresh_ports() -> Counter[str]:
        """40 requests, each from a source port of its own below the ephemeral range. IPVS
        (conn_reuse_mode 0, mesh/lb/ipvs.py) hands a new connection whose address and port
        match one of the last 2 minutes' to that one's backend without counting it; after
        the earlier tests' thousands of connections, 6 of 40 ephemeral ones went uncounted."""
        seen: Counter[str] = Counter()
        for sport in range(FRESH_PORTS, FRESH_PORTS + 40):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.settimeout(10)
                s.bind(("", sport))
                s.connect((ADDR["sw2"], 30000))
                s.sendall(b"GET / HTTP/1.1\r\nHost: micro\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            seen[data.split(b"\r\n\r\n", 1)[1].decode()] += 1
        return seen

    before = published_total()
    assert sum(run_in_netns(OUTSIDE, from_fresh_ports).values()) == 40
    want = {ip: 10.0 for ip in web_ips(mesh)}
    deadline = time.monotonic() + 10  # IPVS sums its counters every 2 s
    while True:
        after = published_total()
        delta = {ip: after[ip] - before.get(ip, 0) for ip in after}
        if delta == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert delta == want


# ---- ESP -----------------------------------------------------------------------------------------


def _secure(m: VmMeshLab, name: str) -> str:
    return str(task(m, name).ips["secure"])


def _counter(m: VmMeshLab, node: str, name: str) -> int:
    out = m.run(node, ["nft", "list", "counter", "ip", ipsec.TABLE, name])
    found = re.search(r"packets (\d+)", out)
    assert found, out
    return int(found.group(1))


def test_encrypted_network_has_esp_associations_per_node_pair(mesh: VmMeshLab) -> None:
    assert mesh.encryption is not None
    keys = len(mesh.encryption.keys)
    for node in NODES:
        listed = mesh.run(node, ["ip", "xfrm", "state", "list"])
        sas = ipsec.parse_states(listed)
        assert listed.count(f"aead {ipsec.AEAD}") == len(sas) and "mode transport" in listed
        me = ADDR[node]
        for peer in (ADDR[n] for n in NODES if n != node):
            assert len([s for s in sas if (s[0], s[1]) == (peer, me)]) == keys, (node, peer)
            assert len([s for s in sas if (s[0], s[1]) == (me, peer)]) == 1, (node, peer)
        policies = ipsec.parse_policies(mesh.run(node, ["ip", "xfrm", "policy", "list"]))
        assert set(policies) == {(me, ADDR[n]) for n in NODES if n != node}


def test_encrypted_network_mtu_leaves_room_for_esp(mesh: VmMeshLab, tmp_path: Path) -> None:
    links = mesh.run("sw1", ["ip", "-o", "link"])
    assert re.search(rf"sh-vx{SECURE_VNI}: .* mtu 1416 ", links), links
    assert re.search(r"sh-vx4096: .* mtu 1450 ", links), links
    vault1 = task(mesh, "vault.1")
    ping = ["ip", "netns", "exec", vault1.netns, "ping", "-M", "do", "-c", "2", "-W", "5"]
    with capture(mesh.lab, tmp_path / "mtu.pcap", "esp") as cap:
        mesh.run("sw1", [*ping, "-s", "1388", _secure(mesh, "vault.2")])  # 1416 with headers
    too_big = mesh.backend.run(mesh.lab, "sw1", [*ping, "-s", "1389", _secure(mesh, "vault.2")])
    assert too_big.returncode != 0 and "mtu=1416" in too_big.stdout + too_big.stderr
    sizes = [p[IP].len for p in rdpcap(str(cap.path)) if IP in p and p[IP].proto == 50]
    # a full-size overlay frame makes a full-size ESP packet: no fragments on the underlay
    assert max(sizes) == 1500, sizes
    assert not [p for p in rdpcap(str(cap.path)) if IP in p and (p[IP].flags.MF or p[IP].frag)]


def _layers(p: object) -> list[IP]:
    out = []
    layer = p
    while layer is not None and hasattr(layer, "getlayer"):
        found = layer.getlayer(IP)
        if found is None:
            break
        out.append(found)
        layer = found.payload
    return out


def test_only_esp_crosses_the_wire_for_the_encrypted_network(
    mesh: VmMeshLab, tmp_path: Path
) -> None:
    vault1 = task(mesh, "vault.1")
    secure = ipaddress.IPv4Network("10.0.42.0/24")
    with capture(mesh.lab, tmp_path / "wire.pcap") as cap:
        got = node_answers(
            mesh.lab,
            "sw1",
            vault1.netns,
            [f"{_secure(mesh, 'vault.2')}:8000", f"{vip(mesh, 'vault', 'secure')}:8000"],
            10,
        )
        answers(OUTSIDE, ADDR["sw2"], 30000, 8)  # the unencrypted ingress, as a control
    assert set(got[f"{_secure(mesh, 'vault.2')}:8000"]) == {_secure(mesh, "vault.2")}
    assert set(got[f"{vip(mesh, 'vault', 'secure')}:8000"]) == {
        _secure(mesh, "vault.1"),
        _secure(mesh, "vault.2"),
    }
    packets = rdpcap(str(cap.path))
    esp = {(p[IP].src, p[IP].dst) for p in packets if IP in p and p[IP].proto == 50}
    assert {(ADDR["sw1"], ADDR["sw3"]), (ADDR["sw3"], ADDR["sw1"])} <= esp, esp
    vnis = Counter(p[VXLAN].vni for p in packets if VXLAN in p)
    assert vnis[4096] > 0 and SECURE_VNI not in vnis, vnis  # the capture does see VXLAN
    leaked = [
        p.summary()
        for p in packets
        for layer in _layers(p)
        if ipaddress.IPv4Address(layer.src) in secure or ipaddress.IPv4Address(layer.dst) in secure
    ]
    assert not leaked, leaked[:5]


def test_plaintext_vxlan_for_the_encrypted_network_is_dropped(mesh: VmMeshLab) -> None:
    vault1 = task(mesh, "vault.1")
    name = f"plaintext-in-{SECURE_VNI}"
    before = _counter(mesh, "sw1", name)

    def inject(vni: int) -> None:
        inner = (
            Ether(dst="02:42:" + ":".join(f"{b:02x}" for b in vault1.ips["secure"].packed))
            / IP(src="10.0.42.200", dst=str(vault1.ips["secure"]))
            / UDP(sport=5555, dport=8000)
            / b"hello"
        )
        payload = bytes(VXLAN(vni=vni, flags=0x08) / inner)

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(payload, (ADDR["sw1"], 4789))

        run_in_netns(OUTSIDE, send)

    inject(SECURE_VNI)
    inject(SECURE_VNI)
    inject(4096)  # a plaintext network's VXLAN is not this rule's business
    deadline = time.monotonic() + 10
    while _counter(mesh, "sw1", name) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _counter(mesh, "sw1", name) == before + 2


def test_without_its_esp_policy_nothing_is_sent_in_the_clear(
    mesh: VmMeshLab, tmp_path: Path
) -> None:
    vault1 = task(mesh, "vault.1")
    ping = ["ip", "netns", "exec", vault1.netns, "ping", "-c", "3", "-i", "0.3", "-W", "1"]
    name = f"plaintext-out-{SECURE_VNI}"
    before = _counter(mesh, "sw1", name)
    daemon = ["pkill", "-f", "mesh.cli run"]
    mesh.run("sw1", [*daemon, "--signal", "STOP"])  # or its periodic check repairs it at once
    mesh.run("sw1", ["ip", "xfrm", "policy", "flush"])  # as if it had been lost
    try:
        with capture(mesh.lab, tmp_path / "leak.pcap", "udp port 4789 or esp") as cap:
            lost = mesh.backend.run(mesh.lab, "sw1", [*ping, _secure(mesh, "vault.2")])
        assert lost.returncode != 0, lost.stdout
        assert _counter(mesh, "sw1", name) > before
        leaked = [p for p in rdpcap(str(cap.path)) if VXLAN in p and p[VXLAN].vni == SECURE_VNI]
        assert not leaked
    finally:
        mesh.run("sw1", [*daemon, "--signal", "CONT"])
        mesh.signal_daemon("sw1", signal.SIGUSR1)  # a full resync puts the policies back
    deadline = time.monotonic() + 60
    while mesh.backend.run(mesh.lab, "sw1", [*ping, _secure(mesh, "vault.2")]).returncode != 0:
        assert time.monotonic() < deadline, "the full resync did not restore ESP"


def test_key_rotation_loses_no_packet(mesh: VmMeshLab) -> None:
    vault1 = task(mesh, "vault.1")
    count = 500
    pinger = subprocess.Popen(
        mesh.task_argv(
            vault1,
            ["ping", "-q", "-i", "0.05", "-W", "5", "-c", str(count), _secure(mesh, "vault.2")],
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )

    def outbound_spi() -> int:
        sas = ipsec.parse_states(mesh.run("sw1", ["ip", "xfrm", "state", "list"]))
        (spi,) = [s[2] for s in sas if (s[0], s[1]) == (ADDR["sw1"], ADDR["sw3"])]
        return spi

    def primary_spi() -> int:
        assert mesh.encryption is not None
        return ipsec.derive(mesh.encryption.primary_key, ADDR["sw1"], ADDR["sw3"])[0]

    assert outbound_spi() == primary_spi()
    spis = {outbound_spi()}
    first = mesh.encryption.keys[0].tag if mesh.encryption else -1
    try:
        for _ in range(3):
            mesh.rotate_keys()
            # node by node, as a control plane reaches them: for a while sw1 sends with the
            # new primary while sw3 has not heard of the rotation
            for node in ("sw1", "sw3", "sw2"):
                mesh.publish([node])
                mesh.wait_synced(nodes=[node], timeout=60)
            assert outbound_spi() == primary_spi()
            spis.add(outbound_spi())
        rotated = pinger.poll() is None
        out, _ = pinger.communicate(timeout=120)
    finally:
        pinger.kill()
    assert rotated, "the rotations outlasted the ping; make it longer"
    assert len(spis) >= 3, spis  # the primary changed (it is the second-newest key)
    assert f"{count} packets transmitted, {count} received" in out, out
    sas = ipsec.parse_states(mesh.run("sw1", ["ip", "xfrm", "state", "list"]))
    assert len([s for s in sas if s[1] == ADDR["sw1"] and s[0] == ADDR["sw3"]]) == 3
    assert mesh.encryption is not None and first not in {k.tag for k in mesh.encryption.keys}
