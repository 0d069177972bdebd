"""The PCI bus as firmware sees it: config mechanism #1, enumeration (bus numbers for
bridges, bridge windows carved from the parent's), BAR address windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..qtest import QTest
from .config import (
    PCI_HEADER_TYPE,
    PCI_IO_BASE,
    PCI_IO_BASE_UPPER16,
    PCI_IO_LIMIT,
    PCI_IO_LIMIT_UPPER16,
    PCI_MEMORY_BASE,
    PCI_MEMORY_LIMIT,
    PCI_PREF_BASE_UPPER32,
    PCI_PREF_LIMIT_UPPER32,
    PCI_PREF_MEMORY_BASE,
    PCI_PREF_MEMORY_LIMIT,
    PCI_PRIMARY_BUS,
    PCI_SECONDARY_BUS,
    PCI_SUBORDINATE_BUS,
    PCI_VENDOR_ID,
    PciError,
    bdf_str,
)
from .device import PciDevice

if TYPE_CHECKING:
    from ..machine import QemuMachine

MiB = 1 << 20
GiB = 1 << 30

# q35 windows (libqos uses the same 32-bit one); 64-bit comes from QEMU's pci-hole64.
DEFAULT_MMIO32 = (0xE0000000, 0xFEC00000)
DEFAULT_MMIO64 = (0x40_0000_0000, 0x48_0000_0000)
DEFAULT_PIO = (0xC000, 0x10000)


class _Window:
    """Bump allocator for one address window [base, limit)."""

    def __init__(self, name: str, base: int, limit: int) -> None:
        self.name = name
        self.base = base
        self.limit = limit
        self.next = base

    def take(self, size: int, align: int) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.limit:
            raise PciError(
                f"{self.name} window 0x{self.base:x}-0x{self.limit:x} cannot fit 0x{size:x} bytes"
            )
        self.next = addr + size
        return addr

    def carve(self, name: str, size: int, align: int) -> _Window:
        base = self.take(size, align)
        return _Window(name, base, base + size)


@dataclass
class _BusResources:
    mem: _Window
    pref: _Window | None
    io: _Window | None


class PciBus:
    """Host bridge: config mechanism #1 plus our firmware resource allocation."""

    def __init__(
        self,
        qtest: QTest,
        *,
        mmio32: tuple[int, int] = DEFAULT_MMIO32,
        mmio64: tuple[int, int] = DEFAULT_MMIO64,
        pio: tuple[int, int] = DEFAULT_PIO,
        bridge_mem: int = 8 * MiB,
        bridge_pref: int = 256 * MiB,
        bridge_io: int = 0x1000,
    ) -> None:
        self.qt = qtest
        self._root = _BusResources(
            mem=_Window("mmio32", *mmio32),
            pref=_Window("mmio64", *mmio64),
            io=_Window("pio", *pio),
        )
        self.bridge_mem = bridge_mem
        self.bridge_pref = bridge_pref
        self.bridge_io = bridge_io
        self.devices: list[PciDevice] = []
        self._by_bdf: dict[tuple[int, int, int], PciDevice] = {}
        self._bus_res: dict[int, _BusResources] = {0: self._root}
        self._last_bus = 0

    @classmethod
    def for_machine(cls, machine: QemuMachine, *, bridge_mem: int = 8 * MiB) -> PciBus:
        """Windows from a `QemuMachine`'s layout (64-bit window = QEMU's pci-hole64)."""
        layout = machine.layout
        mmio64 = (layout.pci_hole64_start, layout.pci_hole64_end)
        return cls(machine.qtest, mmio64=mmio64, bridge_mem=bridge_mem)

    # ------------------------------------------------------------------ config mechanism #1
    @staticmethod
    def _address(bdf: tuple[int, int, int], offset: int) -> int:
        bus, dev, fn = bdf
        if not (0 <= bus < 256 and 0 <= dev < 32 and 0 <= fn < 8 and 0 <= offset < 256):
            raise PciError(f"bad config address {bus}:{dev}.{fn} +0x{offset:x}")
        return 0x80000000 | bus << 16 | dev << 11 | fn << 8 | (offset & 0xFC)

    def config_read(self, bdf: tuple[int, int, int], offset: int, size: int) -> int:
        self.qt.outl(0xCF8, self._address(bdf, offset))
        port = 0xCFC + (offset & 3)
        if size == 1:
            return self.qt.inb(port)
        if size == 2:
            return self.qt.inw(port)
        if size == 4:
            return self.qt.inl(port)
        raise ValueError(f"config access size {size}")

    def config_write(self, bdf: tuple[int, int, int], offset: int, size: int, value: int) -> None:
        self.qt.outl(0xCF8, self._address(bdf, offset))
        port = 0xCFC + (offset & 3)
        if size == 1:
            self.qt.outb(port, value)
        elif size == 2:
            self.qt.outw(port, value)
        elif size == 4:
            self.qt.outl(port, value)
        else:
            raise ValueError(f"config access size {size}")

    # ------------------------------------------------------------------ enumeration
    def enumerate(self) -> list[PciDevice]:
        """Scan from bus 0, numbering and opening bridges; new devices are added.

        Safe to call again (e.g. after a hotplug): known devices and bridges keep their
        bus numbers and windows.
        """
        self._scan_bus(0)
        return list(self.devices)

    def _scan_bus(self, busno: int) -> None:
        for slot in range(32):
            for fn in range(8):
                bdf = (busno, slot, fn)
                vendor = self.config_read(bdf, PCI_VENDOR_ID, 2)
                if vendor == 0xFFFF:
                    if fn == 0:
                        break
                    continue
                header = self.config_read(bdf, PCI_HEADER_TYPE, 1)
                dev = self._by_bdf.get(bdf)
                if dev is None:
                    dev = PciDevice(self, bdf)
                    self._by_bdf[bdf] = dev
                    self.devices.append(dev)
                    if dev.is_bridge:
                        self._open_bridge(dev)
                        assert dev.secondary_bus is not None
                        self._scan_bus(dev.secondary_bus)
                        dev.config_write8(PCI_SUBORDINATE_BUS, self._last_bus)
                elif dev.is_bridge and dev.secondary_bus is not None:
                    self._scan_bus(dev.secondary_bus)
                if fn == 0 and not header & 0x80:
                    break

    def _open_bridge(self, dev: PciDevice) -> None:
        parent = self._bus_res[dev.bdf[0]]
        self._last_bus += 1
        sec = self._last_bus
        dev.config_write8(PCI_PRIMARY_BUS, dev.bdf[0])
        dev.config_write8(PCI_SECONDARY_BUS, sec)
        dev.config_write8(PCI_SUBORDINATE_BUS, 0xFF)  # narrowed after the scan below it
        name = f"bridge {dev}"
        mem = parent.mem.carve(f"{name} mem", self.bridge_mem, MiB)
        dev.config_write16(PCI_MEMORY_BASE, (mem.base >> 16) & 0xFFF0)
        dev.config_write16(PCI_MEMORY_LIMIT, ((mem.limit - 1) >> 16) & 0xFFF0)
        pref = None
        if parent.pref is not None:
            pref = parent.pref.carve(f"{name} pref", self.bridge_pref, MiB)
            dev.config_write16(PCI_PREF_MEMORY_BASE, (pref.base >> 16) & 0xFFF0)
            dev.config_write16(PCI_PREF_MEMORY_LIMIT, ((pref.limit - 1) >> 16) & 0xFFF0)
            dev.config_write32(PCI_PREF_BASE_UPPER32, pref.base >> 32)
            dev.config_write32(PCI_PREF_LIMIT_UPPER32, (pref.limit - 1) >> 32)
        io = None
        if parent.io is not None and self.bridge_io:
            io = parent.io.carve(f"{name} io", self.bridge_io, 0x1000)
            dev.config_write8(PCI_IO_BASE, (io.base >> 8) & 0xF0)
            dev.config_write8(PCI_IO_LIMIT, ((io.limit - 1) >> 8) & 0xF0)
            dev.config_write16(PCI_IO_BASE_UPPER16, io.base >> 16)
            dev.config_write16(PCI_IO_LIMIT_UPPER16, (io.limit - 1) >> 16)
        self._bus_res[sec] = _BusResources(mem=mem, pref=pref, io=io)
        dev.secondary_bus = sec
        dev.enable(io=io is not None, memory=True, bus_master=True)

    def resources_for(self, busno: int) -> _BusResources:
        try:
            return self._bus_res[busno]
        except KeyError:
            raise PciError(f"bus {busno} was never numbered (call enumerate())") from None

    # ------------------------------------------------------------------ lookup
    def find_all(
        self,
        vendor_id: int | None = None,
        device_id: int | None = None,
        class_code: int | None = None,
    ) -> list[PciDevice]:
        """Devices matching vendor/device and/or 16-bit class (base<<8|sub); enumerates once."""
        if not self.devices:
            self.enumerate()
        return [
            d
            for d in self.devices
            if (vendor_id is None or d.vendor_id == vendor_id)
            and (device_id is None or d.device_id == device_id)
            and (class_code is None or d.class_code >> 8 == class_code)
        ]

    def find(self, vendor_id: int, device_id: int, index: int = 0) -> PciDevice:
        found = self.find_all(vendor_id, device_id)
        if len(found) <= index:
            seen = ", ".join(f"{d} {d.vendor_id:04x}:{d.device_id:04x}" for d in self.devices)
            raise PciError(
                f"PCI device {vendor_id:04x}:{device_id:04x} #{index} not found; present: {seen}"
            )
        return found[index]

    def device_at(self, bdf: tuple[int, int, int]) -> PciDevice:
        if bdf not in self._by_bdf:
            self.enumerate()
        try:
            return self._by_bdf[bdf]
        except KeyError:
            raise PciError(f"no PCI device at {bdf_str(bdf)}") from None
