"""The replicated log the store is written through.

Every change to the cluster store is an entry proposed to a ReplicatedLog; once the log has
made it durable on a quorum of managers it is applied to every manager's store in log order,
and the proposer gets the result of applying it. Callers never write the store directly. The
implementation is Raft (orchestrator/store/raftlog.py); a lone manager is a group of one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

# apply(index, entry) -> result; snapshot() -> state; restore(index, state)
ApplyFn = Callable[[int, bytes], Any]


class NotLeader(RuntimeError):
    """This manager cannot accept writes (not the leader, or no quorum)."""


class ReplicatedLog(ABC):
    def __init__(self) -> None:
        self._apply: ApplyFn | None = None
        self._snapshot: Callable[[], Any] | None = None
        self._restore: Callable[[int, Any], None] | None = None

    def bind(
        self, apply: ApplyFn, snapshot: Callable[[], Any], restore: Callable[[int, Any], None]
    ) -> None:
        self._apply, self._snapshot, self._restore = apply, snapshot, restore

    @abstractmethod
    async def start(self) -> None:
        """Recover what is durable and replay it into the store."""

    @abstractmethod
    async def propose(self, entry: bytes, term: int | None = None) -> Any:
        """Commit an entry; returns what applying it returned. Raises NotLeader, also when
        `term` is given and this manager is not (or no longer) the leader of that term: how
        the leader-only loops are fenced."""

    @abstractmethod
    async def read_barrier(self) -> None:
        """Return once this manager's store holds every write committed before the call."""

    @property
    @abstractmethod
    def is_leader(self) -> bool: ...

    @property
    @abstractmethod
    def term(self) -> int:
        """Leadership epoch: leader-only work checks it has not changed under it."""

    @abstractmethod
    async def close(self) -> None: ...
