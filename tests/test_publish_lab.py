"""Every publish mode end to end (issue #12): several published ports per service, to one
target port, TCP and UDP; `--publish-add` and `--publish-rm`; host mode (the node's port
reaches its own task only, shown as Docker shows it, and kept apart by the scheduler). A
3-node lab on the native executor (micro answers HTTP and UDP on 8000; a UDP echo runs as the
host's Python), driven by the docker CLI inside sw1, the docker SDK and `shoal`."""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import docker
import pytest

from orchestrator.apps import micro
from orchestrator.lab import daemons, lifecycle
from orchestrator.lab.lab import Lab
from tests.labutil import created_service, module_lab, shoal, wait
from tests.labutil import swarm_cli as cli

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tpub"
SUBNET = ipaddress.IPv4Network("192.168.86.0/24")
PREFIX = "tpub-"  # every service this module makes
# a UDP echo server on 7007: what it gets, it sends back
ECHO = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 7007))\n"
    "while True:\n"
    "    data, peer = s.recvfrom(2048)\n"
    "    s.sendto(data, peer)\n"
)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Lab]:
    with module_lab(LAB, 3, SUBNET, executor="native") as lab:
        yield lifecycle.swarm(lab)


@pytest.fixture(scope="module")
def sdk(swarm: Lab) -> Iterator[Any]:
    client = docker.DockerClient(base_url=daemons.docker_host(swarm, "sw1"))
    yield client
    client.close()


def addresses(lab: Lab) -> dict[str, str]:
    return {n.name: str(n.address) for n in lab.nodes}


def answers(host: str, port: int) -> str | None:
    """The IP of the task micro answered from, or None if the port refuses."""
    try:
        return micro.query(host, port, timeout=2.0)
    except ConnectionRefusedError:
        return None


def echo(host: str, port: int, payload: bytes) -> bytes | None:
    """What a UDP echo sends back to one datagram (None: nothing within a second)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(payload, (host, port))
        try:
            return s.recvfrom(2048)[0]
        except (TimeoutError, ConnectionRefusedError):
            return None


def echoes(host: str, port: int, payload: bytes) -> bool:
    return echo(host, port, payload) == payload


def udp_micro(host: str, port: int) -> bool:
    """Whether micro answers a datagram on the port."""
    return echo(host, port, b"?") is not None


def udp_silent(host: str, port: int) -> bool:
    return not udp_micro(host, port)


def reachable(host: str, port: int) -> bool:
    return answers(host, port) is not None


def refuses(host: str, port: int) -> bool:
    return answers(host, port) is None


def reaches(host: str, port: int, ip: str) -> bool:
    """Whether the port answers from the task of address `ip`."""
    return answers(host, port) == ip


def running(sdk: Any, name: str) -> list[dict[str, Any]]:
    return [
        t
        for t in sdk.services.get(name).tasks()
        if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
    ]


def task_ips(sdk: Any, name: str) -> dict[str, str]:
    """node hostname -> the address of the service's running task there (its first)."""
    nodes = {n.id: n.attrs["Description"]["Hostname"] for n in sdk.nodes.list()}
    return {
        nodes[t["NodeID"]]: t["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
        for t in running(sdk, name)
    }


def every_node_answers(lab: Lab, port: int, within: float = 20.0) -> None:
    for node, addr in addresses(lab).items():
        wait(partial(reachable, addr, port), f"{node}:{port} to answer", within)


def test_several_published_ports_to_one_target_answer_on_every_node(swarm: Lab) -> None:
    # not consecutive, or docker shows them as one range (*:8100-8101->8000/tcp)
    with created_service(
        swarm, PREFIX + "two", "--replicas", "2", "-p", "8100:8000", "-p", "8102:8000", "micro"
    ):
        every_node_answers(swarm, 8100)
        every_node_answers(swarm, 8102)
        listed = cli(swarm, "service", "ls", "--filter", f"name={PREFIX}two").stdout
        assert "*:8100->8000/tcp, *:8102->8000/tcp" in listed, listed
        ours = shoal(swarm, "sw1", "service", "ls").stdout
        assert "*:8100->8000/tcp, *:8102->8000/tcp" in ours, ours


def test_publish_add_keeps_the_old_port_and_publish_rm_removes_only_the_one_named(
    swarm: Lab, sdk: Any
) -> None:
    nodes = addresses(swarm)
    with created_service(
        swarm, PREFIX + "add", "--replicas", "2", "-p", "8080:8000", "micro"
    ) as name:
        every_node_answers(swarm, 8080)
        cli(swarm, "service", "update", "-d", "--publish-add", "published=8081,target=8000", name)
        every_node_answers(swarm, 8081)
        for node, addr in nodes.items():  # the bug: 8081 took 8080's place
            assert answers(addr, 8080) is not None, f"{node}:8080 fell silent"
        # UDP too, then docker's --publish-rm TARGET/udp: the UDP port goes, TCP stays
        cli(swarm, "service", "update", "-d", "--publish-add", "8080:8000/udp", name)
        for node, addr in nodes.items():
            wait(partial(udp_micro, addr, 8080), f"{node}:8080/udp to answer")
        cli(swarm, "service", "update", "-d", "--publish-rm", "8000/udp", name)
        for node, addr in nodes.items():
            wait(partial(udp_silent, addr, 8080), f"{node}:8080/udp to go")
            assert answers(addr, 8080) is not None and answers(addr, 8081) is not None
        # shoal's --publish-rm names one published port of a target: only that one goes
        shoal(swarm, "sw1", "service", "update", "-d", "--publish-rm", "8081:8000", name)
        for node, addr in nodes.items():
            wait(partial(refuses, addr, 8081), f"{node}:8081 to go")
            assert answers(addr, 8080) is not None, f"{node}:8080 went with 8081"
        ports = sdk.api.inspect_service(name)["Endpoint"]["Ports"]
        assert [(p["Protocol"], p["PublishedPort"], p["TargetPort"]) for p in ports] == [
            ("tcp", 8080, 8000)
        ]


def test_udp_ports_on_the_routing_mesh_echo_from_every_node(swarm: Lab) -> None:
    with created_service(
        swarm, PREFIX + "echo", "--replicas", "2", "-p", "5300:7007/udp", "-p", "5301:7007/udp",
        "busybox", sys.executable, "-c", ECHO,
    ):  # fmt: skip
        for node, addr in addresses(swarm).items():
            for port in (5300, 5301):
                payload = f"hello {node}:{port}".encode()
                wait(partial(echoes, addr, port, payload), f"{node}:{port}/udp to echo")


def test_host_mode_reaches_the_nodes_own_task_only_and_shows_as_docker_shows_it(
    swarm: Lab, sdk: Any
) -> None:
    nodes = addresses(swarm)
    with created_service(
        swarm, PREFIX + "host", "--replicas", "2", "--constraint", "node.hostname!=sw1",
        "--publish", "mode=host,published=9000,target=8000", "micro",
    ) as name:  # fmt: skip
        wait(lambda: len(running(sdk, name)) == 2, "both tasks to run")
        local = task_ips(sdk, name)
        assert sorted(local) == ["sw2", "sw3"]
        for node in ("sw2", "sw3"):
            wait(partial(reachable, nodes[node], 9000), f"{node}:9000 to answer")
            # its own task every time, never the other node's (no routing mesh)
            seen = {answers(nodes[node], 9000) for _ in range(6)}
            assert seen == {local[node]}, (node, seen, local)
        assert answers(nodes["sw1"], 9000) is None  # no task there: nothing listens
        # Status.PortStatus in Docker's shape; `service ps` PORTS as docker's; `service ls`
        # shows the routing mesh's ports only, as docker does
        for t in running(sdk, name):
            assert t["Status"]["PortStatus"] == {
                "Ports": [
                    {
                        "Protocol": "tcp",
                        "TargetPort": 8000,
                        "PublishedPort": 9000,
                        "PublishMode": "host",
                    }
                ]
            }
        ps = cli(swarm, "service", "ps", "--format", "{{.Node}} {{.Ports}}", name).stdout
        assert sorted(ps.splitlines()) == ["sw2 *:9000->8000/tcp", "sw3 *:9000->8000/tcp"], ps
        ours = shoal(swarm, "sw1", "service", "ps", name).stdout
        assert ours.count("*:9000->8000/tcp") == 2, ours
        listed = cli(swarm, "service", "ls", "--format", "{{.Name}} [{{.Ports}}]").stdout
        assert f"{name} []" in listed.splitlines(), listed
        # a port of the routing mesh may not be a host-mode port in use
        refused = cli(swarm, "service", "create", "-d", "--name", f"{PREFIX}clash",
                      "-p", "9000:80", "micro", check=False)  # fmt: skip
        if refused.returncode == 0:
            cli(swarm, "service", "rm", f"{PREFIX}clash")
        assert refused.returncode != 0
        assert "as a host-mode port; publish another port" in refused.stderr, refused.stderr
        # another host-mode port: the tasks are replaced (they hold their node's ports), and
        # both ports reach the new ones
        old = set(local.values())
        cli(swarm, "service", "update", "--publish-add", "mode=host,published=9001,target=8000",
            name)  # fmt: skip
        wait(lambda: len(running(sdk, name)) == 2, "both new tasks to run")
        local = task_ips(sdk, name)
        assert sorted(local) == ["sw2", "sw3"] and not old & set(local.values()), (old, local)
        for node in ("sw2", "sw3"):
            for port in (9000, 9001):
                wait(
                    partial(reaches, nodes[node], port, local[node]),
                    f"{node}:{port} to reach its new task",
                )


def test_two_host_mode_tasks_of_one_port_on_one_node_wait_with_dockers_message(
    swarm: Lab, sdk: Any
) -> None:
    with created_service(
        swarm, PREFIX + "busy", "-d", "--replicas", "2", "--constraint", "node.hostname==sw1",
        "--publish", "mode=host,published=9100,target=8000", "micro",
    ) as name:  # fmt: skip

        def one_waits() -> bool:
            tasks = sdk.services.get(name).tasks()
            states = sorted(t["Status"]["State"] for t in tasks)
            return states == ["pending", "running"]

        wait(one_waits, "one task to run and the other to wait")
        (pending,) = [
            t for t in sdk.services.get(name).tasks() if t["Status"]["State"] == "pending"
        ]
        assert "host-mode port already in use on 1 node" in pending["Status"]["Err"], pending
        ps = cli(swarm, "service", "ps", "--no-trunc", name).stdout
        assert "host-mode port already in use on 1 node" in ps, ps


def test_a_host_mode_port_without_a_number_is_refused_saying_what_to_do(swarm: Lab) -> None:
    out = cli(swarm, "service", "create", "-d", "--name", f"{PREFIX}nonum",
              "--publish", "mode=host,target=8000", "micro", check=False)  # fmt: skip
    if out.returncode == 0:
        cli(swarm, "service", "rm", f"{PREFIX}nonum")
    assert out.returncode != 0
    assert "host-mode port 8000/tcp has no published port" in out.stderr, out.stderr
    assert "mode=host,published=PORT,target=8000" in out.stderr, out.stderr
