"""PCI for the qtest driver: we are the firmware.

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

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .alloc import GuestAllocator
from .qtest import QTest
from .waiting import poll_until

if TYPE_CHECKING:
    from .machine import QemuMachine

# config space offsets (type 0 and common)
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_CAP_LIST = 0x10
PCI_STATUS_INTERRUPT = 0x08

PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8

# type 1 (bridge) header
PCI_PRIMARY_BUS = 0x18
PCI_SECONDARY_BUS = 0x19
PCI_SUBORDINATE_BUS = 0x1A
PCI_IO_BASE = 0x1C
PCI_IO_LIMIT = 0x1D
PCI_MEMORY_BASE = 0x20
PCI_MEMORY_LIMIT = 0x22
PCI_PREF_MEMORY_BASE = 0x24
PCI_PREF_MEMORY_LIMIT = 0x26
PCI_PREF_BASE_UPPER32 = 0x28
PCI_PREF_LIMIT_UPPER32 = 0x2C
PCI_IO_BASE_UPPER16 = 0x30
PCI_IO_LIMIT_UPPER16 = 0x32
PCI_HEADER_TYPE_BRIDGE = 1

# capability IDs
PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

# MSI-X capability / table layout
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_BIR_MASK = 0x7
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0
PCI_MSIX_ENTRY_UPPER_ADDR = 4
PCI_MSIX_ENTRY_DATA = 8
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 1

#: Marker written by MSI-X vector N into its RAM word: 0x4d53 ("MS") << 16 | N.
MSI_MARKER = 0x4D530000

MiB = 1 << 20
GiB = 1 << 30

# q35 windows (libqos uses the same 32-bit one); 64-bit comes from QEMU's pci-hole64.
DEFAULT_MMIO32 = (0xE0000000, 0xFEC00000)
DEFAULT_MMIO64 = (0x40_0000_0000, 0x48_0000_0000)
DEFAULT_PIO = (0xC000, 0x10000)


class PciError(Exception):
    """Enumeration/config/resource problem, naming the device."""


def bdf_str(bdf: tuple[int, int, int]) -> str:
    return f"{bdf[0]:02x}:{bdf[1]:02x}.{bdf[2]}"


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


@dataclass
class Bar:
    """One base address register (after sizing; ``addr`` once assigned)."""

    index: int
    is_io: bool
    is_64: bool
    prefetchable: bool
    size: int
    addr: int | None = None

    def __str__(self) -> str:
        kind = "io" if self.is_io else ("mem64" if self.is_64 else "mem32")
        pf = ",pref" if self.prefetchable else ""
        where = f"@0x{self.addr:x}" if self.addr is not None else "@unassigned"
        return f"BAR{self.index}[{kind}{pf}, 0x{self.size:x}]{where}"


class InterruptSource(Protocol):
    """Something the driver can poll for "an interrupt happened" (MSI-X word, ISR bit)."""

    def fired(self) -> bool: ...

    def clear(self) -> None: ...

    def describe(self) -> str: ...


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


@dataclass(eq=False, repr=False)
class PciDevice:
    """One PCI function."""

    bus: PciBus
    bdf: tuple[int, int, int]
    vendor_id: int = 0
    device_id: int = 0
    class_code: int = 0  # 24 bits: base << 16 | sub << 8 | prog-if
    revision: int = 0
    header_type: int = 0
    secondary_bus: int | None = None
    bars: dict[int, Bar] = field(default_factory=dict)
    _msix: Msix | None = None

    def __post_init__(self) -> None:
        self.vendor_id = self.config_read16(PCI_VENDOR_ID)
        self.device_id = self.config_read16(PCI_DEVICE_ID)
        rev_class = self.config_read32(PCI_REVISION_ID)
        self.revision = rev_class & 0xFF
        self.class_code = rev_class >> 8
        self.header_type = self.config_read8(PCI_HEADER_TYPE) & 0x7F

    def __str__(self) -> str:
        return bdf_str(self.bdf)

    def __repr__(self) -> str:
        return f"PciDevice({self}, {self.vendor_id:04x}:{self.device_id:04x})"

    def __hash__(self) -> int:
        return hash(self.bdf)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PciDevice) and other.bdf == self.bdf and other.bus is self.bus

    @property
    def qt(self) -> QTest:
        return self.bus.qt

    @property
    def is_bridge(self) -> bool:
        return self.header_type == PCI_HEADER_TYPE_BRIDGE

    @property
    def subsystem_id(self) -> int:
        return self.config_read16(PCI_SUBSYSTEM_ID)

    # ------------------------------------------------------------------ config space
    def config_read8(self, off: int) -> int:
        return self.bus.config_read(self.bdf, off, 1)

    def config_read16(self, off: int) -> int:
        return self.bus.config_read(self.bdf, off, 2)

    def config_read32(self, off: int) -> int:
        return self.bus.config_read(self.bdf, off, 4)

    def config_write8(self, off: int, value: int) -> None:
        self.bus.config_write(self.bdf, off, 1, value)

    def config_write16(self, off: int, value: int) -> None:
        self.bus.config_write(self.bdf, off, 2, value)

    def config_write32(self, off: int, value: int) -> None:
        self.bus.config_write(self.bdf, off, 4, value)

    # ------------------------------------------------------------------ command register
    @property
    def command(self) -> int:
        return self.config_read16(PCI_COMMAND)

    def enable(self, *, memory: bool = True, io: bool = True, bus_master: bool = True) -> None:
        """Set decode/bus-master bits (never clears any) and check they stuck."""
        want = (
            (PCI_COMMAND_MEMORY if memory else 0)
            | (PCI_COMMAND_IO if io else 0)
            | (PCI_COMMAND_MASTER if bus_master else 0)
        )
        self.config_write16(PCI_COMMAND, self.command | want)
        got = self.command
        # A device without I/O BARs may hard-wire the I/O enable bit to 0: only check the rest.
        need = want & ~PCI_COMMAND_IO if not any(b.is_io for b in self.bars.values()) else want
        if got & need != need:
            raise PciError(f"{self}: command register 0x{got:04x} lacks bits 0x{need:04x}")

    def set_bus_master(self, on: bool) -> None:
        cmd = self.command
        cmd = cmd | PCI_COMMAND_MASTER if on else cmd & ~PCI_COMMAND_MASTER
        self.config_write16(PCI_COMMAND, cmd)

    # ------------------------------------------------------------------ capabilities
    def capabilities(self) -> list[tuple[int, int]]:
        """(cap id, config offset) of every entry of the capability list, in order."""
        if not self.config_read16(PCI_STATUS) & PCI_STATUS_CAP_LIST:
            return []
        caps: list[tuple[int, int]] = []
        seen: set[int] = set()
        off = self.config_read8(PCI_CAPABILITY_LIST) & 0xFC
        while off:
            if off in seen or off < 0x40 or len(caps) > 48:
                raise PciError(f"{self}: capability list loops or is corrupt at 0x{off:02x}")
            seen.add(off)
            header = self.config_read16(off)
            caps.append((header & 0xFF, off))
            off = (header >> 8) & 0xFC
        return caps

    def find_capabilities(self, cap_id: int) -> list[int]:
        return [off for cid, off in self.capabilities() if cid == cap_id]

    def find_capability(self, cap_id: int) -> int | None:
        found = self.find_capabilities(cap_id)
        return found[0] if found else None

    # ------------------------------------------------------------------ BARs
    def size_bars(self) -> dict[int, Bar]:
        """Probe every BAR (write all-ones, read back, restore) with decoding disabled."""
        nbars = 2 if self.is_bridge else 6
        cmd = self.command
        self.config_write16(PCI_COMMAND, cmd & ~(PCI_COMMAND_MEMORY | PCI_COMMAND_IO))
        found: dict[int, Bar] = {}
        try:
            i = 0
            while i < nbars:
                reg = PCI_BASE_ADDRESS_0 + 4 * i
                orig = self.config_read32(reg)
                self.config_write32(reg, 0xFFFFFFFF)
                probe = self.config_read32(reg)
                self.config_write32(reg, orig)
                if probe == 0:  # not implemented
                    i += 1
                    continue
                if probe & PCI_BASE_ADDRESS_SPACE_IO:
                    mask = probe & 0xFFFFFFFC & 0xFFFF
                    size = (~mask & 0xFFFF) + 1 if mask else 0
                    if size:
                        found[i] = Bar(i, True, False, False, size)
                    i += 1
                    continue
                is64 = bool(probe & PCI_BASE_ADDRESS_MEM_TYPE_64)
                pref = bool(probe & PCI_BASE_ADDRESS_MEM_PREFETCH)
                mask = probe & 0xFFFFFFF0
                if is64:
                    orig_hi = self.config_read32(reg + 4)
                    self.config_write32(reg + 4, 0xFFFFFFFF)
                    mask |= self.config_read32(reg + 4) << 32
                    self.config_write32(reg + 4, orig_hi)
                    size = (~mask & 0xFFFFFFFFFFFFFFFF) + 1 if mask else 0
                else:
                    size = (~mask & 0xFFFFFFFF) + 1 if mask else 0
                if size:
                    found[i] = Bar(i, False, is64, pref, size)
                i += 2 if is64 else 1
        finally:
            self.config_write16(PCI_COMMAND, cmd)
        for idx, bar in found.items():
            old = self.bars.get(idx)
            if old is not None:
                bar.addr = old.addr
        self.bars = found
        return found

    def assign_bars(self) -> dict[int, Bar]:
        """Size and place every unassigned BAR in its bus's windows (firmware's job)."""
        if not self.bars:
            self.size_bars()
        res = self.bus.resources_for(self.bdf[0])
        for bar in self.bars.values():
            if bar.addr is not None:
                continue
            reg = PCI_BASE_ADDRESS_0 + 4 * bar.index
            if bar.is_io:
                if res.io is None:
                    raise PciError(f"{self}: {bar} needs an I/O window the bus does not have")
                bar.addr = res.io.take(bar.size, max(bar.size, 4))
                self.config_write32(reg, bar.addr | PCI_BASE_ADDRESS_SPACE_IO)
                continue
            window = res.pref if (bar.is_64 and bar.prefetchable and res.pref) else res.mem
            bar.addr = window.take(bar.size, max(bar.size, 16))
            self.config_write32(reg, bar.addr & 0xFFFFFFFF)
            if bar.is_64:
                self.config_write32(reg + 4, bar.addr >> 32)
        return self.bars

    def bar(self, index: int) -> Bar:
        bar = self.bars.get(index)
        if bar is None or bar.addr is None:
            raise PciError(f"{self}: BAR{index} is absent or unassigned (call assign_bars())")
        return bar

    def bar_addr(self, index: int) -> int:
        addr = self.bar(index).addr
        assert addr is not None
        return addr

    def bar_read(self, index: int, off: int, size: int) -> int:
        """Little-endian register read of 1/2/4/8 bytes at BAR ``index`` + ``off``."""
        bar = self.bar(index)
        addr = self.bar_addr(index) + off
        if bar.is_io:
            if size == 8:
                return self.qt.inl(addr) | self.qt.inl(addr + 4) << 32
            return {1: self.qt.inb, 2: self.qt.inw, 4: self.qt.inl}[size](addr)
        return {1: self.qt.readb, 2: self.qt.readw, 4: self.qt.readl, 8: self.qt.readq}[size](addr)

    def bar_write(self, index: int, off: int, size: int, value: int) -> None:
        bar = self.bar(index)
        addr = self.bar_addr(index) + off
        if bar.is_io:
            if size == 8:
                self.qt.outl(addr, value & 0xFFFFFFFF)
                self.qt.outl(addr + 4, value >> 32)
                return
            {1: self.qt.outb, 2: self.qt.outw, 4: self.qt.outl}[size](addr, value)
            return
        {1: self.qt.writeb, 2: self.qt.writew, 4: self.qt.writel, 8: self.qt.writeq}[size](
            addr, value
        )

    def bar_memread(self, index: int, off: int, size: int) -> bytes:
        bar = self.bar(index)
        if bar.is_io:
            raise PciError(f"{self}: bulk read of I/O {bar}")
        return self.qt.memread(self.bar_addr(index) + off, size)

    # ------------------------------------------------------------------ interrupts
    @property
    def interrupt_pin(self) -> int:
        """1 = INTA# ... 4 = INTD#, 0 = none."""
        return self.config_read8(PCI_INTERRUPT_PIN)

    def intx_pending(self) -> bool:
        """Interrupt Status bit of the status register (INTx asserted by the function)."""
        return bool(self.config_read16(PCI_STATUS) & PCI_STATUS_INTERRUPT)

    def msix(self) -> Msix:
        """The MSI-X capability (parsed once).  Raises if the device has none."""
        if self._msix is None:
            cap = self.find_capability(PCI_CAP_ID_MSIX)
            if cap is None:
                raise PciError(f"{self} {self.vendor_id:04x}:{self.device_id:04x} has no MSI-X")
            self._msix = Msix(self, cap)
        return self._msix

    def has_msix(self) -> bool:
        return self.find_capability(PCI_CAP_ID_MSIX) is not None


class Msix:
    """MSI-X capability, vector table and PBA of one device."""

    def __init__(self, dev: PciDevice, cap: int) -> None:
        self.dev = dev
        self.cap = cap
        flags = dev.config_read16(cap + PCI_MSIX_FLAGS)
        self.table_size = (flags & PCI_MSIX_FLAGS_QSIZE) + 1
        table = dev.config_read32(cap + PCI_MSIX_TABLE)
        pba = dev.config_read32(cap + PCI_MSIX_PBA)
        self.table_bar = table & PCI_MSIX_BIR_MASK
        self.table_offset = table & ~PCI_MSIX_BIR_MASK
        self.pba_bar = pba & PCI_MSIX_BIR_MASK
        self.pba_offset = pba & ~PCI_MSIX_BIR_MASK
        self.vectors: list[MsiVector] = []
        self._ram_block: tuple[GuestAllocator, int] | None = None

    def __str__(self) -> str:
        return f"MSI-X of {self.dev} ({self.table_size} vectors)"

    @property
    def flags(self) -> int:
        return self.dev.config_read16(self.cap + PCI_MSIX_FLAGS)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & PCI_MSIX_FLAGS_ENABLE)

    def enable(self, *, mask_all: bool = False) -> None:
        """Set MSI-X Enable (and Function Mask as asked).  BARs must be assigned."""
        self.dev.bar(self.table_bar)
        self.dev.bar(self.pba_bar)
        flags = self.flags | PCI_MSIX_FLAGS_ENABLE
        flags = flags | PCI_MSIX_FLAGS_MASKALL if mask_all else flags & ~PCI_MSIX_FLAGS_MASKALL
        self.dev.config_write16(self.cap + PCI_MSIX_FLAGS, flags)
        if not self.enabled:
            raise PciError(f"{self}: enable bit did not stick")

    def disable(self) -> None:
        self.dev.config_write16(self.cap + PCI_MSIX_FLAGS, self.flags & ~PCI_MSIX_FLAGS_ENABLE)

    def set_function_mask(self, masked: bool) -> None:
        flags = self.flags
        flags = flags | PCI_MSIX_FLAGS_MASKALL if masked else flags & ~PCI_MSIX_FLAGS_MASKALL
        self.dev.config_write16(self.cap + PCI_MSIX_FLAGS, flags)

    def _entry_off(self, entry: int) -> int:
        if not 0 <= entry < self.table_size:
            raise PciError(f"{self}: no vector {entry}")
        return self.table_offset + entry * PCI_MSIX_ENTRY_SIZE

    def write_entry(self, entry: int, address: int, data: int, *, masked: bool = False) -> None:
        off = self._entry_off(entry)
        d, b = self.dev, self.table_bar
        d.bar_write(b, off + PCI_MSIX_ENTRY_LOWER_ADDR, 4, address & 0xFFFFFFFF)
        d.bar_write(b, off + PCI_MSIX_ENTRY_UPPER_ADDR, 4, address >> 32)
        d.bar_write(b, off + PCI_MSIX_ENTRY_DATA, 4, data & 0xFFFFFFFF)
        self.mask(entry, masked)

    def read_entry(self, entry: int) -> tuple[int, int, int]:
        """(address, data, vector control)."""
        off = self._entry_off(entry)
        d, b = self.dev, self.table_bar
        lo = d.bar_read(b, off + PCI_MSIX_ENTRY_LOWER_ADDR, 4)
        hi = d.bar_read(b, off + PCI_MSIX_ENTRY_UPPER_ADDR, 4)
        data = d.bar_read(b, off + PCI_MSIX_ENTRY_DATA, 4)
        ctrl = d.bar_read(b, off + PCI_MSIX_ENTRY_VECTOR_CTRL, 4)
        return hi << 32 | lo, data, ctrl

    def mask(self, entry: int, masked: bool = True) -> None:
        off = self._entry_off(entry) + PCI_MSIX_ENTRY_VECTOR_CTRL
        ctrl = self.dev.bar_read(self.table_bar, off, 4)
        ctrl = ctrl | PCI_MSIX_ENTRY_CTRL_MASKBIT if masked else ctrl & ~PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.dev.bar_write(self.table_bar, off, 4, ctrl)

    def is_masked(self, entry: int) -> bool:
        if self.flags & PCI_MSIX_FLAGS_MASKALL:
            return True
        return bool(self.read_entry(entry)[2] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def is_pending(self, entry: int) -> bool:
        """The PBA bit of ``entry`` (set while the vector is masked and has fired)."""
        self._entry_off(entry)
        word = self.dev.bar_read(self.pba_bar, self.pba_offset + (entry // 32) * 4, 4)
        return bool(word >> (entry % 32) & 1)

    def route_to_ram(self, alloc: GuestAllocator) -> list[MsiVector]:
        """Point every vector at its own RAM word (data = `MSI_MARKER` | n), unmasked.

        Returns the `MsiVector` sinks (also kept in ``self.vectors``).  Call `enable` too.
        """
        if self._ram_block is None:
            block = alloc.alloc(4 * self.table_size, tag=f"msix {self.dev}")
            self._ram_block = (alloc, block)
            self.dev.qt.memset(block, 4 * self.table_size, 0)
            self.vectors = [
                MsiVector(self, n, block + 4 * n, MSI_MARKER | n) for n in range(self.table_size)
            ]
        for v in self.vectors:
            self.write_entry(v.entry, v.addr, v.data)
        return self.vectors

    def release_ram(self) -> None:
        """Free the RAM words of `route_to_ram` (masks the vectors first)."""
        if self._ram_block is None:
            return
        for v in self.vectors:
            self.mask(v.entry, True)
        alloc, block = self._ram_block
        alloc.free(block)
        self._ram_block = None
        self.vectors = []

    def __iter__(self) -> Iterator[MsiVector]:
        return iter(self.vectors)


@dataclass(eq=False)
class MsiVector:
    """One MSI-X vector delivered into a guest-RAM word: an `InterruptSource`."""

    msix: Msix = field(repr=False)
    entry: int
    addr: int
    data: int
    hits: int = 0

    def describe(self) -> str:
        return f"MSI-X vector {self.entry} of {self.msix.dev} (word 0x{self.addr:x})"

    def fired(self, *, clear: bool = True) -> bool:
        """True if the device wrote the marker since the last clear (then cleared)."""
        qt = self.msix.dev.qt
        value = qt.readl(self.addr)
        if value == self.data:
            if clear:
                qt.writel(self.addr, 0)
            self.hits += 1
            return True
        if value != 0:
            raise PciError(
                f"{self.describe()} holds 0x{value:08x}, expected 0 or 0x{self.data:08x}"
            )
        return False

    def clear(self) -> None:
        self.msix.dev.qt.writel(self.addr, 0)

    def wait(self, timeout: float) -> None:
        poll_until(self.fired, timeout, self.describe())
