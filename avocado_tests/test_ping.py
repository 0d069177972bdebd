"""The guest pings the peer through the NIC: ARP and ICMP echo both ways."""

from __future__ import annotations

from avocado_tests.base import VdpaGuestTest, tx_queue
from qtests.guest import frames

PINGS = 5


class PingPeer(VdpaGuestTest):
    """Guest -> backend -> UDP wire -> peer and back.

    :avocado: tags=ci,net
    """

    def test_ping(self) -> None:
        nic = self.start_network()
        vm = self.boot_guest([nic])
        assert self.peer is not None

        self.guest_ping(vm, PINGS)

        snap = self.peer.snapshot()
        counters = snap["counters"]
        self.assertGreaterEqual(counters.get("arp_requests", 0), 1, snap)
        self.assertEqual(counters.get("icmp_echo_requests"), PINGS, snap)
        self.assertEqual(counters.get("icmp_echo_replies_sent"), PINGS, snap)
        self.assertEqual(
            snap["neighbors"].get(self.GUEST_IP), self.GUEST_MAC, "peer learned the wrong MAC"
        )
        self.assertEqual([s for _, _, s in self.peer.echo_requests], list(range(PINGS)))
        neigh = vm.run(f"ip neigh show {self.PEER_IP}")
        self.assertIn(frames.mac_str(frames.mac_bytes(self.PEER_MAC)), neigh)

        if self.netdev != "vhost-user":
            return
        packets = self.vring_packets()
        self.assertGreaterEqual(
            packets.get(tx_queue(0), 0), PINGS + 1, f"TX vring counters: {packets}"
        )
        self.assert_no_backend_errors()


class PingPeerBuiltin(PingPeer):
    """Harness self-check on QEMU's built-in dgram netdev.

    :avocado: tags=ci,selfcheck
    """

    NETDEV = "dgram"
