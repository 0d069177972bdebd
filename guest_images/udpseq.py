"""The host side of the udpseq payload (layout defined in udpseq.c, mirrored here).

Payload: u64 big-endian sequence number, then byte i (8 <= i < size) = (seq * 31 + i) & 0xff.
After the stream the sender sends :data:`END`, the end-of-stream sentinel (8 bytes, sequence
number 2^64 - 1): the receiver counts everything up to it, duplicates included, so "nothing
duplicated" never rests on a quiet spell. Also parses the one-line reports the guest tool prints.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct(">Q")
#: the end-of-stream sentinel: a bare header with sequence number 2^64 - 1
END = HEADER.pack(2**64 - 1)
MAX_PAYLOAD = 65507
# 0..255 repeated: any pattern run is one slice of it (no per-byte Python loop).
_CYCLE = bytes(range(256)) * ((MAX_PAYLOAD + 511) // 256)
_REPORT = re.compile(r"udpseq (send|recv): ((?:\w+=\d+ ?)+)")


def payload(seq: int, size: int) -> bytes:
    if not HEADER.size <= size <= MAX_PAYLOAD:
        raise ValueError(f"udpseq payload size {size} outside 8..{MAX_PAYLOAD}")
    start = (seq * 31 + HEADER.size) & 0xFF
    return HEADER.pack(seq) + _CYCLE[start : start + size - HEADER.size]


def is_end(data: bytes | memoryview) -> bool:
    """Is ``data`` the end-of-stream sentinel?"""
    return len(data) == HEADER.size and bytes(data) == END


def check(data: bytes | memoryview) -> int | None:
    """The sequence number of a well-formed payload, None if it is corrupt."""
    if len(data) < HEADER.size:
        return None
    (seq,) = HEADER.unpack_from(data)
    start = (seq * 31 + HEADER.size) & 0xFF
    if data[HEADER.size :] != _CYCLE[start : start + len(data) - HEADER.size]:
        return None
    return seq


@dataclass
class SeqStats:
    """Receive-side accounting of one numbered stream, same fields as `udpseq recv`."""

    count: int
    received: int = 0
    unique: int = 0
    dups: int = 0
    ooo: int = 0
    corrupt: int = 0
    bytes: int = 0
    max_seq: int = -1
    #: the end-of-stream sentinel arrived: every datagram before it has been counted
    ended: bool = False
    _seen: bytearray = field(default_factory=bytearray, repr=False)

    def __post_init__(self) -> None:
        self._seen = bytearray(self.count // 8 + 1)

    def add(self, data: bytes | memoryview) -> None:
        if is_end(data):
            self.ended = True
            return
        self.received += 1
        self.bytes += len(data)
        seq = check(data)
        if seq is None or seq >= self.count:
            self.corrupt += 1
            return
        byte, bit = divmod(seq, 8)
        if self._seen[byte] & (1 << bit):
            self.dups += 1
            return
        self._seen[byte] |= 1 << bit
        self.unique += 1
        if seq < self.max_seq:
            self.ooo += 1
        self.max_seq = max(self.max_seq, seq)

    @property
    def lost(self) -> int:
        return self.count - self.unique

    @property
    def complete(self) -> bool:
        return self.unique == self.count

    def as_dict(self) -> dict[str, int]:
        return {
            "count": self.count,
            "received": self.received,
            "unique": self.unique,
            "dups": self.dups,
            "ooo": self.ooo,
            "corrupt": self.corrupt,
            "lost": self.lost,
            "bytes": self.bytes,
            "end": int(self.ended),
        }


def parse_report(text: str, mode: str) -> dict[str, int]:
    """The last `udpseq <mode>: k=v ...` report in ``text`` (ValueError if there is none)."""
    found = [m for m in _REPORT.finditer(text) if m.group(1) == mode]
    if not found:
        raise ValueError(f"no 'udpseq {mode}:' report in {text[-500:]!r}")
    return {k: int(v) for k, v in (kv.split("=") for kv in found[-1].group(2).split())}
