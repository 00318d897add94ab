"""The Docker Engine API's conventions: errors, versions, filters, booleans, key case.

../shared/reference/engine-api.md has the facts these follow (what docker CLI 28 and docker-py 7
send and read).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

API_VERSION = "1.44"
MIN_API_VERSION = "1.24"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> web.Response:
    # Exactly application/json: the docker CLI compares the header as a string.
    return web.Response(
        status=status,
        body=json.dumps({"message": message}).encode(),
        headers={"Content-Type": "application/json"},
    )


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(value).encode(), headers={"Content-Type": "application/json"}
    )


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def check_version(version: str | None) -> None:
    if version is None:
        return
    try:
        v = version_tuple(version)
    except ValueError:
        raise ApiError(400, f"invalid API version {version!r}") from None
    if v > version_tuple(API_VERSION):
        raise ApiError(
            400,
            f"client version {version} is too new. Maximum supported API version is {API_VERSION}",
        )
    if v < version_tuple(MIN_API_VERSION):
        raise ApiError(
            400,
            f"client version {version} is too old. Minimum supported API "
            f"version is {MIN_API_VERSION}, please upgrade your client to a "
            "newer version",
        )


def bool_value(text: str | None) -> bool:
    """moby httputils.BoolValue: anything but "", 0, no, false, none is true."""
    return (text or "").strip().lower() not in ("", "0", "no", "false", "none")


def filters(request: web.Request, allowed: set[str]) -> dict[str, list[str]]:
    """The `filters` parameter in either encoding: {"k": ["v"]} or {"k": {"v": true}}."""
    raw = request.query.get("filters")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ApiError(400, f"invalid filters: {raw!r} is not JSON") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "invalid filters: expected a JSON object")
    out: dict[str, list[str]] = {}
    for key, value in doc.items():
        if key not in allowed:
            raise ApiError(400, f"Invalid filter '{key}'")
        if isinstance(value, dict):
            out[key] = [k for k, on in value.items() if on]
        elif isinstance(value, list):
            out[key] = [str(v) for v in value]
        else:
            out[key] = [str(value)]
    return out


# Canonical spelling of every key the API reads from a request body. Go's encoding/json
# matches keys case-insensitively, and docker-py sends `"Mode": {"replicated": ...}`.
_KEYS = [
    "Name",
    "Labels",
    "TaskTemplate",
    "Mode",
    "UpdateConfig",
    "RollbackConfig",
    "Networks",
    "EndpointSpec",
    "ContainerSpec",
    "NetworkAttachmentSpec",
    "Resources",
    "RestartPolicy",
    "Placement",
    "ForceUpdate",
    "Runtime",
    "LogDriver",
    "PluginSpec",
    "Image",
    "Command",
    "Args",
    "Hostname",
    "Env",
    "Dir",
    "User",
    "Groups",
    "Privileges",
    "TTY",
    "OpenStdin",
    "ReadOnly",
    "Mounts",
    "StopSignal",
    "StopGracePeriod",
    "Healthcheck",  # sic: moby's ContainerSpec spells it so
    "Hosts",
    "DNSConfig",
    "Secrets",
    "Configs",
    "Isolation",
    "Init",
    "Sysctls",
    "CapabilityAdd",
    "CapabilityDrop",
    "Ulimits",
    # ContainerSpec.Mounts (moby api/types/mount)
    "Type",
    "Source",
    "Consistency",
    "BindOptions",
    "Propagation",
    "NonRecursive",
    "CreateMountpoint",
    "ReadOnlyNonRecursive",
    "ReadOnlyForceRecursive",
    "VolumeOptions",
    "NoCopy",
    "DriverConfig",
    "TmpfsOptions",
    "SizeBytes",
    # ContainerSpec.Privileges, Healthcheck, Ulimits, Secrets and Configs
    "CredentialSpec",
    "File",
    "Registry",
    "SELinuxContext",
    "Disable",
    "Level",
    "Seccomp",
    "Profile",
    "AppArmor",
    "NoNewPrivileges",
    "Test",
    "Interval",
    "Timeout",
    "StartPeriod",
    "StartInterval",
    "Retries",
    "Soft",
    "Hard",
    "SecretID",
    "SecretName",
    "ConfigID",
    "ConfigName",
    "UID",
    "GID",
    # TaskTemplate.Resources
    "Limits",
    "Reservations",
    "NanoCPUs",
    "MemoryBytes",
    "Pids",
    "GenericResources",
    "NamedResourceSpec",
    "DiscreteResourceSpec",
    "Kind",
    "Value",
    "ContainerID",  # NetworkAttachmentSpec
    "Condition",
    "Delay",
    "MaxAttempts",
    "Window",
    "Constraints",
    "Preferences",
    "MaxReplicas",
    "Platforms",
    "Spread",
    "SpreadDescriptor",
    "Architecture",
    "OS",
    "Replicated",
    "Global",
    "ReplicatedJob",
    "GlobalJob",
    "Replicas",
    "MaxConcurrent",
    "TotalCompletions",
    "Parallelism",
    "FailureAction",
    "Monitor",
    "MaxFailureRatio",
    "Order",
    "Target",
    "Aliases",
    "DriverOpts",
    "Ports",
    "Protocol",
    "TargetPort",
    "PublishedPort",
    "PublishMode",
    "ListenAddr",
    "AdvertiseAddr",
    "DataPathAddr",
    "DataPathPort",
    "DefaultAddrPool",
    "ForceNewCluster",
    "SubnetSize",
    "Spec",
    "AutoLockManagers",
    "Availability",
    "Orchestration",
    "TaskHistoryRetentionLimit",
    "Raft",
    "SnapshotInterval",
    "KeepOldSnapshots",
    "LogEntriesForSlowFollowers",
    "ElectionTick",
    "HeartbeatTick",
    "Dispatcher",
    "HeartbeatPeriod",
    "CAConfig",
    "NodeCertExpiry",
    "ExternalCAs",
    "SigningCACert",
    "SigningCAKey",
    "ForceRotate",
    "EncryptionConfig",
    "TaskDefaults",
    "RemoteAddrs",
    "JoinToken",
    "CheckDuplicate",
    "Driver",
    "Scope",
    "Internal",
    "Attachable",
    "Ingress",
    "IPAM",
    "Config",
    "Subnet",
    "IPRange",
    "Gateway",
    "AuxiliaryAddresses",
    "Options",
    "EnableIPv6",
    "ConfigOnly",
    "ConfigFrom",
    "Role",
    "Nameservers",
    "Search",
]
CANONICAL = {k.lower(): k for k in _KEYS}
FREE_FORM = {"Labels", "Options", "DriverOpts", "Sysctls", "AuxiliaryAddresses"}


def canonical(value: Any, free: bool = False) -> Any:
    """Keys spelled as Docker spells them, except inside user maps (labels, options)."""
    if isinstance(value, dict):
        if free:
            return dict(value)
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = CANONICAL.get(str(k).lower(), str(k))
            out[key] = canonical(v, key in FREE_FORM)
        return out
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


async def body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return canonical(json.loads(raw))
    except ValueError as e:
        raise ApiError(400, f"invalid JSON in the request body: {e}") from None
