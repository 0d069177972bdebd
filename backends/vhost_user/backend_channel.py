"""The backend channel (SET_BACKEND_REQ_FD): backend-initiated requests to QEMU.

IOTLB MISS is sent by the device; ACCESS_FAIL only on request (monitor ``iotlb-request``:
QEMU 10 refuses it, "not supported"). Nothing here may block the backend: QEMU answers a MISS
by sending an IOTLB UPDATE on the *main* socket and waiting for its ack there before it acks
the MISS, so the backend keeps serving the main socket and reads the acks asynchronously here.
QEMU refuses (acks with non-zero) a MISS while the device is stopped and a MISS for an IOVA
the vIOMMU does not map (or maps without the access asked): journalled, not an error; the
``on_refused(iova, perm)`` callback lets the device ask again later instead of waiting for an
UPDATE that will never come.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import stat
from collections.abc import Callable

from backends.loop import EventLoop
from backends.vdpa.journal import Journal
from backends.vhost_user import messages as m
from backends.vhost_user.errors import PeerClosed, ProtocolError
from backends.vhost_user.framing import Message, MessageReader
from backends.vhost_user.outbox import Outbox

log = logging.getLogger(__name__)

# outstanding MISS requests before new ones are dropped (QEMU answers each promptly)
MAX_OUTSTANDING = 256


class BackendChannel:
    """One SET_BACKEND_REQ_FD socket. Takes ownership of ``fd``."""

    def __init__(
        self,
        fd: int,
        loop: EventLoop,
        journal: Journal,
        *,
        reply_ack: bool,
        on_closed: Callable[[BackendChannel], None] | None = None,
        on_refused: Callable[[int, int], None] | None = None,
    ) -> None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            os.close(fd)
            raise ProtocolError("bad-fd", f"backend channel fd: {e}") from e
        if not stat.S_ISSOCK(mode):
            os.close(fd)
            raise ProtocolError("bad-fd", "backend channel fd is not a socket")
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.loop = loop
        self.journal = journal
        self.reply_ack = reply_ack
        self.on_closed = on_closed
        self.on_refused = on_refused
        self.closed = False
        self._reader = MessageReader(self.sock)
        self._outbox = Outbox(self.sock, loop, self._fail)
        # (iova, perm, IOTLB type) of each request awaiting its ack, oldest first
        self._outstanding: collections.deque[tuple[int, int, int]] = collections.deque()
        self.misses_sent = 0
        self.misses_refused = 0
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def outstanding(self) -> list[tuple[int, int, int]]:
        """(iova, perm, type) of the requests QEMU has not acked yet."""
        return list(self._outstanding)

    def send_miss(self, iova: int, perm: int) -> bool:
        """Send IOTLB MISS(iova, perm); False if not sent (closed, duplicate or too many)."""
        return self._send_iotlb(m.IotlbType.MISS, iova, perm)

    def send_access_fail(self, iova: int, perm: int) -> bool:
        """Send IOTLB ACCESS_FAIL(iova, perm) (QEMU 10 acks it with 1: not supported)."""
        return self._send_iotlb(m.IotlbType.ACCESS_FAIL, iova, perm)

    def _send_iotlb(self, kind: m.IotlbType, iova: int, perm: int) -> bool:
        if self.closed:
            return False
        key = (iova, int(perm), int(kind))
        if self.reply_ack:
            if kind == m.IotlbType.MISS and key in self._outstanding:
                return False  # QEMU is already on it
            if len(self._outstanding) >= MAX_OUTSTANDING:
                log.warning("backend channel: %d requests outstanding, dropping", MAX_OUTSTANDING)
                return False
        flags = m.VERSION | (m.FLAG_NEED_REPLY if self.reply_ack else 0)
        payload = m.IotlbMsg(iova, 0, 0, int(perm), kind).pack()
        self._outbox.send(m.encode(m.BackendRequest.IOTLB_MSG, payload, flags))
        if self.closed:
            return False
        if self.reply_ack:
            self._outstanding.append(key)
        if kind == m.IotlbType.MISS:
            self.misses_sent += 1
            self.journal.record(
                "iotlb.miss_sent", iova=iova, perm=int(perm), need_reply=self.reply_ack
            )
        else:
            self.journal.record(
                "iotlb.access_fail_sent", iova=iova, perm=int(perm), need_reply=self.reply_ack
            )
        return True

    def send_config_change(self) -> None:
        """Tell the front-end the config space changed (no reply asked)."""
        if self.closed:
            return
        self._outbox.send(m.encode(m.BackendRequest.CONFIG_CHANGE_MSG))

    def _on_readable(self) -> None:
        if self.closed:  # closed earlier in this loop iteration
            return
        msgs, stop = self._reader.read()
        self._handle_replies(msgs)
        if isinstance(stop, PeerClosed):
            self._fail("front-end closed the backend channel", error=False)
        elif stop is not None:
            self._fail(f"bad reply on the backend channel: {stop}")

    def _handle_replies(self, msgs: list[Message]) -> None:
        for msg in msgs:
            n = msg.close_fds()
            hdr = msg.header
            if (
                hdr.flags != m.REPLY_FLAGS
                or hdr.request != m.BackendRequest.IOTLB_MSG
                or len(msg.payload) != m.U64.size
                or n
            ):
                self.journal.record(
                    "error.protocol",
                    request=f"backend:{hdr.request}",
                    error="bad-backend-reply",
                    detail=f"flags {hdr.flags:#x} size {len(msg.payload)} fds {n}",
                )
                # it still answers the oldest request: keep the pairing, and treat it as a
                # refusal so that request can be asked again
                status = 1
            else:
                status = m.unpack_u64(msg.payload)
            iova, perm, kind = (
                self._outstanding.popleft() if self._outstanding else (-1, 0, m.IotlbType.MISS)
            )
            if kind != m.IotlbType.MISS:
                self.journal.record("iotlb.access_fail_ack", iova=iova, perm=perm, status=status)
                continue
            self.journal.record("iotlb.miss_ack", iova=iova, perm=perm, status=status)
            if status:
                # QEMU refuses a MISS while the device is stopped, or for an IOVA the vIOMMU
                # does not map for that access: not our error, but no UPDATE is coming
                self.misses_refused += 1
                log.info("front-end refused IOTLB MISS iova=%#x perm=%d", iova, perm)
                if self.on_refused is not None and iova >= 0:
                    try:
                        self.on_refused(iova, perm)
                    except Exception:
                        log.exception("on_refused callback failed")

    def _fail(self, why: str, error: bool = True) -> None:
        if error:
            self.journal.record(
                "error.protocol", request="backend-channel", error="channel", detail=why
            )
            log.warning("backend channel: %s", why)
        else:
            self.journal.record("vhost.backend_channel_closed", detail=why)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self._outbox.close()
        self._reader.discard()
        self.sock.close()
        self._outstanding.clear()
        if self.on_closed is not None:
            self.on_closed(self)
