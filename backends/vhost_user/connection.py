"""One vhost-user front-end connection: input, validation, dispatch, replies, teardown.

The requests themselves are served by concern: ``feature_requests``, ``memory_requests``,
``vring_requests``, ``iotlb_requests``, ``device_requests`` (onto the vDPA bus ops); what the
backend offers is ``offer``.

Every request is journalled (``vhost.msg``) and validated (payload size, descriptor count,
indexes, state) before it reaches the device. A refused request is journalled as
``error.protocol`` (and logged); the front-end gets an error reply when it can expect one:

* data replies (GET_*) come back with an empty payload (QEMU and the spec read that as a
  failure: the size does not match);
* u64 status replies (REPLY_ACK when NEED_REPLY is set, IOTLB_MSG, SET_LOG_BASE) carry 1;
* otherwise the request is ignored. Framing errors (bad version, oversized payload, EOF inside
  a message) close the connection: the stream cannot be resynchronised.

Replies always have flags exactly ``0x5`` (version 1 | REPLY).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backends.loop import EventLoop
from backends.vdpa import sigbus_guard
from backends.vdpa.access import TranslationError
from backends.vdpa.iotlb import Perm
from backends.vdpa.virtqueue import VqError
from backends.vhost_user import messages as m
from backends.vhost_user.backend_channel import BackendChannel
from backends.vhost_user.device_requests import HANDLERS as _DEVICE_REQUESTS
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.feature_requests import HANDLERS as _FEATURE_REQUESTS
from backends.vhost_user.framing import Message, MessageReader
from backends.vhost_user.iotlb_requests import HANDLERS as _IOTLB_REQUESTS
from backends.vhost_user.log_area import LogArea
from backends.vhost_user.memory_requests import HANDLERS as _MEMORY_REQUESTS
from backends.vhost_user.memory_table import MemoryTable
from backends.vhost_user.messages import ProtocolFeature as PF
from backends.vhost_user.messages import Request as R
from backends.vhost_user.offer import (
    ACCESS_PLATFORM,
    DRIVER_READY,
    LOG_ALL,
    PROTOCOL_FEATURES,
    Offer,
)
from backends.vhost_user.outbox import Outbox
from backends.vhost_user.vring_requests import HANDLERS as _VRING_REQUESTS
from backends.vhost_user.vrings import Vrings
from backends.virtio.features import Status

if TYPE_CHECKING:
    from backends.vdpa.device import VdpaDevice

log = logging.getLogger(__name__)

#: Every request a connection serves, by concern (see the *_requests modules).
HANDLERS = {
    **_DEVICE_REQUESTS,
    **_FEATURE_REQUESTS,
    **_IOTLB_REQUESTS,
    **_MEMORY_REQUESTS,
    **_VRING_REQUESTS,
}


# What QEMU sends before SET_OWNER (vhost_user_backend_init), plus harmless queries.
_BEFORE_OWNER = frozenset(
    {
        R.GET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.SET_PROTOCOL_FEATURES,
        R.GET_QUEUE_NUM,
        R.GET_MAX_MEM_SLOTS,
        R.SET_BACKEND_REQ_FD,
        R.SET_OWNER,
        R.RESET_OWNER,
        R.RESET_DEVICE,
        R.GET_STATUS,
        R.GET_CONFIG,
    }
)


class Connection:
    """Serves one front-end on ``sock`` (owned) for ``device``."""

    def __init__(
        self,
        sock: socket.socket,
        device: VdpaDevice,
        loop: EventLoop,
        *,
        offer: Offer,
        name: str = "vhost-user",
        on_closed: Callable[[Connection], None] | None = None,
        on_rarp: Callable[[bytes], None] | None = None,
        on_mtu: Callable[[int], None] | None = None,
    ) -> None:
        self.sock = sock
        self.device = device
        self.journal = device.journal
        self.loop = loop
        self.offer = offer
        self.name = name
        self.on_closed = on_closed
        self.on_rarp = on_rarp
        self.on_mtu = on_mtu
        self.closed = False
        self.owner = False
        self.features: int | None = None  # acked by SET_FEATURES
        self.protocol_features = 0  # negotiated by SET_PROTOCOL_FEATURES
        self.mtu: int | None = None
        self.messages = 0
        self.errors = 0
        self.mem = MemoryTable(device)
        self.vrings = Vrings(device, loop, before_start=self._before_start)
        self.backend: BackendChannel | None = None
        self.log_area: LogArea | None = None
        self.log_fd = -1
        self._reader = MessageReader(sock)
        self._outbox = Outbox(sock, loop, self._send_failed)
        self._handlers: dict[R, Callable[[Message], bytes | None]] = {
            request: functools.partial(handler, self) for request, handler in HANDLERS.items()
        }
        device.on_iotlb_miss = self._on_iotlb_miss
        device.on_config_change = self._on_config_change
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self.on_readable)
        loop.add_guard(self._check_peer_memory)
        loop.add_epilogue(self._after_callback)
        self._sigbus_seen = sigbus_guard.total()
        self.journal.record("vhost.connect", name=name)

    # -- negotiated state ---------------------------------------------------------------------
    def has(self, feature: PF) -> bool:
        return bool(self.protocol_features >> feature & 1)

    def offered_features(self) -> int:
        f = self.device.get_device_features() | PROTOCOL_FEATURES
        f = f | ACCESS_PLATFORM if self.offer.iommu else f & ~ACCESS_PLATFORM
        if self.offer.log:
            f |= LOG_ALL
        return f

    @property
    def iommu(self) -> bool:
        """ACCESS_PLATFORM negotiated: ring addresses are IOVAs, the IOTLB is QEMU's."""
        return self.mem.iommu

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "owner": self.owner,
            "features": self.features,
            "protocol_features": self.protocol_features,
            "messages": self.messages,
            "errors": self.errors,
            "mtu": self.mtu,
            "backend_channel": self.backend is not None,
            "log": None if self.log_area is None else self.log_area.size,
            "regions": self.mem.to_list(),
            "vrings": self.vrings.to_list(),
        }

    # -- input ------------------------------------------------------------------------------
    def on_readable(self) -> None:
        if self.closed:
            return
        msgs, stop = self._reader.read()
        for msg in msgs:
            if self.closed:
                msg.close_fds()
            else:
                self._handle(msg)
        if stop is None or self.closed:
            return
        if isinstance(stop, ProtocolError):
            self._error("-", stop)
            self.close(f"protocol error: {stop}")
        else:
            self.close("front-end disconnected")

    def _handle(self, msg: Message) -> None:
        hdr = msg.header
        name = m.request_name(hdr.request)
        self.messages += 1
        self.journal.record(
            "vhost.msg", request=name, flags=hdr.flags, size=hdr.size, fds=len(msg.fds)
        )
        request: R | None = None
        try:
            if hdr.is_reply:
                raise ProtocolError("unexpected-reply", f"{name} with the REPLY flag set")
            try:
                request = R(hdr.request)
            except ValueError:
                raise ProtocolError("unknown-request", f"request type {hdr.request}") from None
            handler = self._handlers.get(request)
            if handler is None:
                raise ProtocolError("unsupported", f"{name} is not supported")
            if not self.owner and request not in _BEFORE_OWNER:
                raise ProtocolError("not-owner", f"{name} before SET_OWNER")
            self._check_message(request, msg)
            result = handler(msg)
        except ProtocolError as e:
            self._error(name, e)
            self._reply_failure(request, hdr)
            if e.fatal:  # answered, but this connection cannot go on
                self.close(f"{name}: {e.detail}")
        except (ValueError, TranslationError, VqError, OSError) as e:
            self._error(name, ProtocolError("rejected", f"{type(e).__name__}: {e}"))
            self._reply_failure(request, hdr)
        except Exception as e:  # a bug below us: report it, answer, keep serving
            log.exception("%s: %s failed", self.name, name)
            self._error(name, ProtocolError("internal", f"{type(e).__name__}: {e}"))
            self._reply_failure(request, hdr)
        else:
            self._reply_success(request, hdr, result)
        finally:
            msg.close_fds()

    def _check_message(self, request: R, msg: Message) -> None:
        size = len(msg.payload)
        expected = m.PAYLOAD_SIZES.get(request)
        if expected is not None and size != expected:
            raise ProtocolError(
                "bad-size", f"{request.name} payload is {size} bytes, expected {expected}"
            )
        if msg.fd_overflow:
            raise ProtocolError("too-many-fds", f"{request.name} carried more than {m.MAX_FDS} fds")
        lo, hi = m.FD_COUNTS.get(request, (0, 0))
        n = len(msg.fds)
        if hi == 0 and n:
            # a stray descriptor on a request that takes none: close it, serve the request
            self._error(
                request.name,
                ProtocolError("unexpected-fd", f"{request.name} carried {n} fds; closed"),
            )
            msg.close_fds()
        elif n > hi:
            raise ProtocolError("fd-count", f"{request.name} carried {n} fds (at most {hi})")
        elif n < lo:
            raise ProtocolError("fd-count", f"{request.name} needs {lo} fd(s), got {n}")

    # -- replies ----------------------------------------------------------------------------
    def _status_reply(self, request: R | None, hdr: m.Header) -> bool:
        """Does this request get a u64 status back (REPLY_ACK or its natural reply)?"""
        if request is R.IOTLB_MSG:
            return True
        if request is R.SET_LOG_BASE and self.has(PF.LOG_SHMFD):
            return True
        return hdr.need_reply

    def _reply_success(self, request: R | None, hdr: m.Header, result: bytes | None) -> None:
        if request in m.DATA_REPLY_REQUESTS:
            self._send(hdr.request, result or b"")
        elif self._status_reply(request, hdr):
            self._send(hdr.request, m.pack_u64(0))

    def _reply_failure(self, request: R | None, hdr: m.Header) -> None:
        if request in m.DATA_REPLY_REQUESTS:
            self._send(hdr.request, b"")  # a size QEMU refuses: the request failed
        elif self._status_reply(request, hdr):
            self._send(hdr.request, m.pack_u64(1))

    def _send(self, request: int, payload: bytes) -> None:
        if self.closed:
            return
        self._outbox.send(m.encode_reply(request, payload))

    def _send_failed(self, why: str) -> None:
        self._error("-", ProtocolError("reply", why))
        self.close(f"reply failed: {why}")

    def _error(self, request: str, e: ProtocolError) -> None:
        self.errors += 1
        self.journal.record("error.protocol", request=request, error=e.kind, detail=e.detail)
        log.warning("%s: %s refused: %s: %s", self.name, request, e.kind, e.detail)

    # -- teardown -----------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_guard(self._check_peer_memory)
        self.loop.remove_epilogue(self._after_callback)
        self._outbox.close()
        self._reader.discard()
        self.journal.record("vhost.disconnect", name=self.name, reason=reason)
        log.info("%s: connection closed: %s", self.name, reason)
        dev = self.device
        if dev.on_iotlb_miss == self._on_iotlb_miss:
            dev.on_iotlb_miss = None
        if dev.on_config_change == self._on_config_change:
            dev.on_config_change = None
        if self.backend is not None:
            self.backend.close()
        self.vrings.close()
        self.stop_log()
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1
        dev.reset()  # a new connection starts from scratch
        self.mem.clear("disconnect")
        self.sock.close()
        if self.on_closed is not None:
            self.on_closed(self)

    def _after_callback(self) -> None:
        """Loop epilogue: the SIGBUS guard caught a fault in some mapping during the callback
        (a shrink that landed after the guard ran): report and drop the region now."""
        seen = sigbus_guard.total()
        if seen != self._sigbus_seen:
            self._sigbus_seen = seen
            self._check_peer_memory()

    def _check_peer_memory(self) -> None:
        """Loop guard: drop any shared memory the front-end shrank since the last callback
        (mem-table regions, the dirty log) before anything can touch it."""
        self.mem.check_backing()
        area = self.log_area
        if area is not None and not area.backing_ok():
            self.stop_log()
            self.device.fail(
                None,
                "log-shrunk",
                f"dirty log fd shrank below {area.size:#x} bytes; dropped",
                journal_kind="error.mem",
            )

    # -- device callbacks ---------------------------------------------------------------------
    def _on_iotlb_miss(self, iova: int, perm: Perm) -> None:
        if self.backend is None:
            self._error(
                "IOTLB_MISS",
                ProtocolError("no-backend-channel", f"cannot send MISS for iova {iova:#x}"),
            )
            return
        self.backend.send_miss(iova, int(perm))

    def _on_config_change(self) -> None:
        if self.backend is not None and self.has(PF.CONFIG):
            self.backend.send_config_change()

    def _before_start(self, index: int) -> None:
        """A ring starts. Without the STATUS protocol feature nobody sends DRIVER_OK: the
        first started ring means the front-end is driving the device."""
        if not self.has(PF.STATUS) and not self.device.get_status() & Status.DRIVER_OK:
            self.device.set_status(DRIVER_READY)

    # -- helpers ----------------------------------------------------------------------------
    def vring_index(self, index: int) -> int:
        """``index`` after checking the ring exists (ProtocolError otherwise)."""
        self.vrings.get(index)
        return index

    # -- dirty log
    def stop_log(self) -> None:
        if self.log_area is None:
            return
        if self.device.dma.dirty_log is not None:
            self.device.set_dirty_log(None)
        self.log_area.close()
        self.log_area = None
