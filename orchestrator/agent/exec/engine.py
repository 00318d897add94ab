"""The node's container engine (Docker's dockerd), through the docker SDK.

The SDK blocks, so its calls run on a small thread pool of their own (the event loop never
waits on the engine). Exits are learnt from the engine's event stream, one per node, not from a
blocked `wait` call per container: a thousand tasks cost one stream. When the stream breaks the
engine is re-pinged with backoff; events missed meanwhile are replayed from the last one seen
(`since`). An engine that does not answer for DOWN_AFTER seconds is reported down: waiting
tasks fail with the reason, and the agent tells the managers (the node is then down until the
engine answers again).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import contextlib
import json
import logging
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from orchestrator.agent.exec.base import EngineUnavailable, Exit, LogEntry

log = logging.getLogger(__name__)

T = TypeVar("T")
THREADS = 16  # engine calls in flight at once; the engine itself serialises much of its work
CALL_TIMEOUT = 120  # seconds a call may take (a pull reads progress at least this often)
PING_TIMEOUT = 5
DOWN_AFTER = 3.0  # seconds without an answer before the engine counts as down
MAX_BACKOFF = 5.0
LOG_QUEUE = 256  # log lines read ahead of a slow reader


def _unreachable(e: BaseException) -> bool:
    return isinstance(
        e,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | ConnectionError
        | FileNotFoundError,
    )


def explain(e: BaseException) -> str:
    """An engine error as a person reads it: the engine's own message where it gave one."""
    if isinstance(e, docker.errors.APIError):
        return str(e.explanation or e)
    return str(e)


def decode_registry_auth(header: str) -> dict[str, Any] | None:
    """X-Registry-Auth (base64url JSON: username, password, serveraddress...) as a dict for the
    SDK; None if absent or unreadable."""
    if not header:
        return None
    try:
        raw = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
        value = json.loads(raw)
    except (ValueError, binascii.Error):
        return None
    return value if isinstance(value, dict) and value else None


class Engine:
    def __init__(self, url: str):
        self.url = url
        self.api: docker.APIClient | None = None  # made on first use
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="engine")
        self._watches: dict[str, asyncio.Future[Exit]] = {}  # container ID -> its exit
        self._ooms: set[str] = set()  # watched containers the kernel killed for memory
        self._stop = threading.Event()
        self._events_thread: threading.Thread | None = None
        self._events_client: docker.APIClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down_since: float | None = None
        self.down_reason: str | None = None  # set once down for DOWN_AFTER seconds
        self.version = ""
        self.info: dict[str, Any] = {}
        self.on_change: Callable[[], None] | None = None  # told when it goes down or comes back

    # ---- calls ----------------------------------------------------------------------------

    def _client(self) -> docker.APIClient:
        if self.api is None:
            self.api = docker.APIClient(
                base_url=self.url, version="1.41", timeout=CALL_TIMEOUT, max_pool_size=THREADS
            )
        return self.api

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(api, *args, **kwargs) on the engine's thread pool. Raises EngineUnavailable if
        the engine does not answer; its APIErrors pass through."""
        loop = asyncio.get_running_loop()
        api = self._client()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(api, *args, **kwargs))
        except Exception as e:
            if _unreachable(e):
                raise EngineUnavailable(
                    f"the container engine at {self.url} does not answer: {explain(e)}"
                ) from None
            raise

    def ping(self) -> None:
        """Blocking: raises if the engine does not answer."""
        probe = docker.APIClient(base_url=self.url, version="1.41", timeout=PING_TIMEOUT)
        try:
            probe.ping()
            self.version = str(probe.version().get("Version", ""))
            self.info = dict(probe.info())
        finally:
            probe.close()

    async def answers(self) -> str | None:
        """None if the engine answers, else why not."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self.ping)
        except Exception as e:
            return explain(e)
        return None

    # ---- the event stream and health ------------------------------------------------------

    def start(self, label_filter: str) -> None:
        """Watch exits of containers with this label (key=value), and the engine's health;
        a watch started before (another node ID, after leaving a swarm) ends."""
        self._loop = asyncio.get_running_loop()
        self._end_watch()
        self._stop = stop = threading.Event()
        self._events_thread = threading.Thread(
            target=self._watch, args=(label_filter, stop), name="engine-events", daemon=True
        )
        self._events_thread.start()

    def _end_watch(self) -> None:
        self._stop.set()
        if self._events_client is not None:  # unblocks its read
            with contextlib.suppress(Exception):
                self._events_client.close()

    async def close(self) -> None:
        self._end_watch()
        if self.api is not None:
            self.api.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _watch(self, label_filter: str, stop: threading.Event) -> None:
        since: float | None = None
        backoff = 0.2
        while not stop.is_set():
            client = self._events_client = docker.APIClient(
                base_url=self.url, version="1.41", timeout=None
            )
            try:
                self.ping()
                started = time.time()
                self._up()
                backoff = 0.2
                stream = client.events(
                    since=since if since is not None else started,
                    filters={
                        "type": ["container"],
                        "event": ["oom", "die"],
                        "label": [label_filter],
                    },
                    decode=True,
                )
                for event in stream:
                    if stop.is_set():
                        return
                    since = float(event.get("timeNano", time.time_ns())) / 1e9
                    self._seen(event)
                since = time.time()
            except Exception as e:
                if since is None:
                    since = time.time()
                self._unwell(explain(e))
            finally:
                client.close()
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _up(self) -> None:
        was_down = self.down_reason is not None
        self._down_since = None
        self.down_reason = None
        if was_down:
            log.info("the container engine at %s answers again", self.url)
            self._notify()

    def _unwell(self, reason: str) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning("the container engine at %s: %s", self.url, reason)
        if self.down_reason is None and now - self._down_since >= DOWN_AFTER:
            self.down_reason = f"the container engine at {self.url} does not answer: {reason}"
            log.error("%s", self.down_reason)
            self._notify()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._fail_waiters)

    def _notify(self) -> None:
        if self._loop is not None and self.on_change is not None:
            self._loop.call_soon_threadsafe(self.on_change)

    def _seen(self, event: dict[str, Any]) -> None:
        """An event of the stream (its thread): an OOM kill is noted, an exit ends a watch."""
        cid = str(event.get("id") or "")
        if not cid or self._loop is None:
            return
        if event.get("status") == "oom":
            self._loop.call_soon_threadsafe(self._ooms.add, cid)
            return
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        try:
            code = int(attrs.get("exitCode", -1))
        except ValueError:
            code = -1
        self._loop.call_soon_threadsafe(self._exited, cid, code)

    def _exited(self, cid: str, code: int) -> None:
        watch = self._watches.pop(cid, None)
        oom = cid in self._ooms
        self._ooms.discard(cid)
        if watch is not None and not watch.done():
            watch.set_result(Exit(code, oom=oom))

    def _fail_waiters(self) -> None:
        reason = self.down_reason or "the container engine does not answer"
        watches, self._watches = self._watches, {}
        self._ooms.clear()
        for watch in watches.values():
            if not watch.done():
                watch.set_exception(EngineUnavailable(reason))

    def watch(self, cid: str) -> asyncio.Future[Exit]:
        """The container's exit, from the event stream: watch it before starting it (an exit
        after a break of the stream is replayed when it reconnects)."""
        watch: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        if self.down_reason is not None:
            watch.set_exception(EngineUnavailable(self.down_reason))
        else:
            self._watches[cid] = watch
        return watch

    def unwatch(self, cid: str) -> None:
        watch = self._watches.pop(cid, None)
        if watch is not None:
            watch.cancel()

    # ---- logs -----------------------------------------------------------------------------

    async def logs(
        self, cid: str, tail: int | None, since_ns: int, follow: bool, tty: bool = False
    ) -> AsyncIterator[LogEntry]:
        """A container's log lines with their stream and time. The reading thread is the
        stream's own (a follower may last for hours), held back by a bounded queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[LogEntry | BaseException | None] = asyncio.Queue(LOG_QUEUE)
        client = docker.APIClient(base_url=self.url, version="1.41", timeout=None)
        params: dict[str, Any] = {
            "stdout": 1,
            "stderr": 1,
            "timestamps": 1,
            "follow": int(follow),
            "tail": str(tail) if tail is not None and tail >= 0 else "all",
        }
        if since_ns:
            params["since"] = f"{since_ns // 1_000_000_000}.{since_ns % 1_000_000_000:09d}"
        response: list[Any] = []
        done = threading.Event()

        def put(item: LogEntry | BaseException | None) -> bool:
            if done.is_set():
                return False
            fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            try:
                fut.result()
            except Exception:
                return False
            return True

        def read() -> None:
            try:
                res = client._get(
                    client._url("/containers/{0}/logs", cid), params=params, stream=True
                )
                response.append(res)
                client._raise_for_status(res)
                # a TTY's output is one stream, not multiplexed
                chunks = ((1, line) for line in res.raw) if tty else _frames(res.raw)
                for stream, data in chunks:
                    for line in data.decode(errors="replace").splitlines(keepends=True):
                        stamp, _, text = line.partition(" ")
                        if not put(LogEntry(_parse_time_ns(stamp), int(stream), text)):
                            return
                put(None)
            except Exception as e:
                put(e)
            finally:
                client.close()

        thread = threading.Thread(target=read, name=f"logs-{cid[:12]}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    if _unreachable(item):
                        raise EngineUnavailable(explain(item))
                    raise item
                yield item
        finally:
            done.set()
            for res in response:
                with contextlib.suppress(Exception):
                    res.close()
            while not queue.empty():  # unblock a reader waiting to put
                queue.get_nowait()


def _frames(raw: Any) -> Iterator[tuple[int, bytes]]:
    """The engine's multiplexed stream (an 8-byte header: stream, size; then the payload), read
    through the HTTP response (it is chunked: the raw socket would show the chunking)."""
    while True:
        header = raw.read(8)
        if len(header) < 8:
            return
        stream, size = struct.unpack(">BxxxL", header)
        data = raw.read(size) if size else b""
        if size and not data:
            return
        yield stream, data


def _parse_time_ns(stamp: str) -> int:
    """RFC 3339 with nanoseconds, as the engine writes it (2026-12-07T05:00:43.545096046Z)."""
    try:
        date, _, frac = stamp.rstrip("Z").partition(".")
        whole = calendar.timegm(time.strptime(date, "%Y-%m-%dT%H:%M:%S"))
        return whole * 1_000_000_000 + int((frac + "000000000")[:9])
    except ValueError:
        return time.time_ns()
