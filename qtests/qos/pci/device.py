"""One PCI function: config space access, command register, capabilities, BAR sizing and
assignment, BAR access, its MSI-X capability."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..qtest import QTest
from .config import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_CAP_ID_MSIX,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_HEADER_TYPE_BRIDGE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_INTERRUPT,
    PCI_SUBSYSTEM_ID,
    PCI_VENDOR_ID,
    PciError,
    bdf_str,
)
from .msix import Msix

if TYPE_CHECKING:
    from .bus import PciBus


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
