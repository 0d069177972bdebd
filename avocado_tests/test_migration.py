"""Live migration back and forth (A -> B -> A' -> B') with numbered UDP streams both ways.

Each hop migrates the running guest to a fresh QEMU (``-incoming defer``, identical command
line otherwise) on a fresh backend: the side a hop leaves is shut down once the hop is
checked, and the next hop's destination is started new (sockets in a run directory of its
own). Every backend is wired to the same peer port (the peer accepts frames from any
sender); when the source reports ``completed`` the peer is re-pointed at the destination's
backend (what a switch learning the guest's MAC from the announce does).

What must hold, per hop and over the whole run:

* guest -> peer: every datagram exactly once, intact. The guest is paused during the downtime
  and TX chains the source had not finished are handed over through last_avail_idx.
* after every switchover both streams carry on through the new backend (the peer sees new
  guest datagrams, the new backend's RX queue delivers new ones) before the next hop.
* peer -> guest: no duplicate, nothing corrupt. Loss only for datagrams that arrived while the
  VM was stopped: the source backend's undelivered RX frames (drops + backlog after its RX
  ring stopped) and the destination's RX drops before its ring started. Per hop these must
  not exceed what the peer sent between the source's RX ring stop and the re-pointing
  (``sent_while_stopped``, counted by the peer from ``STOP_SLACK_S`` before that stop, when
  the paused guest stopped posting buffers, + ``LOSS_MARGIN`` for frames in flight), nor ``RATE * (downtime + REPOINT_SLACK_S) + LOSS_MARGIN``; and the guest's loss over
  the run equals the sum of the backends' undelivered frames exactly.

The whiteboard has, per hop: downtime / total time from ``query-migrate``, the RX loss
accounting and the ring hand-over indexes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avocado_tests.base import VdpaGuestTest, rx_queue, vring_packet_counts
from backends.virtio.net import VIRTIO_NET_F_GUEST_ANNOUNCE
from guest_images import udpseq
from qtests.guest import frames
from qtests.guest.pcap import GLOBAL_HEADER, RECORD_HEADER
from qtests.guest.peer import UdpPeer
from qtests.guest.ports import free_udp_port
from qtests.guest.vm import GuestVM, VhostUserNic, VmConfig
from qtests.qos.backend_process import BackendProcess
from qtests.qos.migration import MigrationStats, enable_migration_events
from qtests.qos.waiting import poll_until

HOPS = 3  # A -> B -> A' -> B'
SIZE = 1000
RATE = 500  # per direction
#: A 12 s stream: it has to outlast HOPS hops (each ~2 s under TCG on 2 cores; asserted).
COUNT = 6000
GUEST_TO_PEER_PORT = 5001
PEER_TO_GUEST_PORT = 5002
#: Peer re-pointing delay allowed after the source's ``completed`` (QMP event + test thread).
REPOINT_SLACK_S = 0.3
#: Frames in flight towards the source when its RX ring stopped.
LOSS_MARGIN = 3
#: The guest stops posting RX buffers when its vCPUs pause, a little before QEMU stops the
#: RX ring: what the source's backlog holds then (waiting for buffers) is lost with the hop.
#: Observed: up to ~20 ms of the stream under TCG.
STOP_SLACK_S = 0.05
#: After a switchover, this many new datagrams each way prove the streams carry on.
CONTINUE_DATAGRAMS = RATE // 5
#: The guest's receiver ends at the peer's end-of-stream sentinel, or gives up this long after
#: it started (then end=0 in its report, which fails the run).
RECV_TIMEOUT_S = 60
ETH_P_RARP = 0x8035


@dataclass
class Side:
    """One QEMU + its backend: the guest runs on it during one stretch of the run."""

    vm: GuestVM
    backend: BackendProcess
    wire_port: int  # the backend's end of the UDP wire (where the peer sends)
    #: RX frames its backend dropped before its ring started (counted for the hop that
    #: brought the guest here, not again when the guest leaves)
    drops_at_start: int = 0


class LiveMigration(VdpaGuestTest):
    """:avocado: tags=net,migration"""

    timeout = 240

    def start_side(self, index: int, source: GuestVM) -> Side:
        """A fresh backend + QEMU waiting for an incoming migration (``-incoming defer``)."""
        assert self.peer is not None
        name = f"hop{index}"
        rundir, logdir = self.rundir / name, self.artifacts / name
        rundir.mkdir()
        logdir.mkdir()
        wire_port = free_udp_port()
        faults = self.backend_faults()
        backend = BackendProcess(logdir, name="backend", run_dir=rundir,
                                 wire=f"udp:127.0.0.1:{wire_port}:{self.peer.port}",
                                 faults=faults, mac=self.GUEST_MAC, log=self.log)  # fmt: skip
        self.register_cleanup(f"stop backend of {name}", lambda: self.stop_backend(backend))
        backend.start()
        cfg = source.config
        dst_cfg = VmConfig(nics=[VhostUserNic(backend.socket, 1, mac=self.GUEST_MAC)],
                           smp=cfg.smp, mem_mb=cfg.mem_mb, accel=cfg.accel,
                           kernel_args=list(cfg.kernel_args), qemu=cfg.qemu,
                           extra_args=[*cfg.extra_args, "-incoming", "defer"])  # fmt: skip
        vm = GuestVM(self.image, dst_cfg, rundir, logdir, log=self.log)
        self.register_cleanup(f"shut down QEMU of {name}", vm.shutdown)
        vm.launch()
        assert vm.qmp is not None
        enable_migration_events(vm.qmp)
        return Side(vm, backend, wire_port)

    @staticmethod
    def stop_backend(backend: BackendProcess) -> None:
        rc = backend.stop()
        if rc not in (0, None):
            raise AssertionError(f"{backend.log_path.parent.name} backend exited with {rc}")

    def test_udp_streams_across_migrations(self) -> None:
        """:avocado: tags=ci"""
        self.udp_streams_across_migrations()

    def test_ignore_set_vring_base_is_caught(self) -> None:
        """Each destination backend ignores SET_VRING_BASE: it starts its rings at 0 and
        sends TX chains again (or none), which the guest -> peer stream must notice.

        :avocado: tags=fault
        """
        self.expect_caught("ignore-set-vring-base", self.udp_streams_across_migrations)

    def udp_streams_across_migrations(self) -> None:
        """The scenario: raises AssertionError (or a bounded wait's timeout) on what it catches."""
        self.require_udpseq()
        if self.netdev != "vhost-user":
            self.cancel("the hand-over checks need the vhost-user backend")
        first_vm = self.boot_guest([self.start_network()])
        peer, first_backend = self.peer, self.backend
        assert peer is not None and first_backend is not None and first_vm.console is not None
        assert first_vm.qmp is not None
        enable_migration_events(first_vm.qmp)
        source = Side(first_vm, first_backend, peer.remote[1] if peer.remote else 0)
        self.guest_ping(first_vm, 1)  # ARP resolved both ways before the streams
        acked = [e["features"] for e in first_backend.journal(["features.set"])]
        guest_announce = bool(acked) and bool(acked[-1] >> VIRTIO_NET_F_GUEST_ANNOUNCE & 1)
        self.facts["guest_announce"] = guest_announce

        # both streams, the guest's side in one shell command
        out_stream = peer.expect_stream(GUEST_TO_PEER_PORT, COUNT)
        pending = first_vm.console.start(
            f"udpseq recv {PEER_TO_GUEST_PORT} {COUNT} {RECV_TIMEOUT_S} & "
            f"udpseq send {self.PEER_IP} {GUEST_TO_PEER_PORT} {COUNT} {SIZE} {RATE}; wait"
        )
        first_vm.console.read_until(r"udpseq recv: listening[^\n]*\n", 15, "udpseq recv")
        sent_to_guest: list[int] = []
        sender = threading.Thread(
            target=lambda: sent_to_guest.append(
                peer.send_stream(self.GUEST_IP, PEER_TO_GUEST_PORT, COUNT, SIZE, RATE)
            ),
            name="peer-stream",
            daemon=True,
        )
        sender.start()
        self.register_cleanup("join the peer's sender", lambda: sender.join(60))
        peer.wait_counter("udp_stream_datagrams", RATE // 2, 30)

        hops: list[dict[str, Any]] = []
        self.facts["hops"] = hops
        undelivered_total = 0
        for index in range(1, HOPS + 1):
            dest = self.start_side(index, source.vm)
            hop = self.migrate(index, source, dest, peer)
            hops.append(hop)
            undelivered_total += hop["rx_loss"]["source_undelivered"]
            undelivered_total += hop["rx_loss"]["destination_drops_at_start"]
            self.log.info("hop %d: %s", index, hop)
            # the side the guest left is done with: free its CPU for the rest of the run
            source.vm.shutdown()
            self.stop_backend(source.backend)
            source = dest
        self.assertLess(
            out_stream.unique, COUNT, "the streams ended before the last hop: raise COUNT"
        )

        # the guest finishes on the last side: its reports come out of that side's console
        last = source.vm
        assert last.console is not None
        last.console.expect([rf"__END_{pending.token}_\d+__"], 90, "the udpseq reports")
        output = last.console.before
        recv = udpseq.parse_report(output, "recv")
        send = udpseq.parse_report(output, "send")
        sender.join(60)
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
        # peer -> guest: no duplicate or corruption; every loss accounted for by a hop
        self.assertEqual(sent_to_guest, [COUNT])
        self.assertEqual(peer.snapshot()["counters"].get("send_would_block", 0), 0)
        self.assertEqual((recv["dups"], recv["corrupt"], recv["end"]), (0, 0, 1), output)
        # what the last side could not deliver after it started (nothing, normally)
        undelivered_total += self.undelivered(source.backend) - source.drops_at_start
        self.facts["peer_to_guest_loss"] = {
            "lost": recv["lost"],
            "undelivered_by_backends": undelivered_total,
            "per_hop": [h["rx_loss"] for h in hops],
        }
        self.assertEqual(
            recv["lost"], undelivered_total, "the guest lost frames a backend had delivered"
        )
        self.check_announces(hops, "garp" if guest_announce else "rarp")
        last.run(f"ping -c 2 -i 0.2 -W 5 {self.PEER_IP}", timeout=30)
        self.assertEqual(source.backend.journal(["error."]), [])

    # -- one hop ------------------------------------------------------------------------------
    def migrate(self, index: int, src: Side, dst: Side, peer: UdpPeer) -> dict[str, Any]:
        """Migrate ``src`` -> ``dst`` in the middle of the streams; the hop's facts."""
        assert src.vm.qmp is not None and dst.vm.qmp is not None
        uri = f"unix:{self.rundir / f'hop{index}' / 'migration.sock'}"
        dst.vm.qmp.command("migrate-incoming", uri=uri)
        # a side that was a destination already reported an incoming "completed"
        src.vm.qmp.clear_events()
        src.vm.qmp.command("migrate", uri=uri)
        end = src.vm.qmp.wait_event(
            "MIGRATION", 60, match=lambda e: e["data"]["status"] in ("completed", "failed")
        )
        repointed = peer.repoint(("127.0.0.1", dst.wire_port))
        switched_at = time.time()
        stats = MigrationStats.from_query(src.vm.qmp.command("query-migrate"))
        self.assertEqual(end["data"]["status"], "completed", f"hop {index}: {stats.raw}")
        dst.vm.qmp.wait_event("RESUME", 30)
        # QEMU sends RESUME before its run-state handlers start vhost (vm_prepare_start): wait
        # for the destination backend to start every ring the source stopped
        stopped_vqs = {e["vq"] for e in src.backend.journal(["vq.get_state"])}
        poll_until(
            lambda: {e["vq"] for e in dst.backend.journal(["vq.start"])} >= stopped_vqs,
            15,
            f"hop {index}: the destination backend to start rings {sorted(stopped_vqs)}",
        )
        hop: dict[str, Any] = {
            "hop": index,
            "downtime_ms": stats.downtime_ms,
            "total_time_ms": stats.total_time_ms,
            "setup_time_ms": stats.setup_time_ms,
            "ram_transferred": stats.ram.get("transferred"),
            "switched_at": switched_at,
        }
        hop["handover"] = self.check_handover(index, src.backend, dst.backend)

        # the streams carry on through the new side before anything else happens
        carried = peer.snapshot()["counters"].get("udp_stream_datagrams", 0)
        peer.wait_counter("udp_stream_datagrams", int(carried) + CONTINUE_DATAGRAMS, 15)
        rx = rx_queue(0)
        poll_until(
            lambda: (
                vring_packet_counts(dst.backend.cmd("query-vrings")).get(rx, 0)
                >= CONTINUE_DATAGRAMS
            ),
            15,
            f"hop {index}: {CONTINUE_DATAGRAMS} datagrams into the guest through the new backend",
        )

        # RX loss of this hop: what reached the source after its RX ring stopped, and what
        # the destination dropped before its ring started
        rx_stop = [e for e in src.backend.journal(["vq.get_state"]) if e["vq"] == rx]
        self.assertTrue(rx_stop, f"hop {index}: the source's RX ring was never stopped")
        stopped = rx_stop[-1]["mono_ns"] / 1e9
        self.wait_wire_settled(src.backend, peer, ("127.0.0.1", src.wire_port))
        sent_while_stopped = peer.sent_between(
            PEER_TO_GUEST_PORT, stopped - STOP_SLACK_S, repointed
        )
        downtime_s = (stats.downtime_ms or 0) / 1000
        dst.drops_at_start = self.rx_drops(dst.backend)
        loss = {
            "source_undelivered": self.undelivered(src.backend) - src.drops_at_start,
            "destination_drops_at_start": dst.drops_at_start,
            "sent_while_stopped": sent_while_stopped,
            "stopped_to_repoint_ms": round((repointed - stopped) * 1000, 1),
            "bound": math.ceil(RATE * (downtime_s + REPOINT_SLACK_S)) + LOSS_MARGIN,
        }
        hop["rx_loss"] = loss
        lost = loss["source_undelivered"] + loss["destination_drops_at_start"]
        self.assertLessEqual(lost, sent_while_stopped + LOSS_MARGIN, f"hop {index}: {loss}")
        self.assertLessEqual(lost, loss["bound"], f"hop {index}: {loss}")
        return hop

    def wait_wire_settled(
        self, backend: BackendProcess, peer: UdpPeer, remote: tuple[str, int]
    ) -> None:
        """The backend has read every frame the peer sent it (none left in its socket)."""
        sent = peer.frames_to[remote]

        def read_all() -> bool:
            wire = backend.cmd("query-wire")["wire"]
            return int(wire.get("rx_frames", 0)) + int(wire.get("drops", 0)) >= sent

        poll_until(read_all, 10, f"{backend.log_path.parent.name} backend to read {sent} frames")

    @staticmethod
    def rx_drops(backend: BackendProcess) -> int:
        wire = backend.cmd("query-wire")
        rxq = {q["vq"]: q for q in wire["queues"]}[rx_queue(0)]
        return int(rxq["drops"]) + int(wire["wire"].get("drops", 0))

    def undelivered(self, backend: BackendProcess) -> int:
        """RX frames this backend never put into the guest: dropped or still in its backlog."""
        return self.rx_drops(backend) + int(backend.cmd("query-wire")["backlog"][0])

    def check_handover(
        self, index: int, a: BackendProcess, b: BackendProcess
    ) -> dict[int, tuple[int, int | None]]:
        """B's rings start where A's stopped (SET_VRING_BASE = GET_VRING_BASE), after them."""
        gets = {e["vq"]: e for e in a.journal(["vq.get_state"])}
        sets: dict[int, dict[str, Any]] = {}
        for e in b.journal(["vq.set_state"]):
            sets.setdefault(e["vq"], e)
        handover = {
            vq: (gets[vq]["last_avail_idx"], sets.get(vq, {}).get("last_avail_idx")) for vq in gets
        }
        for vq, g in gets.items():
            self.assertIn(vq, sets, f"hop {index}: no SET_VRING_BASE for vq {vq}")
            self.assertEqual(sets[vq]["last_avail_idx"], g["last_avail_idx"], (index, g, sets[vq]))
            self.assertEqual(g["inflight"], 0, (index, g))
        stops = a.journal(["vq.stop"])
        starts = b.journal(["vq.start"])
        self.assertLess(max(e["mono_ns"] for e in stops), min(e["mono_ns"] for e in starts))
        for backend in (a, b):
            errors = backend.journal(["error."])
            self.assertEqual(errors, [], f"hop {index}: backend journal errors: {errors[:3]}")
        return handover

    def check_announces(self, hops: list[dict[str, Any]], want: str) -> None:
        """After every switchover the peer saw the guest announced: a gratuitous ARP from the
        guest if it negotiated GUEST_ANNOUNCE (QEMU asks the guest), else a RARP from its MAC
        (the backend's SEND_RARP). From the peer's pcap, which is flushed per frame."""
        seen = announces(self.artifacts / "peer.pcap", self.GUEST_MAC, self.GUEST_IP)
        for i, hop in enumerate(hops):
            start = hop["switched_at"] - 1.0
            end = hops[i + 1]["switched_at"] - 1.0 if i + 1 < len(hops) else math.inf
            kinds = sorted({kind for ts, kind in seen if start <= ts < end})
            hop["announced"] = kinds
            self.assertIn(want, kinds, f"hop {hop['hop']}: no {want} from the guest after it")


def announces(pcap: Path, mac: str, ip: str) -> list[tuple[float, str]]:
    """(time, "rarp" | "garp") of every announce of the guest ``mac`` / ``ip`` in ``pcap``."""
    mac_b, ip_b = frames.mac_bytes(mac), frames.ip_bytes(ip)
    found: list[tuple[float, str]] = []

    def is_garp(eth: frames.Ether) -> bool:
        arp = frames.parse_arp(eth.payload)
        return arp is not None and arp.spa == arp.tpa == ip_b

    for ts, frame in read_pcap(pcap):
        eth = frames.parse_ether(frame)
        if eth is None or eth.src != mac_b:
            continue
        if eth.ethertype == ETH_P_RARP:
            found.append((ts, "rarp"))
        elif eth.ethertype == frames.ETH_P_ARP and is_garp(eth):
            found.append((ts, "garp"))
    return found


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
