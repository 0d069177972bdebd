"""The backend killed with traffic in flight and restarted: issue 15, item 4.

What QEMU guarantees is stated in `qtests.qos.reconnect`; `reconnect_mid_stream` tests exactly
that on a started testbed whose QEMU reconnects (``reconnect_ms``):

* TX chains the dead backend had popped and held (read, neither sent nor completed: monitor
  ``hold-tx``) are handled at most once, all alike: after the vhost stop QEMU's own
  virtio-net, whose link is down, may drop every available TX chain
  (``virtio_net_set_status`` -> ``virtio_net_drop_tx_queue_data``: completed, never sent), or
  the replacement gets them (SET_VRING_BASE = the used idx at the crash) and transmits each
  exactly once, in order. Both happen here, depending on the order QEMU handles the
  disconnect in; never a partial or repeated set;
* no used entry is lost or doubled: QEMU's SET_VRING_BASE for the replacement equals the used
  idx the guest saw at the crash, every chain the driver made available is used exactly once
  (the driver rejects a used id that is not in flight), and the used idx ends at the number
  of chains posted;
* everything after the reconnect, TX and RX, is delivered exactly once byte-exact (sentinel).

Split rings only. For a packed ring QEMU restores nothing: ``virtio_queue_packed_restore_last_
avail_idx`` is empty ("We don't have a reference like avail idx in shared memory"), so the
replacement's SET_VRING_BASE is whatever QEMU had at the previous vhost start - slot 0 here,
whose descriptor the guest sees used - and the queue stalls. `packed_reconnect_base` pins that.
"""

from __future__ import annotations

from collections.abc import Sequence

from .frames import make_frame
from .reconnect import TX_Q, start_replacement, take_backend_down, wait_device_back
from .testbed import Testbed
from .virtio_net import VirtioNetError
from .virtqueue import VirtqueueError
from .waiting import WaitTimeout, poll_until
from .wire_peer import WirePeerTimeout

TX_STREAM, RX_STREAM, SENTINEL_STREAM = 0x41, 0x42, 0x43
Errors = (VirtqueueError, VirtioNetError, WaitTimeout, WirePeerTimeout)


def _frames(first: int, n: int, stream: int) -> list[bytes]:
    return [make_frame(s, 90 + 61 * (s % 17), stream=stream) for s in range(first, first + n)]


def _wire_until_sentinel(
    tb: Testbed, want: Sequence[bytes], what: str, n: int, *, or_none: bool = False
) -> list[bytes]:
    """The frames before a sentinel must be ``want`` (or nothing, with ``or_none``)."""
    sentinel = make_frame(n, 64, stream=SENTINEL_STREAM)
    try:
        tb.net.send_burst([sentinel], wait=False)
        got = tb.peer.recv_until(sentinel)
    except Errors as e:
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
    assert got == list(want) or (or_none and not got), (
        f"{what}: {len(got)} frames before the sentinel, expected {len(want)} "
        f"(lost, doubled or reordered)"
    )
    return got


def reconnect_mid_stream(
    tb: Testbed, faults_after: Sequence[str] = (), before: int = 6, held: int = 5
) -> str:
    """Stream, hold ``held`` TX chains in the backend, SIGKILL it, start a replacement (with
    ``faults_after``), check QEMU's guarantee (module doc). Returns what became of the held
    chains ("dropped by QEMU" / "sent by the replacement"). Raises AssertionError."""
    assert tb.backend is not None
    net, b1 = tb.net, tb.backend
    txq = net.txq[0]
    start_used = txq.device_used_idx()
    # the stream before: completed
    first = _frames(0, before, TX_STREAM)
    net.send_burst(first)
    _wire_until_sentinel(tb, first, "TX before the crash", 0)
    # in flight: popped and held by the backend
    b1.cmd("hold-tx", enable=True)
    inflight = _frames(before, held, TX_STREAM)
    net.send_burst(inflight, wait=False)
    poll_until(
        lambda: b1.cmd("query-wire")["tx_held"] == held,
        5.0,
        f"the backend holding {held} popped TX chains",
    )
    used_at_crash = txq.device_used_idx()
    assert used_at_crash == (start_used + before + 1) & 0xFFFF, "held chains were completed"
    old = take_backend_down(tb, crash=True)
    new = start_replacement(tb, old, list(faults_after))
    bases = wait_device_back(tb, new)
    # the held chains: dropped by QEMU, or offered again and transmitted exactly once
    got = _wire_until_sentinel(tb, inflight, "TX chains in flight at the crash", 1, or_none=True)
    fate = "sent by the replacement" if got else "dropped by QEMU"
    base_want = used_at_crash if got else (used_at_crash + held) & 0xFFFF
    try:
        net.wait_tx(0, 5.0)
    except Errors as e:
        raise AssertionError(f"TX completions after the reconnect: {e}") from e
    posted = before + 1 + held + 1  # the two sentinels are chains too
    assert txq.device_used_idx() == (start_used + posted) & 0xFFFF, (
        f"TX used idx {txq.device_used_idx()} after the reconnect, expected "
        f"{(start_used + posted) & 0xFFFF}: used entries lost or doubled"
    )
    assert bases[TX_Q]["last_avail_idx"] == base_want, (
        f"held chains {fate}, but QEMU's SET_VRING_BASE for the replacement {bases[TX_Q]} is "
        f"not {base_want} (used idx at the crash {used_at_crash})"
    )
    # after the reconnect: both ways, exactly once
    after = _frames(100, 8, TX_STREAM)
    rx = _frames(200, 6, RX_STREAM)
    try:
        net.send_burst(after, wait=False)
        for f in rx:
            tb.peer.send(f)
        got_rx = [net.recv(0, 5.0).data for _ in rx]
    except Errors as e:
        raise AssertionError(f"traffic after the reconnect: {e}") from e
    assert got_rx == rx, "RX after the reconnect is not exactly the frames sent"
    _wire_until_sentinel(tb, after, "TX after the reconnect", 2)
    try:
        net.wait_tx(0, 5.0)
    except Errors as e:
        raise AssertionError(f"TX completions after the reconnect: {e}") from e
    assert new.running and not new.journal(["error."]), new.journal(["error."])
    return fate


def packed_reconnect_base(tb: Testbed, before: int = 6) -> dict[str, object]:
    """Packed ring: traffic, SIGKILL, replacement. QEMU hands the replacement the vring base
    of the previous start (not the crash position); returns that SET_VRING_BASE entry."""
    assert tb.backend is not None
    net = tb.net
    first = _frames(0, before, TX_STREAM)
    net.send_burst(first)
    _wire_until_sentinel(tb, first, "TX before the crash", 0)
    start = [e for e in tb.backend.journal(["vq.set_state"]) if e["vq"] == TX_Q][-1]
    old = take_backend_down(tb, crash=True)
    new = start_replacement(tb, old, [])
    bases = wait_device_back(tb, new)
    got = bases[TX_Q]
    assert (got["last_avail_idx"], got["avail_wrap"]) == (
        start["last_avail_idx"],
        start["avail_wrap"],
    ), f"packed: QEMU restored {got}, the previous start was {start}"
    assert new.running, "the replacement died on a ring it cannot continue"
    return dict(got)
