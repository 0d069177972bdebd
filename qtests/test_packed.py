"""Packed virtqueues (VIRTIO_F_RING_PACKED) through real QEMU 10 and the backend process.

``-device virtio-net-pci,packed=on`` and the qtest driver's PackedVirtqueue: TX and RX byte
for byte (the split-ring scenarios of test_datapath, unchanged), the rings wrapping several
times (multi-slot TX chains, so laps and wrap counters do not line up with chain counts), and
a stop/cont round trip of the vring base: QEMU's GET_VRING_BASE / SET_VRING_BASE carry the
positions and both wrap counters (bits 0-14 / 15 / 16-30 / 31), and the backend resumes
exactly where the driver is.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qtests.qos.frames import make_frame
from qtests.qos.packed_virtqueue import PackedVirtqueue
from qtests.qos.testbed import Testbed
from qtests.qos.waiting import poll_until
from qtests.test_datapath import (
    expect_on_wire,
    rx_mergeable_byte_exact,
    tx_frames_arrive_byte_exact,
)

QUEUE_SIZE = 256
BATCH = 96


def start_packed(make_testbed: Callable[..., Testbed], **kw) -> Testbed:
    tb = make_testbed(net_props={"packed": True}, **kw).start(packed=True)
    net = tb.net
    assert isinstance(net.txq[0], PackedVirtqueue) and isinstance(net.rxq[0], PackedVirtqueue)
    for vq in (net.rxq[0], net.txq[0]):
        vr = tb.backend.vring(vq.index)
        assert vr.get("packed") is True, f"backend ring {vq.index} is not packed: {vr}"
    return tb


def traffic_laps(tb: Testbed, start_seq: int, frames_each_way: int) -> None:
    """TX (header in its own slot: two-slot chains) and RX, in batches, byte exact."""
    net, peer = tb.net, tb.peer
    out = [make_frame(start_seq + i, 60 + (i % 7) * 100) for i in range(frames_each_way)]
    for s in range(0, len(out), BATCH):
        chunk = out[s : s + BATCH]
        net.send_burst(chunk, hdr_separate=bool(s // BATCH % 2 == 0), timeout=20)
        expect_on_wire(peer, chunk)
    inbound = [
        make_frame(start_seq + i, 60 + (i % 5) * 300, stream=1) for i in range(frames_each_way)
    ]
    for s in range(0, len(inbound), BATCH):
        chunk = inbound[s : s + BATCH]
        for f in chunk:
            peer.send(f)
        for f in chunk:
            got = net.recv(0)
            assert got.data == f, f"RX frame {start_seq + s}: got {len(got.data)} bytes"


def driver_base(vq: PackedVirtqueue) -> tuple[int, bool, int, bool]:
    """The vring base the backend must report once idle: everything it took is used, so its
    last_avail (and avail wrap) is the driver's next used slot (and used wrap) - not the
    driver's fill position, which is a lap ahead on a full RX ring."""
    return (vq.next_used, vq.used_wrap, vq.next_used, vq.used_wrap)


def vring_base_round_trip(tb: Testbed) -> None:
    """Scenario: 'stop' makes QEMU take each ring's base (GET_VRING_BASE: positions and both
    wrap counters) and 'cont' hands the same back (SET_VRING_BASE); both equal the driver's
    idle position. Raises AssertionError naming the ring that disagrees."""
    net = tb.net
    tx, rx = net.txq[0], net.rxq[0]
    # stop: QEMU takes the vring base (GET_VRING_BASE) with both wrap counters
    mark = tb.backend.mark()
    tb.qmp.command("stop")
    poll_until(
        lambda: len(tb.backend.journal(["vq.get_state"], mark)) >= 2,
        10,
        "GET_VRING_BASE of both rings after 'stop'",
    )
    got = {e["vq"]: e for e in tb.backend.journal(["vq.get_state"], mark)}
    for vq in (rx, tx):
        e = got[vq.index]
        st = (e["last_avail_idx"], e["avail_wrap"], e["used_idx"], e["used_wrap"])
        assert st == driver_base(vq), f"vq {vq.index}: backend {st}, driver {driver_base(vq)}"
    # QEMU keeps what it was told (it hands the same back on cont)
    for vq in (rx, tx):
        q = tb.vring_base_from_qemu(vq.index)
        assert (q["last-avail-idx"], q["used-idx"]) == (vq.next_used, vq.next_used), q

    mark = tb.backend.mark()
    tb.qmp.command("cont")
    poll_until(
        lambda: len(tb.backend.journal(["vq.set_state"], mark)) >= 2,
        10,
        "SET_VRING_BASE of both rings after 'cont'",
    )
    got = {e["vq"]: e for e in tb.backend.journal(["vq.set_state"], mark)}
    for vq in (rx, tx):
        e = got[vq.index]
        st = (e["last_avail_idx"], e["avail_wrap"], e["used_idx"], e["used_wrap"])
        assert st == driver_base(vq), (
            f"vq {vq.index}: SET_VRING_BASE {st}, driver {driver_base(vq)}"
        )


@pytest.mark.qemu
def test_packed_tx_rx_byte_exact_wrap_and_vring_base(make_testbed: Callable[..., Testbed]) -> None:
    tb = start_packed(make_testbed)
    net = tb.net
    tx, rx = net.txq[0], net.rxq[0]
    assert tx.size == rx.size == QUEUE_SIZE
    tx_frames_arrive_byte_exact(tb)
    rx_mergeable_byte_exact(tb)

    # several laps of both rings; the TX wrap counter flips mid-chain at times
    traffic_laps(tb, 10_000, 4 * QUEUE_SIZE)
    vr = tb.backend.vring(tx.index)
    assert (vr["last_avail_idx"], vr["avail_wrap"]) == (tx.next_avail, tx.avail_wrap)
    assert (vr["used_idx"], vr["used_wrap"]) == (tx.next_used, tx.used_wrap)
    assert vr["inflight"] == 0

    vring_base_round_trip(tb)
    # and the data path resumes exactly there
    traffic_laps(tb, 20_000, QUEUE_SIZE + 17)
    last = make_frame(99_999, 1514)
    net.send(last)
    expect_on_wire(tb.peer, [last])
    assert tb.backend.journal(["error."]) == []


@pytest.mark.qemu
def test_meta_packed_scenarios_catch_faults(make_testbed: Callable[..., Testbed]) -> None:
    """The packed scenarios fail against a faulty backend: off-by-one vring base, drop-tx."""
    tb = start_packed(make_testbed, faults=["vring-base-off-by-one"])
    traffic_laps(tb, 0, QUEUE_SIZE // 2)
    with pytest.raises(AssertionError, match=r"vq \d: backend \(\d+, \w+, \d+, \w+\), driver"):
        vring_base_round_trip(tb)
    tb2 = start_packed(make_testbed, faults=["drop-tx"], name="drop")
    with pytest.raises(AssertionError, match="reached the wire"):
        tx_frames_arrive_byte_exact(tb2)
