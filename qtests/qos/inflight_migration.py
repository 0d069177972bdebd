"""Migration that meets work in progress: issue 15, item 3.

`rx_taken_at_switchover` runs on a started `MigrationPair` (source driver at DRIVER_OK,
destination waiting; split ring): the source backend A has taken RX buffers (popped, not
filled: monitor ``hold-rx``, a device that prefetched buffers for frames still on their way)
when QEMU stops it for the switchover. What must hold: A gives them back before it answers
GET_VRING_BASE (its reply counts only the buffers it used: virtio's "last_avail_idx" is what
the device consumed, and QEMU checks ``last_avail - used <= size`` on load), so the destination
backend B fills exactly those buffers first. Shown from the guest's memory: the used ring's
first entries after the switchover name the very heads A had taken, in avail order.
"""

from __future__ import annotations

import struct

from .frames import PEER_MAC, mac_bytes, make_frame
from .migration import MigrationPair
from .testbed import GUEST_MAC
from .virtio_net import VirtioNetError
from .virtqueue import VirtqueueError
from .waiting import WaitTimeout, poll_until

RX_VQ = 0
STREAM = 0x33
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


def _rx_frame(seq: int) -> bytes:
    return make_frame(seq, 100 + 97 * seq, stream=STREAM, dst=mac_bytes(GUEST_MAC), src=PEER_MAC)


def rx_taken_at_switchover(pair: MigrationPair, held: int = 4) -> None:
    src, dst = pair.src, pair.dst
    a, b = src.backend, dst.backend
    assert a is not None and b is not None
    net = pair.net
    rxq = net.rxq[0]
    first = _rx_frame(0)
    src.peer.send(first)
    assert net.recv(0, 5.0, refill=False).data == first, "RX through A before the migration"
    used_before = rxq.device_used_idx()
    got = a.cmd("hold-rx", count=held)["held"]
    assert got == held, f"A took {got} RX buffers, wanted {held}"
    # the heads A took: the next entries of the avail ring, in order
    qt = net.qt
    taken = [
        U16.unpack(qt.read(rxq.avail + 4 + 2 * ((used_before + i) % rxq.size), 2))[0]
        for i in range(held)
    ]
    mark_a, mark_b = a.mark(), b.mark()
    pair.migrate()
    frames = [_rx_frame(1 + i) for i in range(held)]
    for f in frames:
        dst.peer.send(f)
    try:
        poll_until(
            lambda: (rxq.device_used_idx() - used_before) & 0xFFFF >= held,
            5.0,
            f"B filling {held} RX buffers",
        )
    except WaitTimeout as e:
        raise AssertionError(f"RX on the destination: {e}") from e
    qt = net.qt  # the destination's qtest connection now
    used_heads = [
        USED_ELEM.unpack(qt.read(rxq.used + 4 + 8 * ((used_before + i) % rxq.size), 8))[0]
        for i in range(held)
    ]
    assert used_heads == taken, (
        f"B filled buffers {used_heads}, not the ones A had taken {taken}: B started past "
        "them (A counted buffers it never filled)"
    )
    g = [e for e in a.journal(["vq.get_state"], mark_a) if e["vq"] == RX_VQ][-1]
    assert g["last_avail_idx"] == used_before, (
        f"A's GET_VRING_BASE for RX says {g['last_avail_idx']}, but A used exactly "
        f"{used_before} buffers ({held} taken, unfilled)"
    )
    for i, f in enumerate(frames):
        try:
            rx = net.recv(0, 5.0, refill=False)
        except (VirtqueueError, VirtioNetError, WaitTimeout) as e:
            raise AssertionError(f"RX frame {i} on the destination: {e}") from e
        assert rx.data == f, f"RX frame {i} on the destination differs"
    s = [e for e in b.journal(["vq.set_state"], mark_b) if e["vq"] == RX_VQ][0]
    assert s["last_avail_idx"] == g["last_avail_idx"], (s, g)
