"""GeneratorWire: a wire that receives the same frame over and over, as fast as the event
loop turns, so the backend's RX path (wire -> guest) can be measured on its own.

It delivers up to ``burst`` frames per loop iteration through the normal receiver callback
(the backend's RX backlog) and re-arms itself with ``loop.call_soon``. ``room()``, when given,
says how many frames the backlog can still take, so the generator does not spend the CPU it
shares with the backend on frames that would only be counted as drops: with it, the generator
re-arms only while the backlog has room, and a loop epilogue (run after every callback)
re-arms it as soon as a callback (the RX pass) made room again. A backlog the guest cannot
drain (no RX buffers posted) therefore leaves the backend asleep in its event loop until the
guest's next kick, instead of spinning (which made the RX CPU per packet a measure of the
frontend's speed). Sending counts and discards, like ``NullWire``.
"""

from __future__ import annotations

from collections.abc import Callable

from backends.loop import EventLoop
from backends.net.wire import WireBase

BURST = 256


def make_frame(size: int) -> bytes:
    """A broadcast Ethernet frame of exactly ``size`` bytes (IPv4 ethertype, zero payload)."""
    if size < 14:
        raise ValueError(f"an Ethernet frame has at least 14 bytes, not {size}")
    head = b"\xff" * 6 + bytes.fromhex("525400abcdef") + b"\x08\x00"
    return head + bytes(size - len(head))


class GeneratorWire(WireBase):
    kind = "generator"

    def __init__(
        self, size: int, burst: int = BURST, room: Callable[[], int] | None = None
    ) -> None:
        super().__init__()
        self.frame = make_frame(size)
        self.burst = burst
        self.room = room
        self._armed = False  # a _pump is queued with call_soon

    def send(self, frame: bytes, qp: int) -> None:
        self.tx_frames += 1
        self.tx_bytes += len(frame)

    def attach(self, loop: EventLoop) -> None:
        self._loop = loop
        loop.add_epilogue(self._rearm)
        self._arm()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_epilogue(self._rearm)
        super().close()

    def _arm(self) -> None:
        if not self._armed and self._loop is not None:
            self._armed = True
            self._loop.call_soon(self._pump)

    def _rearm(self) -> None:
        """Loop epilogue: pump again once there is room (the RX pass just made some)."""
        if not self._armed and not self._closed and self.room is not None and self.room() > 0:
            self._arm()

    def _pump(self) -> None:
        self._armed = False
        if self._closed or self._loop is None:
            return
        cb = self._receiver
        n = self.burst if self.room is None else min(self.burst, self.room())
        if cb is not None and n > 0:
            frame = self.frame
            for _ in range(n):
                cb(frame, 0)
            self.rx_frames += n
            self.rx_bytes += n * len(frame)
        if self.room is None or self.room() > 0:
            self._arm()
