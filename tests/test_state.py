"""The mesh state contract: parsing, validation and its error messages."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

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
            Service("db", "dnsrr", {}, (PortConfig("tcp", 5432, name="pg"),), ()),
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
    report = Applied(42, {"task web.1.x": "no namespace", "network secret": "no ESP"}, 41)
    write_applied(run_dir, report)
    assert read_applied(run_dir) == report
    assert json.loads(applied_path(run_dir).read_text()) == {
        "generation": 42,
        "errors": {"task web.1.x": "no namespace", "network secret": "no ESP"},
        "balanced": 41,
    }
    for garbage in ("{not json", "[]", '{"generation": "x", "errors": {}}', '{"errors": {}}'):
        applied_path(run_dir).write_text(garbage)
        assert read_applied(run_dir) == Applied()
