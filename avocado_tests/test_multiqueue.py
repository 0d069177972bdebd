"""Two queue pairs with two vCPUs: traffic must use both TX queues of the backend."""

from __future__ import annotations

from avocado_tests.base import VdpaGuestTest, tx_queue
from guest_images import udpseq

PAIRS = 2
COUNT = 500
SIZE = 600
RATE = 250
PORTS = (5011, 5012)


class MultiQueue(VdpaGuestTest):
    """:avocado: tags=net,mq"""

    def test_two_queue_pairs(self) -> None:
        """:avocado: tags=ci"""
        self.two_queue_pairs()

    def test_drop_tx_is_caught(self) -> None:
        """The backend completes TX chains of both queues without sending the frames.

        :avocado: tags=fault
        """
        self.expect_caught("drop-tx", self.two_queue_pairs)

    def two_queue_pairs(self) -> None:
        """The scenario: raises AssertionError (or a bounded wait's timeout) on what it catches."""
        self.require_udpseq()
        if self.netdev != "vhost-user":
            self.cancel("multiqueue needs the vhost-user backend")
        vm = self.boot_guest([self.start_network(queues=PAIRS)], smp=PAIRS)
        assert self.peer is not None

        queues = vm.run("ls /sys/class/net/eth0/queues").split()
        self.assertEqual(sorted(queues), ["rx-0", "rx-1", "tx-0", "tx-1"])
        self.assertEqual(vm.run("nproc"), str(PAIRS))
        # virtio_net maps CPU k to TX queue k through XPS: log it, pinned senders rely on it
        self.log.info("xps: %s", vm.run("cat /sys/class/net/eth0/queues/tx-*/xps_cpus"))
        self.guest_ping(vm, 1)
        before = self.vring_packets()

        for port in PORTS:
            self.peer.expect_stream(port, COUNT)
        out = vm.run(
            " & ".join(
                f"udpseq send {self.PEER_IP} {port} {COUNT} {SIZE} {RATE} {cpu} > /tmp/send{cpu}"
                for cpu, port in enumerate(PORTS)
            )
            + " & wait; cat /tmp/send0 /tmp/send1",
            timeout=60 + COUNT / RATE,
        )
        reports = [
            udpseq.parse_report(line, "send") for line in out.splitlines() if "send:" in line
        ]
        self.assertEqual([r["sent"] for r in reports], [COUNT] * PAIRS, out)
        for port in PORTS:
            stats = self.peer.wait_stream(port, timeout=30)
            self.facts[f"stream_{port}"] = stats.as_dict()
            self.assertEqual((stats.unique, stats.dups, stats.corrupt), (COUNT, 0, 0), stats)

        after = self.vring_packets()
        self.facts["vring_packets"] = after
        for pair in range(PAIRS):
            q = tx_queue(pair)
            delta = after.get(q, 0) - before.get(q, 0)
            self.assertGreater(delta, 0, f"TX queue {q} carried nothing: {before} -> {after}")
        total = sum(after.get(tx_queue(p), 0) - before.get(tx_queue(p), 0) for p in range(PAIRS))
        self.assertGreaterEqual(total, COUNT * PAIRS)
        self.assert_no_backend_errors()
