"""shoal-mesh run: keep this node's kernel equal to the desired state in a file.

The loop: read the state file whenever it changes (or on SIGHUP), reconcile, then serve DNS for
the local task namespaces. A state file that does not parse is logged and ignored (the last good
state stays applied). Failed syncs are retried with backoff, fully after any kernel refusal.
SIGUSR1 forces a full resync. Stopping the daemon leaves the data plane in place: established
connections keep flowing, and the next start adopts what it finds (`shoal-mesh cleanup` removes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mesh.dns.server import DnsServer, read_resolv_conf
from mesh.dns.zone import Zone, compile_zone
from mesh.lb.base import BackendCount
from mesh.metrics import MeshStatus, make_registry
from mesh.reconcile import Mesh, SyncReport, task_namespaces
from mesh.state import Applied, MeshState, StateError, load_state, write_applied

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2
MAX_BACKOFF = 30.0
CLEAN_WITHIN = 2.0  # at most this long does a stream of new states put off a clean-up


@dataclass
class DaemonConfig:
    state_path: Path
    lb_backend: str
    balancer: object  # factory; typed in Mesh
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9323
    metrics_socket: Path | None = None  # instead of host:port (under shoald)
    run_dir: Path = Path("/run/shoal/mesh")
    resync_interval: float = 60.0


def record_namespaces(run_dir: Path, namespaces: list[str]) -> None:
    """Remember task namespaces we touched, so `cleanup` finds them without a state file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "namespaces.json"
    old = set(json.loads(path.read_text())) if path.exists() else set()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(old | set(namespaces))))
    tmp.replace(path)


def recorded_namespaces(run_dir: Path) -> list[str]:
    path = run_dir / "namespaces.json"
    return json.loads(path.read_text()) if path.exists() else []


class MeshDaemon:
    def __init__(self, cfg: DaemonConfig, mesh: Mesh):
        self.cfg = cfg
        self.mesh = mesh
        self.status = MeshStatus(lb_backend=cfg.lb_backend, counts=self._counts)
        self.registry, self.durations = make_registry(self.status)
        self.dns = DnsServer(self._upstreams)
        self.status.dns = self.dns.stats
        self._lock = threading.Lock()  # one kernel conversation at a time
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._force_full = True
        self._balanced = -1  # the newest generation every load balancer took
        self._applied = Applied()  # the last report written
        self._verify = False  # check that nothing of ours was changed behind our back
        self._file_sig: tuple[int, int, int] | None = None
        self._zones: dict[frozenset[str], Zone] = {}

    def _upstreams(self) -> list[str]:
        st = self.status.state
        if st is not None and st.dns_upstreams is not None:
            return list(st.dns_upstreams)
        return read_resolv_conf()

    def _counts(self) -> list[tuple[str, BackendCount]]:
        out: list[tuple[str, BackendCount]] = []
        with self._lock:
            for table in self.mesh.tables():
                kind = "vip" if table.netns != self.mesh.netns else "published"
                try:
                    out += [(kind, c) for c in table.counts()]
                except Exception as e:
                    log.warning("reading counters in %s: %s", table.netns or "node", e)
        return out

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._wake.set)
        loop.add_signal_handler(signal.SIGUSR1, self._full_resync)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping, sig)
        runner = await self._start_metrics()
        watcher = asyncio.create_task(self._watch())
        try:
            await self._loop()
        finally:
            watcher.cancel()
            await self.dns.close()
            await runner.cleanup()
            log.info("stopped; the data plane stays in place")

    def _stopping(self, sig: signal.Signals) -> None:
        log.info("%s received; stopping", sig.name)
        self._stop.set()

    def _full_resync(self) -> None:
        self._force_full = True
        self._wake.set()

    async def _watch(self) -> None:
        """Wake the loop when the state file changes (replaced, rewritten) or on a timer."""
        since_resync = 0.0
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            since_resync += POLL_INTERVAL
            try:
                st = os.stat(self.cfg.state_path)
                sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                sig = None
            if since_resync >= self.cfg.resync_interval:
                since_resync = 0.0
                self._verify = True
                self._wake.set()
            elif sig != self._file_sig:
                self._wake.set()

    async def _loop(self) -> None:
        backoff = 1.0
        desired: MeshState | None = None
        unclean_since: float | None = None  # since when gone backends await their clean-up
        while not self._stop.is_set():
            self._wake.clear()
            desired = self._read_state(desired)
            if desired is not None:
                ok = await self._sync(desired)
                backoff = 1.0 if ok else min(backoff * 2, MAX_BACKOFF)
                if not ok:
                    self._force_full = True
                    await self._sleep(backoff)
                    continue
                # a newer state first: cleaning up after gone backends can wait for it, a little
                if not self.mesh.has_ending(desired):
                    unclean_since = None
                elif unclean_since is None:
                    unclean_since = time.monotonic()
                if unclean_since is not None and (
                    not self._wake.is_set() or time.monotonic() - unclean_since > CLEAN_WITHIN
                ):
                    await asyncio.to_thread(self._clean, desired)
                    unclean_since = None
            waiter = asyncio.create_task(self._wake.wait())
            stopper = asyncio.create_task(self._stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _read_state(self, current: MeshState | None) -> MeshState | None:
        try:
            st = os.stat(self.cfg.state_path)
        except OSError as e:
            if self._file_sig is not None or current is None:
                log.error(
                    "state file %s: %s; keeping the last good state",
                    self.cfg.state_path,
                    e.strerror,
                )
            self._file_sig = None
            return current
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig == self._file_sig and current is not None:
            return current
        self._file_sig = sig
        try:
            state = load_state(self.cfg.state_path)
        except StateError as e:
            log.error("state file rejected, keeping the last good state: %s", e)
            self.status.sync_errors += 1
            return current
        return state

    async def _sync(self, desired: MeshState) -> bool:
        full, verify = self._force_full, self._verify
        self._verify = False
        busy = dataclasses.replace(self._applied, applying=desired.generation)
        write_applied(self.cfg.run_dir, busy)  # the waiters see the mesh at work on it
        report: SyncReport = await asyncio.to_thread(self._apply, desired, full, verify)
        if not report.ok:
            self.status.sync_errors += 1
            for what, why in report.errors.items():
                log.error("sync: %s: %s", what, why)
        self.durations.labels("full" if report.full else "incremental").observe(report.seconds)
        self.status.state = desired
        self._force_full = False
        views = {ns: frozenset(nets) for ns, nets in task_namespaces(desired).items()}
        self._zones = {v: compile_zone(desired, v) for v in set(views.values())}
        dns_errors = await self.dns.set_views(views, self._zones)
        log.info(
            "synced generation %d (%s) in %.1f ms: %d nft requests, %d link changes%s",
            desired.generation,
            "full" if report.full else "incremental",
            report.seconds * 1000,
            report.nft_requests,
            report.link_changes,
            f", {len(report.errors) + len(dns_errors)} error(s)"
            if report.errors or dns_errors
            else "",
        )
        if not report.balancing_failed:
            self._balanced = desired.generation
        self._applied = Applied(desired.generation, {**report.errors, **dns_errors}, self._balanced)
        write_applied(self.cfg.run_dir, self._applied)
        return report.ok and not dns_errors

    def _apply(self, desired: MeshState, full: bool, verify: bool) -> SyncReport:
        with self._lock:
            if verify and not full and any(not t.exists() for t in self.mesh.tables()):
                log.warning("a shoal table disappeared; doing a full sync")
                full = True
            report = self.mesh.apply(desired, full=full, verify=verify, clean=False)
        record_namespaces(self.cfg.run_dir, list(task_namespaces(desired)))
        return report

    def _clean(self, desired: MeshState) -> None:
        with self._lock:
            report = self.mesh.clean_ending(desired)
        for what, why in report.errors.items():
            log.error("conntrack clean-up: %s: %s", what, why)
        log.info(
            "deleted %d conntrack entries of gone backends in %.1f ms",
            report.conntrack_deleted,
            report.seconds * 1000,
        )

    # ---- metrics ----------------------------------------------------------------------------

    async def _start_metrics(self) -> web.AppRunner:
        async def metrics(_: web.Request) -> web.Response:
            body = await asyncio.to_thread(generate_latest, self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def health(_: web.Request) -> web.Response:
            ok = self.status.state is not None
            return web.Response(status=200 if ok else 503, text="ok\n" if ok else "no state yet\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site: web.BaseSite
        if self.cfg.metrics_socket is not None:
            self.cfg.metrics_socket.parent.mkdir(parents=True, exist_ok=True)
            self.cfg.metrics_socket.unlink(missing_ok=True)  # a dead predecessor's
            site = web.UnixSite(runner, str(self.cfg.metrics_socket))
            where = f"unix://{self.cfg.metrics_socket}"
        else:
            host, port = self.cfg.metrics_host, self.cfg.metrics_port
            site = web.TCPSite(runner, host, port, reuse_address=True)
            where = f"http://{host}:{port}"
        await site.start()
        log.info("metrics on %s/metrics", where)
        return runner
