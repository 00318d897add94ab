"""A manager's data encryption key (DEK) and its sealing under the unlock key (autolock).

Docker's model (../shared/reference/swarm.md §1.2 and the security section; swarmkit
`manager/deks.go`), our own code and file format:

- The **DEK** (32 random bytes) encrypts every Raft WAL record and the snapshot with
  AES-256-GCM (`RaftStorage`). Each manager has its own, made on its first start; it never
  leaves the manager and is never rotated.
- Each file (a WAL, a snapshot) has its own key, derived from the DEK and a random salt in the
  file's header (HKDF-SHA256), and each record a random 96-bit nonce. A WAL file is replaced
  at every compaction, so no key ever seals more than a few tens of thousands of records, far
  below the 2^32 random nonces that AES-GCM allows per key; and a record copied from another
  file, even an older version of the same log, does not open.
- The DEK lives in `<raft dir>/raft.dek`. Without autolock it is stored in the clear (mode
  0600): the Raft data is then safe from someone who has a copy of the log or of a backup
  without the key file, not from root on the host.
- With **autolock** the file is sealed with AES-256-GCM under a key-encryption key (KEK)
  derived by HKDF-SHA256 from the unlock key's 32 raw bytes (`UnlockKey.key`, shown as
  `SWMKEY-1-...`) and a fresh salt. A restarted manager cannot read its Raft data until it is
  given that key: `load` raises `Locked` without one and `WrongUnlockKey` with a wrong one,
  and neither writes anything. A clear file opens whether or not a key is given.
- Rotating the unlock key, or turning autolock on or off, **reseals** the DEK (`write_key`):
  only the key file is replaced (temporary file, fsync, rename, fsync of the directory), never
  the log. A running manager holds the DEK, so it needs only the new key.

Key file (integers little-endian), `crc32` over all the bytes before it:

    clear:  "SHOALDEK1\\n" | 0 u8 | DEK (32)                                      | crc32 u32
    sealed: "SHOALDEK1\\n" | 1 u8 | salt (16) | nonce (12) | AES-GCM(KEK, DEK) (48) | crc32 u32

The GCM associated data is everything before the ciphertext. The checksum tells a damaged file
(`KeyFileError`) from a key that does not open an intact one (`WrongUnlockKey`).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from orchestrator.raft.wal import fsync_dir

KEY_FILE = "raft.dek"
KEY_BYTES = 32  # the DEK, the unlock key, and every key derived from them
SALT_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES  # what sealing adds to each record

_MAGIC = b"SHOALDEK1\n"
_CLEAR, _SEALED = 0, 1
_CRC = struct.Struct("<I")
_FILE_INFO = b"shoal raft file key v1"
_KEK_INFO = b"shoal raft dek kek v1"
# A record's associated data: a domain (a snapshot's, its header, cannot collide with it), its
# position in the file and its Raft index.
_RECORD_AAD = struct.Struct("<8sQQ")
_RECORD_DOMAIN = b"SHOALREC"


class SealError(RuntimeError):
    """The manager's data key cannot be had (base class)."""


class Locked(SealError):
    """The data key is sealed (autolock) and no unlock key was given."""


class WrongUnlockKey(SealError):
    """The unlock key given does not open the data key."""


class KeyFileError(SealError):
    """The key file is missing where Raft data needs it, or damaged."""


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    # The input keys are 256 random bits, so no slow KDF is needed: HKDF makes a key used for
    # nothing else, and the random salt a new one each time.
    return HKDF(hashes.SHA256(), KEY_BYTES, salt, info).derive(key)


@dataclass(frozen=True)
class DataKey:
    """A manager's DEK."""

    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes")

    @classmethod
    def generate(cls) -> DataKey:
        return cls(os.urandom(KEY_BYTES))

    def file_cipher(self, salt: bytes) -> FileCipher:
        """The cipher of the file whose header holds `salt` (an orchestrator.raft.wal
        RecordCipher, and the snapshot's)."""
        if len(salt) != SALT_BYTES:
            raise ValueError(f"a file salt is {SALT_BYTES} bytes")
        return FileCipher(_hkdf(self.raw, salt, _FILE_INFO))


class FileCipher:
    """AES-256-GCM under one file's key, a random nonce per message: nonce | ciphertext+tag."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        # built once per file: an AESGCM per record would cost more than sealing it
        self._aead = AESGCM(key)

    def encrypt(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None if `blob` is not what `encrypt` made with this `aad` under
        this key (altered, cut short, moved, or from another file)."""
        if len(blob) < OVERHEAD:
            return None
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            return None

    # orchestrator.raft.wal.RecordCipher: a record cannot be moved within its file, swapped
    # with another, or dropped from the middle without the ones after it failing to open.

    def seal(self, ordinal: int, index: int, data: bytes) -> bytes:
        return self.encrypt(data, _RECORD_AAD.pack(_RECORD_DOMAIN, ordinal, index))

    def open(self, ordinal: int, index: int, data: bytes) -> bytes | None:
        return self.decrypt(data, _RECORD_AAD.pack(_RECORD_DOMAIN, ordinal, index))


# ---- the key file ----------------------------------------------------------------------------


def key_path(directory: Path) -> Path:
    return directory / KEY_FILE


def _kek(unlock_key: bytes, salt: bytes) -> AESGCM:
    if len(unlock_key) != KEY_BYTES:
        raise ValueError(f"an unlock key is {KEY_BYTES} raw bytes (UnlockKey.key)")
    return AESGCM(_hkdf(unlock_key, salt, _KEK_INFO))


def _encode(key: DataKey, unlock_key: bytes | None) -> bytes:
    if unlock_key is None:
        body = _MAGIC + bytes([_CLEAR]) + key.raw
    else:
        salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
        aad = _MAGIC + bytes([_SEALED]) + salt + nonce
        body = aad + _kek(unlock_key, salt).encrypt(nonce, key.raw, aad)
    return body + _CRC.pack(zlib.crc32(body))


_SIZES = {
    _CLEAR: len(_MAGIC) + 1 + KEY_BYTES + _CRC.size,
    _SEALED: len(_MAGIC) + 1 + SALT_BYTES + NONCE_BYTES + KEY_BYTES + TAG_BYTES + _CRC.size,
}


def _read(path: Path) -> tuple[int, bytes]:
    """The file's mode and its bytes before the checksum, once checked (no key needed)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: this manager's data key is missing; its Raft data cannot be read"
        ) from None
    if not raw.startswith(_MAGIC) or len(raw) <= len(_MAGIC):
        raise KeyFileError(f"{path}: not a Shoal data key file (bad header)")
    mode = raw[len(_MAGIC)]
    if (
        len(raw) != _SIZES.get(mode)
        or zlib.crc32(raw[: -_CRC.size]) != _CRC.unpack(raw[-_CRC.size :])[0]
    ):
        raise KeyFileError(
            f"{path}: this manager's data key file is damaged (bad size or checksum); "
            "restore it from a backup, or rejoin this manager"
        )
    return mode, raw[: -_CRC.size]


def is_locked(directory: Path) -> bool:
    """Is the data key of this Raft directory sealed (autolock), so that opening it needs the
    unlock key? False if there is no key file (yet). Reads only."""
    path = key_path(directory)
    return path.exists() and _read(path)[0] == _SEALED


def load(directory: Path, unlock_key: bytes | None) -> DataKey:
    """The data key, unsealed with `unlock_key` if the file is sealed. Reads only.

    A clear file opens whatever `unlock_key` is (autolock was turned on while this manager
    was down: it reseals when it learns the key)."""
    path = key_path(directory)
    mode, body = _read(path)
    start = len(_MAGIC) + 1
    if mode == _CLEAR:
        return DataKey(body[start:])
    if unlock_key is None:
        raise Locked(
            "this manager is locked: its Raft data is encrypted; run `shoal swarm unlock` "
            "and give the unlock key (SWMKEY-1-...)"
        )
    salt = body[start : start + SALT_BYTES]
    nonce = body[start + SALT_BYTES : start + SALT_BYTES + NONCE_BYTES]
    aad = body[: start + SALT_BYTES + NONCE_BYTES]
    try:
        return DataKey(_kek(unlock_key, salt).decrypt(nonce, body[len(aad) :], aad))
    except InvalidTag:
        raise WrongUnlockKey(
            "the unlock key is wrong: it does not open this manager's data key "
            f"({path}); give the current unlock key, or the one before it if the key was "
            "rotated while this manager was down"
        ) from None


def write_key(directory: Path, key: DataKey, unlock_key: bytes | None) -> None:
    """Store `key` sealed under `unlock_key`, or in the clear for None, replacing the key file
    atomically: a crash leaves the old file or the new one, never a mix."""
    path = key_path(directory)
    data = _encode(key, unlock_key)  # refuses a bad unlock key before touching anything
    tmp = directory / (KEY_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a stale temporary file keeps its mode through O_TRUNC
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(directory)


def create(directory: Path, unlock_key: bytes | None) -> DataKey:
    """A new data key for a new manager, stored (sealed under `unlock_key` if given)."""
    key = DataKey.generate()
    write_key(directory, key, unlock_key)
    return key
