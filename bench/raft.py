"""bench/raft: the managers' replicated store against etcd, 3 members each, on loopback.

    python -m bench.raft [--seconds 5] [--warmup 1] [--reps 5] [--clients 1,64] [--trials 20]
                         [--shoal-tick S] [--shoal-election-tick N] [--no-etcd]
                         [--debug] [--node-wrapper SCRIPT]

Shoal: three `python -m bench.raftnode` processes (RaftLog + Store + gRPC server each, WAL
on disk under a temporary directory in /tmp, plain TCP on 127.0.0.1: mutual TLS between
managers arrives with issue #5), formed as shoald will form them: the first bootstraps, the
others join as learners and are promoted.

etcd: Debian's etcd-server (3.4), three members on 127.0.0.1, default settings (heartbeat
100 ms, election timeout 1000 ms, fsync on), data under the same temporary directory.

Throughput and latency, closed loop: N clients each write, wait for the acknowledgement and
write again, for --seconds after --warmup; committed writes/s and p50/p99 latency of each
write. A Shoal client is a coroutine in the leader's process calling `store.update(fn)` that
puts one Node object (what the API does for a request); an etcd client is a coroutine in this
driver's process doing a gRPC KV.Put of a value as large as Shoal's log entry, all clients on
one HTTP/2 connection to the leader (etcd's own benchmark tool defaults to one connection).
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

Prints a table; raw JSON goes to bench/results/raft-<time>.json.
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
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import uvloop
from grpc import aio

from bench.raftnode import percentile

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


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
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

    def __init__(self, rid: int, port: int, directory: Path, extra: list[str], command: list[str]):
        self.id = rid
        self.command = command
        self.port = port
        self.addr = f"127.0.0.1:{port}"
        self.dir = directory
        self.extra = extra
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
        await asyncio.wait_for(ready, 30)

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
    name = "shoal"

    def __init__(self, work: Path, extra: list[str], command: list[str] | None = None):
        ports = free_ports(3)
        command = command or [sys.executable, "-m", "bench.raftnode"]
        self.nodes = {
            i: ShoalNode(i, ports[i - 1], work / f"shoal{i}", extra, command) for i in (1, 2, 3)
        }
        for n in self.nodes.values():
            n.dir.mkdir(parents=True)
        self.elections: list[float] = []  # per failover: kill -> a survivor won the election

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
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    work: Path
    members: dict[int, EtcdMember] = field(default_factory=dict)
    name: str = "etcd"

    def __post_init__(self) -> None:
        ports = free_ports(6)
        for i in (1, 2, 3):
            d = self.work / f"etcd{i}"
            d.mkdir(parents=True)
            self.members[i] = EtcdMember(i, ports[2 * i - 2], ports[2 * i - 1], d)

    def _start(self, m: EtcdMember) -> None:
        initial = ",".join(
            f"e{o.index}=http://127.0.0.1:{o.peer_port}" for o in self.members.values()
        )
        log_file = _append(m.dir / "etcd.log")
        try:
            m.proc = subprocess.Popen(
                [
                    "etcd",
                    "--name",
                    f"e{m.index}",
                    "--data-dir",
                    str(m.dir / "data"),
                    "--listen-client-urls",
                    f"http://{m.endpoint}",
                    "--advertise-client-urls",
                    f"http://{m.endpoint}",
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{m.peer_port}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{m.peer_port}",
                    "--initial-cluster",
                    initial,
                    "--initial-cluster-token",
                    "bench-raft",
                    "--initial-cluster-state",
                    "new",
                    "--logger",
                    "zap",
                    "--log-level",
                    "warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        finally:
            log_file.close()
        if m.channel is None:
            m.channel = aio.insecure_channel(m.endpoint)

    async def form(self) -> None:
        for m in self.members.values():
            self._start(m)
        await self.settle()

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


def print_table(summary: dict[str, Any], clients: list[int]) -> None:
    load = summary["load"]
    if load:
        _print_load(load, clients)
    if any(f["trials"] for f in summary["failover"].values()):
        _print_failover(summary["failover"])


def _print_load(load: dict[str, Any], clients: list[int]) -> None:
    print()
    print("| clients | system | writes/s | p50 ms | p99 ms | CPU ms/write | shoal/etcd writes/s |")
    print("|---|---|---|---|---|---|---|")
    for c in clients:
        for system in ("shoal", "etcd"):
            row = load.get(f"{system} c{c}")
            if row is None:
                continue
            ratio = ""
            if system == "shoal" and f"etcd c{c}" in load:
                ratio = f"{row['writes_per_s'] / load[f'etcd c{c}']['writes_per_s']:.2f}"
            print(
                f"| {c} | {system} | {row['writes_per_s']:,.0f} | {row['p50_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {row['cpu_ms_per_write']:.2f} | {ratio} |"
            )


def _print_failover(failover: dict[str, Any]) -> None:
    print()
    print("| failover | trials | median s | p90 s | min s | max s |")
    print("|---|---|---|---|---|---|")
    for system, f in failover.items():
        print(
            f"| {system} | {f['trials']} | {f['median_s']:.3f} | {f['p90_s']:.3f} | "
            f"{f['min_s']:.3f} | {f['max_s']:.3f} |"
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-raft-", dir="/tmp"))
    extra: list[str] = ["--verbose"] if args.debug else []
    if args.shoal_tick is not None:
        extra += ["--tick", str(args.shoal_tick)]
    if args.shoal_election_tick is not None:
        extra += ["--election-tick", str(args.shoal_election_tick)]
    command = [sys.executable, args.node_wrapper] if args.node_wrapper else None
    shoal = ShoalCluster(work, extra, command)
    etcd = EtcdCluster(work) if args.etcd else None
    clients = [int(c) for c in args.clients.split(",")]
    runs: list[dict[str, Any]] = []
    failovers: dict[str, list[float]] = {"shoal": []}
    try:
        log(f"forming the clusters in {work}")
        await shoal.form()
        if etcd is not None:
            failovers["etcd"] = []
            await etcd.form()
        size = await shoal.entry_bytes()
        log(f"a Shoal write is a {size}-byte log entry; etcd values are as large")

        async def one(system: str, c: int) -> None:
            # CPU of the whole system per write: the three members, and for etcd its client
            # (Shoal's clients run inside its leader, so they are counted there).
            if system == "shoal":
                pids = shoal.pids()
                cpu0 = cpu_seconds(pids)
                r = await shoal.load(c, args.seconds, args.warmup)
                cpu = cpu_seconds(pids) - cpu0
            else:
                assert etcd is not None
                pids = etcd.pids()
                cpu0 = cpu_seconds(pids) + time.process_time()
                r = await etcd.load(c, args.seconds, args.warmup, size)
                cpu = cpu_seconds(pids) + time.process_time() - cpu0
            r.update(system=system, clients=c, cpu_ms_per_write=cpu / max(r["acked"], 1) * 1e3)
            runs.append(r)
            log(
                f"{system:5} c{c:<3} {r['writes_per_s']:8,.0f} writes/s  p50 {r['p50_ms']:.2f} ms"
                f"  p99 {r['p99_ms']:.2f} ms  CPU {r['cpu_ms_per_write']:.2f} ms/write"
                f"  errors {r['errors']}"
                + (f"  elections {r['elections']}" if "elections" in r else "")
            )

        systems = ["shoal", "etcd"] if etcd is not None else ["shoal"]
        for rep in range(args.reps):
            order = systems if rep % 2 == 0 else systems[::-1]
            for c in clients:
                for system in order:
                    await one(system, c)
        for trial in range(args.trials):
            order = systems if trial % 2 == 0 else systems[::-1]
            for system in order:
                cluster: ShoalCluster | EtcdCluster = shoal if system == "shoal" else etcd  # type: ignore[assignment]
                t = await cluster.failover()
                failovers[system].append(t)
                note = f" (elected after {shoal.elections[-1]:.3f} s)" if system == "shoal" else ""
                log(f"failover {trial + 1:2}/{args.trials} {system:5} {t:.3f} s{note}")
    finally:
        await shoal.close()
        if etcd is not None:
            await etcd.close()
        if args.debug:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs, failovers)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
        "entry_bytes": size,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "runs": runs,
        "failovers": failovers,
        "shoal_elections": shoal.elections,
        "summary": summary,
    }


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
    print_table(result["summary"], [int(c) for c in args.clients.split(",")])
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"raft-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
