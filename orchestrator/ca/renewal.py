"""When a node renews its certificate.

Each node renews at a random point between 50% and 80% of its certificate's lifetime (swarmkit
`CertLowerRotationRange`/`CertUpperRotationRange`, `calculateRandomExpiry`), so a cluster whose
nodes joined together does not send every CSR in the same minute, and a node that misses its
moment still has 20% of the lifetime left to retry. Some events make a renewal due at once: a
role change (promote/demote: the role is in the certificate) and a root rotation (the node must
hold a certificate from the new root before trust in the old one is dropped).

The randomness is a `random.Random` the caller owns, so tests can seed it and nothing here keeps
state between calls.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from orchestrator.ca.pki import Identity
from orchestrator.store.objects import Role

LOWER = 0.5
UPPER = 0.8


@dataclass(frozen=True)
class RenewalWindow:
    lower: float = LOWER
    upper: float = UPPER

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower <= self.upper <= 1.0:
            raise ValueError(f"renewal window {self.lower}..{self.upper} is not within 0..1")

    def renew_at(self, not_before: datetime, not_after: datetime, rng: random.Random) -> datetime:
        """A random instant between `lower` and `upper` of the lifetime, counted from
        `not_before` (the backdated start, as swarmkit counts)."""
        lifetime = not_after - not_before
        return not_before + lifetime * rng.uniform(self.lower, self.upper)

    def delay(self, identity: Identity, now: datetime, rng: random.Random) -> timedelta:
        """How long to wait from `now` before renewing this certificate; zero if overdue."""
        at = self.renew_at(identity.not_before, identity.not_after, rng)
        return max(at - now, timedelta(0))


def renewal_reason(
    identity: Identity,
    *,
    now: datetime,
    renew_at: datetime,
    desired_role: Role | None = None,
    issued_by_current_root: bool = True,
) -> str | None:
    """Why this node should ask for a new certificate now, or None if it can wait.

    `desired_role` is the role the store wants for the node (a promotion or demotion is
    applied by renewing: the role is the certificate's OU). `issued_by_current_root` is False
    while a root rotation waits for this node.
    """
    if now >= identity.not_after:
        return "the certificate has expired"
    if desired_role is not None and desired_role is not identity.role:
        return f"the node's role changed to {desired_role.value}"
    if not issued_by_current_root:
        return "the root CA is being rotated"
    if now >= renew_at:
        return "the certificate is in its renewal window"
    return None
