"""The load-balancer backend interface.

Every namespace Shoal balances in has an nftables table `shoal` (and, past a thousand
frontends, more tables of the same kind: mesh/lb/table.py) that classifies traffic (published
ports, VIPs), masquerades and routes it to a per-frontend chain. How that chain picks a backend
is the backend's business: nftables does it with `numgen inc` and a DNAT map, IPVS with a
firewall mark and an IPVS round-robin service. Both see the same calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from mesh.lb.model import Backend, Frontend
from mesh.nft.expr import Expr
from mesh.nft.transaction import Transaction


@dataclass(frozen=True)
class FrontendSlot:
    """Where a frontend lives: its table, its number (stable while it exists) and chain."""

    table: str
    fid: int
    chain: str
    backend_map: str


@dataclass(frozen=True)
class BackendCount:
    frontend: Frontend
    backend: Backend
    connections: int


class Balancer(ABC):
    """Backend selection for the frontends of one namespace."""

    name: str

    def __init__(self, netns: str | None = None):
        self.netns = netns

    def masquerade_match(self) -> list[Expr] | None:
        """Besides DNATed connections, which traffic the node masquerades onto overlays."""
        return None

    def declare(self, tx: Transaction) -> None:  # noqa: B027 - an optional hook
        """Add what this balancer needs once in the namespace, to the main table (called on
        every full sync)."""

    @abstractmethod
    def declare_table(self, tx: Transaction) -> None:
        """Add what the frontends of one table share (called when a table that holds
        frontends is made, the main table included)."""

    @abstractmethod
    def add_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        """Create the frontend's chain contents and balancing state."""

    @abstractmethod
    def update_backends(
        self, tx: Transaction, old: Frontend, new: Frontend, slot: FrontendSlot
    ) -> None:
        """Make an existing frontend balance over new.backends instead of old.backends."""

    @abstractmethod
    def remove_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        """Remove everything add_frontend made (the chain itself is removed by the caller)."""

    def after_commit(self) -> None:  # noqa: B027 - an optional hook
        """Called once the nftables transaction is in (IPVS applies its own state here)."""

    @abstractmethod
    def counts(
        self, counters: dict[str, tuple[int, int]], fe: Frontend, slot: FrontendSlot
    ) -> list[BackendCount]:
        """New connections per backend of a frontend, from the table's named counters."""
