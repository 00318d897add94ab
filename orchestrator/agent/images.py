"""How the native executor runs an image: it has no image store, so it maps image names.

The native executor runs a task's command with this machine's own programs, in the task's own
namespaces. Image names map to what runs:
  micro, gianarb/micro (any tag)          the demo app: HTTP on 8000 answering with the task's
                                          IP and hostname (orchestrator/apps/micro.py)
  alpine, busybox, debian, ubuntu (any    "the host's userland": the service's command and
  tag)                                    arguments run as given (`alpine ping 192.168.56.1`
                                          runs the host's ping); without a command, sh
Anything else is refused when the service is created ("no runtime for image"), so a task never
sits failing on a node.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

DEMO_APPS = {"micro", "gianarb/micro"}
HOST_USERLAND = {"alpine", "busybox", "debian", "ubuntu"}


class UnknownImage(ValueError):
    pass


def repository(image: str) -> str:
    """The repository of an image reference: `docker.io/library/alpine:3.20@sha256:..` ->
    `alpine`; `gianarb/micro:1` -> `gianarb/micro`."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/library/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.lower()


def known() -> list[str]:
    return sorted(DEMO_APPS | HOST_USERLAND)


def check(image: str) -> None:
    repo = repository(image)
    if repo not in DEMO_APPS and repo not in HOST_USERLAND:
        raise UnknownImage(
            f"no runtime for image {image!r} on the native executor; it runs "
            f"{', '.join(known())} (see docs/native-executor.md)"
        )


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]


_VALID_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def command(image: str, entrypoint: tuple[str, ...], args: tuple[str, ...]) -> Command:
    """What to execute for a task (ContainerSpec Command = entrypoint, Args = arguments)."""
    check(image)
    repo = repository(image)
    if repo in DEMO_APPS:
        return Command((sys.executable, "-m", "orchestrator.apps.micro", "--udp", *args))
    argv = (*entrypoint, *args) or ("/bin/sh",)
    return Command(argv)


def valid_env(entries: tuple[str, ...]) -> list[str]:
    return [e for e in entries if _VALID_ENV.match(e)]
