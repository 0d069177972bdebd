"""Driver side of a virtio packed virtqueue (virtio 1.2, 2.8), kept in guest memory through
qtest. Same API as :class:`~qtests.qos.virtqueue.SplitVirtqueue` (``add``/``kick``/
``get_used``/``wait_used``/...), so :class:`~qtests.qos.virtio_net.VirtioNetDriver` drives
either ring; :meth:`VirtioPciDevice.setup_queue` picks this class when VIRTIO_F_RING_PACKED
was negotiated.

Layout: descriptor ring ``<QIHH>`` (addr, len, id, flags) x N; driver area and device area
are each an event suppression structure ``<HH>`` (off_wrap, flags). A chain takes
consecutive slots (wrapping at the end), the buffer id is written in every descriptor, and
each head's flags are written after everything else of its batch, the first head last.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from backends.virtio.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT,
    EVENT_FLAGS_DISABLE,
    EVENT_FLAGS_ENABLE,
    MAX_QUEUE_SIZE,
    packed_avail_flags,
    packed_desc_used,
)
from backends.virtio.ring import PACKED_DESC as DESC

from .driver_queue import Buffer, DriverQueue, UsedElem, VirtqueueError, VirtqueueFull, _Chain

__all__ = ["PackedVirtqueue"]

POSITIONS_KEPT = 4096


class PackedVirtqueue(DriverQueue):
    """One packed virtqueue owned by the driver (see the module docstring)."""

    packed = True

    def _check_size(self, size: int) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE:
            raise VirtqueueError(f"queue size {size} not in 1..{MAX_QUEUE_SIZE}")

    def _area_layout(self, size: int) -> tuple[tuple[int, int | None], ...]:
        return (DESC_SIZE * size, None), (EVENT.size, 4), (EVENT.size, 4)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._ids: collections.deque[int] = collections.deque(range(self.size))
        self._free_slots = self.size
        self._staged: list[tuple[int, bytes]] = []  # (slot, descriptor) in ring order
        self._heads: list[int] = []  # index into _staged of each staged head
        self._staged_tables: list[tuple[int, bytes]] = []
        #: next slot the driver fills and its wrap counter
        self.next_avail = 0
        self.avail_wrap = True
        #: next slot the device writes a used descriptor at, and its wrap counter
        self.next_used = 0
        self.used_wrap = True
        #: chains made available / consumed by the driver (free-running u16, as split)
        self.avail_idx = 0
        self.last_used_idx = 0
        self._positions: dict[int, tuple[int, bool]] = {0: (0, True)}
        self._pending_positions: list[tuple[int, bool]] = []

    @property
    def unpublished(self) -> bool:
        return bool(self._heads)

    def __repr__(self) -> str:
        return f"PackedVirtqueue({self.name}, size={self.size}, {self._state()})"

    @property
    def notification_data(self) -> int:
        """next_avail | avail_wrap << 15: the NOTIFICATION_DATA value of a packed ring."""
        return self.next_avail | int(self.avail_wrap) << 15

    def position_after(self, chains: int) -> tuple[int, bool]:
        """(slot, wrap counter) just after the ``chains``-th chain made available (a
        free-running u16 count, as ``avail_idx``); known for the last POSITIONS_KEPT."""
        try:
            return self._positions[chains & 0xFFFF]
        except KeyError:
            raise VirtqueueError(f"{self.name}: position after chain {chains} not kept") from None

    def device_used_idx(self) -> int:
        """Chains the device has completed (free-running u16), as a split ring's used idx."""
        return (self.last_used_idx + self.pending_used()) & 0xFFFF

    @property
    def num_free(self) -> int:
        return min(self._free_slots, len(self._ids))

    # ------------------------------------------------------------------ adding chains
    def add(
        self,
        out: Sequence[Buffer] = (),
        inp: Sequence[Buffer] = (),
        token: Any = None,
        *,
        indirect: bool | None = None,
        premapped: bool = False,
    ) -> int:
        """Stage a chain; returns its buffer id. Visible to the device after `publish`."""
        bufs, use_indirect = self._chain_buffers(out, inp, indirect, DESC_F_WRITE)
        nslots = 1 if use_indirect else len(bufs)
        if nslots > self._free_slots or not self._ids:
            raise VirtqueueFull(f"{self.name}: chain needs {nslots} slots, {self.num_free} free")
        bufs, mapped = self._map_buffers(bufs, premapped, DESC_F_WRITE)
        buf_id = self._ids.popleft()
        table = None
        if use_indirect:
            entries = b"".join(DESC.pack(a, n, 0, f) for a, n, f in bufs)
            table, table_dma, mapped = self._indirect_table(entries, mapped)
            self._staged_tables.append((table, entries))
            descs = [(table_dma, len(entries), DESC_F_INDIRECT)]
        else:
            last = len(bufs) - 1
            descs = [
                (a, n, f | (DESC_F_NEXT if k < last else 0)) for k, (a, n, f) in enumerate(bufs)
            ]
        self._heads.append(len(self._staged))
        for a, n, f in descs:
            flags = packed_avail_flags(f, self.avail_wrap)
            self._staged.append((self.next_avail, DESC.pack(a, n, buf_id, flags)))
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap = not self.avail_wrap
        self._free_slots -= nslots
        self._pending_positions.append((self.next_avail, self.avail_wrap))
        self._chains[buf_id] = _Chain(token, table, sum(n for _, n in inp), nslots, [], mapped)
        self.in_flight += 1
        return buf_id

    def publish(self) -> int:
        """Write staged tables and descriptors (heads last, the batch's first head at the
        very end); returns the number of chains made available."""
        heads = self._heads
        if not heads:
            return 0
        head_set = set(heads)
        writes: list[tuple[int, bytes]] = list(self._staged_tables)
        for k, (slot, raw) in enumerate(self._staged):
            if k not in head_set:
                writes.append((self.desc + 16 * slot, raw))
        for k in heads[1:]:
            slot, raw = self._staged[k]
            writes.append((self.desc + 16 * slot, raw))
        slot, raw = self._staged[heads[0]]
        writes.append((self.desc + 16 * slot, raw))
        self.qt.write_many(writes)
        n = len(heads)
        for pos in self._pending_positions:
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            self._positions[self.avail_idx] = pos
            self._positions.pop((self.avail_idx - POSITIONS_KEPT) & 0xFFFF, None)
        self._pending_positions = []
        self._staged = []
        self._heads = []
        self._staged_tables = []
        return n

    def kick(self, *, force: bool = False) -> bool:
        """Publish, then notify unless the device area says DISABLE (or ``force``)."""
        n = self.publish()
        if not force:
            if not n:
                return False
            if self.device_event()[1] == EVENT_FLAGS_DISABLE:
                self.kicks_suppressed += 1
                return False
        if self.notify is None:
            raise VirtqueueError(f"{self.name}: no notifier attached")
        self.notify(self)
        self.kicks += 1
        return True

    # ------------------------------------------------------------------ used descriptors
    def _scan_used(self, limit: int | None = None) -> list[tuple[int, int, int]]:
        """(id, len, flags) of used descriptors the device wrote from next_used on, without
        consuming them."""
        raw = self.qt.read(self.desc, 16 * self.size)
        pos, wrap = self.next_used, self.used_wrap
        out: list[tuple[int, int, int]] = []
        while self.in_flight > len(out) and (limit is None or len(out) < limit):
            _, n, buf_id, flags = DESC.unpack_from(raw, 16 * pos)
            if not packed_desc_used(flags, wrap):
                break
            chain = self._chains[buf_id] if buf_id < self.size else None
            if chain is None:
                raise VirtqueueError(
                    f"{self.name}: used id {buf_id} at slot {pos} is not in flight ({self._state()})"
                )
            out.append((buf_id, n, flags))
            pos += chain.slots
            if pos >= self.size:
                pos -= self.size
                wrap = not wrap
        return out

    def pending_used(self) -> int:
        return len(self._scan_used())

    def get_used(self, max_count: int | None = None) -> list[UsedElem]:
        """Consume the used descriptors available now (at most ``max_count``)."""
        found = self._scan_used(max_count)
        out: list[UsedElem] = []
        errors: list[str] = []
        for buf_id, length, _flags in found:
            chain, elem = self._complete(buf_id, length, errors)
            self._ids.append(buf_id)
            self._free_slots += chain.slots
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            self.next_used += chain.slots
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap = not self.used_wrap
            out.append(elem)
        self._raise_errors(errors)
        return out

    def _state(self) -> str:
        return (
            f"next avail {self.next_avail} wrap {int(self.avail_wrap)}, next used "
            f"{self.next_used} wrap {int(self.used_wrap)}, in flight {self.in_flight}"
        )

    # ------------------------------------------------------------------ notification control
    def device_event(self) -> tuple[int, int]:
        """The device area: (off_wrap, flags)."""
        return EVENT.unpack(self.qt.read(self.used, EVENT.size))

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.qt.write(self.avail, EVENT.pack(off_wrap, flags))

    def enable_interrupts(self) -> None:
        self.set_driver_event(0, EVENT_FLAGS_ENABLE)

    def disable_interrupts(self) -> None:
        self.set_driver_event(0, EVENT_FLAGS_DISABLE)
