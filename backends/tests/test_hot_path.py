"""The datapath's fast paths keep the slow paths' meaning: atomic ring-index stores, the
remembered DMA window, batched pops, batched used-ring publish, the single-descriptor walk
and the TX frame copy."""

from __future__ import annotations

import struct
import sys

import pytest

from backends.net.datapath import _join_out
from backends.tests.conftest import DriverRing, make_space
from backends.vdpa.iotlb import Perm
from backends.vdpa.memory import Access, HostRegion, Piece, TranslationError
from backends.vdpa.split_virtqueue import SplitVirtqueue
from backends.vdpa.virtqueue import VqError
from backends.virtio.ring import U16, VRING_DESC_F_NEXT

RING_GPA = 0x1000


def setup(num: int = 8):
    sp = make_space()
    ring = DriverRing(sp.region, num, RING_GPA)
    vq = SplitVirtqueue(0, sp.dma, sp.journal)
    vq.set_num(num)
    vq.set_address(ring.desc_iova, ring.avail_iova, ring.used_iova)
    vq.ready = vq.started = True
    return sp, ring, vq


# -- ring indexes ----------------------------------------------------------------------------
@pytest.mark.skipif(sys.byteorder != "little", reason="native codec only on little-endian")
def test_ring_index_codec_is_one_native_16_bit_access() -> None:
    """struct's "<H" moves one byte at a time: a driver polling used->idx across 0x00ff ->
    0x0100 could read 0x0000 (DPDK's virtio PMD then freed descriptors twice and crashed).
    The native codec is a single 2-byte load/store; on little-endian it is also the ring's
    byte order."""
    assert U16.format in ("H", "@H")
    buf = bytearray(4)
    U16.pack_into(buf, 2, 0x0100)
    assert bytes(buf) == b"\x00\x00\x00\x01"
    assert U16.unpack_from(buf, 2)[0] == 0x0100


# -- the remembered DMA window ---------------------------------------------------------------
def test_window_answers_like_the_slow_path_and_follows_every_change() -> None:
    sp = make_space()
    dma = sp.dma
    first = dma.translate(0x2000, 64, Access.READ)
    again = dma.translate(0x3000, 100, Access.WRITE)  # from the window
    assert [(p.region, p.offset, p.length) for p in first] == [(sp.region, 0x2000, 64)]
    assert [(p.region, p.offset, p.length) for p in again] == [(sp.region, 0x3000, 100)]
    assert dma.translate(0x3000, 100, Access.WRITE)[0] is again[0]  # same buffer, same Piece
    # a read-only remap: a write through the old window must now fail with 'perm'
    sp.iotlb.dma_map(0, 0x10000, sp.region.uaddr, Perm.RO)
    with pytest.raises(TranslationError) as ei:
        dma.translate(0x3000, 8, Access.WRITE)
    assert ei.value.kind == "perm"
    assert dma.translate(0x3000, 8, Access.READ)[0].offset == 0x3000
    # remapped elsewhere: the answer follows the IOTLB
    sp.iotlb.dma_map(0, 0x10000, sp.region.uaddr + 0x20000, Perm.RW)
    assert dma.translate(0x3000, 8, Access.READ)[0].offset == 0x23000
    # unmapped: no stale answer
    sp.iotlb.dma_unmap(0, 0x10000)
    with pytest.raises(TranslationError):
        dma.translate(0x3000, 8, Access.READ)


def test_window_is_the_part_of_one_mapping_inside_one_region() -> None:
    sp = make_space(size=0x10000)
    second = HostRegion.anonymous(0x10000, 0x10000, sp.region.uaddr + 0x10000)
    sp.host.add(second)
    sp.iotlb.dma_map(0, 0x20000, sp.region.uaddr, Perm.RW)  # one mapping over both regions
    dma = sp.dma
    assert dma.translate(0x8000, 16, Access.READ)[0].region is sp.region
    crossing = dma.translate(0xFFF8, 16, Access.READ)  # past the window: the slow path
    assert [(p.region, p.offset, p.length) for p in crossing] == [
        (sp.region, 0xFFF8, 8),
        (second, 0, 8),
    ]
    assert dma.translate(0x18000, 16, Access.READ)[0].region is second
    # the region goes away: the window must not hand out its Pieces
    sp.host.remove(second)
    with pytest.raises(TranslationError):
        dma.translate(0x18000, 16, Access.READ)


def test_window_is_dropped_when_the_iommu_mode_changes() -> None:
    sp = make_space()
    sp.dma.translate(0x2000, 8, Access.READ)
    sp.iotlb.dma_unmap(0, 1 << 20)
    sp.dma.iommu = True
    with pytest.raises(TranslationError) as ei:
        sp.dma.translate(0x2000, 8, Access.READ)
    assert ei.value.kind == "miss"


# -- batched pop -----------------------------------------------------------------------------
def test_pop_batch_takes_up_to_the_limit_in_order() -> None:
    _, ring, vq = setup()
    heads = [ring.add_chain([b"x" * 20])[0] for _ in range(5)]
    got = vq.pop_batch(3)
    assert [c.head for c in got] == heads[:3]
    assert [c.avail_idx for c in got] == [0, 1, 2]
    assert [c.head for c in vq.pop_batch(10)] == heads[3:]
    assert vq.pop_batch(10) == [] and vq.inflight == 5


def test_pop_batch_stops_before_a_bad_chain_and_the_next_call_raises() -> None:
    _, ring, vq = setup()
    good = ring.add_chain([b"ok" * 8])[0]
    bad = ring.free.pop(0)
    ring.write_desc(bad, 0x2000, 8, VRING_DESC_F_NEXT, 99)  # next out of range
    ring.publish(bad)
    got = vq.pop_batch(8)
    assert [c.head for c in got] == [good]
    assert vq.state.last_avail_idx == 1  # the bad one is still available
    with pytest.raises(VqError) as ei:
        vq.pop_batch(8)
    assert ei.value.kind == "next-range"
    assert vq.state.last_avail_idx == 1 and vq.inflight == 1


def test_pop_batch_miss_leaves_state_untouched() -> None:
    sp, ring, vq = setup()
    sp.dma.iommu = True  # identity IOTLB: rings and buffers below 1 MiB are mapped
    ring.add_chain([b"a" * 8])
    head = ring.free.pop(0)
    ring.write_desc(head, 0x40_0000, 8, 0, 0)  # an unmapped IOVA
    ring.publish(head)
    assert len(vq.pop_batch(8)) == 1
    with pytest.raises(TranslationError) as ei:
        vq.pop_batch(8)
    assert ei.value.kind == "miss"
    assert vq.state.last_avail_idx == 1


# -- the single-descriptor walk ---------------------------------------------------------------
def test_single_descriptor_chains_match_the_general_walk() -> None:
    sp, ring, vq = setup()
    ring.add_chain([b"payload"])
    ring.add_chain([], [64])
    ring.add_chain([b""], [])  # zero length: the general walk
    out = vq.pop()
    inp = vq.pop()
    empty = vq.pop()
    assert out is not None and inp is not None and empty is not None
    assert (out.out_len, out.in_len, out.ndesc, out.inp) == (7, 0, 1, [])
    assert sp.dma.read_pieces(out.out) == b"payload"
    assert (inp.out_len, inp.in_len, inp.ndesc, inp.out) == (0, 64, 1, [])
    assert (empty.out_len, empty.out, empty.inp) == (0, [], [])


# -- batched publish -------------------------------------------------------------------------
def test_flush_writes_every_element_across_the_ring_wrap() -> None:
    _, ring, vq = setup(num=4)
    published: list[tuple[int, int]] = []
    for round_ in range(3):  # 3 x 3 elements: the second and third runs wrap
        for _ in range(3):
            ring.add_chain([b"z" * 4])
        chains = vq.pop_batch(4)
        for k, c in enumerate(chains):
            vq.push(c, 10 * round_ + k)
        vq.flush()
        got = ring.reclaim()
        assert got == [(c.head, 10 * round_ + k) for k, c in enumerate(chains)]
        published += got
        ring.free.extend(c.head for c in chains)
    assert ring.used_idx() == 9 and len(published) == 9


# -- TX frame copy -----------------------------------------------------------------------------
def test_join_out_skips_the_header_across_pieces() -> None:
    sp = make_space()
    sp.region.write_gpa(0x100, b"HHHHHHHHHHHHframe-one")
    sp.region.write_gpa(0x200, b"HHHH")
    sp.region.write_gpa(0x300, b"HHHHHHHHpart2")

    class C:
        def __init__(self, out: list[Piece]) -> None:
            self.out = out

    one = C([Piece(sp.region, 0x100, 21)])
    assert _join_out(one, 12) == b"frame-one"  # type: ignore[arg-type]
    split = C([Piece(sp.region, 0x200, 4), Piece(sp.region, 0x300, 13)])
    assert _join_out(split, 12) == b"part2"  # type: ignore[arg-type]
    sp.region.close()
    with pytest.raises(TranslationError):
        _join_out(one, 12)  # type: ignore[arg-type]


def test_used_element_struct_matches_the_layout() -> None:
    from backends.vdpa.split_virtqueue import _used_elems

    assert _used_elems(2).pack(1, 2, 3, 4) == struct.pack("<IIII", 1, 2, 3, 4)


# -- RX chains popped ahead ------------------------------------------------------------------
def test_rx_batch_pops_ahead_without_rewinds_and_gives_back_a_shortfall() -> None:
    from backends.loop import EventLoop
    from backends.tests.test_net_datapath import BASE_FEATURES, HDR, MRG, frame, make_rig
    from backends.virtio.net_header import VirtioNetHdr

    loop = EventLoop()
    try:
        rig = make_rig(features=BASE_FEATURES | MRG, loop=loop)
        posted = dict(rig.post_rx(0, [64], count=7))  # 3 frames need 2 each, the 4th finds 1
        frames = [frame(100, seed=k) for k in range(4)]
        for f in frames:
            rig.net.inject(f)
        loop.run_once(0)
        used = rig.vqs[0].take_used()
        assert [ln for _, ln in used] == [64, 48] * 3
        for k in range(3):
            (h1, l1), (h2, l2) = used[2 * k : 2 * k + 2]
            got = rig.read_chain(posted[h1], l1) + rig.read_chain(posted[h2], l2)
            assert VirtioNetHdr.unpack(got[:HDR]).num_buffers == 2
            assert got[HDR:] == frames[k]
        vq = rig.dev.vqs[0]
        assert rig.net.backlog() == 1 and vq.inflight == 0
        assert vq.state.last_avail_idx == 6  # the 7th chain given back for the 4th frame
        assert rig.dev.journal.count("vq.rewind") == 1
        more = dict(rig.post_rx(0, [64], count=1))
        rig.vqs[0].kick()
        (h1, l1), (h2, l2) = rig.vqs[0].take_used()
        got = rig.read_chain({**posted, **more}[h1], l1) + rig.read_chain(more[h2], l2)
        assert got[HDR:] == frames[3] and rig.net.backlog() == 0
    finally:
        loop.close()
