"""What the cluster lab tests share: commands inside a node, waiting, the lab's fresh record."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator.lab import daemons, engines
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab

# Debian's docker.io CLI, as the engines are; `make test` installs it, and a test that needs it
# fails without it (never skips)
DOCKER = "/usr/bin/docker"


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


def swarm_cli(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The docker CLI inside sw1 (a manager), against its shoald (docker_cli: an engine's)."""
    return run(lab, "sw1", DOCKER, *args, check=check)


@contextlib.contextmanager
def created_service(lab: Lab, name: str, *args: str) -> Iterator[str]:
    """`docker service create --name NAME ARGS...` in sw1 (it waits for the tasks unless -d),
    removed at the end."""
    swarm_cli(lab, "service", "create", "--name", name, *args)
    try:
        yield name
    finally:
        swarm_cli(lab, "service", "rm", name, check=False)


def shoal(
    lab: Lab, node: str, *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`shoal ARGS...` inside the node."""
    return run(
        lab, node, sys.executable, "-m", "orchestrator.cli.main", *args, check=check, stdin=stdin
    )


def wait(cond: Callable[[], bool], what: str, within: float = 30.0, every: float = 0.1) -> float:
    """Poll until cond() holds, every `every` s; the seconds it took. Fails the test after
    `within`."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < within, f"timed out waiting for {what}"
        time.sleep(every)
    return time.monotonic() - start


def fresh(lab: Lab) -> Lab:
    """The lab as recorded now (processes started since `lab` was loaded included)."""
    record = labmod.load(lab.name)
    assert record is not None
    return record


def docker_cli(lab: Lab, node: str, *args: str, check: bool = True) -> str:
    """The docker CLI against a node's own engine (not its shoald)."""
    out = subprocess.run(
        [DOCKER, "-H", engines.socket_url(lab, node), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} on {node}: {out.stdout}{out.stderr}")
    return out.stdout


def leftovers(name: str) -> list[str]:
    """What is left on the host of lab `name`: processes, mounts, cgroups, namespaces, files
    (the registry's storage counts too: call after a purge)."""
    marks = (f"/run/shoal/lab/{name}/", f"/var/lib/shoal/lab/{name}/")
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(m in cmdline for m in marks):
                found.append(f"process {entry.name}: {cmdline}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if any((point + "/").startswith(m) for m in marks):
            found.append(f"mount {point}")
    for top in Path("/sys/fs/cgroup").iterdir():
        for d, dirs, _ in os.walk(top):
            depth = Path(d).relative_to(top).parts
            if len(depth) >= 4:
                dirs.clear()
            found += [f"cgroup {d}/{x}" for x in dirs if x.startswith(f"{name}-")]
    netns = Path("/run/netns")
    found += [f"netns {p.name}" for p in netns.iterdir() if p.name.startswith(f"{name}-")]
    for path in (labmod.RUN_DIR / name, labmod.RUN_DIR / f"{name}.json", labmod.DATA_DIR / name):
        if path.exists():
            found.append(f"file {path}")
    return found


@contextlib.contextmanager
def module_lab(
    name: str, nodes: int, subnet: ipaddress.IPv4Network, executor: str | None = None
) -> Iterator[Lab]:
    """A fresh lab for a test module: whatever an earlier run left under its name is purged
    first, and the lab, data and all, is removed after. `executor`: the nodes' (default: the
    backend's, containers)."""
    if labmod.load(name) is not None or (labmod.DATA_DIR / name).exists():
        labmod.down(name, purge=True)
    lab = labmod.up(name, nodes, subnet, executor)
    try:
        yield lab
    finally:
        labmod.down(name, purge=True)
