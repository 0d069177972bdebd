"""The device side of a packed virtqueue (virtio 1.2, 2.8): pop with validation, push,
publish used descriptors, event suppression. The one place for the packed-ring layout.

Same API as :class:`~backends.vdpa.virtqueue.SplitVirtqueue` (the device picks the class from
the negotiated VIRTIO_F_RING_PACKED), so the personality does not care which ring it drives.

Layout: one descriptor ring of ``num`` x ``<QIHH`` (addr, len, id, flags); the driver area
and the device area are each one event-suppression structure ``<HH`` (off_wrap, flags).
A descriptor is available when its AVAIL bit equals the device's avail wrap counter and its
USED bit does not. A chain occupies consecutive slots (NEXT), wrapping at the ring end; its
buffer id is in its last descriptor. The device writes ONE used descriptor per chain at the
used position (id, len, flags with AVAIL = USED = used wrap counter; WRITE when the chain had
device-writable buffers) and advances the used position by the chain's slot count. Both wrap
counters flip when their position passes the ring end.

State (:class:`VqState`): ``last_avail_idx`` and ``used_idx`` are slot positions in
``[0, num)`` with separate wrap counters; vhost-user packs them as QEMU does (bits 0-14 last
avail, 15 avail wrap, 16-30 used, 31 used wrap: :meth:`VqState.to_vhost_base`).

Kick suppression (device area): ENABLE / DISABLE. Interrupt suppression (driver area):
ENABLE, DISABLE, and DESC (with EVENT_IDX): interrupt once the used descriptor at
``off_wrap`` is written. Indirect tables: every entry is used (NEXT is ignored there), as in
QEMU; nested indirect and INDIRECT+NEXT are errors.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from backends.virtio.ring import (
    DESC_SIZE,
    EVENT,
    EVENT_FLAGS,
    EVENT_FLAGS_DESC,
    EVENT_FLAGS_DISABLE,
    EVENT_FLAGS_ENABLE,
    MAX_QUEUE_SIZE,
    PACKED_FLAGS_OFFSET,
    PACKED_USED_LEN_ID,
    U16,
    packed_desc_available,
    packed_used_flags,
)

from .access import Access, TranslationError
from .descriptor_chain import Chain, VqError
from .dma import DmaSpace
from .journal import Journal
from .virtqueue import RingArea, Virtqueue, VqState

__all__ = ["PackedVirtqueue"]


@dataclass
class _Rings:
    gen: tuple[int, ...]
    desc: RingArea
    driver: RingArea
    device: RingArea
    walk: Callable[[int], Chain]  # the chain walker over ``desc``


class _Popped:
    """Where a popped chain was (one per packet: a plain class mypyc compiles)."""

    __slots__ = ("pos", "slots", "wrap", "write")

    def __init__(self, pos: int, wrap: bool, slots: int, write: bool) -> None:
        self.pos = pos  # slot of the first descriptor
        self.wrap = wrap  # avail wrap counter at pos
        self.slots = slots
        self.write = write  # had device-writable buffers


class PackedVirtqueue(Virtqueue):
    """Device side of one packed virtqueue. Addresses are IOVAs (GPAs without a vIOMMU).
    ``avail`` is the driver area, ``used`` the device area (the split names, for the API)."""

    packed = True

    def __init__(self, index: int, dma: DmaSpace, journal: Journal | None = None) -> None:
        super().__init__(index, dma, journal)
        self._popped: dict[int, _Popped] = {}  # buffer id -> where it was, in pop order
        self._pending_used: list[tuple[int, int, int, bool]] = []  # id, len, slots, write
        self._used_pub_wrap = True
        self._rings: _Rings | None = None

    # -- configuration ---------------------------------------------------------------------
    def set_num(self, num: int) -> None:
        if num <= 0 or num > MAX_QUEUE_SIZE:
            raise ValueError(f"vq {self.index}: packed ring size {num} not in 1..{MAX_QUEUE_SIZE}")
        self.num = num
        self._rings = None

    def set_state(self, state: VqState) -> None:
        """Restore positions and wrap counters; forgets inflight and unpublished elements."""
        self.state = VqState(
            state.last_avail_idx & 0x7FFF,
            state.used_idx & 0x7FFF,
            bool(state.avail_wrap),
            bool(state.used_wrap),
            True,
        )
        self._used_pub = self.state.used_idx
        self._used_pub_wrap = self.state.used_wrap
        self.inflight = 0
        self._popped.clear()
        self._pending_used.clear()
        self.need_call = False

    def state_from_base(self, num: int) -> VqState:
        st = VqState.from_vhost_base(num, packed=True)
        if self.num and (st.last_avail_idx >= self.num or st.used_idx >= self.num):
            raise ValueError(f"packed base {num:#x} outside a ring of {self.num}")
        return st

    def invalidate(self) -> None:
        self._rings = None

    # -- ring access -----------------------------------------------------------------------
    def rings(self) -> _Rings:
        gen = self.dma.generation
        r = self._rings
        if r is not None and r.gen == gen:
            return r
        desc = self._ring_area(
            "descriptor ring", self.desc, DESC_SIZE * self.num, Access.READ | Access.WRITE
        )
        r = _Rings(
            gen,
            desc,
            self._ring_area("driver area", self.avail, EVENT.size, Access.READ),
            self._ring_area("device area", self.used, EVENT.size, Access.WRITE),
            self._walker(desc),
        )
        self._rings = r
        return r

    def _desc_available(self, rings: _Rings, pos: int, wrap: bool) -> bool:
        return packed_desc_available(rings.desc.u16(pos * DESC_SIZE + PACKED_FLAGS_OFFSET), wrap)

    def avail_pending(self) -> int:
        """Descriptor slots available from last_avail (a scan; not for the hot path)."""
        if not self.configured:
            return 0
        rings = self.rings()
        pos, wrap = self.state.last_avail_idx, self.state.avail_wrap
        n = 0
        while n < self.num and self._desc_available(rings, pos, wrap):
            n += 1
            pos += 1
            if pos == self.num:
                pos, wrap = 0, not wrap
        return n

    def avail_idx(self) -> int:
        """A progress marker: last_avail_idx + available slots (differs from last_avail_idx
        exactly when something is available)."""
        return (self.state.last_avail_idx + self.avail_pending()) & 0xFFFF

    # -- pop -------------------------------------------------------------------------------
    def pop(self) -> Chain | None:
        if not self.configured:
            return None
        return self._take(self._rings_or_error())

    def pop_batch(self, limit: int) -> list[Chain]:
        """Up to ``limit`` chains; a failing chain stops the batch (raised when first)."""
        if not self.configured or limit <= 0:
            return []
        rings = self._rings_or_error()
        chains: list[Chain] = []
        for _ in range(limit):
            try:
                chain = self._take(rings)
            except (VqError, TranslationError):
                if not chains:
                    raise
                break
            if chain is None:
                break
            chains.append(chain)
        return chains

    def _rings_or_error(self) -> _Rings:
        try:
            return self.rings()
        except TranslationError as e:
            if e.kind == "miss":
                raise
            raise VqError("translate", str(e)) from None

    def _take(self, rings: _Rings) -> Chain | None:
        """Validate and take the chain at last_avail; state changes only on success."""
        pos, wrap = self.state.last_avail_idx, self.state.avail_wrap
        try:
            if not self._desc_available(rings, pos, wrap):
                return None
            chain = rings.walk(pos)
        except TranslationError as e:
            if e.kind == "miss":
                raise
            raise VqError("translate", str(e)) from None
        except (ValueError, IndexError, struct.error) as e:
            raise VqError("ring-access", str(e)) from None
        buf_id, slots = chain.head, chain.slots
        if buf_id >= self.num:
            raise VqError("head-range", f"buffer id {buf_id} >= queue size {self.num} (at {pos})")
        if buf_id in self._popped:
            raise VqError("head-inflight", f"buffer id {buf_id} made available again while in use")
        chain.avail_idx = pos
        self._popped[buf_id] = _Popped(pos, wrap, slots, chain.in_len > 0 or bool(chain.inp))
        npos = pos + slots
        if npos >= self.num:
            npos -= self.num
            wrap = not wrap
        self.state.last_avail_idx = npos
        self.state.avail_wrap = wrap
        self.inflight += 1
        self.popped_total += 1
        return chain

    # -- push / flush ----------------------------------------------------------------------
    def push(self, chain: Chain, written: int) -> None:
        p = self._popped.pop(chain.head, None)
        if p is None:
            raise ValueError(f"vq {self.index}: push of buffer {chain.head} that is not in flight")
        self._pending_used.append((chain.head, written, p.slots, p.write))
        used = self.state.used_idx + p.slots
        if used >= self.num:
            used -= self.num
            self.state.used_wrap = not self.state.used_wrap
        self.state.used_idx = used
        self.inflight -= 1
        self.pushed_total += 1

    def flush(self) -> bool:
        """Write pending used descriptors (each one's flags last, the first element's flags
        after all the others so the batch appears at once). True if the driver must be
        interrupted (driver area flags / off_wrap honoured)."""
        pending = self._pending_used
        if not pending:
            return False
        rings = self.rings()
        desc = rings.desc
        num = self.num
        old, old_wrap = self._used_pub, self._used_pub_wrap
        pos, wrap = old, old_wrap
        first_flags: tuple[int, int] | None = None
        advanced = 0
        try:
            for buf_id, written, slots, write in pending:
                off = pos * DESC_SIZE
                desc.pack(PACKED_USED_LEN_ID, off + 8, written & 0xFFFFFFFF, buf_id)
                flags = packed_used_flags(wrap, write)
                if first_flags is None:
                    first_flags = (off + 14, flags)
                else:
                    desc.pack(U16, off + 14, flags)
                advanced += slots
                pos += slots
                if pos >= num:
                    pos -= num
                    wrap = not wrap
            assert first_flags is not None
            desc.pack(U16, first_flags[0], first_flags[1])  # the publish
        except (ValueError, IndexError) as e:
            raise VqError("ring-access", str(e)) from None
        self._used_pub, self._used_pub_wrap = pos, wrap
        pending.clear()
        off_wrap, flags = rings.driver.unpack(EVENT, 0)
        if flags == EVENT_FLAGS_DESC and self.event_idx:
            ev = off_wrap & 0x7FFF
            ev_wrap = bool(off_wrap >> 15)
            need = self._event_crossed(ev, ev_wrap, old, old_wrap, advanced)
        else:
            need = flags != EVENT_FLAGS_DISABLE
        if need:
            self.need_call = True
        return need

    def _event_crossed(self, ev: int, ev_wrap: bool, old: int, old_wrap: bool, n: int) -> bool:
        """Did the used position move over slot (ev, ev_wrap) going ``n`` slots from old?"""
        cycle = 2 * self.num

        def lin(p: int, w: bool) -> int:
            return p + (0 if w else self.num)

        return (lin(ev, ev_wrap) - lin(old, old_wrap)) % cycle < n

    @property
    def used_published(self) -> int:
        return self._used_pub | (int(self._used_pub_wrap) << 15)

    @property
    def used_pending(self) -> int:
        return len(self._pending_used)

    def rewind(self) -> int:
        """Give back popped-but-unpushed chains: last_avail goes back to the oldest one's
        slot and wrap counter. Exact when completions are in order."""
        n = self.inflight
        if n == 0:
            return 0
        oldest = next(iter(self._popped.values()))
        self.state.last_avail_idx = oldest.pos
        self.state.avail_wrap = oldest.wrap
        self.inflight = 0
        self._popped.clear()
        self._journal_rewind(n, True)
        return n

    # -- notifications ---------------------------------------------------------------------
    def set_notification(self, enabled: bool) -> None:
        """Device area flags: ENABLE or DISABLE driver kicks."""
        self.notification = enabled
        if not self.configured:
            return
        dev = self.rings().device
        dev.pack(U16, EVENT_FLAGS, EVENT_FLAGS_ENABLE if enabled else EVENT_FLAGS_DISABLE)

    def enable_notification_and_check(self) -> bool:
        """Re-enable kicks; True if the next slot became available meanwhile (no scan)."""
        self.set_notification(True)
        rings = self.rings()
        return self._desc_available(rings, self.state.last_avail_idx, self.state.avail_wrap)
