"""The VM lab's image: Debian's own kernel and a small Debian root filesystem, built once.

Debian's packaged kernel (linux-image-amd64) has what the machine Shoal is developed on lacks
(IPVS, ESP), so the VM lab boots it under QEMU. An image is three files in
/var/cache/shoal/vm/<key>/:

- `vmlinux`: the kernel, unpacked from /boot/vmlinuz-* to its ELF form, which QEMU boots
  straight through its PVH entry (XZ decompression under TCG costs ~3 s per boot);
- `initrd.gz`: busybox and the modules needed to mount the root (virtio, ext4, overlay);
- `root.img`: ext4, from mmdebstrap (minbase, the host's Debian release) with the tools the
  mesh drives (iproute2, nftables, conntrack, ipvsadm...) and the kernel's network, crypto and
  virtio modules. Every VM opens it read-only under a tmpfs overlay, so many VMs share one
  image and a VM's changes vanish with it.

The project is not installed in the image: the VMs mount the working tree, its virtualenv and
the Python it was made from over virtio-9p, read-only, at the same paths as on the host, so a
code change needs no rebuild. The key hashes what the image is made from (kernel package,
Debian release, package list, the scripts below); a new key rebuilds and drops older images.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("SHOAL_VM_CACHE", "/var/cache/shoal/vm"))
# Bump when the build changes in a way the hashed inputs below do not show.
RECIPE = 1
ROOTFS_PACKAGES = (
    "python3",  # the libraries a host's Python (Debian's or one built on the host) links to
    "iproute2",
    "nftables",
    "conntrack",
    "ipvsadm",
    "kmod",
    "procps",
    "iputils-ping",
    "curl",
    "tcpdump",
    "netbase",  # /etc/protocols, which `ip xfrm` and others read
)
# Whole module trees the mesh may load on demand (nf_tables expressions, IPVS schedulers,
# ESP and its crypto), plus single modules and what they depend on.
ROOTFS_MODULE_TREES = ("kernel/net", "kernel/crypto", "kernel/arch/x86/crypto", "kernel/lib")
ROOTFS_MODULES = (
    "virtio_net",
    "virtio_rng",
    "9p",
    "9pnet_virtio",
    "overlay",
    "vxlan",
    "veth",
    "dummy",
    "macvlan",
    "ipvlan",
    "tun",
    "geneve",
)
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "overlay")

# The initramfs' /init: mount the image read-only under a tmpfs overlay, switch into it.
INITRD_INIT = """#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "shoal initrd: $*"; echo o > /proc/sysrq-trigger; sleep 10; }
# One that does not fit the CPU (crc32c-intel without SSE4.2) has a generic twin.
for m in $(cat /modules); do insmod "$m" 2>/dev/null || echo "shoal initrd: skipped $m"; done
n=0
until [ -b /dev/vda ]; do
  n=$((n + 1)); [ $n -gt 100 ] && fail "no root disk /dev/vda"; sleep 0.1
done
mkdir -p /ro /rw /newroot
mount -t ext4 -o ro /dev/vda /ro || fail "cannot mount /dev/vda"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot \\
  || fail "cannot mount the overlay root"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/shoal-init
"""

# PID 1 of a lab VM. Its settings come on the kernel command line (orchestrator/lab/vm.py):
# shoal.node, shoal.ip, shoal.gw, shoal.mac (underlay NIC), shoal.mgmt_mac (the agent's NIC),
# shoal.share=TAG:PATH:ro|rw:CACHE (repeated, mounted in order), shoal.python, shoal.project.
SHOAL_INIT = """#!/bin/bash
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
echo /sbin/modprobe > /proc/sys/kernel/modprobe
fail() { echo "shoal-init: $*"; echo o > /proc/sysrq-trigger; sleep 10; }
arg() { tr ' ' '\\n' < /proc/cmdline | sed -n "s/^shoal\\.$1=//p"; }
NODE=$(arg node)
hostname "$NODE"
echo "127.0.0.1 localhost $NODE" > /etc/hosts
modprobe -a virtio_net virtio_rng 9pnet_virtio 9p
for dev in /sys/class/net/*; do
  case "$(cat "$dev/address")" in
    "$(arg mac)") ip link set "${dev##*/}" name eth0 ;;
    "$(arg mgmt_mac)") ip link set "${dev##*/}" name mgmt0 ;;
  esac
done
sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
ip link set lo up
ip addr add "$(arg ip)" dev eth0 && ip link set eth0 up || fail "no underlay NIC"
ip route add default via "$(arg gw)"
# The agent's own link (QEMU user networking, restricted: it reaches nothing but the host's
# forwarded port), kept apart from the underlay so a cut underlay does not cut the agent.
ip addr add "$(arg mgmt_ip)" dev mgmt0 && ip link set mgmt0 up || fail "no management NIC"
for share in $(arg share); do
  # cache: "loose" for what does not change under a running VM (the virtualenv, Python),
  # "none" for the project's sources and the state files the host rewrites
  IFS=: read -r tag path mode cache <<< "$share"
  mkdir -p "$path"
  mount -t 9p -o "$mode,trans=virtio,version=9p2000.L,msize=512000,cache=$cache" "$tag" "$path" \\
    || fail "cannot mount $path"
done
cd "$(arg project)" || fail "the project is not shared"
mgmt_ip="$(arg mgmt_ip)"
"$(arg python)" -m orchestrator.lab.vmagent --listen "${mgmt_ip%/*}" > /dev/console 2>&1 &
# PID 1 reaps the orphans of everything the agent starts.
while :; do wait; sleep 1; done
"""


class ImageError(RuntimeError):
    """The image cannot be built; the message says what is missing."""


@dataclass(frozen=True)
class Image:
    dir: Path
    kernel_version: str
    kernel: Path  # the ELF vmlinux (or the bzImage if it could not be unpacked)
    initrd: Path
    rootfs: Path

    @property
    def manifest(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.dir / "manifest.json").read_text())
        return loaded


def _run(argv: list[str], what: str, timeout: float | None = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ImageError(
            f"{what}: {argv[0]} is not installed; `make deb` (or `make test`) installs the "
            "VM lab's Debian packages"
        ) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise ImageError(f"{what} failed ({' '.join(argv[:3])} ...):\n" + "\n".join(tail))
    out: str = proc.stdout
    return out


def kernel_version() -> str:
    """The Debian kernel the lab boots: the one linux-image-amd64 depends on."""
    deps = subprocess.run(
        ["dpkg-query", "-W", "-f=${Depends}", "linux-image-amd64"], capture_output=True, text=True
    ).stdout
    m = re.search(r"linux-image-(\S+-amd64)", deps)
    if m and Path(f"/boot/vmlinuz-{m.group(1)}").exists():
        return m.group(1)
    found = sorted(Path("/boot").glob("vmlinuz-*-amd64"))
    if not found:
        raise ImageError(
            "no Debian kernel in /boot: the VM lab boots linux-image-amd64; install it with "
            "`make deb` (or apt-get install linux-image-amd64)"
        )
    return found[-1].name.removeprefix("vmlinuz-")


def _codename() -> str:
    text = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=(\S+)", text, re.M)
    if not m:
        raise ImageError("cannot tell this machine's Debian release from /etc/os-release")
    return m.group(1)


def _inputs(kver: str) -> dict[str, object]:
    pkg = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", f"linux-image-{kver}"],
        capture_output=True,
        text=True,
    ).stdout
    return {
        "recipe": RECIPE,
        "kernel": kver,
        "kernel_package": pkg,
        "release": _codename(),
        "packages": ROOTFS_PACKAGES,
        "module_trees": ROOTFS_MODULE_TREES,
        "modules": ROOTFS_MODULES,
        "initrd_modules": INITRD_MODULES,
        "initrd_init": INITRD_INIT,
        "init": SHOAL_INIT,
        "mirror": os.environ.get("SHOAL_VM_MIRROR", ""),
    }


def image_key(kver: str) -> str:
    blob = json.dumps(_inputs(kver), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _image(d: Path, kver: str) -> Image:
    vmlinux = d / "vmlinux"
    kernel = vmlinux if vmlinux.exists() else Path(f"/boot/vmlinuz-{kver}")
    return Image(d, kver, kernel, d / "initrd.gz", d / "root.img")


def cached() -> Image | None:
    """The current image if it is built, without building it."""
    kver = kernel_version()
    d = CACHE_DIR / image_key(kver)
    return _image(d, kver) if (d / "manifest.json").exists() else None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure(say: Callable[[str], None] = print) -> Image:
    """The image for the installed kernel; built (about a minute) if it is not cached."""
    kver = kernel_version()
    key = image_key(kver)
    final = CACHE_DIR / key
    with _locked():
        if (final / "manifest.json").exists():
            return _image(final, kver)
        say(f"building the VM image {key} (Debian kernel {kver}); it is cached in {CACHE_DIR}")
        work = CACHE_DIR / f"{key}.building"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            manifest = _build(work, kver, say)
            manifest["key"] = key
            manifest["inputs"] = _inputs(kver)
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        for old in CACHE_DIR.iterdir():
            if old.is_dir() and old.name != key:
                shutil.rmtree(old, ignore_errors=True)
        return _image(final, kver)


def _build(work: Path, kver: str, say: Callable[[str], None]) -> dict[str, object]:
    times: dict[str, float] = {}
    t0 = time.monotonic()
    extract_vmlinux(Path(f"/boot/vmlinuz-{kver}"), work / "vmlinux")
    times["vmlinux"] = time.monotonic() - t0

    t0 = time.monotonic()
    rootfs = work / "rootfs"
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--include=" + ",".join(ROOTFS_PACKAGES),
        # no documentation: it is a third of a minbase system
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        _codename(),
        str(rootfs),
    ]
    mirror = os.environ.get("SHOAL_VM_MIRROR")
    if mirror:
        argv.append(mirror)
    say("  mmdebstrap: a minimal Debian with iproute2, nftables, ipvsadm, Python (~25 s)")
    _run(argv, "building the VM root filesystem (mmdebstrap)", timeout=900)
    times["mmdebstrap"] = time.monotonic() - t0

    t0 = time.monotonic()
    _copy_modules(kver, rootfs)
    _run(["depmod", "-b", str(rootfs), kver], "indexing the VM's kernel modules")
    init = rootfs / "sbin/shoal-init"
    init.write_text(SHOAL_INIT)
    init.chmod(0o755)
    (rootfs / "etc/hostname").write_text("shoal-vm\n")
    # No resolver in the lab: the embedded DNS forwards nothing (tests give their upstreams).
    resolv = rootfs / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("")
    times["modules"] = time.monotonic() - t0

    t0 = time.monotonic()
    used = _du(rootfs)
    size_mb = used // (1 << 20) * 5 // 4 + 64
    _run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-L",
            "shoalroot",
            "-d",
            str(rootfs),
            str(work / "root.img"),
            f"{size_mb}M",
        ],
        "packing the VM root filesystem (mke2fs)",
    )
    shutil.rmtree(rootfs)
    times["mke2fs"] = time.monotonic() - t0

    t0 = time.monotonic()
    build_initrd(kver, work / "initrd.gz")
    times["initrd"] = time.monotonic() - t0
    return {
        "kernel": kver,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "rootfs_bytes": used,
        "image_bytes_allocated": (work / "root.img").stat().st_blocks * 512,
        "vmlinux_bytes": (work / "vmlinux").stat().st_size if (work / "vmlinux").exists() else 0,
        "initrd_bytes": (work / "initrd.gz").stat().st_size,
    }


def _du(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def extract_vmlinux(bzimage: Path, out: Path) -> bool:
    """Unpack the ELF kernel from an XZ-compressed bzImage; False (and no file) if it is not."""
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return False
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError:
        return False
    if not elf.startswith(b"\x7fELF"):
        return False
    out.write_bytes(elf)
    return True


def _depends(kver: str, modules: tuple[str, ...]) -> list[Path]:
    """Module files in load order (dependencies first), from modprobe's resolver."""
    out: list[Path] = []
    for m in modules:
        text = _run(["modprobe", "-S", kver, "--show-depends", m], f"resolving kernel module {m}")
        for line in text.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod" and Path(parts[1]) not in out:
                out.append(Path(parts[1]))
    return out


def _copy_modules(kver: str, root: Path) -> None:
    src = Path("/lib/modules") / kver
    dst = root / "lib/modules" / kver
    for tree in ROOTFS_MODULE_TREES:
        if (src / tree).is_dir():
            shutil.copytree(src / tree, dst / tree, dirs_exist_ok=True)
    for f in _depends(kver, ROOTFS_MODULES):
        target = root / f.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    for f in src.glob("modules.builtin*"):
        shutil.copy2(f, dst / f.name)
    shutil.copy2(src / "modules.order", dst / "modules.order")


class _Cpio:
    """A gzip'd cpio archive in the "newc" format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        head = b"070701" + b"".join(b"%08X" % v for v in fields)
        entry = head + name.encode() + b"\0"
        entry += b"\0" * (-len(entry) % 4) + data
        self.parts.append(entry + b"\0" * (-len(entry) % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def write(self, out: Path) -> None:
        self.add("TRAILER!!!", 0)
        out.write_bytes(gzip.compress(b"".join(self.parts), compresslevel=6))


def build_initrd(kver: str, out: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise ImageError(
            "busybox is not installed; `make deb` installs busybox-static for the VM lab"
        )
    cpio = _Cpio()
    made: set[str] = set()

    def dirs(path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                cpio.dir(d)

    for d in ("bin", "dev", "proc", "sys", "newroot"):
        dirs(d + "/x")
    cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for applet in ("sh", "mount", "umount", "mkdir", "insmod", "switch_root", "sleep", "cat"):
        cpio.symlink(f"bin/{applet}", "busybox")
    modules = _depends(kver, INITRD_MODULES)
    for f in modules:
        name = str(f.relative_to("/"))
        dirs(name)
        cpio.file(name, f.read_bytes())
    cpio.file("modules", "".join(f"{f}\n" for f in modules).encode())
    cpio.file("init", INITRD_INIT.encode(), 0o755)
    cpio.write(out)


def main() -> None:
    """`python -m orchestrator.lab.vmimage`: build (or find) the image and describe it."""
    img = ensure()
    print(json.dumps({"dir": str(img.dir), **img.manifest}, indent=2))


if __name__ == "__main__":
    main()
