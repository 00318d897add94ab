"""How the native executor runs an image: it has no image store, so it maps image names.

The native executor runs a task's command with this machine's own programs, in the task's own
namespaces. Image names map to what runs:
  micro, gianarb/micro (any tag)          the demo app: HTTP on 8000 answering with the task's
                                          IP and hostname (orchestrator/apps/micro.py)
  alpine, busybox, debian, ubuntu (any    "the host's userland": the service's command and
  tag)                                    arguments run as given (`alpine ping 192.168.56.1`
                                          runs the host's ping); without a command, sh
A node running this executor tells the managers these repositories (`known()`, its description's
`images`), and the scheduler places no other image on it: another image waits PENDING for a node
with a container engine instead of failing here ("no runtime for image" if one arrives anyway).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from orchestrator.images import reference

DEMO_APPS = {"micro", "gianarb/micro"}
HOST_USERLAND = {"alpine", "busybox", "debian", "ubuntu"}


class UnknownImage(ValueError):
    pass


def known() -> list[str]:
    return sorted(DEMO_APPS | HOST_USERLAND)


def _repository(image: str) -> str:
    try:
        return reference.repository(image)
    except reference.ReferenceError:
        return ""  # runs nothing here; check() says which images do


def check(image: str) -> None:
    repo = _repository(image)
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
    repo = _repository(image)
    if repo in DEMO_APPS:
        return Command((sys.executable, "-m", "orchestrator.apps.micro", "--udp", *args))
    argv = (*entrypoint, *args) or ("/bin/sh",)
    return Command(argv)


def valid_env(entries: tuple[str, ...]) -> list[str]:
    return [e for e in entries if _VALID_ENV.match(e)]
