"""A node's Raft log in memory: entries after the last compaction point, plus its indexes.

    offset             stabled          committed       last_index()
       |  entries[0] ...  |   ...            |     ...        |
       (compacted)        durable <= stabled; the rest is waiting to be persisted

Indexes start at 1; `offset` is the index just before entries[0] (0 for a fresh log, the
compaction point otherwise) and `offset_term` its term, so the consistency check for the first
entry still works. `applied <= committed` always; `committed` never goes down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.raft.messages import Entry, Snapshot


class LogError(AssertionError):
    """A Raft invariant would be broken (a committed entry changed, commit beyond the log)."""


@dataclass
class RaftLog:
    offset: int = 0
    offset_term: int = 0
    entries: list[Entry] = field(default_factory=list)
    committed: int = 0
    applied: int = 0
    stabled: int = 0  # every entry at or below this index is durable
    snapshot: Snapshot = field(default_factory=Snapshot)  # the latest (own or received)
    pending_snapshot: Snapshot | None = None  # received, not yet persisted and applied

    @classmethod
    def recover(
        cls, snapshot: Snapshot, entries: list[Entry], committed: int, applied: int = 0
    ) -> RaftLog:
        log = cls(
            offset=snapshot.meta.index,
            offset_term=snapshot.meta.term,
            entries=list(entries),
            snapshot=snapshot,
        )
        for i, e in enumerate(entries):
            if e.index != snapshot.meta.index + 1 + i:
                raise LogError(f"recovered entries are not contiguous at {e.index}")
        log.stabled = log.last_index()
        log.committed = max(min(committed, log.last_index()), snapshot.meta.index)
        log.applied = max(snapshot.meta.index, min(applied, log.committed))
        return log

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`; None if compacted away or not there."""
        if index == self.offset:
            return self.offset_term
        if self.offset < index <= self.offset + len(self.entries):
            return self.entries[index - self.offset - 1].term
        return None

    def last_term(self) -> int:
        t = self.term(self.last_index())
        assert t is not None
        return t

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.offset - 1]

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Is a log ending at (last_index, last_term) at least as up to date as ours? (§5.4.1)"""
        mine = self.last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index())

    def slice(self, lo: int, hi: int, max_bytes: int = 0) -> list[Entry]:
        """Entries [lo, hi), at least one if any, at most max_bytes in total (0: no limit)."""
        if lo < self.first_index() or hi > self.last_index() + 1:
            raise LogError(f"slice [{lo}, {hi}) outside ({self.offset}, {self.last_index()}]")
        ents = self.entries[lo - self.offset - 1 : hi - self.offset - 1]
        if max_bytes <= 0:
            return ents
        size = 0
        for n, e in enumerate(ents):
            size += e.size()
            if size > max_bytes and n > 0:
                return ents[:n]
        return ents

    def unstable_entries(self) -> list[Entry]:
        return self.entries[self.stabled - self.offset :] if self.stabled >= self.offset else []

    def find_conflict(self, entries: tuple[Entry, ...] | list[Entry]) -> int:
        """The index of the first of `entries` that we lack or hold with another term; 0 if none."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The last index at or below `index` whose term is <= `term`, and that term.

        Used to skip a whole term of mismatching entries per round trip (fast backtracking).
        """
        while True:
            t = self.term(index)
            if t is None:
                return index, 0
            if t <= term:
                return index, t
            index -= 1

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append, first dropping our entries from entries[0].index on (they conflict)."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise LogError(f"would overwrite committed entry {first} (committed {self.committed})")
        if first > self.last_index() + 1:
            raise LogError(f"gap: appending {first} after {self.last_index()}")
        del self.entries[first - self.offset - 1 :]
        self.entries.extend(entries)
        self.stabled = min(self.stabled, first - 1)

    def commit_to(self, index: int) -> bool:
        if index <= self.committed:
            return False
        if index > self.last_index():
            raise LogError(f"commit {index} beyond the last index {self.last_index()}")
        self.committed = index
        return True

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by a received snapshot (InstallSnapshot)."""
        self.offset = snapshot.meta.index
        self.offset_term = snapshot.meta.term
        self.entries = []
        self.committed = snapshot.meta.index
        self.stabled = snapshot.meta.index
        self.snapshot = snapshot
        self.pending_snapshot = snapshot

    def compact(self, snapshot: Snapshot, keep: int = 0) -> None:
        """The application made `snapshot`; drop entries before it, keeping the last `keep`."""
        index = snapshot.meta.index
        if index > self.applied:
            raise LogError(f"snapshot at {index} beyond the applied index {self.applied}")
        if index <= self.snapshot.meta.index:
            return
        self.snapshot = snapshot
        new_offset = max(self.offset, index - keep)
        if new_offset > self.offset:
            term = self.term(new_offset)
            assert term is not None
            del self.entries[: new_offset - self.offset]
            self.offset, self.offset_term = new_offset, term
