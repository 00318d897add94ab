"""Rolling updates and rollbacks, as swarmkit's updater does them (manager/orchestrator/update).

A service's slots whose task runs an older spec are *dirty*. Each reconcile pass of the
replicated or global orchestrator hands the updater its slots; the updater replaces dirty
slots `Parallelism` at a time (0: all at once), each worker waiting `Delay` after its slot
before it takes the next, in the order the spec says:
  stop-first   the old task is shut down (it drains first: docs/updates.md) and
               the new one made at once;
  start-first  the new task is made, and the old one shut down once the new one runs.
A task the update made that fails (ends, or is rejected) before it has run for `Monitor`
counts as a failure; once failures exceed `MaxFailureRatio` of the slots the update had to
change, `FailureAction` applies: `pause` (the update stops, UpdateStatus `paused`, until the
next update of the service), `continue`, or `rollback` (the previous spec becomes the spec
again, PreviousSpec is cleared, and the same machinery rolls back, with RollbackConfig; a
rollback that fails pauses: a rollback is never rolled back). When no slot is dirty any more
and the last one has been watched for `Monitor`, the update is `completed` (or
`rollback_completed`).

UpdateStatus is kept true in the store: updating / paused / completed, rollback_started /
rollback_paused / rollback_completed, with StartedAt, CompletedAt and Message, in swarmkit's
words. What an update is doing right now (its workers, the tasks it made, its failures) lives
in memory, per leader, as swarmkit keeps it: a new leader starts the update's remaining slots
afresh.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from orchestrator.manager.allocator import AddressBook, AllocationError, allocate_service
from orchestrator.manager.orchestrator.tasks import dirty, new_task, stop
from orchestrator.manager.spec import UpdatePolicy, rollback_policy, update_policy
from orchestrator.store.ids import now_rfc3339
from orchestrator.store.objects import Service, Task, TaskState
from orchestrator.store.store import Tx

UPDATING = "updating"
PAUSED = "paused"
COMPLETED = "completed"
ROLLBACK_STARTED = "rollback_started"
ROLLBACK_PAUSED = "rollback_paused"
ROLLBACK_COMPLETED = "rollback_completed"


@dataclass
class Slot:
    """A slot the orchestrator keeps: its runnable task, if any."""

    key: int | str  # the slot number (replicated) or the node's ID (global)
    current: Task | None
    node_id: str = ""  # global services: the node the slot is on


@dataclass
class _InFlight:
    new_task: str
    old_tasks: list[str]


@dataclass
class _Update:
    """One update of one service, as far as this leader has seen it."""

    spec_version: int
    slots: int  # slots it had to change when it began: the failure ratio's denominator
    in_flight: dict[int | str, _InFlight] = field(default_factory=dict)
    free_at: list[float] = field(default_factory=list)  # each busy-with-delay worker's end
    made: dict[str, float | None] = field(default_factory=dict)  # task -> running since
    failed: set[str] = field(default_factory=set)
    last_done: float = 0.0


@dataclass
class UpdateTracker:
    """The updates in progress, per service. In memory, as in swarmkit."""

    updates: dict[str, _Update] = field(default_factory=dict)

    def forget(self, service_id: str) -> None:
        self.updates.pop(service_id, None)

    def in_flight(self, service_id: str) -> set[int | str]:
        """The slots the service's update is replacing now."""
        upd = self.updates.get(service_id)
        return set(upd.in_flight) if upd is not None else set()


def status(svc: Service) -> str:
    return str((svc.update_status or {}).get("State") or "")


def with_status(svc: Service, state: str, message: str, started: bool = False) -> Service:
    """The service with its UpdateStatus in `state` (StartedAt kept unless `started`;
    CompletedAt set for the completed states)."""
    old = svc.update_status or {}
    new = {
        "State": state,
        "StartedAt": now_rfc3339() if started or not old.get("StartedAt") else old["StartedAt"],
        "Message": message,
    }
    if state in (COMPLETED, ROLLBACK_COMPLETED):
        new["CompletedAt"] = now_rfc3339()
    return dataclasses.replace(svc, update_status=new)


def roll_back(svc: Service, message: str, manual: bool) -> Service:
    """The previous spec becomes the spec again (manual: and the current one the previous,
    so that a second rollback undoes the first, as `docker service rollback` does)."""
    assert svc.previous_spec is not None
    rolled = dataclasses.replace(
        svc,
        spec=svc.previous_spec,
        previous_spec=svc.spec if manual else None,
        spec_version=svc.spec_version + 1,
    )
    return with_status(rolled, ROLLBACK_STARTED, message, started=True)


def step(
    tx: Tx, svc: Service, slots: list[Slot], tracker: UpdateTracker, now: float
) -> float | None:
    """One pass of the service's update: returns when to look again, or None."""
    state = status(svc)
    if state in (PAUSED, ROLLBACK_PAUSED):
        tracker.forget(svc.id)
        return None
    rolling_back = state == ROLLBACK_STARTED
    policy = rollback_policy(svc.spec) if rolling_back else update_policy(svc.spec)
    dirty_slots = [s for s in slots if s.current is not None and dirty(svc, s.current)]
    upd = tracker.updates.get(svc.id)
    if upd is None or upd.spec_version != svc.spec_version:
        if not dirty_slots:
            if state in (UPDATING, ROLLBACK_STARTED):
                tx.put(_completed(svc, rolling_back))
            tracker.forget(svc.id)
            return None
        upd = tracker.updates[svc.id] = _Update(svc.spec_version, len(dirty_slots))
    if dirty_slots and state not in (UPDATING, ROLLBACK_STARTED):
        svc = with_status(svc, UPDATING, "update in progress", started=True)
        tx.put(svc)
    tasks = {t.id: t for t in tx.list(Task) if t.service_id == svc.id}
    failure = _observe(upd, tasks, policy, now)
    if (
        failure is not None
        and policy.failure_action != "continue"
        and len(upd.failed) / upd.slots > policy.max_failure_ratio
    ):
        tracker.forget(svc.id)
        _fail(tx, svc, failure, policy, rolling_back)
        return None
    _finish_slots(tx, upd, tasks, policy, now)
    upd.free_at = [t for t in upd.free_at if t > now]
    parallelism = policy.parallelism or len(dirty_slots) or 1
    free = parallelism - len(upd.in_flight) - len(upd.free_at)
    for slot in [s for s in dirty_slots if s.key not in upd.in_flight][: max(free, 0)]:
        _start_slot(tx, svc, slot, upd, policy)
    pending = [s for s in dirty_slots if s.key not in upd.in_flight]
    if not pending and not upd.in_flight:
        monitor_end = upd.last_done + max(policy.monitor / 1e9, policy.delay / 1e9 + 1.0)
        if now < monitor_end:
            return monitor_end
        tracker.forget(svc.id)
        tx.put(_completed(svc, rolling_back))
        return None
    # (a failure of a task it made wakes the manager by itself: its state changes)
    return min(upd.free_at) if upd.free_at else None


def _completed(svc: Service, rolling_back: bool) -> Service:
    if rolling_back:
        return with_status(svc, ROLLBACK_COMPLETED, "rollback completed")
    return with_status(svc, COMPLETED, "update completed")


def _observe(upd: _Update, tasks: dict[str, Task], policy: UpdatePolicy, now: float) -> str | None:
    """Note when the tasks the update made reach RUNNING, and which of them failed within
    their monitoring period; the ID of a new failure, if any."""
    failure = None
    for tid, since in list(upd.made.items()):
        task = tasks.get(tid)
        if task is None:
            continue
        if task.state == TaskState.RUNNING and since is None:
            upd.made[tid] = now
        elif task.state > TaskState.RUNNING and tid not in upd.failed:
            if task.state == TaskState.SHUTDOWN and task.desired_state > TaskState.RUNNING:
                continue  # stopped on purpose (the update moved on, the node drained)
            if since is None or now - since <= policy.monitor / 1e9:
                upd.failed.add(tid)
                failure = tid
    return failure


def _finish_slots(
    tx: Tx, upd: _Update, tasks: dict[str, Task], policy: UpdatePolicy, now: float
) -> None:
    """A slot is done once its new task runs (start-first: its old task is then shut down)
    or has ended; its worker then waits `Delay` before the next slot."""
    for key, flight in list(upd.in_flight.items()):
        new = tasks.get(flight.new_task)
        if new is not None and new.state < TaskState.RUNNING:
            continue
        if new is not None and new.state == TaskState.RUNNING:
            for old_id in flight.old_tasks:
                old = tasks.get(old_id)
                if old is not None and old.desired_state <= TaskState.RUNNING:
                    tx.put(stop(old, TaskState.SHUTDOWN, "replaced by an update"))
        del upd.in_flight[key]
        upd.last_done = now
        if policy.delay:
            upd.free_at.append(now + policy.delay / 1e9)


def _start_slot(tx: Tx, svc: Service, slot: Slot, upd: _Update, policy: UpdatePolicy) -> None:
    assert slot.current is not None
    fresh = new_task(svc, slot.key if isinstance(slot.key, int) else 0, slot.node_id)
    tx.put(fresh)
    upd.made[fresh.id] = None
    old = [slot.current.id]
    if policy.order == "stop-first":
        tx.put(stop(slot.current, TaskState.SHUTDOWN, "replaced by an update"))
        old = []
    upd.in_flight[slot.key] = _InFlight(fresh.id, old)


def _fail(tx: Tx, svc: Service, task_id: str, policy: UpdatePolicy, rolling_back: bool) -> None:
    if policy.failure_action == "rollback" and not rolling_back and svc.previous_spec:
        message = f"update rolled back due to failure or early termination of task {task_id}"
        try:
            # the previous spec's published ports and networks come back with it
            rolled = allocate_service(tx, roll_back(svc, message, manual=False), AddressBook(tx))
        except AllocationError as e:
            message = f"update paused due to failure or early termination of task {task_id}"
            tx.put(with_status(svc, PAUSED, f"{message}; it cannot be rolled back: {e}"))
            return
        tx.put(rolled)
        return
    if rolling_back:
        message = f"rollback paused due to failure or early termination of task {task_id}"
        tx.put(with_status(svc, ROLLBACK_PAUSED, message))
        return
    message = f"update paused due to failure or early termination of task {task_id}"
    tx.put(with_status(svc, PAUSED, message))
