"""Rolling updates, rollbacks, health checks and their bad input end to end (docs/updates.md),
in a 2-node lab on the container executor, through the docker CLI (20.10, inside sw1) and the
docker SDK. That no request is dropped meanwhile is tests/test_lifecycle_lab.py's part."""

from __future__ import annotations

import copy
import ipaddress
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import docker
import docker.errors
import docker.types
import pytest

from orchestrator.apps import micro
from orchestrator.images import rootfs
from orchestrator.lab import daemons, lifecycle, registry
from orchestrator.lab.lab import Lab
from tests.labutil import created_service as created
from tests.labutil import docker_cli, module_lab, wait
from tests.labutil import swarm_cli as cli

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tupd"
SUBNET = ipaddress.IPv4Network("192.168.98.0/24")
SECOND = 1_000_000_000
# micro's server, ending at once on SIGTERM (as micro's own command does)
SERVE = "trap 'exit 0' TERM; httpd -f -p 0.0.0.0:8000 -h /www & wait"
# ... once /tmp/ok exists, a second after the start: what the health checks here look for
SERVE_READY_LATER = f"sleep 1; touch /tmp/ok; {SERVE}"
FAIL = "sh -c 'exit 1'"  # --args of a task that fails as soon as it runs
PAUSED = "update paused due to failure or early termination of task "
ROLLED_BACK = "update rolled back due to failure or early termination of task "
# the CLI's last word once it has followed an update to its end (20.10 does not name the
# service, later versions do)
CONVERGED = re.compile(r"^verify: Service (\S+ )?converged$", re.MULTILINE)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Lab]:
    with module_lab(LAB, 2, SUBNET) as lab:
        yield lifecycle.swarm(lab)


@pytest.fixture(scope="module")
def sdk(swarm: Lab) -> Iterator[Any]:
    client = docker.DockerClient(base_url=daemons.docker_host(swarm, "sw1"))
    yield client
    client.close()


def inspect(sdk: Any, name: str) -> dict[str, Any]:
    found: dict[str, Any] = sdk.api.inspect_service(name)
    return found


def tasks(sdk: Any, name: str) -> list[dict[str, Any]]:
    return list(sdk.services.get(name).tasks())


def running(sdk: Any, name: str) -> list[dict[str, Any]]:
    return [
        t
        for t in tasks(sdk, name)
        if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
    ]


def converged(sdk: Any, name: str, replicas: int, **container: Any) -> bool:
    """`replicas` tasks run and are meant to, each with these ContainerSpec values."""
    current = [t for t in tasks(sdk, name) if t["DesiredState"] == "running"]
    return len(current) == replicas and all(
        t["Status"]["State"] == "running"
        and all(container_spec(t["Spec"]).get(k) == v for k, v in container.items())
        for t in current
    )


def task(sdk: Any, task_id: str) -> dict[str, Any]:
    found: dict[str, Any] = sdk.api.inspect_task(task_id)
    return found


def container_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The ContainerSpec of a service's Spec (or PreviousSpec), or of a task's Spec."""
    cs: dict[str, Any] = spec.get("TaskTemplate", spec)["ContainerSpec"]
    return cs


def update_state(svc: dict[str, Any]) -> str:
    return str((svc.get("UpdateStatus") or {}).get("State") or "")


def wait_state(
    sdk: Any, name: str, state: str, after: dict[str, Any] | None = None, within: float = 60
) -> dict[str, Any]:
    """The service once its UpdateStatus is `state`, in an update (or rollback) begun after
    the one `after` shows."""
    before = (after or {}).get("UpdateStatus", {}).get("StartedAt")
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(inspect(sdk, name))
        status = found.get("UpdateStatus") or {}
        return status.get("State") == state and status.get("StartedAt") != before

    wait(reached, f"{name}: UpdateStatus {state}", within)
    return found


def seconds(rfc3339: str) -> float:
    """An RFC 3339 time as Docker writes it (nanoseconds, Z) in seconds since the epoch."""
    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float("0." + (fraction or "0"))


def published(svc: dict[str, Any]) -> list[int]:
    """The ports the routing mesh publishes for the service (Endpoint.Ports)."""
    return sorted(int(p["PublishedPort"]) for p in svc.get("Endpoint", {}).get("Ports", []))


def serves(lab: Lab, port: int) -> bool:
    """Whether a micro task answers on `port` of sw1's address (through the routing mesh)."""
    try:
        micro.query(lab.node("sw1").address, port, timeout=1.0)
    except (OSError, ValueError):
        return False
    return True


def rollback(sdk: Any, name: str) -> None:
    """`POST /services/{id}/update?rollback=previous`, as the CLI's `service rollback` sends
    it (docker-py's update_service has no rollback argument)."""
    svc = inspect(sdk, name)
    url = sdk.api._url("/services/{0}/update", svc["ID"])
    params = {"version": svc["Version"]["Index"], "rollback": "previous"}
    sdk.api._result(sdk.api._post_json(url, data=svc["Spec"], params=params), json=True)


def named_task(message: str, prefix: str) -> str:
    """The task ID an UpdateStatus message (or the CLI's output of it) names."""
    found = re.search(re.escape(prefix) + r"([0-9a-z]{25})", message)
    assert found is not None, message
    return found.group(1)


class Watch:
    """Samples a service's UpdateStatus.State and how many of its tasks run, every 50 ms, with
    a client of its own, while an operation goes on."""

    def __init__(self, lab: Lab, name: str):
        self.lab = lab
        self.name = name
        self.states: list[str] = []
        self.most_running = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def reach(self, state: str) -> None:
        """Until it has seen the service's UpdateStatus in `state`."""
        wait(lambda: self.states[-1:] == [state] or self.error is not None, f"watched {state}")

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if kind is None:  # (not over the test's own failure)
            assert self.error is None, self.error

    def _run(self) -> None:
        client = docker.APIClient(base_url=daemons.docker_host(self.lab, "sw1"))
        try:
            while not self._stop.is_set():
                svc = client.inspect_service(self.name)
                state = update_state(svc)
                if state and (not self.states or self.states[-1] != state):
                    self.states.append(state)
                found = client.tasks(filters={"service": svc["ID"]})
                up = sum(1 for t in found if t["Status"]["State"] == "running")
                self.most_running = max(self.most_running, up)
                time.sleep(0.05)
        except BaseException as e:
            self.error = e
        finally:
            client.close()


def test_a_start_first_rolling_update_in_batches_with_a_delay(swarm: Lab, sdk: Any) -> None:
    with created(swarm, "rolling", "--replicas", "4", "--env", "GEN=1",
                 "--update-monitor", "1s", "micro") as name:  # fmt: skip
        before = inspect(sdk, name)
        assert "UpdateStatus" not in before and "PreviousSpec" not in before
        old = {t["ID"] for t in running(sdk, name)}
        assert len(old) == 4
        with Watch(swarm, name) as watch:
            out = cli(swarm, "service", "update", "--update-parallelism", "2",
                      "--update-delay", "1s", "--update-order", "start-first",
                      "--env-add", "GEN=2", name)  # fmt: skip
            svc = wait_state(sdk, name, "completed")
            watch.reach("completed")
        assert CONVERGED.search(out.stdout), out.stdout
        assert watch.states == ["updating", "completed"]
        status = svc["UpdateStatus"]
        assert status["Message"] == "update completed"
        assert seconds(before["CreatedAt"]) < seconds(status["StartedAt"])
        assert seconds(status["StartedAt"]) + 2 < seconds(status["CompletedAt"])  # the delay
        assert svc["PreviousSpec"] == before["Spec"]
        config = svc["Spec"]["UpdateConfig"]
        assert config["Parallelism"] == 2 and config["Delay"] == SECOND
        assert config["Order"] == "start-first"
        assert container_spec(svc["Spec"])["Env"] == ["GEN=2"]
        new = running(sdk, name)
        assert len(new) == 4 and not old & {t["ID"] for t in new}
        assert all(container_spec(t["Spec"])["Env"] == ["GEN=2"] for t in new)
        # parallelism 2: two new tasks at once; delay 1 s: the next two at least a second later
        made = sorted(seconds(t["CreatedAt"]) for t in new)
        assert made[1] - made[0] < 0.5 and made[2] - made[0] >= 1.0, made
        # start-first: a slot's old task stops only once its new one runs (so, for a while,
        # more than 4 run)
        everything = tasks(sdk, name)
        for t in new:
            [prev] = [p for p in everything if p["Slot"] == t["Slot"] and p["ID"] in old]
            assert prev["Status"]["State"] == "shutdown", prev["Status"]
            assert seconds(prev["Status"]["Timestamp"]) > seconds(t["Status"]["Timestamp"])
        assert watch.most_running > 4


def test_docker_service_rollback_restores_the_previous_spec_exactly(swarm: Lab, sdk: Any) -> None:
    addr = registry.address(swarm)
    registry.push(addr, "t/micro", "v2", rootfs.micro())
    with created(swarm, "back", "--replicas", "2", "--env", "A=1", "--env", "B=1",
                 "--publish", "30810:8000", "--update-monitor", "1s", "--rollback-monitor", "1s",
                 "micro") as name:  # fmt: skip
        before = inspect(sdk, name)
        assert published(before) == [30810]
        cli(swarm, "service", "update", "--image", f"{addr}/t/micro:v2", "--env-rm", "A",
            "--env-add", "C=3", "--publish-rm", "8000", "--publish-add", "30811:8000",
            name)  # fmt: skip
        updated = wait_state(sdk, name, "completed")
        cs = container_spec(updated["Spec"])
        assert cs["Image"].startswith(f"{addr}/t/micro:v2@sha256:")
        # the docker CLI merges --env-add through a Go map: the order it sends is random
        assert sorted(cs["Env"]) == ["B=1", "C=3"]
        assert published(updated) == [30811]
        wait(lambda: serves(swarm, 30811) and not serves(swarm, 30810), "30811 instead of 30810")

        out = cli(swarm, "service", "rollback", name)
        assert "rollback: manually requested rollback" in out.stdout
        back = wait_state(sdk, name, "rollback_completed")
        assert back["Spec"] == before["Spec"]  # exactly
        cs = container_spec(back["Spec"])
        assert cs["Image"] == container_spec(before["Spec"])["Image"]
        assert cs["Env"] == ["A=1", "B=1"]
        assert back["Spec"]["EndpointSpec"] == before["Spec"]["EndpointSpec"]
        assert published(back) == [30810]  # what the mesh publishes came back too
        status = back["UpdateStatus"]
        assert status["Message"] == "rollback completed"
        assert seconds(status["StartedAt"]) < seconds(status["CompletedAt"])
        assert back["PreviousSpec"] == updated["Spec"]  # so that a rollback undoes a rollback
        up = running(sdk, name)
        assert len(up) == 2
        assert all(container_spec(t["Spec"]) == container_spec(before["Spec"]) for t in up)
        wait(lambda: serves(swarm, 30810) and not serves(swarm, 30811), "30810 again")

        # `service update --rollback` sends the same request: the update comes back
        out = cli(swarm, "service", "update", "--rollback", name)
        assert "rollback: manually requested rollback" in out.stdout
        again = wait_state(sdk, name, "rollback_completed", after=back)
        assert again["Spec"] == updated["Spec"] and again["PreviousSpec"] == before["Spec"]
        assert published(again) == [30811]
        wait(lambda: serves(swarm, 30811) and not serves(swarm, 30810), "30811 again")


def test_the_sdk_updates_and_rolls_back_to_the_previous_spec_exactly(swarm: Lab, sdk: Any) -> None:
    addr = registry.address(swarm)
    registry.push(addr, "t/micro", "v2", rootfs.micro())
    name = "sdkback"
    sdk.services.create(
        "micro",
        name=name,
        env=["A=1"],
        mode=docker.types.ServiceMode("replicated", 2),
        endpoint_spec=docker.types.EndpointSpec(ports={30812: 8000}),
        update_config=docker.types.UpdateConfig(monitor=SECOND, failure_action="pause"),
        rollback_config=docker.types.RollbackConfig(parallelism=2, monitor=SECOND),
    )
    try:
        wait(lambda: len(running(sdk, name)) == 2, "2 tasks")
        before = inspect(sdk, name)
        with Watch(swarm, name) as watch:
            sdk.services.get(name).update(
                fetch_current_spec=True,
                image=f"{addr}/t/micro:v2",
                env=["A=2", "S=1"],
                endpoint_spec=docker.types.EndpointSpec(ports={30813: 8000}),
                update_config=docker.types.UpdateConfig(
                    parallelism=2, order="start-first", monitor=SECOND, failure_action="pause"
                ),
            )
            updated = wait_state(sdk, name, "completed")
            watch.reach("completed")
            assert updated["PreviousSpec"] == before["Spec"]
            assert container_spec(updated["Spec"])["Env"] == ["A=2", "S=1"]
            assert published(updated) == [30813]
            rollback(sdk, name)
            back = wait_state(sdk, name, "rollback_completed")
            watch.reach("rollback_completed")
        assert watch.states == ["updating", "completed", "rollback_started", "rollback_completed"]
        assert back["Spec"] == before["Spec"]  # exactly
        assert container_spec(back["Spec"])["Image"] == container_spec(before["Spec"])["Image"]
        assert container_spec(back["Spec"])["Env"] == ["A=1"]
        assert published(back) == [30812]
        assert back["UpdateStatus"]["Message"] == "rollback completed"
        up = running(sdk, name)
        assert len(up) == 2
        assert all(container_spec(t["Spec"])["Env"] == ["A=1"] for t in up)
        wait(lambda: serves(swarm, 30812) and not serves(swarm, 30813), "30812 again")
    finally:
        sdk.services.get(name).remove()


def test_a_failed_update_rolls_back_by_itself(swarm: Lab, sdk: Any) -> None:
    with created(swarm, "auto", "--replicas", "2", "--env", "A=1", "--publish", "30814:8000",
                 "--update-monitor", "1s", "--rollback-monitor", "1s",
                 "micro") as name:  # fmt: skip
        before = inspect(sdk, name)
        # the CLI: a task that exits 1 at once
        out = cli(swarm, "service", "update", "--update-failure-action", "rollback",
                  "--update-monitor", "3s", "--env-add", "A=2", "--publish-rm", "8000",
                  "--publish-add", "30815:8000", "--args", FAIL, name)  # fmt: skip
        # (the CLI says which task failed when it sees the rollback start: here it may not,
        # the rollback has no slot to change, the failed task's is the restart policy's)
        assert "rollback: " + ROLLED_BACK in out.stdout or (
            "rollback: rollback completed" in out.stdout
        )
        back = wait_state(sdk, name, "rollback_completed")
        assert back["Spec"] == before["Spec"]  # exactly
        assert published(back) == [30814]
        assert "PreviousSpec" not in back  # swarmkit clears it: no rollback of a rollback
        assert back["UpdateStatus"]["Message"] == "rollback completed"
        tried = [t for t in tasks(sdk, name) if container_spec(t["Spec"]).get("Args")]
        assert tried and all(t["DesiredState"] == "shutdown" for t in tried)
        assert {(t["Status"]["State"], t["Status"]["Err"]) for t in tried} == {
            ("failed", "task: non-zero exit (1)")
        }
        assert all(container_spec(t["Spec"])["Args"] == ["sh", "-c", "exit 1"] for t in tried)
        wait(lambda: converged(sdk, name, 2, Env=["A=1"], Args=None), "2 tasks rolled back")
        up = running(sdk, name)
        assert all(container_spec(t["Spec"]) == container_spec(before["Spec"]) for t in up)
        wait(lambda: serves(swarm, 30814) and not serves(swarm, 30815), "30814 again")
        refused = cli(swarm, "service", "rollback", name, check=False)
        assert refused.returncode != 0
        assert "does not have a previous spec" in refused.stderr

        # the SDK: a health check that never passes
        with Watch(swarm, name) as watch:
            sdk.services.get(name).update(
                fetch_current_spec=True,
                env=["A=3"],
                healthcheck=docker.types.Healthcheck(
                    test=["CMD", "false"], interval=SECOND, timeout=SECOND, retries=1
                ),
                update_config=docker.types.UpdateConfig(failure_action="rollback", monitor=SECOND),
            )
            again = wait_state(sdk, name, "rollback_completed", after=back)
            watch.reach("rollback_completed")
        # (rollback_started may be too short to see: the failed slots are the restart
        # policy's, the rollback has none left to change)
        seen = [state for state in watch.states if state != "rollback_started"]
        assert seen[-2:] == ["updating", "rollback_completed"], watch.states
        assert again["Spec"] == before["Spec"]
        tried = [t for t in tasks(sdk, name) if container_spec(t["Spec"])["Env"] == ["A=3"]]
        assert tried and all(t["DesiredState"] == "shutdown" for t in tried)
        assert "unhealthy container" in {t["Status"]["Err"] for t in tried}
        wait(lambda: converged(sdk, name, 2, Env=["A=1"], Healthcheck=None), "2 rolled back")


def test_a_failed_update_pauses_and_the_next_update_resumes_it(swarm: Lab, sdk: Any) -> None:
    with created(swarm, "pausing", "--replicas", "2", "--update-monitor", "1s",
                 "micro") as name:  # fmt: skip
        old = {t["ID"] for t in running(sdk, name)}
        out = cli(swarm, "service", "update", "--update-failure-action", "pause",
                  "--args", FAIL, name, check=False)  # fmt: skip
        assert out.returncode != 0
        paused = wait_state(sdk, name, "paused")
        status = paused["UpdateStatus"]
        assert f"service update paused: {status['Message']}" in out.stderr
        assert status["StartedAt"] and "CompletedAt" not in status
        failed = task(sdk, named_task(status["Message"], PAUSED))
        assert failed["Status"]["Err"] == "task: non-zero exit (1)"
        # paused: the other slot keeps its task of the old spec
        time.sleep(1.5)
        assert update_state(inspect(sdk, name)) == "paused"
        kept = [t for t in running(sdk, name) if t["ID"] in old]
        assert len(kept) == 1 and "Args" not in container_spec(kept[0]["Spec"])

        # the next update (the SDK's) resumes it, with its own spec
        sdk.services.get(name).update(fetch_current_spec=True, args=["sh", "-c", SERVE])
        done = wait_state(sdk, name, "completed", after=paused)
        assert done["UpdateStatus"]["Message"] == "update completed"
        # (the failed slot's new task may come after the update: the restart policy's delay)
        wait(lambda: converged(sdk, name, 2, Args=["sh", "-c", SERVE]), "2 tasks, resumed")
        assert not old & {t["ID"] for t in running(sdk, name)}


def without_force(spec: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    out["TaskTemplate"].pop("ForceUpdate", None)
    return out


def test_force_redeploys_every_task_with_the_same_spec(swarm: Lab, sdk: Any) -> None:
    with created(swarm, "forced", "--replicas", "2", "--env", "A=1", "--update-monitor", "1s",
                 "micro") as name:  # fmt: skip
        before = inspect(sdk, name)
        assert before["Spec"]["TaskTemplate"].get("ForceUpdate", 0) == 0
        old = {t["ID"] for t in running(sdk, name)}
        cli(swarm, "service", "update", "--force", name)
        forced = wait_state(sdk, name, "completed")
        assert forced["Spec"]["TaskTemplate"]["ForceUpdate"] == 1
        assert without_force(forced["Spec"]) == without_force(before["Spec"])
        up = running(sdk, name)
        assert len(up) == 2 and not old & {t["ID"] for t in up}
        assert all(container_spec(t["Spec"]) == container_spec(before["Spec"]) for t in up)

        # the SDK's force_update (ForceUpdate + 1)
        sdk.services.get(name).update(fetch_current_spec=True, force_update=True)
        again = wait_state(sdk, name, "completed", after=forced)
        assert again["Spec"]["TaskTemplate"]["ForceUpdate"] == 2
        for key in ("Image", "Env"):
            assert container_spec(again["Spec"])[key] == container_spec(before["Spec"])[key]
        latest = running(sdk, name)
        assert len(latest) == 2 and not {t["ID"] for t in up} & {t["ID"] for t in latest}


def test_detach_returns_before_the_update_is_done_and_without_it_the_cli_waits(
    swarm: Lab, sdk: Any
) -> None:
    with created(swarm, "detached", "--replicas", "2", "--update-parallelism", "1",
                 "--update-delay", "2s", "--update-monitor", "1s", "micro") as name:  # fmt: skip
        start = time.monotonic()
        out = cli(swarm, "service", "update", "--detach", "--env-add", "X=1", name)
        took = time.monotonic() - start
        svc = inspect(sdk, name)
        assert out.stdout.strip() == name
        assert took < 1.5, took  # the update itself takes its 2 s delay at least
        assert update_state(svc) in ("", "updating")
        assert not all(container_spec(t["Spec"]).get("Env") == ["X=1"] for t in running(sdk, name))
        done = wait_state(sdk, name, "completed")
        assert all(container_spec(t["Spec"])["Env"] == ["X=1"] for t in running(sdk, name))

        start = time.monotonic()
        out = cli(swarm, "service", "update", "--env-add", "X=2", name)
        took = time.monotonic() - start
        assert took >= 2.0, took
        assert CONVERGED.search(out.stdout), out.stdout
        current = [t for t in tasks(sdk, name) if t["DesiredState"] == "running"]
        assert len(current) == 2
        assert all(t["Status"]["State"] == "running" for t in current)
        assert all(container_spec(t["Spec"])["Env"] == ["X=2"] for t in current)
        wait_state(sdk, name, "completed", after=done)


def cli_states(lab: Lab, name: str) -> dict[str, str]:
    """`docker service ps`: task ID -> the first word of its CURRENT STATE."""
    out = cli(lab, "service", "ps", "--no-trunc", "--format", "{{.ID}} {{.CurrentState}}", name)
    return {line.split()[0]: line.split()[1] for line in out.stdout.splitlines() if line.strip()}


def watch_start(lab: Lab, sdk: Any, name: str, replicas: int) -> tuple[set[str], set[str]]:
    """Until `replicas` tasks run: the states the SDK and `docker service ps` showed."""
    by_sdk: set[str] = set()
    by_cli: set[str] = set()

    def all_up() -> bool:
        by_sdk.update(t["Status"]["State"] for t in tasks(sdk, name))
        by_cli.update(cli_states(lab, name).values())
        return len(running(sdk, name)) == replicas

    wait(all_up, f"{replicas} tasks of {name} healthy")
    return by_sdk, by_cli


def test_a_health_check_holds_a_task_starting_and_an_unhealthy_task_is_replaced(
    swarm: Lab, sdk: Any
) -> None:
    with created(swarm, "checked", "--detach", "--replicas", "2", "--restart-delay", "1s",
                 "--health-cmd", "test -f /tmp/ok", "--health-interval", "1s",
                 "--health-timeout", "1s", "--health-retries", "3",
                 "micro", "sh", "-c", SERVE_READY_LATER) as name:  # fmt: skip
        by_sdk, by_cli = watch_start(swarm, sdk, name, 2)
        assert "starting" in by_sdk and "Starting" in by_cli
        assert container_spec(inspect(sdk, name)["Spec"])["Healthcheck"] == {
            "Test": ["CMD-SHELL", "test -f /tmp/ok"],
            "Interval": SECOND,
            "Timeout": SECOND,
            "Retries": 3,
        }
        for t in running(sdk, name):  # each ran only once its check passed (/tmp/ok: 1 s)
            assert seconds(t["Status"]["Timestamp"]) - seconds(t["CreatedAt"]) > 1.0

        # one task's check starts failing: it fails, and a new task takes its slot
        victim, other = running(sdk, name)
        node = sdk.nodes.get(victim["NodeID"]).attrs["Description"]["Hostname"]
        label = f"label=com.docker.swarm.task.id={victim['ID']}"
        container = docker_cli(swarm, node, "ps", "-q", "--filter", label).strip()
        assert container, victim
        docker_cli(swarm, node, "exec", container, "rm", "/tmp/ok")
        wait(lambda: task(sdk, victim["ID"])["Status"]["State"] == "failed", "unhealthy task")
        assert task(sdk, victim["ID"])["Status"]["Err"] == "unhealthy container"
        wait(
            lambda: any(t["Slot"] == victim["Slot"] for t in running(sdk, name)),
            "a new task in the slot",
        )
        assert other["ID"] in {t["ID"] for t in running(sdk, name)}  # the other is left alone
        ps = cli(swarm, "service", "ps", "--no-trunc", name).stdout
        [line] = [x for x in ps.splitlines() if victim["ID"] in x]
        assert "Failed" in line and '"unhealthy container"' in line


def test_a_check_that_never_passes_pauses_the_update_without_a_replacement_loop(
    swarm: Lab, sdk: Any
) -> None:
    with created(swarm, "never", "--replicas", "2", "--update-monitor", "1s",
                 "micro") as name:  # fmt: skip
        old = {t["ID"] for t in running(sdk, name)}
        out = cli(swarm, "service", "update", "--health-cmd", "false", "--health-interval", "1s",
                  "--health-retries", "1", name, check=False)  # fmt: skip
        assert out.returncode != 0
        paused = wait_state(sdk, name, "paused")
        message = paused["UpdateStatus"]["Message"]
        assert f"service update paused: {message}" in out.stderr
        failed = task(sdk, named_task(message, PAUSED))
        assert failed["Status"]["State"] == "failed"
        assert failed["Status"]["Err"] == "unhealthy container"
        assert container_spec(failed["Spec"])["Healthcheck"]["Test"] == ["CMD-SHELL", "false"]

        # paused: only the restart policy (its 5 s delay) remakes the failed slot's task, not
        # the updater at full speed; the other slot keeps its task
        count = len(tasks(sdk, name))
        time.sleep(10)
        made = len(tasks(sdk, name)) - count
        assert made <= 3, made
        assert update_state(inspect(sdk, name)) == "paused"
        assert len([t for t in running(sdk, name) if t["ID"] in old]) == 1

        # the next update resumes it: --no-healthcheck
        cli(swarm, "service", "update", "--no-healthcheck", name)
        done = wait_state(sdk, name, "completed", after=paused)
        assert container_spec(done["Spec"])["Healthcheck"] == {"Test": ["NONE"]}
        wait(lambda: converged(sdk, name, 2, Healthcheck={"Test": ["NONE"]}), "2 tasks")
        assert not old & {t["ID"] for t in running(sdk, name)}


def test_an_image_healthcheck_is_honoured_and_none_turns_it_off(swarm: Lab, sdk: Any) -> None:
    addr = registry.address(swarm)
    base = rootfs.micro()
    check = {"Test": ["CMD-SHELL", "test -f /tmp/ok"], "Interval": SECOND,
             "Timeout": SECOND, "Retries": 2}  # fmt: skip
    registry.push(
        addr, "t/checked", "v1", rootfs.Image(base.layer, {**base.config, "Healthcheck": check})
    )
    name = "imagecheck"
    sdk.services.create(
        f"{addr}/t/checked:v1",
        ["sh", "-c", SERVE_READY_LATER],
        name=name,
        mode=docker.types.ServiceMode("replicated", 2),
        update_config=docker.types.UpdateConfig(monitor=SECOND, failure_action="pause"),
    )
    try:
        by_sdk, by_cli = watch_start(swarm, sdk, name, 2)
        assert "starting" in by_sdk and "Starting" in by_cli  # the image's check, not the spec's
        assert "Healthcheck" not in container_spec(inspect(sdk, name)["Spec"])
        for t in running(sdk, name):
            assert seconds(t["Status"]["Timestamp"]) - seconds(t["CreatedAt"]) > 1.0

        # NONE: tasks that never make /tmp/ok run, and keep running past when the image's
        # check (2 failures 1 s apart) would have failed them
        sdk.services.get(name).update(
            fetch_current_spec=True,
            command=["sh", "-c", SERVE],
            healthcheck=docker.types.Healthcheck(test=["NONE"]),
        )
        wait_state(sdk, name, "completed")
        up = {t["ID"]: t for t in running(sdk, name)}
        assert len(up) == 2
        since = max(seconds(t["Status"]["Timestamp"]) for t in up.values())
        time.sleep(max(0.0, since + 4 - time.time()))
        assert set(up) == {t["ID"] for t in running(sdk, name)}
        assert not [t for t in tasks(sdk, name) if t["Status"]["State"] == "failed"]
    finally:
        sdk.services.get(name).remove()


def test_bad_updates_are_refused(swarm: Lab, sdk: Any) -> None:
    with created(swarm, "strict", "--replicas", "1", "--update-monitor", "1s",
                 "micro") as name:  # fmt: skip
        svc = inspect(sdk, name)
        stale = svc["Version"]["Index"]
        sdk.api.update_service(svc["ID"], stale, fetch_current_spec=True, labels={"n": "1"})
        with pytest.raises(docker.errors.APIError) as info:
            sdk.api.update_service(svc["ID"], stale, fetch_current_spec=True, labels={"n": "2"})
        assert info.value.status_code == 500
        assert "update out of sequence" in str(info.value.explanation)
        svc = inspect(sdk, name)
        assert svc["Spec"]["Labels"] == {"n": "1"}
        tasks_before = {t["ID"] for t in tasks(sdk, name)}

        for kind, config, field in [
            ("update_config", {"Delay": -1}, "UpdateConfig.Delay"),
            ("update_config", {"Monitor": -SECOND}, "UpdateConfig.Monitor"),
            ("update_config", {"MaxFailureRatio": 1.5}, "UpdateConfig.MaxFailureRatio"),
            ("update_config", {"MaxFailureRatio": -0.1}, "UpdateConfig.MaxFailureRatio"),
            ("update_config", {"Order": "sideways"}, "UpdateConfig.Order"),
            ("update_config", {"FailureAction": "explode"}, "UpdateConfig.FailureAction"),
            ("rollback_config", {"Delay": -1}, "RollbackConfig.Delay"),
            ("rollback_config", {"Order": "sideways"}, "RollbackConfig.Order"),
            ("rollback_config", {"FailureAction": "rollback"}, "RollbackConfig.FailureAction"),
        ]:
            with pytest.raises(docker.errors.APIError) as info:
                sdk.api.update_service(
                    svc["ID"], svc["Version"]["Index"], fetch_current_spec=True, **{kind: config}
                )
            assert info.value.status_code == 400, (config, info.value)
            assert str(info.value.explanation).startswith(field + ":"), info.value.explanation
        try:
            with pytest.raises(docker.errors.APIError) as info:
                sdk.services.create("micro", name="refused", update_config={"Order": "sideways"})
        finally:
            cli(swarm, "service", "rm", "refused", check=False)
        assert info.value.status_code == 400
        assert "UpdateConfig.Order" in str(info.value.explanation)

        for flag, field in [
            ("--update-delay=-1s", "UpdateConfig.Delay"),
            ("--update-max-failure-ratio=1.5", "UpdateConfig.MaxFailureRatio"),
            ("--update-order=sideways", "UpdateConfig.Order"),
        ]:
            out = cli(swarm, "service", "update", "--detach", flag, name, check=False)
            assert out.returncode != 0
            assert f"Error response from daemon: {field}:" in out.stderr, out.stderr

        # nothing of it was applied
        assert inspect(sdk, name)["Version"] == svc["Version"]
        assert {t["ID"] for t in tasks(sdk, name)} == tasks_before


def test_an_update_during_a_rollback_follows_swarmkit(swarm: Lab, sdk: Any) -> None:
    """swarmkit's controlapi UpdateService: an update is taken whatever the UpdateStatus; its
    spec becomes the spec, the spec being rolled back to the previous one, and UpdateStatus
    starts afresh: the rollback stops, the new update runs."""
    with created(swarm, "midway", "--replicas", "2", "--env", "V=1",
                 "--update-parallelism", "0", "--update-monitor", "1s",
                 "--rollback-parallelism", "1", "--rollback-delay", "3s",
                 "--rollback-monitor", "1s", "micro") as name:  # fmt: skip
        original = inspect(sdk, name)
        cli(swarm, "service", "update", "--env-add", "V=2", name)
        updated = wait_state(sdk, name, "completed")
        rollback(sdk, name)
        rolling = wait_state(sdk, name, "rollback_started")
        assert rolling["Spec"] == original["Spec"]
        wait(
            lambda: any(container_spec(t["Spec"])["Env"] == ["V=1"] for t in running(sdk, name)),
            "a slot rolled back",
        )
        # the 3 s rollback delay holds the other slot
        assert update_state(inspect(sdk, name)) == "rollback_started"
        cli(swarm, "service", "update", "--detach", "--env-add", "V=3", name)
        taken = inspect(sdk, name)
        assert container_spec(taken["Spec"])["Env"] == ["V=3"]
        assert taken["PreviousSpec"] == original["Spec"]
        assert update_state(taken) in ("", "updating")
        done = wait_state(sdk, name, "completed", after=updated)
        assert done["UpdateStatus"]["Message"] == "update completed"
        assert seconds(done["UpdateStatus"]["StartedAt"]) > seconds(
            rolling["UpdateStatus"]["StartedAt"]
        )
        up = running(sdk, name)
        assert len(up) == 2
        assert all(container_spec(t["Spec"])["Env"] == ["V=3"] for t in up)
