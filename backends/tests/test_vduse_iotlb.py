"""UPDATE_IOTLB -> IOTLB_GET_FD walk -> set_map diff, against the fake kernel: unchanged
entries keep their host mapping (same region, same mmap, same IOTLB mapping), changed ones are
replaced, and a range that cannot be fetched changes nothing."""

from __future__ import annotations

import errno

import pytest

from backends.tests.vduse_rig import Rig, tx_chain
from backends.vdpa.access import Access
from backends.vduse import uapi
from backends.vduse.fake_kernel import FakeMemory
from backends.vduse.uapi import IotlbEntry

RW = uapi.VDUSE_ACCESS_RW
RO = uapi.VDUSE_ACCESS_RO
MB = 1 << 20


def snapshot(rig: Rig) -> dict[int, tuple[int, int, object]]:
    """iova -> (mapping id, region id, the region's buffer object)."""
    out: dict[int, tuple[int, int, object]] = {}
    for m in rig.device.iotlb.entries():
        (piece,) = rig.device.host.lookup(m.uaddr, 1)
        out[m.iova] = (m.id, piece.region.id, piece.region.buf)
    return out


def test_walk_maps_every_entry(rig: Rig) -> None:
    a, b = rig.kernel.add_memory(2 * MB), rig.kernel.add_memory(MB)
    a.buf[0x1000:0x1004] = b"AAAA"
    b.buf[0x10:0x14] = b"BBBB"
    rid = rig.kernel.set_map([(0, MB, a, MB, RW), (4 * MB, MB, b, 0, RO), (MB, MB, a, 0, RW)])
    rig.ok(rid)
    maps = rig.device.iotlb.entries()
    assert [(m.iova, m.size, int(m.perm)) for m in maps] == [
        (0, MB, 3),
        (MB, MB, 3),
        (4 * MB, MB, 1),
    ]
    dma = rig.device.dma
    dma.iommu = True
    a.buf[MB : MB + 4] = b"aaaa"  # iova 0 is offset 1 MiB of a
    assert b"".join(p.read() for p in dma.translate(0, 4, Access.READ)) == b"aaaa"
    assert b"".join(p.read() for p in dma.translate(MB + 0x1000, 4, Access.READ)) == b"AAAA"
    assert b"".join(p.read() for p in dma.translate(4 * MB + 0x10, 4, Access.READ)) == b"BBBB"
    entry = rig.journal("vduse.iotlb")[-1]
    assert (entry["added"], entry["removed"], entry["kept"]) == (3, 0, 0)


def test_unchanged_entries_keep_their_mapping_and_mmap(rig: Rig) -> None:
    a, b = rig.kernel.add_memory(2 * MB), rig.kernel.add_memory(MB)
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RW), (MB, MB, a, MB, RW)]))
    before = snapshot(rig)
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RW), (MB, MB, a, MB, RW), (8 * MB, MB, b, 0, RW)]))
    after = snapshot(rig)
    for iova in (0, MB):
        assert after[iova] == before[iova], "an unchanged entry was remapped"
        assert after[iova][2] is before[iova][2]
    entry = rig.journal("vduse.iotlb")[-1]
    assert (entry["added"], entry["removed"], entry["kept"]) == (1, 0, 2)
    assert rig.journal("dma.set_map")[-1]["kept"] == 2
    # the same table again: nothing changes at all
    rig.ok(rig.kernel.update_iotlb())
    assert snapshot(rig) == after
    assert rig.journal("dma.set_map")[-1]["added"] == 0


def test_changed_entry_is_replaced_and_its_old_mapping_closed(rig: Rig) -> None:
    a, b = rig.kernel.add_memory(2 * MB), rig.kernel.add_memory(MB)
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RW), (MB, MB, a, MB, RW)]))
    before = snapshot(rig)
    old_region = rig.device.host.lookup(rig.device.iotlb.lookup(MB).uaddr, 1)[0].region  # type: ignore[union-attr]
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RW), (MB, MB, b, 0, RW)]))  # new backing file
    after = snapshot(rig)
    assert after[0] == before[0]
    assert after[MB][0] != before[MB][0] and after[MB][1] != before[MB][1]
    assert old_region.closed
    assert len(rig.device.host) == 2
    # permission change alone is a change too
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RO), (MB, MB, b, 0, RW)]))
    assert snapshot(rig)[0][0] != after[0][0]


def test_removed_entries_leave_host_memory(rig: Rig) -> None:
    a = rig.kernel.add_memory(2 * MB)
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RW), (MB, MB, a, MB, RW)]))
    rig.ok(rig.kernel.set_map([(MB, MB, a, MB, RW)]))
    assert [m.iova for m in rig.device.iotlb.entries()] == [MB]
    assert len(rig.device.host) == 1
    rig.ok(rig.kernel.set_map([]))
    assert rig.device.iotlb.entries() == [] and len(rig.device.host) == 0


def test_partial_range_update_keeps_entries_outside_it(rig: Rig) -> None:
    a = rig.kernel.add_memory(4 * MB)
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RW), (2 * MB, MB, a, 2 * MB, RW)]))
    before = snapshot(rig)
    # the kernel's table changes in [2M, 3M) only, and says so
    rig.kernel.iotlb = [(IotlbEntry(3 * MB, 2 * MB, 3 * MB - 1, RW), a.fd)]
    rig.ok(rig.kernel.update_iotlb(2 * MB, 3 * MB - 1))
    after = snapshot(rig)
    assert after[0] == before[0], "outside the range: untouched"
    assert after[2 * MB][0] != before[2 * MB][0]


def test_buffers_in_use_survive_a_map_change(rig: Rig) -> None:
    """A TX chain queued in memory that stays mapped goes out after an unrelated change."""
    rig.bring_up()
    rig.wait(lambda: rig.device.vqs[1].ready, "TX ready")
    assert rig.mem is not None
    other: FakeMemory = rig.kernel.add_memory(MB)
    before = snapshot(rig)
    tx_chain(rig.rings[1], b"\x55" * 100)
    rig.ok(rig.kernel.set_map([(0, 4 << 20, rig.mem, 0, RW), (64 * MB, MB, other, 0, RW)]))
    assert snapshot(rig)[0] == before[0]
    rig.kernel.kick(1)
    rig.wait(lambda: rig.wire.sent, "the TX frame queued before the change")
    assert rig.wire.sent[0][0] == b"\x55" * 100


def test_get_fd_failure_answers_failed_and_keeps_the_table(rig: Rig) -> None:
    a = rig.kernel.add_memory(MB)
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RW)]))
    before = snapshot(rig)
    rig.kernel.get_fd_errno = errno.EMFILE
    result, _ = rig.reply(rig.kernel.update_iotlb())
    assert result == uapi.VDUSE_REQ_RESULT_FAILED
    assert snapshot(rig) == before
    err = rig.journal("error.vduse")[-1]
    assert err["op"] == "update_iotlb" and "could not be fetched" in err["detail"]
    assert "previous mappings are kept" in err["detail"]
    rig.kernel.get_fd_errno = None
    rig.ok(rig.kernel.update_iotlb())  # and it recovers


def test_mmap_failure_answers_failed_and_keeps_the_table(rig: Rig) -> None:
    a, b = rig.kernel.add_memory(MB), rig.kernel.add_memory(MB)
    rig.ok(rig.kernel.set_map([(0, MB, a, 0, RW)]))
    before = snapshot(rig)
    rig.kernel.map_errno = errno.ENOMEM
    result, _ = rig.reply(rig.kernel.set_map([(0, MB, a, 0, RW), (MB, MB, b, 0, RW)]))
    assert result == uapi.VDUSE_REQ_RESULT_FAILED
    assert snapshot(rig) == before
    assert "cannot mmap" in rig.journal("error.vduse")[-1]["detail"]


@pytest.mark.parametrize(
    "entries, what",
    [
        ([(0, 0x2000 - 1, 0, RW), (0, 0x1000 - 1, 0, RW)], "entry"),  # no progress / backwards
        ([(0x1000, 0, 0, RW)], "entry"),  # start > last
    ],
)
def test_nonsense_entries_answer_failed(
    rig: Rig, entries: list[tuple[int, int, int, int]], what: str
) -> None:
    a = rig.kernel.add_memory(MB)
    rig.kernel.iotlb = [(IotlbEntry(off, s, last, p), a.fd) for s, last, off, p in entries]
    # make the fake return them in order, verbatim, whatever was asked
    seq = list(rig.kernel.iotlb)

    def get_fd(start: int, last: int) -> tuple[IotlbEntry, int]:
        import os

        if not seq:
            raise OSError(errno.EINVAL, "none")
        e, fd = seq.pop(0)
        return e, os.dup(fd)

    rig.kernel.iotlb_get_fd = get_fd  # type: ignore[method-assign]
    result, _ = rig.reply(rig.kernel.update_iotlb())
    assert result == uapi.VDUSE_REQ_RESULT_FAILED
    assert what in rig.journal("error.vduse")[-1]["detail"]
    assert rig.device.iotlb.entries() == []


def test_empty_range_answers_failed(rig: Rig) -> None:
    result, _ = rig.reply(rig.kernel.update_iotlb(0x2000, 0x1000))
    assert result == uapi.VDUSE_REQ_RESULT_FAILED
    assert "empty IOVA range" in rig.journal("error.vduse")[-1]["detail"]


def test_entry_at_the_top_of_the_address_space_ends_the_walk(rig: Rig) -> None:
    a = rig.kernel.add_memory(MB)
    top = (1 << 64) - MB
    rig.ok(rig.kernel.set_map([(top, MB, a, 0, RW)]))
    assert [m.iova for m in rig.device.iotlb.entries()] == [top]


def test_meta_remap_all_is_caught(rig: Rig) -> None:
    """The 'remap-all' fault (every change recreates every mapping) fails the keep check."""
    rig.device.faults.set("remap-all")
    with pytest.raises(AssertionError, match="remapped"):
        test_unchanged_entries_keep_their_mapping_and_mmap(rig)
