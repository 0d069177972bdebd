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
from .packed_virtqueue import PackedVirtqueue
from .split_virtqueue import SplitVirtqueue
from .virtqueue import Chain, Virtqueue, VqError, VqState

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
    "PackedVirtqueue",
    "Perm",
    "Piece",
    "SetMapDiff",
    "SplitVirtqueue",
    "TranslationError",
    "VdpaDevice",
    "Virtqueue",
    "VqError",
    "VqState",
]
