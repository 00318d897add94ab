"""A deterministic simulator: real Raft cores, a hostile network and disks, safety checks.

One `random.Random(seed)` drives everything, so a seed replays exactly:

    python -m orchestrator.raft.sim --seed 1234 [--nodes 5] [--trace]

The world is a priority queue of events in virtual milliseconds: node ticks (each node's clock
runs at its own rate), message deliveries (delayed, sometimes much later so they reorder, lost,
duplicated, dropped across partitions), fsyncs completing, client operations, and faults
(crashes, restarts, partitions symmetric or one-way, heals, leadership transfers, membership
changes). Each node runs the real `Raft` with a driver like the production one: it takes a
Ready, "writes" it, and only when the simulated fsync completes makes it durable, sends the
messages, applies the committed entries and calls `advance`. A crash loses whatever was not
synced yet (sometimes a torn prefix of the entries survives, as a partial write would).

After every event the checker verifies, on the node the event touched:

- election safety: at most one leader per term;
- log matching: two logs holding an entry with the same index and term hold the same entry,
  preceded by the same term;
- leader completeness: an elected leader holds every entry known committed before its term;
- state machine safety: every node applies the same entry at each index (and commit indexes
  never go down while a node lives).

Clients put, compare-and-set and read (ReadIndex, on leaders and via followers) a few keys; at the
end their history must be linearizable (`linearizability.check`), and after the faults stop
and the network heals, the cluster must elect a leader and commit again (liveness).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import random
import sys
from dataclasses import dataclass, field
from typing import Any

from orchestrator.raft import linearizability
from orchestrator.raft.core import Config, NotLeader, ProposalDropped, Raft, StateRole, bootstrap
from orchestrator.raft.messages import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    Message,
    Ready,
    StorageState,
)
from orchestrator.raft.storage import MemoryStorage


class SafetyViolation(AssertionError):
    pass


@dataclass
class SimConfig:
    seed: int
    nodes: int = 3
    duration: int = 1500  # virtual ms of faults and load
    settle: int = 3000  # virtual ms allowed, after healing, to elect and commit again
    tick_ms: int = 10
    election_tick: int = 10
    heartbeat_tick: int = 2
    clients: int = 3
    keys: tuple[str, ...] = ("x", "y")
    op_timeout: int = 400
    membership: bool = False  # start with 3 voters, add/promote/remove the others
    trace: bool = False
    # Drawn from the seed when None, so seeds cover gentle and hostile worlds alike.
    loss: float | None = None
    dup: float | None = None
    fault_every: int | None = None  # mean virtual ms between faults
    compact_every: int | None = None


@dataclass
class _ClientOp:
    client: int
    kind: str
    key: str
    value: str | None
    expected: str | None
    call: int
    node: int
    index: int = 0  # writes: where it was proposed
    term: int = 0
    ctx: bytes = b""  # reads
    read_index: int = -1  # reads: the ReadState's index, once known


@dataclass
class _Node:
    id: int
    storage: MemoryStorage
    raft: Raft | None = None
    pending: Ready | None = None  # written, fsync not yet completed
    sm: dict[str, str] = field(default_factory=dict)
    rate: float = 1.0  # clock rate
    lives: int = 0
    max_commit: int = 0  # within this life
    was_leader: bool = False
    # How much of the log the checker has seen already: (offset, length, last entry).
    checked: tuple[int, int, Entry | None] = (0, 0, None)


# (time, sequence number, kind, node, message, life): tuples, as they compare fast.
_Event = tuple[int, int, str, int, Message | None, int]


def _encode(op: _ClientOp) -> bytes:
    return json.dumps([op.client, op.kind, op.key, op.value, op.expected]).encode()


class Simulation:
    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        r = self.rng
        self.loss = cfg.loss if cfg.loss is not None else r.choice([0.0, 0.01, 0.05, 0.15])
        self.dup = cfg.dup if cfg.dup is not None else r.choice([0.0, 0.02, 0.1])
        self.fault_every = cfg.fault_every or r.choice([150, 300, 600])
        self.compact_every = cfg.compact_every or r.choice([8, 25, 1000])
        self.max_delay = r.choice([2, 5, 15])
        # Without check-quorum a cut-off leader keeps believing it leads, which is what makes
        # stale reads possible if ReadIndex were wrong; without pre-vote terms inflate.
        self.check_quorum = r.random() < 0.7
        self.pre_vote = r.random() < 0.7
        self.now = 0
        self.seq = itertools.count()
        self.events: list[_Event] = []
        self.blocked: set[tuple[int, int]] = set()
        self.faults_on = True
        ids = list(range(1, cfg.nodes + 1))
        voters = ids[:3] if cfg.membership else ids
        boot = bootstrap(voters)
        self.nodes: dict[int, _Node] = {}
        for i in ids:
            st = boot if i in voters else StorageState()
            node = _Node(i, MemoryStorage(st), rate=r.uniform(0.8, 1.25))
            self.nodes[i] = node
            self._start(node)
        # Checker state.
        self.leader_of_term: dict[int, int] = {}
        self.entries_seen: dict[tuple[int, int], tuple[Entry, int | None]] = {}
        self.committed: dict[int, tuple[Entry, int]] = {}  # index -> (entry, term observed)
        self.applied: dict[int, Entry] = {}
        # Clients.
        self.history: list[linearizability.Operation] = []
        self.client_ops: dict[int, _ClientOp | None] = {c: None for c in range(cfg.clients)}
        self.op_counter = itertools.count(1)
        self.pending_writes: dict[tuple[int, int], _ClientOp] = {}  # (node, index)
        self.pending_reads: dict[bytes, _ClientOp] = {}
        self.steps = 0
        for c in range(cfg.clients):
            self._schedule(r.randint(0, 50), "client", node=c)
        self._schedule(self._fault_delay(), "fault")

    # ------------------------------------------------------------------ plumbing

    def _schedule(
        self, delay: int, kind: str, node: int = 0, msg: Message | None = None, life: int = 0
    ) -> None:
        heapq.heappush(self.events, (self.now + delay, next(self.seq), kind, node, msg, life))

    def _fault_delay(self) -> int:
        return int(self.rng.expovariate(1 / self.fault_every)) + 1

    def _log(self, text: str) -> None:
        if self.cfg.trace:
            print(f"{self.now:6d} {text}", file=sys.stderr)

    def _fail(self, what: str) -> None:
        raise SafetyViolation(f"seed {self.cfg.seed}, t={self.now}, step {self.steps}: {what}")

    def _start(self, node: _Node) -> None:
        node.lives += 1
        state = node.storage.initial_state()
        rc = Config(
            node.id,
            election_tick=self.cfg.election_tick,
            heartbeat_tick=self.cfg.heartbeat_tick,
            max_size_per_msg=self.rng.choice([64, 4096]),
            max_inflight_msgs=self.rng.choice([1, 4, 64]),
            check_quorum=self.check_quorum,
            pre_vote=self.pre_vote,
        )
        node.raft = Raft(rc, random.Random(self.rng.getrandbits(64)), state)
        node.sm = json.loads(state.snapshot.data) if state.snapshot.data else {}
        node.pending = None
        node.max_commit = node.raft.committed
        node.was_leader = False
        tick = int(self.cfg.tick_ms * node.rate)
        self._schedule(self.rng.randint(1, tick), "tick", node.id, life=node.lives)

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        end = self.cfg.duration
        while self.events and self.events[0][0] <= end:
            self._step_event()
        self._heal_all()
        deadline = end + self.cfg.settle
        marker = self._liveness_probe(deadline)
        if marker is None:
            self._fail("liveness: no leader committed a new entry after healing")
        for c, op in self.client_ops.items():
            if op is not None:
                self._finish_unknown(c)
        result = linearizability.check(self.history)
        if not result.ok:
            lines = "\n  ".join(str(o) for o in sorted(result.ops, key=lambda o: o.call))
            self._fail(f"history on key {result.key!r} is not linearizable:\n  {lines}")

    def _step_event(self) -> None:
        self.now, _, kind, ev_node, ev_msg, ev_life = heapq.heappop(self.events)
        self.steps += 1
        touched: _Node | None = None
        if kind == "tick":
            node = self.nodes[ev_node]
            if node.raft is None or ev_life != node.lives:
                return  # a tick from before a crash
            node.raft.tick()
            self._schedule(int(self.cfg.tick_ms * node.rate), "tick", node.id, life=node.lives)
            touched = node
        elif kind == "deliver":
            assert ev_msg is not None
            m = ev_msg
            node = self.nodes[m.to]
            if node.raft is None or (m.frm, m.to) in self.blocked:
                return
            self._log(f"{m.frm}->{m.to} {m.type.value} t{m.term} i{m.index} n{len(m.entries)}")
            node.raft.step(m)
            touched = node
        elif kind == "sync":
            node = self.nodes[ev_node]
            if node.raft is None or ev_life != node.lives:
                return
            self._sync(node)
            touched = node
        elif kind == "client":
            self._client_issue(ev_node)
        elif kind == "timeout":
            op = self.client_ops.get(ev_node)
            if op is not None and op.call == ev_life:
                self._finish_unknown(ev_node)
        elif kind == "fault":
            if self.faults_on:
                self._fault()
                self._schedule(self._fault_delay(), "fault")
            return
        if touched is not None and touched.raft is not None:
            self._pump(touched)
            self._check(touched)

    def _pump(self, node: _Node) -> None:
        raft = node.raft
        assert raft is not None
        if node.pending is None and raft.has_ready():
            node.pending = raft.ready()
            self._schedule(self.rng.choice([0, 0, 1, 3]), "sync", node.id, life=node.lives)

    def _sync(self, node: _Node) -> None:
        rd, raft = node.pending, node.raft
        assert rd is not None and raft is not None
        node.pending = None
        node.storage.save_ready(rd)
        for m in rd.messages:
            self._send(m)
        if rd.snapshot is not None:
            node.sm = json.loads(rd.snapshot.data) if rd.snapshot.data else {}
        for e in rd.committed_entries:
            self._apply(node, e)
        for rs in rd.read_states:
            op = self.pending_reads.get(rs.context)
            if op is not None and op.node == node.id:
                op.read_index = rs.index
        raft.advance(rd)
        self._serve_reads(node)
        if raft.applied - raft.log.snapshot.meta.index >= self.compact_every:
            data = json.dumps(node.sm, sort_keys=True).encode()
            snap = raft.compact(raft.applied, data, keep=self.rng.choice([0, 2, 10]))
            node.storage.compact(snap)

    def _send(self, m: Message) -> None:
        r = self.rng
        if (m.frm, m.to) in self.blocked or r.random() < self.loss:
            return
        copies = 2 if r.random() < self.dup else 1
        for _ in range(copies):
            if r.random() < 0.05:
                delay = r.randint(self.max_delay, 20 * self.max_delay + 50)  # overtaken
            else:
                delay = r.randint(1, self.max_delay)
            self._schedule(delay, "deliver", msg=m)

    # ------------------------------------------------------------------ the state machine

    def _apply(self, node: _Node, e: Entry) -> None:
        known = self.applied.get(e.index)
        if known is None:
            self.applied[e.index] = e
        elif known != e:
            self._fail(f"node {node.id} applied {e} at {e.index}, another node applied {known}")
        result: object = None
        if e.type is EntryType.NORMAL and e.data:
            _client, kind, key, value, expected = json.loads(e.data)
            if kind == "put":
                node.sm[key] = value
            elif kind == "cas":
                result = node.sm.get(key) == expected
                if result:
                    node.sm[key] = value
        op = self.pending_writes.pop((node.id, e.index), None)
        if op is not None:
            if e.term == op.term:
                self._finish(op, result)
            else:
                self._finish_failed(op)  # our entry was overwritten: it never happened

    def _serve_reads(self, node: _Node) -> None:
        raft = node.raft
        assert raft is not None
        for ctx, op in list(self.pending_reads.items()):
            if op.node == node.id and 0 <= op.read_index <= raft.applied:
                del self.pending_reads[ctx]
                self._finish(op, node.sm.get(op.key))

    # ------------------------------------------------------------------ clients

    def _client_issue(self, c: int) -> None:
        if not self.faults_on:
            return
        r = self.rng
        n = next(self.op_counter)
        kind = r.choices(["get", "put", "cas"], [5, 3, 2])[0]
        key = r.choice(self.cfg.keys)
        value = f"v{n}" if kind != "get" else None
        expected = None
        if kind == "cas":
            expected = r.choice([None, *[f"v{k}" for k in range(max(1, n - 6), n)]])
        up = [x for x in self.nodes.values() if x.raft is not None]
        target = r.choice(up) if up else None
        if target is not None and kind != "get" and target.raft is not None:
            lead = self.nodes.get(target.raft.lead)
            if lead is not None and lead.raft is not None:
                target = lead  # the client follows the redirect
        op = _ClientOp(c, kind, key, value, expected, self.steps, target.id if target else 0)
        self.client_ops[c] = op
        self._schedule(self.cfg.op_timeout, "timeout", node=c, life=op.call)
        if target is None or target.raft is None:
            self._finish_failed(op)
            return
        raft = target.raft
        try:
            if kind == "get":
                op.ctx = f"r{n}".encode()
                self.pending_reads[op.ctx] = op
                raft.read_index(op.ctx)
            else:
                op.term = raft.term
                op.index = raft.propose(_encode(op))
                self.pending_writes[(target.id, op.index)] = op
        except (NotLeader, ProposalDropped):
            self.pending_reads.pop(op.ctx, None)
            self._finish_failed(op)
            return
        self._pump(target)
        self._check(target)

    def _next_op(self, c: int) -> None:
        self.client_ops[c] = None
        self._schedule(self.rng.randint(1, 30), "client", node=c)

    def _finish(self, op: _ClientOp, output: object) -> None:
        if self.client_ops.get(op.client) is not op:
            return
        self.history.append(
            linearizability.Operation(
                op.client, op.call, self.steps, op.kind, op.key, op.value, op.expected, output
            )
        )
        self._next_op(op.client)

    def _finish_failed(self, op: _ClientOp) -> None:
        """Definitely did not happen: leave it out of the history."""
        if self.client_ops.get(op.client) is op:
            self._next_op(op.client)

    def _finish_unknown(self, c: int) -> None:
        op = self.client_ops[c]
        assert op is not None
        self.pending_reads.pop(op.ctx, None)
        self.pending_writes.pop((op.node, op.index), None)
        if op.kind != "get":  # a write may still take effect, at any time
            self.history.append(
                linearizability.Operation(
                    c, op.call, None, op.kind, op.key, op.value, op.expected, None
                )
            )
        self._next_op(c)

    # ------------------------------------------------------------------ faults

    def _fault(self) -> None:
        r = self.rng
        up = [n for n in self.nodes.values() if n.raft is not None]
        down = [n for n in self.nodes.values() if n.raft is None]
        kinds = ["crash", "restart", "partition", "heal", "transfer"]
        weights = [3, 4 if down else 0, 2, 2 if self.blocked else 0, 1]
        if self.cfg.membership:
            kinds.append("membership")
            weights.append(3)
        kind = r.choices(kinds, weights)[0]
        if kind == "crash" and up:
            self._crash(r.choice(up))
        elif kind == "restart" and down:
            node = r.choice(down)
            self._log(f"restart {node.id}")
            self._start(node)
        elif kind == "partition":
            ids = list(self.nodes)
            side = set(r.sample(ids, r.randint(1, len(ids) // 2)))
            one_way = r.random() < 0.3
            self._log(f"partition {sorted(side)}{' one-way' if one_way else ''}")
            for a in side:
                for b in ids:
                    if b not in side:
                        self.blocked.add((a, b))
                        if not one_way:
                            self.blocked.add((b, a))
        elif kind == "heal":
            self._log("heal")
            self.blocked.clear()
        elif kind == "transfer":
            leader = self._leader()
            if leader is not None and leader.raft is not None:
                voters = sorted(leader.raft.conf.voters - {leader.id})
                if voters:
                    target = r.choice(voters)
                    self._log(f"transfer {leader.id} -> {target}")
                    with contextlib.suppress(NotLeader, ProposalDropped):
                        leader.raft.transfer_leadership(target)
                    self._pump(leader)
        elif kind == "membership":
            self._membership_change()

    def _crash(self, node: _Node) -> None:
        self._log(f"crash {node.id}")
        rd = node.pending
        if rd is not None and rd.snapshot is None and rd.entries and self.rng.random() < 0.5:
            # A torn write: some of the entries reached the disk, nothing after them did.
            keep = self.rng.randint(0, len(rd.entries))
            node.storage.save(None, rd.entries[:keep])
        node.raft = None
        node.pending = None
        for ctx, op in list(self.pending_reads.items()):
            if op.node == node.id:
                del self.pending_reads[ctx]  # the client will time out
        for key, op in list(self.pending_writes.items()):
            if op.node == node.id:
                del self.pending_writes[key]  # outcome unknown: the client will time out

    def _leader(self) -> _Node | None:
        best: _Node | None = None
        for n in self.nodes.values():
            if (
                n.raft is not None
                and n.raft.is_leader
                and (best is None or (best.raft is not None and n.raft.term > best.raft.term))
            ):
                best = n
        return best

    def _membership_change(self) -> None:
        leader = self._leader()
        if leader is None or leader.raft is None:
            return
        raft = leader.raft
        cs = raft.conf
        r = self.rng
        options: list[ConfChange] = []
        for n in self.nodes:
            if n not in cs.members():
                options.append(ConfChange(ConfChangeType.ADD_LEARNER, n))
            elif n in cs.learners:
                options.append(ConfChange(ConfChangeType.ADD_NODE, n))
                options.append(ConfChange(ConfChangeType.REMOVE_NODE, n))
            elif len(cs.voters) > 3:
                options.append(ConfChange(ConfChangeType.REMOVE_NODE, n))
        if not options:
            return
        cc = r.choice(options)
        self._log(f"conf change at {leader.id}: {cc.type.value} {cc.node_id}")
        try:
            raft.propose_conf_change(cc)
        except (NotLeader, ProposalDropped):
            return
        self._pump(leader)

    def _heal_all(self) -> None:
        self.faults_on = False
        self.blocked.clear()
        self.loss = 0.0
        for node in self.nodes.values():
            if node.raft is None:
                self._start(node)

    def _liveness_probe(self, deadline: int) -> int | None:
        """Once healed: some leader commits a fresh entry, and every voter applies it."""
        proposed: tuple[int, int, int] | None = None  # (node, index, term)
        while self.events and self.now <= deadline:
            self._step_event()
            leader = self._leader()
            if leader is None or leader.raft is None:
                continue
            raft = leader.raft
            if proposed is None or proposed[0] != leader.id or proposed[2] != raft.term:
                try:
                    proposed = (leader.id, raft.propose(b""), raft.term)
                except ProposalDropped:
                    continue
                self._pump(leader)
                continue
            index = proposed[1]
            if all(
                (n := self.nodes[v].raft) is not None and n.applied >= index
                for v in raft.conf.voters
            ):
                return index
        return None

    # ------------------------------------------------------------------ invariants

    def _check(self, node: _Node) -> None:
        raft = node.raft
        assert raft is not None
        log = raft.log
        # Election safety.
        if raft.role is StateRole.LEADER:
            holder = self.leader_of_term.setdefault(raft.term, node.id)
            if holder != node.id:
                self._fail(f"two leaders in term {raft.term}: {holder} and {node.id}")
        # Log matching.
        ents = log.entries
        off, n, last = node.checked
        start = n if off == log.offset and 0 < n <= len(ents) and ents[n - 1] is last else 0
        prev_term: int | None = ents[start - 1].term if start else log.offset_term
        for k in range(start, len(ents)):
            e = ents[k]
            key = (e.index, e.term)
            seen = self.entries_seen.get(key)
            if seen is None:
                self.entries_seen[key] = (e, prev_term)
            elif seen[0] is not e and (
                seen[0] != e or (seen[1] is not None and prev_term != seen[1])
            ):
                self._fail(
                    f"log matching: node {node.id} has {e} after term {prev_term}; "
                    f"another log has {seen[0]} after term {seen[1]}"
                )
            prev_term = e.term
        node.checked = (log.offset, len(ents), ents[-1] if ents else None)
        # Commit indexes only go up while a node lives; what is committed never changes.
        if raft.committed < node.max_commit:
            self._fail(f"node {node.id} commit went from {node.max_commit} to {raft.committed}")
        if raft.committed > log.last_index() or raft.applied > raft.committed:
            self._fail(f"node {node.id}: applied/commit/last {raft.applied}/{raft.committed}")
        for i in range(max(node.max_commit, log.offset) + 1, raft.committed + 1):
            e = log.entry(i)
            known = self.committed.get(i)
            if known is None:
                self.committed[i] = (e, raft.term)
                self._check_leaders_hold(i)
            elif known[0] != e:
                self._fail(f"node {node.id} committed {e} at {i}; {known[0]} was committed")
        node.max_commit = raft.committed
        # Leader completeness, when a node becomes leader.
        if raft.is_leader and not node.was_leader:
            for i, (e, observed) in self.committed.items():
                if observed < raft.term and i > log.offset and log.term(i) != e.term:
                    self._fail(
                        f"leader {node.id} of term {raft.term} lacks committed {e} "
                        f"(committed by term {observed})"
                    )
        node.was_leader = raft.is_leader

    def _check_leaders_hold(self, index: int) -> None:
        e, observed = self.committed[index]
        for n in self.nodes.values():
            r = n.raft
            if (
                r is not None
                and r.is_leader
                and r.term > observed
                and index > r.log.offset
                and r.log.term(index) != e.term
            ):
                self._fail(f"leader {n.id} of term {r.term} lacks committed {e}")


def run(cfg: SimConfig) -> dict[str, Any]:
    """Run one schedule; raises SafetyViolation. Returns a few statistics."""
    sim = Simulation(cfg)
    sim.run()
    return {
        "steps": sim.steps,
        "ops": len(sim.history),
        "terms": len(sim.leader_of_term),
        "committed": len(sim.committed),
    }


def replay_command(seed: int, nodes: int, membership: bool) -> str:
    extra = " --membership" if membership else ""
    return f"python -m orchestrator.raft.sim --seed {seed} --nodes {nodes}{extra} --trace"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Replay one simulated Raft schedule.")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--membership", action="store_true")
    p.add_argument("--trace", action="store_true")
    a = p.parse_args(argv)
    cfg = SimConfig(a.seed, nodes=a.nodes, membership=a.membership, trace=a.trace)
    try:
        stats = run(cfg)
    except SafetyViolation as e:
        print(f"FAILED: {e}")
        return 1
    print(f"ok: {stats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
