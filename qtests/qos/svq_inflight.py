"""Chains the source device holds at the switchover of a vhost-vdpa migration with shadow
virtqueues (issue 15, item 3 on the vDPA bus): RX buffers taken but not filled, TX chains popped
but not completed.

What QEMU 10 does with them (hw/virtio/vhost-vdpa.c, hw/virtio/vhost-shadow-virtqueue.c):
``vhost_vdpa_dev_start(dev, false)`` first calls ``vhost_vdpa_suspend``, which without
VHOST_BACKEND_F_SUSPEND (VDUSE has none) resets the device (SET_STATUS 0, a synchronous VDUSE
message: the device has answered before QEMU goes on); then ``vhost_vdpa_svqs_stop`` ->
``vhost_svq_stop``: ``vhost_svq_flush`` forwards to the guest ring every used entry the device
wrote into the shadow ring, then every element still in ``desc_state[]`` (and
``next_guest_avail_elem``) goes back with ``virtqueue_unpop``, which rewinds the guest ring's
last_avail_idx. ``vhost_vdpa_get_vring_base`` with SVQ answers
``virtio_queue_get_last_avail_idx`` without asking the device. So:

* RX buffers the source device popped and held unfilled are still available in the guest ring
  after the switchover; the destination's SVQ offers them to device B again, and B fills them
  with the first frames sent after the switchover. Every frame sent to the guest after the
  switchover arrives once, byte-exact, on the destination; the guest's RX used index counts
  exactly those frames (a held buffer is neither lost nor completed twice).
* TX chains the source popped and held (read, not sent: monitor ``hold-tx``) are unpopped too
  and transmitted exactly once, by B, in order.
* The source device must leave held buffers alone at the reset. One that returns them as used
  (fault ``complete-held-rx-on-reset``) hands the guest empty RX completions through the
  shadow ring flush, before the unpop.

Checked with sentinel frames after each stream, never a silence window.
"""

from __future__ import annotations

from typing import Any

from .frames import PEER_MAC, make_frame
from .migration import DriverErrors, MigrationPair
from .svq_migration import GUEST, TIMEOUT
from .virtio_net import VirtioNetDriver
from .waiting import poll_until
from .wire_peer import WirePeerTimeout

TX_STREAM, RX_STREAM, SENTINEL_STREAM = 0x61, 0x62, 0x63


def tx_frame(seq: int) -> bytes:
    return make_frame(seq, 80 + (seq * 157) % 1300, stream=TX_STREAM, dst=PEER_MAC, src=GUEST)


def rx_frame(seq: int) -> bytes:
    return make_frame(seq, 70 + (seq * 331) % 1400, stream=RX_STREAM, dst=GUEST, src=PEER_MAC)


def sentinel(seq: int) -> bytes:
    return make_frame(seq, 64, stream=SENTINEL_STREAM, dst=GUEST, src=PEER_MAC)


def migrate_with_chains_held(
    pair: MigrationPair, *, held_rx: int = 3, held_tx: int = 3, rx_after: int = 6
) -> dict[str, Any]:
    """The scenario (module doc) on a started SVQ pair; returns the numbers."""
    src, dst = pair.src, pair.dst
    a = src.backend
    assert a is not None
    net: VirtioNetDriver = pair.net
    rxq, txq = net.rxq[0], net.txq[0]
    rx_used0, tx_used0 = rxq.device_used_idx(), txq.device_used_idx()
    # RX runs through A first: one frame, then A takes buffers and holds them unfilled
    src.peer.send(rx_frame(0))
    try:
        assert net.recv(0, TIMEOUT).data == rx_frame(0), "RX through A before the migration"
    except DriverErrors as e:
        raise AssertionError(f"RX through A before the migration: {e}") from e
    a.cmd("hold-rx", count=held_rx)
    a.cmd("hold-tx", enable=True)
    tx = [tx_frame(s) for s in range(held_tx)]
    net.send_burst(tx, wait=False)

    def holding() -> bool:
        w = a.cmd("query-wire")
        return bool(w["rx_held"] == held_rx and w["tx_held"] == held_tx)

    poll_until(holding, TIMEOUT, f"A holding {held_rx} RX buffers and {held_tx} TX chains")
    a_sent = a.cmd("query-wire")["wire"]["tx_frames"]
    assert rxq.device_used_idx() == (rx_used0 + 1) & 0xFFFF, "A completed a held RX buffer"
    assert txq.device_used_idx() == tx_used0, "A completed a held TX chain"
    stats = pair.migrate(timeout=120.0)

    # -- TX: the held chains, once, by B, in order (then a sentinel) -----------------------------
    end = make_frame(999, 64, stream=SENTINEL_STREAM, dst=PEER_MAC, src=GUEST)
    net.send_burst([end], wait=False)
    try:
        got_tx = dst.peer.recv_until(end, timeout=TIMEOUT)
    except WirePeerTimeout as e:
        raise AssertionError(f"TX on the destination's wire: {e}") from e
    assert got_tx == tx, (
        f"TX chains held at the switchover: B sent {len(got_tx)} frames before the sentinel, "
        f"expected the {held_tx} held ones once, in order"
    )
    assert a.cmd("query-wire")["wire"]["tx_frames"] == a_sent, "A sent a held TX frame"
    # -- RX: every frame after the switchover, once, byte-exact, on the destination --------------
    rx = [rx_frame(s) for s in range(1, 1 + rx_after)]
    for f in [*rx, sentinel(1)]:
        dst.peer.send(f)
    for i, want in enumerate([*rx, sentinel(1)]):
        try:
            have = net.recv(0, TIMEOUT).data
        except DriverErrors as e:
            raise AssertionError(f"RX frame {i} after the switchover: {e}") from e
        assert have == want, (
            f"RX frame {i} after the switchover differs on the destination ({len(have)} bytes, "
            f"expected {len(want)}): lost, doubled or corrupted"
        )
    want_rx_used = (rx_used0 + 1 + rx_after + 1) & 0xFFFF
    assert rxq.device_used_idx() == want_rx_used, (
        f"RX frame count: the guest's RX used idx is {rxq.device_used_idx()}, expected "
        f"{want_rx_used}: used entries lost or doubled"
    )
    try:
        net.wait_tx(0, TIMEOUT)
    except DriverErrors as e:
        raise AssertionError(f"TX completions on the destination: {e}") from e
    assert txq.device_used_idx() == (tx_used0 + held_tx + 1) & 0xFFFF
    b_rx = dst.backend.vring(0) if dst.backend is not None else {}
    return {
        "downtime_ms": stats.downtime_ms,
        "total_time_ms": stats.total_time_ms,
        "held_rx": held_rx,
        "held_tx": held_tx,
        "b_shadow_rx": [b_rx.get("last_avail_idx"), b_rx.get("used_idx")],
    }
