"""virtio-net wire formats (virtio 1.2, 5.1) but the packet header (``net_header``): feature
bits, the config space layout, link status bits and control-queue commands.

Config layout (little-endian): ``mac[6] @0, status u16 @6, max_virtqueue_pairs u16 @8,
mtu u16 @10`` - 12 bytes (later fields belong to features not offered here).
Queues: rx k = 2k, tx k = 2k+1, ctrl = 2 * max_virtqueue_pairs.
Control: ``{u8 class, u8 cmd}`` + data out, ``u8 ack`` in.
"""

from __future__ import annotations

import struct

from .features import feature_names

# -- feature bits (bit numbers) ------------------------------------------------------------
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

NET_FEATURE_NAMES: dict[int, str] = {
    VIRTIO_NET_F_CSUM: "CSUM",
    VIRTIO_NET_F_GUEST_CSUM: "GUEST_CSUM",
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS",
    VIRTIO_NET_F_MTU: "MTU",
    VIRTIO_NET_F_MAC: "MAC",
    VIRTIO_NET_F_GUEST_TSO4: "GUEST_TSO4",
    VIRTIO_NET_F_GUEST_TSO6: "GUEST_TSO6",
    VIRTIO_NET_F_GUEST_ECN: "GUEST_ECN",
    VIRTIO_NET_F_GUEST_UFO: "GUEST_UFO",
    VIRTIO_NET_F_HOST_TSO4: "HOST_TSO4",
    VIRTIO_NET_F_HOST_TSO6: "HOST_TSO6",
    VIRTIO_NET_F_HOST_ECN: "HOST_ECN",
    VIRTIO_NET_F_HOST_UFO: "HOST_UFO",
    VIRTIO_NET_F_MRG_RXBUF: "MRG_RXBUF",
    VIRTIO_NET_F_STATUS: "STATUS",
    VIRTIO_NET_F_CTRL_VQ: "CTRL_VQ",
    VIRTIO_NET_F_CTRL_RX: "CTRL_RX",
    VIRTIO_NET_F_CTRL_VLAN: "CTRL_VLAN",
    VIRTIO_NET_F_CTRL_RX_EXTRA: "CTRL_RX_EXTRA",
    VIRTIO_NET_F_GUEST_ANNOUNCE: "GUEST_ANNOUNCE",
    VIRTIO_NET_F_MQ: "MQ",
    VIRTIO_NET_F_CTRL_MAC_ADDR: "CTRL_MAC_ADDR",
    VIRTIO_NET_F_HASH_REPORT: "HASH_REPORT",
    VIRTIO_NET_F_RSS: "RSS",
    VIRTIO_NET_F_RSC_EXT: "RSC_EXT",
    VIRTIO_NET_F_STANDBY: "STANDBY",
    VIRTIO_NET_F_SPEED_DUPLEX: "SPEED_DUPLEX",
}


def net_feature_names(features: int) -> list[str]:
    """Names of the set bits of a virtio-net device's features (transport bits included)."""
    return feature_names(features, NET_FEATURE_NAMES)


# -- config space --------------------------------------------------------------------------
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

MAC_OFFSET = 0
STATUS_OFFSET = 6
MAX_VQ_PAIRS_OFFSET = 8
MTU_OFFSET = 10
CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
CONFIG_SIZE = CONFIG.size  # 12

# -- control queue -------------------------------------------------------------------------
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
