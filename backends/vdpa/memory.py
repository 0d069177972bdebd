"""Host memory: the shared-memory regions QEMU handed over, keyed by QEMU's user address.

``HostMemory`` is the "host physical" side of every translation: the IOTLB maps IOVA -> uaddr,
and ``HostMemory.lookup`` turns a uaddr range into :class:`Piece` objects (region + offset),
each of which also knows its guest-physical address so dirty logging can mark the right page.
"""

from __future__ import annotations

import bisect
import fcntl
import itertools
import logging
import mmap
import os
import struct
from typing import Any

from . import sigbus_guard
from .access import Access, TranslationError

__all__ = ["Access", "HostMemory", "HostRegion", "Piece", "TranslationError"]

log = logging.getLogger(__name__)

_region_ids = itertools.count(1)
# Regions whose munmap had to wait because a memoryview was still exported.
_pending_close: set[HostRegion] = set()


def reap_deferred_closes() -> int:
    """Retry the munmap of closed regions that still had exported views; returns how many
    are still waiting. Called opportunistically by HostRegion / HostMemory operations."""
    for r in list(_pending_close):
        if r._try_unmap():
            _pending_close.discard(r)
            r._release_backing()
    return len(_pending_close)


class Piece:
    """One contiguous host chunk of a translated range (``offset`` is inside the region).

    Immutable by contract (translations hand the same Piece out again): nothing assigns to
    its fields after ``__init__``. A plain class with slots rather than a frozen dataclass:
    mypyc compiles this ``__init__`` (a dataclass's generated one stays interpreted)."""

    __slots__ = ("length", "offset", "region")

    def __init__(self, region: HostRegion, offset: int, length: int) -> None:
        self.region = region
        self.offset = offset
        self.length = length

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Piece):
            return NotImplemented
        return (self.region, self.offset, self.length) == (other.region, other.offset, other.length)

    def __hash__(self) -> int:
        return hash((self.region, self.offset, self.length))

    def __repr__(self) -> str:
        return f"Piece(region={self.region!r}, offset={self.offset!r}, length={self.length!r})"

    @property
    def gpa(self) -> int:
        return self.region.gpa + self.offset

    @property
    def uaddr(self) -> int:
        return self.region.uaddr + self.offset

    def view(self) -> memoryview:
        """A memoryview of the bytes. Short-lived: release it (or drop it) promptly, a region
        cannot be unmapped while one is alive."""
        r = self.region
        if r.closed:
            raise TranslationError("unmapped", self.gpa, self.length, Access.READ, "region closed")
        start = r.base + self.offset
        return memoryview(r.buf)[start : start + self.length]

    def read(self) -> bytes:
        r = self.region
        if r.closed:
            raise TranslationError("unmapped", self.gpa, self.length, Access.READ, "region closed")
        start = r.base + self.offset
        return bytes(r.buf[start : start + self.length])

    def write(self, data: bytes | bytearray | memoryview, at: int = 0) -> int:
        """Copy ``data`` (truncated to the piece) at ``at``; returns the bytes written."""
        r = self.region
        if r.closed:
            raise TranslationError("unmapped", self.gpa, self.length, Access.WRITE, "region closed")
        n = min(len(data), self.length - at)
        if n <= 0:
            return 0
        start = r.base + self.offset + at
        r.buf[start : start + n] = data[:n] if n < len(data) else data
        r.written += n
        return n


F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004


def file_seals(fd: int) -> int:
    """The memfd seals on ``fd`` (0 for files that cannot carry seals)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return 0


def seal_against_shrinking(fd: int) -> int:
    """Add F_SEAL_SHRINK to a memfd that allows sealing but is not sealed yet (seals belong to
    the file, so the peer can no longer shrink it either: no SIGBUS window at all for it).
    Returns the seals now in place; files that cannot be sealed are left as they are."""
    seals = file_seals(fd)
    if seals & F_SEAL_SHRINK or seals & F_SEAL_SEAL:
        return seals
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_SHRINK)
    except OSError:
        return seals
    return file_seals(fd)


class HostRegion:
    """One shared-memory region (a mem-table entry). Identity matters: ``id`` is unique and
    monotonically increasing process-wide, so a re-added region is a different region."""

    __slots__ = (
        "__weakref__",
        "base",
        "buf",
        "backing_fd",
        "closed",
        "gpa",
        "guard_slot",
        "id",
        "mmap_offset",
        "seals",
        "size",
        "uaddr",
        "written",
    )

    def __init__(
        self,
        gpa: int,
        size: int,
        uaddr: int,
        mmap_offset: int,
        buf: mmap.mmap | bytearray,
        base: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError(f"region size must be positive, got {size:#x}")
        if gpa < 0 or uaddr < 0 or gpa + size > 1 << 64 or uaddr + size > 1 << 64:
            raise ValueError(f"region gpa={gpa:#x} uaddr={uaddr:#x} size={size:#x} out of range")
        if base + size > len(buf):
            raise ValueError("buffer smaller than the region")
        self.id = next(_region_ids)
        self.gpa = gpa
        self.size = size
        self.uaddr = uaddr
        self.mmap_offset = mmap_offset
        self.buf = buf
        self.base = base  # where the region starts inside ``buf`` (mmap offset alignment)
        self.closed = False
        #: Bytes the device wrote into this region through pieces (packet data, headers):
        #: evidence of where the driver's buffers are. One add per piece written.
        self.written = 0
        #: F_GET_SEALS of the backing file when mapped (0: none or not a memfd).
        self.seals = 0
        #: Our duplicate of the backing fd while its size can still shrink (no F_SEAL_SHRINK):
        #: :meth:`backing_ok` fstat()s it. -1 when the size cannot change under us.
        self.backing_fd = -1
        #: Our slot in the SIGBUS guard (backends/vdpa/sigbus_guard.py) while the mapping of
        #: an unsealed file is protected by it; -1 otherwise.
        self.guard_slot = -1

    @classmethod
    def from_fd(cls, fd: int, gpa: int, size: int, uaddr: int, mmap_offset: int) -> HostRegion:
        """mmap ``size`` bytes of ``fd`` from ``mmap_offset`` (shared, read/write). The caller
        keeps owning ``fd`` (close it whenever; the mapping stays valid).

        The file must hold ``mmap_offset + size`` bytes now (a mapping past the end of the file
        kills the process with SIGBUS on first touch). A file that can still shrink (no
        ``F_SEAL_SHRINK``: memory-backend-file, an unsealed memfd) keeps a duplicate fd so
        :meth:`backing_ok` can re-check its size before the region is used, and its mapping
        is registered with the SIGBUS guard: a shrink that lands during an access maps zero
        pages instead of killing the process, and :attr:`faulted` says so."""
        if size <= 0 or mmap_offset < 0:
            raise ValueError(f"bad region size={size:#x} mmap_offset={mmap_offset:#x}")
        gran = mmap.ALLOCATIONGRANULARITY
        aligned = mmap_offset - mmap_offset % gran
        delta = mmap_offset - aligned
        try:
            fsize = os.fstat(fd).st_size
        except OSError as e:
            raise ValueError(f"cannot stat region fd {fd}: {e}") from e
        if mmap_offset + size > fsize:
            raise ValueError(
                f"region fd {fd} is {fsize:#x} bytes, needs mmap_offset+size "
                f"{mmap_offset + size:#x}"
            )
        mm = mmap.mmap(
            fd,
            size + delta,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
        r = cls(gpa, size, uaddr, mmap_offset, mm, base=delta)
        r.seals = seal_against_shrinking(fd)
        if not r.seals & F_SEAL_SHRINK:
            r.backing_fd = os.dup(fd)
            os.set_inheritable(r.backing_fd, False)
            r.guard_slot = sigbus_guard.register(mm, r.backing_fd, aligned)
        return r

    @property
    def sealed(self) -> bool:
        """The backing file cannot shrink (F_SEAL_SHRINK), or there is no file at all."""
        return self.backing_fd < 0

    @property
    def faulted(self) -> bool:
        """An access to this region raised SIGBUS (its file shrank during a callback) and the
        SIGBUS guard mapped zero pages over the missing part: the region no longer shows the
        peer's memory and must be dropped."""
        return self.guard_slot >= 0 and sigbus_guard.faults(self.guard_slot) > 0

    def backing_ok(self, *, fstat: bool = True) -> bool:
        """False if the backing file no longer holds the whole region (the peer truncated it):
        touching the missing pages would raise SIGBUS. One fstat, only for unsealed files
        (none with ``fstat=False``: then only a fault the SIGBUS guard caught counts)."""
        if self.backing_fd < 0 or self.closed:
            return True
        if self.faulted:
            return False
        if not fstat:
            return True
        try:
            return os.fstat(self.backing_fd).st_size >= self.mmap_offset + self.size
        except OSError:
            return False

    @classmethod
    def anonymous(cls, gpa: int, size: int, uaddr: int) -> HostRegion:
        """A bytearray-backed region (unit tests, in-process drivers)."""
        return cls(gpa, size, uaddr, 0, bytearray(size))

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    @property
    def uaddr_end(self) -> int:
        return self.uaddr + self.size

    def piece(self, offset: int, length: int) -> Piece:
        return Piece(self, offset, length)

    def close(self) -> None:
        """Unmap. Safe to call twice; if a short-lived view is still exported the munmap is
        deferred (retried on later memory operations) instead of raising."""
        if not self.closed:
            self.closed = True
            if self._try_unmap():
                self._release_backing()
            else:
                _pending_close.add(self)
        reap_deferred_closes()

    def _release_backing(self) -> None:
        """After the munmap: the SIGBUS guard forgets the mapping, the duplicate fd closes."""
        if self.guard_slot >= 0:
            sigbus_guard.unregister(self.guard_slot)
            self.guard_slot = -1
        if self.backing_fd >= 0:
            os.close(self.backing_fd)
            self.backing_fd = -1

    def _try_unmap(self) -> bool:
        if isinstance(self.buf, mmap.mmap):
            try:
                self.buf.close()
            except BufferError:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "gpa": self.gpa,
            "size": self.size,
            "uaddr": self.uaddr,
            "mmap_offset": self.mmap_offset,
            "written": self.written,
            "backing": "mmap" if isinstance(self.buf, mmap.mmap) else "anonymous",
            "seals": self.seals,
            "sealed": self.sealed,
            "sigbus_guarded": self.guard_slot >= 0,
            "closed": self.closed,
        }

    def __repr__(self) -> str:
        return (
            f"HostRegion(id={self.id}, gpa={self.gpa:#x}, size={self.size:#x}, "
            f"uaddr={self.uaddr:#x}, mmap_offset={self.mmap_offset:#x})"
        )

    # Convenience accessors for tests and in-process drivers (guest-physical addressing).
    def read_gpa(self, gpa: int, length: int) -> bytes:
        off = gpa - self.gpa
        if off < 0 or off + length > self.size:
            raise ValueError(f"gpa {gpa:#x}+{length:#x} outside {self!r}")
        return bytes(self.buf[self.base + off : self.base + off + length])

    def write_gpa(self, gpa: int, data: bytes | bytearray) -> None:
        off = gpa - self.gpa
        if off < 0 or off + len(data) > self.size:
            raise ValueError(f"gpa {gpa:#x}+{len(data):#x} outside {self!r}")
        self.buf[self.base + off : self.base + off + len(data)] = data

    def pack_gpa(self, fmt: struct.Struct, gpa: int, *values: int) -> None:
        fmt.pack_into(self.buf, self.base + gpa - self.gpa, *values)


class HostMemory:
    """The set of host regions, indexed by uaddr (and by gpa) with sorted starts + bisect."""

    def __init__(self) -> None:
        self._ustarts: list[int] = []
        self._uregions: list[HostRegion] = []
        self._gstarts: list[int] = []
        self._gregions: list[HostRegion] = []
        self.generation = 0  # bumps on every add/remove (ring caches key on it)

    def add(self, r: HostRegion) -> None:
        """Add a region; ValueError if it overlaps an existing one in uaddr or gpa space."""
        reap_deferred_closes()
        i = bisect.bisect_left(self._ustarts, r.uaddr)
        for j in (i - 1, i):
            if 0 <= j < len(self._uregions):
                o = self._uregions[j]
                if o is r:
                    raise ValueError(f"{r!r} already added")
                if o.uaddr < r.uaddr_end and r.uaddr < o.uaddr_end:
                    raise ValueError(f"{r!r} overlaps {o!r} in user address space")
        g = bisect.bisect_left(self._gstarts, r.gpa)
        for j in (g - 1, g):
            if 0 <= j < len(self._gregions):
                o = self._gregions[j]
                if o.gpa < r.gpa_end and r.gpa < o.gpa_end:
                    raise ValueError(f"{r!r} overlaps {o!r} in guest-physical space")
        self._ustarts.insert(i, r.uaddr)
        self._uregions.insert(i, r)
        self._gstarts.insert(g, r.gpa)
        self._gregions.insert(g, r)
        self.generation += 1

    def remove(self, r: HostRegion) -> None:
        """Remove exactly this region object (ValueError if absent). Does not close it."""
        try:
            i = next(k for k, o in enumerate(self._uregions) if o is r)
            g = next(k for k, o in enumerate(self._gregions) if o is r)
        except StopIteration:
            raise ValueError(f"{r!r} is not in host memory") from None
        del self._ustarts[i], self._uregions[i]
        del self._gstarts[g], self._gregions[g]
        self.generation += 1
        reap_deferred_closes()

    def find(self, gpa: int, size: int, uaddr: int) -> HostRegion | None:
        """The region with exactly this gpa, size and uaddr (how REM_MEM_REG names one)."""
        i = bisect.bisect_left(self._ustarts, uaddr)
        if i < len(self._uregions):
            r = self._uregions[i]
            if r.uaddr == uaddr and r.gpa == gpa and r.size == size:
                return r
        return None

    def regions(self) -> list[HostRegion]:
        """All regions ordered by gpa."""
        return list(self._gregions)

    def by_id(self, region_id: int) -> HostRegion | None:
        for r in self._uregions:
            if r.id == region_id:
                return r
        return None

    def __len__(self) -> int:
        return len(self._uregions)

    def _region_at(
        self, starts: list[int], regions: list[HostRegion], addr: int, gpa: bool
    ) -> tuple[int, HostRegion | None]:
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            r = regions[i]
            if addr < (r.gpa_end if gpa else r.uaddr_end):
                return i, r
        return i, None

    def lookup(self, uaddr: int, length: int, access: Access = Access.READ) -> list[Piece]:
        """Pieces covering ``[uaddr, uaddr+length)``, spanning uaddr-adjacent regions.
        Raises TranslationError('unmapped' | 'partial')."""
        return self._lookup(self._ustarts, self._uregions, uaddr, length, access, gpa=False)

    def lookup_gpa(self, gpa: int, length: int, access: Access = Access.READ) -> list[Piece]:
        """Like :meth:`lookup` but addressed by guest-physical address."""
        return self._lookup(self._gstarts, self._gregions, gpa, length, access, gpa=True)

    def _lookup(
        self,
        starts: list[int],
        regions: list[HostRegion],
        addr: int,
        length: int,
        access: Access,
        gpa: bool,
    ) -> list[Piece]:
        if length <= 0:
            return []
        i, r = self._region_at(starts, regions, addr, gpa)
        if r is None:
            raise TranslationError("unmapped", addr, length, access, "no host region")
        pieces: list[Piece] = []
        pos = addr
        end = addr + length
        while True:
            rstart = r.gpa if gpa else r.uaddr
            off = pos - rstart
            n = min(end - pos, r.size - off)
            pieces.append(Piece(r, off, n))
            pos += n
            if pos >= end:
                return pieces
            i += 1
            if i >= len(regions) or starts[i] != pos:
                raise TranslationError("partial", pos, end - pos, access, "host region ends")
            r = regions[i]

    def uaddr_to_gpa(self, uaddr: int) -> int | None:
        _, r = self._region_at(self._ustarts, self._uregions, uaddr, gpa=False)
        return None if r is None else r.gpa + (uaddr - r.uaddr)

    def gpa_to_uaddr(self, gpa: int) -> int | None:
        _, r = self._region_at(self._gstarts, self._gregions, gpa, gpa=True)
        return None if r is None else r.uaddr + (gpa - r.gpa)
