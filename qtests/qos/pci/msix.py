"""MSI-X without an interrupt controller we can observe: each vector's message address is a
word of guest RAM and its data a marker (:class:`MsiVector`). The device's MSI write goes
through its bus-master address space into RAM (not to the APIC at 0xfee00000), and the
driver polls the word. Bus mastering must be enabled for the write to happen at all."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..alloc import GuestAllocator
from ..waiting import poll_until
from .config import (
    PCI_MSIX_BIR_MASK,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_DATA,
    PCI_MSIX_ENTRY_LOWER_ADDR,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_UPPER_ADDR,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_FLAGS_QSIZE,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    PciError,
)

if TYPE_CHECKING:
    from .device import PciDevice

MSI_MARKER = 0x4D530000


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
