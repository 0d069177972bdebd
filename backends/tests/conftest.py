"""Shared helpers for the device-model tests: guest memory, a driver-side split ring and a
small personality. Importable as ``backends.tests.conftest``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

from backends.vdpa.dma import DmaSpace
from backends.vdpa.faults import Faults
from backends.vdpa.iotlb import IOTLB, Perm
from backends.vdpa.journal import Journal
from backends.vdpa.memory import HostMemory, HostRegion
from backends.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, bit
from backends.virtio.ring import SPLIT_DESC as DESC
from backends.virtio.ring import (
    U16,
    USED_ELEM,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)

if TYPE_CHECKING:  # vduse_rig imports this module
    from backends.tests.vduse_rig import Rig

# CI runs are reproducible (derandomized); developer runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

UADDR_BASE = 0x7F00_0000_0000
MEM_SIZE = 1 << 20


@dataclass
class Space:
    journal: Journal
    faults: Faults
    iotlb: IOTLB
    host: HostMemory
    dma: DmaSpace
    region: HostRegion


def make_space(size: int = MEM_SIZE, gpa: int = 0, identity: bool = True) -> Space:
    """One anonymous region at ``gpa`` with (optionally) an identity IOTLB entry for it."""
    journal = Journal()
    faults = Faults(journal=journal)
    iotlb = IOTLB(journal, faults)
    host = HostMemory()
    region = HostRegion.anonymous(gpa, size, UADDR_BASE + gpa)
    host.add(region)
    if identity:
        iotlb.dma_map(gpa, size, region.uaddr, Perm.RW)
    dma = DmaSpace(iotlb, host, journal, faults)
    return Space(journal, faults, iotlb, host, dma, region)


class DriverRing:
    """The driver side of a split ring laid out in ``region`` (GPA addressing; descriptors
    carry ``iova = gpa + iova_offset``)."""

    def __init__(self, region: HostRegion, num: int, base_gpa: int, iova_offset: int = 0) -> None:
        self.region = region
        self.num = num
        self.desc = base_gpa
        self.avail = base_gpa + 16 * num
        used = self.avail + 6 + 2 * num
        self.used = (used + 3) & ~3
        self.end = self.used + 6 + 8 * num
        self.iova_offset = iova_offset
        self.avail_idx = 0
        self.free = list(range(num))
        self.heap = max((self.end + 0xFFF) & ~0xFFF, 0x40000)
        self.last_used = 0

    # addresses as the device sees them
    @property
    def desc_iova(self) -> int:
        return self.desc + self.iova_offset

    @property
    def avail_iova(self) -> int:
        return self.avail + self.iova_offset

    @property
    def used_iova(self) -> int:
        return self.used + self.iova_offset

    def alloc(self, n: int, align: int = 16) -> int:
        gpa = (self.heap + align - 1) & ~(align - 1)
        self.heap = gpa + n
        assert self.heap <= self.region.gpa_end, "test heap exhausted"
        return gpa

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.region.pack_gpa(DESC, self.desc + 16 * i, addr, length, flags, nxt)

    def set_avail_ring(self, slot: int, head: int) -> None:
        self.region.pack_gpa(U16, self.avail + 4 + 2 * (slot % self.num), head)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.region.pack_gpa(U16, self.avail + 2, self.avail_idx)

    def publish(self, head: int) -> None:
        self.set_avail_ring(self.avail_idx, head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_flags(self, flags: int) -> None:
        self.region.pack_gpa(U16, self.avail, flags)

    def set_used_event(self, v: int) -> None:
        self.region.pack_gpa(U16, self.avail + 4 + 2 * self.num, v & 0xFFFF)

    def used_idx(self) -> int:
        return U16.unpack(self.region.read_gpa(self.used + 2, 2))[0]

    def used_flags(self) -> int:
        return U16.unpack(self.region.read_gpa(self.used, 2))[0]

    def avail_event(self) -> int:
        return U16.unpack(self.region.read_gpa(self.used + 4 + 8 * self.num, 2))[0]

    def used_elem(self, k: int) -> tuple[int, int]:
        off = self.used + 4 + 8 * (k % self.num)
        return USED_ELEM.unpack(self.region.read_gpa(off, 8))

    def set_used_idx(self, v: int) -> None:
        self.region.pack_gpa(U16, self.used + 2, v & 0xFFFF)

    def add_chain(
        self,
        out: Sequence[bytes] = (),
        inp: Sequence[int] = (),
        indirect: bool = False,
        publish: bool = True,
    ) -> tuple[int, list[int]]:
        """Post buffers: ``out`` contents, ``inp`` sizes. Returns (head, in-buffer gpas)."""
        bufs: list[tuple[int, int, int]] = []
        in_gpas: list[int] = []
        for data in out:
            g = self.alloc(max(len(data), 1))
            self.region.write_gpa(g, data)
            bufs.append((g, len(data), 0))
        for n in inp:
            g = self.alloc(max(n, 1))
            in_gpas.append(g)
            bufs.append((g, n, VRING_DESC_F_WRITE))
        if indirect:
            table = self.alloc(16 * len(bufs))
            for k, (g, n, f) in enumerate(bufs):
                nf = f | (VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0)
                self.region.pack_gpa(DESC, table + 16 * k, g + self.iova_offset, n, nf, k + 1)
            head = self.free.pop(0)
            self.write_desc(
                head, table + self.iova_offset, 16 * len(bufs), VRING_DESC_F_INDIRECT, 0
            )
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for k, (g, n, f) in enumerate(bufs):
                last = k + 1 == len(bufs)
                nf = f | (0 if last else VRING_DESC_F_NEXT)
                self.write_desc(ids[k], g + self.iova_offset, n, nf, 0 if last else ids[k + 1])
            head = ids[0]
        if publish:
            self.publish(head)
        return head, in_gpas

    def reclaim(self) -> list[tuple[int, int]]:
        """Used elements the device published since the last call (frees nothing)."""
        out = []
        new = self.used_idx()
        while self.last_used != new:
            out.append(self.used_elem(self.last_used))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


@dataclass
class EchoPersonality:
    """Consumes every chain: reads ``out``, fills ``inp`` with the out bytes (or 0xAB),
    pushes and notifies. Records kicks; can be told to raise."""

    queues: int = 2
    features: int = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX)
    device_id: int = 1
    dev: Any = None
    kicked: list[int] = field(default_factory=list)
    seen: list[bytes] = field(default_factory=list)
    raise_on_kick: Exception | None = None
    #: False: push chains without writing their buffers (a random ring's buffers may overlap
    #: its own descriptor tables, and a write would change what later pops see)
    fill_inputs: bool = True
    resets: int = 0
    stopped: list[int] = field(default_factory=list)
    config: bytearray = field(
        default_factory=lambda: bytearray(b"\x52\x54\x00\x12\x34\x56\x01\x00")
    )

    def device_features(self) -> int:
        return self.features

    def config_space(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def num_queues(self) -> int:
        return self.queues

    def attach(self, dev: Any) -> None:
        self.dev = dev

    def reset(self) -> None:
        self.resets += 1

    def queue_stopped(self, i: int) -> None:
        self.stopped.append(i)

    def queue_kicked(self, i: int) -> None:
        self.kicked.append(i)
        if self.raise_on_kick is not None:
            raise self.raise_on_kick
        dev = self.dev
        vq = dev.vqs[i]
        while (chain := vq.pop()) is not None:
            data = dev.dma.read_pieces(chain.out)
            self.seen.append(data)
            written = 0
            if self.fill_inputs:
                fill = (data or b"\xab") * (chain.in_len // max(len(data), 1) + 1)
                written = dev.dma.write_pieces(chain.inp, fill[: chain.in_len])
            vq.push(chain, written)
        dev.notify_used(i)


@pytest.fixture
def space() -> Iterator[Space]:
    yield make_space()


__all__ = ["DriverRing", "EchoPersonality", "Space", "make_space"]


@pytest.fixture
def rig() -> Iterator[Rig]:
    """The VDUSE transport over the fake kernel (backends/tests/vduse_rig.py), closed after
    the test: the fixture of the VDUSE transport suites."""
    from backends.tests.vduse_rig import make_rig

    r = make_rig()
    try:
        yield r
    finally:
        r.close()
