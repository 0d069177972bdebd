"""A fake host at the far end of a UDP wire: each UDP datagram carries one raw Ethernet frame.

That is both what QEMU's ``-netdev dgram`` sends and what the backend's ``UdpWire`` sends
(``--wire udp:127.0.0.1:PORT:PEERPORT``). The peer answers ARP for its address and ICMP echo,
accounts numbered udpseq streams per destination port, and can send such streams itself.
One thread receives; every frame in either direction goes to an optional pcap file.
"""

from __future__ import annotations

import array
import bisect
import collections
import logging
import selectors
import socket
import threading
import time
from pathlib import Path

from guest_images import udpseq
from qtests.guest import frames
from qtests.guest.pcap import PcapWriter
from qtests.qos.waiting import WaitTimeout

_log = logging.getLogger(__name__)


class PeerTimeout(WaitTimeout, AssertionError):
    """The peer did not see what a scenario awaited: an assertion, so avocado reports FAIL."""


class UdpPeer:
    def __init__(
        self,
        ip: str = "10.0.0.1",
        mac: str = "52:54:00:00:00:01",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        remote: tuple[str, int] | None = None,
        pcap: Path | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.ip = ip
        self.mac = frames.mac_bytes(mac)
        self._ip = frames.ip_bytes(ip)
        self.remote = remote
        self.log = log or _log
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((host, port))
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._pcap = PcapWriter(pcap) if pcap else None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ident = 0
        # Guarded by _cond:
        self.counters: collections.Counter[str] = collections.Counter()
        self.neighbors: dict[str, bytes] = {}  # learned from ARP
        self.streams: dict[int, udpseq.SeqStats] = {}  # by destination UDP port
        self.echo_requests: list[tuple[str, int, int]] = []  # (source ip, ident, seq)
        self.echo_replies: list[tuple[str, int, int]] = []  # answers to ping(): (ip, ident, seq)
        #: per destination port: time.monotonic() at which datagram ``seq`` was sent
        self.sent_at: dict[int, array.array[float]] = {}
        self.frames_to: collections.Counter[tuple[str, int]] = collections.Counter()  # by remote

    # -- life cycle --------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> UdpPeer:
        self._thread = threading.Thread(target=self._run, name=f"peer-{self.port}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                self.log.error("peer thread did not stop within 10 s")
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()
        if self._pcap:
            self._pcap.close()

    def __enter__(self) -> UdpPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- receive path (peer thread) ----------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for _key, _ in sel.select():
                    pass
                self._drain()
        except Exception:  # a peer bug must show up in the log, not hang the test silently
            self.log.exception("peer receive loop crashed")
            with self._cond:
                self.counters["peer_crashed"] += 1
                self._cond.notify_all()
        finally:
            sel.close()

    def _drain(self) -> None:
        while True:
            try:
                frame, addr = self._sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier send
                with self._cond:
                    self.counters["socket_errors"] += 1
                self.log.debug("peer socket error: %s", exc)
                continue
            if self.remote is None:
                self.remote = addr
            if self._pcap:
                self._pcap.write(frame)
            with self._cond:
                self.counters["frames_in"] += 1
                self._handle(frame)
                self._cond.notify_all()

    def _handle(self, frame: bytes) -> None:
        eth = frames.parse_ether(frame)
        if eth is None:
            self.counters["bad_frames"] += 1
            return
        if eth.dst != self.mac and eth.dst != frames.BROADCAST:
            self.counters["multicast" if eth.dst[0] & 1 else "not_for_us"] += 1
            return
        if eth.ethertype == frames.ETH_P_ARP:
            self._handle_arp(eth)
        elif eth.ethertype == frames.ETH_P_IP:
            self._handle_ipv4(eth)
        else:
            self.counters[f"ethertype_{eth.ethertype:04x}"] += 1

    def _handle_arp(self, eth: frames.Ether) -> None:
        a = frames.parse_arp(eth.payload)
        if a is None:
            self.counters["bad_arp"] += 1
            return
        self.neighbors[frames.ip_str(a.spa)] = a.sha
        if a.op == frames.ARP_REQUEST and a.tpa == self._ip:
            self.counters["arp_requests"] += 1
            reply = frames.arp(frames.ARP_REPLY, self.mac, self._ip, a.sha, a.spa)
            self._send(frames.ether(a.sha, self.mac, frames.ETH_P_ARP, reply))
        elif a.op == frames.ARP_REPLY:
            self.counters["arp_replies"] += 1

    def _handle_ipv4(self, eth: frames.Ether) -> None:
        ip = frames.parse_ipv4(eth.payload)
        if ip is None or not ip.header_ok:
            self.counters["bad_ipv4"] += 1
            return
        if ip.dst != self._ip:
            self.counters["ip_not_for_us"] += 1
            return
        if ip.fragment:
            self.counters["ip_fragments"] += 1
            return
        if ip.proto == frames.IPPROTO_ICMP:
            echo = frames.parse_icmp_echo(ip.payload)
            if echo is None or not echo.checksum_ok:
                self.counters["bad_icmp"] += 1
            elif echo.type == frames.ICMP_ECHO_REQUEST:
                self.counters["icmp_echo_requests"] += 1
                self.echo_requests.append((frames.ip_str(ip.src), echo.ident, echo.seq))
                body = frames.icmp_echo(
                    frames.ICMP_ECHO_REPLY, echo.ident, echo.seq, bytes(echo.data)
                )
                self._send(
                    frames.ether(eth.src, self.mac, frames.ETH_P_IP,
                                 frames.ipv4(self._ip, ip.src, frames.IPPROTO_ICMP, body,
                                             self._next_ident()))
                )  # fmt: skip
                self.counters["icmp_echo_replies_sent"] += 1
            elif echo.type == frames.ICMP_ECHO_REPLY:
                self.counters["icmp_echo_replies"] += 1
                self.echo_replies.append((frames.ip_str(ip.src), echo.ident, echo.seq))
        elif ip.proto == frames.IPPROTO_UDP:
            seg = frames.parse_udp(ip)
            if seg is None:
                self.counters["bad_udp"] += 1
            elif not seg.checksum_ok:
                self.counters["udp_bad_checksum"] += 1
            elif (stats := self.streams.get(seg.dport)) is not None:
                stats.add(seg.payload)
                self.counters["udp_stream_datagrams"] += 1
            else:
                self.counters["udp_unexpected"] += 1
        else:
            self.counters[f"ip_proto_{ip.proto}"] += 1

    # -- send path (any thread) --------------------------------------------------------------
    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def _send(self, frame: bytes) -> None:
        if self.remote is None:
            raise RuntimeError("peer has no remote address yet (nothing received, none given)")
        if self._pcap:
            self._pcap.write(frame)
        try:
            self._sock.sendto(frame, self.remote)
        except BlockingIOError:
            self.counters["send_would_block"] += 1
            return
        self.counters["frames_out"] += 1
        self.frames_to[self.remote] += 1

    def repoint(self, remote: tuple[str, int]) -> float:
        """Send to ``remote`` from now on (what a switch does when the guest's MAC moves);
        returns the time.monotonic() after which no frame goes to the old remote."""
        with self._cond:
            self.remote = remote
            return time.monotonic()

    def sent_between(self, port: int, start: float, end: float) -> int:
        """How many stream datagrams to ``port`` were sent in [start, end) (monotonic)."""
        with self._cond:
            times = self.sent_at.get(port, array.array("d"))
            return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)

    def send_frame(self, frame: bytes) -> None:
        with self._cond:
            self._send(frame)

    def resolve(self, ip: str, timeout: float = 10.0) -> bytes:
        """The MAC of ``ip``: already learned, or ARP-requested (re-sent every 0.5 s)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while ip not in self.neighbors:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerTimeout(f"ARP reply from {ip}", timeout)
                request = frames.arp(frames.ARP_REQUEST, self.mac, self._ip, b"\0" * 6,
                                     frames.ip_bytes(ip))  # fmt: skip
                self._send(frames.ether(frames.BROADCAST, self.mac, frames.ETH_P_ARP, request))
                self._cond.wait_for(lambda: ip in self.neighbors, min(0.5, remaining))
            return self.neighbors[ip]

    def send_stream(
        self,
        dst_ip: str,
        dst_port: int,
        count: int,
        size: int,
        rate: float = 0.0,
        src_port: int = 40000,
    ) -> int:
        """Send ``count`` udpseq datagrams (``rate`` per second, 0 = flat out), then the
        end-of-stream sentinel (not counted); returns how many stream datagrams were sent."""
        dst_mac = self.resolve(dst_ip)
        dst = frames.ip_bytes(dst_ip)
        t0 = time.monotonic()
        sent = 0
        with self._cond:
            times = self.sent_at[dst_port] = array.array("d")
        while sent < count:
            due = count if rate <= 0 else min(count, int((time.monotonic() - t0) * rate) + 1)
            with self._cond:
                while sent < due:
                    seg = frames.udp(self._ip, dst, src_port, dst_port, udpseq.payload(sent, size))
                    packet = frames.ipv4(self._ip, dst, frames.IPPROTO_UDP, seg, self._next_ident())
                    self._send(frames.ether(dst_mac, self.mac, frames.ETH_P_IP, packet))
                    times.append(time.monotonic())
                    sent += 1
            if sent < count and self._stop.wait(max(0.0, t0 + sent / rate - time.monotonic())):
                break  # peer closing
        if sent == count:
            with self._cond:
                seg = frames.udp(self._ip, dst, src_port, dst_port, udpseq.END)
                packet = frames.ipv4(self._ip, dst, frames.IPPROTO_UDP, seg, self._next_ident())
                self._send(frames.ether(dst_mac, self.mac, frames.ETH_P_IP, packet))
        return sent

    def ping(self, dst_ip: str, ident: int, seq: int, timeout: float) -> None:
        """Send one ICMP echo request to ``dst_ip`` and wait for its reply: a sentinel (the
        wire is FIFO, so everything sent before it was delivered once the reply is here)."""
        dst_mac = self.resolve(dst_ip, timeout)
        dst = frames.ip_bytes(dst_ip)
        body = frames.icmp_echo(frames.ICMP_ECHO_REQUEST, ident, seq, b"vdpa-sentinel")
        packet = frames.ipv4(self._ip, dst, frames.IPPROTO_ICMP, body, self._next_ident())
        want = (dst_ip, ident, seq)
        with self._cond:
            self._send(frames.ether(dst_mac, self.mac, frames.ETH_P_IP, packet))
            if not self._cond.wait_for(lambda: want in self.echo_replies, timeout):
                raise PeerTimeout(
                    f"echo reply {ident}/{seq} from {dst_ip}", timeout, f"{dict(self.counters)}"
                )

    # -- observation -------------------------------------------------------------------------
    def expect_stream(self, port: int, count: int) -> udpseq.SeqStats:
        with self._cond:
            stats = self.streams[port] = udpseq.SeqStats(count)
            return stats

    def wait_stream(self, port: int, timeout: float) -> udpseq.SeqStats:
        """Wait for the end-of-stream sentinel of the stream to ``port``: then everything the
        sender sent before it has been counted (duplicates too). PeerTimeout shows what
        arrived. Whether the stream is complete is the caller's check."""
        with self._cond:
            stats = self.streams[port]
            if not self._cond.wait_for(lambda: stats.ended, timeout):
                raise PeerTimeout(
                    f"the end-of-stream sentinel of the udpseq stream to port {port}",
                    timeout,
                    f"{stats.as_dict()}, peer counters {dict(self.counters)}",
                )
            return stats

    def wait_counter(self, name: str, minimum: int, timeout: float) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: self.counters[name] >= minimum, timeout):
                raise PeerTimeout(
                    f"peer counter {name} >= {minimum}", timeout, f"{dict(self.counters)}"
                )
            return self.counters[name]

    def snapshot(self) -> dict[str, object]:
        with self._cond:
            return {
                "counters": dict(self.counters),
                "neighbors": {ip: frames.mac_str(m) for ip, m in self.neighbors.items()},
                "streams": {port: s.as_dict() for port, s in self.streams.items()},
            }
