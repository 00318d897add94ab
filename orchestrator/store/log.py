"""The replicated log the store is written through.

Every change to the cluster store is an entry proposed to a ReplicatedLog; once the log has
made it durable on a quorum of managers it is applied to every manager's store in log order,
and the proposer gets the result of applying it. Callers never write the store directly. The
implementation is the managers' Raft node (orchestrator/raft/node.py, see
docs/architecture.md); a lone manager is a group of one.

NotLeader is Raft's own (orchestrator/raft/core.py), the one exception for "this manager cannot
take that now" whoever raises it: the core, the Raft node (and its NoQuorum), the store. The
API answers it with a 503.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from orchestrator.raft.core import NotLeader

__all__ = ["ApplyFn", "NotLeader", "ReplicatedLog"]

# apply(index, entry) -> result; snapshot() -> state; restore(index, state)
ApplyFn = Callable[[int, bytes], Any]


class ReplicatedLog(Protocol):
    def bind(
        self, apply: ApplyFn, snapshot: Callable[[], Any], restore: Callable[[int, Any], None]
    ) -> None:
        """The store's callbacks: apply a committed entry, make and restore a snapshot."""

    async def start(self) -> None:
        """Recover what is durable and replay it into the store."""

    async def propose(self, entry: bytes, term: int | None = None) -> Any:
        """Commit an entry; returns what applying it returned. Raises NotLeader, also when
        `term` is given and this manager is not (or no longer) the leader of that term: how
        the leader-only loops are fenced."""

    async def read_barrier(self) -> None:
        """Return once this manager's store holds every write committed before the call."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def term(self) -> int:
        """Leadership epoch: leader-only work checks it has not changed under it."""
        ...

    async def close(self) -> None: ...
