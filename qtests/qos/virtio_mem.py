"""virtio-mem driver over the qtest virtio-pci transport (virtio 1.2, 5.15).

* Device type 24 (virtio-mem-pci = 1af4:1058), one request queue (index 0).
* Config (all little endian): block_size u64 @0, node_id u16 @8, addr u64 @16, region_size
  u64 @24, usable_region_size u64 @32, plugged_size u64 @40, requested_size u64 @48.
* Request (24 bytes): type u16, 3 x u16 padding, addr u64, nb_blocks u16, 3 x u16 padding.
  Response (10 bytes): type u16, 3 x u16 padding, state u16.
* QEMU offers VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE and refuses FEATURES_OK unless the driver
  acks it; a plug may not exceed ``requested_size`` and must lie in the usable region.

The device manages its own guest-physical region; with ``dynamic-memslots=on`` QEMU maps only
the memslots (>= 1 GiB aliases) that hold plugged blocks, so a vhost-user backend sees one
ADD_MEM_REG per memslot that becomes non-empty and one REM_MEM_REG per memslot that empties.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from backends.virtio.features import (
    VIRTIO_F_VERSION_1,
    VIRTIO_PCI_MODERN_BASE,
    VIRTIO_PCI_VENDOR,
    bit,
)

from .alloc import GuestAllocator
from .driver_queue import DriverQueue
from .pci import PciBus
from .virtio_pci import VirtioPciDevice

VIRTIO_ID_MEM = 24
VIRTIO_MEM_PCI_DEVICE_ID = VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_MEM  # 0x1058

MEM_F_ACPI_PXM = 0
MEM_F_UNPLUGGED_INACCESSIBLE = 1
MEM_F_PERSISTENT_SUSPEND = 2

REQ_PLUG = 0
REQ_UNPLUG = 1
REQ_UNPLUG_ALL = 2
REQ_STATE = 3

RESP_ACK = 0
RESP_NACK = 1
RESP_BUSY = 2
RESP_ERROR = 3
RESP_NAMES = {RESP_ACK: "ACK", RESP_NACK: "NACK", RESP_BUSY: "BUSY", RESP_ERROR: "ERROR"}

STATE_PLUGGED = 0
STATE_UNPLUGGED = 1
STATE_MIXED = 2

CONFIG = struct.Struct("<QH6xQQQQQ")  # 56 bytes
REQUEST = struct.Struct("<H6xQH6x")  # 24 bytes
RESPONSE = struct.Struct("<H6xH")  # 10 bytes

QUEUE_SIZE = 16
_RESP_OFFSET = 64  # response slot inside the request page


class VirtioMemError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class VirtioMemConfig:
    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int

    def block_addr(self, index: int) -> int:
        return self.addr + index * self.block_size


@dataclass(frozen=True, slots=True)
class VirtioMemResponse:
    type: int
    state: int

    @property
    def name(self) -> str:
        return RESP_NAMES.get(self.type, f"type {self.type}")


class VirtioMemDriver:
    """A virtio-mem-pci function driven over qtest: plug / unplug / query memory blocks."""

    def __init__(self, dev: VirtioPciDevice) -> None:
        if dev.device_type != VIRTIO_ID_MEM:
            raise VirtioMemError(f"{dev.name} is virtio type {dev.device_type}, not mem")
        self.dev = dev
        self.qt = dev.qt
        self.alloc = dev.alloc
        self.features = 0
        self.vq: DriverQueue | None = None
        self._buf: int | None = None

    @classmethod
    def find(cls, bus: PciBus, alloc: GuestAllocator, *, index: int = 0) -> VirtioMemDriver:
        pci = bus.find(VIRTIO_PCI_VENDOR, VIRTIO_MEM_PCI_DEVICE_ID, index)
        return cls(VirtioPciDevice(pci, alloc, name=f"virtio-mem {pci}"))

    def init(self, *, queue_size: int = QUEUE_SIZE) -> int:
        """Negotiate (VERSION_1 + UNPLUGGED_INACCESSIBLE when offered), set up the request
        queue (no interrupts: completions are polled), DRIVER_OK. Returns the features."""
        d = self.dev
        self.features = d.negotiate(
            bit(MEM_F_UNPLUGGED_INACCESSIBLE), required=bit(VIRTIO_F_VERSION_1)
        )
        self.vq = d.setup_queue(0, queue_size, name="virtio-mem req")
        self._buf = self.alloc.alloc(4096, tag="virtio-mem req")
        d.driver_ok()
        return self.features

    def config(self) -> VirtioMemConfig:
        raw = self.dev.config_bytes(0, CONFIG.size)
        return VirtioMemConfig(*CONFIG.unpack(raw))

    # -- requests ---------------------------------------------------------------------------
    def request(
        self, kind: int, addr: int = 0, nb_blocks: int = 0, timeout: float = 5.0
    ) -> VirtioMemResponse:
        if self.vq is None or self._buf is None:
            raise VirtioMemError("virtio-mem driver not initialised (init())")
        req, resp = self._buf, self._buf + _RESP_OFFSET
        self.qt.write_many(
            [(req, REQUEST.pack(kind, addr, nb_blocks)), (resp, b"\xff" * RESPONSE.size)]
        )
        self.vq.add([(req, REQUEST.size)], [(resp, RESPONSE.size)], "req")
        self.vq.kick()
        (used,) = self.vq.wait_used(1, timeout)
        if used.length < 2:
            raise VirtioMemError(f"virtio-mem response of {used.length} bytes")
        return VirtioMemResponse(*RESPONSE.unpack(self.qt.read(resp, RESPONSE.size)))

    def _expect_ack(self, what: str, resp: VirtioMemResponse) -> None:
        if resp.type != RESP_ACK:
            raise VirtioMemError(f"virtio-mem {what}: device answered {resp.name}")

    def plug(self, addr: int, nb_blocks: int = 1) -> None:
        self._expect_ack(f"plug {addr:#x} x{nb_blocks}", self.request(REQ_PLUG, addr, nb_blocks))

    def unplug(self, addr: int, nb_blocks: int = 1) -> None:
        self._expect_ack(
            f"unplug {addr:#x} x{nb_blocks}", self.request(REQ_UNPLUG, addr, nb_blocks)
        )

    def unplug_all(self) -> None:
        self._expect_ack("unplug all", self.request(REQ_UNPLUG_ALL))

    def state(self, addr: int, nb_blocks: int = 1) -> int:
        resp = self.request(REQ_STATE, addr, nb_blocks)
        self._expect_ack(f"state {addr:#x} x{nb_blocks}", resp)
        return resp.state

    def close(self) -> None:
        """Reset the device and free the queue and the request page."""
        try:
            self.dev.close()
        finally:
            if self._buf is not None:
                self.alloc.free(self._buf)
                self._buf = None
            self.vq = None
