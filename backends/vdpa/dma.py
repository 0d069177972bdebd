"""DmaSpace: the only way the device touches guest memory.

IOVA -> (IOTLB) -> uaddr -> (HostMemory) -> :class:`Piece` (host bytes + GPA). In IOMMU mode
(``VIRTIO_F_ACCESS_PLATFORM`` negotiated) an IOVA the IOTLB does not cover is a recoverable
``TranslationError(kind='miss')``; otherwise it is a plain error. Writes mark the dirty log.
"""

from __future__ import annotations

from collections.abc import Sequence

from .access import Access, TranslationError
from .dirty_log import DirtyLog
from .faults import Faults
from .iotlb import IOTLB
from .journal import Journal
from .memory import HostMemory, Piece

__all__ = ["DmaSpace"]


class DmaSpace:
    def __init__(
        self,
        iotlb: IOTLB,
        host: HostMemory,
        journal: Journal | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.iotlb = iotlb
        self.host = host
        self.journal = journal
        self.faults = faults
        self.dirty_log: DirtyLog | None = None
        self._iommu = False
        self._mode = 0

    @property
    def iommu(self) -> bool:
        """True when ACCESS_PLATFORM is negotiated: addresses are IOVAs, misses recoverable."""
        return self._iommu

    @iommu.setter
    def iommu(self, value: bool) -> None:
        if bool(value) != self._iommu:
            self._iommu = bool(value)
            self._mode += 1

    @property
    def generation(self) -> tuple[int, int, int, int]:
        """Changes whenever a cached translation may have become wrong (IOTLB, host memory,
        IOMMU mode or the fault set changed)."""
        fg = self.faults.generation if self.faults is not None else 0
        return (self.iotlb.generation, self.host.generation, self._mode, fg)

    def _fault(self, name: str) -> bool:
        return self.faults is not None and self.faults.active(name)

    def translate(self, iova: int, length: int, access: Access) -> list[Piece]:
        """Pieces for [iova, iova+length) (host-contiguous neighbours merged). Raises TranslationError: kind 'miss' in IOMMU mode
        when (part of) the IOVA range is not in the IOTLB (``addr`` = first missing IOVA)."""
        if length <= 0:
            return []
        if self.iommu and self._fault("translate-by-gpa"):
            return self.host.lookup_gpa(iova, length, access)
        try:
            spans = self.iotlb.translate(iova, length, access)
        except TranslationError as e:
            if self.iommu and e.kind in ("unmapped", "partial"):
                raise TranslationError("miss", e.addr, e.length, access, "IOTLB miss") from None
            raise
        lookup = self.host.lookup
        if len(spans) == 1:
            uaddr, n = spans[0]
            return lookup(uaddr, n, access)
        pieces: list[Piece] = []
        for uaddr, n in spans:
            for p in lookup(uaddr, n, access):
                if pieces:
                    q = pieces[-1]
                    if q.region is p.region and q.offset + q.length == p.offset:
                        pieces[-1] = Piece(q.region, q.offset, q.length + p.length)
                        continue
                pieces.append(p)
        return pieces

    # -- dirty logging ---------------------------------------------------------------------
    def mark_dirty(self, gpa: int, length: int) -> None:
        """Log a device write by guest-physical address (rings use this directly)."""
        if self.dirty_log is not None:
            self.dirty_log.mark(gpa, length)

    def _log_data(self, piece: Piece, at: int, n: int) -> None:
        if self.dirty_log is not None and not self._fault("skip-dirty-log"):
            self.dirty_log.mark(piece.gpa + at, n)

    # -- data access -----------------------------------------------------------------------
    def read(self, iova: int, length: int) -> bytes:
        return self.read_pieces(self.translate(iova, length, Access.READ))

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        self.write_pieces(self.translate(iova, len(data), Access.WRITE), data)

    @staticmethod
    def read_pieces(pieces: Sequence[Piece], offset: int = 0, length: int | None = None) -> bytes:
        """The bytes of ``pieces`` concatenated (optionally a window of them)."""
        if offset == 0 and length is None:
            if len(pieces) == 1:
                return pieces[0].read()
            return b"".join(p.read() for p in pieces)
        out = bytearray()
        want = -1 if length is None else length
        for p in pieces:
            if want == 0:
                break
            if offset >= p.length:
                offset -= p.length
                continue
            r = p.region
            n = p.length - offset if want < 0 else min(p.length - offset, want)
            start = r.base + p.offset + offset
            if r.closed:
                raise TranslationError("unmapped", p.gpa, p.length, Access.READ, "region closed")
            out += r.buf[start : start + n]
            offset = 0
            if want > 0:
                want -= n
        return bytes(out)

    def write_pieces(
        self, pieces: Sequence[Piece], data: bytes | bytearray | memoryview, offset: int = 0
    ) -> int:
        """Copy ``data`` into the pieces starting ``offset`` bytes in; returns bytes written
        (short when the pieces end first). Logs dirty pages."""
        mv = memoryview(data)
        total = len(mv)
        done = 0
        for p in pieces:
            if done >= total:
                break
            if offset >= p.length:
                offset -= p.length
                continue
            n = p.write(mv[done:], offset)
            self._log_data(p, offset, n)
            done += n
            offset = 0
        return done
