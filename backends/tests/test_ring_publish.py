"""Ring fields the driver polls are stored with one copy of their final bytes.

``struct.pack_into`` zero-fills its target before packing (CPython ``s_pack_internal``), so a
driver polling used->idx through shared memory could see 0 in between: the qtest wrap suite
saw used idx 0x2d80 -> 0 -> 0x2e00 and the driver (rightly) reported a device that moved its
used index backwards. ``RingArea.pack`` must write only the final value.
"""

from __future__ import annotations

from typing import Any

from backends.vdpa.dma import DmaSpace
from backends.vdpa.iotlb import IOTLB
from backends.vdpa.memory import HostMemory, HostRegion, Piece
from backends.vdpa.virtqueue import RingArea
from backends.virtio.ring import U16, USED_ELEM


class RecordingBuffer(bytearray):
    """A bytearray that records slice stores (``pack_into`` bypasses ``__setitem__``)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.stores: list[tuple[int, bytes]] = []

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, slice):
            self.stores.append((key.start, bytes(value)))
        super().__setitem__(key, value)


def _area(buf: RecordingBuffer, offset: int = 0x100, length: int = 0x100) -> RingArea:
    region = HostRegion(0x10000, len(buf), 0x7F0000000000, 0, buf)
    return RingArea([Piece(region, offset, length)], DmaSpace(IOTLB(), HostMemory()))


def test_u16_publish_is_one_store_of_the_final_value() -> None:
    buf = RecordingBuffer(0x1000)
    area = _area(buf)
    area.pack(U16, 2, 0x2D80)
    area.pack(U16, 2, 0x2E00)
    assert buf.stores == [(0x102, b"\x80\x2d"), (0x102, b"\x00\x2e")]
    assert area.u16(2) == 0x2E00


def test_used_element_and_split_area_stores() -> None:
    buf = RecordingBuffer(0x1000)
    area = _area(buf)
    area.pack(USED_ELEM, 4, 7, 1500)
    assert buf.stores == [(0x104, (7).to_bytes(4, "little") + (1500).to_bytes(4, "little"))]
    # an area in two pieces (e.g. across regions) still stores every byte once, in order
    region = HostRegion(0x20000, len(buf), 0x7F0000100000, 0, buf)
    split = RingArea(
        [Piece(region, 0x200, 3), Piece(region, 0x300, 5)], DmaSpace(IOTLB(), HostMemory())
    )
    buf.stores.clear()
    split.pack(U16, 2, 0xBEEF)
    assert buf.stores == [(0x202, b"\xef"), (0x300, b"\xbe")]
    assert split.u16(2) == 0xBEEF
