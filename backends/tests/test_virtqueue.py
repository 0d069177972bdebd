"""Split virtqueue device side: chain validation (explicit kinds + a hypothesis reference
walker), wrap-around, EVENT_IDX, notifications, rewind, misses, dirty logging, ring cache."""

from __future__ import annotations

from typing import Protocol

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from backends.tests.conftest import UADDR_BASE, DriverRing, Space, make_space
from backends.vdpa.dirty_log import DirtyLog
from backends.vdpa.iotlb import Perm
from backends.vdpa.memory import Access, HostRegion, TranslationError
from backends.vdpa.split_virtqueue import SplitVirtqueue
from backends.vdpa.virtqueue import VqError, VqState
from backends.virtio.ring import SPLIT_DESC as DESC
from backends.virtio.ring import (
    U16,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    vring_need_event,
)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
RING_GPA = 0x1000


def setup(num: int = 8, event_idx: bool = False, sp: Space | None = None, iova_offset: int = 0):
    sp = sp or make_space()
    ring = DriverRing(sp.region, num, RING_GPA, iova_offset)
    vq = SplitVirtqueue(0, sp.dma, sp.journal)
    vq.set_num(num)
    vq.set_address(ring.desc_iova, ring.avail_iova, ring.used_iova)
    vq.event_idx = event_idx
    vq.ready = vq.started = True
    return sp, ring, vq


def state_of(vq: SplitVirtqueue) -> tuple[int, int, int, int]:
    return (vq.state.last_avail_idx, vq.state.used_idx, vq.inflight, vq.used_pending)


def test_pop_direct_chain_translates_with_the_right_access() -> None:
    sp, ring, vq = setup()
    assert vq.pop() is None
    head, ins = ring.add_chain([b"hdr", b"payload"], [32, 64])
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert (chain.out_len, chain.in_len, chain.ndesc) == (10, 96, 4)
    assert sp.dma.read_pieces(chain.out) == b"hdrpayload"
    assert [p.gpa for p in chain.inp] == ins
    assert vq.inflight == 1 and vq.state.last_avail_idx == 1
    assert vq.pop() is None
    # the out buffers were translated for READ, the in buffers for WRITE
    sp.iotlb.dma_unmap(0, 1 << 20)
    sp.iotlb.dma_map(0, 0x10000, sp.region.uaddr, Perm.RW)
    sp.iotlb.dma_map(0x10000, 0xF0000, sp.region.uaddr + 0x10000, Perm.RO)
    ring.add_chain([b"x"], [8])
    with pytest.raises(VqError) as ei:
        vq.pop()
    assert ei.value.kind == "translate" and "perm" in ei.value.detail


def test_pop_indirect_chain() -> None:
    sp, ring, vq = setup()
    head, ins = ring.add_chain([b"abc", b"de"], [16, 16, 16], indirect=True)
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert (chain.out_len, chain.in_len) == (5, 48)
    assert sp.dma.read_pieces(chain.out) == b"abcde"
    assert [p.gpa for p in chain.inp] == ins


def test_zero_length_descriptors_are_accepted() -> None:
    _, ring, vq = setup()
    ring.add_chain([b""], [0, 8])
    chain = vq.pop()
    assert chain is not None and chain.out == [] and chain.in_len == 8


def _raw(ring: DriverRing, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
    for i, d in enumerate(descs):
        ring.write_desc(i, *d)
    ring.publish(head)


BUF = 0x40000


@pytest.mark.parametrize(
    ("descs", "head", "kind"),
    [
        ([(BUF, 8, NEXT, 9)], 0, "next-range"),
        ([(BUF, 8, NEXT, 1), (BUF, 8, NEXT, 0)], 0, "loop"),
        ([(BUF, 8, NEXT, 0)], 0, "loop"),
        ([(BUF, 8, WRITE | NEXT, 1), (BUF, 8, 0, 0)], 0, "order"),
        ([(0x50000, 0, INDIRECT, 0)], 0, "indirect-len"),
        ([(0x50000, 24, INDIRECT, 0)], 0, "indirect-len"),
        ([(0x50000, 32, INDIRECT | NEXT, 1), (BUF, 8, 0, 0)], 0, "indirect-next"),
        ([(0x2000000, 8, 0, 0)], 0, "translate"),
        ([(0xFFFF8, 16, 0, 0)], 0, "translate"),
        ([(0x2000000, 32, INDIRECT, 0)], 0, "translate"),
    ],
)
def test_chain_errors(descs: list[tuple[int, int, int, int]], head: int, kind: str) -> None:
    _, ring, vq = setup()
    _raw(ring, descs, head)
    before = state_of(vq)
    with pytest.raises(VqError) as ei:
        vq.pop()
    assert ei.value.kind == kind
    assert state_of(vq) == before


def test_indirect_table_errors() -> None:
    sp, ring, vq = setup()
    table = 0x50000
    # nested indirect inside an indirect table
    sp.region.pack_gpa(DESC, table, BUF, 8, NEXT, 1)
    sp.region.pack_gpa(DESC, table + 16, 0x51000, 16, INDIRECT, 0)
    _raw(ring, [(table, 32, INDIRECT, 0)])
    with pytest.raises(VqError, match="indirect-nested"):
        vq.pop()
    # next out of the table's range, and a loop inside the table
    sp.region.pack_gpa(DESC, table + 16, BUF, 8, NEXT, 2)
    with pytest.raises(VqError, match="next-range"):
        vq.pop()
    sp.region.pack_gpa(DESC, table + 16, BUF, 8, NEXT, 0)
    with pytest.raises(VqError, match="loop"):
        vq.pop()
    # writable then readable inside the table
    sp.region.pack_gpa(DESC, table, BUF, 8, NEXT | WRITE, 1)
    sp.region.pack_gpa(DESC, table + 16, BUF, 8, 0, 0)
    with pytest.raises(VqError, match="order"):
        vq.pop()
    # direct readable + indirect as the last descriptor is fine
    sp.region.pack_gpa(DESC, table, BUF, 8, NEXT | WRITE, 1)
    sp.region.pack_gpa(DESC, table + 16, BUF, 8, WRITE, 0)
    ring.write_desc(0, BUF, 4, NEXT, 1)
    ring.write_desc(1, table, 32, INDIRECT | WRITE, 0)  # WRITE on the indirect one is ignored
    chain = vq.pop()
    assert chain is not None and (chain.out_len, chain.in_len) == (4, 16)


def test_avail_jump_head_range_and_head_inflight() -> None:
    _, ring, vq = setup(num=4)
    ring.set_avail_idx(5)
    with pytest.raises(VqError, match="avail-jump"):
        vq.pop()
    ring.set_avail_idx(4)
    ring.write_desc(0, BUF, 8, 0, 0)
    for slot, head in enumerate([0, 4, 0, 0]):
        ring.set_avail_ring(slot, head)
    assert vq.pop() is not None
    with pytest.raises(VqError, match="head-range"):
        vq.pop()
    ring.set_avail_ring(1, 0)
    with pytest.raises(VqError, match="head-inflight"):
        vq.pop()
    assert vq.state.last_avail_idx == 1


def test_avail_jump_is_measured_modulo_65536() -> None:
    _, ring, vq = setup(num=4)
    vq.set_state(VqState(65534, 65534))
    ring.set_avail_idx(2)  # 4 ahead across the wrap: fine
    ring.write_desc(0, BUF, 8, 0, 0)
    for k in range(4):
        ring.write_desc(k, BUF, 8, 0, 0)
        ring.set_avail_ring(65534 + k, k)
    for _ in range(4):
        assert vq.pop() is not None
    assert vq.state.last_avail_idx == 2
    ring.set_avail_idx(7)
    with pytest.raises(VqError, match="avail-jump"):
        vq.pop()


def test_wrap_around_past_65535() -> None:
    sp, ring, vq = setup(num=4)
    start = 65533
    vq.set_state(VqState(start, start))
    ring.avail_idx = start
    ring.set_avail_idx(start)
    ring.set_used_idx(start)
    ring.last_used = start
    heads = []
    for _ in range(10):
        ring.free = [0, 1, 2, 3]
        ring.heap = 0x40000
        head, _ = ring.add_chain([b"p"], [4])
        chain = vq.pop()
        assert chain is not None and chain.head == head
        vq.push(chain, 4)
        assert vq.flush()
        heads.append(head)
        assert ring.reclaim() == [(head, 4)]
    assert vq.state.last_avail_idx == (start + 10) & 0xFFFF == 7
    assert ring.used_idx() == 7 and vq.used_published == 7


@pytest.mark.parametrize(
    ("event", "old", "new", "expected"),
    [
        (0, 0, 1, True),
        (1, 0, 1, False),
        (0, 1, 2, False),
        (5, 3, 8, True),
        (8, 3, 8, False),
        (7, 3, 8, True),
        (65535, 65534, 0, True),  # wrap
        (65534, 65535, 1, False),
        (0, 65535, 1, True),
    ],
)
def test_vring_need_event(event: int, old: int, new: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_event_idx_interrupt_decisions() -> None:
    _, ring, vq = setup(event_idx=True)
    chains = []
    for _ in range(6):
        ring.add_chain([b"a"], [])
        chains.append(vq.pop())
    ring.set_used_event(2)  # interrupt once used idx moves past 2 (to 3)
    vq.push(chains[0], 0)
    vq.push(chains[1], 0)
    assert vq.flush() is False  # 0 -> 2
    vq.push(chains[2], 0)
    assert vq.flush() is True  # 2 -> 3 crosses
    assert vq.need_call
    vq.push(chains[3], 0)
    assert vq.flush() is False  # 3 -> 4: event stays 2
    ring.set_used_event(4)
    vq.push(chains[4], 0)
    vq.push(chains[5], 0)
    assert vq.flush() is True  # 4 -> 6 crosses 4
    assert vq.flush() is False  # nothing new


def test_no_interrupt_flag_without_event_idx() -> None:
    _, ring, vq = setup(event_idx=False)
    ring.add_chain([b"a"], [])
    ring.add_chain([b"b"], [])
    c1, c2 = vq.pop(), vq.pop()
    ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    vq.push(c1, 0)
    assert vq.flush() is False
    ring.set_avail_flags(0)
    vq.push(c2, 0)
    assert vq.flush() is True
    # used_event is ignored without EVENT_IDX
    assert ring.used_idx() == 2


def test_set_notification() -> None:
    _, ring, vq = setup(event_idx=False)
    vq.set_notification(False)
    assert ring.used_flags() == VRING_USED_F_NO_NOTIFY
    vq.set_notification(True)
    assert ring.used_flags() == 0
    _, ring, vq = setup(event_idx=True)
    vq.set_state(VqState(300, 300))
    vq.set_notification(True)
    assert ring.avail_event() == 300 and ring.used_flags() == 0
    vq.set_notification(False)
    assert ring.avail_event() == 300
    ring.set_avail_idx(301)
    assert vq.enable_notification_and_check() is True


def test_push_order_and_used_elements() -> None:
    _, ring, vq = setup()
    a, _ = ring.add_chain([b"a"], [8])
    b, _ = ring.add_chain([b"b"], [8])
    ca, cb = vq.pop(), vq.pop()
    vq.push(cb, 7)
    vq.push(ca, 3)
    assert ring.used_idx() == 0  # not published before flush
    vq.flush()
    assert ring.reclaim() == [(b, 7), (a, 3)]
    with pytest.raises(ValueError):
        vq.push(ca, 3)


def test_rewind_gives_back_unpushed_chains() -> None:
    sp, ring, vq = setup()
    heads = [ring.add_chain([bytes([k])], [])[0] for k in range(3)]
    chains = [vq.pop() for _ in range(3)]
    vq.push(chains[0], 0)
    assert vq.rewind() == 2
    assert vq.state.last_avail_idx == 1 and vq.inflight == 0
    again = [vq.pop(), vq.pop()]
    assert [c.head for c in again] == heads[1:]
    (e,) = sp.journal.query(["vq.rewind"])
    assert e["count"] == 2 and e["in_order"] is True
    for c in again:
        vq.push(c, 0)
    assert vq.rewind() == 0
    # out-of-order completion is flagged
    ring.add_chain([b"x"], [])
    ring.add_chain([b"y"], [])
    _, c2 = vq.pop(), vq.pop()
    vq.push(c2, 0)
    assert vq.rewind() == 1
    assert sp.journal.query(["vq.rewind"])[-1]["in_order"] is False


def test_miss_leaves_no_state_change() -> None:
    sp = make_space(identity=False)
    sp.dma.iommu = True
    off = 0x1000_0000  # IOVA = GPA + off
    _, ring, vq = setup(sp=sp, iova_offset=off)
    u = sp.region.uaddr
    # only the rings are mapped (like QEMU's volunteered updates)
    sp.iotlb.dma_map(off, 0x3000, u, Perm.RW)
    head, ins = ring.add_chain([b"out"], [16])
    before = state_of(vq)
    with pytest.raises(TranslationError) as ei:
        vq.pop()
    assert ei.value.kind == "miss" and ei.value.access == Access.READ
    assert ei.value.addr == 0x40000 + off
    assert state_of(vq) == before
    assert ins == [0x40010]
    sp.iotlb.dma_map(off + 0x40000, 0x10, u + 0x40000, Perm.RO)
    with pytest.raises(TranslationError) as ei:
        vq.pop()
    assert ei.value.kind == "miss" and ei.value.access == Access.WRITE
    assert ei.value.addr == off + 0x40010
    assert state_of(vq) == before
    sp.iotlb.dma_map(off + 0x40010, 0x8, u + 0x40010, Perm.WO)
    with pytest.raises(TranslationError) as ei:  # partly mapped: miss at the first hole
        vq.pop()
    assert ei.value.kind == "miss" and ei.value.addr == off + 0x40018
    assert state_of(vq) == before
    sp.iotlb.dma_map(off + 0x40018, 0x8, u + 0x40018, Perm.RW)
    chain = vq.pop()
    assert chain is not None and chain.head == head and [p.gpa for p in chain.inp] == ins


def test_ring_miss_and_ring_errors() -> None:
    sp = make_space(identity=False)
    sp.dma.iommu = True
    _, ring, vq = setup(sp=sp, iova_offset=0x1000_0000)
    with pytest.raises(TranslationError, match="miss"):
        vq.pop()
    assert state_of(vq) == (0, 0, 0, 0)
    sp.dma.iommu = False
    with pytest.raises(VqError, match="ring-translate"):
        vq.pop()


def test_multi_piece_rings_across_host_regions() -> None:
    """Rings that straddle host regions (not uaddr-adjacent) come as several pieces."""
    from backends.vdpa.dma import DmaSpace
    from backends.vdpa.iotlb import IOTLB
    from backends.vdpa.memory import HostMemory, HostRegion

    mem = bytearray(MEM)
    cuts = [0, 0x12800, 0x13400, MEM]  # one cut in the desc table, one in the used ring
    host = HostMemory()
    iotlb = IOTLB()
    for k, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        r = HostRegion(a, b - a, UADDR_BASE + k * 0x1000_0000, 0, mem, base=a)
        host.add(r)
        iotlb.dma_map(a, b - a, r.uaddr, Perm.RW)
    dma = DmaSpace(iotlb, host)
    log = DirtyLog(bytearray(64))
    dma.dirty_log = log
    whole = HostRegion(0, MEM, 0, 0, mem)  # the driver's view of guest memory
    num = 256
    ring = DriverRing(whole, num, 0x12000)
    vq = SplitVirtqueue(0, dma)
    vq.set_num(num)
    vq.set_address(ring.desc, ring.avail, ring.used)
    for k in range(num + 3):  # every slot, then wrap: elements land on both sides of the cut
        ring.free = [k % num]
        ring.heap = 0x40000
        head, _ = ring.add_chain([bytes([k & 0xFF]) * 4])
        c = vq.pop()
        assert c is not None and c.head == head and dma.read_pieces(c.out) == bytes([k & 0xFF]) * 4
        vq.push(c, k)
        vq.flush()
        assert ring.reclaim() == [(head, k)]
    rings = vq.rings()
    assert len(rings.desc.pieces) == 2 and len(rings.used.pieces) == 2
    assert len(rings.avail.pieces) == 1
    assert log.is_dirty(0x13000) and log.is_dirty(0x13800)
    vq.event_idx = True
    vq.set_notification(True)
    assert ring.avail_event() == (num + 3) & 0xFFFF


def test_used_ring_writes_are_dirty_logged_even_with_skip_dirty_log() -> None:
    sp, ring, vq = setup()
    log = DirtyLog(bytearray(64))
    sp.dma.dirty_log = log
    sp.faults.set("skip-dirty-log")
    _, ins = ring.add_chain([b"a"], [100])
    c = vq.pop()
    sp.dma.write_pieces(c.inp, b"x" * 100)  # data write: skipped by the fault
    vq.push(c, 100)
    vq.flush()
    assert log.is_dirty(ring.used) and log.is_dirty(ring.used + 4 + 8 * ring.num)
    assert not log.is_dirty(ins[0])
    sp.faults.clear("skip-dirty-log")
    sp.dma.write_pieces(c.inp, b"y")
    assert log.is_dirty(ins[0])


def test_ring_cache_is_invalidated_on_iotlb_change() -> None:
    sp, ring, vq = setup()
    ring.add_chain([b"a"], [])
    c = vq.pop()
    assert c is not None
    vq.push(c, 0)
    vq.flush()
    cached = vq.rings()
    assert vq.rings() is cached  # hot path: no re-translation
    # move the whole ring: a copy at another host address, then remap the IOVA there
    copy_at = 0x80000
    sp.region.write_gpa(copy_at, sp.region.read_gpa(0, 0x4000))
    sp.iotlb.dma_map(0, 0x4000, sp.region.uaddr + copy_at, Perm.RW)
    assert vq.rings() is not cached
    # publish a second chain only in the copy: a stale cache would not see it
    sp.region.pack_gpa(U16, copy_at + ring.avail + 4 + 2, 0)
    sp.region.pack_gpa(U16, copy_at + ring.avail + 2, 2)
    assert vq.avail_pending() == 1
    assert vq.pop() is not None


def test_stale_iotlb_fault_keeps_the_ring_cache() -> None:
    sp, ring, vq = setup()
    sp.faults.set("stale-iotlb")
    ring.add_chain([b"a"], [])
    vq.rings()
    sp.iotlb.dma_unmap(0, 1 << 20)
    assert vq.pop() is not None  # the unmapped ring is still used: the bug the fault models


def test_unconfigured_queue_pops_nothing_and_bad_sizes() -> None:
    sp = make_space()
    vq = SplitVirtqueue(3, sp.dma)
    assert vq.pop() is None and vq.avail_pending() == 0
    vq.set_notification(True)  # no-op without rings
    for bad in (0, 3, 65536, -8):
        with pytest.raises(ValueError):
            vq.set_num(bad)
    d = vq.to_dict()
    assert d["index"] == 3 and d["avail_idx"] is None


# -- hypothesis: random descriptor tables vs a reference walker ----------------------------
MEM = 1 << 20
TABLES = (0x50000, 0x51000)
ADDRS = (0x40000, 0x48000, *TABLES, MEM - 8, 0x300000)
LENS = (0, 8, 64, 4096, 15, 16, 32, 48, 96)


def ref_walk(sp: Space, num: int, last: int):
    """Independent reading of the spec: ('ok', head, outs, ins) or ('err', kind)."""
    r = sp.region

    def u16(gpa: int) -> int:
        return U16.unpack(r.read_gpa(gpa, 2))[0]

    avail = RING_GPA + 16 * num
    pending = (u16(avail + 2) - last) % 65536
    if pending == 0:
        return None
    if pending > num:
        return ("err", "avail-jump")
    head = u16(avail + 4 + 2 * (last % num))
    if head >= num:
        return ("err", "head-range")
    table_base, size, idx = RING_GPA, num, head
    in_indirect, seen_write, steps = False, False, 0
    outs: list[tuple[int, int]] = []
    ins: list[tuple[int, int]] = []
    while True:
        steps += 1
        if steps > size:
            return ("err", "loop")
        addr, length, flags, nxt = DESC.unpack(r.read_gpa(table_base + 16 * idx, 16))
        if flags & INDIRECT:
            if in_indirect:
                return ("err", "indirect-nested")
            if flags & NEXT:
                return ("err", "indirect-next")
            if length == 0 or length % 16:
                return ("err", "indirect-len")
            if addr + length > MEM:
                return ("err", "translate")
            table_base, size, idx, in_indirect, steps = addr, length // 16, 0, True, 0
            continue
        if flags & WRITE:
            if length and addr + length > MEM:
                return ("err", "translate")
            seen_write = True
            if length:
                ins.append((addr, length))
        else:
            if seen_write:
                return ("err", "order")
            if length and addr + length > MEM:
                return ("err", "translate")
            if length:
                outs.append((addr, length))
        if not flags & NEXT:
            return ("ok", head, outs, ins)
        if nxt >= size:
            return ("err", "next-range")
        idx = nxt


FLAGS = [0, 0, NEXT, NEXT, NEXT, WRITE, WRITE | NEXT, WRITE | NEXT, INDIRECT, INDIRECT | NEXT, 7]
desc_st = st.tuples(
    st.sampled_from(ADDRS),
    st.sampled_from(LENS),
    st.one_of(st.sampled_from(FLAGS), st.integers(0, 7)),
    st.one_of(st.integers(0, 5), st.integers(0, 10)),
)


@st.composite
def ring_contents(draw):
    num = draw(st.sampled_from([2, 4, 8]))
    descs = draw(st.lists(desc_st, min_size=num, max_size=num))
    tables = [draw(st.lists(desc_st, min_size=6, max_size=6)) for _ in TABLES]
    last = draw(st.sampled_from([0, 1, 65535, 40000]))
    which = draw(st.integers(0, 19))
    if which == 0:
        pending = 0
    elif which == 1:
        pending = draw(st.integers(0, 65535))  # mostly an avail jump
    else:
        pending = draw(st.integers(1, num))
    head = st.sampled_from([*range(num)] * 6 + [num, num + 1])
    ring = draw(st.lists(head, min_size=num, max_size=num))
    return num, descs, tables, last, pending, ring


class _HasRegion(Protocol):
    region: HostRegion


def lay_out(
    sp: _HasRegion, num: int, descs, tables, last: int, pending: int, ring_entries
) -> DriverRing:
    dr = DriverRing(sp.region, num, RING_GPA)
    for i, d in enumerate(descs):
        dr.write_desc(i, *d)
    for base, entries in zip(TABLES, tables, strict=True):
        for k, d in enumerate(entries):
            sp.region.pack_gpa(DESC, base + 16 * k, *d)
    for k, h in enumerate(ring_entries):
        dr.set_avail_ring(k, h)
    dr.set_avail_idx(last + pending)
    return dr


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring_contents())
def test_pop_matches_reference_walker(contents) -> None:
    num, descs, tables, last, pending, ring_entries = contents
    sp = make_space()
    lay_out(sp, num, descs, tables, last, pending, ring_entries)
    vq = SplitVirtqueue(0, sp.dma)
    vq.set_num(num)
    vq.set_address(RING_GPA, RING_GPA + 16 * num, (RING_GPA + 16 * num + 6 + 2 * num + 3) & ~3)
    vq.set_state(VqState(last, last))
    want = ref_walk(sp, num, last)
    event("empty" if want is None else f"{want[0]} {want[1] if want[0] == 'err' else ''}")
    try:
        got = vq.pop()
    except VqError as e:
        assert want == ("err", e.kind), (want, e)
        assert vq.state.last_avail_idx == last and vq.inflight == 0
        return
    if want is None:
        assert got is None
        return
    assert got is not None, want
    assert want[0] == "ok", (want, got)
    assert got.head == want[1]
    assert [(p.gpa, p.length) for p in got.out] == want[2]
    assert [(p.gpa, p.length) for p in got.inp] == want[3]
    assert got.out_len == sum(n for _, n in want[2]) and got.in_len == sum(n for _, n in want[3])
    assert vq.state.last_avail_idx == (last + 1) & 0xFFFF and vq.inflight == 1


__all__ = ["UADDR_BASE", "lay_out", "ref_walk", "ring_contents"]
