"""Scenario 1: memory hotplug map diffs, end to end (real QEMU 10 + the real backend process),
on every memory path: vhost-user with mem slots (``slots``), vhost-user with full tables
(``table``) and vhost-vdpa through VDUSE (``iotlb``, in the vdpa lane). The scenarios and what
they assert live in :mod:`qtests.qos.hotplug_scenarios`; the meta-tests run them against a
backend with a fault (``remap-all``, ``keep-stale-map``, ``ignore-rem-mem-reg``,
``mem-table-full-replace``, ``stale-region-offset``) and expect that failure.

QEMU 10 behaviour these tests pin down: pc-dimm plug sends one ADD_MEM_REG (NEED_REPLY) at
device_add, no guest action needed; unplug waits for the OSPM's eject, which sends one
REM_MEM_REG from within the eject I/O write; without CONFIGURE_MEM_SLOTS each of them is a
full SET_MEM_TABLE; the rings are never stopped for it. Over vhost-vdpa the same change is an
IOTLB batch that VDUSE hands the device as UPDATE_IOTLB of the whole range, and a driver reset
unmaps everything (the listener goes with the device's start). virtio-mem with
dynamic-memslots=on maps 1 GiB memslots as they gain their first plugged block and unmaps them
when their last block goes, provided a vhost-user backend reports >= 509 memory slots.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

from qtests.qos.hotplug_scenarios import (
    IOTLB,
    SEED,
    SLOTS,
    TABLE,
    add_virtio_mem,
    offset_dimm_scenario,
    plug_unplug_scenario,
    random_sequence_scenario,
    start,
    virtio_mem_scenario,
    virtio_mem_testbed,
)
from qtests.qos.machine import QemuLaunchError, QemuMachine
from qtests.qos.qmp import QmpTimeout
from qtests.qos.testbed import Testbed
from qtests.qos.waiting import poll_until

pytestmark = pytest.mark.qemu

#: The memory paths; the vhost-vdpa one runs in the vdpa lane.
VDPA_IOTLB = pytest.param(IOTLB, id="vhost-vdpa", marks=pytest.mark.vdpa_lane)
MODES = [SLOTS, TABLE, VDPA_IOTLB]


@pytest.mark.parametrize("mode", MODES)
def test_dimm_plug_and_unplug(make_testbed: Callable[..., Testbed], mode: str) -> None:
    plug_unplug_scenario(start(make_testbed, mode), mode)


@pytest.mark.parametrize("mode", [SLOTS, TABLE])
def test_random_plug_unplug_sequence(make_testbed: Callable[..., Testbed], mode: str) -> None:
    random_sequence_scenario(start(make_testbed, mode), mode, SEED)


def test_dimm_with_mmap_offset(make_testbed: Callable[..., Testbed]) -> None:
    offset_dimm_scenario(start(make_testbed, SLOTS))


# ---------------------------------------------------------------------------- meta-tests
#: How remap-all shows: vhost-user keeps the regions and remaps the IOTLB (new ids); over
#: vhost-vdpa the device also unmaps and maps every entry for a change that added one.
REMAP_ALL = {
    SLOTS: "the change did not touch were replaced",
    TABLE: "the change did not touch were replaced",
    IOTLB: r"the set_map diffs mapped \[0x0\+0xc0000, .* and unmapped \[0x0\+0xc0000",
}


@pytest.mark.parametrize("mode", MODES)
def test_remap_all_is_caught(make_testbed: Callable[..., Testbed], mode: str) -> None:
    tb = start(make_testbed, mode, faults=["remap-all"])
    with pytest.raises(AssertionError, match=REMAP_ALL[mode]):
        plug_unplug_scenario(tb, mode)


@pytest.mark.parametrize("mode", [VDPA_IOTLB])
def test_keep_stale_map_is_caught(make_testbed: Callable[..., Testbed], mode: str) -> None:
    """The device answers UPDATE_IOTLB without fetching the table: the DIMM never reaches its
    map, which no longer equals QEMU's."""
    tb = start(make_testbed, mode, faults=["keep-stale-map"])
    with pytest.raises(AssertionError, match="set_map diffs mapped \\[\\] and unmapped"):
        plug_unplug_scenario(tb, IOTLB)


def test_ignore_rem_mem_reg_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    tb = start(make_testbed, SLOTS, faults=["ignore-rem-mem-reg"])
    with pytest.raises(AssertionError, match="backend map .* != QEMU's base RAM"):
        random_sequence_scenario(tb, SLOTS, SEED)


def test_stale_region_offset_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    """The backend maps every region from offset 0 of its fd: the DIMM's buffers are read
    32 MiB before the bytes the guest wrote (base RAM is off by 1 MiB too, unused here)."""
    tb = start(make_testbed, SLOTS, faults=["stale-region-offset"])
    with pytest.raises(AssertionError, match="guest TX frames arrived changed"):
        offset_dimm_scenario(tb)


def test_mem_table_full_replace_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    tb = start(make_testbed, TABLE, faults=["mem-table-full-replace"])
    with pytest.raises(AssertionError, match="backend mem.add entries .* expected one for"):
        plug_unplug_scenario(tb, TABLE)


# ---------------------------------------------------------------------------- virtio-mem
def test_virtio_mem_dynamic_memslots(make_testbed: Callable[..., Testbed]) -> None:
    virtio_mem_scenario(virtio_mem_testbed(make_testbed))


def test_virtio_mem_remap_all_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    tb = virtio_mem_testbed(make_testbed, faults=["remap-all"])
    with pytest.raises(AssertionError, match="the change did not touch were replaced"):
        virtio_mem_scenario(tb)


@pytest.mark.parametrize("mode", [VDPA_IOTLB])
def test_virtio_mem_refused_with_vhost_vdpa(
    make_testbed: Callable[..., Testbed], mode: str
) -> None:
    """QEMU's refusal: vhost-vdpa pins guest memory and disables RAM discard
    (ram_block_discard_disable), which virtio-mem needs: QEMU exits at start."""
    with pytest.raises(QemuLaunchError, match="Discarding RAM is disabled"):
        virtio_mem_testbed(make_testbed, mode)


def test_virtio_mem_refuses_a_later_backend_with_few_memslots(
    make_testbed: Callable[..., Testbed],
) -> None:
    """QEMU's refusal: once virtio-mem decided its memslots, hot-adding a vhost-user backend
    with fewer than 509 memslots (here: no CONFIGURE_MEM_SLOTS, 8) fails with this message --
    and netdev_add never returns: QEMU reconnects and fails again in a loop."""
    tb = make_testbed(backend_args=["--no-mem-slots"], maxmem="4G")
    backend = tb.start_backend()
    m = add_virtio_mem(QemuMachine(tb.log_dir, name="qemu-vmem", maxmem="4G"))
    tb.machine = m.launch()  # the testbed shuts it down
    m.qmp.command(
        "chardev-add",
        id="c1",
        backend={
            "type": "socket",
            "data": {"addr": {"type": "unix", "data": {"path": backend.socket}}, "server": False},
        },
    )
    refusal = (
        "some memory device (like virtio-mem) decided how many memory slots to use based on "
        "the overall number of memory slots; this vhost backend would further restricts the "
        "overall number of memory slots"
    )
    with contextlib.suppress(QmpTimeout):  # the expected outcome: the monitor is stuck
        m.qmp.command("netdev_add", type="vhost-user", id="n1", chardev="c1", timeout=1.0)
        pytest.fail("netdev_add returned")
    poll_until(lambda: refusal in m.stderr_text(), 5.0, "QEMU's memslot refusal on stderr")
    assert "Try plugging this vhost backend before plugging such memory devices." in (
        m.stderr_text()
    )
    m.shutdown(quit_timeout=0.5, term_timeout=0.5)
