"""Messages to a peer that may not be reading: queued, never waited for.

The backend must not block on a socket the front-end controls: a front-end that sends
NEED_REPLY requests and never reads the replies fills its receive buffer, and a blocking (or
select-with-timeout) send would freeze the whole process, monitor and datapath included.
:class:`Outbox` sends what the socket takes now, keeps the rest (in order, descriptors riding
with the first byte of their message) and lets the event loop flush it when the socket becomes
writable. A peer that lets more than :data:`MAX_QUEUED` bytes pile up is not a front-end any
more: ``on_error`` is told and the caller closes the connection.
"""

from __future__ import annotations

import array
import collections
import socket
from collections.abc import Callable, Sequence

from backends.loop import EventLoop

MAX_QUEUED = 1 << 20


class Outbox:
    """Ordered, non-blocking output on ``sock`` (which the caller owns and keeps open)."""

    def __init__(
        self,
        sock: socket.socket,
        loop: EventLoop,
        on_error: Callable[[str], None],
        *,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.sock = sock
        self.loop = loop
        self.on_error = on_error
        self.max_queued = max_queued
        self._queue: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self.queued = 0
        self.closed = False
        self.high_water = 0

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` (one whole message) now or as soon as the peer makes room. The
        descriptors are sent with its first byte; the caller keeps owning them and must keep
        them open until :attr:`queued` drops to 0 (the backend sends none today)."""
        if self.closed:
            return
        self._queue.append((memoryview(data), list(fds)))
        self.queued += len(data)
        self.high_water = max(self.high_water, self.queued)
        if len(self._queue) == 1:
            self._flush()
        if self.queued > self.max_queued and not self.closed:
            self.close()
            self.on_error(
                f"peer does not read: {self.queued} bytes of replies queued "
                f"(limit {self.max_queued})"
            )

    def _flush(self) -> None:
        while self._queue and not self.closed:
            view, fds = self._queue[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                sent = self.sock.sendmsg([view], anc)
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError as e:
                self.close()
                self.on_error(f"send failed: {e}")
                return
            self.queued -= sent
            if sent == len(view):
                self._queue.popleft()
            else:
                self._queue[0] = (view[sent:], [])
        if not self.closed:
            self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        """Drop what is queued and stop watching the socket for room."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self.queued = 0
        try:
            self.loop.remove_writer(self.sock.fileno())
        except (OSError, ValueError):
            pass
