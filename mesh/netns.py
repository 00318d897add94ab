"""Network namespaces: resolve names, and run code inside one.

A namespace switch (setns) applies to the calling thread only, so code that must run in
another namespace runs in a short-lived thread of its own; sockets created there stay bound
to that namespace wherever they are used afterwards.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    """A namespace is missing or cannot be entered."""


def netns_path(name_or_path: str) -> Path:
    """`sw1` -> /run/netns/sw1; absolute paths (e.g. /proc/PID/ns/net) pass through."""
    if name_or_path.startswith("/"):
        return Path(name_or_path)
    if "/" in name_or_path or name_or_path in ("", ".", ".."):
        raise NetnsError(f"invalid network namespace name {name_or_path!r}")
    return NETNS_RUN_DIR / name_or_path


def _setns(fd: int) -> None:
    # The process's own symbols hold libc's setns; find_library("c") would run ldconfig (~1 ms).
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


def run_in_netns(name_or_path: str | None, fn: Callable[[], T]) -> T:
    """Run fn() with the calling thread's network namespace set to the given one.

    None means "the current namespace" and calls fn directly.
    """
    if name_or_path is None:
        return fn()
    path = netns_path(name_or_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(f"network namespace {name_or_path!r} not found ({e.strerror})") from e
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            _setns(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    try:
        thread = threading.Thread(target=target, name=f"netns:{name_or_path}")
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if error:
        raise error[0]
    return result[0]


def run_in_each_netns(names: Iterable[str], fn: Callable[[], T]) -> dict[str, T | Exception]:
    """fn() in each namespace, all from one thread (a thread per namespace costs more than the
    work: a sync may plug in a thousand tasks). A namespace that cannot be entered, or whose
    fn() raised, gets its exception instead."""
    out: dict[str, T | Exception] = {}

    def target() -> None:
        for name in names:
            try:
                fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            except NetnsError as e:
                out[name] = e
                continue
            except OSError as e:
                out[name] = NetnsError(f"network namespace {name!r} not found ({e.strerror})")
                continue
            try:
                _setns(fd)
                out[name] = fn()
            except Exception as e:
                out[name] = e
            finally:
                os.close(fd)

    thread = threading.Thread(target=target, name="netns:each")
    thread.start()
    thread.join()
    return out


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir())


def processes_in(names: list[str]) -> list[int]:
    """Every process (but this one) whose network namespace is one of these named ones."""
    wanted = set()
    for name in names:
        try:
            st = os.stat(netns_path(name))
        except OSError:
            continue
        wanted.add((st.st_dev, st.st_ino))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            st = os.stat(entry / "ns" / "net")
        except OSError:  # gone meanwhile
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.append(int(entry.name))
    return pids
