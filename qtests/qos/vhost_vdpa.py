"""A minimal vhost-vdpa front-end: ioctls on ``/dev/vhost-vdpa-N`` from the test itself.

QEMU 10 never asks a device without VHOST_BACKEND_F_SUSPEND (VDUSE has none) for its ring
state, so the kernel's GET_VQ_STATE path to a VDUSE device is reached only by a front-end that
issues VHOST_GET_VRING_BASE itself. This one does, and a few other control ioctls; layouts and
numbers from Linux ``include/uapi/linux/vhost.h`` (``_IOC`` computed here, checked against the
C header when it was written). Opening the device resets it; closing it resets it again.
"""

from __future__ import annotations

import fcntl
import os
import struct

VHOST_VIRTIO = 0xAF
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")
_U8 = struct.Struct("=B")
VRING_STATE = struct.Struct("=II")  # struct vhost_vring_state: index, num


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | VHOST_VIRTIO << 8 | nr


VHOST_GET_FEATURES = _ioc(2, 0x00, _U64.size)
VHOST_SET_FEATURES = _ioc(1, 0x00, _U64.size)
VHOST_SET_OWNER = _ioc(0, 0x01, 0)
VHOST_SET_VRING_NUM = _ioc(1, 0x10, VRING_STATE.size)
VHOST_SET_VRING_BASE = _ioc(1, 0x12, VRING_STATE.size)
VHOST_GET_VRING_BASE = _ioc(3, 0x12, VRING_STATE.size)
VHOST_VDPA_GET_DEVICE_ID = _ioc(2, 0x70, _U32.size)
VHOST_VDPA_GET_STATUS = _ioc(2, 0x71, _U8.size)
VHOST_VDPA_SET_STATUS = _ioc(1, 0x72, _U8.size)

assert (VHOST_SET_OWNER, VHOST_GET_VRING_BASE, VHOST_VDPA_SET_STATUS) == (
    0xAF01,
    0xC008AF12,
    0x4001AF72,
)


class VhostVdpa:
    """One open ``/dev/vhost-vdpa-N`` (the kernel allows a single opener: not while QEMU
    has it). Use as a context manager; every call raises OSError with the kernel's errno."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VhostVdpa:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rw(self, request: int, data: bytes) -> bytes:
        buf = bytearray(data)
        fcntl.ioctl(self.fd, request, buf, True)
        return bytes(buf)

    def set_owner(self) -> None:
        fcntl.ioctl(self.fd, VHOST_SET_OWNER, 0)

    def device_id(self) -> int:
        return int(_U32.unpack(self._rw(VHOST_VDPA_GET_DEVICE_ID, bytes(4)))[0])

    def get_features(self) -> int:
        return int(_U64.unpack(self._rw(VHOST_GET_FEATURES, bytes(8)))[0])

    def set_features(self, features: int) -> None:
        fcntl.ioctl(self.fd, VHOST_SET_FEATURES, _U64.pack(features))

    def get_status(self) -> int:
        return int(_U8.unpack(self._rw(VHOST_VDPA_GET_STATUS, bytes(1)))[0])

    def set_status(self, status: int) -> None:
        fcntl.ioctl(self.fd, VHOST_VDPA_SET_STATUS, _U8.pack(status))

    def set_vring_num(self, index: int, num: int) -> None:
        fcntl.ioctl(self.fd, VHOST_SET_VRING_NUM, VRING_STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        fcntl.ioctl(self.fd, VHOST_SET_VRING_BASE, VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        """VHOST_GET_VRING_BASE: the kernel asks the device (VDUSE: GET_VQ_STATE)."""
        return int(
            VRING_STATE.unpack(self._rw(VHOST_GET_VRING_BASE, VRING_STATE.pack(index, 0)))[1]
        )
