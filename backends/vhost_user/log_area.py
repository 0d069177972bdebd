"""The dirty-log memory QEMU shares with SET_LOG_BASE (a memfd, size and offset)."""

from __future__ import annotations

import mmap
import os
import stat

from backends.vdpa import sigbus_guard
from backends.vdpa.memory import F_SEAL_SHRINK, seal_against_shrinking
from backends.vhost_user.errors import ProtocolError

# log areas whose munmap waits for a still-exported view (closed on the next close()), with
# their SIGBUS guard slot (forgotten once the mapping is gone)
_deferred: list[tuple[mmap.mmap, int]] = []


def _reap() -> None:
    for mm, slot in list(_deferred):
        try:
            mm.close()
        except BufferError:
            continue
        sigbus_guard.unregister(slot)
        _deferred.remove((mm, slot))


class LogArea:
    """A shared mapping of ``size`` bytes of ``fd`` from ``offset``; ``view`` is the log."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if size == 0:
            raise ProtocolError("bad-log", "SET_LOG_BASE with a zero-size log")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise ProtocolError("bad-fd", f"log fd {fd}: {e}") from e
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError("bad-fd", f"log fd {fd} is not a shared-memory file")
        if offset + size > st.st_size:
            raise ProtocolError(
                "bad-log",
                f"log needs offset+size {offset + size:#x} but its fd holds {st.st_size:#x} bytes",
            )
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        delta = offset - aligned
        try:
            self._mm = mmap.mmap(fd, size + delta, mmap.MAP_SHARED, offset=aligned)
        except (OSError, ValueError) as e:
            raise ProtocolError("mmap", f"cannot map the dirty log: {e}") from e
        self.size = size
        self.offset = offset
        self.view = memoryview(self._mm)[delta : delta + size]
        # a log file that can still shrink is re-checked (backing_ok) before every callback,
        # and a shrink during one is survived by the SIGBUS guard (zero pages, recorded)
        self._fd = -1
        self._slot = -1
        if not seal_against_shrinking(fd) & F_SEAL_SHRINK:
            self._fd = os.dup(fd)
            os.set_inheritable(self._fd, False)
            self._slot = sigbus_guard.register(self._mm, self._fd, aligned)

    def backing_ok(self) -> bool:
        """False if the front-end truncated the log file below what is mapped, or a log write
        faulted (the SIGBUS guard caught it)."""
        if self._fd < 0:
            return True
        if sigbus_guard.faults(self._slot):
            return False
        try:
            return os.fstat(self._fd).st_size >= self.offset + self.size
        except OSError:
            return False

    def close(self) -> None:
        self.view.release()
        slot, self._slot = self._slot, -1
        try:
            self._mm.close()
            sigbus_guard.unregister(slot)
        except BufferError:  # a slice of the log is still alive somewhere: unmap later
            _deferred.append((self._mm, slot))
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        _reap()
