"""Choosing the load-balancer backend at start: --lb-backend auto|nftables|ipvs."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from mesh.lb.base import Balancer
from mesh.lb.ipvs import IpvsBalancer
from mesh.lb.nftables import NftablesBalancer

BACKENDS = ("auto", "nftables", "ipvs")
NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_NAME = 2
NLMSG_ERROR = 2


class BackendUnavailable(RuntimeError):
    pass


def ipvs_available() -> bool:
    """Does this kernel (in this namespace) have IPVS? Asks generic netlink for the family."""
    name = b"IPVS\0"
    attr = struct.pack("=HH", 4 + len(name), CTRL_ATTR_FAMILY_NAME) + name
    attr += b"\0" * (-len(attr) % 4)
    payload = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0) + attr
    msg = struct.pack("=IHHII", 16 + len(payload), GENL_ID_CTRL, 1, 1, 0) + payload
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as s:
        s.settimeout(2)
        s.send(msg)
        reply = s.recv(65536)
    _, msg_type = struct.unpack_from("=IH", reply)
    if msg_type == NLMSG_ERROR:
        err: int = struct.unpack_from("=i", reply, 16)[0]
        return err == 0
    return True


def choose(name: str) -> tuple[str, Callable[[str | None], Balancer]]:
    """(the backend's name, a factory making one balancer per namespace)."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown --lb-backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "nftables" or (name == "auto" and not ipvs_available()):
        return "nftables", NftablesBalancer
    if not ipvs_available():
        raise BackendUnavailable(
            "--lb-backend ipvs: this kernel has no IPVS (the generic netlink family 'IPVS' is "
            "missing: CONFIG_IP_VS is off or the ip_vs module is not loaded); use "
            "--lb-backend nftables or auto"
        )
    return "ipvs", IpvsBalancer
