"""Replacing tasks drops no request: rolling updates (both orders, parallelism 1 and 3), a
scale-down, a node drain and a rollback, each under four client loops of RATE requests/s
(published port from outside and VIP from another service's task; new connection per request
and keep-alive), in a 3-node lab on nftables (docs/updates.md). Every request must succeed: no
failure, no reset, no timeout."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from orchestrator.lab import lab as labmod
from orchestrator.lab.lifecycle import (
    WEB,
    Cluster,
    Outcome,
    Traffic,
    deploy,
    docker_cli,
    remove,
    swarm,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tlife"
SUBNET = ipaddress.IPv4Network("192.168.97.0/24")
PUBLISHED = 30700
REPLICAS = 10
RATE = 100.0  # requests/s per loop


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if labmod.load(LAB) is not None or (labmod.DATA_DIR / LAB).exists():
        labmod.down(LAB, purge=True)
    lab = labmod.up(LAB, 3, SUBNET)
    try:
        c = Cluster(swarm(lab))
        try:
            yield c
        finally:
            c.close()
    finally:
        labmod.down(LAB, purge=True)


@pytest.fixture
def web(cluster: Cluster) -> Iterator[Traffic]:
    deploy(cluster, REPLICAS, PUBLISHED)
    try:
        yield Traffic(cluster, cluster.lab.node("sw2").address, PUBLISHED, RATE)
    finally:
        remove(cluster)


def assert_nothing_dropped(outcome: Outcome, new_tasks: set[str] | None = None) -> None:
    print(outcome)
    for name, result in outcome.results.items():
        # the loops kept their rate (a loop that stalled would also "fail nothing")
        assert result.sent >= RATE * (outcome.seconds + 1.5) * 0.8, (name, str(result))
        assert result.failed == 0, (name, str(result))
    if new_tasks is not None:
        answered = {who for r in outcome.results.values() for who in r.answered}
        assert any(t[:12] in who for t in new_tasks for who in answered), (new_tasks, answered)


def serving_ids(cluster: Cluster) -> set[str]:
    """The tasks serving now (a task's hostname is its ID's first 12 characters)."""
    return {t["ID"] for t in cluster.serving(WEB)}


@pytest.mark.parametrize(
    ("order", "parallelism"),
    [("stop-first", 1), ("stop-first", 3), ("start-first", 1), ("start-first", 3)],
)
def test_a_rolling_update_drops_nothing(
    cluster: Cluster, web: Traffic, order: str, parallelism: int
) -> None:
    before = {t["ID"] for t in cluster.serving(WEB)}
    update = ("service", "update", "--update-order", order,
              "--update-parallelism", str(parallelism), "--update-delay", "0s",
              "--env-add", f"GENERATION={order}-{parallelism}", WEB)  # fmt: skip
    outcome = web.run(
        lambda: docker_cli(cluster.lab, *update),
        lambda: (
            cluster.settled(WEB, REPLICAS)
            and cluster.sdk.services.get(WEB).attrs["UpdateStatus"]["State"] != "updating"
        ),
    )
    after = cluster.serving(WEB)
    assert len(after) == REPLICAS and not before & {t["ID"] for t in after}
    env = cluster.sdk.services.get(WEB).attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"]
    assert f"GENERATION={order}-{parallelism}" in env
    assert cluster.sdk.services.get(WEB).attrs["UpdateStatus"]["State"] == "completed"
    assert_nothing_dropped(outcome, new_tasks=serving_ids(cluster))


def test_a_scale_down_drops_nothing(cluster: Cluster, web: Traffic) -> None:
    outcome = web.run(
        lambda: docker_cli(cluster.lab, "service", "scale", f"{WEB}=2"),
        lambda: cluster.settled(WEB, 2),
    )
    assert_nothing_dropped(outcome)


def test_draining_a_node_drops_nothing(cluster: Cluster, web: Traffic) -> None:
    nodes = {n.id: n.attrs["Description"]["Hostname"] for n in cluster.sdk.nodes.list()}
    on = {name: 0 for name in nodes.values()}
    for t in cluster.serving(WEB):
        on[nodes[t["NodeID"]]] += 1
    victim = "sw3"
    assert on[victim] >= REPLICAS // 3, on  # the spread puts a third of the tasks on each node
    try:
        outcome = web.run(
            lambda: docker_cli(cluster.lab, "node", "update", "--availability", "drain", victim),
            lambda: (
                cluster.settled(WEB, REPLICAS)
                and not any(nodes[t["NodeID"]] == victim for t in cluster.serving(WEB))
            ),
        )
    finally:
        docker_cli(cluster.lab, "node", "update", "--availability", "active", victim)
    assert_nothing_dropped(outcome, new_tasks=serving_ids(cluster))


def test_a_rollback_drops_nothing_and_restores_the_spec(cluster: Cluster, web: Traffic) -> None:
    spec = cluster.sdk.services.get(WEB).attrs["Spec"]
    docker_cli(cluster.lab, "service", "update", "--update-parallelism", "3",
               "--env-add", "ROLLED=forward", WEB)  # fmt: skip
    outcome = web.run(
        lambda: docker_cli(cluster.lab, "service", "rollback", WEB),
        lambda: (
            cluster.settled(WEB, REPLICAS)
            and cluster.sdk.services.get(WEB).attrs["UpdateStatus"]["State"] != "rollback_started"
        ),
    )
    service = cluster.sdk.services.get(WEB).attrs
    assert service["UpdateStatus"]["State"] == "rollback_completed", service["UpdateStatus"]
    assert service["Spec"]["TaskTemplate"] == spec["TaskTemplate"]
    assert service["Spec"]["EndpointSpec"] == spec["EndpointSpec"]
    assert_nothing_dropped(outcome, new_tasks=serving_ids(cluster))
