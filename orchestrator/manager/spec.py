"""Service and network specs: Docker's JSON shape in, validated and normalised; typed views out.

The API stores the normalised spec and hands it back exactly (the docker CLI posts back the
Spec it read); managers read it through `ServiceView`, never by poking at dicts, and agents read
a task's TaskTemplate through `ContainerView`. Everything a client controls is bounded (entries,
string lengths), so one request cannot make a manager store or check megabytes of spec.
"""

from __future__ import annotations

import copy
import ipaddress
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from orchestrator.images import reference
from orchestrator.store.objects import (
    DEFAULT_ADDR_POOL,
    DEFAULT_DATA_PATH_PORT,
    DEFAULT_SUBNET_SIZE,
)

NAME = re.compile(r"^[a-zA-Z0-9](?:[-_]*[A-Za-z0-9]+)*$")  # Docker's service/network name rule
CONSTRAINT = re.compile(r"^\s*([\w.\-]+)\s*(==|!=)\s*(.+?)\s*$")
CONSTRAINT_KEYS = (
    "node.id",
    "node.hostname",
    "node.role",
    "node.labels.",
    "node.platform.os",
    "node.platform.arch",
)
SECOND = 1_000_000_000
DEFAULT_RESTART_DELAY = 5 * SECOND
DEFAULT_STOP_GRACE = 10 * SECOND
PUBLISHED_RANGE = (30000, 32767)
CONTAINER = "TaskTemplate.ContainerSpec"

# Bounds on what one request may ask a manager to store, check and send to every node.
MAX_ENTRIES = 1000  # Command, Args, Env, Groups entries; labels per map
MAX_MOUNTS = 100
MAX_STRING = 4096  # names, paths, keys
MAX_VALUE = 65536  # Env entries, label values, Command and Args entries: content, not names

MIN_MEMORY_LIMIT = 6 * 1024 * 1024  # Docker's: less cannot even start a container
MIN_NANO_CPUS = 1_000_000  # swarmkit's: 0.001 CPU, the finest the kernel's CFS quota gives
MOUNT_TYPES = ("bind", "volume", "tmpfs")
PROPAGATIONS = ("rprivate", "private", "rshared", "shared", "rslave", "slave")
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")  # Docker's local volume names

# Linux signal numbers by name, as Docker's signal.ParseSignal reads StopSignal (SIG optional,
# any case, or a number).
SIGNALS: Mapping[str, int] = MappingProxyType(
    {
        "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6, "BUS": 7,
        "FPE": 8, "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14,
        "TERM": 15, "STKFLT": 16, "CHLD": 17, "CLD": 17, "CONT": 18, "STOP": 19, "TSTP": 20,
        "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26, "PROF": 27,
        "WINCH": 28, "IO": 29, "POLL": 29, "PWR": 30, "SYS": 31, "RTMIN": 34, "RTMAX": 64,
        **{f"RTMIN+{i}": 34 + i for i in range(1, 16)},
        **{f"RTMAX-{i}": 64 - i for i in range(1, 15)},
    }
)  # fmt: skip
MAX_SIGNAL = 64


# Fields of Docker's ServiceSpec that Shoal does not honour yet: refused with 400 naming the
# field, never stored and silently without effect. An empty value is what clients send by
# default (the docker CLI always sends `"DNSConfig": {}`, and `"Privileges":
# {"NoNewPrivileges": false}` with some options), and is accepted. (where, field) -> what it is
# and the docker CLI's flag for it.
UNSUPPORTED = {
    (CONTAINER, "Secrets"): "secrets (--secret)",
    (CONTAINER, "Configs"): "configs (--config)",
    (CONTAINER, "Privileges"): "privileges (--credential-spec, --no-new-privileges, ...)",
    (CONTAINER, "Hosts"): "extra /etc/hosts entries (--host)",
    (CONTAINER, "DNSConfig"): "DNS settings (--dns, --dns-search, --dns-option)",
    (CONTAINER, "Sysctls"): "sysctls (--sysctl)",
    (CONTAINER, "CapabilityAdd"): "added capabilities (--cap-add)",
    (CONTAINER, "CapabilityDrop"): "dropped capabilities (--cap-drop)",
    (CONTAINER, "Ulimits"): "ulimits (--ulimit)",
    ("TaskTemplate", "LogDriver"): "a log driver (--log-driver)",
    ("TaskTemplate", "NetworkAttachmentSpec"): "network attachment tasks",
    ("TaskTemplate", "PluginSpec"): "plugin services",
    ("TaskTemplate.Placement", "Preferences"): "placement preferences (--placement-pref)",
    ("TaskTemplate.Placement", "MaxReplicas"): "tasks per node (--replicas-max-per-node)",
}


def _set(value: Any) -> bool:
    """A value that asks for something: not null, empty, zero or false, nor made of those."""
    if isinstance(value, dict):
        return any(_set(v) for v in value.values())
    if isinstance(value, list):
        return any(_set(v) for v in value) or bool(value)
    return bool(value)


def _refuse_unsupported(spec: dict[str, Any]) -> None:
    tt = spec.get("TaskTemplate") or {}
    parts = {
        CONTAINER: tt.get("ContainerSpec") or {},
        "TaskTemplate": tt,
        "TaskTemplate.Placement": tt.get("Placement") or {},
    }
    for (where, key), what in UNSUPPORTED.items():
        part = parts[where]
        if isinstance(part, dict) and _set(part.get(key)):
            raise SpecError(
                f"{where}.{key}: {what} is not supported by Shoal yet; create the service "
                "without it"
            )
    isolation = (tt.get("ContainerSpec") or {}).get("Isolation")
    if isolation not in (None, "", "default"):
        raise SpecError(
            f"{CONTAINER}.Isolation: {isolation!r} isolation is not supported (only "
            "'default': Linux namespaces)"
        )
    runtime = tt.get("Runtime")
    if runtime not in (None, "", "container"):
        raise SpecError(f"TaskTemplate.Runtime: {runtime!r} is not supported (only 'container')")


class SpecError(ValueError):
    """A spec the API must refuse with 400; the message says what is wrong."""


@dataclass(frozen=True)
class PortSpec:
    protocol: str
    target: int
    published: int  # 0: allocate
    mode: str  # ingress | host
    name: str = ""


@dataclass(frozen=True)
class Constraint:
    key: str
    equal: bool
    value: str


@dataclass(frozen=True)
class Resources:
    nano_cpus: int = 0
    memory_bytes: int = 0
    pids: int = 0  # limits only


@dataclass(frozen=True)
class MountSpec:
    type: str  # bind | volume | tmpfs
    source: str  # host path (bind), volume name ("" anonymous), "" (tmpfs); may hold templates
    target: str
    read_only: bool = False
    propagation: str = ""  # bind: rprivate unless given; "" otherwise
    no_copy: bool = False
    volume_labels: tuple[tuple[str, str], ...] = ()
    volume_driver: str = ""  # "" the engine's default (local)
    volume_options: tuple[tuple[str, str], ...] = ()
    tmpfs_size: int = 0  # bytes; 0 the kernel's default
    tmpfs_mode: int = 0  # permission bits; 0 the engine's default (1777)


MIN_HEALTH_DURATION = 1_000_000  # ns: Docker refuses shorter health check durations
HEALTH_INTERVAL = 30 * SECOND  # Docker's defaults
HEALTH_TIMEOUT = 30 * SECOND
HEALTH_RETRIES = 3


@dataclass(frozen=True)
class HealthCheck:
    """A health check as given (Healthcheck): `test` empty means the image's; durations in ns,
    0 meaning Docker's default (health.resolve applies them)."""

    test: tuple[str, ...] = ()
    interval: int = 0
    timeout: int = 0
    retries: int = 0
    start_period: int = 0


def health_view(raw: Any) -> HealthCheck | None:
    """A Healthcheck (the spec's or an image config's) typed; None if absent."""
    if not isinstance(raw, dict):
        return None
    return HealthCheck(
        test=tuple(raw.get("Test") or ()),
        interval=int(raw.get("Interval") or 0),
        timeout=int(raw.get("Timeout") or 0),
        retries=int(raw.get("Retries") or 0),
        start_period=int(raw.get("StartPeriod") or 0),
    )


@dataclass(frozen=True)
class ContainerView:
    """What a task runs, from its TaskTemplate. Hostname, Env values and mount sources may
    hold placeholders: `templates.expand` them for the task."""

    image: str
    command: tuple[str, ...] = ()  # the entrypoint, replacing the image's
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # KEY=VALUE or KEY
    hostname: str = ""
    dir: str = ""
    user: str = ""
    groups: tuple[str, ...] = ()
    # read-only; not hashed (a mapping proxy cannot be), compared
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    mounts: tuple[MountSpec, ...] = ()
    read_only: bool = False
    init: bool | None = None  # None: the engine's default
    tty: bool = False
    stop_signal: str = ""  # as given; "": the image's, else SIGTERM (see signal_number)
    stop_grace: int = DEFAULT_STOP_GRACE  # ns
    limits: Resources = Resources()
    reservations: Resources = Resources()
    healthcheck: HealthCheck | None = None  # None: the image's, if it has one


# Mode's keys, and the names the API's `mode` filter and the docker CLI give them
MODES: Mapping[str, str] = MappingProxyType(
    {
        "Replicated": "replicated",
        "Global": "global",
        "ReplicatedJob": "replicated-job",
        "GlobalJob": "global-job",
    }
)
JOB_MODES = ("replicated-job", "global-job")


@dataclass(frozen=True)
class ServiceView:
    name: str
    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[str, ...]
    mode: str  # replicated | global | replicated-job | global-job (MODES)
    replicas: int  # replicated services
    constraints: tuple[Constraint, ...]
    networks: tuple[str, ...]  # targets as given (names or ids), in order
    endpoint_mode: str  # vip | dnsrr
    ports: tuple[PortSpec, ...]
    restart_condition: str  # any | on-failure | none
    restart_delay: int  # ns
    restart_max_attempts: int
    restart_window: int  # ns
    stop_grace: int  # ns
    reservations: Resources = Resources()  # what each task needs of its node
    max_concurrent: int = 0  # replicated jobs: tasks running at once
    total_completions: int = 0  # replicated jobs: tasks to complete

    @property
    def job(self) -> bool:
        """Its tasks run to completion, and are not restarted once complete."""
        return self.mode in JOB_MODES


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _int(value: Any, where: str, lo: int = 0, hi: int = 2**63 - 1, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{where}: {value} is out of range ({lo}..{hi})")
    return value


def _str(value: Any, where: str, limit: int = MAX_STRING) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SpecError(f"{where}: expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise SpecError(f"{where}: {len(value)} characters, at most {limit} are allowed")
    return value


def _bool(value: Any, where: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise SpecError(f"{where}: expected true or false, got {value!r}")
    return value


def _strings(
    value: Any, where: str, limit: int = MAX_STRING, count: int = MAX_ENTRIES
) -> tuple[str, ...]:
    items = _list(value, where)
    if len(items) > count:
        raise SpecError(f"{where}: {len(items)} entries, at most {count} are allowed")
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise SpecError(f"{where}: expected a list of strings")
        if len(x) > limit:
            raise SpecError(f"{where}[{i}]: {len(x)} characters, at most {limit} are allowed")
    return tuple(items)


def _labels(value: Any, where: str) -> dict[str, str]:
    labels = _obj(value, where)
    if len(labels) > MAX_ENTRIES:
        raise SpecError(f"{where}: {len(labels)} labels, at most {MAX_ENTRIES} are allowed")
    for k, v in labels.items():
        if not isinstance(v, str):
            raise SpecError(f"{where}: values must be strings")
        if len(k) > MAX_STRING:
            raise SpecError(
                f"{where}: a key of {len(k)} characters, at most {MAX_STRING} are allowed"
            )
        if len(v) > MAX_VALUE:
            raise SpecError(
                f"{where}[{_short(k)!r}]: {len(v)} characters, at most {MAX_VALUE} are allowed"
            )
    return labels


def _short(text: str, limit: int = 60) -> str:
    """User input quoted back in a message, cut."""
    return text if len(text) <= limit else text[:limit] + "..."


def signal_number(text: str) -> int:
    """A StopSignal's number, as Docker reads it: SIGTERM, TERM, term or 15; raises SpecError."""
    if text.isascii() and text.isdigit():
        number = int(text) if len(text) <= 3 else 0
        if 1 <= number <= MAX_SIGNAL:
            return number
    else:
        number = SIGNALS.get(text.upper().removeprefix("SIG"), 0)
        if number:
            return number
    raise SpecError(
        f"invalid signal {_short(text)!r}: use a name like SIGTERM, TERM or SIGUSR1, "
        f"or a number from 1 to {MAX_SIGNAL}"
    )


def parse_constraint(text: str) -> Constraint:
    m = CONSTRAINT.match(text)
    if not m:
        raise SpecError(f"invalid constraint {text!r}: expected KEY==VALUE or KEY!=VALUE")
    key = m.group(1)
    if not any(
        key == k or (k.endswith(".") and key.startswith(k) and len(key) > len(k))
        for k in CONSTRAINT_KEYS
    ):
        raise SpecError(
            f"invalid constraint {text!r}: unknown key {key!r} (use node.id, "
            "node.hostname, node.role, node.labels.<label>, node.platform.os|arch)"
        )
    return Constraint(key, m.group(2) == "==", m.group(3))


def task_template_with_defaults(template: dict[str, Any]) -> dict[str, Any]:
    """A TaskTemplate with the values the managers use where a field is unset (what the API's
    `insertDefaults=true` shows)."""
    tt = copy.deepcopy(template)
    cs = tt.setdefault("ContainerSpec", {})
    cs.setdefault("StopGracePeriod", DEFAULT_STOP_GRACE)
    rp = tt.setdefault("RestartPolicy", {})
    rp.setdefault("Condition", "any")
    rp.setdefault("Delay", DEFAULT_RESTART_DELAY)
    rp.setdefault("MaxAttempts", 0)
    tt.setdefault("Runtime", "container")
    tt.setdefault("ForceUpdate", 0)
    return tt


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def same_task_template(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two TaskTemplates run the same: defaults written out or left unset, null or
    absent fields are all one (clients post back specs read with insertDefaults, as docker-py's
    scale does; that must not restart every task)."""
    return bool(
        _without_nulls(task_template_with_defaults(a))
        == _without_nulls(task_template_with_defaults(b))
    )


def _check_image(cs: dict[str, Any]) -> None:
    image = cs.get("Image")
    if not isinstance(image, str) or not image.strip():
        raise SpecError(f"{CONTAINER}.Image: an image is required")
    if len(image) > MAX_STRING:
        raise SpecError(
            f"{CONTAINER}.Image: {len(image)} characters, at most {MAX_STRING} are allowed"
        )
    try:
        reference.parse(image)
    except reference.ReferenceError as e:
        shown = _short(image, 300)
        raise SpecError(f"invalid reference format for image {shown!r}: {e.reason}") from None


def _template(text: str, where: str) -> str:
    """Check a field's placeholders; the field as a task would see it (an example task)."""
    from orchestrator.manager import templates  # noqa: PLC0415 - templates builds on this module

    templates.check(text, where)
    return templates.expand(text, templates.EXAMPLE)


def _check_env(cs: dict[str, Any]) -> None:
    for i, entry in enumerate(_strings(cs.get("Env"), f"{CONTAINER}.Env", MAX_VALUE)):
        where = f"{CONTAINER}.Env[{i}]"
        key, eq, value = entry.partition("=")
        if not key:
            raise SpecError(
                f"{where}: invalid environment variable {_short(entry)!r}: expected "
                "KEY=VALUE or KEY, with a name before the '='"
            )
        if "\0" in entry:
            raise SpecError(f"{where}: invalid environment variable: it contains a NUL character")
        if eq:
            _template(value, where)


def _check_container(cs: dict[str, Any]) -> None:
    """ContainerSpec, checked where it is given; stored as given (it round-trips)."""
    _check_image(cs)
    for key in ("Command", "Args"):
        for i, arg in enumerate(_strings(cs.get(key), f"{CONTAINER}.{key}", MAX_VALUE)):
            if "\0" in arg:
                raise SpecError(f"{CONTAINER}.{key}[{i}]: contains a NUL character")
    _check_env(cs)
    _template(_str(cs.get("Hostname"), f"{CONTAINER}.Hostname"), f"{CONTAINER}.Hostname")
    workdir = _str(cs.get("Dir"), f"{CONTAINER}.Dir")
    if workdir and not workdir.startswith("/"):
        raise SpecError(
            f"{CONTAINER}.Dir: the working directory {_short(workdir)!r} is invalid, "
            "it needs to be an absolute path"
        )
    _str(cs.get("User"), f"{CONTAINER}.User")
    _strings(cs.get("Groups"), f"{CONTAINER}.Groups")
    _labels(cs.get("Labels"), f"{CONTAINER}.Labels")
    for key in ("ReadOnly", "Init", "TTY", "OpenStdin"):
        _bool(cs.get(key), f"{CONTAINER}.{key}")
    stop_signal = _str(cs.get("StopSignal"), f"{CONTAINER}.StopSignal")
    if stop_signal:
        try:
            signal_number(stop_signal)
        except SpecError as e:
            raise SpecError(f"{CONTAINER}.StopSignal: {e}") from None
    _int(cs.get("StopGracePeriod"), f"{CONTAINER}.StopGracePeriod")
    _check_mounts(cs.get("Mounts"))
    _check_healthcheck(cs.get("Healthcheck"))


def _check_healthcheck(raw: Any) -> None:
    """Docker's HealthConfig: Test is [] (the image's), ["NONE"], ["CMD", arg...] or
    ["CMD-SHELL", command]; durations in ns, at least 1 ms when given (Docker's rule)."""
    if raw is None:
        return
    where = f"{CONTAINER}.Healthcheck"
    hc = _obj(raw, where)
    test = _strings(hc.get("Test"), f"{where}.Test", MAX_VALUE)
    if test and (
        test[0] not in ("NONE", "CMD", "CMD-SHELL")
        or (test[0] == "CMD" and len(test) < 2)
        or (test[0] == "CMD-SHELL" and len(test) != 2)
        or (test[0] == "NONE" and len(test) != 1)
    ):
        raise SpecError(
            f'{where}.Test: {list(test)!r} is not [], ["NONE"], ["CMD", arg...] or '
            '["CMD-SHELL", command]'
        )
    for key in ("Interval", "Timeout", "StartPeriod"):
        value = _int(hc.get(key), f"{where}.{key}")
        if 0 < value < MIN_HEALTH_DURATION:
            raise SpecError(f"{where}.{key}: {value} ns is less than the minimum of 1 ms")
    _int(hc.get("Retries"), f"{where}.Retries", 0, 2**31)


def _check_mounts(raw: Any) -> None:
    mounts = _list(raw, f"{CONTAINER}.Mounts")
    if len(mounts) > MAX_MOUNTS:
        raise SpecError(
            f"{CONTAINER}.Mounts: {len(mounts)} mounts, at most {MAX_MOUNTS} are allowed"
        )
    targets: set[str] = set()
    for i, m in enumerate(mounts):
        where = f"{CONTAINER}.Mounts[{i}]"
        mount = _obj(m, where)
        kind = _str(mount.get("Type"), f"{where}.Type") or "volume"
        if kind not in MOUNT_TYPES:
            raise SpecError(
                f"{where}.Type: invalid mount type {_short(kind)!r}: use bind, volume or tmpfs"
            )
        source = _str(mount.get("Source"), f"{where}.Source")
        target = _str(mount.get("Target"), f"{where}.Target")
        _bool(mount.get("ReadOnly"), f"{where}.ReadOnly")
        if not target:
            raise SpecError(
                f"{where}.Target: a target, an absolute path in the container, is needed"
            )
        if not target.startswith("/"):
            raise SpecError(
                f"{where}.Target: invalid mount target {_short(target)!r}, must be an absolute path"
            )
        clean = posixpath.normpath(target)
        if clean in targets:
            raise SpecError(f"{where}.Target: duplicate mount point: {_short(target)}")
        targets.add(clean)
        example = _template(source, f"{where}.Source")
        for key, owner in (
            ("BindOptions", "bind"),
            ("VolumeOptions", "volume"),
            ("TmpfsOptions", "tmpfs"),
        ):
            if mount.get(key) is not None and kind != owner:
                raise SpecError(f"{where}.{key}: must not be specified on mount type {kind!r}")
        if kind == "bind":
            if not source.startswith("/"):
                raise SpecError(
                    f"{where}.Source: invalid bind mount source {_short(source)!r}, must be "
                    "an absolute path on the node"
                )
            options = _obj(mount.get("BindOptions"), f"{where}.BindOptions")
            propagation = _str(options.get("Propagation"), f"{where}.BindOptions.Propagation")
            if propagation and propagation not in PROPAGATIONS:
                raise SpecError(
                    f"{where}.BindOptions.Propagation: invalid propagation mode "
                    f"{_short(propagation)!r}: use {', '.join(PROPAGATIONS)}"
                )
        elif kind == "volume":
            if source and not VOLUME_NAME.fullmatch(example):
                raise SpecError(
                    f"{where}.Source: {_short(source)!r} includes invalid characters for a "
                    "local volume name, only [a-zA-Z0-9][a-zA-Z0-9_.-]+ are allowed; for a "
                    "host directory, use a bind mount with an absolute path"
                )
            options = _obj(mount.get("VolumeOptions"), f"{where}.VolumeOptions")
            _bool(options.get("NoCopy"), f"{where}.VolumeOptions.NoCopy")
            _labels(options.get("Labels"), f"{where}.VolumeOptions.Labels")
            driver = _obj(options.get("DriverConfig"), f"{where}.VolumeOptions.DriverConfig")
            _str(driver.get("Name"), f"{where}.VolumeOptions.DriverConfig.Name")
            _labels(driver.get("Options"), f"{where}.VolumeOptions.DriverConfig.Options")
        else:
            if source:
                raise SpecError(f"{where}.Source: invalid tmpfs source, source must be empty")
            options = _obj(mount.get("TmpfsOptions"), f"{where}.TmpfsOptions")
            _int(options.get("SizeBytes"), f"{where}.TmpfsOptions.SizeBytes")
            _int(options.get("Mode"), f"{where}.TmpfsOptions.Mode", 0, 0o7777)


def _resources(raw: Any, where: str, keys: tuple[str, ...]) -> Resources:
    res = _obj(raw, where)
    values = {k: _int(res.get(k), f"{where}.{k}") for k in keys}
    cpus = values.get("NanoCPUs", 0)
    if 0 < cpus < MIN_NANO_CPUS:
        raise SpecError(
            f"{where}.NanoCPUs: invalid cpu value {cpus / 1e9:g}: "
            f"Must be at least {MIN_NANO_CPUS / 1e9:g}"
        )
    return Resources(cpus, values.get("MemoryBytes", 0), values.get("Pids", 0))


def _check_resources(tt: dict[str, Any]) -> None:
    res = _obj(tt.get("Resources"), "TaskTemplate.Resources")
    where = "TaskTemplate.Resources"
    limits = _resources(res.get("Limits"), f"{where}.Limits", ("NanoCPUs", "MemoryBytes", "Pids"))
    wanted = _resources(
        res.get("Reservations"), f"{where}.Reservations", ("NanoCPUs", "MemoryBytes")
    )
    if 0 < limits.memory_bytes < MIN_MEMORY_LIMIT:
        raise SpecError(
            f"{where}.Limits.MemoryBytes: Minimum memory limit allowed is 6MB "
            f"({limits.memory_bytes} bytes asked)"
        )
    for key, limit, reserved in (
        ("NanoCPUs", limits.nano_cpus, wanted.nano_cpus),
        ("MemoryBytes", limits.memory_bytes, wanted.memory_bytes),
    ):
        if limit and reserved > limit:
            raise SpecError(
                f"{where}.Reservations.{key}: the reservation ({reserved}) is larger than "
                f"the limit ({limit}); reserve at most what the task may use"
            )


UPDATE_ORDERS = ("stop-first", "start-first")
DEFAULT_MONITOR = 5 * SECOND


@dataclass(frozen=True)
class UpdatePolicy:
    """How a rolling update (UpdateConfig) or a rollback (RollbackConfig) proceeds, with
    swarmkit's defaults for what the spec leaves out."""

    parallelism: int = 1  # 0: every slot at once
    delay: int = 0  # ns a worker waits after its slot
    failure_action: str = "pause"  # pause | continue | rollback (updates only)
    monitor: int = DEFAULT_MONITOR  # ns a new task is watched for failure
    max_failure_ratio: float = 0.0
    order: str = "stop-first"  # | start-first


def _check_update_config(raw: Any, where: str) -> None:
    cfg = _obj(raw, where)
    _int(cfg.get("Parallelism"), f"{where}.Parallelism", 0, 2**31)
    _int(cfg.get("Delay"), f"{where}.Delay")
    _int(cfg.get("Monitor"), f"{where}.Monitor")
    actions = (
        ("pause", "continue", "rollback") if where == "UpdateConfig" else ("pause", "continue")
    )
    action = cfg.get("FailureAction")
    if action not in (None, "", *actions):
        raise SpecError(f"{where}.FailureAction: {action!r} is not one of {', '.join(actions)}")
    ratio = cfg.get("MaxFailureRatio")
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1
    ):
        raise SpecError(f"{where}.MaxFailureRatio: {ratio!r} is not a number from 0 to 1")
    order = cfg.get("Order")
    if order not in (None, "", *UPDATE_ORDERS):
        raise SpecError(f"{where}.Order: {order!r} is not stop-first or start-first")


def _policy(raw: Any) -> UpdatePolicy:
    """swarmkit's defaults when the config is absent; within a config given, Docker's zero
    values (Parallelism 0: all at once; Monitor 0: the default period)."""
    if not isinstance(raw, dict):
        return UpdatePolicy()
    cfg = raw
    return UpdatePolicy(
        parallelism=int(cfg.get("Parallelism") or 0),
        delay=int(cfg.get("Delay") or 0),
        failure_action=str(cfg.get("FailureAction") or "pause"),
        monitor=int(cfg.get("Monitor") or DEFAULT_MONITOR),
        max_failure_ratio=float(cfg.get("MaxFailureRatio") or 0.0),
        order=str(cfg.get("Order") or "stop-first"),
    )


def update_policy(spec: dict[str, Any]) -> UpdatePolicy:
    return _policy(spec.get("UpdateConfig"))


def rollback_policy(spec: dict[str, Any]) -> UpdatePolicy:
    return _policy(spec.get("RollbackConfig"))


def normalize_service_spec(raw: Any) -> dict[str, Any]:
    """Apply Docker's defaults to a ServiceSpec and check it; raises SpecError."""
    spec: dict[str, Any] = copy.deepcopy(_obj(raw, "Spec"))
    name = spec.get("Name")
    if not isinstance(name, str) or not name:
        raise SpecError("a service needs a name (--name)")
    if len(name) > 63 or not NAME.match(name):
        raise SpecError(
            f"invalid name {name!r}: only [a-zA-Z0-9-_] allowed, starting and "
            "ending with a letter or digit, at most 63 characters"
        )
    spec["Labels"] = _labels(spec.get("Labels"), "Labels")
    tt = spec["TaskTemplate"] = _obj(spec.get("TaskTemplate"), "TaskTemplate")
    cs = tt["ContainerSpec"] = _obj(tt.get("ContainerSpec"), CONTAINER)
    _refuse_unsupported(spec)
    _check_container(cs)
    _check_resources(tt)
    # `service update --force`'s counter: an integer Docker always shows, 0 until forced
    tt["ForceUpdate"] = _int(tt.get("ForceUpdate"), "TaskTemplate.ForceUpdate", 0, 2**64 - 1)
    spec["Mode"] = _mode(_obj(spec.get("Mode"), "Mode"))
    if spec.get("UpdateConfig") is not None and mode_of(spec) in JOB_MODES:
        raise SpecError(
            "Jobs may not have an update config: remove UpdateConfig (--update-*); a job "
            "runs again, all of it, on every update"
        )
    placement = _obj(tt.get("Placement"), "TaskTemplate.Placement")
    for c in _strings(placement.get("Constraints"), "TaskTemplate.Placement.Constraints"):
        parse_constraint(c)
    restart = _obj(tt.get("RestartPolicy"), "TaskTemplate.RestartPolicy")
    condition = restart.get("Condition", "any")
    if condition not in ("any", "on-failure", "none"):
        raise SpecError(
            f"TaskTemplate.RestartPolicy.Condition: {condition!r} is not one of "
            "any, on-failure, none"
        )
    for key in ("Delay", "MaxAttempts", "Window"):
        _int(restart.get(key), f"TaskTemplate.RestartPolicy.{key}")
    for key in ("UpdateConfig", "RollbackConfig"):
        if spec.get(key) is not None:
            _check_update_config(spec[key], key)
    nets = _list(tt.get("Networks") or spec.get("Networks"), "TaskTemplate.Networks")
    for i, n in enumerate(nets):
        target = _obj(n, f"TaskTemplate.Networks[{i}]").get("Target")
        if not isinstance(target, str) or not target:
            raise SpecError(f"TaskTemplate.Networks[{i}].Target: a network name or id is needed")
    if "Networks" in spec:  # the deprecated place: move it where tasks read it
        tt["Networks"] = nets
        del spec["Networks"]
    ep = spec["EndpointSpec"] = _obj(spec.get("EndpointSpec"), "EndpointSpec")
    ep_mode = ep.setdefault("Mode", "vip") or "vip"
    if ep_mode not in ("vip", "dnsrr"):
        raise SpecError(f"EndpointSpec.Mode: {ep_mode!r} is not vip or dnsrr")
    ep["Mode"] = ep_mode
    ports = []
    seen: set[tuple[str, int]] = set()
    for i, raw_port in enumerate(_list(ep.get("Ports"), "EndpointSpec.Ports")):
        where = f"EndpointSpec.Ports[{i}]"
        p = _obj(raw_port, where)
        proto = p.get("Protocol") or "tcp"
        if proto not in ("tcp", "udp"):
            raise SpecError(f"{where}.Protocol: {proto!r} is not tcp or udp")
        target = _int(p.get("TargetPort"), f"{where}.TargetPort", 1, 65535, default=0)
        if target == 0:
            raise SpecError(f"{where}.TargetPort: a target port (1-65535) is required")
        published = _int(p.get("PublishedPort"), f"{where}.PublishedPort", 0, 65535)
        pmode = p.get("PublishMode") or "ingress"
        if pmode not in ("ingress", "host"):
            raise SpecError(f"{where}.PublishMode: {pmode!r} is not ingress or host")
        if pmode == "ingress" and ep_mode == "dnsrr":
            raise SpecError("port published with ingress mode can't be used with dnsrr mode")
        if pmode == "host" and not published:
            # Docker's engine would pick a free port of the node; Shoal's nodes do not
            raise SpecError(
                f"{where}: host-mode port {target}/{proto} has no published port; give it "
                f"one (--publish mode=host,published=PORT,target={target})"
            )
        if published and (proto, published) in seen:
            raise SpecError(f"duplicate published port {published}/{proto}")
        seen.add((proto, published))
        ports.append(
            {
                "Protocol": proto,
                "TargetPort": target,
                "PublishedPort": published,
                "PublishMode": pmode,
                **({"Name": p["Name"]} if p.get("Name") else {}),
            }
        )
    if ports:
        ep["Ports"] = ports
    elif "Ports" in ep:
        del ep["Ports"]
    return spec


def _mode(mode: dict[str, Any]) -> dict[str, Any]:
    """Mode, one of four, with Docker's defaults."""
    given = [k for k in MODES if k in mode]
    if len(given) > 1:
        raise SpecError(
            f"Mode: {' and '.join(given)} given; a service has one mode: replicated, global, "
            "replicated-job or global-job"
        )
    if "Global" in mode:
        return {"Global": {}}
    if "GlobalJob" in mode:
        return {"GlobalJob": {}}
    if "ReplicatedJob" in mode:
        job = _obj(mode["ReplicatedJob"], "Mode.ReplicatedJob")
        # moby's defaults: one at a time, as many completions as may run at once
        concurrent = _int(job.get("MaxConcurrent"), "Mode.ReplicatedJob.MaxConcurrent", default=1)
        total = _int(
            job.get("TotalCompletions"), "Mode.ReplicatedJob.TotalCompletions", default=concurrent
        )
        return {"ReplicatedJob": {"MaxConcurrent": concurrent, "TotalCompletions": total}}
    rep = _obj(mode.get("Replicated"), "Mode.Replicated")
    replicas = rep.get("Replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise SpecError(f"Mode.Replicated.Replicas: expected an integer, got {replicas!r}")
    if replicas < 0:
        raise SpecError(f"invalid replicas value {replicas}: must be 0 or more")
    return {"Replicated": {"Replicas": replicas}}


def mode_of(spec: dict[str, Any]) -> str:
    """A normalised spec's mode, as MODES names it."""
    mode = spec.get("Mode") or {}
    return next((name for key, name in MODES.items() if key in mode), "replicated")


def view(spec: dict[str, Any]) -> ServiceView:
    """The typed view of a normalised spec."""
    tt = spec.get("TaskTemplate", {})
    cs = tt.get("ContainerSpec", {})
    mode = spec.get("Mode", {})
    restart = tt.get("RestartPolicy", {})
    ep = spec.get("EndpointSpec", {})
    return ServiceView(
        name=spec["Name"],
        image=cs.get("Image", ""),
        command=tuple(cs.get("Command") or ()),
        args=tuple(cs.get("Args") or ()),
        env=tuple(cs.get("Env") or ()),
        mode=mode_of(spec),
        replicas=mode.get("Replicated", {}).get("Replicas", 1),
        constraints=tuple(
            parse_constraint(c) for c in tt.get("Placement", {}).get("Constraints") or ()
        ),
        networks=tuple(n["Target"] for n in tt.get("Networks") or ()),
        endpoint_mode=ep.get("Mode", "vip"),
        ports=tuple(
            PortSpec(
                p["Protocol"],
                p["TargetPort"],
                p.get("PublishedPort", 0),
                p.get("PublishMode", "ingress"),
                p.get("Name", ""),
            )
            for p in ep.get("Ports") or ()
        ),
        restart_condition=restart.get("Condition", "any"),
        restart_delay=restart.get("Delay", DEFAULT_RESTART_DELAY),
        restart_max_attempts=restart.get("MaxAttempts", 0),
        restart_window=restart.get("Window", 0),
        stop_grace=_stop_grace(cs),
        reservations=reservations_of(tt),
        max_concurrent=mode.get("ReplicatedJob", {}).get("MaxConcurrent", 0),
        total_completions=mode.get("ReplicatedJob", {}).get("TotalCompletions", 0),
    )


def _stop_grace(cs: dict[str, Any]) -> int:
    grace = cs.get("StopGracePeriod")
    return DEFAULT_STOP_GRACE if grace is None else int(grace)


def _resources_view(raw: Any) -> Resources:
    res = raw or {}
    return Resources(
        int(res.get("NanoCPUs") or 0), int(res.get("MemoryBytes") or 0), int(res.get("Pids") or 0)
    )


def reservations_of(task_template: dict[str, Any]) -> Resources:
    """What a task of this TaskTemplate reserves of its node (the scheduler's sums)."""
    return _resources_view((task_template.get("Resources") or {}).get("Reservations"))


def _pairs(raw: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((raw or {}).items()))


def _mount_view(m: dict[str, Any]) -> MountSpec:
    kind = m.get("Type") or "volume"
    volume = m.get("VolumeOptions") or {}
    driver = volume.get("DriverConfig") or {}
    tmpfs = m.get("TmpfsOptions") or {}
    propagation = (m.get("BindOptions") or {}).get("Propagation") or ""
    return MountSpec(
        type=kind,
        source=m.get("Source") or "",
        target=m.get("Target") or "",
        read_only=bool(m.get("ReadOnly")),
        propagation=propagation or ("rprivate" if kind == "bind" else ""),
        no_copy=bool(volume.get("NoCopy")),
        volume_labels=_pairs(volume.get("Labels")),
        volume_driver=driver.get("Name") or "",
        volume_options=_pairs(driver.get("Options")),
        tmpfs_size=int(tmpfs.get("SizeBytes") or 0),
        tmpfs_mode=int(tmpfs.get("Mode") or 0),
    )


def container_view(task_template: dict[str, Any]) -> ContainerView:
    """The typed view of what a task runs, from its TaskTemplate (validated when stored)."""
    cs = task_template.get("ContainerSpec") or {}
    res = task_template.get("Resources") or {}
    init = cs.get("Init")
    return ContainerView(
        image=cs.get("Image") or "",
        command=tuple(cs.get("Command") or ()),
        args=tuple(cs.get("Args") or ()),
        env=tuple(cs.get("Env") or ()),
        hostname=cs.get("Hostname") or "",
        dir=cs.get("Dir") or "",
        user=cs.get("User") or "",
        groups=tuple(cs.get("Groups") or ()),
        labels=MappingProxyType(dict(cs.get("Labels") or {})),
        mounts=tuple(_mount_view(m) for m in cs.get("Mounts") or ()),
        read_only=bool(cs.get("ReadOnly")),
        init=None if init is None else bool(init),
        tty=bool(cs.get("TTY")),
        stop_signal=cs.get("StopSignal") or "",
        stop_grace=_stop_grace(cs),
        limits=_resources_view(res.get("Limits")),
        reservations=_resources_view(res.get("Reservations")),
        healthcheck=health_view(cs.get("Healthcheck")),
    )


def with_replicas(spec: dict[str, Any], replicas: int) -> dict[str, Any]:
    out: dict[str, Any] = copy.deepcopy(spec)
    out["Mode"] = {"Replicated": {"Replicas": replicas}}
    return out


def normalize_network_spec(spec: Any) -> tuple[dict[str, Any], ipaddress.IPv4Network | None]:
    """A NetworkCreateRequest -> (stored spec, requested subnet); raises SpecError."""
    spec = dict(copy.deepcopy(_obj(spec, "network")))
    name = spec.get("Name")
    if not isinstance(name, str) or not name or len(name) > 63 or not NAME.match(name):
        raise SpecError(
            f"invalid network name {name!r}: only [a-zA-Z0-9-_] allowed, starting "
            "and ending with a letter or digit"
        )
    driver = spec.get("Driver") or "overlay"
    if driver != "overlay":
        raise SpecError(f"driver {driver!r} is not supported in swarm scope; use -d overlay")
    options = _obj(spec.get("Options"), "Options")
    if not all(isinstance(v, str) for v in options.values()):
        raise SpecError("Options: values must be strings")
    subnet = None
    ipam = _obj(spec.get("IPAM"), "IPAM")
    configs = _list(ipam.get("Config"), "IPAM.Config")
    if len(configs) > 1:
        raise SpecError("IPAM.Config: one subnet per network")
    if configs:
        raw = _obj(configs[0], "IPAM.Config[0]").get("Subnet")
        try:
            subnet = ipaddress.IPv4Network(raw, strict=True)
        except (ValueError, TypeError):
            raise SpecError(
                f"invalid subnet {raw!r}: expected an IPv4 network like 10.0.9.0/24"
            ) from None
        if subnet.prefixlen > 29:
            raise SpecError(f"subnet {subnet} is too small; use /29 or larger")
    stored = {
        "Name": name,
        "Labels": _obj(spec.get("Labels"), "Labels"),
        "DriverConfiguration": {"Name": "overlay", "Options": options},
        "Ingress": bool(spec.get("Ingress", False)),
        "Attachable": bool(spec.get("Attachable", False)),
        "Internal": bool(spec.get("Internal", False)),
        "Scope": "swarm",
    }
    if subnet is not None:
        stored["IPAMOptions"] = {
            "Driver": {"Name": "default"},
            "Configs": [{"Subnet": str(subnet)}],
        }
    return stored, subnet


def default_cluster_spec(requested: dict[str, Any]) -> dict[str, Any]:
    """Docker's defaults for zero values in a swarm spec."""
    spec = copy.deepcopy(requested or {})
    spec["Name"] = spec.get("Name") or "default"
    spec["Labels"] = spec.get("Labels") or {}
    orch = spec.setdefault("Orchestration", {}) or {}
    orch["TaskHistoryRetentionLimit"] = orch.get("TaskHistoryRetentionLimit") or 5
    spec["Orchestration"] = orch
    raft = spec.setdefault("Raft", {}) or {}
    raft["SnapshotInterval"] = raft.get("SnapshotInterval") or 10000
    raft["KeepOldSnapshots"] = raft.get("KeepOldSnapshots") or 0
    raft["LogEntriesForSlowFollowers"] = raft.get("LogEntriesForSlowFollowers") or 500
    raft["ElectionTick"] = raft.get("ElectionTick") or 10
    raft["HeartbeatTick"] = raft.get("HeartbeatTick") or 1
    spec["Raft"] = raft
    disp = spec.setdefault("Dispatcher", {}) or {}
    disp["HeartbeatPeriod"] = disp.get("HeartbeatPeriod") or 5 * SECOND
    spec["Dispatcher"] = disp
    ca = spec.setdefault("CAConfig", {}) or {}
    ca["NodeCertExpiry"] = ca.get("NodeCertExpiry") or 90 * 24 * 3600 * SECOND
    spec["CAConfig"] = ca
    spec.setdefault("TaskDefaults", {})
    spec["EncryptionConfig"] = spec.get("EncryptionConfig") or {"AutoLockManagers": False}
    return spec


MAX_SUBNET_SIZE = 29  # Docker's: the smallest overlay subnet, 8 addresses
DATA_PATH_PORTS = (1024, 49151)  # Docker's: the registered ports
MAX_ADDR_POOLS = 64  # what one init may ask a manager to store


@dataclass(frozen=True)
class NetworkDefaults:
    """Where a swarm's overlay networks get their subnets and which port their VXLAN uses:
    `swarm init`'s DefaultAddrPool, SubnetSize and DataPathPort, checked."""

    addr_pool: tuple[str, ...] = DEFAULT_ADDR_POOL
    subnet_size: int = DEFAULT_SUBNET_SIZE
    data_path_port: int = DEFAULT_DATA_PATH_PORT


def network_defaults(pools: Any, size: Any, port: Any) -> NetworkDefaults:
    """`swarm init`'s network settings, as Docker checks them (unset or 0: its defaults);
    raises SpecError. A data path port other than 4789 is refused: the mesh's VXLAN port is
    fixed (mesh/naming.py)."""
    given = _list(pools, "DefaultAddrPool")
    if len(given) > MAX_ADDR_POOLS:
        raise SpecError(f"DefaultAddrPool: {len(given)} pools, at most {MAX_ADDR_POOLS}")
    networks = []
    for raw in given:
        try:
            if not isinstance(raw, str) or "/" not in raw:
                raise ValueError("not in CIDR notation")
            networks.append(ipaddress.IPv4Network(raw.strip(), strict=False))
        except ValueError:
            raise SpecError(
                f"invalid DefaultAddrPool {_short(str(raw))!r}: expected IPv4 networks in CIDR "
                "notation, like 10.0.0.0/8 (--default-addr-pool)"
            ) from None
        if networks[-1].prefixlen > MAX_SUBNET_SIZE:
            raise SpecError(
                f"DefaultAddrPool {networks[-1]} is too small to carve subnets from: use "
                f"/{MAX_SUBNET_SIZE} or larger"
            )
    subnet_size = _int(size, "SubnetSize", 0, 32) or DEFAULT_SUBNET_SIZE
    pool = [str(n) for n in networks] or list(DEFAULT_ADDR_POOL)
    # every pool must hold a subnet of that size
    smallest = max(ipaddress.IPv4Network(n).prefixlen for n in pool)
    if not smallest <= subnet_size <= MAX_SUBNET_SIZE:
        raise SpecError(
            f"SubnetSize {subnet_size} is out of range for the pool {', '.join(pool)}: use "
            f"{smallest} to {MAX_SUBNET_SIZE} (--default-addr-pool-mask-length)"
        )
    data_path_port = _int(port, "DataPathPort", 0, 65535) or DEFAULT_DATA_PATH_PORT
    if not DATA_PATH_PORTS[0] <= data_path_port <= DATA_PATH_PORTS[1]:
        raise SpecError(
            f"DataPathPort {data_path_port} is not in the valid range "
            f"({DATA_PATH_PORTS[0]}-{DATA_PATH_PORTS[1]}) (--data-path-port)"
        )
    if data_path_port != DEFAULT_DATA_PATH_PORT:
        raise SpecError(
            f"DataPathPort {data_path_port}: a data path port other than "
            f"{DEFAULT_DATA_PATH_PORT} is not supported yet (the overlays' VXLAN port is "
            "fixed); leave --data-path-port (data_path_port) unset"
        )
    return NetworkDefaults(tuple(pool), subnet_size, data_path_port)
