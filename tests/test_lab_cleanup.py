"""`shoal lab` and `shoal-mesh cleanup` leave the host as they found it (docs/architecture.md,
"The lab"; docs/lab-registry.md)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.lab import lab as labmod
from orchestrator.lab.meshlab import MeshLab
from tests.labutil import leftovers
from tests.netutil import answers

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def snapshot() -> tuple[str, str, str]:
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    links = "\n".join(sorted(line.split()[1] for line in run("ip", "-o", "link").splitlines()))
    return run("ip", "-all", "netns"), links, run("nft", "list", "tables")


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", *args], capture_output=True, text=True
    )


def test_lab_cli_up_is_idempotent_and_down_removes_everything(tmp_path: Path) -> None:
    before = snapshot()
    try:
        first = shoal(
            "lab", "up", "--name", "tclean", "--nodes", "2", "--subnet", "192.168.57.0/24"
        )
        assert first.returncode == 0, first.stderr
        again = shoal(
            "lab", "up", "--name", "tclean", "--nodes", "2", "--subnet", "192.168.57.0/24"
        )
        assert again.returncode == 0 and again.stdout == first.stdout
        listed = shoal("lab", "ls")
        assert "tclean" in listed.stdout and "192.168.57.12" in listed.stdout
        # every node has its engine, the lab its registry (container executor, the default)
        assert "unix:///run/shoal/lab/tclean/sw2/docker.sock" in listed.stdout
        assert "tclean     registry 192.168.57.1:5000 (running)" in listed.stdout
        ps = subprocess.run(
            ["/usr/bin/docker", "-H", "unix:///run/shoal/lab/tclean/sw2/docker.sock", "ps"],
            capture_output=True,
            text=True,
        )
        assert ps.returncode == 0, ps.stderr
        out = shoal("lab", "exec", "--name", "tclean", "sw2", "--", "ip", "-4", "-o", "addr")
        assert "192.168.57.12/24" in out.stdout
        assert subprocess.run(["ping", "-c1", "-W2", "192.168.57.11"]).returncode == 0
        grown = shoal(
            "lab", "up", "--name", "tclean", "--nodes", "3", "--subnet", "192.168.57.0/24"
        )
        assert "sw3" in grown.stdout
        shrunk = shoal(
            "lab", "up", "--name", "tclean", "--nodes", "1", "--subnet", "192.168.57.0/24"
        )
        assert "sw2" not in shrunk.stdout and "tclean-sw2" not in snapshot()[0]
        # sw2's engine went with it
        assert not [x for x in leftovers("tclean") if "/sw2" in x or "tclean-sw2" in x]
    finally:
        down = shoal("lab", "down", "--name", "tclean", "--purge")
    assert down.returncode == 0
    assert snapshot() == before
    assert leftovers("tclean") == []


def test_lab_cli_native_labs_have_no_engine_and_down_keeps_only_the_registry() -> None:
    try:
        native = shoal(
            "lab",
            "up",
            "--name",
            "tclean",
            "--nodes",
            "1",
            "--subnet",
            "192.168.57.0/24",
            "--executor",
            "native",
            "--no-daemons",
        )
        assert native.returncode == 0 and "native executor" in native.stdout, native.stderr
        lab = labmod.load("tclean")
        assert lab is not None and lab.executor == "native" and not lab.containers
        other = shoal("lab", "up", "--name", "tclean", "--subnet", "192.168.57.0/24")
        assert other.returncode == 1 and "runs the native executor" in other.stderr
        vm = shoal("lab", "up", "--name", "tclean2", "--vm", "--executor", "container")
        assert vm.returncode == 1 and "VM labs run the native executor" in vm.stderr
    finally:
        down = shoal("lab", "down", "--name", "tclean")
    assert down.returncode == 0 and down.stdout == "lab tclean removed\n"
    assert leftovers("tclean") == []


def test_lab_errors_are_clear() -> None:
    bad = shoal("lab", "up", "--name", "Bad_Name")
    assert bad.returncode == 1 and "invalid lab name" in bad.stderr
    missing = shoal("lab", "exec", "--name", "nosuch", "sw1", "--", "true")
    assert missing.returncode == 1 and "no lab named nosuch" in missing.stderr


def test_mesh_cleanup_and_lab_down_restore_the_host(tmp_path: Path) -> None:
    before = snapshot()
    lab = labmod.up("tclean", 2, ipaddress.IPv4Network("192.168.57.0/24"))
    mesh = MeshLab(lab, tmp_path)
    try:
        mesh.add_network("ingress", 4096, "10.255.0.0/16", ingress=True)
        mesh.add_service(
            "web", [{"protocol": "tcp", "target": 8000, "published": 30000}], ["ingress"]
        )
        t1, t2 = mesh.add_task("web", "sw1"), mesh.add_task("web", "sw2")
        mesh.publish()
        for node in ("sw1", "sw2"):
            mesh.start_daemon(node)
        mesh.wait_synced()
        for t in (t1, t2):
            mesh.start_workload(t)
            mesh.wait_listening(t)
        assert len(answers(None, "192.168.57.11", 30000, 4)) == 2
        during = snapshot()
        assert during != before
        # cleanup inside a node removes every shoal link and table there
        mesh.stop_daemon("sw1")
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                lab.node("sw1").netns,
                sys.executable,
                "-m",
                "mesh.cli",
                "cleanup",
                "--run-dir",
                str(tmp_path / "run-sw1"),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        node_links = subprocess.run(
            ["ip", "-n", lab.node("sw1").netns, "-o", "link"], capture_output=True, text=True
        ).stdout
        assert " sh-" not in node_links
        for ns in (lab.node("sw1").netns, t1.netns):
            tables = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "list", "tables"], capture_output=True, text=True
            ).stdout
            assert "shoal" not in tables, ns
    finally:
        mesh.close()
        labmod.down("tclean", purge=True)
    assert snapshot() == before
    assert leftovers("tclean") == []
