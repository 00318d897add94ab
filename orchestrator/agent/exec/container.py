"""The container executor: every task a container of its image, run by the node's engine
(docs/container-executor.md). As swarmkit's agent/exec/dockerapi does, with the network from
the mesh rather than from the engine, in place before the task's process starts:

- PREPARING: the image is pulled (once for all tasks wanting it at the same time; a digest
  already here is not asked for again) and the task's container created, network `none`, its
  hostname, resolv.conf naming the mesh's resolver at 127.0.0.11, and its command behind a
  *gate*: the engine starts `/.shoal/busybox sh -c 'read < /.shoal/go && exec ...'` (a
  read-only bind of the executor's own static busybox and a FIFO), which holds the container's
  network namespace while the task's own program has not run yet. The namespace is named
  `<node prefix>-<task id[:12]>` (`ip netns attach`) for the mesh to plug.
- READY once the mesh has plugged it; STARTING, RUNNING: the executor writes to the FIFO and
  the gate `exec`s the task's command (the image's entrypoint and command, or the spec's), with
  the container's environment as the engine made it: an application connecting to a service
  name at its first instruction succeeds. One container per task, as Docker runs.
- The engine's event stream says when it exits (exit code, OOM kill).
- Releasing a task removes its namespace and gate and keeps its stopped container, whose logs
  `service logs` reads, until the managers delete the task (the sweep).

Everything made carries Docker's swarm labels (`com.docker.swarm.task.id`, `.node.id`, ...),
so a restarted shoald finds what its predecessor left: it removes every running container of
its node before running anything (Docker without live-restore), and keeps stopped ones until
their tasks are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker.errors
import docker.types

from orchestrator.agent.exec import health
from orchestrator.agent.exec.base import (
    LABEL_NODE_ID,
    LABEL_TASK_ID,
    EngineUnavailable,
    Exit,
    LogEntry,
    Rejected,
    StartFailed,
    TaskInfo,
    default_hostname,
)
from orchestrator.agent.exec.engine import Engine, decode_registry_auth, explain
from orchestrator.agent.exec.health import Check
from orchestrator.agent.exec.netns import (
    NamespaceRemover,
    netns_name,
)
from orchestrator.agent.exec.process import run_quietly
from orchestrator.images import reference, rootfs
from orchestrator.manager.spec import MountSpec, health_view
from orchestrator.manager.templates import expand

log = logging.getLogger(__name__)

LABEL_TTY = "com.shoal.tty"  # its logs are one stream, not multiplexed
GATE_MOUNT = "/.shoal"  # in the container: the gate's busybox and FIFO, read-only
# The gate: wait for the executor's word, then become the task's command. busybox sh exports
# SHLVL and PWD of its own: `env -u` takes them out again (unless the container's own
# environment has them), so the command gets exactly the environment the engine made.
GATE_SCRIPT = 'read -r _ < {mount}/go && exec {mount}/busybox env {unset}-- "$@"'
GATE_OPEN_TIMEOUT = 10.0  # seconds for the gate's shell to be waiting on its FIFO


class ContainerExecutor:
    kind = "container"

    def __init__(self, engine: Engine, netns_prefix: str, state_dir: Path):
        self.engine = engine
        self.netns_prefix = netns_prefix
        self.gates = state_dir / "gates"  # a directory per task: busybox (a link) and its FIFO
        self.node_id = ""
        self._pulls: dict[str, asyncio.Future[None]] = {}  # image -> the pull under way
        self._configs: dict[str, dict[str, Any]] = {}  # pinned image -> its config
        self._cleanup: asyncio.Future[list[str]] | None = None
        self.live: dict[str, ContainerController] = {}  # task id -> controller, until released
        self.namespaces = NamespaceRemover()

    async def start(self, node_id: str) -> None:
        self.node_id = node_id
        self.engine.on_change = self._engine_changed
        self.engine.start(f"{LABEL_NODE_ID}={node_id}")
        try:
            removed = await self._remove_strays()
        except EngineUnavailable as e:
            log.error("%s; its tasks wait for it", e)
            removed = []
        removed += await self.namespaces.remove_leftovers(self.netns_prefix)
        await asyncio.to_thread(self._reset_gates)
        if removed:
            log.warning(
                "removed %d containers and namespaces an earlier shoald left (%s); the "
                "managers' assignments start their tasks again",
                len(removed),
                ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""),
            )

    async def close(self) -> None:
        await self.engine.close()

    def controller(self, task: TaskInfo) -> ContainerController:
        return ContainerController(self, task)

    def description(self) -> dict[str, Any]:
        return {"executor": self.kind, "images": []}

    def info(self) -> dict[str, Any]:
        i = self.engine.info
        return {
            "OperatingSystem": f"Shoal (container executor: Docker Engine {self.engine.version})",
            "Driver": str(i.get("Driver", "")),
            "Containers": int(i.get("Containers", 0)),
            "ContainersRunning": int(i.get("ContainersRunning", 0)),
            "ContainersStopped": int(i.get("ContainersStopped", 0)),
            "Images": int(i.get("Images", 0)),
            "RegistryConfig": i.get("RegistryConfig"),
        }

    def health(self) -> str | None:
        return self.engine.down_reason

    # ---- the gate -------------------------------------------------------------------------

    def _reset_gates(self) -> None:
        """No task is ours yet: the gates an earlier shoald left go; a fresh busybox."""
        shutil.rmtree(self.gates, ignore_errors=True)
        self.gates.mkdir(parents=True, mode=0o755)
        shutil.copy2(rootfs.busybox_path(), self.gates / "busybox")
        os.chmod(self.gates / "busybox", 0o755)

    def make_gate(self, task_id: str) -> Path:
        """The task's gate directory: busybox (linked, not copied) and a FIFO."""
        gate = self.gates / task_id
        shutil.rmtree(gate, ignore_errors=True)
        gate.mkdir(mode=0o755)
        os.link(self.gates / "busybox", gate / "busybox")
        os.mkfifo(gate / "go")
        os.chmod(gate / "go", 0o666)  # the task's user, whoever it is, reads it
        return gate

    # ---- images ---------------------------------------------------------------------------

    async def image(self, image: str, auth: str) -> dict[str, Any]:
        """The image's config (Entrypoint, Cmd, Env, ...), pulled first if need be, once for
        everyone wanting it at the same time. A digest already here is not asked for again
        (and its config is remembered: it cannot change); a tag is pulled each time (it may have
        moved), but if the registry cannot be reached and the image is here, the task runs
        what is here (Docker's behaviour)."""
        ref = reference.parse(image)
        if ref.digest:
            known = self._configs.get(image) or await self._config(image)
            if known is not None:
                self._configs[image] = known
                return known
        running = self._pulls.get(image)
        if running is None:
            running = self._pulls[image] = asyncio.ensure_future(self._pull(ref, auth))
            running.add_done_callback(lambda _: self._pulls.pop(image, None))
        try:
            await asyncio.shield(running)
        except docker.errors.APIError as e:
            here = await self._config(image)
            if here is None:
                raise Rejected(f"pulling image {image}: {explain(e)}") from None
            log.warning("pulling %s failed (%s); using the image already here", image, e)
            return here
        config = await self._config(image)
        if config is None:
            raise Rejected(f"image {image} is not in the engine after its pull")
        if ref.digest:
            self._configs[image] = config
        return config

    async def _pull(self, ref: reference.Reference, auth: str) -> None:
        tag = ref.digest or ref.tag or "latest"
        credentials = decode_registry_auth(auth)

        def pull(api: docker.APIClient) -> None:
            # The progress stream carries errors that come after a 200 (an unknown manifest).
            for line in api.pull(
                ref.name, tag=tag, stream=True, decode=True, auth_config=credentials
            ):
                if isinstance(line, dict) and line.get("error"):
                    raise docker.errors.APIError(str(line["error"]))

        await self.engine.call(pull)

    async def _config(self, image: str) -> dict[str, Any] | None:
        """The config of the image if the engine has it."""
        try:
            found = await self.engine.call(lambda api: api.inspect_image(image))
        except docker.errors.ImageNotFound:
            return None
        return dict(found.get("Config") or {})

    async def distribution(self, image: str, auth: str) -> dict[str, Any]:
        try:
            found: dict[str, Any] = await self.engine.call(
                lambda api: api.inspect_distribution(image, auth_config=decode_registry_auth(auth))
            )
        except (EngineUnavailable, docker.errors.APIError) as e:
            raise LookupError(explain(e)) from None
        return found

    # ---- leftovers, and stopped containers the managers no longer need ---------------------

    async def _ours(self) -> list[dict[str, Any]]:
        return await self.engine.call(
            lambda api: api.containers(
                all=True, filters={"label": f"{LABEL_NODE_ID}={self.node_id}"}
            )
        )

    async def _remove_strays(self) -> list[str]:
        """Every running container of this node that is not a live task's (an earlier
        shoald's, or failed while the engine was away); stopped ones stay for their logs until
        the sweep."""
        removed = []
        for c in await self._ours():
            labels = c.get("Labels") or {}
            if labels.get(LABEL_TASK_ID, "") in self.live:
                continue
            if c.get("State") == "running":
                await self._remove_container(c["Id"])
                removed.append(str((c.get("Names") or [c["Id"][:12]])[0]).lstrip("/"))
        return removed

    async def sweep(self, keep: set[str]) -> None:
        try:
            containers = await self._ours()
        except (EngineUnavailable, docker.errors.APIError):
            return  # the next sweep, once it answers
        for c in containers:
            task_id = (c.get("Labels") or {}).get(LABEL_TASK_ID, "")
            if task_id not in keep and task_id not in self.live:
                with contextlib.suppress(EngineUnavailable, docker.errors.APIError):
                    await self._remove_container(c["Id"])

    def _engine_changed(self) -> None:
        if self.engine.down_reason is None:  # back: what failed while it was away goes
            self._cleanup = asyncio.ensure_future(self._remove_strays())

    async def _remove_container(self, cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await self.engine.call(lambda api: api.remove_container(cid, force=True, v=True))

    # ---- logs -----------------------------------------------------------------------------

    async def logs(
        self, task_id: str, tail: int | None, since_ns: int, follow: bool
    ) -> AsyncIterator[LogEntry]:
        found = await self.engine.call(
            lambda api: api.containers(all=True, filters={"label": f"{LABEL_TASK_ID}={task_id}"})
        )
        if not found:
            return
        tty = (found[0].get("Labels") or {}).get(LABEL_TTY) == "true"
        async for entry in self.engine.logs(found[0]["Id"], tail, since_ns, follow, tty):
            yield entry


class ContainerController:
    def __init__(self, executor: ContainerExecutor, task: TaskInfo):
        self.executor = executor
        self.engine = executor.engine
        self.task = task
        self._netns = netns_name(executor.netns_prefix, task.id)
        self._netns_made = False
        self.container_id = ""
        self.pid = 0
        self.gate: Path | None = None
        self.exit: asyncio.Future[Exit] | None = None  # its exit, watched from before it starts
        self.check: Check | None = None
        self.stop_signal = "SIGTERM"

    @property
    def netns(self) -> str:
        return self._netns

    @property
    def netns_made(self) -> bool:
        return self._netns_made

    @property
    def hostname(self) -> str:
        given = self.task.spec.hostname
        return (
            expand(given, self.task.template_context) if given else default_hostname(self.task.id)
        )

    def _labels(self) -> dict[str, str]:
        tty = {LABEL_TTY: "true"} if self.task.spec.tty else {}
        return {**self.task.labels, **tty}

    async def prepare(self) -> None:
        """Pull, create, start behind the gate, name its namespace for the mesh."""
        self.executor.live[self.task.id] = self
        try:
            config = await self.executor.image(self.task.spec.image, self.task.registry_auth)
            argv, env = self._command(config)
            self.gate = await asyncio.to_thread(self.executor.make_gate, self.task.id)
            await self._create(argv, env, config)
            self.exit = self.engine.watch(self.container_id)
            await self.engine.call(lambda api: api.start(self.container_id))
            state = await self.engine.call(
                lambda api: api.inspect_container(self.container_id)["State"]
            )
        except docker.errors.APIError as e:
            raise Rejected(explain(e)) from None
        self.pid = int(state.get("Pid") or 0)
        if not state.get("Running") or not self.pid:
            raise Rejected(f"the container stopped before its network was ready: {state}")
        if await run_quietly("ip", "netns", "attach", self._netns, str(self.pid)) != 0:
            raise Rejected(f"cannot name the task's network namespace (process {self.pid})")
        self._netns_made = True

    def _command(self, config: dict[str, Any]) -> tuple[list[str], list[str]]:
        """What the gate becomes (Docker's rule: the spec's Command replaces the image's
        entrypoint and takes only the spec's Args; Args alone replace the image's Cmd), and the
        container's environment (templates expanded)."""
        spec, ctx = self.task.spec, self.task.template_context
        if spec.command:
            argv = [*spec.command, *spec.args]
        else:
            argv = [*(config.get("Entrypoint") or []), *(spec.args or config.get("Cmd") or [])]
        if not argv:
            raise Rejected(
                f"no command: image {spec.image} has no entrypoint or command, and the service "
                "gives none"
            )
        env = [
            f"{k}={expand(v, ctx)}" if sep else k
            for k, sep, v in (e.partition("=") for e in spec.env)
        ]
        return argv, env

    async def _create(self, argv: list[str], env: list[str], config: dict[str, Any]) -> None:
        spec, ctx = self.task.spec, self.task.template_context
        assert self.gate is not None
        ips = self.task.ips
        hostname = self.hostname
        have = {e.split("=", 1)[0] for e in [*(config.get("Env") or []), *env]}
        unset = "".join(f"-u {v} " for v in ("SHLVL", "PWD") if v not in have)
        script = GATE_SCRIPT.format(mount=GATE_MOUNT, unset=unset)
        gate_mount = docker.types.Mount(GATE_MOUNT, str(self.gate), type="bind", read_only=True)

        def create(api: docker.APIClient) -> str:
            host_config = api.create_host_config(
                network_mode="none",
                dns=["127.0.0.11"],
                dns_opt=["ndots:0"],
                extra_hosts={hostname: ips[0]} if ips else None,
                mounts=[*(_mount(m, ctx) for m in spec.mounts), gate_mount],
                read_only=spec.read_only or None,
                init=spec.init,
                mem_limit=spec.limits.memory_bytes or None,
                mem_reservation=spec.reservations.memory_bytes or None,
                nano_cpus=spec.limits.nano_cpus or None,
                pids_limit=spec.limits.pids or None,
                group_add=list(spec.groups) or None,
            )
            made = api.create_container(
                spec.image,
                name=self.task.name,
                hostname=hostname,
                entrypoint=[f"{GATE_MOUNT}/busybox", "sh", "-c", script, "shoal-gate", *argv],
                command=[],
                environment=env or None,
                user=spec.user or None,
                working_dir=spec.dir or None,
                labels=self._labels(),
                stop_signal=spec.stop_signal or None,
                stop_timeout=max(1, spec.stop_grace // 1_000_000_000),
                tty=spec.tty,
                healthcheck={"test": ["NONE"]},
                host_config=host_config,
            )
            return str(made["Id"])

        try:
            self.container_id = await self.engine.call(create)
        except docker.errors.APIError as e:
            if e.status_code != 409:  # a name conflict: a leftover of this very task
                raise
            await self.executor._remove_container(self.task.name)
            self.container_id = await self.engine.call(create)
        # Docker's own check is off (it would start probing while the gate holds the task):
        # the executor runs the spec's, else the image's, once the task's command runs
        self.check = health.resolve(spec.healthcheck, health_view(config.get("Healthcheck")))
        # the spec's stop signal, else the image's (the engine merged it), else SIGTERM
        self.stop_signal = str(config.get("StopSignal") or "SIGTERM")
        if spec.stop_signal:
            self.stop_signal = spec.stop_signal

    async def start(self) -> dict[str, Any]:
        """Open the gate: the task's command runs now."""
        assert self.gate is not None
        try:
            await asyncio.to_thread(_open_gate, self.gate / "go", self.pid)
        except OSError as e:
            raise StartFailed(f"starting the task's command failed: {e}") from None
        return {"ContainerID": self.container_id, "PID": self.pid}

    def health_check(self) -> Check | None:
        return self.check

    async def probe(self, argv: list[str]) -> int:
        """An exec in the container, as Docker's own health checks run."""

        def run(api: docker.APIClient) -> int:
            made = api.exec_create(self.container_id, argv, stdout=True, stderr=True)
            api.exec_start(made["Id"])
            return int(api.exec_inspect(made["Id"]).get("ExitCode") or 0)

        try:
            return await self.engine.call(run)
        except docker.errors.APIError:
            return -1

    async def wait(self) -> Exit:
        assert self.exit is not None
        return await asyncio.shield(self.exit)

    async def terminate(self) -> None:
        await self._signal(self.stop_signal)

    async def kill(self) -> None:
        await self._signal("SIGKILL")

    async def _signal(self, sig: str) -> None:
        if not self.container_id:
            return
        with contextlib.suppress(docker.errors.APIError):  # not running: its exit is coming
            await self.engine.call(lambda api: api.kill(self.container_id, signal=sig))

    async def remove(self) -> None:
        """Kill the task's process if it still runs, remove its namespace and gate; its
        stopped container stays for its logs."""
        if self.container_id:
            with contextlib.suppress(EngineUnavailable, docker.errors.APIError):
                state = await self.engine.call(
                    lambda api: api.inspect_container(self.container_id)["State"]
                )
                if state.get("Running"):
                    await self.kill()
        if self.container_id:
            self.engine.unwatch(self.container_id)
        # Its processes die with the namespace's, even when the engine does not answer.
        await self.executor.namespaces.remove(self._netns)
        self._netns_made = False
        if self.gate is not None:
            await asyncio.to_thread(shutil.rmtree, self.gate, True)
        self.executor.live.pop(self.task.id, None)


def _open_gate(fifo: Path, pid: int) -> None:
    """Tell the gate to go: once its shell waits on the FIFO (a non-blocking open for writing
    fails until a reader has it open), one line."""
    deadline = time.monotonic() + GATE_OPEN_TIMEOUT
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            if time.monotonic() > deadline or not Path(f"/proc/{pid}").exists():
                raise OSError(f"its gate (process {pid}) is not waiting") from None
            time.sleep(0.005)
    try:
        os.write(fd, b"go\n")
    finally:
        os.close(fd)


def _mount(m: MountSpec, ctx: Any) -> docker.types.Mount:
    driver = (
        docker.types.DriverConfig(m.volume_driver, dict(m.volume_options))
        if m.volume_driver
        else None
    )
    return docker.types.Mount(
        target=m.target,
        source=expand(m.source, ctx) if m.source else None,
        type=m.type,
        read_only=m.read_only,
        propagation=m.propagation or None,
        no_copy=m.no_copy,
        labels=dict(m.volume_labels) or None,
        driver_config=driver,
        tmpfs_size=m.tmpfs_size or None,
        tmpfs_mode=m.tmpfs_mode or None,
    )
