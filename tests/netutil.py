"""Clients that run inside a namespace (a thread enters it), for the lab tests."""

from __future__ import annotations

import json
import socket
from collections import Counter

from mesh.netns import run_in_netns
from orchestrator.apps import micro


def answers(netns: str | None, host: str, port: int, n: int) -> Counter[str]:
    """Which task answered each of n requests made from inside netns (None: this one)."""
    return run_in_netns(netns, lambda: Counter(micro.query(host, port) for _ in range(n)))


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
    return set(counts) == expected and max(counts.values()) - min(counts.values()) <= 1
