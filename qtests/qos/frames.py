"""Numbered test frames for the qtest suites.

A test frame is an Ethernet frame with the local-experimental ethertype 0x88B5 whose payload
starts with a magic, a stream id and a sequence number, followed by a pattern derived from the
sequence number, so a frame that arrives corrupted, twice, or out of order is recognisable.
"""

from __future__ import annotations

import struct

ETHERTYPE_TEST = 0x88B5
MAGIC = b"VDPA"
HEADER = struct.Struct("!6s6sH4sIQ")  # dst, src, ethertype, magic, stream, seq
MIN_SIZE = HEADER.size
BROADCAST = b"\xff" * 6
PEER_MAC = bytes.fromhex("020000000001")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


#: The 256-byte pattern block of every ``(seq * 7) & 0xFF`` (built once: tests make and check
#: tens of thousands of frames, e.g. to wrap a ring's u16 indices).
_BLOCKS = tuple(bytes((start + i) & 0xFF for i in range(256)) for start in range(256))


def _pattern(seq: int, length: int) -> bytes:
    if length <= 0:
        return b""
    block = _BLOCKS[(seq * 7) & 0xFF]
    return (block * (length // 256 + 1))[:length]


def make_frame(
    seq: int,
    size: int = 64,
    *,
    stream: int = 0,
    dst: bytes = BROADCAST,
    src: bytes = PEER_MAC,
) -> bytes:
    """A ``size``-byte frame (at least the header) carrying ``(stream, seq)``."""
    size = max(size, MIN_SIZE)
    head = HEADER.pack(dst, src, ETHERTYPE_TEST, MAGIC, stream, seq)
    return head + _pattern(seq, size - HEADER.size)


def parse_frame(frame: bytes) -> tuple[int, int] | None:
    """``(stream, seq)`` of an intact test frame, None for anything else or a corrupted one."""
    if len(frame) < HEADER.size:
        return None
    _, _, ethertype, magic, stream, seq = HEADER.unpack_from(frame)
    if ethertype != ETHERTYPE_TEST or magic != MAGIC:
        return None
    if frame[HEADER.size :] != _pattern(seq, len(frame) - HEADER.size):
        return None
    return stream, seq
