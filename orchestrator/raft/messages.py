"""The data the Raft core takes in and hands out: messages, log entries, hard state, snapshots.

Everything here is an immutable value. Node ids are positive integers; 0 means "nobody" (no
vote, no known leader). The layout follows etcd-io/raft's raftpb, trimmed to what we use.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

NONE = 0  # "no node": no vote cast, no leader known


class MessageType(enum.Enum):
    APP = "app"  # leader -> follower: entries after (index, log_term), and the commit index
    APP_RESP = "app_resp"  # follower -> leader: matched up to index, or reject (with a hint)
    VOTE = "vote"  # candidate -> voter: (index, log_term) is the candidate's last entry
    VOTE_RESP = "vote_resp"
    PRE_VOTE = "pre_vote"  # as VOTE, for term+1, changing nobody's term
    PRE_VOTE_RESP = "pre_vote_resp"
    HEARTBEAT = "heartbeat"  # leader -> follower: commit (bounded by the follower's match)
    HEARTBEAT_RESP = "heartbeat_resp"
    SNAP = "snap"  # leader -> lagging follower: InstallSnapshot
    TIMEOUT_NOW = "timeout_now"  # leader -> transferee: campaign now (leadership transfer)
    READ_INDEX = "read_index"  # follower -> leader: a read request (context identifies it)
    READ_INDEX_RESP = "read_index_resp"  # leader -> follower: index to wait for, or reject


class EntryType(enum.Enum):
    NORMAL = "normal"
    CONF_CHANGE = "conf_change"


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    data: bytes = b""
    type: EntryType = EntryType.NORMAL

    def size(self) -> int:
        """The bytes this entry counts for in message-size and inflight limits."""
        return len(self.data) + 16


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """The membership: voters decide elections and commits; learners only receive the log."""

    voters: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()

    def members(self) -> frozenset[int]:
        return self.voters | self.learners

    def to_json(self) -> dict[str, list[int]]:
        return {"voters": sorted(self.voters), "learners": sorted(self.learners)}

    @staticmethod
    def from_json(doc: dict[str, list[int]]) -> ConfState:
        return ConfState(frozenset(doc["voters"]), frozenset(doc["learners"]))


class ConfChangeType(enum.Enum):
    ADD_NODE = "add_node"  # add a voter, or promote a learner to voter
    ADD_LEARNER = "add_learner"
    REMOVE_NODE = "remove_node"


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One membership change; carried as the data of a CONF_CHANGE entry.

    `context` is opaque to Raft (Shoal puts the new member's address there).
    """

    type: ConfChangeType
    node_id: int
    context: bytes = b""

    def encode(self) -> bytes:
        return json.dumps(
            {"type": self.type.value, "node_id": self.node_id, "context": self.context.hex()},
            sort_keys=True,
        ).encode()

    @staticmethod
    def decode(data: bytes) -> ConfChange:
        doc = json.loads(data)
        return ConfChange(
            ConfChangeType(doc["type"]), int(doc["node_id"]), bytes.fromhex(doc["context"])
        )

    def apply(self, cs: ConfState) -> ConfState:
        """The membership after this change (deterministic, so every node computes the same)."""
        n = self.node_id
        if self.type is ConfChangeType.ADD_NODE:
            return ConfState(cs.voters | {n}, cs.learners - {n})
        if self.type is ConfChangeType.ADD_LEARNER:
            if n in cs.voters:  # refused at proposal time; a no-op if it slips through
                return cs
            return ConfState(cs.voters, cs.learners | {n})
        return ConfState(cs.voters - {n}, cs.learners - {n})


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf_state: ConfState = ConfState()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The application's state as of `meta.index` (data is opaque to Raft)."""

    meta: SnapshotMeta = SnapshotMeta()
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.meta.index == 0


@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    to: int
    frm: int
    term: int
    log_term: int = 0  # APP: term of entry `index`; VOTE: last term; APP_RESP reject: hint term
    index: int = 0  # APP: previous index; APP_RESP: matched/rejected index; VOTE: last index
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0  # APP_RESP reject: where the follower's log could match
    snapshot: Snapshot | None = None
    context: bytes = b""  # VOTE: b"transfer"; HEARTBEAT*/READ_INDEX*: the read request id


@dataclass(frozen=True, slots=True)
class ReadState:
    """A read request `context` may be served once the state machine has applied `index`."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class StorageState:
    """What a node recovers from its durable storage when it (re)starts."""

    hard_state: HardState = HardState()
    snapshot: Snapshot = Snapshot()
    entries: tuple[Entry, ...] = ()  # the entries after snapshot.meta.index, in order


@dataclass(frozen=True)
class Ready:
    """Work the driver must do, in this order, then acknowledge with `Raft.advance(ready)`.

    1. Persist `snapshot` (if any), then `entries` (entries[0].index may be at or below the
       last stored index: drop the stored suffix from there first), then `hard_state` (if
       any), with one fsync for all of it (none is needed if only the commit index moved).
    2. Send `messages` (only now: votes and acks in them promise what step 1 made durable).
    3. Restore the state machine from `snapshot` (if any), then apply `committed_entries`
       in order, and serve the `read_states` whose index has been applied.
    4. Call `advance(ready)`.

    A driver may overlap step 1 with two things that do not depend on it (Raft thesis
    §10.2.1; etcd does both): sending the APP, HEARTBEAT and SNAP messages, which only a
    leader sends and which promise nothing about its own disk (the leader counts its own log
    toward a commit only once `advance` says it is persisted); and applying
    `committed_entries` when there is no `snapshot`, since committed means durable on a
    quorum already.
    """

    messages: list[Message] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
