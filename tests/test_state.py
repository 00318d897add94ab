"""The mesh state contract: parsing, validation and its error messages."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from mesh.lb.model import Backend, node_lb
from mesh.state import (
    Applied,
    Encryption,
    EncryptionKey,
    Endpoint,
    MeshState,
    Network,
    PortConfig,
    Service,
    StateError,
    applied_path,
    mac_for_ip,
    parse_state,
    read_applied,
    state_from_dict,
    state_to_dict,
    write_applied,
)


def base() -> dict[str, Any]:
    return {
        "node": "sw1",
        "peers": {"sw1": "192.168.56.11", "sw2": "192.168.56.12"},
        "networks": [
            {
                "name": "ingress",
                "vni": 4096,
                "subnet": "10.255.0.0/16",
                "ingress": True,
                "gateways": {"sw1": "10.255.0.2", "sw2": "10.255.0.3"},
            }
        ],
        "endpoints": [
            {
                "task": "web.1",
                "network": "ingress",
                "node": "sw1",
                "ip": "10.255.0.10",
                "netns": "t1",
            },
            {"task": "web.2", "network": "ingress", "node": "sw2", "ip": "10.255.0.11"},
        ],
        "services": [
            {
                "name": "web",
                "vips": {"ingress": "10.255.0.5"},
                "ports": [{"protocol": "tcp", "target": 8000, "published": 30000}],
                "tasks": ["web.1", "web.2"],
            }
        ],
    }


def test_round_trip_json_and_yaml() -> None:
    state = state_from_dict(base())
    assert state_from_dict(state_to_dict(state)) == state
    assert parse_state(json.dumps(base())) == state
    yaml_text = "node: sw1\npeers: {sw1: 192.168.56.11}\n"
    assert parse_state(yaml_text).node == "sw1"
    assert [e.mac for e in state.endpoints] == ["02:42:0a:ff:00:0a", "02:42:0a:ff:00:0b"]
    assert [e.task for e in state.backends(state.services[0], "ingress")] == ["web.1", "web.2"]


def mutate(path: str, value: Any) -> dict[str, Any]:
    doc = base()
    target: Any = doc
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("node", KeyError, "node: expected a name"),
        ("peers", {"sw2": "192.168.56.12"}, "must give this node's (sw1) underlay address"),
        ("peers", {"sw1": "192.168.56.11", "sw2": "192.168.56.11"}, "is also sw1's"),
        ("networks.0.vni", 0, "networks[0].vni: expected an integer in 1..16777215"),
        ("networks.0.vni", "4096", "expected an integer"),
        ("networks.0.subnet", "10.255.0.1/16", "expected an IPv4 network"),
        ("networks.0.gateways", {"sw9": "10.255.0.2"}, "unknown node 'sw9'"),
        ("networks.0.gateways", {"sw1": "10.9.0.2"}, "is not a usable address of 10.255.0.0/16"),
        ("endpoints.0.network", "nope", "unknown network 'nope'"),
        ("endpoints.0.ip", "10.255.0.3", "already used by the gateway of sw2"),
        ("endpoints.1.ip", "10.255.0.10", "already used by task web.1"),
        ("endpoints.0.ip", "10.255.255.255", "not a usable address"),
        ("endpoints.0.mac", "01:00:5e:00:00:01", "multicast"),
        ("endpoints.0.mac", "zz", "expected a MAC"),
        ("endpoints.0.color", "blue", "unknown field(s) color"),
        ("services.0.name", "Web Server", "services[0].name"),
        ("services.0.endpoint_mode", "rr", "expected vip or dnsrr"),
        ("services.0.ports", [{"protocol": "sctp", "target": 1}], "expected tcp or udp"),
        ("services.0.ports", [{"target": 70000}], "expected an integer in 1..65535"),
        ("services.0.vips", {"ingress": "10.9.9.9"}, "not a usable address"),
        ("version", 2, "unsupported version 2"),
    ],
)
def test_bad_state_is_refused_with_a_clear_message(path: str, value: Any, message: str) -> None:
    with pytest.raises(StateError) as err:
        state_from_dict(mutate(path, value))
    assert message in str(err.value)


def test_conflicts_between_services_are_refused() -> None:
    doc = base()
    doc["services"].append(
        {
            "name": "api",
            "vips": {"ingress": "10.255.0.6"},
            "ports": [{"protocol": "tcp", "target": 80, "published": 30000}],
        }
    )
    with pytest.raises(StateError, match="tcp/30000 is already published by web"):
        state_from_dict(doc)
    doc["services"][1] = {
        "name": "api",
        "endpoint_mode": "dnsrr",
        "ports": [{"protocol": "tcp", "target": 80, "published": 30001}],
    }
    with pytest.raises(StateError, match="dnsrr service cannot publish"):
        state_from_dict(doc)


def test_published_ports_and_their_modes_are_checked() -> None:
    def with_ports(*ports: dict[str, Any], mode: str = "vip") -> dict[str, Any]:
        doc = base()
        doc["services"][0]["ports"] = list(ports)
        if mode == "dnsrr":
            doc["services"][0]["endpoint_mode"] = "dnsrr"
            del doc["services"][0]["vips"]
        return doc

    # several published ports to one target, TCP and UDP, ingress and host
    state = state_from_dict(
        with_ports(
            {"target": 8000, "published": 8100},
            {"target": 8000, "published": 8101},
            {"protocol": "udp", "target": 8000, "published": 8100},
            {"target": 8000, "published": 9000, "mode": "host"},
        )
    )
    assert [(p.published, p.mode) for p in state.services[0].ports] == [
        (8100, "ingress"),
        (8101, "ingress"),
        (8100, "ingress"),
        (9000, "host"),
    ]
    # a dnsrr service has no routing mesh, but its tasks may have their node's ports
    assert state_from_dict(
        with_ports({"target": 53, "published": 53, "mode": "host"}, mode="dnsrr")
    )
    refused: list[tuple[list[dict[str, Any]], str]] = [
        (
            [{"target": 8000, "published": 8100}, {"target": 8001, "published": 8100}],
            "duplicate published port 'tcp/8100'",
        ),
        ([{"target": 8000, "mode": "host"}], "a host-mode port needs its published port"),
        ([{"target": 8000, "published": 9000, "mode": "direct"}], "expected ingress or host"),
    ]
    for ports, message in refused:
        with pytest.raises(StateError, match=message):
            state_from_dict(with_ports(*ports))
    # a host-mode port may not be a port of the routing mesh: both would be this node's
    doc = base()
    doc["services"].append(
        {"name": "edge", "ports": [{"target": 80, "published": 30000, "mode": "host"}]}
    )
    with pytest.raises(StateError, match="host-mode port tcp/30000 is published on the routing"):
        state_from_dict(doc)
    # host-mode ports of two services may be equal: their tasks are on different nodes
    doc["services"][1]["ports"][0]["published"] = 9000
    doc["services"][0]["ports"].append({"target": 8000, "published": 9000, "mode": "host"})
    assert state_from_dict(doc)


def lb_state(*services: dict[str, Any]) -> MeshState:
    """Node sw1's state: web.1 runs here (attached to `back` first, then ingress), web.2 and
    api.1 on sw2."""
    doc = base()
    doc["networks"].append(
        {"name": "back", "vni": 4097, "subnet": "10.0.1.0/24", "gateways": {"sw1": "10.0.1.2"}}
    )
    doc["endpoints"].insert(
        0, {"task": "web.1", "network": "back", "node": "sw1", "ip": "10.0.1.10", "netns": "t1"}
    )
    doc["endpoints"].append(
        {"task": "api.1", "network": "ingress", "node": "sw2", "ip": "10.255.0.12"}
    )
    doc["services"] = list(services)
    return state_from_dict(doc)


def test_the_node_balances_each_published_port_and_host_ports_to_its_own_tasks() -> None:
    web = {
        "name": "web",
        "vips": {"ingress": "10.255.0.5"},
        "ports": [
            {"target": 8000, "published": 8100},
            {"target": 8000, "published": 8101},
            {"protocol": "udp", "target": 8000, "published": 8100},
            {"target": 8000, "published": 9000, "mode": "host"},
        ],
        "tasks": ["web.1", "web.2"],
    }
    api = {
        "name": "api",
        "vips": {"ingress": "10.255.0.6"},
        "ports": [{"target": 80, "published": 9001, "mode": "host"}],
        "tasks": ["api.1"],
    }
    lb = node_lb(lb_state(web, api))
    everywhere = (
        Backend(IPv4Address("10.255.0.10"), 8000, "web.1"),
        Backend(IPv4Address("10.255.0.11"), 8000, "web.2"),
    )
    assert {(fe.protocol, fe.published): fe.backends for fe in lb.frontends.values()} == {
        # each published port is a frontend of its own, over every task
        ("tcp", 8100): everywhere,
        ("tcp", 8101): everywhere,
        ("udp", 8100): everywhere,
        # host mode: this node's task, at its first address; api has no task here
        ("tcp", 9000): (Backend(IPv4Address("10.0.1.10"), 8000, "web.1"),),
    }
    assert {fe.key for fe in lb.frontends.values()} == {
        "web/ingress/tcp/8100",
        "web/ingress/tcp/8101",
        "web/ingress/udp/8100",
        "web/host/tcp/9000",
    }
    # a task not serving (not among the service's tasks) has no host port
    assert not [
        fe
        for fe in node_lb(lb_state({**web, "tasks": ["web.2"]})).frontends.values()
        if fe.host_mode
    ]
    # two services' tasks holding one host port here: the first one listed keeps it
    rival = {**api, "name": "rival", "vips": {}, "tasks": ["web.1"]}
    rival["ports"] = [{"target": 80, "published": 9000, "mode": "host"}]
    (kept,) = [fe for fe in node_lb(lb_state(web, rival)).frontends.values() if fe.host_mode]
    assert kept.service == "web"


def test_unparseable_text() -> None:
    with pytest.raises(StateError, match="not valid JSON or YAML"):
        parse_state("{not json", source="x.json")
    with pytest.raises(StateError, match="expected an object"):
        parse_state("[1, 2]")


def every_field() -> MeshState:
    """A state with every optional field set, away from its default where it has one."""
    a, b = IPv4Address("192.168.56.11"), IPv4Address("192.168.56.12")
    ingress = Network(
        "ingress",
        4096,
        IPv4Network("10.255.0.0/16"),
        {"sw1": IPv4Address("10.255.0.2"), "sw2": IPv4Address("10.255.0.3")},
        ingress=True,
    )
    secret = Network(
        "secret",
        4097,
        IPv4Network("10.0.9.0/24"),
        {"sw1": IPv4Address("10.0.9.2")},
        encrypted=True,
        mtu=1400,
    )
    web1, web2 = IPv4Address("10.255.0.10"), IPv4Address("10.255.0.11")
    return MeshState(
        node="sw1",
        peers={"sw1": a, "sw2": b},
        networks=(ingress, secret),
        endpoints=(
            Endpoint("web.1", "ingress", "sw1", web1, mac_for_ip(web1), netns="t1", ifname="eth0"),
            Endpoint("web.1", "secret", "sw1", IPv4Address("10.0.9.5"), "02:00:00:00:00:01", "t1"),
            Endpoint("web.2", "ingress", "sw2", web2, mac_for_ip(web2)),
        ),
        services=(
            Service(
                "web",
                "vip",
                {"ingress": IPv4Address("10.255.0.5"), "secret": IPv4Address("10.0.9.4")},
                (PortConfig("tcp", 8000, 30000, "http"), PortConfig("udp", 53)),
                ("web.1", "web.2"),
                aliases=("www", "site"),
            ),
            Service(
                "db",
                "dnsrr",
                {},
                (PortConfig("tcp", 5432, name="pg"), PortConfig("tcp", 5432, 5432, mode="host")),
                (),
            ),
            Service("idle", "vip", {"ingress": IPv4Address("10.255.0.6")}, (), ()),
        ),
        generation=2**63 - 1,
        dns_upstreams=("192.168.56.1", "9.9.9.9"),
        encryption=Encryption(
            (EncryptionKey(7, bytes(range(16))), EncryptionKey(8, bytes(range(32, 64)))), 8
        ),
    )


@pytest.mark.parametrize(
    "state",
    [
        every_field(),
        MeshState(node="n", peers={"n": IPv4Address("192.0.2.1")}),  # every default
        MeshState(node="n", peers={"n": IPv4Address("192.0.2.1")}, dns_upstreams=()),
        state_from_dict(base()),
        state_from_dict({**base(), "encryption": {"keys": [{"tag": 1, "key": "ab" * 16}]}}),
    ],
    ids=["every-field", "defaults", "no-upstreams", "base", "one-key"],
)
def test_state_to_dict_is_the_inverse_of_state_from_dict(state: MeshState) -> None:
    doc = state_to_dict(state)
    assert state_from_dict(doc) == state
    # as written to the file and read back
    assert parse_state(json.dumps(doc)) == state
    assert state_to_dict(state_from_dict(doc)) == doc


def test_state_to_dict_leaves_defaults_out() -> None:
    doc = state_to_dict(state_from_dict(base()))
    endpoint = doc["endpoints"][1]
    assert endpoint == {"task": "web.2", "network": "ingress", "node": "sw2", "ip": "10.255.0.11"}
    assert "aliases" not in doc["services"][0] and "dns_upstreams" not in doc
    assert "encryption" not in doc and "mtu" not in doc["networks"][0]
    full = state_to_dict(every_field())
    assert full["endpoints"][1]["mac"] == "02:00:00:00:00:01"
    assert full["encryption"]["primary"] == 8 and full["dns_upstreams"] == [
        "192.168.56.1",
        "9.9.9.9",
    ]


def test_the_applied_report_round_trips_and_is_absent_until_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert read_applied(run_dir) == Applied() and Applied().generation == -1
    report = Applied(42, {"task web.1.x": "no namespace", "network secret": "no ESP"}, 41, 43)
    write_applied(run_dir, report)
    assert read_applied(run_dir) == report
    assert json.loads(applied_path(run_dir).read_text()) == {
        "generation": 42,
        "errors": {"task web.1.x": "no namespace", "network secret": "no ESP"},
        "balanced": 41,
        "applying": 43,
    }
    for garbage in ("{not json", "[]", '{"generation": "x", "errors": {}}', '{"errors": {}}'):
        applied_path(run_dir).write_text(garbage)
        assert read_applied(run_dir) == Applied()
