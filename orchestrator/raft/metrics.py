"""A Raft member's Prometheus metrics: swarmkit's names where swarmkit has them
(`swarm_raft_transaction_latency_seconds`, `swarm_raft_snapshot_latency_seconds`), ours
(`shoal_raft_*`) for the rest.

The driver (node.py) updates the instruments of `RaftMetrics` where things happen; what it
merely holds (term, indexes, members) is read at scrape time by `RaftCollector`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# a proposal commits in a few ms on a local disk, a snapshot in tens; both may take seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# how a proposal ended, the label of shoal_raft_proposals_total
OUTCOMES = ("committed", "failed")


@dataclass
class RaftMetrics:
    transaction_latency: Histogram
    snapshot_latency: Histogram
    proposals: Counter
    leader_changes: Counter
    snapshot_size: Gauge

    @staticmethod
    def register(registry: CollectorRegistry) -> RaftMetrics:
        metrics = RaftMetrics(
            transaction_latency=Histogram(
                "swarm_raft_transaction_latency_seconds",
                "Raft transaction latency: from a proposal to its entry committed and applied "
                "on this manager (forwarded to the leader when this manager does not lead).",
                registry=registry,
                buckets=LATENCY_BUCKETS,
            ),
            snapshot_latency=Histogram(
                "swarm_raft_snapshot_latency_seconds",
                "Raft snapshot create latency: encoding the store and writing it to disk.",
                registry=registry,
                buckets=LATENCY_BUCKETS,
            ),
            proposals=Counter(
                "shoal_raft_proposals_total",
                "Entries this manager proposed, by outcome (committed; failed: no leader, no "
                "quorum, a lost term, or refused when applied).",
                ["outcome"],
                registry=registry,
            ),
            leader_changes=Counter(
                "shoal_raft_leader_changes_total",
                "Times this manager learnt of a new leader (itself included).",
                registry=registry,
            ),
            snapshot_size=Gauge(
                "shoal_raft_snapshot_size_bytes",
                "Size of the last snapshot this manager wrote (0: none since it started).",
                registry=registry,
            ),
        )
        for outcome in OUTCOMES:
            metrics.proposals.labels(outcome)
        return metrics


@dataclass
class RaftView:
    """What the collector reads of the Raft member, at scrape time."""

    term: Callable[[], int]
    applied: Callable[[], int]
    voters: Callable[[], int]
    learners: Callable[[], int]
    has_leader: Callable[[], bool]


class RaftCollector(Collector):
    def __init__(self, view: RaftView):
        self.view = view

    def collect(self) -> Iterable[Metric]:
        v = self.view
        yield GaugeMetricFamily("shoal_raft_term", "The Raft term this manager is in.", v.term())
        yield GaugeMetricFamily(
            "shoal_raft_applied_index",
            "Index of the last entry applied to this manager's store.",
            v.applied(),
        )
        members = GaugeMetricFamily(
            "shoal_raft_members", "Members of the Raft group, by suffrage.", labels=["suffrage"]
        )
        members.add_metric(["voter"], v.voters())
        members.add_metric(["learner"], v.learners())
        yield members
        yield GaugeMetricFamily(
            "shoal_raft_has_leader",
            "1 if this manager knows of a leader (itself included), else 0.",
            1 if v.has_leader() else 0,
        )
