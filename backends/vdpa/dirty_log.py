"""The dirty-page log shared with QEMU (SET_LOG_BASE): one bit per 4 KiB guest-physical page,
``buf[page >> 3] |= 1 << (page & 7)``.

The OR is a plain read-modify-write, not the atomic OR the vhost-user spec asks for. Against
QEMU alone that is safe: QEMU harvests with an atomic exchange, so a bit we re-set after it
read the byte is at worst reported dirty twice. It is NOT safe when several vhost-user devices
of one VM share QEMU's log (QEMU hands the same memfd to every vhost-user device): another
backend's bit set between our read and our write is lost. Until the OR is atomic, run one
vhost-user device per VM when migrating (every suite here does)."""

from __future__ import annotations

import logging
import mmap

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class DirtyLog:
    def __init__(self, buf: memoryview | mmap.mmap | bytearray) -> None:
        self.buf = buf
        self.size = len(buf)
        self.overflows = 0  # marks beyond the end of the log (reported once, then counted)

    @property
    def max_gpa(self) -> int:
        """First guest-physical address the log cannot describe."""
        return self.size * 8 << PAGE_SHIFT

    def mark(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        buf = self.buf
        if last >> 3 >= self.size:
            if self.overflows == 0:
                log.warning("dirty log of %d bytes cannot hold gpa %#x", self.size, gpa)
            self.overflows += 1
            last = self.size * 8 - 1
            if first > last:
                return
        if first == last:
            buf[first >> 3] |= 1 << (first & 7)
            return
        page = first
        while page <= last:
            byte = page >> 3
            if page & 7 == 0 and last - page >= 7:
                # whole bytes at a time for big writes
                nbytes = (last - page + 1) >> 3
                buf[byte : byte + nbytes] = b"\xff" * nbytes
                page += nbytes << 3
                continue
            buf[byte] |= 1 << (page & 7)
            page += 1

    def is_dirty(self, gpa: int) -> bool:
        page = gpa >> PAGE_SHIFT
        if page >> 3 >= self.size:
            return False
        return bool(self.buf[page >> 3] >> (page & 7) & 1)

    def dirty_pages(self) -> list[int]:
        """Page numbers with their bit set (tests, monitor)."""
        out: list[int] = []
        data = bytes(self.buf)
        for i, b in enumerate(data):
            if b:
                out.extend((i << 3) + k for k in range(8) if b >> k & 1)
        return out

    def clear(self) -> None:
        self.buf[:] = bytes(self.size)
