"""`shoal service create | update | rollback | logs`: docker CLI 20.10's flags and the JSON they
make, and how `update` and `rollback` follow the update they start.

The expected specs are what Debian's docker 20.10.24 (`/usr/bin/docker`) posted for the same
command lines to a socket recording them, less the empty fields it adds (`"Placement": {}`,
`"DNSConfig": {}`, `"ForceUpdate": 0`) and with `"Replicas": 1` where it leaves the default
to the engine. Nothing here starts a daemon: the parser and the spec builders are called, and
a stand-in client records what would be posted.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api.convert import node_json
from orchestrator.api.docker import canonical
from orchestrator.cli import service
from orchestrator.cli.client import APIError, CliError
from orchestrator.cli.main import build_parser, main
from orchestrator.cli.service import (
    SECOND,
    _updated_spec,
    create_spec,
    go_duration,
    parse_bytes,
    parse_cpus,
    parse_duration,
    parse_health_duration,
    parse_mount,
    parse_ratio,
    parse_retries,
    parse_since,
    parse_uint,
    ram_in_bytes,
    registry_auth,
)
from orchestrator.manager.spec import normalize_service_spec
from orchestrator.store.objects import Node

MIB = 1 << 20


def args_of(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["service", *argv])


def created(*flags: str, image: str = "alpine:3") -> dict[str, Any]:
    return create_spec(args_of("create", "--name", "web", *flags, image))


def refused(fn: Any, *args: Any) -> str:
    with pytest.raises(CliError) as e:
        fn(*args)
    return str(e.value)


# ---- create ---------------------------------------------------------------------------------


def test_create_every_new_flag_makes_dockers_json() -> None:
    args = args_of(
        "create", "--name", "web", "-d",
        "--entrypoint", "/bin/sh -c",
        "-u", "nobody:nogroup",
        "-w", "/srv",
        "--hostname", "{{.Service.Name}}-{{.Task.Slot}}",
        "--group", "audio", "--group", "video",
        "--mount", "type=bind,src=/etc,dst=/host/etc,ro,bind-propagation=rslave",
        "--mount", "type=volume,source=data,target=/data,volume-nocopy,volume-label=a=b,"
        "volume-driver=local,volume-opt=type=tmpfs",
        "--mount", "type=tmpfs,target=/tmp,tmpfs-size=64m,tmpfs-mode=1770",
        "--read-only", "--init", "--stop-signal", "SIGUSR1", "--stop-grace-period", "1m30s",
        "-t", "--limit-cpu", "0.5", "--limit-memory", "64m",
        "--reserve-memory", "512k", "--reserve-cpu", "0.25",
        "-l", "a=b", "-l", "c", "--container-label", "x=y",
        "--with-registry-auth", "--restart-window", "10m",
        "--init=false",  # the last one wins, as with pflag
        "redis:7", "redis-server", "--appendonly", "yes",
    )  # fmt: skip
    assert args.with_registry_auth is True and args.detach is True
    assert create_spec(args) == {
        "Name": "web",
        "Labels": {"a": "b", "c": ""},
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": "redis:7",
                "Labels": {"x": "y"},
                "Command": ["/bin/sh", "-c"],
                "Args": ["redis-server", "--appendonly", "yes"],
                "Hostname": "{{.Service.Name}}-{{.Task.Slot}}",
                "Dir": "/srv",
                "User": "nobody:nogroup",
                "Groups": ["audio", "video"],
                "TTY": True,
                "ReadOnly": True,
                "Mounts": [
                    {
                        "Type": "bind",
                        "Source": "/etc",
                        "Target": "/host/etc",
                        "ReadOnly": True,
                        "BindOptions": {"Propagation": "rslave"},
                    },
                    {
                        "Type": "volume",
                        "Source": "data",
                        "Target": "/data",
                        "VolumeOptions": {
                            "NoCopy": True,
                            "Labels": {"a": "b"},
                            "DriverConfig": {"Name": "local", "Options": {"type": "tmpfs"}},
                        },
                    },
                    {
                        "Type": "tmpfs",
                        "Target": "/tmp",
                        "TmpfsOptions": {"SizeBytes": 64 * MIB, "Mode": 0o1770},
                    },
                ],
                "StopSignal": "SIGUSR1",
                "StopGracePeriod": 90 * SECOND,
                "Init": False,
            },
            "Resources": {
                "Limits": {"NanoCPUs": SECOND // 2, "MemoryBytes": 64 * MIB},
                "Reservations": {"NanoCPUs": SECOND // 4, "MemoryBytes": 512 * 1024},
            },
            "RestartPolicy": {
                "Condition": "any",
                "Delay": 5 * SECOND,
                "MaxAttempts": 0,
                "Window": 600 * SECOND,
            },
        },
        "Mode": {"Replicated": {"Replicas": 1}},
        "EndpointSpec": {"Mode": "vip"},
    }


def test_the_api_takes_what_create_and_update_send() -> None:
    spec = created(
        "--entrypoint", "sh -c", "-u", "1:1", "-w", "/w", "--hostname", "{{.Task.Slot}}",
        "--group", "g", "--mount", "type=bind,src=/srv,dst=/srv,ro,bind-propagation=rshared",
        "--mount", "src=data,dst=/data,volume-label=a=b,volume-opt=o=1,volume-nocopy",
        "--mount", "type=tmpfs,dst=/tmp,tmpfs-size=1m,tmpfs-mode=700", "--read-only",
        "--init", "-t", "--stop-signal", "USR1", "--stop-grace-period", "3s",
        "--limit-cpu", "1", "--limit-memory", "64m", "--limit-pids", "9", "--reserve-cpu",
        "0.5", "--reserve-memory", "32m", "-l", "a=b", "--container-label", "c=d",
        "--restart-window", "1m",
    )  # fmt: skip
    stored_spec = normalize_service_spec(canonical(json.loads(json.dumps(spec))))
    # stored as sent, and with the force counter Docker always has (0 until --force)
    assert stored_spec["TaskTemplate"] == {**spec["TaskTemplate"], "ForceUpdate": 0}
    again = _updated_spec(args_of("update", "--mount-rm", "/srv", "--init=false", "web"), spec)
    normalize_service_spec(again)


def test_create_without_the_new_flags_sends_what_docker_does() -> None:
    assert created() == {
        "Name": "web",
        "Labels": {},
        "TaskTemplate": {
            "ContainerSpec": {"Image": "alpine:3", "Init": False},
            "Resources": {"Limits": {}, "Reservations": {}},
        },
        "Mode": {"Replicated": {"Replicas": 1}},
        "EndpointSpec": {"Mode": "vip"},
    }


def test_create_entrypoint_is_shell_split_and_empty_sends_none() -> None:
    cs = created("--entrypoint", "/bin/sh -c 'echo hi'")["TaskTemplate"]["ContainerSpec"]
    assert cs["Command"] == ["/bin/sh", "-c", "echo hi"]
    assert "Command" not in created("--entrypoint", "")["TaskTemplate"]["ContainerSpec"]
    message = refused(created, "--entrypoint", "sh -c 'unclosed")
    assert message.startswith('invalid argument "sh -c \'unclosed" for "--entrypoint" flag:')


def test_create_resources_restart_and_pids() -> None:
    tt = created(
        "--limit-cpu", "1.25", "--limit-memory", "1g", "--limit-pids", "50",
        "--reserve-cpu", "1/4", "--reserve-memory", "100",
        "--restart-delay", "2s", "--restart-max-attempts", "3",
        "--restart-condition", "on-failure",
    )["TaskTemplate"]  # fmt: skip
    assert tt["Resources"] == {
        "Limits": {"NanoCPUs": 1_250_000_000, "MemoryBytes": 1 << 30, "Pids": 50},
        "Reservations": {"NanoCPUs": 250_000_000, "MemoryBytes": 100},
    }
    assert tt["RestartPolicy"] == {
        "Condition": "on-failure",
        "Delay": 2 * SECOND,
        "MaxAttempts": 3,
    }
    # shoal took --restart-delay in seconds before it took durations: a plain number still is
    policy = created("--restart-delay", "0.2")["TaskTemplate"]["RestartPolicy"]
    assert policy["Delay"] == SECOND // 5
    assert "Limits" in created("--limit-cpu", "0")["TaskTemplate"]["Resources"]
    assert created("--limit-cpu", "0")["TaskTemplate"]["Resources"]["Limits"] == {}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--limit-memory", "12x"),
            'invalid argument "12x" for "--limit-memory" flag: invalid size: \'12x\'',
        ),
        (
            ("--reserve-memory", "-1"),
            'invalid argument "-1" for "--reserve-memory" flag: invalid size: \'-1\'',
        ),
        (
            ("--limit-cpu", "abc"),
            'invalid argument "abc" for "--limit-cpu" flag: failed to parse abc as a rational '
            "number",
        ),
        (
            ("--reserve-cpu", "0.0000000001"),
            'invalid argument "0.0000000001" for "--reserve-cpu" flag: value is too precise',
        ),
        (
            ("--limit-cpu=-1",),
            'invalid argument "-1" for "--limit-cpu" flag: the number of CPUs cannot be negative',
        ),
        (
            ("--limit-pids", "-3"),
            'invalid argument "-3" for "--limit-pids" flag: must not be negative',
        ),
        (
            ("--stop-grace-period", "10"),
            'invalid argument "10" for "--stop-grace-period" flag: time: missing unit in '
            'duration "10"',
        ),
        (
            ("--stop-grace-period", "-5s"),  # a value, as pflag takes it
            'invalid argument "-5s" for "--stop-grace-period" flag: duration cannot be negative',
        ),
        (
            ("--restart-window", "5"),
            'invalid argument "5" for "--restart-window" flag: time: missing unit in duration',
        ),
        (
            ("--restart-delay", "1x"),
            'invalid argument "1x" for "--restart-delay" flag: time: unknown unit "x" in '
            'duration "1x"',
        ),
        (
            ("--read-only=maybe",),
            'invalid argument "maybe" for "--read-only" flag: strconv.ParseBool: parsing '
            '"maybe": invalid syntax',
        ),
        (
            ("-t=yes",),
            'invalid argument "yes" for "-t" flag: strconv.ParseBool',
        ),
        (
            ("--with-registry-auth=2",),
            'invalid argument "2" for "--with-registry-auth" flag',
        ),
        (
            ("-w", "srv"),
            'invalid argument "srv" for "--workdir" flag: the working directory must be an '
            "absolute path",
        ),
        (
            ("--stop-signal", "SIGFOO"),
            'invalid argument "SIGFOO" for "--stop-signal" flag: invalid signal \'SIGFOO\'',
        ),
        (
            ("-l", "=x"),
            'invalid argument "=x" for "--label" flag: invalid label \'=x\': empty name',
        ),
        (
            ("--container-label", "a b=1"),
            'invalid argument "a b=1" for "--container-label" flag: label \'a b\' contains '
            "whitespaces",
        ),
        (
            ("--mount", "type=bind"),
            'invalid argument "type=bind" for "--mount" flag: target is required',
        ),
    ],
)
def test_create_refuses_bad_values_naming_the_flag(flags: tuple[str, ...], message: str) -> None:
    assert refused(created, *flags).startswith(message)


def test_bad_values_are_refused_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_daemon(host: str | None) -> Any:
        raise AssertionError("connected")

    monkeypatch.setattr(service, "connect", no_daemon)
    args = args_of("create", "--name", "web", "--limit-memory", "lots", "alpine")
    assert "--limit-memory" in refused(args.func, args)
    args = args_of("logs", "--since", "yesterday", "web")
    assert "--since" in refused(args.func, args)


def test_booleans_take_pflag_values_only_before_the_image() -> None:
    args = args_of(
        "create", "--name", "web", "--read-only=false", "--init=1", "-t=F", "-d=true",
        "alpine", "sh", "--init=false", "-t",
    )  # fmt: skip
    assert (args.read_only, args.init, args.tty, args.detach) == (False, True, False, True)
    cs = create_spec(args)["TaskTemplate"]["ContainerSpec"]
    assert cs["Args"] == ["sh", "--init=false", "-t"]
    assert "ReadOnly" not in cs and "TTY" not in cs and cs["Init"] is True
    # a flag's value that looks like a boolean flag is the value
    args = args_of("create", "--name", "web", "--hostname", "--init", "alpine")
    assert args.hostname == "--init" and args.init is False
    # short booleans bundled, as pflag takes them
    args = args_of("create", "--name", "web", "-td", "alpine")
    assert args.tty is True and args.detach is True


def test_create_posts_the_spec_prints_warnings_then_the_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    client = RecordingClient({"ID": "svc1", "Warnings": ["image redis:7 could not be pinned"]})
    monkeypatch.setattr(service, "connect", lambda host: client)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    write_docker_config(tmp_path)
    args = args_of("create", "--name", "web", "-d", "--mount", "type=tmpfs,dst=/t", "redis:7")
    assert args.func(args) == 0
    (url, spec, params, headers), *_ = client.posts
    assert url == "/services/create" and spec == create_spec(args) and not params
    assert "X-Registry-Auth" not in headers  # docker sends credentials only when asked
    out, err = capsys.readouterr()
    assert out == "svc1\n" and err == "image redis:7 could not be pinned\n"

    args = args_of("create", "--name", "web", "-d", "--with-registry-auth", "redis:7")
    args.func(args)
    assert decoded(client.posts[-1][3]["X-Registry-Auth"]) == {
        "username": "hubuser",
        "password": "hubpass",
        "serveraddress": "https://index.docker.io/v1/",
    }


# ---- --mount --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mount"),
    [
        ("src=vol,dst=/v", {"Type": "volume", "Source": "vol", "Target": "/v"}),
        (
            "type=bind,source=/a,target=/b,readonly=false",
            {"Type": "bind", "Source": "/a", "Target": "/b"},
        ),
        (
            "type=volume,target=/anon,volume-nocopy=false",
            {"Type": "volume", "Target": "/anon", "VolumeOptions": {"DriverConfig": {}}},
        ),
        (
            "Type=BIND,Source=/x,Destination=/y,ro=1,bind-propagation=RSHARED",
            {
                "Type": "bind",
                "Source": "/x",
                "Target": "/y",
                "ReadOnly": True,
                "BindOptions": {"Propagation": "rshared"},
            },
        ),
        (
            '"type=volume",target=/q,"volume-opt=o=addr=1.2.3.4,rw",volume-label=flag',
            {
                "Type": "volume",
                "Target": "/q",
                "VolumeOptions": {
                    "Labels": {"flag": ""},
                    "DriverConfig": {"Options": {"o": "addr=1.2.3.4,rw"}},
                },
            },
        ),
        (
            "type=tmpfs,destination=/t,tmpfs-size=1.5g,tmpfs-mode=0700",
            {
                "Type": "tmpfs",
                "Target": "/t",
                "TmpfsOptions": {"SizeBytes": 3 << 29, "Mode": 0o700},
            },
        ),
        (
            "type=volume,target=/c,consistency=Cached",
            {"Type": "volume", "Target": "/c", "Consistency": "cached"},
        ),
    ],
)
def test_mount_csv_syntax(text: str, mount: dict[str, Any]) -> None:
    assert parse_mount(text) == mount


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "target is required"),
        ("type=,target=/x", "type is required"),
        ("type=npipe,target=/x", 'invalid mount type "npipe": use bind, volume or tmpfs'),
        ("type=bind,src=/a,target=rel", "the target must be an absolute path"),
        ("target=/x,foo=bar", "unexpected key 'foo' in 'foo=bar'"),
        ("target=/x,source", "invalid field 'source' must be a key=value pair"),
        ("target=/x,ro=maybe", "invalid value for ro: maybe"),
        ("target=/x,volume-nocopy=2", "invalid value for volume-nocopy: 2"),
        ("type=tmpfs,target=/x,tmpfs-mode=9", "invalid value for tmpfs-mode: 9"),
        ("type=tmpfs,target=/x,tmpfs-size=big", "invalid value for tmpfs-size: big"),
        ("type=bind,src=/a,target=/x,bind-propagation=up", 'invalid bind-propagation "up"'),
        (
            "type=bind,src=/a,target=/x,volume-nocopy",
            "cannot mix 'volume-*' options with mount type 'bind'",
        ),
        (
            "type=volume,target=/x,bind-propagation=shared",
            "cannot mix 'bind-*' options with mount type 'volume'",
        ),
        ("target=/x,tmpfs-size=1m", "cannot mix 'tmpfs-*' options with mount type 'volume'"),
        ('target=/x,"src=a"b', "not a comma-separated list"),
    ],
)
def test_mount_refusals(text: str, reason: str) -> None:
    message = refused(parse_mount, text, "--mount-add")
    assert message.startswith(f'invalid argument {json.dumps(text)} for "--mount-add" flag: ')
    assert reason in message


# ---- durations, sizes, CPUs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("10s", 10 * SECOND),
        ("1m30s", 90 * SECOND),
        ("500ms", SECOND // 2),
        ("1.5h", 5400 * SECOND),
        ("1h30m", 5400 * SECOND),
        ("2us", 2000),
        ("2\u00b5s", 2000),
        ("3ns", 3),
        (".5s", SECOND // 2),
        ("1.s", SECOND),
        ("-2m", -120 * SECOND),
        ("+1h1s", 3601 * SECOND),
        ("1.0000000001s", SECOND),  # Go drops what is below a nanosecond
    ],
)
def test_go_durations(text: str, ns: int) -> None:
    assert go_duration(text) == ns


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", 'time: invalid duration ""'),
        ("10", 'time: missing unit in duration "10"'),
        ("1x", 'time: unknown unit "x" in duration "1x"'),
        ("s", 'time: invalid duration "s"'),
        (".s", 'time: invalid duration ".s"'),
        ("1h-2m", 'time: unknown unit "h-" in duration "1h-2m"'),
        ("3000000h", 'time: invalid duration "3000000h"'),
    ],
)
def test_go_duration_errors(text: str, error: str) -> None:
    with pytest.raises(ValueError) as e:
        go_duration(text)
    assert str(e.value) == error


def test_duration_flags() -> None:
    assert parse_duration("1m", "--stop-grace-period") == 60 * SECOND
    assert "--restart-window" in refused(parse_duration, "10", "--restart-window")
    assert parse_duration("10", "--restart-delay", seconds=True) == 10 * SECOND


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("100", 100),
        ("512k", 512 << 10),
        ("64m", 64 << 20),
        ("64M", 64 << 20),
        ("64mb", 64 << 20),
        ("64 MiB", 64 << 20),
        ("1g", 1 << 30),
        ("1.5g", 3 << 29),
        ("2t", 2 << 40),
        ("7b", 7),
    ],
)
def test_sizes_are_dockers_binary_units(text: str, size: int) -> None:
    assert ram_in_bytes(text) == size
    assert parse_bytes(text, "--limit-memory") == size


@pytest.mark.parametrize("text", ["", "m", "-1", "1.2.3", "12x", "1 g b", "1e3", "64  m"])
def test_bad_sizes(text: str) -> None:
    assert refused(parse_bytes, text, "--reserve-memory").startswith(
        f'invalid argument {json.dumps(text)} for "--reserve-memory" flag: invalid size'
    )


@pytest.mark.parametrize(
    ("text", "nano"),
    [("0.5", 500_000_000), ("2", 2 * SECOND), ("1/4", 250_000_000), ("1e-3", 1_000_000),
     (".001", 1_000_000), ("0", 0)],
)  # fmt: skip
def test_cpus(text: str, nano: int) -> None:
    assert parse_cpus(text, "--limit-cpu") == nano


@pytest.mark.parametrize("text", ["", "abc", "1/0", "0x10", "1,5", "nan", "inf", "1_0"])
def test_bad_cpus(text: str) -> None:
    assert refused(parse_cpus, text, "--reserve-cpu").startswith(
        f'invalid argument {json.dumps(text)} for "--reserve-cpu" flag: failed to parse'
    )


# ---- update ---------------------------------------------------------------------------------


def stored() -> dict[str, Any]:
    """A service's spec as the API returns it."""
    return {
        "Name": "web",
        "Labels": {"keep": "1", "old": "1"},
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": "alpine:3@sha256:" + "a" * 64,
                "Args": ["sleep", "1d"],
                "Env": ["A=1"],
                "Labels": {"c": "1", "d": "1"},
                "Groups": ["b", "a"],
                "Mounts": [
                    {"Type": "volume", "Source": "zz", "Target": "/z"},
                    {"Type": "bind", "Source": "/a", "Target": "/old"},
                ],
                "User": "app",
                "ReadOnly": True,
                "TTY": True,
                "Init": True,
                "StopSignal": "SIGINT",
                "Healthcheck": {"Test": ["NONE"]},
            },
            "Resources": {"Limits": {"NanoCPUs": SECOND, "MemoryBytes": 64 * MIB}},
            "RestartPolicy": {"Condition": "none", "Delay": SECOND, "MaxAttempts": 1},
            "Placement": {"Constraints": ["node.role==worker"]},
            "ForceUpdate": 2,
        },
        "Mode": {"Replicated": {"Replicas": 3}},
        "UpdateConfig": {"Parallelism": 2, "Order": "start-first"},
        "RollbackConfig": {"Parallelism": 1},
        "EndpointSpec": {"Mode": "vip", "Ports": [{"Protocol": "tcp", "TargetPort": 80}]},
    }


def updated(*flags: str) -> dict[str, Any]:
    return _updated_spec(args_of("update", *flags, "web"), stored())


def test_update_without_flags_sends_the_spec_back_as_read() -> None:
    assert updated() == stored()
    assert updated("-d", "--with-registry-auth") == stored()


def test_update_changes_only_what_is_named() -> None:
    spec = updated(
        "--entrypoint", "sh -c",
        "-u", "root", "-w", "/srv", "--hostname", "{{.Node.Hostname}}",
        "--mount-add", "type=tmpfs,target=/t",
        "--mount-add", "type=bind,src=/a,target=/z",  # replaces the volume on /z
        "--mount-rm", "/old",
        "--read-only=false", "--init=false", "-t=0",
        "--stop-signal", "SIGTERM", "--stop-grace-period", "20s",
        "--limit-memory", "1g", "--reserve-cpu", "0.1",
        "--label-add", "new=2", "--label-rm", "old", "--label-add", "keep=2",
        "--container-label-add", "e=2", "--container-label-rm", "c",
        "--group-add", "c", "--group-rm", "b",
        "--restart-window", "1m",
    )  # fmt: skip
    want = stored()
    want["Labels"] = {"keep": "2", "new": "2"}
    cs = want["TaskTemplate"]["ContainerSpec"]
    cs.update(
        Command=["sh", "-c"],
        User="root",
        Dir="/srv",
        Hostname="{{.Node.Hostname}}",
        Init=False,
        StopSignal="SIGTERM",
        StopGracePeriod=20 * SECOND,
        Labels={"d": "1", "e": "2"},
        Groups=["a", "c"],
        Mounts=[  # docker's order: by source, then target
            {"Type": "tmpfs", "Target": "/t"},
            {"Type": "bind", "Source": "/a", "Target": "/z"},
        ],
    )
    del cs["ReadOnly"], cs["TTY"]
    want["TaskTemplate"]["Resources"] = {
        "Limits": {"NanoCPUs": SECOND, "MemoryBytes": 1 << 30},
        "Reservations": {"NanoCPUs": 100_000_000},
    }
    want["TaskTemplate"]["RestartPolicy"]["Window"] = 60 * SECOND
    assert spec == want


def test_update_clears_and_fills_in_as_docker_does() -> None:
    spec = updated("--entrypoint", "", "-u", "", "--stop-signal", "", "--limit-cpu", "0")
    cs = spec["TaskTemplate"]["ContainerSpec"]
    assert "Command" not in cs and "User" not in cs and "StopSignal" not in cs
    assert spec["TaskTemplate"]["Resources"]["Limits"] == {"MemoryBytes": 64 * MIB}
    bare = {
        "Name": "web",
        "TaskTemplate": {"ContainerSpec": {"Image": "alpine"}},
        "Mode": {"Replicated": {"Replicas": 1}},
    }
    spec = _updated_spec(
        args_of("update", "--restart-max-attempts", "4", "--limit-pids", "20", "--init", "web"),
        copy.deepcopy(bare),
    )
    assert spec["TaskTemplate"] == {
        "ContainerSpec": {"Image": "alpine", "Init": True},
        "Resources": {"Limits": {"Pids": 20}, "Reservations": {}},
        "RestartPolicy": {"Condition": "any", "Delay": 5 * SECOND, "MaxAttempts": 4},
    }
    spec = _updated_spec(args_of("update", "--group-rm", "x", "--mount-rm", "/n", "web"), bare)
    assert spec["TaskTemplate"]["ContainerSpec"] == {"Image": "alpine"}


def ingress(published: int, target: int = 80, protocol: str = "tcp") -> dict[str, Any]:
    return {
        "Protocol": protocol,
        "TargetPort": target,
        "PublishedPort": published,
        "PublishMode": "ingress",
    }


def test_publish_takes_every_mode_and_publish_add_rm_change_only_what_they_name() -> None:
    spec = created(
        "-p", "8100:80", "-p", "8101:80", "-p", "53:53/udp",
        "--publish", "mode=host,published=9000,target=80",
    )  # fmt: skip
    assert spec["EndpointSpec"]["Ports"] == [
        ingress(8100),
        ingress(8101),
        ingress(53, 53, "udp"),
        {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 9000, "PublishMode": "host"},
    ]
    before = stored()
    before["EndpointSpec"]["Ports"] = copy.deepcopy(spec["EndpointSpec"]["Ports"])

    def update(*flags: str) -> list[dict[str, Any]]:
        ports: list[dict[str, Any]] = _updated_spec(
            args_of("update", *flags, "web"), copy.deepcopy(before)
        )["EndpointSpec"]["Ports"]
        return ports

    host = before["EndpointSpec"]["Ports"][3]
    # added next to what is there; what is there already is not added twice
    assert update("--publish-add", "8102:80", "--publish-add", "8100:80") == [
        *before["EndpointSpec"]["Ports"],
        ingress(8102),
    ]
    # docker's --publish-rm: the target's ports of that protocol and mode
    assert update("--publish-rm", "80") == [ingress(53, 53, "udp"), host]
    assert update("--publish-rm", "53/udp") == [ingress(8100), ingress(8101), host]
    assert update("--publish-rm", "mode=host,target=80") == before["EndpointSpec"]["Ports"][:3]
    # naming the published port too removes that one only
    assert update("--publish-rm", "8101:80") == [ingress(8100), ingress(53, 53, "udp"), host]
    assert "unknown field 'mdoe'" in refused(created, "--publish", "mdoe=host,target=80")
    assert "mode must be ingress or host" in refused(created, "-p", "mode=direct,target=80")
    assert refused(update, "--publish-rm", "x").startswith("invalid --publish-rm 'x'")


def test_update_refusals() -> None:
    message = refused(updated, "--mount-add", "type=tmpfs,target=/t", "--mount-add", "dst=/t")
    assert message == 'invalid argument "dst=/t" for "--mount-add" flag: duplicate mount target /t'
    assert refused(updated, "--mount-add", "type=tmpfs").endswith("target is required")
    assert "--stop-grace-period" in refused(updated, "--stop-grace-period", "5")
    assert "--limit-cpu" in refused(updated, "--limit-cpu", "one")
    assert "--init" in refused(updated, "--init=perhaps")
    assert "--label-add" in refused(updated, "--label-add", "=v")
    assert "--args" in refused(updated, "--args", "'open")
    assert refused(updated, "-w", "here").startswith('invalid argument "here" for "--workdir"')


def test_update_posts_the_whole_spec_with_its_version(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    client = RecordingClient({"Warnings": ["a warning"]}, current=stored())
    monkeypatch.setattr(service, "connect", lambda host: client)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    write_docker_config(tmp_path)
    args = args_of("update", "-d", "--image", "registry.lab:5000/app:2", "web")
    assert args.func(args) == 0
    url, spec, params, headers = client.posts[-1]
    assert url == "/services/svc1/update" and params == {"version": 9, "registryAuthFrom": "spec"}
    assert spec["RollbackConfig"] == {"Parallelism": 1} and "X-Registry-Auth" not in headers
    assert capsys.readouterr() == ("web\n", "a warning\n")

    args = args_of(
        "update", "-d", "--image", "registry.lab:5000/app:2", "--with-registry-auth", "web"
    )
    args.func(args)
    url, spec, params, headers = client.posts[-1]
    assert params == {"version": 9}
    assert decoded(headers["X-Registry-Auth"]) == {
        "username": "labuser",
        "password": "labpass",
        "serveraddress": "registry.lab:5000",
    }


# ---- --update-*, --rollback-*, --health-* ---------------------------------------------------

FIVE_S = 5 * SECOND
# what the docker CLI fills in under the flags (swarmkit's defaults)
DEFAULT_ROLLOUT = {
    "Parallelism": 1,
    "FailureAction": "pause",
    "Monitor": FIVE_S,
    "MaxFailureRatio": 0,
    "Order": "stop-first",
}


def test_create_update_and_rollback_config_as_docker_sends_them() -> None:
    spec = created(
        "--update-parallelism", "0", "--update-monitor", "1m",
        "--update-failure-action", "rollback", "--update-max-failure-ratio", "0.3",
        "--update-order", "start-first",
        "--rollback-parallelism", "2", "--rollback-delay", "1s",
        "--rollback-failure-action", "continue", "--rollback-monitor", "0s",
        "--rollback-max-failure-ratio", "1", "--rollback-order", "start-first",
    )  # fmt: skip
    assert spec["UpdateConfig"] == {
        "Parallelism": 0,
        "FailureAction": "rollback",
        "Monitor": 60 * SECOND,
        "MaxFailureRatio": 0.3,
        "Order": "start-first",
    }
    assert spec["RollbackConfig"] == {  # Monitor 0 is left out (omitempty): the default
        "Parallelism": 2,
        "Delay": SECOND,
        "FailureAction": "continue",
        "MaxFailureRatio": 1,
        "Order": "start-first",
    }
    assert json.dumps(spec["RollbackConfig"]["MaxFailureRatio"]) == "1"  # as Go writes it
    # one flag: swarmkit's defaults under it, for that config only
    spec = created("--update-delay", "10s")
    assert spec["UpdateConfig"] == {**DEFAULT_ROLLOUT, "Delay": 10 * SECOND}
    assert "RollbackConfig" not in spec
    assert created("--rollback-parallelism", "0x10")["RollbackConfig"] == {
        **DEFAULT_ROLLOUT,
        "Parallelism": 16,
    }
    # a float32, as docker sends it
    ratio = created("--update-max-failure-ratio", "0.123456789")["UpdateConfig"]
    assert json.dumps(ratio["MaxFailureRatio"]) == "0.12345679"
    assert "UpdateConfig" not in created() and "RollbackConfig" not in created()


@pytest.mark.parametrize(
    ("flags", "health"),
    [
        (("--health-cmd", "true", "--health-interval", "1s"),
         {"Test": ["CMD-SHELL", "true"], "Interval": SECOND}),
        (("--health-cmd", "curl -f http://localhost/ || exit 1", "--health-interval", "1m30s",
          "--health-timeout", "5s", "--health-retries", "5", "--health-start-period", "20s"),
         {"Test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"], "Interval": 90 * SECOND,
          "Timeout": FIVE_S, "Retries": 5, "StartPeriod": 20 * SECOND}),
        (("--health-retries", "3"), {"Retries": 3}),
        (("--health-retries", "0"), None),  # nothing set
        (("--health-cmd", ""), None),
        (("--no-healthcheck",), {"Test": ["NONE"]}),
        (("--no-healthcheck", "--health-retries", "0"), {"Test": ["NONE"]}),
        (("--no-healthcheck=false",), None),
        # docker 20.10 dropped a lone --health-start-period; 23.0 sends it, and so do we
        (("--health-start-period", "1s"), {"StartPeriod": SECOND}),
    ],
)  # fmt: skip
def test_create_healthcheck(flags: tuple[str, ...], health: dict[str, Any] | None) -> None:
    assert created(*flags)["TaskTemplate"]["ContainerSpec"].get("Healthcheck") == health


def test_the_api_takes_the_rollout_and_health_flags() -> None:
    spec = created(
        "--update-parallelism", "2", "--update-delay", "1s", "--update-failure-action",
        "rollback", "--update-monitor", "2s", "--update-max-failure-ratio", "0.25",
        "--update-order", "start-first", "--rollback-parallelism", "0",
        "--rollback-failure-action", "continue", "--rollback-max-failure-ratio", "0.1",
        "--health-cmd", "true", "--health-interval", "1ms", "--health-timeout", "1s",
        "--health-retries", "2", "--health-start-period", "3s",
    )  # fmt: skip
    stored_spec = normalize_service_spec(canonical(json.loads(json.dumps(spec))))
    assert stored_spec["UpdateConfig"] == spec["UpdateConfig"]
    assert stored_spec["RollbackConfig"] == spec["RollbackConfig"]
    health = stored_spec["TaskTemplate"]["ContainerSpec"]["Healthcheck"]
    assert health == spec["TaskTemplate"]["ContainerSpec"]["Healthcheck"]
    again = _updated_spec(
        args_of("update", "--no-healthcheck", "--update-delay", "0s", "web"), spec
    )
    normalize_service_spec(again)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--update-parallelism", "-1"),
         'invalid argument "-1" for "--update-parallelism" flag: strconv.ParseUint: parsing '
         '"-1": invalid syntax'),
        (("--rollback-parallelism", "two"),
         'invalid argument "two" for "--rollback-parallelism" flag: strconv.ParseUint'),
        (("--update-parallelism", str(2**64)),
         'invalid argument "18446744073709551616" for "--update-parallelism" flag: '
         "strconv.ParseUint: parsing \"18446744073709551616\": value out of range"),
        (("--update-delay", "10"),
         'invalid argument "10" for "--update-delay" flag: time: missing unit in duration'),
        (("--rollback-monitor", "-1s"),
         'invalid argument "-1s" for "--rollback-monitor" flag: duration cannot be negative'),
        (("--update-failure-action", "stop"),
         'invalid argument "stop" for "--update-failure-action" flag: use "pause", "continue" '
         'or "rollback"'),
        (("--rollback-failure-action", "rollback"),  # a rollback is never rolled back
         'invalid argument "rollback" for "--rollback-failure-action" flag: use "pause" or '
         '"continue"'),
        (("--update-order", "random"),
         'invalid argument "random" for "--update-order" flag: use "stop-first" or '
         '"start-first"'),
        (("--update-max-failure-ratio", "abc"),
         'invalid argument "abc" for "--update-max-failure-ratio" flag: strconv.ParseFloat: '
         'parsing "abc": invalid syntax'),
        (("--rollback-max-failure-ratio", "1.5"),
         'invalid argument "1.5" for "--rollback-max-failure-ratio" flag: the failure ratio '
         "must be a number from 0 to 1"),
        (("--update-max-failure-ratio", "nan"), '"--update-max-failure-ratio" flag'),
        (("--health-interval", "-1s"),
         'invalid argument "-1s" for "--health-interval" flag: duration cannot be negative'),
        (("--health-timeout", "500us"),
         'invalid argument "500us" for "--health-timeout" flag: must be at least 1ms'),
        (("--health-start-period", "5"),
         'invalid argument "5" for "--health-start-period" flag: time: missing unit'),
        (("--health-retries", "x"),
         'invalid argument "x" for "--health-retries" flag: strconv.ParseInt: parsing "x": '
         "invalid syntax"),
        (("--health-retries", "-1"),
         'invalid argument "-1" for "--health-retries" flag: must not be negative'),
        (("--no-healthcheck", "--health-cmd", "true"),
         "--no-healthcheck conflicts with --health-* options"),
        (("--no-healthcheck=maybe",),
         'invalid argument "maybe" for "--no-healthcheck" flag: strconv.ParseBool'),
    ],
)  # fmt: skip
def test_rollout_and_health_refusals_name_the_flag(flags: tuple[str, ...], message: str) -> None:
    assert message in refused(created, *flags)
    assert message in refused(updated, *flags)


def test_update_merges_update_and_rollback_config_as_docker_does() -> None:
    spec = updated("--update-delay", "3s", "--rollback-order", "start-first")
    assert spec["UpdateConfig"] == {"Parallelism": 2, "Order": "start-first", "Delay": 3 * SECOND}
    assert spec["RollbackConfig"] == {"Parallelism": 1, "Order": "start-first"}
    # 0 leaves Delay and Monitor out, as Go's omitempty does
    current = stored()
    current["UpdateConfig"] = {"Parallelism": 2, "Delay": SECOND, "Monitor": 9 * SECOND}
    spec = _updated_spec(
        args_of("update", "--update-delay", "0s", "--update-monitor", "0s",
                "--update-failure-action", "continue", "--update-parallelism", "4", "web"),
        current,
    )  # fmt: skip
    assert spec["UpdateConfig"] == {"Parallelism": 4, "FailureAction": "continue"}
    # none yet: swarmkit's defaults under the flags
    bare = {"Name": "web", "TaskTemplate": {"ContainerSpec": {"Image": "alpine"}}}
    spec = _updated_spec(args_of("update", "--rollback-order", "start-first", "web"), bare)
    assert spec["RollbackConfig"] == {**DEFAULT_ROLLOUT, "Order": "start-first"}
    assert "UpdateConfig" not in spec
    spec = _updated_spec(args_of("update", "--update-parallelism", "3", "web"), stored())
    assert spec["UpdateConfig"] == {"Parallelism": 3, "Order": "start-first"}


def health_of(health: dict[str, Any], *flags: str) -> Any:
    current = stored()
    current["TaskTemplate"]["ContainerSpec"]["Healthcheck"] = health
    spec = _updated_spec(args_of("update", *flags, "web"), current)
    return spec["TaskTemplate"]["ContainerSpec"].get("Healthcheck")


def test_update_merges_the_healthcheck_as_docker_does() -> None:
    cmd = {"Test": ["CMD", "a"], "Interval": 5_000_000, "Retries": 4}
    none = {"Test": ["NONE"]}
    assert health_of(cmd) == cmd
    assert health_of(cmd, "--health-timeout", "1s") == {**cmd, "Timeout": SECOND}
    assert health_of(cmd, "--health-cmd", "") == {"Interval": 5_000_000, "Retries": 4}
    assert health_of(cmd, "--health-retries", "0", "--health-interval", "0s") == {
        "Test": ["CMD", "a"]
    }
    assert health_of(cmd, "--health-cmd", "curl x")["Test"] == ["CMD-SHELL", "curl x"]
    assert health_of(cmd, "--no-healthcheck") == none
    # a --health-* flag drops a NONE test
    assert health_of(none, "--health-interval", "2s") == {"Interval": 2 * SECOND}
    assert health_of(none, "--health-cmd", "curl x", "--health-retries", "0") == {
        "Test": ["CMD-SHELL", "curl x"]
    }
    assert health_of(none, "--no-healthcheck=false") == {}
    assert health_of(none, "--health-cmd", "") == {}
    assert health_of(none, "-d", "--force") == none
    message = refused(health_of, cmd, "--no-healthcheck", "--health-retries", "0")
    assert message == "--no-healthcheck conflicts with --health-* options"
    bare = {"Name": "web", "TaskTemplate": {"ContainerSpec": {"Image": "alpine"}}}
    spec = _updated_spec(args_of("update", "--health-retries", "2", "web"), bare)
    assert spec["TaskTemplate"]["ContainerSpec"]["Healthcheck"] == {"Retries": 2}


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("3", 3), ("0x10", 16), ("017", 15), ("0o17", 15), ("0b101", 5), ("1_000", 1000),
     (str(2**64 - 1), 2**64 - 1)],
)  # fmt: skip
def test_uint_flags_read_as_pflag_does(text: str, value: int) -> None:
    assert parse_uint(text, "--update-parallelism") == value


@pytest.mark.parametrize("text", ["", "+1", "-0", "1.5", "1e3", "0x", "1__0", " 1", "08"])
def test_bad_uints(text: str) -> None:
    assert refused(parse_uint, text, "--rollback-parallelism").startswith(
        f'invalid argument {json.dumps(text)} for "--rollback-parallelism" flag: strconv.ParseUint'
    )


@pytest.mark.parametrize(
    ("text", "ratio"),
    [("0", 0), ("1", 1), ("0.3", 0.3), (".5", 0.5), ("1e-1", 0.1), ("0.123456789", 0.12345679),
     ("0.1000000001", 0.1)],
)  # fmt: skip
def test_failure_ratios_are_float32s(text: str, ratio: float) -> None:
    value = parse_ratio(text, "--update-max-failure-ratio")
    assert value == ratio and json.dumps(value) == json.dumps(ratio)


def test_health_retries_and_durations() -> None:
    assert parse_retries("0x10") == 16
    assert "at most" in refused(parse_retries, str(2**31 + 1))
    assert parse_health_duration("1ms", "--health-interval") == 1_000_000
    assert parse_health_duration("0s", "--health-interval") == 0  # the default


# ---- rollback -------------------------------------------------------------------------------


def test_rollback_posts_the_current_spec_with_rollback_previous(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = RecordingClient({"Warnings": ["a warning"]}, current=stored())
    monkeypatch.setattr(service, "connect", lambda host: client)
    args = args_of("rollback", "-d", "web")
    assert args.func(args) == 0
    # docker 20.10: `?rollback=previous&version=9`, the spec as read, no registryAuthFrom
    assert client.posts == [
        ("/services/svc1/update", stored(), {"version": 9, "rollback": "previous"}, {})
    ]
    assert capsys.readouterr() == ("web\n", "a warning\n")


def test_update_rollback_is_rollback_with_registry_auth_from_spec(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = RecordingClient({}, current=stored())
    monkeypatch.setattr(service, "connect", lambda host: client)
    for flags in (("--rollback", "-d"), ("--rollback", "-dq"), ("--rollback=true", "--detach")):
        args = args_of("update", *flags, "web")
        assert args.func(args) == 0
        url, spec, params, headers = client.posts[-1]
        assert url == "/services/svc1/update" and spec == stored() and not headers
        assert params == {"version": 9, "registryAuthFrom": "spec", "rollback": "previous"}
    assert capsys.readouterr().out == "web\n" * 3


@pytest.mark.parametrize(
    "flags",
    [
        ("--force=false",),
        ("--with-registry-auth",),
        ("--image", "alpine:3"),
        ("--update-delay", "1s"),
        ("--no-healthcheck",),
        ("-t",),
        ("--env-add", "A=1"),
        ("-dt",),
    ],
)
def test_update_rollback_takes_no_other_flag(
    monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...]
) -> None:
    def no_daemon(host: str | None) -> Any:
        raise AssertionError("connected")

    monkeypatch.setattr(service, "connect", no_daemon)
    args = args_of("update", "--rollback", *flags, "web")
    assert refused(args.func, args) == "other flags may not be combined with --rollback"


def test_rollback_without_a_previous_spec_is_the_daemons_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    message = (
        "rpc error: code = FailedPrecondition desc = service svc1 does not have a previous spec"
    )
    client = RecordingClient({}, current=stored(), refuse=(400, message))
    monkeypatch.setattr(service, "connect", lambda host: client)
    assert main(["service", "rollback", "web"]) == 1
    assert capsys.readouterr() == ("", f"Error response from daemon: {message}\n")


# ---- following an update or a rollback ------------------------------------------------------

PAUSED = "update paused due to failure or early termination of task t2"


def follow(client: ClusterClient, clock: Clock) -> None:
    service.watch_update(client, "svc1", clock=clock.monotonic, sleep=clock.sleep)


def test_a_paused_update_is_an_error_with_its_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = ClusterClient(
        [("", "", 0), ("updating", "update in progress", 1), ("paused", PAUSED, 1)]
    )
    assert refused(follow, client, Clock()) == f"service update paused: {PAUSED}"
    assert capsys.readouterr().out == (
        "overall progress: 0 out of 3 tasks\noverall progress: 1 out of 3 tasks\n"
    )
    client = ClusterClient([("rollback_paused", "rollback paused: t7 failed", 2)])
    assert refused(follow, client, Clock()) == "service rollback paused: rollback paused: t7 failed"


def test_an_update_ends_when_the_manager_says_completed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # converged at once, but the update is under way until the manager completes it: more
    # than the 5 s Monitor of polls (0.2 s each) say `updating`
    frames = [("", "", 0), ("updating", "update in progress", 2)]
    frames += [("updating", "update in progress", 3)] * 40
    frames += [("completed", "update completed", 3)]
    client, clock = ClusterClient(frames), Clock()
    follow(client, clock)
    assert client.polls == len(frames)
    assert capsys.readouterr().out.splitlines() == [
        "overall progress: 0 out of 3 tasks",
        "overall progress: 2 out of 3 tasks",
        "overall progress: 3 out of 3 tasks",
        *(
            f"verify: Waiting {n} seconds to verify that tasks are stable..."
            for n in range(5, 0, -1)
        ),
        "verify: Service svc1 converged",
    ]
    assert clock.now == pytest.approx(0.2 * (len(frames) - 1))


def test_without_update_status_it_waits_monitor_once_converged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # an update changing no task has no UpdateStatus: docker's wait, UpdateConfig.Monitor long
    spec = stored()
    spec["UpdateConfig"]["Monitor"] = 2 * SECOND
    frames = [("", "", 3), ("", "", 3), ("", "", 2), ("", "", 3)]
    client, clock = ClusterClient(frames, spec), Clock()
    follow(client, clock)
    assert capsys.readouterr().out.splitlines() == [
        "overall progress: 3 out of 3 tasks",
        "verify: Waiting 2 seconds to verify that tasks are stable...",
        "overall progress: 2 out of 3 tasks",
        "verify: Detected task failure",
        "overall progress: 3 out of 3 tasks",
        "verify: Waiting 2 seconds to verify that tasks are stable...",
        "verify: Waiting 1 seconds to verify that tasks are stable...",
        "verify: Service svc1 converged",
    ]
    assert clock.now == pytest.approx(0.6 + 2.0)  # the wait began again after the failure


def test_rollback_follows_to_rollback_completed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manual = "manually requested rollback"
    frames = [("rollback_started", manual, 0), ("rollback_started", manual, 1)]
    frames += [("rollback_completed", "rollback completed", 3)]
    client, clock = ClusterClient(frames), Clock()
    monkeypatch.setattr(service, "connect", lambda host: client)
    monkeypatch.setattr(service, "time", clock)
    assert main(["service", "rollback", "web"]) == 0
    assert client.posts[-1][2] == {"version": 9, "rollback": "previous"}
    assert capsys.readouterr().out.splitlines() == [
        "web",
        "rollback: manually requested rollback",
        "overall progress: rolling back update: 0 out of 3 tasks",
        "overall progress: rolling back update: 1 out of 3 tasks",
        "overall progress: rolling back update: 3 out of 3 tasks",
        "verify: Service svc1 converged",
        "rollback: rollback completed",
    ]


def test_an_update_rolled_back_on_failure_ends_well_as_dockers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    why = "update rolled back due to failure or early termination of task t9"
    frames = [("updating", "update in progress", 1), ("rollback_started", why, 1)]
    frames += [("rollback_completed", "rollback completed", 3)]
    client = ClusterClient(frames)
    monkeypatch.setattr(service, "connect", lambda host: client)
    monkeypatch.setattr(service, "time", Clock())
    assert main(["service", "update", "--image", "alpine:4", "web"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "web",
        "overall progress: 1 out of 3 tasks",
        f"rollback: {why}",
        "overall progress: rolling back update: 1 out of 3 tasks",
        "overall progress: rolling back update: 3 out of 3 tasks",
        "verify: Service svc1 converged",
        "rollback: rollback completed",
    ]


def test_update_paused_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = ClusterClient([("updating", "update in progress", 0), ("paused", PAUSED, 0)])
    monkeypatch.setattr(service, "connect", lambda host: client)
    monkeypatch.setattr(service, "time", Clock())
    assert main(["service", "update", "--force", "web"]) == 1
    out, err = capsys.readouterr()
    assert out == "web\noverall progress: 0 out of 3 tasks\n"
    assert err == f"shoal: service update paused: {PAUSED}\n"


def test_detach_does_not_wait_and_quiet_prints_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = ClusterClient([("updating", "update in progress", 0)])
    monkeypatch.setattr(service, "connect", lambda host: client)
    for argv in (["update", "-d", "--force", "web"], ["rollback", "--detach", "web"]):
        assert main(["service", *argv]) == 0
    assert client.polls == 0 and len(client.posts) == 2
    client.frames = [("completed", "update completed", 3)]
    for argv in (["update", "-q", "--force", "web"], ["rollback", "-q", "web"]):
        assert main(["service", *argv]) == 0
    assert client.polls == 2
    assert capsys.readouterr() == ("web\n" * 4, "")


def test_an_update_that_stops_moving_is_given_up(capsys: pytest.CaptureFixture[str]) -> None:
    client, clock = ClusterClient([("updating", "update in progress", 1)]), Clock()
    assert refused(follow, client, clock) == (
        "service svc1: no progress in 305 s (1/3 running, updating); see `shoal service ps svc1`"
    )
    assert 305 < clock.now < 306


def test_ctrl_c_leaves_the_update_running(capsys: pytest.CaptureFixture[str]) -> None:
    class Interrupted(Clock):
        def sleep(self, seconds: float) -> None:
            raise KeyboardInterrupt

    follow(ClusterClient([("updating", "update in progress", 1)]), Interrupted())
    assert capsys.readouterr().out.splitlines() == [
        "overall progress: 1 out of 3 tasks",
        "Operation continuing in background.",
        "Use `shoal service ps svc1` to check progress.",
    ]


def test_progress_lines_on_a_terminal_redraw_in_place(capsys: pytest.CaptureFixture[str]) -> None:
    lines = service.ProgressLines()
    lines.tty = True
    lines.show("overall progress", "0 out of 3 tasks")
    lines.show("overall progress", "0 out of 3 tasks")
    lines.show("overall progress", "3 out of 3 tasks")
    lines.show("verify", "Service svc1 converged")
    lines.close()
    assert capsys.readouterr().out == (
        "overall progress: 0 out of 3 tasks\r\x1b[Koverall progress: 3 out of 3 tasks\n"
        "verify: Service svc1 converged\n"
    )


# ---- --with-registry-auth -------------------------------------------------------------------


def write_docker_config(directory: Path) -> Path:
    def auth(user: str, password: str) -> str:
        return base64.b64encode(f"{user}:{password}".encode()).decode()

    path = directory / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth("hubuser", "hubpass")},
                    "registry.lab:5000": {"auth": auth("labuser", "labpass")},
                }
            }
        )
    )
    return path


def decoded(header: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(header))


def test_registry_auth_is_what_docker_login_stored(tmp_path: Path) -> None:
    config = str(write_docker_config(tmp_path))
    # byte for byte what docker 20.10 sent for these images with this config.json
    assert registry_auth("redis:7", config) == (
        "eyJ1c2VybmFtZSI6Imh1YnVzZXIiLCJwYXNzd29yZCI6Imh1YnBhc3MiLCJzZXJ2ZXJhZGRyZXNzIjoiaHR0"
        "cHM6Ly9pbmRleC5kb2NrZXIuaW8vdjEvIn0="
    )
    assert decoded(registry_auth("docker.io/library/redis", config))["username"] == "hubuser"
    assert decoded(registry_auth("registry.lab:5000/app:1", config)) == {
        "username": "labuser",
        "password": "labpass",
        "serveraddress": "registry.lab:5000",
    }
    assert registry_auth("other.example/x", config) == "e30="  # {}: anonymous
    assert registry_auth("redis", str(tmp_path / "none.json")) == "e30="
    assert "--with-registry-auth" in refused(registry_auth, "http://x/y", config)


# ---- logs --since ---------------------------------------------------------------------------

NOW = 1_700_000_000 * SECOND + 250_000_000


@pytest.mark.parametrize(
    ("text", "since"),
    [
        ("10m", "1699999400.250000000"),
        ("1h30m", "1699994600.250000000"),
        ("2013-01-02T13:23:37Z", "1357133017.000000000"),
        ("2013-01-02T13:23:37.5+01:00", "1357129417.500000000"),
        ("2013-01-02T13:23:37.123456789-00:30", "1357134817.123456789"),
        ("2013-01-02T13:23Z", "1357132980.000000000"),
        ("2013-01-02T13Z", "1357131600.000000000"),
        ("2013-01-02Z", "1357084800.000000000"),
        ("1700000000", "1700000000"),
        ("1700000000.25", "1700000000.25"),
        ("0", "0"),
    ],
)
def test_since(text: str, since: str) -> None:
    assert parse_since(text, NOW) == since


def test_since_without_a_zone_is_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time  # noqa: PLC0415 - only here

    monkeypatch.setenv("TZ", "IST-5:30")  # POSIX: UTC+05:30, no zone files needed
    time.tzset()
    try:
        assert parse_since("2013-01-02T13:23:37", NOW) == "1357113217.000000000"
        assert parse_since("2013-01-02", NOW) == "1357065000.000000000"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("text", ["xyz", "2013-13-02", "-5", "1.2.3", "2013-01-02T25:00Z", "10"])
def test_bad_since(text: str) -> None:
    if text == "10":  # a Unix timestamp, not a duration
        assert parse_since(text, NOW) == "10"
        return
    assert refused(parse_since, text, NOW).startswith(
        f'invalid argument {json.dumps(text)} for "--since" flag: '
    )


def test_logs_sends_since(monkeypatch: pytest.MonkeyPatch) -> None:
    client = RecordingClient({}, current=stored())
    monkeypatch.setattr(service, "connect", lambda host: client)
    args = args_of("logs", "--since", "2013-01-02T13:23:37Z", "-t", "web")
    assert args.func(args) == 0
    assert client.logs == {
        "details": True,
        "follow": False,
        "stdout": True,
        "stderr": True,
        "since": "1357133017.000000000",
        "timestamps": True,
        "tail": "all",
        "is_tty": True,  # stored()'s TTY: its logs come unframed
    }
    args = args_of("logs", "web")
    args.func(args)
    assert client.logs["since"] == 0


# ---- the API's side: key case, node JSON ----------------------------------------------------


def test_the_api_reads_mount_and_resource_keys_in_any_case() -> None:
    body = {
        "name": "web",
        "taskTemplate": {
            "containerSpec": {
                "image": "alpine",
                "readonly": True,
                "tty": True,
                "init": False,
                "stopsignal": "TERM",
                "stopGracePeriod": 1,
                "hostname": "h",
                "dir": "/",
                "user": "u",
                "groups": ["g"],
                "healthcheck": {"test": ["NONE"]},
                "labels": {"Keep.Case": "1"},
                "mounts": [
                    {
                        "type": "volume",
                        "source": "v",
                        "TARGET": "/d",
                        "readOnly": True,
                        "consistency": "cached",
                        "volumeoptions": {
                            "nocopy": True,
                            "labels": {"myKey": "v"},
                            "driverconfig": {"name": "local", "options": {"someOpt": "1"}},
                        },
                    },
                    {"tmpfsoptions": {"sizebytes": 1, "mode": 448}},
                    {"bindoptions": {"propagation": "rshared", "nonrecursive": True}},
                ],
            },
            "resources": {
                "limits": {"nanocpus": 1, "memorybytes": 2, "pids": 3},
                "reservations": {"nanoCPUs": 1, "MemoryBytes": 2},
            },
        },
    }
    assert canonical(body) == {
        "Name": "web",
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": "alpine",
                "ReadOnly": True,
                "TTY": True,
                "Init": False,
                "StopSignal": "TERM",
                "StopGracePeriod": 1,
                "Hostname": "h",
                "Dir": "/",
                "User": "u",
                "Groups": ["g"],
                "Healthcheck": {"Test": ["NONE"]},
                "Labels": {"Keep.Case": "1"},
                "Mounts": [
                    {
                        "Type": "volume",
                        "Source": "v",
                        "Target": "/d",
                        "ReadOnly": True,
                        "Consistency": "cached",
                        "VolumeOptions": {
                            "NoCopy": True,
                            "Labels": {"myKey": "v"},
                            "DriverConfig": {"Name": "local", "Options": {"someOpt": "1"}},
                        },
                    },
                    {"TmpfsOptions": {"SizeBytes": 1, "Mode": 448}},
                    {"BindOptions": {"Propagation": "rshared", "NonRecursive": True}},
                ],
            },
            "Resources": {
                "Limits": {"NanoCPUs": 1, "MemoryBytes": 2, "Pids": 3},
                "Reservations": {"NanoCPUs": 1, "MemoryBytes": 2},
            },
        },
    }


def test_node_json_names_the_executor() -> None:
    native = Node(id="n1", hostname="sw1", executor="native", images=["alpine", "micro"])
    engine = node_json(native, 0, {}, "28.2.2-shoal")["Description"]["Engine"]
    assert engine == {
        "EngineVersion": "28.2.2-shoal",
        "Labels": {"com.shoal.executor": "native"},
        "Plugins": [{"Type": "Network", "Name": "overlay"}],
    }
    container = Node(id="n2", executor="container", engine_version="20.10.24")
    engine = node_json(container, 0, {}, "28.2.2-shoal")["Description"]["Engine"]
    assert engine["Labels"] == {"com.shoal.executor": "container"}
    assert engine["EngineVersion"] == "20.10.24"
    assert "Labels" not in node_json(Node(id="n3"), 0, {}, "x")["Description"]["Engine"]


# ---- a stand-in for orchestrator.cli.client.Client ------------------------------------------


class RecordingClient:
    """What the commands call of the client; records the posts of specs as (path, spec, query
    parameters, headers)."""

    def __init__(
        self,
        answer: dict[str, Any],
        current: dict[str, Any] | None = None,
        refuse: tuple[int, str] | None = None,
    ):
        self.answer = answer
        self.current = current or {}
        self.refuse = refuse  # the daemon's answer to a post: status, message
        self.posts: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]] = []
        self.logs: dict[str, Any] = {}

    def create_service(
        self, spec: dict[str, Any], registry_auth: str | None = None
    ) -> dict[str, Any]:
        return self._post("/services/create", spec, {}, registry_auth)

    def update_service(
        self,
        service: str,
        version: int,
        spec: dict[str, Any],
        registry_auth: str | None = None,
        registry_auth_from: str | None = None,
        rollback: str | None = None,
    ) -> dict[str, Any]:
        params = {"version": version, "registryAuthFrom": registry_auth_from, "rollback": rollback}
        sent = {k: v for k, v in params.items() if v is not None}
        return self._post(f"/services/{service}/update", spec, sent, registry_auth)

    def _post(
        self, path: str, spec: dict[str, Any], params: dict[str, Any], auth: str | None
    ) -> dict[str, Any]:
        headers = {"X-Registry-Auth": auth} if auth else {}
        self.posts.append((path, copy.deepcopy(spec), params, headers))
        if self.refuse is not None:
            raise APIError(*self.refuse)
        return copy.deepcopy(self.answer)

    def inspect_service(self, ref: str) -> dict[str, Any]:
        return {"ID": "svc1", "Version": {"Index": 9}, "Spec": copy.deepcopy(self.current)}

    def service_logs(self, service_id: str, **kwargs: Any) -> list[bytes]:
        self.logs = kwargs
        return []


class ClusterClient(RecordingClient):
    """A service (stored(): 3 replicas, one node) whose update goes through `frames`, one a
    poll: (UpdateStatus's State, its Message, the up-to-date tasks running). The last frame
    stays."""

    def __init__(self, frames: list[tuple[str, str, int]], spec: dict[str, Any] | None = None):
        super().__init__({}, current=spec or stored())
        self.frames = frames
        self.polls = 0  # a poll reads the service, then its tasks

    def frame(self) -> tuple[str, str, int]:
        return self.frames[min(self.polls, len(self.frames) - 1)]

    def inspect_service(self, ref: str) -> dict[str, Any]:
        svc = super().inspect_service(ref)
        state, message, _ = self.frame()
        if state:
            svc["UpdateStatus"] = {"State": state, "Message": message}
        return svc

    def nodes(self) -> list[dict[str, Any]]:
        return [{"ID": "n1", "Status": {"State": "ready"}, "Spec": {"Availability": "active"}}]

    def tasks(self, filters: dict[str, str]) -> list[dict[str, Any]]:
        assert filters == {"service": "svc1", "_up-to-date": "true"}
        running = self.frame()[2]
        self.polls += 1
        return [
            {
                "ID": f"t{slot}",
                "Slot": slot,
                "NodeID": "n1",
                "DesiredState": "running",
                "Status": {"State": "running" if slot <= running else "starting"},
            }
            for slot in (1, 2, 3)
        ]


class Clock:
    """time.monotonic and time.sleep without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now = round(self.now + seconds, 9)


def test_ls_shows_modes_and_replicas_as_docker_does() -> None:
    status = {"RunningTasks": 1, "DesiredTasks": 2, "CompletedTasks": 3}
    for mode, shown in (
        ({"Replicated": {"Replicas": 2}}, ("replicated", "1/2")),
        ({"Global": {}}, ("global", "1/2")),
        (
            {"ReplicatedJob": {"MaxConcurrent": 2, "TotalCompletions": 5}},
            ("replicated job", "1/2 (3/5 completed)"),
        ),
        ({"GlobalJob": {}}, ("global job", "1/2 (3/5 completed)")),
    ):
        assert service._mode_and_replicas({"Spec": {"Mode": mode}, "ServiceStatus": status}) == (
            shown
        )
