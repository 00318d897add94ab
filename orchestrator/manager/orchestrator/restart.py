"""The restart policy: whether, and when, a slot whose task ended gets a new one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from orchestrator.manager.spec import ServiceView
from orchestrator.store.ids import parse_rfc3339
from orchestrator.store.objects import Task, TaskState

REJECT_BACKOFF_MAX = 60.0  # seconds: the longest wait before retrying a rejected slot
REJECT_MEMORY = 300.0  # seconds of a slot's restarts that count towards its backoff


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
        delay = v.restart_delay / 1e9
        if last.state == TaskState.REJECTED:
            # The node could not run it (no network in time, no image, no room): the next
            # try on a busy node would likely fail the same way and add to its load. Each
            # rejection in a row doubles the wait.
            recent = [t for t in self.history.get(key, []) if t > now - REJECT_MEMORY]
            delay = min(max(delay, 1.0) * 2 ** len(recent), max(delay, REJECT_BACKOFF_MAX))
        return ended + delay

    def record(self, service_id: str, slot: int | str, when: float) -> None:
        self.history.setdefault((service_id, slot), []).append(when)

    def forget(self, service_id: str) -> None:
        for key in [k for k in self.history if k[0] == service_id]:
            del self.history[key]
