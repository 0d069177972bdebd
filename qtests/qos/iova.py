"""DMA addresses for the qtest driver: what a device is told, as opposed to where the driver
keeps the bytes.

The driver always reads and writes guest memory by guest-physical address (qtest memory
commands bypass any vIOMMU).  What it programs into the device - ring addresses, descriptor
``addr`` fields, indirect tables - is a *DMA address*: the GPA itself without a vIOMMU, an
IOVA with one.  A `DmaMapper` turns one into the other, in the spirit of the Linux DMA API:

* `DmaMapper.map_coherent` / `unmap_coherent`: long-lived, both-ways memory (rings);
* `DmaMapper.map` / `unmap`: a streaming buffer for one request, with a direction
  (`DmaDir.TO_DEVICE`: the device reads it, `FROM_DEVICE`: the device writes it);
* `DmaMapper.map_msi`: the RAM words MSI-X vectors are routed to (the driver polls them).

`IdentityDma` (the default) returns the GPA and keeps no state.  `IovaAllocator` hands out
page-aligned IOVA ranges from a window; freed ranges are reused last-in first-out, so an IOVA
that was just unmapped is the next one mapped again (what makes a stale device translation
visible).
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

PAGE_SIZE = 4096


class DmaDir(enum.IntFlag):
    """Who accesses a mapping.  Bit-compatible with virtio-iommu MAP flags (READ 1, WRITE 2)
    and with vhost permissions (RO 1, WO 2, RW 3): READ = the device reads guest memory."""

    TO_DEVICE = 1
    FROM_DEVICE = 2
    BIDIRECTIONAL = 3


class DmaError(Exception):
    """A mapping could not be made or undone (names the range)."""


@runtime_checkable
class DmaMapper(Protocol):
    #: True when DMA address == GPA and map/unmap are no-ops (lets hot paths skip bookkeeping).
    identity: bool

    def map(self, gpa: int, size: int, direction: DmaDir) -> int:
        """DMA address for a streaming buffer [gpa, gpa+size) used once."""
        ...

    def unmap(self, addr: int, size: int, direction: DmaDir) -> None:
        """The device is done with a buffer mapped by `map` (returned ``addr``)."""
        ...

    def map_coherent(self, gpa: int, size: int) -> int:
        """DMA address for long-lived memory both sides access (rings)."""
        ...

    def unmap_coherent(self, addr: int, size: int) -> None: ...

    def map_msi(self, gpa: int, size: int) -> int:
        """Make the MSI-X words at [gpa, gpa+size) writable by the device; returns the address
        to program into the MSI-X table (the identity mappers return ``gpa``)."""
        ...


class IdentityDma:
    """No vIOMMU: the DMA address is the guest-physical address."""

    identity = True

    def map(self, gpa: int, size: int, direction: DmaDir) -> int:
        return gpa

    def unmap(self, addr: int, size: int, direction: DmaDir) -> None:
        return None

    def map_coherent(self, gpa: int, size: int) -> int:
        return gpa

    def unmap_coherent(self, addr: int, size: int) -> None:
        return None

    def map_msi(self, gpa: int, size: int) -> int:
        return gpa


#: The default mapper (stateless, shared).
IDENTITY = IdentityDma()


#: A chain's buffers as (address, length, descriptor flags); the mappings made for them.
Buffers = list[tuple[int, int, int]]
Mapped = list[tuple[int, int, DmaDir]]


def map_buffers(dma: DmaMapper, bufs: Buffers, write_flag: int) -> tuple[Buffers, Mapped]:
    """Map every buffer of a chain for the device (device-writable where ``flags &
    write_flag``); returns the buffers with DMA addresses and the mappings to undo later.
    On failure, whatever was mapped is unmapped again."""
    out: Buffers = []
    mapped: Mapped = []
    try:
        for a, n, f in bufs:
            d = DmaDir.FROM_DEVICE if f & write_flag else DmaDir.TO_DEVICE
            addr = dma.map(a, n, d)
            mapped.append((addr, n, d))
            out.append((addr, n, f))
    except BaseException:
        unmap_all(dma, mapped)
        raise
    return out, mapped


def unmap_all(dma: DmaMapper, mapped: Mapped | None) -> None:
    for addr, n, d in mapped or ():
        dma.unmap(addr, n, d)


def page_span(addr: int, size: int, page: int = PAGE_SIZE) -> tuple[int, int]:
    """(first page address, bytes of whole pages) covering [addr, addr+size)."""
    if size <= 0:
        raise DmaError(f"empty range at {addr:#x}")
    start = addr & ~(page - 1)
    end = (addr + size + page - 1) & ~(page - 1)
    return start, end - start


class IovaAllocator:
    """Page-aligned IOVA ranges from [base, limit); LIFO reuse of freed ranges of equal size.

    Freed ranges go to a per-size free list (the most recently freed first) before the bump
    pointer moves on, so a strict map/unmap/map cycle lands on the IOVA it just unmapped.
    """

    def __init__(self, base: int, limit: int, *, page: int = PAGE_SIZE) -> None:
        if base % page or limit <= base:
            raise DmaError(f"bad IOVA window {base:#x}..{limit:#x} (page {page:#x})")
        self.base = base
        self.limit = limit
        self.page = page
        self._next = base
        self._free: dict[int, list[int]] = {}
        self._live: dict[int, int] = {}  # iova -> size

    def alloc(self, size: int) -> int:
        size = (size + self.page - 1) & ~(self.page - 1)
        if size <= 0:
            raise DmaError("cannot allocate an empty IOVA range")
        stack = self._free.get(size)
        if stack:
            iova = stack.pop()
        else:
            if self._next + size > self.limit:
                raise DmaError(
                    f"IOVA window {self.base:#x}..{self.limit:#x} exhausted "
                    f"({len(self._live)} ranges live, {size:#x} bytes asked)"
                )
            iova, self._next = self._next, self._next + size
        self._live[iova] = size
        return iova

    def free(self, iova: int) -> None:
        size = self._live.pop(iova, None)
        if size is None:
            raise DmaError(f"free of IOVA {iova:#x}, which is not allocated")
        self._free.setdefault(size, []).append(iova)

    def size_of(self, iova: int) -> int | None:
        return self._live.get(iova)

    def live(self) -> dict[int, int]:
        return dict(self._live)

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.limit
