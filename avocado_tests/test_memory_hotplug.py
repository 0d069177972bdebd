"""Memory hotplug with a real guest while a numbered UDP stream runs through the backend.

The guest boots with ``memhp_default_state=online_movable``: its kernel is the ACPI OSPM, onlines
a hotplugged DIMM by itself, and can offline and eject it again on ``device_del``. While the guest
streams numbered datagrams to the peer, the test plugs a DIMM, waits for the guest to online it,
unplugs it again and waits for DEVICE_DELETED. Nothing of the stream may be lost, duplicated or
corrupted, and the backend must have seen exactly one ADD_MEM_REG and one REM_MEM_REG, both for
the DIMM QEMU reports.
"""

from __future__ import annotations

import re

from avocado_tests.base import VdpaGuestTest, tx_queue
from avocado_tests.guest_vm import GuestVM
from guest_images import udpseq
from qtests.qos.memory_devices import DimmHotplug
from qtests.qos.waiting import poll_until

COUNT = 3000
SIZE = 1000
RATE = 500  # packets/s: a 6 s stream
PORT = 5003
DIMM_SIZE = 128 << 20
MEMORY_SYSFS = "/sys/devices/system/memory"
OUT = "/tmp/udpseq-hotplug.out"


class MemoryHotplugStream(VdpaGuestTest):
    """:avocado: tags=ci,net,memory"""

    def online_blocks(self, vm: GuestVM) -> int:
        out = vm.run(f"cat {MEMORY_SYSFS}/memory*/state | grep -c '^online'")
        return int(out.strip().splitlines()[-1])

    def test_dimm_plug_unplug_during_stream(self) -> None:
        self.require_udpseq()
        if self.netdev != "vhost-user":
            self.cancel("the scenario checks the vhost-user backend's memory table")
        nic = self.start_network()
        vm = self.boot_guest(
            [nic], kernel_args=["memhp_default_state=online_movable"], slots=4, maxmem_mb=2048
        )
        assert self.peer is not None and self.backend is not None and vm.qmp is not None
        self.guest_ping(vm, 1)
        block = int(vm.run(f"cat {MEMORY_SYSFS}/block_size_bytes").strip(), 16)
        online = self.online_blocks(vm)
        mark = self.backend.mark()
        packets = self.vring_packets().get(tx_queue(0), 0)
        dimms = DimmHotplug(vm.qmp)  # the guest kernel is the OSPM

        stats = self.peer.expect_stream(PORT, COUNT)
        vm.run(f"udpseq send {self.PEER_IP} {PORT} {COUNT} {SIZE} {RATE} > {OUT} 2>&1 &")
        poll_until(lambda: stats.unique >= 100, 20, "the stream to get going")

        dev = dimms.plug(DIMM_SIZE)
        at_plug = stats.unique
        vm.qmp.wait_event("ACPI_DEVICE_OST", 10, match=lambda e: e["data"]["info"]["source"] == 1)
        want = online + DIMM_SIZE // block
        poll_until(lambda: self.online_blocks(vm) == want, 20, f"{want} online memory blocks")
        dimms.unplug(dev.id, timeout=30)
        at_unplug = stats.unique
        self.assertEqual(self.online_blocks(vm), online, "the DIMM's blocks are still online")

        report = vm.run(f"wait; cat {OUT}", timeout=60)
        sent = udpseq.parse_report(report, "send")
        self.assertEqual((sent["sent"], sent["errors"]), (COUNT, 0), report)
        final = self.peer.wait_stream(PORT, timeout=30)
        self.facts.update(
            stream=final.as_dict(), at_plug=at_plug, at_unplug=at_unplug, dimm=hex(dev.addr)
        )
        self.assertEqual((final.unique, final.dups, final.corrupt), (COUNT, 0, 0), final)
        self.assertTrue(0 < at_plug and at_unplug < COUNT, "the plug/unplug missed the stream")

        requests = [
            e["request"]
            for e in self.backend.journal(["vhost.msg"], mark)
            if re.fullmatch(r"(ADD|REM)_MEM_REG|SET_MEM_TABLE", e["request"])
        ]
        self.assertEqual(requests, ["ADD_MEM_REG", "REM_MEM_REG"])
        for kind in ("mem.add", "mem.remove"):
            got = [(e["gpa"], e["size"]) for e in self.backend.journal([kind], mark)]
            self.assertEqual(got, [(dev.addr, dev.size)], kind)
        after = self.vring_packets().get(tx_queue(0), 0)
        self.assertGreaterEqual(after - packets, COUNT)
        self.assert_no_backend_errors()
