"""A vhost-user FRONT-END: what QEMU does, in Python, over a real unix socket, for tests that
drive the backend without QEMU (unit tests, benchmarks).

Real memfds for guest RAM (:class:`~qtests.qos.guest_memory.SharedGuestMemory`), real
eventfds for kick/call/err, a real socketpair for the backend channel.

* :class:`VhostUserRing` - a driver ring (the qtest driver's split or packed virtqueue, on
  shared guest memory) with its kick / call / err eventfds and its SET_VRING_ADDR.
* :class:`Frontend` - the vhost-user client: every request, REPLY_ACK handling, the QEMU-like
  init / start sequences, the backend channel (IOTLB MISS -> UPDATE -> ack, like QEMU).

Every wait has a timeout whose error names what was awaited; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.vdpa.virtqueue import VqState
from backends.vhost_user import messages as m
from backends.vhost_user.framing import Message, MessageReader, close_fds, send_message
from backends.virtio.features import VIRTIO_F_RING_PACKED

from .driver_queue import Buffer, DriverQueue
from .guest_memory import UADDR_BASE, MemSlot, SharedGuestMemory
from .iova import DmaDir
from .packed_virtqueue import PackedVirtqueue
from .virtqueue import SplitVirtqueue
from .waiting import wait_readable

__all__ = [
    "TIMEOUT",
    "Frontend",
    "FrontendError",
    "IommuEntry",
    "OffsetDma",
    "VhostUserRing",
    "drain_eventfd",
    "eventfd",
    "frontend_for",
]

TIMEOUT = 5.0


class FrontendError(AssertionError):
    """The backend answered something a QEMU front-end would refuse."""


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drain_eventfd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class OffsetDma:
    """A vIOMMU that maps every guest-physical address at ``gpa + offset`` (what the device
    is told); the front-end's IOTLB entries say the same (see :class:`IommuEntry`)."""

    identity = False

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def map(self, gpa: int, size: int, direction: DmaDir) -> int:
        return gpa + self.offset

    def unmap(self, addr: int, size: int, direction: DmaDir) -> None:
        return None

    def map_coherent(self, gpa: int, size: int) -> int:
        return gpa + self.offset

    def unmap_coherent(self, addr: int, size: int) -> None:
        return None

    def map_msi(self, gpa: int, size: int) -> int:
        return gpa


class EventfdInterrupt:
    """A ring's call eventfd as an interrupt source (``fired`` consumes the count)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fired(self) -> bool:
        return drain_eventfd(self.fd) > 0

    def clear(self) -> None:
        drain_eventfd(self.fd)

    def describe(self) -> str:
        return f"call eventfd {self.fd}"


class VhostUserRing:
    """One driver ring in :class:`SharedGuestMemory` plus its eventfds.

    ``iova_offset`` models a vIOMMU: the device sees IOVA = GPA + iova_offset (ring addresses
    in SET_VRING_ADDR and buffer addresses in descriptors); ``None`` means no vIOMMU, so ring
    addresses are QEMU user addresses and descriptors hold GPAs. ``packed`` picks the
    packed layout. Chains are visible to the device as soon as they are added; ``kick``
    always signals the kick eventfd (as a front-end that ignores suppression)."""

    def __init__(
        self,
        mem: SharedGuestMemory,
        index: int,
        num: int = 64,
        iova_offset: int | None = None,
        *,
        packed: bool = False,
    ) -> None:
        self.mem = mem
        self.index = index
        self.num = num
        self.iova_offset = iova_offset
        self.kick_fd = eventfd()
        self.call_fd = eventfd()
        self.err_fd = eventfd()
        dma = None if iova_offset is None else OffsetDma(iova_offset)
        cls = PackedVirtqueue if packed else SplitVirtqueue
        try:
            self.vq: DriverQueue = cls(
                mem, mem, index, num, indirect=True, notify=self._notify, dma=dma
            )
        except BaseException:
            self.close()
            raise
        self.vq.interrupt = EventfdInterrupt(self.call_fd)

    def _notify(self, _vq: object) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- addresses -------------------------------------------------------------------------
    @property
    def desc(self) -> int:
        return self.vq.desc

    @property
    def avail(self) -> int:
        return self.vq.avail

    @property
    def used(self) -> int:
        return self.vq.used

    def dev_addr(self, gpa: int) -> int:
        """The address the device is given for guest-physical ``gpa``."""
        return gpa if self.iova_offset is None else gpa + self.iova_offset

    def vring_addr(self, log: bool = False) -> m.VringAddr:
        vq = self.vq
        if self.iova_offset is None:
            desc, used, avail = (self.mem.uaddr(a) for a in (vq.desc, vq.used, vq.avail))
        else:
            desc, used, avail = vq.desc_dma, vq.used_dma, vq.avail_dma
        return m.VringAddr(self.index, m.VRING_F_LOG if log else 0, desc, used, avail, vq.used)

    def vring_base(self) -> int:
        """The SET_VRING_BASE ``num`` for where the driver is (split: its avail idx)."""
        vq = self.vq
        if isinstance(vq, PackedVirtqueue):
            state = VqState(vq.next_avail, vq.next_used, vq.avail_wrap, vq.used_wrap, packed=True)
            return state.to_vhost_base()
        return VqState(vq.avail_idx).to_vhost_base()

    @property
    def avail_idx(self) -> int:
        return self.vq.avail_idx

    # -- chains ----------------------------------------------------------------------------
    def add(self, out: Sequence[Buffer] = (), inp: Sequence[Buffer] = (), token: Any = None) -> int:
        """Post one chain of (gpa, len) buffers (``out`` device-readable, ``inp`` writable)
        and make it available; returns its head (split) or buffer id (packed)."""
        head = self.vq.add(out, inp, token)
        self.vq.publish()
        return head

    def kick(self) -> None:
        self._notify(self.vq)

    def pop_used(self) -> list[tuple[int, int]]:
        """Completed (head, written length) pairs since the last call."""
        return [(u.head, u.length) for u in self.vq.get_used()]

    def wait_used(self, count: int = 1, timeout: float = TIMEOUT) -> list[tuple[int, int]]:
        """Wait for ``count`` completions; (head, written length) pairs."""
        return [(u.head, u.length) for u in self.vq.wait_used(count, timeout)]

    def used_idx(self) -> int:
        return self.vq.device_used_idx()

    def close(self) -> None:
        close_fds([self.kick_fd, self.call_fd, self.err_fd])
        self.kick_fd = self.call_fd = self.err_fd = -1


# requests QEMU sends with NEED_REPLY once REPLY_ACK is negotiated (and waits for the ack)
_ACKED = frozenset(
    {
        m.Request.SET_MEM_TABLE,
        m.Request.ADD_MEM_REG,
        m.Request.REM_MEM_REG,
        m.Request.SET_BACKEND_REQ_FD,
        m.Request.SET_VRING_ENABLE,
        m.Request.NET_SET_MTU,
        m.Request.SET_CONFIG,
    }
)
# requests whose answer is a u64 status even without REPLY_ACK
_STATUS_REPLY = frozenset({m.Request.IOTLB_MSG})


@dataclass
class IommuEntry:
    iova: int
    size: int
    gpa: int
    perm: int


@dataclass
class Frontend:
    """A vhost-user front-end connected to ``path``."""

    path: str
    timeout: float = TIMEOUT
    sock: socket.socket = field(init=False)
    features: int = 0
    protocol_features: int = 0
    backend_sock: socket.socket | None = None
    iommu: list[IommuEntry] = field(default_factory=list)
    log: list[tuple[int, int]] = field(default_factory=list)  # (request, flags) sent
    shadow: list[tuple[int, int, int]] = field(default_factory=list)  # regions via ADD_MEM_REG

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(self.timeout)
            self.sock.connect(self.path)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self._reader = MessageReader(self.sock)
        self._pending: list[Message] = []
        self._stop: Exception | None = None
        self._backend_reader: MessageReader | None = None
        self._backend_pending: list[Message] = []

    # -- plumbing ----------------------------------------------------------------------------
    def close(self) -> None:
        self._reader.discard()
        for msg in self._pending + self._backend_pending:
            msg.close_fds()
        self.sock.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, feature: m.ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    def send_raw(self, data: bytes, fds: Iterable[int] = ()) -> None:
        send_message(self.sock, data, list(fds))

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Iterable[int] = (),
        need_reply: bool = False,
        flags: int | None = None,
    ) -> None:
        if flags is None:
            flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
        self.log.append((int(request), flags))
        self.send_raw(m.encode(request, payload, flags), fds)

    def recv(self, timeout: float | None = None, what: str = "a reply") -> Message:
        """The next message from the backend on the main socket."""
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while not self._pending:
            if self._stop is not None:
                raise ConnectionError(f"backend connection ended ({self._stop!r}) before {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {t:.1f}s waiting for {what}")
            wait_readable(self.sock, left, what)
            msgs, self._stop = self._reader.read()
            self._pending += msgs
        return self._pending.pop(0)

    def recv_reply(self, request: int) -> bytes:
        name = m.request_name(request)
        msg = self.recv(what=f"the reply to {name}")
        msg.close_fds()
        if msg.header.flags != m.REPLY_FLAGS:
            raise FrontendError(f"reply to {name} has flags {msg.header.flags:#x}, not 0x5")
        if msg.header.request != request:
            raise FrontendError(f"reply to {name} came as request {msg.header.request}")
        return msg.payload

    def is_closed(self, timeout: float | None = None) -> bool:
        """True once the backend closed the connection (EOF) within ``timeout``."""
        t = self.timeout if timeout is None else timeout
        try:
            wait_readable(self.sock, t, "the backend to close the connection")
        except TimeoutError:
            return False
        try:
            data = self.sock.recv(4096, socket.MSG_PEEK)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except BlockingIOError:
            return False
        return data == b""

    def call(
        self,
        request: int,
        payload: bytes = b"",
        fds: Iterable[int] = (),
        *,
        ack: bool | None = None,
        check: bool = True,
    ) -> int | bytes | None:
        """Send a request like QEMU would and collect its answer.

        Data-reply requests return the reply payload. Otherwise, when ``ack`` (default: QEMU's
        choice given the negotiated REPLY_ACK) the u64 status is returned (0 = success) and,
        with ``check``, a non-zero status raises FrontendError.
        """
        request = m.Request(request)
        if ack is None:
            ack = self.has(m.ProtocolFeature.REPLY_ACK) and request in _ACKED
        self.send(request, payload, fds, need_reply=ack)
        if request in m.DATA_REPLY_REQUESTS:
            return self.recv_reply(request)
        if ack or request in _STATUS_REPLY:
            status = m.unpack_u64(self._u64(self.recv_reply(request), request))
            if check and status != 0:
                raise FrontendError(f"{request.name} failed: status {status}")
            return status
        return None

    @staticmethod
    def _u64(payload: bytes, request: int) -> bytes:
        if len(payload) != 8:
            raise FrontendError(f"{m.request_name(request)} reply has {len(payload)} bytes, not 8")
        return payload

    def get_u64(self, request: int) -> int:
        return m.unpack_u64(self._u64(self.call(request), request))  # type: ignore[arg-type]

    # -- requests ----------------------------------------------------------------------------
    def get_features(self) -> int:
        return self.get_u64(m.Request.GET_FEATURES)

    def set_features(self, features: int, *, ack: bool | None = None) -> None:
        self.features = features
        wait = bool(features >> m.VHOST_F_LOG_ALL & 1)
        if ack is None:
            ack = wait and self.has(m.ProtocolFeature.REPLY_ACK)
        self.call(m.Request.SET_FEATURES, m.pack_u64(features), ack=ack)
        if wait and not self.has(m.ProtocolFeature.REPLY_ACK):
            self.get_features()  # QEMU's way of waiting without REPLY_ACK
        if self.has(m.ProtocolFeature.STATUS):
            status = self.get_status()
            if not status & 8:
                self.set_status(status | 8)

    def get_protocol_features(self) -> int:
        return self.get_u64(m.Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.protocol_features = features
        self.call(m.Request.SET_PROTOCOL_FEATURES, m.pack_u64(features))

    def set_owner(self) -> None:
        self.call(m.Request.SET_OWNER)

    def get_queue_num(self) -> int:
        return self.get_u64(m.Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self.get_u64(m.Request.GET_MAX_MEM_SLOTS)

    def set_backend_req_fd(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.call(m.Request.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        if self.backend_sock is not None:
            self.backend_sock.close()
        self.backend_sock = ours
        self._backend_reader = MessageReader(ours)

    def set_mem_table(self, mem: SharedGuestMemory, **kw: Any) -> int | bytes | None:
        return self.call(m.Request.SET_MEM_TABLE, m.pack_mem_table(mem.regions()), mem.fds(), **kw)

    def set_memory_like_qemu(self, mem: SharedGuestMemory) -> None:
        """QEMU's vhost_user_set_mem_table: with CONFIGURE_MEM_SLOTS a diff against what the
        backend already has (REM_MEM_REG for the gone, then ADD_MEM_REG for the new; nothing
        for unchanged regions), otherwise the full SET_MEM_TABLE."""
        if not self.has(m.ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.set_mem_table(mem)
            return
        now = {(s.gpa, s.size, s.uaddr): s for s in mem.slots}
        for key in [k for k in self.shadow if k not in now]:
            self.rem_mem_reg(m.MemRegion(*key, 0))
            self.shadow.remove(key)
        for key, slot in now.items():
            if key not in self.shadow:
                self.add_mem_reg(slot)
                self.shadow.append(key)

    def add_mem_reg(self, slot: MemSlot, **kw: Any) -> int | bytes | None:
        return self.call(m.Request.ADD_MEM_REG, m.pack_mem_reg(slot.region()), [slot.fd], **kw)

    def rem_mem_reg(self, region: m.MemRegion, **kw: Any) -> int | bytes | None:
        return self.call(m.Request.REM_MEM_REG, m.pack_mem_reg(region), **kw)

    def set_vring_num(self, index: int, num: int, **kw: Any) -> Any:
        return self.call(m.Request.SET_VRING_NUM, m.VringState(index, num).pack(), **kw)

    def set_vring_base(self, index: int, num: int, **kw: Any) -> Any:
        return self.call(m.Request.SET_VRING_BASE, m.VringState(index, num).pack(), **kw)

    def get_vring_base(self, index: int) -> int:
        payload = self.call(m.Request.GET_VRING_BASE, m.VringState(index, 0).pack())
        assert isinstance(payload, bytes)
        if len(payload) != m.VRING_STATE.size:
            raise FrontendError(f"GET_VRING_BASE reply has {len(payload)} bytes, not 8")
        state = m.VringState.unpack(payload)
        if state.index != index:
            raise FrontendError(f"GET_VRING_BASE for ring {index} answered ring {state.index}")
        return state.num

    def set_vring_addr(self, addr: m.VringAddr, **kw: Any) -> Any:
        if addr.log and kw.get("ack") is None:
            kw["ack"] = self.has(m.ProtocolFeature.REPLY_ACK)
        result = self.call(m.Request.SET_VRING_ADDR, addr.pack(), **kw)
        if addr.log and not self.has(m.ProtocolFeature.REPLY_ACK):
            self.get_features()
        return result

    def _vring_file(self, request: m.Request, index: int, fd: int | None, **kw: Any) -> Any:
        payload = m.VringFile(index, fd is None).pack()
        return self.call(request, payload, [] if fd is None else [fd], **kw)

    def set_vring_kick(self, index: int, fd: int | None, **kw: Any) -> Any:
        return self._vring_file(m.Request.SET_VRING_KICK, index, fd, **kw)

    def set_vring_call(self, index: int, fd: int | None, **kw: Any) -> Any:
        return self._vring_file(m.Request.SET_VRING_CALL, index, fd, **kw)

    def set_vring_err(self, index: int, fd: int | None, **kw: Any) -> Any:
        return self._vring_file(m.Request.SET_VRING_ERR, index, fd, **kw)

    def set_vring_enable(self, index: int, enable: bool, **kw: Any) -> Any:
        result = self.call(
            m.Request.SET_VRING_ENABLE, m.VringState(index, int(enable)).pack(), **kw
        )
        if not self.has(m.ProtocolFeature.REPLY_ACK):
            self.get_features()  # wait_for_reply without REPLY_ACK
        return result

    def get_status(self) -> int:
        return self.get_u64(m.Request.GET_STATUS)

    def set_status(self, status: int) -> None:
        self.call(m.Request.SET_STATUS, m.pack_u64(status))

    def get_config(self, offset: int, size: int) -> bytes:
        payload = self.call(m.Request.GET_CONFIG, m.ConfigMsg(offset, size, 0, bytes(size)).pack())
        assert isinstance(payload, bytes)
        if len(payload) != m.CONFIG_HEADER.size + size:
            raise FrontendError(f"GET_CONFIG reply has {len(payload)} bytes")
        return m.ConfigMsg.unpack(payload).data

    def set_config(self, offset: int, data: bytes, flags: int = 0, **kw: Any) -> Any:
        return self.call(
            m.Request.SET_CONFIG, m.ConfigMsg(offset, len(data), flags, data).pack(), **kw
        )

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> int:
        self.send(m.Request.SET_LOG_BASE, m.LogDesc(size, offset).pack(), [fd])
        return m.unpack_u64(
            self._u64(self.recv_reply(m.Request.SET_LOG_BASE), m.Request.SET_LOG_BASE)
        )

    def send_rarp(self, mac: bytes) -> None:
        self.call(m.Request.SEND_RARP, mac.ljust(8, b"\0"))

    def net_set_mtu(self, mtu: int, **kw: Any) -> Any:
        return self.call(m.Request.NET_SET_MTU, m.pack_u64(mtu), **kw)

    def iotlb(self, msg: m.IotlbMsg, check: bool = True) -> int:
        # QEMU always sets NEED_REPLY on IOTLB_MSG and waits for the u64
        status = self.call(m.Request.IOTLB_MSG, msg.pack(), ack=True, check=check)
        assert isinstance(status, int)
        return status

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int = 3) -> int:
        return self.iotlb(m.IotlbMsg(iova, size, uaddr, perm, m.IotlbType.UPDATE))

    def iotlb_invalidate(self, iova: int, size: int) -> int:
        return self.iotlb(m.IotlbMsg(iova, size, 0, 0, m.IotlbType.INVALIDATE))

    # -- backend channel ---------------------------------------------------------------------
    def recv_backend(self, timeout: float | None = None) -> Message:
        """The next backend-initiated request (IOTLB MISS ...) on the backend channel."""
        if self.backend_sock is None or self._backend_reader is None:
            raise FrontendError("no backend channel (SET_BACKEND_REQ_FD not sent)")
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        while not self._backend_pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {t:.1f}s waiting for a backend request")
            wait_readable(self.backend_sock, left, "a backend request")
            msgs, stop = self._backend_reader.read()
            self._backend_pending += msgs
            if stop is not None and not msgs:
                raise ConnectionError(f"backend channel ended: {stop!r}")
        return self._backend_pending.pop(0)

    def poll_backend(self, timeout: float) -> Message | None:
        """The next backend-initiated request if one is pending or arrives within ``timeout``
        seconds, else None. Use this, not a select() on :attr:`backend_sock`: requests that
        arrived together are read together and wait in a queue the socket no longer shows."""
        if self.backend_sock is None or self._backend_reader is None:
            raise FrontendError("no backend channel (SET_BACKEND_REQ_FD not sent)")
        if not self._backend_pending:
            if not select.select([self.backend_sock], [], [], max(timeout, 0.0))[0]:
                return None
            msgs, stop = self._backend_reader.read()
            self._backend_pending += msgs
            if stop is not None and not msgs:
                raise ConnectionError(f"backend channel ended: {stop!r}")
        return self._backend_pending.pop(0) if self._backend_pending else None

    def reply_backend(self, msg: Message, status: int) -> None:
        assert self.backend_sock is not None
        send_message(self.backend_sock, m.encode_reply(msg.header.request, m.pack_u64(status)))

    def serve_miss(self, timeout: float | None = None) -> m.IotlbMsg:
        """Handle one IOTLB MISS the way QEMU does: UPDATE on the main socket (acked), then
        the reply to the MISS on the backend channel. Returns the MISS."""
        msg = self.recv_backend(timeout)
        if msg.header.request != m.BackendRequest.IOTLB_MSG:
            raise FrontendError(f"unexpected backend request {msg.header.request}")
        miss = m.IotlbMsg.unpack(msg.payload)
        if miss.type != m.IotlbType.MISS:
            raise FrontendError(f"backend IOTLB message type {miss.type}, expected MISS")
        status = 1
        for e in self.iommu:
            if e.iova <= miss.iova < e.iova + e.size and (e.perm & miss.perm) == miss.perm:
                uaddr = UADDR_BASE + e.gpa
                self.iotlb_update(e.iova, e.size, uaddr, e.perm)
                status = 0
                break
        if msg.header.need_reply:
            self.reply_backend(msg, status)
        return miss

    # -- QEMU-like sequences -----------------------------------------------------------------
    def init_like_qemu(self, nvqs: int, want_protocol: int | None = None) -> list[m.Request]:
        """QEMU 10's vhost_dev_init for vhost-user-net; returns the requests sent, in order.

        GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ),
        GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (BACKEND_REQ), SET_OWNER,
        GET_FEATURES, then SET_VRING_CALL and SET_VRING_ERR per queue (masked notifiers).
        """
        start = len(self.log)
        self.device_features = self.get_features()
        if self.device_features >> m.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = self.get_protocol_features()
            want = offered if want_protocol is None else offered & want_protocol
            want &= ~(1 << m.ProtocolFeature.CONFIG)  # QEMU's virtio-net strips CONFIG
            self.set_protocol_features(want)
            if self.has(m.ProtocolFeature.MQ):
                self.max_queues = self.get_queue_num()
            if self.has(m.ProtocolFeature.CONFIGURE_MEM_SLOTS):
                self.max_mem_slots = self.get_max_mem_slots()
            if self.has(m.ProtocolFeature.BACKEND_REQ):
                self.set_backend_req_fd()
        self.set_owner()
        # QEMU's virtio-net has packed=off by default, which masks RING_PACKED from what the
        # backend offers: these rings are split unless a test asks for packed ones
        self.device_features = self.get_features() & ~(1 << VIRTIO_F_RING_PACKED)
        self.masked = [eventfd() for _ in range(nvqs)]
        self.errfds = [eventfd() for _ in range(nvqs)]
        for i in range(nvqs):
            self.set_vring_call(i, self.masked[i])
            self.set_vring_err(i, self.errfds[i])
        return [m.Request(r) for r, _ in self.log[start:]]

    def start_like_qemu(
        self,
        mem: SharedGuestMemory,
        rings: list[VhostUserRing],
        features: int,
        *,
        log: tuple[int, int] | None = None,
    ) -> list[m.Request]:
        """QEMU 10's vhost_net_start: SET_VRING_ENABLE (restore), SET_FEATURES (+ GET_STATUS,
        SET_STATUS FEATURES_OK), the memory table (ADD_MEM_REG per new region with
        CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE), per ring NUM, BASE, ADDR, KICK, CALL;
        SET_LOG_BASE when ``log`` = (memfd, size) is given; then GET_STATUS, SET_STATUS
        DRIVER_OK."""
        start = len(self.log)
        if features >> m.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            for r in rings:
                self.set_vring_enable(r.index, True)
        self.set_features(features)
        self.set_memory_like_qemu(mem)
        for r in rings:
            self.set_vring_num(r.index, r.num)
            self.set_vring_base(r.index, r.vring_base())
            self.set_vring_addr(r.vring_addr(log=log is not None))
            self.set_vring_kick(r.index, r.kick_fd)
            self.set_vring_call(r.index, r.call_fd)
        if log is not None:
            self.set_log_base(log[0], log[1])
        if self.has(m.ProtocolFeature.STATUS):
            status = self.get_status()
            if status & 7 != 7:
                self.set_status(status | 7)
        return [m.Request(r) for r, _ in self.log[start:]]

    def close_init_fds(self) -> None:
        close_fds(getattr(self, "masked", []) + getattr(self, "errfds", []))
        self.masked = []
        self.errfds = []


@contextlib.contextmanager
def frontend_for(path: str, timeout: float = TIMEOUT) -> Iterator[Frontend]:
    fe = Frontend(path, timeout=timeout)
    try:
        yield fe
    finally:
        fe.close_init_fds()
        fe.close()
