"""Guest memory as the driver sees it: what the driver rings (``virtqueue``,
``packed_virtqueue``) read and write, and a memfd-backed guest RAM for drivers that talk to a
backend directly (the vhost-user front-end) instead of through QEMU.

* :class:`GuestMemoryAccess` - the protocol the rings use: ``read``/``write``/``write_many``
  and the 16-bit ``readw``/``writew`` of ring indexes. :class:`~qtests.qos.qtest.QTest`
  implements it (through QEMU); so does :class:`SharedGuestMemory` (directly).
* :class:`SharedGuestMemory` - guest RAM made of memfd slots (the fds a front-end hands to
  the backend, with fake QEMU user addresses ``UADDR_BASE + gpa``), allocating from the
  first slot with a :class:`~qtests.qos.alloc.GuestAllocator`.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from collections.abc import Iterable
from typing import Protocol

from backends.vhost_user import messages as m

from .alloc import GuestAllocator, MemRange

__all__ = ["PAGE", "UADDR_BASE", "GuestMemoryAccess", "MemSlot", "SharedGuestMemory"]

PAGE = 0x1000
UADDR_BASE = 0x7F00_0000_0000  # fake QEMU user addresses: UADDR_BASE + gpa
# one 16-bit load/store for ring indexes the backend reads concurrently (see backends.virtio.ring)
_U16 = struct.Struct("H" if sys.byteorder == "little" else "<H")

Data = bytes | bytearray | memoryview


class GuestMemoryAccess(Protocol):
    """Guest-physical memory access, as the driver rings need it."""

    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: Data) -> None: ...
    def write_many(self, items: Iterable[tuple[int, Data]]) -> None: ...
    def readw(self, addr: int) -> int: ...
    def writew(self, addr: int, value: int) -> None: ...


class MemSlot:
    """One memfd-backed slot of guest RAM."""

    def __init__(self, gpa: int, size: int, uaddr: int | None = None, name: str = "ram"):
        self.gpa = gpa
        self.size = size
        self.uaddr = UADDR_BASE + gpa if uaddr is None else uaddr
        self.fd = os.memfd_create(f"guest-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def region(self, mmap_offset: int = 0) -> m.MemRegion:
        return m.MemRegion(self.gpa, self.size, self.uaddr, mmap_offset)

    def contains(self, gpa: int, n: int = 1) -> bool:
        return self.gpa <= gpa and gpa + n <= self.gpa + self.size

    def close(self) -> None:
        if self.fd >= 0:
            self.mm.close()
            os.close(self.fd)
            self.fd = -1


class SharedGuestMemory:
    """Guest RAM made of memfd slots; allocations come from the first slot (its first page
    stays unused, so GPA 0 is never handed out). Also the allocator of the rings put in it."""

    def __init__(self, size: int = 4 << 20, gpa: int = 0) -> None:
        self.slots: list[MemSlot] = []
        first = self.add_slot(gpa, size)
        self.allocator = GuestAllocator(
            [MemRange("ram", first.gpa + PAGE, size - PAGE)], page_size=PAGE
        )

    # -- slots -----------------------------------------------------------------------------
    def add_slot(self, gpa: int, size: int, name: str = "ram") -> MemSlot:
        slot = MemSlot(gpa, size, name=name)
        self.slots.append(slot)
        return slot

    def remove_slot(self, slot: MemSlot) -> None:
        self.slots.remove(slot)
        slot.close()

    def regions(self) -> list[m.MemRegion]:
        return [s.region() for s in self.slots]

    def fds(self) -> list[int]:
        return [s.fd for s in self.slots]

    def _slot(self, gpa: int, n: int) -> MemSlot:
        for s in self.slots:
            if s.contains(gpa, n):
                return s
        raise ValueError(f"gpa {gpa:#x}+{n:#x} is not guest RAM")

    def uaddr(self, gpa: int) -> int:
        s = self._slot(gpa, 1)
        return s.uaddr + (gpa - s.gpa)

    # -- allocation ------------------------------------------------------------------------
    def alloc(self, size: int, align: int | None = 16, *, tag: str = "") -> int:
        """``size`` bytes aligned to ``align`` (None: a page, what the rings ask for)."""
        return self.allocator.alloc(max(size, 1), align or PAGE, tag=tag)

    def free(self, addr: int) -> None:
        self.allocator.free(addr)

    # -- access (GuestMemoryAccess) --------------------------------------------------------
    def read(self, addr: int, size: int) -> bytes:
        s = self._slot(addr, size)
        off = addr - s.gpa
        return bytes(s.mm[off : off + size])

    def write(self, addr: int, data: Data) -> None:
        s = self._slot(addr, len(data))
        off = addr - s.gpa
        s.mm[off : off + len(data)] = data

    def write_many(self, items: Iterable[tuple[int, Data]]) -> None:
        for addr, data in items:
            self.write(addr, data)

    def readw(self, addr: int) -> int:
        s = self._slot(addr, 2)
        v: int = _U16.unpack_from(s.mm, addr - s.gpa)[0]
        return v

    def writew(self, addr: int, value: int) -> None:
        self.write(addr, _U16.pack(value & 0xFFFF))

    def close(self) -> None:
        for s in self.slots:
            s.close()
        self.slots.clear()
