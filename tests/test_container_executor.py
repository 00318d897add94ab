"""The container executor end to end: a 3-node lab whose shoalds run tasks as containers of
their nodes' own engines, pulling from the lab's registry; driven by the docker CLI and SDK
(docs/container-executor.md)."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import signal
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import pytest

from orchestrator.agent.exec.base import LABEL_NODE_ID, LABEL_TASK_ID
from orchestrator.agent.exec.container import GATE_MOUNT
from orchestrator.images import rootfs
from orchestrator.lab import daemons, engines, registry
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab
from tests.labutil import DOCKER, fresh, run, shoal, wait
from tests.netutil import answers, balanced

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tctr"
SUBNET = ipaddress.IPv4Network("192.168.95.0/24")
MARKER = "/only-in-this-image"


@pytest.fixture(scope="module")
def swarm() -> Iterator[Lab]:
    if labmod.load(LAB) is not None or (labmod.DATA_DIR / LAB).exists():
        labmod.down(LAB, purge=True)
    lab = labmod.up(LAB, 3, SUBNET)
    try:
        daemons.start_all(lab)
        sw1 = lab.node("sw1")
        shoal(lab, "sw1", "swarm", "init", "--listen-addr", f"{sw1.address}:2377",
              "--dispatcher-heartbeat", "1")  # fmt: skip
        token = shoal(lab, "sw1", "swarm", "join-token", "-q", "worker").stdout.strip()
        for n in ("sw2", "sw3"):
            shoal(lab, n, "swarm", "join", "--token", token, f"{sw1.address}:2377")
        wait(lambda: shoal(lab, "sw1", "node", "ls").stdout.count("Ready") == 3, "3 nodes")
        yield fresh(lab)
    finally:
        labmod.down(LAB, purge=True)


@pytest.fixture(scope="module")
def sdk(swarm: Lab) -> Iterator[Any]:
    client = docker.DockerClient(base_url=daemons.docker_host(swarm, "sw1"))
    yield client
    client.close()


def engine(lab: Lab, node: str) -> Any:
    return docker.APIClient(base_url=engines.socket_url(lab, node), version="1.41")


def tasks_of(sdk: Any, name: str) -> list[dict[str, Any]]:
    return list(sdk.services.get(name).tasks())


def running(sdk: Any, name: str) -> list[dict[str, Any]]:
    return [
        t
        for t in tasks_of(sdk, name)
        if t["Status"]["State"] == "running" and t["DesiredState"] == "running"
    ]


def ended(sdk: Any, name: str) -> list[dict[str, Any]]:
    return [t for t in tasks_of(sdk, name) if t["Status"]["State"] in ("complete", "failed")]


def logs(lab: Lab, service: str, *flags: str) -> list[str]:
    """The service's log lines (the CLI writes the task's stderr to its own: both here)."""
    out = run(lab, "sw1", DOCKER, "service", "logs", "--raw", *flags, service)
    return out.stdout.splitlines() + out.stderr.splitlines()


def containers(lab: Lab, node: str, **labels: str) -> list[dict[str, Any]]:
    api = engine(lab, node)
    try:
        found: list[dict[str, Any]] = api.containers(
            all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]}
        )
        return found
    finally:
        api.close()


def app_image() -> rootfs.Image:
    """micro, plus a file no other image has."""
    base = rootfs.micro()
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(base.layer)) as src,
        tarfile.open(fileobj=out, mode="w") as dst,
    ):
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        data = b"built in the test\n"
        info = tarfile.TarInfo(MARKER.lstrip("/"))
        info.size, info.mode = len(data), 0o644
        dst.addfile(info, io.BytesIO(data))
    return rootfs.Image(out.getvalue(), base.config)


def test_an_image_pushed_to_the_lab_registry_runs_on_every_node_through_the_mesh(
    swarm: Lab, sdk: Any
) -> None:
    addr = registry.address(swarm)
    digest = registry.push(addr, "t/app", "v1", app_image())
    image = f"{addr}/t/app:v1"
    run(swarm, "sw1", DOCKER, "service", "create", "--name", "app", "--replicas", "3",
        "--publish", "30600:8000", image)  # fmt: skip
    try:
        tasks = running(sdk, "app")
        assert len(tasks) == 3 and len({t["NodeID"] for t in tasks}) == 3  # one per node
        # pinned to what the registry had (the CLI asked shoald's /distribution)
        spec = sdk.services.get("app").attrs["Spec"]["TaskTemplate"]["ContainerSpec"]
        assert spec["Image"] == f"{image}@{digest}"
        ips = {t["NetworksAttachments"][0]["Addresses"][0].split("/")[0] for t in tasks}
        for node in swarm.nodes:
            counts = answers(None, node.address, 30600, 30)
            assert balanced(counts, ips), (node.name, counts)
        # each node's engine pulled the image and runs exactly one task container of it
        for node in swarm.nodes:
            mine = containers(swarm, node.name, **{"com.docker.swarm.service.name": "app"})
            assert [c["Image"] for c in mine if c["State"] == "running"] == [spec["Image"]]
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "app")


def test_the_task_runs_its_image_as_its_spec_says(swarm: Lab, sdk: Any) -> None:
    addr = registry.address(swarm)
    registry.push(addr, "t/app", "v1", app_image())
    script = (
        f"cat {MARKER}; test -e /etc/debian_version || echo no-debian; "
        'echo "args=$*"; echo "user=$(id -u)"; echo "cwd=$(pwd)"; echo "host=$(hostname)"; '
        'echo "env=$GREETING"; cat /data/hello; echo scratch > /scratch/x && echo tmpfs-ok; '
        # as user nobody, only the mount table tells what is read-only
        'awk \'$2 == "/" || $2 == "/data" || $2 == "/vol" {print "mount", $2, $3, '
        "substr($4, 1, 2)}' /proc/mounts; "
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; echo pid1=$(cat /proc/1/comm); "
        # the environment this shell was started with: the engine's, nothing of the gate's
        "echo envkeys=$(tr '\\0' '\\n' < /proc/$$/environ | cut -d= -f1 | sort | tr '\\n' ,)"
    )
    bind_dir = f"/tmp/{LAB}-bind"
    os.makedirs(bind_dir, exist_ok=True)
    with open(f"{bind_dir}/hello", "w") as f:
        f.write("from the host\n")
    try:
        run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "spec",
            "--restart-condition", "none", "--constraint", "node.hostname==sw2",
            "--entrypoint", "sh", "--user", "65534", "--workdir", "/tmp",
            "--hostname", "{{.Service.Name}}-{{.Task.Slot}}", "--env", "GREETING=hi",
            "--container-label", "team=blue", "--read-only", "--init",
            "--mount", f"type=bind,src={bind_dir},dst=/data,ro",
            "--mount", "type=tmpfs,dst=/scratch",
            "--mount", "type=volume,src=spec-{{.Task.Slot}},dst=/vol",
            "--limit-memory", "64m", "--limit-cpu", "0.5",
            f"{addr}/t/app:v1", "-c", script, "spec", "one", "two")  # fmt: skip
        wait(lambda: len(ended(sdk, "spec")) == 1, "the task to end", 60)
        [task] = ended(sdk, "spec")
        assert task["Status"]["State"] == "complete", task["Status"]
        out = logs(swarm, "spec")
        assert out[:2] == ["built in the test", "no-debian"], out
        assert "args=one two" in out and "user=65534" in out and "cwd=/tmp" in out, out
        assert "host=spec-1" in out and "env=hi" in out and "from the host" in out, out
        assert "tmpfs-ok" in out and "mount / overlay ro" in out, out  # tmpfs is 1777
        assert "mount /data ext4 ro" in out and "mount /vol ext4 rw" in out, out
        assert str(64 * 2**20) in out and "pid1=docker-init" in out, out
        [keys] = [line.split("=", 1)[1].split(",") for line in out if line.startswith("envkeys")]
        assert {"GREETING", "HOSTNAME", "PATH"} <= set(keys) and not {"SHLVL", "PWD"} & set(keys)
        [c] = containers(swarm, "sw2", **{LABEL_TASK_ID: task["ID"]})
        api = engine(swarm, "sw2")
        got = api.inspect_container(c["Id"])
        api.close()
        assert got["HostConfig"]["NanoCpus"] == 500_000_000
        assert got["HostConfig"]["Memory"] == 64 * 2**20
        assert got["HostConfig"]["ReadonlyRootfs"] and got["HostConfig"]["Init"]
        labels = got["Config"]["Labels"]
        assert labels["team"] == "blue" and labels["com.docker.swarm.service.name"] == "spec"
        assert labels["com.docker.swarm.task.name"] == f"spec.1.{task['ID']}"
        assert labels["com.docker.swarm.node.id"] == task["NodeID"]
        assert {m["Destination"]: m["Type"] for m in got["Mounts"]} == {
            "/data": "bind",
            "/scratch": "tmpfs",
            "/vol": "volume",
            GATE_MOUNT: "bind",  # the executor's gate, read-only
        }
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "spec", check=False)


def test_a_service_name_resolves_at_the_first_instruction(swarm: Lab, sdk: Any) -> None:
    """The network is there before the process starts."""
    run(swarm, "sw1", DOCKER, "network", "create", "-d", "overlay", "early")
    run(swarm, "sw1", DOCKER, "service", "create", "--name", "target", "--network", "early",
        "micro")  # fmt: skip
    try:
        run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "early-bird",
            "--network", "early", "--restart-condition", "none", "--replicas", "3",
            "busybox", "wget", "-qO-", "http://target:8000/")  # fmt: skip
        wait(lambda: len(ended(sdk, "early-bird")) == 3, "3 tasks to end", 60)
        states = Counter(t["Status"]["State"] for t in ended(sdk, "early-bird"))
        assert states == {"complete": 3}, [t["Status"] for t in ended(sdk, "early-bird")]
        answered = [json.loads(line) for line in logs(swarm, "early-bird")]
        assert len(answered) == 3 and all(a["hostname"] for a in answered)
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "early-bird", "target", check=False)
        run(swarm, "sw1", DOCKER, "network", "rm", "early", check=False)


def test_exit_codes_and_oom_kills_are_task_failures(swarm: Lab, sdk: Any) -> None:
    run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "three",
        "--restart-condition", "none", "busybox", "sh", "-c", "exit 3")  # fmt: skip
    run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "hungry",
        "--restart-condition", "none", "--limit-memory", "16m", "busybox", "sh", "-c",
        "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done")  # fmt: skip
    try:
        wait(lambda: len(ended(sdk, "three")) == 1 and len(ended(sdk, "hungry")) == 1,
             "both to fail", 60)  # fmt: skip
        [three] = ended(sdk, "three")
        assert three["Status"]["State"] == "failed"
        assert three["Status"]["Err"] == "task: non-zero exit (3)"
        assert three["Status"]["ContainerStatus"]["ExitCode"] == 3
        [hungry] = ended(sdk, "hungry")
        assert hungry["Status"]["ContainerStatus"]["ExitCode"] == 137
        assert hungry["Status"]["Err"] == (
            "task: non-zero exit (137): killed by the kernel for lack of memory "
            "(OOM, memory limit 16 MiB)"
        )
        ps = run(swarm, "sw1", DOCKER, "service", "ps", "--no-trunc", "hungry").stdout
        assert "lack of memory" in ps
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "three", "hungry", check=False)


def test_logs_come_from_the_engine(swarm: Lab, sdk: Any) -> None:
    loop = "i=0; while true; do i=$((i+1)); echo out $i; echo err $i >&2; sleep 0.2; done"
    run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "talk", "busybox", "sh",
        "-c", loop)  # fmt: skip
    try:
        wait(lambda: len(running(sdk, "talk")) == 1, "talk to run", 60)
        wait(lambda: len(logs(swarm, "talk")) >= 30, "3 s of lines", 30)
        lines = logs(swarm, "talk")
        assert "out 1" in lines and "err 1" in lines
        assert len(logs(swarm, "talk", "--tail", "2")) == 2
        stamped = logs(swarm, "talk", "--timestamps", "--tail", "1")[0]
        stamp, _, text = stamped.partition(" ")
        assert stamp.endswith("Z") and text.split()[0] in ("out", "err"), stamped
        since = logs(swarm, "talk", "--since", "1s")
        assert 0 < len(since) < len(lines)
        # the SDK: stdout only, then follow a few new lines
        svc = sdk.services.get("talk")
        only_out = b"".join(svc.logs(stdout=True, stderr=False)).decode().splitlines()
        assert only_out and all(line.startswith("out ") for line in only_out), only_out[:3]
        follow = svc.logs(stdout=True, stderr=True, follow=True, tail=0)
        seen = []
        for chunk in follow:
            seen += chunk.decode().splitlines()
            if len(seen) >= 4:
                break
        follow.close()
        last = int(only_out[-1].split()[1])
        assert all(int(line.split()[1]) > last for line in seen), (last, seen)
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "talk", check=False)


def test_a_tty_services_logs_are_its_lines(swarm: Lab, sdk: Any) -> None:
    """A TTY has one stream: the engine and the API send it unframed, as Docker does."""
    run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "tty", "--tty",
        "--restart-condition", "none", "busybox", "sh", "-c", "echo on a tty; tty")  # fmt: skip
    try:
        wait(lambda: len(ended(sdk, "tty")) == 1, "the task to end", 60)
        out = run(swarm, "sw1", DOCKER, "service", "logs", "--raw", "tty").stdout
        # no frame headers, the lines as the TTY wrote them (\r\n, read here as text)
        assert out == "on a tty\n/dev/pts/0\n"
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "tty", check=False)


def test_an_image_no_registry_has_is_rejected_without_a_retry_storm(swarm: Lab, sdk: Any) -> None:
    run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "steady", "--replicas", "2",
        "micro")  # fmt: skip
    try:
        wait(lambda: len(running(sdk, "steady")) == 2, "steady to run", 60)
        before = {t["ID"] for t in running(sdk, "steady")}
        missing = f"{registry.address(swarm)}/t/nosuch:1"
        out = run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "ghost",
                  "--restart-delay", "2s", missing)  # fmt: skip
        assert "could not be accessed on a registry" in out.stderr
        started = time.monotonic()
        wait(lambda: any(t["Status"]["State"] == "rejected" for t in tasks_of(sdk, "ghost")),
             "a rejection", 30)  # fmt: skip
        rejected = next(t for t in tasks_of(sdk, "ghost") if t["Status"]["State"] == "rejected")
        assert rejected["Status"]["Err"].startswith(f"pulling image {missing}:"), rejected
        assert "not found" in rejected["Status"]["Err"] or "unknown" in rejected["Status"]["Err"]
        time.sleep(max(0.0, 10 - (time.monotonic() - started)))
        # one attempt per restart delay (2 s) at most: no storm
        assert len(tasks_of(sdk, "ghost")) <= 6, len(tasks_of(sdk, "ghost"))
        assert {t["ID"] for t in running(sdk, "steady")} == before  # untouched
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "ghost", "steady", check=False)


def test_bad_references_and_reservations_are_refused_or_wait(swarm: Lab, sdk: Any) -> None:
    with pytest.raises(docker.errors.APIError) as bad:
        sdk.services.create("Bad/Image:x", name="badref")
    assert bad.value.status_code == 400
    assert "invalid reference format" in str(bad.value.explanation)
    assert "badref" not in [s.name for s in sdk.services.list()]
    huge = 10**15  # a petabyte: no node has it
    svc = sdk.services.create(
        "micro", name="huge", resources=docker.types.Resources(mem_reservation=huge)
    )
    try:
        wait(lambda: bool(tasks_of(sdk, "huge")), "a task", 10)
        wait(lambda: "insufficient resources" in tasks_of(sdk, "huge")[0]["Status"]["Err"],
             "the reason", 10)  # fmt: skip
        [task] = tasks_of(sdk, "huge")
        assert task["Status"]["State"] == "pending"
        assert task["Status"]["Err"] == "no suitable node (insufficient resources on 3 nodes)"
    finally:
        svc.remove()


def test_a_task_exiting_at_once_waits_out_its_restart_delay(swarm: Lab, sdk: Any) -> None:
    run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "quitter",
        "--restart-condition", "any", "--restart-delay", "2s", "busybox", "true")  # fmt: skip
    try:
        time.sleep(9)
        made = tasks_of(sdk, "quitter")
        # 0 s, then one every 2 s plus its start: at most 5 in 9 s
        assert 2 <= len(made) <= 5, [t["Status"] for t in made]
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "quitter", check=False)


def test_a_restarted_shoald_leaves_one_container_per_task(swarm: Lab, sdk: Any) -> None:
    run(swarm, "sw1", DOCKER, "service", "create", "--name", "keep", "--replicas", "6",
        "micro")  # fmt: skip
    try:
        node = swarm.node("sw2")
        sw2 = sdk.nodes.list(filters={"name": "sw2"})[0].id
        before = {t["ID"] for t in running(sdk, "keep") if t["NodeID"] == sw2}
        assert before
        [shoald] = [
            p
            for p in labmod.running(fresh(swarm), "sw2")
            if b"orchestrator.daemon" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        os.kill(shoald, signal.SIGKILL)
        wait(lambda: not daemons.answers(swarm, "sw2"), "shoald gone", 10)
        daemons.start(fresh(swarm), node)
        daemons.wait_ready(swarm, "sw2")
        # the new shoald removed its predecessor's containers: those tasks failed, and were
        # replaced
        wait(lambda: not before & {t["ID"] for t in running(sdk, "keep")}, "old tasks gone", 30)
        wait(lambda: len(running(sdk, "keep")) == 6, "6 running again", 60)

        def mismatches() -> list[str]:
            found = []
            for n in swarm.nodes:
                nid = sdk.nodes.list(filters={"name": n.name})[0].id
                live = Counter(t["ID"] for t in running(sdk, "keep") if t["NodeID"] == nid)
                up = [
                    c["Labels"]
                    for c in containers(swarm, n.name, **{LABEL_NODE_ID: nid})
                    if c["State"] == "running"
                ]
                tasks = Counter(c[LABEL_TASK_ID] for c in up)
                names = sorted(p for p in os.listdir("/run/netns") if p.startswith(n.netns + "-"))
                if tasks != live:
                    found.append(f"{n.name}: containers {tasks}, live {live}")
                if names != sorted(f"{n.netns}-{t[:12]}" for t in live):
                    found.append(f"{n.name}: namespaces {names}, live {live}")
            return found

        # one container (and one namespace) per running task, nothing else
        try:
            wait(lambda: not mismatches(), "one container per task", 20)
        except AssertionError:
            raise AssertionError(mismatches()) from None
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "keep", check=False)


def test_an_engine_that_goes_away_takes_its_node_down_and_back(swarm: Lab, sdk: Any) -> None:
    run(swarm, "sw1", DOCKER, "service", "create", "--name", "moving", "--replicas", "3",
        "micro")  # fmt: skip
    try:
        sw3 = sdk.nodes.list(filters={"name": "sw3"})[0]
        [on_sw3] = [t for t in running(sdk, "moving") if t["NodeID"] == sw3.id]
        engines.stop(fresh(swarm), "sw3")

        def sw3_down() -> bool:
            sw3.reload()
            return bool(sw3.attrs["Status"]["State"] == "down")

        wait(sw3_down, "sw3 down", 30)
        assert "container engine" in sw3.attrs["Status"]["Message"], sw3.attrs["Status"]
        wait(lambda: len(running(sdk, "moving")) == 3 and all(
            t["NodeID"] != sw3.id for t in running(sdk, "moving")), "3 elsewhere", 60)  # fmt: skip
        failed = next(t for t in tasks_of(sdk, "moving") if t["ID"] == on_sw3["ID"])
        assert "container engine" in failed["Status"]["Err"], failed["Status"]
        engines.start(fresh(swarm), "sw3")
        engines.wait_ready(swarm, "sw3")

        def sw3_ready() -> bool:
            sw3.reload()
            return bool(sw3.attrs["Status"]["State"] == "ready")

        wait(sw3_ready, "sw3 ready again", 30)
        # nothing of the failed task runs there any more
        wait(lambda: not [c for c in containers(swarm, "sw3") if c["State"] == "running"],
             "sw3's old containers gone", 30)  # fmt: skip
        # and it takes tasks again
        run(swarm, "sw1", DOCKER, "service", "scale", "moving=6")
        assert any(t["NodeID"] == sw3.id for t in running(sdk, "moving"))
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "moving", check=False)


def test_with_registry_auth_hands_the_clients_credentials_to_the_nodes(
    swarm: Lab, sdk: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry that wants a password (the test's own, beside the lab's): tasks pull from
    it with the credentials the client logged in with, and only with --with-registry-auth."""
    addr = f"{swarm.gateway}:5001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # noqa: PLC0415 - bcrypt, the only hash docker-registry takes

        hashed = crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH))
    (tmp_path / "htpasswd").write_text(f"tester:{hashed}\n")
    (tmp_path / "registry.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
        f"http:\n  addr: {addr}\n"
        f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp_path / 'htpasswd'}\n"
    )
    with open(tmp_path / "registry.log", "wb") as out:
        server = subprocess.Popen(
            [registry.BINARY, "serve", str(tmp_path / "registry.yml")], stdout=out, stderr=out
        )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "client"))  # the CLI's credentials
    try:
        wait(lambda: _status(f"http://{addr}/v2/") == 401, "the registry to ask for a password")
        engine_cli = [DOCKER, "-H", engines.socket_url(swarm, "sw1")]
        for argv in (
            ["login", addr, "-u", "tester", "--password-stdin"],
            ["pull", "busybox"],
            ["tag", "busybox", f"{addr}/private/app"],
            ["push", f"{addr}/private/app"],
        ):
            done = subprocess.run(
                [*engine_cli, *argv], input="s3cret", capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, (argv, done.stderr)
        image = f"{addr}/private/app"
        # sw1's engine has it already (it pushed it): the others must pull it
        run(swarm, "sw1", DOCKER, "service", "create", "-d", "--name", "noauth",
            "--constraint", "node.hostname!=sw1", image, "sleep", "600")  # fmt: skip
        try:
            wait(lambda: any(t["Status"]["State"] == "rejected" for t in tasks_of(sdk, "noauth")),
                 "a rejection", 30)  # fmt: skip
        except AssertionError:
            raise AssertionError([t["Status"] for t in tasks_of(sdk, "noauth")]) from None
        err = next(t for t in tasks_of(sdk, "noauth") if t["Status"]["State"] == "rejected")
        assert "no basic auth credentials" in err["Status"]["Err"], err["Status"]
        run(swarm, "sw1", DOCKER, "service", "create", "--name", "withauth",
            "--with-registry-auth", "--replicas", "3", image, "sleep", "600")  # fmt: skip
        tasks = running(sdk, "withauth")
        assert len({t["NodeID"] for t in tasks}) == 3  # every node pulled it
        shown = json.dumps(sdk.services.get("withauth").attrs)
        assert "s3cret" not in shown and "tester" not in shown  # never shown by the API
        spec = sdk.services.get("withauth").attrs["Spec"]["TaskTemplate"]["ContainerSpec"]
        assert "@sha256:" in spec["Image"]  # pinned with the credentials too
    finally:
        run(swarm, "sw1", DOCKER, "service", "rm", "noauth", "withauth", check=False)
        server.terminate()
        server.wait(10)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0
