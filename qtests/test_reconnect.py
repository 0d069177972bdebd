"""QEMU reconnects to a restarted backend (``-chardev socket,reconnect-ms=N``).

The backend process dies (SIGKILL: a crash; or SIGTERM: a clean exit) and a new one is started
on the same vhost-user socket path and the same wire peer (it binds a new ephemeral UDP port;
the peer learns it with ``connect``). What QEMU 10 does, and what the scenario checks:

* On the disconnect QEMU sets the netdev's link down: the guest sees VIRTIO_NET_S_LINK_UP
  cleared, with a config interrupt, and vhost is stopped. GET_VRING_BASE cannot be answered, so
  QEMU takes ``last_avail_idx`` from the used idx in guest memory (chains the dead backend had
  popped but not completed would be redone). The guest's device status never changes.
* While the link is down, TX chains the driver *kicks* are handled by QEMU's own virtio-net,
  which drops them (completes them unsent); chains made available *without* a kick stay in the
  ring.
* On reconnect QEMU runs the whole vhost-user init again, sets the link up and starts vhost
  with SET_VRING_BASE = its ``last_avail_idx``: the new backend transmits the un-kicked chains
  exactly once, never the dropped ones, and fills RX buffers posted before the crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from backends.virtio.features import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from qtests.qos.frames import make_frame, parse_frame
from qtests.qos.reconnect import start_replacement, take_backend_down, wait_device_back
from qtests.qos.testbed import Testbed
from qtests.qos.virtio_net import NET_HDR_SIZE, VirtioNetHdr
from qtests.qos.wire_peer import WirePeerTimeout

pytestmark = pytest.mark.qemu

RX_Q, TX_Q = 0, 1
TX_STREAM, RX_STREAM, SENTINEL_STREAM = 1, 2, 3
FRAME_SIZE = 150
RECONNECT_MS = 50
GUEST_READY = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK


@dataclass
class Traffic:
    tx_used: int = 0  # TX chains completed (by the backend or dropped by QEMU)
    rx_buffers: int = 0  # RX buffers used
    tx_seq: int = 0
    rx_seq: int = 0


def _send(tb: Testbed, tr: Traffic, n: int) -> list[int]:
    seqs = list(range(tr.tx_seq, tr.tx_seq + n))
    tr.tx_seq += n
    tb.net.send_burst([make_frame(s, FRAME_SIZE, stream=TX_STREAM) for s in seqs])
    tr.tx_used += n
    return seqs


def _post_without_kick(tb: Testbed, tr: Traffic, n: int) -> list[int]:
    """Make ``n`` TX chains available but do not notify the device."""
    assert tb.alloc is not None and tb.machine is not None
    vq = tb.net.txq[0]
    seqs = list(range(tr.tx_seq, tr.tx_seq + n))
    tr.tx_seq += n
    writes = []
    for s in seqs:
        data = VirtioNetHdr().pack() + make_frame(s, FRAME_SIZE, stream=TX_STREAM)
        addr = tb.alloc.alloc(len(data), tag="tx without kick")
        writes.append((addr, data))
        # the token tells the driver to free the buffer when the chain is used
        vq.add(
            [(addr, NET_HDR_SIZE), (addr + NET_HDR_SIZE, len(data) - NET_HDR_SIZE)],
            (),
            ("alloc", addr),
        )
    tb.machine.qtest.write_many(writes)
    vq.publish()
    return seqs


def _expect_on_wire(tb: Testbed, seqs: list[int], timeout: float = 10.0) -> None:
    got = [parse_frame(f) for f in tb.peer.recv_n(len(seqs), timeout=timeout)]
    want = [(TX_STREAM, s) for s in seqs]
    assert got == want, f"wire frames {got} != {want} (lost, repeated or reordered)"


def _receive(tb: Testbed, tr: Traffic, n: int) -> None:
    """``n`` frames from the wire, into RX buffers posted at init (no refill)."""
    for _ in range(n):
        seq = tr.rx_seq
        tr.rx_seq += 1
        tb.peer.send(make_frame(seq, FRAME_SIZE, stream=RX_STREAM))
        rx = tb.net.recv(refill=False)
        assert parse_frame(rx.data) == (RX_STREAM, seq), f"RX frame {seq} lost or repeated"
        tr.rx_buffers += rx.num_buffers


def reconnect_scenario(
    tb: Testbed,
    *,
    crash: bool,
    restarts: int = 1,
    faults_after: list[str] | None = None,
    wire_timeout: float = 10.0,
) -> None:
    """Traffic; then ``restarts`` times: backend down, TX kicked (dropped by QEMU) and TX
    not kicked while down, replacement up, indices / exactly-once / both directions."""
    tr = Traffic()
    _expect_on_wire(tb, _send(tb, tr, 5))
    _receive(tb, tr, 3)
    for _ in range(restarts):
        old = take_backend_down(tb, crash=crash)
        # kicked while the link is down: QEMU's own virtio-net completes them unsent (the
        # wire checks below would see them: they would come before the un-kicked ones)
        _send(tb, tr, 2)
        unkicked = _post_without_kick(tb, tr, 3)
        new = start_replacement(tb, old, faults_after or [])
        bases = wait_device_back(tb, new)
        assert tb.net.dev.status == GUEST_READY, "the guest's device status changed"
        _expect_on_wire(tb, unkicked, wire_timeout)  # exactly once; the dropped ones never
        # QEMU restored last_avail_idx from the used idx: everything before the un-kicked
        # chains was completed (sent, or dropped by QEMU)
        assert bases[TX_Q]["last_avail_idx"] == tr.tx_used & 0xFFFF, bases[TX_Q]
        assert bases[RX_Q]["last_avail_idx"] == tr.rx_buffers & 0xFFFF, bases[RX_Q]
        tb.net.wait_tx()
        tr.tx_used += len(unkicked)
        _expect_on_wire(tb, _send(tb, tr, 4))
        _receive(tb, tr, 3)
    expect_nothing_more(tb)  # no dropped frame or duplicate shows up late


def expect_nothing_more(tb: Testbed) -> None:
    """A sentinel frame transmitted after the stream is the next frame on the wire."""
    sentinel = make_frame(0, FRAME_SIZE, stream=SENTINEL_STREAM)
    tb.net.send(sentinel)
    late = tb.peer.recv_until(sentinel)
    assert not late, (
        f"frames after the stream, before the sentinel: {[parse_frame(f) for f in late]}"
    )


@pytest.mark.parametrize(
    ("crash", "restarts"), [(True, 2), (False, 1)], ids=["sigkill-twice", "sigterm"]
)
def test_backend_restart_resumes_traffic(
    make_testbed: Callable[..., Testbed], crash: bool, restarts: int
) -> None:
    tb = make_testbed(reconnect_ms=RECONNECT_MS).start()
    reconnect_scenario(tb, crash=crash, restarts=restarts)


def test_lost_frames_after_reconnect_are_caught(make_testbed: Callable[..., Testbed]) -> None:
    """The same scenario notices a replacement backend that loses TX frames."""
    tb = make_testbed(reconnect_ms=RECONNECT_MS).start()
    with pytest.raises(WirePeerTimeout, match="got 0 of 3 frames"):
        reconnect_scenario(tb, crash=True, faults_after=["drop-tx"], wire_timeout=1.0)


def test_ignored_set_vring_base_after_reconnect_is_caught(
    make_testbed: Callable[..., Testbed],
) -> None:
    """A replacement backend that ignores SET_VRING_BASE starts its TX ring at 0 and
    transmits again what the first backend sent."""
    tb = make_testbed(reconnect_ms=RECONNECT_MS).start()
    with pytest.raises(AssertionError, match=r"wire frames \[\(1, 0\), .* \(lost, repeated"):
        reconnect_scenario(tb, crash=True, faults_after=["ignore-set-vring-base"])
