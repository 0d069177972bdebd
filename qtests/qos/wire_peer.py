"""The far end of a backend's UDP wire, owned by the test.

The backend runs with ``--wire udp:127.0.0.1:0:PEERPORT``: every frame the guest transmits
arrives here as one datagram (payload = the Ethernet frame), and every datagram sent from here
is a frame the backend delivers into the guest's RX queue.
"""

from __future__ import annotations

import select
import socket
import time

HOST = "127.0.0.1"


class WirePeerTimeout(TimeoutError):
    pass


class WirePeer:
    def __init__(self, host: str = HOST) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.backend_addr: tuple[str, int] | None = None
        self.received = 0

    def backend_wire_spec(self) -> str:
        """The ``--wire`` argument for a backend that talks to this peer."""
        return f"udp:{self.host}:0:{self.port}"

    def connect(self, backend_spec: str) -> None:
        """Learn the backend's bound address from its resolved wire spec (query-wire)."""
        kind, host, port, peer = backend_spec.split(":")
        if kind != "udp" or int(peer) != self.port:
            raise ValueError(f"backend wire {backend_spec!r} does not point at port {self.port}")
        self.backend_addr = (host, int(port))

    def send(self, frame: bytes) -> None:
        if self.backend_addr is None:
            raise RuntimeError("WirePeer.send before connect(): the backend's port is unknown")
        self.sock.sendto(frame, self.backend_addr)

    def recv(self, timeout: float = 5.0) -> bytes:
        """The next frame the guest transmitted, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WirePeerTimeout(
                        f"timed out after {timeout:g}s waiting for a frame on the wire "
                        f"(udp {self.host}:{self.port}; {self.received} received so far)"
                    ) from None
                select.select([self.sock], [], [], left)
                continue
            self.received += 1
            return data

    def recv_n(self, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        frames = []
        for i in range(n):
            left = deadline - time.monotonic()
            try:
                frames.append(self.recv(max(left, 0.0)))
            except WirePeerTimeout as e:
                raise WirePeerTimeout(f"got {i} of {n} frames: {e}") from None
        return frames

    def recv_until(self, sentinel: bytes, timeout: float = 10.0) -> list[bytes]:
        """The frames that arrive before ``sentinel``, a frame the test sent after the stream
        it checks, through the same queue: "nothing more / no duplicate" is then decided by
        an event (the sentinel's arrival), never by a window of quiet."""
        deadline = time.monotonic() + timeout
        before: list[bytes] = []
        while True:
            try:
                frame = self.recv(max(deadline - time.monotonic(), 0.0))
            except WirePeerTimeout as e:
                raise WirePeerTimeout(
                    f"the sentinel frame never arrived ({len(before)} other frames did): {e}"
                ) from None
            if frame == sentinel:
                return before
            before.append(frame)

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                return n
            n += 1
            self.received += 1

    def close(self) -> None:
        self.sock.close()
