"""DmaSpace: IOVA -> pieces through IOTLB and host memory, misses, data access, dirty log,
generation, and the translate-by-gpa / skip-dirty-log fault hooks."""

from __future__ import annotations

import os

import pytest

from backends.tests.conftest import UADDR_BASE, make_space
from backends.vdpa.dirty_log import DirtyLog
from backends.vdpa.iotlb import Perm
from backends.vdpa.memory import Access, HostRegion, Piece, TranslationError


def test_translate_crosses_mappings_and_regions() -> None:
    sp = make_space(identity=False)
    second = HostRegion.anonymous(0x200000, 0x10000, UADDR_BASE + 0x200000)
    sp.host.add(second)
    # IOVA 0x1000_0000.. -> end of region 1, then region 2 (not uaddr-adjacent)
    sp.iotlb.dma_map(0x1000_0000, 0x1000, sp.region.uaddr + 0xFF000, Perm.RW)
    sp.iotlb.dma_map(0x1000_1000, 0x1000, second.uaddr, Perm.RW)
    pieces = sp.dma.translate(0x1000_0800, 0x1000, Access.WRITE)
    assert [(p.region, p.offset, p.length, p.gpa) for p in pieces] == [
        (sp.region, 0xFF800, 0x800, 0xFF800),
        (second, 0, 0x800, 0x200000),
    ]
    sp.dma.write(0x1000_0FFE, b"abcd")
    assert sp.region.read_gpa(0xFFFFE, 2) == b"ab" and second.read_gpa(0x200000, 2) == b"cd"
    assert sp.dma.read(0x1000_0FFE, 4) == b"abcd"


def test_adjacent_host_pieces_are_merged() -> None:
    sp = make_space(identity=False)
    u = sp.region.uaddr
    sp.iotlb.dma_map(0, 0x1000, u, Perm.RO)
    sp.iotlb.dma_map(0x1000, 0x1000, u + 0x1000, Perm.RW)
    (p,) = sp.dma.translate(0x800, 0x1000, Access.READ)
    assert (p.offset, p.length) == (0x800, 0x1000)


def test_unmapped_is_an_error_without_iommu_and_a_miss_with_it() -> None:
    sp = make_space(identity=False)
    sp.iotlb.dma_map(0x0, 0x1000, sp.region.uaddr, Perm.RW)
    with pytest.raises(TranslationError) as ei:
        sp.dma.translate(0x800, 0x1000, Access.READ)
    assert ei.value.kind == "partial"
    sp.dma.iommu = True
    with pytest.raises(TranslationError) as ei:
        sp.dma.translate(0x800, 0x1000, Access.READ)
    assert (ei.value.kind, ei.value.addr, ei.value.length) == ("miss", 0x1000, 0x800)
    with pytest.raises(TranslationError) as ei:
        sp.dma.translate(0x5000, 4, Access.WRITE)
    assert (ei.value.kind, ei.value.addr, ei.value.access) == ("miss", 0x5000, Access.WRITE)
    # a permission problem is not a miss
    sp.iotlb.dma_map(0x5000, 0x1000, sp.region.uaddr, Perm.RO)
    with pytest.raises(TranslationError) as ei:
        sp.dma.translate(0x5000, 4, Access.WRITE)
    assert ei.value.kind == "perm"


def test_iotlb_entry_without_host_memory_is_not_a_miss() -> None:
    sp = make_space(identity=False)
    sp.dma.iommu = True
    sp.iotlb.dma_map(0x0, 0x1000, 0xDEAD_0000, Perm.RW)
    with pytest.raises(TranslationError) as ei:
        sp.dma.translate(0, 4, Access.READ)
    assert ei.value.kind == "unmapped"


def test_read_and_write_pieces_with_offsets() -> None:
    sp = make_space()
    r = sp.region
    pieces = [Piece(r, 0x100, 4), Piece(r, 0x200, 4), Piece(r, 0x300, 4)]
    assert sp.dma.write_pieces(pieces, b"0123456789AB") == 12
    assert sp.dma.read_pieces(pieces) == b"0123456789AB"
    assert sp.dma.read_pieces(pieces, 2, 5) == b"23456"
    assert sp.dma.read_pieces(pieces, 6) == b"6789AB"
    assert sp.dma.read_pieces(pieces, 20) == b""
    assert sp.dma.write_pieces(pieces, b"xyz", offset=3) == 3
    assert sp.dma.read_pieces(pieces) == b"012xyz6789AB"
    assert sp.dma.write_pieces(pieces, b"too long for the rest", offset=10) == 2
    assert sp.dma.write_pieces([], b"abc") == 0
    assert sp.dma.read_pieces([]) == b""


def test_data_writes_are_dirty_logged_by_gpa() -> None:
    sp = make_space(gpa=0x100000)
    log = DirtyLog(bytearray(128))
    sp.dma.dirty_log = log
    sp.dma.write(0x100FFF, b"xy")
    assert log.dirty_pages() == [0x100, 0x101]
    pieces = sp.dma.translate(0x105000, 0x3000, Access.WRITE)
    sp.dma.write_pieces(pieces, b"z", offset=0x2000)
    assert log.dirty_pages() == [0x100, 0x101, 0x107]
    sp.dma.read(0x109000, 10)  # reads never log
    assert not log.is_dirty(0x109000)


def test_fault_skip_dirty_log_skips_data_but_not_ring_marks() -> None:
    sp = make_space()
    log = DirtyLog(bytearray(32))
    sp.dma.dirty_log = log
    sp.faults.set("skip-dirty-log")
    sp.dma.write(0x3000, b"data")
    assert log.dirty_pages() == []
    sp.dma.mark_dirty(0x4000, 1)  # what the used ring uses
    assert log.dirty_pages() == [4]


def test_fault_translate_by_gpa() -> None:
    sp = make_space(identity=False)
    iova = 0x8000_0000
    sp.iotlb.dma_map(iova, 0x1000, sp.region.uaddr + 0x5000, Perm.RW)
    sp.region.write_gpa(0x5000, b"right")
    sp.region.write_gpa(0x1000, b"wrong")
    sp.dma.iommu = True
    assert sp.dma.read(iova, 5) == b"right"
    with pytest.raises(TranslationError):
        sp.dma.read(0x1000, 5)  # GPA is not an IOVA
    sp.faults.set("translate-by-gpa")
    assert sp.dma.read(0x1000, 5) == b"wrong"
    with pytest.raises(TranslationError):
        sp.dma.read(iova, 5)
    sp.dma.iommu = False  # without a vIOMMU the fault has no effect
    assert sp.dma.read(iova, 5) == b"right"


def test_generation_tracks_everything_a_cache_depends_on() -> None:
    sp = make_space()
    seen = {sp.dma.generation}

    def changed() -> bool:
        g = sp.dma.generation
        new = g not in seen
        seen.add(g)
        return new

    sp.iotlb.dma_map(0x200000, 0x1000, 0, Perm.RW)
    assert changed()
    sp.host.add(HostRegion.anonymous(0x300000, 0x1000, 0x1000))
    assert changed()
    sp.dma.iommu = True
    assert changed()
    sp.dma.iommu = True
    assert not changed()
    sp.faults.set("translate-by-gpa")
    assert changed()
    sp.dma.read(0, 4)
    assert not changed()


def test_dma_on_a_memfd_region() -> None:
    fd = os.memfd_create("dma-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 20)
        sp = make_space(identity=False)
        r = HostRegion.from_fd(
            fd, gpa=0x4000_0000, size=1 << 20, uaddr=0x7E00_0000_0000, mmap_offset=0
        )
        try:
            sp.host.add(r)
            sp.iotlb.dma_map(0x4000_0000, 1 << 20, r.uaddr, Perm.RW)
            log = DirtyLog(bytearray((0x4000_0000 >> 15) + 64))
            sp.dma.dirty_log = log
            sp.dma.write(0x4000_1000, b"memfd!")
            assert os.pread(fd, 6, 0x1000) == b"memfd!"
            assert log.is_dirty(0x4000_1000)
            os.pwrite(fd, b"back", 0x2000)
            assert sp.dma.read(0x4000_2000, 4) == b"back"
            sp.host.remove(r)
        finally:
            r.close()
    finally:
        os.close(fd)
