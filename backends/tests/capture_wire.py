"""A wire for in-process device tests: what the device sends is recorded, frames from the
wire are played in with :meth:`CaptureWire.deliver`. Shared by the virtio-net datapath tests
and the VDUSE rig."""

from __future__ import annotations

from typing import Any

from backends.loop import EventLoop


class CaptureWire:
    """Records what the device sends; :meth:`deliver` plays a frame arriving from the wire."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int]] = []
        self.receiver: Any = None

    def send(self, data: bytes, qp: int) -> None:
        self.sent.append((bytes(data), qp))

    def set_receiver(self, cb: Any) -> None:
        self.receiver = cb

    def attach(self, loop: EventLoop) -> None:
        pass

    def close(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {"tx_frames": len(self.sent)}

    def deliver(self, data: bytes, qp: int = 0) -> None:
        assert self.receiver is not None
        self.receiver(data, qp)
