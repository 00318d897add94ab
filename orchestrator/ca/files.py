"""A node's credentials on disk, under `<data-root>/certificates/` with swarmkit's file names.

    swarm-root-ca.crt   the roots the node trusts (0644)
    swarm-node.crt      its chain: leaf, then intermediates (0644)
    swarm-node.key      its private key (0600; the directory is 0700)

A renewal replaces the key and the certificate together, and a crash between the two writes
would leave a key that does not match its certificate: a node that cannot start. So a save is
a tiny journal: write every file as `<name>.new` and sync, create `commit` (the point of no
return), rename each `.new` into place, remove `commit`. `load` finishes a save that has its
`commit`, and throws away `.new` files that have none (the save never got that far).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from orchestrator.ca.tls import NodeCredentials

ROOT_FILE = "swarm-root-ca.crt"
CERT_FILE = "swarm-node.crt"
KEY_FILE = "swarm-node.key"
_COMMIT = "commit"
_MODES = {ROOT_FILE: 0o644, CERT_FILE: 0o644, KEY_FILE: 0o600}


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode, so the key is never readable by others, even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish(directory: Path) -> None:
    """Promote or discard `.new` files left by an interrupted save."""
    committed = (directory / _COMMIT).exists()
    for name in _MODES:
        new = directory / f"{name}.new"
        if not new.exists():
            continue
        if committed:
            new.replace(directory / name)
        else:
            new.unlink()
    if committed:
        _sync_dir(directory)
        (directory / _COMMIT).unlink()
    _sync_dir(directory)


def save_node_credentials(directory: Path, creds: NodeCredentials) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    _finish(directory)
    contents = {ROOT_FILE: creds.trust_pem, CERT_FILE: creds.chain_pem, KEY_FILE: creds.key_pem}
    for name, data in contents.items():
        _write_synced(directory / f"{name}.new", data, _MODES[name])
    _write_synced(directory / _COMMIT, b"", 0o600)
    _sync_dir(directory)
    _finish(directory)


def load_node_credentials(directory: Path, recover: bool = True) -> NodeCredentials | None:
    """The saved credentials, or None if the node has none (it never joined, or left).
    `recover` finishes or discards an interrupted save first: only the directory's owner may,
    at its start. Another process reads with recover False, the files as last committed:
    recovering would discard the `.new` files of a save under way and lose it."""
    if not directory.exists():
        return None
    if recover:
        _finish(directory)
    try:
        return NodeCredentials(
            key_pem=(directory / KEY_FILE).read_bytes(),
            chain_pem=(directory / CERT_FILE).read_bytes(),
            trust_pem=(directory / ROOT_FILE).read_bytes(),
        )
    except FileNotFoundError:
        return None


def remove_node_credentials(directory: Path) -> None:
    """`swarm leave`: forget the identity (the key first, so nothing half-usable remains)."""
    for name in (KEY_FILE, CERT_FILE, ROOT_FILE, _COMMIT, *(f"{n}.new" for n in _MODES)):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
