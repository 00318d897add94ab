"""Cluster security (docs/security.md) in a lab: mutual TLS on every control-plane connection,
the join flow's refusals, authorization by role, removed nodes, and root rotation under load.

The lab bridge is captured from before `swarm init` to the end of the module; the last test
reads the capture and finds TLS on every connection to a manager and no plaintext gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest
from grpc import aio

from orchestrator.ca.files import load_node_credentials
from orchestrator.ca.pki import NodeCSR, PKIError, RootCA
from orchestrator.ca.tls import NodeCredentials, join_channel, member_channel
from orchestrator.lab import daemons, faults
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab
from orchestrator.rpc import jsonrpc
from orchestrator.store.objects import Role
from tests.labutil import fresh, shoal, wait
from tests.netutil import answers, balanced, round_robin

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tsec"
SUBNET = ipaddress.IPv4Network("192.168.74.0/24")
PORTS = (2377, 2378)


def node_creds(lab: Lab, node: str) -> NodeCredentials:
    """The node's credentials, read beside its shoald (never recovering its saves). A save
    renames its files into place one by one: a read between two renames is tried again."""
    directory = daemons.node_dir(lab, node) / "data" / "certificates"
    for _ in range(20):
        with contextlib.suppress(PKIError):
            creds = load_node_credentials(directory, recover=False)
            assert creds is not None, f"{node} has no certificate"
            return creds
        time.sleep(0.05)
    raise AssertionError(f"{node}'s key and certificate did not match for a second")


def call(
    lab: Lab, creds: NodeCredentials | None, service: str, method: str, msg: dict[str, Any]
) -> dict[str, Any]:
    """One RPC to sw1's control port, from the host, as the holder of `creds` (None: a plain
    TCP client without TLS)."""
    target = f"{lab.node('sw1').address}:2377"

    async def go() -> dict[str, Any]:
        channel = aio.insecure_channel(target) if creds is None else member_channel(target, creds)
        client = jsonrpc.Client(target, channel)
        try:
            return await client.call(service, method, msg, deadline=5)
        finally:
            await client.close()

    return asyncio.run(go())


def refused(lab: Lab, creds: NodeCredentials | None, service: str, method: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(lab, creds, service, method, {})
    return err.value


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB, purge=True)
    lab = labmod.up(LAB, 3, SUBNET)
    pcap = tmp_path_factory.mktemp("capture") / "bridge.pcap"
    dump = subprocess.Popen(
        ["tcpdump", "-i", lab.bridge, "-U", "-s", "0", "-w", str(pcap), "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)  # tcpdump is listening before the swarm says anything
        daemons.start_all(lab)
        first = lab.node("sw1").address
        shoal(lab, "sw1", "swarm", "init", "--advertise-addr", first, "--dispatcher-heartbeat", "1")
        token = shoal(lab, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
        shoal(lab, "sw2", "swarm", "join", "--token", token, f"{first}:2377")
        yield lab, pcap
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
        labmod.down(LAB, purge=True)


def test_join_refusals(cluster: tuple[Lab, Path]) -> None:
    lab, _ = cluster
    first = f"{lab.node('sw1').address}:2377"
    good = shoal(lab, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
    digest, secret = good.split("-")[2], good.split("-")[3]
    other_swarm = "SWMTKN-1-" + "1" * 50 + "-" + secret  # another CA's digest
    wrong_secret = f"SWMTKN-1-{digest}-" + "0" * 25
    cases = [
        ("garbage", "does not start with SWMTKN-"),
        (other_swarm, "does not match the fingerprint"),
        (wrong_secret, "invalid join token"),
    ]
    for token, message in cases:
        out = shoal(lab, "sw3", "swarm", "join", "--token", token, first, check=False)
        assert out.returncode == 1 and message in out.stderr, (token, out.stderr)
    # a good token with a CSR that is not one: refused, and no node is left half-made
    nodes_before = shoal(lab, "sw1", "node", "ls", "-q").stdout
    joins = f"{lab.node('sw1').address}:2378"
    root = RootCA.from_pem(node_creds(lab, "sw1").trust_pem)

    async def bad_csr() -> dict[str, Any]:
        client = jsonrpc.Client(joins, join_channel(joins, root))
        try:
            msg = {"token": good, "csr": "not a CSR", "addr": "192.0.2.9"}
            return await client.call("shoal.CA", "IssueNodeCertificate", msg, deadline=5)
        finally:
            await client.close()

    with pytest.raises(grpc.RpcError) as err:
        asyncio.run(bad_csr())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert shoal(lab, "sw1", "node", "ls", "-q").stdout == nodes_before
    # a rotated-away token no longer works; the new one does
    shoal(lab, "sw1", "swarm", "join-token", "--rotate", "worker")
    out = shoal(lab, "sw3", "swarm", "join", "--token", good, first, check=False)
    assert out.returncode == 1 and "invalid join token" in out.stderr, out.stderr
    assert "sw3" not in shoal(lab, "sw1", "node", "ls").stdout.split()  # an ID may hold sw3
    logs = (daemons.node_dir(lab, "sw1") / "shoald.log").read_text()
    assert "refused a join" in logs


def test_a_manager_impostor_is_refused(cluster: tuple[Lab, Path]) -> None:
    """A join port serving another CA's root: the token's digest does not match it."""
    lab, _ = cluster
    fake_root = RootCA.create()
    csr = NodeCSR.generate()
    chain = fake_root.issuer().sign_csr(
        csr.pem, node_id="impostor", role=Role.MANAGER, cluster_id="fake"
    )
    creds = NodeCredentials(csr.key_pem, chain, fake_root.cert_pem)
    host = lab.gateway
    stop = threading.Event()
    started = threading.Event()

    def serve() -> None:
        async def main() -> None:
            from orchestrator.ca.tls import CredentialsSource  # noqa: PLC0415

            async def get_root(req: jsonrpc.Message, ctx: jsonrpc.Context) -> jsonrpc.Message:
                return {"root": fake_root.cert_pem.decode()}

            server = jsonrpc.server()
            server.add_generic_rpc_handlers(
                [jsonrpc.service("shoal.CA", unary={"GetRootCACertificate": get_root})]
            )
            server.add_secure_port(
                f"{host}:2378", CredentialsSource(creds).join_server_credentials()
            )
            await server.start()
            started.set()
            await asyncio.to_thread(stop.wait)
            await server.stop(None)

        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert started.wait(10)
    try:
        token = shoal(lab, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
        out = shoal(lab, "sw3", "swarm", "join", "--token", token, f"{host}:2377", check=False)
        assert out.returncode == 1 and "does not match the fingerprint" in out.stderr, out.stderr
    finally:
        stop.set()
        t.join(10)


def test_plain_clients_and_other_cas_get_nothing(cluster: tuple[Lab, Path]) -> None:
    lab, _ = cluster
    err = refused(lab, None, "shoal.Dispatcher", "Managers")
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # a plain HTTP/2 client: no handshake
    with socket.create_connection((lab.node("sw1").address, 2377), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 9)
        s.settimeout(5)
        try:
            reply = s.recv(100)
        except (TimeoutError, ConnectionResetError):
            reply = b""
        assert b"HTTP" not in reply and (not reply or reply[0] == 0x15)  # at most a TLS alert
    stranger = RootCA.create()
    csr = NodeCSR.generate()
    chain = stranger.issuer().sign_csr(
        csr.pem, node_id="stranger", role=Role.MANAGER, cluster_id="other"
    )
    other = NodeCredentials(csr.key_pem, chain, node_creds(lab, "sw2").trust_pem)
    err = refused(lab, other, "shoal.Dispatcher", "Managers")
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # refused in the TLS handshake
    # and the manager's log says so, with the reason
    logs = (daemons.node_dir(lab, "sw1") / "shoald.log").read_text()
    assert "Handshake failed" in logs and "WRONG_VERSION_NUMBER" in logs
    assert "CERTIFICATE_VERIFY_FAILED" in logs


def test_a_worker_cannot_call_manager_rpcs(cluster: tuple[Lab, Path]) -> None:
    lab, _ = cluster
    worker = node_creds(lab, "sw2")
    assert worker.identity.role is Role.WORKER
    assert "leader" in call(lab, worker, "shoal.Dispatcher", "Managers", {})
    err = refused(lab, worker, "shoal.RaftControl", "Propose")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "is for managers" in (err.details() or "")
    manager = node_creds(lab, "sw1")
    # nor speak for another node: its certificate says who it is
    assert "period" in call(
        lab, worker, "shoal.Dispatcher", "Heartbeat", {"node_id": worker.identity.node_id}
    )
    with pytest.raises(grpc.RpcError) as err_info:
        call(lab, worker, "shoal.Dispatcher", "Heartbeat", {"node_id": manager.identity.node_id})
    assert err_info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = call(lab, manager, "shoal.RaftControl", "Propose", {"data": ""})
    assert "error" in reply  # admitted (and refused by Raft for its empty data)


def test_a_removed_node_is_refused_from_then_on(cluster: tuple[Lab, Path]) -> None:
    lab, _ = cluster
    token = shoal(lab, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
    shoal(lab, "sw3", "swarm", "join", "--token", token, f"{lab.node('sw1').address}:2377")
    wait(lambda: "sw3" in shoal(lab, "sw1", "node", "ls").stdout, "sw3 in the swarm")
    creds = node_creds(lab, "sw3")
    assert "leader" in call(lab, creds, "shoal.Dispatcher", "Managers", {})
    faults.kill(fresh(lab), "sw3")
    node_id = creds.identity.node_id
    shoal(lab, "sw1", "node", "rm", "--force", node_id)
    err = refused(lab, creds, "shoal.Dispatcher", "Managers")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "removed from the swarm" in (err.details() or "")
    faults.start(fresh(lab), "sw3")  # it comes back with its old certificate
    time.sleep(3)
    assert "sw3" not in shoal(lab, "sw1", "node", "ls").stdout.split()  # an ID may hold sw3
    shoal(lab, "sw3", "swarm", "leave", "--force")


def test_root_rotation_under_load_drops_nothing(cluster: tuple[Lab, Path]) -> None:
    lab, _ = cluster
    shoal(
        lab,
        "sw1",
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "2",
        "--publish",
        "30800:8000",
        "micro",
    )
    old_root = shoal(lab, "sw1", "swarm", "ca").stdout
    old_token = shoal(lab, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
    client = docker.APIClient(base_url=daemons.docker_host(lab, "sw1"), timeout=10)
    running = client.tasks(filters={"service": "web", "desired-state": "running"})
    client.close()
    ips = {
        addr.split("/")[0]
        for t in running
        for att in t.get("NetworksAttachments", [])
        for addr in att["Addresses"]
    }
    assert len(ips) == 2, running
    target = lab.node("sw2").address
    answered = round_robin(None, target, 30800, ips, 2)  # once sw2 balances over both
    rounds = 0
    failures: list[str] = []
    stop = threading.Event()

    def requests_loop() -> None:
        nonlocal answered, rounds
        api = docker.APIClient(base_url=daemons.docker_host(lab, "sw1"), timeout=10)
        while not stop.is_set():
            try:
                answered += answers(None, target, 30800, 2)
                api.nodes()
                rounds += 1
            except Exception as e:
                failures.append(repr(e))
            time.sleep(0.05)

    t = threading.Thread(target=requests_loop, daemon=True)
    t.start()
    try:
        out = shoal(lab, "sw1", "swarm", "ca", "--rotate")
    finally:
        stop.set()
        t.join(15)
    new_root = out.stdout[out.stdout.index("-----BEGIN") :]
    assert new_root != old_root and new_root == shoal(lab, "sw1", "swarm", "ca").stdout
    assert not failures, failures[:5]
    # under load: requests all through the rotation, every one answered by a task of web
    assert rounds >= 10 and balanced(answered, ips), (rounds, answered)
    # every node holds a certificate from the new root and trusts only it
    for node in ("sw1", "sw2"):

        def trusts_new(node: str = node) -> bool:
            return node_creds(lab, node).trust_pem == new_root.encode()

        wait(trusts_new, f"{node} trusting the new root")
    statuses = shoal(lab, "sw1", "node", "ls").stdout
    assert statuses.count("Ready") == 2 and "Down" not in statuses
    # the old root's join token is gone with it; the new one works
    out = shoal(
        lab,
        "sw3",
        "swarm",
        "join",
        "--token",
        old_token,
        f"{lab.node('sw1').address}:2377",
        check=False,
    )
    assert out.returncode == 1 and "does not match the fingerprint" in out.stderr, out.stderr
    token = shoal(lab, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
    shoal(lab, "sw3", "swarm", "join", "--token", token, f"{lab.node('sw1').address}:2377")
    wait(lambda: shoal(lab, "sw1", "node", "ls").stdout.count("Ready") == 3, "sw3 ready")
    shoal(lab, "sw1", "service", "rm", "web")


def test_a_promoted_worker_gets_a_manager_certificate_and_back(cluster: tuple[Lab, Path]) -> None:
    lab, _ = cluster
    shoal(lab, "sw1", "node", "promote", "sw2")
    wait(lambda: node_creds(lab, "sw2").identity.role is Role.MANAGER, "a manager certificate")
    wait(lambda: "Reachable" in shoal(lab, "sw1", "node", "ls").stdout, "sw2 a Raft member")
    shoal(lab, "sw1", "node", "demote", "sw2")
    wait(lambda: node_creds(lab, "sw2").identity.role is Role.WORKER, "a worker certificate")
    err = refused(lab, node_creds(lab, "sw2"), "shoal.RaftControl", "Propose")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_every_control_plane_connection_is_tls(cluster: tuple[Lab, Path]) -> None:
    """Runs last: the capture holds the whole module's traffic."""
    lab, pcap = cluster
    time.sleep(1.5)  # tcpdump -U flushes each packet; give the last ones a moment
    nodes = {n.address for n in lab.nodes}
    # The cluster's own connections, both ways; the gateway is this test, whose probes send
    # plaintext on purpose (and are refused above).
    flows = {
        (src, dst): data
        for (src, dst), data in tcp_flows(pcap.read_bytes(), set(PORTS)).items()
        if src.rsplit(":", 1)[0] in nodes and dst.rsplit(":", 1)[0] in nodes
    }
    assert len(flows) >= 10, f"only {len(flows)} directions of manager connections captured"
    for (src, dst), data in flows.items():
        if not data:
            continue
        assert data[0] == 0x16 and data[1] == 0x03, f"{src}->{dst} did not open with TLS"
        for marker in (b"PRI * HTTP/2.0", b"application/grpc", b"shoal.", b"SWMTKN-"):
            assert marker not in data, f"plaintext {marker!r} in {src}->{dst}"


def tcp_flows(raw: bytes, ports: set[int]) -> dict[tuple[str, str], bytes]:
    """The payload of each direction of every TCP connection to one of `ports`, keyed by
    (source, destination), from a pcap file (Ethernet, IPv4), in capture order."""
    magic = struct.unpack_from("<I", raw)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off = 24
    out: dict[tuple[str, str], bytes] = {}
    while off + 16 <= len(raw):
        _, _, incl, _ = struct.unpack_from(endian + "IIII", raw, off)
        frame = raw[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack_from(">H", ip, 2)[0]
        tcp = ip[ihl:total]
        sport, dport = struct.unpack_from(">HH", tcp)
        if dport not in ports and sport not in ports:
            continue
        payload = tcp[(tcp[12] >> 4) * 4 :]
        key = (f"{socket.inet_ntoa(ip[12:16])}:{sport}", f"{socket.inet_ntoa(ip[16:20])}:{dport}")
        out[key] = out.get(key, b"") + payload
    return out


def test_tcp_flow_parser_sees_plaintext() -> None:
    """The capture check above can fail: a plaintext HTTP/2 preface is found."""
    eth = b"\0" * 12 + b"\x08\x00"
    payload = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    tcp = struct.pack(">HHIIBBHHH", 40000, 2377, 0, 0, 5 << 4, 0x18, 1000, 0, 0) + payload
    ip = (
        struct.pack(
            ">BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(tcp),
            0,
            0,
            64,
            6,
            0,
            socket.inet_aton("10.0.0.1"),
            socket.inet_aton("10.0.0.2"),
        )
        + tcp
    )
    frame = eth + ip
    pcap = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    pcap += struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame
    flows = tcp_flows(pcap, {2377})
    assert flows == {("10.0.0.1:40000", "10.0.0.2:2377"): payload}
