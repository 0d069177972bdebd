"""What the driver's split and packed virtqueues share: ring memory and its DMA mappings,
chain bookkeeping (tokens, indirect tables, streaming mappings), completing used chains with
their checks, waiting for used chains and interrupts, and tear-down.

A layout (:class:`~qtests.qos.virtqueue.SplitVirtqueue`,
:class:`~qtests.qos.packed_virtqueue.PackedVirtqueue`) adds how chains are written
(`add`/`publish`/`kick`) and how used ones are found (`pending_used`/`get_used`). Guest memory
is reached through a :class:`~qtests.qos.guest_memory.GuestMemoryAccess` (qtest, or shared
memory for the vhost-user front-end) and allocated from an allocator with
``alloc(size, align, tag=)`` / ``free(addr)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.virtio.ring import DESC_SIZE

from .guest_memory import GuestMemoryAccess
from .interrupts import InterruptSource
from .iova import IDENTITY, DmaDir, DmaMapper, map_buffers, unmap_all
from .waiting import poll_until

__all__ = [
    "Buffer",
    "DriverQueue",
    "RingAllocator",
    "UsedElem",
    "VirtqueueError",
    "VirtqueueFull",
]

#: A buffer: (guest-physical address, length) - or (DMA address, length) when ``premapped``.
Buffer = tuple[int, int]


class RingAllocator(Protocol):
    def alloc(self, size: int, align: int | None = None, *, tag: str = "") -> int: ...
    def free(self, addr: int) -> None: ...


class VirtqueueError(Exception):
    """Driver misuse or a device that broke the ring protocol (names the queue)."""


class VirtqueueFull(VirtqueueError):
    pass


@dataclass(slots=True)
class UsedElem:
    """One completed chain: its head (split) or buffer id (packed), bytes written by the
    device, caller token."""

    head: int
    length: int
    token: Any


@dataclass(slots=True)
class _Chain:
    token: Any
    table: int | None  # indirect table (guest-physical), freed on completion
    in_len: int
    slots: int = 1  # ring entries it takes (packed)
    descs: list[int] = field(default_factory=list)  # descriptor indexes (split)
    #: Streaming DMA mappings made for this chain: (dma address, size, direction).
    mapped: list[tuple[int, int, DmaDir]] | None = None


class DriverQueue(ABC):
    """One virtqueue owned by the driver.

    ``notify`` is called (with the queue) to notify the device; the transport sets it.
    ``interrupt`` (optional) is the queue's interrupt source (MSI-X word, ISR, eventfd).
    ``dma`` turns guest-physical addresses into the DMA addresses the device is given (ring
    addresses ``desc_dma``/``avail_dma``/``used_dma``, descriptor ``addr`` fields, indirect
    tables); identity by default. Buffers are mapped in `add` and unmapped when their chain
    is used (or the queue destroyed).
    """

    packed = False
    #: Chains made available by the driver (free-running u16, as last published).
    avail_idx: int
    #: Used chains the driver consumed (free-running u16).
    last_used_idx: int

    def __init__(
        self,
        qt: GuestMemoryAccess,
        alloc: RingAllocator,
        index: int,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        name: str | None = None,
        notify: Callable[[Any], None] | None = None,
        dma: DmaMapper | None = None,
    ) -> None:
        self._check_size(size)
        self.qt = qt
        self.alloc = alloc
        self.index = index
        self.size = size
        self.name = name or f"vq{index}"
        self.event_idx = event_idx
        #: Indirect descriptors negotiated (VIRTIO_F_INDIRECT_DESC).
        self.indirect = indirect
        self.notify = notify
        self.interrupt: InterruptSource | None = None
        (dsz, dal), (asz, aal), (usz, ual) = self._area_layout(size)
        kind = "packed " if self.packed else ""
        self.desc = alloc.alloc(dsz, dal, tag=f"{self.name} {kind}desc")
        self.avail = alloc.alloc(asz, aal, tag=f"{self.name} {'driver area' if kind else 'avail'}")
        self.used = alloc.alloc(usz, ual, tag=f"{self.name} {'device area' if kind else 'used'}")
        qt.write_many([(self.desc, bytes(dsz)), (self.avail, bytes(asz)), (self.used, bytes(usz))])
        self.dma: DmaMapper = dma if dma is not None else IDENTITY
        #: What the device is told (== desc/avail/used without a vIOMMU).
        self.desc_dma = self.dma.map_coherent(self.desc, dsz)
        self.avail_dma = self.dma.map_coherent(self.avail, asz)
        self.used_dma = self.dma.map_coherent(self.used, usz)
        self._chains: list[_Chain | None] = [None] * size
        self.in_flight = 0  # chains added (published or not) and not yet used
        self.kicks = 0
        self.kicks_suppressed = 0
        self._destroyed = False

    # -- what a layout provides ------------------------------------------------------------
    @abstractmethod
    def _check_size(self, size: int) -> None:
        """Raise VirtqueueError when the layout does not allow ``size``."""

    @abstractmethod
    def _area_layout(self, size: int) -> tuple[tuple[int, int | None], ...]:
        """(bytes, alignment) of the descriptor, driver and device areas."""

    @property
    @abstractmethod
    def notification_data(self) -> int:
        """Where the driver is, as VIRTIO_F_NOTIFICATION_DATA reports it with a notify."""

    @property
    @abstractmethod
    def num_free(self) -> int:
        """How many more single-buffer chains fit now."""

    @property
    @abstractmethod
    def unpublished(self) -> bool:
        """Chains added but not yet visible to the device."""

    @abstractmethod
    def add(
        self,
        out: Sequence[Buffer] = (),
        inp: Sequence[Buffer] = (),
        token: Any = None,
        *,
        indirect: bool | None = None,
        premapped: bool = False,
    ) -> int: ...

    @abstractmethod
    def publish(self) -> int:
        """Make the added chains visible to the device; returns how many."""

    @abstractmethod
    def kick(self, *, force: bool = False) -> bool:
        """Publish, then notify the device unless it asked not to be (or ``force``)."""

    @abstractmethod
    def device_used_idx(self) -> int:
        """Chains the device has completed (free-running u16)."""

    @abstractmethod
    def pending_used(self) -> int:
        """Used chains the device published that the driver has not consumed."""

    @abstractmethod
    def get_used(self, max_count: int | None = None) -> list[UsedElem]:
        """Consume the used chains available now (at most ``max_count``)."""

    @abstractmethod
    def _state(self) -> str:
        """Ring positions, for error messages."""

    # -- adding chains ---------------------------------------------------------------------
    def _chain_buffers(
        self, out: Sequence[Buffer], inp: Sequence[Buffer], indirect: bool | None, write_flag: int
    ) -> tuple[list[tuple[int, int, int]], bool]:
        """The chain's (addr, len, flags) buffers and whether it goes in an indirect table."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, write_flag) for a, n in inp]
        if not bufs:
            raise VirtqueueError(f"{self.name}: empty chain")
        use_indirect = bool(indirect)
        if use_indirect and not self.indirect:
            raise VirtqueueError(f"{self.name}: indirect descriptors were not negotiated")
        return bufs, use_indirect

    def _map_buffers(
        self, bufs: list[tuple[int, int, int]], premapped: bool, write_flag: int
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, DmaDir]] | None]:
        if premapped or self.dma.identity:
            return bufs, None
        return map_buffers(self.dma, bufs, write_flag)

    def _indirect_table(
        self, entries: bytes, mapped: list[tuple[int, int, DmaDir]] | None
    ) -> tuple[int, int, list[tuple[int, int, DmaDir]] | None]:
        """Allocate an indirect table for ``entries``: (gpa, dma address, mappings)."""
        n = len(entries)
        table = self.alloc.alloc(n, DESC_SIZE, tag=f"{self.name} indirect")
        table_dma = table
        if not self.dma.identity:
            table_dma = self.dma.map(table, n, DmaDir.TO_DEVICE)
            mapped = (mapped or []) + [(table_dma, n, DmaDir.TO_DEVICE)]
        return table, table_dma, mapped

    def add_and_kick(
        self,
        out: Sequence[Buffer] = (),
        inp: Sequence[Buffer] = (),
        token: Any = None,
        *,
        indirect: bool | None = None,
    ) -> int:
        head = self.add(out, inp, token, indirect=indirect)
        self.kick()
        return head

    # -- used chains -----------------------------------------------------------------------
    def _complete(self, buf_id: int, length: int, errors: list[str]) -> tuple[_Chain, UsedElem]:
        """Take the in-flight chain ``buf_id`` back (mappings and table released); a length
        beyond its device-writable bytes is added to ``errors``."""
        chain = self._chains[buf_id]
        assert chain is not None
        self._chains[buf_id] = None
        self._release(chain)
        self.in_flight -= 1
        if length > chain.in_len:
            errors.append(f"used id {buf_id}: len {length} > {chain.in_len} writable bytes")
        return chain, UsedElem(buf_id, length, chain.token)

    def _release(self, chain: _Chain) -> None:
        unmap_all(self.dma, chain.mapped)
        if chain.table is not None:
            self.alloc.free(chain.table)

    def _raise_errors(self, errors: list[str]) -> None:
        if errors:
            raise VirtqueueError(f"{self.name}: " + "; ".join(errors))

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[UsedElem]:
        """Wait until ``count`` used chains are available; consume and return them."""
        if count > self.in_flight:
            raise VirtqueueError(
                f"{self.name}: waiting for {count} used chain(s) but {self.in_flight} in flight"
            )
        if self.unpublished:
            raise VirtqueueError(f"{self.name}: waiting for used with unpublished chains")
        poll_until(
            lambda: self.pending_used() >= count,
            timeout,
            f"{count} used chain(s) on {self.name}",
            detail=self._state,
        )
        return self.get_used(count)

    def wait_interrupt(self, timeout: float = 5.0) -> None:
        if self.interrupt is None:
            raise VirtqueueError(f"{self.name}: no interrupt source attached")
        poll_until(
            self.interrupt.fired,
            timeout,
            f"interrupt of {self.name} ({self.interrupt.describe()})",
            detail=self._state,
        )

    # -- lifetime --------------------------------------------------------------------------
    def tokens_in_flight(self) -> list[Any]:
        return [c.token for c in self._chains if c is not None]

    def destroy(self) -> list[Any]:
        """Free ring memory and indirect tables; returns tokens of chains still in flight."""
        if self._destroyed:
            return []
        self._destroyed = True
        tokens = []
        for c in self._chains:
            if c is not None:
                tokens.append(c.token)
                self._release(c)
        self._chains = [None] * self.size
        (dsz, _), (asz, _), (usz, _) = self._area_layout(self.size)
        for dma_addr, n in ((self.desc_dma, dsz), (self.avail_dma, asz), (self.used_dma, usz)):
            self.dma.unmap_coherent(dma_addr, n)
        for addr in (self.desc, self.avail, self.used):
            self.alloc.free(addr)
        return tokens
