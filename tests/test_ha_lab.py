"""Highly available managers (issue #4) in a lab: three shoald managers on Raft.

Clients write and read through every manager while the leader is killed, a minority and then
the leader are cut off, and every manager restarts; nothing acknowledged is lost and the
clients' histories are linearizable (orchestrator/raft/linearizability.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import pytest
import requests

from mesh.netns import processes_in
from orchestrator.lab import daemons, faults
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab
from orchestrator.raft.linearizability import Operation, check
from tests.labutil import fresh, shoal, wait
from tests.netutil import answers

pytestmark = pytest.mark.lab

LAB = "tha"
SUBNET = ipaddress.IPv4Network("192.168.73.0/24")
NODES = ("sw1", "sw2", "sw3")
KEYS = ("a", "b")


def api(lab: Lab, node: str, timeout: float = 10) -> Any:
    return docker.APIClient(base_url=daemons.docker_host(lab, node), timeout=timeout)


def leader(lab: Lab) -> str | None:
    """The hostname of the leader, as the first manager that answers says."""
    for node in NODES:
        try:
            for n in api(lab, node, 3).nodes():
                if n.get("ManagerStatus", {}).get("Leader"):
                    return str(n["Description"]["Hostname"])
        except (docker.errors.APIError, requests.RequestException):
            continue
    return None


def statuses(lab: Lab, node: str) -> dict[str, str]:
    out = {}
    for n in api(lab, node).nodes():
        ms = n.get("ManagerStatus") or {}
        out[n["Description"]["Hostname"]] = (
            "Leader" if ms.get("Leader") else str(ms.get("Reachability", "")).capitalize()
        )
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[Lab]:
    if labmod.load(LAB) is not None:
        labmod.down(LAB, purge=True)
    lab = labmod.up(LAB, len(NODES), SUBNET)
    try:
        daemons.start_all(lab)
        first = lab.node("sw1").address
        shoal(
            lab,
            "sw1",
            "swarm",
            "init",
            "--listen-addr",
            f"{first}:2377",
            "--dispatcher-heartbeat",
            "1",
        )
        token = shoal(lab, "sw1", "swarm", "join-token", "-q", "manager").stdout.strip()
        for n in NODES[1:]:
            out = shoal(lab, n, "swarm", "join", "--token", token, f"{first}:2377")
            assert "as a manager" in out.stdout
        shoal(lab, "sw1", "service", "create", "--name", "reg", "--replicas", "0", "micro")
        yield lab
    finally:
        labmod.down(LAB, purge=True)


def restore(lab: Lab) -> None:
    """Every manager up, no cuts, a leader, every node ready."""
    faults.heal(lab)
    lab = fresh(lab)
    for n in NODES:
        if not labmod.running(lab, n):
            faults.start(lab, n)
    for n in NODES:
        daemons.wait_ready(fresh(lab), n)
    wait(lambda: leader(lab) is not None, "a leader")
    wait(
        lambda: sorted(statuses(lab, "sw1").values()) == ["Leader", "Reachable", "Reachable"],
        "three managers reachable",
    )


def test_three_managers_one_leader(cluster: Lab) -> None:
    for n in NODES:
        assert sorted(statuses(cluster, n).values()) == ["Leader", "Reachable", "Reachable"]
        info = api(cluster, n).info()["Swarm"]
        assert info["ControlAvailable"] is True and info["Managers"] == 3
    ls = shoal(cluster, "sw2", "node", "ls").stdout
    assert ls.count("Leader") == 1 and ls.count("Reachable") == 2


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def never_connected(e: BaseException) -> bool:
    """Did this request fail to reach the socket at all (no daemon listening)?"""
    seen: list[object] = [e]
    while seen:
        err = seen.pop()
        if isinstance(err, (ConnectionRefusedError, FileNotFoundError)):
            return True
        if isinstance(err, BaseException):
            seen.extend(err.args)
            seen.extend(x for x in (err.__cause__, err.__context__) if x is not None)
    return False


class Clients:
    """Client threads putting and getting service labels through every manager, recording a
    history for the linearizability checker."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.ops: list[Operation] = []
        self.acked: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i, node), daemon=True)
            for i, node in enumerate(NODES)
        ]
        self.seq = 0

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def record(self, op: Operation) -> None:
        with self.lock:
            self.ops.append(op)

    def _run(self, client: int, node: str) -> None:
        rng = random.Random(client)
        c = api(self.lab, node, timeout=8)
        while not self.stop.is_set():
            key = rng.choice(KEYS)
            t0 = time.monotonic()
            if rng.random() < 0.5:
                try:
                    svc = c.inspect_service("reg")
                except (docker.errors.APIError, requests.RequestException):
                    time.sleep(0.05)
                    continue
                value = (svc["Spec"].get("Labels") or {}).get(key)
                self.record(Operation(client, t0, time.monotonic(), "get", key, output=value))
                continue
            with self.lock:
                self.seq += 1
                value = f"v{self.seq}"
            try:
                svc = c.inspect_service("reg")
                spec = svc["Spec"]
                spec["Labels"] = {**(spec.get("Labels") or {}), key: value}
            except (docker.errors.APIError, requests.RequestException):
                time.sleep(0.05)
                continue
            try:
                c.update_service(
                    svc["ID"],
                    svc["Version"]["Index"],
                    task_template=spec["TaskTemplate"],
                    name=spec["Name"],
                    labels=spec["Labels"],
                    mode=spec["Mode"],
                    endpoint_spec=spec.get("EndpointSpec"),
                    fetch_current_spec=False,
                )
            except docker.errors.APIError as e:
                # Out of sequence: a concurrent write won, this one did not happen. Anything
                # else (no quorum, a forward cut short) may have been committed all the same.
                if "out of sequence" not in str(e.explanation):
                    self.record(Operation(client, t0, None, "put", key, value))
                time.sleep(0.05)
                continue
            except requests.RequestException as e:
                # A connection that was never made sent nothing. Any other failure may come
                # after the request was sent: a manager killed while committing it aborts the
                # connection, and the write may stand.
                if not never_connected(e):
                    self.record(Operation(client, t0, None, "put", key, value))
                time.sleep(0.05)
                continue
            self.record(Operation(client, t0, time.monotonic(), "put", key, value))
            with self.lock:
                self.acked.append((key, value))


def explain(ops: list[Operation]) -> str:
    """A history that is not linearizable, saved for replay and summed up for the log."""
    path = f"/tmp/shoal-ha-history-{os.getpid()}.json"
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(o) for o in ops], f)
    lines = [
        f"{o.call:.3f}-{'?' if o.ret is None else f'{o.ret:.3f}'} c{o.client} {o.kind} "
        f"{o.value if o.kind == 'put' else o.output}"
        for o in sorted(ops, key=lambda o: o.call)
    ]
    return f"not linearizable (history in {path}):\n" + "\n".join(lines[-60:])


def test_killing_the_leader_loses_nothing_and_histories_are_linearizable(cluster: Lab) -> None:
    restore(cluster)
    clients = Clients(cluster)
    clients.start()
    try:
        time.sleep(2)
        old = leader(cluster)
        assert old is not None
        before = len(clients.acked)
        faults.kill(fresh(cluster), old)
        killed_at = time.monotonic()
        failover = wait(lambda: len(clients.acked) > before + 2, "writes after the kill", 20)
        time.sleep(1.5)
        faults.start(fresh(cluster), old)  # it comes back from its disk
        time.sleep(2)
    finally:
        clients.finish()
    assert time.monotonic() - killed_at > 0
    print(f"first acknowledged writes {failover:.2f} s after kill -9 of the leader {old}")
    assert failover < 6, failover
    result = check(clients.ops)
    assert result.ok, explain(result.ops)
    writes = [o for o in clients.ops if o.kind == "put" and o.ret is not None]
    reads = [o for o in clients.ops if o.kind == "get"]
    assert len(writes) > 10 and len(reads) > 10
    restore(cluster)
    # every manager ends with the last acknowledged value of each key, or a later unknown one
    final = {n: api(cluster, n).inspect_service("reg")["Spec"].get("Labels") or {} for n in NODES}
    assert final["sw1"] == final["sw2"] == final["sw3"]


def test_a_cut_off_minority_refuses_writes_and_catches_up(cluster: Lab) -> None:
    restore(cluster)
    lead = leader(cluster)
    assert lead is not None
    follower = next(n for n in NODES if n != lead)
    faults.partition(fresh(cluster), [follower])
    try:
        shoal(cluster, lead, "service", "create", "--name", "during-cut", "-d", "micro")
        out = shoal(
            cluster, follower, "service", "create", "--name", "cut-off", "-d", "micro", check=False
        )
        assert out.returncode != 0 and "does not have a leader" in out.stderr, out.stderr
        # now cut the leader off too: the remaining one cannot elect anyone alone
        faults.heal(fresh(cluster))
        faults.partition(fresh(cluster), [lead])
        others = [n for n in NODES if n != lead]
        wait(lambda: leader(cluster) in others, "a new leader among the majority", 15)
        out = shoal(
            cluster, lead, "service", "create", "--name", "old-leader", "-d", "micro", check=False
        )
        assert out.returncode != 0 and "does not have a leader" in out.stderr, out.stderr
    finally:
        faults.heal(fresh(cluster))
    restore(cluster)
    for n in NODES:
        names = {s["Spec"]["Name"] for s in api(cluster, n).services()}
        assert "during-cut" in names and "cut-off" not in names and "old-leader" not in names
    shoal(cluster, "sw1", "service", "rm", "during-cut")


def test_every_manager_restarts_and_the_cluster_serves_again(cluster: Lab) -> None:
    restore(cluster)
    shoal(
        cluster,
        "sw1",
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--publish",
        "30700:8000",
        "micro",
    )
    before = {t["ID"] for t in api(cluster, "sw1").tasks(filters={"service": "web"})}
    lab = fresh(cluster)
    task_namespaces = [
        ns
        for n in NODES
        for ns in labmod.node_namespaces(lab, lab.node(n))
        if ns != lab.node(n).netns
    ]
    old_tasks = processes_in(task_namespaces)
    assert old_tasks
    for n in NODES:
        faults.kill(fresh(cluster), n)
    for n in NODES:
        faults.start(fresh(cluster), n)
    restore(cluster)

    def meshed() -> bool:
        try:
            return len(answers(None, cluster.node("sw2").address, 30700, 9)) == 3
        except OSError:
            return False

    wait(meshed, "the mesh to answer from all three tasks", 30)
    # the tasks the killed daemons left running were stopped, not left behind: each task runs
    # once, under the new shoald
    wait(lambda: not any(alive(pid) for pid in old_tasks), "the old task processes gone")
    svc = api(cluster, "sw3").inspect_service("web")
    assert svc["Spec"]["Mode"]["Replicated"]["Replicas"] == 3
    assert before <= {t["ID"] for t in api(cluster, "sw3").tasks(filters={"service": "web"})}
    shoal(cluster, "sw1", "service", "rm", "web")


def test_promote_and_demote(cluster: Lab) -> None:
    restore(cluster)
    lead = leader(cluster)
    assert lead is not None
    target = next(n for n in NODES if n != lead)
    out = shoal(cluster, lead, "node", "demote", target).stdout
    assert f"Node {target} demoted" in out
    wait(lambda: statuses(cluster, lead).get(target) == "", "the demoted node out of Raft")
    wait(lambda: api(cluster, target).info()["Swarm"]["ControlAvailable"] is False, "a worker")
    assert shoal(cluster, target, "node", "ls", check=False).returncode != 0
    shoal(cluster, lead, "node", "promote", target)
    wait(lambda: statuses(cluster, lead).get(target) == "Reachable", "promoted back", 30)
    assert api(cluster, target).info()["Swarm"]["ControlAvailable"] is True
    ls = json.loads(shoal(cluster, target, "node", "inspect", "self").stdout)[0]
    assert ls["ManagerStatus"]["Reachability"] == "reachable"
