"""What a manager's store holds, as Prometheus metrics under swarmkit's names
(manager/metrics/collector.go and manager.go), so dashboards written for Docker work.

Counted from the store at scrape time, not kept up to date on every change: a scrape every
few seconds costs one pass over the objects; a gauge per change would cost every write.

swarmkit's object counts are gauges named `..._total`; promtool's lint refuses a gauge
with that suffix, so they are exposed untyped: the same names and values for PromQL and
for dashboards, and a clean `promtool check metrics`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

from orchestrator.manager.servicestatus import service_status
from orchestrator.manager.spec import view
from orchestrator.store.objects import Network, Node, NodeState, Service, Task, TaskState
from orchestrator.store.store import Store


class SwarmCollector(Collector):
    """`is_leader`: whether this manager leads now."""

    def __init__(self, store: Store, is_leader: Callable[[], bool]):
        self.store = store
        self.is_leader = is_leader

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "swarm_manager_leader",
            "Indicates if this manager node is a leader",
            1 if self.is_leader() else 0,
        )
        nodes = GaugeMetricFamily("swarm_manager_nodes", "The number of nodes", labels=["state"])
        by_state = Counter(n.state for n in self.store.list(Node))
        for state in NodeState:
            nodes.add_metric([state.value], by_state[state])
        yield nodes

        tasks = UnknownMetricFamily(
            "swarm_manager_tasks_total",
            "The number of tasks in the cluster object store",
            labels=["state"],
        )
        all_tasks = self.store.list(Task)
        task_states = Counter(t.state for t in all_tasks)
        for task_state in TaskState:
            tasks.add_metric([task_state.api], task_states[task_state])
        yield tasks
        yield from self._services(all_tasks)

        counts = {
            "services": len(self.store.list(Service)),
            "networks": len(self.store.list(Network)),
            # Shoal has neither yet (its API lists none): Docker's names, always 0
            "secrets": 0,
            "configs": 0,
        }
        for kind, count in counts.items():
            yield UnknownMetricFamily(
                f"swarm_manager_{kind}_total",
                f"The number of {kind} in the cluster object store",
                count,
            )

    def _services(self, all_tasks: list[Task]) -> Iterable[Metric]:
        """Ours: each service's tasks meant to run and running (`service ls`'s REPLICAS)."""
        desired = GaugeMetricFamily(
            "shoal_service_desired_tasks",
            "Tasks each service should have running (replicas; one per eligible node for "
            "global services), as `service ls` counts them.",
            labels=["service", "mode"],
        )
        running = GaugeMetricFamily(
            "shoal_service_running_tasks",
            "Tasks of each service running, on nodes not down, as `service ls` counts them.",
            labels=["service", "mode"],
        )
        by_service: dict[str, list[Task]] = defaultdict(list)
        for t in all_tasks:
            by_service[t.service_id].append(t)
        nodes = {n.id: n for n in self.store.list(Node)}
        for svc in self.store.list(Service):
            status = service_status(svc, by_service.get(svc.id, []), nodes)
            labels = [svc.name, view(svc.spec).mode]
            desired.add_metric(labels, status.desired)
            running.add_metric(labels, status.running)
        yield desired
        yield running
