"""The VDUSE backend killed with traffic in flight and restarted over vhost-vdpa (issue 15,
item 4 on the vDPA bus).

Over vhost-vdpa QEMU reconnects nothing and notices nothing: ``/dev/vhost-vdpa-N`` stays open,
the kernel keeps the VDUSE device (queues, IOTLB, the dead process's kick eventfds) and
``vduse_dev_release`` moves the messages the dead process read but never answered back to the
send list "so they can be processed after reconnection" (drivers/vdpa/vdpa_user/vduse_dev.c).
The replacement is ``python -m backends --transport vduse --name NAME --vduse-reattach``: it
opens the same ``/dev/vduse/NAME``, recovers features, IOTLB and queues from the kernel and
resumes each split ring at the used index in guest memory (backends/vduse/transport.py).

What this guarantees, and :func:`reattach_mid_stream` tests exactly:

* no used entry is lost or doubled: each ring's used index ends at the number of chains the
  driver made available, the driver (which rejects a used id that is not in flight) reclaims
  every chain once, and the replacement resumed at the used index the guest saw at the kill;
* chains in flight at the kill - popped by the dead process, not completed - are processed
  once, by the replacement: TX chains it held (read, not sent: monitor ``hold-tx``) reach the
  wire exactly once, in order; RX buffers it held (popped, unfilled: ``hold-rx``) are filled
  by the replacement with the first frames sent after the restart. A TX chain the dead
  process had already sent but not yet completed would be sent again (at least once, at most
  twice): a device cannot make "send" and "publish used" one atomic step. The held chains make
  the in-flight set exact, so the test can state exactly-once for them;
* everything after the restart, TX and RX, is delivered exactly once byte-exact, checked up to
  a sentinel frame sent after the stream (never a silence window). Frames sent to the dead
  process's UDP port are gone with it (none are sent in this window).

Split ring, one queue pair: VDUSE refuses CTRL_VQ, so a driver cannot enable a second pair
(qtests/test_vdpa_lane.py test_two_queue_pairs); a packed ring has no used index in guest
memory and re-attach refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .frames import make_frame, parse_frame
from .reconnect import start_replacement
from .testbed import GUEST_MAC, Testbed
from .virtio_net import VirtioNetError
from .virtqueue import VirtqueueError
from .waiting import WaitTimeout, poll_until
from .wire_peer import WirePeerTimeout

RX_Q, TX_Q = 0, 1
TX_STREAM, RX_STREAM, SENTINEL_STREAM = 0x51, 0x52, 0x53
TIMEOUT = 30.0  # nested TCG
Errors = (VirtqueueError, VirtioNetError, WaitTimeout, WirePeerTimeout)


def frames(first: int, n: int, stream: int) -> list[bytes]:
    return [make_frame(s, 70 + 97 * (s % 13), stream=stream) for s in range(first, first + n)]


def tx_until_sentinel(tb: Testbed, want: Sequence[bytes], what: str, n: int) -> None:
    """Send a sentinel after the TX stream; the wire must carry exactly ``want`` before it."""
    sentinel = make_frame(n, 64, stream=SENTINEL_STREAM)
    try:
        tb.net.send_burst([sentinel], wait=False)
        got = tb.peer.recv_until(sentinel, timeout=TIMEOUT)
    except Errors as e:
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
    if got != list(want):
        seqs = [(p[0], p[1]) if (p := parse_frame(f)) else None for f in got]
        raise AssertionError(
            f"{what}: {len(got)} frames before the sentinel, expected {len(want)}: TX frames "
            f"lost, doubled or reordered (got (stream, seq) {seqs})"
        )


def rx_exactly(tb: Testbed, sent: Sequence[bytes], what: str, n: int) -> None:
    """The peer sent ``sent`` then a sentinel: the guest must receive exactly that."""
    sentinel = make_frame(n, 64, stream=SENTINEL_STREAM)
    tb.peer.send(sentinel)
    got: list[bytes] = []
    try:
        while True:
            data = tb.net.recv(0, TIMEOUT).data
            if data == sentinel:
                break
            got.append(data)
    except Errors as e:
        raise AssertionError(f"{what}: {type(e).__name__}: {e} (received {len(got)})") from e
    assert got == list(sent), (
        f"{what}: {len(got)} frames before the sentinel, expected {len(sent)} "
        "(lost, doubled, reordered or corrupted)"
    )


def reattach_mid_stream(
    tb: Testbed,
    faults_after: Sequence[str] = (),
    *,
    before: int = 5,
    held_tx: int = 4,
    held_rx: int = 2,
    after: int = 6,
) -> dict[str, Any]:
    """The scenario (module doc) on a started vhost-vdpa testbed. Returns the numbers."""
    old = tb.backend
    assert old is not None
    net = tb.net
    txq, rxq = net.txq[0], net.rxq[0]
    tx_used0, rx_used0 = txq.device_used_idx(), rxq.device_used_idx()
    posted = 0
    # -- the stream before the kill, both ways --------------------------------------------------
    first = frames(0, before, TX_STREAM)
    net.send_burst(first, wait=False)
    tx_until_sentinel(tb, first, "TX before the kill", 0)
    posted += before + 1
    rx_first = frames(100, 3, RX_STREAM)
    for f in rx_first:
        tb.peer.send(f)
    rx_exactly(tb, rx_first, "RX before the kill", 1)
    rx_done = len(rx_first) + 1
    # -- in flight: popped by the backend, neither completed nor (TX) sent ---------------------
    old.cmd("hold-rx", count=held_rx)
    old.cmd("hold-tx", enable=True)
    inflight = frames(before, held_tx, TX_STREAM)
    net.send_burst(inflight, wait=False)
    posted += held_tx

    def holding() -> bool:
        w = old.cmd("query-wire")
        return bool(w["tx_held"] == held_tx and w["rx_held"] == held_rx)

    poll_until(holding, TIMEOUT, f"the backend holding {held_tx} TX and {held_rx} RX chains")
    tx_used_kill = txq.device_used_idx()
    rx_used_kill = rxq.device_used_idx()
    assert tx_used_kill == (tx_used0 + before + 1) & 0xFFFF, "held TX chains were completed"
    assert rx_used_kill == (rx_used0 + rx_done) & 0xFFFF, "held RX buffers were completed"
    vring_at_kill = {v["index"]: v for v in old.vrings()}
    # -- SIGKILL, restart on the same device ---------------------------------------------------
    old.kill()
    new = start_replacement(tb, old, faults_after)
    (entry,) = new.journal(["vduse.reattach"])
    resumed = {q["vq"]: q for q in entry["queues"]}
    # the chains in flight: each TX frame exactly once, in order, by the replacement
    tx_until_sentinel(tb, inflight, "TX chains in flight at the kill", 2)
    posted += 1
    # RX: the buffers the dead process held are offered again (the ring resumed at the used
    # index), so nothing is skipped: the used index check below counts every buffer once
    rx_after = frames(200, held_rx + 3, RX_STREAM)
    for f in rx_after:
        tb.peer.send(f)
    rx_exactly(tb, rx_after, "RX after the re-attach", 3)
    rx_done += len(rx_after) + 1
    # after the restart: a TX stream, then the end state of both rings
    last = frames(300, after, TX_STREAM)
    net.send_burst(last, wait=False)
    tx_until_sentinel(tb, last, "TX after the re-attach", 4)
    posted += after + 1
    try:
        net.wait_tx(0, TIMEOUT)
    except Errors as e:
        raise AssertionError(f"TX completions after the re-attach: {e}") from e
    assert txq.device_used_idx() == (tx_used0 + posted) & 0xFFFF, (
        f"TX used idx {txq.device_used_idx()}, expected {(tx_used0 + posted) & 0xFFFF} "
        f"({posted} chains posted): used entries lost or doubled"
    )
    assert rxq.device_used_idx() == (rx_used0 + rx_done) & 0xFFFF, (
        f"RX used idx {rxq.device_used_idx()}, expected {(rx_used0 + rx_done) & 0xFFFF}: "
        "used entries lost or doubled"
    )
    assert resumed[TX_Q]["resumed_at"] == tx_used_kill, (
        f"the replacement resumed TX at {resumed[TX_Q]}, the used idx at the kill was "
        f"{tx_used_kill}: used entries lost or doubled"
    )
    assert resumed[RX_Q]["resumed_at"] == rx_used_kill, (
        f"the replacement resumed RX at {resumed[RX_Q]}, the used idx at the kill was "
        f"{rx_used_kill}: used entries lost or doubled"
    )
    errors = new.journal(["error."])
    assert not errors, f"the replacement journalled errors: {errors}"
    return {
        "tx_used_at_kill": tx_used_kill,
        "rx_used_at_kill": rx_used_kill,
        "dead_process_rings": {
            i: [v.get("last_avail_idx"), v.get("used_idx")] for i, v in vring_at_kill.items()
        },
        "resumed": {
            q: [r["info_base"], r["used_idx"], r["resumed_at"]] for q, r in resumed.items()
        },
        "status_inferred": entry["status"],
        "tx_posted": posted,
        "guest_mac": GUEST_MAC,
    }


def reattach_in_running_stream(
    tb: Testbed, *, total: int = 40, kill_at: int = 20, burst: int = 12, dead: int = 10
) -> dict[str, Any]:
    """A TX stream that does not stop for the kill: the driver posts one chain at a time
    (kick each), then ``burst`` chains with one kick, and the backend is SIGKILLed right
    after (``kill_at`` chains posted in all, the burst maybe half done); ``dead`` more are
    posted while no process serves the device, the replacement re-attaches, the rest follow.

    Where the kill lands is up to the scheduler, so the assertion is the exact form of what
    the device can promise: the dead process sent frames 0..S-1 in order; the replacement
    resumes at the used index U it finds (the chains completed at the kill) and sends U..N-1.
    So the wire carries 0..S-1 then U..N-1 with U <= S: nothing lost, and the only repeats are
    the S - U chains the dead process had sent but not completed (in flight at the kill). The
    used index ends at N exactly."""
    old = tb.backend
    assert old is not None
    net, txq = tb.net, tb.net.txq[0]
    used0 = txq.device_used_idx()
    stream = frames(500, total, TX_STREAM)
    for f in stream[: kill_at - burst]:
        net.send_burst([f], wait=False)
    net.send_burst(stream[kill_at - burst : kill_at], wait=False)  # one kick, then the kill
    old.kill()
    for f in stream[kill_at : kill_at + dead]:
        net.send_burst([f], wait=False)  # kicks go to the dead process's eventfd
    new = start_replacement(tb, old, ())
    (entry,) = new.journal(["vduse.reattach"])
    resumed = {q["vq"]: q for q in entry["queues"]}
    u = (resumed[TX_Q]["resumed_at"] - used0) & 0xFFFF
    for f in stream[kill_at + dead :]:
        net.send_burst([f], wait=False)
    sentinel = make_frame(9, 64, stream=SENTINEL_STREAM)
    try:
        net.send_burst([sentinel], wait=False)
        got = tb.peer.recv_until(sentinel, timeout=TIMEOUT)
        net.wait_tx(0, TIMEOUT)
    except Errors as e:
        raise AssertionError(f"TX stream across the kill: {type(e).__name__}: {e}") from e
    index = {f: i for i, f in enumerate(stream)}
    seqs = [index.get(f, -1) for f in got]
    tail = list(range(u, total))
    fits = [s for s in range(u, total + 1) if seqs == list(range(s)) + tail]
    s = fits[0] if fits else -1
    assert fits, (
        f"TX stream across the kill: the wire carried {seqs}, expected 0..S-1 then U..N-1 "
        f"with U={u} (the used index at the re-attach) <= S: frames lost, doubled or reordered"
    )
    assert txq.device_used_idx() == (used0 + total + 1) & 0xFFFF, (
        f"TX used idx {txq.device_used_idx()}, expected {(used0 + total + 1) & 0xFFFF}: "
        "used entries lost or doubled"
    )
    rx = frames(600, 4, RX_STREAM)
    for f in rx:
        tb.peer.send(f)
    rx_exactly(tb, rx, "RX after the re-attach", 10)
    errors = new.journal(["error."])
    assert not errors, f"the replacement journalled errors: {errors}"
    return {"sent_by_dead_process": s, "resumed_at": u, "sent_twice": s - u, "total": total}
