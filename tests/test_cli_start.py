"""The `shoal` CLI starts fast: `node ls` and `service ls` import no SDK, no gRPC, no netlink,
no crypto (docs/benchmarks.md, "CLI start"); its own client of the Engine API
(orchestrator/cli/client.py) sends what the docker SDK sent for the same calls, which a server
on a socket records from both, and reads the answers within bounds.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import docker
import pytest

from orchestrator.cli import client as api
from orchestrator.cli.client import APIError, Client, CliError, DaemonUnreachable, NotFound
from orchestrator.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
# what the CLI imported through the docker SDK, and the daemons' own heavy dependencies
HEAVY = ("docker", "requests", "urllib3", "grpc", "pyroute2", "cryptography", "aiohttp")


# ---- what a command imports -----------------------------------------------------------------


def imported(*argv: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules `python -m orchestrator.cli.main ARGV` imports (-X importtime's list)."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "orchestrator.cli.main", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DOCKER_HOST": ""},
        timeout=60,
    )
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in run.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return names, run


@pytest.mark.parametrize("command", [("node", "ls"), ("service", "ls")])
def test_listing_imports_no_sdk_and_nothing_of_the_daemons(command: tuple[str, ...]) -> None:
    names, run = imported("-H", "unix:///nonexistent/shoal.sock", *command)
    assert run.returncode == 1
    assert run.stderr.splitlines()[-1] == (
        "shoal: cannot connect to shoald at unix:///nonexistent/shoal.sock: No such file or "
        "directory. Is shoald running? (set DOCKER_HOST or --host; in the lab, eval $(shoal "
        "lab env sw1))"
    )
    assert "orchestrator.cli.client" in names  # the list is read right
    heavy = sorted(n for n in names if n.split(".")[0] in HEAVY)
    assert not heavy, f"`shoal {' '.join(command)}` imports {heavy}"
    # the lab's code, the agent's and the manager's: not for listing nodes
    if command == ("node", "ls"):
        assert not [n for n in names if n.startswith(("orchestrator.lab", "orchestrator.manager"))]


# ---- a server that records requests ---------------------------------------------------------


@dataclass
class Seen:
    """A request as the server saw it: what the two clients must agree on."""

    method: str
    target: str  # path and query
    headers: dict[str, str]  # those compared: Host, Content-Type, Content-Length, X-Registry-Auth
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    content_type: str = "application/json"
    chunks: int = 0  # sent chunked, in pieces of this many bytes (0: with a Content-Length)


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)
    reply: Callable[[str, str], Reply] = lambda method, path: Reply()


COMPARED = ("Host", "Content-Type", "Content-Length", "X-Registry-Auth")


def handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k: v for k in COMPARED if (v := self.headers.get(k)) is not None}
            recorder.seen.append(Seen(self.command, self.path, headers, body))
            reply = recorder.reply(self.command, urllib.parse.urlsplit(self.path).path)
            self.close_connection = True
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if reply.chunks:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(reply.body), reply.chunks):
                    piece = reply.body[i : i + reply.chunks]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

        do_GET = do_POST = do_DELETE = answer

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet; and a unix socket's client has no address to print

    return Handler


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[tuple[Recorder, str]]:
    """A recording server on a unix socket, and its URL."""
    rec = Recorder()
    path = str(tmp_path / "shoal.sock")
    with UnixServer(path, handler(rec)) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield rec, f"unix://{path}"
        server.shutdown()


def ours(url: str, **kw: Any) -> Client:
    return Client(url, api.parse_host(url), **kw)


def sdk(url: str) -> Any:
    return docker.APIClient(base_url=url, version=api.API_VERSION, timeout=10)


SPEC = {"Name": "web", "Labels": {}, "TaskTemplate": {"ContainerSpec": {"Image": "alpine:3"}}}
SWARM_SPEC = {"Name": "default", "EncryptionConfig": {"AutoLockManagers": True}, "Labels": None}
LOGS = {
    "details": True,
    "follow": False,
    "stdout": True,
    "stderr": True,
    "since": "1357133017.000000000",
    "timestamps": True,
    "tail": "all",
    "is_tty": False,
}

Call = Callable[[Any], Any]


def same(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Call, Call]:
    """A method ours has as the SDK has it, called on each with the same arguments."""

    def call(client: Any) -> Any:
        return getattr(client, name)(*args, **kwargs)

    return call, call


# the methods ours has as the SDK has them: name, arguments, keyword arguments
SAME: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("info", (), {}),
    ("inspect_swarm", (), {}),
    ("init_swarm", (), {"advertise_addr": "10.0.0.1", "swarm_spec": SWARM_SPEC}),
    ("init_swarm", (), {"advertise_addr": None, "listen_addr": "10.0.0.1:2377"}),
    (
        "join_swarm",
        (["10.0.0.1:2377"], "SWMTKN-1-x"),
        {"listen_addr": "0.0.0.0:2377", "advertise_addr": None},
    ),
    ("join_swarm", (["10.0.0.1:2377"], "t"), {"advertise_addr": "10.0.0.2"}),
    ("leave_swarm", (), {"force": True}),
    ("leave_swarm", (), {}),
    ("update_swarm", (7,), {"swarm_spec": SWARM_SPEC, "rotate_worker_token": True}),
    ("update_swarm", (7,), {"swarm_spec": SWARM_SPEC, "rotate_manager_token": True}),
    ("update_swarm", (7,), {"swarm_spec": SWARM_SPEC, "rotate_manager_unlock_key": True}),
    ("get_unlock_key", (), {}),
    ("unlock_swarm", ("SWMKEY-1-x",), {}),
    ("nodes", (), {}),
    ("inspect_node", ("n1",), {}),
    ("update_node", ("n1", 4, {"Role": "worker", "Labels": {"a b": "c/d"}}), {}),
    ("remove_node", ("n1",), {"force": True}),
    ("remove_node", ("n1",), {}),
    ("services", (), {"status": True}),
    ("inspect_service", ("web/x y",), {}),
    ("remove_service", ("web",), {}),
    ("tasks", (), {"filters": {"service": "svc1", "_up-to-date": "true"}}),
    ("tasks", (), {"filters": {"node": "n1"}}),
    ("inspect_task", ("t1",), {}),
    ("networks", (), {}),
    ("inspect_network", ("appnet",), {}),
    (
        "create_network",
        ("appnet",),
        {
            "driver": "overlay",
            "options": None,
            "ipam": {"Driver": "default", "Config": [{"Subnet": "10.30.0.0/24"}]},
            "attachable": False,
            "scope": "swarm",
        },
    ),
    ("create_network", ("n2",), {"driver": "overlay", "options": {"a": "b"}}),
    ("remove_network", ("appnet",), {}),
]

# (what ours calls, what the SDK did for it: the same method, or what service.py posted)
CALLS: list[tuple[Call, Call]] = [
    *(same(name, a, kw) for name, a, kw in SAME),
    (
        lambda c: list(c.service_logs("svc1", **LOGS)),
        lambda c: list(c.service_logs("svc1", **LOGS)),
    ),
    # service create and update: what service.py posted through the SDK's _post_json
    (
        lambda c: c.create_service(SPEC),
        lambda c: c._post_json(c._url("/services/create"), data=SPEC, params={}, headers={}),
    ),
    (
        lambda c: c.create_service(SPEC, registry_auth="e30="),
        lambda c: c._post_json(
            c._url("/services/create"), data=SPEC, params={}, headers={"X-Registry-Auth": "e30="}
        ),
    ),
    (
        lambda c: c.update_service("svc1", 9, SPEC, registry_auth_from="spec"),
        lambda c: c._post_json(
            c._url("/services/{0}/update", "svc1"),
            data=SPEC,
            params={"version": 9, "registryAuthFrom": "spec"},
            headers={},
        ),
    ),
    (
        lambda c: c.update_service("svc1", 9, SPEC, registry_auth_from="spec", rollback="previous"),
        lambda c: c._post_json(
            c._url("/services/{0}/update", "svc1"),
            data=SPEC,
            params={"version": 9, "registryAuthFrom": "spec", "rollback": "previous"},
            headers={},
        ),
    ),
]


def test_requests_are_the_sdks(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    rec.reply = lambda method, path: (
        Reply(body=b"\x01\x00\x00\x00\x00\x00\x00\x03hi\n", chunks=5)
        if path.endswith("/logs")
        else Reply()
    )
    for i, (mine, theirs) in enumerate(CALLS):
        mine(ours(url))
        theirs(sdk(url))
        assert len(rec.seen) == 2 * (i + 1)
        assert rec.seen[-2] == rec.seen[-1], i


def test_over_tcp_too(tmp_path: Path) -> None:
    rec = Recorder()
    with TCPServer(("127.0.0.1", 0), handler(rec)) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"tcp://127.0.0.1:{server.server_address[1]}"
        assert ours(url).inspect_service("web") == {"ok": True}
        sdk(url).inspect_service("web")
        server.shutdown()
    assert rec.seen[0] == rec.seen[1]
    assert rec.seen[0].target == "/v1.44/services/web"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("unix:///run/shoal/shoal.sock", "/run/shoal/shoal.sock"),
        ("tcp://10.0.0.1:2376", ("10.0.0.1", 2376)),
        ("tcp://shoal.lab", ("shoal.lab", 2375)),
        ("10.0.0.1:2377", ("10.0.0.1", 2377)),
        ("tcp://[fd00::1]:2375", ("fd00::1", 2375)),
    ],
)
def test_hosts(url: str, address: str | tuple[str, int]) -> None:
    assert api.parse_host(url) == address


@pytest.mark.parametrize("url", ["unix://", "ssh://user@host", "tcp://host:x", "tcp://"])
def test_hosts_refused(url: str) -> None:
    with pytest.raises(CliError, match="use unix:///PATH or tcp://HOST:PORT"):
        api.parse_host(url)


# ---- answers: errors, bounds, streams --------------------------------------------------------


def test_the_daemons_errors(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    replies = {
        "/v1.44/nodes/x": Reply(404, b'{"message":"node x not found"}'),
        "/v1.44/services": Reply(500, b"boom\n", "text/plain"),
        "/v1.44/swarm": Reply(400, b""),
        "/v1.44/swarm/leave": Reply(406, b'{"message":"This node is not part of a swarm"}'),
    }
    rec.reply = lambda method, path: replies[path]
    client = ours(url)
    with pytest.raises(NotFound) as nf:
        client.inspect_node("x")
    assert (nf.value.status, nf.value.message) == (404, "node x not found")
    with pytest.raises(APIError) as e:
        client.services()
    assert (e.value.status, e.value.message, type(e.value)) == (500, "boom", APIError)
    with pytest.raises(APIError, match=r"^400 Bad Request$"):
        client.inspect_swarm()
    client.leave_swarm(force=True)  # forced, not being in a swarm is no error (the SDK's rule)
    with pytest.raises(APIError, match="not part of a swarm"):
        client.leave_swarm()
    with pytest.raises(NotFound, match="No such node: "):
        client.inspect_node("")  # not sent
    assert len(rec.seen) == 5


def test_an_answer_too_large_is_not_read(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    big = json.dumps(["x" * 100] * 30).encode()
    rec.reply = lambda method, path: Reply(body=big, chunks=1000 if "nodes" in path else 0)
    assert len(ours(url, max_body=len(big)).services()) == 30
    for call in (Client.services, Client.nodes):  # with a length, and chunked
        with pytest.raises(CliError, match=r"answer to GET /(services|nodes) is larger than"):
            call(ours(url, max_body=len(big) - 1))
    assert api.MAX_BODY == 64 << 20


def test_an_answer_that_is_not_json(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    rec.reply = lambda method, path: Reply(body=b"<html>", content_type="text/html")
    with pytest.raises(CliError, match="answer to GET /info is not JSON"):
        ours(url).info()


def frame(stream: int, data: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


def test_logs_frames_and_tty(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    long_line = b"y" * (api.LOG_PIECE + 10) + b"\n"
    framed = frame(1, b"out\n") + frame(2, b"err\n") + frame(1, b"") + frame(1, long_line)
    rec.reply = lambda method, path: Reply(body=framed, chunks=7)
    got = list(ours(url).service_logs("svc1", stdout=True, stderr=True))
    assert got[:2] == [b"out\n", b"err\n"]
    assert b"".join(got[2:]) == long_line and max(map(len, got)) <= api.LOG_PIECE
    rec.reply = lambda method, path: Reply(body=b"one\ntwo\n", chunks=4)
    assert b"".join(ours(url).service_logs("svc1", stdout=True, is_tty=True)) == b"one\ntwo\n"
    # the SDK read the same frames the same way
    rec.reply = lambda method, path: Reply(body=framed, chunks=7)
    assert b"".join(sdk(url).service_logs("svc1", stdout=True, is_tty=False)) == (
        b"out\nerr\n" + long_line
    )


def test_a_daemon_that_hangs_up(tmp_path: Path) -> None:
    path = str(tmp_path / "rude.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()

        def hang_up() -> None:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        with pytest.raises(DaemonUnreachable, match="before the answer's head"):
            ours(f"unix://{path}").nodes()


def test_main_prints_the_daemons_error_and_the_hint(
    recorder: tuple[Recorder, str], capsys: pytest.CaptureFixture[str]
) -> None:
    rec, url = recorder
    rec.reply = lambda method, path: Reply(404, b'{"message":"node nosuch not found"}')
    assert main(["-H", url, "node", "inspect", "nosuch"]) == 1
    assert capsys.readouterr() == ("", "Error response from daemon: node nosuch not found\n")
    assert main(["-H", "unix:///nonexistent.sock", "node", "ls"]) == 1
    assert capsys.readouterr().err == (
        "shoal: cannot connect to shoald at unix:///nonexistent.sock: No such file or "
        "directory. Is shoald running? (set DOCKER_HOST or --host; in the lab, eval $(shoal "
        "lab env sw1))\n"
    )


def test_main_prints_the_labs_errors_as_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "env", "--name", "nosuchlab", "sw1"]) == 1
    assert capsys.readouterr().err == (
        "shoal: no lab named nosuchlab; create it with `shoal lab up --name nosuchlab`\n"
    )
