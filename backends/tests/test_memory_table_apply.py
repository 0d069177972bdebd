"""The vhost-user memory table applied to the device: mmap offsets, the ``stale-region-offset``
fault, ``duration_us`` on the transport's memory-change journal entries and the per-region
``written`` counter (evidence of where the device wrote packet data)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from backends.tests.conftest import EchoPersonality
from backends.vdpa.device import VdpaDevice
from backends.vdpa.faults import FAULTS, Faults
from backends.vdpa.journal import Journal
from backends.vhost_user.memory_table import MemoryTable
from backends.vhost_user.messages import MemRegion

PAGE = 4096
SIZE = 16 * PAGE
GPA = 0x1_0000_0000
UADDR = 0x7F00_0000_0000


def make_table(faults: tuple[str, ...] = ()) -> MemoryTable:
    journal = Journal()
    dev = VdpaDevice(EchoPersonality(), journal, Faults(faults, journal=journal))
    return MemoryTable(dev)


@pytest.fixture
def memfd() -> Iterator[int]:
    """A memfd of two regions' worth: 0x11 bytes in the first half, 0x22 in the second."""
    fd = os.memfd_create("table-test")
    try:
        os.write(fd, b"\x11" * SIZE + b"\x22" * SIZE)
        yield fd
    finally:
        os.close(fd)


def add_second_half(table: MemoryTable, memfd: int) -> None:
    """ADD_MEM_REG of the memfd's second half (mmap_offset = SIZE), as QEMU sends a region of
    a RAM block that does not start at offset 0 of its fd."""
    table.add(MemRegion(GPA, SIZE, UADDR, SIZE), os.dup(memfd), "ADD_MEM_REG")


def test_stale_region_offset_is_documented() -> None:
    assert "memory hotplug suite" in FAULTS["stale-region-offset"]


@pytest.mark.parametrize("fault", [False, True])
def test_region_is_mapped_at_its_mmap_offset(memfd: int, fault: bool) -> None:
    table = make_table(("stale-region-offset",) if fault else ())
    add_second_half(table, memfd)
    dma = table.device.dma
    want, wrong = (b"\x11", b"\x22") if fault else (b"\x22", b"\x11")
    assert dma.read(GPA + 5 * PAGE, 16) == want * 16
    dma.write(GPA + PAGE, b"\x33" * 8)
    assert os.pread(memfd, 8, (0 if fault else SIZE) + PAGE) == b"\x33" * 8
    assert os.pread(memfd, 8, (SIZE if fault else 0) + PAGE) == wrong * 8
    # the fault is silent: the journal and the region report QEMU's offset
    (entry,) = table.device.journal.query(["mem.add"])
    assert entry["mmap_offset"] == SIZE
    assert [r.mmap_offset for r in table.regions()] == [SIZE]


def test_add_and_remove_entries_carry_duration(memfd: int) -> None:
    table = make_table()
    journal = table.device.journal
    add_second_half(table, memfd)
    table.remove(MemRegion(GPA, SIZE, UADDR, SIZE), "REM_MEM_REG")
    entries = journal.query(["mem.add", "mem.remove"])
    assert [e["kind"] for e in entries] == ["mem.add", "mem.remove"]
    for e in entries:
        assert isinstance(e["duration_us"], float) and 0 < e["duration_us"] < 5e6, e


def test_set_mem_table_entries_carry_duration(memfd: int) -> None:
    table = make_table()
    journal = table.device.journal
    regions = [MemRegion(0, SIZE, UADDR, 0), MemRegion(GPA, SIZE, UADDR + SIZE, SIZE)]
    table.set_table(regions, [os.dup(memfd), os.dup(memfd)], "SET_MEM_TABLE")
    entries = journal.query(["mem.add", "dma.set_map"])
    assert sorted(e["kind"] for e in entries) == ["dma.set_map", "mem.add", "mem.add"]
    assert all(e["duration_us"] > 0 for e in entries), entries
    # outside a transport request (device-level calls) nothing is invented
    table.device.set_map([])
    assert "duration_us" not in journal.query(["dma.set_map"])[-1]


def test_written_counts_device_writes_per_region(memfd: int) -> None:
    table = make_table()
    add_second_half(table, memfd)
    (region,) = table.regions()
    dma = table.device.dma
    dma.write(GPA, b"x" * 100)
    dma.write(GPA + SIZE - 10, b"y" * 10)
    dma.read(GPA, 64)  # reads do not count
    assert region.written == 110
    assert region.to_dict()["written"] == 110
