"""DmaSpace: the only way the device touches guest memory.

IOVA -> (IOTLB) -> uaddr -> (HostMemory) -> :class:`Piece` (host bytes + GPA). In IOMMU mode
(``VIRTIO_F_ACCESS_PLATFORM`` negotiated) an IOVA the IOTLB does not cover is a recoverable
``TranslationError(kind='miss')``; otherwise it is a plain error. Writes mark the dirty log.

Hot path: the last successful single-piece translation is remembered as an IOVA window (the
part of one IOTLB mapping that falls inside one host region) together with the generation it
was computed under. A lookup inside that window with a permitted access is answered with one
range check instead of the IOTLB bisect + host-memory bisect; any IOTLB, host-memory, IOMMU
mode or fault change bumps the generation and drops the window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from .access import Access, TranslationError
from .dirty_log import DirtyLog
from .faults import Faults
from .iotlb import IOTLB
from .journal import Journal
from .memory import HostMemory, HostRegion, Piece

__all__ = ["DmaSpace"]

# Final: mypyc keeps these in C statics instead of looking them up in the module dict
_READ: Final = Access.READ
_WINDOW_PIECES: Final = 4096  # Pieces remembered per window (a ring's worth of buffers, and more)
_WRITE: Final = Access.WRITE


class _Window:
    """A remembered IOVA window (module doc): [lo, hi) reaches ``region`` at ``iova + delta``,
    with the permissions as booleans (an identity test, not IntFlag math) and the generation
    it was computed under, field by field (no tuple built per lookup)."""

    __slots__ = (
        "delta",
        "fault_gen",
        "hi",
        "host_gen",
        "iotlb_gen",
        "lo",
        "mode",
        "pieces",
        "readable",
        "region",
        "writable",
    )

    def __init__(
        self,
        lo: int,
        hi: int,
        region: HostRegion,
        delta: int,
        readable: bool,
        writable: bool,
        generation: tuple[int, int, int, int],
    ) -> None:
        self.lo = lo
        self.hi = hi
        self.region = region
        self.delta = delta
        self.readable = readable
        self.writable = writable
        self.iotlb_gen, self.host_gen, self.mode, self.fault_gen = generation
        #: iova -> the Piece last handed out there (Pieces are immutable: the same buffer,
        #: which rings re-post, gets the same one)
        self.pieces: dict[int, Piece] = {}


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
        #: How the fault 'translate-by-gpa' reads guest-physical addresses: the host memory's
        #: GPA view by default; a transport whose regions carry no GPAs (VDUSE) installs its own.
        self.gpa_lookup: Callable[[int, int, Access], list[Piece]] | None = None
        self._iommu = False
        self._mode = 0
        self._window: _Window | None = None
        self._window_hits = False  # the current window answered a lookup
        self._window_skip = 0  # slow-path lookups left before remembering a window again
        self._window_backoff = 0
        #: Windows the ``stale-translation-cache`` fault keeps forever (never filled without it).
        self._stale: list[tuple[int, int, HostRegion, int, bool, bool]] = []

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
        p = self.window_piece(iova, length, access)
        if p is not None:
            return [p]
        if self.iommu and self._fault("translate-by-gpa"):
            return (self.gpa_lookup or self.host.lookup_gpa)(iova, length, access)
        stale = self._fault("stale-translation-cache")
        if stale and (hit := self._stale_hit(iova, length, access)) is not None:
            return [hit]  # the fault: a window from before an INVALIDATE / REM_MEM_REG
        try:
            spans = self.iotlb.translate(iova, length, access)
        except TranslationError as e:
            if self.iommu and e.kind in ("unmapped", "partial"):
                raise TranslationError("miss", e.addr, e.length, access, "IOTLB miss") from None
            raise
        lookup = self.host.lookup
        if len(spans) == 1:
            uaddr, n = spans[0]
            pieces = lookup(uaddr, n, access)
            if len(pieces) == 1:
                if stale:
                    self._stale_keep(iova, pieces[0])
                if self._window_skip:
                    self._window_skip -= 1
                else:
                    self._remember(iova, pieces[0])
            return pieces
        pieces = []
        for uaddr, n in spans:
            for p in lookup(uaddr, n, access):
                if pieces:
                    q = pieces[-1]
                    if q.region is p.region and q.offset + q.length == p.offset:
                        pieces[-1] = Piece(q.region, q.offset, q.length + p.length)
                        continue
                pieces.append(p)
        return pieces

    def window_piece(self, iova: int, length: int, access: Access) -> Piece | None:
        """The remembered window's answer for ``[iova, iova+length)`` (one Piece) when the
        window covers it with ``access`` permitted and nothing changed since it was computed;
        None otherwise (then :meth:`translate` takes the slow path). ``length`` > 0."""
        w = self._window
        if w is None or iova < w.lo or iova + length > w.hi:
            return None
        if not (w.readable if access is _READ else w.writable if access is _WRITE else False):
            return None
        f = self.faults
        if (
            w.iotlb_gen != self.iotlb.generation
            or w.host_gen != self.host.generation
            or w.mode != self._mode
            or w.fault_gen != (f.generation if f is not None else 0)
        ):
            return None
        cache = w.pieces
        p = cache.get(iova)
        if p is None:
            p = Piece(w.region, iova + w.delta, length)
            if len(cache) < _WINDOW_PIECES:
                cache[iova] = p
        elif p.length != length:
            p = cache[iova] = Piece(w.region, iova + w.delta, length)
        self._window_hits = True
        return p

    def _remember(self, iova: int, piece: Piece) -> None:
        """Keep the IOVA window around ``iova`` that one mapping + one region cover.

        When windows keep being replaced before anything hit them (every buffer in its own
        mapping, e.g. a strict vIOMMU), remembering is skipped for up to 64 slow-path
        lookups at a time, so that workload does not pay for it."""
        if self._window is not None and not self._window_hits:
            self._window_backoff = min(2 * self._window_backoff + 1, 64)
            self._window_skip = self._window_backoff
        else:
            self._window_backoff = 0
        m = self.iotlb.lookup(iova)
        if m is None:
            return
        r = piece.region
        lo = max(m.iova, m.iova + r.uaddr - m.uaddr)
        hi = min(m.iova + m.size, m.iova + r.uaddr + r.size - m.uaddr)
        if lo <= iova < hi:
            self._window_hits = False
            perm = 3 if self._fault("ignore-iotlb-perm") else int(m.perm)  # the fault: RW
            self._window = _Window(
                lo,
                hi,
                r,
                m.uaddr - m.iova - r.uaddr,
                bool(perm & 1),  # Perm.RO / Access.READ
                bool(perm & 2),  # Perm.WO / Access.WRITE
                self.generation,
            )

    # -- the stale-translation-cache fault --------------------------------------------------
    def _stale_keep(self, iova: int, piece: Piece) -> None:
        """Remember the window around ``iova`` for good (the fault: no generation check)."""
        m = self.iotlb.lookup(iova)
        if m is None:
            return
        r = piece.region
        lo = max(m.iova, m.iova + r.uaddr - m.uaddr)
        hi = min(m.iova + m.size, m.iova + r.uaddr + r.size - m.uaddr)
        self._stale.append((lo, hi, r, m.uaddr - m.iova - r.uaddr, bool(m.perm & 1),
                            bool(m.perm & 2)))  # fmt: skip
        del self._stale[:-64]

    def _stale_hit(self, iova: int, length: int, access: Access) -> Piece | None:
        for lo, hi, r, delta, rd, wr in reversed(self._stale):
            if lo <= iova and iova + length <= hi and (rd if access is _READ else wr):
                return Piece(r, iova + delta, length)
        return None

    # -- dirty logging ---------------------------------------------------------------------
    def mark_dirty(self, gpa: int, length: int) -> None:
        """Log a device write by guest-physical address (rings use this directly)."""
        if self.dirty_log is not None:
            if self._fault("used-ring-not-logged"):  # the fault: ring writes go unlogged
                return
            if self.iommu and self._fault("log-at-iova"):
                gpa = self._iova_of_gpa(gpa)  # the fault: log the address the driver used
            self.dirty_log.mark(gpa, length)

    def _log_data(self, piece: Piece, at: int, n: int) -> None:
        if self.dirty_log is not None and not self._fault("skip-dirty-log"):
            gpa = piece.gpa + at
            if self.iommu and self._fault("log-at-iova"):
                gpa = self._iova_of_gpa(gpa)  # the fault: log the address the driver used
            self.dirty_log.mark(gpa, n)

    def _iova_of_gpa(self, gpa: int) -> int:
        """The ``log-at-iova`` fault: an IOVA that maps to ``gpa`` (what a backend that logs
        the addresses it was given, instead of the GPAs they translate to, marks)."""
        try:
            uaddr = self.host.lookup_gpa(gpa, 1)[0].uaddr
        except TranslationError:
            return gpa
        for m in self.iotlb.entries():
            if m.uaddr <= uaddr < m.uaddr + m.size:
                return m.iova + uaddr - m.uaddr
        return gpa

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
        if offset == 0 and len(pieces) == 1:  # the common case: one buffer, written whole
            p = pieces[0]
            n = p.write(data)
            self._log_data(p, 0, n)
            return n
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
