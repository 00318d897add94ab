"""Which executor runs a node's tasks: `shoald --executor auto|container|native`."""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.agent.exec.base import Executor
from orchestrator.agent.exec.container import ContainerExecutor
from orchestrator.agent.exec.engine import Engine
from orchestrator.agent.exec.native import NativeExecutor
from orchestrator.images import rootfs

log = logging.getLogger(__name__)

DEFAULT_ENGINE = "unix:///var/run/docker.sock"
KINDS = ("auto", "container", "native")


class ExecutorError(RuntimeError):
    """The executor asked for cannot run on this node; the message says why."""


async def make_executor(kind: str, engine_url: str, netns_prefix: str, data_root: Path) -> Executor:
    """auto: the container executor if the engine answers now, else the native one. Raises
    ExecutorError when the one asked for cannot run here."""
    native = NativeExecutor(netns_prefix, data_root / "tasks")
    if kind == "native":
        log.info("tasks run on the native executor")
        return native
    try:
        rootfs.busybox_path()  # every container's gate runs it (container.py)
    except rootfs.BusyboxError as e:
        if kind == "container":
            raise ExecutorError(f"the container executor cannot run: {e}") from None
        log.warning("%s: tasks run on the native executor", e)
        return native
    engine = Engine(engine_url)
    containers = ContainerExecutor(engine, netns_prefix, data_root / "containers")
    if kind == "container":
        log.info("tasks run as containers of the engine at %s", engine_url)
        return containers
    why = await engine.answers()
    if why is None:
        log.info(
            "tasks run as containers: Docker Engine %s answers at %s", engine.version, engine_url
        )
        return containers
    await engine.close()
    log.warning(
        "no container engine answers at %s (%s): tasks run on the native executor, which runs "
        "only the images docs/native-executor.md lists; start dockerd, or pass --engine",
        engine_url,
        why,
    )
    return native
