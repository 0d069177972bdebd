"""Vring state across VM stop / cont: GET_VRING_BASE and SET_VRING_BASE against real QEMU.

QMP ``stop`` stops vhost: QEMU sends GET_VRING_BASE for every ring (the backend's answer becomes
QEMU's ``last_avail_idx``, the used idx is re-read from guest memory), then SET_STATUS 0, which
resets the backend's rings (so the backend's own ``query-vrings`` is read *before* ``stop``;
its ``vq.get_state`` journal entry records what it answered). ``cont`` restarts vhost with
SET_VRING_BASE = that ``last_avail_idx``. The scenario checks, over several cycles, that the
three views agree (backend before stop, backend's answer, QEMU's ``x-query-virtio-queue-status``),
that no numbered frame is lost or repeated, that RX buffers posted before a stop are filled after
it, that RX ``last_avail_idx`` counts buffers (a frame may take two mergeable buffers), and that
TX chains made available while the VM is stopped go out exactly once after ``cont``.

Chains in flight at the stop: the backend's ``hold-tx`` keeps TX chains popped but not completed
(transmit completions pending, as a DMA engine would). GET_VRING_BASE must rewind them so that
``cont`` transmits them exactly once; fault ``no-drain-before-base`` counts them as consumed and
is caught by QEMU's own view (last-avail-idx ahead of used-idx).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from qtests.qos.frames import make_frame, parse_frame
from qtests.qos.testbed import Testbed
from qtests.qos.waiting import poll_until

pytestmark = pytest.mark.qemu

RX_Q, TX_Q = 0, 1
TX_STREAM, RX_STREAM, SENTINEL_STREAM = 1, 2, 3
FRAME_SIZE = 200
#: Larger than one 2048-byte RX buffer: with MRG_RXBUF it takes two buffers.
JUMBO_SIZE = 3000
TX_PER_CYCLE = 6
TX_WHILE_STOPPED = 3
RX_PER_CYCLE = 3  # the last one a jumbo


@dataclass
class RingCounts:
    """What the indices must be: TX chains used, RX buffers used (free-running)."""

    tx: int = 0
    rx_buffers: int = 0
    next_tx_seq: int = 0
    next_rx_seq: int = 0


def _tx(tb: Testbed, st: RingCounts, n: int, *, wait: bool = True) -> list[int]:
    seqs = list(range(st.next_tx_seq, st.next_tx_seq + n))
    st.next_tx_seq += n
    tb.net.send_burst([make_frame(s, FRAME_SIZE, stream=TX_STREAM) for s in seqs], wait=wait)
    return seqs


def _expect_on_wire(tb: Testbed, seqs: list[int]) -> None:
    got = [parse_frame(f) for f in tb.peer.recv_n(len(seqs), timeout=10)]
    want = [(TX_STREAM, s) for s in seqs]
    assert got == want, f"wire frames {got} != {want} (lost, repeated or reordered)"


def _rx(tb: Testbed, st: RingCounts, n: int) -> None:
    """``n`` frames from the wire into RX buffers posted earlier (no refill), the last one
    spanning two mergeable buffers."""
    for k in range(n):
        seq = st.next_rx_seq
        st.next_rx_seq += 1
        size = JUMBO_SIZE if k == n - 1 else FRAME_SIZE
        tb.peer.send(make_frame(seq, size, stream=RX_STREAM))
        rx = tb.net.recv(refill=False)
        assert parse_frame(rx.data) == (RX_STREAM, seq), f"RX frame {seq} lost or repeated"
        assert rx.num_buffers == (2 if size > 2048 else 1)
        st.rx_buffers += rx.num_buffers


def _journal_by_vq(tb: Testbed, kind: str, since: int) -> dict[int, dict[str, Any]]:
    assert tb.backend is not None
    return {e["vq"]: e for e in tb.backend.journal(kinds=[kind], since=since)}


def _expected(st: RingCounts) -> dict[int, int]:
    return {TX_Q: st.tx & 0xFFFF, RX_Q: st.rx_buffers & 0xFFFF}


def stop_and_check(tb: Testbed, st: RingCounts) -> None:
    """QMP stop; the backend's answer to GET_VRING_BASE and QEMU's view equal the counts."""
    assert tb.backend is not None
    want = _expected(st)
    for q, n in want.items():
        vr = tb.backend.vring(q)
        assert (vr["last_avail_idx"], vr["used_idx"]) == (n, n), (
            f"backend vring {q} before stop: last_avail_idx {vr['last_avail_idx']}, "
            f"used_idx {vr['used_idx']}, expected {n}"
        )
    mark = tb.backend.mark()
    tb.qmp.command("stop")
    got = _journal_by_vq(tb, "vq.get_state", mark)
    for q, n in want.items():
        s = tb.vring_base_from_qemu(q)  # what QEMU took from GET_VRING_BASE + guest memory
        assert (s["last-avail-idx"], s["used-idx"]) == (n, n), (
            f"QEMU vq {q} after stop: last-avail-idx {s['last-avail-idx']}, used-idx "
            f"{s['used-idx']}, expected {n}"
        )
        assert s["inuse"] == 0
        assert q in got, f"no GET_VRING_BASE (vq.get_state) for vq {q} on stop"
        e = got[q]
        assert (e["last_avail_idx"], e["used_idx"], e["inflight"]) == (n, n, 0), (
            f"vq.get_state of vq {q}: {e}, expected indices {n} and nothing in flight"
        )


def cont_and_check(tb: Testbed, st: RingCounts) -> None:
    """QMP cont; the backend gets SET_VRING_BASE with the counts for both rings."""
    assert tb.backend is not None
    want = _expected(st)
    mark = tb.backend.mark()
    tb.qmp.command("cont")

    def set_states() -> dict[int, dict[str, Any]] | None:
        d = _journal_by_vq(tb, "vq.set_state", mark)
        return d if set(want) <= set(d) else None

    got = poll_until(set_states, 10, "SET_VRING_BASE (vq.set_state) for both rings after cont")
    for q, n in want.items():
        assert got[q]["last_avail_idx"] == n, (
            f"SET_VRING_BASE of vq {q} after cont: {got[q]['last_avail_idx']}, expected {n}"
        )


def ring_state_scenario(tb: Testbed, cycles: int = 5) -> None:
    """Traffic, stop, check indices, post TX while stopped, cont, check; ``cycles`` times."""
    st = RingCounts()
    for _ in range(cycles):
        _expect_on_wire(tb, _tx(tb, st, TX_PER_CYCLE))
        st.tx += TX_PER_CYCLE
        _rx(tb, st, RX_PER_CYCLE)
        stop_and_check(tb, st)
        pending = _tx(tb, st, TX_WHILE_STOPPED, wait=False)
        cont_and_check(tb, st)
        _expect_on_wire(tb, pending)
        tb.net.wait_tx()
        st.tx += TX_WHILE_STOPPED
    # the RX buffers posted at DRIVER_OK (never refilled) carried every frame
    assert tb.net.rxq[0].avail_idx == tb.net.rxq[0].size
    assert tb.net.rxq[0].last_used_idx == st.rx_buffers
    expect_nothing_more(tb)  # nothing repeated after the last batch


def expect_nothing_more(tb: Testbed) -> None:
    """A sentinel frame transmitted after the stream is the next frame on the wire."""
    sentinel = make_frame(0, FRAME_SIZE, stream=SENTINEL_STREAM)
    tb.net.send(sentinel)
    late = tb.peer.recv_until(sentinel)
    assert not late, (
        f"frames after the stream, before the sentinel: {[parse_frame(f) for f in late]}"
    )


def test_ring_state_survives_stop_cont_cycles(testbed: Testbed) -> None:
    ring_state_scenario(testbed)


def test_ring_state_with_event_idx(make_testbed: Callable[..., Testbed]) -> None:
    ring_state_scenario(make_testbed().start(event_idx=True), cycles=2)


def held_tx_scenario(tb: Testbed, held: int = 4) -> None:
    """TX chains popped but not completed when the VM stops come back as avail after cont."""
    assert tb.backend is not None
    backend = tb.backend
    st = RingCounts()
    _expect_on_wire(tb, _tx(tb, st, TX_PER_CYCLE))
    st.tx += TX_PER_CYCLE
    backend.cmd("hold-tx", enable=True)
    pending = _tx(tb, st, held, wait=False)
    poll_until(
        lambda: backend.cmd("query-wire")["tx_held"] == held,
        10,
        f"the backend to hold {held} popped TX chains",
    )
    # held: not completed (a held frame sent now would show up twice before the sentinel at
    # the end, which no silence window here could prove)
    assert tb.net.txq[0].last_used_idx == st.tx
    mark = backend.mark()
    tb.qmp.command("stop")
    s = tb.vring_base_from_qemu(TX_Q)
    assert (s["last-avail-idx"], s["used-idx"]) == (st.tx, st.tx), (
        f"QEMU vq {TX_Q} after stop with {held} chains in flight: last-avail-idx "
        f"{s['last-avail-idx']}, used-idx {s['used-idx']}, expected {st.tx} (rewound)"
    )
    e = _journal_by_vq(tb, "vq.get_state", mark)[TX_Q]
    assert e["last_avail_idx"] == st.tx, f"GET_VRING_BASE answered {e}, expected {st.tx}"
    backend.cmd("hold-tx", enable=False)
    cont_and_check(tb, st)
    _expect_on_wire(tb, pending)  # the rewound chains, exactly once
    tb.net.wait_tx()
    st.tx += held
    assert tb.net.txq[0].last_used_idx == st.tx
    expect_nothing_more(tb)


def test_chains_in_flight_at_stop_are_rewound(testbed: Testbed) -> None:
    held_tx_scenario(testbed)


def test_no_drain_before_base_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(faults=["no-drain-before-base"]).start()
    with pytest.raises(AssertionError, match="chains in flight: last-avail-idx"):
        held_tx_scenario(tb)


def test_vring_base_off_by_one_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(faults=["vring-base-off-by-one"]).start()
    with pytest.raises(AssertionError, match="QEMU vq 1 after stop: last-avail-idx"):
        ring_state_scenario(tb, cycles=1)
