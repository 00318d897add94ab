"""The CLI's client of shoald's Docker Engine API, on the standard library alone.

It sends what the docker SDK's APIClient sent for the same calls (paths, query parameters,
JSON bodies), which the CLI used before: importing the SDK (requests, urllib3) took longer
than the docker CLI takes to run `docker node ls`.
"""

from __future__ import annotations

import io
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

DEFAULT_HOST = "unix:///run/shoal/shoal.sock"
DEFAULT_TCP_PORT = 2375  # the SDK's (and docker's) for tcp://HOST without a port
# shoald's newest (orchestrator/api/docker.py): fixed, so no /version round trip to agree
API_VERSION = "1.44"
TIMEOUT = 120.0  # seconds for each request's connect and reads (the SDK's, as the CLI set it)
MAX_BODY = 64 << 20  # an answer read whole (JSON, an error) may be this large, no larger
LOG_PIECE = 64 << 10  # a log frame is handed on in pieces of at most this many bytes
FRAME_HEADER = 8  # a multiplexed stream's frame: stream (1 byte), 3 zeros, length (4, big end)
MAX_LINE = 64 << 10  # the longest status or header line read
MAX_HEADERS = 100  # header lines at most


class CliError(RuntimeError):
    """Printed as `shoal: <message>`, exit status 1."""


class DaemonUnreachable(CliError):
    """No answer from shoald: not listening, gone, or the connection broke."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"cannot connect to shoald at {url}: {reason}. Is shoald running? "
            "(set DOCKER_HOST or --host; in the lab, eval $(shoal lab env sw1))"
        )


class APIError(Exception):
    """The daemon's error answer: its HTTP status and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class NotFound(APIError):
    """404: no such object."""


def connect(explicit: str | None) -> Client:
    """The client of the shoald that -H, else $DOCKER_HOST, else the default names. Nothing is
    sent yet: a daemon that is not there is found at the first request."""
    url = explicit or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
    return Client(url, parse_host(url))


def parse_host(url: str) -> str | tuple[str, int]:
    """unix://PATH as the socket's path; tcp://HOST[:PORT] (or HOST[:PORT]) as (host, port)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "tcp", url
    if scheme == "unix" and rest:
        return rest
    if scheme in ("tcp", "http"):
        parts = urllib.parse.urlsplit(f"//{rest}")
        try:
            port = parts.port or DEFAULT_TCP_PORT
        except ValueError:
            port = 0
        if parts.hostname and port:
            return parts.hostname, port
    raise CliError(f"cannot use {url!r} as shoald's address: use unix:///PATH or tcp://HOST:PORT")


class Client:
    """shoald's API: the calls the CLI makes, each as the docker SDK made it.

    Not a dataclass: importing dataclasses (inspect, ast, dis) and making one take ~10 ms,
    a fifth of what `shoal node ls` may take in all.
    """

    __slots__ = ("address", "max_body", "timeout", "url")

    def __init__(
        self,
        url: str,
        address: str | tuple[str, int],
        timeout: float = TIMEOUT,
        max_body: int = MAX_BODY,
    ) -> None:
        self.url = url  # as given (-H, DOCKER_HOST): for messages
        self.address = address  # a unix socket's path, or TCP's (host, port)
        self.timeout = timeout
        self.max_body = max_body

    # ---- the swarm

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/info")
        return result

    def inspect_swarm(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/swarm")
        return result

    def init_swarm(
        self,
        advertise_addr: str | None = None,
        listen_addr: str = "0.0.0.0:2377",
        swarm_spec: dict[str, Any] | None = None,
    ) -> str:
        """The new swarm's first node: its ID."""
        body = {
            "AdvertiseAddr": advertise_addr,
            "ListenAddr": listen_addr,
            "ForceNewCluster": False,
            "Spec": swarm_spec,
        }
        return str(self._json("POST", "/swarm/init", body=body))

    def join_swarm(
        self,
        remote_addrs: list[str],
        join_token: str,
        listen_addr: str = "0.0.0.0:2377",
        advertise_addr: str | None = None,
    ) -> None:
        body = {
            "RemoteAddrs": remote_addrs,
            "ListenAddr": listen_addr,
            "JoinToken": join_token,
            "AdvertiseAddr": advertise_addr,
        }
        self._send("POST", "/swarm/join", body=body)

    def leave_swarm(self, force: bool = False) -> None:
        try:
            self._send("POST", "/swarm/leave", {"force": force})
        except APIError as e:
            # forced, not being in a swarm is no error (the SDK's rule, 503 too)
            if not (force and e.status in (406, 503)):
                raise

    def update_swarm(
        self,
        version: int,
        swarm_spec: dict[str, Any] | None = None,
        rotate_worker_token: bool = False,
        rotate_manager_token: bool = False,
        rotate_manager_unlock_key: bool = False,
    ) -> None:
        params: dict[str, Any] = {
            "rotateWorkerToken": rotate_worker_token,
            "rotateManagerToken": rotate_manager_token,
            "version": version,
        }
        if rotate_manager_unlock_key:
            params["rotateManagerUnlockKey"] = True
        self._send("POST", "/swarm/update", params, body=swarm_spec or {})

    def get_unlock_key(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/swarm/unlockkey")
        return result

    def unlock_swarm(self, key: str) -> None:
        self._send("POST", "/swarm/unlock", body={"UnlockKey": key})

    # ---- nodes

    def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/nodes")
        return result

    def inspect_node(self, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/nodes/{_ref('node', node_id)}")
        return result

    def update_node(self, node_id: str, version: int, node_spec: dict[str, Any]) -> None:
        path = f"/nodes/{_ref('node', node_id)}/update"
        self._send("POST", path, {"version": version}, body=node_spec)

    def remove_node(self, node_id: str, force: bool = False) -> None:
        self._send("DELETE", f"/nodes/{_ref('node', node_id)}", {"force": force})

    # ---- services and tasks

    def services(self, status: bool | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/services", {"status": status})
        return result

    def inspect_service(self, service: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/services/{_ref('service', service)}")
        return result

    def create_service(
        self, spec: dict[str, Any], registry_auth: str | None = None
    ) -> dict[str, Any]:
        """POST the ServiceSpec as given; the answer: ID and Warnings."""
        headers = {"X-Registry-Auth": registry_auth} if registry_auth else {}
        result: dict[str, Any] = self._json("POST", "/services/create", None, spec, headers)
        return result or {}

    def update_service(
        self,
        service: str,
        version: int,
        spec: dict[str, Any],
        registry_auth: str | None = None,
        registry_auth_from: str | None = None,
        rollback: str | None = None,
    ) -> dict[str, Any]:
        """POST the whole ServiceSpec as of `version`; the answer: its Warnings."""
        params = {"version": version, "registryAuthFrom": registry_auth_from, "rollback": rollback}
        path = f"/services/{_ref('service', service)}/update"
        headers = {"X-Registry-Auth": registry_auth} if registry_auth else {}
        result: dict[str, Any] = self._json("POST", path, params, spec, headers)
        return result or {}

    def remove_service(self, service: str) -> None:
        self._send("DELETE", f"/services/{_ref('service', service)}")

    def service_logs(
        self,
        service: str,
        details: bool = False,
        follow: bool = False,
        stdout: bool = False,
        stderr: bool = False,
        since: int | str = 0,
        timestamps: bool = False,
        tail: int | str = "all",
        is_tty: bool = False,
    ) -> Iterator[bytes]:
        """The logs as they come: for a TTY the bytes as read, else each frame's payload."""
        params = {
            "details": details,
            "follow": follow,
            "stdout": stdout,
            "stderr": stderr,
            "since": since,
            "timestamps": timestamps,
            "tail": tail,
        }
        path = f"/services/{_ref('service', service)}/logs"
        resp = self._request("GET", path, params, stream=True)
        return self._raw(resp) if is_tty else self._frames(resp)

    def tasks(self, filters: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        params = {"filters": _filters(filters) if filters else None}
        result: list[dict[str, Any]] = self._json("GET", "/tasks", params)
        return result

    def inspect_task(self, task: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/tasks/{_ref('task', task)}")
        return result

    # ---- networks

    def networks(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/networks", {"filters": _filters({})})
        return result

    def inspect_network(self, net_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/networks/{_ref('network', net_id)}")
        return result

    def create_network(
        self,
        name: str,
        driver: str | None = None,
        options: dict[str, str] | None = None,
        ipam: dict[str, Any] | None = None,
        attachable: bool | None = None,
        scope: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "Name": name,
            "Driver": driver,
            "Options": options,
            "IPAM": ipam,
            "Attachable": attachable,
            "Scope": scope,
        }
        result: dict[str, Any] = self._json("POST", "/networks/create", body=body)
        return result

    def remove_network(self, net_id: str) -> None:
        self._send("DELETE", f"/networks/{_ref('network', net_id)}")

    # ---- HTTP

    def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> Response:
        """Send one request on a connection of its own (`Connection: close`), and read the
        answer's head; an error status raised as APIError. stream: no timeout once the head
        is read (a followed log waits for lines as long as it takes)."""
        target = f"/v{API_VERSION}{path}"
        # as requests encoded the SDK's params: None left out, True as "True"
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        if query:
            target += f"?{query}"
        data = b""
        sent = {"User-Agent": "shoal", "Connection": "close", **(headers or {})}
        if body is not None:
            # as the SDK's _post_json: top-level None fields left out (Go cannot read null)
            data = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
            sent["Content-Type"] = "application/json"
        if data or method != "GET":  # as requests did: 0 for a POST or DELETE without one
            sent["Content-Length"] = str(len(data))
        try:
            sock = self._connect()
        except OSError as e:
            raise self._unreachable(e) from None
        try:
            head = f"{method} {target} HTTP/1.1\r\nHost: {self._host_header()}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in sent.items())
            sock.sendall(f"{head}\r\n".encode("latin-1") + data)
            resp = Response.read_head(sock, method)
            if stream:
                sock.settimeout(None)
        except (OSError, ProtocolError) as e:
            sock.close()
            raise self._unreachable(e) from None
        if resp.status >= 400:
            with resp:
                raise self._error(resp.status, resp.reason, self._read(resp, method, path))
        return resp

    def _connect(self) -> socket.socket:
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection(self.address, self.timeout)

    def _host_header(self) -> str:
        if isinstance(self.address, str):
            return "localhost"  # what the SDK sent over a unix socket
        host_, port = self.address
        return f"[{host_}]:{port}" if ":" in host_ else f"{host_}:{port}"

    def _json(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """The answer's JSON (None if it is empty)."""
        with self._request(method, path, params, body, headers) as resp:
            data = self._read(resp, method, path)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise CliError(
                f"shoald's answer to {method} {path} is not JSON: {data[:80]!r}"
            ) from None

    def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        """A request whose answer carries nothing the CLI reads (left unread)."""
        self._request(method, path, params, body).close()

    def _read(self, resp: Response, method: str, path: str) -> bytes:
        """The whole answer, if it is no larger than max_body."""
        data = self._piece(resp, self.max_body + 1, exact=True)
        if len(data) > self.max_body:
            raise CliError(
                f"shoald's answer to {method} {path} is larger than "
                f"{self.max_body >> 20} MiB: not read"
            )
        return data

    def _frames(self, resp: Response) -> Iterator[bytes]:
        """A multiplexed stream's payloads, stdout's and stderr's alike (as the SDK yielded
        them), a large frame in pieces so that memory stays bounded."""
        with resp:
            while True:
                header = self._piece(resp, FRAME_HEADER, exact=True)
                if len(header) < FRAME_HEADER:
                    return
                left = int.from_bytes(header[4:], "big")
                while left:
                    piece = self._piece(resp, min(left, LOG_PIECE), exact=True)
                    if not piece:
                        return
                    left -= len(piece)
                    yield piece

    def _raw(self, resp: Response) -> Iterator[bytes]:
        with resp:
            while piece := self._piece(resp, LOG_PIECE, exact=False):
                yield piece

    def _piece(self, resp: Response, size: int, exact: bool) -> bytes:
        """At most size bytes of the body (exact: all of them unless it ends), b"" at its end."""
        try:
            return resp.read(size) if exact else resp.read1(size)
        except (OSError, ProtocolError) as e:
            raise self._unreachable(e) from None

    def _unreachable(self, e: OSError | ProtocolError) -> DaemonUnreachable:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return DaemonUnreachable(self.url, reason or type(e).__name__)

    @staticmethod
    def _error(status: int, reason: str, data: bytes) -> APIError:
        """The daemon's JSON `message`, else its text, else the status line."""
        try:
            message = str(json.loads(data)["message"])
        except (ValueError, TypeError, KeyError):
            message = data.decode(errors="replace").strip()
        message = message or f"{status} {reason}"
        return NotFound(status, message) if status == 404 else APIError(status, message)


class ProtocolError(Exception):
    """An answer that is not HTTP/1.1 as shoald speaks it."""


class Response:
    """An HTTP/1.1 answer being read from its connection's socket: the head read, the body
    (de-chunked) read on demand. Closing it closes the connection."""

    def __init__(
        self, sock: socket.socket, fp: io.BufferedReader, status: int, reason: str
    ) -> None:
        self.sock, self.fp = sock, fp
        self.status, self.reason = status, reason
        self.length: int | None = None  # what is left of a Content-Length body; None: to EOF
        self.chunked = False
        self.chunk_left = 0  # of the current chunk
        self.done = False

    @classmethod
    def read_head(cls, sock: socket.socket, method: str) -> Response:
        fp = sock.makefile("rb")
        version, _, rest = cls._line(fp, "before the answer's head").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolError(f"not an HTTP/1.1 answer: {version} {rest}"[:120])
        resp = cls(sock, fp, int(code), reason.strip())
        for _ in range(MAX_HEADERS):
            line = cls._line(fp, "in the answer's head")
            if not line:
                break
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "transfer-encoding" and value.lower() == "chunked":
                resp.chunked = True
            elif name == "content-length" and value.isdigit():
                resp.length = int(value)
        else:
            raise ProtocolError(f"more than {MAX_HEADERS} header lines")
        # no body, whatever the headers say; or an empty one
        no_body = method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        resp.done = no_body or (resp.length == 0 and not resp.chunked)
        return resp

    @staticmethod
    def _line(fp: io.BufferedReader, where: str) -> str:
        """A line without its end; where: what the connection closing here cuts short."""
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise ProtocolError(f"a line longer than {MAX_LINE} bytes")
        if not line:
            raise ProtocolError(f"the connection closed {where}")
        return line.decode("latin-1").rstrip("\r\n")

    def read1(self, size: int) -> bytes:
        """Some of the body (at most size bytes, one chunk's at most), b"" at its end."""
        if self.done:
            return b""
        cut = "in the middle of the answer"
        if self.chunked and not self.chunk_left:
            head = self._line(self.fp, cut).split(";")[0].strip()
            if not head.isalnum():  # no sign, no spaces: what int() would take besides hex
                raise ProtocolError(f"bad chunk size {head[:20]!r}")
            try:
                self.chunk_left = int(head, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {head[:20]!r}") from None
            if not self.chunk_left:
                while self._line(self.fp, cut):  # trailers
                    pass
                self.done = True
                return b""
        left = self.chunk_left if self.chunked else self.length
        data = self.fp.read1(size if left is None else min(size, left))
        if not data:
            if left is not None:
                raise ProtocolError(f"the connection closed {cut}")
            self.done = True
        elif self.chunked:
            self.chunk_left -= len(data)
            if not self.chunk_left and self._line(self.fp, cut):
                raise ProtocolError("a chunk longer than its size")
        elif self.length is not None:
            self.length -= len(data)
            self.done = not self.length
        return data

    def read(self, size: int) -> bytes:
        """size bytes of the body, fewer only where it ends."""
        parts = []
        while size > 0 and (data := self.read1(size)):
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        self.fp.close()
        self.sock.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ref(kind: str, ref: str) -> str:
    """An object's name or ID in a path, quoted as the SDK did; an empty one is no object (the
    SDK refused it, as the docker CLI does)."""
    if not ref.strip():
        raise NotFound(404, f"No such {kind}: {ref}")
    return urllib.parse.quote(ref, safe="/:")


def _filters(filters: Mapping[str, str]) -> str:
    """The `filters` parameter as the SDK encoded it: {"key": ["value"]}."""
    return json.dumps({k: [v] for k, v in filters.items()})
