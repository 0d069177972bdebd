"""Migration that meets work in progress: issue 15, item 3.

`rx_taken_at_switchover` runs on a started `MigrationPair` (source driver at DRIVER_OK,
destination waiting; split ring): the source backend A has taken RX buffers (popped, not
filled: monitor ``hold-rx``, a device that prefetched buffers for frames still on their way)
when QEMU stops it for the switchover. What must hold: A gives them back before it answers
GET_VRING_BASE (its reply counts only the buffers it used: virtio's "last_avail_idx" is what
the device consumed, and QEMU checks ``last_avail - used <= size`` on load), so the destination
backend B fills exactly those buffers first. Shown from the guest's memory: the used ring's
first entries after the switchover name the very heads A had taken, in avail order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .acpi_memhp import STATUS_REMOVE_EVENT, AcpiMemoryHotplug
from .frames import PEER_MAC, mac_bytes, make_frame
from .inflight_memory import (
    Frames,
    backend_mappings,
    check_kept,
    dimm_key,
    expect_memory_change,
    memory_messages,
    tx_until_sentinel,
)
from .machine import QemuMachine
from .memory_devices import DimmHotplug
from .migration import MigrationPair, PrecopyHold
from .qmp import QmpError
from .testbed import GUEST_MAC, Testbed
from .virtio_net import VirtioNetError
from .virtqueue import VirtqueueError
from .waiting import WaitTimeout, poll_until

RX_VQ = 0
STREAM = 0x33
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


def _rx_frame(seq: int) -> bytes:
    return make_frame(seq, 100 + 97 * seq, stream=STREAM, dst=mac_bytes(GUEST_MAC), src=PEER_MAC)


def rx_taken_at_switchover(pair: MigrationPair, held: int = 4) -> None:
    src, dst = pair.src, pair.dst
    a, b = src.backend, dst.backend
    assert a is not None and b is not None
    net = pair.net
    rxq = net.rxq[0]
    first = _rx_frame(0)
    src.peer.send(first)
    assert net.recv(0, 5.0, refill=False).data == first, "RX through A before the migration"
    used_before = rxq.device_used_idx()
    got = a.cmd("hold-rx", count=held)["held"]
    assert got == held, f"A took {got} RX buffers, wanted {held}"
    # the heads A took: the next entries of the avail ring, in order
    qt = net.qt
    taken = [
        U16.unpack(qt.read(rxq.avail + 4 + 2 * ((used_before + i) % rxq.size), 2))[0]
        for i in range(held)
    ]
    mark_a, mark_b = a.mark(), b.mark()
    pair.migrate()
    frames = [_rx_frame(1 + i) for i in range(held)]
    for f in frames:
        dst.peer.send(f)
    try:
        poll_until(
            lambda: (rxq.device_used_idx() - used_before) & 0xFFFF >= held,
            5.0,
            f"B filling {held} RX buffers",
        )
    except WaitTimeout as e:
        raise AssertionError(f"RX on the destination: {e}") from e
    qt = net.qt  # the destination's qtest connection now
    used_heads = [
        USED_ELEM.unpack(qt.read(rxq.used + 4 + 8 * ((used_before + i) % rxq.size), 8))[0]
        for i in range(held)
    ]
    assert used_heads == taken, (
        f"B filled buffers {used_heads}, not the ones A had taken {taken}: B started past "
        "them (A counted buffers it never filled)"
    )
    g = [e for e in a.journal(["vq.get_state"], mark_a) if e["vq"] == RX_VQ][-1]
    assert g["last_avail_idx"] == used_before, (
        f"A's GET_VRING_BASE for RX says {g['last_avail_idx']}, but A used exactly "
        f"{used_before} buffers ({held} taken, unfilled)"
    )
    for i, f in enumerate(frames):
        try:
            rx = net.recv(0, 5.0, refill=False)
        except (VirtqueueError, VirtioNetError, WaitTimeout) as e:
            raise AssertionError(f"RX frame {i} on the destination: {e}") from e
        assert rx.data == f, f"RX frame {i} on the destination differs"
    s = [e for e in b.journal(["vq.set_state"], mark_b) if e["vq"] == RX_VQ][0]
    assert s["last_avail_idx"] == g["last_avail_idx"], (s, g)


# ---------------------------------------------------------------------------- hotplug x migration
#
# Both scenarios run on either transport (a `MigrationPair` over vhost-user, or an x-svq=on
# pair over vhost-vdpa: qtests/qos/svq_migration.py `start_svq_pair`). What differs is only how
# a DIMM change reaches the device (`expect_memory_change`: vhost-user REM_MEM_REG /
# ADD_MEM_REG; vhost-vdpa a VDUSE UPDATE_IOTLB whose set_map diff is exactly the DIMM, at the
# IOVA `dimm_key` names) and what the source device sees when QEMU stops it.
#
# Over vhost-vdpa (QEMU 10.0, x-svq=on, VDUSE on Linux 6.12), from the lane runs and the sources:
# * device_del only raises the ACPI remove event (hw/acpi/memory_hotplug.c
#   ``acpi_memory_unplug_request_cb``: is_removing + SCI); the DIMM stays in the address space,
#   so QEMU's vhost-vdpa listener sees nothing: no UPDATE_IOTLB reaches the device. The memory
#   goes only at _EJ0 (``acpi_memory_hotplug_write`` -> ``pc_dimm_unplug`` -> the listener's
#   ``region_del``: VHOST_IOTLB_INVALIDATE of the DIMM's IOVA inside a batch; the kernel's
#   vhost-vdpa calls VDUSE's ``set_map`` at BATCH_END and VDUSE sends one UPDATE_IOTLB).
# * With shadow virtqueues the device never sees GPAs: QEMU allocates IOVAs from its own IOVA
#   tree (`dimm_key`). Observed: shadow rings at IOVA 0x1000.., guest RAM sections from 0x7000
#   on, the DIMM right after base RAM (0x10017000 with 256 MiB of RAM, 0x8017000 with 128 MiB;
#   its GPA is 4 GiB).
# * At the switchover the source device is reset (SET_STATUS 0: no VHOST_BACKEND_F_SUSPEND),
#   then four UPDATE_IOTLB unmap the shadow rings (``vhost_vdpa_svqs_stop``), SET_STATUS 0 and
#   ACKNOWLEDGE|DRIVER again, and one UPDATE_IOTLB unmaps every guest RAM section at once, the
#   DIMM among them: ``vhost_vdpa_reset_status`` unregisters the memory listener. That is the
#   device stopping, not a remove.
# * The destination device gets its table only when QEMU starts it after the switchover:
#   FEATURES_OK, four UPDATE_IOTLB for the shadow rings, one for all RAM sections (the
#   cold-plugged DIMM included), DRIVER_OK.
# * device_add while a migration runs is refused before any device exists (system/qdev-monitor.c
#   ``qdev_device_add_from_qdict``: "device_add not allowed while migrating" while
#   ``migration_is_running()``); device_del is refused the same way (``qdev_unplug``) unless the
#   device allows unplug during migration, so a DIMM remove can only be pending from before the
#   migration, as in `migrate_with_unplug_pending`.


def idle_dimm_hooks(
    size: int, ident: str = "dimm1"
) -> tuple[Callable[[Testbed], None], Callable[[QemuMachine], None]]:
    """(before_init, customize) for `MigrationPair.start_source` / ``start_destination``: an
    idle DIMM (nothing of the driver in it) plugged on the source before the driver starts
    (the OSPM accepts it), cold-plugged at the same address on the destination."""

    dimm: dict[str, int] = {}

    def plug(tb: Testbed) -> None:
        assert tb.machine is not None
        hp = DimmHotplug(tb.qmp, AcpiMemoryHotplug(tb.machine.qtest, tb.machine.slots))
        dimm["addr"] = hp.plug(size, ident=ident).addr

    def cold_plug(m: QemuMachine) -> None:
        m.add_object("memory-backend-memfd", id=f"{ident}-mem", size=size, share=True)
        m.add_device("pc-dimm", id=ident, memdev=f"{ident}-mem", addr=dimm["addr"])

    return plug, cold_plug


def _memory_changes(tb: Testbed, since: int) -> list[str]:

    return memory_messages(tb, since)[0]


def migrate_with_unplug_pending(pair: MigrationPair, dimm_id: str) -> dict[str, object]:
    """``device_del`` of an idle DIMM is pending (QEMU flagged the ACPI remove event, the
    guest has not ejected) when the migration starts.

    Observed with QEMU 10: the migration is not refused and completes, but the pending remove
    does not travel: the ACPI memory-hotplug vmstate (hw/acpi/memory_hotplug.c,
    ``vmstate_memhp_sts``) carries is_enabled / is_inserting / _OST, not is_removing, so the
    destination's slot shows no remove event and no DEVICE_DELETED will come by itself. A
    guest that saw the event before the switchover and ejects on the destination does unplug
    it there: B is told (vhost-user REM_MEM_REG; vhost-vdpa UPDATE_IOTLB whose set_map diff
    unmaps exactly the DIMM, nothing stopped or reset) and unmaps the DIMM (/proc/PID/maps),
    every other mapping of B stays where it was. A was never told while it ran: the pending
    remove changes no memory (vhost-user: no REM_MEM_REG at all; vhost-vdpa: no UPDATE_IOTLB
    before QEMU stopped the device). Traffic is exact after it. Returns what happened (for
    the report)."""

    src, dst = pair.src, pair.dst
    a, b = src.backend, dst.backend
    assert a is not None and b is not None and src.machine is not None
    dev = DimmHotplug(src.qmp).device(dimm_id)
    assert dev.slot is not None
    mark_a = a.mark()
    src.qmp.command("device_del", id=dimm_id)
    AcpiMemoryHotplug(src.machine.qtest, src.machine.slots).wait_remove_request(dev.slot)
    pending = _memory_changes(src, mark_a)
    assert not pending, f"A was told of a memory change while the remove was pending: {pending}"
    mark_mig = a.mark()
    stats = pair.migrate(timeout=120.0)
    if src.transport == "vhost-user":
        got = [e["request"] for e in a.journal(["vhost.msg"], mark_a)]
        assert "REM_MEM_REG" not in got, "A got REM_MEM_REG although the guest never ejected"
    assert dst.machine is not None
    ospm = AcpiMemoryHotplug(dst.machine.qtest, dst.machine.slots)
    status = ospm.status(dev.slot)
    m0 = backend_mappings(dst)
    gone = {k[0] for k, m in m0.items() if m.size == dev.size}
    assert gone, f"B does not map the DIMM after the migration: {list(m0.values())}"
    key = dimm_key(dst, dev)
    mark_b = b.mark()
    after = ospm.eject_now(dev.slot)  # the guest ejects what it was asked to before
    dst.qmp.wait_event("DEVICE_DELETED", 5.0, match={"device": dimm_id})
    assert not after.enabled, f"slot {dev.slot} still enabled after the eject: {after}"
    check_kept(m0, backend_mappings(dst), "B after the eject on the destination", gone=gone)
    expect_memory_change(
        dst, mark_b, "the eject on the destination", vhost_user=("REM_MEM_REG",), key=key,
        plug=False,
    )  # fmt: skip
    frames = Frames()
    sent = [frames.next() for _ in range(4)]
    pair.net.send_burst(sent, wait=False)
    tx_until_sentinel(dst, sent, frames, "TX on the destination after the eject", 30.0, rarps=True)
    return {
        "transport": src.transport,
        "downtime_ms": stats.downtime_ms,
        "total_time_ms": stats.total_time_ms,
        "destination_slot_status_after_migration": status,
        "remove_event_migrated": bool(status & STATUS_REMOVE_EVENT),
        "source_messages_at_the_switchover": _memory_changes(src, mark_mig),
        "destination_messages_for_the_eject": _memory_changes(dst, mark_b),
        "dimm_iova_on_the_destination": hex(key[0]),
    }


def device_add_during_migration(pair: MigrationPair, size: int) -> dict[str, object]:
    """``device_add`` of a DIMM while the migration is in precopy. QEMU 10 refuses it with a
    clear error ("device_add not allowed while migrating": system/qdev-monitor.c
    ``qdev_device_add_from_qdict`` checks ``migration_is_running``);
    nothing reaches the source device (vhost-user: no ADD_MEM_REG; vhost-vdpa: no
    UPDATE_IOTLB), the migration completes, and the DIMM can be added on the destination
    afterwards: B is told (vhost-user ADD_MEM_REG; vhost-vdpa UPDATE_IOTLB whose set_map diff
    maps exactly the DIMM) and maps it as one new memfd mapping, every other mapping of B
    where it was; traffic is exact after it. Returns QEMU's error message and what
    happened."""

    src, dst = pair.src, pair.dst
    a, b = src.backend, dst.backend
    assert a is not None and b is not None
    net = pair.net
    scratch = net.alloc.alloc(1024 * 4096, tag="precopy scratch")
    hold = PrecopyHold(pair, scratch, pages=1024)
    hold.arm()
    pair.begin()
    hold.wait_first_pass(timeout=120.0)
    mark_a = a.mark()
    memdev = {"qom-type": "memory-backend-memfd", "id": "late-mem", "size": size, "share": True}
    src.qmp.command("object-add", memdev)
    refused = ""
    try:
        src.qmp.command("device_add", driver="pc-dimm", id="late", memdev="late-mem")
    except QmpError as e:
        refused = str(e)
    told = _memory_changes(src, mark_a)  # the device answered before QEMU's reply
    hold.still_active()
    hold.release()
    stats = pair.finish(timeout=120.0)
    net.alloc.free(scratch)
    assert refused, "QEMU accepted device_add during the migration"
    assert "migrat" in refused, f"device_add refused for another reason: {refused}"
    assert not told, f"A was told of a memory change by the refused device_add: {told}"
    # after the migration the destination takes the DIMM
    m0 = backend_mappings(dst)
    mark_b = b.mark()
    dst.qmp.command("object-add", memdev)
    dst.qmp.command("device_add", driver="pc-dimm", id="late", memdev="late-mem")
    dev = DimmHotplug(dst.qmp).device("late")
    m1 = backend_mappings(dst)
    check_kept(m0, m1, "B after the DIMM added on the destination")
    new = [m for k, m in m1.items() if k not in m0]
    assert [m.size for m in new] == [size], (
        f"B should map the DIMM as one {size:#x}-byte memfd mapping, added {new}"
    )
    expect_memory_change(
        dst, mark_b, "the DIMM added on the destination", vhost_user=("ADD_MEM_REG",),
        key=dimm_key(dst, dev), plug=True,
    )  # fmt: skip
    frames = Frames()
    sent = [frames.next() for _ in range(3)]
    net.send_burst(sent, wait=False)
    tx_until_sentinel(
        dst, sent, frames, "TX on the destination after the late DIMM", 30.0, rarps=True
    )
    return {
        "transport": src.transport,
        "refused": refused,
        "downtime_ms": stats.downtime_ms,
        "total_time_ms": stats.total_time_ms,
        "destination_messages_for_the_plug": _memory_changes(dst, mark_b),
        "dimm_iova_on_the_destination": hex(dimm_key(dst, dev)[0]),
    }
