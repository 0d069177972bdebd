"""The kernel side of VDUSE behind one thin interface, so the transport can run in-process
against a fake (unit tests, fuzzing misbehaving kernels) or against the real thing.

:class:`VduseKernel` is the interface: every ioctl on ``/dev/vduse/control`` and
``/dev/vduse/NAME``, read/write of the message fd, the mmap of an IOTLB fd, and the vDPA bus
side (``vdpa dev add/del`` through iproute2, the ``/dev/vhost-vdpa-N`` the device got).
Errors are ``OSError`` with the kernel's errno. :class:`LinuxVduse` implements it with
``fcntl.ioctl``, ``os.read``/``os.write`` and ``mmap``; byte layouts come from
:mod:`backends.vduse.uapi` only.

Nothing here blocks on a kernel fd: the message fd is opened ``O_NONBLOCK`` and
:meth:`VduseKernel.read_request` returns ``None`` when nothing is queued. ``vdpa`` commands
run as child processes the caller polls (the kernel may send messages while one runs).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import mmap
import os
import subprocess
from pathlib import Path
from typing import Protocol

from . import uapi
from .uapi import IotlbEntry, VqInfo

__all__ = ["LinuxVduse", "VdpaCommand", "VduseKernel", "perm_to_prot"]


class VdpaCommand(Protocol):
    """A running ``vdpa`` command: poll it; once done, its output says what happened."""

    def poll(self) -> int | None: ...
    def output(self) -> str: ...
    def kill(self) -> None: ...


class VduseKernel(Protocol):
    """What the VDUSE transport needs from the kernel (module doc)."""

    # /dev/vduse/control
    def get_api_version(self) -> int: ...
    def set_api_version(self, version: int) -> None: ...
    def create_dev(self, config: bytes) -> None: ...
    def destroy_dev(self, name: str) -> None: ...

    # /dev/vduse/NAME
    def open_dev(self, name: str) -> int:
        """Open the device's message fd (non-blocking); returns it for the event loop."""
        ...

    def close_dev(self) -> None: ...
    def close(self) -> None:
        """Close every fd still open (the device's and the control fd)."""
        ...

    def read_request(self) -> bytes | None:
        """One request (``uapi.MESSAGE_SIZE`` bytes), or None when none is queued."""
        ...

    def write_response(self, data: bytes) -> None: ...
    def vq_setup(self, index: int, max_size: int) -> None: ...
    def vq_get_info(self, index: int) -> VqInfo: ...
    def vq_setup_kickfd(self, index: int, fd: int) -> None: ...
    def vq_inject_irq(self, index: int) -> None: ...
    def get_features(self) -> int: ...
    def set_config(self, offset: int, data: bytes) -> None: ...
    def inject_config_irq(self) -> None: ...
    def iotlb_get_fd(self, start: int, last: int) -> tuple[IotlbEntry, int]:
        """The first IOTLB entry overlapping [start, last] and a new fd for its memory (the
        caller closes it). OSError EINVAL when no entry overlaps."""
        ...

    def map_fd(self, fd: int, offset: int, length: int, perm: int) -> mmap.mmap:
        """mmap ``length`` bytes of ``fd`` from ``offset`` (page-aligned), shared, with the
        protection ``perm`` allows."""
        ...

    # the vDPA bus
    def vdpa_dev_add(self, name: str) -> VdpaCommand: ...
    def vdpa_dev_del(self, name: str) -> VdpaCommand: ...
    def vhost_vdpa_path(self, name: str) -> str | None:
        """``/dev/vhost-vdpa-N`` once the vhost_vdpa driver bound the device, else None."""
        ...


def perm_to_prot(perm: int) -> int:
    """mmap protection for a VDUSE access permission. The kernel hands out the fd with the
    open mode of the permission (O_RDONLY for RO), so RO must map read-only; a write-only
    mapping cannot exist (mmap needs read access), so WO maps like RW and fails the same way
    the kernel would (EACCES) when the fd is not readable."""
    if perm == uapi.VDUSE_ACCESS_RO:
        return mmap.PROT_READ
    if perm in (uapi.VDUSE_ACCESS_WO, uapi.VDUSE_ACCESS_RW):
        return mmap.PROT_READ | mmap.PROT_WRITE
    raise OSError(errno.EINVAL, f"bad VDUSE access permission {perm}")


class _Process:
    """A ``vdpa`` child process: stdout+stderr to a pipe read once it has exited."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            self._error = ""
        except OSError as e:
            self.proc = None
            self._error = f"cannot run {' '.join(args)}: {e}"
        self._output: str | None = None

    def poll(self) -> int | None:
        if self.proc is None:
            return 127
        return self.proc.poll()

    def output(self) -> str:
        if self.proc is None:
            return self._error
        if self._output is None:
            if self.proc.poll() is None:
                return ""
            assert self.proc.stdout is not None
            self._output = self.proc.stdout.read().decode(errors="replace").strip()
            self.proc.stdout.close()
        return self._output

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class LinuxVduse:
    """:class:`VduseKernel` on the running kernel (needs the vduse and vhost_vdpa modules,
    CAP_NET_ADMIN for a net device, and iproute2's ``vdpa``)."""

    def __init__(
        self,
        control_path: str = uapi.CONTROL_PATH,
        dev_dir: str = uapi.DEV_DIR,
        vdpa_tool: str = "vdpa",
        sysfs: str = "/sys/bus/vdpa/devices",
    ) -> None:
        self.control_path = control_path
        self.dev_dir = dev_dir
        self.vdpa_tool = vdpa_tool
        self.sysfs = sysfs
        self._control = -1
        self._dev = -1

    # -- helpers -------------------------------------------------------------------------------
    def _control_fd(self) -> int:
        if self._control < 0:
            self._control = os.open(self.control_path, os.O_RDWR | os.O_CLOEXEC)
        return self._control

    def _dev_fd(self) -> int:
        if self._dev < 0:
            raise OSError(errno.EBADF, "VDUSE device is not open")
        return self._dev

    # -- control -------------------------------------------------------------------------------
    def get_api_version(self) -> int:
        buf = bytearray(uapi.U64.size)
        fcntl.ioctl(self._control_fd(), uapi.VDUSE_GET_API_VERSION, buf, True)
        return int(uapi.U64.unpack(buf)[0])

    def set_api_version(self, version: int) -> None:
        fcntl.ioctl(self._control_fd(), uapi.VDUSE_SET_API_VERSION, uapi.U64.pack(version))

    def create_dev(self, config: bytes) -> None:
        # The ioctl's size field covers the fixed part; the kernel reads config_size more.
        buf = bytearray(config)
        fcntl.ioctl(self._control_fd(), uapi.VDUSE_CREATE_DEV, buf, True)

    def destroy_dev(self, name: str) -> None:
        fcntl.ioctl(self._control_fd(), uapi.VDUSE_DESTROY_DEV, uapi.pack_name(name))

    # -- the device ----------------------------------------------------------------------------
    def open_dev(self, name: str) -> int:
        path = os.path.join(self.dev_dir, name)
        self._dev = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return self._dev

    def close_dev(self) -> None:
        if self._dev >= 0:
            os.close(self._dev)
            self._dev = -1

    def close(self) -> None:
        self.close_dev()
        if self._control >= 0:
            os.close(self._control)
            self._control = -1

    def read_request(self) -> bytes | None:
        try:
            return os.read(self._dev_fd(), uapi.MESSAGE_SIZE)
        except BlockingIOError:
            return None

    def write_response(self, data: bytes) -> None:
        n = os.write(self._dev_fd(), data)
        if n != len(data):
            raise OSError(errno.EIO, f"short write of a VDUSE response: {n} of {len(data)}")

    def vq_setup(self, index: int, max_size: int) -> None:
        fcntl.ioctl(self._dev_fd(), uapi.VDUSE_VQ_SETUP, uapi.VQ_CONFIG.pack(index, max_size))

    def vq_get_info(self, index: int) -> VqInfo:
        buf = bytearray(uapi.pack_vq_info_query(index))
        fcntl.ioctl(self._dev_fd(), uapi.VDUSE_VQ_GET_INFO, buf, True)
        return VqInfo.unpack(bytes(buf))

    def vq_setup_kickfd(self, index: int, fd: int) -> None:
        fcntl.ioctl(self._dev_fd(), uapi.VDUSE_VQ_SETUP_KICKFD, uapi.VQ_EVENTFD.pack(index, fd))

    def vq_inject_irq(self, index: int) -> None:
        fcntl.ioctl(self._dev_fd(), uapi.VDUSE_VQ_INJECT_IRQ, uapi.U32.pack(index))

    def get_features(self) -> int:
        buf = bytearray(uapi.U64.size)
        fcntl.ioctl(self._dev_fd(), uapi.VDUSE_DEV_GET_FEATURES, buf, True)
        return int(uapi.U64.unpack(buf)[0])

    def set_config(self, offset: int, data: bytes) -> None:
        arg = uapi.U32.pack(offset) + uapi.U32.pack(len(data)) + data
        fcntl.ioctl(self._dev_fd(), uapi.VDUSE_DEV_SET_CONFIG, arg)

    def inject_config_irq(self) -> None:
        fcntl.ioctl(self._dev_fd(), uapi.VDUSE_DEV_INJECT_CONFIG_IRQ, 0)

    def iotlb_get_fd(self, start: int, last: int) -> tuple[IotlbEntry, int]:
        buf = bytearray(IotlbEntry(0, start, last, 0).pack())
        fd = fcntl.ioctl(self._dev_fd(), uapi.VDUSE_IOTLB_GET_FD, buf, True)
        return IotlbEntry.unpack(bytes(buf)), int(fd)

    def map_fd(self, fd: int, offset: int, length: int, perm: int) -> mmap.mmap:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=perm_to_prot(perm), offset=offset)

    # -- the vDPA bus --------------------------------------------------------------------------
    def vdpa_dev_add(self, name: str) -> VdpaCommand:
        return _Process([self.vdpa_tool, "dev", "add", "name", name, "mgmtdev", "vduse"])

    def vdpa_dev_del(self, name: str) -> VdpaCommand:
        return _Process([self.vdpa_tool, "dev", "del", name])

    def vhost_vdpa_path(self, name: str) -> str | None:
        for entry in sorted(glob.glob(os.path.join(self.sysfs, name, "vhost-vdpa-*"))):
            dev = Path("/dev") / Path(entry).name
            if dev.exists():
                return str(dev)
        return None
