"""The Raft state machine, sans I/O: messages and ticks in, a Ready of work out.

Built the way etcd-io/raft is (and described in docs of this package's __init__): the core never
touches a socket, a clock, a disk, a thread or global randomness. A driver feeds it

- `step(msg)` for every message received from a peer,
- `tick()` at a fixed interval (election and heartbeat timeouts are counted in ticks),
- `propose(data)`, `propose_conf_change(cc)`, `read_index(ctx)`, `transfer_leadership(id)`,

and repeatedly takes `ready()`: entries and hard state to persist, then messages to send, then
committed entries to apply, then acknowledges with `advance(ready)`. Between `ready()` and
`advance()` the driver may keep stepping and ticking (say while an fsync runs); only one Ready
is outstanding at a time.

Deliberate choices, all from the Raft thesis or etcd-raft:

- The leader counts its own log toward a commit only once the driver has persisted it
  (`advance`), so "committed" always means durable on a quorum.
- A leader commits by counting replicas only entries of its own term (§5.4.2, figure 8), and
  appends an empty entry when elected so that it can.
- Membership: one change at a time, a node uses the latest configuration in its log (committed
  or not; truncation rolls it back), and a leader proposes a change only once an entry of its
  term is committed and no other change is uncommitted (the thesis' single-server rule with the
  2015 fix). Learners get the log but neither vote nor count toward quorums.
- Pre-vote (§9.6) and check-quorum with leader stickiness (§4.2.3, §6.2).
- ReadIndex (§6.4): a read is served at the commit index once a heartbeat round confirmed the
  leader still leads.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from orchestrator.raft.log import LogError, RaftLog
from orchestrator.raft.messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Snapshot,
    SnapshotMeta,
    StorageState,
)
from orchestrator.raft.progress import Inflights, Progress, ProgressState

CAMPAIGN_TRANSFER = b"transfer"  # a vote request's context when a leader hands over


class StateRole(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class NotLeader(RuntimeError):
    """This node cannot take the request; `leader` is who can (NONE if unknown).

    The only such exception: the Raft node (node.py, and its NoQuorum) raises it too, the
    store's interface exports it (orchestrator/store/log.py) and the API answers it with 503."""

    def __init__(self, message: str, leader: int = NONE):
        super().__init__(message)
        self.leader = leader


class ProposalDropped(RuntimeError):
    """The leader refused the proposal (transfer in progress, a membership rule, ...)."""


@dataclass(frozen=True)
class Config:
    id: int
    election_tick: int = 10  # followers campaign after [election_tick, 2*election_tick) ticks
    heartbeat_tick: int = 1
    max_size_per_msg: int = 1 << 20  # bytes of entries in one append (at least one entry)
    max_inflight_msgs: int = 256  # appends in flight per follower in REPLICATE state
    max_inflight_bytes: int = 0  # bytes in flight per follower (0: no limit)
    pre_vote: bool = True
    check_quorum: bool = True
    snapshot_retry_ticks: int = 0  # resend an unacknowledged snapshot after this (0: 3 ETs)

    def __post_init__(self) -> None:
        if self.id == NONE:
            raise ValueError("node id 0 is reserved")
        if self.heartbeat_tick <= 0 or self.election_tick <= self.heartbeat_tick:
            raise ValueError("need 0 < heartbeat_tick < election_tick")
        if self.max_inflight_msgs <= 0:
            raise ValueError("max_inflight_msgs must be positive")


class _VoteResult(enum.Enum):
    PENDING = 0
    WON = 1
    LOST = 2


@dataclass
class _ReadIndexStatus:
    request: Message
    index: int
    acks: set[int] = field(default_factory=set)


def bootstrap(voters: list[int] | set[int] | frozenset[int]) -> StorageState:
    """The initial storage of every founding member of a new cluster.

    The membership is written as committed conf-change entries (term 1), so a node that joins
    later learns it from the log like everyone else.
    """
    entries = tuple(
        Entry(1, i, ConfChange(ConfChangeType.ADD_NODE, v).encode(), EntryType.CONF_CHANGE)
        for i, v in enumerate(sorted(voters), start=1)
    )
    return StorageState(HardState(term=1, commit=len(entries)), Snapshot(), entries)


def initial_state(voters: list[int] | set[int] | frozenset[int]) -> StorageState:
    """An empty log whose membership is `voters` (for tests: no bootstrap entries)."""
    return StorageState(snapshot=Snapshot(SnapshotMeta(conf_state=ConfState(frozenset(voters)))))


class Raft:
    def __init__(
        self,
        config: Config,
        rng: random.Random,
        state: StorageState | None = None,
        applied: int = 0,
    ):
        """Start (or restart) from what storage recovered; `applied` is what the state machine
        already holds beyond the snapshot (0 if it is rebuilt from the snapshot)."""
        state = state if state is not None else StorageState()
        self.cfg = config
        self.id = config.id
        self._rng = rng
        hs = state.hard_state
        self.term = hs.term
        self.vote = hs.vote
        self.lead = NONE
        self.role = StateRole.FOLLOWER
        self.log = RaftLog.recover(state.snapshot, list(state.entries), hs.commit, applied)
        self._conf_base = state.snapshot.meta.conf_state
        self._conf_history: list[tuple[int, ConfState]] = []
        for e in state.entries:
            if e.type is EntryType.CONF_CHANGE:
                self._conf_history.append((e.index, ConfChange.decode(e.data).apply(self.conf)))
        self.prs: dict[int, Progress] = {}
        self._votes: dict[int, bool] = {}
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._read_pending: dict[bytes, _ReadIndexStatus] = {}
        self._read_queue: list[bytes] = []
        self._reads_waiting_commit: list[Message] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self.lead_transferee = NONE
        self._prev_hs = HardState(self.term, self.vote, self.log.committed)
        self._outstanding: Ready | None = None
        self._bcast_entries = False
        self._bcast_commit = False
        self._become_follower(self.term, NONE)

    # ---------------------------------------------------------------- introspection

    @property
    def conf(self) -> ConfState:
        """The membership in effect: the latest in the log, committed or not."""
        return self._conf_history[-1][1] if self._conf_history else self._conf_base

    def conf_at(self, index: int) -> ConfState:
        cs = self._conf_base
        for i, c in self._conf_history:
            if i > index:
                break
            cs = c
        return cs

    @property
    def is_leader(self) -> bool:
        return self.role is StateRole.LEADER

    @property
    def committed(self) -> int:
        return self.log.committed

    @property
    def applied(self) -> int:
        return self.log.applied

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def promotable(self) -> bool:
        return self.id in self.conf.voters and self.log.pending_snapshot is None

    # ---------------------------------------------------------------- inputs

    def tick(self) -> None:
        if self.role is StateRole.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (as if the election timeout had elapsed)."""
        self._hup(transfer=False)

    def propose(self, data: bytes) -> int:
        """Append `data` to the log; returns its index (it is committed when it is applied
        at that index with this term). Raises NotLeader or ProposalDropped."""
        self._check_can_propose()
        e = Entry(self.term, self.log.last_index() + 1, data)
        self._append([e])
        self._bcast_entries = True
        return e.index

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Propose one membership change (ADD_LEARNER, then ADD_NODE to promote; REMOVE_NODE)."""
        self._check_can_propose()
        if self.log.term(self.log.committed) != self.term:
            raise ProposalDropped("no entry of this leader's term is committed yet")
        if self._conf_history and self._conf_history[-1][0] > self.log.committed:
            raise ProposalDropped("another membership change is not yet committed")
        cs = self.conf
        n = cc.node_id
        if n == NONE:
            raise ProposalDropped("node id 0 is reserved")
        if cc.type is ConfChangeType.ADD_NODE and n in cs.voters:
            raise ProposalDropped(f"node {n} is already a voter")
        if cc.type is ConfChangeType.ADD_LEARNER and n in cs.members():
            raise ProposalDropped(f"node {n} is already a member")
        if cc.type is ConfChangeType.REMOVE_NODE:
            if n not in cs.members():
                raise ProposalDropped(f"node {n} is not a member")
            if cs.voters == {n}:
                raise ProposalDropped("cannot remove the last voter")
        e = Entry(self.term, self.log.last_index() + 1, cc.encode(), EntryType.CONF_CHANGE)
        self._append([e])
        self._bcast_entries = True
        return e.index

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read; a ReadState with this (unique) context comes back in a
        later Ready, and the read may be served once that index is applied."""
        m = Message(MessageType.READ_INDEX, self.id, self.id, self.term, context=context)
        if self.role is StateRole.LEADER:
            self._handle_read_index(m)
        elif self.lead == NONE:
            raise NotLeader("no leader known", NONE)
        else:
            self._send(MessageType.READ_INDEX, self.lead, context=context)

    def transfer_leadership(self, target: int) -> None:
        if self.role is not StateRole.LEADER:
            raise NotLeader("only the leader can transfer leadership", self.lead)
        if target == self.id or target not in self.conf.voters:
            raise ProposalDropped(f"cannot transfer leadership to {target}")
        if self.lead_transferee == target:
            return
        self.lead_transferee = target
        self.election_elapsed = 0  # the transfer is abandoned after an election timeout
        pr = self.prs[target]
        if pr.match == self.log.last_index():
            self._send(MessageType.TIMEOUT_NOW, target)
        else:
            self._maybe_send_append(target)

    def report_unreachable(self, node: int) -> None:
        """The transport failed to deliver to `node`: stop pipelining to it."""
        pr = self.prs.get(node)
        if self.role is StateRole.LEADER and pr and pr.state is ProgressState.REPLICATE:
            pr.become_probe()

    def report_snapshot(self, node: int, ok: bool) -> None:
        """The transport finished sending a snapshot to `node` (or failed to)."""
        pr = self.prs.get(node)
        if self.role is not StateRole.LEADER or pr is None:
            return
        if pr.state is ProgressState.SNAPSHOT:
            if not ok:
                pr.pending_snapshot = 0
            pr.become_probe()
            pr.paused = True  # wait for a heartbeat response before probing

    def compact(self, index: int, data: bytes, keep: int = 0) -> Snapshot:
        """The state machine's `data` as of applied `index` becomes the snapshot; entries up
        to it (but the last `keep`) are dropped. The driver persists the returned snapshot."""
        term = self.log.term(index)
        if term is None:
            raise LogError(f"cannot snapshot at {index}: not in the log")
        snap = Snapshot(SnapshotMeta(index, term, self.conf_at(index)), data)
        self.log.compact(snap, keep)
        self._conf_base = snap.meta.conf_state
        self._conf_history = [(i, c) for i, c in self._conf_history if i > index]
        return snap

    def step(self, m: Message) -> None:
        if m.to != self.id:
            return
        if m.term > self.term:
            if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self.cfg.check_quorum
                    and self.lead != NONE
                    and self.election_elapsed < self.cfg.election_tick
                )
                if not force and in_lease:
                    return  # we heard from a leader recently: don't let it be deposed
            if m.type is MessageType.PRE_VOTE or (
                m.type is MessageType.PRE_VOTE_RESP and not m.reject
            ):
                pass  # pre-votes change nobody's term
            elif m.type in (MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (
                MessageType.HEARTBEAT,
                MessageType.APP,
            ):
                # A stale leader (cut off, then back): our term makes it step down. Without
                # this, with pre-vote, it could keep us from ever electing anyone else.
                self._send(MessageType.APP_RESP, m.frm)
            elif m.type is MessageType.PRE_VOTE:
                self._send(MessageType.PRE_VOTE_RESP, m.frm, reject=True)
            return

        if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role is StateRole.LEADER:
            self._step_leader(m)
        elif self.role is StateRole.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # ---------------------------------------------------------------- outputs

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        self._flush_appends()
        return bool(
            self._msgs
            or self.log.stabled < self.log.last_index()
            or self.log.pending_snapshot is not None
            or self.hard_state() != self._prev_hs
            or self.log.applied < self.log.committed
            or self._read_states
        )

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RuntimeError("advance() the previous Ready first")
        self._flush_appends()
        snap = self.log.pending_snapshot
        start = max(self.log.applied, snap.meta.index if snap else 0) + 1
        committed = (
            self.log.slice(start, self.log.committed + 1) if start <= self.log.committed else []
        )
        hs = self.hard_state()
        rd = Ready(
            messages=self._msgs,
            entries=self.log.unstable_entries(),
            hard_state=hs if hs != self._prev_hs else None,
            snapshot=snap,
            committed_entries=committed,
            read_states=self._read_states,
        )
        self._msgs = []
        self._read_states = []
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied everything in `rd`."""
        if rd is not self._outstanding:
            raise RuntimeError("advance() takes the Ready last returned by ready()")
        self._outstanding = None
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        if rd.snapshot is not None:
            if self.log.pending_snapshot is rd.snapshot:
                self.log.pending_snapshot = None
            self.log.applied = max(self.log.applied, rd.snapshot.meta.index)
        # The last written entry still in the log with its term: everything up to it is what
        # we wrote (log matching), even if the log was cut and re-extended in between.
        for e in reversed(rd.entries):
            if self.log.match_term(e.index, e.term):
                self.log.stabled = max(self.log.stabled, e.index)
                break
        if rd.committed_entries:
            self.log.applied = max(self.log.applied, rd.committed_entries[-1].index)
        if self.role is StateRole.LEADER:
            pr = self.prs.get(self.id)
            if pr is not None and pr.maybe_update(self.log.stabled):
                self._after_ack()

    # ---------------------------------------------------------------- roles

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.cfg.election_tick + self._rng.randrange(
            self.cfg.election_tick
        )
        self.lead_transferee = NONE
        self._votes = {}
        self._read_pending = {}
        self._read_queue = []
        self._reads_waiting_commit = []
        self.prs = {}
        self._bcast_entries = self._bcast_commit = False

    def _become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.lead = lead
        self.role = StateRole.FOLLOWER

    def _become_pre_candidate(self) -> None:
        # Not a reset: the term and vote stay, only the campaign state starts over.
        self._votes = {}
        self.lead = NONE
        self.role = StateRole.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = StateRole.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.lead = self.id
        self.role = StateRole.LEADER
        self._sync_progress()
        # An entry of our own term, so that everything before it can commit (§5.4.2, §8).
        self._append([Entry(self.term, self.log.last_index() + 1)])
        self._bcast_entries = True

    def _new_progress(self, node: int) -> Progress:
        pr = Progress(
            match=0,
            next=self.log.last_index() + 1,
            inflights=Inflights(self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes),
            is_learner=node not in self.conf.voters,
        )
        if node == self.id:
            pr.match = self.log.stabled
        return pr

    def _sync_progress(self) -> None:
        """Leader: one Progress per member (the membership may just have changed)."""
        members = self.conf.members()
        for node in list(self.prs):
            if node not in members:
                del self.prs[node]
        for node in sorted(members):
            if node not in self.prs:
                self.prs[node] = self._new_progress(node)
                self._bcast_entries = True
            self.prs[node].is_learner = node not in self.conf.voters
        if self.lead_transferee and self.lead_transferee not in self.conf.voters:
            self.lead_transferee = NONE

    # ---------------------------------------------------------------- elections

    def _hup(self, transfer: bool) -> None:
        if self.role is StateRole.LEADER or not self.promotable():
            return
        if self.cfg.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            vote_type, term = MessageType.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            vote_type, term = MessageType.VOTE, self.term
        self._votes[self.id] = True
        if self._tally() is _VoteResult.WON:  # a cluster of one
            if pre:
                self._campaign(pre=False, transfer=False)
            else:
                self._become_leader()
            return
        for v in sorted(self.conf.voters):
            if v != self.id:
                self._send(
                    vote_type,
                    v,
                    term=term,
                    index=self.log.last_index(),
                    log_term=self.log.last_term(),
                    context=CAMPAIGN_TRANSFER if transfer else b"",
                )

    def _tally(self) -> _VoteResult:
        voters = self.conf.voters
        granted = sum(1 for v in voters if self._votes.get(v) is True)
        rejected = sum(1 for v in voters if self._votes.get(v) is False)
        quorum = len(voters) // 2 + 1
        if granted >= quorum:
            return _VoteResult.WON
        if len(voters) - rejected < quorum:
            return _VoteResult.LOST
        return _VoteResult.PENDING

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is MessageType.PRE_VOTE
        resp = MessageType.PRE_VOTE_RESP if pre else MessageType.VOTE_RESP
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (pre and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # For a pre-vote, answer at the term asked about (ours is lower).
            self._send(resp, m.frm, term=m.term)
            if not pre:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(resp, m.frm, reject=True)

    def _step_candidate(self, m: Message) -> None:
        expected = (
            MessageType.PRE_VOTE_RESP
            if self.role is StateRole.PRE_CANDIDATE
            else MessageType.VOTE_RESP
        )
        if m.type in (MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP):
            self._become_follower(m.term, m.frm)  # someone won this term
            self._step_follower(m)
        elif m.type is expected:
            self._votes.setdefault(m.frm, not m.reject)
            result = self._tally()
            if result is _VoteResult.WON:
                if self.role is StateRole.PRE_CANDIDATE:
                    self._campaign(pre=False, transfer=False)
                else:
                    self._become_leader()
            elif result is _VoteResult.LOST:
                self._become_follower(self.term, NONE)

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self._hup(transfer=False)

    # ---------------------------------------------------------------- follower

    def _step_follower(self, m: Message) -> None:
        if m.type is MessageType.APP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append(m)
        elif m.type is MessageType.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self.log.commit_to(m.commit)
            self._send(MessageType.HEARTBEAT_RESP, m.frm, context=m.context)
        elif m.type is MessageType.SNAP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif m.type is MessageType.TIMEOUT_NOW:
            self._hup(transfer=True)
        elif m.type is MessageType.READ_INDEX_RESP:
            self._read_states.append(ReadState(m.index, m.context))

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(MessageType.APP_RESP, m.frm, index=self.log.committed)
            return
        if self.log.match_term(m.index, m.log_term):
            last_new = m.index + len(m.entries)
            conflict = self.log.find_conflict(m.entries)
            if conflict:
                self._append(list(m.entries[conflict - m.index - 1 :]))
            # Only up to what this message proved matches: later entries may be stale.
            self.log.commit_to(min(m.commit, last_new))
            self._send(MessageType.APP_RESP, m.frm, index=last_new)
            return
        # Reject, with a hint that lets the leader skip a whole term at a time.
        hint_index = min(m.index, self.log.last_index())
        hint_index, hint_term = self.log.find_conflict_by_term(hint_index, m.log_term)
        self._send(
            MessageType.APP_RESP,
            m.frm,
            index=m.index,
            reject=True,
            reject_hint=hint_index,
            log_term=hint_term,
        )

    def _handle_snapshot(self, m: Message) -> None:
        assert m.snapshot is not None
        s = m.snapshot
        if s.meta.index <= self.log.committed:
            self._send(MessageType.APP_RESP, m.frm, index=self.log.committed)
        elif self.log.match_term(s.meta.index, s.meta.term):
            # We hold that entry already: it is committed, nothing to restore.
            self.log.commit_to(s.meta.index)
            self._send(MessageType.APP_RESP, m.frm, index=self.log.committed)
        else:
            self.log.restore(s)
            self._conf_base = s.meta.conf_state
            self._conf_history = []
            self._send(MessageType.APP_RESP, m.frm, index=self.log.last_index())

    # ---------------------------------------------------------------- leader

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        for node, pr in self.prs.items():
            if node != self.id:
                pr.inactive_ticks += 1
        if self.cfg.check_quorum and not self._quorum_active():
            # No quorum has answered for an election timeout: a new leader may be elected
            # (or soon), so stop acting as one.
            self._become_follower(self.term, NONE)
            return
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            self.lead_transferee = NONE  # a transfer that did not finish in time is abandoned
        retry = self.cfg.snapshot_retry_ticks or 3 * self.cfg.election_tick
        for pr in self.prs.values():
            if pr.state is ProgressState.SNAPSHOT:
                pr.snapshot_ticks += 1
                if pr.snapshot_ticks >= retry:  # lost, or the follower restarted: try again
                    pr.become_probe()
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def _active(self, node: int) -> bool:
        pr = self.prs.get(node)
        return node == self.id or (pr is not None and pr.inactive_ticks < self.cfg.election_tick)

    def _quorum_active(self) -> bool:
        voters = self.conf.voters
        return sum(1 for v in voters if self._active(v)) >= len(voters) // 2 + 1

    def _check_can_propose(self) -> None:
        if self.role is not StateRole.LEADER:
            raise NotLeader(f"node {self.id} is not the leader", self.lead)
        if self.lead_transferee != NONE:
            raise ProposalDropped("leadership transfer in progress")
        if self.id not in self.conf.members():
            raise ProposalDropped("this leader is being removed from the cluster")

    def _append(self, entries: list[Entry]) -> None:
        """Append to our log, keeping the membership in step with it."""
        first = entries[0].index
        self.log.append(entries)
        changed = False
        while self._conf_history and self._conf_history[-1][0] >= first:
            self._conf_history.pop()  # truncated away: that change never happened
            changed = True
        for e in entries:
            if e.type is EntryType.CONF_CHANGE:
                cs = ConfChange.decode(e.data).apply(self.conf)
                self._conf_history.append((e.index, cs))
                changed = True
        if changed and self.role is StateRole.LEADER:
            self._sync_progress()
            self._after_ack()  # a smaller quorum may commit more

    def _committed_by_quorum(self) -> int:
        matches = sorted(
            (pr.match for node, pr in self.prs.items() if node in self.conf.voters),
            reverse=True,
        )
        voters = len(self.conf.voters)
        if not voters or len(matches) < voters:
            return 0
        return matches[voters // 2]

    def _maybe_commit(self) -> bool:
        index = self._committed_by_quorum()
        # Only an entry of our own term is committed by counting replicas (figure 8).
        if index > self.log.committed and self.log.term(index) == self.term:
            self.log.commit_to(index)
            return True
        return False

    def _after_ack(self) -> None:
        """Match indexes moved: commit what a quorum holds and tell the followers."""
        if not self._maybe_commit():
            return
        self._bcast_commit = True
        if self._reads_waiting_commit and self.log.term(self.log.committed) == self.term:
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            for m in waiting:
                self._handle_read_index(m)
        if self.id not in self.conf.voters and not (
            self._conf_history and self._conf_history[-1][0] > self.log.committed
        ):
            self._become_follower(self.term, NONE)  # our removal is committed: step down

    def _step_leader(self, m: Message) -> None:
        if m.type is MessageType.READ_INDEX:
            self._handle_read_index(m)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if m.type is MessageType.APP_RESP:
            pr.inactive_ticks = 0
            if m.reject:
                next_probe = m.reject_hint
                if m.log_term > 0:
                    next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
                if pr.maybe_decr_to(m.index, next_probe):
                    if pr.state is ProgressState.REPLICATE:
                        pr.become_probe()
                    self._maybe_send_append(m.frm)
                return
            old_paused = pr.is_paused()
            if not pr.maybe_update(m.index):
                return
            if pr.state is ProgressState.PROBE:
                pr.become_replicate()
            elif pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
                pr.become_probe()
                pr.become_replicate()
            elif pr.state is ProgressState.REPLICATE:
                pr.inflights.free_le(m.index)
            self._after_ack()
            if self.role is not StateRole.LEADER:
                return
            if old_paused:
                self._maybe_send_append(m.frm)
            while self._maybe_send_append(m.frm, send_if_empty=False):
                pass
            if m.frm == self.lead_transferee and pr.match == self.log.last_index():
                self._send(MessageType.TIMEOUT_NOW, m.frm)
        elif m.type is MessageType.HEARTBEAT_RESP:
            pr.inactive_ticks = 0
            pr.paused = False
            # Even with a full window this sends (an empty append if need be), so a follower
            # whose appends were all lost is found out and resent to.
            if pr.match < self.log.last_index() or pr.state is ProgressState.PROBE:
                self._maybe_send_append(m.frm)
            if m.context:
                self._read_ack(m.frm, m.context)

    def _maybe_send_append(self, to: int, send_if_empty: bool = True) -> bool:
        pr = self.prs[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        prev_term = self.log.term(prev_index)
        if prev_term is None:
            return self._maybe_send_snapshot(to, pr)
        ents: list[Entry] = []
        full = pr.state is ProgressState.REPLICATE and pr.inflights.full()
        if pr.next <= self.log.last_index() and not full:
            ents = self.log.slice(pr.next, self.log.last_index() + 1, self.cfg.max_size_per_msg)
        if not ents and not send_if_empty:
            return False
        self._send(
            MessageType.APP,
            to,
            index=prev_index,
            log_term=prev_term,
            entries=tuple(ents),
            commit=self.log.committed,
        )
        pr.sent_entries(len(ents), sum(e.size() for e in ents))
        return True

    def _maybe_send_snapshot(self, to: int, pr: Progress) -> bool:
        if not self._active(to):
            return False  # don't ship a snapshot to a node that may be down
        snap = self.log.snapshot
        self._send(MessageType.SNAP, to, snapshot=snap)
        pr.become_snapshot(snap.meta.index)
        return True

    def _flush_appends(self) -> None:
        """Send what propose()/commits since the last Ready made due: one append per follower
        carries every entry proposed meanwhile (batching)."""
        if self.role is not StateRole.LEADER or not (self._bcast_entries or self._bcast_commit):
            return
        for node in sorted(self.prs):
            if node != self.id:
                self._maybe_send_append(node, send_if_empty=self._bcast_commit)
                while self._maybe_send_append(node, send_if_empty=False):
                    pass
        self._bcast_entries = self._bcast_commit = False

    def _bcast_heartbeat(self) -> None:
        ctx = self._read_queue[-1] if self._read_queue else b""
        for node in sorted(self.prs):
            if node != self.id:
                commit = min(self.prs[node].match, self.log.committed)
                self._send(MessageType.HEARTBEAT, node, commit=commit, context=ctx)

    # ---------------------------------------------------------------- ReadIndex

    def _handle_read_index(self, m: Message) -> None:
        if self.conf.voters == {self.id}:
            self._respond_read(m, self.log.committed)
        elif self.log.term(self.log.committed) != self.term:
            # Our commit index may still be behind the last leader's: wait until an entry of
            # our term commits (the empty one appended on election).
            self._reads_waiting_commit.append(m)
        elif m.context not in self._read_pending:
            self._read_pending[m.context] = _ReadIndexStatus(m, self.log.committed, {self.id})
            self._read_queue.append(m.context)
            self._bcast_heartbeat()

    def _read_ack(self, node: int, ctx: bytes) -> None:
        status = self._read_pending.get(ctx)
        if status is None:
            return
        status.acks.add(node)
        if len(status.acks & self.conf.voters) < len(self.conf.voters) // 2 + 1:
            return
        # Confirmed as leader after ctx arrived, so also after every request queued before it.
        n = self._read_queue.index(ctx) + 1
        done, self._read_queue = self._read_queue[:n], self._read_queue[n:]
        for c in done:
            s = self._read_pending.pop(c)
            self._respond_read(s.request, s.index)

    def _respond_read(self, req: Message, index: int) -> None:
        if req.frm == self.id:
            self._read_states.append(ReadState(index, req.context))
        else:
            self._send(MessageType.READ_INDEX_RESP, req.frm, index=index, context=req.context)

    # ---------------------------------------------------------------- sending

    def _send(
        self,
        type: MessageType,
        to: int,
        *,
        term: int | None = None,
        log_term: int = 0,
        index: int = 0,
        entries: tuple[Entry, ...] = (),
        commit: int = 0,
        reject: bool = False,
        reject_hint: int = 0,
        snapshot: Snapshot | None = None,
        context: bytes = b"",
    ) -> None:
        self._msgs.append(
            Message(
                type,
                to,
                self.id,
                self.term if term is None else term,
                log_term,
                index,
                entries,
                commit,
                reject,
                reject_hint,
                snapshot,
                context,
            )
        )
