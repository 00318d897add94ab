"""Which executor runs a node's tasks: `shoald --executor auto|container|native`."""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.agent.exec.base import Executor
from orchestrator.agent.exec.container import ContainerExecutor
from orchestrator.agent.exec.engine import Engine
from orchestrator.agent.exec.native import NativeExecutor

log = logging.getLogger(__name__)

DEFAULT_ENGINE = "unix:///var/run/docker.sock"
KINDS = ("auto", "container", "native")


async def make_executor(kind: str, engine_url: str, netns_prefix: str, data_dir: Path) -> Executor:
    """auto: the container executor if the engine answers now, else the native one."""
    if kind == "native":
        log.info("tasks run on the native executor")
        return NativeExecutor(netns_prefix, data_dir)
    engine = Engine(engine_url)
    if kind == "container":
        log.info("tasks run as containers of the engine at %s", engine_url)
        return ContainerExecutor(engine, netns_prefix)
    why = await engine.answers()
    if why is None:
        log.info(
            "tasks run as containers: Docker Engine %s answers at %s", engine.version, engine_url
        )
        return ContainerExecutor(engine, netns_prefix)
    await engine.close()
    log.warning(
        "no container engine answers at %s (%s): tasks run on the native executor, which runs "
        "only the images docs/native-executor.md lists; start dockerd, or pass --engine",
        engine_url,
        why,
    )
    return NativeExecutor(netns_prefix, data_dir)
