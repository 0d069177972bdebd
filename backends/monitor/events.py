"""The monitor's QMP events: which journal entries announce what. The monitor learns about
state changes only by subscribing to the device's :class:`~backends.vdpa.journal.Journal`."""

from __future__ import annotations

from typing import Any

from backends.vdpa.journal import json_safe

from .names import status_names

# -- events -------------------------------------------------------------------------------------
EVENTS: dict[str, str] = {
    "MEM_TABLE_CHANGED": "a host memory region was added/removed or the IOTLB was set as a whole",
    "IOTLB_MISS": "a queue is parked on an IOVA the IOTLB does not map (MISS sent to QEMU)",
    "VRING_STARTED": "a virtqueue started processing",
    "VRING_STOPPED": "a virtqueue stopped (GET_VRING_BASE)",
    "DEVICE_ERROR": "the device detected an error (journal kind error.*)",
    "STATUS_CHANGED": "the driver wrote the device status",
    "SHUTDOWN": "the backend is quitting (quit command)",
}

_EVENT_BY_KIND = {
    "mem.add": "MEM_TABLE_CHANGED",
    "mem.remove": "MEM_TABLE_CHANGED",
    "dma.set_map": "MEM_TABLE_CHANGED",
    "iotlb.miss": "IOTLB_MISS",
    "vq.start": "VRING_STARTED",
    "vq.stop": "VRING_STOPPED",
    "status.set": "STATUS_CHANGED",
}


def journal_event(entry: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The QMP event (name, data) a journal entry announces, or None. Data = the entry."""
    kind = str(entry.get("kind", ""))
    name = _EVENT_BY_KIND.get(kind)
    if name is None and kind.startswith("error."):
        name = "DEVICE_ERROR"
    if name is None:
        return None
    data = json_safe(entry)
    if name == "STATUS_CHANGED" and isinstance(data.get("new"), int):
        data["status_names"] = status_names(data["new"])
    return name, data
