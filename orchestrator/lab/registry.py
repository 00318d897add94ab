"""The lab's registry: Debian's docker-registry (CNCF distribution), plain HTTP on the lab's
gateway address, port 5000 (192.168.56.1:5000 for the default lab), reachable from the host and
from every node.

Every node's engine has it as its registry mirror and as an insecure registry
(orchestrator/lab/engines.py), so `docker pull gianarb/micro` in a node is served from here
(nothing leaves the machine) and `docker push 192.168.56.1:5000/me/app` shares an image
between nodes. Its storage, /var/lib/shoal/lab/<lab>/registry, survives `shoal lab down` so
pushed images are still there next time; `shoal lab down --purge` removes it. Its log is
/run/shoal/lab/<lab>/registry.log. Part of the namespace backend (orchestrator/lab/netns.py),
which starts it for labs with the container executor and stops it with the lab;
docs/lab-registry.md.

`seed` pushes the images built here from busybox-static (orchestrator/images/rootfs.py) through
the registry's HTTP API v2, with no engine: library/busybox and library/alpine (busybox; the
blog's `alpine ping`), library/micro and gianarb/micro (the demo app). A tag already there is
left alone, whatever it holds: it may be an image a user pushed.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import yaml

from orchestrator.images import rootfs
from orchestrator.lab.record import Lab, LabError, add_process, load, running, stop_pids

BINARY = "/usr/bin/docker-registry"
PORT = 5000
PROCESS_KEY = "registry"  # the lab record's processes entry for it
READY_TIMEOUT = 15.0

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

SEED: dict[str, Callable[[], rootfs.Image]] = {
    "library/busybox": rootfs.busybox,
    "library/alpine": rootfs.busybox,
    "library/micro": rootfs.micro,
    "gianarb/micro": rootfs.micro,
}
SEED_TAG = "latest"


class RegistryError(LabError):
    """The registry failed to start or refused a push; the message says what to do."""


def address(lab: Lab) -> str:
    """host:port of the lab's registry: the gateway's address, port 5000."""
    return f"{lab.gateway}:{PORT}"


def storage(lab: Lab) -> Path:
    return lab.data_dir / "registry"


def config_path(lab: Lab) -> Path:
    return lab.run_dir / "registry.yml"


def log_path(lab: Lab) -> Path:
    return lab.run_dir / "registry.log"


def _config(lab: Lab) -> dict[str, object]:
    return {
        "version": 0.1,
        "log": {"level": "info", "fields": {"service": "registry", "lab": lab.name}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage(lab))},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": address(lab), "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }


def is_running(lab: Lab) -> bool:
    record = load(lab.name) or lab
    return bool(running(record, PROCESS_KEY))


def start(lab: Lab) -> None:
    """Start the lab's registry unless it runs already; it is recorded under the processes key
    "registry" so `down` stops it. Returns once it answers."""
    if is_running(lab):
        wait_ready(lab)
        return
    if not Path(BINARY).is_file():
        raise RegistryError(
            f"{BINARY} not found: install the registry with `apt-get install docker-registry` "
            "(or make the lab with --executor native, which needs no registry)"
        )
    _check_port_free(lab)
    storage(lab).mkdir(parents=True, exist_ok=True)
    lab.run_dir.mkdir(parents=True, exist_ok=True)
    config_path(lab).write_text(yaml.safe_dump(_config(lab), sort_keys=False))
    log = open(log_path(lab), "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [BINARY, "serve", str(config_path(lab))],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    add_process(lab.name, PROCESS_KEY, proc.pid)
    deadline = time.monotonic() + READY_TIMEOUT
    while not answers(address(lab)):
        if proc.poll() is not None:
            raise RegistryError(
                f"the lab's registry exited at start (status {proc.returncode}); "
                f"see {log_path(lab)}:\n{_tail(log_path(lab))}"
            )
        if time.monotonic() > deadline:
            stop_pids([proc.pid], signal.SIGKILL)
            raise RegistryError(
                f"the lab's registry did not answer on {address(lab)} within "
                f"{READY_TIMEOUT:.0f} s; see {log_path(lab)}"
            )
        time.sleep(0.05)


def wait_ready(lab: Lab, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not answers(address(lab)):
        if time.monotonic() > deadline:
            raise RegistryError(
                f"the lab's registry does not answer on {address(lab)}; see {log_path(lab)}"
            )
        time.sleep(0.05)


def stop(lab: Lab) -> None:
    """Stop the lab's registry (its storage stays)."""
    record = load(lab.name) or lab
    stop_pids(running(record, PROCESS_KEY))


def purge(lab: Lab) -> None:
    """Remove the registry's storage: every image pushed to it. Stop it first."""
    shutil.rmtree(storage(lab), ignore_errors=True)


def _check_port_free(lab: Lab) -> None:
    """Fail with who holds the port, rather than with the registry's own log line."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as Go's listeners do: a connection in TIME_WAIT does not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((lab.gateway, PORT))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise RegistryError(f"cannot listen on {address(lab)}: {e}") from None
            raise RegistryError(
                f"the lab's registry cannot listen on {address(lab)}: the port is taken "
                f"({_holder(PORT)}); stop that, or make the lab with --executor native"
            ) from None


def _holder(port: int) -> str:
    """Who listens on the port, as ss says it (address and process)."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True
    ).stdout
    held = [" ".join(f[3:4] + f[5:]) for f in (line.split() for line in out.splitlines()) if f]
    return "; ".join(held) or "by a socket ss does not show"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- the HTTP API v2 --------------------------------------------------------------------


def _conn(addr: str, timeout: float = 30.0) -> http.client.HTTPConnection:
    host, _, port = addr.rpartition(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, resp.headers, data


def answers(addr: str) -> bool:
    """Does a registry answer GET /v2/ at addr?"""
    conn = _conn(addr, timeout=2)
    try:
        status, headers, _ = _request(conn, "GET", "/v2/")
        return status == 200 and "Docker-Distribution-API-Version" in headers
    except OSError:
        return False
    finally:
        conn.close()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fail(what: str, status: int, body: bytes) -> RegistryError:
    return RegistryError(f"{what}: HTTP {status} {body.decode(errors='replace').strip()[:300]}")


def _put_blob(conn: http.client.HTTPConnection, repository: str, blob: bytes) -> str:
    digest = _digest(blob)
    status, _, body = _request(conn, "HEAD", f"/v2/{repository}/blobs/{digest}")
    if status == 200:
        return digest
    status, headers, body = _request(conn, "POST", f"/v2/{repository}/blobs/uploads/")
    if status != 202 or "Location" not in headers:
        raise _fail(f"starting an upload to {repository}", status, body)
    # Location may be absolute or not, and carries the upload's state in its query
    location = urllib.parse.urlsplit(headers["Location"])
    query = f"{location.query}&" if location.query else ""
    target = f"{location.path}?{query}digest={urllib.parse.quote(digest)}"
    status, _, body = _request(
        conn, "PUT", target, blob, {"Content-Type": "application/octet-stream"}
    )
    if status != 201:
        raise _fail(f"uploading {digest} to {repository}", status, body)
    return digest


def push(addr: str, repository: str, tag: str, image: rootfs.Image) -> str:
    """Push an image to the registry at addr (host:port) as repository:tag, with the HTTP API:
    its gzipped layer and config blobs (those the registry lacks), then a schema 2 manifest.
    Returns the manifest's digest."""
    layer = gzip.compress(image.layer, compresslevel=6, mtime=0)  # as Docker compresses
    config = image.config_blob()
    conn = _conn(addr)
    try:
        layer_digest = _put_blob(conn, repository, layer)
        config_digest = _put_blob(conn, repository, config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_V2,
                "config": {"mediaType": CONFIG_V1, "size": len(config), "digest": config_digest},
                "layers": [{"mediaType": LAYER_GZIP, "size": len(layer), "digest": layer_digest}],
            },
            indent=3,  # as Docker writes them
        ).encode()
        status, _, body = _request(
            conn,
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            manifest,
            {"Content-Type": MANIFEST_V2},
        )
        if status != 201:
            raise _fail(f"pushing the manifest of {repository}:{tag}", status, body)
    except OSError as e:
        raise RegistryError(f"pushing {repository}:{tag} to {addr}: {e}") from None
    finally:
        conn.close()
    return _digest(manifest)


def has_tag(addr: str, repository: str, tag: str) -> bool:
    conn = _conn(addr)
    try:
        status, _, _ = _request(
            conn, "HEAD", f"/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_V2}
        )
    finally:
        conn.close()
    return status == 200


def catalog(addr: str) -> list[str]:
    """The registry's repositories."""
    conn = _conn(addr)
    try:
        status, _, body = _request(conn, "GET", "/v2/_catalog?n=1000")
    finally:
        conn.close()
    if status != 200:
        raise _fail("listing the registry's repositories", status, body)
    repos: list[str] = json.loads(body)["repositories"]
    return repos


def seed(lab: Lab) -> list[str]:
    """Push the images built here to the lab's registry, those missing only; returns the
    repositories pushed."""
    addr = address(lab)
    built: dict[Callable[[], rootfs.Image], rootfs.Image] = {}
    pushed = []
    try:
        for repository, build in SEED.items():
            if has_tag(addr, repository, SEED_TAG):
                continue
            if build not in built:
                built[build] = build()
            push(addr, repository, SEED_TAG, built[build])
            pushed.append(repository)
    except OSError as e:
        raise RegistryError(
            f"seeding the lab's registry at {addr}: {e}; is it running? see {log_path(lab)}"
        ) from None
    except rootfs.BusyboxError as e:
        raise RegistryError(f"cannot build the images to seed the lab's registry: {e}") from None
    return pushed
