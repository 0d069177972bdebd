"""A `Testbed` whose virtio-net sits behind a virtio-iommu (``boot-bypass=off``).

Rings and buffers are reached only through IOVAs the driver maps (qtests/qos/virtio_iommu.py):
``strict`` maps and unmaps every buffer around its use, otherwise buffers stay mapped. The NIC
sits behind a PCIe root port with ``iommu_platform=on`` (and ``ats=on`` unless told not to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends.virtio.features import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_PCI_VENDOR, bit
from qtests.qos.machine import QemuMachine
from qtests.qos.qtest import QTest
from qtests.qos.testbed import Testbed
from qtests.qos.virtio_iommu import ResvRegion, ViommuDma, VirtioIommuDriver, endpoint_id
from qtests.qos.virtio_net import VIRTIO_NET_PCI_DEVICE_ID, VirtioNetDriver

DOMAIN = 1


class ViommuTestbed(Testbed):
    """`Testbed` with a virtio-iommu in front of the virtio-net device."""

    def __init__(self, log_dir: Path, *, strict: bool = True, ats: bool = True, **kw: Any):
        super().__init__(log_dir, **kw)
        self.strict = strict
        self.ats = ats
        self.viommu: VirtioIommuDriver | None = None
        self._dma: ViommuDma | None = None
        self.endpoint = -1
        self.resv: list[ResvRegion] = []

    def add_platform(self, m: QemuMachine) -> None:
        # before the devices it translates: their DMA address space is fixed at realize
        m.add_virtio_iommu(props={"boot-bypass": False})
        m.add_pcie_root_port("rp0", chassis=1)

    def nic_props(self) -> dict[str, Any]:
        props = {**super().nic_props(), "bus": "rp0", "iommu_platform": True}
        if self.ats:
            props["ats"] = True
        return props

    def init_net(self, **init_kw: Any) -> VirtioNetDriver:
        assert self.bus is not None and self.alloc is not None
        if self.viommu is None:
            self.viommu = VirtioIommuDriver.find(self.bus, self.alloc)
            self.viommu.init()
            pci = self.bus.find(VIRTIO_PCI_VENDOR, VIRTIO_NET_PCI_DEVICE_ID)
            self.endpoint = endpoint_id(pci)
            self.resv = self.viommu.probe(self.endpoint)
            self.viommu.attach(self.endpoint, DOMAIN)
            self._dma = ViommuDma(self.viommu, DOMAIN, strict=self.strict)
        net = VirtioNetDriver.find(self.bus, self.alloc, dma=self._dma)
        init_kw["extra_features"] = init_kw.get("extra_features", 0) | bit(VIRTIO_F_ACCESS_PLATFORM)
        net.init(**init_kw)
        assert net.has_feature(VIRTIO_F_ACCESS_PLATFORM), "ACCESS_PLATFORM was not negotiated"
        self._net = net
        return net

    def reinit_net(self, **init_kw: Any) -> VirtioNetDriver:
        """Reset the device (status 0: vhost stops) and bring it up again on new rings."""
        self.net.close()
        self._net = None
        return self.init_net(**init_kw)

    @property
    def dma(self) -> ViommuDma:
        assert self._dma is not None, "init_net() first"
        return self._dma

    @property
    def iommu(self) -> VirtioIommuDriver:
        assert self.viommu is not None, "init_net() first"
        return self.viommu

    def rebind_viommu(self, qtest: QTest) -> None:
        """Carry the vIOMMU driver over to another QEMU's qtest (after a migration)."""
        assert self.viommu is not None
        self.viommu.dev.rebind(qtest)
        self.viommu.qt = qtest


class IntelIommuTestbed(Testbed):
    """`Testbed` with an intel-iommu (``intremap=on``, ``caching-mode`` as given) before the
    NIC (``iommu_platform=on``). The qtest guest never enables DMA remapping, so the device
    works on guest-physical addresses: this testbed shows what QEMU accepts."""

    def __init__(self, log_dir: Path, *, caching_mode: bool = True, **kw: Any):
        super().__init__(log_dir, **kw)
        self.caching_mode = caching_mode

    def add_platform(self, m: QemuMachine) -> None:
        m.add_intel_iommu(device_iotlb=False, caching_mode=self.caching_mode)

    def nic_props(self) -> dict[str, Any]:
        return {**super().nic_props(), "iommu_platform": True}

    def init_net(self, **init_kw: Any) -> VirtioNetDriver:
        init_kw["extra_features"] = init_kw.get("extra_features", 0) | bit(VIRTIO_F_ACCESS_PLATFORM)
        return super().init_net(**init_kw)
