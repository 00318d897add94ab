"""The control plane end to end (docs/architecture.md): shoald on three lab nodes, driven by the
shoal CLI, the real docker CLI and the docker SDK."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import docker
import docker.types
import pytest
import requests

from mesh import ipsec
from orchestrator.lab import daemons
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab
from tests.labutil import DOCKER, run, shoal, wait
from tests.netutil import balanced, round_robin

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tswarm"
SUBNET = ipaddress.IPv4Network("192.168.71.0/24")


@pytest.fixture(scope="module")
def swarm() -> Iterator[Lab]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB, purge=True)
    lab = labmod.up(LAB, 3, SUBNET)
    try:
        daemons.start_all(lab)
        sw1 = lab.node("sw1")
        shoal(
            lab,
            "sw1",
            "swarm",
            "init",
            "--listen-addr",
            f"{sw1.address}:2377",
            "--dispatcher-heartbeat",
            "1",
        )
        token = shoal(lab, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
        for n in ("sw2", "sw3"):
            shoal(lab, n, "swarm", "join", "--token", token, f"{sw1.address}:2377")
        wait(lambda: shoal(lab, "sw1", "node", "ls").stdout.count("Ready") == 3, "3 nodes")
        yield lab
    finally:
        labmod.down(LAB, purge=True)


@pytest.fixture(scope="module")
def sdk(swarm: Lab) -> Iterator[Any]:
    client = docker.DockerClient(base_url=daemons.docker_host(swarm, "sw1"))
    yield client
    client.close()


def sdk_tasks(client: Any, name: str, state: str = "running") -> list[dict[str, Any]]:
    svc = client.services.get(name)
    return [
        t for t in svc.tasks() if t["Status"]["State"] == state and t["DesiredState"] == "running"
    ]


def task_ips(client: Any, name: str, network: str = "ingress") -> set[str]:
    """The addresses of the service's running tasks on `network`, as the API gives them
    (NetworksAttachments): who may answer on its published port or VIP."""
    return {
        addr.split("/")[0]
        for t in sdk_tasks(client, name)
        for att in t.get("NetworksAttachments", [])
        if att["Network"]["Spec"]["Name"] == network
        for addr in att["Addresses"]
    }


def test_nodes_as_the_docker_cli_shows_them(swarm: Lab) -> None:
    out = run(swarm, "sw1", DOCKER, "node", "ls").stdout
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "HOSTNAME",
        "STATUS",
        "AVAILABILITY",
        "MANAGER",
        "STATUS",
        "ENGINE",
        "VERSION",
    ]
    assert any(" * " in line and "sw1" in line and "Leader" in line for line in lines)
    assert sum("Ready" in line and "Active" in line for line in lines) == 3
    info = run(swarm, "sw1", DOCKER, "info", "--format", "{{json .Swarm}}").stdout
    assert json.loads(info)["ControlAvailable"] is True
    worker = run(swarm, "sw2", DOCKER, "node", "ls", check=False)
    assert worker.returncode == 1 and "not a swarm manager" in worker.stderr


def test_the_docker_cli_runs_a_service_through_its_life(swarm: Lab, sdk: Any) -> None:
    d = ["docker"]
    run(
        swarm,
        "sw1",
        *d,
        "service",
        "create",
        "--name",
        "dweb",
        "--replicas",
        "3",
        "--publish",
        "30500:8000",
        "micro",
    )  # waits for convergence, as the real CLI does
    ls = run(swarm, "sw1", *d, "service", "ls").stdout
    assert "dweb" in ls and "3/3" in ls and "*:30500->8000/tcp" in ls
    ps = run(swarm, "sw1", *d, "service", "ps", "dweb").stdout
    assert ps.count("Running") >= 6  # desired and current state of 3 tasks
    spec = json.loads(run(swarm, "sw1", *d, "service", "inspect", "dweb").stdout)[0]
    assert spec["Spec"]["Mode"] == {"Replicated": {"Replicas": 3}}
    assert spec["Spec"]["TaskTemplate"]["RestartPolicy"]["Condition"] == "any"  # defaults
    run(swarm, "sw1", *d, "service", "scale", "dweb=5")
    assert "5/5" in run(swarm, "sw1", *d, "service", "ls").stdout
    ips = task_ips(sdk, "dweb")
    assert len(ips) == 5, ips
    counts = round_robin(None, swarm.node("sw3").address, 30500, ips, 50)
    assert balanced(counts, ips), counts
    run(swarm, "sw1", *d, "service", "rm", "dweb")
    assert "dweb" not in run(swarm, "sw1", *d, "service", "ls").stdout


def test_the_docker_sdk_creates_scales_and_reads_logs(sdk: Any) -> None:
    svc = sdk.services.create(
        "micro",
        name="sdkweb",
        mode=docker.types.ServiceMode("replicated", replicas=2),
        endpoint_spec=docker.types.EndpointSpec(ports={30501: 8000}),
    )
    try:
        wait(lambda: len(sdk_tasks(sdk, "sdkweb")) == 2, "2 running tasks")
        # docker-py sends "replicated" in lower case: stored as Docker stores it
        assert sdk.services.get("sdkweb").attrs["Spec"]["Mode"] == {"Replicated": {"Replicas": 2}}
        first = {t["ID"] for t in sdk_tasks(sdk, "sdkweb")}
        svc.scale(4)  # docker-py posts back the spec read with defaults inserted
        wait(lambda: len(sdk_tasks(sdk, "sdkweb")) == 4, "4 running tasks")
        assert first <= {t["ID"] for t in sdk_tasks(sdk, "sdkweb")}, "scaling restarted tasks"
        assert {n.attrs["Description"]["Hostname"] for n in sdk.nodes.list()} == {
            "sw1",
            "sw2",
            "sw3",
        }
        assert any(n.name == "ingress" for n in sdk.networks.list())
        ips = task_ips(sdk, "sdkweb")
        assert len(ips) == 4, ips
        reply = requests.get("http://192.168.71.12:30501/", timeout=3)
        assert reply.status_code == 200 and reply.json()["ip"] in ips, (reply, reply.text)
        # logs, from a service that writes some (micro writes none): each stream, or both
        talker = sdk.services.create(
            "alpine",
            ["sh", "-c", "echo to stdout; echo to stderr >&2; sleep 300"],
            name="sdktalk",
        )
        try:

            def lines(**streams: bool) -> list[str]:
                return b"".join(talker.logs(**streams)).decode().splitlines()

            wait(lambda: len(lines(stdout=True, stderr=True)) == 2, "sdktalk's two lines")
            assert sorted(lines(stdout=True, stderr=True)) == ["to stderr", "to stdout"]
            assert lines(stdout=True) == ["to stdout"]
            assert lines(stderr=True) == ["to stderr"]
        finally:
            talker.remove()
    finally:
        svc.remove()


def test_api_versions_paths_filters_and_errors(swarm: Lab) -> None:
    path = daemons.socket_path(swarm, "sw1")

    def get(url: str) -> tuple[int, str, dict[str, Any] | list[Any]]:
        out = subprocess.run(
            [
                "curl",
                "-g",
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code} %{content_type}",
                "--unix-socket",
                str(path),
                f"http://x{url}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        body, _, meta = out.rpartition("\n")
        code, _, ctype = meta.partition(" ")
        return int(code), ctype, json.loads(body) if body else {}

    assert get("/v1.44/nodes")[0] == 200 and get("/nodes")[0] == 200
    assert get("/v1.24/nodes")[0] == 200
    code, ctype, err = get("/v1.99/nodes")
    assert code == 400 and ctype == "application/json" and isinstance(err, dict), err
    assert "Maximum supported API version is 1.44" in err["message"]
    svc_list = get('/services?filters={"name":{"nosuch":true}}')
    assert svc_list[0] == 200 and svc_list[2] == []
    assert get('/services?filters={"name":["nosuch"]}')[2] == []
    code, ctype, err = get('/services?filters={"bogus":["x"]}')
    assert (code, ctype, err) == (400, "application/json", {"message": "Invalid filter 'bogus'"})
    assert get("/services/nosuch")[0:3:2] == (404, {"message": "service nosuch not found"})
    assert get("/nosuch")[0] == 404


def test_bad_input_gets_a_clear_4xx_and_leaves_nothing(swarm: Lab) -> None:
    path = str(daemons.socket_path(swarm, "sw1"))

    def post(url: str, data: bytes) -> tuple[int, str]:
        out = subprocess.run(
            [
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
                path,
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
                f"http://x{url}",
            ],
            input=data,
            capture_output=True,
            check=True,
        )
        body, _, code = out.stdout.decode().rpartition("\n")
        return int(code), json.loads(body).get("message", body) if body else ""

    def spec(**extra: Any) -> bytes:
        base: dict[str, Any] = {
            "Name": "badsvc",
            "TaskTemplate": {"ContainerSpec": {"Image": "micro"}},
            "Mode": {"Replicated": {"Replicas": 1}},
        }
        base.update(extra)
        return json.dumps(base).encode()

    cases = [
        (b"{not json", 400, "invalid JSON"),
        (json.dumps({"Name": 5}).encode(), 400, "needs a name"),
        (spec(Mode={"Replicated": {"Replicas": -2}}), 400, "must be 0 or more"),
        (spec(Mode={"Replicated": {"Replicas": "two"}}), 400, "expected an integer"),
        (spec(EndpointSpec={"Ports": [{"TargetPort": 70000}]}), 400, "out of range"),
        (
            spec(TaskTemplate={"ContainerSpec": {"Image": "Nginx"}}),
            400,
            "invalid reference format for image 'Nginx': repository name must be lowercase",
        ),
        (
            spec(
                TaskTemplate={
                    "ContainerSpec": {"Image": "micro"},
                    "Networks": [{"Target": "nosuchnet"}],
                }
            ),
            400,
            "network nosuchnet not found",
        ),
    ]
    for data, status, message in cases:
        code, text = post("/v1.44/services/create", data)
        assert code == status and message in text, (data, code, text)
    assert (
        post(
            "/services/create",
            spec(
                Name="taken", EndpointSpec={"Ports": [{"TargetPort": 8000, "PublishedPort": 30520}]}
            ),
        )[0]
        == 201
    )
    code, text = post(
        "/services/create",
        spec(Name="other", EndpointSpec={"Ports": [{"TargetPort": 8000, "PublishedPort": 30520}]}),
    )
    assert code == 400 and "port '30520' is already in use by service 'taken'" in text
    code, text = post("/services/create", spec(Name="taken"))
    assert code == 409 and "already exists" in text
    names = shoal(swarm, "sw1", "service", "ls", "--format", "NAME").stdout.split()
    assert "badsvc" not in names and "other" not in names
    shoal(swarm, "sw1", "service", "rm", "taken")
    cli = shoal(
        swarm, "sw1", "service", "create", "--name", "x", "--replicas", "-1", "micro", check=False
    )
    assert cli.returncode == 1 and "invalid replicas value -1" in cli.stderr
    cli = shoal(
        swarm, "sw1", "node", "update", "--availability", "drain", "nosuchnode", check=False
    )
    assert cli.returncode == 1 and "node nosuchnode not found" in cli.stderr
    cli = shoal(
        swarm, "sw1", "service", "create", "--name", "p", "--publish", "x:80", "micro", check=False
    )
    assert cli.returncode == 1 and "invalid --publish" in cli.stderr


def test_published_port_reaches_every_task_from_every_node(swarm: Lab, sdk: Any) -> None:
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "mesh",
        "--replicas",
        "4",
        "--publish",
        "30510:8000",
        "micro",
    )
    try:
        tasks = json.loads(
            shoal(swarm, "sw1", "service", "ps", "mesh", "--format", "json").stdout.splitlines()[0]
        )
        assert tasks["DesiredState"] == "running"
        ips = task_ips(sdk, "mesh")
        assert len(ips) == 4, ips
        for node in swarm.nodes:
            counts = round_robin(None, node.address, 30510, ips, 40)
            assert balanced(counts, ips), (node.name, counts)
    finally:
        shoal(swarm, "sw1", "service", "rm", "mesh")


def test_constraints_labels_and_drain(swarm: Lab, sdk: Any) -> None:
    shoal(swarm, "sw1", "node", "update", "--label-add", "zone=blue", "sw3")
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "pinned",
        "--replicas",
        "3",
        "--constraint",
        "node.labels.zone==blue",
        "micro",
    )
    try:
        nodes = {t["NodeID"] for t in sdk_tasks(sdk, "pinned")}
        sw3 = next(n.id for n in sdk.nodes.list() if n.attrs["Description"]["Hostname"] == "sw3")
        assert nodes == {sw3}
        shoal(
            swarm, "sw1", "service", "create", "--name", "everywhere", "--mode", "global", "micro"
        )
        assert len(sdk_tasks(sdk, "everywhere")) == 3
        shoal(swarm, "sw1", "node", "update", "--availability", "drain", "sw3")
        wait(lambda: len(sdk_tasks(sdk, "everywhere")) == 2, "global task off the drained node")
        pending = sdk.services.get("pinned").tasks(filters={"desired-state": "running"})
        wait(
            lambda: all(
                t["Status"]["State"] == "pending"
                for t in sdk.services.get("pinned").tasks(filters={"desired-state": "running"})
            ),
            "pinned tasks pending",
        )
        assert pending
        errs = {
            t["Status"].get("Err", "")
            for t in sdk.services.get("pinned").tasks(filters={"desired-state": "running"})
        }
        assert any("no suitable node" in e for e in errs), errs
    finally:
        shoal(
            swarm, "sw1", "node", "update", "--availability", "active", "--label-rm", "zone", "sw3"
        )
        shoal(swarm, "sw1", "service", "rm", "pinned", "everywhere")


def test_restart_policy(swarm: Lab, sdk: Any) -> None:
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "flaky",
        "-d",
        "--restart-condition",
        "on-failure",
        "--restart-delay",
        "0.2",
        "--restart-max-attempts",
        "2",
        "alpine",
        "sh",
        "-c",
        "exit 3",
    )
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "once",
        "-d",
        "--restart-condition",
        "none",
        "alpine",
        "sh",
        "-c",
        "exit 0",
    )
    try:
        svc = sdk.services.get("flaky")
        wait(
            lambda: len([t for t in svc.tasks() if t["Status"]["State"] == "failed"]) == 3,
            "1 run + 2 restarts, all failed",
        )
        time.sleep(1.5)
        tasks = svc.tasks()
        assert len(tasks) == 3 and {t["Slot"] for t in tasks} == {1}
        assert all(t["Status"]["Err"] == "task: non-zero exit (3)" for t in tasks)
        once = sdk.services.get("once")
        wait(lambda: any(t["Status"]["State"] == "complete" for t in once.tasks()), "complete")
        time.sleep(1)
        assert len(once.tasks()) == 1
    finally:
        shoal(swarm, "sw1", "service", "rm", "flaky", "once")


def test_service_update_rolls_tasks_and_ports_do_not(swarm: Lab, sdk: Any) -> None:
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "rolling",
        "--replicas",
        "3",
        "--update-parallelism",
        "1",
        "micro",
    )
    try:
        first = {t["ID"] for t in sdk_tasks(sdk, "rolling")}
        shoal(swarm, "sw1", "service", "update", "--env-add", "COLOR=blue", "rolling")
        running = sdk_tasks(sdk, "rolling")
        assert len(running) == 3 and not first & {t["ID"] for t in running}
        assert all(t["Spec"]["ContainerSpec"]["Env"] == ["COLOR=blue"] for t in running)
        shut = [t for t in sdk.services.get("rolling").tasks() if t["DesiredState"] == "shutdown"]
        assert {t["ID"] for t in shut} == first
        spec = sdk.services.get("rolling").attrs
        assert spec["UpdateStatus"]["State"] == "completed"
        assert spec["Spec"]["UpdateConfig"]["Parallelism"] == 1

        # a port is the service's endpoint, not the tasks': nothing restarts
        second = {t["ID"] for t in running}
        shoal(swarm, "sw1", "service", "update", "--publish-add", "30530:8000", "rolling")
        ips = task_ips(sdk, "rolling")
        assert len(ips) == 3, ips
        counts = round_robin(None, swarm.node("sw2").address, 30530, ips, 30)
        assert balanced(counts, ips), counts
        assert {t["ID"] for t in sdk_tasks(sdk, "rolling")} == second
        shoal(swarm, "sw1", "service", "update", "--replicas", "4", "--force", "rolling")
        assert len(sdk_tasks(sdk, "rolling")) == 4
        assert not second & {t["ID"] for t in sdk_tasks(sdk, "rolling")}
        bad = shoal(swarm, "sw1", "service", "update", "--publish-rm", "x", "rolling", check=False)
        assert bad.returncode == 1 and "invalid --publish-rm" in bad.stderr
    finally:
        shoal(swarm, "sw1", "service", "rm", "rolling")


def test_logs_of_a_service(swarm: Lab) -> None:
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "talker",
        "--replicas",
        "2",
        "--restart-condition",
        "none",
        "alpine",
        "sh",
        "-c",
        "echo hello from $HOSTNAME; echo oops >&2; sleep 30",
    )
    try:
        wait(
            lambda: shoal(swarm, "sw1", "service", "logs", "talker").stdout.count("hello") == 2,
            "both tasks' output",
        )
        out = shoal(swarm, "sw1", "service", "logs", "talker").stdout
        assert out.count("oops") == 2 and "talker.1." in out and "@sw" in out
        docker_out = run(swarm, "sw1", DOCKER, "service", "logs", "--tail", "1", "talker")
        assert docker_out.stdout.count("talker.") + docker_out.stderr.count("talker.") == 2
    finally:
        shoal(swarm, "sw1", "service", "rm", "talker")


def test_overlay_network_vips_and_dns_between_services(swarm: Lab, sdk: Any) -> None:
    shoal(swarm, "sw1", "network", "create", "-d", "overlay", "--subnet", "10.30.0.0/24", "appnet")
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "api",
        "--replicas",
        "2",
        "--network",
        "appnet",
        "micro",
    )
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "client",
        "--network",
        "appnet",
        "alpine",
        "sleep",
        "300",
    )
    try:
        api = sdk.services.get("api")
        vip = api.attrs["Endpoint"]["VirtualIPs"][0]["Addr"].split("/")[0]
        assert ipaddress.IPv4Address(vip) in ipaddress.IPv4Network("10.30.0.0/24")
        client = sdk_tasks(sdk, "client")[0]
        node = next(n for n in sdk.nodes.list() if n.id == client["NodeID"])
        netns = f"{swarm.node(node.attrs['Description']['Hostname']).netns}-{client['ID'][:12]}"
        got = subprocess.run(
            ["ip", "netns", "exec", netns, "dig", "@127.0.0.11", "+short", "api"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert got == [vip]
        ips = task_ips(sdk, "api", "appnet")
        assert len(ips) == 2 and all(
            ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("10.30.0.0/24") for ip in ips
        ), ips
        counts = round_robin(netns, vip, 8000, ips, 20)
        assert balanced(counts, ips), counts
        busy = shoal(swarm, "sw1", "network", "rm", "appnet", check=False)
        assert busy.returncode == 1 and "in use by service" in busy.stderr
    finally:
        shoal(swarm, "sw1", "service", "rm", "api", "client")
        shoal(swarm, "sw1", "network", "rm", "appnet")


def test_an_encrypted_network_gets_its_keys_and_is_attached_only_with_esp(
    swarm: Lab, sdk: Any
) -> None:
    """The managers send the keyring to the node with a task on an encrypted network, and only
    to it. What the node does with it depends on its kernel, which mesh/ipsec.py probes: with
    ESP it attaches the network, with an association to and from every other node; without,
    it refuses to attach the network rather than send in the clear, and the task says why
    (docs/security.md). tests/test_vm_swarm.py shows ESP on the wire, on Debian's kernel."""
    sw2 = swarm.node("sw2")
    esp_missing = ipsec.Ipsec(sw2.netns).probe()  # "": this kernel carries ESP
    shoal(
        swarm,
        "sw1",
        "network",
        "create",
        "-d",
        "overlay",
        "--opt",
        "encrypted",
        "--subnet",
        "10.31.0.0/24",
        "secnet",
    )
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "-d",
        "--name",
        "sec",
        "--network",
        "secnet",
        "--constraint",
        "node.hostname==sw2",
        "micro",
    )

    def mesh_doc(node: str) -> dict[str, Any]:
        path = daemons.node_dir(swarm, node) / "data" / "mesh" / "state.json"
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return doc

    try:
        wait(
            lambda: (
                "encryption" in mesh_doc("sw2")
                and any(n["name"] == "secnet" for n in mesh_doc("sw2")["networks"])
            ),
            "sw2's mesh state with the network and the keys",
        )
        path = daemons.node_dir(swarm, "sw2") / "data" / "mesh" / "state.json"
        assert path.stat().st_mode & 0o077 == 0, "the mesh state holds keys: root only"
        doc = mesh_doc("sw2")
        keys = doc["encryption"]["keys"]
        assert keys and all(len(k["key"]) == 64 for k in keys)
        assert all("encryption" not in mesh_doc(n) for n in ("sw1", "sw3"))
        vni = next(n["vni"] for n in doc["networks"] if n["name"] == "secnet")

        if esp_missing:

            def refused() -> bool:
                tasks = sdk.services.get("sec").tasks()
                return any("cannot encrypt" in t["Status"].get("Err", "") for t in tasks)

            wait(refused, "the task refused, with the reason")
            errs = [t["Status"].get("Err", "") for t in sdk.services.get("sec").tasks()]
            assert any(esp_missing in e for e in errs), (esp_missing, errs)
            assert f"sh-vx{vni}" not in run(swarm, "sw2", "ip", "-o", "link").stdout
        else:
            wait(lambda: len(sdk_tasks(sdk, "sec")) == 1, "the task running on its network")
            assert f"sh-vx{vni}" in run(swarm, "sw2", "ip", "-o", "link").stdout
            others = {n.address for n in swarm.nodes if n.name != "sw2"}
            both_ways = {p for o in others for p in ((sw2.address, o), (o, sw2.address))}

            def xfrm() -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
                states = run(swarm, "sw2", "ip", "xfrm", "state", "list").stdout
                policies = run(swarm, "sw2", "ip", "xfrm", "policy", "list").stdout
                return (
                    {(src, dst) for src, dst, _ in ipsec.parse_states(states)},
                    set(ipsec.parse_policies(policies)),
                )

            want = (both_ways, {(sw2.address, o) for o in others})
            try:  # an association each way with every other node, and a policy out to it
                wait(lambda: xfrm() == want, "sw2's ESP associations and policies")
            except AssertionError:
                raise AssertionError((xfrm(), want)) from None
    finally:
        shoal(swarm, "sw1", "service", "rm", "sec")
        shoal(swarm, "sw1", "network", "rm", "secnet")


def test_a_lost_node_goes_down_and_its_tasks_move(swarm: Lab, sdk: Any) -> None:
    shoal(swarm, "sw1", "service", "create", "--name", "survivor", "--replicas", "3", "micro")
    try:
        sw2 = next(n for n in sdk.nodes.list() if n.attrs["Description"]["Hostname"] == "sw2")
        before = Counter(t["NodeID"] for t in sdk_tasks(sdk, "survivor"))
        assert before[sw2.id] == 1
        record = labmod.load(LAB)
        assert record is not None
        for pid in labmod.running(record, "sw2"):
            os.kill(pid, 9)  # shoald gone without a word: no more heartbeats
        wait(lambda: sdk.nodes.get(sw2.id).attrs["Status"]["State"] == "down", "sw2 down", 15)
        wait(
            lambda: len([t for t in sdk_tasks(sdk, "survivor") if t["NodeID"] != sw2.id]) == 3,
            "3 tasks running off sw2",
            30,
        )
    finally:
        shoal(swarm, "sw1", "service", "rm", "survivor")
        daemons.start_all(swarm)  # sw2's shoald comes back with its membership
        wait(lambda: sdk.nodes.get(sw2.id).attrs["Status"]["State"] == "ready", "sw2 back")


def test_cli_objects_env_and_a_worker_that_leaves(swarm: Lab, sdk: Any) -> None:
    shoal(
        swarm,
        "sw1",
        "service",
        "create",
        "--name",
        "envy",
        "--env",
        "GREETING=hi there",
        "--constraint",
        "node.hostname==sw3",
        "alpine",
        "sh",
        "-c",
        'echo "$GREETING"; sleep 60',
    )
    try:
        wait(lambda: "hi there" in shoal(swarm, "sw1", "service", "logs", "envy").stdout, "env")
        (task_id,) = shoal(swarm, "sw1", "service", "ps", "-q", "envy").stdout.split()
        task = json.loads(shoal(swarm, "sw1", "inspect", task_id).stdout)[0]
        for key in ("ID", "Version", "CreatedAt", "UpdatedAt", "Spec", "ServiceID", "Slot"):
            assert key in task, key
        assert task["Status"]["State"] == "running" and task["DesiredState"] == "running"
        assert task["Status"]["ContainerStatus"]["PID"] > 0
        assert task["Version"]["Index"] > 0 and task["Slot"] == 1
        on_sw3 = shoal(swarm, "sw1", "node", "ps", "sw3").stdout
        assert "envy.1" in on_sw3 and "Running" in on_sw3
        assert "envy.1" not in shoal(swarm, "sw1", "node", "ps", "sw2").stdout
        nets = shoal(swarm, "sw1", "network", "ls").stdout
        assert "ingress" in nets and "overlay" in nets and "swarm" in nets
        ingress = json.loads(shoal(swarm, "sw1", "network", "inspect", "ingress").stdout)[0]
        assert ingress["IPAM"]["Config"][0]["Subnet"] == "10.255.0.0/16"
        me = json.loads(shoal(swarm, "sw1", "node", "inspect", "self").stdout)[0]
        assert me["Description"]["Hostname"] == "sw1" and me["ManagerStatus"]["Leader"] is True
    finally:
        shoal(swarm, "sw1", "service", "rm", "envy")

    # sw3 leaves: it is Down in the list until removed, and can join again
    shoal(swarm, "sw3", "swarm", "leave")
    wait(
        lambda: any(
            "sw3" in line and "Down" in line
            for line in shoal(swarm, "sw1", "node", "ls").stdout.splitlines()
        ),
        "sw3 down after leaving",
        15,
    )
    sw3 = next(n for n in sdk.nodes.list() if n.attrs["Description"]["Hostname"] == "sw3")
    shoal(swarm, "sw1", "node", "rm", sw3.id)
    assert "sw3" not in shoal(swarm, "sw1", "node", "ls").stdout.split()  # an ID may hold sw3
    token = shoal(swarm, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
    shoal(swarm, "sw3", "swarm", "join", "--token", token, f"{swarm.node('sw1').address}:2377")
    wait(lambda: shoal(swarm, "sw1", "node", "ls").stdout.count("Ready") == 3, "sw3 back")
