"""Secrets at rest (issue #5): the managers' Raft data is encrypted on disk, and with autolock a
restarted manager runs nothing until `swarm unlock` gives it the key (`SWMKEY-1-...`)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from orchestrator.lab import daemons, faults
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab
from orchestrator.raft import sealing
from tests.labutil import fresh, shoal, wait

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tlock"
SUBNET = ipaddress.IPv4Network("192.168.75.0/24")
MARKER = "autolock-marker-7f3a"  # a service name to look for in the raw files


def raft_dir(lab: Lab, node: str) -> Path:
    return daemons.node_dir(lab, node) / "data" / "manager" / "raft"


def lists_marker(lab: Lab, node: str) -> bool:
    return MARKER in shoal(lab, node, "service", "ls").stdout


def unlock_key(text: str) -> str:
    return next(word for word in text.split() if word.startswith("SWMKEY-1-"))


def local_state(lab: Lab, node: str) -> str:
    client = docker.APIClient(base_url=daemons.docker_host(lab, node), timeout=10)
    return str(client.info()["Swarm"]["LocalNodeState"])


def restart(lab: Lab, node: str) -> None:
    faults.kill(fresh(lab), node)
    faults.start(fresh(lab), node)
    daemons.wait_ready(fresh(lab), node)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Lab, str]]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB, purge=True)
    lab = labmod.up(LAB, 2, SUBNET)
    try:
        daemons.start_all(lab)
        first = lab.node("sw1").address
        out = shoal(lab, "sw1", "swarm", "init", "--autolock", "--advertise-addr", first)
        assert "shoal swarm unlock" in out.stdout
        key = unlock_key(out.stdout)
        token = shoal(lab, "sw1", "swarm", "join-token", "-q", "manager").stdout.strip()
        shoal(lab, "sw2", "swarm", "join", "--token", token, f"{first}:2377")
        shoal(lab, "sw1", "service", "create", "--name", MARKER, "--replicas", "0", "-d", "micro")
        yield lab, key
    finally:
        labmod.down(LAB, purge=True)


def test_raft_data_is_encrypted_and_sealed_on_every_manager(cluster: tuple[Lab, str]) -> None:
    lab, key = cluster
    assert shoal(lab, "sw2", "swarm", "unlock-key", "-q").stdout.strip() == key
    for node in ("sw1", "sw2"):
        # the joined manager seals its data key once it learns the cluster's unlock key
        wait(functools.partial(sealing.is_locked, raft_dir(lab, node)), f"{node} sealed")
        wait(functools.partial(lists_marker, lab, node), f"{node} has the service")
        files = [p for p in raft_dir(lab, node).rglob("*") if p.is_file()]
        assert files
        for p in files:
            assert MARKER.encode() not in p.read_bytes(), f"{p} holds the store in the clear"


def test_a_restarted_manager_is_locked_until_unlocked(cluster: tuple[Lab, str]) -> None:
    lab, key = cluster
    restart(lab, "sw2")
    assert local_state(lab, "sw2") == "locked"
    out = shoal(lab, "sw2", "service", "ls", check=False)
    assert out.returncode == 1 and "needs to be unlocked" in out.stderr, out.stderr
    out = shoal(lab, "sw2", "swarm", "unlock", stdin="not-a-key\n", check=False)
    assert out.returncode == 1 and "does not start with SWMKEY-1-" in out.stderr, out.stderr
    wrong = "SWMKEY-1-" + "A" * 43
    out = shoal(lab, "sw2", "swarm", "unlock", stdin=wrong + "\n", check=False)
    assert out.returncode == 1 and "unlock key is wrong" in out.stderr, out.stderr
    assert local_state(lab, "sw2") == "locked"
    shoal(lab, "sw2", "swarm", "unlock", stdin=key + "\n")
    assert local_state(lab, "sw2") in ("active", "pending")
    wait(lambda: MARKER in shoal(lab, "sw2", "service", "ls").stdout, "the store back on sw2")
    out = shoal(lab, "sw2", "swarm", "unlock", stdin=key + "\n", check=False)
    assert out.returncode == 1 and "not locked" in out.stderr


def test_a_rotated_key_reseals_every_manager(cluster: tuple[Lab, str]) -> None:
    lab, old = cluster
    before = (raft_dir(lab, "sw2") / sealing.KEY_FILE).read_bytes()
    out = shoal(lab, "sw1", "swarm", "unlock-key", "--rotate")
    new = unlock_key(out.stdout)
    assert new != old and "Successfully rotated" in out.stdout
    key_file = raft_dir(lab, "sw2") / sealing.KEY_FILE
    wait(lambda: key_file.read_bytes() != before, "sw2 resealing its data key")
    restart(lab, "sw2")
    out = shoal(lab, "sw2", "swarm", "unlock", stdin=old + "\n", check=False)
    assert out.returncode == 1 and "unlock key is wrong" in out.stderr, out.stderr
    shoal(lab, "sw2", "swarm", "unlock", stdin=new + "\n")
    wait(lambda: MARKER in shoal(lab, "sw2", "service", "ls").stdout, "the store back on sw2")


def test_autolock_off_leaves_managers_unlocked(cluster: tuple[Lab, str]) -> None:
    lab, _ = cluster
    shoal(lab, "sw1", "swarm", "update", "--autolock", "false")
    out = shoal(lab, "sw1", "swarm", "unlock-key", check=False)
    assert out.returncode == 1 and "no unlock key is set" in out.stderr
    wait(lambda: not sealing.is_locked(raft_dir(lab, "sw2")), "sw2 unsealing its data key")
    restart(lab, "sw2")
    assert local_state(lab, "sw2") in ("active", "pending")
    wait(lambda: MARKER in shoal(lab, "sw2", "service", "ls").stdout, "the store on sw2")
    # still encrypted at rest, under a data key that is now kept in the clear
    for p in raft_dir(lab, "sw2").rglob("*.wal"):
        assert MARKER.encode() not in p.read_bytes()
