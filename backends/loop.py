"""The backend's single-threaded event loop.

One loop per backend process: the vhost-user sockets, kick eventfds, wire sockets and the
monitor all register readers here. Callbacks run to completion; nothing blocks. Timers exist
for retry/back-off only, never as synchronisation.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[[], Any]


class EventLoop:
    """A minimal selector loop: fd readers, soon-callbacks and monotonic timers."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._soon: list[Callback] = []
        self._timers: list[tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()
        self._stopping = False

    # -- fds -------------------------------------------------------------------------------
    def add_reader(self, fd: int, cb: Callback) -> None:
        """Call ``cb()`` whenever ``fd`` is readable. Replaces an earlier reader of ``fd``."""
        try:
            self._sel.modify(fd, selectors.EVENT_READ, cb)
        except KeyError:
            self._sel.register(fd, selectors.EVENT_READ, cb)

    def remove_reader(self, fd: int) -> bool:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            return False
        return True

    def has_reader(self, fd: int) -> bool:
        try:
            self._sel.get_key(fd)
        except (KeyError, ValueError):
            return False
        return True

    # -- callbacks -------------------------------------------------------------------------
    def call_soon(self, cb: Callback) -> None:
        self._soon.append(cb)

    def call_later(self, delay_s: float, cb: Callback) -> int:
        """Run ``cb`` after ``delay_s`` seconds; returns a handle for :meth:`cancel`."""
        handle = next(self._seq)
        heapq.heappush(self._timers, (time.monotonic() + delay_s, handle, cb))
        return handle

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def stop(self) -> None:
        self._stopping = True

    # -- running ---------------------------------------------------------------------------
    def _run_callback(self, cb: Callback) -> None:
        try:
            cb()
        except Exception:  # a callback must never take the process down
            log.exception("event loop callback %r failed", cb)

    def run_once(self, timeout: float | None = None) -> None:
        if self._soon:
            timeout = 0.0
        elif self._timers:
            until = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        for key, _ in self._sel.select(timeout):
            self._run_callback(key.data)
        soon, self._soon = self._soon, []
        for cb in soon:
            self._run_callback(cb)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, handle, cb = heapq.heappop(self._timers)
            if handle in self._cancelled:
                self._cancelled.discard(handle)
                continue
            self._run_callback(cb)

    def run_forever(self) -> None:
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def run_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Run until ``predicate()`` holds; raise TimeoutError naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
            self.run_once(min(left, 0.1))

    def close(self) -> None:
        self._sel.close()
