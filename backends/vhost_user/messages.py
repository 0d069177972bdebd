"""vhost-user wire format: every struct layout, request number and feature bit.

The one place that knows byte layouts of the vhost-user protocol (QEMU
``docs/interop/vhost-user.rst``). Everything is little-endian. The connection, the backend
channel and the test front-end all encode and decode through this module.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# -- header ---------------------------------------------------------------------------------
HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
REPLY_FLAGS = VERSION | FLAG_REPLY  # QEMU rejects a reply whose flags are anything else

# Largest payload this backend reads. The biggest request it understands is a config access
# (12 + 256 bytes); QEMU's own payload union is a few KiB. Anything above is refused and the
# connection is closed, since the stream cannot be resynchronised.
MAX_PAYLOAD = 4096
# SCM_RIGHTS descriptors accepted on one message; more means a broken peer.
MAX_FDS = 8
MEM_TABLE_MAX_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
# What GET_MAX_MEM_SLOTS reports with CONFIGURE_MEM_SLOTS (QEMU caps at 512). At least 509
# (QEMU's MEMORY_DEVICES_SAFE_MAX_MEMSLOTS): below that QEMU gives virtio-mem with
# dynamic-memslots=on a single memslot, and refuses to hot-add this backend once a memory
# device has decided its memslots. libvhost-user reports 509 for the same reason.
MAX_MEM_SLOTS = 509
CONFIG_MAX_SIZE = 256

# -- vhost feature bits carried in GET/SET_FEATURES --------------------------------------
VHOST_F_LOG_ALL = 26
VHOST_USER_F_PROTOCOL_FEATURES = 30

# -- payload bit fields -----------------------------------------------------------------------
VRING_IDX_MASK = 0xFF  # KICK / CALL / ERR u64: queue index
VRING_NOFD_MASK = 0x100  # ... and "no file descriptor: poll"
VRING_F_LOG = 0x1  # SET_VRING_ADDR flags
LOG_PAGE = 0x1000  # dirty-log granularity


class Request(enum.IntEnum):
    """Front-end requests (QEMU -> backend on the main socket)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end requests (backend -> QEMU on the SET_BACKEND_REQ_FD socket)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of GET/SET_PROTOCOL_FEATURES."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17  # QEMU include/hw/virtio/vhost-user.h; 17 is not SHARED_OBJECT
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def protocol_mask(*features: ProtocolFeature) -> int:
    mask = 0
    for f in features:
        mask |= 1 << f
    return mask


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


# Requests whose answer is a data reply (sent whether or not NEED_REPLY is set).
DATA_REPLY_REQUESTS = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"UNKNOWN({code})"


# -- header -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        return cls(*HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """A whole message: header + payload."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, REPLY_FLAGS)


# -- scalar payloads ------------------------------------------------------------------------
U64 = struct.Struct("<Q")


def pack_u64(value: int) -> bytes:
    return U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF)


def unpack_u64(data: bytes | memoryview) -> int:
    return int(U64.unpack_from(data)[0])


# -- vring payloads ---------------------------------------------------------------------------
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log_guest_addr


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> VringState:
        return cls(*VRING_STATE.unpack_from(data))

    def pack(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log_guest_addr: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> VringAddr:
        return cls(*VRING_ADDR.unpack_from(data))

    def pack(self) -> bytes:
        return VRING_ADDR.pack(
            self.index, self.flags, self.desc, self.used, self.avail, self.log_guest_addr
        )

    @property
    def log(self) -> bool:
        return bool(self.flags & VRING_F_LOG)


@dataclass(frozen=True, slots=True)
class VringFile:
    """KICK / CALL / ERR payload: queue index + "no fd" bit."""

    index: int
    nofd: bool

    @classmethod
    def from_u64(cls, value: int) -> VringFile:
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))

    def pack(self) -> bytes:
        return pack_u64(self.index | (VRING_NOFD_MASK if self.nofd else 0))


# -- memory payloads --------------------------------------------------------------------------
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEM_REG_PADDING = struct.Struct("<Q")  # ADD/REM_MEM_REG: u64 padding, then one region
MEM_REG_MSG_SIZE = MEM_REG_PADDING.size + MEM_REGION.size


@dataclass(frozen=True, slots=True)
class MemRegion:
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> MemRegion:
        return cls(*MEM_REGION.unpack_from(data, offset))

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)


def pack_mem_table(regions: list[MemRegion]) -> bytes:
    return MEMORY_HEADER.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def unpack_mem_table_count(data: bytes | memoryview) -> int:
    return int(MEMORY_HEADER.unpack_from(data)[0])


def mem_table_size(nregions: int) -> int:
    return MEMORY_HEADER.size + nregions * MEM_REGION.size


def pack_mem_reg(region: MemRegion) -> bytes:
    return MEM_REG_PADDING.pack(0) + region.pack()


def unpack_mem_reg(data: bytes | memoryview) -> MemRegion:
    return MemRegion.unpack(data, MEM_REG_PADDING.size)


# -- dirty log ----------------------------------------------------------------------------------
LOG = struct.Struct("<QQ")  # mmap_size, mmap_offset


@dataclass(frozen=True, slots=True)
class LogDesc:
    mmap_size: int
    mmap_offset: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> LogDesc:
        return cls(*LOG.unpack_from(data))

    def pack(self) -> bytes:
        return LOG.pack(self.mmap_size, self.mmap_offset)


# -- IOTLB ------------------------------------------------------------------------------------
IOTLB = struct.Struct("<QQQBB6x")  # iova, size, uaddr, perm, type (struct vhost_iotlb_msg)


@dataclass(frozen=True, slots=True)
class IotlbMsg:
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> IotlbMsg:
        return cls(*IOTLB.unpack_from(data))

    def pack(self) -> bytes:
        return IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type)


# -- device config ----------------------------------------------------------------------------
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags; then `size` bytes


@dataclass(frozen=True, slots=True)
class ConfigMsg:
    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> ConfigMsg:
        offset, size, flags = CONFIG_HEADER.unpack_from(data)
        body = bytes(data[CONFIG_HEADER.size : CONFIG_HEADER.size + size])
        return cls(offset, size, flags, body)

    def pack(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data


# -- expected request payload sizes -------------------------------------------------------------
# exact sizes; SET_MEM_TABLE and the config messages are checked by their handlers.
PAYLOAD_SIZES: dict[Request, int] = {
    Request.GET_FEATURES: 0,
    Request.SET_FEATURES: U64.size,
    Request.SET_OWNER: 0,
    Request.RESET_OWNER: 0,
    Request.SET_LOG_BASE: LOG.size,
    Request.SET_LOG_FD: 0,
    Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size,
    Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size,
    Request.SET_VRING_KICK: U64.size,
    Request.SET_VRING_CALL: U64.size,
    Request.SET_VRING_ERR: U64.size,
    Request.GET_PROTOCOL_FEATURES: 0,
    Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.GET_QUEUE_NUM: 0,
    Request.SET_VRING_ENABLE: VRING_STATE.size,
    Request.SEND_RARP: U64.size,
    Request.NET_SET_MTU: U64.size,
    Request.SET_BACKEND_REQ_FD: 0,
    Request.IOTLB_MSG: IOTLB.size,
    Request.SET_VRING_ENDIAN: VRING_STATE.size,
    Request.RESET_DEVICE: 0,
    Request.GET_MAX_MEM_SLOTS: 0,
    Request.ADD_MEM_REG: MEM_REG_MSG_SIZE,
    Request.REM_MEM_REG: MEM_REG_MSG_SIZE,
    Request.SET_STATUS: U64.size,
    Request.GET_STATUS: 0,
}

# Which fds a request carries: (minimum, maximum). Anything else gets no fd.
FD_COUNTS: dict[Request, tuple[int, int]] = {
    Request.SET_MEM_TABLE: (1, MEM_TABLE_MAX_REGIONS),
    Request.SET_LOG_BASE: (0, 1),
    Request.SET_LOG_FD: (0, 1),
    Request.SET_VRING_KICK: (0, 1),
    Request.SET_VRING_CALL: (0, 1),
    Request.SET_VRING_ERR: (0, 1),
    Request.SET_BACKEND_REQ_FD: (1, 1),
    Request.ADD_MEM_REG: (1, 1),
    Request.REM_MEM_REG: (0, 1),  # the spec tolerates (and says to close) a stray fd
}
