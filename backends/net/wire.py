"""Wires: where frames leave and enter the virtio-net device.

A wire carries raw Ethernet frames (no virtio_net_hdr, no framing of its own):

* ``loopback`` - :class:`LoopbackWire`: every frame sent on queue pair ``qp`` comes back as a
  received frame on the same ``qp``, delivered from the event loop (``loop.call_soon``), never
  recursively from inside ``send``. A bounded queue holds frames until the loop runs them.
* ``null`` - :class:`NullWire`: counts and discards what is sent; never receives.
* ``udp:HOST:PORT:PEERPORT`` - :class:`UdpWire`: binds ``HOST:PORT`` and sends every frame as
  one datagram to ``HOST:PEERPORT``; receives on the bound socket from anyone. The UDP payload
  is exactly the Ethernet frame. An IPv6 HOST is written in brackets: ``udp:[::1]:5000:5001``.
  PORT 0 binds an ephemeral port (see ``local_address``). IPv4 UDP carries at most 65507 bytes:
  larger frames are counted as drops.
* ``unix:PATH`` or ``unix:PATH:PEERPATH`` - :class:`UnixWire`: an AF_UNIX SOCK_DGRAM socket
  bound to PATH, sending each frame as one datagram to PEERPATH (default ``PATH + ".peer"``).
  A stale socket file at PATH (nobody bound to it) is unlinked first; a live one or a non-socket
  file is an error. Two backends are wired back to back with ``unix:/x`` and ``unix:/x.peer:/x``.
  PATH is unlinked again on close. Paths must not contain ':'. Note that Linux queues only
  ``net.unix.max_dgram_qlen`` (often 10) datagrams per receiver: a slow peer means drops.

Multiqueue: datagram wires keep the payload exactly the frame, so they carry no queue-pair
number. Frames sent from any pair go to the same peer, and every received frame is delivered
with ``qp = 0`` (the guest sees all socket RX on receiveq1). ``LoopbackWire`` keeps the pair.

Sockets are non-blocking and registered with the :class:`~backends.loop.EventLoop` by
:meth:`attach`. A send that fails (EAGAIN/ENOBUFS/ECONNREFUSED/ENOENT/EMSGSIZE ...) is counted
in ``drops`` and never raised; so is a received frame while no receiver is set. Counters:
``tx_frames, tx_bytes, rx_frames, rx_bytes, drops``.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

from backends.loop import EventLoop
from backends.unix_socket import remove_stale_socket

log = logging.getLogger(__name__)

Receiver = Callable[[bytes, int], None]

#: Largest datagram a socket wire accepts; longer ones are counted as drops.
MAX_DATAGRAM = 256 * 1024
#: Datagrams read per readable event before yielding to the rest of the loop.
RX_BURST = 64
#: Frames a LoopbackWire holds before the loop delivers them.
LOOPBACK_QUEUE = 4096
#: Socket buffer size asked for (best effort; the kernel may cap it).
SOCKET_BUFFER = 4 * 1024 * 1024

_EXPECTED_SEND_ERRORS = {
    errno.EAGAIN,
    errno.EWOULDBLOCK,
    errno.ENOBUFS,
    errno.ECONNREFUSED,
    errno.ENOENT,
    errno.EMSGSIZE,
}


class Wire(Protocol):
    def send(self, frame: bytes, qp: int) -> None: ...
    def set_receiver(self, cb: Receiver | None) -> None: ...
    def attach(self, loop: EventLoop) -> None: ...
    def close(self) -> None: ...
    def counters(self) -> dict[str, int]: ...


class WireBase:
    """Counters, the receiver callback and the loop every wire keeps (subclass to add one)."""

    kind = "wire"

    def __init__(self) -> None:
        self.tx_frames = 0
        self.tx_bytes = 0
        self.rx_frames = 0
        self.rx_bytes = 0
        self.drops = 0
        self._receiver: Receiver | None = None
        self._loop: EventLoop | None = None
        self._closed = False

    def set_receiver(self, cb: Receiver | None) -> None:
        self._receiver = cb

    def attach(self, loop: EventLoop) -> None:
        self._loop = loop

    def close(self) -> None:
        self._closed = True
        self._loop = None

    def counters(self) -> dict[str, int]:
        return {
            "tx_frames": self.tx_frames,
            "tx_bytes": self.tx_bytes,
            "rx_frames": self.rx_frames,
            "rx_bytes": self.rx_bytes,
            "drops": self.drops,
        }

    def describe(self) -> str:
        return self.kind

    def _deliver(self, frame: bytes, qp: int) -> None:
        cb = self._receiver
        if cb is None:
            self.drops += 1
            return
        self.rx_frames += 1
        self.rx_bytes += len(frame)
        try:
            cb(frame, qp)
        except Exception:  # the receiver must not take the wire down
            log.exception("%s: receiver failed on a %d-byte frame", self.describe(), len(frame))


class NullWire(WireBase):
    """Counts and discards every frame; never receives."""

    kind = "null"

    def send(self, frame: bytes, qp: int) -> None:
        self.tx_frames += 1
        self.tx_bytes += len(frame)


class LoopbackWire(WireBase):
    """Sends come back as receives on the same queue pair, from the event loop."""

    kind = "loopback"

    def __init__(self, limit: int = LOOPBACK_QUEUE) -> None:
        super().__init__()
        self._limit = limit
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self._scheduled = False

    def send(self, frame: bytes, qp: int) -> None:
        if self._closed or len(self._pending) >= self._limit:
            self.drops += 1
            return
        self.tx_frames += 1
        self.tx_bytes += len(frame)
        self._pending.append((frame, qp))
        self._schedule()

    def attach(self, loop: EventLoop) -> None:
        super().attach(loop)
        if self._pending:
            self._schedule()

    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._pending.clear()
        super().close()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        # Deliver what was queued before this round; frames sent by the receiver while we
        # deliver wait for the next round (no unbounded recursion / starvation).
        pending = self._pending
        for _ in range(len(pending)):
            if not pending:
                break
            frame, qp = pending.popleft()
            self._deliver(frame, qp)
        if pending:
            self._schedule()


class _DatagramWire(WireBase):
    """A non-blocking datagram socket; one frame per datagram; RX always on qp 0."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        self._warned: set[int] = set()
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass

    @property
    def peer(self) -> tuple[Any, ...] | str:
        raise NotImplementedError

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, frame: bytes, qp: int) -> None:
        if self._closed:
            self.drops += 1
            return
        try:
            self._sock.sendto(frame, self.peer)
        except OSError as e:
            self.drops += 1
            self._warn_once(e, f"send of a {len(frame)}-byte frame")
            return
        self.tx_frames += 1
        self.tx_bytes += len(frame)

    def attach(self, loop: EventLoop) -> None:
        super().attach(loop)
        if not self._closed:
            loop.add_reader(self._sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._closed:
            return
        loop = self._loop
        if loop is not None:
            loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._view.release()
        super().close()

    def _on_readable(self) -> None:
        sock, view = self._sock, self._view
        for _ in range(RX_BURST):
            if self._closed:
                return
            try:
                n = sock.recv_into(view, MAX_DATAGRAM, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. a queued ICMP error on UDP: not fatal
                self._warn_once(e, "receive")
                continue
            if n > MAX_DATAGRAM or n == 0:
                self.drops += 1
                continue
            self._deliver(bytes(view[:n]), 0)

    def _warn_once(self, e: OSError, what: str) -> None:
        code = e.errno or 0
        if code in self._warned:
            return
        self._warned.add(code)
        level = logging.DEBUG if code in _EXPECTED_SEND_ERRORS else logging.WARNING
        log.log(level, "%s: %s failed (%s); counted as a drop", self.describe(), what, e)


class UdpWire(_DatagramWire):
    """Bind HOST:PORT, send each frame as one UDP datagram to HOST:PEERPORT."""

    kind = "udp"

    def __init__(self, host: str, port: int, peer_port: int) -> None:
        for name, value in (("port", port), ("peer port", peer_port)):
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"udp wire: {name} {value} out of range 0..65535")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as e:
            raise ValueError(f"udp wire: cannot resolve host {host!r}: {e}") from e
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        try:
            sock.bind(addr)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"udp wire: cannot bind {host}:{port}: {e.strerror}") from e
        super().__init__(sock)
        self.host = host
        self.local_address = sock.getsockname()
        self._peer = (addr[0], peer_port, *addr[2:])

    @property
    def peer(self) -> tuple[Any, ...]:
        return self._peer

    def describe(self) -> str:
        return f"udp:{self.host}:{self.local_address[1]}:{self._peer[1]}"


class UnixWire(_DatagramWire):
    """Bind PATH (SOCK_DGRAM), send each frame as one datagram to PEERPATH."""

    kind = "unix"

    def __init__(self, path: str, peer_path: str | None = None) -> None:
        if not path:
            raise ValueError("unix wire: empty socket path")
        self.path = path
        self.peer_path = peer_path if peer_path else path + ".peer"
        remove_stale_socket(path, socket.SOCK_DGRAM, what=f"unix wire {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            self._inode = os.stat(path).st_ino
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"unix wire: cannot bind {path}: {e.strerror}") from e
        super().__init__(sock)
        self.local_address = path

    @property
    def peer(self) -> str:
        return self.peer_path

    def describe(self) -> str:
        return f"unix:{self.path}:{self.peer_path}"

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


WIRE_SPECS = "'loopback' | 'null' | 'udp:HOST:PORT:PEERPORT' | 'unix:PATH[:PEERPATH]'"


def make_wire(spec: str) -> LoopbackWire | NullWire | UdpWire | UnixWire:
    """Build a wire from its spec string; ValueError (naming the accepted forms) if malformed."""
    spec = spec.strip()
    if spec == "loopback":
        return LoopbackWire()
    if spec == "null":
        return NullWire()
    kind, sep, rest = spec.partition(":")
    if kind == "udp" and sep:
        host, port_s, peer_s = _split_udp(rest, spec)
        return UdpWire(host, _port(port_s, spec), _port(peer_s, spec))
    if kind == "unix" and sep:
        parts = rest.split(":")
        if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
            raise ValueError(f"bad wire spec {spec!r}: expected unix:PATH or unix:PATH:PEERPATH")
        return UnixWire(parts[0], parts[1] if len(parts) == 2 else None)
    raise ValueError(f"unknown wire spec {spec!r}: expected {WIRE_SPECS}")


def _split_udp(rest: str, spec: str) -> tuple[str, str, str]:
    if rest.startswith("["):
        host, sep, ports = rest[1:].partition("]")
        if not sep or not ports.startswith(":"):
            raise ValueError(f"bad wire spec {spec!r}: unterminated [IPv6 host]")
        fields = ports[1:].split(":")
    else:
        fields = rest.split(":")
        host = fields.pop(0) if fields else ""
    if not host or len(fields) != 2:
        raise ValueError(f"bad wire spec {spec!r}: expected udp:HOST:PORT:PEERPORT")
    return host, fields[0], fields[1]


def _port(text: str, spec: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"bad wire spec {spec!r}: port {text!r} is not a number") from None
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"bad wire spec {spec!r}: port {value} out of range 0..65535")
    return value
