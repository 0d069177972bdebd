"""Memory hotplug with a real guest while a numbered UDP stream runs through the backend.

The guest boots with ``memhp_default_state=online_movable``: its kernel is the ACPI OSPM, onlines
a hotplugged DIMM by itself, and can offline and eject it again on ``device_del``. While the guest
streams numbered datagrams to the peer, the test plugs a DIMM, waits for the guest to online it,
unplugs it again and waits for DEVICE_DELETED. Nothing of the stream may be lost, duplicated or
corrupted, and the backend must have seen exactly one ADD_MEM_REG and one REM_MEM_REG, both for
the DIMM QEMU reports.

`KernelMemoryDimm` plugs a DIMM the guest onlines as ordinary kernel memory (ZONE_NORMAL) while
numbered streams run both ways, and proves from the backend's per-region ``written`` counter
(query-mem-table) that RX buffers the guest allocated afterwards live in the DIMM.
"""

from __future__ import annotations

import re
import threading

from avocado_tests.base import VdpaGuestTest, rx_queue, tx_queue
from guest_images import udpseq
from qtests.guest.vm import GuestVM
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
    """:avocado: tags=net,memory"""

    def online_blocks(self, vm: GuestVM) -> int:
        out = vm.run(f"cat {MEMORY_SYSFS}/memory*/state | grep -c '^online'")
        return int(out.strip().splitlines()[-1])

    def test_dimm_plug_unplug_during_stream(self) -> None:
        """:avocado: tags=ci"""
        self.dimm_plug_unplug_during_stream()

    def test_ignore_rem_mem_reg_is_caught(self) -> None:
        """The backend acknowledges REM_MEM_REG but keeps the DIMM mapped: the scenario's
        check that the backend removed exactly the DIMM QEMU unplugged must fail.

        :avocado: tags=fault
        """
        self.expect_caught("ignore-rem-mem-reg", self.dimm_plug_unplug_during_stream)

    def dimm_plug_unplug_during_stream(self) -> None:
        """The scenario: raises AssertionError (or a bounded wait's timeout) on what it catches."""
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


KERNEL_DIMM_SIZE = 256 << 20
KERNEL_COUNT = 4000
KERNEL_RATE = 500  # packets/s each way: an 8 s stream
TX_PORT = 5004  # guest -> peer
RX_PORT = 5005  # peer -> guest
RX_OUT = "/tmp/udpseq-rx.out"
TX_OUT = "/tmp/udpseq-tx.out"
#: What the base-RAM fill leaves available to the guest kernel (MiB).
LEAVE_MB = 48


class KernelMemoryDimm(VdpaGuestTest):
    """:avocado: tags=ci,net,memory"""

    def test_rx_buffers_in_a_kernel_dimm(self) -> None:
        """Boot with hotplugged memory left offline (memhp_default_state=offline), fill a tmpfs
        until ~48 MiB of base RAM are left, then -- with a numbered stream running each way --
        plug a DIMM and online its blocks as online_kernel. Kernel allocations (RX buffers,
        skbs) can use it, and ZONE_NORMAL (above 4 GiB) is the page allocator's first choice
        over the nearly exhausted DMA32 base RAM: RX buffers posted after the online land in
        the DIMM. Evidence: the backend wrote RX data into the DIMM's region. Nothing of
        either stream may be lost, duplicated or corrupted."""
        self.require_udpseq()
        if self.netdev != "vhost-user":
            self.cancel("the scenario reads the vhost-user backend's memory table")
        nic = self.start_network()
        vm = self.boot_guest(
            [nic], kernel_args=["memhp_default_state=offline"], slots=2, maxmem_mb=1024
        )
        assert self.peer is not None and self.backend is not None and vm.qmp is not None
        peer, backend = self.peer, self.backend
        self.guest_ping(vm, 1)
        blocks_before = self.memory_blocks(vm)
        available = self.fill_base_ram(vm)

        vm.run(f"udpseq recv {RX_PORT} {KERNEL_COUNT} 90 > {RX_OUT} 2>&1 &")
        poll_until(lambda: "listening" in vm.run(f"cat {RX_OUT}"), 15, "udpseq recv to listen")
        tx = peer.expect_stream(TX_PORT, KERNEL_COUNT)
        sender = threading.Thread(
            target=peer.send_stream,
            args=(self.GUEST_IP, RX_PORT, KERNEL_COUNT, SIZE, KERNEL_RATE),
            name="peer-stream",
            daemon=True,
        )
        self.register_cleanup("join the peer's sender", lambda: sender.join(30))
        sender.start()
        vm.run(
            f"udpseq send {self.PEER_IP} {TX_PORT} {KERNEL_COUNT} {SIZE} {KERNEL_RATE} "
            f"> {TX_OUT} 2>&1 &"
        )
        poll_until(lambda: tx.unique >= 100, 20, "the guest's stream to get going")

        mark = backend.mark()
        dev = DimmHotplug(vm.qmp).plug(KERNEL_DIMM_SIZE)
        at_plug = tx.unique
        written_at_plug = self.dimm_written(dev.addr)
        want = blocks_before + KERNEL_DIMM_SIZE // self.block_size(vm)
        poll_until(lambda: self.memory_blocks(vm) == want, 20, f"{want} memory blocks")
        vm.run(
            f"for f in {MEMORY_SYSFS}/memory*/state; do "
            "grep -q offline $f && echo online_kernel > $f; done"
        )
        zones = vm.run(f"cat {MEMORY_SYSFS}/memory*/valid_zones | sort | uniq -c")
        self.assertEqual(self.online_blocks(vm), want, "not every memory block is online")
        self.assertIn("Normal", zones, zones)
        self.assertNotIn("Movable", zones, zones)
        at_online = tx.unique

        sender.join(KERNEL_COUNT / KERNEL_RATE + 30)
        self.assertFalse(sender.is_alive(), "the peer's stream did not finish")
        rx_report = udpseq.parse_report(vm.run(f"wait; cat {RX_OUT}", timeout=120), "recv")
        tx_report = udpseq.parse_report(vm.run(f"cat {TX_OUT}"), "send")
        self.facts.update(
            wire=backend.cmd("query-wire"),
            vring_packets=self.vring_packets(),
            guest_tx_dropped=vm.run("cat /sys/class/net/eth0/statistics/tx_dropped").strip(),
            peer=peer.snapshot()["counters"],
        )
        final = peer.wait_stream(TX_PORT, timeout=30)
        written = self.dimm_written(dev.addr)
        self.facts.update(
            rx=rx_report, tx=final.as_dict(), at_plug=at_plug, at_online=at_online,
            dimm=hex(dev.addr), available_mb_after_fill=available, zones=zones,
            dimm_written_at_plug=written_at_plug, dimm_written=written,
        )  # fmt: skip
        self.assertEqual(
            (rx_report["unique"], rx_report["dups"], rx_report["corrupt"], rx_report["end"]),
            (KERNEL_COUNT, 0, 0, 1),
            rx_report,
        )
        self.assertEqual((tx_report["sent"], tx_report["errors"]), (KERNEL_COUNT, 0), tx_report)
        self.assertEqual((final.unique, final.dups, final.corrupt), (KERNEL_COUNT, 0, 0), final)
        self.assertTrue(at_online < KERNEL_COUNT, "the DIMM came online after the stream ended")
        self.assertEqual(written_at_plug, 0, "the backend wrote into the DIMM before the guest")
        # most of the stream after the online went into the DIMM (headers + payload): about
        # all of it in practice, ZONE_NORMAL being the page allocator's first choice
        self.assertGreater(written, (KERNEL_COUNT - at_online) // 2 * SIZE, self.facts)

        adds = [(e["gpa"], e["size"]) for e in backend.journal(["mem.add"], mark)]
        self.assertEqual(adds, [(dev.addr, dev.size)])
        packets = self.vring_packets()
        self.assertGreaterEqual(packets.get(rx_queue(0), 0), KERNEL_COUNT)
        self.assert_no_backend_errors()

    # -- guest memory ------------------------------------------------------------------------
    def memory_blocks(self, vm: GuestVM) -> int:
        return int(vm.run(f"ls -d {MEMORY_SYSFS}/memory[0-9]* | wc -l").strip().splitlines()[-1])

    def online_blocks(self, vm: GuestVM) -> int:
        out = vm.run(f"cat {MEMORY_SYSFS}/memory*/state | grep -c '^online'")
        return int(out.strip().splitlines()[-1])

    def block_size(self, vm: GuestVM) -> int:
        return int(vm.run(f"cat {MEMORY_SYSFS}/block_size_bytes").strip(), 16)

    def fill_base_ram(self, vm: GuestVM) -> int:
        """Fill a tmpfs until about LEAVE_MB MiB stay available; returns what is left (MiB)."""
        meminfo = vm.run("grep MemAvailable /proc/meminfo")
        fill = int(meminfo.split()[1]) // 1024 - LEAVE_MB
        self.assertGreater(fill, 0, meminfo)
        vm.run(
            f"mkdir -p /mnt/fill && mount -t tmpfs -o size={fill + 8}m tmpfs /mnt/fill && "
            f"dd if=/dev/zero of=/mnt/fill/ballast bs=1M count={fill} 2>/dev/null",
            timeout=120,
        )
        left = int(vm.run("grep MemAvailable /proc/meminfo").split()[1]) // 1024
        self.log.info("filled %d MiB of base RAM, %d MiB available", fill, left)
        return left

    def dimm_written(self, gpa: int) -> int:
        """Bytes the backend wrote into the region at ``gpa`` (query-mem-table)."""
        assert self.backend is not None
        for r in self.backend.cmd("query-mem-table")["regions"]:
            if r["gpa"] == gpa:
                return int(r["written"])
        raise AssertionError(f"the backend has no region at {gpa:#x}")
