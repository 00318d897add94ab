"""`shoal service create | ls | inspect | ps | scale | update | rollback | logs | rm`.

The flags are docker CLI 20.10's, with the same names, values and JSON: durations are Go's
(`10s`, `1m30s`, `500ms`), sizes docker's (`64m`, `1g`, plain bytes), CPUs decimals (`0.5`),
`--mount` the CSV syntax, and booleans pflag's (`--read-only`, `--read-only=false`). Values are
checked here, so a bad one is refused naming its flag before anything is sent.

`update` and `rollback` then follow the rolling update the managers run (UpdateConfig,
RollbackConfig, UpdateStatus) as the docker CLI does, until it completes, pauses (an error)
or is rolled back; `-d` returns at once.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import math
import re
import shlex
import struct
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

from orchestrator.cli.client import APIError, CliError, connect
from orchestrator.cli.output import image_name, pretty_json, short, table
from orchestrator.cli.tasks import print_tasks
from orchestrator.manager.spec import (
    DEFAULT_MONITOR,
    PROPAGATIONS,
    UPDATE_ORDERS,
    SpecError,
    signal_number,
)

CONVERGE_TIMEOUT = 300.0
SECOND = 1_000_000_000
MAX_INT64 = 2**63 - 1
# What the docker CLI sends for a restart policy it fills in (swarmkit's defaults).
DEFAULT_RESTART: dict[str, Any] = {"Condition": "any", "Delay": 5 * SECOND, "MaxAttempts": 0}


# ---- pflag's booleans -----------------------------------------------------------------------


class GoBool(argparse.Action):
    """A pflag boolean flag: `--init` is true, `--init=false` false (strconv.ParseBool's
    spellings, see DockerFlagParser). Default None on `update` (unchanged)."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        default: bool | None = False,
        help: str | None = None,
    ):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, True)


def go_bool(text: str) -> bool | None:
    """strconv.ParseBool; None if it is not one of its spellings."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


class DockerFlagParser(argparse.ArgumentParser):
    """argparse, parsing as pflag does: GoBool flags take `=VALUE` (`--read-only=false`,
    `-t=0`), the last one given winning, and a flag's value is the next word even if it starts
    with '-' (`--hostname --init`). A bad boolean is kept in `flag_errors`: the command refuses
    it (CliError, naming the flag) rather than argparse exiting with its usage."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        tokens = list(sys.argv[1:] if args is None else args)
        given: dict[str, tuple[str, str]] = {}  # dest -> (flag, value)
        named: set[str] = set()  # the dests of the flags given by their name
        rest: list[str] = []
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in ("-", "--") or not token.startswith("-"):
                rest += tokens[i:]  # the positionals: IMAGE [COMMAND...] stay as given
                break
            name, eq, value = token.partition("=")
            action = self._option_string_actions.get(name)
            if action is not None:
                named.add(action.dest)
            if isinstance(action, GoBool):
                given[action.dest] = (name, value if eq else "true")
            elif action is not None and not eq and action.nargs is None and i + 1 < len(tokens):
                i += 1  # its value, as pflag takes it even if it starts with '-' (`-5s`)
                rest.append(f"{name}={tokens[i]}")
            else:
                rest.append(token)
            i += 1
        ns, extra = super().parse_known_args(rest, namespace)
        errors: list[str] = list(getattr(ns, "flag_errors", None) or [])
        for dest, (flag, value) in given.items():
            parsed = go_bool(value)
            if parsed is None:
                errors.append(
                    f"invalid argument {_q(value)} for {_q(flag)} flag: strconv.ParseBool: "
                    f"parsing {_q(value)}: invalid syntax (use true or false)"
                )
            else:
                setattr(ns, dest, parsed)
        ns.flag_errors = errors
        # pflag's Changed: given by name, or (bundled: `-dq`) with a value not the default
        ns.flags_given = sorted(
            a.dest
            for a in self._actions
            if a.option_strings
            and not isinstance(a, argparse._HelpAction)
            and (a.dest in named or getattr(ns, a.dest, a.default) != a.default)
        )
        return ns, extra


def _refuse_bad_flags(args: argparse.Namespace) -> None:
    errors = getattr(args, "flag_errors", None)
    if errors:
        raise CliError(errors[0])


# ---- values: docker's syntaxes --------------------------------------------------------------


def _q(text: str) -> str:
    """Quoted as Go's %q does (near enough): in double quotes, escaped."""
    return json.dumps(text, ensure_ascii=False)


def _invalid(text: str, flag: str, reason: str) -> CliError:
    """pflag's message for a value its flag refuses."""
    return CliError(f"invalid argument {_q(text)} for {_q(flag)} flag: {reason}")


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # µs, micro sign
    "\u03bcs": 1_000,  # μs, Greek mu
    "ms": 1_000_000,
    "s": SECOND,
    "m": 60 * SECOND,
    "h": 3600 * SECOND,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def go_duration(text: str) -> int:
    """Go's time.ParseDuration, in ns: `10s`, `1m30s`, `1.5h`, `500ms`, `-2m`, `0`. Raises
    ValueError with Go's message."""
    s = text
    negative = False
    if s[:1] in ("-", "+"):
        negative, s = s[0] == "-", s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"time: invalid duration {_q(text)}")
    total = Fraction(0)
    while s:
        m = _DURATION_PART.match(s)
        assert m is not None  # every group may be empty
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if s[0] not in "0123456789." or not (whole or frac):
            raise ValueError(f"time: invalid duration {_q(text)}")
        if not unit:
            raise ValueError(f"time: missing unit in duration {_q(text)}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"time: unknown unit {_q(unit)} in duration {_q(text)}")
        value = Fraction(int(whole or "0"))
        if frac:
            value += Fraction(int(frac), 10 ** len(frac))
        total += value * _DURATION_UNITS[unit]
        s = s[m.end() :]
    ns = int(total)  # Go truncates the fraction of a nanosecond
    if ns > MAX_INT64 + negative:
        raise ValueError(f"time: invalid duration {_q(text)}")
    return -ns if negative else ns


def parse_duration(text: str, flag: str, seconds: bool = False) -> int:
    """A duration flag's value in ns, not negative. seconds: a plain number counts as seconds
    (`--restart-delay 0.2`, as shoal took it before it took durations)."""
    if seconds and re.fullmatch(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", text):
        return int(Fraction(text) * SECOND)
    try:
        ns = go_duration(text)
    except ValueError as e:
        raise _invalid(text, flag, f"{e} (use a duration like 10s, 1m30s or 500ms)") from None
    if ns < 0:
        raise _invalid(text, flag, "duration cannot be negative")
    return ns


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)*) ?([kKmMgGtTpP])?[iI]?[bB]?")
_SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def ram_in_bytes(text: str) -> int:
    """go-units' RAMInBytes, as docker reads --limit-memory and tmpfs-size: `64m`, `1g`,
    `512k`, `1.5GiB`, `100` (bytes); binary units. Raises ValueError."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid size: '{text}'")
    try:
        size = float(m.group(1))
    except ValueError:
        raise ValueError(f"invalid size: '{text}'") from None
    value = int(size * _SIZE_UNITS.get((m.group(2) or "").lower(), 1))
    if value > MAX_INT64:
        raise ValueError(f"invalid size: '{text}' is too large")
    return value


def parse_bytes(text: str, flag: str) -> int:
    try:
        return ram_in_bytes(text)
    except ValueError as e:
        raise _invalid(text, flag, f"{e} (use bytes or a size like 512k, 64m, 1g)") from None


_DECIMAL = re.compile(
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?[0-9]+/[0-9]+"
)


def parse_cpus(text: str, flag: str) -> int:
    """A number of CPUs (`0.5`, `2`, `1/4`) in NanoCPUs, as docker's ParseCPUs reads it."""
    if not _DECIMAL.fullmatch(text):
        raise _invalid(
            text, flag, f"failed to parse {text} as a rational number (use CPUs like 0.5 or 2)"
        )
    try:
        nano = Fraction(text) * SECOND
    except ZeroDivisionError:
        raise _invalid(text, flag, f"failed to parse {text} as a rational number") from None
    if nano.denominator != 1:
        raise _invalid(text, flag, "value is too precise (at most 9 decimals)")
    if nano < 0:
        raise _invalid(text, flag, "the number of CPUs cannot be negative")
    if nano > MAX_INT64:
        raise _invalid(text, flag, "too many CPUs")
    return int(nano)


_GO_INT = re.compile(r"([+-]?)(0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|0[0-7_]*|[1-9][0-9_]*)")


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, ...)'s syntax (`12`, `-3`, `0x1f`, `0o17`, `017`, `1_000`);
    None if it is not."""
    m = _GO_INT.fullmatch(text)
    if m is None:
        return None
    digits = m.group(2)
    if len(digits) > 1 and digits[0] == "0" and digits[1] in "01234567_":
        digits = "0o" + digits[1:]  # Go's leading-zero octal
    try:
        value = int(digits, 0)
    except ValueError:  # misplaced underscores
        return None
    return -value if m.group(1) == "-" else value


def parse_uint(text: str, flag: str) -> int:
    """pflag's uint flag (strconv.ParseUint(text, 0, 64)): a whole number, 0 or more."""
    value = _go_int(text)
    if value is None or text[:1] in ("+", "-"):
        raise _invalid(
            text,
            flag,
            f"strconv.ParseUint: parsing {_q(text)}: invalid syntax (use a whole number, 0 or "
            "more)",
        )
    if value > 2**64 - 1:
        raise _invalid(text, flag, f"strconv.ParseUint: parsing {_q(text)}: value out of range")
    return value


def parse_retries(text: str, flag: str = "--health-retries") -> int:
    """pflag's int flag (strconv.ParseInt(text, 0, 64)), not negative: the engine refuses
    negative retries, and takes at most 2^31."""
    value = _go_int(text)
    if value is None:
        raise _invalid(
            text, flag, f"strconv.ParseInt: parsing {_q(text)}: invalid syntax (use a number)"
        )
    if value < 0:
        raise _invalid(text, flag, "must not be negative (0: the default, 3)")
    if value > 2**31:
        raise _invalid(text, flag, f"too many retries (at most {2**31})")
    return value


def _float32(value: float) -> float | int:
    """A float32 as Go's JSON writes it: the shortest decimal that reads back as the same
    float32 (0.123456789 -> 0.12345679), whole numbers without a fraction (1, 0)."""
    single: float = struct.unpack("<f", struct.pack("<f", value))[0]
    if single.is_integer():
        return int(single)
    for digits in range(1, 10):
        shortest = float(f"{single:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", shortest))[0] == single:
            return shortest
    return single


_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_ratio(text: str, flag: str) -> float | int:
    """`--update-max-failure-ratio` and `--rollback-max-failure-ratio`: pflag's float32, from 0
    to 1 (the engine's bounds), as Go would send it."""
    if not _FLOAT.fullmatch(text):
        raise _invalid(
            text,
            flag,
            f"strconv.ParseFloat: parsing {_q(text)}: invalid syntax (use a number from 0 to 1)",
        )
    value = float(text)
    if not 0 <= value <= 1:
        raise _invalid(text, flag, "the failure ratio must be a number from 0 to 1")
    return _float32(value)


MIN_HEALTH_DURATION = 1_000_000  # the engine's: 1 ms


def parse_health_duration(text: str, flag: str) -> int:
    """A `--health-*` duration in ns: not negative (docker's PositiveDurationOpt) and, unless 0
    (the default), at least 1ms, which the engine requires."""
    ns = parse_duration(text, flag)
    if 0 < ns < MIN_HEALTH_DURATION:
        raise _invalid(text, flag, "must be at least 1ms (0: the default)")
    return ns


def _choice(text: str, flag: str, choices: Sequence[str]) -> str:
    if text not in choices:
        words = [_q(c) for c in choices]
        raise _invalid(text, flag, f"use {', '.join(words[:-1])} or {words[-1]}")
    return text


def _shell_words(text: str, flag: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise _invalid(text, flag, str(e)) from None


def _workdir(text: str, flag: str) -> str:
    if text and not text.startswith("/"):
        raise _invalid(text, flag, "the working directory must be an absolute path")
    return text


def _stop_signal(text: str, flag: str = "--stop-signal") -> str:
    if text:
        try:
            signal_number(text)
        except SpecError as e:
            raise _invalid(text, flag, str(e)) from None
    return text


def _labels(entries: list[str], flag: str) -> dict[str, str]:
    """KEY=VALUE or KEY (empty value), as docker's ValidateLabel and ConvertKVStringsToMap."""
    out: dict[str, str] = {}
    for entry in entries:
        key, _, value = entry.partition("=")
        if not key.lstrip(" \t"):
            raise _invalid(entry, flag, f"invalid label '{entry}': empty name")
        if any(c in key.lstrip(" \t") for c in " \t"):
            raise _invalid(entry, flag, f"label '{key}' contains whitespaces")
        out[key] = value
    return out


def parse_mount(text: str, flag: str = "--mount") -> dict[str, Any]:
    """`--mount`'s CSV syntax to a Mount, as docker's MountOpt: type=bind|volume|tmpfs (volume
    by default), source|src, target|destination|dst, readonly|ro[=BOOL], consistency,
    bind-propagation, bind-nonrecursive, volume-nocopy[=BOOL], volume-label=K=V,
    volume-driver, volume-opt=K=V, tmpfs-size, tmpfs-mode (octal)."""
    try:
        fields = next(csv.reader([text], strict=True), [])
    except csv.Error as e:
        raise _invalid(text, flag, f"not a comma-separated list: {e}") from None
    mount: dict[str, Any] = {"Type": "volume"}
    bind: dict[str, Any] | None = None
    volume: dict[str, Any] | None = None
    tmpfs: dict[str, Any] | None = None

    def volume_options() -> dict[str, Any]:
        nonlocal volume
        if volume is None:
            volume = {"Labels": {}, "DriverConfig": {}}
        return volume

    def boolean(key: str, value: str) -> bool:
        parsed = go_bool(value)
        if parsed is None:
            raise _invalid(text, flag, f"invalid value for {key}: {value} (use true or false)")
        return parsed

    for field in fields:
        key, eq, value = field.partition("=")
        key = key.lower()
        if not eq and key in ("readonly", "ro", "volume-nocopy", "bind-nonrecursive"):
            value = "true"
        elif not eq:
            raise _invalid(text, flag, f"invalid field '{field}' must be a key=value pair")
        if key == "type":
            mount["Type"] = value.lower()
        elif key in ("source", "src"):
            mount["Source"] = value
        elif key in ("target", "dst", "destination"):
            mount["Target"] = value
        elif key in ("readonly", "ro"):
            mount["ReadOnly"] = boolean(key, value)
        elif key == "consistency":
            mount["Consistency"] = value.lower()
        elif key == "bind-propagation":
            propagation = value.lower()
            if propagation not in PROPAGATIONS:
                raise _invalid(
                    text,
                    flag,
                    f"invalid bind-propagation {_q(value)}: use {', '.join(PROPAGATIONS)}",
                )
            bind = {**(bind or {}), "Propagation": propagation}
        elif key == "bind-nonrecursive":
            bind = {**(bind or {}), "NonRecursive": boolean(key, value)}
        elif key == "volume-nocopy":
            volume_options()["NoCopy"] = boolean(key, value)
        elif key == "volume-label":
            name, _, label = value.partition("=")
            volume_options()["Labels"][name] = label
        elif key == "volume-driver":
            volume_options()["DriverConfig"]["Name"] = value
        elif key == "volume-opt":
            name, _, option = value.partition("=")
            volume_options()["DriverConfig"].setdefault("Options", {})[name] = option
        elif key == "tmpfs-size":
            try:
                size = ram_in_bytes(value)
            except ValueError:
                raise _invalid(
                    text, flag, f"invalid value for {key}: {value} (use a size like 64m)"
                ) from None
            tmpfs = {**(tmpfs or {}), "SizeBytes": size}
        elif key == "tmpfs-mode":
            if not re.fullmatch(r"[0-7]{1,11}", value) or int(value, 8) > 0xFFFFFFFF:
                raise _invalid(
                    text, flag, f"invalid value for {key}: {value} (use octal, like 1770)"
                )
            tmpfs = {**(tmpfs or {}), "Mode": int(value, 8)}
        else:
            raise _invalid(text, flag, f"unexpected key '{key}' in '{field}'")
    kind = mount["Type"]
    if not kind:
        raise _invalid(text, flag, "type is required")
    if kind not in ("bind", "volume", "tmpfs"):
        raise _invalid(text, flag, f"invalid mount type {_q(kind)}: use bind, volume or tmpfs")
    if not mount.get("Target"):
        raise _invalid(text, flag, "target is required")
    if not mount["Target"].startswith("/"):
        raise _invalid(text, flag, "the target must be an absolute path in the container")
    for options, owner in ((volume, "volume"), (bind, "bind"), (tmpfs, "tmpfs")):
        if options is not None and kind != owner:
            raise _invalid(text, flag, f"cannot mix '{owner}-*' options with mount type '{kind}'")
    if mount.get("ReadOnly") is False:
        del mount["ReadOnly"]  # Go's omitempty
    if bind is not None:
        mount["BindOptions"] = {k: v for k, v in bind.items() if v}
    if volume is not None:  # as docker sends them: DriverConfig always, the rest if set
        volume["DriverConfig"] = {k: v for k, v in volume["DriverConfig"].items() if v}
        mount["VolumeOptions"] = {k: v for k, v in volume.items() if v or k == "DriverConfig"}
    if tmpfs is not None:
        mount["TmpfsOptions"] = {k: v for k, v in tmpfs.items() if v}
    return mount


def parse_since(text: str, now_ns: int | None = None) -> str:
    """`service logs --since` as the API's `since`, as docker's GetTimestamp: a Go duration
    (`10m`: that long ago), an RFC 3339 time or a prefix of one (`2013-01-02`,
    `2013-01-02T13:23`, `2013-01-02T13:23:37.5+01:00`; local time without a zone), or a Unix
    timestamp (`1700000000.5`, passed on). Times become `SECONDS.NANOSECONDS`."""
    now = time.time_ns() if now_ns is None else now_ns
    if text != "0":
        try:
            ago = go_duration(text)
        except ValueError:
            pass
        else:
            return _unix(now - ago)
    m = re.fullmatch(
        r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
        r"(?:T([0-9]{2})(?::([0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,9}))?)?)?)?"
        r"(Z|[+-][0-9]{2}:[0-9]{2})?",
        text,
    )
    if m is not None:
        year, month, day, hour, minute, sec, frac, zone = m.groups()
        if zone is None:  # the local zone, at its offset now (Go's FixedZone(reference.Zone()))
            tz = datetime.fromtimestamp(now / 1e9).astimezone().tzinfo
        elif zone == "Z":
            tz = UTC
        else:
            sign = -1 if zone[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
        try:
            at = datetime(
                int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(sec or 0),
                tzinfo=tz,
            )  # fmt: skip
        except ValueError as e:
            raise _invalid(text, "--since", f"not a valid time: {e}") from None
        whole = int(at.timestamp())
        return _unix(whole * SECOND + int((frac or "0").ljust(9, "0")))
    if "-" not in text and re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        return text  # already a Unix timestamp
    raise _invalid(
        text,
        "--since",
        f"failed to parse value as time or duration: {_q(text)} (use a time like "
        "2013-01-02T13:23:37Z, a Unix timestamp, or a duration like 42m)",
    )


def _unix(ns: int) -> str:
    secs, frac = divmod(ns, SECOND)
    return f"{secs}.{frac:09d}"


def registry_auth(image: str, config_path: str | None = None) -> str:
    """X-Registry-Auth for the image's registry, as `--with-registry-auth` sends it: the
    credentials `docker login` stored (~/.docker/config.json or $DOCKER_CONFIG, credential
    helpers included) as compact base64url JSON, else `{}` (pulls stay anonymous)."""
    # the docker SDK reads docker's config as docker does; imported only here, where it is
    # needed: it takes longer to import than most commands take to run
    import docker.auth  # noqa: PLC0415
    import docker.errors  # noqa: PLC0415

    try:
        registry, _ = docker.auth.resolve_repository_name(image)
        config = docker.auth.load_config(config_path)
        creds = docker.auth.resolve_authconfig(config, registry) or {}
    except docker.errors.DockerException as e:
        raise CliError(
            f"--with-registry-auth: cannot find the credentials for {image}: {e}"
        ) from None
    text = json.dumps({k: v for k, v in creds.items() if v is not None}, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode("ascii")


# ---- the commands' flags --------------------------------------------------------------------


def _container_flags(p: argparse.ArgumentParser, update: bool) -> None:
    """The ContainerSpec and Resources flags `create` and `update` share (docker's names)."""
    unset = None if update else False
    p.add_argument(
        "--entrypoint", metavar="COMMAND", help="overwrite the image's ENTRYPOINT (shell words)"
    )
    p.add_argument("-u", "--user", help="username or UID (<name|uid>[:<group|gid>])")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("--hostname", help="container hostname (templates: {{.Task.Slot}}, ...)")
    p.add_argument(
        "--init",
        action=GoBool,
        default=unset,
        help="use an init inside the container (--init=false: none)",
    )
    p.add_argument(
        "--read-only",
        action=GoBool,
        default=unset,
        help="mount the root filesystem read-only (--read-only=false: writable)",
    )
    p.add_argument(
        "-t",
        "--tty",
        action=GoBool,
        default=unset,
        help="allocate a pseudo-TTY (--tty=false: none)",
    )
    p.add_argument("--stop-signal", help="signal to stop the container (SIGTERM, TERM, 15)")
    p.add_argument(
        "--stop-grace-period", metavar="DURATION", help="time before a SIGKILL (default 10s)"
    )
    p.add_argument("--limit-cpu", metavar="DECIMAL", help="limit CPUs (0.5)")
    p.add_argument("--limit-memory", metavar="BYTES", help="limit memory (64m, 1g)")
    p.add_argument("--limit-pids", type=int, metavar="INT", help="limit processes (0: no limit)")
    p.add_argument("--reserve-cpu", metavar="DECIMAL", help="reserve CPUs")
    p.add_argument("--reserve-memory", metavar="BYTES", help="reserve memory")
    p.add_argument("--restart-condition", choices=("any", "on-failure", "none"))
    p.add_argument(
        "--restart-delay", metavar="DURATION", help="delay between restarts (5s; plain: seconds)"
    )
    p.add_argument("--restart-max-attempts", type=int, metavar="UINT")
    p.add_argument(
        "--restart-window", metavar="DURATION", help="window evaluating the restart policy"
    )
    p.add_argument(
        "--with-registry-auth",
        action=GoBool,
        default=False,
        help="send the registry credentials of `docker login` to the nodes",
    )


def _rollout_flags(p: argparse.ArgumentParser, update: bool) -> None:
    """The UpdateConfig, RollbackConfig and Healthcheck flags `create` and `update` share
    (docker's names); their values are checked when the spec is made."""
    for kind, done, actions in (
        ("update", "updated", "pause|continue|rollback"),
        ("rollback", "rolled back", "pause|continue"),
    ):
        p.add_argument(
            f"--{kind}-parallelism",
            metavar="UINT",
            help=f"tasks {done} at once (0: all at once; default 1)",
        )
        p.add_argument(
            f"--{kind}-delay", metavar="DURATION", help=f"delay between task {kind}s (default 0s)"
        )
        p.add_argument(
            f"--{kind}-failure-action",
            metavar=actions,
            help=f"what a failed {kind} does (default pause)",
        )
        p.add_argument(
            f"--{kind}-monitor",
            metavar="DURATION",
            help=f"how long each task {done} is watched for failure (default 5s)",
        )
        p.add_argument(
            f"--{kind}-max-failure-ratio",
            metavar="FLOAT",
            help=f"failure rate to tolerate during a{'n' if kind == 'update' else ''} {kind}, "
            "0 to 1 (default 0)",
        )
        p.add_argument(
            f"--{kind}-order",
            metavar="start-first|stop-first",
            help=f"{kind} order (default stop-first)",
        )
    p.add_argument(
        "--health-cmd", metavar="COMMAND", help="command to run to check health (by /bin/sh -c)"
    )
    p.add_argument(
        "--health-interval", metavar="DURATION", help="time between running the check (30s)"
    )
    p.add_argument(
        "--health-timeout", metavar="DURATION", help="maximum time to allow one check to run (30s)"
    )
    p.add_argument(
        "--health-retries",
        metavar="INT",
        help="consecutive failures needed to report unhealthy (3)",
    )
    p.add_argument(
        "--health-start-period",
        metavar="DURATION",
        help="start period for the container to initialize before failures count (0s)",
    )
    p.add_argument(
        "--no-healthcheck",
        action=GoBool,
        default=None if update else False,
        help="disable any container-specified HEALTHCHECK",
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("service", help="manage services")
    s = p.add_subparsers(
        dest="service_command", metavar="COMMAND", required=True, parser_class=DockerFlagParser
    )
    c = s.add_parser(
        "create",
        help="create a service",
        usage="shoal service create [OPTIONS] IMAGE [COMMAND] [ARG...]",
    )
    c.add_argument("--name", required=True)
    c.add_argument("--replicas", type=int, default=None)
    c.add_argument("--mode", choices=("replicated", "global"), default="replicated")
    c.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[PUBLISHED:]TARGET[/PROTO]",
        help="publish a port: [PUBLISHED:]TARGET[/tcp|udp] on the routing mesh, or "
        "published=P,target=T[,protocol=udp][,mode=host] (host: the port of the task's node)",
    )
    c.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("-l", "--label", action="append", default=[], metavar="KEY[=VALUE]")
    c.add_argument("--container-label", action="append", default=[], metavar="KEY[=VALUE]")
    c.add_argument("--group", action="append", default=[], help="supplementary user group")
    c.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="type=bind|volume|tmpfs,source=...,target=...[,readonly]",
    )
    c.add_argument("--constraint", action="append", default=[], metavar="EXPR")
    c.add_argument("--network", action="append", default=[])
    c.add_argument("--endpoint-mode", choices=("vip", "dnsrr"), default="vip")
    _container_flags(c, update=False)
    _rollout_flags(c, update=False)
    c.add_argument(
        "-d",
        "--detach",
        action=GoBool,
        help="return at once instead of waiting for the tasks to run",
    )
    c.add_argument("-q", "--quiet", action=GoBool, help="no progress output")
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND")
    c.set_defaults(func=cmd_create)
    ls = s.add_parser("ls", help="list services")
    ls.add_argument("-q", "--quiet", action="store_true")
    ls.add_argument("--format", default=None)
    ls.set_defaults(func=cmd_ls)
    ins = s.add_parser("inspect", help="show services in detail")
    ins.add_argument("services", nargs="+", metavar="SERVICE")
    ins.set_defaults(func=cmd_inspect)
    ps = s.add_parser("ps", help="list a service's tasks")
    ps.add_argument("services", nargs="+", metavar="SERVICE")
    ps.add_argument("-q", "--quiet", action="store_true")
    ps.add_argument("--format", default=None)
    ps.set_defaults(func=cmd_ps)
    sc = s.add_parser("scale", help="set the number of replicas")
    sc.add_argument("pairs", nargs="+", metavar="SERVICE=REPLICAS")
    sc.add_argument("-d", "--detach", action=GoBool)
    sc.set_defaults(func=cmd_scale)
    up = s.add_parser(
        "update",
        help="change a service (task changes roll out --update-parallelism at a time)",
        usage="shoal service update [OPTIONS] SERVICE",
    )
    up.add_argument("--image")
    up.add_argument("--args", help="the command's arguments, as one shell-quoted string")
    up.add_argument("--replicas", type=int)
    up.add_argument("--env-add", action="append", default=[], metavar="KEY=VALUE")
    up.add_argument("--env-rm", action="append", default=[], metavar="KEY")
    up.add_argument("--label-add", action="append", default=[], metavar="KEY[=VALUE]")
    up.add_argument("--label-rm", action="append", default=[], metavar="KEY")
    up.add_argument("--container-label-add", action="append", default=[], metavar="KEY[=VALUE]")
    up.add_argument("--container-label-rm", action="append", default=[], metavar="KEY")
    up.add_argument("--group-add", action="append", default=[], metavar="GROUP")
    up.add_argument("--group-rm", action="append", default=[], metavar="GROUP")
    up.add_argument("--mount-add", action="append", default=[], metavar="MOUNT")
    up.add_argument("--mount-rm", action="append", default=[], metavar="TARGET")
    up.add_argument("--publish-add", action="append", default=[], metavar="[PUB:]TARGET[/PROTO]")
    up.add_argument(
        "--publish-rm",
        action="append",
        default=[],
        metavar="[PUB:]TARGET[/PROTO]",
        help="remove the ports of that target (and mode=, as docker does); naming the "
        "published port too removes that one only",
    )
    up.add_argument("--constraint-add", action="append", default=[], metavar="EXPR")
    up.add_argument("--constraint-rm", action="append", default=[], metavar="EXPR")
    _container_flags(up, update=True)
    _rollout_flags(up, update=True)
    up.add_argument("--force", action=GoBool, help="replace the tasks even if nothing changed")
    up.add_argument(
        "--rollback",
        action=GoBool,
        help="roll back to the previous spec (as `service rollback`; no other flags)",
    )
    up.add_argument(
        "-d",
        "--detach",
        action=GoBool,
        help="return at once instead of following the update",
    )
    up.add_argument("-q", "--quiet", action=GoBool, help="no progress output")
    up.add_argument("service", metavar="SERVICE")
    up.set_defaults(func=cmd_update)
    rb = s.add_parser(
        "rollback",
        help="revert a service to its previous spec",
        usage="shoal service rollback [OPTIONS] SERVICE",
    )
    rb.add_argument(
        "-d",
        "--detach",
        action=GoBool,
        help="return at once instead of following the rollback",
    )
    rb.add_argument("-q", "--quiet", action=GoBool, help="no progress output")
    rb.add_argument("service", metavar="SERVICE")
    rb.set_defaults(func=cmd_rollback)
    lg = s.add_parser("logs", help="a service's logs")
    lg.add_argument("service", metavar="SERVICE")
    lg.add_argument("-f", "--follow", action=GoBool)
    lg.add_argument("-t", "--timestamps", action=GoBool)
    lg.add_argument("--tail", default="all")
    lg.add_argument(
        "--since",
        metavar="TIME",
        help='logs since a time ("2013-01-02T13:23:37Z", a Unix timestamp) or for a '
        'duration ("42m": the last 42 minutes)',
    )
    lg.set_defaults(func=cmd_logs)
    rm = s.add_parser("rm", help="remove services")
    rm.add_argument("services", nargs="+", metavar="SERVICE")
    rm.set_defaults(func=cmd_rm)


PUBLISH_FIELDS = ("published", "target", "protocol", "mode")


def parse_publish(text: str, flag: str = "--publish") -> dict[str, Any]:
    """[PUBLISHED:]TARGET[/tcp|udp], or the long form
    published=P,target=T[,protocol=udp][,mode=host] (docker's)."""
    mode = "ingress"
    if "=" in text:
        fields = dict(part.partition("=")[::2] for part in text.split(","))
        unknown = sorted(set(fields) - set(PUBLISH_FIELDS))
        if unknown:
            raise CliError(
                f"invalid {flag} {text!r}: unknown field {unknown[0]!r} "
                f"(fields: {', '.join(PUBLISH_FIELDS)})"
            )
        published, target, proto = (
            fields.get("published", "0"),
            fields.get("target", ""),
            fields.get("protocol", "tcp"),
        )
        mode = fields.get("mode", "ingress")
    else:
        ports, _, proto = text.partition("/")
        proto = proto or "tcp"
        published, _, target = ports.rpartition(":")
        published = published or "0"
    if not target.isdigit() or not published.isdigit():
        raise CliError(f"invalid {flag} {text!r}: expected [PUBLISHED:]TARGET[/tcp|udp]")
    if proto not in ("tcp", "udp"):
        raise CliError(f"invalid {flag} {text!r}: protocol must be tcp or udp")
    if mode not in ("ingress", "host"):
        raise CliError(f"invalid {flag} {text!r}: mode must be ingress or host")
    port: dict[str, Any] = {"Protocol": proto, "TargetPort": int(target), "PublishMode": mode}
    if int(published):
        port["PublishedPort"] = int(published)
    return port


def _named_by(port: dict[str, Any], removal: dict[str, Any]) -> bool:
    """Whether `--publish-rm` removes the port: docker's rule (same target, protocol and mode),
    narrowed to one published port when the removal names it."""
    return (
        port["TargetPort"] == removal["TargetPort"]
        and port.get("Protocol", "tcp") == removal["Protocol"]
        and (port.get("PublishMode") or "ingress") == removal["PublishMode"]
        and removal.get("PublishedPort", port.get("PublishedPort")) == port.get("PublishedPort")
    )


def _resources(args: argparse.Namespace) -> dict[str, Any]:
    """TaskTemplate.Resources from the flags, as docker sends it: Limits and Reservations
    always, with only the values set."""
    limits: dict[str, Any] = {}
    reservations: dict[str, Any] = {}
    _set_resource(limits, "NanoCPUs", args.limit_cpu, "--limit-cpu")
    _set_resource(limits, "MemoryBytes", args.limit_memory, "--limit-memory")
    _set_resource(limits, "Pids", args.limit_pids, "--limit-pids")
    _set_resource(reservations, "NanoCPUs", args.reserve_cpu, "--reserve-cpu")
    _set_resource(reservations, "MemoryBytes", args.reserve_memory, "--reserve-memory")
    return {"Limits": limits, "Reservations": reservations}


def _set_resource(into: dict[str, Any], key: str, value: str | int | None, flag: str) -> None:
    """One resource flag into Limits or Reservations: given 0 unsets it (docker's omitempty)."""
    if value is None:
        return
    if isinstance(value, int):
        if value < 0:
            raise _invalid(str(value), flag, "must not be negative (0: no limit)")
        number = value
    elif key == "NanoCPUs":
        number = parse_cpus(value, flag)
    else:
        number = parse_bytes(value, flag)
    if number:
        into[key] = number
    else:
        into.pop(key, None)


def _restart_policy(args: argparse.Namespace, current: dict[str, Any] | None) -> dict[str, Any]:
    """The restart policy with the flags applied; docker's defaults (any, 5s, 0 attempts) under
    a policy the spec lacks."""
    policy = dict(current) if current is not None else dict(DEFAULT_RESTART)
    if args.restart_condition is not None:
        policy["Condition"] = args.restart_condition
    if args.restart_delay is not None:
        policy["Delay"] = parse_duration(args.restart_delay, "--restart-delay", seconds=True)
    if args.restart_max_attempts is not None:
        if args.restart_max_attempts < 0:
            raise _invalid(
                str(args.restart_max_attempts), "--restart-max-attempts", "must not be negative"
            )
        policy["MaxAttempts"] = args.restart_max_attempts
    if args.restart_window is not None:
        policy["Window"] = parse_duration(args.restart_window, "--restart-window")
    return policy


def _restart_flags(args: argparse.Namespace) -> bool:
    return any(
        v is not None
        for v in (
            args.restart_condition,
            args.restart_delay,
            args.restart_max_attempts,
            args.restart_window,
        )
    )


# swarmkit's defaults for an UpdateConfig or a RollbackConfig (defaults.Service.Update and
# .Rollback), which the docker CLI fills in under the flags it is given
DEFAULT_ROLLOUT: dict[str, Any] = {
    "Parallelism": 1,
    "FailureAction": "pause",
    "Monitor": DEFAULT_MONITOR,
    "MaxFailureRatio": 0,
    "Order": "stop-first",
}
FAILURE_ACTIONS = {"update": ("pause", "continue", "rollback"), "rollback": ("pause", "continue")}


def _rollout_changes(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """What the `--update-*` (kind "update") or `--rollback-*` flags set, checked."""

    def given(name: str) -> tuple[str | None, str]:
        return getattr(args, f"{kind}_{name.replace('-', '_')}"), f"--{kind}-{name}"

    changes: dict[str, Any] = {}
    text, flag = given("parallelism")
    if text is not None:
        changes["Parallelism"] = parse_uint(text, flag)
    text, flag = given("delay")
    if text is not None:
        changes["Delay"] = parse_duration(text, flag)
    text, flag = given("failure-action")
    if text is not None:
        changes["FailureAction"] = _choice(text, flag, FAILURE_ACTIONS[kind])
    text, flag = given("monitor")
    if text is not None:
        changes["Monitor"] = parse_duration(text, flag)
    text, flag = given("max-failure-ratio")
    if text is not None:
        changes["MaxFailureRatio"] = parse_ratio(text, flag)
    text, flag = given("order")
    if text is not None:
        changes["Order"] = _choice(text, flag, UPDATE_ORDERS)
    return changes


def _rollout_config(
    args: argparse.Namespace, kind: str, current: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The UpdateConfig or RollbackConfig with the flags applied, as the docker CLI makes it:
    None when no flag names it; swarmkit's defaults under the flags when there is none yet;
    Delay and Monitor left out when 0 (Go's omitempty: a Monitor of 0 is the default)."""
    changes = _rollout_changes(args, kind)
    if not changes:
        return None
    config = dict(DEFAULT_ROLLOUT) if current is None else dict(current)
    for key, value in changes.items():
        if key in ("Delay", "Monitor") and not value:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def _health_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `--health-*` flags given: Healthcheck key -> value, checked (None: not given)."""

    def duration(text: str | None, flag: str) -> int | None:
        return None if text is None else parse_health_duration(text, flag)

    return {
        "Test": args.health_cmd,
        "Interval": duration(args.health_interval, "--health-interval"),
        "Timeout": duration(args.health_timeout, "--health-timeout"),
        "Retries": None if args.health_retries is None else parse_retries(args.health_retries),
        "StartPeriod": duration(args.health_start_period, "--health-start-period"),
    }


def _create_healthcheck(args: argparse.Namespace) -> dict[str, Any] | None:
    """ContainerSpec.Healthcheck from the flags, as docker's toHealthConfig: none unless one
    sets something (`--health-cmd ""` and `--health-retries 0` do not); `--no-healthcheck`:
    ["NONE"]. (`--health-start-period` counts, as in docker since 23.0; 20.10 dropped it
    when alone.)"""
    values = _health_values(args)
    have = (
        bool(values["Test"])
        or bool(values["Retries"])
        or any(values[k] is not None for k in ("Interval", "Timeout", "StartPeriod"))
    )
    if args.no_healthcheck:
        if have:
            raise CliError("--no-healthcheck conflicts with --health-* options")
        return {"Test": ["NONE"]}
    if not have:
        return None
    health: dict[str, Any] = {}
    if values["Test"]:
        health["Test"] = ["CMD-SHELL", values["Test"]]
    for key in ("Interval", "Timeout", "Retries", "StartPeriod"):
        if values[key]:
            health[key] = values[key]
    return health


def _update_healthcheck(args: argparse.Namespace, container: dict[str, Any]) -> None:
    """docker's updateHealthcheck: the flags given change the service's Healthcheck, the rest
    of it stays; `--health-cmd ""` goes back to the image's test; a ["NONE"] test is dropped
    when a `--health-*` flag is given; `--no-healthcheck` replaces it all with ["NONE"]."""
    values = _health_values(args)
    changed = any(v is not None for v in values.values())
    if not changed and args.no_healthcheck is None:
        return
    if args.no_healthcheck:
        if changed:
            raise CliError("--no-healthcheck conflicts with --health-* options")
        container["Healthcheck"] = {"Test": ["NONE"]}
        return
    health = dict(container.get("Healthcheck") or {})
    if (health.get("Test") or [None])[0] == "NONE":
        health.pop("Test", None)
    for key in ("Interval", "Timeout", "Retries", "StartPeriod"):
        if values[key] is not None:
            _set(health, key, values[key])
    if values["Test"] is not None:
        _set(health, "Test", ["CMD-SHELL", values["Test"]] if values["Test"] else None)
    container["Healthcheck"] = health


def create_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The ServiceSpec `service create` sends, as the docker CLI builds it from the same flags.
    Raises CliError for a bad value, naming its flag."""
    _refuse_bad_flags(args)
    if args.mode == "global" and args.replicas is not None:
        raise CliError("replicas can only be used with replicated mode")
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    container: dict[str, Any] = {"Image": args.image}
    labels = _labels(args.container_label, "--container-label")
    if labels:
        container["Labels"] = labels
    if args.entrypoint is not None:
        entrypoint = _shell_words(args.entrypoint, "--entrypoint")
        if entrypoint:
            container["Command"] = entrypoint
    if cmd:
        container["Args"] = cmd
    if args.env:
        container["Env"] = args.env
    for key, value in (
        ("Hostname", args.hostname),
        ("Dir", _workdir(args.workdir or "", "--workdir")),
        ("User", args.user),
    ):
        if value:
            container[key] = value
    if args.group:
        container["Groups"] = args.group
    if args.tty:
        container["TTY"] = True
    if args.read_only:
        container["ReadOnly"] = True
    mounts = [parse_mount(m, "--mount") for m in args.mount]
    if mounts:
        container["Mounts"] = mounts
    if args.stop_signal:
        container["StopSignal"] = _stop_signal(args.stop_signal)
    if args.stop_grace_period is not None:
        container["StopGracePeriod"] = parse_duration(args.stop_grace_period, "--stop-grace-period")
    container["Init"] = bool(args.init)  # docker sends it, false too
    template: dict[str, Any] = {"ContainerSpec": container}
    template["Resources"] = _resources(args)
    if _restart_flags(args):
        template["RestartPolicy"] = _restart_policy(args, None)
    if args.constraint:
        template["Placement"] = {"Constraints": args.constraint}
    if args.network:
        template["Networks"] = [{"Target": n} for n in args.network]
    endpoint: dict[str, Any] = {"Mode": args.endpoint_mode}
    ports = [parse_publish(p) for p in args.publish]
    if ports:
        endpoint["Ports"] = ports
    spec: dict[str, Any] = {
        "Name": args.name,
        "Labels": _labels(args.label, "--label"),
        "TaskTemplate": template,
        "Mode": (
            {"Global": {}}
            if args.mode == "global"
            else {"Replicated": {"Replicas": 1 if args.replicas is None else args.replicas}}
        ),
        "EndpointSpec": endpoint,
    }
    health = _create_healthcheck(args)
    if health is not None:
        container["Healthcheck"] = health
    for kind, key in (("update", "UpdateConfig"), ("rollback", "RollbackConfig")):
        config = _rollout_config(args, kind, None)
        if config is not None:
            spec[key] = config
    return spec


def _print_warnings(result: dict[str, Any]) -> None:
    """The API's Warnings on stderr, as the docker CLI prints them (before the ID)."""
    for warning in result.get("Warnings") or ():
        print(warning, file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    spec = create_spec(args)
    auth = registry_auth(args.image) if args.with_registry_auth else None
    client = connect(args.host)
    result: dict[str, Any] = client.create_service(spec, registry_auth=auth)
    _print_warnings(result)
    service_id = result["ID"]
    print(service_id)
    if not args.detach:
        converge(client, service_id, args.quiet)
    return 0


def _tally(client: Any, service_id: str, svc: dict[str, Any]) -> tuple[int, int, list[str]]:
    """The service's up-to-date tasks running (on nodes not down), how many are wanted, and
    their errors."""
    nodes = {n["ID"]: n for n in client.nodes()}
    tasks = [
        t
        for t in client.tasks(filters={"service": service_id, "_up-to-date": "true"})
        if t["DesiredState"] == "running"
    ]
    mode = svc["Spec"]["Mode"]
    if "Replicated" in mode:
        wanted = int(mode["Replicated"].get("Replicas", 1))
    else:
        wanted = sum(
            1
            for n in nodes.values()
            if n["Status"]["State"] == "ready" and n["Spec"]["Availability"] == "active"
        )
    running = sum(
        1
        for t in tasks
        if t["Status"]["State"] == "running"
        and nodes.get(t.get("NodeID", ""), {}).get("Status", {}).get("State") != "down"
    )
    errors = sorted({t["Status"]["Err"] for t in tasks if t["Status"].get("Err")})
    return running, wanted, errors


def converge(client: Any, service_id: str, quiet: bool = False) -> None:
    """Wait until every wanted task runs, showing progress (the docker CLI's loop)."""
    tty = sys.stdout.isatty()
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    last = ""
    while True:
        svc = client.inspect_service(service_id)
        running, wanted, errors = _tally(client, service_id, svc)
        line = f"overall progress: {running} out of {wanted} tasks"
        if errors:
            line += f" ({errors[-1]})"
        if line != last and not quiet:
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last = line
        if running >= wanted:
            if not quiet:
                print(("\n" if tty else "") + f"verify: Service {service_id} converged")
            return
        if time.monotonic() > deadline:
            if not quiet:
                print()
            raise CliError(
                f"service {service_id} did not converge in {CONVERGE_TIMEOUT:.0f} s "
                f"({running}/{wanted} running); see `shoal service ps {service_id}`"
            )
        time.sleep(0.2)


class ProgressLines:
    """Progress as the docker CLI shows it: `ID: text` lines; on a terminal a line with the
    same ID as the last one is redrawn in place, elsewhere a line is printed when it changes."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stdout.isatty()
        self.shown: dict[str, str] = {}
        self.open_id: str | None = None  # a terminal line left open, by its ID

    def show(self, ident: str, text: str) -> None:
        if self.quiet or self.shown.get(ident) == text:
            return
        self.shown[ident] = text
        line = f"{ident}: {text}"
        if not self.tty:
            print(line, flush=True)
        elif self.open_id == ident:
            print("\r\x1b[K" + line, end="", flush=True)
        else:
            print(("\n" if self.open_id is not None else "") + line, end="", flush=True)
        if self.tty:
            self.open_id = ident

    def close(self) -> None:
        if self.open_id is not None:
            print(flush=True)
            self.open_id = None


UPDATING_STATES = ("updating", "rollback_started")


def watch_update(
    client: Any,
    service_id: str,
    quiet: bool = False,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Follow an update or a rollback to its end, as `docker service update` and `rollback`
    do (docker CLI 20.10, cli/command/service/progress), polling the service and its tasks:

    - `paused` / `rollback_paused`: CliError "service update paused: <Message>" / "service
      rollback paused: <Message>";
    - `rollback_started`: "rollback: <Message>" once (a manual one's is "manually requested
      rollback"; an update's FailureAction rollback says why), then the tasks count as
      "rolling back update: N out of M tasks";
    - `completed` / `rollback_completed`: the manager has watched the new tasks for Monitor
      already: "verify: Service <id> converged" (and "rollback: rollback completed");
    - no UpdateStatus (the update changed no task, or the manager has not begun it): once
      every task runs, "verify: Waiting N seconds to verify that tasks are stable..." for
      UpdateConfig.Monitor, then converged; a task that stops meanwhile is "verify: Detected
      task failure" and the wait starts again.

    While an update is under way the end is the manager's `completed`, not this wait (so
    that its state is final when the command returns). With nothing changing for
    CONVERGE_TIMEOUT (plus the update's Delay and Monitor) it gives up. Ctrl-C leaves the
    update running, as docker does. clock and sleep: time.monotonic and time.sleep."""
    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    progress = ProgressLines(quiet)
    rollback = False
    converged_at: float | None = None
    seen: tuple[Any, ...] = ()
    changed_at = clock()
    running = wanted = 0
    try:
        while True:
            svc = client.inspect_service(service_id)
            spec = svc.get("Spec") or {}
            status = svc.get("UpdateStatus") or {}
            state, message = str(status.get("State") or ""), str(status.get("Message") or "")
            if state == "paused":
                raise CliError(f"service update paused: {message}")
            if state == "rollback_paused":
                raise CliError(f"service rollback paused: {message}")
            if state == "updating":
                rollback = False
            elif state in ("rollback_started", "rollback_completed"):
                if not rollback and message and state == "rollback_started":
                    progress.show("rollback", message)
                rollback = True
            running, wanted, errors = _tally(client, service_id, svc)
            doing = "rolling back update: " if rollback else ""
            line = f"{doing}{running} out of {wanted} tasks"
            if errors:
                line += f" ({_trunc(errors[-1])})"
            progress.show("overall progress", line)
            converged = running >= wanted
            if state in ("completed", "rollback_completed"):
                if converged:
                    progress.show("verify", f"Service {service_id} converged")
                if state == "rollback_completed" and message:
                    progress.show("rollback", message)
                return
            now = clock()
            monitor = (spec.get("UpdateConfig") or {}).get("Monitor") or DEFAULT_MONITOR
            if converged:
                if converged_at is None:
                    converged_at = now
                wait = monitor / 1e9 - (now - converged_at)
                if wait > 0:
                    progress.show(
                        "verify",
                        f"Waiting {math.ceil(wait)} seconds to verify that tasks are stable...",
                    )
                elif state not in UPDATING_STATES:
                    progress.show("verify", f"Service {service_id} converged")
                    return
            else:
                if converged_at is not None:
                    progress.show("verify", "Detected task failure")
                converged_at = None
            now_seen = (state, running, wanted, converged)
            if now_seen != seen:
                seen, changed_at = now_seen, now
            config = spec.get("RollbackConfig" if rollback else "UpdateConfig") or {}
            patience = (
                CONVERGE_TIMEOUT
                + (int(config.get("Delay") or 0) + int(config.get("Monitor") or DEFAULT_MONITOR))
                / 1e9
            )
            if now - changed_at > patience:
                raise CliError(
                    f"service {service_id}: no progress in {patience:.0f} s ({running}/"
                    f"{wanted} running{f', {state}' if state else ''}); see `shoal service ps "
                    f"{service_id}`"
                )
            sleep(0.2)
    except KeyboardInterrupt:
        if running < wanted:
            progress.close()
            print("Operation continuing in background.")
            print(f"Use `shoal service ps {service_id}` to check progress.")
    finally:
        progress.close()


def _trunc(error: str) -> str:
    """A task's error on one line of at most 75 characters (docker's truncError)."""
    error = error.replace("\n", " ")
    return error if len(error) <= 75 else error[:74] + "\u2026"


def cmd_ls(args: argparse.Namespace) -> int:
    client = connect(args.host)
    services = client.services(status=True)
    if args.quiet:
        for s in services:
            print(s["ID"])
        return 0
    rows = []
    for s in sorted(services, key=lambda s: s["Spec"]["Name"]):
        mode, replicas = _mode_and_replicas(s)
        ports = ", ".join(
            f"*:{p['PublishedPort']}->{p['TargetPort']}/{p['Protocol']}"
            for p in s.get("Endpoint", {}).get("Ports", [])
            if p.get("PublishMode") == "ingress"
        )
        rows.append(
            [
                short(s["ID"]),
                s["Spec"]["Name"],
                mode,
                replicas,
                image_name(s["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]),
                ports,
            ]
        )
    table(["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"], rows, args.format, services)
    return 0


def _mode_and_replicas(svc: dict[str, Any]) -> tuple[str, str]:
    """MODE and REPLICAS as `docker service ls` shows them; a job's completions too."""
    mode = svc["Spec"]["Mode"]
    st = svc.get("ServiceStatus", {})
    running, desired = st.get("RunningTasks", 0), st.get("DesiredTasks", 0)
    completed = st.get("CompletedTasks", 0)
    if "ReplicatedJob" in mode:
        total = mode["ReplicatedJob"].get("TotalCompletions", 0)
        return "replicated job", f"{running}/{desired} ({completed}/{total} completed)"
    if "GlobalJob" in mode:
        # every node's task: those still to complete, and those that did
        return "global job", f"{running}/{desired} ({completed}/{desired + completed} completed)"
    return ("global" if "Global" in mode else "replicated"), f"{running}/{desired}"


def cmd_inspect(args: argparse.Namespace) -> int:
    client = connect(args.host)
    pretty_json([client.inspect_service(s) for s in args.services])
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    client = connect(args.host)
    tasks = []
    for ref in args.services:
        svc = client.inspect_service(ref)
        tasks += client.tasks(filters={"service": svc["ID"]})
    print_tasks(client, tasks, args.quiet, args.format)
    return 0


def _push(
    client: Any,
    svc: dict[str, Any],
    spec: dict[str, Any],
    auth: str | None = None,
    auth_from: str | None = None,
    rollback: str | None = None,
) -> dict[str, Any]:
    """Send a changed spec, as of the version read (a concurrent change is refused); the rest of
    the spec goes back as it was read. Returns the answer (its Warnings)."""
    result: dict[str, Any] = client.update_service(
        svc["ID"],
        svc["Version"]["Index"],
        spec,
        registry_auth=auth,
        registry_auth_from=auth_from,
        rollback=rollback,
    )
    return result


def cmd_scale(args: argparse.Namespace) -> int:
    _refuse_bad_flags(args)
    client = connect(args.host)
    failed = False
    for pair in args.pairs:
        name, _, count = pair.partition("=")
        if not name or not count.lstrip("-").isdigit():
            raise CliError(f"invalid scale specifier {pair!r}: use SERVICE=REPLICAS")
        try:
            svc = client.inspect_service(name)
            if "Replicated" not in svc["Spec"]["Mode"]:
                raise CliError(f"scale can only be used with replicated mode ({name} is global)")
            spec = svc["Spec"]
            spec["Mode"] = {"Replicated": {"Replicas": int(count)}}
            _print_warnings(_push(client, svc, spec))
            print(f"{name} scaled to {count}")
            if not args.detach:
                converge(client, svc["ID"])
        except APIError as e:
            print(f"shoal: {name}: {e.message}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def _set(into: dict[str, Any], key: str, value: Any) -> None:
    """Set a field, or drop it when empty (what docker's omitempty sends)."""
    if value in (None, "", [], {}, False):
        into.pop(key, None)
    else:
        into[key] = value


def _update_labels(into: dict[str, Any], add: list[str], rm: list[str], flag: str) -> None:
    """docker's updateLabels: remove the keys, then add (or replace)."""
    if not add and not rm:
        return
    labels = dict(into.get("Labels") or {})
    for key in rm:
        labels.pop(key, None)
    labels.update(_labels(add, flag))
    into["Labels"] = labels


def _update_mounts(container: dict[str, Any], add: list[str], rm: list[str]) -> None:
    """docker's updateMounts: added ones replace those with their target, removed by target,
    sorted by source then target."""
    if not add and not rm:
        return
    by_target: dict[str, dict[str, Any]] = {}
    for text in add:
        mount = parse_mount(text, "--mount-add")
        if mount["Target"] in by_target:
            raise _invalid(text, "--mount-add", f"duplicate mount target {mount['Target']}")
        by_target[mount["Target"]] = mount
    for mount in container.get("Mounts") or ():
        by_target.setdefault(mount.get("Target", ""), mount)
    gone = set(rm)
    mounts = [m for target, m in by_target.items() if target not in gone]
    mounts.sort(key=lambda m: (m.get("Source", ""), m.get("Target", "")))
    _set(container, "Mounts", mounts)


def _update_resources(args: argparse.Namespace, template: dict[str, Any]) -> None:
    """docker's: a changed limit (or reservation) flag changes only that value; Resources,
    Limits and Reservations are made if missing."""
    limit_flags = (args.limit_cpu, args.limit_memory, args.limit_pids)
    reserve_flags = (args.reserve_cpu, args.reserve_memory)
    if all(v is None for v in (*limit_flags, *reserve_flags)):
        return
    res = dict(template.get("Resources") or {})
    res["Limits"] = limits = dict(res.get("Limits") or {})
    res["Reservations"] = reservations = dict(res.get("Reservations") or {})
    _set_resource(limits, "NanoCPUs", args.limit_cpu, "--limit-cpu")
    _set_resource(limits, "MemoryBytes", args.limit_memory, "--limit-memory")
    _set_resource(limits, "Pids", args.limit_pids, "--limit-pids")
    _set_resource(reservations, "NanoCPUs", args.reserve_cpu, "--reserve-cpu")
    _set_resource(reservations, "MemoryBytes", args.reserve_memory, "--reserve-memory")
    template["Resources"] = res


def _updated_spec(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """The service's spec with the command line's changes applied (docker's semantics): only
    what a flag names changes, the rest stays as read."""
    _refuse_bad_flags(args)
    template = spec.setdefault("TaskTemplate", {})
    container = template.setdefault("ContainerSpec", {})
    _update_labels(spec, args.label_add, args.label_rm, "--label-add")
    _update_labels(
        container, args.container_label_add, args.container_label_rm, "--container-label-add"
    )
    if args.image:
        container["Image"] = args.image
    if args.args is not None:
        _set(container, "Args", _shell_words(args.args, "--args"))
    if args.entrypoint is not None:
        _set(container, "Command", _shell_words(args.entrypoint, "--entrypoint"))
    if args.env_add or args.env_rm:
        added = {e.split("=", 1)[0] for e in args.env_add}
        gone = set(args.env_rm) | added
        env = [e for e in container.get("Env") or [] if e.split("=", 1)[0] not in gone]
        container["Env"] = env + args.env_add
    if args.workdir is not None:
        _set(container, "Dir", _workdir(args.workdir, "--workdir"))
    if args.user is not None:
        _set(container, "User", args.user)
    if args.hostname is not None:
        _set(container, "Hostname", args.hostname)
    if args.init is not None:
        container["Init"] = args.init  # a pointer in docker's spec: false is sent
    _update_mounts(container, args.mount_add, args.mount_rm)
    _update_resources(args, template)
    if args.stop_grace_period is not None:
        container["StopGracePeriod"] = parse_duration(args.stop_grace_period, "--stop-grace-period")
    if _restart_flags(args):
        template["RestartPolicy"] = _restart_policy(args, template.get("RestartPolicy"))
    if args.constraint_add or args.constraint_rm:
        placement = template.setdefault("Placement", {})
        kept = [c for c in placement.get("Constraints") or [] if c not in args.constraint_rm]
        placement["Constraints"] = kept + [c for c in args.constraint_add if c not in kept]
    if args.replicas is not None:
        if "Replicated" not in spec["Mode"]:
            raise CliError("replicas can only be used with replicated mode")
        spec["Mode"] = {"Replicated": {"Replicas": args.replicas}}
    if args.group_add or args.group_rm:
        groups = [*(container.get("Groups") or []), *args.group_add]
        _set(container, "Groups", sorted(g for g in groups if g not in set(args.group_rm)))
    if args.publish_add or args.publish_rm:
        endpoint = spec.setdefault("EndpointSpec", {})
        ports = endpoint.get("Ports") or []
        for text in args.publish_rm:
            removal = parse_publish(text, "--publish-rm")
            ports = [p for p in ports if not _named_by(p, removal)]
        for text in args.publish_add:
            port = parse_publish(text, "--publish-add")
            if port not in ports:  # docker's: adding what is there already changes nothing
                ports.append(port)
        endpoint["Ports"] = ports
    for kind, key in (("update", "UpdateConfig"), ("rollback", "RollbackConfig")):
        config = _rollout_config(args, kind, spec.get(key))
        if config is not None:
            spec[key] = config
    _update_healthcheck(args, container)
    if args.force:
        template["ForceUpdate"] = int(template.get("ForceUpdate") or 0) + 1
    if args.tty is not None:
        _set(container, "TTY", args.tty)
    if args.read_only is not None:
        _set(container, "ReadOnly", args.read_only)
    if args.stop_signal is not None:
        _set(container, "StopSignal", _stop_signal(args.stop_signal))
    return spec


def cmd_update(args: argparse.Namespace) -> int:
    _refuse_bad_flags(args)
    if args.rollback and set(args.flags_given) - {"rollback", "detach", "quiet"}:
        raise CliError("other flags may not be combined with --rollback")
    client = connect(args.host)
    svc = client.inspect_service(args.service)
    if args.rollback:  # as `service rollback`, the service keeping its credentials
        result = _push(client, svc, svc["Spec"], auth_from="spec", rollback="previous")
    elif args.with_registry_auth:
        spec = _updated_spec(args, svc["Spec"])
        # the image as updated (or the service's own): its registry's credentials
        auth = registry_auth(spec["TaskTemplate"]["ContainerSpec"]["Image"])
        result = _push(client, svc, spec, auth=auth)
    else:  # the service keeps the credentials it has, as docker asks
        spec = _updated_spec(args, svc["Spec"])
        result = _push(client, svc, spec, auth_from="spec")
    _print_warnings(result)
    print(args.service)
    if not args.detach:
        watch_update(client, svc["ID"], args.quiet)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """docker 20.10's `service rollback`: the spec goes back as read, with `rollback=previous`
    (the manager takes the previous spec; 400 if there is none), then the rollback is
    followed as an update is."""
    _refuse_bad_flags(args)
    client = connect(args.host)
    svc = client.inspect_service(args.service)
    result = _push(client, svc, svc["Spec"], rollback="previous")
    _print_warnings(result)
    print(args.service)
    if not args.detach:
        watch_update(client, svc["ID"], args.quiet)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    _refuse_bad_flags(args)
    since = parse_since(args.since) if args.since else 0
    client = connect(args.host)
    svc = client.inspect_service(args.service)
    tail: int | str = int(args.tail) if str(args.tail).isdigit() else "all"
    names: dict[str, str] = {}
    nodes: dict[str, str] = {}
    for chunk in client.service_logs(
        svc["ID"],
        details=True,
        follow=args.follow,
        stdout=True,
        stderr=True,
        since=since,
        timestamps=args.timestamps,
        tail=tail,
        is_tty=bool(svc["Spec"]["TaskTemplate"]["ContainerSpec"].get("TTY")),
    ):
        for line in chunk.decode(errors="replace").splitlines(keepends=True):
            print(_pretty_log(client, svc, line, args.timestamps, names, nodes), end="", flush=True)
    return 0


def _pretty_log(
    client: Any,
    svc: dict[str, Any],
    line: str,
    timestamps: bool,
    names: dict[str, str],
    nodes: dict[str, str],
) -> str:
    ts = ""
    if timestamps:
        ts, _, line = line.partition(" ")
        ts += " "
    details, _, message = line.partition(" ")
    attrs = dict(kv.split("=", 1) for kv in details.split(",") if "=" in kv)
    tid, nid = attrs.get("com.docker.swarm.task.id", ""), attrs.get("com.docker.swarm.node.id", "")
    if tid not in names:
        try:
            task = client.inspect_task(tid)
            names[tid] = f"{svc['Spec']['Name']}.{task.get('Slot') or nid}.{short(tid)}"
        except APIError:
            names[tid] = short(tid)
    if nid not in nodes:
        try:
            nodes[nid] = client.inspect_node(nid)["Description"]["Hostname"]
        except APIError:
            nodes[nid] = short(nid)
    return f"{ts}{names[tid]}@{nodes[nid]}    | {message}"


def cmd_rm(args: argparse.Namespace) -> int:
    client = connect(args.host)
    failed = False
    for ref in args.services:
        try:
            client.remove_service(ref)
            print(ref)
        except APIError as e:
            print(f"shoal: {e.message}", file=sys.stderr)
            failed = True
    return 1 if failed else 0
