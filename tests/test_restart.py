"""The restart policy (orchestrator/manager/orchestrator/restart.py): when a slot runs again."""

from __future__ import annotations

from orchestrator.manager.orchestrator.restart import RestartTracker
from orchestrator.manager.spec import normalize_service_spec, view
from orchestrator.store.ids import now_rfc3339, parse_rfc3339
from orchestrator.store.objects import Task, TaskState
from tests.test_manager import spec


def test_a_failed_task_restarts_after_the_delay_and_a_rejected_one_backs_off() -> None:
    v = view(normalize_service_spec(spec("web", 1)))  # the default restart delay: 5 s
    tracker = RestartTracker()
    ended = now_rfc3339()
    at = parse_rfc3339(ended)
    failed = Task(id="t", service_id="s", slot=1, state=TaskState.FAILED, timestamp=ended)
    rejected = Task(id="t", service_id="s", slot=1, state=TaskState.REJECTED, timestamp=ended)
    waits = []
    for _ in range(6):
        assert tracker.decide(v, "s", 1, failed, at) == at + 5.0  # failures: the delay, always
        when = tracker.decide(v, "s", 1, rejected, at)
        assert when is not None
        waits.append(when - at)
        tracker.record("s", 1, at)
    assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    # another slot, and the same slot once its rejections are old, start afresh
    assert tracker.decide(v, "s", 2, rejected, at) == at + 5.0
    assert tracker.decide(v, "s", 1, rejected, at + 600) == at + 5.0
