"""Packed virtqueue device side: availability / wrap counters, chains, indirect tables,
validation, used descriptors, event suppression, rewind, the vhost-user base encoding and the
device's layout dispatch on VIRTIO_F_RING_PACKED."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from backends.tests.conftest import EchoPersonality, Space, make_space
from backends.vdpa.device import VdpaDevice
from backends.vdpa.iotlb import Perm
from backends.vdpa.packed_virtqueue import PackedVirtqueue
from backends.vdpa.split_virtqueue import SplitVirtqueue
from backends.vdpa.virtqueue import VqError, VqState
from backends.virtio.features import VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, bit
from backends.virtio.ring import (
    EVENT_FLAGS_DESC,
    EVENT_FLAGS_DISABLE,
    EVENT_FLAGS_ENABLE,
    PACKED_DESC,
)
from qtests.qos.backend_thread import BackendThread
from qtests.qos.guest_memory import SharedGuestMemory
from qtests.qos.vhost_user_frontend import VhostUserRing

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL, USED = 1 << 7, 1 << 15
EVENT = struct.Struct("<HH")
RING_GPA = 0x1000


class PackedDriver:
    """Driver side of a packed ring in ``sp.region`` (GPA == IOVA)."""

    def __init__(self, sp: Space, num: int) -> None:
        self.sp = sp
        self.r = sp.region
        self.num = num
        self.desc = RING_GPA
        self.driver = RING_GPA + 16 * num
        self.device = self.driver + 4
        self.heap = 0x40000
        self.pos = 0  # next slot the driver fills
        self.wrap = True
        self.used_pos = 0
        self.used_wrap = True
        self.free_ids = list(range(num))
        self.slots: dict[int, int] = {}  # id -> slots

    def alloc(self, n: int) -> int:
        g = (self.heap + 15) & ~15
        self.heap = g + max(n, 1)
        return g

    def flags(self, f: int, wrap: bool) -> int:
        return f | ((AVAIL if wrap else 0) | (0 if wrap else USED))

    def write_desc(self, slot: int, addr: int, n: int, buf_id: int, flags: int) -> None:
        self.r.pack_gpa(PACKED_DESC, self.desc + 16 * slot, addr, n, buf_id, flags)

    def add(
        self, out=(), inp=(), *, indirect: bool = False, buf_id: int | None = None
    ) -> tuple[int, list[int]]:
        bufs: list[tuple[int, int, int]] = []
        gpas = []
        for data in out:
            g = self.alloc(len(data))
            self.r.write_gpa(g, data)
            bufs.append((g, len(data), 0))
        for n in inp:
            g = self.alloc(n)
            gpas.append(g)
            bufs.append((g, n, WRITE))
        bid = self.free_ids.pop(0) if buf_id is None else buf_id
        if indirect:
            table = self.alloc(16 * len(bufs))
            for k, (g, n, f) in enumerate(bufs):
                self.r.pack_gpa(PACKED_DESC, table + 16 * k, g, n, 0, f)
            descs = [(table, 16 * len(bufs), INDIRECT)]
        else:
            descs = [
                (g, n, f | (NEXT if k + 1 < len(bufs) else 0)) for k, (g, n, f) in enumerate(bufs)
            ]
        head_slot, head_wrap = self.pos, self.wrap
        pos, wrap = self.pos, self.wrap
        for k, (g, n, f) in enumerate(descs):
            if k:  # the head's flags are written last
                self.write_desc(pos, g, n, bid, self.flags(f, wrap))
            pos += 1
            if pos == self.num:
                pos, wrap = 0, not wrap
        g, n, f = descs[0]
        self.write_desc(head_slot, g, n, bid, self.flags(f, head_wrap))
        self.pos, self.wrap = pos, wrap
        self.slots[bid] = len(descs)
        return bid, gpas

    def used(self) -> list[tuple[int, int, int]]:
        """Used descriptors (id, len, flags) written since the last call."""
        out: list[tuple[int, int, int]] = []
        while True:
            _, n, bid, f = PACKED_DESC.unpack(self.r.read_gpa(self.desc + 16 * self.used_pos, 16))
            if bool(f & AVAIL) != self.used_wrap or bool(f & USED) != self.used_wrap:
                return out
            out.append((bid, n, f))
            self.used_pos += self.slots.pop(bid)
            self.free_ids.append(bid)
            if self.used_pos >= self.num:
                self.used_pos -= self.num
                self.used_wrap = not self.used_wrap

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.r.pack_gpa(EVENT, self.driver, off_wrap, flags)

    def device_event(self) -> tuple[int, int]:
        return EVENT.unpack(self.r.read_gpa(self.device, 4))


def setup(num: int = 8, event_idx: bool = False):
    sp = make_space()
    drv = PackedDriver(sp, num)
    vq = PackedVirtqueue(0, sp.dma, sp.journal)
    vq.set_num(num)
    vq.set_address(drv.desc, drv.driver, drv.device)
    vq.event_idx = event_idx
    vq.ready = vq.started = True
    return sp, drv, vq


def test_pop_push_flush_roundtrip_and_flags() -> None:
    sp, drv, vq = setup()
    assert vq.pop() is None
    bid, ins = drv.add([b"hdr", b"payload"], [32])
    chain = vq.pop()
    assert chain is not None and chain.head == bid
    assert (chain.out_len, chain.in_len, chain.ndesc) == (10, 32, 3)
    assert sp.dma.read_pieces(chain.out) == b"hdrpayload"
    assert [p.gpa for p in chain.inp] == ins
    assert vq.state.last_avail_idx == 3 and vq.inflight == 1
    assert vq.pop() is None
    vq.push(chain, 7)
    assert drv.used() == []  # not yet published
    assert vq.flush() is True
    assert drv.used() == [(bid, 7, AVAIL | USED | WRITE)]
    assert vq.state.used_idx == 3 and vq.inflight == 0


def test_ring_wraps_many_times_with_multi_slot_chains() -> None:
    sp, drv, vq = setup(num=8)
    seen = 0
    for i in range(50):
        out = [bytes([i]) * 5] + ([b"x"] if i % 3 == 0 else [])
        bid, _ = drv.add(out, [4] if i % 2 else [])
        chain = vq.pop()
        assert chain is not None and chain.head == bid
        assert sp.dma.read_pieces(chain.out)[:5] == bytes([i]) * 5
        vq.push(chain, 0)
        vq.flush()
        got = drv.used()
        assert [g[0] for g in got] == [bid]
        seen += 1
    assert seen == 50
    assert (vq.state.last_avail_idx, vq.state.avail_wrap) == (drv.pos, drv.wrap)
    assert (vq.state.used_idx, vq.state.used_wrap) == (drv.used_pos, drv.used_wrap)
    assert vq.popped_total == 50


def test_chain_spanning_the_ring_end() -> None:
    sp, drv, vq = setup(num=4)
    for _ in range(3):
        drv.add([b"a"])
        c = vq.pop()
        assert c is not None
        vq.push(c, 0)
    vq.flush()
    drv.used()
    bid, _ = drv.add([b"one", b"two", b"three"])  # slots 3, 0, 1
    chain = vq.pop()
    assert chain is not None and sp.dma.read_pieces(chain.out) == b"onetwothree"
    assert (vq.state.last_avail_idx, vq.state.avail_wrap) == (2, False)
    vq.push(chain, 0)
    vq.flush()
    assert [u[0] for u in drv.used()] == [bid]
    assert (vq.state.used_idx, vq.state.used_wrap) == (2, False)


def test_single_descriptor_chains_match_the_general_walk() -> None:
    """The walker's one-descriptor shortcut answers like the general walk: buffer id, lengths,
    one slot, one buffer; a zero-length descriptor goes the general way."""
    sp, drv, vq = setup(num=4)
    out_id, _ = drv.add([b"payload"])
    in_id, _ = drv.add((), [64])
    empty_id, _ = drv.add([b""])
    out, inp, empty = vq.pop(), vq.pop(), vq.pop()
    assert out is not None and inp is not None and empty is not None
    assert (out.head, out.out_len, out.in_len, out.ndesc, out.slots, out.inp) == (
        out_id,
        7,
        0,
        1,
        1,
        [],
    )
    assert sp.dma.read_pieces(out.out) == b"payload"
    assert (inp.head, inp.out_len, inp.in_len, inp.ndesc, inp.slots, inp.out) == (
        in_id,
        0,
        64,
        1,
        1,
        [],
    )
    assert (empty.head, empty.out_len, empty.out, empty.inp, empty.slots) == (
        empty_id,
        0,
        [],
        [],
        1,
    )
    assert (vq.state.last_avail_idx, vq.state.avail_wrap) == (3, True)


def test_indirect_table() -> None:
    sp, drv, vq = setup()
    bid, ins = drv.add([b"hdr", b"data"], [16], indirect=True)
    chain = vq.pop()
    assert chain is not None and chain.head == bid
    assert sp.dma.read_pieces(chain.out) == b"hdrdata" and chain.in_len == 16
    assert vq.state.last_avail_idx == 1  # one ring slot


def test_batch_and_out_of_order_completion() -> None:
    sp, drv, vq = setup()
    ids = [drv.add([b"p%d" % k])[0] for k in range(4)]
    chains = vq.pop_batch(10)
    assert [c.head for c in chains] == ids
    for c in reversed(chains):
        vq.push(c, 0)
    vq.flush()
    assert [u[0] for u in drv.used()] == list(reversed(ids))


@pytest.mark.parametrize(
    ("kind", "build"),
    [
        ("head-range", lambda d: d.add([b"x"], buf_id=100)),
        ("order", lambda d: _raw_chain(d, [(0x50000, 4, WRITE | NEXT), (0x50010, 4, 0)])),
        ("indirect-next", lambda d: _raw_chain(d, [(0x50000, 16, INDIRECT | NEXT), (0, 4, 0)])),
        ("indirect-len", lambda d: _raw_chain(d, [(0x50000, 15, INDIRECT)])),
        ("loop", lambda d: _raw_chain(d, [(0x50000, 4, NEXT)] * 8)),
        ("ring-translate", None),
        ("translate", lambda d: _raw_chain(d, [(0xF000_0000, 4, 0)])),
    ],
)
def test_malformed_chains_raise_vq_error_without_state_change(kind, build) -> None:
    sp, drv, vq = setup()
    if build is None:
        vq.set_address(0xF000_0000, drv.driver, drv.device)
    else:
        build(drv)
    before = vq.get_state()
    with pytest.raises(VqError) as ei:
        vq.pop()
    assert ei.value.kind == kind
    assert vq.get_state() == before and vq.inflight == 0


def test_buffer_id_in_flight_twice_is_an_error() -> None:
    sp, drv, vq = setup()
    drv.add([b"a"], buf_id=3)
    assert vq.pop() is not None
    drv.add([b"b"], buf_id=3)
    with pytest.raises(VqError) as ei:
        vq.pop()
    assert ei.value.kind == "head-inflight"


def _raw_chain(d: PackedDriver, descs: list[tuple[int, int, int]]) -> None:
    for k, (g, n, f) in enumerate(descs):
        d.write_desc((d.pos + k) % d.num, g, n, 0, d.flags(f, d.wrap))


def test_interrupt_suppression_flags_and_event_idx() -> None:
    sp, drv, vq = setup(num=8, event_idx=True)

    def one() -> bool:
        drv.add([b"z"])
        c = vq.pop()
        assert c is not None
        vq.push(c, 0)
        r = vq.flush()
        drv.used()
        return r

    drv.set_driver_event(0, EVENT_FLAGS_ENABLE)
    assert one() is True
    drv.set_driver_event(0, EVENT_FLAGS_DISABLE)
    assert one() is False
    # DESC: interrupt when the used descriptor at slot 4 (wrap 1) is written
    drv.set_driver_event(4 | 0x8000, EVENT_FLAGS_DESC)
    assert [one(), one(), one()] == [False, False, True]  # slots 2, 3, 4
    drv.set_driver_event(1, EVENT_FLAGS_DESC)  # slot 1 of the next lap (wrap 0)
    assert [one() for _ in range(5)] == [False, False, False, False, True]  # 5,6,7,0,1


def test_kick_suppression_and_enable_check() -> None:
    sp, drv, vq = setup()
    vq.set_notification(False)
    assert drv.device_event()[1] == EVENT_FLAGS_DISABLE
    assert vq.enable_notification_and_check() is False
    assert drv.device_event()[1] == EVENT_FLAGS_ENABLE
    drv.add([b"q"])
    assert vq.enable_notification_and_check() is True
    assert vq.avail_pending() == 1 and vq.avail_idx() != vq.state.last_avail_idx


def test_rewind_restores_position_and_wrap() -> None:
    sp, drv, vq = setup(num=4)
    for _ in range(3):
        drv.add([b"a"])
        c = vq.pop()
        assert c is not None
        vq.push(c, 0)
    vq.flush()
    drv.used()
    drv.add([b"b", b"c"])  # slots 3, 0
    drv.add([b"d"])  # slot 1
    assert len(vq.pop_batch(4)) == 2
    assert (vq.state.last_avail_idx, vq.state.avail_wrap) == (2, False)
    assert vq.rewind() == 2
    assert (vq.state.last_avail_idx, vq.state.avail_wrap) == (3, True)
    again = vq.pop_batch(4)
    assert [sp.dma.read_pieces(c.out) for c in again] == [b"bc", b"d"]


def test_vring_base_encoding_matches_qemu() -> None:
    pb = VqState(5, 3, True, False, packed=True)
    assert pb.to_vhost_base() == 5 | 0x8000 | 3 << 16
    assert VqState.from_vhost_base(0x80008000, packed=True) == VqState(0, 0, True, True)
    assert VqState.from_vhost_base(pb.to_vhost_base(), packed=True) == pb


def test_vq_state_views_split_packed_and_vduse() -> None:
    """One state object: the split view (avail_index), the packed view (the field names of
    struct vduse_vq_state_packed), and the layout's own vhost base encoding."""
    split = VqState.split(70)
    assert (split.avail_index, split.used_idx, split.packed) == (70, 70, False)
    assert split.to_vhost_base() == 70
    assert VqState.from_vhost_base(70, packed=False) == split
    with pytest.raises(ValueError):
        VqState.from_vhost_base(0x10000, packed=False)
    p = VqState.packed_state(
        last_avail_counter=0, last_avail_idx=5, last_used_counter=1, last_used_idx=3
    )
    assert p == VqState(5, 3, False, True) and p.packed
    assert (p.last_avail_counter, p.last_avail_idx, p.last_used_counter, p.last_used_idx) == (
        0,
        5,
        1,
        3,
    )
    assert p.to_vhost_base() == 5 | 3 << 16 | 1 << 31
    sp, drv, vq = setup(num=8)
    with pytest.raises(ValueError):
        vq.state_from_base(VqState(8, 0, True, True, packed=True).to_vhost_base())
    vq.set_state(vq.state_from_base(p.to_vhost_base()))
    assert vq.get_state() == p and vq.get_state().packed


def test_set_state_then_continue() -> None:
    sp, drv, vq = setup(num=4)
    drv.pos, drv.wrap, drv.used_pos, drv.used_wrap = 2, False, 2, False
    vq.set_state(VqState(2, 2, False, False))
    bid, _ = drv.add([b"x", b"y", b"z"])  # slots 2, 3, 0 (wrap flips back to 1)
    c = vq.pop()
    assert c is not None and c.head == bid
    vq.push(c, 0)
    vq.flush()
    assert [u[0] for u in drv.used()] == [bid]
    assert vq.get_state() == VqState(1, 1, True, True)


def test_device_dispatches_on_ring_packed() -> None:
    sp = make_space()
    pers = EchoPersonality(features=bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_PACKED))
    dev = VdpaDevice(pers, journal=sp.journal)
    dev.host.add(sp.region)
    dev.iotlb.dma_map(0, sp.region.size, sp.region.uaddr, Perm.RW)
    assert dev.get_device_features() & bit(VIRTIO_F_RING_PACKED)  # offered
    assert all(type(vq) is SplitVirtqueue for vq in dev.vqs)
    dev.set_driver_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_PACKED))
    assert all(type(vq) is PackedVirtqueue for vq in dev.vqs)
    drv = PackedDriver(sp, 8)
    dev.set_vq_num(0, 8)
    dev.set_vq_address(0, drv.desc, drv.driver, drv.device)
    dev.set_vq_state(0, VqState(0, 0, True, True))
    dev.set_vq_ready(0, True)
    dev.set_status(1 | 2 | 8 | 4)
    bid, ins = drv.add([b"ping"], [8])
    dev.kick_vq(0)
    assert drv.used() == [(bid, 8, AVAIL | USED | WRITE)]
    assert sp.region.read_gpa(ins[0], 8) == b"pingping"
    st = dev.stop_vq(0)
    assert (st.last_avail_idx, st.used_idx, st.avail_wrap, st.used_wrap) == (2, 2, True, True)
    # a malformed chain sets NEEDS_RESET
    dev.start_vq(0)
    drv.add([b"x"], buf_id=99)
    dev.kick_vq(0)
    assert dev.status & 0x40
    dev.set_status(0)
    dev.set_driver_features(bit(VIRTIO_F_VERSION_1))
    assert all(type(vq) is SplitVirtqueue for vq in dev.vqs)


def test_vhost_user_packed_vring_base_round_trip(tmp_path: Path) -> None:
    """SET_VRING_BASE with QEMU's packed encoding reaches the ring (positions + wrap
    counters) and GET_VRING_BASE returns it encoded the same way; a position outside the
    ring is refused."""
    b = BackendThread(str(tmp_path / "vu.sock"), wire="loopback")
    b.call(b.backend.start)
    mem = SharedGuestMemory(4 << 20)
    fe = b.frontend()
    ring = VhostUserRing(mem, 1, 64)  # only its memory: desc (16 x 64) + two areas >= 4 bytes
    try:
        fe.init_like_qemu(2)
        offered = fe.get_features()
        assert offered >> VIRTIO_F_RING_PACKED & 1
        no = (1 << 26) | (1 << 33)  # LOG_ALL, ACCESS_PLATFORM
        fe.set_features(offered & ~no)
        fe.set_memory_like_qemu(mem)
        fe.set_vring_num(1, 64)
        base = VqState(5, 3, False, True, packed=True).to_vhost_base()
        fe.set_vring_base(1, base)
        fe.set_vring_addr(ring.vring_addr())
        vq = b.backend.device.vqs[1]
        assert b.call(lambda: type(vq).__name__) == "PackedVirtqueue"
        assert b.call(vq.get_state) == VqState(5, 3, False, True)
        assert fe.get_vring_base(1) == base
        mark = b.mark()
        fe.set_vring_base(1, VqState(64, 0, True, True, packed=True).to_vhost_base())
        fe.get_features()  # a round trip: the bad base has been handled
        assert b.query(["error.protocol"], mark)
        assert b.call(vq.get_state) == VqState(5, 3, False, True)
    finally:
        ring.close()
        fe.close_init_fds()
        fe.close()
        mem.close()
        b.close()
