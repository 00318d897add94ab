"""Service and network specs: Docker's JSON shape in, validated and normalised; typed views out.

The API stores the normalised spec and hands it back exactly (the docker CLI posts back the
Spec it read); managers read it through `ServiceView`, never by poking at dicts.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

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
class ServiceView:
    name: str
    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[str, ...]
    mode: str  # replicated | global
    replicas: int
    constraints: tuple[Constraint, ...]
    networks: tuple[str, ...]  # targets as given (names or ids), in order
    endpoint_mode: str  # vip | dnsrr
    ports: tuple[PortSpec, ...]
    restart_condition: str  # any | on-failure | none
    restart_delay: int  # ns
    restart_max_attempts: int
    restart_window: int  # ns
    stop_grace: int  # ns
    update_parallelism: int
    update_delay: int  # ns


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


def _strings(value: Any, where: str) -> tuple[str, ...]:
    items = _list(value, where)
    if not all(isinstance(x, str) for x in items):
        raise SpecError(f"{where}: expected a list of strings")
    return tuple(items)


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
    labels = _obj(spec.get("Labels"), "Labels")
    if not all(isinstance(v, str) for v in labels.values()):
        raise SpecError("Labels: values must be strings")
    spec["Labels"] = labels
    tt = spec["TaskTemplate"] = _obj(spec.get("TaskTemplate"), "TaskTemplate")
    cs = tt["ContainerSpec"] = _obj(tt.get("ContainerSpec"), "TaskTemplate.ContainerSpec")
    image = cs.get("Image")
    if not isinstance(image, str) or not image.strip():
        raise SpecError("TaskTemplate.ContainerSpec.Image: an image is required")
    for key in ("Command", "Args", "Env"):
        if key in cs and cs[key] is not None:
            _strings(cs[key], f"TaskTemplate.ContainerSpec.{key}")
    mode = _obj(spec.get("Mode"), "Mode")
    if "Global" in mode and "Replicated" in mode:
        raise SpecError("Mode: choose replicated or global, not both")
    if "Global" in mode:
        spec["Mode"] = {"Global": {}}
    else:
        rep = _obj(mode.get("Replicated"), "Mode.Replicated")
        replicas = rep.get("Replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise SpecError(f"Mode.Replicated.Replicas: expected an integer, got {replicas!r}")
        if replicas < 0:
            raise SpecError(f"invalid replicas value {replicas}: must be 0 or more")
        spec["Mode"] = {"Replicated": {"Replicas": replicas}}
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


def view(spec: dict[str, Any]) -> ServiceView:
    """The typed view of a normalised spec."""
    tt = spec.get("TaskTemplate", {})
    cs = tt.get("ContainerSpec", {})
    mode = spec.get("Mode", {})
    restart = tt.get("RestartPolicy", {})
    update = spec.get("UpdateConfig") or {}
    ep = spec.get("EndpointSpec", {})
    return ServiceView(
        name=spec["Name"],
        image=cs.get("Image", ""),
        command=tuple(cs.get("Command") or ()),
        args=tuple(cs.get("Args") or ()),
        env=tuple(cs.get("Env") or ()),
        mode="global" if "Global" in mode else "replicated",
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
        stop_grace=cs.get("StopGracePeriod", DEFAULT_STOP_GRACE),
        update_parallelism=update.get("Parallelism", 1),
        update_delay=update.get("Delay", 0),
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
