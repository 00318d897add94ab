"""The agent inside a lab VM: runs commands for the host (`shoal lab exec`, the VM tests).

It listens on the VM's management NIC (QEMU user networking, whose only way in is a port
forwarded from the lab's namespace on the host), one connection per command:

    client -> agent   one JSON line {"argv": [...], "cwd": "...", "env": {...}}
    then frames       type (1 byte), length (4 bytes, big-endian), payload

Frames: STDIN (empty payload: end of input) and SIGNAL (the signal number) from the client;
STDOUT, STDERR and EXIT (the exit status, negative for a signal) from the agent. A command
lives as long as its connection: if the client goes away, the command's process group is
killed. Standard library only, so it starts fast under emulation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
from dataclasses import dataclass

PORT = 7799
# The agent's link: QEMU user networking on a subnet of its own. Not QEMU's default
# 10.0.2.0/24, which lies in the swarm's default address pool (10.0.0.0/8): the third overlay
# network gets 10.0.2.0/24, and a node holds its overlays' gateways, so that route would take
# the agent's replies away from it.
MGMT_NET = "172.29.255.0/24"
MGMT_IP = "172.29.255.15"
# The VM's shoald (orchestrator/lab/daemons.py) listens here, on the VM's own tmpfs /run.
SHOALD_SOCKET = "/run/shoal/shoal.sock"
FRAME = struct.Struct(">BI")
STDIN, STDOUT, STDERR, EXIT, SIGNAL = range(5)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """The next frame, or None at the end of the stream."""
    try:
        head = await reader.readexactly(FRAME.size)
        kind, length = FRAME.unpack(head)
        return kind, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


@dataclass
class Agent:
    listen: str
    port: int = PORT

    async def serve(self) -> None:
        server = await asyncio.start_server(self.handle, self.listen, self.port)
        print(f"shoal vm agent listening on {self.listen}:{self.port}", flush=True)
        async with server:
            await server.serve_forever()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            argv = [str(a) for a in request["argv"]]
            if not argv:
                raise ValueError("empty argv")
        except (ValueError, KeyError, TypeError) as e:
            writer.write(frame(STDERR, f"bad request: {e}\n".encode()) + frame(EXIT, b"2"))
            await self._close(writer)
            return
        cwd = request.get("cwd")
        if not (isinstance(cwd, str) and os.path.isdir(cwd)):  # noqa: ASYNC240 - a local stat
            cwd = "/"
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            status = b"127" if isinstance(e, FileNotFoundError) else b"126"
            writer.write(frame(STDERR, f"{argv[0]}: {e.strerror}\n".encode()) + frame(EXIT, status))
            await self._close(writer)
            return
        pumps = [
            asyncio.create_task(self._pump(proc.stdout, writer, STDOUT)),
            asyncio.create_task(self._pump(proc.stderr, writer, STDERR)),
        ]
        control = asyncio.create_task(self._control(reader, proc))
        waiter = asyncio.create_task(proc.wait())
        await asyncio.wait({waiter, control}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            # The client went away before the command ended: end it too.
            self._signal(proc, signal.SIGKILL)
        code = await waiter
        await asyncio.gather(*pumps, return_exceptions=True)
        control.cancel()
        with contextlib.suppress(ConnectionError):
            writer.write(frame(EXIT, str(code).encode()))
        await self._close(writer)

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    async def _control(
        self, reader: asyncio.StreamReader, proc: asyncio.subprocess.Process
    ) -> None:
        """Client frames: input for the command, signals; returns when the client is gone."""
        stdin = proc.stdin
        while (got := await read_frame(reader)) is not None:
            kind, payload = got
            if kind == SIGNAL:
                self._signal(proc, int(payload))
            elif kind == STDIN and stdin is not None:
                try:
                    if payload:
                        stdin.write(payload)
                        await stdin.drain()
                    else:
                        stdin.close()
                        stdin = None
                except ConnectionError:
                    stdin = None

    @staticmethod
    async def _pump(
        stream: asyncio.StreamReader | None, writer: asyncio.StreamWriter, kind: int
    ) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65536):
            writer.write(frame(kind, chunk))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.close()
            await writer.wait_closed()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", default=MGMT_IP)
    p.add_argument("--port", type=int, default=PORT)
    args = p.parse_args(argv)
    # Commands find the project's tools (shoal-mesh, shoal) as on the host, and the CLI the
    # VM's shoald.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    os.environ["DOCKER_HOST"] = f"unix://{SHOALD_SOCKET}"
    asyncio.run(Agent(args.listen, args.port).serve())


if __name__ == "__main__":
    main()
