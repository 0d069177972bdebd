"""Live migration of a real guest with numbered UDP streams running in both directions.

Topology: one `UdpPeer` (10.0.0.1); the source QEMU's NIC on backend A and the destination
QEMU's NIC (``-incoming defer``, identical command line otherwise) on backend B, both backends
wired to the same peer port (the peer accepts frames from any sender). When the source reports
``completed`` the peer is re-pointed at B (what a switch learning the guest's MAC from the
RARP / announce does); B announces the guest (SEND_RARP) on its wire.

What must hold:

* guest -> peer: every datagram exactly once, intact. The guest is paused during the downtime
  and TX chains A had not finished are handed to B through last_avail_idx: no loss at all.
* peer -> guest: no duplicate, nothing corrupt. Loss is allowed only for datagrams that
  reached A after its RX ring stopped (A's RX backlog / drops, they never reach guest memory):
  ``guest lost <= A's undelivered RX frames`` and, as a documented bound, at most what the
  peer sends between A's ring stop and its re-pointing:
  ``RATE * (downtime + REPOINT_SLACK_S)`` (+ ``LOSS_MARGIN``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from avocado_tests import frames
from avocado_tests.base import VdpaGuestTest, rx_queue
from avocado_tests.guest_vm import GuestVM, VhostUserNic, VmConfig
from avocado_tests.pcap import GLOBAL_HEADER, RECORD_HEADER
from avocado_tests.ports import free_udp_port
from backends.net.config import VIRTIO_NET_F_GUEST_ANNOUNCE
from guest_images import udpseq
from qtests.qos.backend_process import BackendProcess
from qtests.qos.migration import MigrationStats, enable_migration_events

COUNT = 3000
SIZE = 1000
RATE = 500  # per direction: a 6 s stream, the migration in its middle
GUEST_TO_PEER_PORT = 5001
PEER_TO_GUEST_PORT = 5002
#: Peer re-pointing delay allowed after the source's ``completed`` (QMP event + test thread).
REPOINT_SLACK_S = 0.3
LOSS_MARGIN = 3
#: The guest's receiver gives up this long after it started (the stream takes COUNT / RATE).
RECV_TIMEOUT_S = 20
ETH_P_RARP = 0x8035


class LiveMigration(VdpaGuestTest):
    """:avocado: tags=ci,net,migration"""

    timeout = 240

    def start_destination_backend(self, peer_port: int) -> tuple[BackendProcess, int]:
        wire_port = free_udp_port()
        backend = BackendProcess(self.artifacts, name="backend-dst", run_dir=self.rundir,
                                 wire=f"udp:127.0.0.1:{wire_port}:{peer_port}",
                                 mac=self.GUEST_MAC, log=self.log)  # fmt: skip

        def stop() -> None:
            rc = backend.stop()
            if rc not in (0, None):
                raise AssertionError(f"destination backend exited with {rc} on SIGTERM")

        self.register_cleanup("stop destination backend", stop)
        backend.start()
        return backend, wire_port

    def start_destination_vm(self, backend: BackendProcess, source: GuestVM) -> GuestVM:
        rundir = self.rundir / "dst"
        logdir = self.artifacts / "destination"
        rundir.mkdir()
        logdir.mkdir()
        cfg = source.config
        dst_cfg = VmConfig(nics=[VhostUserNic(backend.socket, 1, mac=self.GUEST_MAC)],
                           smp=cfg.smp, mem_mb=cfg.mem_mb, accel=cfg.accel,
                           kernel_args=list(cfg.kernel_args), qemu=cfg.qemu,
                           extra_args=[*cfg.extra_args, "-incoming", "defer"])  # fmt: skip
        vm = GuestVM(self.image, dst_cfg, rundir, logdir, log=self.log)
        self.register_cleanup("shut down destination QEMU", vm.shutdown)
        vm.launch()
        return vm

    def test_udp_streams_across_migration(self) -> None:
        self.require_udpseq()
        src_vm = self.boot_guest([self.start_network()])
        peer, a = self.peer, self.backend
        assert peer is not None and a is not None and src_vm.console is not None
        assert src_vm.qmp is not None
        b, b_port = self.start_destination_backend(peer.port)
        dst_vm = self.start_destination_vm(b, src_vm)
        assert dst_vm.qmp is not None and dst_vm.console is not None
        for qmp in (src_vm.qmp, dst_vm.qmp):
            enable_migration_events(qmp)
        self.guest_ping(src_vm, 1)  # ARP resolved both ways before the streams

        # both streams, the guest's side in one shell command
        peer.expect_stream(GUEST_TO_PEER_PORT, COUNT)
        pending = src_vm.console.start(
            f"udpseq recv {PEER_TO_GUEST_PORT} {COUNT} {RECV_TIMEOUT_S} & "
            f"udpseq send {self.PEER_IP} {GUEST_TO_PEER_PORT} {COUNT} {SIZE} {RATE}; wait"
        )
        src_vm.console.read_until(r"udpseq recv: listening[^\n]*\n", 15, "udpseq recv")
        sent_to_guest: list[int] = []
        sender = threading.Thread(
            target=lambda: sent_to_guest.append(
                peer.send_stream(self.GUEST_IP, PEER_TO_GUEST_PORT, COUNT, SIZE, RATE)
            ),
            name="peer-stream",
            daemon=True,
        )
        sender.start()
        self.register_cleanup("join the peer's sender", lambda: sender.join(30))
        peer.wait_counter("udp_stream_datagrams", COUNT // 4, 30)

        # migrate in the middle of the streams
        uri = f"unix:{self.rundir / 'dst' / 'migration.sock'}"
        dst_vm.qmp.command("migrate-incoming", uri=uri)
        src_vm.qmp.command("migrate", uri=uri)
        end = src_vm.qmp.wait_event(
            "MIGRATION", 60, match=lambda e: e["data"]["status"] in ("completed", "failed")
        )
        peer.remote = ("127.0.0.1", b_port)  # re-point the peer at B
        switched_at = time.time()
        stats = MigrationStats.from_query(src_vm.qmp.command("query-migrate"))
        self.assertEqual(end["data"]["status"], "completed", stats.raw)
        dst_vm.qmp.wait_event("RESUME", 30)
        self.facts["migration"] = {
            "total_time_ms": stats.total_time_ms,
            "downtime_ms": stats.downtime_ms,
            "setup_time_ms": stats.setup_time_ms,
            "ram_transferred": stats.ram.get("transferred"),
        }

        # the guest finishes on the destination: its reports come out of B's side console
        dst_vm.console.expect([rf"__END_{pending.token}_\d+__"], 90, "the udpseq reports")
        output = dst_vm.console.before
        recv = udpseq.parse_report(output, "recv")
        send = udpseq.parse_report(output, "send")
        sender.join(30)
        guest_to_peer = peer.wait_stream(GUEST_TO_PEER_PORT, timeout=30)
        self.facts["guest_to_peer"] = guest_to_peer.as_dict()
        self.facts["peer_to_guest"] = recv

        # guest -> peer: exactly once
        self.assertEqual((send["sent"], send["errors"]), (COUNT, 0), output)
        self.assertEqual(
            (guest_to_peer.unique, guest_to_peer.dups, guest_to_peer.corrupt),
            (COUNT, 0, 0),
            guest_to_peer,
        )
        # peer -> guest: no duplicate or corruption; loss only where A could not deliver
        self.assertEqual(sent_to_guest, [COUNT])
        self.assertEqual((recv["dups"], recv["corrupt"]), (0, 0), output)
        wire = a.cmd("query-wire")
        rxq = {q["vq"]: q for q in wire["queues"]}[rx_queue(0)]
        undelivered = rxq["drops"] + wire["backlog"][0]
        downtime_s = (stats.downtime_ms or 0) / 1000
        bound = math.ceil(RATE * (downtime_s + REPOINT_SLACK_S)) + LOSS_MARGIN
        self.facts["peer_to_guest_loss"] = {
            "lost": recv["lost"],
            "undelivered_by_source_backend": undelivered,
            "bound": bound,
        }
        self.log.info("peer->guest: lost %d (A undelivered %d, bound %d), downtime %s ms",
                      recv["lost"], undelivered, bound, stats.downtime_ms)  # fmt: skip
        self.assertLessEqual(recv["lost"], undelivered, "guest lost frames A had delivered")
        self.assertLessEqual(recv["lost"], bound, self.facts["peer_to_guest_loss"])

        # the vhost-user hand-over and the announce
        self.check_handover(a, b)
        dst_vm.run(f"ping -c 2 -i 0.2 -W 5 {self.PEER_IP}", timeout=30)
        self.check_announce(b, switched_at)

    def check_announce(self, b: BackendProcess, since: float) -> None:
        """After the switchover the peer saw the guest announced: a gratuitous ARP from the
        guest (it negotiated GUEST_ANNOUNCE: QEMU asks the guest) or a RARP from its MAC (B's
        SEND_RARP). From the peer's pcap, which is flushed per frame."""
        acked = [e["features"] for e in b.journal(["features.set"])]
        guest_announce = bool(acked) and bool(acked[-1] >> VIRTIO_NET_F_GUEST_ANNOUNCE & 1)
        mac = frames.mac_bytes(self.GUEST_MAC)
        ip = frames.ip_bytes(self.GUEST_IP)
        announces = []
        for ts, frame in read_pcap(self.artifacts / "peer.pcap"):
            eth = frames.parse_ether(frame)
            if ts < since - 1.0 or eth is None or eth.src != mac:
                continue
            if eth.ethertype == ETH_P_RARP:
                announces.append("rarp")
            elif eth.ethertype == frames.ETH_P_ARP:
                arp = frames.parse_arp(eth.payload)
                if arp is not None and arp.spa == arp.tpa == ip:
                    announces.append("garp")
        rarps = b.journal(["net.rarp"])
        self.facts["announce"] = {
            "guest_announce": guest_announce,
            "send_rarp": len(rarps),
            "seen_by_peer": announces,
        }
        if guest_announce:
            self.assertEqual(rarps, [], "SEND_RARP although the guest announces itself")
            self.assertIn("garp", announces, self.facts["announce"])
        else:
            self.assertTrue(all(e["mac"] == self.GUEST_MAC for e in rarps) and rarps, rarps)
            self.assertIn("rarp", announces, self.facts["announce"])

    def check_handover(self, a: BackendProcess, b: BackendProcess) -> None:
        gets = {e["vq"]: e for e in a.journal(["vq.get_state"])}
        sets: dict[int, dict[str, Any]] = {}
        for e in b.journal(["vq.set_state"]):
            sets.setdefault(e["vq"], e)
        self.facts["handover"] = {
            vq: (gets[vq]["last_avail_idx"], sets.get(vq, {}).get("last_avail_idx")) for vq in gets
        }
        for vq, g in gets.items():
            self.assertIn(vq, sets, f"B never got SET_VRING_BASE for vq {vq}")
            self.assertEqual(sets[vq]["last_avail_idx"], g["last_avail_idx"], (g, sets[vq]))
            self.assertEqual(g["inflight"], 0, g)
        stops = a.journal(["vq.stop"])
        starts = b.journal(["vq.start"])
        self.assertLess(max(e["mono_ns"] for e in stops), min(e["mono_ns"] for e in starts))
        for backend in (a, b):
            errors = backend.journal(["error."])
            self.assertEqual(errors, [], f"{backend.name} journal errors: {errors[:3]}")


def read_pcap(path: Path) -> Iterator[tuple[float, bytes]]:
    """(timestamp, frame) of every record of a classic pcap file (a torn last one is skipped)."""
    data = path.read_bytes()
    off = GLOBAL_HEADER.size
    while off + RECORD_HEADER.size <= len(data):
        sec, usec, incl, _ = RECORD_HEADER.unpack_from(data, off)
        off += RECORD_HEADER.size
        if off + incl > len(data):
            return
        yield sec + usec / 1e6, data[off : off + incl]
        off += incl
