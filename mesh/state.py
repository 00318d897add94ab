"""The mesh contract: a node's desired data-plane state, as plain data, and what shoal-mesh
reports back.

The orchestrator produces the state (`MeshState`, written with `state_to_dict`; tests and users
may write it by hand, in JSON or YAML); shoal-mesh makes the kernel match it and reports each
sync in `<run-dir>/applied` (`Applied`). It knows nothing of orchestrator types. The formats are
documented in docs/mesh-state.md; `version` changes when a field changes meaning.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

FORMAT_VERSION = 1
VXLAN_OVERHEAD = 50
# ESP in transport mode with AES-GCM and a 16-byte ICV: SPI 4, sequence 4, IV 8, padding
# length 1, next header 1, ICV 16 (padding to 4 bytes is covered by rounding the MTU down).
ESP_OVERHEAD = 34
MAX_VNI = (1 << 24) - 1
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class StateError(ValueError):
    """The desired state is malformed; the message names the field and says what is wrong."""


@dataclass(frozen=True)
class Network:
    name: str
    vni: int
    subnet: ipaddress.IPv4Network
    gateways: Mapping[str, ipaddress.IPv4Address]  # node -> that node's address on the network
    ingress: bool = False
    encrypted: bool = False
    mtu: int | None = None  # None: underlay MTU - 50 (and the ESP overhead if encrypted)


@dataclass(frozen=True)
class Endpoint:
    """A task's attachment to a network, anywhere in the cluster."""

    task: str
    network: str
    node: str
    ip: ipaddress.IPv4Address
    mac: str
    netns: str | None = None  # local endpoints: the task's network namespace (name or path)
    ifname: str | None = None  # inside the task; default eth0, eth1, ... in listed order


PUBLISH_MODES = ("ingress", "host")


@dataclass(frozen=True)
class PortConfig:
    protocol: str  # "tcp" | "udp"
    target: int
    published: int | None = None
    name: str | None = None  # for SRV records
    # ingress: the published port on every node reaches every task (the routing mesh);
    # host: this node's published port reaches this node's tasks of the service only
    mode: str = "ingress"


@dataclass(frozen=True)
class Service:
    name: str
    endpoint_mode: str  # "vip" | "dnsrr"
    vips: Mapping[str, ipaddress.IPv4Address]  # network -> VIP
    ports: tuple[PortConfig, ...]
    tasks: tuple[str, ...]  # backend task names, cluster-wide
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncryptionKey:
    tag: int  # names the key; the SPIs of its security associations derive from it
    key: bytes  # the cluster's secret; each association's AES key derives from it


@dataclass(frozen=True)
class Encryption:
    """The keyring of encrypted overlays: every key is accepted, the primary one is sent."""

    keys: tuple[EncryptionKey, ...]  # oldest first
    primary: int  # the tag of the key to send with

    @property
    def primary_key(self) -> EncryptionKey:
        return next(k for k in self.keys if k.tag == self.primary)


@dataclass(frozen=True)
class MeshState:
    node: str
    peers: Mapping[str, ipaddress.IPv4Address]  # node -> underlay address (self included)
    networks: tuple[Network, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    services: tuple[Service, ...] = ()
    generation: int = 0
    dns_upstreams: tuple[str, ...] | None = None  # None: the node's resolv.conf
    encryption: Encryption | None = None  # without it, encrypted networks are refused

    @property
    def address(self) -> ipaddress.IPv4Address:
        return self.peers[self.node]

    @cached_property
    def networks_by_name(self) -> dict[str, Network]:
        return {n.name: n for n in self.networks}

    @cached_property
    def _endpoint_index(self) -> dict[tuple[str, str], Endpoint]:
        return {(e.network, e.task): e for e in self.endpoints}

    @cached_property
    def _endpoints_by_network(self) -> dict[str, list[Endpoint]]:
        out: dict[str, list[Endpoint]] = {}
        for e in self.endpoints:
            out.setdefault(e.network, []).append(e)
        return out

    def endpoints_on(self, network: str) -> list[Endpoint]:
        return self._endpoints_by_network.get(network, [])

    @cached_property
    def _local(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.node == self.node]

    def local_endpoints(self) -> list[Endpoint]:
        return self._local

    @cached_property
    def attachment_rank(self) -> dict[Endpoint, int]:
        """A local endpoint's rank among its task's attachments: eth0, eth1, ..."""
        seen: dict[str, int] = {}
        out: dict[Endpoint, int] = {}
        for e in self._local:
            out[e] = seen.get(e.task, 0)
            seen[e.task] = out[e] + 1
        return out

    def backends(self, service: Service, network: str) -> list[Endpoint]:
        """The service's task endpoints on a network, in the service's task order."""
        index = self._endpoint_index
        return [index[(network, t)] for t in service.tasks if (network, t) in index]

    def without_networks(self, names: set[str]) -> MeshState:
        """This state as if the named networks did not exist (nor what is attached to them)."""
        if not names:
            return self
        return dataclasses.replace(
            self,
            networks=tuple(n for n in self.networks if n.name not in names),
            endpoints=tuple(e for e in self.endpoints if e.network not in names),
            services=tuple(
                dataclasses.replace(
                    s, vips={net: ip for net, ip in s.vips.items() if net not in names}
                )
                for s in self.services
            ),
        )


def mac_for_ip(ip: ipaddress.IPv4Address) -> str:
    """Docker's convention: 02:42 followed by the four address bytes."""
    return "02:42:" + ip.packed.hex(":")


# ---- what shoal-mesh reports back ----------------------------------------------------------

APPLIED_FILE = "applied"


@dataclass(frozen=True)
class Applied:
    """`<run-dir>/applied`, rewritten after every sync: the generation synced and what of it
    failed, for whoever feeds shoal-mesh (the agent waits on it before starting a task whose
    network it asked for)."""

    generation: int = -1  # -1: nothing synced (or no readable report)
    errors: Mapping[str, str] = field(default_factory=dict)  # part (task, network, dns) -> why
    # the newest generation whose load balancers all took it: a backend left out of it no
    # longer gets new connections here (a generation whose tables failed is retried first)
    balanced: int = -1
    # the generation a sync under way is applying (-1: none): a waiter sees the mesh busy with
    # its state, which may take long on a node given a thousand endpoints at once
    applying: int = -1


def applied_path(run_dir: Path) -> Path:
    return run_dir / APPLIED_FILE


def write_applied(run_dir: Path, applied: Applied) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{APPLIED_FILE}.tmp"
    doc = {
        "generation": applied.generation,
        "errors": dict(applied.errors),
        "balanced": applied.balanced,
        "applying": applied.applying,
    }
    tmp.write_text(json.dumps(doc))
    tmp.replace(applied_path(run_dir))  # atomically: the reader polls it


def read_applied(run_dir: Path) -> Applied:
    """The last report; `Applied()` when there is none yet or it cannot be read."""
    try:
        doc = json.loads(applied_path(run_dir).read_text())
        errors = {str(k): str(v) for k, v in doc["errors"].items()}
        applying = int(doc.get("applying", -1))  # a predecessor's report may lack it
        return Applied(int(doc["generation"]), errors, int(doc["balanced"]), applying)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Applied()


# ---- parsing -------------------------------------------------------------------------------


def load_state(path: str | Path) -> MeshState:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise StateError(f"cannot read {p}: {e.strerror}") from e
    return parse_state(text, source=str(p))


def parse_state(text: str, source: str = "<state>") -> MeshState:
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise StateError(f"{source}: not valid JSON or YAML: {e}") from e
    return state_from_dict(doc, source)


def _err(where: str, msg: str) -> StateError:
    return StateError(f"{where}: {msg}")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _err(where, f"expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _err(where, f"expected a list, got {type(value).__name__}")
    return value


def _str(value: Any, where: str, pattern: re.Pattern[str] = _NAME) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise _err(where, f"expected a name matching {pattern.pattern}, got {value!r}")
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _err(where, f"expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _err(where, f"expected true or false, got {value!r}")
    return value


def _ip(value: Any, where: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise _err(where, f"expected an IPv4 address, got {value!r}") from None


def _unknown_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise _err(
            where, f"unknown field(s) {', '.join(extra)} (allowed: {', '.join(sorted(allowed))})"
        )


def state_from_dict(doc: Any, source: str = "<state>") -> MeshState:
    d = _obj(doc, source)
    _unknown_keys(
        d,
        {
            "version",
            "node",
            "generation",
            "peers",
            "networks",
            "endpoints",
            "services",
            "dns_upstreams",
            "encryption",
        },
        source,
    )
    version = d.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise _err(
            f"{source}.version",
            f"unsupported version {version!r} (this shoal-mesh reads {FORMAT_VERSION})",
        )
    node = _str(d.get("node"), f"{source}.node")
    generation = _int(d.get("generation", 0), f"{source}.generation", 0, 2**63 - 1)

    peers_raw = _obj(d.get("peers", {}), f"{source}.peers")
    peers = {
        _str(k, f"{source}.peers"): _ip(v, f"{source}.peers.{k}") for k, v in peers_raw.items()
    }
    if node not in peers:
        raise _err(f"{source}.peers", f"must give this node's ({node}) underlay address")
    seen_addr: dict[ipaddress.IPv4Address, str] = {}
    for k, v in peers.items():
        if v in seen_addr:
            raise _err(f"{source}.peers.{k}", f"address {v} is also {seen_addr[v]}'s")
        seen_addr[v] = k

    networks: list[Network] = []
    for i, raw in enumerate(_list(d.get("networks"), f"{source}.networks")):
        networks.append(
            _network(_obj(raw, f"{source}.networks[{i}]"), f"{source}.networks[{i}]", peers)
        )
    _unique([n.name for n in networks], f"{source}.networks", "name")
    _unique([n.vni for n in networks], f"{source}.networks", "vni")
    nets = {n.name: n for n in networks}

    endpoints: list[Endpoint] = []
    for i, raw in enumerate(_list(d.get("endpoints"), f"{source}.endpoints")):
        endpoints.append(
            _endpoint(
                _obj(raw, f"{source}.endpoints[{i}]"), f"{source}.endpoints[{i}]", nets, peers
            )
        )
    _check_endpoints(endpoints, nets, source)

    services: list[Service] = []
    for i, raw in enumerate(_list(d.get("services"), f"{source}.services")):
        services.append(
            _service(_obj(raw, f"{source}.services[{i}]"), f"{source}.services[{i}]", nets)
        )
    _unique([s.name for s in services], f"{source}.services", "name")
    _check_services(services, nets, source)

    upstreams_raw = d.get("dns_upstreams")
    upstreams = None
    if upstreams_raw is not None:
        upstreams = tuple(
            str(_ip(u, f"{source}.dns_upstreams"))
            for u in _list(upstreams_raw, f"{source}.dns_upstreams")
        )

    # Without keys an encrypted network is refused by the node (mesh/ipsec.py), not the
    # whole state: the other networks go on.
    encryption = None
    if d.get("encryption") is not None:
        encryption = _encryption(_obj(d["encryption"], f"{source}.encryption"), source)

    return MeshState(
        node=node,
        peers=peers,
        networks=tuple(networks),
        endpoints=tuple(endpoints),
        services=tuple(services),
        generation=generation,
        dns_upstreams=upstreams,
        encryption=encryption,
    )


_HEX_KEY = re.compile(r"^(0x)?([0-9a-fA-F]{2}){16,64}$")


def _encryption(d: dict[str, Any], source: str) -> Encryption:
    where = f"{source}.encryption"
    _unknown_keys(d, {"keys", "primary"}, where)
    keys: list[EncryptionKey] = []
    raw_keys = _list(d.get("keys"), f"{where}.keys")
    if not raw_keys:
        raise _err(f"{where}.keys", "expected at least one key")
    for i, raw in enumerate(raw_keys):
        kw = f"{where}.keys[{i}]"
        k = _obj(raw, kw)
        _unknown_keys(k, {"tag", "key"}, kw)
        tag = _int(k.get("tag"), f"{kw}.tag", 0, 2**32 - 1)
        secret = k.get("key")
        if not isinstance(secret, str) or not _HEX_KEY.match(secret):
            raise _err(f"{kw}.key", "expected 16 to 64 bytes in hex (32 to 128 hex digits)")
        keys.append(EncryptionKey(tag, bytes.fromhex(secret.removeprefix("0x"))))
    _unique([k.tag for k in keys], f"{where}.keys", "tag")
    # Like Docker: the second-newest key, so every node holds a key before anyone sends with it.
    default = keys[-2].tag if len(keys) > 1 else keys[-1].tag
    primary = _int(d.get("primary", default), f"{where}.primary", 0, 2**32 - 1)
    if primary not in {k.tag for k in keys}:
        raise _err(f"{where}.primary", f"no key has tag {primary}")
    return Encryption(tuple(keys), primary)


def _unique(values: list[Any], where: str, what: str) -> None:
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise _err(where, f"duplicate {what} {v!r}")
        seen.add(v)


def _network(d: dict[str, Any], where: str, peers: Mapping[str, ipaddress.IPv4Address]) -> Network:
    _unknown_keys(d, {"name", "vni", "subnet", "gateways", "ingress", "encrypted", "mtu"}, where)
    name = _str(d.get("name"), f"{where}.name")
    vni = _int(d.get("vni"), f"{where}.vni", 1, MAX_VNI)
    try:
        subnet = ipaddress.IPv4Network(d.get("subnet"), strict=True)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError, TypeError):
        raise _err(
            f"{where}.subnet",
            f"expected an IPv4 network like 10.255.0.0/16, got {d.get('subnet')!r}",
        ) from None
    if subnet.prefixlen > 29:
        raise _err(f"{where}.subnet", f"{subnet} is too small for an overlay (at most /29)")
    gateways: dict[str, ipaddress.IPv4Address] = {}
    for node, ip in _obj(d.get("gateways", {}), f"{where}.gateways").items():
        gw = _ip(ip, f"{where}.gateways.{node}")
        if node not in peers:
            raise _err(f"{where}.gateways.{node}", f"unknown node {node!r} (not in peers)")
        _in_subnet(gw, subnet, f"{where}.gateways.{node}")
        gateways[node] = gw
    _unique(list(gateways.values()), f"{where}.gateways", "address")
    mtu = d.get("mtu")
    if mtu is not None:
        mtu = _int(mtu, f"{where}.mtu", 576, 65535)
    return Network(
        name=name,
        vni=vni,
        subnet=subnet,
        gateways=gateways,
        ingress=_bool(d.get("ingress", False), f"{where}.ingress"),
        encrypted=_bool(d.get("encrypted", False), f"{where}.encrypted"),
        mtu=mtu,
    )


def _in_subnet(ip: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network, where: str) -> None:
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
        raise _err(where, f"{ip} is not a usable address of {subnet}")


def _endpoint(
    d: dict[str, Any],
    where: str,
    nets: Mapping[str, Network],
    peers: Mapping[str, ipaddress.IPv4Address],
) -> Endpoint:
    _unknown_keys(d, {"task", "network", "node", "ip", "mac", "netns", "ifname"}, where)
    task = _str(d.get("task"), f"{where}.task")
    network = _str(d.get("network"), f"{where}.network")
    if network not in nets:
        raise _err(f"{where}.network", f"unknown network {network!r}")
    node = _str(d.get("node"), f"{where}.node")
    if node not in peers:
        raise _err(f"{where}.node", f"unknown node {node!r} (not in peers)")
    ip = _ip(d.get("ip"), f"{where}.ip")
    _in_subnet(ip, nets[network].subnet, f"{where}.ip")
    mac = d.get("mac") or mac_for_ip(ip)
    if not isinstance(mac, str) or not _MAC.match(mac.lower()):
        raise _err(f"{where}.mac", f"expected a MAC like 02:42:0a:ff:00:05, got {mac!r}")
    if int(mac[:2], 16) & 1:
        raise _err(f"{where}.mac", f"{mac} is a multicast address")
    netns = d.get("netns")
    if netns is not None and (not isinstance(netns, str) or not netns or ".." in netns.split("/")):
        raise _err(f"{where}.netns", f"expected a namespace name or absolute path, got {netns!r}")
    ifname = d.get("ifname")
    if ifname is not None:
        ifname = _str(ifname, f"{where}.ifname", _IFNAME)
    return Endpoint(
        task=task, network=network, node=node, ip=ip, mac=mac.lower(), netns=netns, ifname=ifname
    )


def _check_endpoints(endpoints: list[Endpoint], nets: Mapping[str, Network], source: str) -> None:
    seen_ip: dict[tuple[str, ipaddress.IPv4Address], str] = {}
    seen_mac: dict[tuple[str, str], str] = {}
    for net in nets.values():
        for node, gw in net.gateways.items():
            seen_ip[(net.name, gw)] = f"the gateway of {node}"
            seen_mac[(net.name, mac_for_ip(gw))] = f"the gateway of {node}"
    seen_attach: set[tuple[str, str]] = set()
    netns_of: dict[str, str | None] = {}
    for i, e in enumerate(endpoints):
        where = f"{source}.endpoints[{i}]"
        if (e.network, e.ip) in seen_ip:
            raise _err(
                f"{where}.ip",
                f"{e.ip} on {e.network} is already used by {seen_ip[(e.network, e.ip)]}",
            )
        seen_ip[(e.network, e.ip)] = f"task {e.task}"
        if (e.network, e.mac) in seen_mac:
            raise _err(
                f"{where}.mac",
                f"{e.mac} on {e.network} is already used by {seen_mac[(e.network, e.mac)]}",
            )
        seen_mac[(e.network, e.mac)] = f"task {e.task}"
        if (e.task, e.network) in seen_attach:
            raise _err(where, f"task {e.task} is attached to {e.network} twice")
        seen_attach.add((e.task, e.network))
        if e.task in netns_of and netns_of[e.task] != e.netns:
            raise _err(f"{where}.netns", f"task {e.task} has endpoints in different namespaces")
        netns_of[e.task] = e.netns
        if e.node not in nets[e.network].gateways:
            raise _err(
                where,
                f"network {e.network} has no gateway on node {e.node}; "
                "add it to networks[].gateways",
            )


def _service(d: dict[str, Any], where: str, nets: Mapping[str, Network]) -> Service:
    _unknown_keys(d, {"name", "endpoint_mode", "vips", "ports", "tasks", "aliases"}, where)
    name = _str(d.get("name"), f"{where}.name", _DNS_LABEL)
    mode = d.get("endpoint_mode", "vip")
    if mode not in ("vip", "dnsrr"):
        raise _err(f"{where}.endpoint_mode", f"expected vip or dnsrr, got {mode!r}")
    vips: dict[str, ipaddress.IPv4Address] = {}
    for net, ip in _obj(d.get("vips", {}), f"{where}.vips").items():
        if net not in nets:
            raise _err(f"{where}.vips.{net}", f"unknown network {net!r}")
        vip = _ip(ip, f"{where}.vips.{net}")
        _in_subnet(vip, nets[net].subnet, f"{where}.vips.{net}")
        vips[net] = vip
    if mode == "dnsrr" and vips:
        raise _err(f"{where}.vips", "a dnsrr service has no VIPs")
    ports: list[PortConfig] = []
    for j, raw in enumerate(_list(d.get("ports"), f"{where}.ports")):
        pw = f"{where}.ports[{j}]"
        p = _obj(raw, pw)
        _unknown_keys(p, {"protocol", "target", "published", "name", "mode"}, pw)
        proto = p.get("protocol", "tcp")
        if proto not in ("tcp", "udp"):
            raise _err(f"{pw}.protocol", f"expected tcp or udp, got {proto!r}")
        target = _int(p.get("target"), f"{pw}.target", 1, 65535)
        published = p.get("published")
        if published is not None:
            published = _int(published, f"{pw}.published", 1, 65535)
        pname = p.get("name")
        if pname is not None:
            pname = _str(pname, f"{pw}.name", _DNS_LABEL)
        pmode = p.get("mode", "ingress")
        if pmode not in PUBLISH_MODES:
            raise _err(f"{pw}.mode", f"expected ingress or host, got {pmode!r}")
        if pmode == "host" and published is None:
            raise _err(f"{pw}.published", "a host-mode port needs its published port")
        ports.append(PortConfig(proto, target, published, pname, pmode))
    if mode == "dnsrr" and any(p.published and p.mode == "ingress" for p in ports):
        raise _err(f"{where}.ports", "a dnsrr service cannot publish ports on the routing mesh")
    _unique(
        [f"{p.protocol}/{p.published}" for p in ports if p.published],
        f"{where}.ports",
        "published port",
    )
    tasks = tuple(_str(t, f"{where}.tasks") for t in _list(d.get("tasks"), f"{where}.tasks"))
    _unique(list(tasks), f"{where}.tasks", "task")
    aliases = tuple(
        _str(a, f"{where}.aliases", _DNS_LABEL) for a in _list(d.get("aliases"), f"{where}.aliases")
    )
    return Service(
        name=name, endpoint_mode=mode, vips=vips, ports=tuple(ports), tasks=tasks, aliases=aliases
    )


def _check_services(services: list[Service], nets: Mapping[str, Network], source: str) -> None:
    """Ingress ports are the cluster's: each is one service's, and no host-mode port may take
    one (both would be this node's port). Host-mode ports of different services may be equal:
    the scheduler puts their tasks on different nodes."""
    published: dict[tuple[str, int], str] = {}
    vips: dict[ipaddress.IPv4Address, str] = {}
    for i, s in enumerate(services):
        where = f"{source}.services[{i}]"
        for p in s.ports:
            if p.published is None or p.mode != "ingress":
                continue
            key = (p.protocol, p.published)
            if key in published:
                raise _err(
                    f"{where}.ports",
                    f"{p.protocol}/{p.published} is already published by {published[key]}",
                )
            published[key] = s.name
            if not any(nets[n].ingress for n in s.vips):
                raise _err(f"{where}.ports", "a published port needs a VIP on an ingress network")
        for vip in s.vips.values():
            if vip in vips:
                raise _err(f"{where}.vips", f"{vip} is already the VIP of {vips[vip]}")
            vips[vip] = s.name
    for i, s in enumerate(services):
        for p in s.ports:
            key = (p.protocol, p.published or 0)
            if p.mode == "host" and key in published:
                raise _err(
                    f"{source}.services[{i}].ports",
                    f"host-mode port {p.protocol}/{p.published} is published on the routing "
                    f"mesh by {published[key]}",
                )


def state_to_dict(state: MeshState) -> dict[str, Any]:
    """The document `state_from_dict` reads back as an equal state. Optional fields at their
    defaults are left out. Plain loops: the dispatcher writes one per node on every change."""
    doc: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "node": state.node,
        "generation": state.generation,
        "peers": {k: str(v) for k, v in state.peers.items()},
        "networks": [_network_to_dict(n) for n in state.networks],
        "endpoints": [_endpoint_to_dict(e) for e in state.endpoints],
        "services": [_service_to_dict(s) for s in state.services],
    }
    if state.dns_upstreams is not None:
        doc["dns_upstreams"] = list(state.dns_upstreams)
    if state.encryption is not None:
        doc["encryption"] = {
            "keys": [{"tag": k.tag, "key": k.key.hex()} for k in state.encryption.keys],
            "primary": state.encryption.primary,
        }
    return doc


def _network_to_dict(n: Network) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": n.name,
        "vni": n.vni,
        "subnet": str(n.subnet),
        "gateways": {k: str(v) for k, v in n.gateways.items()},
        "ingress": n.ingress,
        "encrypted": n.encrypted,
    }
    if n.mtu is not None:
        d["mtu"] = n.mtu
    return d


def _endpoint_to_dict(e: Endpoint) -> dict[str, Any]:
    d: dict[str, Any] = {"task": e.task, "network": e.network, "node": e.node, "ip": str(e.ip)}
    # Most MACs are the default, which the reader derives again: a smaller document to send
    # to every node.
    if e.mac != mac_for_ip(e.ip):
        d["mac"] = e.mac
    if e.netns is not None:
        d["netns"] = e.netns
    if e.ifname is not None:
        d["ifname"] = e.ifname
    return d


def _service_to_dict(s: Service) -> dict[str, Any]:
    ports = []
    for p in s.ports:
        port: dict[str, Any] = {"protocol": p.protocol, "target": p.target}
        if p.published is not None:
            port["published"] = p.published
        if p.name is not None:
            port["name"] = p.name
        if p.mode != "ingress":
            port["mode"] = p.mode
        ports.append(port)
    d: dict[str, Any] = {
        "name": s.name,
        "endpoint_mode": s.endpoint_mode,
        "vips": {k: str(v) for k, v in s.vips.items()},
        "ports": ports,
        "tasks": list(s.tasks),
    }
    if s.aliases:
        d["aliases"] = list(s.aliases)
    return d
