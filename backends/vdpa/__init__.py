"""The vDPA device model: address spaces, IOTLB, virtqueues, status, journal, faults."""

# ruff: noqa: E402  (the compiled modules must be on __path__ before the imports below)
from backends.compiled import activate

activate(__path__, __name__)  # mypyc-built hot-path modules, when current (backends/compiled.py)


from .access import Access, TranslationError
from .device import DevicePersonality, VdpaDevice
from .dirty_log import DirtyLog
from .dma import DmaSpace
from .faults import FAULTS, Faults
from .iotlb import IOTLB, Mapping, Perm, SetMapDiff
from .journal import Journal
from .memory import HostMemory, HostRegion, Piece
from .virtqueue import Chain, SplitVirtqueue, VqError, VqState, vring_need_event

__all__ = [
    "FAULTS",
    "IOTLB",
    "Access",
    "Chain",
    "DevicePersonality",
    "DirtyLog",
    "DmaSpace",
    "Faults",
    "HostMemory",
    "HostRegion",
    "Journal",
    "Mapping",
    "Perm",
    "Piece",
    "SetMapDiff",
    "SplitVirtqueue",
    "TranslationError",
    "VdpaDevice",
    "VqError",
    "VqState",
    "vring_need_event",
]
