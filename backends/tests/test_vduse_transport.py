"""The VDUSE transport against the in-process fake kernel: bring-up, messages, datapath,
vq state, reset, tear-down, and the monitor on this transport."""

from __future__ import annotations

from typing import Any

import pytest

from backends.monitor import MonitorCommands
from backends.tests.vduse_rig import (
    ACK,
    DRIVER,
    DRIVER_FEATURES,
    FEATURES_OK,
    MEM_SIZE,
    NAME,
    Rig,
    make_rig,
    tx_chain,
)
from backends.vduse import uapi
from backends.vduse.transport import vduse_features
from backends.vduse.vq_state import state_from_info
from backends.virtio.features import VIRTIO_F_RING_PACKED, mask
from backends.virtio.net_header import HDR_LEN

CTRL_VQ = 17
MQ = 22
GUEST_ANNOUNCE = 21


def test_create_offers_model_features_and_config(rig: Rig) -> None:
    k = rig.kernel
    assert k.name == NAME
    assert k.features >> 32 & 1 and k.features >> 33 & 1, "VERSION_1 and ACCESS_PLATFORM"
    assert not k.features >> CTRL_VQ & 1
    assert not k.features >> GUEST_ANNOUNCE & 1, "needs the control vq"
    assert not k.features >> MQ & 1, "one pair: no MQ"
    assert k.features == vduse_features(1, rig.device.get_device_features(), 1)
    assert k.config == rig.device.get_config(0, 12)
    assert k.vq_num == 2
    assert [q.num_max for q in k.vqs] == [256, 256]
    assert all(q.kickfd >= 0 for q in k.vqs), "kick eventfds installed"
    assert rig.transport.path == "/dev/vhost-vdpa-0"
    kinds = [e["kind"] for e in rig.journal("vduse.")]
    assert kinds == ["vduse.create", "vduse.attach"]


def test_features_need_version_1_and_access_platform() -> None:
    with pytest.raises(ValueError, match="ACCESS_PLATFORM"):
        vduse_features(1, mask(32), 1)
    assert vduse_features(1, mask(32, 33, 17, 22), 2) == mask(32, 33, 22)


def test_bring_up_status_sequence_features_and_vq_info(rig: Rig) -> None:
    rig.bring_up(enable=False)
    dev = rig.device
    assert dev.get_driver_features() == DRIVER_FEATURES
    assert dev.dma.iommu
    statuses = [e["new"] for e in rig.journal("status.set")]
    assert statuses == [0, ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK, 0xF]
    msgs = [(e["type"], e["result"]) for e in rig.journal("vduse.msg")]
    assert ("UPDATE_IOTLB", "ok") in msgs and all(r == "ok" for _, r in msgs)
    for i, ring in enumerate(rig.rings):
        vq = dev.vqs[i]
        assert (vq.num, vq.desc, vq.avail, vq.used) == (
            64,
            ring.desc_iova,
            ring.avail_iova,
            ring.used_iova,
        )
        assert not vq.ready, "VDUSE says ready=0 at DRIVER_OK"
    assert len(rig.journal("vduse.vq_info")) == 2


def test_queue_enable_found_by_polling(rig: Rig) -> None:
    rig.bring_up(enable=False)
    rig.kernel.set_ready(0)
    rig.kernel.set_ready(1)
    rig.wait(lambda: all(vq.ready for vq in rig.device.vqs), "both queues enabled by the poll")
    assert {e["source"] for e in rig.journal("vduse.vq_ready")} == {"poll"}
    assert all(vq.started for vq in rig.device.vqs)


def test_queue_enable_found_at_first_kick_and_tx_runs(rig: Rig) -> None:
    rig.bring_up(enable=False)
    rig.transport._cancel_ready_poll()  # only the kick may find it here
    rig.kernel.set_ready(1)
    frame = bytes(range(60))
    tx_chain(rig.rings[1], frame)
    assert rig.kernel.kick(1)
    rig.wait(lambda: rig.wire.sent, "the TX frame on the wire")
    assert rig.wire.sent == [(frame, 0)]
    assert [e["source"] for e in rig.journal("vduse.vq_ready")] == ["kick"]
    rig.wait(lambda: rig.rings[1].used_idx() == 1, "TX chain used")
    assert rig.kernel.vqs[1].irqs >= 1, "interrupt injected through VDUSE_VQ_INJECT_IRQ"


@pytest.mark.parametrize("size", [60, 61, 512, 1514])
def test_tx_and_rx_byte_exact(rig: Rig, size: int) -> None:
    rig.bring_up()
    rig.wait(lambda: all(vq.ready for vq in rig.device.vqs), "queues ready")
    frame = bytes((i * 7 + size) & 0xFF for i in range(size))
    tx_chain(rig.rings[1], frame)
    rig.kernel.kick(1)
    rig.wait(lambda: rig.wire.sent, "TX frame")
    assert rig.wire.sent[0][0] == frame
    rx = rig.rings[0]
    _, gpas = rx.add_chain(inp=[HDR_LEN + 1514])
    rig.kernel.kick(0)
    rig.wait(lambda: rig.device.vqs[0].started, "RX started")
    rig.wire.deliver(frame[::-1])
    rig.wait(lambda: rx.used_idx() == 1, "RX chain used")
    ((_, written),) = rx.reclaim()
    assert written == HDR_LEN + size
    assert rig.region is not None
    assert rig.region.read_gpa(gpas[0] + HDR_LEN, size) == frame[::-1]


def test_get_vq_state_split(rig: Rig) -> None:
    rig.bring_up()
    rig.wait(lambda: rig.device.vqs[1].ready, "TX ready")
    for n in range(3):
        tx_chain(rig.rings[1], bytes(60 + n))
    rig.kernel.kick(1)
    rig.wait(lambda: len(rig.wire.sent) == 3, "3 TX frames")
    union = rig.ok(rig.kernel.get_vq_state(1))
    index, avail, _ = uapi.unpack_vq_state(union)
    assert (index, avail) == (1, 3)
    entry = rig.journal("vduse.msg")[-1]
    assert entry["type"] == "GET_VQ_STATE" and entry["last_avail_idx"] == 3


def test_vring_base_from_the_front_end_reaches_the_model(rig: Rig) -> None:
    """SET_VRING_BASE lands in VQ_GET_INFO's avail index; the model starts there."""
    rig.bring_up(enable=False)
    rig.set_status(0)
    rig.set_status(ACK | DRIVER)
    rig.kernel.driver_features = DRIVER_FEATURES
    rig.set_status(ACK | DRIVER | FEATURES_OK)
    for i, ring in enumerate(rig.rings):
        rig.kernel.setup_vq(i, 64, ring.desc_iova, ring.avail_iova, ring.used_iova, avail=65534)
    rig.set_status(0xF)
    assert rig.device.vqs[1].get_state().last_avail_idx == 65534
    assert rig.device.get_vq_state(1).last_avail_idx == 65534


def test_get_vq_state_packed_form() -> None:
    union = uapi.pack_vq_state(
        3, packed=True, last_avail_idx=5, used_idx=4, avail_wrap=False, used_wrap=True
    )
    index, _, packed = uapi.unpack_vq_state(union)
    assert (index, packed) == (3, (0, 5, 1, 4))
    info = uapi.VqInfo(3, 64, 0, 0, 0, uapi.VQ_STATE_PACKED.pack(1, 7, 0, 6), True)
    st = state_from_info(info, packed=True)
    assert (st.last_avail_idx, st.used_idx, st.avail_wrap, st.used_wrap) == (7, 6, True, False)
    assert mask(VIRTIO_F_RING_PACKED)


def test_reset_reinstalls_kick_fds_and_restarts(rig: Rig) -> None:
    rig.bring_up()
    rig.wait(lambda: rig.device.vqs[1].ready, "TX ready")
    assert rig.set_status(0) == 0
    assert all(q.kickfd < 0 for q in rig.kernel.vqs), "the kernel dropped them at reset"
    assert not any(vq.ready for vq in rig.device.vqs)
    rig.bring_up()  # restart: same device, new session
    assert all(q.kickfd >= 0 for q in rig.kernel.vqs), "installed again after the reset"
    rig.wait(lambda: rig.device.vqs[1].ready, "TX ready again")
    tx_chain(rig.rings[1], b"\x01" * 70)
    rig.kernel.kick(1)
    rig.wait(lambda: rig.wire.sent, "TX after restart")


def test_update_iotlb_reply_and_journal(rig: Rig) -> None:
    rig.bring_up()
    entries = rig.journal("vduse.iotlb")
    assert entries and entries[-1]["added"] == 1 and entries[-1]["entries"] == 1
    assert [m.iova for m in rig.device.iotlb.entries()] == [0]


def test_close_detaches_closes_and_destroys(rig: Rig) -> None:
    rig.transport.close()
    k = rig.kernel
    assert k.destroyed and not k.attached and not k.opened
    assert k.calls[-3:] == ["close", "destroy", "kernel_close"]
    kinds = [e["kind"] for e in rig.journal("vduse.")]
    assert kinds[-2:] == ["vduse.detach", "vduse.destroy"]
    rig.transport.close()  # idempotent


def test_monitor_reads_this_transport(rig: Rig) -> None:
    rig.bring_up()
    rig.wait(lambda: rig.device.vqs[1].ready, "TX ready")
    tx_chain(rig.rings[1], b"\x02" * 64)
    rig.kernel.kick(1)
    rig.wait(lambda: rig.wire.sent, "TX")
    mon = MonitorCommands(rig.device, rig.net, rig.transport)
    status: Any = mon.execute("query-status", {})
    assert status["connection"]["connected"] is True
    assert status["connection"]["path"] == "/dev/vhost-vdpa-0"
    vrings: Any = mon.execute("query-vrings", {})
    vrings = vrings["vrings"]
    assert vrings[1]["kicks"] == 1 and vrings[1]["calls"] >= 1
    iotlb: Any = mon.execute("query-iotlb", {})
    iotlb = iotlb["mappings"]
    assert [(m["iova"], m["size"]) for m in iotlb] == [(0, 4 << 20)]
    table: Any = mon.execute("query-mem-table", {})
    assert table["regions"][0]["gpa"] == 0
    journal: Any = mon.execute("query-journal", {"kinds": ["vduse."]})
    kinds = {e["kind"] for e in journal["entries"]}
    assert {"vduse.msg", "vduse.iotlb", "vduse.create"} <= kinds


def test_two_queue_pairs_offer_mq_and_set_up_four_queues() -> None:
    r = make_rig(queue_pairs=2)
    try:
        assert r.kernel.vq_num == 4 and r.kernel.features >> MQ & 1
        r.bring_up()
        r.wait(lambda: all(vq.ready for vq in r.device.vqs), "4 queues ready")
        tx_chain(r.rings[3], b"\x03" * 80)
        r.kernel.kick(3)
        r.wait(lambda: r.wire.sent, "TX on the second pair")
        assert r.wire.sent == [(b"\x03" * 80, 1)]
    finally:
        r.close()


def test_get_vq_state_of_a_stopped_ring_is_what_the_front_end_set(rig: Rig) -> None:
    """Before DRIVER_OK (or after a stop) the state is the front-end's SET_VRING_BASE, which
    the kernel keeps; the model's copy is refreshed from VQ_GET_INFO before answering."""
    rig.kernel.setup_vq(1, 64, 0x1000, 0x2000, 0x3000, avail=1234)
    index, avail, _ = uapi.unpack_vq_state(rig.ok(rig.kernel.get_vq_state(1)))
    assert (index, avail) == (1, 1234)
    assert rig.journal("vduse.msg")[-1]["from_kernel"] is True


ALIAS_IOVA = 0x4000_0000


def test_miss_fetches_an_entry_the_kernel_never_announced(rig: Rig) -> None:
    """Bound to virtio_vdpa the kernel maps DMA in its own domain and sends no UPDATE_IOTLB:
    a descriptor at an IOVA the device has not fetched yet makes it ask with IOTLB_GET_FD."""
    rig.bring_up()
    rig.wait(lambda: all(vq.ready for vq in rig.device.vqs), "queues ready")
    assert rig.mem is not None
    rig.kernel.iotlb.append(
        (
            uapi.IotlbEntry(0, ALIAS_IOVA, ALIAS_IOVA + MEM_SIZE - 1, uapi.VDUSE_ACCESS_RW),
            rig.mem.fd,
        )
    )
    ring = rig.rings[1]
    frame = bytes((i * 5) & 0xFF for i in range(100))
    buf = ring.alloc(HDR_LEN + len(frame))
    assert rig.region is not None
    rig.region.write_gpa(buf, bytes(HDR_LEN) + frame)
    head = ring.free.pop(0)
    ring.write_desc(head, ALIAS_IOVA + buf, HDR_LEN + len(frame), 0, 0)
    ring.publish(head)
    rig.kernel.kick(1)
    rig.wait(lambda: rig.wire.sent, "the TX frame behind the unannounced IOVA on the wire")
    assert rig.wire.sent == [(frame, 0)]
    fetches = rig.journal("vduse.iotlb_fetch")
    assert fetches and fetches[0]["added"] == 1


def test_miss_on_an_iova_the_kernel_does_not_have_parks_the_queue(rig: Rig) -> None:
    rig.bring_up()
    rig.wait(lambda: all(vq.ready for vq in rig.device.vqs), "queues ready")
    ring = rig.rings[1]
    head = ring.free.pop(0)
    ring.write_desc(head, ALIAS_IOVA, HDR_LEN + 60, 0, 0)
    ring.publish(head)
    rig.kernel.kick(1)
    rig.wait(lambda: rig.journal("error.vduse"), "the miss reported")
    assert rig.journal("error.vduse")[-1]["op"] == "iotlb_miss"
    assert not rig.wire.sent
