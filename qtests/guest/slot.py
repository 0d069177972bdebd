"""One real guest at a time per checkout, whatever the test runner's parallelism.

A TCG guest keeps a host CPU busy, and the scenarios' timing bounds (boot timeouts, the RX loss
bound of a live migration) hold for one guest on a two-core host, not for two starving each
other. Plain ``avocado run`` starts as many tests at once as there are CPUs; every guest test
therefore holds this slot (an exclusive ``flock`` on a file keyed on the checkout) from its
set-up to its tear-down. ``python -m avocado_tests.run`` runs one test at a time anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path

from qtests.qos.waiting import WaitTimeout, poll_until


class GuestSlot:
    def __init__(
        self, key: str | os.PathLike[str], lock_dir: str | os.PathLike[str] | None = None
    ) -> None:
        digest = hashlib.sha256(str(Path(key).resolve()).encode()).hexdigest()[:16]
        self.path = Path(lock_dir or tempfile.gettempdir()) / f"vdpa-qtest-guest-{digest}.lock"
        self._fd: int | None = None

    def _try(self) -> bool:
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self, timeout: float) -> float:
        """Take the slot (waiting for the guest test holding it); the seconds waited."""
        if self._fd is not None:
            raise RuntimeError("the guest slot is already held")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        t0 = time.monotonic()
        try:
            poll_until(self._try, timeout, f"the guest slot {self.path} (another guest test "
                       "of this checkout holds it)", max_interval=0.1)  # fmt: skip
        except WaitTimeout:
            self.release()
            raise
        return time.monotonic() - t0

    def release(self) -> None:
        """Give the slot back (closing the file drops the lock); idempotent."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
