"""vhost-user message framing on a stream socket, with SCM_RIGHTS descriptors.

:class:`MessageReader` assembles whole messages from a non-blocking socket without ever reading
past a message boundary, so every descriptor is attributed to the message it came with.
:func:`send_message` writes one message (and its descriptors) completely.
"""

from __future__ import annotations

import array
import os
import select
import socket
from dataclasses import dataclass, field

from backends.vhost_user.errors import PeerClosed, ProtocolError
from backends.vhost_user.messages import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    VERSION_MASK,
    Header,
)

_FD_SIZE = array.array("i").itemsize
SEND_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Message:
    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)
    fd_overflow: bool = False  # more descriptors came than the reader accepts (extra closed)

    def take_fd(self) -> int:
        """Hand the first descriptor over to the caller (who then owns it)."""
        return self.fds.pop(0)

    def close_fds(self) -> int:
        """Close every descriptor nobody took; return how many were closed."""
        n = len(self.fds)
        close_fds(self.fds)
        self.fds.clear()
        return n


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv(sock: socket.socket, n: int, max_fds: int) -> tuple[bytes, list[int], bool]:
    """One recvmsg of at most ``n`` bytes; returns (data, fds, fds_truncated)."""
    data, ancdata, flags, _ = sock.recvmsg(
        n, socket.CMSG_SPACE((max_fds + 1) * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
            fds.extend(arr)
    truncated = bool(flags & socket.MSG_CTRUNC)
    return data, fds, truncated


class MessageReader:
    """Incremental, non-blocking reader of vhost-user messages.

    ``read()`` returns the messages completed by what the socket holds now, plus
    :class:`PeerClosed` on EOF at a message boundary or a fatal :class:`ProtocolError` on EOF
    inside a message or a header that cannot be framed (bad version, oversized payload).
    Descriptors of a message that is never completed are closed.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_payload: int = MAX_PAYLOAD,
        max_fds: int = MAX_FDS,
    ) -> None:
        self._sock = sock
        self._max_payload = max_payload
        self._max_fds = max_fds
        self._buf = bytearray()
        self._header: Header | None = None
        self._fds: list[int] = []
        self._fd_overflow = False

    @property
    def partial(self) -> bool:
        return bool(self._buf) or self._header is not None

    def discard(self) -> None:
        """Drop a partial message and close its descriptors."""
        close_fds(self._fds)
        self._fds = []
        self._buf.clear()
        self._header = None
        self._fd_overflow = False

    def read(self, limit: int = 64) -> tuple[list[Message], Exception | None]:
        """Messages completed by what the socket holds now, and the error that stopped the
        reading if any (:class:`PeerClosed` or a fatal :class:`ProtocolError`); messages
        completed before the error are returned with it."""
        out: list[Message] = []
        while len(out) < limit:
            try:
                msg = self._read_one()
            except (PeerClosed, ProtocolError) as e:
                return out, e
            if msg is None:
                break
            out.append(msg)
        return out, None

    def _need(self) -> int:
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header.size - len(self._buf)

    def _read_one(self) -> Message | None:
        while True:
            if self._header is not None and len(self._buf) == self._header.size:
                msg = Message(self._header, bytes(self._buf), self._fds, self._fd_overflow)
                self._buf.clear()
                self._header = None
                self._fds = []
                self._fd_overflow = False
                return msg
            need = self._need()
            try:
                data, fds, truncated = _recv(self._sock, need, self._max_fds)
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionResetError:
                data, fds, truncated = b"", [], False  # the peer went away: same as EOF
            except OSError as e:
                self.discard()
                raise ProtocolError("socket", f"receive failed: {e}", fatal=True) from e
            self._fds.extend(fds)
            if truncated or len(self._fds) > self._max_fds:
                self._fd_overflow = True
                close_fds(self._fds[self._max_fds :])
                del self._fds[self._max_fds :]
            if not data:
                if self.partial or self._fds:
                    got = len(self._buf)
                    hdr = self._header
                    where = "header" if hdr is None else f"request {hdr.request} payload"
                    self.discard()
                    raise ProtocolError(
                        "truncated",
                        f"peer closed inside a message ({where}: {got} of {got + need} bytes)",
                        fatal=True,
                    )
                raise PeerClosed()
            self._buf += data
            if self._header is None and len(self._buf) == HEADER_SIZE:
                header = Header.unpack(self._buf)
                self._buf.clear()
                self._check_header(header)
                self._header = header

    def _check_header(self, header: Header) -> None:
        if header.version != VERSION:
            self.discard()
            raise ProtocolError(
                "bad-version",
                f"flags 0x{header.flags:x} (version {header.flags & VERSION_MASK}) in request "
                f"{header.request}: only version {VERSION} is spoken",
                fatal=True,
            )
        if header.size > self._max_payload:
            self.discard()
            raise ProtocolError(
                "oversized",
                f"payload of {header.size} bytes in request {header.request} exceeds the "
                f"{self._max_payload}-byte limit",
                fatal=True,
            )


def send_message(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Write one whole message; descriptors ride with its first byte.

    Works on blocking and non-blocking sockets (waits up to SEND_TIMEOUT_S for room).
    Raises OSError (e.g. BrokenPipeError, TimeoutError) if it cannot.
    """
    view = memoryview(data)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while view:
        try:
            sent = sock.sendmsg([view], anc)
        except (BlockingIOError, InterruptedError):
            _, writable, _ = select.select([], [sock], [], SEND_TIMEOUT_S)
            if not writable:
                raise TimeoutError(
                    f"timed out after {SEND_TIMEOUT_S}s waiting to send a vhost-user message"
                ) from None
            continue
        anc = []
        view = view[sent:]
