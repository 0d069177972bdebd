"""Virtio numbers the driver needs (virtio 1.2 spec): feature bits, status bits, device IDs.

Layouts live with their users: split ring in `virtqueue`, virtio-pci registers in
`virtio_pci`, net header/config/control in `virtio_net`.
"""

from __future__ import annotations

# device status
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# transport / ring feature bits
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_RING_RESET = 40

# virtio-net feature bits
NET_F_CSUM = 0
NET_F_GUEST_CSUM = 1
NET_F_CTRL_GUEST_OFFLOADS = 2
NET_F_MTU = 3
NET_F_MAC = 5
NET_F_GUEST_TSO4 = 7
NET_F_GUEST_TSO6 = 8
NET_F_GUEST_ECN = 9
NET_F_GUEST_UFO = 10
NET_F_HOST_TSO4 = 11
NET_F_HOST_TSO6 = 12
NET_F_HOST_ECN = 13
NET_F_HOST_UFO = 14
NET_F_MRG_RXBUF = 15
NET_F_STATUS = 16
NET_F_CTRL_VQ = 17
NET_F_CTRL_RX = 18
NET_F_CTRL_VLAN = 19
NET_F_CTRL_RX_EXTRA = 20
NET_F_GUEST_ANNOUNCE = 21
NET_F_MQ = 22
NET_F_CTRL_MAC_ADDR = 23

# device IDs (virtio-pci modern PCI device ID = 0x1040 + id)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_IOMMU = 23
VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_BASE = 0x1040


def bit(n: int) -> int:
    return 1 << n


def feature_names(features: int) -> list[str]:
    """Readable names of the set bits (unknown bits as ``bit N``)."""
    names = {
        v: k
        for k, v in globals().items()
        if (k.startswith("F_") or k.startswith("NET_F_")) and isinstance(v, int)
    }
    return [names.get(i, f"bit {i}") for i in range(64) if features >> i & 1]
