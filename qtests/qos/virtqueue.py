"""Driver side of a virtio split virtqueue, kept in guest memory through qtest.

Layout (virtio 1.2, 2.7): descriptor table ``<QIHH>`` x N; available ring ``flags, idx,
ring[N], used_event``; used ring ``flags, idx, {id, len}[N], avail_event`` (all u16 but the
``<II>`` used elements).  Indices are free-running u16 and wrap past 65535.

Fast path: `add` only stages descriptors; `publish`/`kick` write every staged descriptor run,
the avail entries and finally the avail index in one pipelined qtest round trip (b64write), so
a batch of many chains costs one round trip plus the notify.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Sequence
from typing import Any

from backends.virtio.ring import (
    MAX_QUEUE_SIZE,
    USED_ELEM,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    split_ring_sizes,
    vring_need_event,
)
from backends.virtio.ring import SPLIT_DESC as DESC
from backends.virtio.ring import U16_LE as U16

from .driver_queue import (
    Buffer,
    DriverQueue,
    UsedElem,
    VirtqueueError,
    VirtqueueFull,
    _Chain,
)

__all__ = [
    "DESC",
    "U16",
    "Buffer",
    "SplitVirtqueue",
    "UsedElem",
    "VirtqueueError",
    "VirtqueueFull",
    "ring_sizes",
]

ring_sizes = split_ring_sizes


class SplitVirtqueue(DriverQueue):
    """One split virtqueue owned by the driver (see :class:`DriverQueue` for the arguments)."""

    def _check_size(self, size: int) -> None:
        if size <= 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
            raise VirtqueueError(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")

    def _area_layout(self, size: int) -> tuple[tuple[int, int | None], ...]:
        dsz, asz, usz = ring_sizes(size)
        return (dsz, None), (asz, None), (usz, None)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._free: collections.deque[int] = collections.deque(range(self.size))
        self._staged_desc: dict[int, bytes] = {}
        self._staged_tables: list[tuple[int, bytes]] = []
        self._new_heads: list[int] = []
        #: Driver's avail idx (free-running u16, as last published).
        self.avail_idx = 0
        #: Next used idx the driver will consume (free-running u16).
        self.last_used_idx = 0
        self._kicked_idx = 0

    @property
    def notification_data(self) -> int:
        """The avail idx: the NOTIFICATION_DATA value of a split ring."""
        return self.avail_idx

    @property
    def unpublished(self) -> bool:
        return bool(self._new_heads)

    def __repr__(self) -> str:
        return (
            f"SplitVirtqueue({self.name}, size={self.size}, avail={self.avail_idx}, "
            f"last_used={self.last_used_idx}, in_flight={self.in_flight})"
        )

    # ------------------------------------------------------------------ addresses
    @property
    def avail_event_addr(self) -> int:
        return self.used + 4 + 8 * self.size

    @property
    def used_event_addr(self) -> int:
        return self.avail + 4 + 2 * self.size

    @property
    def num_free(self) -> int:
        return len(self._free)

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
        """Stage a chain of device-readable ``out`` then device-writable ``inp`` buffers.

        Returns the head index.  Nothing is visible to the device until `publish`/`kick`.
        ``indirect=True`` puts the chain in an indirect table (needs the feature).
        Buffers are guest-physical and mapped through ``dma`` here (unmapped when the chain
        is used); ``premapped=True``: they already are DMA addresses, used as given.
        """
        bufs, use_indirect = self._chain_buffers(out, inp, indirect, VRING_DESC_F_WRITE)
        in_len = sum(n for _, n in inp)
        ndesc = 1 if use_indirect else len(bufs)
        if ndesc > len(self._free):
            raise VirtqueueFull(
                f"{self.name}: chain needs {ndesc} descriptors, {len(self._free)} free"
            )
        bufs, mapped = self._map_buffers(bufs, premapped, VRING_DESC_F_WRITE)
        descs = [self._free.popleft() for _ in range(ndesc)]
        table = None
        last = len(bufs) - 1
        if use_indirect:
            entries = b"".join(
                DESC.pack(
                    a, n, f | (VRING_DESC_F_NEXT if i < last else 0), i + 1 if i < last else 0
                )
                for i, (a, n, f) in enumerate(bufs)
            )
            table, table_dma, mapped = self._indirect_table(entries, mapped)
            self._staged_tables.append((table, entries))
            self._staged_desc[descs[0]] = DESC.pack(
                table_dma, len(entries), VRING_DESC_F_INDIRECT, 0
            )
        else:
            for i, (a, n, f) in enumerate(bufs):
                if i < last:
                    self._staged_desc[descs[i]] = DESC.pack(
                        a, n, f | VRING_DESC_F_NEXT, descs[i + 1]
                    )
                else:
                    self._staged_desc[descs[i]] = DESC.pack(a, n, f, 0)
        head = descs[0]
        self._chains[head] = _Chain(token, table, in_len, len(descs), descs, mapped)
        self._new_heads.append(head)
        self.in_flight += 1
        return head

    def publish(self) -> int:
        """Write staged descriptors, avail entries and the new avail idx; return #chains."""
        heads = self._new_heads
        if not heads:
            return 0
        writes: list[tuple[int, bytes]] = list(self._staged_tables)
        if self._staged_desc:
            idxs = sorted(self._staged_desc)
            run_start = prev = idxs[0]
            parts = [self._staged_desc[prev]]
            for i in idxs[1:]:
                if i != prev + 1:
                    writes.append((self.desc + 16 * run_start, b"".join(parts)))
                    run_start, parts = i, []
                parts.append(self._staged_desc[i])
                prev = i
            writes.append((self.desc + 16 * run_start, b"".join(parts)))
        n = len(heads)
        start = self.avail_idx % self.size
        first = min(n, self.size - start)
        writes.append((self.avail + 4 + 2 * start, struct.pack(f"<{first}H", *heads[:first])))
        if n > first:
            rest = heads[first:]
            writes.append((self.avail + 4, struct.pack(f"<{len(rest)}H", *rest)))
        new_idx = (self.avail_idx + n) & 0xFFFF
        writes.append((self.avail + 2, U16.pack(new_idx)))
        self.qt.write_many(writes)
        self.avail_idx = new_idx
        self._staged_desc.clear()
        self._staged_tables.clear()
        self._new_heads = []
        return n

    def kick(self, *, force: bool = False) -> bool:
        """Publish, then notify the device unless it asked not to be (or ``force``).

        Honours VRING_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX.  Returns True if the
        device was notified.
        """
        self.publish()
        old, new = self._kicked_idx, self.avail_idx
        self._kicked_idx = new
        if force:
            need = True
        elif new == old:
            return False
        elif self.event_idx:
            need = vring_need_event(self.qt.readw(self.avail_event_addr), new, old)
        else:
            need = not self.qt.readw(self.used) & VRING_USED_F_NO_NOTIFY
        if not need:
            self.kicks_suppressed += 1
            return False
        if self.notify is None:
            raise VirtqueueError(f"{self.name}: no notifier attached")
        self.notify(self)
        self.kicks += 1
        return True

    # ------------------------------------------------------------------ used ring
    def device_used_idx(self) -> int:
        return self.qt.readw(self.used + 2)

    def pending_used(self) -> int:
        """Used elements the device published that the driver has not consumed."""
        return (self.device_used_idx() - self.last_used_idx) & 0xFFFF

    def get_used(self, max_count: int | None = None) -> list[UsedElem]:
        """Consume the used elements available now (at most ``max_count``)."""
        used_idx = self.device_used_idx()
        n = (used_idx - self.last_used_idx) & 0xFFFF
        if n == 0:
            return []
        if n > self.in_flight:
            raise VirtqueueError(
                f"{self.name}: device moved used idx {self.last_used_idx} -> {used_idx} "
                f"but only {self.in_flight} chain(s) are in flight"
            )
        if max_count is not None:
            n = min(n, max_count)
        start = self.last_used_idx % self.size
        first = min(n, self.size - start)
        raw = self.qt.read(self.used + 4 + 8 * start, 8 * first)
        if n > first:
            raw += self.qt.read(self.used + 4, 8 * (n - first))
        out: list[UsedElem] = []
        errors: list[str] = []
        for head, length in USED_ELEM.iter_unpack(raw):
            if head >= self.size or self._chains[head] is None:
                errors.append(f"used id {head} is not the head of an in-flight chain")
                continue
            chain, elem = self._complete(head, length, errors)
            self._free.extend(chain.descs)
            out.append(elem)
        self.last_used_idx = (self.last_used_idx + n) & 0xFFFF
        self._raise_errors(errors)
        return out

    def _state(self) -> str:
        return (
            f"device used idx {self.device_used_idx()}, last_used {self.last_used_idx}, "
            f"avail idx {self.avail_idx}, in flight {self.in_flight}"
        )

    # ------------------------------------------------------------------ notification control
    def used_flags(self) -> int:
        return self.qt.readw(self.used)

    def avail_event(self) -> int:
        """The device's avail_event (meaningful with EVENT_IDX)."""
        return self.qt.readw(self.avail_event_addr)

    def set_used_event(self, idx: int) -> None:
        self.qt.writew(self.used_event_addr, idx & 0xFFFF)

    def set_avail_flags(self, flags: int) -> None:
        self.qt.writew(self.avail, flags)

    def enable_interrupts(self) -> None:
        """Ask for an interrupt at the next used element."""
        if self.event_idx:
            self.set_used_event(self.last_used_idx)
        else:
            self.set_avail_flags(0)

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (a hint; devices may still do so)."""
        if self.event_idx:
            self.set_used_event((self.last_used_idx - 1) & 0xFFFF)
        else:
            self.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)

    # ------------------------------------------------------------------ raw access (bad guests)
    def write_desc_raw(
        self, index: int, addr: int, length: int, flags: int = 0, next_idx: int = 0
    ) -> None:
        """Write descriptor ``index`` of the table verbatim: no validation, no bookkeeping.

        For tests of a device facing a malicious or broken driver (loops, out-of-range
        ``next``, unmapped addresses...).  The descriptor is not taken from the free list;
        reset the device (and destroy this queue) after using the raw API.
        """
        if not 0 <= index < self.size:
            raise VirtqueueError(f"{self.name}: descriptor {index} outside the table")
        self.qt.write(self.desc + DESC.size * index, DESC.pack(addr, length, flags, next_idx))

    def publish_raw(self, heads: Sequence[int] = (), *, avail_idx: int | None = None) -> int:
        """Put ``heads`` verbatim (any u16, even >= size) into the avail ring at the current
        avail idx, then publish ``avail_idx`` (default: advanced by ``len(heads)``; any u16,
        e.g. a jump by more than the queue size).  Nothing becomes in flight; `kick` after it
        notifies the device.  Returns the published avail idx."""
        if self._new_heads:
            raise VirtqueueError(f"{self.name}: publish_raw with staged chains")
        writes: list[tuple[int, bytes]] = []
        for k, head in enumerate(heads):
            slot = (self.avail_idx + k) % self.size
            writes.append((self.avail + 4 + 2 * slot, U16.pack(head & 0xFFFF)))
        new_idx = (self.avail_idx + len(heads) if avail_idx is None else avail_idx) & 0xFFFF
        writes.append((self.avail + 2, U16.pack(new_idx)))
        self.qt.write_many(writes)
        self.avail_idx = new_idx
        return new_idx

    # ------------------------------------------------------------------ state / lifetime
    def set_base(self, idx: int, *, write_used: bool = True) -> None:
        """Start the ring at index ``idx`` (avail and used), e.g. to test u16 wrap.

        Only meaningful if the device starts from the same index (vhost-user learns it via
        SET_VRING_BASE from QEMU's vmstate, i.e. after a migration); QEMU's own virtio core
        always resets its last_avail_idx to 0.  Nothing may be in flight.
        """
        if self.in_flight or self._new_heads:
            raise VirtqueueError(f"{self.name}: set_base with {self.in_flight} chain(s) in flight")
        idx &= 0xFFFF
        self.avail_idx = self.last_used_idx = self._kicked_idx = idx
        writes = [(self.avail + 2, U16.pack(idx))]
        if write_used:
            writes.append((self.used + 2, U16.pack(idx)))
        self.qt.write_many(writes)
