"""The vhost-user server: listens on a unix socket, serves one front-end at a time.

QEMU's ``-chardev socket,...,reconnect=N`` connects as a client and reconnects after a
disconnect, so the server keeps listening (``reconnect=True``). A front-end that connects
while another is being served waits (accepted, not read) until the first one goes; any input
already queued on the current connection (its EOF included) is processed first, so a quick
disconnect + reconnect never finds the new connection waiting behind a dead one.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backends.loop import EventLoop
from backends.unix_socket import UnixListener
from backends.vhost_user.connection import Connection
from backends.vhost_user.offer import Offer

if TYPE_CHECKING:
    from backends.vdpa.device import VdpaDevice

log = logging.getLogger(__name__)

MAX_WAITING = 8  # connections held while one is served; more are refused


class VhostUserServer:
    def __init__(
        self,
        path: str,
        device: VdpaDevice,
        loop: EventLoop,
        *,
        offer_mem_slots: bool = True,
        offer_iommu: bool = True,
        offer_log: bool = True,
        reconnect: bool = True,
        max_queues: int | None = None,
        on_rarp: Callable[[bytes], None] | None = None,
        on_mtu: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self.device = device
        self.loop = loop
        self.reconnect = reconnect
        self.offer = Offer(
            mem_slots=offer_mem_slots,
            iommu=offer_iommu,
            log=offer_log,
            max_queues=max_queues if max_queues is not None else len(device.vqs),
        )
        self.on_rarp = on_rarp
        self.on_mtu = on_mtu
        self.connection: Connection | None = None
        self.connections = 0  # served so far
        self._waiting: collections.deque[socket.socket] = collections.deque()
        self._listener: UnixListener | None = None

    # -- state --------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.connection is not None

    @property
    def protocol_features(self) -> int | None:
        c = self.connection
        return None if c is None else c.protocol_features

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def describe(self) -> dict[str, Any]:
        c = self.connection
        return {
            "path": self.path,
            "listening": self.listening,
            "connected": c is not None,
            "connections": self.connections,
            "waiting": len(self._waiting),
            "connection": None if c is None else c.describe(),
        }

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("vhost-user server already started")
        self._listener = UnixListener(self.path, MAX_WAITING, what="vhost-user socket")
        self.loop.add_reader(self._listener.fileno(), self._on_accept)
        log.info("vhost-user server listening on %s", self.path)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close("backend shutting down")
        while self._waiting:
            self._waiting.popleft().close()
        self._stop_listening()

    def _stop_listening(self) -> None:
        if self._listener is None:
            return
        self.loop.remove_reader(self._listener.fileno())
        self._listener.close()  # unlinks the path if it is still ours
        self._listener = None

    # -- connections --------------------------------------------------------------------------
    def _on_accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("vhost-user accept failed: %s", e)
                return
            sock.set_inheritable(False)
            if self.connection is not None:
                self.connection.on_readable()  # a pending EOF closes it (and promotes)
            if self.connection is None and not self._waiting:
                self._serve(sock)
            elif len(self._waiting) < MAX_WAITING:
                self.device.journal.record("vhost.waiting", waiting=len(self._waiting) + 1)
                self._waiting.append(sock)
            else:
                self.device.journal.record(
                    "error.protocol", request="-", error="busy", detail="too many front-ends"
                )
                sock.close()

    def _serve(self, sock: socket.socket) -> None:
        self.connections += 1
        self.connection = Connection(
            sock,
            self.device,
            self.loop,
            offer=self.offer,
            name=f"vhost-user#{self.connections}",
            on_closed=self._on_closed,
            on_rarp=self.on_rarp,
            on_mtu=self.on_mtu,
        )
        # input that arrived while the socket waited is picked up by the loop's next select

    def _on_closed(self, conn: Connection) -> None:
        if self.connection is conn:
            self.connection = None
        if not self.reconnect:
            self._stop_listening()
            while self._waiting:
                self._waiting.popleft().close()
            return
        if self._waiting:
            self._serve(self._waiting.popleft())
