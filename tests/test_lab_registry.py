"""The container executor's side of the lab: images built here from busybox-static, the lab's
registry, a Docker engine per node, and `down` leaving nothing of them."""

from __future__ import annotations

import concurrent.futures
import io
import ipaddress
import json
import os
import re
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from mesh.netns import run_in_netns
from orchestrator.apps import micro
from orchestrator.images import rootfs
from orchestrator.lab import engines, registry
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab
from tests.labutil import DOCKER, docker_cli, leftovers
from tests.netutil import answers

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "treg"
SUBNET = ipaddress.IPv4Network("192.168.93.0/24")
SEEDED = {"library/busybox", "library/alpine", "library/micro", "gianarb/micro"}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if labmod.load(LAB) is not None or (labmod.DATA_DIR / LAB).exists():
        labmod.down(LAB, purge=True)
    made = labmod.up(LAB, 2, SUBNET, executor="container", engines=True)
    try:
        yield made
    finally:
        labmod.down(LAB, purge=True)


def client(lab: Lab, node: str) -> docker.DockerClient:
    return docker.DockerClient(base_url=engines.socket_url(lab, node), version="1.41")


# ---- the images ----------------------------------------------------------------------------


def members(image: rootfs.Image) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(image.layer)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_images_are_built_from_busybox_static_the_same_every_time() -> None:
    assert rootfs.busybox_path() == "/bin/busybox"
    for build in (rootfs.busybox, rootfs.micro):
        first, second = build(), build()
        assert first.layer == second.layer and first.id == second.id, build.__name__
    box = members(rootfs.busybox())
    assert box["bin/busybox"].isfile() and box["bin/busybox"].mode == 0o755
    for applet in ("bin/sh", "bin/ping", "usr/sbin/httpd", "usr/bin/nslookup", "usr/bin/wget"):
        assert box[applet].issym() and box[applet].linkname == "/bin/busybox", applet
    assert box["tmp"].isdir() and box["tmp"].mode == 0o1777
    assert {m.uid for m in box.values()} == {0} and len({m.mtime for m in box.values()}) == 1
    assert "nobody:x:65534" in rootfs.PASSWD
    assert rootfs.busybox().config["Cmd"] == ["sh"]
    small = members(rootfs.micro())
    assert small["www/cgi-bin/index.cgi"].mode == 0o755
    assert rootfs.micro().config["ExposedPorts"] == {"8000/tcp": {}}


def test_save_archive_is_what_docker_save_writes() -> None:
    image = rootfs.micro()

    def member(tar: tarfile.TarFile, name: str) -> bytes:
        f = tar.extractfile(name)
        assert f is not None, f"{name} is not a file in the archive"
        return f.read()

    with tarfile.open(fileobj=io.BytesIO(rootfs.save_archive(image, "micro:latest"))) as tar:
        manifest = json.loads(member(tar, "manifest.json"))
        [entry] = manifest
        assert entry["RepoTags"] == ["micro:latest"]
        config = json.loads(member(tar, entry["Config"]))
        layer = member(tar, entry["Layers"][0])
    assert layer == image.layer
    assert config["rootfs"]["diff_ids"] == [image.diff_id] and config["os"] == "linux"
    assert config["config"]["Cmd"][0] == "sh"


# ---- the registry --------------------------------------------------------------------------


def test_the_registry_answers_on_the_gateway_with_the_seeded_repositories(lab: Lab) -> None:
    addr = registry.address(lab)
    assert addr == f"{lab.gateway}:5000"
    assert registry.answers(addr)
    assert set(registry.catalog(addr)) >= SEEDED
    for repo in SEEDED:
        assert registry.has_tag(addr, repo, "latest"), repo
    assert registry.seed(lab) == []  # only what is missing
    record = labmod.load(LAB)
    assert record is not None and labmod.running(record, "registry")
    # and the nodes reach it too
    node = lab.node("sw1")
    assert run_in_netns(node.netns, lambda: registry.answers(addr))


def test_each_engine_pulls_through_the_mirror_and_from_the_registry(lab: Lab) -> None:
    for node in ("sw1", "sw2"):
        c = client(lab, node)
        for ref, built in (
            ("gianarb/micro:latest", rootfs.micro()),  # docker.io, through the mirror
            ("alpine:latest", rootfs.busybox()),
            (f"{registry.address(lab)}/library/busybox:latest", rootfs.busybox()),
        ):
            started = time.monotonic()
            image = c.images.pull(ref)
            # no DNS on the way: a node has no resolver it can reach (that would take 10 s)
            assert time.monotonic() - started < 5, ref
            assert image.id == built.id, (node, ref)
        c.close()


def test_an_image_pushed_from_one_engine_is_pulled_by_another(lab: Lab, tmp_path: Path) -> None:
    ref = f"{registry.address(lab)}/t/app"
    (tmp_path / "marker").write_text("only in t/app\n")
    (tmp_path / "Dockerfile").write_text(
        f"FROM {registry.address(lab)}/library/busybox\nCOPY marker /marker\n"
    )
    build = subprocess.run(
        [DOCKER, "-H", engines.socket_url(lab, "sw1"), "build", "-q", "-t", ref, str(tmp_path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, DOCKER_BUILDKIT="0"),
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    docker_cli(lab, "sw1", "push", ref)
    assert registry.has_tag(registry.address(lab), "t/app", "latest")
    docker_cli(lab, "sw2", "pull", ref)
    assert docker_cli(lab, "sw2", "run", "--rm", ref, "cat", "/marker") == "only in t/app\n"


# ---- the engines ---------------------------------------------------------------------------


def test_micro_in_a_container_answers_with_its_address_and_hostname(lab: Lab) -> None:
    docker_cli(lab, "sw1", "run", "-d", "--name", "m1", "--hostname", "m1host", "micro")
    try:
        out = ""
        deadline = time.monotonic() + 10
        while not out and time.monotonic() < deadline:
            # micro's port only exists in the container's network namespace (network none)
            out = docker_cli(
                lab, "sw1", "exec", "m1", "wget", "-qO-", "http://127.0.0.1:8000/", check=False
            )
            time.sleep(0 if out else 0.1)
        assert out.endswith("\n")
        assert json.loads(out) == {"ip": "127.0.0.1", "hostname": "m1host"}
        # SIGTERM stops it at once (httpd as PID 1 would wait out the 10 s grace period)
        started = time.monotonic()
        docker_cli(lab, "sw1", "stop", "m1")
        assert time.monotonic() - started < 3
        assert docker_cli(lab, "sw1", "inspect", "-f", "{{.State.ExitCode}}", "m1").strip() == "0"
    finally:
        docker_cli(lab, "sw1", "rm", "-f", "m1", check=False)


def test_micro_answers_as_micro_py_does_and_under_concurrent_requests(lab: Lab) -> None:
    """On the node's network (--network host): from the host, to the node's address."""
    node = lab.node("sw2")
    docker_cli(lab, "sw2", "run", "-d", "--name", "m2", "--network", "host", "micro")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert micro.query(node.address) == node.address
                break
            except OSError:
                assert time.monotonic() < deadline, "micro did not answer"
                time.sleep(0.1)
        with socket.create_connection((node.address, 8000), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        head, body = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Type: application/json" in head
        assert json.loads(body)["hostname"] == socket.gethostname()  # the node's: host network
        assert answers(None, node.address, 8000, 50) == {node.address: 50}
        # busybox httpd's listen backlog is 9: 16 clients at once still get every answer
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda _: micro.query(node.address, timeout=10), range(160)))
        assert set(got) == {node.address}
    finally:
        docker_cli(lab, "sw2", "rm", "-f", "m2", check=False)


def test_an_engine_is_its_nodes_own_and_leaves_the_network_alone(lab: Lab) -> None:
    node = lab.node("sw1")
    info = client(lab, "sw1").info()
    assert info["DockerRootDir"] == str(engines.data_root(lab, "sw1"))
    assert info["CgroupDriver"] == "cgroupfs"
    assert info["RegistryConfig"]["Mirrors"] == [f"http://{registry.address(lab)}/"]
    assert info["ID"] != client(lab, "sw2").info()["ID"]  # a key per node
    links = subprocess.run(
        ["ip", "-n", node.netns, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == [
        "lo",
        "eth0",
    ]
    # dockerd runs in the node's network namespace and the host's mount namespace
    [dockerd] = [
        p for p in engines.pids(lab, "sw1") if Path(f"/proc/{p}/comm").read_text() == "dockerd\n"
    ]
    assert os.stat(f"/proc/{dockerd}/ns/net").st_ino == os.stat(f"/run/netns/{node.netns}").st_ino
    assert os.readlink(f"/proc/{dockerd}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    # a container's processes are in cgroups under the node's netns name
    cid = docker_cli(lab, "sw1", "run", "-d", "busybox", "sleep", "300").strip()
    try:
        pid = docker_cli(lab, "sw1", "inspect", "-f", "{{.State.Pid}}", cid).strip()
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        assert re.search(rf":pids:/(.*/)?{node.netns}/{cid}$", cgroups, re.M), cgroups
    finally:
        docker_cli(lab, "sw1", "rm", "-f", cid)


# ---- down ----------------------------------------------------------------------------------


def test_down_keeps_the_registrys_images_and_purge_removes_everything(lab: Lab) -> None:
    """Last: it takes the module's lab down."""
    docker_cli(lab, "sw1", "run", "-d", "--name", "left", "micro")  # running at down
    assert labmod.down(LAB)
    kept = leftovers(LAB)
    assert kept == [f"file {labmod.DATA_DIR / LAB}"], kept
    assert (registry.storage(lab) / "docker").is_dir()
    # the next lab finds what was pushed to it
    again = labmod.up(LAB, 1, SUBNET, engines=True)
    assert registry.has_tag(registry.address(again), "t/app", "latest")
    assert registry.seed(again) == []
    assert labmod.down(LAB, purge=True)
    assert leftovers(LAB) == []
    assert not labmod.down(LAB, purge=True)
