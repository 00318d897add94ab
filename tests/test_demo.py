"""`shoal lab demo` (what `make demo` runs): the blog, replayed, in a lab of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_demo_replays_the_blog_and_every_node_reaches_every_task() -> None:
    env = dict(os.environ, SHOAL_LAB="tdemo")
    shoal = [sys.executable, "-m", "orchestrator.cli.main", "lab"]
    try:
        out = subprocess.run([*shoal, "demo"], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        text = out.stdout
        for step in (
            "shoal swarm init",
            "This node joined a swarm as a worker.",
            "Leader",
            "helloworld scaled to 10",
            '"PublishedPort": 30000',
            '"Addr": "10.255.',
            '"Image": "alpine:latest@sha256:',  # pinned to what the lab's registry has
            "[sw3] $ docker images gianarb/micro",  # every node pulled it
        ):
            assert step in text, step
        for node in ("192.168.56.11", "192.168.56.12", "192.168.56.13"):
            assert f"({node}) answered by 10 of 10 tasks" in text
    finally:
        subprocess.run([*shoal, "down", "--purge"], env=env, capture_output=True)
