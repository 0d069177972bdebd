"""virtio-net datapath through real QEMU 10 and the backend process, byte for byte.

* TX: 1..N frames of 60..9000 bytes (header in its own descriptor or sharing one with the
  frame) arrive on the backend's UDP wire unchanged. ``tx_frames_arrive_byte_exact`` is the
  scenario; run against a backend with the ``drop-tx`` fault it must fail.
* RX: frames sent into the wire (and the monitor's ``inject-packet``) land in the driver's
  buffers unchanged: mergeable (a 9000-byte frame over five 2 KiB buffers, ``num_buffers``
  5) and not (one big buffer per frame; a frame larger than the buffer is dropped and
  counted, never truncated; a separate header descriptor works too).
* Indirect descriptors on TX and RX.
* Notification suppression: with EVENT_IDX the backend interrupts only when the used index
  passes the driver's ``used_event`` (counted as call-eventfd writes by the backend and seen
  as MSI-X messages by the driver), and its ``avail_event`` tells the driver when a kick is
  needed; without EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT suppresses interrupts.
* Ring indices wrap past 65535 on TX and RX (rings of 1024: 65 laps).

Jumbo frames need nothing special: QEMU does not police the MTU on a vhost-user netdev.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from qtests.qos.frames import HEADER, make_frame, parse_frame
from qtests.qos.qmp import QmpError
from qtests.qos.testbed import Testbed
from qtests.qos.transports import BOTH
from qtests.qos.virtio_net import NET_HDR_SIZE, VirtioNetDriver, VirtioNetHdr
from qtests.qos.virtqueue import VRING_AVAIL_F_NO_INTERRUPT, SplitVirtqueue
from qtests.qos.waiting import poll_until
from qtests.qos.wire_peer import WirePeer, WirePeerTimeout

SIZES = (60, 61, 64, 128, 511, 512, 1000, 1514, 4000, 9000)
RX_BUF = 2048  # the driver's default RX buffer size
WIRE_TIMEOUT = 2.0  # a TX frame is on the wire before its chain is used: this is generous
U16_WRAP = 1 << 16
#: Frames in flight per wrap batch: 256 small datagrams fit a UDP socket buffer even at the
#: kernel's default rmem_max (about 500 do), so neither the backend's socket nor the peer's
#: drops any while the other side catches up.
WRAP_BATCH = 256


# ---------------------------------------------------------------------------- helpers
def _what(frame: bytes) -> str:
    ident = parse_frame(frame)
    return f"{len(frame)}-byte frame" + (f" seq {ident[1]}" if ident else " (not a test frame)")


def expect_on_wire(peer: WirePeer, frames: Sequence[bytes], timeout: float = WIRE_TIMEOUT) -> None:
    """The next ``len(frames)`` frames on the wire are exactly ``frames``, in order."""
    for i, want in enumerate(frames):
        try:
            got = peer.recv(timeout)
        except WirePeerTimeout as e:
            raise AssertionError(
                f"only {i} of {len(frames)} frames reached the wire; missing the {_what(want)}: {e}"
            ) from None
        if got != want:
            raise AssertionError(f"frame {i}: sent the {_what(want)}, the wire got {_what(got)}")


def mergeable_lengths(frame_len: int, buf: int = RX_BUF) -> tuple[int, ...]:
    """Used lengths of a frame spread over ``buf``-sized mergeable buffers, header first."""
    full, rest = divmod(NET_HDR_SIZE + frame_len, buf)
    return (buf,) * full + ((rest,) if rest else ())


def calls(tb: Testbed, vq: SplitVirtqueue) -> int:
    """Call-eventfd writes of the backend for ``vq`` (its interrupts, before QEMU)."""
    return int(tb.backend.vring(vq.index)["calls"])


def kicks(tb: Testbed, vq: SplitVirtqueue) -> int:
    """Kick-eventfd reads of the backend for ``vq`` (kicks QEMU passed on, coalesced)."""
    return int(tb.backend.vring(vq.index)["kicks"])


def tx_frames_arrive_byte_exact(tb: Testbed) -> None:
    """Scenario: frames of every size, one at a time and in bursts, arrive unchanged."""
    net, peer = tb.net, tb.peer
    before = tb.backend.vring(net.txq[0].index)
    sent: list[bytes] = []
    for seq, size in enumerate(SIZES):  # N = 1, one of each size
        frame = make_frame(seq, size)
        net.send(frame)
        expect_on_wire(peer, [frame])
        sent.append(frame)
    for hdr_separate in (True, False):  # a burst, then the header sharing the descriptor
        base = 1000 if hdr_separate else 2000
        burst = [make_frame(base + i, SIZES[i % len(SIZES)]) for i in range(3 * len(SIZES))]
        net.send_burst(burst, hdr_separate=hdr_separate)
        expect_on_wire(peer, burst)
        sent += burst
    after = tb.backend.vring(net.txq[0].index)
    assert after["packets"] - before["packets"] == len(sent)
    assert after["bytes"] - before["bytes"] == sum(map(len, sent))


def send_and_receive(tb: Testbed, net: VirtioNetDriver, frame: bytes, *, inject: bool = False):
    """Put ``frame`` on the wire (or inject it through the backend monitor) and receive it."""
    if inject:
        reply = tb.backend.cmd("inject-packet", data=frame.hex())
        assert reply == {"length": len(frame), "queue": 0, "queued": True}
    else:
        tb.peer.send(frame)
    rx = net.recv(0)
    assert rx.data == frame, f"sent the {_what(frame)}, received the {_what(rx.data)}"
    assert (rx.hdr.flags, rx.hdr.gso_type) == (0, 0)
    return rx


# ---------------------------------------------------------------------------- no QEMU
def test_frame_pattern_table_matches_its_definition() -> None:
    """frames.py builds payloads from a precomputed block table: same bytes as defined."""
    for seq in (0, 1, 37, 255, 256, 65537):
        frame = make_frame(seq, 700)
        body = bytes((seq * 7 + i) & 0xFF for i in range(700 - HEADER.size))
        assert frame[HEADER.size :] == body
        assert parse_frame(frame) == (0, seq)
    assert parse_frame(make_frame(3, 100)[:-1] + b"\0") is None


# ---------------------------------------------------------------------------- TX
@pytest.mark.qemu
@pytest.mark.parametrize("transport", BOTH, indirect=True)
def test_tx_frames_arrive_byte_exact(testbed: Testbed) -> None:
    tx_frames_arrive_byte_exact(testbed)


@pytest.mark.qemu
@pytest.mark.parametrize("transport", BOTH, indirect=True)
def test_tx_scenario_catches_drop_tx(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(faults=["drop-tx"]).start()
    with pytest.raises(AssertionError, match="reached the wire"):
        tx_frames_arrive_byte_exact(tb)
    # the chains were consumed and counted as sent: only the wire shows the loss
    assert tb.backend.vring(1)["packets"] >= 1
    assert tb.net.txq[0].in_flight == 0


# ---------------------------------------------------------------------------- RX
def rx_mergeable_byte_exact(tb: Testbed) -> None:
    """Scenario: frames of every size over 2 KiB mergeable buffers, num_buffers right."""
    net = tb.net
    assert net.mergeable and net.rx_buf_size == RX_BUF
    for seq, size in enumerate(SIZES):
        frame = make_frame(seq, size)
        tb.peer.send(frame)
        rx = net.recv(0)
        want = len(mergeable_lengths(size))
        # num_buffers first: the driver joins that many buffers, so a wrong count shows as
        # a truncated frame below
        assert rx.hdr.num_buffers == want, (
            f"{size}-byte frame: num_buffers {rx.hdr.num_buffers}, expected {want}"
        )
        assert rx.data == frame, f"sent the {_what(frame)}, received the {_what(rx.data)}"
        assert rx.num_buffers == want and rx.lengths == mergeable_lengths(size), f"{size} bytes"
    big = send_and_receive(tb, net, make_frame(99, 9000))
    assert big.num_buffers == 5 > 1
    # a burst of every size, queued on the wire before the driver looks
    burst = [make_frame(100 + i, SIZES[i % len(SIZES)]) for i in range(3 * len(SIZES))]
    for frame in burst:
        tb.peer.send(frame)
    for frame, rx in zip(burst, net.recv_many(0, len(burst)), strict=True):  # burst reads
        assert rx.data == frame, f"expected the {_what(frame)}, got the {_what(rx.data)}"
        assert rx.lengths == mergeable_lengths(len(frame))
    # the monitor's inject-packet path, same bytes; bad hex is refused, the backend survives
    for seq, size in enumerate(SIZES):
        send_and_receive(tb, net, make_frame(200 + seq, size), inject=True)
    with pytest.raises(QmpError, match="hex"):
        tb.backend.cmd("inject-packet", data="not hex")
    send_and_receive(tb, net, make_frame(300, 64), inject=True)
    vr = tb.backend.vring(0)
    frames = 2 * len(SIZES) + 1 + len(burst) + 1
    assert vr["packets"] == frames and vr["drops"] == 0


@pytest.mark.qemu
@pytest.mark.parametrize("transport", BOTH, indirect=True)
def test_rx_mergeable_byte_exact(testbed: Testbed) -> None:
    rx_mergeable_byte_exact(testbed)


@pytest.mark.qemu
def test_meta_rx_bad_num_buffers_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(faults=["rx-bad-num-buffers"]).start()
    with pytest.raises(AssertionError, match=r"4000-byte frame: num_buffers 1, expected 2"):
        rx_mergeable_byte_exact(tb)


@pytest.mark.qemu
def test_rx_without_mergeable_buffers(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed()
    tb.start_backend()
    tb.start_qemu()
    assert tb.bus is not None and tb.alloc is not None
    net = VirtioNetDriver.find(tb.bus, tb.alloc, rx_buf_size=9216)
    net.init(mrg_rxbuf=False)
    assert not net.mergeable
    for seq, size in enumerate(SIZES):
        rx = send_and_receive(tb, net, make_frame(seq, size))
        # without MRG_RXBUF the device still writes num_buffers = 1 (virtio 1.x header)
        assert (rx.num_buffers, rx.hdr.num_buffers) == (1, 1)
        assert rx.lengths == (NET_HDR_SIZE + size,)
    # a frame larger than any posted buffer is dropped and counted, never truncated
    drops = tb.backend.vring(0)["drops"]
    tb.peer.send(make_frame(50, 9216 - NET_HDR_SIZE + 1))
    after = make_frame(51, 300)
    send_and_receive(tb, net, after)
    assert tb.backend.vring(0)["drops"] == drops + 1
    # header and data in separate descriptors of one chain
    net.close()
    net = VirtioNetDriver.find(tb.bus, tb.alloc, rx_buf_size=9216)
    net.init(mrg_rxbuf=False, rx_hdr_separate=True)
    for seq, size in enumerate(SIZES):
        rx = send_and_receive(tb, net, make_frame(60 + seq, size))
        assert rx.lengths == (NET_HDR_SIZE + size,) and rx.hdr.num_buffers == 1


# ---------------------------------------------------------------------------- indirect
@pytest.mark.qemu
def test_indirect_descriptors_tx_and_rx(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed().start(indirect=True, post_rx=False)
    net, alloc = tb.net, tb.alloc
    assert alloc is not None
    tx, rx = net.txq[0], net.rxq[0]
    assert tx.indirect and rx.indirect
    # TX: each chain is one ring descriptor pointing at a table (header + frame)
    for seq, size in enumerate(SIZES):
        frame = make_frame(seq, size)
        net.send(frame, indirect=True)
        expect_on_wire(tb.peer, [frame])
    burst = [make_frame(100 + i, SIZES[i % len(SIZES)]) for i in range(2 * len(SIZES))]
    net.send_burst(burst, indirect=True)
    expect_on_wire(tb.peer, burst)
    assert tx.num_free == tx.size  # every table freed, every descriptor back

    # RX: one chain = a 3-entry indirect table (header, 1000 bytes, the rest)
    parts = [(alloc.alloc(NET_HDR_SIZE, 16, tag="rx hdr"), NET_HDR_SIZE)]
    parts += [(alloc.alloc(1000, tag="rx a"), 1000), (alloc.alloc(9000, tag="rx b"), 9000)]
    for seq, size in enumerate(SIZES):
        rx.add((), parts, token=seq, indirect=True)
        rx.kick()
        frame = make_frame(200 + seq, size)
        tb.peer.send(frame)
        (elem,) = rx.wait_used(1)
        assert (elem.token, elem.length) == (seq, NET_HDR_SIZE + size)
        raw = b"".join(net.qt.read_many(parts))[: elem.length]
        hdr = VirtioNetHdr.unpack(raw)
        assert hdr.num_buffers == 1 and (hdr.flags, hdr.gso_type) == (0, 0)
        got = raw[NET_HDR_SIZE:]
        assert got == frame, f"sent the {_what(frame)}, received the {_what(got)}"
    assert rx.num_free == rx.size
    for addr, _ in parts:
        alloc.free(addr)


# ---------------------------------------------------------------------------- notifications
def complete_one(tb: Testbed, vq: SplitVirtqueue, seq: int) -> None:
    """One used element on ``vq``: a frame transmitted (TX) or received (RX), byte-exact."""
    frame = make_frame(seq, 200)
    if vq.index & 1:
        tb.net.send(frame)
        expect_on_wire(tb.peer, [frame])
    else:
        send_and_receive(tb, tb.net, frame)


def used_event_defers_interrupts(tb: Testbed, direction: str) -> None:
    """Scenario (EVENT_IDX): the backend interrupts only once the used index passes
    used_event."""
    vq = tb.net.txq[0] if direction == "tx" else tb.net.rxq[0]
    assert vq.event_idx and vq.interrupt is not None
    complete_one(tb, vq, 1)
    vq.interrupt.clear()
    ahead = 8
    vq.set_used_event(vq.last_used_idx + ahead - 1)  # interrupt at the 8th completion
    start = calls(tb, vq)
    for i in range(ahead - 1):
        complete_one(tb, vq, 10 + i)
    assert calls(tb, vq) == start, f"{vq.name}: interrupted before used_event"
    assert not vq.interrupt.fired(), f"{vq.name}: MSI-X before used_event"
    complete_one(tb, vq, 20)  # the used idx passes used_event
    assert calls(tb, vq) == start + 1, f"{vq.name}: no interrupt past used_event"
    vq.wait_interrupt(2)
    for i in range(3):  # used_event is behind now: no interrupt until the driver moves it
        complete_one(tb, vq, 30 + i)
    assert calls(tb, vq) == start + 1, f"{vq.name}: interrupted with used_event behind"
    vq.enable_interrupts()  # used_event = last used: the next completion interrupts
    complete_one(tb, vq, 40)
    assert calls(tb, vq) == start + 2
    vq.wait_interrupt(2)


@pytest.mark.qemu
@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_event_idx_used_event_defers_interrupts(
    make_testbed: Callable[..., Testbed], direction: str
) -> None:
    used_event_defers_interrupts(make_testbed().start(event_idx=True), direction)


@pytest.mark.qemu
def test_event_idx_avail_event_decides_kicks(make_testbed: Callable[..., Testbed]) -> None:
    """The backend's avail_event says when it wants a kick; no frame is lost to a skipped
    kick. The backend is suspended so that it cannot move avail_event meanwhile."""
    tb = make_testbed().start(event_idx=True)
    net, tx, peer = tb.net, tb.net.txq[0], tb.peer
    first = make_frame(1, 100)
    net.send(first)
    expect_on_wire(peer, [first])
    # after processing, the backend asks to be kicked at the next chain
    assert tx.avail_event() == tx.avail_idx == tb.backend.vring(tx.index)["last_avail_idx"]

    tb.backend.cmd("suspend")
    k0, sent0, skipped0 = kicks(tb, tx), tx.kicks, tx.kicks_suppressed
    frames = [make_frame(10 + i, 300 + i) for i in range(3)]
    net.send(frames[0], wait=False)
    assert (tx.kicks, tx.kicks_suppressed) == (sent0 + 1, skipped0)
    poll_until(lambda: kicks(tb, tx) == k0 + 1, 5, "the backend reading the kick")
    for frame in frames[1:]:  # avail_event has not moved: no kick needed
        net.send(frame, wait=False)
    assert (tx.kicks, tx.kicks_suppressed) == (sent0 + 1, skipped0 + 2)
    assert tx.avail_event() == (tx.avail_idx - 3) & 0xFFFF
    tb.backend.cmd("resume")  # the one kick it got covers all three chains
    net.wait_tx()
    expect_on_wire(peer, frames)
    assert kicks(tb, tx) == k0 + 1
    assert tx.avail_event() == tx.avail_idx  # wants a kick again

    burst = [make_frame(100 + i, 64) for i in range(40)]
    net.send_burst(burst)  # one batch: one kick, honoured
    expect_on_wire(peer, burst)
    assert (tx.kicks, tx.kicks_suppressed) == (sent0 + 2, skipped0 + 2)
    assert kicks(tb, tx) == k0 + 2


def no_interrupt_flag_suppresses(tb: Testbed) -> None:
    """Scenario (no EVENT_IDX): VRING_AVAIL_F_NO_INTERRUPT suppresses interrupts."""
    net = tb.net
    tx = net.txq[0]
    assert not tx.event_idx and tx.interrupt is not None
    tx.interrupt.clear()
    tx.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    start = calls(tb, tx)
    frames = [make_frame(i, 128) for i in range(5)]
    for frame in frames:
        net.send(frame)
    expect_on_wire(tb.peer, frames)
    assert calls(tb, tx) == start, "interrupted despite VRING_AVAIL_F_NO_INTERRUPT"
    assert not tx.interrupt.fired()
    tx.set_avail_flags(0)
    net.send(make_frame(9, 128))
    expect_on_wire(tb.peer, [make_frame(9, 128)])
    assert calls(tb, tx) == start + 1
    tx.wait_interrupt(2)


@pytest.mark.qemu
def test_no_interrupt_flag_without_event_idx(testbed: Testbed) -> None:
    no_interrupt_flag_suppresses(testbed)


@pytest.mark.qemu
def test_meta_ignore_used_event_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    """One backend with the fault: the driver negotiates EVENT_IDX, then (re-initialised)
    does without it; both suppression scenarios must fail on the first completion."""
    tb = make_testbed(faults=["ignore-used-event"]).start(event_idx=True)
    for direction in ("tx", "rx"):
        with pytest.raises(AssertionError, match=r": interrupted before used_event"):
            used_event_defers_interrupts(tb, direction)
    tb.net.close()
    tb.init_net()
    with pytest.raises(AssertionError, match="interrupted despite VRING_AVAIL_F_NO_INTERRUPT"):
        no_interrupt_flag_suppresses(tb)


# ---------------------------------------------------------------------------- wrap-around
@pytest.mark.qemu
def test_ring_indices_wrap_past_65535(make_testbed: Callable[..., Testbed]) -> None:
    """65536 + 1000 chains through 1024-entry TX and RX rings (small frames, batched)."""
    tb = make_testbed(net_props={"tx_queue_size": 1024, "rx_queue_size": 1024})
    tb.start(mrg_rxbuf=False)
    net, peer = tb.net, tb.peer
    tx, rx = net.txq[0], net.rxq[0]
    assert tx.size == rx.size == 1024
    total = U16_WRAP + 1000

    frames = [make_frame(i, 60) for i in range(total)]
    for start in range(0, total, WRAP_BATCH):
        chunk = frames[start : start + WRAP_BATCH]
        net.send_burst(chunk, hdr_separate=False, timeout=20)
        expect_on_wire(peer, chunk)
    vr = tb.backend.vring(tx.index)
    assert tx.avail_idx == tx.last_used_idx == total % U16_WRAP
    assert (vr["last_avail_idx"], vr["used_idx"]) == (total % U16_WRAP,) * 2
    assert vr["packets"] == total and vr["drops"] == 0

    inbound = [make_frame(i, 60, stream=1) for i in range(total)]
    for start in range(0, total, WRAP_BATCH):
        chunk = inbound[start : start + WRAP_BATCH]
        for frame in chunk:
            peer.send(frame)
        got = net.recv_many(0, len(chunk), 10.0, refill=False)  # a few qtest round trips
        for frame, rxf in zip(chunk, got, strict=True):
            assert rxf.data == frame, f"RX seq {parse_frame(frame)}"
        net.post_rx(0)  # refill what was used, one kick
    vr = tb.backend.vring(rx.index)
    assert rx.last_used_idx == total % U16_WRAP
    assert (vr["last_avail_idx"], vr["used_idx"]) == (total % U16_WRAP,) * 2
    assert vr["packets"] == total and vr["drops"] == 0
    # still healthy after the wrap, both ways
    last = make_frame(total, 1514)
    net.send(last)
    expect_on_wire(peer, [last])
    peer.send(last)
    assert net.recv(0).data == last
