"""qos: a Python qtest driver for QEMU (libqos-style), used to test virtio-net backends.

Modules: `qtest` (protocol client), `qmp` (QMP facade), `machine` (QEMU launch/teardown),
`alloc` (guest memory), `pci` (config space, BARs, MSI-X), `virtio_pci` (modern transport),
`virtqueue` (split ring, driver side), `virtio_net` (the net driver), `waiting` (polling),
`processes` (stopping children), `backend_process` (the backend as a child process).
Scenario libraries (plain functions raising AssertionError, run by the suites and their
meta-tests on either transport): `hotplug_scenarios`, `viommu_scenarios`, `svq_migration`,
`ring_restore`.
"""

from .alloc import AllocError, GuestAllocator, MemRange
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
from .pci import MsiVector, Msix, PciBus, PciDevice, PciError
from .qmp import QmpClient, QmpError, QmpTimeout
from .qtest import QTest, QTestClosed, QTestError, QTestTimeout
from .virtio_net import NetConfig, RxFrame, VirtioNetDriver, VirtioNetError, VirtioNetHdr
from .virtio_pci import VirtioPciDevice, VirtioPciError
from .virtqueue import SplitVirtqueue, UsedElem, VirtqueueError, VirtqueueFull
from .waiting import WaitTimeout, poll_until

__all__ = [
    "AllocError",
    "GuestAllocator",
    "MemRange",
    "MemoryLayout",
    "MsiVector",
    "Msix",
    "NetConfig",
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
