"""Highly available managers in a lab: three shoald managers on Raft (README, "Highly
available managers"; docs/architecture.md, "Managers: Raft, leadership, failover").

Client threads write and read through every manager, recording a history, while the leader is
killed, while a minority and then the leader are cut off, and while every manager restarts.
After each, nothing acknowledged is lost: every manager holds, for each key, the last
acknowledged value or one written concurrently with it or with an unknown outcome
(`check_history`), and the history, those final reads included, is linearizable
(orchestrator/raft/linearizability.py). A killed leader is replaced within the README's 1-2 s
(`FAILOVER_LIMIT` says what margin the test allows on top, and why).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
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

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tha"
SUBNET = ipaddress.IPv4Network("192.168.73.0/24")
NODES = ("sw1", "sw2", "sw3")

# The README promises a new leader within 1-2 s of the leader's death: an election timeout,
# randomized over [1, 2) s (RaftSettings: ticks of 0.1 s, election_tick 10), plus a pre-vote
# and a vote round trip (milliseconds). The test measures more than the election: from the
# kill to the first write acknowledged among those the clients started after it, and the
# clients read before they write. A survivor that sent a read's ReadIndex to the dead leader
# before noticing it was dead retries only when that attempt gives up, after 1 s
# (RaftNode.read_barrier), so the first read-then-write can come up to 1 s after the election.
# And this lab runs three shoald and three Docker engines on the CI machine's few CPUs, while
# other lab modules may run: an event loop stalled for a while drops the ticks it missed
# (IntervalTicker), which lengthens the election timeout by the stall, and every request is
# slower; we allow 1 s of that. Hence 2 s + 1 s + 1 s. (Measured on a 2-CPU machine with other
# labs running: 1.1-2.3 s; bench/raft.py, whose writes do not read first, measures a median
# of 1.25 s, docs/benchmarks.md.)
FAILOVER_LIMIT = 2.0 + 1.0 + 1.0


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


def wait_leader(lab: Lab, within: float = 10) -> str:
    """The leader's hostname, once a manager names one (within `within` s)."""
    found: list[str] = []

    def named() -> bool:
        name = leader(lab)
        found[:] = [name] if name else []
        return bool(found)

    wait(named, "a manager to name the leader", within)
    return found[0]


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
    """Client threads putting and getting labels of service `reg` (`keys`, each test its own,
    so each history starts from nothing) through every manager, recording a history for the
    linearizability checker."""

    def __init__(self, lab: Lab, keys: Sequence[str]):
        self.lab = lab
        self.keys = tuple(keys)
        self.ops: list[Operation] = []
        self.acked: list[tuple[str, str]] = []  # (key, value) of each write acknowledged, in order
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
            key = rng.choice(self.keys)
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
            with self.lock:
                self.ops.append(Operation(client, t0, time.monotonic(), "put", key, value))
                self.acked.append((key, value))

    def acked_writes(self, since: float = 0.0) -> list[Operation]:
        """The acknowledged writes started at or after `since` (monotonic time)."""
        with self.lock:
            return [
                o for o in self.ops if o.kind == "put" and o.ret is not None and o.call >= since
            ]


def possible_finals(ops: list[Operation], key: str) -> set[str | None]:
    """What `key` may hold once every client has stopped: the value of an acknowledged write
    that no acknowledged write began after (the last acknowledged one, or one concurrent with
    it, which may have been applied after it), of a write whose outcome is unknown (it may have
    been applied last), or nothing if no write was acknowledged."""
    puts = [o for o in ops if o.kind == "put" and o.key == key]
    acked = [o for o in puts if o.ret is not None]
    out: set[str | None] = {o.value for o in puts if o.ret is None}
    for w in acked:
        assert w.ret is not None
        if not any(u.call > w.ret for u in acked):
            out.add(w.value)
    if not acked:
        out.add(None)
    return out


def check_history(lab: Lab, clients: Clients) -> None:
    """Once the clients have stopped and the cluster is whole again: every manager holds, for
    each key, a value `possible_finals` allows (in particular, if nothing was written after or
    alongside it, the last value `clients.acked` lists), the same on every manager; and the
    history with these final reads is linearizable."""
    ops = list(clients.ops)
    finals: dict[str, dict[str, str | None]] = {}
    for i, n in enumerate(NODES):
        t0 = time.monotonic()
        labels = api(lab, n).inspect_service("reg")["Spec"].get("Labels") or {}
        t1 = time.monotonic()
        finals[n] = {k: labels.get(k) for k in clients.keys}
        ops += [Operation(100 + i, t0, t1, "get", k, output=labels.get(k)) for k in clients.keys]
    last_acked = dict(clients.acked)  # each key's last acknowledged value
    for key in clients.keys:
        allowed = possible_finals(clients.ops, key)
        assert last_acked.get(key) in allowed  # the checker's own sanity
        for n in NODES:
            assert finals[n][key] in allowed, (
                f"{n} holds {key}={finals[n][key]!r}; the last acknowledged value is "
                f"{last_acked.get(key)!r}, and only {sorted(map(str, allowed))} may be there"
            )
    assert finals["sw1"] == finals["sw2"] == finals["sw3"], finals
    result = check(ops)
    assert result.ok, explain(result.ops)


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
    clients = Clients(cluster, ("a", "b"))
    clients.start()
    try:
        time.sleep(2)
        old = wait_leader(cluster)
        before = len(clients.acked_writes())
        # The leader died somewhere between these two instants (kill -9 of its shoald first,
        # then its engine): failover is counted from the first, over writes started after the
        # second, which only a new leader can acknowledge. So it is never under-measured.
        kill_started = time.monotonic()
        faults.kill(fresh(cluster), old)
        killed = time.monotonic()
        wait(lambda: bool(clients.acked_writes(since=killed)), "a write after the kill", 20)
        failover = min(o.ret for o in clients.acked_writes(since=killed) if o.ret) - kill_started
        time.sleep(1.5)  # writes go on through the new leader
        faults.start(fresh(cluster), old)  # it comes back from its disk
        time.sleep(2)
    finally:
        clients.finish()
    print(
        f"first write acknowledged {failover:.2f} s after kill -9 of the leader {old} "
        f"(the kill took {killed - kill_started:.2f} s)"
    )
    assert failover < FAILOVER_LIMIT, failover
    writes = clients.acked_writes()
    reads = [o for o in clients.ops if o.kind == "get"]
    assert before > 5 and len(writes) > before + 5 and len(reads) > 10
    restore(cluster)
    check_history(cluster, clients)


def test_a_cut_off_minority_refuses_writes_and_catches_up(cluster: Lab) -> None:
    restore(cluster)
    lead = leader(cluster)
    assert lead is not None
    follower = next(n for n in NODES if n != lead)
    clients = Clients(cluster, ("p", "q"))
    clients.start()
    try:
        time.sleep(1)
        faults.partition(fresh(cluster), [follower])
        try:
            shoal(cluster, lead, "service", "create", "--name", "during-cut", "-d", "micro")
            out = shoal(
                cluster,
                follower,
                "service",
                "create",
                "--name",
                "cut-off",
                "-d",
                "micro",
                check=False,
            )
            assert out.returncode != 0 and "does not have a leader" in out.stderr, out.stderr
            # now cut the leader off too: the remaining one cannot elect anyone alone
            faults.heal(fresh(cluster))
            faults.partition(fresh(cluster), [lead])
            others = [n for n in NODES if n != lead]
            wait(lambda: leader(cluster) in others, "a new leader among the majority", 15)
            cut_at = time.monotonic()
            out = shoal(
                cluster,
                lead,
                "service",
                "create",
                "--name",
                "old-leader",
                "-d",
                "micro",
                check=False,
            )
            assert out.returncode != 0 and "does not have a leader" in out.stderr, out.stderr
            # the majority goes on taking writes meanwhile
            wait(lambda: bool(clients.acked_writes(since=cut_at)), "writes to the majority")
        finally:
            faults.heal(fresh(cluster))
        time.sleep(2)  # and through the heal
    finally:
        clients.finish()
    restore(cluster)
    for n in NODES:
        names = {s["Spec"]["Name"] for s in api(cluster, n).services()}
        assert "during-cut" in names and "cut-off" not in names and "old-leader" not in names
    assert len(clients.acked_writes()) > 5
    check_history(cluster, clients)
    shoal(cluster, "sw1", "service", "rm", "during-cut")


def running_tasks(lab: Lab, node: str, service: str) -> list[dict[str, Any]]:
    """The service's tasks that run, and are meant to."""
    return [
        t
        for t in api(lab, node).tasks(filters={"service": service})
        if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
    ]


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
    wait(lambda: len(running_tasks(cluster, "sw1", "web")) == 3, "three tasks running")
    before = {t["ID"] for t in running_tasks(cluster, "sw1", "web")}
    lab = fresh(cluster)
    task_namespaces = [
        ns
        for n in NODES
        for ns in labmod.node_namespaces(lab, lab.node(n))
        if ns != lab.node(n).netns
    ]
    old_tasks = processes_in(task_namespaces)
    assert old_tasks
    clients = Clients(cluster, ("r", "s"))
    clients.start()
    try:
        time.sleep(1.5)
        acked_before = len(clients.acked_writes())
        for n in NODES:
            faults.kill(fresh(cluster), n)
        for n in NODES:
            faults.start(fresh(cluster), n)
        restore(cluster)
        restarted = time.monotonic()
        wait(lambda: len(clients.acked_writes(since=restarted)) > 2, "writes after the restart")
    finally:
        clients.finish()
    assert acked_before > 2
    # three tasks running again (each node's engine and shoald restart first, then the tasks
    # are run anew), one per slot, and no more meant to run: shut-down or failed tasks, which
    # the task list also shows, do not count
    wait(lambda: len(running_tasks(cluster, "sw3", "web")) == 3, "three tasks running again", 60)

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
    tasks = api(cluster, "sw3").tasks(filters={"service": "web"})
    running = running_tasks(cluster, "sw3", "web")
    assert sorted(t["Slot"] for t in running) == [1, 2, 3], running
    assert len([t for t in tasks if t["DesiredState"] == "running"]) == 3, tasks
    after = sorted(t["ID"] for t in running)
    print(f"tasks before the restart {sorted(before)}, running after {after}")
    check_history(cluster, clients)
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
