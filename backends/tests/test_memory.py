"""HostRegion / HostMemory / Piece / DirtyLog / DmaSpace basics, with a real memfd too."""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterator

import pytest

from backends.vdpa.dirty_log import DirtyLog
from backends.vdpa.memory import (
    Access,
    HostMemory,
    HostRegion,
    Piece,
    TranslationError,
    reap_deferred_closes,
)

MiB = 1 << 20


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("vdpa-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * MiB)
        yield fd
    finally:
        os.close(fd)


def test_anonymous_region_ids_are_unique_and_monotonic() -> None:
    a = HostRegion.anonymous(0, 4096, 0x1000)
    b = HostRegion.anonymous(0, 4096, 0x1000)
    assert b.id > a.id
    assert a.to_dict()["backing"] == "anonymous"


@pytest.mark.parametrize("size", [0, -1])
def test_region_rejects_bad_size(size: int) -> None:
    with pytest.raises(ValueError):
        HostRegion.anonymous(0, size, 0)


def test_from_fd_shares_memory_with_the_fd(memfd: int) -> None:
    r = HostRegion.from_fd(memfd, gpa=0x100000, size=2 * MiB, uaddr=0x7F00_0000_0000, mmap_offset=0)
    try:
        os.pwrite(memfd, b"from-fd", 0x1234)
        p = Piece(r, 0x1234, 7)
        assert p.read() == b"from-fd"
        assert p.gpa == 0x101234 and p.uaddr == 0x7F00_0000_1234
        p.write(b"FROM")
        assert os.pread(memfd, 7, 0x1234) == b"FROM-fd"
    finally:
        r.close()
    assert r.closed


@pytest.mark.parametrize("mmap_offset", [0x1000, 0x200000, 0x1234])
def test_from_fd_honours_mmap_offset_aligned_or_not(memfd: int, mmap_offset: int) -> None:
    os.pwrite(memfd, b"region-start", mmap_offset)
    r = HostRegion.from_fd(memfd, gpa=0, size=MiB, uaddr=0x10000000, mmap_offset=mmap_offset)
    try:
        assert Piece(r, 0, 12).read() == b"region-start"
        assert bytes(Piece(r, 0, 6).view()) == b"region"
        r.write_gpa(MiB - 4, b"tail")
        assert os.pread(memfd, 4, mmap_offset + MiB - 4) == b"tail"
        assert r.read_gpa(0, 6) == b"region"
    finally:
        r.close()


def test_from_fd_refuses_a_too_small_file(memfd: int) -> None:
    with pytest.raises(ValueError, match="needs"):
        HostRegion.from_fd(memfd, gpa=0, size=8 * MiB, uaddr=0, mmap_offset=0)


def test_close_with_exported_view_is_deferred(memfd: int) -> None:
    r = HostRegion.from_fd(memfd, gpa=0, size=MiB, uaddr=0x1000_0000, mmap_offset=0)
    p = Piece(r, 16, 16)
    v = p.view()
    r.close()  # must not raise BufferError into the caller
    assert r.closed
    assert isinstance(r.buf, mmap.mmap) and not r.buf.closed  # still mapped: v is alive
    v[0] = 1  # the view stays valid until released
    with pytest.raises(TranslationError):
        p.view()
    with pytest.raises(TranslationError):
        p.read()
    v.release()
    assert reap_deferred_closes() == 0
    assert r.buf.closed
    r.close()  # twice is fine


def test_host_memory_lookup_spans_adjacent_regions() -> None:
    hm = HostMemory()
    a = HostRegion.anonymous(0x0, 0x1000, 0x10000)
    b = HostRegion.anonymous(0x100000, 0x2000, 0x11000)  # uaddr-adjacent, not gpa-adjacent
    c = HostRegion.anonymous(0x200000, 0x1000, 0x20000)
    for r in (c, a, b):
        hm.add(r)
    assert hm.regions() == [a, b, c]
    ps = hm.lookup(0x10F00, 0x200)
    assert [(p.region, p.offset, p.length) for p in ps] == [(a, 0xF00, 0x100), (b, 0, 0x100)]
    assert [p.gpa for p in ps] == [0xF00, 0x100000]
    with pytest.raises(TranslationError) as ei:
        hm.lookup(0x12F00, 0x200)
    assert ei.value.kind == "partial" and ei.value.addr == 0x13000
    with pytest.raises(TranslationError) as ei:
        hm.lookup(0x0, 0x10)
    assert ei.value.kind == "unmapped"
    assert hm.lookup(0x10000, 0) == []
    assert hm.uaddr_to_gpa(0x11010) == 0x100010
    assert hm.gpa_to_uaddr(0x100010) == 0x11010
    assert hm.uaddr_to_gpa(0x5) is None and hm.gpa_to_uaddr(0x300000) is None
    assert [p.uaddr for p in hm.lookup_gpa(0x200010, 4)] == [0x20010]
    assert hm.find(0x100000, 0x2000, 0x11000) is b
    assert hm.find(0x100000, 0x1000, 0x11000) is None


def test_host_memory_rejects_overlaps_and_tracks_generation() -> None:
    hm = HostMemory()
    a = HostRegion.anonymous(0x0, 0x2000, 0x10000)
    hm.add(a)
    g = hm.generation
    with pytest.raises(ValueError, match="user address"):
        hm.add(HostRegion.anonymous(0x100000, 0x1000, 0x11000))
    with pytest.raises(ValueError, match="guest-physical"):
        hm.add(HostRegion.anonymous(0x1000, 0x1000, 0x90000))
    with pytest.raises(ValueError, match="already"):
        hm.add(a)
    assert hm.generation == g
    hm.remove(a)
    assert hm.generation == g + 1 and len(hm) == 0
    with pytest.raises(ValueError):
        hm.remove(a)


def test_piece_write_truncates_and_reports() -> None:
    r = HostRegion.anonymous(0, 64, 0)
    p = Piece(r, 8, 4)
    assert p.write(b"abcdef") == 4
    assert p.write(b"zz", at=3) == 1
    assert r.read_gpa(8, 4) == b"abcz"
    assert p.write(b"x", at=4) == 0


def test_dirty_log_marks_pages() -> None:
    log = DirtyLog(bytearray(4))  # 32 pages
    log.mark(0x1FFF, 2)  # pages 1 and 2
    assert log.dirty_pages() == [1, 2]
    log.mark(0x8000, 0x10000)  # pages 8..23: whole bytes
    assert log.dirty_pages() == [1, 2, *range(8, 24)]
    assert log.is_dirty(0x8FFF) and not log.is_dirty(0x18000)
    log.mark(0, 0)
    log.mark(0x1F000, 0x3000)  # runs off the end: clipped, counted
    assert log.is_dirty(0x1F000) and log.overflows == 1
    assert not log.is_dirty(0x40000000)
    log.clear()
    assert log.dirty_pages() == []


def test_dirty_log_on_a_memfd_mmap(memfd: int) -> None:
    mm = mmap.mmap(memfd, 4096)
    try:
        log = DirtyLog(mm)
        log.mark(0x5000, 1)
        assert os.pread(memfd, 1, 0) == bytes([1 << 5])
    finally:
        mm.close()


def test_access_values_match_vhost_perm_bits() -> None:
    from backends.vdpa.iotlb import Perm

    assert int(Access.READ) == int(Perm.RO) and int(Access.WRITE) == int(Perm.WO)


def test_region_from_sealed_memfd_needs_no_size_check() -> None:
    """F_SEAL_SHRINK (QEMU's memory-backend-memfd default): the file can never shrink, so the
    region keeps no fd to re-check; an unsealed file keeps one and notices a shrink."""
    from backends.vdpa.memory import F_SEAL_GROW, F_SEAL_SHRINK

    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    plain = os.memfd_create("plain", os.MFD_CLOEXEC)
    try:
        for fd in (sealed, plain):
            os.ftruncate(fd, 0x10000)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        a = HostRegion.from_fd(sealed, 0, 0x10000, 0x7F00_0000_0000, 0)
        b = HostRegion.from_fd(plain, 0x10000, 0x8000, 0x7F00_0001_0000, 0x8000)
        assert a.sealed and a.backing_fd == -1 and a.to_dict()["seals"] & F_SEAL_SHRINK
        assert not b.sealed and b.backing_ok()
        os.ftruncate(plain, 0x8000)  # now ends where region b starts
        assert not b.backing_ok()
        with pytest.raises(OSError):
            os.ftruncate(sealed, 0)
        assert a.backing_ok()
        a.close()
        b.close()
        assert b.backing_fd == -1
    finally:
        os.close(sealed)
        os.close(plain)


def test_region_larger_than_its_file_is_refused() -> None:
    fd = os.memfd_create("small", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x1000)
        with pytest.raises(ValueError, match="needs mmap_offset"):
            HostRegion.from_fd(fd, 0, 0x2000, 0x7F00_0000_0000, 0)
        os.ftruncate(fd, 0)
        with pytest.raises(ValueError, match="needs mmap_offset"):
            HostRegion.from_fd(fd, 0, 0x1000, 0x7F00_0000_0000, 0)
    finally:
        os.close(fd)


def test_a_sealable_memfd_gets_sealed_against_shrinking() -> None:
    """Found by `make fuzz` (1 crash in ~2,000 cases): a shrink racing with ring work inside
    one callback, after the guard's fstat, still raised SIGBUS. A memfd that allows sealing is
    now sealed with F_SEAL_SHRINK when mapped, closing that window for it entirely."""
    from backends.vdpa.memory import F_SEAL_SHRINK

    fd = os.memfd_create("sealable", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 0x10000)
        r = HostRegion.from_fd(fd, 0, 0x10000, 0x7F00_0000_0000, 0)
        assert r.sealed and r.backing_fd == -1
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # the peer's copy cannot shrink it any more
        os.ftruncate(fd, 0x20000)  # growing stays allowed
        r.close()
    finally:
        os.close(fd)
