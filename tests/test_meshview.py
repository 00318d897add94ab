"""A node's mesh state built from the store (orchestrator/manager/meshview.py)."""

from __future__ import annotations

from ipaddress import IPv4Address

from mesh.state import PortConfig, mac_for_ip, state_from_dict, state_to_dict
from orchestrator.manager.meshview import mesh_state
from orchestrator.store.objects import Network, Node, NodeState, Service, Task, TaskState

INGRESS = Network(id="i", spec={"Name": "ingress"}, subnet="10.255.0.0/16", vni=4096, ingress=True)
BACK = Network(id="b", spec={"Name": "back"}, subnet="10.0.1.0/24", vni=4097)
NODES = [
    Node(id="n1", addr="192.0.2.1", state=NodeState.READY, gateways={"i": "10.255.0.2"}),
    Node(
        id="n2",
        addr="192.0.2.2",
        state=NodeState.READY,
        gateways={"i": "10.255.0.3", "b": "10.0.1.3"},
    ),
    Node(id="n3", addr="192.0.2.3", state=NodeState.DOWN, gateways={"i": "10.255.0.4"}),
    # an address that is no IPv4 one: left out, rather than spoil every node's state
    Node(id="n4", addr="sw4.example", state=NodeState.READY, gateways={"i": "10.255.0.5"}),
]
WEB = Service(
    id="s1",
    spec={"Name": "web", "EndpointSpec": {"Mode": "vip"}},
    ports=[
        {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 30000, "PublishMode": "ingress"},
        {"Protocol": "udp", "TargetPort": 53, "PublishedPort": 53, "PublishMode": "host"},
    ],
    vips={"i": "10.255.0.9/16", "b": "10.0.1.9/24"},
)
DB = Service(
    id="s2",
    spec={"Name": "db", "EndpointSpec": {"Mode": "dnsrr"}},
    ports=[{"Protocol": "tcp", "TargetPort": 5432, "PublishedPort": 30001, "Name": "pg"}],
)


def task(
    tid: str, svc: Service, slot: int, node: str, state: TaskState, addrs: dict[str, str]
) -> Task:
    return Task(
        id=tid,
        service_id=svc.id,
        slot=slot,
        node_id=node,
        state=state,
        networks=list(addrs),
        addresses=addrs,
    )


TASKS = [
    task("a", WEB, 1, "n2", TaskState.RUNNING, {"i": "10.255.0.10/16", "b": "10.0.1.10/24"}),
    task("b", WEB, 2, "n1", TaskState.STARTING, {"i": "10.255.0.11/16"}),
    task("c", WEB, 3, "n3", TaskState.RUNNING, {"i": "10.255.0.12/16"}),  # its node is down
    task("d", DB, 1, "n4", TaskState.RUNNING, {"i": "10.255.0.13/16"}),  # no usable address
    task("e", WEB, 4, "n1", TaskState.FAILED, {"i": "10.255.0.14/16"}),  # holds no address
]


def test_a_nodes_view_is_valid_typed_and_what_it_sends() -> None:
    view = mesh_state("n1", NODES, [WEB, DB], TASKS, [INGRESS, BACK], 7)
    assert view.generation == 7 and view.encryption is None
    assert dict(view.peers) == {"n1": IPv4Address("192.0.2.1"), "n2": IPv4Address("192.0.2.2")}
    # n1 has a task on the ingress network only
    assert [n.name for n in view.networks] == ["ingress"]
    assert dict(view.networks[0].gateways) == {
        "n1": IPv4Address("10.255.0.2"),
        "n2": IPv4Address("10.255.0.3"),
    }
    assert [(e.task, e.node, str(e.ip)) for e in view.endpoints] == [
        ("web.1.a", "n2", "10.255.0.10"),
        ("web.2.b", "n1", "10.255.0.11"),
    ]
    assert all(e.mac == mac_for_ip(e.ip) and e.netns is None for e in view.endpoints)
    web, db = view.services
    assert dict(web.vips) == {"ingress": IPv4Address("10.255.0.9")}
    # ingress ports on the routing mesh, host-mode ones on the nodes of the service's tasks;
    # only tasks meant to run and running are backends
    assert web.ports == (PortConfig("tcp", 80, 30000), PortConfig("udp", 53, 53, mode="host"))
    assert web.tasks == ("web.1.a",)
    # a dnsrr service has no VIP and publishes nothing
    assert (db.endpoint_mode, dict(db.vips), db.ports) == (
        "dnsrr",
        {},
        (PortConfig("tcp", 5432, name="pg"),),
    )
    # what the dispatcher sends parses back to the same state
    doc = state_to_dict(view)
    assert state_from_dict(doc) == view
    assert doc["endpoints"][0] == {
        "task": "web.1.a",
        "network": "ingress",
        "node": "n2",
        "ip": "10.255.0.10",
    }


def test_a_node_takes_part_in_the_networks_of_its_tasks_even_when_down() -> None:
    view = mesh_state("n2", NODES, [WEB, DB], TASKS, [INGRESS, BACK], 8)
    assert [n.name for n in view.networks] == ["ingress", "back"]
    assert dict(view.services[0].vips) == {
        "ingress": IPv4Address("10.255.0.9"),
        "back": IPv4Address("10.0.1.9"),
    }
    down = mesh_state("n3", NODES, [WEB], TASKS, [INGRESS], 9)
    assert down.address == IPv4Address("192.0.2.3")
    assert state_from_dict(state_to_dict(down)) == down
