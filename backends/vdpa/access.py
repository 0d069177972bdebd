"""Access direction and the translation error: shared by memory.py, iotlb.py and dma.py.

Re-exported as ``memory.Access`` and ``iotlb.TranslationError`` (the names the contract uses).
"""

from __future__ import annotations

import enum


class Access(enum.IntFlag):
    """What the *device* does with guest memory. Bit-compatible with ``iotlb.Perm``."""

    READ = 1  # device reads guest memory (driver-written, "out" buffers, rings it reads)
    WRITE = 2  # device writes guest memory ("in" buffers, used ring)


class TranslationError(Exception):
    """A range could not be translated.

    ``kind`` is one of ``'unmapped'`` (nothing at ``addr``), ``'partial'`` (the range starts
    mapped but ``addr`` is the first unmapped byte), ``'perm'`` (mapped without the needed
    permission) or ``'miss'`` (IOMMU mode, IOVA not in the IOTLB yet: recoverable after an
    IOTLB update). ``addr`` is the first offending address, ``length`` the bytes from there to
    the end of the requested range.
    """

    def __init__(self, kind: str, addr: int, length: int, access: Access, detail: str = "") -> None:
        self.kind = kind
        self.addr = addr
        self.length = length
        self.access = Access(access)
        self.detail = detail
        msg = f"{kind} translation at {addr:#x}+{length:#x} ({self.access.name or int(access)})"
        super().__init__(f"{msg}: {detail}" if detail else msg)
