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

from .frames import PEER_MAC, mac_bytes, make_frame
from .migration import MigrationPair
from .testbed import GUEST_MAC
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
def migrate_with_unplug_pending(pair: MigrationPair, dimm_id: str) -> dict[str, object]:
    """``device_del`` of an idle DIMM is pending (QEMU flagged the ACPI remove event, the
    guest has not ejected) when the migration starts.

    Observed with QEMU 10: the migration is not refused and completes, but the pending remove
    does not travel: the ACPI memory-hotplug vmstate (hw/acpi/memory_hotplug.c,
    ``vmstate_memhp_sts``) carries is_enabled / is_inserting / _OST, not is_removing, so the
    destination's slot shows no remove event and no DEVICE_DELETED will come by itself. A
    guest that saw the event before the switchover and ejects on the destination does unplug
    it there: B gets REM_MEM_REG and unmaps the DIMM; A never got one. Traffic is exact
    after it. Returns what happened (for the report)."""
    from .acpi_memhp import STATUS_REMOVE_EVENT, AcpiMemoryHotplug
    from .inflight_memory import Frames, backend_mappings, check_kept, tx_until_sentinel
    from .memory_devices import DimmHotplug

    src, dst = pair.src, pair.dst
    a, b = src.backend, dst.backend
    assert a is not None and b is not None and src.machine is not None
    dev = DimmHotplug(src.qmp).device(dimm_id)
    assert dev.slot is not None
    mark_a = a.mark()
    src.qmp.command("device_del", id=dimm_id)
    AcpiMemoryHotplug(src.machine.qtest, src.machine.slots).wait_remove_request(dev.slot)
    pair.migrate()
    assert "REM_MEM_REG" not in [e["request"] for e in a.journal(["vhost.msg"], mark_a)], (
        "A got REM_MEM_REG although the guest never ejected the DIMM"
    )
    assert dst.machine is not None
    ospm = AcpiMemoryHotplug(dst.machine.qtest, dst.machine.slots)
    status = ospm.status(dev.slot)
    m0 = backend_mappings(dst)
    gone = {k[0] for k, m in m0.items() if m.size == dev.size}
    mark_b = b.mark()
    after = ospm.eject_now(dev.slot)  # the guest ejects what it was asked to before
    dst.qmp.wait_event("DEVICE_DELETED", 5.0, match={"device": dimm_id})
    assert not after.enabled, f"slot {dev.slot} still enabled after the eject: {after}"
    msgs = [e["request"] for e in b.journal(["vhost.msg"], mark_b)]
    assert "REM_MEM_REG" in msgs, f"B got no REM_MEM_REG for the eject: {msgs}"
    check_kept(m0, backend_mappings(dst), "B after the eject on the destination", gone=gone)
    frames = Frames()
    sent = [frames.next() for _ in range(4)]
    pair.net.send_burst(sent, wait=False)
    tx_until_sentinel(dst, sent, frames, "TX on the destination after the eject", rarps=True)
    return {
        "destination_slot_status_after_migration": status,
        "remove_event_migrated": bool(status & STATUS_REMOVE_EVENT),
        "destination_requests_for_the_eject": msgs,
    }


def device_add_during_migration(pair: MigrationPair, size: int) -> str:
    """``device_add`` of a DIMM while the migration is in precopy. QEMU 10 refuses it (a
    migration is active: qdev_device_add checks ``migration_is_idle``) with a clear error; A
    gets no ADD_MEM_REG, the migration completes, and the DIMM can be added on the
    destination afterwards (B gets ADD_MEM_REG). Returns QEMU's error message."""
    from .inflight_memory import Frames, tx_until_sentinel
    from .migration import PrecopyHold
    from .qmp import QmpError

    src, dst = pair.src, pair.dst
    a, b = src.backend, dst.backend
    assert a is not None and b is not None
    net = pair.net
    scratch = net.alloc.alloc(1024 * 4096, tag="precopy scratch")
    hold = PrecopyHold(pair, scratch, pages=1024)
    hold.arm()
    mark_a = a.mark()
    pair.begin()
    hold.wait_first_pass()
    src.qmp.command(
        "object-add",
        {"qom-type": "memory-backend-memfd", "id": "late-mem", "size": size, "share": True},
    )
    refused = ""
    try:
        src.qmp.command("device_add", driver="pc-dimm", id="late", memdev="late-mem")
    except QmpError as e:
        refused = str(e)
    hold.still_active()
    hold.release()
    pair.finish()
    net.alloc.free(scratch)
    assert refused, "QEMU accepted device_add during the migration"
    assert "migrat" in refused, f"device_add refused for another reason: {refused}"
    assert "ADD_MEM_REG" not in [e["request"] for e in a.journal(["vhost.msg"], mark_a)]
    # after the migration the destination takes the DIMM
    mark_b = b.mark()
    dst.qmp.command(
        "object-add",
        {"qom-type": "memory-backend-memfd", "id": "late-mem", "size": size, "share": True},
    )
    dst.qmp.command("device_add", driver="pc-dimm", id="late", memdev="late-mem")
    msgs = [e["request"] for e in b.journal(["vhost.msg"], mark_b)]
    assert "ADD_MEM_REG" in msgs, f"B got no ADD_MEM_REG for the DIMM added after: {msgs}"
    frames = Frames()
    sent = [frames.next() for _ in range(3)]
    net.send_burst(sent, wait=False)
    tx_until_sentinel(dst, sent, frames, "TX on the destination after the late DIMM", rarps=True)
    return refused
