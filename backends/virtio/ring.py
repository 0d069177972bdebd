"""Virtqueue ring layouts (virtio 1.2, 2.7 split and 2.8 packed): descriptors, flags, ring
areas, sizes and event suppression. Both sides (device model and driver) use these.

Ring indexes / flags / event fields are read and written concurrently by the other side, so
each access must be ONE 16-bit load or store. struct's explicit little-endian codecs ("<H")
move one byte at a time: a driver polling used->idx while it goes 0x00ff -> 0x0100 can read
0x0000 (or the device reads a torn avail->idx). The native codec (:data:`U16`) is a single
memcpy of 2 bytes (one aligned store on x86); rings are little-endian, so native is right on
LE hosts. :data:`U16_LE` is the explicit codec for bytes that are not shared live.
"""

from __future__ import annotations

import struct
import sys

# -- both layouts ------------------------------------------------------------------------
DESC_SIZE = 16
U16 = struct.Struct("H" if sys.byteorder == "little" else "<H")
U16_LE = struct.Struct("<H")
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT_ENTRIES = 65536  # bound for one indirect table (1 MiB of descriptors)
MAX_CHAIN_BYTES = 1 << 32  # virtio 1.2 2.7.5.2: a chain must not exceed 2^32 bytes

# -- split ring (2.7) --------------------------------------------------------------------
SPLIT_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # id, len

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    return AVAIL_RING + 2 * num + 2  # flags, idx, ring[num], used_event


def used_ring_size(num: int) -> int:
    return USED_RING + USED_ELEM.size * num + 2  # flags, idx, ring[num], avail_event


def split_ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring incl. used_event, used ring incl. avail_event)."""
    return desc_table_size(num), avail_ring_size(num), used_ring_size(num)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """virtio's ``vring_need_event``: did the index move past ``event`` going old -> new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


# -- packed ring (2.8) -------------------------------------------------------------------
PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
PACKED_USED_LEN_ID = struct.Struct("<IH")  # len, id (bytes 8..14 of a descriptor)
PACKED_FLAGS_OFFSET = 14  # flags inside a descriptor
EVENT = struct.Struct("<HH")  # event suppression structure: off_wrap, flags
EVENT_OFF_WRAP = 0
EVENT_FLAGS = 2

DESC_F_NEXT = VRING_DESC_F_NEXT
DESC_F_WRITE = VRING_DESC_F_WRITE
DESC_F_INDIRECT = VRING_DESC_F_INDIRECT
DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15

EVENT_FLAGS_ENABLE = 0
EVENT_FLAGS_DISABLE = 1
EVENT_FLAGS_DESC = 2


def packed_avail_flags(flags: int, wrap: bool) -> int:
    """``flags`` with AVAIL/USED set for a descriptor the driver makes available in lap
    ``wrap``."""
    return flags | (DESC_F_AVAIL if wrap else DESC_F_USED)


def packed_used_flags(wrap: bool, write: bool) -> int:
    """The flags of a used descriptor the device writes in lap ``wrap``."""
    f = (DESC_F_AVAIL | DESC_F_USED) if wrap else 0
    return f | (DESC_F_WRITE if write else 0)


def packed_desc_available(flags: int, wrap: bool) -> bool:
    """Is a descriptor with ``flags`` available to a device whose avail wrap counter is
    ``wrap``? (AVAIL equals the counter, USED does not.)"""
    return bool(flags & DESC_F_AVAIL) == wrap and bool(flags & DESC_F_USED) != wrap


def packed_desc_used(flags: int, wrap: bool) -> bool:
    """Is a descriptor with ``flags`` used, for a driver whose used wrap counter is ``wrap``?
    (AVAIL and USED both equal the counter.)"""
    return bool(flags & DESC_F_AVAIL) == wrap and bool(flags & DESC_F_USED) == wrap
