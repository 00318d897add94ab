"""`shoal lab demo` (what `make demo` runs) shows every node reaching every task."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab


def test_demo_reaches_every_task_from_every_node() -> None:
    env = dict(os.environ, SHOAL_LAB="tdemo")
    shoal = [sys.executable, "-m", "orchestrator.cli.main", "lab"]
    try:
        out = subprocess.run([*shoal, "demo"], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        for node in ("192.168.56.11", "192.168.56.12", "192.168.56.13"):
            assert f"{node} answered by 10 of 10 tasks" in out.stdout
        assert "10 tasks answered" in out.stdout
    finally:
        subprocess.run([*shoal, "down"], env=env, capture_output=True)
