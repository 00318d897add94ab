"""bench/raft: the managers' replicated store against etcd, 3 members each, on loopback.

    python -m bench.raft [--seconds 5] [--warmup 1] [--reps 5] [--clients 1,64] [--trials 20]
                         [--tls on|off|both] [--shoal-tick S] [--shoal-election-tick N]
                         [--no-etcd] [--debug] [--node-wrapper SCRIPT]

Shoal: three `python -m bench.raftnode` processes (RaftNode + Store + gRPC server each, WAL
on disk under a temporary directory in /tmp, encrypted at rest as every manager's is:
orchestrator/raft/sealing.py), formed as shoald will form them: the first bootstraps, the
others join as learners and are promoted. With TLS (the default) they talk mutual TLS as real
managers do (`ManagerRuntime`): this driver makes a root CA (`RootCA.create()`) and signs each
member a manager certificate of one cluster ID from it (`NodeCSR`, `Issuer.sign_csr`), saved
with `NodeCertificates.create` in the member's directory; the member serves behind the
manager's `AuthInterceptor` with `control_server_credentials()` and dials the others with
`certs.channel(target, LINK_OPTIONS)`. Without TLS: plain TCP, as before mutual TLS
(docs/security.md).

etcd: Debian's etcd-server (3.4), three members on 127.0.0.1, default settings (heartbeat
100 ms, election timeout 1000 ms, fsync on), data under the same temporary directory. With TLS
it gets what Shoal gets: peer mutual TLS (--peer-cert-file, --peer-key-file,
--peer-trusted-ca-file, --peer-client-cert-auth) and client TLS with client certificates
(--cert-file, --key-file, --trusted-ca-file, --client-cert-auth), https URLs, from a root CA
of its own made as the swarm's is (`EtcdPKI`: orchestrator/ca/pki.py's `RootCA` and node
certificates, with an IP SAN for 127.0.0.1), and this driver dials it with a client
certificate. Each member's log is checked for https URLs (client and peer) before
anything is measured.

--tls on|off|both: `both` runs a TLS and a plain cluster of each system side by side, so one
run shows what TLS costs each of them (tls/plain columns).

Throughput and latency, closed loop: N clients each write, wait for the acknowledgement and
write again, for --seconds after --warmup; committed writes/s and p50/p99 latency of each
write. A Shoal client is a coroutine in the leader's process calling `store.update(fn)` that
puts one Node object (what the API does for a request); an etcd client is a coroutine in this
driver's process doing a gRPC KV.Put of a value as large as Shoal's log entry, all clients on
one HTTP/2 connection to the leader (etcd's own benchmark tool defaults to one connection).
So with TLS, etcd's writes also cross a TLS client connection, Shoal's only the links between
members (an API request's client connection is not measured).
Runs alternate between the systems (and which goes first), --reps times; medians reported.
Also per run: CPU per write of the whole system (user + system time of the three members and,
for etcd, of this driver, its client; divided by all acknowledged writes), which the noise of
a shared machine disturbs much less than throughput; and elections during the run (0 unless a
leader lost its followers under load).

Failover, --trials times per system, interleaved: SIGKILL the leader's process; right after,
on each surviving member a client starts a write attempt every 20 ms (each on its own key,
each given up after 0.25 s) until one is acknowledged. Failover = kill → first
acknowledgement. The killed member is restarted from its disk and the cluster left to settle
before the next trial.

Prints a table (with shoal/etcd ratios, and tls/plain ones with --tls both); raw JSON goes to
bench/results/raft-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc
import uvloop
from grpc import aio

from bench.raftnode import percentile
from orchestrator.ca.certs import NodeCertificates
from orchestrator.ca.pki import DEFAULT_NODE_CERT_EXPIRY, NodeCSR, RootCA
from orchestrator.ca.tls import NodeCredentials
from orchestrator.store.objects import Role

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
FAILOVER_EVERY = 0.02  # seconds between write attempts while waiting for a new leader
# Each failover write attempt is given up after this: an etcd put forwarded to the dead leader
# would otherwise hang for etcd's request timeout (7 s), and a pile of Shoal writes waiting for
# a leader would all retry at once on the election (the first acknowledgement then waits for
# the whole batch to be applied).
ATTEMPT_TIMEOUT = 0.25
T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def system_name(product: str, tls: bool) -> str:
    return f"{product} {'tls' if tls else 'plain'}"


_HANDED_OUT: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together so they differ), none
    handed out before: several clusters run side by side."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                ports.append(port)
        _HANDED_OUT.update(ports)
        return ports
    finally:
        for s in socks:
            s.close()


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (0 for one that is gone)."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    return total


def _with_root_on_path() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _append(path: Path) -> BinaryIO:
    """A log file for a child process (which keeps its own descriptor: close ours after)."""
    return open(path, "ab")


async def until(cond: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- Shoal: bench/raftnode processes ---------------------------------------------------------


class ShoalNode:
    """One bench/raftnode process and its JSON-lines control channel."""

    def __init__(
        self,
        rid: int,
        port: int,
        directory: Path,
        extra: list[str],
        command: list[str],
        tls: bool,
    ):
        self.id = rid
        self.command = command
        self.port = port
        self.addr = f"127.0.0.1:{port}"
        self.dir = directory
        self.extra = extra
        self.tls = tls
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._rid = 0

    async def start(self, bootstrap: bool = False, known: dict[int, str] | None = None) -> None:
        args = [
            *self.command,
            "--id",
            str(self.id),
            "--dir",
            str(self.dir / "raft"),
            "--port",
            str(self.port),
            *(["--certs", str(self.certs_dir)] if self.tls else ["--plain"]),
            *self.extra,
        ]
        if bootstrap:
            args.append("--bootstrap")
        for rid, addr in (known or {}).items():
            args += ["--known", f"{rid}={addr}"]
        stderr = _append(self.dir / "stderr.log")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=ROOT,
                env=_with_root_on_path(),  # for a --node-wrapper script outside the tree
                limit=1 << 20,
            )
        finally:
            stderr.close()
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting = {0: ready}
        self._rid = 0
        self._reader = asyncio.create_task(self._read())
        doc = await asyncio.wait_for(ready, 30)
        if doc.get("tls") is not self.tls:
            raise RuntimeError(f"raftnode {self.id}: tls {doc.get('tls')}, wanted {self.tls}")

    @property
    def certs_dir(self) -> Path:
        return self.dir / "certificates"

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            doc = json.loads(line)
            fut = self._waiting.pop(int(doc.get("rid", -1)), None)
            if fut is not None and not fut.done():
                fut.set_result(doc)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"raftnode {self.id} exited"))
        self._waiting = {}

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def call(self, op: str, wait: float = 30.0, **kw: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self._rid += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._rid] = fut
        self.proc.stdin.write(json.dumps({"rid": self._rid, "op": op, **kw}).encode() + b"\n")
        doc = await asyncio.wait_for(fut, wait)
        if "error" in doc:
            raise RuntimeError(f"raftnode {self.id} {op}: {doc['error']}")
        return doc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def wait(self) -> None:
        if self.proc is not None:
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the node closes its log and exits
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.kill()
        await self.wait()


class ShoalCluster:
    product = "shoal"

    def __init__(
        self, work: Path, extra: list[str], command: list[str] | None = None, tls: bool = True
    ):
        self.tls = tls
        self.name = system_name(self.product, tls)
        ports = free_ports(3)
        command = command or [sys.executable, "-m", "bench.raftnode"]
        tag = "tls" if tls else "plain"
        self.nodes = {
            i: ShoalNode(i, ports[i - 1], work / f"shoal-{tag}{i}", extra, command, tls)
            for i in (1, 2, 3)
        }
        for n in self.nodes.values():
            n.dir.mkdir(parents=True)
        if tls:
            self._issue_certificates()
        self.elections: list[float] = []  # per failover: kill -> a survivor won the election

    def _issue_certificates(self) -> None:
        """What `swarm init` and joins give managers: one root CA, and for each member a key
        and a manager certificate of one cluster, saved as shoald saves them."""
        root = RootCA.create()
        issuer = root.issuer(DEFAULT_NODE_CERT_EXPIRY)
        cluster_id = f"bench-raft-{os.urandom(6).hex()}"
        for n in self.nodes.values():
            csr = NodeCSR.generate()
            chain = issuer.sign_csr(
                csr.pem, node_id=f"manager-{n.id}", role=Role.MANAGER, cluster_id=cluster_id
            )
            NodeCertificates.create(n.certs_dir, NodeCredentials(csr.key_pem, chain, root.cert_pem))

    async def form(self) -> None:
        first = self.nodes[1]
        await first.start(bootstrap=True)
        await until(self._is_leader(first), 10, "the first manager to lead")
        for rid in (2, 3):
            node = self.nodes[rid]
            await node.start(known={1: first.addr})
            await first.call("add_learner", id=rid, addr=node.addr)

            async def caught_up(rid: int = rid) -> bool:
                return bool((await first.call("caught_up", id=rid))["caught_up"])

            await until(caught_up, 20, f"manager {rid} to catch up")
            await first.call("promote", id=rid)
        await self.settle()

    @staticmethod
    def _is_leader(node: ShoalNode) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return bool((await node.call("status"))["is_leader"])

        return check

    async def statuses(self) -> dict[int, dict[str, Any]]:
        live = [n for n in self.nodes.values() if n.alive]
        docs = await asyncio.gather(*(n.call("status") for n in live))
        return {n.id: d for n, d in zip(live, docs, strict=True)}

    async def leader(self) -> ShoalNode:
        st = await self.statuses()
        leaders = [rid for rid, d in st.items() if d["is_leader"]]
        if len(leaders) != 1:
            raise RuntimeError(f"no single leader: {st}")
        return self.nodes[leaders[0]]

    async def settle(self) -> None:
        """All three up, agreeing on one leader, and applied to within a few entries."""

        async def settled() -> bool:
            if not all(n.alive for n in self.nodes.values()):
                return False
            st = await self.statuses()
            leaders = {d["leader"] for d in st.values()}
            applied = [d["applied"] for d in st.values()]
            lead = next(iter(leaders))
            return (
                len(leaders) == 1
                and lead != 0
                and st[lead]["is_leader"]
                and len(st[lead]["voters"]) == 3
                and max(applied) - min(applied) <= 2
            )

        await until(settled, 30, "the Shoal cluster to settle")

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes.values() if n.proc is not None and n.alive]

    async def load(self, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
        leader = await self.leader()
        term = (await leader.call("status"))["term"]
        out = await leader.call(
            "load", wait=seconds + warmup + 60, clients=clients, seconds=seconds, warmup=warmup
        )
        # an election under load would show here (a stalled leader losing its followers)
        out["elections"] = (await leader.call("status"))["term"] - term
        out.pop("rid", None)
        out["writes_per_s"] = out["writes"] / seconds
        out["leader_cpu"] = out["cpu_s"] / out["wall_s"]  # its share of one core
        return out

    async def entry_bytes(self) -> int:
        out = await self.load(1, 0.2, 0.0)
        return int(out["entry_bytes"])

    async def failover(self) -> float:
        leader = await self.leader()
        survivors = [n for n in self.nodes.values() if n is not leader]
        t0 = time.monotonic()
        leader.kill()
        log(f"killed shoal {leader.id} at {time.time():.3f}")
        acks = await asyncio.gather(
            *(
                n.call(
                    "first_ack", wait=30, every=FAILOVER_EVERY, attempt=ATTEMPT_TIMEOUT, within=20
                )
                for n in survivors
            )
        )
        times = [a["acked_at"] for a in acks if a.get("acked_at") is not None]
        elected = [a["elected_at"] for a in acks if (a.get("elected_at") or 0) > t0]
        self.elections.append(min(elected) - t0 if elected else float("nan"))
        await leader.wait()
        await leader.start(known={n.id: n.addr for n in survivors})
        await self.settle()
        if not times:
            raise RuntimeError("no write was acknowledged after the leader's death")
        return float(min(times)) - t0

    async def close(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes.values()))


# --- etcd ------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _fields(raw: bytes) -> dict[int, int | bytes]:
    """The top-level fields of a protobuf message (last one wins; enough for Status)."""
    out: dict[int, int | bytes] = {}
    off = 0

    def varint() -> int:
        nonlocal off
        shift = value = 0
        while True:
            b = raw[off]
            off += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while off < len(raw):
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            out[num] = varint()
        elif wire == 2:
            n = varint()
            out[num] = raw[off : off + n]
            off += n
        elif wire == 1:
            off += 8
        elif wire == 5:
            off += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def _identity(b: bytes) -> bytes:
    return b


@dataclass(frozen=True)
class EtcdPKI:
    """etcd's certificates, from the swarm's own PKI (orchestrator/ca/pki.py): a root CA of its
    own (`RootCA.create()`, ECDSA P-256) and a node certificate for each member, used for its
    client and its peer ports, and one for this driver's client. etcd dials its peers and this
    driver dials etcd by address, so each certificate also names 127.0.0.1 (an IP SAN)."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @classmethod
    def create(cls, directory: Path, names: list[str]) -> EtcdPKI:
        directory.mkdir(mode=0o700, parents=True)
        pki = cls(directory)
        root = RootCA.create()
        issuer = root.issuer(DEFAULT_NODE_CERT_EXPIRY)
        pki.ca.write_bytes(root.cert_pem)
        for name in names:
            csr = NodeCSR.generate()
            chain = issuer.sign_csr(
                csr.pem,
                node_id=name,
                role=Role.MANAGER,
                cluster_id="bench-etcd",
                ip_addresses=[IPv4Address("127.0.0.1")],
            )
            pki.cert(name).write_bytes(chain)
            pki.key(name).write_bytes(csr.key_pem)
            pki.key(name).chmod(0o600)
        return pki

    def channel_credentials(self, name: str) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key(name).read_bytes(),
            certificate_chain=self.cert(name).read_bytes(),
        )


@dataclass
class EtcdMember:
    index: int
    client_port: int
    peer_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    channel: aio.Channel | None = None
    member_id: int = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "etcd.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


CLIENT = "client"  # the driver's certificate


@dataclass
class EtcdCluster:
    work: Path
    tls: bool = True
    members: dict[int, EtcdMember] = field(default_factory=dict)
    product: str = "etcd"
    pki: EtcdPKI | None = None

    def __post_init__(self) -> None:
        self.name = system_name(self.product, self.tls)
        tag = "tls" if self.tls else "plain"
        ports = free_ports(6)
        for i in (1, 2, 3):
            d = self.work / f"etcd-{tag}{i}"
            d.mkdir(parents=True)
            self.members[i] = EtcdMember(i, ports[2 * i - 2], ports[2 * i - 1], d)
        if self.tls:
            self.pki = EtcdPKI.create(
                self.work / f"etcd-{tag}-pki", [*(f"e{i}" for i in self.members), CLIENT]
            )

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def _tls_flags(self, m: EtcdMember) -> list[str]:
        if self.pki is None:
            return []
        cert, key, ca = (
            str(self.pki.cert(f"e{m.index}")),
            str(self.pki.key(f"e{m.index}")),
            str(self.pki.ca),
        )
        return [
            "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca,
            "--client-cert-auth",
            "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca,
            "--peer-client-cert-auth",
        ]  # fmt: skip

    def _start(self, m: EtcdMember) -> None:
        url = self.scheme
        initial = ",".join(
            f"e{o.index}={url}://127.0.0.1:{o.peer_port}" for o in self.members.values()
        )
        log_file = _append(m.log_path)
        try:
            m.proc = subprocess.Popen(
                [
                    "etcd",
                    "--name",
                    f"e{m.index}",
                    "--data-dir",
                    str(m.dir / "data"),
                    "--listen-client-urls",
                    f"{url}://{m.endpoint}",
                    "--advertise-client-urls",
                    f"{url}://{m.endpoint}",
                    "--listen-peer-urls",
                    f"{url}://127.0.0.1:{m.peer_port}",
                    "--initial-advertise-peer-urls",
                    f"{url}://127.0.0.1:{m.peer_port}",
                    "--initial-cluster",
                    initial,
                    "--initial-cluster-token",
                    f"bench-raft-{self.name.replace(' ', '-')}",
                    "--initial-cluster-state",
                    "new",
                    *self._tls_flags(m),
                    "--logger",
                    "zap",
                    "--log-level",
                    "info",  # for the URLs and TLS settings it serves with (checked in form)
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        finally:
            log_file.close()
        if m.channel is None:
            if self.pki is not None:
                m.channel = aio.secure_channel(m.endpoint, self.pki.channel_credentials(CLIENT))
            else:
                m.channel = aio.insecure_channel(m.endpoint)

    def check_logs(self) -> None:
        """Each member says it serves clients and peers with TLS (or without) on our URLs."""
        for m in self.members.values():
            text = m.log_path.read_text(errors="replace")
            want = [
                f"{self.scheme}://{m.endpoint}",
                f"{self.scheme}://127.0.0.1:{m.peer_port}",
            ]
            if self.tls:
                # etcd 3.4's zap logger, at start: its TLS settings for each port (tls-info
                # names the files and says "client-cert-auth = true"), then how it serves
                want += [
                    '"msg":"starting with peer TLS"',
                    '"msg":"starting with client TLS"',
                    "client-cert-auth = true",
                    '"msg":"serving client traffic securely"',
                ]
            else:
                want += ['"msg":"serving client traffic insecurely']
            missing = [w for w in want if w not in text]
            if missing:
                raise RuntimeError(f"{m.log_path}: no {missing}")

    async def form(self) -> None:
        for m in self.members.values():
            self._start(m)
        await self.settle()
        self.check_logs()

    async def status(self, m: EtcdMember) -> tuple[int, int, int, int] | None:
        """(this member's id, its leader, its raft index, its raft term), None if it does not
        answer."""
        assert m.channel is not None
        call = m.channel.unary_unary(
            "/etcdserverpb.Maintenance/Status",
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        try:
            raw = await call(b"", timeout=1.0)
        except aio.AioRpcError:
            return None
        doc = _fields(raw)
        header = doc.get(1, b"")
        member = _fields(header).get(2, 0) if isinstance(header, bytes) else 0
        leader, index, term = doc.get(4, 0), doc.get(5, 0), doc.get(6, 0)
        assert isinstance(member, int) and isinstance(leader, int)
        assert isinstance(index, int) and isinstance(term, int)
        return member, leader, index, term

    async def statuses(self) -> dict[int, tuple[int, int, int, int] | None]:
        live = [m for m in self.members.values() if m.alive]
        docs = await asyncio.gather(*(self.status(m) for m in live))
        return {m.index: d for m, d in zip(live, docs, strict=True)}

    async def settle(self) -> None:
        async def settled() -> bool:
            if not all(m.alive for m in self.members.values()):
                return False
            st = await self.statuses()
            if any(d is None for d in st.values()):
                return False
            for i, d in st.items():
                assert d is not None
                self.members[i].member_id = d[0]
            leaders = {d[1] for d in st.values() if d is not None}
            indexes = [d[2] for d in st.values() if d is not None]
            return len(leaders) == 1 and 0 not in leaders and max(indexes) - min(indexes) <= 2

        await until(settled, 30, "the etcd cluster to settle")

    async def leader(self) -> EtcdMember:
        st = await self.statuses()
        leaders = {d[1] for d in st.values() if d is not None}
        for m in self.members.values():
            if leaders == {m.member_id}:
                return m
        raise RuntimeError(f"no single etcd leader: {st}")

    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.members.values() if m.proc is not None and m.alive]

    @staticmethod
    def _put(m: EtcdMember) -> aio.UnaryUnaryMultiCallable[bytes, bytes]:
        assert m.channel is not None
        return m.channel.unary_unary(
            "/etcdserverpb.KV/Put", request_serializer=_identity, response_deserializer=_identity
        )

    async def load(
        self, clients: int, seconds: float, warmup: float, value_bytes: int
    ) -> dict[str, Any]:
        """The same closed loop as bench/raftnode's, as gRPC KV.Put calls to the leader."""
        leader = await self.leader()
        before = await self.status(leader)
        put = self._put(leader)
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds
        start = time.perf_counter()
        t_from, t_to = start + warmup, start + warmup + seconds
        latencies: list[float] = []
        errors: list[str] = []
        acked = 0
        value = b"v" * value_bytes

        async def client(cid: int) -> None:
            nonlocal acked
            req = _field(1, f"/bench/{cid}".encode()) + _field(2, value)
            while True:
                t0 = time.perf_counter()
                if t0 >= t_to:
                    return
                try:
                    await put(req, timeout=10)
                except aio.AioRpcError as e:
                    errors.append(str(e.details()))
                    await asyncio.sleep(0.01)
                    continue
                t1 = time.perf_counter()
                acked += 1
                if t_from <= t0 and t1 < t_to:
                    latencies.append(t1 - t0)

        cpu0 = time.process_time()
        await asyncio.gather(*(client(c) for c in range(clients)))
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - start
        after = await self.status(leader)
        elections = after[3] - before[3] if before and after else -1
        return {
            "elections": elections,
            "writes": len(latencies),
            "acked": acked,
            "seconds": seconds,
            "writes_per_s": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "errors": len(errors),
            "first_error": errors[0] if errors else "",
            "value_bytes": value_bytes,
            "client_cpu": cpu / wall,
        }

    async def failover(self) -> float:
        leader = await self.leader()
        survivors = [m for m in self.members.values() if m is not leader]
        assert leader.proc is not None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[float] = loop.create_future()
        t0 = time.monotonic()
        leader.proc.send_signal(signal.SIGKILL)
        puts = [self._put(m) for m in survivors]

        async def attempt(put: aio.UnaryUnaryMultiCallable[bytes, bytes], key: bytes) -> None:
            with contextlib.suppress(aio.AioRpcError):
                await put(_field(1, key) + _field(2, b"x"), timeout=ATTEMPT_TIMEOUT)
                if not done.done():
                    done.set_result(time.monotonic())

        attempts: list[asyncio.Task[None]] = []
        i = 0
        deadline = t0 + 20
        while not done.done() and time.monotonic() < deadline:
            for put in puts:
                attempts.append(asyncio.create_task(attempt(put, f"/fo/{i}".encode())))
                i += 1
            await asyncio.wait([done], timeout=FAILOVER_EVERY)
        for t in attempts:
            t.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        leader.proc.wait()
        self._start(leader)
        await self.settle()
        if not done.done():
            raise RuntimeError("no etcd write was acknowledged after the leader's death")
        return done.result() - t0

    async def close(self) -> None:
        for m in self.members.values():
            if m.alive:
                assert m.proc is not None
                m.proc.terminate()
        for m in self.members.values():
            if m.proc is not None:
                try:
                    m.proc.wait(10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()
            if m.channel is not None:
                await m.channel.close()


# --- the run ---------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[dict[str, Any]], failovers: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"load": {}, "failover": {}}
    for r in runs:
        key = f"{r['system']} c{r['clients']}"
        out["load"].setdefault(key, []).append(r)
    table = {}
    for key, rs in out["load"].items():
        table[key] = {
            "writes_per_s": _median([r["writes_per_s"] for r in rs]),
            "p50_ms": _median([r["p50_ms"] for r in rs]),
            "p99_ms": _median([r["p99_ms"] for r in rs]),
            "cpu_ms_per_write": _median([r["cpu_ms_per_write"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "elections": sum(r.get("elections", 0) for r in rs),
            "reps": len(rs),
        }
    out["load"] = table
    for system, times in failovers.items():
        out["failover"][system] = {
            "trials": len(times),
            "median_s": _median(times),
            "p90_s": percentile(times, 90),
            "min_s": min(times) if times else float("nan"),
            "max_s": max(times) if times else float("nan"),
        }
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else ""


def print_table(summary: dict[str, Any], clients: list[int], systems: list[str]) -> None:
    load = summary["load"]
    if load:
        _print_load(load, clients, systems)
    if any(f["trials"] for f in summary["failover"].values()):
        _print_failover(summary["failover"], systems)


def _other(system: str) -> tuple[str, str]:
    """The same product with the other TLS setting, and the other product with the same one."""
    product, _, tls = system.partition(" ")
    flipped = "plain" if tls == "tls" else "tls"
    return f"{product} {flipped}", f"{'etcd' if product == 'shoal' else 'shoal'} {tls}"


def _print_load(load: dict[str, Any], clients: list[int], systems: list[str]) -> None:
    print()
    print(
        "| clients | system | writes/s | p50 ms | p99 ms | CPU ms/write "
        "| shoal/etcd writes/s | tls/plain writes/s | tls/plain CPU/write |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in clients:
        for system in systems:
            row = load.get(f"{system} c{c}")
            if row is None:
                continue
            plain, etcd = _other(system)
            vs_etcd = vs_plain = vs_plain_cpu = ""
            if system.startswith("shoal") and f"{etcd} c{c}" in load:
                vs_etcd = _ratio(row["writes_per_s"], load[f"{etcd} c{c}"]["writes_per_s"])
            if system.endswith("tls") and f"{plain} c{c}" in load:
                other = load[f"{plain} c{c}"]
                vs_plain = _ratio(row["writes_per_s"], other["writes_per_s"])
                vs_plain_cpu = _ratio(row["cpu_ms_per_write"], other["cpu_ms_per_write"])
            print(
                f"| {c} | {system} | {row['writes_per_s']:,.0f} | {row['p50_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {row['cpu_ms_per_write']:.2f} | {vs_etcd} | {vs_plain} "
                f"| {vs_plain_cpu} |"
            )


def _print_failover(failover: dict[str, Any], systems: list[str]) -> None:
    print()
    print(
        "| failover | trials | median s | p90 s | min s | max s "
        "| shoal/etcd median | tls/plain median |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for system in systems:
        f = failover.get(system)
        if f is None or not f["trials"]:
            continue
        plain, etcd = _other(system)
        vs_etcd = vs_plain = ""
        if system.startswith("shoal") and failover.get(etcd, {}).get("trials"):
            vs_etcd = _ratio(f["median_s"], failover[etcd]["median_s"])
        if system.endswith("tls") and failover.get(plain, {}).get("trials"):
            vs_plain = _ratio(f["median_s"], failover[plain]["median_s"])
        print(
            f"| {system} | {f['trials']} | {f['median_s']:.3f} | {f['p90_s']:.3f} | "
            f"{f['min_s']:.3f} | {f['max_s']:.3f} | {vs_etcd} | {vs_plain} |"
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-raft-", dir="/tmp"))
    extra: list[str] = ["--verbose"] if args.debug else []
    if args.shoal_tick is not None:
        extra += ["--tick", str(args.shoal_tick)]
    if args.shoal_election_tick is not None:
        extra += ["--election-tick", str(args.shoal_election_tick)]
    command = [sys.executable, args.node_wrapper] if args.node_wrapper else None
    modes = tls_modes(args.tls)
    # in the order of the table; runs alternate this order and its reverse
    clusters: dict[str, ShoalCluster | EtcdCluster] = {}
    for tls in modes:
        shoal = ShoalCluster(work, extra, command, tls=tls)
        clusters[shoal.name] = shoal
        if args.etcd:
            etcd = EtcdCluster(work, tls=tls)
            clusters[etcd.name] = etcd
    systems = list(clusters)
    clients = [int(c) for c in args.clients.split(",")]
    runs: list[dict[str, Any]] = []
    failovers: dict[str, list[float]] = {name: [] for name in systems}
    size = 0
    try:
        log(f"forming {', '.join(systems)} in {work}")
        for cluster in clusters.values():
            await cluster.form()
        first = next(c for c in clusters.values() if isinstance(c, ShoalCluster))
        size = await first.entry_bytes()
        log(f"a Shoal write is a {size}-byte log entry; etcd values are as large")

        async def one(system: str, c: int) -> None:
            # CPU of the whole system per write: the three members, and for etcd its client
            # (Shoal's clients run inside its leader, so they are counted there).
            cluster = clusters[system]
            if isinstance(cluster, ShoalCluster):
                pids = cluster.pids()
                cpu0 = cpu_seconds(pids)
                r = await cluster.load(c, args.seconds, args.warmup)
                cpu = cpu_seconds(pids) - cpu0
            else:
                pids = cluster.pids()
                cpu0 = cpu_seconds(pids) + time.process_time()
                r = await cluster.load(c, args.seconds, args.warmup, size)
                cpu = cpu_seconds(pids) + time.process_time() - cpu0
            r.update(
                system=system,
                tls=cluster.tls,
                clients=c,
                cpu_ms_per_write=cpu / max(r["acked"], 1) * 1e3,
            )
            runs.append(r)
            log(
                f"{system:11} c{c:<3} {r['writes_per_s']:8,.0f} writes/s"
                f"  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
                f"  CPU {r['cpu_ms_per_write']:.2f} ms/write  errors {r['errors']}"
                + (f"  elections {r['elections']}" if "elections" in r else "")
            )

        for rep in range(args.reps):
            order = systems if rep % 2 == 0 else systems[::-1]
            for c in clients:
                for system in order:
                    await one(system, c)
        for trial in range(args.trials):
            order = systems if trial % 2 == 0 else systems[::-1]
            for system in order:
                cluster = clusters[system]
                t = await cluster.failover()
                failovers[system].append(t)
                note = ""
                if isinstance(cluster, ShoalCluster):
                    note = f" (elected after {cluster.elections[-1]:.3f} s)"
                log(f"failover {trial + 1:2}/{args.trials} {system:11} {t:.3f} s{note}")
    finally:
        for cluster in clusters.values():
            await cluster.close()
        if args.debug:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs, failovers)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
        "systems": systems,
        "entry_bytes": size,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "runs": runs,
        "failovers": failovers,
        "shoal_elections": {
            name: c.elections for name, c in clusters.items() if isinstance(c, ShoalCluster)
        },
        "summary": summary,
    }


def tls_modes(arg: str) -> list[bool]:
    return {"on": [True], "off": [False], "both": [True, False]}[arg]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.raft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clients", default="1,64")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument(
        "--tls",
        choices=["on", "off", "both"],
        default="on",
        help="mutual TLS between members (and etcd's clients) as managers run, plain TCP, or a "
        "cluster of each side by side (default: on)",
    )
    p.add_argument("--shoal-tick", type=float, help="RaftSettings.tick (default: its default)")
    p.add_argument("--shoal-election-tick", type=int)
    p.add_argument("--no-etcd", dest="etcd", action="store_false")
    p.add_argument(
        "--debug", action="store_true", help="managers log at INFO; keep the work directory"
    )
    p.add_argument(
        "--node-wrapper",
        metavar="SCRIPT",
        help="run each manager as `python SCRIPT ARGS...` instead of `python -m bench.raftnode "
        "ARGS...` (a script that patches or traces something, then calls bench.raftnode.main)",
    )
    args = p.parse_args(argv)
    if args.etcd and shutil.which("etcd") is None:
        print("bench.raft: etcd not found (apt-get install etcd-server etcd-client)")
        return 1
    result = uvloop.run(run(args))
    print_table(result["summary"], [int(c) for c in args.clients.split(",")], result["systems"])
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"raft-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
