"""One vhost-user front-end connection: message dispatch onto the vDPA bus ops.

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

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backends.loop import EventLoop
from backends.vdpa.access import TranslationError
from backends.vdpa.dirty_log import DirtyLog
from backends.vdpa.features import VIRTIO_F_ACCESS_PLATFORM, Status, bit
from backends.vdpa.iotlb import Perm
from backends.vdpa.virtqueue import VqError, VqState
from backends.vhost_user import messages as m
from backends.vhost_user.backend_channel import BackendChannel
from backends.vhost_user.errors import ProtocolError
from backends.vhost_user.framing import Message, MessageReader
from backends.vhost_user.log_area import LogArea
from backends.vhost_user.memory_table import MemoryTable
from backends.vhost_user.messages import ProtocolFeature as PF
from backends.vhost_user.messages import Request as R
from backends.vhost_user.outbox import Outbox
from backends.vhost_user.vrings import Vrings, check_eventfd

if TYPE_CHECKING:
    from backends.vdpa.device import VdpaDevice

log = logging.getLogger(__name__)

_U64 = 1 << 64
LOG_ALL = bit(m.VHOST_F_LOG_ALL)
PROTOCOL_FEATURES = bit(m.VHOST_USER_F_PROTOCOL_FEATURES)
ACCESS_PLATFORM = bit(VIRTIO_F_ACCESS_PLATFORM)
DRIVER_READY = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)

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


@dataclass(frozen=True)
class Offer:
    """What the backend offers a front-end."""

    mem_slots: bool = True
    iommu: bool = True
    log: bool = True
    max_queues: int = 1

    def protocol_features(self) -> int:
        f = m.protocol_mask(
            PF.MQ,
            PF.RARP,
            PF.REPLY_ACK,
            PF.MTU,
            PF.BACKEND_REQ,
            PF.STATUS,
            PF.RESET_DEVICE,
            PF.CONFIG,
        )
        if self.log:
            f |= bit(PF.LOG_SHMFD)
        if self.mem_slots:
            f |= bit(PF.CONFIGURE_MEM_SLOTS)
        return f


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
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.SET_OWNER: self._set_owner,
            R.RESET_OWNER: self._reset,
            R.RESET_DEVICE: self._reset,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.SET_LOG_BASE: self._set_log_base,
            R.SET_LOG_FD: self._set_log_fd,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_file,
            R.SET_VRING_CALL: self._set_vring_file,
            R.SET_VRING_ERR: self._set_vring_file,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.SEND_RARP: self._send_rarp,
            R.NET_SET_MTU: self._net_set_mtu,
            R.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            R.IOTLB_MSG: self._iotlb_msg,
            R.SET_VRING_ENDIAN: self._set_vring_endian,
            R.GET_CONFIG: self._get_config,
            R.SET_CONFIG: self._set_config,
            R.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
        }
        device.on_iotlb_miss = self._on_iotlb_miss
        device.on_config_change = self._on_config_change
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self.on_readable)
        loop.add_guard(self._check_peer_memory)
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
        self._stop_log()
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1
        dev.reset()  # a new connection starts from scratch
        self.mem.clear("disconnect")
        self.sock.close()
        if self.on_closed is not None:
            self.on_closed(self)

    def _check_peer_memory(self) -> None:
        """Loop guard: drop any shared memory the front-end shrank since the last callback
        (mem-table regions, the dirty log) before anything can touch it."""
        self.mem.check_backing()
        area = self.log_area
        if area is not None and not area.backing_ok():
            self._stop_log()
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
    @staticmethod
    def _u64(msg: Message) -> int:
        return m.unpack_u64(msg.payload)

    def _vring_index(self, index: int) -> int:
        self.vrings.get(index)
        return index

    # -- features / ownership -----------------------------------------------------------------
    def _get_features(self, msg: Message) -> bytes:
        return m.pack_u64(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        features = self._u64(msg)
        extra = features & ~self.offered_features()
        if extra:
            raise ProtocolError("bad-features", f"features {extra:#x} were not offered")
        if features & ACCESS_PLATFORM and not (self.has(PF.REPLY_ACK) and self.has(PF.BACKEND_REQ)):
            raise ProtocolError(
                "bad-features",
                "ACCESS_PLATFORM needs the REPLY_ACK and BACKEND_REQ protocol features",
            )
        old = self.features or 0
        self.features = features
        self.device.set_driver_features(features)
        self.mem.set_iommu(bool(features & ACCESS_PLATFORM))
        if not features & PROTOCOL_FEATURES:
            for i in range(len(self.vrings)):  # no SET_VRING_ENABLE: every ring is enabled
                self.device.set_vq_ready(i, True)
        if old & LOG_ALL and not features & LOG_ALL:
            self._stop_log()
        elif features & LOG_ALL and self.log_area is not None and self.device.dma.dirty_log is None:
            self.device.set_dirty_log(DirtyLog(self.log_area.view))
        return None

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset(self, msg: Message) -> None:
        """RESET_OWNER (deprecated) / RESET_DEVICE: stop every ring, reset the device.
        The memory table stays (the front-end does not resend it)."""
        self.vrings.stop_kicks()
        self._stop_log()
        self.features = None
        self.device.reset()
        self.mem.resync()

    def _get_protocol_features(self, msg: Message) -> bytes:
        return m.pack_u64(self.offer.protocol_features())

    def _set_protocol_features(self, msg: Message) -> None:
        features = self._u64(msg)
        extra = features & ~self.offer.protocol_features()
        if extra:
            raise ProtocolError("bad-features", f"protocol features {extra:#x} were not offered")
        self.protocol_features = features
        if self.backend is not None:
            self.backend.reply_ack = self.has(PF.REPLY_ACK)

    def _get_queue_num(self, msg: Message) -> bytes:
        return m.pack_u64(self.offer.max_queues)

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        slots = self.mem.max_slots if self.offer.mem_slots else m.MEM_TABLE_MAX_REGIONS
        return m.pack_u64(slots)

    # -- memory -------------------------------------------------------------------------------
    def _set_mem_table(self, msg: Message) -> None:
        payload = msg.payload
        if len(payload) < m.MEMORY_HEADER.size:
            raise ProtocolError("bad-size", f"SET_MEM_TABLE payload is {len(payload)} bytes")
        n = m.unpack_mem_table_count(payload)
        if n > m.MEM_TABLE_MAX_REGIONS:
            raise ProtocolError("bad-mem-table", f"{n} regions (at most {m.MEM_TABLE_MAX_REGIONS})")
        if len(payload) < m.mem_table_size(n) or len(payload) > m.mem_table_size(
            m.MEM_TABLE_MAX_REGIONS
        ):
            raise ProtocolError(
                "bad-size", f"SET_MEM_TABLE with {n} regions has a {len(payload)}-byte payload"
            )
        table = [
            m.MemRegion.unpack(payload, m.MEMORY_HEADER.size + k * m.MEM_REGION.size)
            for k in range(n)
        ]
        fds, msg.fds = msg.fds, []
        self.mem.set_table(table, fds, "SET_MEM_TABLE")

    def _add_mem_reg(self, msg: Message) -> None:
        self.mem.add(m.unpack_mem_reg(msg.payload), msg.take_fd(), "ADD_MEM_REG")

    def _rem_mem_reg(self, msg: Message) -> None:
        msg.close_fds()  # the spec tolerates a stray fd here: closed unused
        self.mem.remove(m.unpack_mem_reg(msg.payload), "REM_MEM_REG")

    # -- dirty log ----------------------------------------------------------------------------
    def _set_log_base(self, msg: Message) -> None:
        desc = m.LogDesc.unpack(msg.payload)
        if not msg.fds:
            raise ProtocolError("fd-count", "SET_LOG_BASE without a log fd (LOG_SHMFD)")
        fd = msg.take_fd()
        try:
            area = LogArea(fd, desc.mmap_size, desc.mmap_offset)
        except Exception as e:
            # QEMU frees its old log whatever we answer (it checks only the reply's request
            # code): marking the old one would lose dirty pages silently. Stop logging and
            # drop the connection, the only failure QEMU acts on.
            self._stop_log()
            raise ProtocolError("log-base", f"cannot map the dirty log: {e}", fatal=True) from e
        finally:
            os.close(fd)
        old, self.log_area = self.log_area, area
        self.device.set_dirty_log(DirtyLog(area.view))
        if old is not None:
            old.close()
        self.journal.record("log.base", size=desc.mmap_size, offset=desc.mmap_offset)

    def _stop_log(self) -> None:
        if self.log_area is None:
            return
        if self.device.dma.dirty_log is not None:
            self.device.set_dirty_log(None)
        self.log_area.close()
        self.log_area = None

    def _set_log_fd(self, msg: Message) -> None:
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1
        if msg.fds:
            self.log_fd = msg.take_fd()

    # -- vrings -------------------------------------------------------------------------------
    def _set_vring_num(self, msg: Message) -> None:
        st = m.VringState.unpack(msg.payload)
        i = self._vring_index(st.index)
        num, limit = st.num, self.device.get_vq_num_max()
        if num == 0 or num & (num - 1) or num > limit:
            raise ProtocolError(
                "bad-num", f"vring {i}: size {num} is not a power of 2 in 1..{limit}"
            )
        self.device.set_vq_num(i, num)

    def _set_vring_addr(self, msg: Message) -> None:
        addr = m.VringAddr.unpack(msg.payload)
        i = self._vring_index(addr.index)
        if self.iommu:
            desc, avail, used = addr.desc, addr.avail, addr.used
        else:  # QEMU user addresses: turn them into guest-physical ones via the mem table
            conv = []
            for what, uaddr in (("desc", addr.desc), ("avail", addr.avail), ("used", addr.used)):
                gpa = self.mem.uaddr_to_gpa(uaddr)
                if gpa is None:
                    raise ProtocolError(
                        "unmapped", f"vring {i}: {what} address {uaddr:#x} is in no memory region"
                    )
                conv.append(gpa)
            desc, avail, used = conv
        self.device.set_vq_address(i, desc, avail, used)
        ring = self.vrings.get(i)
        ring.log = addr.log
        ring.log_guest_addr = addr.log_guest_addr
        if addr.log:
            self.journal.record("vq.log", vq=i, log_guest_addr=addr.log_guest_addr)

    def _set_vring_base(self, msg: Message) -> None:
        st = m.VringState.unpack(msg.payload)
        i = self._vring_index(st.index)
        if getattr(self.device.vqs[i], "packed", False):
            pb = m.PackedVringBase.decode(st.num)
            num = self.device.vqs[i].num
            if num and (pb.last_avail_idx >= num or pb.used_idx >= num):
                raise ProtocolError("bad-base", f"vring {i}: packed base {st.num:#x}, size {num}")
            state = VqState(pb.last_avail_idx, pb.used_idx, pb.avail_wrap, pb.used_wrap)
            self.device.set_vq_state(i, state)
            return
        if st.num > 0xFFFF:
            raise ProtocolError("bad-base", f"vring {i}: base {st.num:#x} does not fit a u16")
        self.device.set_vq_state(i, VqState(last_avail_idx=st.num))

    def _get_vring_base(self, msg: Message) -> bytes:
        st = m.VringState.unpack(msg.payload)
        i = self._vring_index(st.index)
        if not self.device.vqs[i].configured:
            raise ProtocolError("not-configured", f"GET_VRING_BASE of vring {i}, never set up")
        state = self.vrings.stop(i)
        if getattr(self.device.vqs[i], "packed", False):
            pb = m.PackedVringBase(
                state.last_avail_idx, state.avail_wrap, state.used_idx, state.used_wrap
            )
            return m.VringState(i, pb.encode()).pack()
        return m.VringState(i, state.last_avail_idx).pack()

    def _set_vring_file(self, msg: Message) -> None:
        request = R(msg.header.request)
        value = self._u64(msg)
        vf = m.VringFile.from_u64(value)
        i = self._vring_index(vf.index)
        if value & ~(m.VRING_IDX_MASK | m.VRING_NOFD_MASK):
            raise ProtocolError("bad-payload", f"{request.name} payload {value:#x}")
        if vf.nofd and msg.fds:
            raise ProtocolError("fd-count", f"{request.name} has the no-fd bit and an fd")
        if not vf.nofd and not msg.fds:
            raise ProtocolError("fd-count", f"{request.name} for vring {i} without an fd")
        fd: int | None = None
        if not vf.nofd:
            check_eventfd(msg.fds[0], request.name)
            fd = msg.take_fd()
        if request is R.SET_VRING_KICK:
            self.vrings.set_kick(i, fd)
        elif request is R.SET_VRING_CALL:
            self.vrings.set_call(i, fd)
        else:
            self.vrings.set_err(i, fd)

    def _set_vring_enable(self, msg: Message) -> None:
        st = m.VringState.unpack(msg.payload)
        i = self._vring_index(st.index)
        if st.num > 1:
            raise ProtocolError("bad-payload", f"SET_VRING_ENABLE vring {i} with {st.num}")
        self.device.set_vq_ready(i, bool(st.num))

    def _set_vring_endian(self, msg: Message) -> None:
        raise ProtocolError("unsupported", "cross-endian rings are not supported (no CROSS_ENDIAN)")

    # -- IOTLB ------------------------------------------------------------------------------
    def _iotlb_msg(self, msg: Message) -> None:
        t = m.IotlbMsg.unpack(msg.payload)
        if not self.iommu:
            raise ProtocolError("no-iommu", "IOTLB_MSG without ACCESS_PLATFORM negotiated")
        if t.size == 0:
            raise ProtocolError("bad-iotlb", f"IOTLB message type {t.type} with size 0")
        if t.iova + t.size > _U64:
            raise ProtocolError(
                "bad-iotlb", f"iova {t.iova:#x} + size {t.size:#x} overflows 64 bits"
            )
        dev = self.device
        if t.type == m.IotlbType.UPDATE:
            if t.uaddr + t.size > _U64:
                raise ProtocolError("bad-iotlb", f"uaddr {t.uaddr:#x} + size overflows 64 bits")
            if not 1 <= t.perm <= 3:
                raise ProtocolError("bad-iotlb", f"UPDATE with permission {t.perm}")
            try:
                dev.host.lookup(t.uaddr, t.size)
            except TranslationError as e:
                raise ProtocolError(
                    "unmapped", f"UPDATE uaddr {t.uaddr:#x}+{t.size:#x} outside host memory: {e}"
                ) from None
            dev.dma_map(t.iova, t.size, t.uaddr, Perm(t.perm))
            self.journal.record(
                "iotlb.update", iova=t.iova, size=t.size, uaddr=t.uaddr, perm=t.perm
            )
        elif t.type == m.IotlbType.INVALIDATE:
            dev.dma_unmap(t.iova, t.size)
            self.journal.record("iotlb.invalidate", iova=t.iova, size=t.size)
        else:
            raise ProtocolError("bad-iotlb", f"IOTLB message type {t.type} from the front-end")
        dev.iotlb_updated()

    def _set_backend_req_fd(self, msg: Message) -> None:
        fd = msg.take_fd()
        if not self.has(PF.BACKEND_REQ):
            os.close(fd)
            raise ProtocolError("not-negotiated", "SET_BACKEND_REQ_FD without BACKEND_REQ")
        channel = BackendChannel(
            fd,
            self.loop,
            self.journal,
            reply_ack=self.has(PF.REPLY_ACK),
            on_closed=self._backend_closed,
            on_refused=self.device.iotlb_miss_refused,
        )
        old, self.backend = self.backend, channel
        if old is not None:
            old.close()

    def _backend_closed(self, channel: BackendChannel) -> None:
        if self.backend is channel:
            self.backend = None

    # -- net --------------------------------------------------------------------------------
    def _send_rarp(self, msg: Message) -> None:
        mac = msg.payload[:6]
        self.journal.record("net.rarp", mac=":".join(f"{b:02x}" for b in mac))
        if self.on_rarp is not None:
            self.on_rarp(bytes(mac))

    def _net_set_mtu(self, msg: Message) -> None:
        mtu = self._u64(msg)
        if not 68 <= mtu <= 0xFFFF:
            raise ProtocolError("bad-mtu", f"MTU {mtu} outside 68..65535")
        self.mtu = mtu
        self.journal.record("net.mtu", mtu=mtu)
        if self.on_mtu is not None:
            self.on_mtu(mtu)

    # -- config / status --------------------------------------------------------------------
    def _config_msg(self, msg: Message) -> m.ConfigMsg:
        if len(msg.payload) < m.CONFIG_HEADER.size:
            raise ProtocolError("bad-size", f"config message of {len(msg.payload)} bytes")
        cfg = m.ConfigMsg.unpack(msg.payload)
        if cfg.size > m.CONFIG_MAX_SIZE or cfg.offset + cfg.size > m.CONFIG_MAX_SIZE:
            raise ProtocolError(
                "bad-config", f"config access {cfg.offset}+{cfg.size} beyond {m.CONFIG_MAX_SIZE}"
            )
        if len(msg.payload) != m.CONFIG_HEADER.size + cfg.size:
            raise ProtocolError(
                "bad-size", f"config message of {len(msg.payload)} bytes for {cfg.size} bytes"
            )
        return cfg

    def _get_config(self, msg: Message) -> bytes:
        cfg = self._config_msg(msg)
        data = self.device.get_config(cfg.offset, cfg.size)
        return m.ConfigMsg(cfg.offset, cfg.size, cfg.flags, data).pack()

    def _set_config(self, msg: Message) -> None:
        cfg = self._config_msg(msg)
        self.device.set_config(cfg.offset, cfg.data)

    def _get_status(self, msg: Message) -> bytes:
        return m.pack_u64(self.device.get_status())

    def _set_status(self, msg: Message) -> None:
        status = self._u64(msg)
        if status > 0xFF:
            raise ProtocolError("bad-status", f"status {status:#x} does not fit a byte")
        self.device.set_status(status)
