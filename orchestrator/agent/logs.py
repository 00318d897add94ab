"""Task logs: every line a task writes, with its stream and time, in a file per task.

Lines are JSON: {"t": unix ns, "s": 1 (stdout) | 2 (stderr), "l": the line with its newline}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

MAX_LINE = 16384


class TaskLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - open while the task runs
        self.changed = asyncio.Event()

    def write(self, stream: int, line: bytes) -> None:
        text = line[:MAX_LINE].decode(errors="replace")
        if not text.endswith("\n"):
            text += "\n"
        self._file.write(json.dumps({"t": time.time_ns(), "s": stream, "l": text}) + "\n")
        self.changed.set()
        self.changed = asyncio.Event()

    async def pump(self, stream: int, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    self.write(stream, e.partial)
                return
            except asyncio.LimitOverrunError:
                line = await reader.read(MAX_LINE)
            self.write(stream, line)

    def close(self) -> None:
        self._file.close()
        self.changed.set()


def read_lines(path: Path, tail: int | None = None, since_ns: int = 0) -> list[dict[str, Any]]:
    try:
        raw = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in raw:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("t", 0) >= since_ns:
            out.append(entry)
    return out[-tail:] if tail is not None and tail >= 0 else out


async def follow(path: Path, log: TaskLog | None, offset: int) -> AsyncIterator[dict[str, Any]]:
    """Lines after `offset` lines, as they are written, until the task's log closes."""
    seen = offset
    while True:
        lines = read_lines(path)
        for entry in lines[seen:]:
            yield entry
        seen = max(seen, len(lines))
        if log is None or log._file.closed:
            return
        event = log.changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 1.0)
