"""The native executor: a task's command in its own network, UTS, PID and mount namespaces.

One TaskRunner per task walks it through swarmkit's states, reporting each:
  ACCEPTED -> PREPARING (network namespace made, image mapped: REJECTED if it cannot be)
  -> READY (the mesh has attached the task's endpoints: veth, address, DNS at 127.0.0.11)
  -> STARTING -> RUNNING -> COMPLETE (exit 0) | FAILED (non-zero exit)
and SHUTDOWN when the managers want it stopped (SIGTERM, then SIGKILL after the grace period).

The process: `ip netns exec <ns> unshare --uts --pid --fork --mount-proc sh -c ...`: `ip netns
exec` enters the task's network namespace and bind-mounts /etc/netns/<ns>/{resolv.conf,hosts}
(nameserver 127.0.0.11, the task's hostname); unshare gives it its own hostname, PID 1 and
/proc. stdout and stderr go to the task's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mesh.netns import list_netns, processes_in
from orchestrator.agent import images
from orchestrator.agent.logs import TaskLog
from orchestrator.store.objects import TaskState

log = logging.getLogger("shoal.executor")

DEFAULT_GRACE = 10.0
DRAIN_DELAY = 1.0  # between leaving the load balancers and the stop signal
ETC_NETNS = Path("/etc/netns")
_LAUNCH = 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"'


@dataclass
class Hooks:
    """What a runner needs from its agent."""

    report: Callable[[str, TaskState, str, str, dict[str, Any]], None]
    network_ready: Callable[[str], Awaitable[str | None]]  # task id -> error, None when ready
    netns_prefix: str
    data_dir: Path


class Rejected(RuntimeError):
    pass


def netns_name(prefix: str, task_id: str) -> str:
    return f"{prefix}-{task_id[:12]}"


def _leftover_namespaces(prefix: str) -> list[str]:
    shape = re.compile(rf"{re.escape(prefix)}-[0-9a-z]{{12}}")  # netns_name's, and only it
    return [n for n in list_netns() if shape.fullmatch(n)]


async def remove_leftovers(prefix: str) -> list[str]:
    """The tasks an earlier shoald left running (it was killed, or the node crashed): their
    processes killed and their namespaces removed, so that every task runs once, under this
    shoald; the managers' assignments start them again. Returns the namespaces removed."""
    names = await asyncio.to_thread(_leftover_namespaces, prefix)
    for name in names:
        for pid in await asyncio.to_thread(processes_in, [name]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await _run_quietly("ip", "netns", "del", name)
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
    return names


class TaskRunner:
    def __init__(self, hooks: Hooks, msg: dict[str, Any]):
        self.hooks = hooks
        self.msg = msg
        self.id: str = msg["id"]
        self.netns = netns_name(hooks.netns_prefix, self.id)
        self.desired = TaskState.parse(msg["desired_state"])
        self.state = TaskState.parse(msg.get("state", "assigned"))
        self.proc: Child | None = None
        self.log: TaskLog | None = None
        self.netns_made = False
        self.making_netns = False  # its namespace is being made (the agent batches mesh writes)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def log_path(self) -> Path:
        return self.hooks.data_dir / self.id / "log.jsonl"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"task {self.id}")

    def update(self, msg: dict[str, Any]) -> None:
        self.msg = msg
        desired = TaskState.parse(msg["desired_state"])
        if desired != self.desired:
            self.desired = desired
            self._changed.set()

    def _report(
        self, state: TaskState, message: str, err: str = "", container: dict[str, Any] | None = None
    ) -> None:
        if state <= self.state and state != TaskState.RUNNING:
            return
        self.state = max(self.state, state)
        self.hooks.report(self.id, state, message, err, container or {})

    @property
    def stop_wanted(self) -> bool:
        return self.desired > TaskState.RUNNING

    async def _run(self) -> None:
        try:
            await self._lifecycle()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the task fails, the agent goes on
            log.exception("task %s failed in the executor", self.id)
            self._report(TaskState.FAILED, "executor error", str(e))

    async def _lifecycle(self) -> None:
        if self.state.terminal:
            return
        if self.state >= TaskState.ACCEPTED:
            # We knew this task before a restart of the agent: its process is gone.
            self._report(TaskState.FAILED, "the node's agent restarted", "agent restarted")
            return
        if self.stop_wanted:
            self._report(TaskState.SHUTDOWN, "shutdown before start")
            return
        self._report(TaskState.ACCEPTED, "accepted")
        self._report(TaskState.PREPARING, "preparing")
        self.making_netns = True
        try:
            argv = await self._prepare()
        except (Rejected, images.UnknownImage, OSError, subprocess.CalledProcessError) as e:
            self._report(TaskState.REJECTED, "preparing", str(e))
            return
        finally:
            self.making_netns = False
        err = await self.hooks.network_ready(self.id)
        if err is not None:
            self._report(TaskState.REJECTED, "preparing", f"network attachment failed: {err}")
            return
        self._report(TaskState.READY, "prepared")
        if self.stop_wanted:
            self._report(TaskState.SHUTDOWN, "shutdown")
            return
        self._report(TaskState.STARTING, "starting")
        await self._spawn(argv)
        assert self.proc is not None
        self._report(
            TaskState.RUNNING,
            "started",
            container={"ContainerID": self.id, "PID": self.proc.pid, "ExitCode": 0},
        )
        waiter = asyncio.create_task(self.proc.wait())
        while not waiter.done():
            changed = asyncio.create_task(self._changed.wait())
            await asyncio.wait({waiter, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            self._changed.clear()
            if self.stop_wanted and not waiter.done():
                await self._stop(waiter)
                return
        code = waiter.result()
        self._close_log()
        container = {"ContainerID": self.id, "PID": 0, "ExitCode": code}
        if code == 0:
            self._report(TaskState.COMPLETE, "finished", container=container)
        else:
            self._report(
                TaskState.FAILED, "started", f"task: non-zero exit ({code})", container=container
            )

    async def _prepare(self) -> list[str]:
        spec = self.msg.get("spec", {})
        cs = spec.get("ContainerSpec", {})
        cmd = images.command(
            str(cs.get("Image", "")), tuple(cs.get("Command") or ()), tuple(cs.get("Args") or ())
        )
        if not shutil.which(cmd.argv[0]) and not os.path.isabs(cmd.argv[0]):
            raise Rejected(f"executable {cmd.argv[0]!r} not found on this node")
        # Not blocking the loop: the tasks of an assignment make their namespaces together.
        await _run_quietly("ip", "netns", "add", self.netns)
        self._setup_netns()
        return list(cmd.argv)

    def _setup_netns(self) -> None:
        """Check the namespace is there; its resolv.conf, hosts and hostname (small files)."""
        if not Path("/run/netns", self.netns).exists():
            raise Rejected(f"cannot create network namespace {self.netns}")
        self.netns_made = True
        hostname = self.id[:12]
        etc = ETC_NETNS / self.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.11\noptions ndots:0\n")
        ips = [a.split("/")[0] for a in self.msg.get("addresses", {}).values()]
        (etc / "hosts").write_text(
            "127.0.0.1\tlocalhost\n" + (f"{ips[0]}\t{hostname}\n" if ips else "")
        )
        (etc / "hostname").write_text(hostname + "\n")

    async def _spawn(self, argv: list[str]) -> None:
        spec = self.msg.get("spec", {}).get("ContainerSpec", {})
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": self.id[:12],
            "HOME": "/root",
        }
        for entry in images.valid_env(tuple(spec.get("Env") or ())):
            key, _, value = entry.partition("=")
            env[key] = value
        self.log = TaskLog(self.log_path)
        self.proc = await Child.start(
            "ip",
            "netns",
            "exec",
            self.netns,
            "unshare",
            "--uts",
            "--pid",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            _LAUNCH,
            self.id[:12],
            *argv,
            env=env,
            start_new_session=True,
            cwd="/",
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self.log.pump(1, self.proc.stdout)),
            asyncio.create_task(self.log.pump(2, self.proc.stderr)),
        ]

    async def _stop(self, waiter: asyncio.Task[int]) -> None:
        assert self.proc is not None
        await asyncio.sleep(DRAIN_DELAY)  # let load balancers stop sending it connections
        grace = self.msg.get("spec", {}).get("ContainerSpec", {}).get("StopGracePeriod")
        grace_s = grace / 1e9 if isinstance(grace, int) and grace > 0 else DEFAULT_GRACE
        self._signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), grace_s)
        if not waiter.done() or self._group_alive():
            self._signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, 5)
        self._close_log()
        code = waiter.result() if waiter.done() else -9
        self._report(
            TaskState.SHUTDOWN,
            "shutdown",
            container={"ContainerID": self.id, "PID": 0, "ExitCode": code},
        )

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def _group_alive(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _close_log(self) -> None:
        if self.log is not None:
            self.log.close()

    async def remove(self) -> None:
        """Stop it if it runs, and remove its namespace; its log stays until the node leaves."""
        if self._task is not None and not self._task.done():
            if self.proc is not None and self.proc.returncode is None:
                self.desired = TaskState.SHUTDOWN
                self._changed.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._task), DEFAULT_GRACE + 8)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._signal(signal.SIGKILL)
        await self.cleanup()

    async def cleanup(self) -> None:
        await _run_quietly("ip", "netns", "del", self.netns)
        shutil.rmtree(ETC_NETNS / self.netns, ignore_errors=True)
        self.netns_made = False


class Child:
    """A process of the executor's, started with subprocess.Popen and awaited through a pidfd.

    Popen forks with vfork: about a millisecond. The event loop's own subprocess support
    (uvloop's) forks the whole daemon and blocks the loop for tens of milliseconds per
    process on a busy node, so starting 30 tasks held every task back by seconds.
    """

    def __init__(self, popen: subprocess.Popen[bytes]):
        self.popen = popen
        self.pid = popen.pid
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None

    @classmethod
    async def start(cls, *argv: str, pipes: bool = True, **kwargs: Any) -> Child:
        child = cls(_popen(argv, pipes, kwargs))
        if pipes:
            child.stdout = await _reader(child.popen.stdout)
            child.stderr = await _reader(child.popen.stderr)
        return child

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    async def wait(self) -> int:
        if self.popen.poll() is not None:
            return self.popen.returncode
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # reaped meanwhile
            return self.popen.wait()
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        try:
            loop.add_reader(fd, readable)
            try:
                await exited
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return self.popen.wait()


def _popen(argv: tuple[str, ...], pipes: bool, kwargs: dict[str, Any]) -> subprocess.Popen[bytes]:
    out = subprocess.PIPE if pipes else subprocess.DEVNULL
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **kwargs)


async def _reader(pipe: IO[bytes] | None) -> asyncio.StreamReader:
    assert pipe is not None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader


async def _run_quietly(*argv: str) -> int:
    """Run a command to its end without blocking the event loop; its exit status."""
    child = await Child.start(*argv, pipes=False)
    return await child.wait()
