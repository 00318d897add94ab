"""Encrypted overlays: VXLAN between nodes carried in ESP, transport mode, AES-GCM.

Docker's model (libnetwork encryption.go), with keys per association. For every other node
that shares an encrypted network with this one:

- an inbound security association (SA) per key of the keyring, and an outbound one for the
  primary key; AEAD rfc4106(gcm(aes)), 256-bit key, 16-byte ICV. Each SA has its own AES key
  and salt, HKDF-derived from the cluster key, its tag and the two addresses, so no two SAs
  share a GCM key (GCM must never see a nonce twice under one key), and its SPI derives the
  same way: both ends compute the same numbers;
- an outbound policy for `udp dport 4789` to that node, but only for packets marked
  ESP_MARK, with a template naming the primary outbound SA.

Table `ip shoal-esp` marks the VXLAN packets of encrypted VNIs (a route chain on output, so
the mark re-routes them through the policy) and refuses plaintext for those VNIs: outbound
if the route is not an IPsec bundle (whatever went wrong, it is dropped, not sent in the
clear), inbound if it was not decrypted. Our SAs carry reqid REQID and our policies the mark,
so only ours are touched.

Rotation follows Docker's order so no packet is lost: new inbound SAs first, then the
outbound SA of the new primary, then the policy switched to it, then old SAs removed. With
the primary being the second-newest key (mesh/state.py), every node accepts a key before any
node sends with it. Keys come with the mesh state; the managers rotate them
(orchestrator/manager/netkeys.py; a new key every 12 h by default).

Kernel support (esp4, AES-GCM) is probed by adding and deleting a throwaway SA. Without it an
encrypted network is refused: nothing of it is attached, so nothing of it is sent.
pyroute2 has no XFRM state API; `ip xfrm` does the work.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh.naming import VXLAN_PORT
from mesh.netlink.attrs import attr_be32, attr_str
from mesh.netns import run_in_netns
from mesh.nft import expr as E
from mesh.nft.transaction import HOOK_INPUT, HOOK_OUTPUT, HOOK_POSTROUTING, Hook, Transaction
from mesh.nft.wire import NftError, NftSocket
from mesh.state import Encryption, EncryptionKey, MeshState

log = logging.getLogger(__name__)

TABLE = "shoal-esp"
ESP_MARK = 0x00E5E500
REQID = 0x5E0E5
AEAD = "rfc4106(gcm(aes))"
ICV_BITS = 128
SA_KEY_BYTES = 36  # AES-256 key and 4-byte salt
DEFAULT_ROTATION_SECONDS = 12 * 3600
KEYRING_SIZE = 3
_PROBE = ("192.0.2.1", "192.0.2.2", 0x5E0)  # TEST-NET-1: never a real peer
NFT_META_SECPATH = 25
NFT_RT_XFRM = 4
UDP = 17


class IpsecError(RuntimeError):
    pass


@dataclass(frozen=True)
class SA:
    src: str
    dst: str
    spi: int
    key: bytes = field(compare=False, repr=False)

    @property
    def id(self) -> tuple[str, str, int]:
        return (self.src, self.dst, self.spi)


@dataclass(frozen=True)
class Policy:
    """The outbound policy towards one peer: which SA (by SPI) carries its VXLAN."""

    src: str
    dst: str
    spi: int


@dataclass(frozen=True)
class Desired:
    here: str  # this node's underlay address
    vnis: frozenset[int]  # encrypted VNIs with a gateway here
    sas: frozenset[SA]
    policies: frozenset[Policy]


def derive(key: EncryptionKey, src: str, dst: str) -> tuple[int, bytes]:
    """(SPI, AES key and salt) of the association carrying src -> dst under a cluster key."""
    info = (
        b"shoal esp v1"
        + ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + key.tag.to_bytes(4, "big")
    )
    okm = HKDF(algorithm=hashes.SHA256(), length=4 + SA_KEY_BYTES, salt=None, info=info).derive(
        key.key
    )
    spi = int.from_bytes(okm[:4], "big")
    if spi < 0x100:  # 0-255 are reserved
        spi |= 0x100
    return spi, okm[4:]


def desired(state: MeshState) -> Desired:
    """What this node's kernel needs for its encrypted networks."""
    me = state.node
    nets = [n for n in state.networks if n.encrypted and me in n.gateways]
    vnis = frozenset(n.vni for n in nets)
    here = str(state.address)
    if not nets or state.encryption is None:
        return Desired(here, vnis, frozenset(), frozenset())
    enc: Encryption = state.encryption
    peers = sorted({node for n in nets for node in n.gateways if node != me})
    sas: set[SA] = set()
    policies: set[Policy] = set()
    for node in peers:
        there = str(state.peers[node])
        for k in enc.keys:
            spi, material = derive(k, there, here)
            sas.add(SA(there, here, spi, material))
        spi, material = derive(enc.primary_key, here, there)
        sas.add(SA(here, there, spi, material))
        policies.add(Policy(here, there, spi))
    return Desired(here, vnis, frozenset(sas), frozenset(policies))


def rotate(enc: Encryption | None, keep: int = KEYRING_SIZE) -> Encryption:
    """One rotation step: add a new key, keep the newest `keep`, make the second-newest
    primary."""
    keys = list(enc.keys) if enc is not None else []
    tag = max((k.tag for k in keys), default=0) + 1
    keys = [*keys, EncryptionKey(tag, os.urandom(32))][-keep:]
    primary = keys[-2].tag if len(keys) > 1 else keys[-1].tag
    return Encryption(tuple(keys), primary)


# ---- the kernel ----------------------------------------------------------------------------


def _ip(netns: str | None, batch: list[str]) -> subprocess.CompletedProcess[str]:
    """`ip -batch`, in the namespace (a thread that entered it forks the process)."""
    return run_in_netns(
        netns,
        lambda: subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="".join(line + "\n" for line in batch),
            capture_output=True,
            text=True,
        ),
    )


def _listed(netns: str | None) -> str:
    """`ip xfrm state list` and `ip xfrm policy list` (two runs: in one batch, the second
    command prints nothing)."""

    def run() -> str:
        out = []
        for what in ("state", "policy"):
            done = subprocess.run(["ip", "xfrm", what, "list"], capture_output=True, text=True)
            if done.returncode != 0:
                raise IpsecError(f"cannot list XFRM {what}s: {done.stderr.strip()}")
            out.append(done.stdout)
        return "".join(out)

    return run_in_netns(netns, run)


def _sa_add(sa: SA, replay: bool) -> str:
    return (
        f"xfrm state add src {sa.src} dst {sa.dst} proto esp spi {sa.spi:#010x} reqid {REQID} "
        f"mode transport{' replay-window 64' if replay else ''} "
        f"aead '{AEAD}' 0x{sa.key.hex()} {ICV_BITS}"
    )


def _sa_del(src: str, dst: str, spi: int) -> str:
    return f"xfrm state delete src {src} dst {dst} proto esp spi {spi:#010x}"


def _policy(verb: str, p: Policy) -> str:
    return (
        f"xfrm policy {verb} src {p.src}/32 dst {p.dst}/32 proto 17 dport {VXLAN_PORT} dir out "
        f"mark {ESP_MARK:#x} mask 0xffffffff tmpl src {p.src} dst {p.dst} proto esp "
        f"spi {p.spi:#010x} reqid {REQID} mode transport"
    )


def _policy_del(src: str, dst: str) -> str:
    return (
        f"xfrm policy delete src {src}/32 dst {dst}/32 proto 17 dport {VXLAN_PORT} dir out "
        f"mark {ESP_MARK:#x} mask 0xffffffff"
    )


_SA_HEAD = re.compile(r"^src (\S+) dst (\S+)\s*$")
_SA_PROTO = re.compile(r"proto esp spi (0x[0-9a-f]+) reqid (\d+)")
_POLICY_HEAD = re.compile(rf"^src (\S+)/32 dst (\S+)/32 proto (?:udp|17) dport {VXLAN_PORT}")
_POLICY_MARK = re.compile(rf"mark {ESP_MARK:#x}/0xffffffff")
_POLICY_SPI = re.compile(rf"spi (0x[0-9a-f]+) reqid {REQID}\b")


def _blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line and not line[0].isspace():
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line.strip())
    return blocks


def parse_states(text: str) -> set[tuple[str, str, int]]:
    """Our SAs in `ip xfrm state list` output: (src, dst, spi)."""
    out = set()
    for block in _blocks(text):
        head = _SA_HEAD.match(block[0])
        proto = _SA_PROTO.search(" ".join(block[1:]))
        if head and proto and int(proto.group(2)) == REQID:
            out.add((head.group(1), head.group(2), int(proto.group(1), 16)))
    return out


def parse_policies(text: str) -> dict[tuple[str, str], int]:
    """Our outbound policies in `ip xfrm policy list` output: (src, dst) -> template SPI."""
    out = {}
    for block in _blocks(text):
        head = _POLICY_HEAD.match(block[0])
        rest = " ".join(block[1:])
        spi = _POLICY_SPI.search(rest)
        if head and spi and _POLICY_MARK.search(rest) and "dir out" in rest:
            out[(head.group(1), head.group(2))] = int(spi.group(1), 16)
    return out


def _rule_key(vni: int) -> list[E.Expr]:
    """udp dport 4789 and VXLAN VNI (bytes 4-6 of its header, after UDP's 8) == vni."""
    return [
        *E.match_l4proto(UDP),
        E.payload(E.TRANSPORT_HEADER, 2, 2, E.REG_1),
        E.cmp(E.CMP_EQ, E.REG_1, VXLAN_PORT.to_bytes(2, "big")),
        E.payload(E.TRANSPORT_HEADER, 12, 3, E.REG_1),
        E.cmp(E.CMP_EQ, E.REG_1, vni.to_bytes(3, "big")),
    ]


def _count(name: str) -> E.Expr:
    return E.Expr("objref", attr_be32(1, E.NFT_OBJECT_COUNTER) + attr_str(2, name))


def _table(vnis: frozenset[int]) -> Transaction:
    tx = Transaction(TABLE)
    tx.add_table()
    tx.delete_table()
    tx.add_table()
    tx.add_chain("mark", Hook(HOOK_OUTPUT, -150, "route"))
    tx.add_chain("out", Hook(HOOK_POSTROUTING, 0, "filter"))
    tx.add_chain("in", Hook(HOOK_INPUT, 0, "filter"))
    for vni in sorted(vnis):
        tx.add_counter(f"plaintext-out-{vni}")
        tx.add_counter(f"plaintext-in-{vni}")
        tx.add_rule(
            "mark",
            [
                *_rule_key(vni),
                E.immediate(E.REG_1, E.u32_host(ESP_MARK)),
                E.meta_set(E.META_MARK, E.REG_1),
            ],
            comment=f"VXLAN {vni} is encrypted: route it through the ESP policy",
        )
        tx.add_rule(
            "out",
            [
                *_rule_key(vni),
                E.Expr("rt", attr_be32(1, E.REG_1) + attr_be32(2, NFT_RT_XFRM)),
                E.cmp(E.CMP_EQ, E.REG_1, b"\0"),
                _count(f"plaintext-out-{vni}"),
                E.verdict(E.NF_DROP),
            ],
            comment=f"VXLAN {vni} never leaves unencrypted",
        )
        tx.add_rule(
            "in",
            [
                *_rule_key(vni),
                E.meta_load(NFT_META_SECPATH, E.REG_1),
                E.cmp(E.CMP_EQ, E.REG_1, b"\0"),
                _count(f"plaintext-in-{vni}"),
                E.verdict(E.NF_DROP),
            ],
            comment=f"VXLAN {vni} is accepted only if it came in ESP",
        )
    return tx


@dataclass
class EspReport:
    protected: set[int] = field(default_factory=set)  # VNIs whose traffic ESP carries
    refused: set[str] = field(default_factory=set)  # encrypted networks not to attach
    errors: dict[str, str] = field(default_factory=dict)
    changes: int = 0


class Ipsec:
    """Keeps one node's ESP associations, policies and table equal to its mesh state."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._support: str | None = None  # None: not probed yet; "": supported; else why not
        self._applied: Desired | None = None

    def probe(self) -> str:
        """Empty if this kernel can carry ESP with AES-GCM, else what `ip xfrm` said."""
        src, dst, spi = _PROBE
        probe = SA(src, dst, spi, bytes(SA_KEY_BYTES))
        done = _ip(self.netns, [_sa_add(probe, replay=False), _sa_del(src, dst, spi)])
        if done.returncode == 0:
            return ""
        lines = [ln for ln in done.stderr.splitlines() if not ln.startswith("Command failed")]
        return "; ".join(lines).strip() or f"ip xfrm exited with {done.returncode}"

    def reconcile(self, state: MeshState, full: bool) -> EspReport:
        report = EspReport()
        want = desired(state)
        encrypted = [n for n in state.networks if n.encrypted and state.node in n.gateways]
        if not encrypted:
            # left from before (another run, or networks that were encrypted): once
            if self._applied is None or self._applied.vnis:
                try:
                    report.changes += self.cleanup()
                except (NftError, IpsecError, OSError) as e:
                    report.errors["encryption"] = f"removing ESP state: {e}"
                    return report
            self._applied = want
            return report
        if state.encryption is None:
            for n in encrypted:
                report.refused.add(n.name)
                report.errors[f"network {n.name}"] = (
                    f"network {n.name} is encrypted, but the mesh state carries no encryption "
                    "keys (encryption.keys); refusing to attach it rather than send its traffic "
                    "in the clear"
                )
            return report
        if self._support is None or (self._support and full):
            self._support = self.probe()
        if self._support:
            for n in encrypted:
                report.refused.add(n.name)
                report.errors[f"network {n.name}"] = (
                    f"network {n.name} is encrypted, and this kernel cannot encrypt overlay "
                    f"traffic (ESP with {AEAD}: {self._support}); refusing to attach it rather "
                    "than send its traffic in the clear. Run this node on a kernel with "
                    "CONFIG_INET_ESP and CONFIG_CRYPTO_GCM (Debian's does: `shoal lab up --vm`), "
                    "or make the network unencrypted"
                )
            return report
        if self._applied == want and not full:
            report.protected = set(want.vnis)
            return report
        before, self._applied = self._applied, None
        try:
            # a rotation changes SAs only; the table follows the encrypted VNIs
            if full or before is None or before.vnis != want.vnis:
                with run_in_netns(self.netns, NftSocket) as sock:
                    _table(want.vnis).commit(sock)
                report.changes += 1
            report.changes += self._xfrm(want)
        except (NftError, IpsecError, OSError) as e:
            # Whatever is half done, the table (if in) still drops plaintext: refuse to
            # attach until a sync succeeds.
            for n in encrypted:
                report.refused.add(n.name)
            report.errors["encryption"] = str(e)
            return report
        self._applied = want
        report.protected = set(want.vnis)
        return report

    def _xfrm(self, want: Desired) -> int:
        listed = _listed(self.netns)
        have_sas = parse_states(listed)
        have_pols = parse_policies(listed)
        want_ids = {sa.id for sa in want.sas}
        # Rotation order: new SAs, then policies onto them, then old policies and SAs out.
        # Inbound SAs keep a replay window; an outbound one has none to keep.
        new = sorted((sa for sa in want.sas if sa.id not in have_sas), key=lambda sa: sa.id)
        batch = [_sa_add(sa, replay=sa.dst == want.here) for sa in new]
        for p in sorted(want.policies, key=lambda p: (p.src, p.dst)):
            spi = have_pols.get((p.src, p.dst))
            if spi is None:
                batch.append(_policy("add", p))
            elif spi != p.spi:
                batch.append(_policy("update", p))
        wanted_pols = {(p.src, p.dst) for p in want.policies}
        batch += [_policy_del(src, dst) for src, dst in sorted(set(have_pols) - wanted_pols)]
        batch += [_sa_del(*sa_id) for sa_id in sorted(have_sas - want_ids)]
        if not batch:
            return 0
        done = _ip(self.netns, batch)
        if done.returncode != 0:
            raise IpsecError(f"programming ESP failed: {done.stderr.strip()}")
        log.info("ESP: %d change(s)", len(batch))
        return len(batch)

    def cleanup(self) -> int:
        """Remove our table, policies and SAs; returns how many objects went."""
        removed = 0
        try:
            tx = Transaction(TABLE)
            tx.delete_table()
            with run_in_netns(self.netns, NftSocket) as sock:
                tx.commit(sock)
            removed += 1
        except NftError as e:
            if e.errnos != {errno.ENOENT}:
                raise
        listed = _listed(self.netns)
        batch = [_policy_del(s, d) for s, d in sorted(parse_policies(listed))]
        batch += [_sa_del(*sa) for sa in sorted(parse_states(listed))]
        if batch:
            _ip(self.netns, batch)
            removed += len(batch)
        self._applied = None
        return removed
