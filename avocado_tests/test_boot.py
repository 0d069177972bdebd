"""Boot the real guest on a virtio-net NIC and check the link from both sides."""

from __future__ import annotations

from avocado_tests.base import (
    DRIVER_OK,
    VdpaGuestTest,
    entry_queue,
    entry_status,
    rx_queue,
    tx_queue,
)


class BootLinkUp(VdpaGuestTest):
    """Guest boots on the vhost-user backend; eth0 exists, has our MAC, carrier is up.

    :avocado: tags=ci,boot
    """

    def test_link_up(self) -> None:
        nic = self.start_network()
        vm = self.boot_guest([nic])

        self.assertIn("eth0", vm.boot.interfaces, vm.boot.transcript[-2000:])
        self.assertEqual(vm.run("cat /sys/class/net/eth0/address"), self.GUEST_MAC)
        self.assertEqual(vm.run("cat /sys/class/net/eth0/carrier"), "1", "no carrier on eth0")
        self.assertEqual(vm.run("cat /sys/class/net/eth0/operstate"), "up")
        driver = vm.run("basename $(readlink /sys/class/net/eth0/device/driver)")
        self.assertEqual(driver, "virtio_net")
        self.assertIn(f"inet {self.GUEST_IP}/{self.PREFIX}", vm.run("ip -4 addr show dev eth0"))

        if self.netdev != "vhost-user":
            return
        journal = self.backend_journal()
        kinds = {e.get("kind") for e in journal}
        self.assertIn("mem.add", kinds, "no guest memory region reached the backend")
        statuses = [entry_status(e) for e in journal if e.get("kind") == "status.set"]
        self.assertTrue(
            any(s is not None and s & DRIVER_OK for s in statuses),
            f"backend never saw DRIVER_OK; status.set entries: {statuses}",
        )
        started = {entry_queue(e) for e in journal if e.get("kind") == "vq.start"}
        self.assertLessEqual({rx_queue(0), tx_queue(0)}, started, f"vq.start for {started}")
        self.assert_no_backend_errors()


class BootLinkUpBuiltin(BootLinkUp):
    """Harness self-check: the same boot on QEMU's built-in dgram netdev (no backend).

    :avocado: tags=ci,selfcheck
    """

    NETDEV = "dgram"
