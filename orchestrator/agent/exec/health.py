"""Health checks, as Docker runs them, for every executor (the probe is the executor's: an
exec in the container, or a command in the native task's namespaces).

The check is the service's `Healthcheck`, else (container executor) the image's HEALTHCHECK,
the service's durations overriding the image's; `["NONE"]` turns it off. A probe runs every
`Interval` (the first one `Interval` after the start, as Docker does), is given `Timeout`, and
succeeds on exit 0. During `StartPeriod` failures do not count; after it, `Retries`
consecutive failures make the task unhealthy. A task with a check reports RUNNING (enters the
load balancers) only once a probe has passed; an unhealthy task fails, and its restart policy
replaces it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orchestrator.manager.spec import (
    HEALTH_INTERVAL,
    HEALTH_RETRIES,
    HEALTH_TIMEOUT,
    HealthCheck,
)

UNHEALTHY = "unhealthy container"  # swarmkit's words for the task's error

Probe = Callable[[list[str]], Awaitable[int]]  # argv -> exit status


@dataclass(frozen=True)
class Check:
    argv: list[str]
    interval: float  # seconds
    timeout: float
    retries: int
    start_period: float


def resolve(spec: HealthCheck | None, image: HealthCheck | None) -> Check | None:
    """The check that applies: the spec's test, else the image's, with the spec's durations
    over the image's over Docker's defaults; None when there is none or it is NONE."""
    test = spec.test if spec is not None and spec.test else image.test if image else ()
    if not test or test[0] == "NONE":
        return None
    argv = list(test[1:]) if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]

    def pick(field: str, default: int) -> int:
        for hc in (spec, image):
            value = getattr(hc, field) if hc is not None else 0
            if value:
                return int(value)
        return default

    return Check(
        argv=argv,
        interval=pick("interval", HEALTH_INTERVAL) / 1e9,
        timeout=pick("timeout", HEALTH_TIMEOUT) / 1e9,
        retries=pick("retries", HEALTH_RETRIES),
        start_period=pick("start_period", 0) / 1e9,
    )


class Unhealthy(Exception):
    """The task's health check failed `Retries` times in a row (after its start period)."""


class Monitor:
    """Runs a task's check from its start; `healthy` is set once a probe passes."""

    def __init__(self, check: Check, probe: Probe):
        self.check = check
        self.probe = probe
        self.healthy = asyncio.Event()
        self.failures = 0
        self.last_output = ""

    async def run(self) -> None:
        """Probe until the task turns unhealthy (raises Unhealthy); cancelled with the task."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.check.interval)
            try:
                code = await asyncio.wait_for(self.probe(self.check.argv), self.check.timeout)
            except (TimeoutError, OSError):
                code = -1
            if code == 0:
                self.failures = 0
                self.healthy.set()
                continue
            if not self.healthy.is_set() and time.monotonic() - started < self.check.start_period:
                continue  # still starting: failures do not count yet
            self.failures += 1
            if self.failures >= self.check.retries:
                raise Unhealthy(UNHEALTHY)
