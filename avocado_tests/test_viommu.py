"""A real guest behind an emulated Intel IOMMU: numbered UDP streams both ways, translated.

``-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,device-iotlb=on,caching-mode=on``,
the NIC behind a pcie-root-port with ``iommu_platform=on,ats=on``, guest kernel
``intel_iommu=on iommu.strict=1``: every buffer the guest's DMA API maps is an IOVA the
backend learns through IOTLB MISS -> UPDATE, and every unmap reaches it as an INVALIDATE
(strict mode: before the guest reuses the IOVA).  No datagram may be lost, duplicated or
corrupted, and the backend journal must show the three kinds of IOTLB traffic.

The virtio-iommu variant runs the same streams with ``-device virtio-iommu-pci`` (QEMU
describes it to the guest in an ACPI VIOT table) in front of the same root port and NIC,
guest kernel ``iommu.strict=1``. The Debian kernel has ``CONFIG_VIRTIO_IOMMU=m``: the guest
image ships virtio_iommu.ko and init loads it before virtio_net; the NIC's PCI probe is
deferred until the IOMMU driver registers. The guest's virtio-iommu driver never enables ATS,
so QEMU sends plain UNMAP notifications: the backend still sees MISS -> UPDATE per new
IOVA and an INVALIDATE per strict unmap.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from avocado_tests.base import VdpaGuestTest, rx_queue, tx_queue
from guest_images import udpseq
from qtests.guest.vm import GuestVM, VhostUserNic

COUNT = 500
SIZE = 1000  # one Ethernet frame, no IP fragments
RATE = 250
GUEST_TO_PEER_PORT = 5021
PEER_TO_GUEST_PORT = 5022

MACHINE_OPTS = ["kernel-irqchip=split"]
PRE_NIC_ARGS = [
    "-device", "intel-iommu,intremap=on,device-iotlb=on,caching-mode=on",
    "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
]  # fmt: skip
NIC_PROPS = "bus=rp0,iommu_platform=on,ats=on,disable-legacy=on"
KERNEL_ARGS = ["intel_iommu=on", "iommu.strict=1"]

#: virtio-iommu before the root port (QEMU lists the endpoints it translates in the VIOT)
VIRTIO_IOMMU_PRE_NIC_ARGS = [
    "-device", "virtio-iommu-pci,id=viommu0",
    "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
]  # fmt: skip
#: the NIC's probe waits for the virtio_iommu module (init loads it within a second or two of
#: late_initcall, but TCG is slow): do not let the default 10 s deferred-probe timeout expire
VIRTIO_IOMMU_KERNEL_ARGS = ["iommu.strict=1", "deferred_probe_timeout=60"]


class ViommuUdpStream(VdpaGuestTest):
    """:avocado: tags=net,udp,viommu"""

    def test_streams_through_intel_iommu(self) -> None:
        """:avocado: tags=ci"""
        self.streams_through_intel_iommu()

    def test_translate_by_gpa_is_caught(self) -> None:
        """The backend reads IOVAs as guest-physical addresses: nothing the guest sends or
        posts is reached, the streams (already the ping before them) must fail.

        :avocado: tags=fault
        """
        self.expect_caught("translate-by-gpa", self.streams_through_intel_iommu)

    def streams_through_intel_iommu(self) -> None:
        """The scenario: raises AssertionError (or a bounded wait's timeout) on what it catches."""
        vm = self.boot_behind_iommu(KERNEL_ARGS, MACHINE_OPTS, PRE_NIC_ARGS)
        self.assertIn("dmar", vm.run("ls /sys/class/iommu"))
        self.run_streams(vm)

    def test_streams_through_virtio_iommu(self) -> None:
        """:avocado: tags=ci"""
        self.streams_through_virtio_iommu()

    def test_translate_by_gpa_is_caught_behind_virtio_iommu(self) -> None:
        """The same fault behind the virtio-iommu (plain UNMAP notifications, no ATS).

        :avocado: tags=fault
        """
        self.expect_caught("translate-by-gpa", self.streams_through_virtio_iommu)

    def streams_through_virtio_iommu(self) -> None:
        """The scenario: raises AssertionError (or a bounded wait's timeout) on what it catches."""
        vm = self.boot_behind_iommu(VIRTIO_IOMMU_KERNEL_ARGS, [], VIRTIO_IOMMU_PRE_NIC_ARGS)
        # the IOMMU the guest registered is the virtio-iommu's virtio device (no DMAR unit)
        units = vm.run("ls /sys/class/iommu").split()
        drivers = vm.run(
            "for u in /sys/class/iommu/*; do basename $(readlink -f $u/device/driver); done"
        ).split()
        self.facts["iommu_units"] = dict(zip(units, drivers, strict=False))
        self.assertEqual(drivers, ["virtio_iommu"], self.facts["iommu_units"])
        self.run_streams(vm)

    def boot_behind_iommu(
        self, kernel_args: list[str], machine_opts: list[str], pre_nic_args: list[str]
    ) -> GuestVM:
        """The NIC behind the root port, translated by the IOMMU ``pre_nic_args`` create."""
        self.require_udpseq()
        if self.netdev != "vhost-user":
            self.cancel("the IOTLB checks need the vhost-user backend")
        nic = self.start_network()
        assert isinstance(nic, VhostUserNic)
        nic = dataclasses.replace(nic, device_props=NIC_PROPS)
        vm = self.boot_guest(
            [nic], kernel_args=kernel_args, machine_opts=machine_opts, pre_nic_args=pre_nic_args
        )
        # the guest really translates: the NIC (the PCI parent of the virtio device) sits in
        # an IOMMU group of its own
        group = vm.run("ls /sys/class/net/eth0/device/../iommu_group/devices").split()
        self.assertEqual(len(group), 1, f"the NIC's IOMMU group: {group}")  # 0000:01:00.0
        self.facts["iommu_group_devices"] = group
        return vm

    def run_streams(self, vm: GuestVM) -> None:
        """Both numbered streams, each exactly once and intact, with IOTLB traffic meanwhile."""
        assert self.peer is not None and vm.console is not None and self.backend is not None
        self.guest_ping(vm, 1)
        before = self.vring_packets()
        mark = self.backend.mark()

        # guest -> peer
        self.peer.expect_stream(GUEST_TO_PEER_PORT, COUNT)
        self.guest_udp_send(vm, GUEST_TO_PEER_PORT, COUNT, SIZE, RATE)
        out_stats = self.peer.wait_stream(GUEST_TO_PEER_PORT, timeout=30)
        self.facts["guest_to_peer"] = out_stats.as_dict()
        self.assertEqual((out_stats.unique, out_stats.dups, out_stats.corrupt), (COUNT, 0, 0))
        self.assertEqual(self.peer.snapshot()["counters"].get("udp_bad_checksum", 0), 0)

        # peer -> guest
        pending = vm.console.start(f"udpseq recv {PEER_TO_GUEST_PORT} {COUNT} 60")
        vm.console.read_until(r"udpseq recv: listening[^\n]*\n", 15, "udpseq recv to listen")
        self.assertEqual(
            self.peer.send_stream(self.GUEST_IP, PEER_TO_GUEST_PORT, COUNT, SIZE, RATE), COUNT
        )
        result = vm.console.finish(pending, timeout=90)
        report = udpseq.parse_report(result.output, "recv")
        self.facts["peer_to_guest"] = report
        self.assertEqual(
            (report["unique"], report["dups"], report["corrupt"], report["end"]),
            (COUNT, 0, 0, 1),
            result.output,
        )
        self.assertEqual(result.rc, 0, result.output)

        after = self.vring_packets()
        self.assertGreaterEqual(after.get(tx_queue(0), 0) - before.get(tx_queue(0), 0), COUNT)
        self.assertGreaterEqual(after.get(rx_queue(0), 0) - before.get(rx_queue(0), 0), COUNT)
        self.check_iotlb_traffic(mark)
        self.assert_no_backend_errors()

    def check_iotlb_traffic(self, mark: int) -> None:
        """MISS, UPDATE and INVALIDATE all happened during the streams; the UPDATEs are real
        remappings (IOVA != guest-physical address) and each MISS was answered."""
        assert self.backend is not None
        kinds = ["iotlb.miss_sent", "iotlb.miss_ack", "iotlb.update", "iotlb.invalidate"]
        entries = self.backend.journal(kinds, since=mark)
        count = {k: sum(1 for e in entries if e["kind"] == k) for k in kinds}
        self.facts["iotlb"] = count
        self.log.info("IOTLB traffic during the streams: %s", count)
        for k in kinds:
            self.assertGreater(count[k], 0, f"no {k} during the streams: {count}")
        refused = [e for e in entries if e["kind"] == "iotlb.miss_ack" and e["status"] != 0]
        self.assertEqual(refused, [], "QEMU refused MISSes for the guest's own buffers")
        regions = self.backend.cmd("query-mem-table")["regions"]

        def gpa(uaddr: int) -> int | None:
            for r in regions:
                if r["uaddr"] <= uaddr < r["uaddr"] + r["size"]:
                    return int(r["gpa"]) + uaddr - int(r["uaddr"])
            return None

        updates: list[dict[str, Any]] = [e for e in entries if e["kind"] == "iotlb.update"]
        remapped = [e for e in updates if gpa(int(e["uaddr"])) != int(e["iova"])]
        self.assertTrue(remapped, "every UPDATE was an identity mapping: no translation")
        self.facts["remapped_updates"] = len(remapped)
