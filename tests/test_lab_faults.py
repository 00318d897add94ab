"""`shoal lab partition | heal | kill | start`: failures on demand (orchestrator/lab/faults.py;
README.md, "Failures on demand")."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.lab import daemons, engines, faults
from orchestrator.lab import lab as labmod
from orchestrator.lab.record import Lab, LabError
from tests.labutil import DOCKER, leftovers

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tfault"
SUBNET = ipaddress.IPv4Network("192.168.72.0/24")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB, purge=True)
    made = labmod.up(LAB, 3, SUBNET)  # the container executor; engines start with shoald
    try:
        yield made
    finally:
        labmod.down(LAB, purge=True)
    assert leftovers(LAB) == []


def reaches(lab: Lab, src: str | None, dst: str) -> bool:
    """One ping from a node (None: the host) to another node's address."""
    argv = ["ping", "-c", "1", "-W", "1", lab.node(dst).address]
    if src is not None:
        argv = labmod.exec_argv(lab, src, argv)
    return subprocess.run(argv, capture_output=True).returncode == 0


def matrix(lab: Lab) -> dict[tuple[str, str], bool]:
    names = [n.name for n in lab.nodes]
    return {(a, b): reaches(lab, a, b) for a in names for b in names if a != b}


def test_partition_cuts_both_ways_only_between_the_sides_and_heal_restores(lab: Lab) -> None:
    assert all(matrix(lab).values())
    faults.partition(lab, ["sw1"])
    m = matrix(lab)
    assert m == {(a, b): "sw1" not in (a, b) for a, b in m}, m  # sw1 alone; sw2 and sw3 still talk
    assert reaches(lab, None, "sw1")  # the host is not part of the split
    assert faults.cuts(lab) == {"sw1": True, "sw2": True, "sw3": True}
    faults.partition(lab, ["sw2"], ["sw3"])  # cuts accumulate
    assert not reaches(lab, "sw2", "sw3") and not reaches(lab, "sw3", "sw2")
    faults.heal(lab)
    assert all(matrix(lab).values())
    assert faults.cuts(lab) == {"sw1": False, "sw2": False, "sw3": False}


def test_partition_refuses_nonsense(lab: Lab) -> None:
    with pytest.raises(LabError, match="no node"):
        faults.partition(lab, ["sw9"])
    with pytest.raises(LabError, match="itself"):
        faults.partition(lab, ["sw1"], ["sw1", "sw2"])
    with pytest.raises(LabError, match="both sides"):
        faults.partition(lab, ["sw1", "sw2", "sw3"])
    assert not any(faults.cuts(lab).values())


def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "lab", *args, "--name", LAB],
        capture_output=True,
        text=True,
        timeout=60,
    )


def engine(lab: Lab, node: str, *args: str) -> str:
    return subprocess.run(
        [DOCKER, "-H", engines.socket_url(lab, node), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def dead(pid: int, started: int | None) -> bool:
    """Gone, or a zombie (not reaped yet by whoever inherited it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return labmod.start_time(pid) != started or stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_kill_and_start_a_node(lab: Lab) -> None:
    daemons.start(lab, lab.node("sw2"))  # its engine, then shoald
    daemons.wait_ready(lab, "sw2")
    # what shoald starts in a session of its own (shoal-mesh) dies with the node too
    stray = subprocess.Popen(labmod.exec_argv(lab, "sw2", ["sleep", "300"]), start_new_session=True)
    # and so do containers, with processes of their own, whatever their network
    micro = engine(lab, "sw2", "run", "-d", "micro").strip()
    forked = engine(lab, "sw2", "run", "-d", "busybox", "sh", "-c", "sleep 300 & sleep 300").strip()
    engine(lab, "sw2", "run", "-d", "--network", "host", "busybox", "sleep", "300")
    in_containers = {p: labmod.start_time(p) for p in engines.pids(lab, "sw2")}
    assert len(in_containers) >= 2 + 3 + 4  # dockerd, containerd; shims; containers' processes
    out = lab_cli("kill", "sw2")
    assert out.returncode == 0 and "sw2: killed" in out.stdout, out.stderr
    assert stray.wait(5) == -9
    record = labmod.load(LAB)
    assert record is not None and not labmod.running(record, "sw2")
    assert not daemons.answers(record, "sw2")
    assert not engines.answers(record, "sw2")
    assert engines.pids(record, "sw2") == []  # no engine, no container process
    assert all(dead(p, started) for p, started in in_containers.items())
    # the engine's state stays, as a crashed host's disk would
    containers = engines.data_root(record, "sw2") / "containers"
    assert {micro, forked} <= {p.name for p in containers.iterdir()}
    out = lab_cli("start", "sw2")
    assert out.returncode == 0 and "sw2: shoald running" in out.stdout, out.stderr
    assert daemons.answers(record, "sw2")
    # the engine came up over what the crash left: its containers are there, exited
    listed = engine(record, "sw2", "ps", "-a", "--format", "{{.ID}} {{.State}}")
    states = dict(line.split() for line in listed.splitlines())
    assert states[micro[:12]] == "exited" and states[forked[:12]] == "exited"
    engine(record, "sw2", "start", micro)
    assert engine(record, "sw2", "exec", micro, "wget", "-qO-", "http://127.0.0.1:8000/")
    again = lab_cli("start", "sw2")
    assert again.returncode == 1 and "already running" in again.stderr


def test_partition_and_heal_from_the_cli(lab: Lab) -> None:
    out = lab_cli("partition", "sw3", "--from", "sw1")
    assert out.returncode == 0 and "cut sw3 off from sw1" in out.stdout, out.stderr
    assert not reaches(lab, "sw1", "sw3") and reaches(lab, "sw2", "sw3")
    bad = lab_cli("partition", "sw9")
    assert bad.returncode == 1 and "sw9" in bad.stderr
    assert lab_cli("heal").returncode == 0
    assert reaches(lab, "sw1", "sw3")


def test_down_stops_every_process_of_the_lab_tasks_included() -> None:
    lab = labmod.up("tdown", 1, ipaddress.IPv4Network("192.168.58.0/24"), engines=True)
    try:
        task_ns = f"{lab.node('sw1').netns}-task1"  # as the native executor names them
        subprocess.run(["ip", "netns", "add", task_ns], check=True)
        in_node = subprocess.Popen(labmod.exec_argv(lab, "sw1", ["sleep", "300"]))
        in_task = subprocess.Popen(["ip", "netns", "exec", task_ns, "sleep", "300"])
        container = engine(lab, "sw1", "run", "-d", "busybox", "sleep", "300").strip()
        in_container = int(engine(lab, "sw1", "inspect", "-f", "{{.State.Pid}}", container))
        started = labmod.start_time(in_container)
        time.sleep(0.2)
    finally:
        labmod.down("tdown", purge=True)
    # `down` SIGKILLs whatever runs in the node's namespaces (`ip netns exec` execs the
    # command: these are the sleeps themselves)
    assert (in_node.wait(5), in_task.wait(5)) == (-signal.SIGKILL, -signal.SIGKILL)
    assert dead(in_container, started)
    assert not Path(f"/run/netns/{task_ns}").exists()
    assert leftovers("tdown") == []
