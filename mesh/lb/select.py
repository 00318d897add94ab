"""Choosing the load-balancer backend at start: --lb-backend auto|nftables|ipvs."""

from __future__ import annotations

from collections.abc import Callable

from pyroute2 import GenericNetlinkSocket
from pyroute2.netlink.exceptions import NetlinkError

from mesh.lb.base import Balancer
from mesh.lb.ipvs import IpvsBalancer
from mesh.lb.nftables import NftablesBalancer

BACKENDS = ("auto", "nftables", "ipvs")


class BackendUnavailable(RuntimeError):
    pass


def ipvs_available() -> bool:
    """Does this kernel (in this namespace) have IPVS? Asks generic netlink for the family."""
    with GenericNetlinkSocket() as genl:
        # pyroute2 logs a missing family as an error; here it is an answer
        genl.asyncore.module_err_level = "debug"
        try:
            genl.discovery("IPVS")
        except NetlinkError:
            return False  # ENOENT: no such family
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
