"""The backend's single-threaded event loop.

One loop per backend process: the vhost-user sockets, kick eventfds, wire sockets and the
monitor all register readers here (and writers, for output a peer is slow to take). Callbacks
run to completion; nothing blocks. Timers exist for retry/back-off only, never as
synchronisation.

Guards (:meth:`EventLoop.add_guard`) run before every callback: the transport uses one to
re-check shared memory a peer could have shrunk since the last callback, so no callback ever
touches a mapping whose file has been truncated under it (see backends/README.md, "Hostile
front-ends"). Epilogues (:meth:`EventLoop.add_epilogue`) run after every callback: the
transport uses one to notice at once that the SIGBUS guard caught a fault during it.
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


class _Watch:
    """What the loop does when one fd becomes readable and/or writable."""

    __slots__ = ("reader", "writer")

    def __init__(self) -> None:
        self.reader: Callback | None = None
        self.writer: Callback | None = None

    def events(self) -> int:
        return (selectors.EVENT_READ if self.reader else 0) | (
            selectors.EVENT_WRITE if self.writer else 0
        )


class EventLoop:
    """A minimal selector loop: fd readers and writers, soon-callbacks, monotonic timers."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._guards: list[Callback] = []
        self._epilogues: list[Callback] = []
        self._soon: list[Callback] = []
        self._timers: list[tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()
        self._stopping = False

    # -- fds -------------------------------------------------------------------------------
    def _watch(self, fd: int) -> _Watch | None:
        try:
            w: _Watch = self._sel.get_key(fd).data
        except (KeyError, ValueError):
            return None
        return w

    def _update(self, fd: int, w: _Watch) -> None:
        events = w.events()
        registered = self._watch(fd) is not None
        if not events:
            if registered:
                self._sel.unregister(fd)
        elif registered:
            self._sel.modify(fd, events, w)
        else:
            self._sel.register(fd, events, w)

    def add_reader(self, fd: int, cb: Callback) -> None:
        """Call ``cb()`` whenever ``fd`` is readable. Replaces an earlier reader of ``fd``."""
        w = self._watch(fd) or _Watch()
        w.reader = cb
        self._update(fd, w)

    def remove_reader(self, fd: int) -> bool:
        w = self._watch(fd)
        if w is None or w.reader is None:
            return False
        w.reader = None
        self._update(fd, w)
        return True

    def has_reader(self, fd: int) -> bool:
        w = self._watch(fd)
        return w is not None and w.reader is not None

    def add_writer(self, fd: int, cb: Callback) -> None:
        """Call ``cb()`` whenever ``fd`` is writable (remove it once the output is out)."""
        w = self._watch(fd) or _Watch()
        w.writer = cb
        self._update(fd, w)

    def remove_writer(self, fd: int) -> bool:
        w = self._watch(fd)
        if w is None or w.writer is None:
            return False
        w.writer = None
        self._update(fd, w)
        return True

    # -- guards ----------------------------------------------------------------------------
    def add_guard(self, guard: Callback) -> None:
        """Run ``guard()`` before every callback (cheap checks only)."""
        self._guards.append(guard)

    def remove_guard(self, guard: Callback) -> None:
        try:
            self._guards.remove(guard)
        except ValueError:
            pass

    def add_epilogue(self, epilogue: Callback) -> None:
        """Run ``epilogue()`` after every callback (cheap checks only)."""
        self._epilogues.append(epilogue)

    def remove_epilogue(self, epilogue: Callback) -> None:
        try:
            self._epilogues.remove(epilogue)
        except ValueError:
            pass

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
        for guard in self._guards:
            try:
                guard()
            except Exception:  # a guard must never take the process down either
                log.exception("event loop guard %r failed", guard)
        try:
            cb()
        except Exception:  # a callback must never take the process down
            log.exception("event loop callback %r failed", cb)
        for epilogue in self._epilogues:
            try:
                epilogue()
            except Exception:
                log.exception("event loop epilogue %r failed", epilogue)

    def run_once(self, timeout: float | None = None) -> None:
        if self._soon:
            timeout = 0.0
        elif self._timers:
            until = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        for key, events in self._sel.select(timeout):
            w: _Watch = key.data
            if events & selectors.EVENT_WRITE and w.writer is not None:
                self._run_callback(w.writer)
            if events & selectors.EVENT_READ and w.reader is not None:
                self._run_callback(w.reader)
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
