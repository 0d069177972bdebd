"""The virtqueue concept, on the model of rust-vmm's virtio-queue (``QueueT``): what every
ring layout offers the device model, the datapath and the transports.

* :class:`Virtqueue` - the queue protocol (configure, pop / pop_batch, push, flush, rewind,
  notification suppression, get_state / set_state / state_from_base). Implemented by
  :class:`~backends.vdpa.split_virtqueue.SplitVirtqueue` and
  :class:`~backends.vdpa.packed_virtqueue.PackedVirtqueue`; callers never ask which one
  they have.
* :class:`VqState` - what migrates (vhost GET/SET_VRING_BASE, vDPA get/set_vq_state), with
  the split view (``avail_index``), the packed view (``struct vduse_vq_state_packed``
  names) and the 32-bit vhost vring base encoding of either.
* :class:`RingArea` - a translated ring area (cached per DMA-space generation).
* :class:`~backends.vdpa.descriptor_chain.Chain` / ``walk_chain`` - the one chain walker.
"""

from __future__ import annotations

import functools
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from backends.virtio.ring import U16

from .access import Access, TranslationError
from .descriptor_chain import CHAIN_CHECKS, Buffer, Chain, VqError, walk_chain
from .dma import DmaSpace
from .journal import Journal
from .memory import Piece

__all__ = [
    "CHAIN_CHECKS",
    "Chain",
    "RingArea",
    "Virtqueue",
    "VqError",
    "VqState",
]


@dataclass(slots=True)
class VqState:
    """A virtqueue's migratable state: where the device is in the ring.

    Split rings: ``last_avail_idx`` and ``used_idx`` are free-running u16 indexes (the wrap
    counters are unused). A state built from the avail index alone (vhost-user's
    SET_VRING_BASE, vDPA's ``vdpa_vq_state_split``) has ``used_idx == last_avail_idx``:
    nothing in flight, what vdpa_sim assumes.

    Packed rings: both are slot positions in ``[0, num)`` with their wrap counters.

    ``packed`` says which layout the state came from (``get_state`` sets it); it picks the
    vhost encoding and is not part of equality. Views:

    * split: :attr:`avail_index` (``struct vdpa_vq_state_split``)
    * packed: :attr:`last_avail_counter`, :attr:`last_avail_idx`, :attr:`last_used_counter`,
      :attr:`last_used_idx` (``struct vdpa_vq_state_packed`` / ``vduse_vq_state_packed``)
    * vhost vring base (``num`` of GET/SET_VRING_BASE): :meth:`to_vhost_base` /
      :meth:`from_vhost_base`; split = last_avail_idx, packed = bits 0-14 last avail, 15
      avail wrap, 16-30 used idx, 31 used wrap (QEMU's
      ``virtio_queue_packed_get_last_avail_idx``).
    """

    last_avail_idx: int = 0
    used_idx: int = -1  # -1: the same as last_avail_idx
    avail_wrap: bool = True
    used_wrap: bool = True
    packed: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.used_idx < 0:
            self.used_idx = self.last_avail_idx

    # -- the split view --------------------------------------------------------------------
    @classmethod
    def split(cls, avail_index: int) -> VqState:
        return cls(avail_index)

    @property
    def avail_index(self) -> int:
        return self.last_avail_idx

    # -- the packed view -------------------------------------------------------------------
    @classmethod
    def packed_state(
        cls,
        last_avail_counter: int,
        last_avail_idx: int,
        last_used_counter: int,
        last_used_idx: int,
    ) -> VqState:
        return cls(
            last_avail_idx, last_used_idx, bool(last_avail_counter), bool(last_used_counter), True
        )

    @property
    def last_avail_counter(self) -> int:
        return int(self.avail_wrap)

    @property
    def last_used_counter(self) -> int:
        return int(self.used_wrap)

    @property
    def last_used_idx(self) -> int:
        return self.used_idx

    # -- the vhost vring base --------------------------------------------------------------
    @classmethod
    def from_vhost_base(cls, num: int, *, packed: bool) -> VqState:
        """Decode the ``num`` of SET_VRING_BASE. Raises ValueError when it does not fit."""
        if not 0 <= num <= 0xFFFFFFFF:
            raise ValueError(f"base {num:#x} does not fit 32 bits")
        if packed:
            return cls(
                num & 0x7FFF, (num >> 16) & 0x7FFF, bool(num & 0x8000), bool(num >> 31), True
            )
        if num > 0xFFFF:
            raise ValueError(f"base {num:#x} does not fit a u16")
        return cls(num)

    def to_vhost_base(self) -> int:
        """The ``num`` of GET_VRING_BASE for this state."""
        if not self.packed:
            return self.last_avail_idx & 0xFFFF
        avail = (self.last_avail_idx & 0x7FFF) | (int(self.avail_wrap) << 15)
        used = (self.used_idx & 0x7FFF) | (int(self.used_wrap) << 15)
        return avail | used << 16

    # -- other -----------------------------------------------------------------------------
    def advanced(self, num: int) -> VqState:
        """The state one chain further on the avail side (what the ``vring-base-off-by-one``
        fault reports): +1 mod 2^16 (split) or +1 slot with the wrap counter (packed)."""
        if not self.packed:
            return VqState(
                (self.last_avail_idx + 1) & 0xFFFF, self.used_idx, self.avail_wrap, self.used_wrap
            )
        pos, wrap = self.last_avail_idx + 1, self.avail_wrap
        if pos >= num:
            pos, wrap = 0, not wrap
        return VqState(pos, self.used_idx, wrap, self.used_wrap, True)

    def journal_fields(self) -> dict[str, Any]:
        """What ``vq.set_state`` / ``vq.get_state`` record (wrap counters only if packed)."""
        d: dict[str, Any] = {"last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx}
        if self.packed:
            d["avail_wrap"] = self.avail_wrap
            d["used_wrap"] = self.used_wrap
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RingArea:
    """A translated ring area: its pieces and fast accessors. Single-piece areas (the norm)
    are accessed with ``struct.*_from/_into`` on the host buffer directly."""

    __slots__ = ("_base", "_buf", "_dma", "_gpa", "_offs", "length", "pieces", "single")

    def __init__(self, pieces: list[Piece], dma: DmaSpace) -> None:
        self.pieces = pieces
        self.length = sum(p.length for p in pieces)
        self._dma = dma
        self.single = len(pieces) == 1
        p = pieces[0]
        self._buf = p.region.buf
        self._base = p.region.base + p.offset
        self._gpa = p.gpa
        offs = []
        o = 0
        for q in pieces:
            offs.append(o)
            o += q.length
        self._offs = offs

    def _locate(self, off: int) -> tuple[Piece, int]:
        i = len(self._offs) - 1
        while self._offs[i] > off:
            i -= 1
        return self.pieces[i], off - self._offs[i]

    def view(self) -> tuple[Buffer, int]:
        """(buffer, base) to ``unpack_from`` the area at: the host buffer itself when it is
        one piece, else a snapshot of the whole area (rings split over regions are rare)."""
        if self.single:
            return self._buf, self._base
        return self.read(0, self.length), 0

    def read(self, off: int, n: int) -> bytes:
        if self.single:
            return bytes(self._buf[self._base + off : self._base + off + n])
        out = bytearray()
        while n > 0:
            p, inner = self._locate(off)
            take = min(n, p.length - inner)
            s = p.region.base + p.offset + inner
            out += p.region.buf[s : s + take]
            off += take
            n -= take
        return bytes(out)

    def unpack(self, s: struct.Struct, off: int) -> tuple[Any, ...]:
        if self.single:
            return s.unpack_from(self._buf, self._base + off)
        return s.unpack(self.read(off, s.size))

    def u16(self, off: int) -> int:
        if self.single:
            v: int = U16.unpack_from(self._buf, self._base + off)[0]
            return v
        w: int = U16.unpack(self.read(off, 2))[0]
        return w

    def write(self, off: int, data: bytes) -> None:
        """Device write into the ring; always dirty-logged (the used ring is never skipped)."""
        n = len(data)
        if self.single:
            self._buf[self._base + off : self._base + off + n] = data
            self._dma.mark_dirty(self._gpa + off, n)
            return
        done = 0
        while done < n:
            p, inner = self._locate(off + done)
            take = min(n - done, p.length - inner)
            s = p.region.base + p.offset + inner
            p.region.buf[s : s + take] = data[done : done + take]
            self._dma.mark_dirty(p.gpa + inner, take)
            done += take

    def pack(self, s: struct.Struct, off: int, *values: int) -> None:
        """Store ``values`` with one copy of the final bytes. Not ``pack_into``: CPython
        zero-fills the target before packing, so a driver polling used->idx could read 0
        between the two stores (seen in qtests as used idx 0x2d80 -> 0 -> 0x2e00)."""
        data = s.pack(*values)
        if self.single:
            start = self._base + off
            self._buf[start : start + len(data)] = data
            self._dma.mark_dirty(self._gpa + off, len(data))
            return
        self.write(off, data)


class Virtqueue(ABC):
    """The queue protocol, and what every layout shares: configuration, the state and
    counters the monitor and the transport read, and the translated ring areas (one
    translation per DMA-space generation: any IOTLB or memory change drops them).

    Addresses are IOVAs (GPAs without a vIOMMU): ``desc`` the descriptor area, ``avail`` the
    driver area, ``used`` the device area."""

    packed: ClassVar[bool] = False

    def __init__(self, index: int, dma: DmaSpace, journal: Journal | None = None) -> None:
        self.index = index
        self.dma = dma
        self.journal = journal
        self.num = 0
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.addr_set = False
        self.ready = False
        self.started = False
        self.event_idx = False
        self.notification = True  # driver kicks wanted (set_notification)
        self.state = VqState(packed=self.packed)
        self.inflight = 0
        self.need_call = False  # a flush decided the driver must be interrupted
        self._used_pub = 0  # used position last published in guest memory (no wrap bit)
        self.popped_total = 0
        self.pushed_total = 0

    # -- configuration ---------------------------------------------------------------------
    @property
    def configured(self) -> bool:
        return self.num > 0 and self.addr_set

    @abstractmethod
    def set_num(self, num: int) -> None:
        """Ring size; ValueError when the layout does not allow it."""

    def set_address(self, desc: int, avail: int, used: int) -> None:
        self.desc, self.avail, self.used = desc, avail, used
        self.addr_set = True
        self.invalidate()

    def reset(self) -> None:
        self.num = 0
        self.desc = self.avail = self.used = 0
        self.addr_set = False
        self.ready = False
        self.started = False
        self.event_idx = False
        self.notification = True
        self.set_state(VqState())
        self.invalidate()

    @abstractmethod
    def invalidate(self) -> None:
        """Drop the cached ring translation (it is also dropped on any generation change)."""

    def _ring_area(self, what: str, iova: int, size: int, access: Access) -> RingArea:
        try:
            pieces = self.dma.translate(iova, size, access)
        except TranslationError as e:
            if e.kind == "miss":
                raise
            raise VqError("ring-translate", f"{what} at {iova:#x}+{size:#x}: {e}") from None
        return RingArea(pieces, self.dma)

    def _walker(self, table: RingArea) -> Callable[[int], Chain]:
        """The chain walker bound to this queue's descriptor table: ``walk(first)``."""
        translate, read, num, packed = (
            self.dma.translate,
            self.dma.read_pieces,
            self.num,
            self.packed,
        )
        if table.single:
            return functools.partial(
                walk_chain, translate, read, table._buf, table._base, num, packed
            )

        def walk_snapshot(first: int) -> Chain:
            buf, base = table.view()
            return walk_chain(translate, read, buf, base, num, packed, first)

        return walk_snapshot

    def _fault(self, name: str) -> bool:
        faults = self.dma.faults
        return faults is not None and faults.active(name)

    # -- state -----------------------------------------------------------------------------
    @abstractmethod
    def set_state(self, state: VqState) -> None:
        """Restore the ring position; forgets inflight chains and unpublished used elements."""

    def get_state(self) -> VqState:
        s = self.state
        return VqState(s.last_avail_idx, s.used_idx, s.avail_wrap, s.used_wrap, self.packed)

    @abstractmethod
    def state_from_base(self, num: int) -> VqState:
        """Decode a vhost vring base for this layout (and size). ValueError when invalid."""

    # -- the datapath ----------------------------------------------------------------------
    @abstractmethod
    def pop(self) -> Chain | None:
        """The next available chain, validated; None when there is none. Raises VqError,
        or TranslationError(kind='miss') with no state change (retry after the update)."""

    @abstractmethod
    def pop_batch(self, limit: int) -> list[Chain]:
        """Up to ``limit`` chains. A chain that fails stops the batch and is left available:
        the chains before it are returned, the next call raises what :meth:`pop` would."""

    @abstractmethod
    def push(self, chain: Chain, written: int) -> None:
        """Queue the used element for ``chain`` (published by :meth:`flush`)."""

    @abstractmethod
    def flush(self) -> bool:
        """Publish pending used elements. True when the driver must be interrupted."""

    @property
    @abstractmethod
    def used_pending(self) -> int:
        """Pushed elements not yet published."""

    @property
    @abstractmethod
    def used_published(self) -> int:
        """The used position last published (a progress marker)."""

    @abstractmethod
    def rewind(self) -> int:
        """Give back popped-but-unpushed chains; returns how many."""

    @abstractmethod
    def avail_idx(self) -> int:
        """A progress marker of the driver side (differs from last_avail_idx exactly when
        something is available)."""

    @abstractmethod
    def avail_pending(self) -> int:
        """How much the driver has made available (0 for an unconfigured queue)."""

    # -- notifications ---------------------------------------------------------------------
    @abstractmethod
    def set_notification(self, enabled: bool) -> None:
        """Ask for (or suppress) driver kicks."""

    def enable_notification_and_check(self) -> bool:
        """Re-enable kicks and report whether buffers arrived meanwhile (the race check)."""
        self.set_notification(True)
        return self.avail_pending() > 0

    def _journal_rewind(self, count: int, in_order: bool) -> None:
        """Record a rewind (``vq.rewind``) with where the ring now continues."""
        if self.journal is not None:
            st = self.state
            wrap = {"avail_wrap": st.avail_wrap} if self.packed else {}
            self.journal.record(
                "vq.rewind",
                vq=self.index,
                count=count,
                last_avail_idx=st.last_avail_idx,
                **wrap,
                in_order=in_order,
            )

    # -- introspection ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """What ``query-vrings`` shows (wrap counters for packed rings)."""
        st = self.state
        d: dict[str, Any] = {"index": self.index}
        if self.packed:
            d["packed"] = True
        d.update(
            num=self.num,
            desc=self.desc,
            avail=self.avail,
            used=self.used,
            ready=self.ready,
            started=self.started,
            event_idx=self.event_idx,
            last_avail_idx=st.last_avail_idx,
        )
        if self.packed:
            d["avail_wrap"] = st.avail_wrap
        d["used_idx"] = st.used_idx
        if self.packed:
            d["used_wrap"] = st.used_wrap
        d.update(
            used_published=self._used_pub,
            inflight=self.inflight,
            popped=self.popped_total,
            pushed=self.pushed_total,
        )
        try:
            d["avail_idx"] = self.avail_idx() if self.configured else None
        except (TranslationError, VqError, ValueError):
            d["avail_idx"] = None
        return d
