"""`shoal lab up --vm`: nodes as VMs on Debian's kernel, with the namespace lab's verbs, and a
`down` that leaves nothing behind (docs/vm-lab.md)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.lab import lab as labmod
from orchestrator.lab import vm, vmimage
from orchestrator.lab.record import VM, LabError
from tests.vmutil import vm_suite

pytestmark = vm_suite

LAB = "tvmcli"


def shoal(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "lab", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ours() -> dict[str, object]:
    """What a VM lab named LAB could leave on the host."""

    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout

    qemus = [line for line in run("ps", "-eo", "args").splitlines() if f"-name {LAB}-" in line]
    return {
        "netns": [n for n in run("ip", "netns", "list").split() if n.startswith(LAB)],
        "links": [n for n in run("ip", "-o", "link").split() if n.startswith(("tap-", LAB))],
        "qemu": qemus,
        "run": sorted(p.name for p in labmod.RUN_DIR.glob(f"{LAB}*")),
        "var_tmp": sorted(os.listdir("/var/tmp")),
    }


def test_vm_lab_up_exec_ls_down(tmp_path: Path) -> None:
    before = ours()
    if labmod.load(LAB) is not None:
        labmod.down(LAB)
    try:
        # shoald in VMs is tests/test_vm_swarm.py's; these tests drive the VMs by hand
        up = shoal("up", "--vm", "--name", LAB, "--nodes", "2", "--no-daemons")
        assert up.returncode == 0, up.stdout + up.stderr
        accel = vm.choose_accel()
        assert ("TCG" if accel.name == "tcg" else "KVM") in up.stdout  # says which, and why
        assert "sw2    192.168.56.12" in up.stdout
        again = shoal("up", "--vm", "--name", LAB, "--nodes", "2", "--no-daemons")
        assert again.returncode == 0 and "booting" not in again.stdout + again.stderr
        listed = shoal("ls")
        assert f"{LAB:10} sw1    192.168.56.11    {vm.lab_netns(LAB)}" in listed.stdout

        kernel = shoal("exec", "--name", LAB, "sw1", "--", "uname", "-r")
        assert kernel.stdout.strip() == vmimage.kernel_version()
        ping = shoal("exec", "--name", LAB, "sw2", "--", "ping", "-c1", "-W5", "192.168.56.11")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        outside = shoal("exec", "--name", LAB, "host", "--", "ping", "-c1", "-W5", "192.168.56.12")
        assert outside.returncode == 0, outside.stdout + outside.stderr
        assert shoal("exec", "--name", LAB, "sw1", "--", "cat", stdin="hi\n").stdout == "hi\n"
        failed = shoal("exec", "--name", LAB, "sw1", "--", "sh", "-c", "echo no >&2; exit 7")
        assert failed.returncode == 7 and failed.stderr == "no\n"
        missing = shoal("exec", "--name", LAB, "sw9", "--", "true")
        assert missing.returncode == 1 and "has no node 'sw9'" in missing.stderr

        # a command in a VM lives as long as its local stand-in, and gets its signals
        lab = labmod.load(LAB)
        assert lab is not None
        sleeper = subprocess.Popen(
            labmod.exec_argv(lab, "sw1", ["sh", "-c", "trap 'exit 42' TERM; sleep 60 & wait"]),
            stdin=subprocess.DEVNULL,
        )
        time.sleep(3)
        sleeper.send_signal(signal.SIGTERM)
        assert sleeper.wait(30) == 42
        sleeper = subprocess.Popen(labmod.exec_argv(lab, "sw1", ["sleep", "600"]))
        time.sleep(3)
        sleeper.kill()
        sleeper.wait()
        deadline = time.monotonic() + 20
        while labmod.backend(lab).run(lab, "sw1", ["pgrep", "-x", "sleep"]).returncode == 0:
            assert time.monotonic() < deadline, "the remote sleep outlived its stand-in"
            time.sleep(0.5)
    finally:
        down = shoal("down", "--name", LAB)
    assert down.returncode == 0 and f"lab {LAB} removed" in down.stdout
    deadline = time.monotonic() + 10
    while ours() != before and time.monotonic() < deadline:
        time.sleep(0.2)  # the namespace goes once the last QEMU is gone
    assert ours() == before


def test_a_lab_name_is_either_namespaces_or_vms() -> None:
    name = "tvmx"
    labmod.up(name, 1, ipaddress.IPv4Network("192.168.64.0/24"))
    try:
        with pytest.raises(LabError, match="is a namespace lab"):
            labmod.up(name, 1, ipaddress.IPv4Network("192.168.64.0/24"), kind=VM)
    finally:
        labmod.down(name)
