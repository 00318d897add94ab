"""Container images built from this machine's busybox-static, never downloaded.

Each image is one layer, an uncompressed tar of its root filesystem, plus the config a
container starts from. Everything in the tar is fixed (owners root, mtimes the same constant,
entries in a sorted order), so the same busybox gives the same layer and config digests on
every run and every machine: pushing again is a no-op, and `docker load` of an image already
there changes nothing.

  busybox  /bin/busybox and a symlink per applet (sh, ping, httpd, nslookup, wget, ...),
           /etc/passwd and /etc/group (root, nobody), /root, /tmp; Cmd ["sh"]. It also stands
           in for alpine (the blog's `alpine ping`).
  micro    busybox and the demo app as a CGI of busybox httpd on port 8000: like
           orchestrator/apps/micro.py, `GET /` answers 200 with {"ip": <the local address the
           connection arrived on>, "hostname": <the container's hostname>} (TCP only: the
           Python micro's UDP answers are not there).

The container executor uses `busybox_path()` too: its gate (agent/exec/container.py) is this
busybox, bind-mounted into every task's container.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import struct
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Every entry's mtime and the image's creation time: the day Docker 1.12 (swarm mode) shipped.
EPOCH = 1469664000  # 2016-07-28T00:00:00Z
CREATED = "2016-07-28T00:00:00Z"
MICRO_PORT = 8000

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnobody:x:65534:\n"

# micro's answer. busybox httpd gives a CGI its peer (REMOTE_ADDR, REMOTE_PORT) but not its own
# address, so the connection is looked up by its peer in /proc/net/tcp (addresses there are
# hex, the IP in host byte order: little-endian on x86 and arm64); httpd listens on IPv4 only,
# as micro.py does, so /proc/net/tcp has every connection. No process is forked but awk.
MICRO_CGI = r"""#!/bin/sh
ip=$(awk -v a="$REMOTE_ADDR" -v p="$REMOTE_PORT" '
function hex(s) {
    return (index("0123456789ABCDEF", substr(s, 1, 1)) - 1) * 16 \
        + index("0123456789ABCDEF", substr(s, 2, 1)) - 1
}
BEGIN { split(a, o, "."); peer = sprintf("%02X%02X%02X%02X:%04X", o[4], o[3], o[2], o[1], p) }
$3 == peer {
    h = substr($2, 1, 8)
    printf "%d.%d.%d.%d", hex(substr(h, 7, 2)), hex(substr(h, 5, 2)), hex(substr(h, 3, 2)), \
        hex(substr(h, 1, 2))
    exit
}' /proc/net/tcp)
read -r host < /proc/sys/kernel/hostname
printf 'Content-Type: application/json\r\n\r\n{"ip": "%s", "hostname": "%s"}\n' "$ip" "$host"
"""
# sh stays PID 1 so that SIGTERM stops the container at once: httpd as PID 1 would ignore it,
# and every `docker stop` would wait out the 10 s grace period.
MICRO_CMD = [
    "sh",
    "-c",
    f"trap 'exit 0' TERM; httpd -f -p 0.0.0.0:{MICRO_PORT} -h /www & wait",
]


class BusyboxError(RuntimeError):
    """No usable busybox-static on this machine; the message says what to install."""


@dataclass(frozen=True)
class Image:
    layer: bytes  # uncompressed tar of the root filesystem
    config: dict[str, Any]  # the image config's "config": Cmd, Entrypoint, Env, ...

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.layer).hexdigest()

    def config_blob(self) -> bytes:
        """The full image config (architecture, os, rootfs.diff_ids, config), as stored."""
        return _canonical(
            {
                "architecture": architecture(),
                "os": "linux",
                "created": CREATED,
                "config": self.config,
                "rootfs": {"type": "layers", "diff_ids": [self.diff_id]},
                "history": [{"created": CREATED, "created_by": "shoal: orchestrator/images"}],
            }
        )

    @property
    def id(self) -> str:
        """The image ID Docker gives it: the digest of its config."""
        return "sha256:" + hashlib.sha256(self.config_blob()).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def architecture() -> str:
    """This machine's architecture as images name it (busybox is the host's binary)."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def busybox_path() -> str:
    """The static busybox binary the images are built from."""
    path = BUSYBOX
    if not path.is_file():
        raise BusyboxError(f"{path} not found: install it with `apt-get install busybox-static`")
    if not _is_static(path):
        raise BusyboxError(
            f"{path} is dynamically linked and would not run in a container without its "
            "libraries: install the static one with `apt-get install busybox-static`"
        )
    return str(path)


def _is_static(path: Path) -> bool:
    """An ELF executable with no program interpreter (PT_INTERP) is statically linked."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF":
            return False
        is64, endian = head[4] == 2, "<" if head[5] == 1 else ">"
        if is64:
            (phoff,) = struct.unpack_from(endian + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
        else:
            (phoff,) = struct.unpack_from(endian + "I", head, 28)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(
        struct.unpack_from(endian + "I", table, i * phentsize)[0] != pt_interp for i in range(phnum)
    )


def _applets(busybox: str) -> list[str]:
    """Where each applet lives (bin/sh, usr/sbin/httpd, ...), as busybox itself says."""
    out = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    return sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})


class _Tree:
    """A root filesystem being laid out: a path -> tar entry map, written sorted."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def _info(self, path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = kind, mode, EPOCH
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    def dir(self, path: str, mode: int = 0o755) -> None:
        self._parents(path)
        self.entries[path] = (self._info(path, tarfile.DIRTYPE, mode), None)

    def _parents(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent and parent not in self.entries:
            self.dir(parent)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(path)
        info = self._info(path, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.entries[path] = (info, data)

    def symlink(self, path: str, target: str) -> None:
        self._parents(path)
        info = self._info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.entries[path] = (info, None)

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                info, data = self.entries[path]
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def _with_busybox(tree: _Tree, applets: list[str] | None) -> None:
    """/bin/busybox and a symlink to it per applet (all of them when applets is None)."""
    busybox = busybox_path()
    tree.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for path in _applets(busybox):
        name = path.rpartition("/")[2]
        if path != "bin/busybox" and (applets is None or name in applets):
            tree.symlink(path, "/bin/busybox")


def _userland(tree: _Tree) -> None:
    _with_busybox(tree, None)
    tree.file("etc/passwd", PASSWD.encode())
    tree.file("etc/group", GROUP.encode())
    tree.dir("root", 0o700)
    tree.dir("tmp", 0o1777)
    tree.dir("var")


def busybox() -> Image:
    tree = _Tree()
    _userland(tree)
    return Image(tree.tar(), {"Cmd": ["sh"], "Env": [PATH_ENV], "WorkingDir": "/"})


def micro() -> Image:
    tree = _Tree()
    _userland(tree)
    tree.dir("www")
    tree.file("www/cgi-bin/index.cgi", MICRO_CGI.encode(), 0o755)
    return Image(
        tree.tar(),
        {
            "Cmd": MICRO_CMD,
            "Env": [PATH_ENV],
            "WorkingDir": "/",
            "ExposedPorts": {f"{MICRO_PORT}/tcp": {}},
            "Labels": {"org.shoal.app": "micro"},
        },
    )


def save_archive(image: Image, repo_tag: str) -> bytes:
    """The image as `docker save` writes it (manifest.json, <config>.json, <layer>/layer.tar),
    tagged repo_tag: what `docker load` and the docker SDK's `images.load(data)` take."""
    config = image.config_blob()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_dir = image.diff_id.removeprefix("sha256:")
    manifest = [
        {"Config": config_name, "RepoTags": [repo_tag], "Layers": [f"{layer_dir}/layer.tar"]}
    ]
    tree = _Tree()
    tree.file("manifest.json", _canonical(manifest))
    tree.file(config_name, config)
    tree.file(f"{layer_dir}/VERSION", b"1.0")
    tree.file(f"{layer_dir}/layer.tar", image.layer)
    return tree.tar()
