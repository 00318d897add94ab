"""Task endpoints plugged into an overlay in batches (mesh/netlink/links.py, Overlay.reconcile).

Against the kernel: a node namespace and task namespaces named tvb-*; every test removes what it
made. What is checked is what `ip` and `bridge` see, not what our own dumps say.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.naming import bridge_name, veth_name
from mesh.netlink.links import LinkSocket, set_link
from mesh.netns import NetnsError, run_in_each_netns, run_in_netns
from mesh.overlay import Overlay
from mesh.state import MeshState, mac_for_ip, state_from_dict

pytestmark = pytest.mark.lab

NODE = "tvb-node"
VNI, VNI2 = 4301, 4302
MTU = 1450  # the underlay's 1500 less VXLAN's 50
GATEWAY, GATEWAY2 = "10.31.0.1", "10.32.0.1"


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """The node namespace (with an underlay address), and a list the test adds task
    namespaces to (through `add_netns`); all are deleted afterwards."""
    made = [NODE]
    subprocess.run(["ip", "netns", "add", NODE], check=True)
    for cmd in (
        ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
        ["addr", "add", "192.168.97.1/24", "dev", "eth0"],
        ["link", "set", "eth0", "up"],
    ):
        subprocess.run(["ip", "-n", NODE, *cmd], check=True)
    try:
        yield made
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=True)


def add_netns(made: list[str], name: str) -> str:
    subprocess.run(["ip", "netns", "add", name], check=True)
    made.append(name)
    return name


def make_state(endpoints: list[dict[str, Any]]) -> MeshState:
    return state_from_dict(
        {
            "node": "n1",
            "peers": {"n1": "192.168.97.1", "n2": "192.168.97.2"},
            "networks": [
                {
                    "name": "ov",
                    "vni": VNI,
                    "subnet": "10.31.0.0/16",
                    "gateways": {"n1": GATEWAY, "n2": "10.31.0.2"},
                },
                {
                    "name": "ov2",
                    "vni": VNI2,
                    "subnet": "10.32.0.0/16",
                    "gateways": {"n1": GATEWAY2, "n2": "10.32.0.2"},
                },
            ],
            "endpoints": endpoints,
            "services": [],
        }
    )


def endpoint(task: str, netns: str, ip: str, network: str = "ov") -> dict[str, Any]:
    return {"task": task, "network": network, "node": "n1", "ip": ip, "netns": netns}


def assert_attached(
    netns: str, ifname: str, ip: str, prefixlen: int, network: str, gateway: str | None
) -> None:
    """The task's end, the host's end, and the bridge's entry for the task's MAC."""
    mac = mac_for_ip(ipaddress.IPv4Address(ip))
    (task_link,) = ip_json("-n", netns, "-d", "link", "show", ifname)
    assert task_link["address"] == mac
    assert task_link["mtu"] == MTU
    assert task_link["linkinfo"]["info_kind"] == "veth"
    assert "UP" in task_link["flags"]
    (addrs,) = ip_json("-n", netns, "addr", "show", ifname)
    assert [(a["local"], a["prefixlen"]) for a in addrs["addr_info"] if a["family"] == "inet"] == [
        (ip, prefixlen)
    ]
    (lo,) = ip_json("-n", netns, "link", "show", "lo")
    assert "UP" in lo["flags"]
    defaults = [
        (r.get("gateway"), r["dev"]) for r in ip_json("-n", netns, "route", "show", "default")
    ]
    if gateway is not None:
        assert defaults == [(gateway, ifname)]
    else:
        assert all(dev != ifname for _, dev in defaults)
    vni = VNI if network == "ov" else VNI2
    host = veth_name(netns, network)
    (host_link,) = ip_json("-n", NODE, "link", "show", host)
    assert host_link["master"] == bridge_name(vni)
    assert host_link["mtu"] == MTU
    assert "UP" in host_link["flags"]
    fdb = json.loads(
        subprocess.run(
            ["bridge", "-n", NODE, "-j", "fdb", "show", "br", bridge_name(vni)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert [e for e in fdb if e["mac"] == mac and e["ifname"] == host and e["state"] == "static"]


def host_index(netns: str, network: str = "ov") -> int:
    (link,) = ip_json("-n", NODE, "link", "show", veth_name(netns, network))
    return int(link["ifindex"])


def test_one_sync_attaches_many_endpoints(namespaces: list[str]) -> None:
    tasks = [add_netns(namespaces, f"tvb-t{i}") for i in range(12)]
    eps = [endpoint(f"t{i}", ns, f"10.31.1.{i + 1}") for i, ns in enumerate(tasks)]
    # the first task is on a second network too: eth1, and no default route through it
    eps.append(endpoint("t0", tasks[0], "10.32.1.1", "ov2"))
    state = make_state(eps)
    overlay = Overlay(NODE)
    report = overlay.reconcile(state)
    assert report.errors == {}
    for i, ns in enumerate(tasks):
        assert_attached(ns, "eth0", f"10.31.1.{i + 1}", 16, "ov", GATEWAY)
    assert_attached(tasks[0], "eth1", "10.32.1.1", 16, "ov2", None)
    # each new endpoint: its veth, and the first attachments' default routes
    assert report.changes >= len(eps) + len(tasks)
    # a full sync of what is right changes nothing, and neither does an incremental one
    for full in (True, False):
        again = overlay.reconcile(state, full=full)
        assert (again.errors, again.changes) == ({}, 0)
    # an endpoint that leaves the state takes its veth with it
    gone = veth_name(tasks[-1], "ov")
    report = overlay.reconcile(make_state(eps[:-2] + eps[-1:]), full=False)
    assert report.errors == {}
    names = {link["ifname"] for link in ip_json("-n", NODE, "link", "show")}
    assert gone not in names
    assert {veth_name(ns, "ov") for ns in tasks[:-1]} <= names
    assert overlay.cleanup() >= 2


def test_missing_namespace_fails_its_endpoint_alone(namespaces: list[str]) -> None:
    a, b = add_netns(namespaces, "tvb-a"), add_netns(namespaces, "tvb-b")
    state = make_state(
        [
            endpoint("ta", a, "10.31.2.1"),
            endpoint("tgone", "tvb-nosuch", "10.31.2.2"),
            endpoint("tb", b, "10.31.2.3"),
        ]
    )
    overlay = Overlay(NODE)
    report = overlay.reconcile(state)
    assert list(report.errors) == ["endpoint tgone on ov"]
    assert "tvb-nosuch does not exist" in report.errors["endpoint tgone on ov"]
    assert_attached(a, "eth0", "10.31.2.1", 16, "ov", GATEWAY)
    assert_attached(b, "eth0", "10.31.2.3", 16, "ov", GATEWAY)
    overlay.cleanup()


def test_foreign_interface_of_that_name_is_refused(namespaces: list[str]) -> None:
    a, b = add_netns(namespaces, "tvb-a"), add_netns(namespaces, "tvb-b")
    subprocess.run(["ip", "-n", b, "link", "add", "eth0", "type", "bridge"], check=True)
    state = make_state([endpoint("ta", a, "10.31.3.1"), endpoint("tb", b, "10.31.3.2")])
    overlay = Overlay(NODE)
    report = overlay.reconcile(state)
    assert list(report.errors) == ["endpoint tb on ov"]
    assert "eth0 already exists in tvb-b and is not ours" in report.errors["endpoint tb on ov"]
    assert_attached(a, "eth0", "10.31.3.1", 16, "ov", GATEWAY)
    # the foreign interface is left alone, and no half-made veth stays behind
    (foreign,) = ip_json("-n", b, "-d", "link", "show", "eth0")
    assert foreign["linkinfo"]["info_kind"] == "bridge"
    assert veth_name(b, "ov") not in {link["ifname"] for link in ip_json("-n", NODE, "link")}
    overlay.cleanup()


@pytest.mark.parametrize(
    "damage",
    [
        ["addr", "flush", "dev", "eth0"],
        ["link", "set", "eth0", "address", "02:42:0a:1f:63:63"],
        ["link", "set", "eth0", "down"],
    ],
)
def test_wrong_task_side_is_made_afresh(namespaces: list[str], damage: list[str]) -> None:
    a, b = add_netns(namespaces, "tvb-a"), add_netns(namespaces, "tvb-b")
    state = make_state([endpoint("ta", a, "10.31.4.1"), endpoint("tb", b, "10.31.4.2")])
    overlay = Overlay(NODE)
    assert overlay.reconcile(state).errors == {}
    before_a, before_b = host_index(a), host_index(b)
    subprocess.run(["ip", "-n", b, *damage], check=True)
    report = overlay.reconcile(state, full=True)
    assert report.errors == {}
    assert report.changes >= 2  # the veth, the default route
    assert host_index(a) == before_a  # the right one is left as it was
    assert host_index(b) != before_b
    assert_attached(b, "eth0", "10.31.4.2", 16, "ov", GATEWAY)
    overlay.cleanup()


def test_host_side_detached_is_put_back(namespaces: list[str]) -> None:
    a = add_netns(namespaces, "tvb-a")
    state = make_state([endpoint("ta", a, "10.31.5.1")])
    overlay = Overlay(NODE)
    assert overlay.reconcile(state).errors == {}
    before = host_index(a)
    subprocess.run(["ip", "-n", NODE, "link", "set", veth_name(a, "ov"), "nomaster"], check=True)
    subprocess.run(["ip", "-n", a, "route", "del", "default"], check=True)
    report = overlay.reconcile(state, full=True)
    assert (report.errors, report.changes) == ({}, 2)  # back on the bridge; the route
    assert host_index(a) == before
    assert_attached(a, "eth0", "10.31.5.1", 16, "ov", GATEWAY)
    overlay.cleanup()


def test_a_refused_request_fails_alone(namespaces: list[str]) -> None:
    with run_in_netns(NODE, LinkSocket) as sock:
        links = {link.name: link for link in sock.links()}
        outcomes = sock.run(
            [
                set_link(links["eth0"].index, mtu=1400),
                set_link(999_999, up=True),
                set_link(links["eth1"].index, mtu=1400),
            ]
        )
        assert outcomes[0] is None and outcomes[2] is None
        assert outcomes[1] is not None and outcomes[1].errno == errno.ENODEV
        assert {link.name: link.mtu for link in sock.links()}.items() >= {
            "eth0": 1400,
            "eth1": 1400,
        }.items()


def test_sockets_in_many_namespaces_from_one_thread(namespaces: list[str]) -> None:
    a = add_netns(namespaces, "tvb-a")
    opened = run_in_each_netns([a, "tvb-nosuch", NODE], LinkSocket)
    assert isinstance(opened["tvb-nosuch"], NetnsError)
    sock_a, sock_node = opened[a], opened[NODE]
    assert isinstance(sock_a, LinkSocket) and isinstance(sock_node, LinkSocket)
    with sock_a, sock_node:
        assert {link.name for link in sock_a.links()} == {"lo"}
        assert {"eth0", "eth1"} <= {link.name for link in sock_node.links()}
