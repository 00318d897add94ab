"""`shoal lab partition | heal | kill | start`: failures on demand (issue #4, item 5)."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator

import pytest

from orchestrator.lab import daemons, faults
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab, LabError

pytestmark = pytest.mark.lab

LAB = "tfault"
SUBNET = ipaddress.IPv4Network("192.168.72.0/24")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB)
    made = labmod.up(LAB, 3, SUBNET)
    try:
        yield made
    finally:
        labmod.down(LAB)


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


def test_kill_and_start_a_nodes_daemon(lab: Lab) -> None:
    daemons.start(lab, lab.node("sw2"))
    daemons.wait_ready(lab, "sw2")
    record = labmod.load(LAB)
    assert record is not None
    pids = faults.kill(record, "sw2")
    assert pids
    record = labmod.load(LAB)
    assert record is not None and not labmod.running(record, "sw2")
    assert not daemons.ping(daemons.socket_path(record, "sw2"))
    faults.start(record, "sw2")
    daemons.wait_ready(record, "sw2")
    record = labmod.load(LAB)
    assert record is not None
    with pytest.raises(LabError, match="already running"):
        faults.start(record, "sw2")
