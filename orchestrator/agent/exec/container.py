"""The container executor: every task a container of its image, run by the node's engine
(docs/container-executor.md). As swarmkit's agent/exec/dockerapi does, with the network from
the mesh rather than from the engine:

- PREPARING: the image is pulled (once for all tasks wanting it at the same time; a digest
  already here is not asked for again); a *sandbox* container (`<task name>.sandbox`, the
  executor's own tiny image, network `none`, the task's hostname, resolv.conf naming the mesh's
  resolver at 127.0.0.11) is started to hold the task's network namespace, which is named
  `<node prefix>-<task id[:12]>` (`ip netns attach`) for the mesh to plug; the task's container
  is created, sharing the sandbox's network (`network_mode=container:`).
- READY once the mesh has plugged it; STARTING, RUNNING: the container starts, its network
  already there (an application connecting to a service name at its first instruction
  succeeds).
- The engine's event stream says when it exits (exit code, OOM kill).
- Releasing a task removes its sandbox and namespace and keeps its stopped container, whose
  logs `service logs` reads, until the managers delete the task (the sweep).

Everything made carries Docker's swarm labels (`com.docker.swarm.task.id`, `.node.id`, ...),
so a restarted shoald finds what its predecessor left: it removes every sandbox and running
container of its node before running anything (Docker without live-restore), and keeps stopped
ones until their tasks are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import docker.errors
import docker.types

from orchestrator.agent.exec.base import (
    LABEL_NODE_ID,
    LABEL_ROLE,
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
from orchestrator.agent.exec.netns import (
    netns_name,
    remove_leftover_namespaces,
    remove_namespace,
)
from orchestrator.agent.exec.process import run_quietly
from orchestrator.images import reference, rootfs
from orchestrator.manager.spec import MountSpec
from orchestrator.manager.templates import expand

log = logging.getLogger(__name__)

SANDBOX_REPOSITORY = "shoal/sandbox"
ROLE_TASK = "task"
ROLE_SANDBOX = "sandbox"
LABEL_TTY = "com.shoal.tty"  # its logs are one stream, not multiplexed


class ContainerExecutor:
    kind = "container"

    def __init__(self, engine: Engine, netns_prefix: str):
        self.engine = engine
        self.netns_prefix = netns_prefix
        self.node_id = ""
        self.sandbox_image = ""
        self._pulls: dict[str, asyncio.Future[None]] = {}  # image -> the pull under way
        self._cleanup: asyncio.Future[list[str]] | None = None
        self._image_lock = asyncio.Lock()
        self.live: dict[str, ContainerController] = {}  # task id -> controller, until released

    async def start(self, node_id: str) -> None:
        self.node_id = node_id
        self.engine.on_change = self._engine_changed
        self.engine.start(f"{LABEL_NODE_ID}={node_id}")
        try:
            removed = await self._remove_strays()
        except EngineUnavailable as e:
            log.error("%s; its tasks wait for it", e)
            removed = []
        removed += await remove_leftover_namespaces(self.netns_prefix)
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

    # ---- images ---------------------------------------------------------------------------

    async def ready(self) -> None:
        """The sandbox's image is in the engine: made here from the host's busybox-static (no
        registry needed), tagged with its content's digest so a new one never mixes with an
        old one."""
        if self.sandbox_image:
            return
        async with self._image_lock:
            if self.sandbox_image:
                return
            image = await asyncio.to_thread(rootfs.pause)
            name = f"{SANDBOX_REPOSITORY}:{hashlib.sha256(image.layer).hexdigest()[:12]}"
            if not await self._have(name):
                archive = await asyncio.to_thread(rootfs.save_archive, image, name)
                await self.engine.call(lambda api: list(api.load_image(archive)))
                log.info("loaded the sandbox image %s into the engine", name)
            self.sandbox_image = name

    async def pull(self, image: str, auth: str) -> None:
        """Pull once for everyone wanting the image now. A digest already here is not asked
        for again; a tag is (it may have moved), but if the registry cannot be reached and the
        image is here, the task runs what is here (Docker's behaviour)."""
        ref = reference.parse(image)
        if ref.digest and await self._have(image):
            return
        running = self._pulls.get(image)
        if running is None:
            running = self._pulls[image] = asyncio.ensure_future(self._pull(ref, auth))
            running.add_done_callback(lambda _: self._pulls.pop(image, None))
        try:
            await asyncio.shield(running)
        except docker.errors.APIError as e:
            if await self._have(image):
                log.warning("pulling %s failed (%s); using the image already here", image, e)
                return
            raise Rejected(f"pulling image {image}: {explain(e)}") from None

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

    async def _have(self, image: str) -> bool:
        try:
            await self.engine.call(lambda api: api.inspect_image(image))
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError:
            return False
        return True

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
        """Every sandbox and every running task container of this node that is not a live
        task's (an earlier shoald's, or failed while the engine was away); stopped task
        containers stay for their logs until the sweep."""
        removed = []
        for c in await self._ours():
            labels = c.get("Labels") or {}
            if labels.get(LABEL_TASK_ID, "") in self.live:
                continue
            if labels.get(LABEL_ROLE) == ROLE_SANDBOX or c.get("State") == "running":
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
            lambda api: api.containers(
                all=True,
                filters={"label": [f"{LABEL_TASK_ID}={task_id}", f"{LABEL_ROLE}={ROLE_TASK}"]},
            )
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
        self.sandbox_id = ""
        self.container_id = ""
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

    def _labels(self, role: str) -> dict[str, str]:
        tty = {LABEL_TTY: "true"} if self.task.spec.tty and role == ROLE_TASK else {}
        return {**self.task.labels, LABEL_ROLE: role, **tty}

    async def prepare(self) -> None:
        self.executor.live[self.task.id] = self
        try:
            await self.executor.ready()
            await self.executor.pull(self.task.spec.image, self.task.registry_auth)
            await self._make_sandbox()
            await self._create()
        except docker.errors.APIError as e:
            raise Rejected(explain(e)) from None

    async def _make_sandbox(self) -> None:
        ips = self.task.ips
        hostname = self.hostname

        def make(api: docker.APIClient) -> tuple[str, int]:
            host_config = api.create_host_config(
                network_mode="none",
                dns=["127.0.0.11"],
                dns_opt=["ndots:0"],
                extra_hosts={hostname: ips[0]} if ips else None,
                pids_limit=16,
            )
            made = api.create_container(
                self.executor.sandbox_image,
                name=f"{self.task.name}.sandbox",
                hostname=hostname,
                labels=self._labels(ROLE_SANDBOX),
                host_config=host_config,
            )
            api.start(made["Id"])
            return made["Id"], int(api.inspect_container(made["Id"])["State"]["Pid"])

        try:
            self.sandbox_id, pid = await self.engine.call(make)
        except docker.errors.APIError as e:
            if e.status_code != 409:  # a name conflict: a leftover of this very task
                raise
            await self.executor._remove_container(f"{self.task.name}.sandbox")
            self.sandbox_id, pid = await self.engine.call(make)
        if await run_quietly("ip", "netns", "attach", self._netns, str(pid)) != 0:
            raise Rejected(f"cannot name the network namespace of the task's sandbox ({pid})")
        self._netns_made = True

    async def _create(self) -> None:
        spec, ctx = self.task.spec, self.task.template_context
        env = [
            f"{k}={expand(v, ctx)}" if sep else k
            for k, sep, v in (e.partition("=") for e in spec.env)
        ]

        def create(api: docker.APIClient) -> str:
            host_config = api.create_host_config(
                network_mode=f"container:{self.sandbox_id}",
                mounts=[_mount(m, ctx) for m in spec.mounts] or None,
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
                entrypoint=list(spec.command) or None,
                command=list(spec.args) or None,
                environment=env or None,
                user=spec.user or None,
                working_dir=spec.dir or None,
                labels=self._labels(ROLE_TASK),
                stop_signal=spec.stop_signal or None,
                stop_timeout=max(1, spec.stop_grace // 1_000_000_000),
                tty=spec.tty,
                host_config=host_config,
            )
            return str(made["Id"])

        try:
            self.container_id = await self.engine.call(create)
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise
            await self.executor._remove_container(self.task.name)
            self.container_id = await self.engine.call(create)
        # the spec's stop signal, else the image's (the engine merged it), else SIGTERM
        config = await self.engine.call(
            lambda api: api.inspect_container(self.container_id)["Config"]
        )
        self.stop_signal = str(config.get("StopSignal") or "SIGTERM")

    async def start(self) -> dict[str, Any]:
        try:
            await self.engine.call(lambda api: api.start(self.container_id))
            state = await self.engine.call(
                lambda api: api.inspect_container(self.container_id)["State"]
            )
        except docker.errors.APIError as e:
            raise StartFailed(f"starting container failed: {explain(e)}") from None
        return {"ContainerID": self.container_id, "PID": int(state.get("Pid") or 0)}

    async def wait(self) -> Exit:
        return await self.engine.wait_exit(self.container_id)

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
        """Kill the task's process if it still runs, remove its sandbox and namespace; its
        stopped container stays for its logs."""
        if self.container_id:
            with contextlib.suppress(EngineUnavailable, docker.errors.APIError):
                state = await self.engine.call(
                    lambda api: api.inspect_container(self.container_id)["State"]
                )
                if state.get("Running"):
                    await self.kill()
        if self.sandbox_id:
            with contextlib.suppress(EngineUnavailable, docker.errors.APIError):
                await self.executor._remove_container(self.sandbox_id)
        # Its processes die with the namespace's, even when the engine does not answer.
        await remove_namespace(self._netns)
        self._netns_made = False
        self.executor.live.pop(self.task.id, None)


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
