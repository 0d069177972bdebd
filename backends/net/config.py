"""The virtio-net device's configuration values (MAC, link status, queue pairs, MTU) and
their limits. The wire layout and the feature bits are in :mod:`backends.virtio.net`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backends.virtio.net import (
    CONFIG as _CONFIG,
)
from backends.virtio.net import (
    CONFIG_SIZE,
    VIRTIO_NET_S_LINK_UP,
)

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
