"""Memory devices of a qtest guest: plug / unplug DIMMs through QMP + the ACPI OSPM, and place
driver structures in them.

* `query_memory_devices` reads QMP ``query-memory-devices`` (pc-dimm and virtio-mem) into
  `MemoryDevice` records (guest-physical address and size).
* `DimmHotplug.plug` = ``object-add memory-backend-memfd,share=on`` + ``device_add pc-dimm``
  + the OSPM accepting the insert event; `DimmHotplug.unplug` = ``device_del`` + the OSPM
  ejecting the slot (`acpi_memhp`) + waiting for DEVICE_DELETED + ``object-del``. vhost-user
  sees shared memory only, hence always ``share=on`` memfd backends.
* `PlacementAllocator` is a `GuestAllocator` that sends allocations to a chosen range by tag
  (the driver tags rings ``"<q> desc|avail|used"``, packet buffers ``"<q> bufs"``), so a driver
  re-initialised on it keeps its rings or its buffers inside a hotplugged DIMM.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .acpi_memhp import AcpiMemoryHotplug
from .alloc import GuestAllocator, MemRange
from .qmp import QmpClient, QmpError

DIMM_BACKEND = "memory-backend-memfd"

#: Tag suffixes the virtio drivers use.
RING_TAGS = (" desc", " avail", " used", " indirect")
BUFFER_TAGS = (" bufs", " big frame", " ctrl", " req")


class MemoryDeviceError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class MemoryDevice:
    """A memory device as QEMU reports it. ``size`` is the mapped size: a DIMM's size, a
    virtio-mem device's plugged size; ``max_size`` is the region it owns."""

    id: str
    type: str
    addr: int
    size: int
    max_size: int
    memdev: str
    slot: int | None = None
    block_size: int | None = None
    requested_size: int | None = None

    @property
    def end(self) -> int:
        return self.addr + self.max_size

    def range(self, name: str | None = None) -> MemRange:
        return MemRange(name or self.id, self.addr, self.max_size)


def query_memory_devices(qmp: QmpClient) -> list[MemoryDevice]:
    """``query-memory-devices``, sorted by address (unknown types keep their raw fields)."""
    out: list[MemoryDevice] = []
    for item in qmp.command("query-memory-devices"):
        kind = str(item.get("type"))
        d: dict[str, Any] = item.get("data", {})
        if kind in ("dimm", "nvdimm"):
            out.append(
                MemoryDevice(
                    id=str(d.get("id")),
                    type=kind,
                    addr=int(d["addr"]),
                    size=int(d["size"]),
                    max_size=int(d["size"]),
                    memdev=str(d.get("memdev")),
                    slot=int(d["slot"]),
                )
            )
        elif kind == "virtio-mem":
            out.append(
                MemoryDevice(
                    id=str(d.get("id")),
                    type=kind,
                    addr=int(d["memaddr"]),
                    size=int(d["size"]),
                    max_size=int(d["max-size"]),
                    memdev=str(d.get("memdev")),
                    block_size=int(d["block-size"]),
                    requested_size=int(d["requested-size"]),
                )
            )
        else:
            addr = int(d.get("addr", d.get("memaddr", 0)))
            size = int(d.get("size", 0))
            out.append(MemoryDevice(str(d.get("id")), kind, addr, size, size, str(d.get("memdev"))))
    return sorted(out, key=lambda m: m.addr)


class DimmHotplug:
    """Plug and unplug pc-dimm devices of a running machine. ``ospm``: the qtest guest's ACPI
    OSPM (None for a real guest, whose kernel answers the ACPI events itself)."""

    def __init__(
        self, qmp: QmpClient, ospm: AcpiMemoryHotplug | None = None, *, prefix: str = "dimm"
    ) -> None:
        self.qmp = qmp
        self.ospm = ospm
        self.prefix = prefix
        self._ids = itertools.count(1)
        self.plugged: dict[str, MemoryDevice] = {}

    def device(self, ident: str) -> MemoryDevice:
        for dev in query_memory_devices(self.qmp):
            if dev.id == ident:
                return dev
        raise MemoryDeviceError(f"QEMU reports no memory device {ident!r}")

    def plug(
        self,
        size: int,
        *,
        ident: str | None = None,
        memdev_props: dict[str, Any] | None = None,
        **dimm_props: Any,
    ) -> MemoryDevice:
        """Add a shared memfd backend and a pc-dimm on it; accept the ACPI insert event.

        ``memdev_props`` override / extend the backend object's properties, e.g.
        ``{"qom-type": "memory-backend-file", "mem-path": PATH, "offset": N}``."""
        ident = ident or f"{self.prefix}{next(self._ids)}"
        memdev = f"{ident}-mem"
        props = {"qom-type": DIMM_BACKEND, "id": memdev, "size": size, "share": True}
        self.qmp.command("object-add", {**props, **(memdev_props or {})})
        try:
            self.qmp.command(
                "device_add", {"driver": "pc-dimm", "id": ident, "memdev": memdev, **dimm_props}
            )
        except QmpError:
            self.qmp.command("object-del", id=memdev)
            raise
        dev = self.device(ident)
        if dev.slot is None:
            raise MemoryDeviceError(f"{ident} has no slot: {dev}")
        if self.ospm is not None:
            info = self.ospm.accept_insert(dev.slot)
            if (info.addr, info.size) != (dev.addr, dev.size):
                raise MemoryDeviceError(
                    f"ACPI slot {dev.slot} reports {info.addr:#x}+{info.size:#x}, "
                    f"QMP {dev.addr:#x}+{dev.size:#x}"
                )
        self.plugged[ident] = dev
        return dev

    def request_unplug(self, ident: str) -> MemoryDevice:
        """``device_del`` only (QEMU flags the slot's remove event and waits for the OSPM)."""
        dev = self.plugged.get(ident) or self.device(ident)
        self.qmp.command("device_del", id=ident)
        return dev

    def unplug(self, ident: str, timeout: float = 20.0) -> MemoryDevice:
        """device_del, OSPM eject, DEVICE_DELETED, object-del of the backend."""
        dev = self.request_unplug(ident)
        if self.ospm is not None and dev.slot is not None:
            self.ospm.eject(dev.slot, timeout)
        self.qmp.wait_event("DEVICE_DELETED", timeout, match={"device": ident})
        self.qmp.command("object-del", id=f"{ident}-mem")
        self.plugged.pop(ident, None)
        return dev


class PlacementAllocator(GuestAllocator):
    """A `GuestAllocator` whose ``alloc`` honours per-tag placement rules.

    ``rules`` maps a predicate on the allocation tag to a range name; the first matching rule
    wins, everything else goes first-fit over the ranges in the order given.
    """

    def __init__(
        self, ranges: list[MemRange], rules: list[tuple[Callable[[str], bool], str]] | None = None
    ) -> None:
        super().__init__(ranges)
        self.rules = list(rules or [])

    def alloc(self, size: int, align: int | None = None, *, tag: str = "") -> int:
        for matches, range_name in self.rules:
            if matches(tag):
                return self.alloc_in(range_name, size, align, tag=tag)
        return super().alloc(size, align, tag=tag)

    def placed_in(self, range_name: str) -> list[str]:
        """Tags of the live allocations inside ``range_name``."""
        return [a.tag for a in self.live() if a.range == range_name]


def is_ring_tag(tag: str) -> bool:
    return tag.endswith(RING_TAGS)


def is_buffer_tag(tag: str) -> bool:
    return tag.endswith(BUFFER_TAGS)
