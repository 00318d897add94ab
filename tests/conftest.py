"""Shared fixtures. Lab tests build real namespaces, so they need root (CI runs as root)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator

import pytest

from orchestrator.lab import lab as labmod


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab tests need root (they build network namespaces)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def lab3() -> Iterator[labmod.Lab]:
    """Three nodes on the blog's 192.168.56.0/24, named after the test module's lab."""
    name = "tmesh"
    if labmod.load(name) is not None:
        labmod.down(name)
    lab = labmod.up(name, 3, ipaddress.IPv4Network("192.168.56.0/24"))
    try:
        yield lab
    finally:
        labmod.down(name)
