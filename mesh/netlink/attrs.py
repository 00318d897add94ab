"""Netlink attributes (struct nlattr): encoding, decoding, and the integers inside them.

An attribute is a 4-byte header (length, type) and a payload padded to 4 bytes; a nested
attribute's payload is a run of attributes. nf_tables and ctnetlink carry integers in
big-endian (the `be` helpers); rtnetlink in host order (its users pack them with struct).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

_ATTR = struct.Struct("=HH")  # nlattr: len, type
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def pad(n: int) -> int:
    """n rounded up to 4 bytes (NLA_ALIGN, NLMSG_ALIGN)."""
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (pad(length) - length)


def attr_be32(kind: int, value: int) -> bytes:
    return attr(kind, _BE32.pack(value & 0xFFFFFFFF))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def iter_attrs(data: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    """(type, payload) for each attribute in a buffer; flags are stripped from the type."""
    view = memoryview(data)
    off = 0
    while off + _ATTR.size <= len(view):
        length, kind = _ATTR.unpack_from(view, off)
        if length < _ATTR.size or off + length > len(view):
            return
        yield kind & NLA_TYPE_MASK, bytes(view[off + _ATTR.size : off + length])
        off += pad(length)


def attrs_dict(data: bytes | memoryview) -> dict[int, bytes]:
    return dict(iter_attrs(data))


def get_str(attrs: dict[int, bytes], kind: int) -> str:
    return attrs.get(kind, b"").rstrip(b"\0").decode(errors="replace")


def get_be32(attrs: dict[int, bytes], kind: int) -> int:
    raw = attrs.get(kind)
    return int(_BE32.unpack(raw)[0]) if raw and len(raw) >= 4 else 0


def get_be64(attrs: dict[int, bytes], kind: int) -> int:
    raw = attrs.get(kind)
    return int(_BE64.unpack(raw)[0]) if raw and len(raw) >= 8 else 0
