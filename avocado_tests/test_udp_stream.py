"""Numbered UDP streams in both directions: nothing lost, duplicated or corrupted."""

from __future__ import annotations

from avocado_tests.base import VdpaGuestTest, rx_queue, tx_queue
from guest_images import udpseq

COUNT = 1000
SIZE = 1000  # one Ethernet frame, no IP fragments
RATE = 500  # packets/s: a lossless stream, not a throughput test
GUEST_TO_PEER_PORT = 5001
PEER_TO_GUEST_PORT = 5002


class UdpStream(VdpaGuestTest):
    """:avocado: tags=net,udp"""

    def test_guest_to_peer(self) -> None:
        """:avocado: tags=ci"""
        self.guest_to_peer()

    def test_drop_tx_is_caught(self) -> None:
        """The backend completes TX chains without sending the frames: the peer's count of
        the guest's stream must fall short.

        :avocado: tags=fault
        """
        self.expect_caught("drop-tx", self.guest_to_peer)

    def guest_to_peer(self) -> None:
        """The scenario: raises AssertionError (or a bounded wait's timeout) on what it catches."""
        self.require_udpseq()
        vm = self.boot_guest([self.start_network()])
        assert self.peer is not None
        self.guest_ping(vm, 1)  # resolves ARP so no datagram waits on the neighbour queue
        before = self.vring_packets() if self.netdev == "vhost-user" else {}

        self.peer.expect_stream(GUEST_TO_PEER_PORT, COUNT)
        self.guest_udp_send(vm, GUEST_TO_PEER_PORT, COUNT, SIZE, RATE)
        stats = self.peer.wait_stream(GUEST_TO_PEER_PORT, timeout=30)

        self.facts["guest_to_peer"] = stats.as_dict()
        self.assertEqual((stats.unique, stats.dups, stats.corrupt), (COUNT, 0, 0), stats)
        self.assertEqual(self.peer.snapshot()["counters"].get("udp_bad_checksum", 0), 0)
        tx = int(vm.run("cat /sys/class/net/eth0/statistics/tx_packets"))
        self.assertGreaterEqual(tx, COUNT)
        if self.netdev == "vhost-user":
            after = self.vring_packets()
            q = tx_queue(0)
            self.assertGreaterEqual(after.get(q, 0) - before.get(q, 0), COUNT, after)
            self.assert_no_backend_errors()

    def test_peer_to_guest(self) -> None:
        """:avocado: tags=ci"""
        self.require_udpseq()
        vm = self.boot_guest([self.start_network()])
        assert self.peer is not None and vm.console is not None
        self.guest_ping(vm, 1)
        before = self.vring_packets() if self.netdev == "vhost-user" else {}

        pending = vm.console.start(f"udpseq recv {PEER_TO_GUEST_PORT} {COUNT} 60")
        vm.console.read_until(r"udpseq recv: listening[^\n]*\n", 15, "udpseq recv to listen")
        sent = self.peer.send_stream(self.GUEST_IP, PEER_TO_GUEST_PORT, COUNT, SIZE, RATE)
        self.assertEqual(sent, COUNT)
        result = vm.console.finish(pending, timeout=90)
        report = udpseq.parse_report(result.output, "recv")

        self.facts["peer_to_guest"] = report
        self.assertEqual(
            (report["unique"], report["dups"], report["corrupt"], report["end"]),
            (COUNT, 0, 0, 1),
            result.output,
        )
        self.assertEqual(result.rc, 0, result.output)
        if self.netdev == "vhost-user":
            after = self.vring_packets()
            q = rx_queue(0)
            self.assertGreaterEqual(after.get(q, 0) - before.get(q, 0), COUNT, after)
            self.assert_no_backend_errors()


class UdpStreamBuiltin(UdpStream):
    """Harness self-check on QEMU's built-in dgram netdev.

    :avocado: tags=selfcheck
    """

    NETDEV = "dgram"
