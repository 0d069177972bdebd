"""Unit tests of the peer and its frame codec against a fake wire socket (pytest, no QEMU).

Run: `.venv/bin/pytest avocado_tests/unit` (avocado ignores these: no avocado/unittest classes).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_images import GuestImage, udpseq
from qtests.guest import frames
from qtests.guest.peer import PeerTimeout, UdpPeer
from qtests.guest.vm import VhostVdpaNic, VmConfig, qemu_command
from qtests.qos.machine import find_qemu

GUEST_MAC = frames.mac_bytes("52:54:00:12:34:56")
GUEST_IP = frames.ip_bytes("10.0.0.2")
PEER_IP = frames.ip_bytes("10.0.0.1")


@pytest.fixture
def wire() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(5)
    yield s
    s.close()


@pytest.fixture
def peer(wire: socket.socket, tmp_path: Path) -> Iterator[UdpPeer]:
    p = UdpPeer(remote=wire.getsockname(), pcap=tmp_path / "p.pcap").start()
    yield p
    p.close()


def test_checksum_known_vector() -> None:
    # RFC 1071 example words 0001 f203 f4f5 f6f7 sum to 0xddf2 -> checksum 0x220d
    assert frames.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_ipv4_udp_roundtrip() -> None:
    seg = frames.udp(GUEST_IP, PEER_IP, 1234, 5678, b"hello")
    ip = frames.parse_ipv4(frames.ipv4(GUEST_IP, PEER_IP, frames.IPPROTO_UDP, seg, 7))
    assert ip is not None and ip.header_ok and ip.ident == 7
    u = frames.parse_udp(ip)
    assert u is not None and u.checksum_ok and (u.sport, u.dport) == (1234, 5678)
    assert bytes(u.payload) == b"hello"
    bad = bytearray(seg)
    bad[-1] ^= 1
    ip2 = frames.parse_ipv4(frames.ipv4(GUEST_IP, PEER_IP, frames.IPPROTO_UDP, bytes(bad)))
    assert ip2 is not None and not frames.parse_udp(ip2).checksum_ok  # type: ignore[union-attr]


def test_arp_and_ping(peer: UdpPeer, wire: socket.socket) -> None:
    req = frames.arp(frames.ARP_REQUEST, GUEST_MAC, GUEST_IP, b"\0" * 6, PEER_IP)
    wire.sendto(frames.ether(frames.BROADCAST, GUEST_MAC, frames.ETH_P_ARP, req), peer.address)
    eth = frames.parse_ether(wire.recv(2048))
    assert eth is not None and eth.dst == GUEST_MAC and eth.ethertype == frames.ETH_P_ARP
    reply = frames.parse_arp(eth.payload)
    assert reply is not None and reply.op == frames.ARP_REPLY and reply.sha == peer.mac

    echo = frames.icmp_echo(frames.ICMP_ECHO_REQUEST, 9, 3, b"abc")
    packet = frames.ipv4(GUEST_IP, PEER_IP, frames.IPPROTO_ICMP, echo)
    wire.sendto(frames.ether(peer.mac, GUEST_MAC, frames.ETH_P_IP, packet), peer.address)
    ip = frames.parse_ipv4(frames.parse_ether(wire.recv(2048)).payload)  # type: ignore[union-attr]
    assert ip is not None and ip.header_ok and ip.dst == GUEST_IP
    r = frames.parse_icmp_echo(ip.payload)
    assert r is not None and r.checksum_ok and (r.type, r.ident, r.seq) == (0, 9, 3)
    assert bytes(r.data) == b"abc"
    assert peer.snapshot()["neighbors"]["10.0.0.2"] == "52:54:00:12:34:56"


def test_stream_accounting(peer: UdpPeer, wire: socket.socket) -> None:
    peer.expect_stream(5001, 4)

    def send(data: bytes) -> None:
        seg = frames.udp(GUEST_IP, PEER_IP, 40000, 5001, data)
        packet = frames.ipv4(GUEST_IP, PEER_IP, frames.IPPROTO_UDP, seg)
        wire.sendto(frames.ether(peer.mac, GUEST_MAC, frames.ETH_P_IP, packet), peer.address)

    for seq in (0, 1, 1, 3, 2):
        send(udpseq.payload(seq, 200))
    # complete but not ended: the duplicate after the last new datagram must still count
    with pytest.raises(PeerTimeout, match="end-of-stream sentinel"):
        peer.wait_stream(5001, timeout=0.5)
    send(udpseq.payload(3, 200))
    send(udpseq.END)
    stats = peer.wait_stream(5001, timeout=5)
    assert (stats.unique, stats.dups, stats.ooo, stats.corrupt, stats.ended) == (4, 2, 1, 0, True)


def test_send_stream_resolves_then_sends(peer: UdpPeer, wire: socket.socket) -> None:
    sent: list[int] = []
    t = threading.Thread(target=lambda: sent.append(peer.send_stream("10.0.0.2", 6000, 3, 64)))
    t.start()
    eth = frames.parse_ether(wire.recv(2048))  # the ARP request
    assert eth is not None and eth.ethertype == frames.ETH_P_ARP
    rep = frames.arp(frames.ARP_REPLY, GUEST_MAC, GUEST_IP, peer.mac, PEER_IP)
    wire.sendto(frames.ether(peer.mac, GUEST_MAC, frames.ETH_P_ARP, rep), peer.address)
    stats = udpseq.SeqStats(3)
    while not stats.ended:
        eth = frames.parse_ether(wire.recv(2048))
        if eth is None or eth.ethertype != frames.ETH_P_IP:
            continue  # a repeated ARP request
        ip = frames.parse_ipv4(eth.payload)
        assert ip is not None and eth.dst == GUEST_MAC
        u = frames.parse_udp(ip)
        assert u is not None and u.checksum_ok and u.dport == 6000
        stats.add(u.payload)
    t.join(5)
    assert sent == [3] and stats.complete and stats.corrupt == 0 and stats.received == 3


def _learn_guest(peer: UdpPeer, wire: socket.socket) -> None:
    """The guest announces itself (an ARP request): the peer learns its MAC, then answers."""
    req = frames.arp(frames.ARP_REQUEST, GUEST_MAC, GUEST_IP, b"\0" * 6, PEER_IP)
    wire.sendto(frames.ether(frames.BROADCAST, GUEST_MAC, frames.ETH_P_ARP, req), peer.address)
    wire.recv(2048)  # the ARP reply


def test_ping_sentinel_waits_for_its_reply(peer: UdpPeer, wire: socket.socket) -> None:
    _learn_guest(peer, wire)
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(peer.ping("10.0.0.2", 7, 1, 5.0) is None))
    t.start()
    ip = frames.parse_ipv4(frames.parse_ether(wire.recv(2048)).payload)  # type: ignore[union-attr]
    assert ip is not None and ip.dst == GUEST_IP
    req = frames.parse_icmp_echo(ip.payload)
    assert req is not None and req.checksum_ok and (req.type, req.ident, req.seq) == (8, 7, 1)
    assert not done, "ping() returned before the reply came"
    wrong = frames.icmp_echo(frames.ICMP_ECHO_REPLY, 7, 2, bytes(req.data))  # not the sentinel
    right = frames.icmp_echo(frames.ICMP_ECHO_REPLY, 7, 1, bytes(req.data))
    for body in (wrong, right):
        packet = frames.ipv4(GUEST_IP, PEER_IP, frames.IPPROTO_ICMP, body)
        wire.sendto(frames.ether(peer.mac, GUEST_MAC, frames.ETH_P_IP, packet), peer.address)
    t.join(5)
    assert done == [True]
    assert peer.echo_replies == [("10.0.0.2", 7, 2), ("10.0.0.2", 7, 1)]


def test_ping_sentinel_times_out_naming_it(peer: UdpPeer, wire: socket.socket) -> None:
    _learn_guest(peer, wire)
    with pytest.raises(PeerTimeout, match="echo reply 7/1 from 10.0.0.2"):
        peer.ping("10.0.0.2", 7, 1, 0.5)


def test_vhost_vdpa_nic_command_line(tmp_path: Path) -> None:
    image = GuestImage(tmp_path, {}, True)
    cfg = VmConfig(nics=[VhostVdpaNic("/dev/vhost-vdpa-3", "02:00:00:00:00:07")], qemu=find_qemu())
    cmd = qemu_command(image, cfg, tmp_path / "c.sock", tmp_path / "q.sock")
    assert "vhost-vdpa,id=net0,vhostdev=/dev/vhost-vdpa-3" in cmd
    assert "virtio-net-pci,id=nic0,netdev=net0,mac=02:00:00:00:00:07" in cmd
    assert any(a.startswith("memory-backend-memfd,") and "share=on" in a for a in cmd)
