"""virtio-net device configuration space and feature bits (virtio 1.2 section 5.1).

Config layout (little-endian): ``mac[6] @0, status u16 @6, max_virtqueue_pairs u16 @8,
mtu u16 @10`` - 12 bytes. Fields after ``mtu`` (speed, duplex, RSS) belong to features this
device does not offer, so the config space ends at 12 bytes.

The generic transport/ring bits (VIRTIO_F_VERSION_1, ACCESS_PLATFORM, EVENT_IDX ...) live in
``backends/virtio/features.py``; this module holds only the virtio-net ones.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# -- virtio-net feature bits (bit numbers) -----------------------------------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_HASH_REPORT = 57
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_RSC_EXT = 61
VIRTIO_NET_F_STANDBY = 62
VIRTIO_NET_F_SPEED_DUPLEX = 63

# -- config space --------------------------------------------------------------------------------
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

MAC_OFFSET = 0
STATUS_OFFSET = 6
MAX_VQ_PAIRS_OFFSET = 8
MTU_OFFSET = 10

_CONFIG = struct.Struct("<6sHHH")
CONFIG_SIZE = _CONFIG.size  # 12

# spec limits: max_virtqueue_pairs in 1..0x8000, mtu >= 68
MAX_QUEUE_PAIRS = 0x8000
MIN_MTU = 68
MAX_MTU = 0xFFFF

DEFAULT_MAC = bytes.fromhex("525400123456")

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-]?)(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' (or '-' separated, or 12 hex digits) -> 6 bytes; ValueError if not."""
    if not _MAC_RE.match(text):
        raise ValueError(
            f"bad MAC address {text!r}: expected six hex octets like 52:54:00:12:34:56"
        )
    return bytes.fromhex(re.sub(r"[:-]", "", text))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(slots=True)
class NetConfig:
    mac: bytes = DEFAULT_MAC
    status: int = VIRTIO_NET_S_LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = 1500

    def __post_init__(self) -> None:
        if isinstance(self.mac, str):
            self.mac = parse_mac(self.mac)
        self.mac = bytes(self.mac)
        if len(self.mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {len(self.mac)}")
        if not 1 <= self.max_virtqueue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(
                f"max_virtqueue_pairs must be 1..{MAX_QUEUE_PAIRS}, got {self.max_virtqueue_pairs}"
            )
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"mtu must be {MIN_MTU}..{MAX_MTU}, got {self.mtu}")
        if not 0 <= self.status <= 0xFFFF:
            raise ValueError(f"status must fit in u16, got {self.status}")

    def pack(self) -> bytes:
        return _CONFIG.pack(self.mac, self.status, self.max_virtqueue_pairs, self.mtu)

    @classmethod
    def unpack(cls, data: bytes) -> NetConfig:
        if len(data) < CONFIG_SIZE:
            raise ValueError(f"virtio-net config needs {CONFIG_SIZE} bytes, got {len(data)}")
        mac, status, pairs, mtu = _CONFIG.unpack_from(data, 0)
        return cls(mac=mac, status=status, max_virtqueue_pairs=pairs, mtu=mtu)
