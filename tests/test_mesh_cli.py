"""shoal-mesh's command line: validation, backend choice, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mesh.lb.select import ipvs_available


def mesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_accepts_a_good_state_and_explains_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("node: sw1\npeers: {sw1: 192.168.56.11}\n")
    ok = mesh("check", "--state", str(good))
    assert ok.returncode == 0 and "ok (node sw1" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: sw1\npeers: {sw1: 192.168.56.11}\nnetworks: [{name: x, vni: -1}]\n")
    refused = mesh("check", "--state", str(bad))
    assert refused.returncode == 2
    assert "networks[0].vni: expected an integer in 1..16777215, got -1" in refused.stderr
    missing = mesh("check", "--state", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


@pytest.mark.lab
@pytest.mark.skipif(ipvs_available(), reason="this kernel has IPVS")
def test_ipvs_backend_is_refused_clearly_where_the_kernel_lacks_it(tmp_path: Path) -> None:
    state = tmp_path / "s.yaml"
    state.write_text("node: sw1\npeers: {sw1: 192.168.56.11}\n")
    run = mesh("run", "--state", str(state), "--lb-backend", "ipvs")
    assert run.returncode == 2
    assert "this kernel has no IPVS" in run.stderr and "--lb-backend nftables" in run.stderr
