"""What a leader knows about each follower, and how much it may send it (flow control).

A follower's Progress is in one of three states (as in etcd-io/raft's tracker):

- PROBE: the leader does not know where the follower's log matches; it sends one append at a
  time (then pauses until a response or the next heartbeat) and walks back on rejections.
- REPLICATE: the logs match up to `match`; the leader streams appends optimistically
  (pipelining), advancing `next` as it sends, bounded by an inflight window of messages/bytes.
- SNAPSHOT: the entries the follower needs are compacted away; a snapshot is on its way and
  nothing else is sent until the follower acknowledges it (or it times out).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@dataclass
class Inflights:
    """The appends sent but not yet acknowledged: (last index in the message, its bytes)."""

    max_count: int
    max_bytes: int = 0  # 0: no byte limit
    items: deque[tuple[int, int]] = field(default_factory=deque)
    bytes: int = 0

    def add(self, index: int, size: int) -> None:
        self.items.append((index, size))
        self.bytes += size

    def free_le(self, index: int) -> None:
        """Forget every message whose entries are all at or below `index` (acknowledged)."""
        while self.items and self.items[0][0] <= index:
            self.bytes -= self.items.popleft()[1]

    def full(self) -> bool:
        return len(self.items) >= self.max_count or (
            self.max_bytes > 0 and self.bytes >= self.max_bytes
        )

    def reset(self) -> None:
        self.items.clear()
        self.bytes = 0


@dataclass
class Progress:
    match: int
    next: int
    inflights: Inflights
    is_learner: bool = False
    state: ProgressState = ProgressState.PROBE
    # PROBE: an append is out; REPLICATE: the window is full. Either way, wait for a response
    # or a heartbeat response (which also lets the leader resend if all in flight were lost).
    paused: bool = False
    pending_snapshot: int = 0  # SNAPSHOT: the index of the snapshot sent
    snapshot_ticks: int = 0  # SNAPSHOT: ticks since it was sent (for the retry timeout)
    inactive_ticks: int = 0  # leader ticks since this follower last answered

    def _reset_state(self, state: ProgressState) -> None:
        self.state = state
        self.paused = False
        self.pending_snapshot = 0
        self.snapshot_ticks = 0
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, index: int) -> bool:
        """An acknowledgement up to `index`; False if it was stale (nothing new)."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.paused = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of the append after `rejected`; False if it was stale.

        `match_hint` is the highest index where the logs may match (from the follower's hint).
        """
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale: we already know it matches beyond that
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale: a probe we have since moved on from
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.paused = False
        return True

    def sent_entries(self, count: int, size: int) -> None:
        """An append with `count` entries (`size` bytes) went out at `next`."""
        if self.state is ProgressState.REPLICATE:
            if count:
                self.next += count
                self.inflights.add(self.next - 1, size)
            self.paused = self.inflights.full()
        elif self.state is ProgressState.PROBE:
            self.paused = True

    def is_paused(self) -> bool:
        return self.paused or self.state is ProgressState.SNAPSHOT
