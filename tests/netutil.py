"""Clients that run inside a namespace (a thread enters it), for the lab tests."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter

from mesh.netns import run_in_netns
from orchestrator.apps import micro


def answers(netns: str | None, host: str, port: int, n: int) -> Counter[str]:
    """Which task answered each of n requests made from inside netns (None: this one)."""
    return run_in_netns(netns, lambda: Counter(micro.query(host, port) for _ in range(n)))


def round_robin(
    netns: str | None, host: str, port: int, tasks: set[str], n: int, within: float = 30.0
) -> Counter[str]:
    """`answers` to n requests, once host:port balances over exactly `tasks`: a node's balancer
    takes a task in with the mesh state that follows it running, so just after a change the
    first answers may still come from the tasks of before."""
    deadline = time.monotonic() + within
    seen: set[str] | str = set()
    while True:
        try:
            seen = set(answers(netns, host, port, 2 * len(tasks)))
        except OSError as e:
            seen = str(e)
        if seen == tasks:
            return answers(netns, host, port, n)
        assert time.monotonic() < deadline, f"{host}:{port} answered from {seen}, not {tasks}"
        time.sleep(0.2)


def udp_ask(netns: str | None, host: str, port: int, sport: int, timeout: float = 2.0) -> str:
    """One datagram from a fixed source port; the answering task's IP."""

    def ask() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", sport))
            s.settimeout(timeout)
            s.sendto(b"hi", (host, port))
            data, _ = s.recvfrom(4096)
        ip: str = json.loads(data)["ip"]
        return ip

    return run_in_netns(netns, ask)


def balanced(counts: Counter[str], expected: set[str]) -> bool:
    """Whether `counts` (answers by task, of one client's consecutive requests) is what strict
    round-robin over exactly the tasks `expected` gives: every task equally often when the
    requests divide evenly among them; otherwise, for a remainder r, r tasks once more than
    the others (max - min is 1 only then). Where the rotation starts does not matter."""
    if not expected or set(counts) != expected:
        return False
    each, extra = divmod(sum(counts.values()), len(expected))
    return sorted(counts.values()) == [each] * (len(expected) - extra) + [each + 1] * extra
