"""Descriptor chains (virtio 1.2, 2.7.5 / 2.8.6): the one walker both ring layouts use.

:func:`walk_chain` follows a chain from its first descriptor, through an indirect table if
there is one, validates it and translates every buffer through the DMA space. The two
layouts differ only in where a descriptor's fields sit and how the next one is found:

* split: ``<QIHH`` = addr, len, flags, next; the chain follows ``next`` through the table
  (at most ``num`` descriptors, else a loop); indirect tables chain the same way.
* packed: ``<QIHH`` = addr, len, id, flags; the chain takes consecutive ring slots (wrapping
  at the end) while NEXT is set and its buffer id is in its last descriptor; an indirect
  descriptor must be the chain's only one, and every entry of its table is used in order
  (NEXT is ignored there, as in QEMU).

Both are 16-byte descriptors, so the walker reads them with one ``unpack_from`` from the ring
buffer and takes the flags / next from the layout's positions: one loop, no per-descriptor
call into the layout. A single plain descriptor (DPDK TX, most RX) returns before the loop.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from typing import Final

from backends.virtio.ring import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_ENTRIES,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)

from .access import Access
from .memory import Piece

__all__ = ["CHAIN_CHECKS", "Buffer", "Chain", "VqError", "walk_chain"]

#: VqError kinds of chain validation (what the ``no-chain-validation`` fault skips silently).
CHAIN_CHECKS = frozenset(
    {
        "head-range",
        "head-inflight",
        "next-range",
        "loop",
        "indirect-len",
        "indirect-nested",
        "indirect-next",
        "order",
        "len-overflow",
    }
)

# Final: mypyc keeps these in C statics instead of looking them up in the module dict
_DESC: Final = struct.Struct("<QIHH")  # both layouts: addr, len, then two u16 the layout names
_unpack_from: Final = _DESC.unpack_from
_READ: Final = Access.READ
_WRITE: Final = Access.WRITE
_FLAGS_MASK: Final = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT
_INDIRECT_MAX_LEN: Final = MAX_INDIRECT_ENTRIES * DESC_SIZE

#: Anything ``struct.unpack_from`` reads: a host buffer or a snapshot of a ring.
Buffer = bytes | bytearray | memoryview | mmap.mmap
Translate = Callable[[int, int, Access], list[Piece]]
ReadPieces = Callable[[list[Piece]], bytes]


class VqError(Exception):
    """Malformed ring content: the device goes to NEEDS_RESET.

    Kinds: 'avail-jump', 'head-range', 'head-inflight', 'next-range', 'loop', 'indirect-len',
    'indirect-nested', 'indirect-next', 'order', 'len-overflow', 'translate' (a buffer or
    indirect table the IOTLB refuses, not a miss), 'ring-translate' (the rings themselves),
    'ring-access' (ring memory vanished).
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}" if detail else kind)


class Chain:
    """A popped descriptor chain: driver-written ``out`` pieces, device-writable ``inp``.

    ``head`` is what the used element names: the head index (split) or the buffer id
    (packed). ``slots`` is how many ring entries it took (packed; 1 for split).

    A plain class with slots rather than a dataclass: one is made per packet, and mypyc
    compiles this ``__init__`` (a dataclass's generated one stays interpreted)."""

    __slots__ = ("avail_idx", "head", "in_len", "inp", "ndesc", "out", "out_len", "slots")

    def __init__(
        self,
        head: int,
        out: list[Piece],
        inp: list[Piece],
        out_len: int,
        in_len: int,
        avail_idx: int = 0,  # where it was popped: avail position (split) or slot (packed)
        ndesc: int = 0,  # buffers walked (indirect table entries included, the indirect not)
        slots: int = 1,
    ) -> None:
        self.head = head
        self.out = out
        self.inp = inp
        self.out_len = out_len
        self.in_len = in_len
        self.avail_idx = avail_idx
        self.ndesc = ndesc
        self.slots = slots

    def _fields(self) -> tuple[int, list[Piece], list[Piece], int, int, int, int, int]:
        return (self.head, self.out, self.inp, self.out_len, self.in_len, self.avail_idx,
                self.ndesc, self.slots)  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chain):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head!r}, out={self.out!r}, inp={self.inp!r}, "
            f"out_len={self.out_len!r}, in_len={self.in_len!r}, avail_idx={self.avail_idx!r}, "
            f"ndesc={self.ndesc!r}, slots={self.slots!r})"
        )


def walk_chain(
    translate: Translate,
    read_pieces: ReadPieces,
    ring: Buffer,
    base: int,
    num: int,
    packed: bool,
    first: int,
) -> Chain:
    """Walk the chain whose first descriptor is entry ``first`` of the ``num``-entry table at
    ``ring[base:]`` (a queue binds every argument but ``first`` once per ring translation). Raises VqError (malformed), TranslationError (the IOTLB refuses or
    misses: nothing has changed). ``Chain.head`` is ``first`` (split) or the buffer id
    (packed); ``avail_idx`` is left 0 for the caller."""
    addr, length, x, y = _unpack_from(ring, base + (first << 4))
    if packed:
        flags = y & _FLAGS_MASK
        head = x
    else:
        flags = x
        head = first
    if length:  # fast path: a chain of one plain descriptor
        if flags == 0:
            return Chain(head, translate(addr, length, _READ), [], length, 0, 0, 1)
        if flags == VRING_DESC_F_WRITE:
            return Chain(head, [], translate(addr, length, _WRITE), 0, length, 0, 1)
    unpack_from = _unpack_from
    out: list[Piece] = []
    inp: list[Piece] = []
    out_len = in_len = total = 0
    writing = False
    table: Buffer | None = None  # the indirect table being walked
    limit = num
    idx = first
    last = first  # the last ring slot of the chain (packed)
    count = 0
    ndesc = 0
    while True:
        count += 1
        if count > limit:
            if table is not None:
                raise VqError("loop", f"indirect table from head {head} longer than {limit}")
            raise VqError("loop", f"chain from {first} longer than the ring ({num})")
        if table is None:
            if count > 1:
                addr, length, x, y = unpack_from(ring, base + idx * DESC_SIZE)
            if packed:
                head, flags, nxt, last = x, y, idx + 1, idx
                if nxt == num:
                    nxt = 0
            else:
                flags, nxt = x, y
        else:
            addr, length, x, y = unpack_from(table, idx * DESC_SIZE)
            if packed:  # every entry of a packed indirect table is used, NEXT or not
                flags, nxt = y & ~VRING_DESC_F_NEXT, idx + 1
                if nxt < limit:
                    flags |= VRING_DESC_F_NEXT
            else:
                flags, nxt = x, y
        if flags & VRING_DESC_F_INDIRECT:
            if table is not None:
                raise VqError("indirect-nested", f"indirect descriptor {idx} in a table")
            if flags & VRING_DESC_F_NEXT:
                raise VqError("indirect-next", f"descriptor {idx} has INDIRECT and NEXT")
            if length == 0 or length % DESC_SIZE or length > _INDIRECT_MAX_LEN:
                raise VqError("indirect-len", f"indirect table length {length}")
            if packed and count > 1:
                raise VqError("indirect-nested", f"indirect descriptor {idx} inside a chain")
            table = read_pieces(translate(addr, length, _READ))
            limit = length // DESC_SIZE
            idx = 0
            count = 0
            continue
        ndesc += 1
        total += length
        if flags & VRING_DESC_F_WRITE:
            if length:
                inp.extend(translate(addr, length, _WRITE))
            in_len += length
            writing = True
        else:
            if writing:
                raise VqError("order", f"readable descriptor {idx} after a writable one")
            if length:
                out.extend(translate(addr, length, _READ))
            out_len += length
        if not flags & VRING_DESC_F_NEXT:
            break
        if nxt >= limit:
            raise VqError("next-range", f"next {nxt} >= {limit} (descriptor {idx})")
        idx = nxt
    if total > MAX_CHAIN_BYTES:
        raise VqError("len-overflow", f"chain from {first} is {total} bytes")
    slots = (last - first) % num + 1 if packed else 1
    return Chain(head, out, inp, out_len, in_len, 0, ndesc, slots)
