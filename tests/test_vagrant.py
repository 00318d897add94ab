"""The Vagrantfile and its provisioning scripts (docs/vagrant.md), checked without a VM or the
network: `vagrant validate` for both providers, what each machine is asked to run (read through
Vagrant's own loader, tests/vagrant_plan.rb), the refusals, shellcheck and `bash -n`, the
registry seeding against a real registry, and what the scripts hand to dockerd and shoald."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "vagrant").glob("*.sh"))
PLAN = Path(__file__).resolve().parent / "vagrant_plan.rb"
SHOALD = Path(sys.executable).parent / "shoald"

# What a node routes to through devices that are not Shoal's: VirtualBox's NAT network, the
# libvirt provider's management network, the private network; and the ingress network.
SW1_JOIN = "192.168.56.11:2377"  # where the others join: sw1's private address, never NAT
NOT_OURS = ("10.0.2.0/24", "192.168.121.0/24", "192.168.56.0/24", "10.255.0.0/16")


@pytest.fixture
def tree() -> Iterator[Path]:
    """A copy of the Vagrantfile and vagrant/ (Vagrant writes .vagrant/ beside it), with a
    Vagrant home of its own; removed after the test."""
    with tempfile.TemporaryDirectory(prefix="shoal-vagrant-") as d:
        top = Path(d) / "shoal"
        top.mkdir()
        shutil.copy(ROOT / "Vagrantfile", top)
        shutil.copytree(ROOT / "vagrant", top / "vagrant")
        yield top


def vagrant_env(top: Path, provider: str, **shoal: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "VAGRANT_"))}
    env.update(
        VAGRANT_HOME=str(top.parent / "vagrant.d"),
        VAGRANT_CHECKPOINT_DISABLE="1",  # no version check over the network
        VAGRANT_DEFAULT_PROVIDER=provider,
        **shoal,
    )
    return env


def validate(
    top: Path, provider: str, *flags: str, **shoal: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["vagrant", "validate", *flags],
        cwd=top,
        env=vagrant_env(top, provider, **shoal),
        capture_output=True,
        text=True,
        timeout=120,
    )


def plan(top: Path, provider: str, **shoal: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ruby", str(PLAN), str(top), provider],
        cwd=top,
        env=vagrant_env(top, provider, **shoal),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    machines: list[dict[str, Any]] = json.loads(out.stdout)
    return machines


def provisioners(machine: dict[str, Any]) -> dict[str, list[str]]:
    return {p["name"]: [p["path"], *p["args"]] for p in machine["provisioners"]}


# -- vagrant validate


@pytest.mark.parametrize("driver", ["kvm", "qemu"])
def test_validate_passes_for_libvirt_with_its_provider_config(tree: Path, driver: str) -> None:
    out = validate(tree, "libvirt", SHOAL_LIBVIRT_DRIVER=driver)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vagrantfile validated successfully" in out.stdout
    assert "Ignoring provider config" not in out.stdout


def test_validate_passes_for_virtualbox(tree: Path) -> None:
    """Debian has no VirtualBox, and Vagrant refuses a provider it cannot find: there,
    --ignore-provider validates everything but the VirtualBox block's own options."""
    out = validate(tree, "virtualbox")
    if shutil.which("VBoxManage") is None:
        assert out.returncode != 0 and "could not detect VirtualBox" in out.stdout + out.stderr
    else:
        assert out.returncode == 0, out.stdout + out.stderr
    out = validate(tree, "virtualbox", "--ignore-provider")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vagrantfile validated successfully" in out.stdout
    assert re.findall(r"==> (sw\d+): Ignoring provider config", out.stdout) == [
        "sw1",
        "sw2",
        "sw3",
    ]


def test_validate_passes_for_five_nodes_three_managers(tree: Path) -> None:
    out = validate(tree, "libvirt", SHOAL_NODES="5", SHOAL_MANAGERS="3")
    assert out.returncode == 0, out.stdout + out.stderr


def test_validate_fails_on_a_broken_vagrantfile(tree: Path) -> None:
    good = (tree / "Vagrantfile").read_text()
    (tree / "Vagrantfile").write_text(good.replace("lv.cpus = 1", "lv.cpuz = 1"))
    out = validate(tree, "libvirt")
    assert out.returncode != 0 and "cpuz" in out.stdout + out.stderr
    (tree / "Vagrantfile").write_text(good.replace("(1..NODES).each do |i|", "(1..NODES.each do"))
    out = validate(tree, "libvirt")
    assert out.returncode != 0 and "syntax error" in out.stdout + out.stderr
    (tree / "Vagrantfile").write_text(good)
    (tree / "vagrant" / "swarm.sh").unlink()
    out = validate(tree, "libvirt")
    assert out.returncode != 0 and "swarm.sh" in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"SHOAL_NODES": "0"}, 'SHOAL_NODES="0" is not allowed: give a whole number from 1 to 244'),
        ({"SHOAL_NODES": "three"}, 'SHOAL_NODES="three" is not allowed'),
        ({"SHOAL_NODES": "245"}, 'SHOAL_NODES="245" is not allowed'),
        ({"SHOAL_MANAGERS": "0"}, 'SHOAL_MANAGERS="0" is not allowed'),
        (
            {"SHOAL_NODES": "2", "SHOAL_MANAGERS": "3"},
            'SHOAL_MANAGERS="3" is not allowed: give a whole number from 1 to 2',
        ),
        ({"SHOAL_REGISTRY_MIRROR": "http://r:5000"}, 'SHOAL_REGISTRY_MIRROR="http://r:5000"'),
        ({"SHOAL_LIBVIRT_DRIVER": "xen"}, 'SHOAL_LIBVIRT_DRIVER="xen" is not allowed'),
    ],
)
def test_a_bad_setting_is_refused_with_what_to_give(
    tree: Path, setting: dict[str, str], message: str
) -> None:
    out = validate(tree, "libvirt", **setting)
    assert out.returncode != 0
    assert f"Shoal's Vagrantfile: {message}" in out.stderr, out.stdout + out.stderr


# -- what each machine runs


def test_three_nodes_one_manager_by_default(tree: Path) -> None:
    machines = plan(tree, "libvirt")
    assert [m["name"] for m in machines] == ["sw1", "sw2", "sw3"]
    for i, m in enumerate(machines, start=1):
        address = f"192.168.56.{10 + i}"
        assert m["box"] == "debian/bookworm64"
        assert m["hostname"] == m["name"]
        assert m["private_networks"] == [address]
        assert m["synced_folders"] == [{"guest": "/vagrant", "type": "rsync"}]
        steps = provisioners(m)
        assert steps["node"] == ["vagrant/node.sh", m["name"], address, "192.168.56.11:5000"]
        for path, *_ in steps.values():
            assert (ROOT / path).is_file(), path
    sw1, sw2, sw3 = (provisioners(m) for m in machines)
    assert list(sw1) == ["node", "registry", "swarm", "prometheus"]
    assert sw1["registry"] == ["vagrant/registry.sh", "192.168.56.11:5000"]
    assert sw1["swarm"][:3] == ["vagrant/swarm.sh", "init", "192.168.56.11"]
    assert list(sw2) == list(sw3) == ["node", "swarm"]
    for steps, address in ((sw2, "192.168.56.12"), (sw3, "192.168.56.13")):
        assert steps["swarm"] == ["vagrant/swarm.sh", "join", address, "worker", SW1_JOIN]
    # sw1 copies the join tokens to the host after it is up or provisioned; no one else does
    assert machines[0]["after_triggers"] == ["up", "provision", "reload"]
    assert machines[1]["after_triggers"] == machines[2]["after_triggers"] == []


def test_the_address_pool_overlaps_no_network_a_node_routes_to(tree: Path) -> None:
    pool = ipaddress.IPv4Network(provisioners(plan(tree, "libvirt")[0])["swarm"][3])
    assert pool.prefixlen <= 24  # room for overlay subnets of Docker's default size
    for other in NOT_OURS:
        assert not pool.overlaps(ipaddress.IPv4Network(other)), other
    # Docker's default pool, which this one replaces, would shadow VirtualBox's NAT network
    assert ipaddress.IPv4Network("10.0.0.0/8").overlaps(ipaddress.IPv4Network(NOT_OURS[0]))


def test_five_nodes_three_managers_join_managers_first(tree: Path) -> None:
    machines = plan(tree, "virtualbox", SHOAL_NODES="5", SHOAL_MANAGERS="3")
    assert [m["name"] for m in machines] == ["sw1", "sw2", "sw3", "sw4", "sw5"]
    assert [m["private_networks"] for m in machines] == [[f"192.168.56.{i}"] for i in range(11, 16)]
    joins = [provisioners(m)["swarm"][1:] for m in machines[1:]]
    assert joins == [
        ["join", "192.168.56.12", "manager", SW1_JOIN],
        ["join", "192.168.56.13", "manager", SW1_JOIN],
        ["join", "192.168.56.14", "worker", SW1_JOIN],
        ["join", "192.168.56.15", "worker", SW1_JOIN],
    ]


def test_one_node_is_a_swarm_of_its_own(tree: Path) -> None:
    machines = plan(tree, "libvirt", SHOAL_NODES="1")
    assert [m["name"] for m in machines] == ["sw1"]
    assert provisioners(machines[0])["swarm"][1] == "init"


@pytest.mark.parametrize(
    ("mirror", "registry", "on_sw1"),
    [("none", "none", False), ("192.168.56.1:5000", "192.168.56.1:5000", False)],
)
def test_a_registry_of_ones_own_or_none(
    tree: Path, mirror: str, registry: str, on_sw1: bool
) -> None:
    machines = plan(tree, "libvirt", SHOAL_REGISTRY_MIRROR=mirror)
    for m in machines:
        assert provisioners(m)["node"][-1] == registry
    assert ("registry" in provisioners(machines[0])) is on_sw1


def test_libvirt_emulates_a_plain_cpu_without_kvm(tree: Path) -> None:
    tcg = plan(tree, "libvirt", SHOAL_LIBVIRT_DRIVER="qemu")[0]["provider"]
    assert tcg == {
        "driver": "qemu",
        "cpu_mode": "custom",
        "cpu_model": "qemu64",
        "memory": 1024,
        "cpus": 1,
    }
    kvm = plan(tree, "libvirt", SHOAL_LIBVIRT_DRIVER="kvm")[0]["provider"]
    assert kvm["driver"] == "kvm" and kvm["cpu_mode"] == "host-model"
    default = plan(tree, "libvirt")[0]["provider"]
    assert default["driver"] == ("kvm" if Path("/dev/kvm").exists() else "qemu")


# -- the provisioning scripts


def test_the_scripts_are_bash_with_set_eu() -> None:
    assert [s.name for s in SCRIPTS] == ["node.sh", "prometheus.sh", "registry.sh", "swarm.sh"]
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/bin/bash\n"), script
        assert re.search(r"^set -eu$", text, re.M), script
        assert os.access(script, os.X_OK), script


def test_shellcheck_and_bash_n_pass_and_catch_a_defect(tree: Path) -> None:
    for script in SCRIPTS:
        out = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    broken = tree / "vagrant" / "swarm.sh"
    good = broken.read_text()
    broken.write_text(good.replace('"$(cat "$tokens/$role")"', "$(cat $tokens/$role)"))
    out = subprocess.run(["shellcheck", str(broken)], capture_output=True, text=True)
    assert out.returncode != 0 and "SC2086" in out.stdout
    broken.write_text(good.replace("\tusage\n\t;;\nesac", "\tusage\n\t;;\n"))
    out = subprocess.run(["bash", "-n", str(broken)], capture_output=True, text=True)
    assert out.returncode != 0 and "syntax error" in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["node.sh", "sw1", "192.168.56.11"],
        ["swarm.sh"],
        ["swarm.sh", "init", "192.168.56.11"],
        ["swarm.sh", "join", "192.168.56.12", "admin", "192.168.56.11:2377"],
        ["swarm.sh", "leave"],
        ["registry.sh"],
    ],
)
def test_a_script_given_wrong_arguments_says_how_to_call_it(argv: list[str]) -> None:
    """Before it touches anything: these run here, on the machine running the tests."""
    out = subprocess.run(
        ["bash", str(ROOT / "vagrant" / argv[0]), *argv[1:]], capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stderr.startswith("usage: "), out.stderr


def test_swarm_sh_stops_where_shoald_does_not_answer() -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-vagrant-") as d:
        host = f"unix://{d}/shoal.sock"  # no one listens there
        out = subprocess.run(
            ["bash", str(ROOT / "vagrant" / "swarm.sh"), "init", "192.168.56.11", "10.10.0.0/16"],
            env=dict(os.environ, DOCKER_HOST=host),
            capture_output=True,
            text=True,
        )
    assert out.returncode == 1
    assert f"shoald does not answer on {host}" in out.stderr, out.stderr


def test_node_sh_installs_the_makefiles_engine_packages() -> None:
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    lists = dict(re.findall(r"^([A-Z_]+_PACKAGES) := (.*)$", makefile, re.M))
    packages = re.search(r'^packages="([^"]*)"', (ROOT / "vagrant" / "node.sh").read_text(), re.M)
    assert packages is not None
    node = set(packages.group(1).split())
    assert set(lists["ENGINE_PACKAGES"].split()) - node == {"docker-registry"}  # sw1's only
    assert {"iproute2", "nftables", "conntrack", "python3-venv"} <= node
    assert "docker-registry" in (ROOT / "vagrant" / "registry.sh").read_text()
    assert set(lists["VAGRANT_PACKAGES"].split()) == {"vagrant", "vagrant-libvirt", "shellcheck"}
    deb_loop = re.search(r"for p in ([^;]*);", makefile)
    assert deb_loop is not None and "$(VAGRANT_PACKAGES)" in deb_loop.group(1)


def daemon_json(registry: str) -> dict[str, Any]:
    """/etc/docker/daemon.json as node.sh writes it."""
    function = f'eval "$(sed -n "/^daemon_json() {{/,/^}}/p" {ROOT}/vagrant/node.sh)"'
    out = subprocess.run(
        ["bash", "-c", f"{function}; registry={registry}; daemon_json"],
        capture_output=True,
        text=True,
        check=True,
    )
    config: dict[str, Any] = json.loads(out.stdout)
    return config


def test_the_engine_pulls_through_the_registry_and_leaves_the_network_alone() -> None:
    config = daemon_json("192.168.56.11:5000")
    assert config["registry-mirrors"] == ["http://192.168.56.11:5000"]
    assert config["insecure-registries"] == ["192.168.56.11:5000"]
    assert (config["bridge"], config["iptables"], config["ip-masq"]) == ("none", False, False)
    hub = daemon_json("none")
    assert "registry-mirrors" not in hub and "insecure-registries" not in hub
    assert hub["iptables"] is False


def test_shoald_takes_the_options_the_unit_gives_it() -> None:
    text = (ROOT / "vagrant" / "node.sh").read_text()
    start = re.search(r"^ExecStart=\$venv/bin/shoald (.*)$", text, re.M)
    assert start is not None
    options = re.findall(r"(--[a-z-]+) ", start.group(1))
    assert options == ["--host", "--data-root", "--executor", "--engine"]
    usage = subprocess.run([str(SHOALD), "--help"], capture_output=True, text=True, check=True)
    for option in options:
        assert f"{option} " in usage.stdout, option
    assert "--executor container" in start.group(1)
    assert "unix://$socket" in start.group(1) and "socket=/run/shoal/shoal.sock" in text
    # the docker CLI on a node talks to that socket (vagrant ssh -c runs a login shell)
    assert "export DOCKER_HOST=unix://$socket" in text


# -- sw1's registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def seed_program() -> str:
    """The Python registry.sh runs to seed sw1's registry."""
    text = (ROOT / "vagrant" / "registry.sh").read_text()
    found = re.search(r"<<'EOT'\n(.*?)^EOT$", text, re.S | re.M)
    assert found is not None
    return found.group(1)


def test_the_seed_pushes_the_blogs_images_once() -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-vagrant-registry-") as d:
        addr = f"127.0.0.1:{free_port()}"
        config = Path(d) / "config.yml"
        config.write_text(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
            f"http:\n  addr: {addr}\n"
        )
        registry = subprocess.Popen(
            ["/usr/bin/docker-registry", "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    urllib.request.urlopen(f"http://{addr}/v2/", timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the registry did not answer"
                    time.sleep(0.1)
            first = subprocess.run(
                [sys.executable, "-", addr], input=seed_program(), capture_output=True, text=True
            )
            assert first.returncode == 0, first.stderr
            assert "pushed gianarb/micro:latest" in first.stdout
            assert (
                f"registry {addr}: gianarb/micro, library/alpine, library/busybox, library/micro"
                in first.stdout
            )
            again = subprocess.run(
                [sys.executable, "-", addr], input=seed_program(), capture_output=True, text=True
            )
            assert again.returncode == 0 and "pushed" not in again.stdout, again.stdout
        finally:
            os.killpg(registry.pid, signal.SIGKILL)
            registry.wait()


# -- swarm.sh against shoald, in a namespace lab of its own


LAB = "tvagrant"
SUBNET = ipaddress.IPv4Network("192.168.66.0/24")


@pytest.mark.lab
@pytest.mark.slow  # a lab of three shoalds
def test_swarm_sh_inits_and_joins_as_vagrant_runs_it() -> None:
    """swarm.sh as the Vagrantfile calls it on each node, in order, with the tokens sw1's
    trigger copies (`docker swarm join-token -q ROLE`) in a directory standing for
    /vagrant/.vagrant-tokens; the docker CLI in each node talks to its shoald, as on a VM."""
    from orchestrator.lab import daemons  # noqa: PLC0415 - only this test needs the lab
    from orchestrator.lab.lab import Lab  # noqa: PLC0415
    from tests.labutil import DOCKER, fresh, module_lab, run  # noqa: PLC0415

    script = str(ROOT / "vagrant" / "swarm.sh")
    with (
        tempfile.TemporaryDirectory(prefix="shoal-vagrant-tokens-") as tokens,
        module_lab(LAB, 3, SUBNET, executor="native") as made,
    ):
        daemons.start_all(made)
        lab = fresh(made)
        address = {n: lab.node(n).address for n in ("sw1", "sw2", "sw3")}
        join = f"{address['sw1']}:2377"

        def swarm_sh(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
            env = f"SHOAL_TOKENS={tokens}"
            return run(lab, node, "env", env, "bash", script, *args, check=False)

        missing = swarm_sh(lab, "sw2", "join", address["sw2"], "manager", join)
        assert missing.returncode == 1
        assert f"no manager join token in {tokens}/manager" in missing.stderr

        init = swarm_sh(lab, "sw1", "init", address["sw1"], "10.10.0.0/16")
        assert init.returncode == 0, init.stderr
        assert "Swarm initialized" in init.stdout
        for kind in ("worker", "manager"):
            token = run(lab, "sw1", DOCKER, "swarm", "join-token", "-q", kind).stdout.strip()
            assert token.startswith("SWMTKN-1-")
            (Path(tokens) / kind).write_text(f"{token}\n")
        for node, role in (("sw2", "manager"), ("sw3", "worker")):
            joined = swarm_sh(lab, node, "join", address[node], role, join)
            assert joined.returncode == 0, joined.stderr
            assert f"This node joined a swarm as a {role}" in joined.stdout

        # a second provisioning run changes nothing
        again = swarm_sh(lab, "sw1", "init", address["sw1"], "10.10.0.0/16")
        assert again.returncode == 0 and "already in a swarm" in again.stdout, again.stderr
        again = swarm_sh(lab, "sw3", "join", address["sw3"], "worker", join)
        assert again.returncode == 0 and "already in a swarm" in again.stdout, again.stderr

        nodes = run(lab, "sw2", DOCKER, "node", "ls", "--format", "{{.Hostname}}").stdout
        assert len(nodes.split()) == 3, nodes
        for node in ("sw1", "sw2", "sw3"):
            shown = run(lab, "sw1", DOCKER, "node", "inspect", "--format",
                        "{{.Status.Addr}} {{.Spec.Role}}", node)  # fmt: skip
            role = "worker" if node == "sw3" else "manager"
            assert shown.stdout.split() == [address[node], role], (node, shown.stdout)
        # overlay networks come from the pool given at init, clear of VirtualBox's NAT network
        run(lab, "sw1", DOCKER, "network", "create", "-d", "overlay", "blog")
        subnet = run(lab, "sw1", DOCKER, "network", "inspect", "--format",
                     "{{(index .IPAM.Config 0).Subnet}}", "blog").stdout.strip()  # fmt: skip
        assert ipaddress.IPv4Network(subnet).subnet_of(ipaddress.IPv4Network("10.10.0.0/16"))
