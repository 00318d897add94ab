"""nf_tables over raw netlink: the socket that commits batches and dumps.

Shoal speaks to nf_tables directly instead of through the `nft` tool or pyroute2. `nft` reads
the whole ruleset of the namespace into its cache before every command, which costs ~0.4 s once
10,000 services are loaded; a batch sent here costs what it changes (docs/benchmarks.md).
The netlink machinery (framing, acknowledgements, dumps, attributes) is mesh/netlink/.

All integers inside nf_tables attributes are big-endian (the kernel reads them with ntohl).
"""

from __future__ import annotations

from mesh.netlink.core import NetlinkRefused
from mesh.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, NfnlSocket


class NftError(NetlinkRefused):
    """The kernel refused a batch; nothing of it was applied."""

    prefix = "nftables transaction refused"


class NftSocket(NfnlSocket):
    """An nf_tables socket in the namespace that created it."""

    error = NftError

    def __init__(self) -> None:
        super().__init__(NFNL_SUBSYS_NFTABLES)
