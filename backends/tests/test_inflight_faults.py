"""The fault hooks issue 15 added, in the device model alone: used-ring-not-logged, log-at-iova
(vdpa/dma.py DmaSpace.mark_dirty / _log_data), stale-translation-cache (DmaSpace.translate)
and ignore-set-vring-base (VdpaDevice.set_vq_state). The qtest meta-tests prove the scenarios
catch them; these pin what each hook does."""

from __future__ import annotations

from backends.tests.conftest import EchoPersonality, make_space
from backends.vdpa.device import VdpaDevice
from backends.vdpa.dirty_log import DirtyLog
from backends.vdpa.iotlb import Perm
from backends.vdpa.memory import Access
from backends.vdpa.virtqueue import VqState

IOVA = 0x8_0000_0000


def test_used_ring_not_logged_skips_ring_writes_only() -> None:
    sp = make_space()
    log = DirtyLog(bytearray(64))
    sp.dma.dirty_log = log
    sp.faults.set("used-ring-not-logged")
    sp.dma.mark_dirty(0x3000, 8)  # what a ring write does
    assert log.dirty_pages() == []
    sp.dma.write(0x5000, b"data")  # packet data is still logged
    assert log.dirty_pages() == [5]


def test_log_at_iova_marks_the_iova_behind_a_viommu() -> None:
    sp = make_space(identity=False)
    sp.iotlb.dma_map(0x7000, 0x1000, sp.region.uaddr + 0x2000, Perm.RW)  # IOVA page 7 -> GPA 2
    sp.dma.iommu = True
    log = DirtyLog(bytearray(64))
    sp.dma.dirty_log = log
    sp.dma.write(0x7010, b"x")
    sp.dma.mark_dirty(0x2000, 4)
    assert log.dirty_pages() == [2]
    log.clear()
    sp.faults.set("log-at-iova")
    sp.dma.write(0x7010, b"x")
    sp.dma.mark_dirty(0x2000, 4)
    assert log.dirty_pages() == [7], "the fault logs the IOVA page, not the GPA page"


def test_stale_translation_cache_survives_unmap_and_remap() -> None:
    sp = make_space(identity=False)
    u = sp.region.uaddr
    sp.iotlb.dma_map(IOVA, 0x1000, u + 0x1000, Perm.RW)
    sp.dma.iommu = True
    (p,) = sp.dma.translate(IOVA, 16, Access.WRITE)
    assert p.gpa == 0x1000
    sp.iotlb.dma_unmap(IOVA, 0x1000)
    sp.iotlb.dma_map(IOVA, 0x1000, u + 0x4000, Perm.RW)
    assert sp.dma.translate(IOVA, 16, Access.WRITE)[0].gpa == 0x4000  # correct device
    sp.faults.set("stale-translation-cache")
    sp.dma.translate(IOVA, 16, Access.WRITE)  # remembered now
    sp.iotlb.dma_unmap(IOVA, 0x1000)
    sp.iotlb.dma_map(IOVA, 0x1000, u + 0x6000, Perm.RW)
    assert sp.dma.translate(IOVA, 16, Access.WRITE)[0].gpa == 0x4000, "the stale window"


def test_ignore_set_vring_base_keeps_the_queue_state() -> None:
    dev = VdpaDevice(EchoPersonality())
    dev.set_vq_state(0, VqState(last_avail_idx=12))
    assert dev.get_vq_state(0).last_avail_idx == 12
    dev.faults.set("ignore-set-vring-base")
    dev.set_vq_state(0, VqState(last_avail_idx=40))
    assert dev.get_vq_state(0).last_avail_idx == 12
