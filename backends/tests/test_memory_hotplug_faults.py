"""The memory-hotplug faults of the vhost-user memory table, over a real socket with memfds.

``ignore-rem-mem-reg`` (REM_MEM_REG acked, region kept) and ``mem-table-full-replace`` (every
SET_MEM_TABLE re-maps every region) each break exactly the invariant the qtest memory hotplug
suite checks; the clean backend keeps it. Also: GET_MAX_MEM_SLOTS reports at least 509, the
count below which QEMU gives virtio-mem a single memslot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backends.vdpa.faults import FAULTS
from backends.vhost_user import messages as m
from backends.vhost_user.messages import ProtocolFeature as PF
from qtests.qos.backend_thread import BackendThread
from qtests.qos.guest_memory import SharedGuestMemory
from qtests.qos.vhost_user_frontend import Frontend

DIMM_GPA = 0x1_0000_0000
DIMM_SIZE = 2 << 20


@pytest.fixture
def mem() -> Iterator[SharedGuestMemory]:
    g = SharedGuestMemory(4 << 20)
    try:
        yield g
    finally:
        g.close()


Started = tuple[BackendThread, Frontend]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Started]]:
    """A backend (in-process) with ``faults`` and a front-end past QEMU's init sequence."""
    opened: list[Started] = []

    def make(faults: list[str], mem_slots: bool = True) -> Started:
        sock = str(tmp_path / f"vu{len(opened)}.sock")
        b = BackendThread(sock, wire="null", faults=faults, offer_mem_slots=mem_slots)
        b.call(b.backend.start)
        fe = b.frontend()
        opened.append((b, fe))
        fe.init_like_qemu(2)
        return b, fe

    yield make
    for b, fe in reversed(opened):
        fe.close_init_fds()
        fe.close()
        b.close()


def _regions(b: BackendThread) -> list[tuple[int, int, int]]:
    return b.call(lambda: [(r.id, r.gpa, r.size) for r in b.backend.device.host.regions()])


def _mappings(b: BackendThread) -> list[tuple[int, int, int]]:
    return b.call(lambda: [(x.id, x.iova, x.size) for x in b.backend.device.iotlb.entries()])


def test_faults_are_documented() -> None:
    for name in ("ignore-rem-mem-reg", "mem-table-full-replace"):
        assert "memory hotplug suite" in FAULTS[name]


@pytest.mark.parametrize("fault", [False, True])
def test_ignore_rem_mem_reg_keeps_the_region(
    make: Callable[..., Started], mem: SharedGuestMemory, fault: bool
) -> None:
    b, fe = make(["ignore-rem-mem-reg"] if fault else [])
    assert fe.has(PF.CONFIGURE_MEM_SLOTS)
    assert fe.set_mem_table(mem, ack=True) == 0
    base = _regions(b)
    slot = mem.add_slot(DIMM_GPA, DIMM_SIZE, name="dimm")
    assert fe.add_mem_reg(slot, ack=True) == 0
    assert [g for _, g, _ in _regions(b)] == [0, DIMM_GPA]
    mark = b.mark()
    assert fe.rem_mem_reg(slot.region(), ack=True) == 0  # acked either way
    if fault:
        assert not b.query(["mem.remove", "dma.unmap"], mark)
        assert [g for _, g, _ in _regions(b)] == [0, DIMM_GPA]
        assert DIMM_GPA in [iova for _, iova, _ in _mappings(b)]
    else:
        assert [e["gpa"] for e in b.query(["mem.remove"], mark)] == [DIMM_GPA]
        assert _regions(b) == base
        assert DIMM_GPA not in [iova for _, iova, _ in _mappings(b)]
    assert not b.query(["error."], mark)


@pytest.mark.parametrize("fault", [False, True])
def test_mem_table_full_replace_renews_every_region(
    make: Callable[..., Started], mem: SharedGuestMemory, fault: bool
) -> None:
    b, fe = make(["mem-table-full-replace"] if fault else [], mem_slots=False)
    assert not fe.has(PF.CONFIGURE_MEM_SLOTS)
    assert fe.set_mem_table(mem, ack=True) == 0
    before, maps = _regions(b), _mappings(b)
    mem.add_slot(DIMM_GPA, DIMM_SIZE, name="dimm")
    mark = b.mark()
    assert fe.set_mem_table(mem, ack=True) == 0
    after = _regions(b)
    assert [(g, s) for _, g, s in after] == [(0, mem.slots[0].size), (DIMM_GPA, DIMM_SIZE)]
    (table,) = b.query(["mem.table"], mark)
    if fault:
        assert after[0][0] != before[0][0]  # the untouched region was re-mapped
        assert table["kept"] == [] and len(table["added"]) == 2 and table["removed"]
    else:
        assert after[0] == before[0]
        assert table["kept"] == [before[0][0]] and len(table["added"]) == 1
    # the IOTLB diff is the same either way: identity entries are keyed by gpa/size/uaddr
    assert _mappings(b)[0] == maps[0]
    assert not b.query(["error."], mark)


def test_max_mem_slots_lets_qemu_split_virtio_mem(make: Callable[..., Started]) -> None:
    _, fe = make([])
    assert fe.get_u64(m.Request.GET_MAX_MEM_SLOTS) >= 509
