"""Helpers for the lab tests: the VM suite's marks, clients inside nodes (VMs or namespaces),
and captures on a lab's bridge."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.lab.lab import backend
from orchestrator.lab.record import Lab

# Skipping is a developer's choice (SHOAL_SKIP_VM=1, or -m "not vm"); a missing package is not
# a reason: the fixtures fail and say what to install.
vm_suite = [
    pytest.mark.vm,
    pytest.mark.lab,
    pytest.mark.slow,  # QEMU boots
    pytest.mark.skipif(
        os.environ.get("SHOAL_SKIP_VM") == "1", reason="SHOAL_SKIP_VM=1: VM lab tests skipped"
    ),
]

# One process in the node makes all the requests: starting Python in a VM costs ~1 s (TCG).
_QUERY = """
import collections, json, sys
from orchestrator.apps import micro
n = int(sys.argv[1])
print(json.dumps({h: collections.Counter(micro.query(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1]))
                                         for _ in range(n)) for h in sys.argv[2:]}))
"""


def node_answers(
    lab: Lab, node: str, netns: str | None, targets: list[str], n: int
) -> dict[str, Counter[str]]:
    """For each HOST:PORT, which task answered each of n requests made inside a node (and
    inside one of its task namespaces if netns is given), in any lab."""
    argv = [sys.executable, "-c", _QUERY, str(n), *targets]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = backend(lab).check(lab, node, argv, timeout=180)
    return {k: Counter(v) for k, v in json.loads(out).items()}


@dataclass
class Capture:
    path: Path
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def capture(lab: Lab, path: Path, bpf: str = "") -> Iterator[Capture]:
    """tcpdump on the lab's bridge, in the lab's outside (a VM lab's namespace), while the
    block runs."""
    # immediate mode: without it the kernel hands packets over in blocks, and the last block
    # is lost when tcpdump is stopped
    argv = ["tcpdump", "-i", lab.bridge, "--immediate-mode", "-U", "-s", "256", "-w", str(path)]
    argv += bpf.split()
    outside = backend(lab).outside(lab)
    if outside is not None:
        argv = ["ip", "netns", "exec", outside, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    started = proc.stderr.readline().decode()  # "tcpdump: listening on br0 ..."
    assert "listening" in started, started
    try:
        yield Capture(path, proc)
    finally:
        time.sleep(1.0)  # what is in flight
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
