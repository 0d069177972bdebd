"""Scenario 3: live migration of a vhost-user virtio-net guest, end to end.

Two real QEMUs and two real backends: the source (QEMU + backend A + A's wire peer) and the
destination (QEMU with identical device arguments and ``-incoming defer`` + backend B + B's
wire peer). The qtest driver keeps its rings and allocator and continues on the destination
after the switchover. What must hold (`migrate_with_traffic`):

* TX in flight: K frames completed by A, N-K more popped by A but unfinished at switchover
  (A holds TX completions, monitor ``hold-tx``: the case GET_VRING_BASE must drain or rewind).
  Every frame reaches the wires (A's peer, then B's peer) exactly once and in order; A's
  GET_VRING_BASE reply == B's SET_VRING_BASE == K.
* RX across migration: frames A writes into guest memory while precopy is running
  (`PrecopyHold` keeps QEMU in precopy, after every page was sent once) arrive intact on the
  destination: only A's dirty log can carry them. Frames B receives land in buffers the guest
  posted before the migration.
* The rings never run on both backends at once (A's last ``vq.stop`` precedes B's first
  ``vq.start`` on CLOCK_MONOTONIC); used idx == last_avail_idx at the switchover (nothing in
  flight), also with the TX ring wrapping past 65535 during the in-flight part.
* Announce: without GUEST_ANNOUNCE QEMU sends SEND_RARP to B (its first one before B's rings
  start) and B puts a RARP from the guest MAC on its wire; with GUEST_ANNOUNCE (DIMM variant)
  QEMU sends no SEND_RARP but sets the ANNOUNCE status bit + config interrupt, and the guest
  announces and acks (VIRTIO_NET_CTRL_ANNOUNCE_ACK).

Variants: TX ring wrapping past 65535 across the switchover, rings and buffers in a DIMM
hotplugged before the migration (cold-plugged on the destination), the device behind a
virtio-iommu (QEMU passes the used ring's IOVA as log_guest_addr; the backend logs the GPA it
translated to).

Meta-tests run the same scenario against a backend A (or B) with a fault and expect it to fail
on the invariant the fault breaks, for the split, packed, DIMM and vIOMMU variants
(`test_variant_fault`; with a split ring and no vIOMMU QEMU marks the used ring dirty itself
when vhost stops, so ``used-ring-not-logged`` is caught by the packed and vIOMMU variants).

Work in progress at the switchover (`qtests.qos.inflight_migration`): RX buffers A has taken
but not filled; a DIMM unplug pending when the migration starts (the remove event does not
migrate); device_add during the migration (QEMU refuses it). A cancelled migration (in precopy, and after the device was
stopped, via pause-before-switchover) and a failed one (destination killed) leave the source
running with its rings intact and traffic exactly once.
"""

from __future__ import annotations

import json
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.vhost_user.rarp import rarp_frame
from backends.virtio.features import bit
from backends.virtio.net import (
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE,
)
from qtests.qos.alloc import GuestAllocator
from qtests.qos.backend_process import BackendProcess
from qtests.qos.frames import PEER_MAC, mac_bytes, make_frame, parse_frame
from qtests.qos.inflight_migration import (
    device_add_during_migration,
    idle_dimm_hooks,
    migrate_with_unplug_pending,
    rx_taken_at_switchover,
)
from qtests.qos.machine import QemuMachine
from qtests.qos.migration import (
    DriverErrors,
    MigrationPair,
    MigrationStats,
    PrecopyHold,
    invariant,
    set_capabilities,
)
from qtests.qos.packed_virtqueue import PackedVirtqueue
from qtests.qos.sentinel import post_tx_sentinel
from qtests.qos.testbed import GUEST_MAC, Testbed
from qtests.qos.viommu_testbed import ViommuTestbed
from qtests.qos.virtio_net import VirtioNetDriver, VirtioNetHdr
from qtests.qos.virtqueue import DESC, U16
from qtests.qos.waiting import poll_until
from qtests.qos.wire_peer import WirePeer, WirePeerTimeout

pytestmark = pytest.mark.qemu

TX_STREAM = 1
RX_STREAM = 2
FILL_STREAM = 3
SENTINEL_STREAM = 4
ETH_P_RARP = 0x8035
GUEST = mac_bytes(GUEST_MAC)
TX_VQ, RX_VQ = 1, 0
#: Guest RAM of every migration test: the scenario does not need more, and precopy of an
#: idle guest costs about 3 s per GiB here (zero-page scanning).
MEMORY = "64M"
DIMM_SIZE = 64 << 20
VIOMMU_DOMAIN = 1
#: Pages `PrecopyHold` keeps dirty (4 MiB: 0.5 s per precopy iteration at its pass bandwidth).
SCRATCH_PAGES = 1024


def tx_frame(seq: int) -> bytes:
    return make_frame(seq, 60 + (seq * 211) % 1400, stream=TX_STREAM, dst=PEER_MAC, src=GUEST)


def rx_frame(seq: int) -> bytes:
    return make_frame(seq, 60 + (seq * 379) % 1900, stream=RX_STREAM, dst=GUEST, src=PEER_MAC)


def sentinel_frame(n: int) -> bytes:
    """A frame sent after a stream: everything the stream put on a wire arrives before it."""
    return make_frame(n, 64, stream=SENTINEL_STREAM, dst=PEER_MAC, src=GUEST)


def is_rarp(frame: bytes) -> bool:
    return len(frame) >= 14 and struct.unpack_from("!H", frame, 12)[0] == ETH_P_RARP


@dataclass
class Wire:
    """Frames one wire peer received, sorted into test frames and RARPs."""

    frames: list[bytes] = field(default_factory=list)
    rarps: list[bytes] = field(default_factory=list)
    other: list[bytes] = field(default_factory=list)

    def take(self, peer: WirePeer, count: int, timeout: float) -> None:
        """Receive until ``count`` TX test frames arrived or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self.sort(peer.recv(left))
            except WirePeerTimeout:
                return

    def sort(self, frame: bytes) -> None:
        parsed = parse_frame(frame)
        if parsed is not None and parsed[0] == TX_STREAM:
            self.frames.append(frame)
        elif is_rarp(frame):
            self.rarps.append(frame)
        elif parsed is None or parsed[0] != FILL_STREAM:
            self.other.append(frame)

    def drain(self, peer: WirePeer, window: float = 0.15) -> None:
        """What arrives within ``window`` seconds: only to wait for something expected (a
        RARP), never as proof that nothing else comes (`until_sentinel`, `take_sent`)."""
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.sort(peer.recv(left))
            except WirePeerTimeout:
                return

    def until_sentinel(self, peer: WirePeer, sentinel: bytes, timeout: float = 5.0) -> None:
        """Sort every frame that arrives before ``sentinel`` (sent after the stream through
        the same TX queue, so nothing of the stream can come after it)."""
        for frame in peer.recv_until(sentinel, timeout):
            self.sort(frame)

    def take_sent(self, peer: WirePeer, backend: BackendProcess, timeout: float = 3.0) -> None:
        """A backend whose rings stopped sends nothing more: read until the peer has received
        as many frames as that backend's wire handed to its socket (query-wire), a count to
        wait for instead of a window of quiet."""
        sent = int(backend.cmd("query-wire")["wire"]["tx_frames"])
        deadline = time.monotonic() + timeout
        while peer.received < sent:
            self.sort(peer.recv(max(deadline - time.monotonic(), 0.0)))


def seqs(frames: list[bytes]) -> list[int | None]:
    return [(p[1] if (p := parse_frame(f)) else None) for f in frames]


def entries(backend: BackendProcess, since: int, kind: str) -> list[dict[str, Any]]:
    return backend.journal(kinds=[kind], since=since)


def by_vq(items: list[dict[str, Any]], *, last: bool) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for e in items:
        if last or e["vq"] not in out:
            out[e["vq"]] = e
    return out


def requests(backend: BackendProcess, since: int) -> list[str]:
    return [e["request"] for e in entries(backend, since, "vhost.msg")]


def wait_used(net: VirtioNetDriver, vq: int, target: int, what: str, timeout: float = 5.0) -> None:
    """Wait until the device published used idx ``target`` on ring ``vq`` of pair 0."""
    ring = net.rxq[0] if vq == RX_VQ else net.txq[0]
    poll_until(
        lambda: ring.device_used_idx() == target & 0xFFFF,
        timeout,
        what,
        detail=lambda: f"used idx {ring.device_used_idx()}",
    )


# ---------------------------------------------------------------------------- the scenario
@dataclass
class Plan:
    tx_done: int = 5  # K: completed by A before the switchover
    tx_inflight: int = 6  # N-K: popped by A, unfinished at the switchover
    rx_precopy: int = 4  # written by A into guest memory while precopy runs
    rx_after: int = 3  # written by B into buffers posted before the migration
    tx_base: int = 0  # TX ring index (free-running u16) when the scenario starts


@dataclass
class Outcome:
    stats: MigrationStats
    a_requests: list[str]
    b_requests: list[str]
    rarps: int
    tx_base: int
    ring_gap_ms: float  # A's last ring stop -> B's first ring start (CLOCK_MONOTONIC)

    def summary(self) -> dict[str, Any]:
        return {
            "total_time_ms": self.stats.total_time_ms,
            "downtime_ms": self.stats.downtime_ms,
            "ring_gap_ms": round(self.ring_gap_ms, 3),
            "setup_time_ms": self.stats.setup_time_ms,
            "ram_transferred": self.stats.ram.get("transferred"),
            "dirty_sync_count": self.stats.ram.get("dirty-sync-count"),
            "source_backend_requests": self.a_requests,
            "destination_backend_requests": self.b_requests,
            "rarps_on_destination_wire": self.rarps,
            "tx_base": self.tx_base,
        }


def migrate_with_traffic(pair: MigrationPair, plan: Plan) -> Outcome:
    """The migration scenario on a started pair (source driver at DRIVER_OK, destination
    waiting). Raises AssertionError naming the first broken invariant."""
    src, dst = pair.src, pair.dst
    a, b = src.backend, dst.backend
    assert a is not None and b is not None
    net = pair.net
    k, n = plan.tx_done, plan.tx_done + plan.tx_inflight
    m, p = plan.rx_precopy, plan.rx_after
    tx = [tx_frame(s) for s in range(n)]
    rx = [rx_frame(s) for s in range(m + p)]
    if plan.tx_base:
        advance_tx_ring(net, src.peer, plan.tx_base)
    base = net.txq[0].avail_idx
    rx_base = net.rxq[0].device_used_idx()
    wire_a, wire_b = Wire(), Wire()

    # K frames through A, completed
    net.send_burst(tx[:k])
    wire_a.take(src.peer, k, 5.0)
    assert seqs(wire_a.frames) == list(range(k)), f"A's wire before migration: {wire_a}"
    mark_a, mark_b = a.mark(), b.mark()

    # precopy, held after the first full pass
    scratch = net.alloc.alloc(SCRATCH_PAGES * 4096, tag="precopy scratch")
    hold = PrecopyHold(pair, scratch, pages=SCRATCH_PAGES)
    hold.arm()
    pair.begin()
    hold.wait_first_pass()
    # RX: A writes m frames into guest memory now; only its dirty log can carry them over
    for f in rx[:m]:
        src.peer.send(f)
    wait_used(net, RX_VQ, rx_base + m, f"A filling {m} RX buffers during precopy")
    # TX: n-k more frames, popped by A and held (neither sent nor completed)
    a.cmd("hold-tx", enable=True)
    net.send_burst(tx[k:], wait=False)
    poll_until(
        lambda: a.cmd("query-wire")["tx_held"] == n - k,
        5.0,
        f"A holding {n - k} popped TX chains",
        detail=lambda: f"held {a.cmd('query-wire')['tx_held']}",
    )
    hold.still_active()
    hold.release()
    stats = pair.finish()
    net.alloc.free(scratch)

    # -- after the switchover: traffic first (what a guest would notice) ---------------------
    with invariant("TX frames on the wires"):
        poll_until(
            lambda: (v := b.vring(TX_VQ))["started"] and v["avail_idx"] == v["last_avail_idx"],
            3.0,
            "B consuming every available TX chain",
        )
        # B: a sentinel TX frame after the stream; A (its rings stopped): every frame its
        # wire sent
        post_tx_sentinel(net, sentinel_frame(0))
        wire_b.until_sentinel(dst.peer, sentinel_frame(0))
        wire_a.take_sent(src.peer, a)
    got = seqs(wire_a.frames) + seqs(wire_b.frames)
    assert got == list(range(n)), (
        f"TX frames on the wires are not 0..{n - 1} exactly once in order: A sent "
        f"{seqs(wire_a.frames)}, B sent {seqs(wire_b.frames)}"
    )
    assert wire_a.frames + wire_b.frames == tx, "TX frames on the wires are corrupted"
    with invariant("TX completions on the destination"):
        net.wait_tx(0, 3.0)
    assert net.txq[0].device_used_idx() == (base + n + 1) & 0xFFFF  # + the sentinel

    for f in rx[m:]:
        dst.peer.send(f)
    with invariant("RX on the destination"):
        wait_used(net, RX_VQ, rx_base + m + p, f"B filling {p} RX buffers posted before")
    for i, want in enumerate(rx):
        where = "written by A during precopy" if i < m else "written by B"
        try:
            got_rx = net.recv(0, 2.0, refill=False)
        except DriverErrors as e:
            raise AssertionError(f"RX frame {i} ({where}) on the destination: {e}") from e
        assert got_rx.data == want, (
            f"RX frame {i} ({where}) differs on the destination: {len(got_rx.data)} bytes "
            f"{got_rx.data[:24].hex()}..., expected {len(want)} bytes {want[:24].hex()}..."
        )
    net.post_rx(0)

    # -- the vhost-user state handed over -----------------------------------------------------
    a_msgs, b_msgs = requests(a, mark_a), requests(b, mark_b)
    gets = by_vq(entries(a, mark_a, "vq.get_state"), last=True)
    sets = by_vq(entries(b, mark_b, "vq.set_state"), last=False)
    for vq, done in ((TX_VQ, base + k), (RX_VQ, rx_base + m)):
        name = "TX" if vq == TX_VQ else "RX"
        assert vq in gets and vq in sets, f"{name}: GET_VRING_BASE on A {gets}, SET on B {sets}"
        g, s = gets[vq], sets[vq]
        ring = net.txq[0] if vq == TX_VQ else net.rxq[0]
        if isinstance(ring, PackedVirtqueue):  # a slot position + wrap counter, not a count
            pos, wrap = ring.position_after(done)
            assert (g["last_avail_idx"], g["avail_wrap"]) == (pos, wrap), (
                f"{name}: A's GET_VRING_BASE says slot {g['last_avail_idx']} wrap "
                f"{g['avail_wrap']}, but A completed exactly {done & 0xFFFF} chains: slot {pos} "
                f"wrap {wrap}"
            )
            assert (s["avail_wrap"], s["used_wrap"]) == (g["avail_wrap"], g["used_wrap"]), (
                f"{name}: B's SET_VRING_BASE wrap counters {s} != A's reply {g}"
            )
        assert ring_is_packed(ring) or g["last_avail_idx"] == done & 0xFFFF, (
            f"{name}: A's GET_VRING_BASE says {g['last_avail_idx']}, but A completed exactly "
            f"{done & 0xFFFF} chains"
        )
        assert s["last_avail_idx"] == g["last_avail_idx"], (
            f"{name}: B's SET_VRING_BASE {s['last_avail_idx']} != A's reply {g['last_avail_idx']}"
        )
        assert g["used_idx"] == g["last_avail_idx"] and g["inflight"] == 0, (
            f"{name}: A stopped with used idx {g['used_idx']} != last_avail {g['last_avail_idx']}"
        )
        assert s["used_idx"] == s["last_avail_idx"], f"{name}: B's start state {s}"

    stops = entries(a, mark_a, "vq.stop")
    starts = entries(b, mark_b, "vq.start")
    assert stops and starts, f"A stopped {stops}, B started {starts}"
    gap_ns = min(e["mono_ns"] for e in starts) - max(e["mono_ns"] for e in stops)
    assert gap_ns > 0, (
        f"rings ran on both backends at once: A's last vq.stop {stops[-1]}, B's first "
        f"vq.start {starts[0]}"
    )
    assert not any(r["started"] for r in a.vrings()[:2]), "A's rings still run after migration"
    assert len(entries(b, 0, "vq.start")) == len(starts), "B ran a ring before the switchover"
    assert "SET_LOG_BASE" in a_msgs and "GET_VRING_BASE" in a_msgs, a_msgs
    logged = {e["vq"]: e["log_guest_addr"] for e in entries(a, mark_a, "vq.log")}
    assert logged == {RX_VQ: net.rxq[0].used_dma, TX_VQ: net.txq[0].used_dma}, (
        f"dirty-logged used rings {logged}"
    )

    # -- announce -----------------------------------------------------------------------------
    assert not entries(a, mark_a, "net.rarp"), "the source backend was asked to announce"
    if net.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE):
        guest_announces(net, b, mark_b)
    else:
        rarp = entries(b, mark_b, "net.rarp")
        assert rarp and all(e["mac"] == GUEST_MAC for e in rarp), f"SEND_RARP on B: {rarp}"
    with invariant("RARP on B's wire"):
        poll_until(
            lambda: wire_b.drain(dst.peer, 0.05) or wire_b.rarps,
            3.0,
            "a RARP frame on B's wire",
        )
    assert all(f[6:12] == GUEST for f in wire_b.rarps), "RARP not from the guest MAC"
    assert not wire_a.rarps and not wire_a.other and not wire_b.other, (
        f"stray frames: A {wire_a}, B {wire_b}"
    )
    return Outcome(stats, a_msgs, b_msgs, len(wire_b.rarps), base, gap_ns / 1e6)


def guest_announces(net: VirtioNetDriver, b: BackendProcess, mark_b: int) -> None:
    """GUEST_ANNOUNCE negotiated: QEMU tells the guest (config status ANNOUNCE + config
    interrupt) instead of sending SEND_RARP; the guest announces itself (here: a RARP from its
    MAC, as QEMU would build it) and acks with VIRTIO_NET_CTRL_ANNOUNCE_ACK."""
    with invariant("GUEST_ANNOUNCE after the switchover"):
        poll_until(
            lambda: net.config().status & VIRTIO_NET_S_ANNOUNCE,
            5.0,
            "the ANNOUNCE config status bit",
        )
        poll_until(net.dev.config_interrupt.fired, 2.0, "the config interrupt")
    assert not entries(b, mark_b, "net.rarp"), "SEND_RARP although the guest announces"
    net.send(rarp_frame(GUEST))
    assert net.ctrl_command(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) == VIRTIO_NET_OK
    with invariant("ANNOUNCE acked"):
        poll_until(lambda: not net.config().status & VIRTIO_NET_S_ANNOUNCE, 2.0, "ANNOUNCE cleared")


def advance_tx_ring(net: VirtioNetDriver, peer: WirePeer, target: int) -> None:
    """Move TX ring 0 to index ``target`` fast: every descriptor points at one small frame,
    the avail ring holds 0..size-1 once, and each round only publishes ``avail idx += size``
    and notifies. The driver's bookkeeping is then set to the new index (nothing in flight).
    """
    vq = net.txq[0]
    assert vq.in_flight == 0, "advance_tx_ring needs an idle TX ring"
    qt = net.qt
    frame = make_frame(0, 60, stream=FILL_STREAM, dst=PEER_MAC, src=GUEST)
    data = VirtioNetHdr().pack() + frame
    buf = net.alloc.alloc(4096, tag="fill frame")
    qt.write_many(
        [
            (buf, data),
            (vq.desc, DESC.pack(vq.dma.map_coherent(buf, len(data)), len(data), 0, 0) * vq.size),
            (vq.avail + 4, struct.pack(f"<{vq.size}H", *range(vq.size))),
        ]
    )
    idx = vq.avail_idx
    left = (target - idx) & 0xFFFF
    while left:
        step = min(left, vq.size - idx % vq.size)  # keep avail[idx % size] == idx % size
        idx = (idx + step) & 0xFFFF
        qt.write(vq.avail + 2, U16.pack(idx))
        assert vq.notify is not None
        vq.notify(vq)
        poll_until(lambda i=idx: vq.device_used_idx() == i, 10.0, f"TX ring at {idx}")
        peer.drain()
        left -= step
    vq.set_base(idx, write_used=False)
    net.alloc.free(buf)
    peer.drain()


# ---------------------------------------------------------------------------- set-up variants
def start_pair(
    make_testbed: Callable[..., Testbed],
    *,
    faults: tuple[str, ...] = (),
    dst_faults: tuple[str, ...] = (),
    before_init: Callable[[Testbed], None] | None = None,
    customize: Callable[[QemuMachine], None] | None = None,
    net_props: dict[str, Any] | None = None,
    **init_kw: Any,
) -> MigrationPair:
    extra: dict[str, Any] = {"net_props": net_props} if net_props else {}
    pair = MigrationPair(
        make_testbed, src_faults=faults, dst_faults=dst_faults, memory=MEMORY, **extra
    )
    pair.start_source(before_init=before_init, **init_kw)
    pair.start_destination(customize)
    return pair


def write_summary(log_dir: Path, name: str, outcome: Outcome) -> None:
    (log_dir / f"{name}.json").write_text(json.dumps(outcome.summary(), indent=1) + "\n")


def ring_is_packed(ring: Any) -> bool:
    return isinstance(ring, PackedVirtqueue)


#: The ring layouts the in-flight migration runs on: (net_props, init kwargs).
RING_LAYOUTS = {
    "split": ({}, {}),
    "packed": ({"packed": True}, {"packed": True}),
}


@pytest.mark.parametrize("layout", list(RING_LAYOUTS))
def test_inflight_tx_rx_announce(
    make_testbed: Callable[..., Testbed], log_dir: Path, layout: str
) -> None:
    net_props, init_kw = RING_LAYOUTS[layout]
    pair = start_pair(make_testbed, net_props=net_props, **init_kw)
    assert ring_is_packed(pair.net.txq[0]) == (layout == "packed")
    outcome = migrate_with_traffic(pair, Plan())
    write_summary(log_dir, "migration", outcome)
    assert outcome.stats.downtime_ms is not None and outcome.stats.downtime_ms < 1000
    # the destination keeps working
    pair.net.send(tx_frame(100))
    wire = Wire()
    wire.take(pair.dst.peer, 1, 3.0)
    assert wire.frames == [tx_frame(100)]


@pytest.mark.parametrize(
    ("fault", "symptom"),
    [
        # B resumes one past A's last completion: frame 5 is lost, the rest arrive
        pytest.param(
            "vring-base-off-by-one",
            r"TX frames on the wires are not 0\.\.10 exactly once in order: "
            r"A sent \[0, 1, 2, 3, 4\], B sent \[6, 7, 8, 9, 10\]",
            id="off-by-one",
        ),
        # A's reply counts the held chains: B starts past them and sends none
        pytest.param(
            "no-drain-before-base",
            r"TX frames on the wires are not 0\.\.10 exactly once in order: "
            r"A sent \[0, 1, 2, 3, 4\], B sent \[\]",
            id="no-drain",
        ),
        # the destination reads a zero page where A wrote the frame (num_buffers 0)
        pytest.param(
            "skip-dirty-log",
            r"RX frame 0 \(written by A during precopy\) (differs on the destination|"
            r"on the destination: rx0: num_buffers is 0)",
            id="skip-log",
        ),
    ],
)
def test_fault(make_testbed: Callable[..., Testbed], fault: str, symptom: str) -> None:
    """The scenario catches each migration fault of backend A, on the invariant it breaks."""
    pair = start_pair(make_testbed, faults=(fault,))
    with pytest.raises(AssertionError, match=symptom) as caught:
        migrate_with_traffic(pair, Plan())
    print(f"{fault}: {caught.value}")


def test_ring_wrap(make_testbed: Callable[..., Testbed], log_dir: Path) -> None:
    """The TX ring crosses 65535 -> 0 between A's last completion and B's first one."""
    pair = start_pair(make_testbed)
    plan = Plan(tx_done=3, tx_inflight=6, tx_base=65533 - 3)
    outcome = migrate_with_traffic(pair, plan)
    write_summary(log_dir, "migration-wrap", outcome)
    b_tx = pair.dst.backend.vring(TX_VQ)  # type: ignore[union-attr]
    # + 1: the sentinel frame sent after the stream
    assert (
        (b_tx["last_avail_idx"], b_tx["used_idx"]) == ((65533 + 6 + 1) & 0xFFFF,) * 2 == (4, 4)
    ), f"B's TX ring {b_tx}: not at 65533 + 6 + 1 wrapped"
    assert pair.net.txq[0].device_used_idx() == 4, "B's published TX used idx is not 4"
    a_tx = {q["vq"]: q for q in pair.src.backend.cmd("query-wire")["queues"]}[TX_VQ]  # type: ignore[union-attr]
    assert a_tx["packets"] == 65533, f"A transmitted {a_tx['packets']} frames, not 65533"


def dimm_pair(
    make_testbed: Callable[..., Testbed],
    faults: tuple[str, ...] = (),
    dst_faults: tuple[str, ...] = (),
) -> tuple[MigrationPair, int]:
    """A pair whose rings and buffers live in a DIMM plugged before the driver's init (cold
    plugged on the destination); returns the pair and the DIMM's address."""
    dimm: dict[str, int] = {}

    def plug(tb: Testbed) -> None:
        qmp = tb.qmp
        qmp.command(
            "object-add",
            {"qom-type": "memory-backend-memfd", "id": "dimm1-mem", "size": DIMM_SIZE,
             "share": True},
        )  # fmt: skip
        qmp.command("device_add", driver="pc-dimm", id="dimm1", memdev="dimm1-mem")
        (info,) = [d["data"] for d in qmp.command("query-memory-devices")]
        dimm["addr"] = int(info["addr"])
        alloc = GuestAllocator()
        alloc.add_range(dimm["addr"], DIMM_SIZE, "dimm1")  # first: everything goes there
        assert tb.alloc is not None
        for r in tb.alloc.ranges():
            alloc.add_range(r.start, r.size, r.name)
        tb.alloc = alloc

    def cold_plug(m: QemuMachine) -> None:
        m.add_object("memory-backend-memfd", id="dimm1-mem", size=DIMM_SIZE, share=True)
        m.add_device("pc-dimm", id="dimm1", memdev="dimm1-mem", addr=dimm["addr"])

    pair = start_pair(
        make_testbed,
        faults=faults,
        dst_faults=dst_faults,
        before_init=plug,
        customize=cold_plug,
        ctrl_vq=True,
        extra_features=bit(VIRTIO_NET_F_GUEST_ANNOUNCE),
    )
    assert pair.net.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE)
    return pair, dimm["addr"]


def test_after_dimm_hotplug(make_testbed: Callable[..., Testbed]) -> None:
    """A DIMM plugged at run time holds the rings and every buffer; the destination has it on
    its command line. Same invariants; this driver negotiates GUEST_ANNOUNCE (and the control
    queue QEMU emulates), so the guest announces instead of the backend."""
    pair, addr = dimm_pair(make_testbed)
    dimm = {"addr": addr}
    assert pair.net.has_feature(VIRTIO_NET_F_GUEST_ANNOUNCE)
    net = pair.net
    regions = pair.src.backend.cmd("query-mem-table")["regions"]  # type: ignore[union-attr]
    assert any(r["gpa"] == dimm["addr"] and r["size"] == DIMM_SIZE for r in regions), regions
    for vq in (net.rxq[0], net.txq[0]):
        assert dimm["addr"] <= vq.desc < dimm["addr"] + DIMM_SIZE, "ring not in the DIMM"
    migrate_with_traffic(pair, Plan())
    regions = pair.dst.backend.cmd("query-mem-table")["regions"]  # type: ignore[union-attr]
    assert any(r["gpa"] == dimm["addr"] and r["size"] == DIMM_SIZE for r in regions), regions


def viommu_pair(
    make_vbed: Callable[..., ViommuTestbed],
    faults: tuple[str, ...] = (),
    dst_faults: tuple[str, ...] = (),
) -> MigrationPair:
    """A pair whose device sits behind a virtio-iommu on both sides."""
    pair = MigrationPair(make_vbed, src_faults=faults, dst_faults=dst_faults, memory=MEMORY)
    pair.start_source()
    src = pair.src
    assert isinstance(src, ViommuTestbed)
    pair.also_rebind.append(src.rebind_viommu)
    pair.start_destination()
    return pair


def test_with_viommu(make_vbed: Callable[..., ViommuTestbed]) -> None:
    """The device behind a virtio-iommu on both sides: A and B translate IOVAs through their
    IOTLBs (B learns them by MISS after the switchover); the dirty log still carries GPAs."""
    pair = viommu_pair(make_vbed)
    src = pair.src
    assert isinstance(src, ViommuTestbed)
    a, b = src.backend, pair.dst.backend
    assert a is not None and b is not None
    mark_b = b.mark()
    migrate_with_traffic(pair, Plan())
    assert entries(b, mark_b, "iotlb.miss"), "B never asked for a translation"
    assert not entries(a, 0, "error."), entries(a, 0, "error.")
    assert not entries(b, 0, "error."), entries(b, 0, "error.")
    assert src.viommu is not None and not src.viommu.poll_faults()


# ---------------------------------------------------------------------------- cancel / fail
HELD_ON_A = "held TX frames on A's wire after the aborted migration"


def exactly_once_on(
    net: VirtioNetDriver, peer: WirePeer, frames: list[bytes], what: str, sentinel: int
) -> None:
    """``frames`` and nothing else before a sentinel frame the guest sends after them."""
    wire = Wire()
    with invariant(what):
        post_tx_sentinel(net, sentinel_frame(sentinel))
        wire.until_sentinel(peer, sentinel_frame(sentinel), 3.0)
    assert wire.frames == frames, f"{what}: sent {seqs(wire.frames)}, expected {seqs(frames)}"


def aborted_migrations(pair: MigrationPair) -> None:
    """Cancelled in precopy, cancelled after the device stop (pause-before-switchover), and
    failed (destination killed): the source keeps running with its rings intact, every frame
    reaches A's wire exactly once, B never starts a ring. Raises AssertionError."""
    src, net = pair.src, pair.net
    a, b = src.backend, pair.dst.backend
    assert a is not None and b is not None
    seq = iter(range(1000))
    sentinels = iter(range(1000, 2000))
    mark_b = b.mark()

    def held_burst(count: int) -> list[bytes]:
        a.cmd("hold-tx", enable=True)
        frames = [tx_frame(next(seq)) for _ in range(count)]
        net.send_burst(frames, wait=False)
        poll_until(lambda: a.cmd("query-wire")["tx_held"] == count, 5.0, "held TX chains")
        return frames

    def traffic_resumes(held: list[bytes]) -> None:
        src.machine.wait_for_status("running")  # type: ignore[union-attr]
        poll_until(lambda: a.vring(TX_VQ)["started"], 5.0, "A's TX ring running")
        a.cmd("hold-tx", enable=False)
        # the wire first: what A resumed from decides which held frames go out
        exactly_once_on(net, src.peer, held, HELD_ON_A, next(sentinels))
        more = [tx_frame(next(seq)) for _ in range(3)]
        with invariant("TX after the aborted migration"):
            net.wait_tx(0, 3.0)
            net.send_burst(more, timeout=3.0)
        exactly_once_on(
            net, src.peer, more, "A's wire after the aborted migration", next(sentinels)
        )
        f = rx_frame(next(seq))
        src.peer.send(f)
        with invariant("RX after the aborted migration"):
            assert net.recv(0, 3.0).data == f

    # 1. cancelled in precopy: the device was never stopped
    held = held_burst(4)
    mark_a = a.mark()
    scratch = net.alloc.alloc(SCRATCH_PAGES * 4096, tag="precopy scratch")
    hold = PrecopyHold(pair, scratch, pages=SCRATCH_PAGES)
    hold.arm()
    pair.begin()
    hold.wait_first_pass()
    pair.cancel()
    hold.release()
    traffic_resumes(held)
    assert not entries(a, mark_a, "vq.stop"), "a precopy cancel stopped A's rings"
    msgs = requests(a, mark_a)
    assert msgs[:1] == ["SET_LOG_BASE"] and "GET_VRING_BASE" not in msgs, msgs

    # 2. cancelled after the source stopped the device: A restarts from its own reply
    restart_destination(pair)
    set_capabilities(src.qmp, pause_before_switchover=True)
    held = held_burst(5)
    completed = (net.txq[0].avail_idx - 5) & 0xFFFF
    mark_a = a.mark()
    pair.begin()
    pair.wait_status("pre-switchover")
    pair.cancel()
    traffic_resumes(held)
    get = by_vq(entries(a, mark_a, "vq.get_state"), last=False)[TX_VQ]
    again = by_vq(entries(a, mark_a, "vq.set_state"), last=True)[TX_VQ]
    assert get["last_avail_idx"] == completed, f"GET_VRING_BASE {get}, completed {completed}"
    assert again["last_avail_idx"] == get["last_avail_idx"], (again, get)
    set_capabilities(src.qmp, pause_before_switchover=False)

    # 3. failed: the destination dies in precopy
    restart_destination(pair)
    mark_a = a.mark()
    hold = PrecopyHold(pair, scratch, pages=SCRATCH_PAGES)
    hold.arm()
    pair.begin()
    hold.wait_first_pass()
    assert pair.dst.machine is not None and pair.dst.machine.process is not None
    pair.dst.machine.process.send_signal(signal.SIGKILL)
    pair.wait_status("failed", 10.0)
    hold.release()
    net.alloc.free(scratch)
    traffic_resumes([])
    assert not entries(a, mark_a, "vq.stop"), "a failed precopy stopped A's rings"
    assert not entries(b, mark_b, "vq.start"), "B started a ring although no migration completed"
    assert not pair.dst.peer.drain(), "B put frames on its wire"


def test_cancel_and_failure(make_testbed: Callable[..., Testbed]) -> None:
    aborted_migrations(start_pair(make_testbed))


@pytest.mark.parametrize(
    ("fault", "symptom"),
    [
        # A resumes one past its last completion: the first held frame is lost
        pytest.param(
            "vring-base-off-by-one", rf"{HELD_ON_A}: sent \[9, 10, 11, 12\], ", id="off-by-one"
        ),
        # A's reply counts the held chains: it resumes past them and sends none
        pytest.param("no-drain-before-base", rf"{HELD_ON_A}: sent \[\], ", id="no-drain"),
    ],
)
def test_cancel_fault(make_testbed: Callable[..., Testbed], fault: str, symptom: str) -> None:
    """After a cancel at pre-switchover A restarts its rings from its own GET_VRING_BASE
    reply: a wrong reply loses (or skips) held frames."""
    pair = start_pair(make_testbed, faults=(fault,))
    with pytest.raises(AssertionError, match=symptom) as caught:
        aborted_migrations(pair)
    print(f"{fault}: {caught.value}")


def restart_destination(pair: MigrationPair) -> None:
    """A fresh destination QEMU for backend B (the previous incoming migration ended it)."""
    dst = pair.dst
    assert dst.machine is not None
    dst.machine.shutdown()
    pair.start_destination()


# ---------------------------------------------------------------------------- variant meta-tests
def variant_pair(
    variant: str,
    make_testbed: Callable[..., Testbed],
    make_vbed: Callable[..., ViommuTestbed],
    faults: tuple[str, ...] = (),
    dst_faults: tuple[str, ...] = (),
) -> MigrationPair:
    """The migration pair of one variant of the scenario: split / packed ring, rings and
    buffers in a DIMM, the device behind a vIOMMU."""
    if variant == "dimm":
        return dimm_pair(make_testbed, faults, dst_faults)[0]
    if variant == "viommu":
        return viommu_pair(make_vbed, faults, dst_faults)
    net_props, init_kw = RING_LAYOUTS[variant]
    return start_pair(make_testbed, faults=faults, dst_faults=dst_faults, net_props=net_props,
                      **init_kw)  # fmt: skip


TX_ORDER = r"TX frames on the wires are not 0\.\.10 exactly once in order: A sent \[0, 1, 2, 3, 4\]"
PRECOPY_RX = r"RX (on the destination|frame 0 \(written by A during precopy\))"


@pytest.mark.parametrize(
    ("variant", "fault", "on", "symptom"),
    [
        # B ignores SET_VRING_BASE: it starts at 0 and re-sends what A sent (or, packed, finds
        # slot 0 already used and sends nothing)
        pytest.param("split", "ignore-set-vring-base", "dst", TX_ORDER, id="split-ignore-base"),
        pytest.param(
            "packed",
            "ignore-set-vring-base",
            "dst",
            r"TX frames on the wires: .*the sentinel frame never arrived",
            id="packed-ignore-base",
        ),
        pytest.param("dimm", "ignore-set-vring-base", "dst", TX_ORDER, id="dimm-ignore-base"),
        # packed: the used descriptors A wrote into the descriptor ring never reach B's side.
        # (split without a vIOMMU: QEMU marks the used ring dirty itself when vhost stops)
        pytest.param("packed", "used-ring-not-logged", "src", PRECOPY_RX, id="packed-used-log"),
        pytest.param("viommu", "used-ring-not-logged", "src", PRECOPY_RX, id="viommu-used-log"),
        # the log names IOVAs (far above RAM): neither used entries nor data pages travel
        pytest.param("viommu", "log-at-iova", "src", PRECOPY_RX, id="viommu-log-at-iova"),
        pytest.param("packed", "skip-dirty-log", "src", PRECOPY_RX, id="packed-skip-log"),
        pytest.param("dimm", "skip-dirty-log", "src", PRECOPY_RX, id="dimm-skip-log"),
        pytest.param("viommu", "skip-dirty-log", "src", PRECOPY_RX, id="viommu-skip-log"),
        pytest.param(
            "packed",
            "vring-base-off-by-one",
            "src",
            rf"{TX_ORDER}, B sent \[6, 7, 8, 9, 10\]",
            id="packed-off-by-one",
        ),
        pytest.param(
            "dimm",
            "vring-base-off-by-one",
            "src",
            rf"{TX_ORDER}, B sent \[6, 7, 8, 9, 10\]",
            id="dimm-off-by-one",
        ),
        pytest.param(
            "viommu",
            "vring-base-off-by-one",
            "src",
            rf"{TX_ORDER}, B sent \[6, 7, 8, 9, 10\]",
            id="viommu-off-by-one",
        ),
        pytest.param(
            "packed",
            "no-drain-before-base",
            "src",
            rf"{TX_ORDER}, B sent \[\]",
            id="packed-no-drain",
        ),
    ],
)
def test_variant_fault(
    make_testbed: Callable[..., Testbed],
    make_vbed: Callable[..., ViommuTestbed],
    variant: str,
    fault: str,
    on: str,
    symptom: str,
) -> None:
    """The packed, DIMM and vIOMMU variants of the scenario catch the faults their claims
    rest on; ``on`` says whether backend A (source) or B (destination) has the fault."""
    pair = variant_pair(
        variant,
        make_testbed,
        make_vbed,
        faults=(fault,) if on == "src" else (),
        dst_faults=(fault,) if on == "dst" else (),
    )
    with pytest.raises(AssertionError, match=symptom) as caught:
        migrate_with_traffic(pair, Plan())
    print(f"{variant} {fault}: {caught.value}")


# ---------------------------------------------------------------------------- work in progress
def test_rx_buffers_taken_at_switchover(make_testbed: Callable[..., Testbed]) -> None:
    """A has taken RX buffers it has not filled when QEMU stops it: B fills exactly those."""
    rx_taken_at_switchover(start_pair(make_testbed))


def test_rx_taken_at_switchover_catches_no_drain(make_testbed: Callable[..., Testbed]) -> None:
    pair = start_pair(make_testbed, faults=("no-drain-before-base",))
    with pytest.raises(
        AssertionError, match=r"B filled buffers \[[0-9, ]+\], not the ones A had taken"
    ):
        rx_taken_at_switchover(pair)


def idle_dimm_pair(make_testbed: Callable[..., Testbed], **kw: Any) -> MigrationPair:
    """A pair with an idle DIMM (nothing of the driver in it), cold-plugged on the
    destination."""
    plug, cold_plug = idle_dimm_hooks(DIMM_SIZE)
    return start_pair(make_testbed, before_init=plug, customize=cold_plug, **kw)


def test_migration_with_a_dimm_unplug_pending(
    make_testbed: Callable[..., Testbed], log_dir: Path
) -> None:
    facts = migrate_with_unplug_pending(idle_dimm_pair(make_testbed), "dimm1")
    (log_dir / "unplug-pending.json").write_text(json.dumps(facts, default=str, indent=1))


def test_device_add_during_migration(make_testbed: Callable[..., Testbed], log_dir: Path) -> None:
    facts = device_add_during_migration(start_pair(make_testbed), DIMM_SIZE)
    (log_dir / "device-add-during-migration.json").write_text(json.dumps(facts, indent=1))
    print(facts["refused"])


def test_meta_unplug_pending_catches_ignored_rem(make_testbed: Callable[..., Testbed]) -> None:
    pair = idle_dimm_pair(make_testbed, dst_faults=("ignore-rem-mem-reg",))
    with pytest.raises(AssertionError, match="B after the eject on the destination: the removed"):
        migrate_with_unplug_pending(pair, "dimm1")
