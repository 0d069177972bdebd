"""Ethernet / ARP / IPv4 / ICMP / UDP frame layouts for the test peer (the one place for them).

Build functions return bytes; parse functions return small dataclasses or None for frames
that are not of that kind (malformed input never raises).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ETH = struct.Struct("!6s6sH")  # dst, src, ethertype
ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
IPV4 = struct.Struct("!BBHHHBBH4s4s")  # ver/ihl, tos, len, id, frag, ttl, proto, csum, src, dst
ICMP_ECHO = struct.Struct("!BBHHH")  # type, code, csum, id, seq
UDP = struct.Struct("!HHHH")  # sport, dport, len, csum
PSEUDO = struct.Struct("!4s4sBBH")  # IPv4 pseudo header for UDP: src, dst, 0, proto, len

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ARP_REQUEST = 1
ARP_REPLY = 2
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
BROADCAST = b"\xff" * 6


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_bytes(ip: str) -> bytes:
    return socket.inet_aton(ip)


def ip_str(ip: bytes) -> str:
    return socket.inet_ntoa(ip)


def checksum(data: bytes | memoryview) -> int:
    """RFC 1071 internet checksum."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# -- Ethernet ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ether:
    dst: bytes
    src: bytes
    ethertype: int
    payload: memoryview


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    frame = ETH.pack(dst, src, ethertype) + payload
    return frame + b"\0" * (60 - len(frame)) if len(frame) < 60 else frame


def parse_ether(frame: bytes | memoryview) -> Ether | None:
    if len(frame) < ETH.size:
        return None
    dst, src, ethertype = ETH.unpack_from(frame)
    return Ether(dst, src, ethertype, memoryview(frame)[ETH.size :])


# -- ARP ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arp:
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return ARP.pack(1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa)


def parse_arp(payload: bytes | memoryview) -> Arp | None:
    if len(payload) < ARP.size:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP.unpack_from(payload)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        return None
    return Arp(op, sha, spa, tha, tpa)


# -- IPv4 --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ipv4:
    src: bytes
    dst: bytes
    proto: int
    ident: int
    fragment: bool  # MF set or non-zero offset
    header_ok: bool  # header checksum valid
    payload: memoryview


def ipv4(
    src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0, ttl: int = 64
) -> bytes:
    header = IPV4.pack(
        0x45, 0, IPV4.size + len(payload), ident & 0xFFFF, 0x4000, ttl, proto, 0, src, dst
    )
    csum = checksum(header)
    return header[:10] + struct.pack("!H", csum) + header[12:] + payload


def parse_ipv4(payload: bytes | memoryview) -> Ipv4 | None:
    if len(payload) < IPV4.size:
        return None
    vihl, _tos, total, ident, frag, _ttl, proto, _csum, src, dst = IPV4.unpack_from(payload)
    ihl = (vihl & 0xF) * 4
    if vihl >> 4 != 4 or ihl < IPV4.size or total < ihl or total > len(payload):
        return None
    view = memoryview(payload)
    ok = checksum(view[:ihl]) == 0
    return Ipv4(src, dst, proto, ident, bool(frag & 0x3FFF), ok, view[ihl:total])


# -- ICMP echo ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class IcmpEcho:
    type: int
    ident: int
    seq: int
    data: memoryview
    checksum_ok: bool


def icmp_echo(type_: int, ident: int, seq: int, data: bytes) -> bytes:
    body = ICMP_ECHO.pack(type_, 0, 0, ident, seq) + data
    csum = checksum(body)
    return body[:2] + struct.pack("!H", csum) + body[4:]


def parse_icmp_echo(payload: bytes | memoryview) -> IcmpEcho | None:
    if len(payload) < ICMP_ECHO.size:
        return None
    type_, code, _csum, ident, seq = ICMP_ECHO.unpack_from(payload)
    if type_ not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) or code != 0:
        return None
    view = memoryview(payload)
    return IcmpEcho(type_, ident, seq, view[ICMP_ECHO.size :], checksum(view) == 0)


# -- UDP ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Udp:
    sport: int
    dport: int
    payload: memoryview
    checksum_ok: bool  # True also when the sender used no checksum (0)


def _udp_sum(src: bytes, dst: bytes, segment: bytes | memoryview) -> int:
    return checksum(PSEUDO.pack(src, dst, 0, IPPROTO_UDP, len(segment)) + bytes(segment))


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = UDP.pack(sport, dport, UDP.size + len(payload), 0) + payload
    csum = _udp_sum(src, dst, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def parse_udp(ip: Ipv4) -> Udp | None:
    if len(ip.payload) < UDP.size:
        return None
    sport, dport, length, csum = UDP.unpack_from(ip.payload)
    if length < UDP.size or length > len(ip.payload):
        return None
    seg = ip.payload[:length]
    ok = csum == 0 or _udp_sum(ip.src, ip.dst, seg) == 0
    return Udp(sport, dport, seg[UDP.size :], ok)
