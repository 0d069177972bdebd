"""qos: a Python qtest driver for QEMU (libqos-style), used to test virtio-net backends.

Modules: `qtest` (protocol client), `qmp` (QMP facade), `machine` (QEMU launch/teardown),
`alloc` (guest memory allocation), `guest_memory` (memory access: qtest or shared memfds),
`pci` (config space, BARs, MSI-X), `interrupts`, `virtio_pci` (modern transport),
`driver_queue` + `virtqueue` / `packed_virtqueue` (the split and packed rings, driver side),
`virtio_net` (the net driver), `waiting` (polling and fd waits), `processes` (stopping
children), `backend_process` / `backend_thread` (the backend as a child process / in-process),
`vhost_user_frontend` (a QEMU-like vhost-user front-end on the same rings, for unit tests).
Virtio wire formats come from `backends.virtio`.
Scenario libraries (plain functions raising AssertionError, run by the suites and their
meta-tests on either transport): `hotplug_scenarios`, `viommu_scenarios`, `svq_migration`,
`ring_restore`.
"""

from backends.virtio.net_header import VirtioNetHdr

from .alloc import AllocError, GuestAllocator, MemRange
from .driver_queue import DriverQueue
from .guest_memory import GuestMemoryAccess, SharedGuestMemory
from .machine import (
    MemoryLayout,
    QemuError,
    QemuLaunchError,
    QemuMachine,
    QemuNotFound,
    QemuTooOld,
    qemu_version,
    require_qemu,
    write_halt_bios,
)
from .packed_virtqueue import PackedVirtqueue
from .pci import MsiVector, Msix, PciBus, PciDevice, PciError
from .qmp import QmpClient, QmpError, QmpTimeout
from .qtest import QTest, QTestClosed, QTestError, QTestTimeout
from .virtio_net import NetConfig, RxFrame, VirtioNetDriver, VirtioNetError
from .virtio_pci import VirtioPciDevice, VirtioPciError
from .virtqueue import SplitVirtqueue, UsedElem, VirtqueueError, VirtqueueFull
from .waiting import WaitTimeout, poll_until

__all__ = [
    "AllocError",
    "DriverQueue",
    "GuestMemoryAccess",
    "GuestAllocator",
    "MemRange",
    "MemoryLayout",
    "MsiVector",
    "Msix",
    "NetConfig",
    "PackedVirtqueue",
    "PciBus",
    "PciDevice",
    "PciError",
    "QTest",
    "QTestClosed",
    "QTestError",
    "QTestTimeout",
    "QemuError",
    "QemuLaunchError",
    "QemuMachine",
    "QemuNotFound",
    "QemuTooOld",
    "QmpClient",
    "QmpError",
    "QmpTimeout",
    "RxFrame",
    "SharedGuestMemory",
    "SplitVirtqueue",
    "UsedElem",
    "VirtioNetDriver",
    "VirtioNetError",
    "VirtioNetHdr",
    "VirtioPciDevice",
    "VirtioPciError",
    "VirtqueueError",
    "VirtqueueFull",
    "WaitTimeout",
    "poll_until",
    "qemu_version",
    "require_qemu",
    "write_halt_bios",
]
