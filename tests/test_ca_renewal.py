"""When certificates are renewed, and which certificates are refused although they verify."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from orchestrator.ca.authz import Access, Authorizer, DenyList, Policy, Refusal
from orchestrator.ca.pki import Identity
from orchestrator.ca.renewal import RenewalWindow, renewal_reason
from orchestrator.store.objects import Role

START = datetime(2026, 1, 1, tzinfo=UTC)


def identity(
    role: Role = Role.WORKER, node_id: str = "n1", cluster_id: str = "c1", serial: int = 7
) -> Identity:
    return Identity(
        node_id=node_id,
        role=role,
        cluster_id=cluster_id,
        serial=serial,
        not_before=START,
        not_after=START + timedelta(days=90),
    )


def test_renewal_points_spread_over_50_to_80_percent() -> None:
    rng = random.Random(5)
    window = RenewalWindow()
    ident = identity()
    lifetime = ident.not_after - ident.not_before
    fractions = [
        (window.renew_at(ident.not_before, ident.not_after, rng) - ident.not_before) / lifetime
        for _ in range(5000)
    ]
    assert min(fractions) >= 0.5 and max(fractions) <= 0.8
    # Spread over the whole window, not bunched: roughly uniform.
    assert min(fractions) < 0.51 and max(fractions) > 0.79
    assert statistics.mean(fractions) == pytest.approx(0.65, abs=0.01)
    tenths = [sum(0.5 + i * 0.03 <= f < 0.5 + (i + 1) * 0.03 for f in fractions) for i in range(10)]
    assert min(tenths) > 400, tenths
    # The same seed, the same schedule: the randomness is the caller's.
    a = [window.renew_at(START, ident.not_after, random.Random(1)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_delay_counts_from_now_and_never_goes_negative() -> None:
    ident = identity()
    window = RenewalWindow(0.5, 0.5)
    assert window.delay(ident, START, random.Random()) == timedelta(days=45)
    assert window.delay(ident, START + timedelta(days=60), random.Random()) == timedelta(0)
    with pytest.raises(ValueError, match="not within"):
        RenewalWindow(0.8, 0.5)


def test_renewal_reasons() -> None:
    ident = identity(Role.WORKER)
    at = START + timedelta(days=50)
    early = START + timedelta(days=10)
    assert renewal_reason(ident, now=early, renew_at=at) is None
    assert "renewal window" in (renewal_reason(ident, now=at, renew_at=at) or "")
    assert "expired" in (renewal_reason(ident, now=START + timedelta(days=91), renew_at=at) or "")
    promoted = renewal_reason(ident, now=early, renew_at=at, desired_role=Role.MANAGER)
    assert promoted == "the node's role changed to manager"
    assert renewal_reason(ident, now=early, renew_at=at, desired_role=Role.WORKER) is None
    rotating = renewal_reason(ident, now=early, renew_at=at, issued_by_current_root=False)
    assert rotating == "the root CA is being rotated"


def test_deny_list_by_node_and_by_serial() -> None:
    deny = DenyList().with_node("gone", START + timedelta(days=90)).with_serial(0xBAD)
    assert deny.reason(identity(node_id="gone"), START) == "node gone was removed from the swarm"
    assert deny.reason(identity(node_id="ok"), START) is None
    assert "revoked" in (deny.reason(identity(serial=0xBAD), START) or "")
    # Once every certificate of the removed node has expired, TLS refuses them anyway.
    later = START + timedelta(days=91)
    assert deny.reason(identity(node_id="gone"), later) is None
    assert "gone" not in deny.pruned(later).node_ids
    assert DenyList().with_node("x", None).reason(identity(node_id="x"), later) is not None


POLICY = Policy(
    {
        "/shoal.CA/GetRootCACertificate": Access.JOIN,
        "/shoal.Dispatcher/*": Access.NODES,
        "/shoal.Raft/*": Access.MANAGERS,
        "/shoal.Raft/Status": Access.NODES,
    }
)


def refusal(
    authz: Authorizer, method: str, ident: Identity | None, days: int = 0
) -> Refusal | None:
    try:
        authz.check(method, ident, START + timedelta(days=days))
    except Refusal as r:
        return r
    return None


def test_authorizer_decisions() -> None:
    deny = DenyList().with_node("removed", None)
    authz = Authorizer("c1", POLICY, lambda: deny)
    worker, manager = identity(Role.WORKER, "w"), identity(Role.MANAGER, "m")
    assert refusal(authz, "/shoal.CA/GetRootCACertificate", None) is None
    assert refusal(authz, "/shoal.Dispatcher/Heartbeat", worker) is None
    assert refusal(authz, "/shoal.Raft/Append", manager) is None
    assert refusal(authz, "/shoal.Raft/Status", worker) is None  # exact rule beats the service's

    r = refusal(authz, "/shoal.Dispatcher/Heartbeat", None)
    assert r is not None and r.code is grpc.StatusCode.UNAUTHENTICATED
    r = refusal(authz, "/shoal.Raft/Append", worker)
    assert r is not None and r.code is grpc.StatusCode.PERMISSION_DENIED
    assert "for managers" in r.message
    r = refusal(authz, "/shoal.Dispatcher/Heartbeat", identity(Role.MANAGER, "x", "c2"))
    assert r is not None and "belongs to swarm c2" in r.message
    r = refusal(authz, "/shoal.Dispatcher/Heartbeat", identity(node_id="removed"))
    assert r is not None and "removed from the swarm" in r.message
    # A removed node may not renew either, though renewal is a JOIN method.
    r = refusal(authz, "/shoal.CA/GetRootCACertificate", identity(node_id="removed"))
    assert r is not None and "removed" in r.message
    # A connection opened before the certificate expired does not keep it alive.
    r = refusal(authz, "/shoal.Dispatcher/Heartbeat", identity(Role.WORKER, "w"), days=91)
    assert r is not None and r.code is grpc.StatusCode.UNAUTHENTICATED and "expired" in r.message
    # A method nobody wrote a rule for is closed.
    r = refusal(authz, "/shoal.Control/RemoveNode", manager)
    assert r is not None and "not open to any caller" in r.message
