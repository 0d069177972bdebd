"""An in-process fake of the kernel side of VDUSE (:class:`~.kernel.VduseKernel`).

It behaves like ``drivers/vdpa/vdpa_user/vduse_dev.c`` where the transport can tell the
difference, and can be told to misbehave: requests of any type and content, IOTLB entries that
cannot be fetched or mapped, ``vdpa dev add`` failing, a name that is taken. Used by the unit
tests and meant for in-process fuzzing of kernel messages.

Guest memory is real: :meth:`FakeVduse.add_memory` makes a memfd, and
:meth:`FakeVduse.set_map` installs IOTLB entries over it and queues UPDATE_IOTLB [0, 2^64-1],
as ``vduse_vdpa_set_map`` does. The message fd is a pipe with one byte per queued request, so
the event loop sees it readable exactly while a request waits. Kicks are real eventfd writes
(dropped while the queue is not ready, as ``vduse_vq_kick`` does). Requests read but not yet
answered go back to the front of the queue when the message fd is closed, as
``vduse_dev_release`` does, so a process that re-attaches reads them again.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field

from . import uapi
from .kernel import perm_to_prot
from .uapi import IotlbEntry, Request, VqInfo

__all__ = ["FakeCommand", "FakeMemory", "FakeVduse", "FakeVq"]

ADDR_MAX = (1 << 64) - 1


def _request_id(raw: bytes) -> int | None:
    """struct vduse_dev_request's request_id (after the u32 type), if the bytes have one."""
    return int.from_bytes(raw[4:8], "little") if len(raw) >= 8 else None


@dataclass
class FakeCommand:
    """A finished ``vdpa`` command."""

    status: int = 0
    text: str = ""

    def poll(self) -> int | None:
        return self.status

    def output(self) -> str:
        return self.text

    def kill(self) -> None:
        pass


@dataclass
class FakeMemory:
    """One memfd of "guest RAM" and a mapping of it for the test's (driver's) side."""

    fd: int
    size: int
    buf: mmap.mmap

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            pass
        os.close(self.fd)


@dataclass
class FakeVq:
    num_max: int = 0
    num: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    state: bytes = bytes(8)
    ready: bool = False
    kickfd: int = -1
    kicked: bool = False
    irqs: int = 0


@dataclass
class FakeVduse:
    """The fake kernel. Knobs: ``taken_names``, ``add_status``/``add_output`` (vdpa dev add
    result), ``get_fd_errno`` (IOTLB_GET_FD fails), ``map_errno`` (mmap fails),
    ``irq_errno``, ``bad_entries`` (IOTLB_GET_FD returns these verbatim)."""

    taken_names: set[str] = field(default_factory=set)
    api_version: int = 0
    add_status: int = 0
    add_output: str = ""
    del_status: int = 0
    get_fd_errno: int | None = None
    map_errno: int | None = None
    irq_errno: int | None = None
    path: str = "/dev/vhost-vdpa-0"
    # state
    name: str | None = None
    features: int = 0
    config: bytes = b""
    vq_num: int = 0
    driver_features: int = 0
    vqs: list[FakeVq] = field(default_factory=list)
    attached: bool = False
    destroyed: bool = False
    opened: bool = False
    requests: list[bytes] = field(default_factory=list)
    #: read by the device, not answered yet (the kernel's recv_list)
    unanswered: list[bytes] = field(default_factory=list)
    responses: list[bytes] = field(default_factory=list)
    iotlb: list[tuple[IotlbEntry, int]] = field(default_factory=list)
    memories: list[FakeMemory] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    _next_id: int = 0
    _pipe: tuple[int, int] = (-1, -1)

    # -- control ---------------------------------------------------------------------------
    def get_api_version(self) -> int:
        return self.api_version

    def set_api_version(self, version: int) -> None:
        if version > uapi.VDUSE_API_VERSION:
            raise OSError(errno.EINVAL, "api version")
        self.api_version = version

    def create_dev(self, config: bytes) -> None:
        name, _vendor, device_id, features, vq_num, _align, cfg = uapi.unpack_dev_config(config)
        if name in self.taken_names or self.name == name:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        if not features >> 33 & 1 or (device_id == 1 and features >> 17 & 1):
            raise OSError(errno.EINVAL, "features refused")  # vduse features_is_valid()
        if device_id == 1 and not features >> 32 & 1:
            raise OSError(errno.EINVAL, "VERSION_1 missing")
        self.name, self.features, self.vq_num, self.config = name, features, vq_num, cfg
        self.vqs = [FakeVq() for _ in range(vq_num)]
        self.calls.append("create")

    def destroy_dev(self, name: str) -> None:
        if name != self.name:
            raise OSError(errno.EINVAL, "no such device")
        if self.attached or self.opened:
            raise OSError(errno.EBUSY, "device busy")
        self.destroyed = True
        self.name = None
        self.calls.append("destroy")

    # -- the device ------------------------------------------------------------------------
    def open_dev(self, name: str) -> int:
        if name != self.name:
            raise OSError(errno.ENOENT, f"/dev/vduse/{name}")
        if self.opened:
            raise OSError(errno.EBUSY, "already open")
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (r, w)
        self.opened = True
        for _ in self.requests:
            os.write(w, b"x")
        return r

    def close_dev(self) -> None:
        if self.opened:
            # vduse_dev_release: "the inflight messages can processed after reconnection"
            self.requests[:0] = self.unanswered
            self.unanswered = []
            for fd in self._pipe:
                os.close(fd)
            self._pipe = (-1, -1)
            self.opened = False
            self.calls.append("close")

    def read_request(self) -> bytes | None:
        if not self.requests:
            return None
        os.read(self._pipe[0], 1)
        req = self.requests.pop(0)
        self.unanswered.append(req)
        return req

    def write_response(self, data: bytes) -> None:
        if len(data) != uapi.MESSAGE_SIZE:
            raise OSError(errno.EINVAL, "response size")
        rid = uapi.unpack_response(data)[0]
        # (the kernel answers ENOENT for an unknown id; kept lenient: tests send raw junk)
        self.unanswered = [r for r in self.unanswered if _request_id(r) != rid]
        self.responses.append(bytes(data))

    def _vq(self, index: int) -> FakeVq:
        if not 0 <= index < len(self.vqs):
            raise OSError(errno.EINVAL, f"vq {index}")
        return self.vqs[index]

    def vq_setup(self, index: int, max_size: int) -> None:
        self._vq(index).num_max = max_size

    def vq_get_info(self, index: int) -> VqInfo:
        q = self._vq(index)
        return VqInfo(index, q.num, q.desc, q.driver, q.device, q.state, q.ready)

    def vq_setup_kickfd(self, index: int, fd: int) -> None:
        q = self._vq(index)
        q.kickfd = fd
        if q.ready and q.kicked:
            os.eventfd_write(fd, 1)
            q.kicked = False

    def vq_inject_irq(self, index: int) -> None:
        q = self._vq(index)
        if self.irq_errno is not None:
            raise OSError(self.irq_errno, os.strerror(self.irq_errno))
        q.irqs += 1

    def get_features(self) -> int:
        return self.driver_features

    def set_config(self, offset: int, data: bytes) -> None:
        cfg = bytearray(self.config)
        cfg[offset : offset + len(data)] = data
        self.config = bytes(cfg)

    def inject_config_irq(self) -> None:
        self.calls.append("config_irq")

    def iotlb_get_fd(self, start: int, last: int) -> tuple[IotlbEntry, int]:
        if self.get_fd_errno is not None:
            raise OSError(self.get_fd_errno, os.strerror(self.get_fd_errno))
        for entry, fd in sorted(self.iotlb, key=lambda t: t[0].start):
            if entry.last >= start and entry.start <= last:
                return entry, os.dup(fd)
        raise OSError(errno.EINVAL, "no IOTLB entry overlaps")

    def map_fd(self, fd: int, offset: int, length: int, perm: int) -> mmap.mmap:
        if self.map_errno is not None:
            raise OSError(self.map_errno, os.strerror(self.map_errno))
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=perm_to_prot(perm), offset=offset)

    # -- the vDPA bus ----------------------------------------------------------------------
    def vdpa_dev_add(self, name: str) -> FakeCommand:
        if self.add_status == 0:
            self.attached = True
        return FakeCommand(self.add_status, self.add_output)

    def vdpa_dev_del(self, name: str) -> FakeCommand:
        if self.del_status == 0:
            self.attached = False
        return FakeCommand(self.del_status, "" if self.del_status == 0 else "vdpa: del failed")

    def vhost_vdpa_path(self, name: str) -> str | None:
        return self.path if self.attached and name == self.name else None

    # -- driving it (what vhost_vdpa / QEMU would do) --------------------------------------
    def queue(self, data: bytes) -> None:
        """Queue a raw request for the device to read."""
        self.requests.append(bytes(data))
        if self.opened:
            os.write(self._pipe[1], b"x")

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send(self, req: Request) -> int:
        self.queue(req.pack())
        return req.request_id

    def set_status(self, status: int) -> int:
        return self.send(uapi.set_status_request(self.next_id(), status))

    def get_vq_state(self, index: int) -> int:
        return self.send(uapi.get_vq_state_request(self.next_id(), index))

    def update_iotlb(self, start: int = 0, last: int = ADDR_MAX) -> int:
        return self.send(uapi.update_iotlb_request(self.next_id(), start, last))

    def response(self, request_id: int) -> tuple[int, bytes] | None:
        """(result, union) of the reply to ``request_id``, if it came."""
        for data in self.responses:
            rid, result, union = uapi.unpack_response(data)
            if rid == request_id:
                return result, union
        return None

    def add_memory(self, size: int) -> FakeMemory:
        fd = os.memfd_create("fake-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mem = FakeMemory(fd, size, mmap.mmap(fd, size, flags=mmap.MAP_SHARED))
        self.memories.append(mem)
        return mem

    def set_map(self, entries: list[tuple[int, int, FakeMemory, int, int]]) -> int:
        """Replace the IOTLB with (iova, size, memory, offset, perm) entries and queue
        UPDATE_IOTLB [0, 2^64-1]; returns the request id."""
        self.iotlb = [
            (IotlbEntry(offset, iova, iova + size - 1, perm), mem.fd)
            for iova, size, mem, offset, perm in entries
        ]
        return self.update_iotlb()

    def setup_vq(
        self, index: int, num: int, desc: int, driver: int, device: int, avail: int = 0
    ) -> None:
        """What SET_VRING_NUM / ADDR / BASE leave in the kernel's vq (split layout)."""
        q = self._vq(index)
        q.num, q.desc, q.driver, q.device = num, desc, driver, device
        q.state = uapi.VQ_STATE_SPLIT.pack(avail & 0xFFFF).ljust(8, b"\0")

    def set_ready(self, index: int, ready: bool = True) -> None:
        self._vq(index).ready = ready

    def kick(self, index: int, force: bool = False) -> bool:
        """The driver kicks ``index``: dropped unless ready (or ``force``), as the kernel does;
        without a kick fd the kick is remembered. True when the eventfd was written."""
        q = self._vq(index)
        if not (q.ready or force):
            return False
        if q.kickfd < 0:
            q.kicked = True
            return False
        os.eventfd_write(q.kickfd, 1)
        return True

    def reset(self) -> None:
        """vduse_dev_reset after the SET_STATUS 0 reply: queues and kick fds forgotten."""
        self.driver_features = 0
        self.vqs = [FakeVq(num_max=q.num_max) for q in self.vqs]

    def close(self) -> None:
        self.close_dev()
        self.calls.append("kernel_close")

    def release(self) -> None:
        """Drop the fake's own resources (guest memory, pipes)."""
        self.close_dev()
        self.iotlb = []  # the memories own the fds
        for mem in self.memories:
            mem.close()
        self.memories = []
