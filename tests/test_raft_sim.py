"""Thousands of seeded schedules of the Raft simulator (orchestrator/raft/sim.py).

Each seed draws its own world (loss, duplication, delays, fault rate, compaction, message and
window sizes) and runs 3 or 5 real cores through crashes, restarts, partitions, transfers and
(for the membership runs) learners added, promoted and removed, checking the Raft safety
properties after every event, linearizability of the clients' history at the end, and that the
healed cluster commits again. SHOAL_RAFT_SEEDS=N runs N seeds per configuration (default 1500).
A failure prints the seed and the command that replays it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator

import pytest

from orchestrator.raft import sim
from orchestrator.raft.log import RaftLog

SEEDS = int(os.environ.get("SHOAL_RAFT_SEEDS", "1500"))

# (nodes, membership, share of SEEDS)
CONFIGS = [(3, False, 1.0), (5, False, 0.5), (5, True, 0.5)]


def _run(args: tuple[int, int, bool]) -> str | None:
    seed, nodes, membership = args
    try:
        sim.run(sim.SimConfig(seed, nodes=nodes, membership=membership))
    except Exception as e:  # a crash of the core is a failure too
        return (
            f"{type(e).__name__}: {str(e).splitlines()[0]}\n"
            f"    replay: {sim.replay_command(seed, nodes, membership)}"
        )
    return None


def _failures(jobs: list[tuple[int, int, bool]]) -> Iterator[str]:
    procs = min(2, os.cpu_count() or 1)
    if procs == 1:
        yield from (r for r in map(_run, jobs) if r)
        return
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        yield from (r for r in pool.imap_unordered(_run, jobs, chunksize=16) if r)


@pytest.mark.slow
@pytest.mark.parametrize(("nodes", "membership", "share"), CONFIGS)
def test_simulated_schedules_are_safe(nodes: int, membership: bool, share: float) -> None:
    base = 1_000_000 * nodes + (500_000 if membership else 0)
    jobs = [(base + i, nodes, membership) for i in range(max(1, int(SEEDS * share)))]
    failed = list(_failures(jobs))
    for f in failed:
        print(f)
    assert not failed, f"{len(failed)} of {len(jobs)} schedules failed:\n" + "\n".join(failed[:10])


def test_a_seed_replays_exactly() -> None:
    a = sim.run(sim.SimConfig(42, nodes=5, membership=True))
    b = sim.run(sim.SimConfig(42, nodes=5, membership=True))
    assert a == b and a["terms"] >= 1 and a["ops"] > 0


def test_the_checker_catches_a_broken_vote_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Teeth: voters that ignore the up-to-date rule lose committed entries, and it shows."""
    monkeypatch.setattr(RaftLog, "is_up_to_date", lambda self, index, term: True)
    caught = 0
    for seed in range(60):
        try:
            sim.run(sim.SimConfig(seed))
        except sim.SafetyViolation:
            caught += 1
    assert caught >= 1
