"""A thousand tasks on one node (issue #14): all running, none rejected, the node ready and
the API answering throughout (orchestrator/lab/taskfill.py).

Before: a 1,000-task service on one node had every task rejected ("the node's mesh applied
nothing for 30 s"), replaced in a loop, and the node marked down (its event loop busy polling
for the mesh). How fast they start is bench/fill.py's (docs/benchmarks.md); here the bound is
only what no user should wait past.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from orchestrator.lab import lifecycle
from orchestrator.lab.record import Lab
from orchestrator.lab.taskfill import fill
from tests.labutil import module_lab

LAB = "tmany"
SUBNET = ipaddress.IPv4Network("192.168.89.0/24")
TASKS = 1000
# Measured on this 2-core machine: ~20 s (docs/benchmarks.md, "Many tasks on one node"); CI's
# machine is slower, and the test is about what breaks (rejections, a node down), not speed.
WITHIN = 180.0
PS_BOUND = 5.0  # s for one `service ps` request meanwhile (the bench's target: < 1 s)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Lab]:
    with module_lab(LAB, 1, SUBNET, executor="native") as lab:
        yield lifecycle.swarm(lab)


def test_a_thousand_tasks_on_one_node_all_run_and_nothing_is_rejected(swarm: Lab) -> None:
    result = fill(swarm, "sw1", TASKS, WITHIN)
    print(result.describe())
    assert result.seconds is not None, result.describe()
    assert result.rejected == 0, result.describe()
    assert not result.node_not_ready, result.describe()
    assert result.worst_ps < PS_BOUND, result.describe()
    assert result.removed_seconds is not None, "task namespaces left after service rm"
