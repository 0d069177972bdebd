"""virtio-net datapath over an in-process VdpaDevice and a tiny driver written here.

The driver side lays split rings and buffers into a bytearray-backed HostRegion, kicks with
``dev.kick_vq`` and reads the used ring back; interrupts are recorded via ``set_vq_cb``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from backends.loop import EventLoop
from backends.net.config import NetConfig
from backends.net.datapath import NetDevice
from backends.net.wire import LoopbackWire
from backends.tests.capture_wire import CaptureWire
from backends.vdpa import DirtyLog, Faults, HostRegion, Perm, VdpaDevice
from backends.virtio.features import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Status,
    mask,
)
from backends.virtio.net import (
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
)
from backends.virtio.net_header import VirtioNetHdr

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

GPA = 0x100000
SIZE = 8 << 20
UADDR = 0x7F0000000000
IOVA_OFF = 0x40000000  # IOVA = GPA + IOVA_OFF in vIOMMU tests
NUM = 256
HDR = 12

BASE_FEATURES = mask(VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC)
MRG = mask(VIRTIO_NET_F_MRG_RXBUF)


def frame(n: int, seed: int = 0) -> bytes:
    """A deterministic, non-repeating-looking frame of n bytes."""
    return bytes(((i * 131) ^ (i >> 8) ^ seed) & 0xFF for i in range(n))


class DriverVq:
    """Driver side of one split ring in the test region."""

    def __init__(self, rig: Rig, index: int, num: int = NUM) -> None:
        self.rig = rig
        self.index = index
        self.num = num
        self.desc = rig.alloc(16 * num, 4096)
        self.avail = rig.alloc(6 + 2 * num, 2)
        self.used = rig.alloc(6 + 8 * num, 4)
        self.free = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    def _desc(self, slot: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.rig.pack(DESC, self.desc + 16 * slot, self.rig.iova(addr), length, flags, nxt)

    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Make a chain of (gpa, len, device_writable) buffers available; returns its head."""
        if indirect:
            table = self.rig.alloc(16 * len(bufs), 16)
            for k, (gpa, ln, w) in enumerate(bufs):
                flags = (F_WRITE if w else 0) | (F_NEXT if k + 1 < len(bufs) else 0)
                self.rig.pack(DESC, table + 16 * k, self.rig.iova(gpa), ln, flags, k + 1)
            head = self.free.pop(0)
            self._desc(head, table, 16 * len(bufs), F_INDIRECT, 0)
            slots = [head]
        else:
            slots = [self.free.pop(0) for _ in bufs]
            for k, (gpa, ln, w) in enumerate(bufs):
                last = k + 1 == len(bufs)
                flags = (F_WRITE if w else 0) | (0 if last else F_NEXT)
                self._desc(slots[k], gpa, ln, flags, 0 if last else slots[k + 1])
            head = slots[0]
        self.chains[head] = slots
        self.rig.pack(U16, self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.rig.pack(U16, self.avail + 2, self.avail_idx)
        return head

    def set_used_event(self, value: int) -> None:
        self.rig.pack(U16, self.avail + 4 + 2 * self.num, value)

    def used_idx(self) -> int:
        return U16.unpack(self.rig.read(self.used + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.num
            head, ln = USED_ELEM.unpack(self.rig.read(self.used + 4 + 8 * slot, 8))
            self.free.extend(self.chains.pop(head))
            out.append((head, ln))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def kick(self) -> None:
        self.rig.dev.kick_vq(self.index)


@dataclass
class Rig:
    net: NetDevice
    dev: VdpaDevice
    region: HostRegion
    wire: Any
    iommu: bool = False
    vqs: list[DriverVq] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    brk: int = GPA

    def alloc(self, n: int, align: int = 64) -> int:
        self.brk = (self.brk + align - 1) & ~(align - 1)
        gpa = self.brk
        self.brk += n
        assert self.brk <= GPA + SIZE, "test region exhausted"
        return gpa

    def iova(self, gpa: int) -> int:
        return gpa + IOVA_OFF if self.iommu else gpa

    def pack(self, s: struct.Struct, gpa: int, *values: int) -> None:
        self.region.pack_gpa(s, gpa, *values)

    def read(self, gpa: int, n: int) -> bytes:
        return self.region.read_gpa(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self.region.write_gpa(gpa, data)

    # -- TX / RX helpers ---------------------------------------------------------------------
    def tx_buffers(self, pieces: list[bytes]) -> list[tuple[int, int, bool]]:
        bufs = []
        for p in pieces:
            gpa = self.alloc(max(len(p), 1))
            self.write(gpa, p)
            bufs.append((gpa, len(p), False))
        return bufs

    def post_rx(self, qp: int, sizes: list[int], count: int = 1) -> list[tuple[int, list]]:
        """``count`` RX chains, each of writable buffers of ``sizes``; returns (head, bufs)."""
        posted = []
        for _ in range(count):
            bufs = [(self.alloc(n), n, True) for n in sizes]
            posted.append((self.vqs[2 * qp].add(bufs), bufs))
        return posted

    def read_chain(self, bufs: list, length: int) -> bytes:
        out = b""
        for gpa, ln, _ in bufs:
            take = min(ln, length - len(out))
            out += self.read(gpa, take)
        return out


def make_rig(
    features: int = BASE_FEATURES,
    queue_pairs: int = 1,
    wire: object | None = None,
    iommu: bool = False,
    loop: EventLoop | None = None,
    faults: Faults | None = None,
    **kw: int,
) -> Rig:
    wire = wire if wire is not None else CaptureWire()
    net = NetDevice(wire, queue_pairs=queue_pairs, loop=loop, **kw)  # type: ignore[arg-type]
    dev = VdpaDevice(net, faults=faults)
    region = HostRegion.anonymous(GPA, SIZE, UADDR)
    dev.add_host_region(region)
    rig = Rig(net, dev, region, wire, iommu=iommu)
    if iommu:
        features |= mask(VIRTIO_F_ACCESS_PLATFORM)
    else:
        dev.dma_map(GPA, SIZE, UADDR, Perm.RW)  # identity-by-GPA, as the transport does
    dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    dev.set_driver_features(features)
    dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert dev.get_status() & Status.FEATURES_OK, "features refused"
    for i in range(net.num_queues()):
        q = DriverVq(rig, i)
        rig.vqs.append(q)
        dev.set_vq_num(i, NUM)
        dev.set_vq_address(i, rig.iova(q.desc), rig.iova(q.avail), rig.iova(q.used))
        dev.set_vq_ready(i, True)
        dev.set_vq_cb(i, rig.calls.append)
    if iommu:  # the rings are mapped; buffers are mapped by each test
        for q in rig.vqs:
            dev.dma_map(rig.iova(q.desc), 16 * NUM, UADDR + q.desc - GPA, Perm.RW)
            dev.dma_map(rig.iova(q.avail), 6 + 2 * NUM, UADDR + q.avail - GPA, Perm.RO)
            dev.dma_map(rig.iova(q.used), 6 + 8 * NUM, UADDR + q.used - GPA, Perm.RW)
    dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
    return rig


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    try:
        yield lp
    finally:
        lp.close()


def journal_error(rig: Rig, what: str) -> bool:
    """An error.vq entry naming ``what`` (in whichever field the device files the kind)."""
    return any(what in map(str, e.values()) for e in rig.dev.journal.query(["error.vq"]))


def hdr(num_buffers: int = 0) -> bytes:
    return VirtioNetHdr(num_buffers=num_buffers).pack()


# -- features / config -------------------------------------------------------------------------


def test_features_and_config_space() -> None:
    rig = make_rig(queue_pairs=2)
    offered = rig.dev.get_device_features()
    for b in (
        VIRTIO_F_VERSION_1,
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
        VIRTIO_NET_F_MQ,
    ):
        assert offered >> b & 1, f"feature bit {b} not offered"
    assert not offered >> VIRTIO_NET_F_CTRL_VQ & 1
    assert rig.net.num_queues() == 4 and len(rig.dev.vqs) == 4
    cfg = NetConfig.unpack(rig.dev.get_config(0, 12))
    assert cfg.max_virtqueue_pairs == 2 and cfg.mtu == 1500 and cfg.status == 1
    assert rig.dev.get_config(10, 4) == b"\xdc\x05\x00\x00"  # mtu, then zero padding
    net = NetDevice(CaptureWire(), mac="02:00:00:00:00:07", mtu=9000)  # type: ignore[arg-type]
    assert net.config_space()[:6] == bytes.fromhex("020000000007")
    assert net.config_space()[10:12] == struct.pack("<H", 9000)


# -- TX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [14, 60, 1514, 9014, 65535, 70000])
def test_tx_single_descriptor_byte_exact(n: int) -> None:
    rig = make_rig()
    f = frame(n)
    head = rig.vqs[1].add(rig.tx_buffers([hdr() + f]))
    rig.vqs[1].kick()
    assert rig.wire.sent == [(f, 0)]
    assert rig.vqs[1].take_used() == [(head, 0)]
    assert rig.calls == [1]
    s = rig.net.stats[1]
    assert (s.packets, s.bytes, s.drops) == (1, n, 0)


@pytest.mark.parametrize(
    "cuts",
    [
        [12],  # header alone, frame in one descriptor
        [12, 500, 1000],  # header alone, frame over three
        [5],  # header split: 5 bytes, then 7 header bytes sharing a descriptor with data
        [3, 6, 9, 20],  # header over three descriptors, data over two more
        [20],  # header shares the first descriptor with 8 data bytes
    ],
)
@pytest.mark.parametrize("indirect", [False, True])
def test_tx_multi_descriptor_and_split_header(cuts: list[int], indirect: bool) -> None:
    rig = make_rig()
    f = frame(3000, seed=len(cuts))
    raw = hdr() + f
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    rig.vqs[1].add(rig.tx_buffers(pieces), indirect=indirect)
    rig.vqs[1].kick()
    assert rig.wire.sent == [(f, 0)]
    assert len(rig.vqs[1].take_used()) == 1


def test_tx_batch_one_interrupt_and_fair_budget(loop: EventLoop) -> None:
    rig = make_rig(loop=loop, tx_budget=64)
    frames = [frame(60 + k, seed=k) for k in range(150)]
    for f in frames:
        rig.vqs[1].add(rig.tx_buffers([hdr() + f]))
    rig.vqs[1].kick()
    assert len(rig.wire.sent) == 64
    assert rig.calls == [1]  # one flush + interrupt per batch
    loop.run_until(lambda: len(rig.wire.sent) == 150, 2.0, "all TX frames")
    assert [d for d, _ in rig.wire.sent] == frames
    assert rig.calls == [1, 1, 1]
    assert len(rig.vqs[1].take_used()) == 150


def test_tx_event_idx_suppresses_interrupts() -> None:
    rig = make_rig(features=BASE_FEATURES | mask(VIRTIO_F_EVENT_IDX))
    q = rig.vqs[1]
    q.set_used_event(2)  # interrupt once used idx passes 2
    for k in range(2):
        q.add(rig.tx_buffers([hdr() + frame(100, k)]))
        q.kick()
    assert rig.calls == []
    q.add(rig.tx_buffers([hdr() + frame(100, 9)]))
    q.kick()
    assert rig.calls == [1]
    assert len(rig.wire.sent) == 3


def test_drop_tx_fault_consumes_but_never_sends() -> None:
    faults = Faults(["drop-tx"])
    rig = make_rig(faults=faults)
    for k in range(3):
        rig.vqs[1].add(rig.tx_buffers([hdr() + frame(200, k)]))
    rig.vqs[1].kick()
    assert rig.wire.sent == []
    assert len(rig.vqs[1].take_used()) == 3
    assert rig.net.stats[1].packets == 3  # counted as sent: only end-to-end checks catch it
    faults.clear("drop-tx")
    rig.vqs[1].add(rig.tx_buffers([hdr() + frame(200, 7)]))
    rig.vqs[1].kick()
    assert rig.wire.sent == [(frame(200, 7), 0)]


def test_tx_chain_shorter_than_header_needs_reset() -> None:
    rig = make_rig()
    rig.vqs[1].add(rig.tx_buffers([b"\0" * 8]))
    rig.vqs[1].kick()
    assert rig.dev.get_status() & Status.NEEDS_RESET
    assert journal_error(rig, "net-tx-header")
    assert rig.wire.sent == []


def test_tx_chain_longer_than_a_frame_needs_reset_without_copying() -> None:
    """Found by the descriptor fuzzer: a readable descriptor of 0x7fffffff bytes inside guest
    RAM made the backend copy it all (seconds, gigabytes). Refused before any copy now."""
    rig = make_rig()
    gpa = rig.alloc(16)
    rig.vqs[1].add([(gpa, HDR, False), (GPA, SIZE, False)])
    rig.vqs[1].kick()
    assert rig.dev.get_status() & Status.NEEDS_RESET
    assert journal_error(rig, "net-tx-length")
    assert rig.wire.sent == []


# -- RX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [14, 1514, 9014])
def test_rx_without_mrg_rxbuf(n: int) -> None:
    rig = make_rig()
    ((head, bufs),) = rig.post_rx(0, [HDR + 9100])
    f = frame(n, seed=3)
    rig.wire.deliver(f)
    assert rig.vqs[0].take_used() == [(head, HDR + n)]
    data = rig.read_chain(bufs, HDR + n)
    assert VirtioNetHdr.unpack(data[:HDR]).num_buffers == 1
    assert data[HDR:] == f
    assert rig.calls == [0]


def test_rx_header_and_frame_in_separate_descriptors() -> None:
    rig = make_rig()
    ((head, bufs),) = rig.post_rx(0, [HDR, 1000, 1000])
    f = frame(1514)
    rig.net.inject(f)
    assert rig.vqs[0].take_used() == [(head, HDR + 1514)]
    assert rig.read_chain(bufs, HDR + 1514) == hdr(1) + f


def test_rx_without_mrg_too_big_is_dropped_and_buffer_kept() -> None:
    rig = make_rig()
    ((head, bufs),) = rig.post_rx(0, [HDR + 1514])
    rig.net.inject(frame(3000))  # does not fit one buffer: dropped, never truncated
    assert rig.vqs[0].take_used() == []
    assert rig.net.stats[0].drops == 1 and rig.net.backlog() == 0
    small = frame(100, seed=5)
    rig.net.inject(small)  # the same buffer serves the next frame
    assert rig.vqs[0].take_used() == [(head, HDR + 100)]
    assert rig.read_chain(bufs, HDR + 100) == hdr(1) + small


def test_rx_mergeable_frame_spans_three_buffers() -> None:
    rig = make_rig(features=BASE_FEATURES | MRG)
    posted = rig.post_rx(0, [1100], count=4)
    f = frame(3000, seed=11)
    rig.net.inject(f)
    used = rig.vqs[0].take_used()
    assert used == [(posted[0][0], 1100), (posted[1][0], 1100), (posted[2][0], 812)]
    got = b"".join(rig.read_chain(posted[k][1], ln) for k, (_, ln) in enumerate(used))
    assert VirtioNetHdr.unpack(got[:HDR]).num_buffers == 3
    assert got[HDR:] == f
    assert rig.calls == [0]  # one interrupt for the three used elements


def test_rx_mergeable_waits_for_enough_buffers() -> None:
    rig = make_rig(features=BASE_FEATURES | MRG | mask(VIRTIO_F_EVENT_IDX))
    first = rig.post_rx(0, [1000], count=2)
    f = frame(9014, seed=2)
    rig.net.inject(f)
    assert rig.vqs[0].take_used() == [] and rig.net.backlog() == 1
    assert rig.dev.vqs[0].state.last_avail_idx == 0  # both chains given back
    rewinds = rig.dev.journal.count("vq.rewind")
    rig.net.inject(frame(9014, seed=3))  # same too-few buffers: not popped again
    assert rig.dev.journal.count("vq.rewind") == rewinds and rig.net.backlog() == 2
    more = rig.post_rx(0, [1000], count=8)
    rig.vqs[0].kick()
    used = rig.vqs[0].take_used()
    assert len(used) == 10 and rig.net.backlog() == 1
    bufs = {h: b for h, b in first + more}
    got = b"".join(rig.read_chain(bufs[h], ln) for h, ln in used)
    assert VirtioNetHdr.unpack(got[:HDR]).num_buffers == 10
    assert got[HDR:] == f


def test_rx_mergeable_frame_larger_than_the_ring_is_dropped() -> None:
    rig = make_rig(features=BASE_FEATURES | MRG)
    posted = dict(rig.post_rx(0, [16], count=NUM))  # 4 KiB in all
    rig.net.inject(frame(9014))
    assert rig.net.stats[0].drops == 1 and rig.net.backlog() == 0
    assert rig.vqs[0].take_used() == []
    rig.net.inject(frame(14, seed=8))
    used = rig.vqs[0].take_used()
    assert [ln for _, ln in used] == [16, 10]
    got = b"".join(rig.read_chain(posted[h], ln) for h, ln in used)
    assert got == hdr(2) + frame(14, seed=8)


def test_legacy_header_is_10_bytes_without_version_1() -> None:
    rig = make_rig(features=mask(VIRTIO_F_INDIRECT_DESC))
    f = frame(300, seed=4)
    rig.vqs[1].add(rig.tx_buffers([b"\0" * 10 + f]))
    rig.vqs[1].kick()
    assert rig.wire.sent == [(f, 0)]
    ((head, bufs),) = rig.post_rx(0, [1600])
    rig.net.inject(f)
    assert rig.vqs[0].take_used() == [(head, 10 + len(f))]
    assert rig.read_chain(bufs, 10 + len(f)) == b"\0" * 10 + f


def test_rx_backlog_is_bounded_and_drains_in_order() -> None:
    rig = make_rig(backlog=8)
    frames = [frame(64, seed=k) for k in range(12)]
    for f in frames:
        rig.wire.deliver(f)
    assert rig.net.backlog() == 8 and rig.net.stats[0].drops == 4
    posted = rig.post_rx(0, [HDR + 1514], count=10)
    rig.vqs[0].kick()
    used = rig.vqs[0].take_used()
    assert len(used) == 8 and rig.net.backlog() == 0
    bufs = dict(posted)
    assert [rig.read_chain(bufs[h], ln)[HDR:] for h, ln in used] == frames[:8]
    assert rig.net.stats[0].packets == 8


def test_rx_malformed_buffer_needs_reset() -> None:
    rig = make_rig(features=BASE_FEATURES | MRG)
    rig.post_rx(0, [4])  # cannot hold the header
    rig.net.inject(frame(60))
    assert rig.dev.get_status() & Status.NEEDS_RESET
    assert journal_error(rig, "net-rx-buffer")
    assert rig.dev.vqs[0].inflight == 0


def test_rx_writes_are_dirty_logged() -> None:
    rig = make_rig()
    log = DirtyLog(bytearray(64))
    rig.dev.set_dirty_log(log)
    ((_, bufs),) = rig.post_rx(0, [HDR + 9014])
    rig.net.inject(frame(9014))
    gpa = bufs[0][0]
    for page_gpa in range(gpa & ~0xFFF, gpa + HDR + 9014, 4096):
        assert log.is_dirty(page_gpa)
    assert log.is_dirty(rig.vqs[0].used)


def test_rx_while_suspended_is_delivered_on_resume() -> None:
    rig = make_rig()
    rig.post_rx(0, [HDR + 1514], count=2)
    rig.dev.suspend()
    rig.net.inject(frame(60))
    assert rig.vqs[0].take_used() == [] and rig.net.backlog() == 1
    rig.dev.resume()
    assert len(rig.vqs[0].take_used()) == 1


def test_reset_drops_backlog() -> None:
    rig = make_rig()
    rig.net.inject(frame(60))
    rig.dev.reset()
    assert rig.net.backlog() == 0 and rig.net.stats[0].drops == 1


def test_inject_validates() -> None:
    rig = make_rig()
    with pytest.raises(ValueError, match="queue pair"):
        rig.net.inject(frame(60), qp=1)
    with pytest.raises(ValueError, match="empty"):
        rig.net.inject(b"")


# -- loopback / multiqueue ---------------------------------------------------------------------


@pytest.mark.parametrize("features", [BASE_FEATURES, BASE_FEATURES | MRG])
def test_loopback_end_to_end_jumbo(loop: EventLoop, features: int) -> None:
    wire = LoopbackWire()
    rig = make_rig(features=features, wire=wire, loop=loop)
    sizes = [HDR + 9100] if not features & MRG else [1500] * 8
    posted = dict(rig.post_rx(0, sizes, count=4))
    frames = [frame(9014, seed=1), frame(60, seed=2)]
    for f in frames:
        rig.vqs[1].add(rig.tx_buffers([hdr(), f[:7000], f[7000:]]))
    rig.vqs[1].kick()
    got: list[tuple[int, int]] = []

    loop.run_until(lambda: rig.net.stats[0].packets == 2, 2.0, "both frames looped back to RX")
    got = rig.vqs[0].take_used()
    out = []
    i = 0
    while i < len(got):
        first = rig.read_chain(posted[got[i][0]], got[i][1])
        nb = VirtioNetHdr.unpack(first[:HDR]).num_buffers
        data = first + b"".join(rig.read_chain(posted[h], ln) for h, ln in got[i + 1 : i + nb])
        out.append(data[HDR:])
        i += nb
    assert out == frames
    assert wire.counters()["tx_frames"] == 2 and wire.counters()["rx_frames"] == 2
    assert rig.net.totals()["rx"]["packets"] == 2 and rig.net.totals()["tx"]["packets"] == 2


def test_multiqueue_routing() -> None:
    rig = make_rig(queue_pairs=3)
    cap = rig.wire
    rig.vqs[5].add(rig.tx_buffers([hdr() + frame(80, 1)]))
    rig.vqs[5].kick()
    rig.vqs[3].add(rig.tx_buffers([hdr() + frame(80, 2)]))
    rig.vqs[3].kick()
    assert cap.sent == [(frame(80, 1), 2), (frame(80, 2), 1)]

    for qp in range(3):
        rig.post_rx(qp, [HDR + 1514], count=2)
    cap.deliver(frame(70, 1), 1)
    assert len(rig.vqs[2].take_used()) == 1
    cap.deliver(frame(70, 9), 9)  # no such pair -> pair 0
    assert len(rig.vqs[0].take_used()) == 1
    rig.dev.set_vq_ready(4, False)  # pair 2 disabled (fewer pairs in use) -> pair 0
    cap.deliver(frame(70, 2), 2)
    assert len(rig.vqs[0].take_used()) == 1 and rig.vqs[4].take_used() == []
    c = rig.net.counters()
    assert [q["packets"] for q in c["queues"]] == [2, 0, 1, 1, 0, 1]


# -- vIOMMU misses -----------------------------------------------------------------------------


def test_tx_miss_parks_and_retries_after_update() -> None:
    rig = make_rig(iommu=True)
    f = frame(1514, seed=4)
    bufs = rig.tx_buffers([hdr() + f])
    rig.vqs[1].add(bufs)
    rig.vqs[1].kick()
    assert rig.wire.sent == []
    misses = rig.dev.journal.query(["iotlb.miss"])
    assert misses and misses[-1]["iova"] == rig.iova(bufs[0][0])
    assert 1 in rig.dev.parked and rig.dev.vqs[1].inflight == 0
    gpa, ln, _ = bufs[0]
    rig.dev.dma_map(rig.iova(gpa), ln, UADDR + gpa - GPA, Perm.RO)
    assert rig.wire.sent == [(f, 0)]
    assert len(rig.vqs[1].take_used()) == 1


def test_tx_miss_leaves_driver_kicks_enabled() -> None:
    """A parked TX queue must hear the driver's next kick: QEMU may refuse the MISS (no
    UPDATE ever comes), and the driver then fixes its mapping and kicks again."""
    for features in (BASE_FEATURES, BASE_FEATURES | mask(VIRTIO_F_EVENT_IDX)):
        rig = make_rig(iommu=True, features=features)
        rig.vqs[1].add(rig.tx_buffers([hdr() + frame(100, seed=1)]))
        rig.vqs[1].kick()
        assert 1 in rig.dev.parked
        drv = rig.vqs[1]
        if features >> VIRTIO_F_EVENT_IDX & 1:
            avail_event = int.from_bytes(rig.read(drv.used + 4 + 8 * drv.num, 2), "little")
            assert avail_event == rig.dev.vqs[1].state.last_avail_idx
        else:
            used_flags = int.from_bytes(rig.read(drv.used, 2), "little")
            assert not used_flags & 1  # VRING_USED_F_NO_NOTIFY


def test_rx_miss_keeps_frame_in_backlog() -> None:
    rig = make_rig(iommu=True, features=BASE_FEATURES | MRG)
    posted = rig.post_rx(0, [1000], count=3)
    # map only the first buffer: the second chain misses mid-frame
    gpa = posted[0][1][0][0]
    rig.dev.dma_map(rig.iova(gpa), 1000, UADDR + gpa - GPA, Perm.WO)
    f = frame(1800, seed=6)
    rig.net.inject(f)
    assert rig.net.backlog() == 1 and rig.vqs[0].take_used() == []
    assert rig.dev.vqs[0].inflight == 0 and rig.dev.vqs[0].state.last_avail_idx == 0
    assert 0 in rig.dev.parked
    for _, bufs in posted[1:]:
        g = bufs[0][0]
        rig.dev.dma_map(rig.iova(g), 1000, UADDR + g - GPA, Perm.WO)
    used = rig.vqs[0].take_used()
    assert [ln for _, ln in used] == [1000, 812]
    by_head = dict(posted)
    got = b"".join(rig.read_chain(by_head[h], ln) for h, ln in used)
    assert got == hdr(2) + f and rig.net.backlog() == 0


# -- TX hold (chains popped but unfinished: what GET_VRING_BASE must drain or rewind) ----------


def _held_rig(faults: Faults | None = None) -> tuple[Rig, list[bytes]]:
    """Two frames sent, then the hold on and three more popped but not completed."""
    rig = make_rig(faults=faults)
    frames = [frame(100 + k, seed=k) for k in range(5)]
    q = rig.vqs[1]
    for f in frames[:2]:
        q.add(rig.tx_buffers([hdr() + f]))
    q.kick()
    assert rig.net.hold_tx(True) == 0
    for f in frames[2:]:
        q.add(rig.tx_buffers([hdr() + f]))
    q.kick()
    assert [d for d, _ in rig.wire.sent] == frames[:2]
    assert rig.net.tx_held == 3 and rig.dev.vqs[1].inflight == 3
    assert len(q.take_used()) == 2  # the held chains are not used
    return rig, frames


def test_tx_hold_release_sends_held_frames_in_order_once() -> None:
    rig, frames = _held_rig()
    assert rig.net.hold_tx(False) == 3
    assert [d for d, _ in rig.wire.sent] == frames
    assert len(rig.vqs[1].take_used()) == 3 and rig.net.tx_held == 0
    assert rig.net.stats[1].packets == 5


def test_tx_hold_stop_rewinds_held_chains_for_the_next_owner() -> None:
    """GET_VRING_BASE with held chains: last_avail_idx excludes them, the frames are not sent
    here, and a ring restarted at that base (the migration destination) sends them once."""
    rig, frames = _held_rig()
    st = rig.dev.stop_vq(1)
    assert (st.last_avail_idx, st.used_idx) == (2, 2)
    assert rig.net.tx_held == 0 and rig.dev.vqs[1].inflight == 0
    rig.net.hold_tx(False)
    assert [d for d, _ in rig.wire.sent] == frames[:2]
    rig.dev.set_vq_state(1, st)
    rig.dev.start_vq(1)
    assert [d for d, _ in rig.wire.sent] == frames
    assert len(rig.vqs[1].take_used()) == 3


def test_no_drain_before_base_fault_counts_held_chains() -> None:
    rig, frames = _held_rig(Faults(["no-drain-before-base"]))
    st = rig.dev.stop_vq(1)
    assert st.last_avail_idx == 5 and st.used_idx == 2  # the 3 held chains are lost
    rig.dev.set_vq_state(1, st)
    rig.dev.start_vq(1)
    rig.net.hold_tx(False)
    assert [d for d, _ in rig.wire.sent] == frames[:2]


def test_tx_hold_dropped_on_reset() -> None:
    rig, _ = _held_rig()
    rig.dev.reset()
    assert rig.net.tx_held == 0
    rig.net.hold_tx(False)
    assert len(rig.wire.sent) == 2


# -- RX hold (buffers taken, not filled: what GET_VRING_BASE must give back) -------------------


def test_rx_hold_takes_buffers_and_stop_gives_them_back() -> None:
    rig = make_rig()
    posted = rig.post_rx(0, [HDR + 2000], count=4)
    assert rig.net.hold_rx(3) == 3 and rig.dev.vqs[0].inflight == 3
    f = frame(200, seed=9)
    rig.wire.deliver(f)  # waits in the backlog while the hold lasts
    assert rig.vqs[0].take_used() == [] and rig.net.backlog() == 1
    st = rig.dev.stop_vq(0)
    assert st.last_avail_idx == 0 and rig.net.rx_held == 0  # rewound: nothing was used
    rig.dev.set_vq_state(0, st)
    rig.net.hold_rx(0)
    rig.dev.start_vq(0)
    assert rig.vqs[0].take_used() == [(posted[0][0], HDR + 200)], "the first taken buffer"


def test_rx_hold_release_fills_in_order() -> None:
    rig = make_rig()
    posted = rig.post_rx(0, [HDR + 2000], count=2)
    rig.net.hold_rx(2)
    f = frame(300, seed=4)
    rig.wire.deliver(f)
    assert rig.net.hold_rx(0) == 0
    assert rig.vqs[0].take_used() == [(posted[0][0], HDR + 300)]
