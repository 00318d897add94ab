"""README's commands work exactly as written (run in a lab of their own, SHOAL_LAB=treadme)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.lab


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("make ")]


@pytest.mark.slow  # a lab of its own, the README end to end
def test_readme_commands_run_as_written() -> None:
    commands = readme_commands()
    assert commands[0] == "shoal lab up --nodes 3" and commands[-1] == "shoal lab down"
    env = dict(
        os.environ, SHOAL_LAB="treadme", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    try:
        for cmd in commands:
            out = subprocess.run(
                cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
            )
            assert out.returncode == 0, f"{cmd}\n{out.stdout}{out.stderr}"
            if cmd.endswith("nft list chain ip shoal prerouting"):
                assert "@published" in out.stdout
    finally:
        subprocess.run(
            [sys.executable, "-m", "orchestrator.cli.main", "lab", "down", "--purge"],
            env=env,
            capture_output=True,
        )


def test_make_targets_named_in_the_readme_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M)
