"""The guest's ACPI OSPM side of QEMU's memory hotplug controller, driven over qtest.

QEMU (hw/acpi/memory_hotplug.c, docs/specs/acpi_mem_hotplug.rst) exposes one register block per
machine, on q35 at I/O port 0x0a00 (24 bytes, 1-4 byte accesses), for the slot the selector
names:

=====  ===============================  =========================================
 off    read                             write
=====  ===============================  =========================================
 0x00   DIMM address, low 32 bits        slot selector
 0x04   DIMM address, high 32 bits       _OST event code
 0x08   DIMM size, low 32 bits           _OST status code (QEMU: ACPI_DEVICE_OST)
 0x0c   DIMM size, high 32 bits          -
 0x10   proximity domain (node)          -
 0x14   status: 1 enabled, 2 insert      control: 2 clear insert event, 4 clear
        event, 4 remove event            remove event, 8 eject (one bit per write)
=====  ===============================  =========================================

QEMU raises GPE.3 (an SCI) on device_add / device_del; the guest's AML (``MSCN``) then scans
the slots.  A qtest guest has no AML interpreter and its vCPU is halted, so the test is the
OSPM: after ``device_del`` it polls the slot's remove event, clears it, reports _OST and writes
the eject bit, which makes QEMU unplug the DIMM (DEVICE_DELETED) synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass

from .qtest import QTest
from .waiting import poll_until

#: ACPI_MEMORY_HOTPLUG_BASE (q35 and pc).
MEMHP_IO_BASE = 0x0A00
MEMHP_IO_LEN = 0x18

REG_ADDR_LO = 0x00
REG_ADDR_HI = 0x04
REG_SIZE_LO = 0x08
REG_SIZE_HI = 0x0C
REG_PXM = 0x10
REG_STATUS = 0x14
REG_SELECTOR = 0x00  # write
REG_OST_EVENT = 0x04  # write
REG_OST_STATUS = 0x08  # write
REG_CONTROL = 0x14  # write

STATUS_ENABLED = 0x1
STATUS_INSERT_EVENT = 0x2
STATUS_REMOVE_EVENT = 0x4

CTRL_CLEAR_INSERT = 0x2
CTRL_CLEAR_REMOVE = 0x4
CTRL_EJECT = 0x8

#: ACPI notify values OSPM reports in _OST (ACPI 6.5, 5.6.6 / 6.3.5).
OST_EVENT_DEVICE_CHECK = 0x1
OST_EVENT_EJECT_REQUEST = 0x3
OST_SUCCESS = 0x0
OST_EJECT_IN_PROGRESS = 0x84


class AcpiMemHotplugError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class MemSlot:
    """One slot as the controller reports it."""

    slot: int
    addr: int
    size: int
    node: int
    status: int

    @property
    def enabled(self) -> bool:
        return bool(self.status & STATUS_ENABLED)

    @property
    def insert_event(self) -> bool:
        return bool(self.status & STATUS_INSERT_EVENT)

    @property
    def remove_event(self) -> bool:
        return bool(self.status & STATUS_REMOVE_EVENT)


class AcpiMemoryHotplug:
    """OSPM for the memory hotplug controller at ``base`` with ``slots`` DIMM slots."""

    def __init__(self, qt: QTest, slots: int, *, base: int = MEMHP_IO_BASE) -> None:
        self.qt = qt
        self.slots = slots
        self.base = base

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise AcpiMemHotplugError(f"memory slot {slot} outside 0..{self.slots - 1}")

    def select(self, slot: int) -> None:
        self._check_slot(slot)
        self.qt.outl(self.base + REG_SELECTOR, slot)

    def read(self, slot: int) -> MemSlot:
        """Select ``slot`` and read its address, size, node and status."""
        self.select(slot)
        b, qt = self.base, self.qt
        addr = qt.inl(b + REG_ADDR_LO) | qt.inl(b + REG_ADDR_HI) << 32
        size = qt.inl(b + REG_SIZE_LO) | qt.inl(b + REG_SIZE_HI) << 32
        return MemSlot(slot, addr, size, qt.inl(b + REG_PXM), qt.inb(b + REG_STATUS))

    def status(self, slot: int) -> int:
        self.select(slot)
        return self.qt.inb(self.base + REG_STATUS)

    def scan(self) -> list[MemSlot]:
        """Every slot (what the AML's MSCN loop looks at)."""
        return [self.read(s) for s in range(self.slots)]

    def _control(self, slot: int, bits: int) -> None:
        self.select(slot)
        self.qt.outb(self.base + REG_CONTROL, bits)

    def ost(self, slot: int, event: int, status: int) -> None:
        """Report _OST (QEMU emits ACPI_DEVICE_OST on the status write)."""
        self.select(slot)
        self.qt.outl(self.base + REG_OST_EVENT, event)
        self.qt.outl(self.base + REG_OST_STATUS, status)

    # -- what the guest does on the SCI -----------------------------------------------------
    def accept_insert(self, slot: int) -> MemSlot:
        """Device check: the slot must be enabled with an insert event; clear it, _OST OK."""
        info = self.read(slot)
        if not info.enabled or not info.insert_event:
            raise AcpiMemHotplugError(
                f"slot {slot} has no pending insert (status {info.status:#x})"
            )
        self._control(slot, CTRL_CLEAR_INSERT)
        self.ost(slot, OST_EVENT_DEVICE_CHECK, OST_SUCCESS)
        return info

    def wait_remove_request(self, slot: int, timeout: float = 5.0) -> MemSlot:
        """Poll until QEMU flags a remove event on ``slot`` (after device_del)."""
        seen: list[int] = []

        def pending() -> bool:
            seen.append(self.status(slot))
            return bool(seen[-1] & STATUS_REMOVE_EVENT)

        poll_until(
            pending,
            timeout,
            f"the ACPI remove event of memory slot {slot}",
            detail=lambda: f"status {seen[-1]:#x}" if seen else "",
        )
        return self.read(slot)

    def eject_now(self, slot: int) -> MemSlot:
        """_EJ0 on ``slot`` without waiting for a remove event (a guest that saw the event
        before a migration ejects on the destination); returns the slot as read after."""
        self.ost(slot, OST_EVENT_EJECT_REQUEST, OST_EJECT_IN_PROGRESS)
        self._control(slot, CTRL_EJECT)
        return self.read(slot)

    def eject(self, slot: int, timeout: float = 5.0) -> MemSlot:
        """OSPM's answer to an eject request: clear the remove event, _OST 'in progress', _EJ0.

        QEMU unplugs the DIMM inside the eject write; the slot reads disabled afterwards.
        """
        info = self.wait_remove_request(slot, timeout)
        if not info.enabled:
            raise AcpiMemHotplugError(f"slot {slot} has a remove event but is not enabled")
        self._control(slot, CTRL_CLEAR_REMOVE)
        self.ost(slot, OST_EVENT_EJECT_REQUEST, OST_EJECT_IN_PROGRESS)
        self._control(slot, CTRL_EJECT)
        after = self.read(slot)
        if after.enabled:
            raise AcpiMemHotplugError(
                f"slot {slot} still enabled after eject (status {after.status:#x})"
            )
        return info
