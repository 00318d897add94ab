"""What the cluster lab tests share: commands inside a node, waiting, the lab's fresh record."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from orchestrator.lab import daemons
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab


def run(
    lab: Lab, node: str, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """A command inside the node, talking to its shoald (DOCKER_HOST)."""
    env = dict(os.environ, DOCKER_HOST=daemons.docker_host(lab, node))
    out = subprocess.run(
        labmod.exec_argv(lab, node, list(args)),
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{args} on {node}: {out.stdout}{out.stderr}")
    return out


def shoal(
    lab: Lab, node: str, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`shoal ARGS...` inside the node."""
    return run(
        lab, node, sys.executable, "-m", "orchestrator.cli.main", *args, check=check, stdin=stdin
    )


def wait(cond: Callable[[], bool], what: str, within: float = 30.0) -> float:
    """Poll until cond() holds; the seconds it took. Fails the test after `within`."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < within, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def fresh(lab: Lab) -> Lab:
    """The lab as recorded now (processes started since `lab` was loaded included)."""
    record = labmod.load(lab.name)
    assert record is not None
    return record
