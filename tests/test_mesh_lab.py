"""The routing mesh in a lab: shoal-mesh daemons fed hand-made state (docs/mesh-state.md).

`RoutingMesh` holds the scenarios every lab must pass, whatever its nodes and load balancer:
a subclass runs them against its module's `mesh` fixture. Here they run on the namespace lab
and nftables (this machine's kernel); tests/test_vm_mesh.py runs them in VMs on IPVS (Debian's
kernel, docs/vm-lab.md), with what only VMs show (IPVS's own view, ESP). The rest of this
module is what only the namespace lab shows: DNS, repairs, nftables' counters, fuzzing.

Service `web` has 4 tasks on sw1 and sw3 and publishes 30000/tcp (8000) and 30001/udp (8000).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.dns.server import MAX_UPSTREAMS, UPSTREAM_TIMEOUT
from mesh.netns import run_in_netns
from mesh.state import read_applied
from orchestrator.apps import micro
from orchestrator.lab.meshlab import MeshLab, Task
from orchestrator.lab.record import Lab
from tests.dnsfake import UPSTREAM_ADDR, FakeUpstream
from tests.netutil import answers, balanced, udp_ask
from tests.vmutil import node_answers

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODES = ["sw1", "sw2", "sw3"]
DNS = ("127.0.0.11", 53)


@pytest.fixture(scope="module")
def upstream(lab3: Lab) -> Iterator[FakeUpstream]:
    with FakeUpstream(lab3.gateway) as up:
        yield up


@pytest.fixture(scope="module")
def mesh(
    lab3: Lab, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshLab]:
    m = MeshLab(lab3, tmp_path_factory.mktemp("mesh"), dns_upstreams=[lab3.gateway])
    try:
        m.add_network("ingress", 4096, "10.255.0.0/16", ingress=True)
        m.add_network("backend", 4097, "10.0.9.0/24")
        m.add_service(
            "web",
            [
                {"protocol": "tcp", "target": 8000, "published": 30000, "name": "http"},
                {"protocol": "udp", "target": 8000, "published": 30001},
            ],
            ["ingress"],
        )
        m.add_service(
            "db", [{"protocol": "tcp", "target": 5432}], ["backend"], endpoint_mode="dnsrr"
        )
        for node in ("sw1", "sw3", "sw1", "sw3"):
            m.add_task("web", node)
        for _ in range(2):
            m.add_task("db", "sw2")
        m.publish()
        for node in NODES:
            m.start_daemon(node, "--resync-interval", "2")
        m.wait_synced()
        for t in m.tasks.values():
            if t.service == "web":
                m.start_workload(t)
        for t in m.tasks.values():
            if t.service == "web":
                m.wait_listening(t)
        yield m
    finally:
        m.close()


def web_ips(m: MeshLab) -> set[str]:
    return {str(t.ips["ingress"]) for t in m.tasks.values() if t.service == "web" and t.serving}


def vip(m: MeshLab, service: str, network: str) -> str:
    return str(m.services[service].vips[network])


def task(m: MeshLab, name: str) -> Task:
    return m.tasks[name]


def addr(m: MeshLab, node: str) -> str:
    return m.lab.node(node).address


def lb_view(m: MeshLab, node: str) -> str:
    """The node's load balancer as its kernel has it, for a failure's message."""
    if 'lb_backend="ipvs"' in m.metrics(node):
        return m.run(node, ["ipvsadm", "-Ln", "--stats"])
    return m.run(node, ["nft", "list", "table", "ip", "shoal"])


# A client in a task that keeps one connection to the VIP open: a request, then another when
# told to (a line on stdin); prints each answer.
_KEEP = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8000), 10)
def ask():
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while b"}" not in data:
        chunk = s.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    print(data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip(), flush=True)
ask()
sys.stdin.readline()
ask()
"""


def _request(s: socket.socket) -> bytes:
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"}" not in data:
        chunk = s.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    return data.split(b"\r\n\r\n", 1)[1]


class RoutingMesh:
    """What the routing mesh does in any lab, with the `mesh` fixture of the subclass's
    module: `web` published from outside, from every node, from a task to its own service;
    UDP per flow; scaling, draining under load, removed UDP backends, restarts. Clients "from
    outside" run in the lab's outside (mesh.outside), the others in the nodes."""

    # paced for the lab's nodes: a client's patience in the drain test, how long before and
    # after a change it watches, and how many answers it needs after the change
    query_timeout = 2.0
    settle = 0.5
    watch = 1.5
    min_after = 50
    # nftables keeps an ending backend's UDP flows (conntrack) until its task is gone; IPVS
    # deletes a UDP destination when it leaves the balancer, and the flow is rescheduled
    udp_flows_stay_while_ending = True

    def test_published_port_from_outside_round_robins_over_every_task(self, mesh: MeshLab) -> None:
        counts = answers(mesh.outside, addr(mesh, "sw2"), 30000, 60)
        assert balanced(counts, web_ips(mesh)), counts

    @pytest.mark.parametrize("client", NODES)
    def test_published_port_from_every_node(self, mesh: MeshLab, client: str) -> None:
        # one client at a time: concurrent ones would share each target's round-robin
        targets = [f"{addr(mesh, t)}:30000" for t in NODES]
        for target, counts in node_answers(mesh.lab, client, None, targets, 20).items():
            assert balanced(counts, web_ips(mesh)), (client, target, counts)

    def test_vip_from_a_task_round_robins_itself_included(self, mesh: MeshLab) -> None:
        web1 = task(mesh, "web.1")
        got = node_answers(
            mesh.lab, web1.node, web1.netns, [f"{vip(mesh, 'web', 'ingress')}:8000"], 40
        )
        counts = next(iter(got.values()))
        assert balanced(counts, web_ips(mesh)) and str(web1.ips["ingress"]) in counts, counts

    @pytest.mark.parametrize("target", ["sw1", "sw2"])
    def test_task_reaches_its_own_service_through_the_mesh_hairpin(
        self, mesh: MeshLab, target: str
    ) -> None:
        # web.1 lives on sw1: through sw1 the connection leaves and re-enters the same bridge.
        web1 = task(mesh, "web.1")
        got = node_answers(mesh.lab, web1.node, web1.netns, [f"{addr(mesh, target)}:30000"], 40)
        counts = next(iter(got.values()))
        assert balanced(counts, web_ips(mesh)), counts

    def test_udp_published_port_is_balanced_per_flow(self, mesh: MeshLab) -> None:
        seen = Counter(udp_ask(mesh.outside, addr(mesh, "sw3"), 30001, 41000 + i) for i in range(8))
        assert balanced(seen, web_ips(mesh)), seen

    def test_scaling_up_and_down_updates_every_node(self, mesh: MeshLab) -> None:
        new = mesh.add_task("web", "sw2", slot=5)
        try:
            mesh.start_workload(new)
            mesh.wait_listening(new)
            mesh.publish()
            mesh.wait_synced()
            for target in NODES:
                counts = answers(mesh.outside, addr(mesh, target), 30000, 50)
                if not (balanced(counts, web_ips(mesh)) and len(counts) == 5):
                    # seen once in ~10 runs on IPVS (11/10/10/10/9): its own view, next time
                    raise AssertionError(f"{target}: {counts}\n{lb_view(mesh, target)}")
        finally:
            mesh.remove_task(new.name)
            mesh.publish()
            mesh.wait_synced()
        for target in NODES:
            counts = answers(mesh.outside, addr(mesh, target), 30000, 40)
            assert balanced(counts, web_ips(mesh)) and str(new.ips["ingress"]) not in counts

    def test_removing_a_backend_under_load_fails_no_request(self, mesh: MeshLab) -> None:
        drained = task(mesh, "web.2")
        gone = str(drained.ips["ingress"])
        results: list[tuple[float, str]] = []
        stop = threading.Event()
        sw1 = addr(mesh, "sw1")

        def loop() -> None:
            def run() -> None:
                while not stop.is_set():
                    try:
                        results.append(
                            (time.monotonic(), micro.query(sw1, 30000, self.query_timeout))
                        )
                    except OSError as e:
                        results.append((time.monotonic(), f"error: {e}"))

            run_in_netns(mesh.outside, run)

        worker = threading.Thread(target=loop)
        worker.start()
        try:
            time.sleep(self.settle)
            drained.serving = False
            mesh.publish()
            mesh.wait_synced()
            applied = time.monotonic()
            time.sleep(self.watch)
        finally:
            stop.set()
            worker.join()
            drained.serving = True
            mesh.publish()
            mesh.wait_synced()
        after = [who for t, who in results if t > applied]
        assert len(after) > self.min_after, len(after)
        assert not [r for _, r in results if r.startswith("error")]
        assert gone not in after
        # drained rather than cut: it answered while the change was under way
        assert gone in {who for t, who in results if t <= applied}

    def test_a_udp_flow_stays_while_its_backend_ends_and_moves_once_it_is_gone(
        self, mesh: MeshLab
    ) -> None:
        sport = 42424
        sw2 = addr(mesh, "sw2")
        first = udp_ask(mesh.outside, sw2, 30001, sport)
        assert udp_ask(mesh.outside, sw2, 30001, sport) == first  # the flow is pinned
        owner = next(t for t in mesh.tasks.values() if str(t.ips.get("ingress")) == first)
        owner.serving = False
        try:
            mesh.publish()
            mesh.wait_synced()
            # ending (out of the balancer, still attached): its flow is not cut (nftables)
            ending = udp_ask(mesh.outside, sw2, 30001, sport)
            assert (ending == first) == self.udp_flows_stay_while_ending, (ending, first)
            owner.attached = False
            mesh.publish()
            mesh.wait_synced()
            # gone: the conntrack clean-up lets the flow be balanced afresh
            assert udp_ask(mesh.outside, sw2, 30001, sport) != first
        finally:
            owner.serving = owner.attached = True
            mesh.publish()
            mesh.wait_synced()

    def test_restarting_the_mesh_keeps_established_connections(self, mesh: MeshLab) -> None:
        via_vip = task(mesh, "web.3")  # on sw1
        inside = subprocess.Popen(
            mesh.task_argv(via_vip, [sys.executable, "-c", _KEEP, vip(mesh, "web", "ingress")]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert inside.stdin is not None and inside.stdout is not None
        sw2 = addr(mesh, "sw2")
        outside = run_in_netns(mesh.outside, lambda: socket.create_connection((sw2, 30000), 5))
        try:
            before = (_request(outside), inside.stdout.readline())
            for node in ("sw2", "sw1"):
                mesh.signal_daemon(node, signal.SIGTERM)  # both at once
            for node in ("sw2", "sw1"):
                mesh.restart_daemon(node)
            mesh.wait_synced(timeout=2 * mesh.sync_timeout)  # two daemons start from scratch
            time.sleep(self.settle)
            inside.stdin.write("\n")
            inside.stdin.flush()
            assert (_request(outside), inside.stdout.readline()) == before
            assert inside.wait(60) == 0
        finally:
            outside.close()
            inside.kill()


class TestRoutingMeshOnNamespaces(RoutingMesh):
    """On the namespace lab, balanced by nftables."""


# ---- the namespace lab only ----------------------------------------------------------------------


def _dns(netns: str, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    ask = dns.query.tcp if tcp else dns.query.udp
    return run_in_netns(netns, lambda: ask(q, DNS[0], timeout=3))


def _addresses(reply: dns.message.Message) -> set[str]:
    return {r.to_text() for rrset in reply.answer for r in rrset}


def test_dns_service_tasks_and_task_names(mesh: MeshLab) -> None:
    ns = task(mesh, "web.1").netns
    assert _addresses(_dns(ns, "web")) == {str(mesh.services["web"].vips["ingress"])}
    assert _addresses(_dns(ns, "tasks.web")) == web_ips(mesh)
    assert _addresses(_dns(ns, "web.3")) == {str(task(mesh, "web.3").ips["ingress"])}
    assert _addresses(_dns(ns, "tasks.web", tcp=True)) == web_ips(mesh)


def test_dns_srv_and_ptr(mesh: MeshLab) -> None:
    ns = task(mesh, "web.1").netns
    srv = _dns(ns, "_http._tcp.web", "SRV")
    targets = {r.target.to_text() for rrset in srv.answer for r in rrset}
    ports = {r.port for rrset in srv.answer for r in rrset}
    assert targets == {f"web.{i}." for i in range(1, 5)} and ports == {8000}
    assert {r.to_text() for rrset in srv.additional for r in rrset} == web_ips(mesh)
    vip = str(mesh.services["web"].vips["ingress"])
    ptr = _dns(ns, dns.reversename.from_address(vip).to_text(), "PTR")
    assert {r.to_text() for rrset in ptr.answer for r in rrset} == {"web."}
    task_ptr = _dns(
        ns, dns.reversename.from_address(str(task(mesh, "web.2").ips["ingress"])).to_text(), "PTR"
    )
    assert {r.to_text() for rrset in task_ptr.answer for r in rrset} == {"web.2."}


def test_dns_dnsrr_service_and_scoping(mesh: MeshLab, upstream: FakeUpstream) -> None:
    db_ns = task(mesh, "db.1").netns
    db_ips = {str(t.ips["backend"]) for t in mesh.tasks.values() if t.service == "db"}
    assert _addresses(_dns(db_ns, "db")) == db_ips
    # web is not on the backend network: db's view does not hold it, so the query goes
    # upstream (which has never heard of it).
    upstream.seen.clear()
    assert _dns(db_ns, "web").rcode() == dns.rcode.NXDOMAIN
    assert upstream.seen == ["web."]


def test_dns_unknown_cluster_names_and_other_types(mesh: MeshLab) -> None:
    ns = task(mesh, "web.1").netns
    nx = _dns(ns, "tasks.nothing")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
    nodata = _dns(ns, "web", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    unknown_ip = dns.reversename.from_address("10.255.200.200").to_text()
    assert _dns(ns, unknown_ip, "PTR").rcode() == dns.rcode.NXDOMAIN


def test_dns_forwards_other_names(mesh: MeshLab, upstream: FakeUpstream) -> None:
    ns = task(mesh, "web.1").netns
    upstream.seen.clear()
    assert _addresses(_dns(ns, "web")) == {str(mesh.services["web"].vips["ingress"])}
    assert upstream.seen == []
    assert _addresses(_dns(ns, "example.test")) == {UPSTREAM_ADDR}
    assert _addresses(_dns(ns, "example.test", tcp=True)) == {UPSTREAM_ADDR}


def test_a_network_over_a_route_of_the_node_is_refused_and_the_route_kept(
    mesh: MeshLab, lab3: Lab
) -> None:
    """A VM's NAT network (VirtualBox's and QEMU's 10.0.2.0/24) lies in the swarm's default
    address pool: an overlay attached over it would take the node's own traffic there."""
    ip = ["ip", "-n", lab3.node("sw1").netns]
    subprocess.run([*ip, "link", "add", "tclash0", "type", "veth", "peer", "tclash1"], check=True)
    try:
        for end in ("tclash0", "tclash1"):
            subprocess.run([*ip, "link", "set", end, "up"], check=True)
        subprocess.run([*ip, "route", "add", "10.0.2.0/24", "dev", "tclash0"], check=True)
        mesh.add_network("natlike", 4190, "10.0.2.0/24")
        mesh.add_service("natsvc", [], ["natlike"], endpoint_mode="dnsrr")
        mesh.add_task("natsvc", "sw1")
        mesh.wait_synced(mesh.publish())
        errors = read_applied(mesh.run_dir / "run-sw1").errors
        why = errors.get("network natlike", "")
        assert "overlaps this node's route to 10.0.2.0/24 on tclash0" in why, errors
        assert "--subnet" in why
        links = subprocess.run([*ip, "-o", "link"], capture_output=True, text=True).stdout
        assert "sh-br4190" not in links and "sh-vx4190" not in links
        route = ["route", "show", "10.0.2.0/24"]
        shown = subprocess.run([*ip, *route], capture_output=True, text=True).stdout
        assert shown.split() == ["10.0.2.0/24", "dev", "tclash0", "scope", "link"], shown
        # a node without such a route attaches it
        sw2 = subprocess.run(
            ["ip", "-n", lab3.node("sw2").netns, "-o", "link"], capture_output=True, text=True
        ).stdout
        assert "sh-br4190" in sw2
    finally:
        mesh.remove_task("natsvc.1")
        del mesh.services["natsvc"], mesh.nets["natlike"]
        mesh.wait_synced(mesh.publish())
        subprocess.run([*ip, "link", "del", "tclash0"], check=True)


def test_converges_after_its_kernel_objects_are_damaged(mesh: MeshLab) -> None:
    sw1 = mesh.lab.node("sw1").netns
    subprocess.run(["ip", "-n", sw1, "link", "del", "sh-vx4096"], check=True)
    subprocess.run(
        ["ip", "-n", sw1, "link", "add", "sh-vjunk", "type", "veth", "peer", "name", "sh-vjunkp"],
        check=True,
    )
    subprocess.run(
        ["ip", "netns", "exec", sw1, "nft", "delete", "table", "ip", "shoal"], check=True
    )
    subprocess.run(
        ["ip", "netns", "exec", task(mesh, "web.1").netns, "nft", "flush", "table", "ip", "shoal"],
        check=True,
    )
    mesh.signal_daemon("sw1", signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while True:
        links = subprocess.run(
            ["ip", "-n", sw1, "-br", "link"], capture_output=True, text=True
        ).stdout
        try:
            ok = (
                "sh-vx4096" in links
                and "sh-vjunk" not in links
                and balanced(answers(None, addr(mesh, "sw1"), 30000, 40), web_ips(mesh))
                and balanced(
                    answers(
                        task(mesh, "web.1").netns,
                        str(mesh.services["web"].vips["ingress"]),
                        8000,
                        40,
                    ),
                    web_ips(mesh),
                )
            )
        except OSError:
            ok = False
        if ok:
            break
        assert time.monotonic() < deadline, links
        time.sleep(0.3)


def test_metrics_count_connections_and_pass_promtool(mesh: MeshLab) -> None:
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

    before = published_total()
    answered = answers(None, addr(mesh, "sw2"), 30000, 40)
    after = published_total()
    counted = {ip: after[ip] - before.get(ip, 0) for ip in after}
    assert set(counted) == web_ips(mesh) == set(answered)
    # A counter counts DNAT decisions. A SYN lost before conntrack confirmed its entry (seen
    # once in CI under load) is re-picked when it is resent: one decision more, never fewer.
    assert all(counted[ip] >= answered[ip] for ip in counted), (counted, answered)
    assert sum(counted.values()) - 40 <= 1, (counted, answered)
    text = mesh.metrics("sw1")
    for name in (
        "shoal_mesh_sync_duration_seconds_bucket",
        "shoal_mesh_sync_errors_total",
        "shoal_mesh_dns_queries_total",
        "shoal_mesh_overlay_peers",
    ):
        assert name in text
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr
    )


@pytest.fixture(scope="module")
def dns_sockets(mesh: MeshLab) -> Iterator[tuple[socket.socket, str]]:
    ns = task(mesh, "web.1").netns
    udp = run_in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    yield udp, ns
    udp.close()


VALID_QUERY = dns.message.make_query("tasks.web", "A").to_wire()


def _still_answers(udp: socket.socket) -> None:
    """A well-formed query sent now gets its answer (a server that stopped answering fails
    here, on a timeout); whatever else arrives meanwhile (late answers to what was sent
    before) is at least a DNS header."""
    probe = dns.message.make_query("tasks.web", "A")
    udp.sendto(probe.to_wire(), DNS)
    deadline = time.monotonic() + 3
    while True:
        udp.settimeout(max(deadline - time.monotonic(), 0.001))
        reply = udp.recv(65535)
        assert len(reply) >= 12, reply
        if int.from_bytes(reply[:2], "big") != probe.id:
            continue
        answer = dns.message.from_wire(reply)
        if answer.question == probe.question:  # not another's answer under the same ID
            assert answer.rcode() == dns.rcode.NOERROR and answer.answer, answer
            return


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda q, i, b: q[:i] + bytes([b]) + q[i + 1 :],
            st.just(VALID_QUERY),
            st.integers(0, len(VALID_QUERY) - 1),
            st.integers(0, 255),
        ),
        st.builds(lambda q, n: q[:n], st.just(VALID_QUERY), st.integers(0, len(VALID_QUERY))),
    )
)
def test_dns_survives_malformed_udp_packets(
    dns_sockets: tuple[socket.socket, str], payload: bytes
) -> None:
    udp, _ = dns_sockets
    udp.sendto(payload, DNS)  # answered (FORMERR, say) or dropped: either is fine, but then
    _still_answers(udp)


# The longest a whole message may go unanswered: every upstream tried in turn, then SERVFAIL.
TCP_ANSWER_WITHIN = UPSTREAM_TIMEOUT * MAX_UPSTREAMS + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=300),
    declared=st.one_of(st.none(), st.integers(0, 65535)),  # None: the payload's own length
)
def test_dns_survives_malformed_tcp_streams(
    dns_sockets: tuple[socket.socket, str], payload: bytes, declared: int | None
) -> None:
    _, ns = dns_sockets
    size = len(payload) if declared is None else declared
    s = run_in_netns(ns, lambda: socket.create_connection(DNS, 2))
    with s:
        with contextlib.suppress(ConnectionError):  # hung up on before all of it was sent
            s.sendall(size.to_bytes(2, "big") + payload)
        if len(payload) >= size:
            # a whole message: answered (FORMERR, say) under its ID, or hung up on; never
            # left without either
            s.settimeout(TCP_ANSWER_WITHIN)
            try:
                got = s.recv(65535)
            except ConnectionResetError:
                got = b""  # hung up with some of the payload unread
            except TimeoutError:
                pytest.fail(f"a whole {size}-byte message: no answer in {TCP_ANSWER_WITHIN}s")
            if got:
                assert len(got) >= 4 and int.from_bytes(got[:2], "big") >= 12, got
                assert got[2:4] == payload[:2], got
        else:
            # it waits for the rest of what was declared (or hangs up): no answer to a part
            s.settimeout(0.05)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                assert s.recv(65535) == b""
        # and meanwhile a well-formed query on another connection is answered (a timeout
        # here fails)
        assert _dns(ns, "tasks.web", tcp=True).answer


def test_dns_still_answers_after_the_fuzzing(mesh: MeshLab) -> None:
    ns = task(mesh, "web.1").netns
    assert _addresses(_dns(ns, "tasks.web")) == web_ips(mesh)
    assert _addresses(_dns(ns, "tasks.web", tcp=True)) == web_ips(mesh)
    for node in NODES:
        assert mesh.daemons[node].poll() is None


def test_a_bad_state_file_is_ignored_and_the_last_good_one_kept(mesh: MeshLab) -> None:
    def errors() -> float:
        line = next(
            x
            for x in mesh.metrics("sw2").splitlines()
            if x.startswith("shoal_mesh_sync_errors_total")
        )
        return float(line.split()[1])

    before = errors()
    path = mesh.state_path("sw2")
    good = path.read_text()
    path.write_text('{"node": "sw2", "peers": ')
    try:
        deadline = time.monotonic() + 10
        while errors() == before:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert balanced(answers(None, addr(mesh, "sw2"), 30000, 20), web_ips(mesh))
        assert mesh.daemons["sw2"].poll() is None
        assert 'shoal_mesh_info{lb_backend="nftables"} 1.0' in mesh.metrics("sw2")
    finally:
        path.write_text(good)
        mesh.publish()
        mesh.wait_synced()
