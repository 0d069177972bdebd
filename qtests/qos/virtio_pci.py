"""Modern (virtio 1.x) virtio-pci transport, driver side.

Vendor capabilities (``struct virtio_pci_cap``: cap_vndr, cap_next, cap_len, cfg_type, bar,
id, pad[2], offset u32, length u32; notify adds notify_off_multiplier u32) locate the common
config, notify, ISR and device config structures inside the BARs.  The common config layout
(``struct virtio_pci_common_cfg``) is the offsets below.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from backends.virtio.features import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_NOTIFICATION_DATA,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_PCI_MODERN_BASE,
    VIRTIO_PCI_VENDOR,
    bit,
)
from backends.virtio.net import net_feature_names

from .alloc import GuestAllocator
from .driver_queue import DriverQueue
from .iova import IDENTITY, DmaMapper
from .packed_virtqueue import PackedVirtqueue
from .pci import MsiVector, PciDevice
from .pci.config import PCI_CAP_ID_VNDR
from .qtest import QTest
from .virtqueue import SplitVirtqueue
from .waiting import poll_until

# cfg_type of struct virtio_pci_cap
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
VIRTIO_PCI_CAP_VENDOR_CFG = 9

# struct virtio_pci_cap field offsets (from the capability start)
CAP_CFG_TYPE = 3
CAP_BAR = 4
CAP_ID = 5
CAP_OFFSET = 8
CAP_LENGTH = 12
CAP_NOTIFY_OFF_MULTIPLIER = 16

# struct virtio_pci_common_cfg
COMMON_DEVICE_FEATURE_SELECT = 0
COMMON_DEVICE_FEATURE = 4
COMMON_DRIVER_FEATURE_SELECT = 8
COMMON_DRIVER_FEATURE = 12
COMMON_MSIX_CONFIG = 16
COMMON_NUM_QUEUES = 18
COMMON_DEVICE_STATUS = 20
COMMON_CONFIG_GENERATION = 21
COMMON_QUEUE_SELECT = 22
COMMON_QUEUE_SIZE = 24
COMMON_QUEUE_MSIX_VECTOR = 26
COMMON_QUEUE_ENABLE = 28
COMMON_QUEUE_NOTIFY_OFF = 30
COMMON_QUEUE_DESC = 32
COMMON_QUEUE_DRIVER = 40
COMMON_QUEUE_DEVICE = 48
COMMON_QUEUE_NOTIFY_DATA = 56
COMMON_QUEUE_RESET = 58

VIRTIO_MSI_NO_VECTOR = 0xFFFF
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2


class VirtioPciError(Exception):
    """Transport-level failure (missing capability, feature refusal, vector refusal...)."""


@dataclass(frozen=True, slots=True)
class VirtioPciCap:
    """One virtio vendor capability."""

    cap_offset: int  # in PCI config space
    cfg_type: int
    bar: int
    id: int
    offset: int  # inside the BAR
    length: int
    notify_off_multiplier: int | None = None


class IsrInterrupt:
    """INTx-style interrupt source: a bit of the ISR byte (reading ISR clears it)."""

    def __init__(self, dev: VirtioPciDevice, mask: int) -> None:
        self.dev = dev
        self.mask = mask

    def describe(self) -> str:
        return f"ISR bit 0x{self.mask:x} of {self.dev.name}"

    def fired(self) -> bool:
        return self.dev.take_isr(self.mask)

    def clear(self) -> None:
        self.dev.take_isr(self.mask)


class VirtioPciDevice:
    """A modern virtio-pci function (vendor 1af4, device 0x1040 + type) driven over qtest."""

    def __init__(
        self,
        pci: PciDevice,
        alloc: GuestAllocator,
        *,
        name: str | None = None,
        setup: bool = True,
        dma: DmaMapper | None = None,
    ) -> None:
        """Parse the virtio capabilities; ``setup`` also assigns BARs and enables the function.

        ``dma``: how guest-physical addresses become the addresses the device is given (a
        vIOMMU mapper with ``iommu_platform=on``); identity by default.
        """
        if pci.vendor_id != VIRTIO_PCI_VENDOR or not 0x1000 <= pci.device_id <= 0x107F:
            raise VirtioPciError(f"{pci!r} is not a virtio-pci device")
        self.pci = pci
        self.qt: QTest = pci.qt
        self.alloc = alloc
        self.dma: DmaMapper = dma if dma is not None else IDENTITY
        if pci.device_id >= VIRTIO_PCI_MODERN_BASE:
            self.device_type = pci.device_id - VIRTIO_PCI_MODERN_BASE
        else:  # transitional: subsystem ID is the device type
            self.device_type = pci.subsystem_id
        self.name = name or f"virtio-pci({pci}, type {self.device_type})"
        self.caps = self._parse_caps()
        self.common = self._require(VIRTIO_PCI_CAP_COMMON_CFG)
        self.notify_cap = self._require(VIRTIO_PCI_CAP_NOTIFY_CFG)
        self.isr_cap = self._require(VIRTIO_PCI_CAP_ISR_CFG)
        self.device_cap = self.first_cap(VIRTIO_PCI_CAP_DEVICE_CFG)
        self.notify_off_multiplier = self.notify_cap.notify_off_multiplier or 0
        self.features = 0
        self.queues: dict[int, DriverQueue] = {}
        self._notify_addr: dict[int, int] = {}
        self.msix_vectors: list[MsiVector] = []
        self.config_interrupt: MsiVector | IsrInterrupt = IsrInterrupt(self, ISR_CONFIG)
        self._isr_pending = 0
        self._pci_ready = False
        if setup:
            self.setup_pci()

    def __repr__(self) -> str:
        return f"VirtioPciDevice({self.name})"

    # ------------------------------------------------------------------ discovery
    def _parse_caps(self) -> list[VirtioPciCap]:
        caps = []
        for off in self.pci.find_capabilities(PCI_CAP_ID_VNDR):
            raw = struct.pack(
                "<IIII",
                *(self.pci.config_read32(off + 4 * i) for i in range(4)),
            )
            cfg_type, bar, cid = raw[CAP_CFG_TYPE], raw[CAP_BAR], raw[CAP_ID]
            offset, length = struct.unpack_from("<II", raw, CAP_OFFSET)
            mult = None
            if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                mult = self.pci.config_read32(off + CAP_NOTIFY_OFF_MULTIPLIER)
            caps.append(VirtioPciCap(off, cfg_type, bar, cid, offset, length, mult))
        return caps

    def first_cap(self, cfg_type: int) -> VirtioPciCap | None:
        for c in self.caps:
            if c.cfg_type == cfg_type and c.bar <= 5:
                return c
        return None

    def _require(self, cfg_type: int) -> VirtioPciCap:
        cap = self.first_cap(cfg_type)
        if cap is None:
            raise VirtioPciError(f"{self.name}: no virtio capability of type {cfg_type}")
        return cap

    def setup_pci(self) -> None:
        """Assign BARs and enable memory decoding + bus mastering (idempotent)."""
        if self._pci_ready:
            return
        self.pci.assign_bars()
        self.pci.enable(memory=True, io=False, bus_master=True)
        for cap in (self.common, self.notify_cap, self.isr_cap, self.device_cap):
            if cap is not None:
                self.pci.bar(cap.bar)
        self._pci_ready = True

    # ------------------------------------------------------------------ register access
    def _cap_addr(self, cap: VirtioPciCap, off: int) -> int:
        return self.pci.bar_addr(cap.bar) + cap.offset + off

    def common_read(self, off: int, size: int) -> int:
        return self.pci.bar_read(self.common.bar, self.common.offset + off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.pci.bar_write(self.common.bar, self.common.offset + off, size, value)

    def _common_write64(self, off: int, value: int) -> None:
        self.common_write(off, 4, value & 0xFFFFFFFF)
        self.common_write(off + 4, 4, value >> 32)

    # ------------------------------------------------------------------ status
    @property
    def status(self) -> int:
        return self.common_read(COMMON_DEVICE_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.common_write(COMMON_DEVICE_STATUS, 1, status)

    def add_status(self, bits: int) -> None:
        self.set_status(self.status | bits)

    def reset(self, timeout: float = 5.0) -> None:
        """Write 0 to device_status and wait until the device reads back 0."""
        self.setup_pci()
        self.set_status(0)
        poll_until(lambda: self.status == 0, timeout, f"reset of {self.name}")
        self.features = 0
        self._isr_pending = 0

    def driver_ok(self) -> None:
        self.add_status(STATUS_DRIVER_OK)

    def fail(self) -> None:
        self.add_status(STATUS_FAILED)

    # ------------------------------------------------------------------ features
    def device_features(self) -> int:
        value = 0
        for sel in (0, 1):
            self.common_write(COMMON_DEVICE_FEATURE_SELECT, 4, sel)
            value |= self.common_read(COMMON_DEVICE_FEATURE, 4) << (32 * sel)
        return value

    def driver_features(self) -> int:
        value = 0
        for sel in (0, 1):
            self.common_write(COMMON_DRIVER_FEATURE_SELECT, 4, sel)
            value |= self.common_read(COMMON_DRIVER_FEATURE, 4) << (32 * sel)
        return value

    def set_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.common_write(COMMON_DRIVER_FEATURE_SELECT, 4, sel)
            self.common_write(COMMON_DRIVER_FEATURE, 4, (features >> (32 * sel)) & 0xFFFFFFFF)

    def negotiate(self, wanted: int, *, required: int = bit(VIRTIO_F_VERSION_1)) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept offered & (wanted | required), FEATURES_OK.

        Raises if a required bit is not offered or the device refuses FEATURES_OK.
        Returns the negotiated set (also in ``self.features``).
        """
        self.reset()
        self.set_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        offered = self.device_features()
        missing = required & ~offered
        if missing:
            self.fail()
            raise VirtioPciError(
                f"{self.name}: device does not offer required {net_feature_names(missing)}"
            )
        features = offered & (wanted | required)
        self.set_driver_features(features)
        self.add_status(STATUS_FEATURES_OK)
        if not self.status & STATUS_FEATURES_OK:
            self.fail()
            raise VirtioPciError(
                f"{self.name}: device refused FEATURES_OK for {net_feature_names(features)}"
            )
        self.features = features
        return features

    def has_feature(self, n: int) -> bool:
        return bool(self.features >> n & 1)

    # ------------------------------------------------------------------ device config
    def num_queues(self) -> int:
        return self.common_read(COMMON_NUM_QUEUES, 2)

    def config_generation(self) -> int:
        return self.common_read(COMMON_CONFIG_GENERATION, 1)

    def _device_cfg(self) -> VirtioPciCap:
        if self.device_cap is None:
            raise VirtioPciError(f"{self.name}: no device-specific config structure")
        return self.device_cap

    def config_read(self, off: int, size: int) -> int:
        cap = self._device_cfg()
        return self.pci.bar_read(cap.bar, cap.offset + off, size)

    def config_write(self, off: int, size: int, value: int) -> None:
        cap = self._device_cfg()
        self.pci.bar_write(cap.bar, cap.offset + off, size, value)

    def config_bytes(self, off: int = 0, size: int | None = None, *, retries: int = 10) -> bytes:
        """A consistent snapshot of device config (re-read while config_generation changes).

        QEMU answers a 4-byte access that crosses the end of its config space with all-ones:
        read fields at their natural width (`config_read`) near the end.
        """
        cap = self._device_cfg()
        size = cap.length - off if size is None else size
        for _ in range(retries):
            before = self.config_generation()
            data = self.qt.read(self._cap_addr(cap, off), size)
            if self.config_generation() == before:
                return data
        raise VirtioPciError(f"{self.name}: config generation kept changing")

    # ------------------------------------------------------------------ interrupts
    def isr(self) -> int:
        """Read (and thereby clear) the ISR status byte."""
        return self.pci.bar_read(self.isr_cap.bar, self.isr_cap.offset, 1)

    def take_isr(self, mask: int) -> bool:
        """True if any ``mask`` bit was raised since it was last taken (sticky across reads)."""
        self._isr_pending |= self.isr()
        hit = bool(self._isr_pending & mask)
        self._isr_pending &= ~mask
        return hit

    def enable_msix(self) -> list[MsiVector]:
        """Route all MSI-X vectors to RAM words, enable MSI-X.  Returns the vectors."""
        self.setup_pci()
        msix = self.pci.msix()
        self.msix_vectors = msix.route_to_ram(self.alloc)
        if self.msix_vectors and not self.dma.identity:
            # MSI writes are DMA too: behind a vIOMMU the words must be mapped at the address
            # the table holds (the mapper maps them IOVA == GPA, so the table stays as is).
            first = min(v.addr for v in self.msix_vectors)
            last = max(v.addr for v in self.msix_vectors) + 4
            bus_addr = self.dma.map_msi(first, last - first)
            if bus_addr != first:
                raise VirtioPciError(
                    f"{self.name}: MSI-X words at {first:#x} mapped at {bus_addr:#x}; "
                    "only identity-mapped MSI words are supported"
                )
        msix.enable()
        return self.msix_vectors

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix_vectors)

    def set_config_vector(self, vector: int) -> None:
        self.common_write(COMMON_MSIX_CONFIG, 2, vector)
        got = self.common_read(COMMON_MSIX_CONFIG, 2)
        if got != vector:
            raise VirtioPciError(f"{self.name}: config vector {vector} refused (reads {got:#x})")
        if vector != VIRTIO_MSI_NO_VECTOR and self.msix_vectors:
            self.config_interrupt = self.msix_vectors[vector]

    def set_queue_vector(self, index: int, vector: int) -> None:
        self.queue_select(index)
        self.common_write(COMMON_QUEUE_MSIX_VECTOR, 2, vector)
        got = self.common_read(COMMON_QUEUE_MSIX_VECTOR, 2)
        if got != vector:
            raise VirtioPciError(
                f"{self.name}: queue {index} vector {vector} refused (reads {got:#x})"
            )
        vq = self.queues.get(index)
        if vq is not None and vector != VIRTIO_MSI_NO_VECTOR and self.msix_vectors:
            vq.interrupt = self.msix_vectors[vector]

    # ------------------------------------------------------------------ queues
    def queue_select(self, index: int) -> None:
        """Select queue ``index``; raises if the device ignored it (index out of range)."""
        self.common_write(COMMON_QUEUE_SELECT, 2, index)
        got = self.common_read(COMMON_QUEUE_SELECT, 2)
        if got != index:
            raise VirtioPciError(f"{self.name}: queue_select {index} ignored (reads {got})")

    def queue_max_size(self, index: int) -> int:
        """Maximum size of queue ``index`` (0: the queue does not exist)."""
        self.queue_select(index)
        return self.common_read(COMMON_QUEUE_SIZE, 2)

    def queue_enabled(self, index: int) -> bool:
        self.queue_select(index)
        return bool(self.common_read(COMMON_QUEUE_ENABLE, 2))

    def setup_queue(
        self,
        index: int,
        size: int | None = None,
        *,
        vector: int | None = None,
        enable: bool = True,
        name: str | None = None,
    ) -> DriverQueue:
        """Allocate and program queue ``index`` (split, or packed when VIRTIO_F_RING_PACKED was
        negotiated) (after FEATURES_OK, before DRIVER_OK).

        ``size`` defaults to the device maximum.  ``vector``: MSI-X vector (when MSI-X is on);
        without MSI-X the queue's interrupt source is the ISR queue bit.
        """
        if index in self.queues:
            raise VirtioPciError(f"{self.name}: queue {index} is already set up")
        max_size = self.queue_max_size(index)
        if max_size == 0:
            raise VirtioPciError(f"{self.name}: queue {index} does not exist")
        size = size or max_size
        if size > max_size:
            raise VirtioPciError(f"{self.name}: queue {index} size {size} > max {max_size}")
        vq_cls: type[DriverQueue] = (
            PackedVirtqueue if self.has_feature(VIRTIO_F_RING_PACKED) else SplitVirtqueue
        )
        vq = vq_cls(
            self.qt,
            self.alloc,
            index,
            size,
            event_idx=self.has_feature(VIRTIO_F_EVENT_IDX),
            indirect=self.has_feature(VIRTIO_F_INDIRECT_DESC),
            name=name or f"{self.name} vq{index}",
            notify=self.notify,
            dma=self.dma,
        )
        vq.interrupt = IsrInterrupt(self, ISR_QUEUE)
        self.queues[index] = vq
        self.queue_select(index)
        self.common_write(COMMON_QUEUE_SIZE, 2, size)
        self._common_write64(COMMON_QUEUE_DESC, vq.desc_dma)
        self._common_write64(COMMON_QUEUE_DRIVER, vq.avail_dma)
        self._common_write64(COMMON_QUEUE_DEVICE, vq.used_dma)
        notify_off = self.common_read(COMMON_QUEUE_NOTIFY_OFF, 2)
        self._notify_addr[index] = self._cap_addr(
            self.notify_cap, notify_off * self.notify_off_multiplier
        )
        if vector is not None:
            self.set_queue_vector(index, vector)
        if enable:
            self.enable_queue(index)
        return vq

    def enable_queue(self, index: int) -> None:
        self.queue_select(index)
        self.common_write(COMMON_QUEUE_ENABLE, 2, 1)

    def notify(self, vq: DriverQueue) -> None:
        """Notify the device about queue ``vq`` (writes the notify register)."""
        addr = self._notify_addr[vq.index]
        if self.has_feature(VIRTIO_F_NOTIFICATION_DATA):
            self.qt.writel(addr, (vq.notification_data << 16) | vq.index)
        else:
            self.qt.writew(addr, vq.index)

    def notify_addr(self, index: int) -> int:
        return self._notify_addr[index]

    def rebind(self, qtest: QTest) -> None:
        """Continue driving the same guest through another qtest session (after migration:
        the destination has the same RAM, BARs, MSI-X table and rings)."""
        self.qt = qtest
        self.pci.bus.qt = qtest
        for vq in self.queues.values():
            vq.qt = qtest

    def destroy_queues(self) -> None:
        for vq in self.queues.values():
            vq.destroy()
        self.queues.clear()
        self._notify_addr.clear()

    def close(self) -> None:
        """Reset the device, free queues and MSI-X words (the driver is done with it)."""
        try:
            if self._pci_ready:
                self.set_status(0)
        finally:
            self.destroy_queues()
            if self.msix_vectors:
                self.pci.msix().release_ram()
                self.msix_vectors = []
