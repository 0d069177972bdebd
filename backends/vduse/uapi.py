"""VDUSE wire format: every struct layout, ioctl number and message type.

The one place that knows the byte layouts of Linux ``include/uapi/linux/vduse.h`` (API
version 0, Linux 6.12). Ioctl numbers are computed from the ``_IOC`` macros of
``include/uapi/asm-generic/ioctl.h`` (x86: 8-bit nr, 8-bit type, 14-bit size, 2-bit dir), never
copied as magic numbers. Everything is native-endian (little-endian on the machines we run).

Messages on ``/dev/vduse/NAME``: read(2) returns one 152-byte ``struct vduse_dev_request``,
write(2) takes one 152-byte ``struct vduse_dev_response``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# -- _IOC (include/uapi/asm-generic/ioctl.h) --------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        direction << _IOC_DIRSHIFT
        | typ << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
        | size << _IOC_SIZESHIFT
    )


def _io(typ: int, nr: int) -> int:
    return _ioc(_IOC_NONE, typ, nr, 0)


def _ior(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, typ, nr, size)


def _iow(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, typ, nr, size)


def _iowr(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, size)


# -- constants ---------------------------------------------------------------------------------
VDUSE_BASE = 0x81
VDUSE_API_VERSION = 0
VDUSE_NAME_MAX = 256
VIRTIO_ID_NET = 1
VDUSE_ACCESS_RO = 0x1
VDUSE_ACCESS_WO = 0x2
VDUSE_ACCESS_RW = 0x3
VDUSE_EVENTFD_DEASSIGN = -1
VDUSE_REQ_RESULT_OK = 0x00
VDUSE_REQ_RESULT_FAILED = 0x01
CONTROL_PATH = "/dev/vduse/control"
DEV_DIR = "/dev/vduse"

# -- struct layouts ----------------------------------------------------------------------------
#: struct vduse_dev_config: name[256], vendor_id, device_id, features, vq_num, vq_align,
#: reserved[13], config_size; then config_size bytes of config space (flexible array).
DEV_CONFIG = struct.Struct("=256sIIQII52xI")
#: struct vduse_iotlb_entry: offset, start, last, perm (+ 7 bytes tail padding: 32).
IOTLB_ENTRY = struct.Struct("=QQQB7x")
#: struct vduse_vq_config: index, max_size, reserved[13] (u16).
VQ_CONFIG = struct.Struct("=IH26x")
#: struct vduse_vq_info: index, num, desc_addr, driver_addr, device_addr, the state union
#: (8 bytes: split avail_index, or packed 4 x u16), ready (+ 7 bytes padding: 48).
VQ_INFO = struct.Struct("=IIQQQ8sB7x")
#: struct vduse_vq_eventfd: index, fd.
VQ_EVENTFD = struct.Struct("=Ii")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
#: The vq state unions: split ``avail_index``; packed ``last_avail_counter,
#: last_avail_idx, last_used_counter, last_used_idx``.
VQ_STATE_SPLIT = struct.Struct("=H")
VQ_STATE_PACKED = struct.Struct("=HHHH")
#: struct vduse_dev_request: type, request_id, reserved[4], union of 128 bytes.
REQUEST = struct.Struct("=II16x128s")
#: struct vduse_dev_response: request_id, result, reserved[4], union of 128 bytes.
RESPONSE = struct.Struct("=II16x128s")
MESSAGE_SIZE = 152
UNION_SIZE = 128
#: the union members: vq_state (u32 index + 8-byte state union), status (u8), iova range
REQ_VQ_STATE = struct.Struct("=I8s")
REQ_STATUS = struct.Struct("=B")
REQ_IOVA = struct.Struct("=QQ")

assert DEV_CONFIG.size == 336
assert IOTLB_ENTRY.size == 32
assert VQ_CONFIG.size == 32
assert VQ_INFO.size == 48
assert VQ_EVENTFD.size == 8
assert REQUEST.size == RESPONSE.size == MESSAGE_SIZE

# -- ioctls ------------------------------------------------------------------------------------
# /dev/vduse/control
VDUSE_GET_API_VERSION = _ior(VDUSE_BASE, 0x00, U64.size)
VDUSE_SET_API_VERSION = _iow(VDUSE_BASE, 0x01, U64.size)
VDUSE_CREATE_DEV = _iow(VDUSE_BASE, 0x02, DEV_CONFIG.size)
VDUSE_DESTROY_DEV = _iow(VDUSE_BASE, 0x03, VDUSE_NAME_MAX)
# /dev/vduse/NAME
VDUSE_IOTLB_GET_FD = _iowr(VDUSE_BASE, 0x10, IOTLB_ENTRY.size)
VDUSE_DEV_GET_FEATURES = _ior(VDUSE_BASE, 0x11, U64.size)
VDUSE_DEV_SET_CONFIG = _iow(VDUSE_BASE, 0x12, 8)  # struct vduse_config_data header
VDUSE_DEV_INJECT_CONFIG_IRQ = _io(VDUSE_BASE, 0x13)
VDUSE_VQ_SETUP = _iow(VDUSE_BASE, 0x14, VQ_CONFIG.size)
VDUSE_VQ_GET_INFO = _iowr(VDUSE_BASE, 0x15, VQ_INFO.size)
VDUSE_VQ_SETUP_KICKFD = _iow(VDUSE_BASE, 0x16, VQ_EVENTFD.size)
VDUSE_VQ_INJECT_IRQ = _iow(VDUSE_BASE, 0x17, U32.size)


class RequestType(enum.IntEnum):
    """enum vduse_req_type."""

    GET_VQ_STATE = 0
    SET_STATUS = 1
    UPDATE_IOTLB = 2


def request_type_name(value: int) -> str:
    try:
        return RequestType(value).name
    except ValueError:
        return f"UNKNOWN({value})"


# -- codecs ------------------------------------------------------------------------------------
def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= VDUSE_NAME_MAX or b"\0" in raw or b"/" in raw:
        raise ValueError(
            f"VDUSE device name must be 1..{VDUSE_NAME_MAX - 1} bytes, no NUL or '/': {name!r}"
        )
    return raw


def pack_dev_config(
    name: str,
    *,
    device_id: int,
    features: int,
    vq_num: int,
    vq_align: int,
    config: bytes,
    vendor_id: int = 0,
) -> bytes:
    """CREATE_DEV's argument: struct vduse_dev_config followed by the config space."""
    return (
        DEV_CONFIG.pack(
            _name_bytes(name), vendor_id, device_id, features, vq_num, vq_align, len(config)
        )
        + config
    )


def unpack_dev_config(data: bytes) -> tuple[str, int, int, int, int, int, bytes]:
    """(name, vendor_id, device_id, features, vq_num, vq_align, config) of a CREATE_DEV
    argument (for fakes and tests)."""
    raw, vendor, device, features, vq_num, vq_align, size = DEV_CONFIG.unpack_from(data)
    name = raw.split(b"\0", 1)[0].decode(errors="replace")
    return name, vendor, device, features, vq_num, vq_align, bytes(data[336 : 336 + size])


def pack_name(name: str) -> bytes:
    """DESTROY_DEV's argument: char[VDUSE_NAME_MAX]."""
    return _name_bytes(name).ljust(VDUSE_NAME_MAX, b"\0")


@dataclass(frozen=True)
class IotlbEntry:
    """struct vduse_iotlb_entry: IOVA range [start, last] at ``offset`` of the returned fd."""

    offset: int
    start: int
    last: int
    perm: int

    @property
    def size(self) -> int:
        return self.last - self.start + 1

    def pack(self) -> bytes:
        return IOTLB_ENTRY.pack(self.offset, self.start, self.last, self.perm)

    @classmethod
    def unpack(cls, data: bytes) -> IotlbEntry:
        return cls(*IOTLB_ENTRY.unpack_from(data))


@dataclass(frozen=True)
class VqInfo:
    """struct vduse_vq_info. ``state`` is the raw 8-byte state union: :attr:`split_avail` is
    its split form, :attr:`packed` its packed form (last_avail_counter, last_avail_idx,
    last_used_counter, last_used_idx); the negotiated ring layout says which one is meant."""

    index: int
    num: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    state: bytes
    ready: bool

    @property
    def split_avail(self) -> int:
        return int(VQ_STATE_SPLIT.unpack_from(self.state)[0])

    @property
    def packed(self) -> tuple[int, int, int, int]:
        a, b, c, d = VQ_STATE_PACKED.unpack_from(self.state)
        return int(a), int(b), int(c), int(d)

    @classmethod
    def unpack(cls, data: bytes) -> VqInfo:
        index, num, desc, driver, device, state, ready = VQ_INFO.unpack_from(data)
        return cls(index, num, desc, driver, device, bytes(state), bool(ready))

    def pack(self) -> bytes:
        return VQ_INFO.pack(
            self.index,
            self.num,
            self.desc_addr,
            self.driver_addr,
            self.device_addr,
            self.state,
            int(self.ready),
        )


def pack_vq_info_query(index: int) -> bytes:
    return VQ_INFO.pack(index, 0, 0, 0, 0, bytes(8), 0)


@dataclass(frozen=True)
class Request:
    """One decoded struct vduse_dev_request. ``vq_index`` for GET_VQ_STATE, ``status`` for
    SET_STATUS, ``start``/``last`` for UPDATE_IOTLB; ``payload`` is the raw union."""

    type: int
    request_id: int
    payload: bytes

    @classmethod
    def unpack(cls, data: bytes) -> Request:
        if len(data) != MESSAGE_SIZE:
            raise ValueError(f"VDUSE request is {MESSAGE_SIZE} bytes, got {len(data)}")
        typ, rid, payload = REQUEST.unpack(data)
        return cls(typ, rid, payload)

    def pack(self) -> bytes:
        return REQUEST.pack(self.type, self.request_id, self.payload.ljust(UNION_SIZE, b"\0"))

    @property
    def type_name(self) -> str:
        return request_type_name(self.type)

    @property
    def vq_index(self) -> int:
        return int(REQ_VQ_STATE.unpack_from(self.payload)[0])

    @property
    def status(self) -> int:
        return int(REQ_STATUS.unpack_from(self.payload)[0])

    @property
    def iova_range(self) -> tuple[int, int]:
        start, last = REQ_IOVA.unpack_from(self.payload)
        return int(start), int(last)


def get_vq_state_request(request_id: int, index: int) -> Request:
    return Request(RequestType.GET_VQ_STATE, request_id, REQ_VQ_STATE.pack(index, bytes(8)))


def set_status_request(request_id: int, status: int) -> Request:
    return Request(RequestType.SET_STATUS, request_id, REQ_STATUS.pack(status))


def update_iotlb_request(request_id: int, start: int, last: int) -> Request:
    return Request(RequestType.UPDATE_IOTLB, request_id, REQ_IOVA.pack(start, last))


def pack_response(request_id: int, result: int, vq_state: bytes = b"") -> bytes:
    """struct vduse_dev_response; ``vq_state`` is a packed struct vduse_vq_state (or empty)."""
    return RESPONSE.pack(request_id, result, vq_state.ljust(UNION_SIZE, b"\0"))


def unpack_response(data: bytes) -> tuple[int, int, bytes]:
    """(request_id, result, union bytes) of a response (for fakes and tests)."""
    rid, result, union = RESPONSE.unpack(data)
    return rid, result, union


def pack_vq_state(
    index: int,
    *,
    packed: bool,
    last_avail_idx: int,
    used_idx: int = 0,
    avail_wrap: bool = True,
    used_wrap: bool = True,
) -> bytes:
    """struct vduse_vq_state: split ``avail_index`` (free-running u16), or the packed form
    (15-bit positions + wrap counters, as the kernel masks them)."""
    if packed:
        state = VQ_STATE_PACKED.pack(
            int(avail_wrap) & 1, last_avail_idx & 0x7FFF, int(used_wrap) & 1, used_idx & 0x7FFF
        )
    else:
        state = VQ_STATE_SPLIT.pack(last_avail_idx & 0xFFFF).ljust(8, b"\0")
    return REQ_VQ_STATE.pack(index, state)


def unpack_vq_state(union: bytes) -> tuple[int, int, tuple[int, int, int, int]]:
    """(index, split avail_index, packed 4-tuple) of a response's vq_state."""
    index, state = REQ_VQ_STATE.unpack_from(union)
    return index, VQ_STATE_SPLIT.unpack_from(state)[0], VQ_STATE_PACKED.unpack_from(state)
