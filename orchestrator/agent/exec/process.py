"""Processes of the executors' own, started without blocking the event loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import IO, Any


class Child:
    """A process started with subprocess.Popen and awaited through a pidfd.

    Popen forks with vfork: about a millisecond. The event loop's own subprocess support
    (uvloop's) forks the whole daemon and blocks the loop for tens of milliseconds per
    process on a busy node, so starting 30 tasks held every task back by seconds. Popen runs
    on a worker thread (vfork releases the GIL): a thousand tasks started together held the
    loop for 10 s with Popen in it (measured: heartbeats, `service ps` and every session
    waited).
    """

    def __init__(self, popen: subprocess.Popen[bytes]):
        self.popen = popen
        self.pid = popen.pid
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None

    @classmethod
    async def start(cls, *argv: str, pipes: bool = True, **kwargs: Any) -> Child:
        child = cls(await asyncio.to_thread(_popen, argv, pipes, kwargs))
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


async def run_quietly(*argv: str) -> int:
    """Run a command to its end without blocking the event loop; its exit status."""
    child = await Child.start(*argv, pipes=False)
    return await child.wait()
