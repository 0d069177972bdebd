"""Live migration over vhost-vdpa with shadow virtqueues (``-netdev vhost-vdpa,x-svq=on``).

Two L2 QEMUs, each with its own VDUSE device (backend A on the source, B on the
destination). VDUSE cannot suspend, so QEMU 10 migrates a vhost-vdpa device only through its
shadow virtqueues (SVQ): QEMU owns the guest's rings and feeds the device shadow rings of its
own (at IOVAs QEMU allocates, not GPAs). What that means, and what the scenario asserts:

* The ring state that migrates is QEMU's: at the switchover SVQ gives the in-flight chains
  back to the guest ring (``virtqueue_unpop``) and ``vhost_vdpa_get_vring_base`` answers
  with the guest ring's last avail index itself. The source device is never asked
  (no GET_VQ_STATE): the index migrated equals the chains A completed, the chains A held
  unfinished are transmitted once, by B.
* The destination device starts its shadow rings from 0 (``VDUSE_VQ_GET_INFO`` avail
  index 0 at DRIVER_OK), and B continues from it.
* RX frames A wrote during precopy reach the destination byte-exact (QEMU marks them dirty
  when SVQ completes them: a VDUSE device has no dirty log); frames B receives land in buffers
  the guest posted before the migration. Every TX frame reaches a wire exactly once, in order.

Needs a device that offers nothing SVQ refuses (INDIRECT_DESC, RING_PACKED: backend
``--withhold-feature``); with RING_PACKED offered QEMU refuses the netdev at start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .frames import PEER_MAC, mac_bytes, make_frame, parse_frame
from .machine import QemuMachine
from .migration import DriverErrors, MigrationPair, PrecopyHold, invariant
from .testbed import GUEST_MAC, Testbed
from .virtio_net import VirtioNetDriver
from .waiting import poll_until
from .wire_peer import WirePeer, WirePeerTimeout

RX_VQ, TX_VQ = 0, 1
TX_STREAM, RX_STREAM = 11, 12
GUEST = mac_bytes(GUEST_MAC)
SVQ_NETDEV = {"x-svq": True}
#: What QEMU 10's shadow virtqueues refuse in the device's features.
SVQ_WITHHOLD = ["--withhold-feature", "INDIRECT_DESC", "--withhold-feature", "RING_PACKED"]
SCRATCH_PAGES = 1024
TIMEOUT = 30.0  # nested TCG, two L2 QEMUs on one vCPU


def tx_frame(seq: int) -> bytes:
    return make_frame(seq, 60 + (seq * 211) % 1400, stream=TX_STREAM, dst=PEER_MAC, src=GUEST)


def rx_frame(seq: int) -> bytes:
    return make_frame(seq, 60 + (seq * 379) % 1900, stream=RX_STREAM, dst=GUEST, src=PEER_MAC)


@dataclass
class Wire:
    """TX test frames one wire peer received (anything else kept apart)."""

    frames: list[bytes] = field(default_factory=list)
    other: list[bytes] = field(default_factory=list)

    def take(self, peer: WirePeer, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count and (left := deadline - time.monotonic()) > 0:
            try:
                self.sort(peer.recv(left))
            except WirePeerTimeout:
                return

    def drain(self, peer: WirePeer, window: float) -> None:
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.sort(peer.recv(left))
            except WirePeerTimeout:
                return

    def sort(self, frame: bytes) -> None:
        parsed = parse_frame(frame)
        (self.frames if parsed is not None and parsed[0] == TX_STREAM else self.other).append(frame)

    def seqs(self) -> list[int | None]:
        return [(p[1] if (p := parse_frame(f)) else None) for f in self.frames]


@dataclass
class Plan:
    tx_done: int = 5  # K: completed by A before the switchover
    tx_inflight: int = 4  # popped by A (shadow ring), unfinished at the switchover
    rx_precopy: int = 3  # written by A into guest memory while precopy runs
    rx_after: int = 3  # written by B into buffers posted before the migration


def start_svq_pair(
    make_testbed: Callable[..., Testbed],
    *,
    faults: tuple[str, ...] = (),
    dst_faults: tuple[str, ...] | None = None,
    memory: str = "256M",
    before_init: Callable[[Testbed], None] | None = None,
    customize: Callable[[QemuMachine], None] | None = None,
) -> MigrationPair:
    """A started x-svq=on pair. ``faults`` go to both backends unless ``dst_faults`` names
    the destination's; ``before_init`` / ``customize`` as `MigrationPair.start_source` /
    `MigrationPair.start_destination` (a DIMM plugged on the source, cold-plugged on the
    destination)."""
    pair = MigrationPair(
        make_testbed,
        src_faults=faults,
        dst_faults=faults if dst_faults is None else dst_faults,
        memory=memory,
        transport="vhost-vdpa",
        netdev_props=SVQ_NETDEV,
        backend_args=SVQ_WITHHOLD,
    )
    pair.start_source(before_init)
    pair.start_destination(customize)
    return pair


def _vduse(tb: Testbed, since: int, kind: str) -> list[dict[str, Any]]:
    assert tb.backend is not None
    return tb.backend.journal([kind], since)


def migrate_with_traffic_svq(pair: MigrationPair, plan: Plan) -> dict[str, Any]:
    """The scenario (module doc) on a started pair; returns the numbers for the report."""
    src, dst = pair.src, pair.dst
    a, b = src.backend, dst.backend
    assert a is not None and b is not None
    net: VirtioNetDriver = pair.net
    k, n = plan.tx_done, plan.tx_done + plan.tx_inflight
    m, p = plan.rx_precopy, plan.rx_precopy + plan.rx_after
    tx = [tx_frame(s) for s in range(n)]
    rx = [rx_frame(s) for s in range(p)]
    base = net.txq[0].avail_idx
    rx_base = net.rxq[0].device_used_idx()
    wire_a, wire_b = Wire(), Wire()

    with invariant("TX before the migration"):
        net.send_burst(tx[:k], timeout=TIMEOUT)
    wire_a.take(src.peer, k, TIMEOUT)
    assert wire_a.seqs() == list(range(k)), f"A's wire before migration: {wire_a.seqs()}"
    a_done = a.vring(TX_VQ)["used_idx"]
    assert a_done == k, f"A's shadow TX ring completed {a_done} chains, {k} were sent"
    mark_a, mark_b = a.mark(), b.mark()

    scratch = net.alloc.alloc(SCRATCH_PAGES * 4096, tag="precopy scratch")
    hold = PrecopyHold(pair, scratch, pages=SCRATCH_PAGES)
    hold.arm()
    pair.begin()
    hold.wait_first_pass(timeout=120.0)
    for f in rx[:m]:
        src.peer.send(f)

    def rx_filled() -> bool:
        hold.touch()  # keeps the migration in precopy while we wait
        return net.rxq[0].device_used_idx() == (rx_base + m) & 0xFFFF

    with invariant(f"A filling {m} RX buffers during precopy"):
        poll_until(rx_filled, TIMEOUT, f"A filling {m} RX buffers during precopy")
    hold.still_active()
    a.cmd("hold-tx", enable=True)

    def tx_held() -> bool:
        hold.touch()
        return bool(a.cmd("query-wire")["tx_held"] == n - k)

    with invariant("TX in flight"):
        net.send_burst(tx[k:], wait=False)
        poll_until(tx_held, TIMEOUT, f"A holding {n - k} popped TX chains")
    hold.still_active()
    hold.release()
    stats = pair.finish(timeout=120.0)
    net.alloc.free(scratch)

    # -- traffic across the switchover -------------------------------------------------------
    wire_b.take(dst.peer, n - k, TIMEOUT)
    wire_a.drain(src.peer, 0.2)
    got = wire_a.seqs() + wire_b.seqs()
    assert got == list(range(n)), (
        f"TX frames on the wires are not 0..{n - 1} exactly once in order: A sent "
        f"{wire_a.seqs()}, B sent {wire_b.seqs()}"
    )
    assert wire_a.frames + wire_b.frames == tx, "TX frames on the wires are corrupted"
    with invariant("TX completions on the destination"):
        net.wait_tx(0, TIMEOUT)
    assert net.txq[0].device_used_idx() == (base + n) & 0xFFFF
    for f in rx[m:]:
        dst.peer.send(f)
    for i, want in enumerate(rx):
        where = "written by A during precopy" if i < m else "written by B"
        try:
            have = net.recv(0, TIMEOUT, refill=False).data
        except DriverErrors as e:
            raise AssertionError(f"RX frame {i} ({where}) on the destination: {e}") from e
        assert have == want, f"RX frame {i} ({where}) differs on the destination"
    net.post_rx(0)

    # -- the ring state QEMU moved -----------------------------------------------------------
    asked = [e for e in _vduse(src, mark_a, "vduse.msg") if e["type"] == "GET_VQ_STATE"]
    assert not asked, f"QEMU asked the source device for its ring state: {asked}"
    infos = {e["vq"]: e for e in _vduse(dst, mark_b, "vduse.vq_info")}
    assert TX_VQ in infos and infos[TX_VQ]["split_avail"] == 0, (
        f"B's shadow TX ring did not start at 0: {infos.get(TX_VQ)}"
    )
    b_tx = b.vring(TX_VQ)
    assert b_tx["last_avail_idx"] == b_tx["used_idx"] == n - k, (
        f"B's shadow TX ring: {b_tx['last_avail_idx']} popped / {b_tx['used_idx']} used, "
        f"expected the {n - k} chains A left unfinished"
    )
    stops = [e for e in _vduse(src, mark_a, "vduse.msg") if e.get("status") == 0]
    starts = [e for e in _vduse(dst, mark_b, "vduse.msg") if e.get("status", 0) & 0x4]
    gap_ms = (
        (min(e["mono_ns"] for e in starts) - max(e["mono_ns"] for e in stops)) / 1e6
        if stops and starts
        else None
    )
    return {
        "downtime_ms": stats.downtime_ms,
        "total_time_ms": stats.total_time_ms,
        "setup_time_ms": stats.setup_time_ms,
        "source_reset_to_destination_driver_ok_ms": gap_ms,
        "get_vq_state_messages": len(asked),
        "a_completed_before": a_done,
        "b_shadow_tx": [b_tx["last_avail_idx"], b_tx["used_idx"]],
        "other_frames": [len(wire_a.other), len(wire_b.other)],
    }
