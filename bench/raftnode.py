"""bench/raftnode: one Shoal manager's replicated store in a process of its own, for bench/raft.

    python -m bench.raftnode --id 1 --dir DIR --port PORT (--certs CERTDIR | --plain)
                             [--bootstrap] [--known 1=HOST:PORT]
                             [--tick S] [--election-tick N] [--verbose]

It runs what a manager runs for its store (`ManagerRuntime` in orchestrator/manager/runtime.py,
without the control loops, the dispatcher, the CA and the join port): a `RaftNode` (WAL in DIR,
its records and snapshots encrypted at rest with the manager's data key, orchestrator/raft/
sealing.py, stored in the clear in DIR as without autolock) on a `GrpcTransport` under a
`Store`, served by a gRPC server on 127.0.0.1:PORT, on uvloop like shoald.

With --certs, the node's credentials are loaded from CERTDIR (`NodeCertificates.load`, the files
shoald keeps under <data-root>/certificates/, made by the driver from a root CA of its own) and
it talks mutual TLS as a manager does: its server is `jsonrpc.server` behind the manager's
`AuthInterceptor` (runtime.POLICY, the cluster ID from its certificate, an empty deny list) on a
port with `control_server_credentials()`, and its links to the other members are
`certs.channel(target, LINK_OPTIONS)`. With --plain, the same server without the
interceptor on an insecure port, and insecure links (`grpc_transport.insecure_channel`): what
managers did before mutual TLS (docs/security.md), kept to measure what TLS costs. Without
--tick/--election-tick it uses `RaftSettings()`'s defaults.

If the Raft node stops on its own (a broken invariant, a failed disk), the process logs why and
exits with status 70, as shoald's manager stops serving.

The bench driver controls it with JSON lines on stdin; every request carries an "rid" and gets
exactly one JSON line back on stdout with the same "rid" ("error" on failure). Requests run
concurrently. Operations:

    status                          leader, term, applied, voters, learners, tls
    add_learner {id, addr}          (on the leader) add a member as a learner
    caught_up {id}                  (on the leader) is that member's log close to ours?
    promote {id}                    (on the leader) make that learner a voter
    load {clients, seconds, warmup} `clients` coroutines writing as fast as they can (below)
    first_ack {every, attempt, within}
                                    a write attempt every `every` s (each given `attempt` s)
                                    until one is acknowledged;
                                    answers the CLOCK_MONOTONIC time of that acknowledgement
                                    (and of this node's last election win, if any)
    debug                           the Raft state behind a slow election or a stall: role,
                                    timers, log indexes, each follower's progress, link stats

The write: `store.update(fn)` where fn reads the client's own Node object through the
transaction and puts a changed copy (a new "seq" label), i.e. one small object per write with
the store's optimistic-concurrency check, as the API's writes are. Clients never share an
object, so no write conflicts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop
from grpc import aio

from orchestrator.ca.authz import AuthInterceptor, Authorizer, DenyList
from orchestrator.ca.certs import NodeCertificates
from orchestrator.manager.runtime import POLICY
from orchestrator.raft.grpc_transport import (
    LINK_OPTIONS,
    ChannelFactory,
    GrpcTransport,
    insecure_channel,
)
from orchestrator.raft.node import ID_LEN, RaftNode, RaftSettings
from orchestrator.raft.storage import on_disk
from orchestrator.rpc import jsonrpc
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import Node, NodeState, Role
from orchestrator.store.store import Conflict, Store, Tx

log = logging.getLogger("bench.raftnode")


def put_node(node_id: str, seq: int) -> Callable[[Tx], None]:
    """The benchmark's write: one Node object, read then replaced with a new label."""

    def fn(tx: Tx) -> None:
        node = tx.get(Node, node_id)
        if node is None:
            node = Node(
                id=node_id,
                role=Role.MANAGER,
                name=node_id,
                hostname=node_id,
                addr="127.0.0.1",
                engine_version="shoal-bench",
            )
        tx.put(dataclasses.replace(node, labels={"seq": str(seq)}, state=NodeState.READY))

    return fn


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


class BenchNode:
    def __init__(self, args: argparse.Namespace):
        settings = RaftSettings()
        if args.tick is not None:
            settings = dataclasses.replace(settings, tick=args.tick)
        if args.election_tick is not None:
            settings = dataclasses.replace(settings, election_tick=args.election_tick)
        self.settings = settings
        self.id: int = args.id
        self.addr = f"127.0.0.1:{args.port}"
        known = {}
        for item in args.known:
            rid, _, addr = item.partition("=")
            known[int(rid)] = addr
        self.certs: NodeCertificates | None = None
        channel_factory: ChannelFactory = insecure_channel
        if not args.plain:
            certs = NodeCertificates.load(Path(args.certs))
            if certs is None:
                raise SystemExit(f"bench.raftnode: no node credentials in {args.certs}")
            self.certs = certs

            def channel_factory(target: str) -> aio.Channel:
                return certs.channel(target, LINK_OPTIONS)  # as ManagerRuntime's

        self.transport = GrpcTransport(channel_factory)
        self.rlog = RaftNode(
            self.id,
            self.addr,
            on_disk(Path(args.dir)),
            self.transport,
            settings,
            random.Random(),
            bootstrap=args.bootstrap,
            known=known,
        )
        self.store = Store(self.rlog)
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._elected_at: float | None = None  # CLOCK_MONOTONIC when this node last won
        self.rlog.on_leadership(self._leadership)

    def _leadership(self, is_leader: bool, term: int) -> None:
        if is_leader:
            self._elected_at = time.monotonic()

    async def run(self) -> int:
        # made here, not in __init__: a grpc.aio server belongs to the loop it is created on
        if self.certs is not None:
            # as ManagerRuntime.start serves its control port
            authorizer = Authorizer(self.certs.identity.cluster_id, POLICY, DenyList)
            server = jsonrpc.server([AuthInterceptor(authorizer)])
            port = server.add_secure_port(self.addr, self.certs.source.control_server_credentials())
        else:
            server = jsonrpc.server()
            port = server.add_insecure_port(self.addr)
        if port == 0:
            raise OSError(f"cannot listen on {self.addr}")
        server.add_generic_rpc_handlers(self.transport.handlers())
        await server.start()
        await self.rlog.start()
        reader = asyncio.StreamReader(limit=1 << 20)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self._reply({"rid": 0, "ready": True, "addr": self.addr, "tls": self.certs is not None})
        requests = asyncio.create_task(self._requests(reader))
        stopped = asyncio.create_task(self._raft_stopped())
        await asyncio.wait({requests, stopped}, return_when=asyncio.FIRST_COMPLETED)
        # stdin closed (the driver is gone or done with us), or the Raft node stopped
        requests.cancel()
        stopped.cancel()
        for t in list(self._tasks):
            t.cancel()
        failure = self.rlog.failure
        await self.rlog.close()
        await server.stop(None)
        if failure is not None:
            log.critical("%s", failure)
            return 70
        return 0

    async def _raft_stopped(self) -> None:
        with contextlib.suppress(Exception):  # its failure is read from rlog.failure
            await self.rlog.wait()

    async def _requests(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            req = json.loads(line)
            task = asyncio.create_task(self._serve(req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _reply(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    async def _serve(self, req: dict[str, Any]) -> None:
        rid = req.get("rid")
        try:
            out = await self._op(req)
        except Exception as e:  # the driver shows it; the node stays up
            self._reply({"rid": rid, "error": f"{type(e).__name__}: {e}"})
            return
        self._reply({"rid": rid, **out})

    async def _op(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        r = self.rlog
        if op == "status":
            return {
                "id": self.id,
                "leader": r.leader,
                "term": r.term,
                "is_leader": r.is_leader,
                "applied": r.applied,
                "voters": sorted(r.voters()),
                "learners": sorted(r.learners()),
                "tls": self.certs is not None,
            }
        if op == "debug":
            raft = r.raft
            assert raft is not None
            return {
                "role": raft.role.value,
                "term": raft.term,
                "lead": raft.lead,
                "elapsed": raft.election_elapsed,
                "timeout": raft.randomized_election_timeout,
                "last": raft.log.last_index(),
                "committed": raft.log.committed,
                "peers": {k: vars(v) for k, v in self.transport.stats().items()},
                "progress": {
                    str(k): [p.state.value, p.match, p.next, p.paused, len(p.inflights.items)]
                    for k, p in raft.prs.items()
                },
            }
        if op == "add_learner":
            await r.add_learner(int(req["id"]), str(req["addr"]))
            return {}
        if op == "caught_up":
            return {"caught_up": r.caught_up(int(req["id"]))}
        if op == "promote":
            await r.promote(int(req["id"]))
            return {}
        if op == "load":
            return await self._load(int(req["clients"]), float(req["seconds"]), req["warmup"])
        if op == "first_ack":
            acked_at = await self._first_ack(
                float(req["every"]), float(req["attempt"]), float(req["within"])
            )
            return {"acked_at": acked_at, "elected_at": self._elected_at}
        raise ValueError(f"unknown op {op!r}")

    def _entry_bytes(self, node_id: str) -> int:
        """What one benchmark write puts in the Raft log (the store's entry plus its id)."""
        tx = Tx(self.store)
        put_node(node_id, 1)(tx)
        return len(tx.entry()) + ID_LEN

    async def _load(self, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
        """Closed loop: each client writes, waits for the acknowledgement, writes again.
        Writes acknowledged in [start + warmup, start + warmup + seconds) count; latency is
        from the call to store.update to its return."""
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds
        start = time.perf_counter()
        t_from, t_to = start + warmup, start + warmup + seconds
        latencies: list[float] = []
        errors: list[str] = []
        acked = 0
        self._seq += 1
        run = self._seq

        async def client(cid: int) -> None:
            nonlocal acked
            node_id = f"bench-{run}-{cid}"
            seq = 0
            while True:
                seq += 1
                t0 = time.perf_counter()
                if t0 >= t_to:
                    return
                try:
                    await self.store.update(put_node(node_id, seq))
                except (NotLeader, Conflict) as e:
                    errors.append(str(e))
                    await asyncio.sleep(0.01)
                    continue
                t1 = time.perf_counter()
                acked += 1
                if t_from <= t0 and t1 < t_to:
                    latencies.append(t1 - t0)

        cpu0 = time.process_time()
        await asyncio.gather(*(client(c) for c in range(clients)))
        cpu = time.process_time() - cpu0
        return {
            "writes": len(latencies),
            "acked": acked,  # warm-up and tail included
            "seconds": seconds,
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "errors": len(errors),
            "first_error": errors[0] if errors else "",
            "entry_bytes": self._entry_bytes(f"bench-{run}-0"),
            "cpu_s": cpu,
            "wall_s": time.perf_counter() - start,
        }

    async def _first_ack(self, every: float, attempt_s: float, within: float) -> float | None:
        """Overlapping attempts (each on its own object, each given up after `attempt_s`),
        `every` seconds apart, so the answer is when the cluster took writes again, not when
        one unlucky attempt gave up."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[float] = loop.create_future()
        self._seq += 1
        run = self._seq

        async def attempt(i: int) -> None:
            with contextlib.suppress(NotLeader, Conflict, TimeoutError):
                await asyncio.wait_for(self.store.update(put_node(f"fo-{run}-{i}", 1)), attempt_s)
                if not done.done():
                    done.set_result(time.monotonic())

        attempts: list[asyncio.Task[None]] = []
        deadline = loop.time() + within
        i = 0
        while not done.done() and loop.time() < deadline:
            attempts.append(asyncio.create_task(attempt(i)))
            i += 1
            await asyncio.wait([done], timeout=every)
        for t in attempts:
            t.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        return done.result() if done.done() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.raftnode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--port", type=int, required=True)
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--certs", metavar="CERTDIR", help="mutual TLS with these credentials")
    tls.add_argument("--plain", action="store_true", help="plain TCP, no TLS")
    p.add_argument("--bootstrap", action="store_true")
    p.add_argument("--known", action="append", default=[], metavar="ID=HOST:PORT")
    p.add_argument("--tick", type=float)
    p.add_argument("--election-tick", type=int)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO (elections)")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(created).3f %(name)s %(message)s",
    )
    return int(uvloop.run(BenchNode(args).run()))


if __name__ == "__main__":
    sys.exit(main())
