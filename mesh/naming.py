"""Names of the kernel objects shoal-mesh owns.

Everything carries a recognisable prefix, so reconcile and cleanup touch only what is ours:
links start with `sh-`, the nftables table is `shoal`.
"""

from __future__ import annotations

import hashlib

LINK_PREFIX = "sh-"
BRIDGE_PREFIX = "sh-br"
VXLAN_PREFIX = "sh-vx"
VETH_PREFIX = "sh-v"
NFT_TABLE = "shoal"
VXLAN_PORT = 4789


def bridge_name(vni: int) -> str:
    return f"{BRIDGE_PREFIX}{vni}"


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni}"


def veth_name(netns: str, network: str) -> str:
    """Host end of a task's veth: stable for a (namespace, network) pair, 13 characters."""
    digest = hashlib.sha256(f"{netns}\0{network}".encode()).hexdigest()[:9]
    return f"{VETH_PREFIX}{digest}"


def is_owned_link(name: str) -> bool:
    return name.startswith(LINK_PREFIX)
