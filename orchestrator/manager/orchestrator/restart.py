"""The restart policy: whether, and when, a slot whose task ended gets a new one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from orchestrator.manager.spec import ServiceView
from orchestrator.store.ids import parse_rfc3339
from orchestrator.store.objects import Task, TaskState


@dataclass
class RestartTracker:
    """Restart history per slot. In memory, as in swarmkit: a new leader starts afresh."""

    history: dict[tuple[str, int | str], list[float]] = field(default_factory=dict)

    def decide(
        self, v: ServiceView, service_id: str, slot: int | str, last: Task, now: float | None = None
    ) -> float | None:
        """None: do not restart. Otherwise the time at which to start the replacement."""
        now = time.time() if now is None else now
        if v.restart_condition == "none":
            return None
        if v.restart_condition == "on-failure" and last.state == TaskState.COMPLETE:
            return None
        key = (service_id, slot)
        attempts = self.history.get(key, [])
        if v.restart_window:
            attempts = [t for t in attempts if t > now - v.restart_window / 1e9]
        if v.restart_max_attempts and len(attempts) >= v.restart_max_attempts:
            return None
        ended = parse_rfc3339(last.timestamp) if last.timestamp else now
        return ended + v.restart_delay / 1e9

    def record(self, service_id: str, slot: int | str, when: float) -> None:
        self.history.setdefault((service_id, slot), []).append(when)

    def forget(self, service_id: str) -> None:
        for key in [k for k in self.history if k[0] == service_id]:
            del self.history[key]
