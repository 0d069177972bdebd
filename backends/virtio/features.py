"""Virtio transport feature bits and device status values: the one place for them.

Feature constants are *bit numbers* (as in Linux ``include/uapi/linux/virtio_config.h``); use
:func:`bit` to turn one into a mask. Device-specific bits (``VIRTIO_NET_F_*``) live with the
personality (``backends/virtio/net.py``).
"""

from __future__ import annotations

import enum

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_INDIRECT_DESC = 28  # VIRTIO_RING_F_INDIRECT_DESC
VIRTIO_F_EVENT_IDX = 29  # VIRTIO_RING_F_EVENT_IDX
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_IOMMU_PLATFORM = VIRTIO_F_ACCESS_PLATFORM  # the legacy name QEMU / vhost-user use
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40

TRANSPORT_FEATURE_NAMES: dict[int, str] = {
    VIRTIO_F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    VIRTIO_F_INDIRECT_DESC: "INDIRECT_DESC",
    VIRTIO_F_EVENT_IDX: "EVENT_IDX",
    VIRTIO_F_VERSION_1: "VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    VIRTIO_F_RING_PACKED: "RING_PACKED",
    VIRTIO_F_IN_ORDER: "IN_ORDER",
    VIRTIO_F_ORDER_PLATFORM: "ORDER_PLATFORM",
    VIRTIO_F_SR_IOV: "SR_IOV",
    VIRTIO_F_NOTIFICATION_DATA: "NOTIFICATION_DATA",
    VIRTIO_F_NOTIF_CONFIG_DATA: "NOTIF_CONFIG_DATA",
    VIRTIO_F_RING_RESET: "RING_RESET",
}


def bit(n: int) -> int:
    """The mask of feature bit number ``n``."""
    return 1 << n


def has(features: int, n: int) -> bool:
    """True when feature bit number ``n`` is set in ``features``."""
    return bool(features >> n & 1)


def mask(*bits: int) -> int:
    """The mask of several feature bit numbers."""
    m = 0
    for n in bits:
        m |= 1 << n
    return m


# Ring / transport features this device model implements. The device strips the others from
# what the personality offers (split and packed rings; no in-order, notification data or
# per-queue reset yet).
SUPPORTED_TRANSPORT_FEATURES = mask(
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
)
UNSUPPORTED_RING_FEATURES = mask(
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_ORDER_PLATFORM,
    VIRTIO_F_SR_IOV,
    VIRTIO_F_NOTIFICATION_DATA,
    VIRTIO_F_NOTIF_CONFIG_DATA,
    VIRTIO_F_RING_RESET,
)

# vhost-level bits that travel in the same u64 but are not virtio features
# (VHOST_F_LOG_ALL 26, VHOST_USER_F_PROTOCOL_FEATURES 30; defined by the transport). The
# device ignores them when checking FEATURES_OK.
VHOST_LEVEL_FEATURES = mask(26, 30)


def feature_names(features: int, extra: dict[int, str] | None = None) -> list[str]:
    """Names of the set bits (``extra`` adds device-specific names); unknown bits as ``bit N``."""
    names: list[str] = []
    n = 0
    while features >> n:
        if features >> n & 1:
            name = (extra or {}).get(n) or TRANSPORT_FEATURE_NAMES.get(n)
            names.append(name if name else f"bit {n}")
        n += 1
    return names


class Status(enum.IntFlag):
    """Device status bits (virtio 1.2, 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


STATUS_ACKNOWLEDGE = int(Status.ACKNOWLEDGE)
STATUS_DRIVER = int(Status.DRIVER)
STATUS_DRIVER_OK = int(Status.DRIVER_OK)
STATUS_FEATURES_OK = int(Status.FEATURES_OK)
STATUS_NEEDS_RESET = int(Status.NEEDS_RESET)
STATUS_FAILED = int(Status.FAILED)


# -- device IDs (virtio 1.2, 5) and virtio-pci IDs (4.1.2) -------------------------------
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_IOMMU = 23
VIRTIO_ID_MEM = 24
VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_BASE = 0x1040  # modern PCI device ID = 0x1040 + device ID
