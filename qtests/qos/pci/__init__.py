"""PCI for the qtest driver: we are the firmware. One module a concept:

* :mod:`.config` - config space registers, capability IDs, :class:`PciError`
* :mod:`.bus` - :class:`PciBus`: config mechanism #1, enumeration, windows
* :mod:`.device` - :class:`PciDevice`, :class:`Bar`: capabilities, BARs
* :mod:`.msix` - :class:`Msix`, :class:`MsiVector`: MSI-X routed into guest RAM


* Config space through configuration mechanism #1 (ports 0xcf8/0xcfc), any bus/device/fn.
* Enumeration: bus numbers for bridges (pcie-root-port, pci-bridge), bridge windows carved
  from the parent's windows, devices found by vendor/device/class.
* BAR sizing and assignment: I/O from 0xc000, 32-bit memory from the q35 PCI hole
  (0xe0000000..0xfec00000, as libqos), 64-bit prefetchable memory from QEMU's
  ``pci-hole64-start..end`` (QOM property of /machine/q35).
* Capabilities walk, command register, MSI-X.

MSI-X without an interrupt controller we can observe: each vector's message address is a
word of guest RAM and its data a marker (`MsiVector`).  The device's MSI write goes through
its bus-master address space into RAM (not to the APIC at 0xfee00000), and the driver polls
the word.  Bus mastering must be enabled for the write to happen at all.
"""

from __future__ import annotations

from ..interrupts import InterruptSource
from .bus import DEFAULT_MMIO32, DEFAULT_MMIO64, DEFAULT_PIO, PciBus
from .config import PciError, bdf_str
from .device import Bar, PciDevice
from .msix import MSI_MARKER, MsiVector, Msix

__all__ = [
    "DEFAULT_MMIO32",
    "DEFAULT_MMIO64",
    "DEFAULT_PIO",
    "MSI_MARKER",
    "Bar",
    "InterruptSource",
    "MsiVector",
    "Msix",
    "PciBus",
    "PciDevice",
    "PciError",
    "bdf_str",
]
