"""The gratuitous RARP frame a backend broadcasts for SEND_RARP after a migration.

Ethernet broadcast, ethertype 0x8035, RARP "request reverse" (opcode 3) with the guest MAC as
both sender and target hardware address and zero protocol addresses: what QEMU's own
announce (``qemu_announce_self``) and DPDK's vhost send. Padded to the 60-byte minimum.
"""

from __future__ import annotations

import struct

ETH_P_RARP = 0x8035
ARPHRD_ETHER = 1
ETH_P_IP = 0x0800
RARP_REQUEST_REVERSE = 3
MIN_FRAME = 60

_ETH = struct.Struct("!6s6sH")
_RARP = struct.Struct("!HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa


def rarp_frame(mac: bytes) -> bytes:
    if len(mac) != 6:
        raise ValueError(f"MAC address must be 6 bytes, got {len(mac)}")
    frame = _ETH.pack(b"\xff" * 6, mac, ETH_P_RARP) + _RARP.pack(
        ARPHRD_ETHER, ETH_P_IP, 6, 4, RARP_REQUEST_REVERSE, mac, bytes(4), mac, bytes(4)
    )
    return frame.ljust(MIN_FRAME, b"\0")
