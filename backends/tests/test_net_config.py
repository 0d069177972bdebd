"""virtio-net config space, feature set and virtio_net_hdr_v1 layout."""

from __future__ import annotations

import struct

import pytest

from backends.net import config as C
from backends.virtio import net as W
from backends.virtio.net_header import (
    HDR_LEN,
    LEGACY_HDR_LEN,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VirtioNetHdr,
    header_len,
    rx_header,
)


def test_config_layout_is_little_endian_12_bytes() -> None:
    cfg = C.NetConfig(
        mac=bytes.fromhex("020000abcdef"),
        status=W.VIRTIO_NET_S_LINK_UP | W.VIRTIO_NET_S_ANNOUNCE,
        max_virtqueue_pairs=4,
        mtu=9000,
    )
    raw = cfg.pack()
    assert len(raw) == W.CONFIG_SIZE == 12
    assert raw[0:6] == bytes.fromhex("020000abcdef")
    assert raw[6:8] == b"\x03\x00"
    assert raw[8:10] == b"\x04\x00"
    assert raw[10:12] == struct.pack("<H", 9000)
    assert C.NetConfig.unpack(raw) == cfg


def test_feature_bit_numbers() -> None:
    assert (W.VIRTIO_NET_F_CSUM, W.VIRTIO_NET_F_GUEST_CSUM, W.VIRTIO_NET_F_MTU) == (0, 1, 3)
    assert (W.VIRTIO_NET_F_MAC, W.VIRTIO_NET_F_MRG_RXBUF, W.VIRTIO_NET_F_STATUS) == (5, 15, 16)
    assert (W.VIRTIO_NET_F_CTRL_VQ, W.VIRTIO_NET_F_GUEST_ANNOUNCE, W.VIRTIO_NET_F_MQ) == (
        17,
        21,
        22,
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mac": b"\x01\x02"}, "6 bytes"),
        ({"max_virtqueue_pairs": 0}, "max_virtqueue_pairs"),
        ({"max_virtqueue_pairs": 0x8001}, "max_virtqueue_pairs"),
        ({"mtu": 67}, "mtu"),
        ({"mtu": 70000}, "mtu"),
        ({"status": -1}, "status"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        C.NetConfig(**kwargs)


def test_mac_parsing() -> None:
    assert C.parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    assert C.parse_mac("52-54-00-AB-cd-EF") == bytes.fromhex("525400abcdef")
    assert C.parse_mac("525400123456") == bytes.fromhex("525400123456")
    assert C.format_mac(bytes.fromhex("525400abcdef")) == "52:54:00:ab:cd:ef"
    assert C.NetConfig(mac="02:00:00:00:00:01").mac == bytes.fromhex("020000000001")  # type: ignore[arg-type]
    for bad in ("52:54:00:12:34", "52:54:00:12:34:5g", "52:54-00:12:34:56", ""):
        with pytest.raises(ValueError, match="bad MAC"):
            C.parse_mac(bad)


def test_header_layout() -> None:
    hdr = VirtioNetHdr(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type=VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len=54,
        gso_size=1448,
        csum_start=34,
        csum_offset=16,
        num_buffers=3,
    )
    raw = hdr.pack()
    assert len(raw) == HDR_LEN == 12
    assert raw == struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 3)
    assert VirtioNetHdr.unpack(raw) == hdr
    assert VirtioNetHdr.unpack(memoryview(raw + b"extra")) == hdr
    legacy = hdr.pack(LEGACY_HDR_LEN)
    assert len(legacy) == 10 and VirtioNetHdr.unpack(legacy).num_buffers == 0
    with pytest.raises(ValueError, match="12 bytes"):
        VirtioNetHdr.unpack(raw[:11])


def test_header_len_and_rx_header() -> None:
    assert header_len(version_1=True, mrg_rxbuf=False) == 12
    assert header_len(version_1=False, mrg_rxbuf=True) == 12
    assert header_len(version_1=False, mrg_rxbuf=False) == 10
    assert rx_header(1) == b"\0" * 10 + b"\x01\x00"
    assert rx_header(3, LEGACY_HDR_LEN) == b"\0" * 10
