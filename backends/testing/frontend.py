"""A test-side vhost-user FRONT-END: what QEMU does, in Python, over a real unix socket.

Real memfds for guest RAM, real eventfds for kick/call/err, a real socketpair for the backend
channel. Reusable by any test that needs to drive the backend without QEMU:

* :class:`GuestMemory` - memfd-backed guest RAM slots (GPA, fake QEMU user address, mmap).
* :class:`SplitRing` - the driver side of a split virtqueue living in that memory.
* :class:`Frontend` - the vhost-user client: every request, REPLY_ACK handling, the QEMU-like
  init / start sequences, the backend channel (IOTLB MISS -> UPDATE -> ack, like QEMU).
* :class:`BackendProcess` - ``python -m backends`` as a subprocess (READY line, SIGTERM, fds).
* :class:`MonitorClient` - a small synchronous client of the backend's QMP-style monitor.
* :class:`BackendThread` - the backend wired in-process, its loop running in a thread.

Every wait has a timeout whose error names what was awaited; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from backends.vdpa.features import VIRTIO_F_RING_PACKED
from backends.vhost_user import messages as m
from backends.vhost_user.framing import Message, MessageReader, close_fds, send_message

PAGE = 0x1000
UADDR_BASE = 0x7F00_0000_0000  # fake QEMU user addresses: UADDR_BASE + gpa
TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[2]

# virtio bits the front-end needs (numbers from the virtio spec)
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_EVENT_IDX = 29
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VIRTIO_NET_HDR_LEN = 12


class FrontendError(AssertionError):
    """The backend answered something a QEMU front-end would refuse."""


def wait_readable(fd: int | socket.socket, timeout: float, what: str) -> None:
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")


_T = TypeVar("_T")


def wait_for(predicate: Callable[[], _T], timeout: float, what: str, step: float = 0.005) -> _T:
    """Poll ``predicate`` (cheap, no side effects) until true; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        select.select([], [], [], step)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drain_eventfd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def open_fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


# ------------------------------------------------------------------------------------------
# guest memory
# ------------------------------------------------------------------------------------------
class MemSlot:
    """One memfd-backed slot of guest RAM."""

    def __init__(self, gpa: int, size: int, uaddr: int | None = None, name: str = "ram"):
        self.gpa = gpa
        self.size = size
        self.uaddr = UADDR_BASE + gpa if uaddr is None else uaddr
        self.fd = os.memfd_create(f"guest-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def region(self, mmap_offset: int = 0) -> m.MemRegion:
        return m.MemRegion(self.gpa, self.size, self.uaddr, mmap_offset)

    def contains(self, gpa: int, n: int = 1) -> bool:
        return self.gpa <= gpa and gpa + n <= self.gpa + self.size

    def close(self) -> None:
        if self.fd >= 0:
            self.mm.close()
            os.close(self.fd)
            self.fd = -1


class GuestMemory:
    """Guest RAM made of memfd slots, with a bump allocator in the first slot."""

    def __init__(self, size: int = 4 << 20, gpa: int = 0) -> None:
        self.slots: list[MemSlot] = []
        first = self.add_slot(gpa, size)
        self._next = first.gpa + PAGE  # keep GPA 0 page unused

    def add_slot(self, gpa: int, size: int, name: str = "ram") -> MemSlot:
        slot = MemSlot(gpa, size, name=name)
        self.slots.append(slot)
        return slot

    def remove_slot(self, slot: MemSlot) -> None:
        self.slots.remove(slot)
        slot.close()

    def regions(self) -> list[m.MemRegion]:
        return [s.region() for s in self.slots]

    def fds(self) -> list[int]:
        return [s.fd for s in self.slots]

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        if not self.slots[0].contains(gpa, size):
            raise MemoryError(f"guest memory exhausted allocating {size} bytes")
        self._next = gpa + size
        return gpa

    def _slot(self, gpa: int, n: int) -> MemSlot:
        for s in self.slots:
            if s.contains(gpa, n):
                return s
        raise ValueError(f"gpa {gpa:#x}+{n:#x} is not guest RAM")

    def read(self, gpa: int, n: int) -> bytes:
        s = self._slot(gpa, n)
        off = gpa - s.gpa
        return bytes(s.mm[off : off + n])

    def write(self, gpa: int, data: bytes) -> None:
        s = self._slot(gpa, len(data))
        off = gpa - s.gpa
        s.mm[off : off + len(data)] = data

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value & 0xFFFF))

    def uaddr(self, gpa: int) -> int:
        return self._slot(gpa, 1).uaddr + (gpa - self._slot(gpa, 1).gpa)

    def close(self) -> None:
        for s in self.slots:
            s.close()
        self.slots.clear()


# ------------------------------------------------------------------------------------------
# driver side of a split ring
# ------------------------------------------------------------------------------------------
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class SplitRing:
    """Driver side of one split virtqueue in :class:`GuestMemory`.

    ``iova_offset`` models a vIOMMU: the device sees IOVA = GPA + iova_offset (ring addresses in
    SET_VRING_ADDR and buffer addresses in descriptors); ``None`` means no vIOMMU, so ring
    addresses are QEMU user addresses and descriptors hold GPAs.
    """

    def __init__(
        self, mem: GuestMemory, index: int, num: int = 64, iova_offset: int | None = None
    ) -> None:
        self.mem = mem
        self.index = index
        self.num = num
        self.iova_offset = iova_offset
        self.desc = mem.alloc(16 * num, PAGE)
        self.avail = mem.alloc(6 + 2 * num, PAGE)
        self.used = mem.alloc(6 + 8 * num, PAGE)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(num))
        self.kick_fd = eventfd()
        self.call_fd = eventfd()
        self.err_fd = eventfd()
        self.chains: dict[int, list[int]] = {}

    def dev_addr(self, gpa: int) -> int:
        """The address the device is given for guest-physical ``gpa``."""
        return gpa if self.iova_offset is None else gpa + self.iova_offset

    def vring_addr(self, log: bool = False) -> m.VringAddr:
        if self.iova_offset is None:
            desc, used, avail = (self.mem.uaddr(a) for a in (self.desc, self.used, self.avail))
        else:
            desc, used, avail = (self.dev_addr(a) for a in (self.desc, self.used, self.avail))
        return m.VringAddr(self.index, m.VRING_F_LOG if log else 0, desc, used, avail, self.used)

    def add(self, out: Iterable[tuple[int, int]] = (), inp: Iterable[tuple[int, int]] = ()) -> int:
        """Post one chain of (gpa, len) buffers: ``out`` device-readable, ``inp`` writable."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VRING_DESC_F_WRITE) for a, n in inp]
        if not bufs or len(bufs) > len(self.free):
            raise ValueError(f"ring {self.index}: cannot post {len(bufs)} descriptors")
        ids = [self.free.pop(0) for _ in bufs]
        for k, (gpa, n, flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            nxt = 0 if last else ids[k + 1]
            f = flags | (0 if last else VRING_DESC_F_NEXT)
            self.mem.write(self.desc + 16 * ids[k], _DESC.pack(self.dev_addr(gpa), n, f, nxt))
        head = ids[0]
        self.chains[head] = ids
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)
        return head

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def pop_used(self) -> list[tuple[int, int]]:
        """Completed (head, written length) pairs since the last call."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.num
            head, n = _USED_ELEM.unpack(self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append((head, n))
            self.free.extend(self.chains.pop(head, [head]))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def wait_used(self, count: int = 1, timeout: float = TIMEOUT) -> list[tuple[int, int]]:
        """Wait (on the call eventfd, then the used ring) for ``count`` completions."""
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while True:
            got += self.pop_used()
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"timed out after {timeout:.1f}s waiting for {count} used buffers on "
                    f"ring {self.index} (got {len(got)}, used idx {self.used_idx()})"
                )
            r, _, _ = select.select([self.call_fd], [], [], min(left, 0.05))
            if r:
                drain_eventfd(self.call_fd)

    def close(self) -> None:
        close_fds([self.kick_fd, self.call_fd, self.err_fd])
        self.kick_fd = self.call_fd = self.err_fd = -1


# ------------------------------------------------------------------------------------------
# the front-end
# ------------------------------------------------------------------------------------------
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

    def set_mem_table(self, mem: GuestMemory, **kw: Any) -> int | bytes | None:
        return self.call(m.Request.SET_MEM_TABLE, m.pack_mem_table(mem.regions()), mem.fds(), **kw)

    def set_memory_like_qemu(self, mem: GuestMemory) -> None:
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
        # backend offers: these rings are split (the packed ring has its own tests)
        self.device_features = self.get_features() & ~(1 << VIRTIO_F_RING_PACKED)
        self.masked = [eventfd() for _ in range(nvqs)]
        self.errfds = [eventfd() for _ in range(nvqs)]
        for i in range(nvqs):
            self.set_vring_call(i, self.masked[i])
            self.set_vring_err(i, self.errfds[i])
        return [m.Request(r) for r, _ in self.log[start:]]

    def start_like_qemu(
        self,
        mem: GuestMemory,
        rings: list[SplitRing],
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
            self.set_vring_base(r.index, r.avail_idx)
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


# ------------------------------------------------------------------------------------------
# the backend as a subprocess, and its monitor
# ------------------------------------------------------------------------------------------
class BackendProcess:
    """``python -m backends`` in a subprocess; waits for its READY line."""

    def __init__(self, workdir: Path, *args: str, monitor: bool = True, timeout: float = 15.0):
        self.socket_path = str(workdir / "vhost.sock")
        self.monitor_path = str(workdir / "monitor.sock") if monitor else None
        self.journal_path = workdir / "journal.jsonl"
        self.log_path = workdir / "backend.log"
        cmd = [
            sys.executable,
            "-m",
            "backends",
            "--socket",
            self.socket_path,
            "--journal-file",
            str(self.journal_path),
            "--log",
            str(self.log_path),
            *args,
        ]
        if self.monitor_path:
            cmd += ["--monitor", self.monitor_path]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            self.ready_line = self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"timed out after {timeout:.1f}s waiting for the backend's READY line"
                )
            wait_readable(fd, left, "the backend's READY line")
            chunk = os.read(fd, 4096)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"backend exited before READY: {err}")
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"backend printed {line!r} instead of READY")
        return line

    def fd_count(self) -> int:
        return open_fd_count(self.pid)

    def frontend(self, timeout: float = TIMEOUT) -> Frontend:
        return Frontend(self.socket_path, timeout=timeout)

    def monitor(self) -> MonitorClient:
        if not self.monitor_path:
            raise RuntimeError("backend started without --monitor")
        return MonitorClient(self.monitor_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"backend did not exit within {timeout}s of signal {sig}") from None
        finally:
            self._close_pipes()
        return rc

    def stderr_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for p in (self.proc.stdout, self.proc.stderr):
            if p is not None:
                p.close()

    def journal(self) -> list[dict[str, Any]]:
        """The journal file written at exit (JSON lines)."""
        return [json.loads(line) for line in self.journal_path.read_text().splitlines() if line]


class MonitorClient:
    """A minimal synchronous QMP client for the backend's monitor socket."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout
        self._buf = b""
        self._id = 0
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self.greeting = self._recv()
            self.command("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(
                    f"timed out after {self.timeout:.1f}s waiting for the monitor"
                ) from None
            if not chunk:
                raise ConnectionError("monitor closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name: str, **arguments: Any) -> Any:
        self._id += 1
        cmd: dict[str, Any] = {"execute": name, "id": self._id}
        if arguments:
            cmd["arguments"] = arguments
        self.sock.sendall(json.dumps(cmd).encode() + b"\n")
        while True:
            resp = self._recv()
            if "event" in resp:
                continue
            if "error" in resp:
                raise RuntimeError(f"monitor {name}: {resp['error']}")
            return resp.get("return")

    def journal(self, kinds: list[str] | None = None, since: int | None = None) -> list[dict]:
        args: dict[str, Any] = {}
        if kinds is not None:
            args["kinds"] = kinds
        if since is not None:
            args["since"] = since
        result = self.command("query-journal", **args)
        return result["entries"] if isinstance(result, dict) else result

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# the backend in-process, its loop in a thread
# ------------------------------------------------------------------------------------------
class BackendThread:
    """The backend wired by :mod:`backends.process`, its event loop in a daemon thread.

    The device model is single-threaded: inspect it only through :meth:`call`, which runs a
    function on the loop thread and returns its result.
    """

    def __init__(self, socket_path: str, **options: Any) -> None:
        from backends.process import Backend, BackendOptions

        self.backend = Backend(BackendOptions(socket=socket_path, **options))
        self.socket_path = socket_path
        self._calls: queue.Queue[tuple[Callable[[], Any], queue.Queue]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.backend.loop.add_reader(self._wake_r, self._run_calls)
        self._thread = threading.Thread(target=self.backend.loop.run_forever, daemon=True)
        self._thread.start()

    def _run_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                fn, reply = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                reply.put((True, fn()))
            except BaseException as e:
                reply.put((False, e))

    def call(self, fn: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
        reply: queue.Queue = queue.Queue()
        self._calls.put((fn, reply))
        os.write(self._wake_w, b"x")
        try:
            ok, value = reply.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"timed out after {timeout}s waiting for the backend loop") from None
        if not ok:
            raise value
        return value

    @property
    def journal(self):
        return self.backend.journal

    def query(self, kinds: list[str] | None = None, since: int | None = None) -> list[dict]:
        return self.call(lambda: self.backend.journal.query(kinds, since))

    def mark(self) -> int:
        return self.call(self.backend.journal.mark)

    def wait_journal(
        self, kind: str, since: int, timeout: float = TIMEOUT, count: int = 1
    ) -> list[dict]:
        return wait_for(
            lambda: (e := self.query([kind], since)) and len(e) >= count and e,
            timeout,
            f"{count} journal entr{'y' if count == 1 else 'ies'} of kind {kind!r}",
        )

    def frontend(self, timeout: float = TIMEOUT) -> Frontend:
        return Frontend(self.socket_path, timeout=timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                self.call(self.backend.loop.stop)
            self._thread.join(TIMEOUT)
        self.backend.loop.remove_reader(self._wake_r)
        self.backend.close()
        close_fds([self._wake_r, self._wake_w])


@contextlib.contextmanager
def frontend_for(path: str, timeout: float = TIMEOUT) -> Iterator[Frontend]:
    fe = Frontend(path, timeout=timeout)
    try:
        yield fe
    finally:
        fe.close_init_fds()
        fe.close()
