"""Raft membership follows the managers in the store (leader only).

The store says which nodes are managers (`Node.role`, `Node.raft_id`, `Node.manager_addr`);
this loop makes Raft agree, one change at a time as Raft requires:
- a manager not yet in Raft joins as a learner (it gets the log without voting, so a new,
  empty member cannot slow commits or win an election);
- a learner that has caught up with the leader's log becomes a voter;
- a member that is no longer a manager (demoted, removed) leaves; if that is this leader, it
  first hands leadership to a caught-up voter and the next leader removes it.
"""

from __future__ import annotations

import asyncio
import logging

from orchestrator.background import BackgroundLoop
from orchestrator.raft.node import RaftNode
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import Node, Role
from orchestrator.store.store import Store

log = logging.getLogger(__name__)

PERIOD = 0.5


class RaftMembers(BackgroundLoop):
    task_name = "raft-members"

    def __init__(self, store: Store, raft: RaftNode):
        self.store = store
        self.raft = raft

    def wanted(self) -> dict[int, str]:
        """Raft ID -> address of every node the store says is a manager."""
        return {
            n.raft_id: n.manager_addr
            for n in self.store.list(Node)
            if n.role == Role.MANAGER and n.raft_id and n.manager_addr
        }

    async def reconcile(self) -> str | None:
        """Make one change towards the wanted membership; returns what it did, if anything."""
        if not self.raft.is_leader:
            return None
        wanted = self.wanted()
        voters, learners = self.raft.voters(), self.raft.learners()
        members = voters | learners
        for rid, addr in sorted(wanted.items()):
            if rid not in members:
                await self.raft.add_learner(rid, addr)
                return f"added {rid} ({addr}) as a learner"
        for rid in sorted(learners):
            if rid in wanted and self.raft.caught_up(rid):
                await self.raft.promote(rid)
                return f"promoted {rid} to voter"
        for rid in sorted(members - wanted.keys()):
            if rid == self.raft.id:
                successor = next(
                    (v for v in sorted(voters) if v != rid and self.raft.caught_up(v, slack=0)),
                    None,
                )
                if successor is None:
                    return None  # nobody to hand over to yet
                await self.raft.transfer_leadership(successor)
                return f"handed leadership to {successor} before leaving"
            await self.raft.remove(rid)
            return f"removed {rid}"
        return None

    async def _run(self) -> None:
        while True:
            try:
                done = await self.reconcile()
            except (NotLeader, RuntimeError) as e:
                log.info("raft membership change deferred: %s", e)
                done = None
            if done:
                log.info("raft membership: %s", done)
                continue  # there may be more to do
            await asyncio.sleep(PERIOD)
