"""virtio_net_hdr_v1: the header in front of every virtio-net packet (the one place for it).

Layout (little-endian, virtio 1.2 section 5.1.6): ``flags u8, gso_type u8, hdr_len u16,
gso_size u16, csum_start u16, csum_offset u16, num_buffers u16`` = 12 bytes.

The header is 12 bytes whenever VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF is negotiated; a
legacy device without either uses the first 10 bytes only (no ``num_buffers``).
Without MRG_RXBUF a VERSION_1 device must still write ``num_buffers = 1`` on RX.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_HDR = struct.Struct("<BBHHHHH")

HDR_LEN = _HDR.size  # 12
LEGACY_HDR_LEN = 10  # no num_buffers: neither VERSION_1 nor MRG_RXBUF

# flags
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4

# gso_type
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

# offset of num_buffers inside the header
NUM_BUFFERS_OFFSET = 10


def header_len(version_1: bool, mrg_rxbuf: bool) -> int:
    """Bytes of header in front of each packet for the negotiated features."""
    return HDR_LEN if (version_1 or mrg_rxbuf) else LEGACY_HDR_LEN


@dataclass(frozen=True, slots=True)
class VirtioNetHdr:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, length: int = HDR_LEN) -> bytes:
        """The header as ``length`` bytes (12, or 10 for a legacy device)."""
        raw = _HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )
        return raw if length == HDR_LEN else raw[:length]

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VirtioNetHdr:
        """Parse 12 bytes (or 10: ``num_buffers`` reads as 0). Raises ValueError if shorter."""
        n = len(data)
        if n >= HDR_LEN:
            return cls(*_HDR.unpack_from(data, 0))
        if n == LEGACY_HDR_LEN:
            return cls(*_HDR.unpack(bytes(data) + b"\0\0"))
        raise ValueError(f"virtio_net_hdr needs {LEGACY_HDR_LEN} or {HDR_LEN} bytes, got {n}")


def rx_header(num_buffers: int, length: int = HDR_LEN) -> bytes:
    """The header the device writes in front of a received frame (no offloads)."""
    return _HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, num_buffers)[:length]
