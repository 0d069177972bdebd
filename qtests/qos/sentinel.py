"""Sentinel frames: how a test proves "nothing more arrives" without a window of quiet.

A sentinel is a frame sent after the stream a check is about, through the same queue: a device
handles one queue in order, so every frame of the stream it will ever put on the wire arrives
before the sentinel (`WirePeer.recv_until` collects them). `post_tx_sentinel` makes the guest
transmit one without reclaiming used TX entries first, so a ring the device left inconsistent
is reported by the check that reads the wire, not by the driver's bookkeeping.
"""

from __future__ import annotations

from .virtio_net import NET_HDR_SIZE, VirtioNetDriver, VirtioNetHdr


def post_tx_sentinel(net: VirtioNetDriver, frame: bytes, k: int = 0) -> None:
    """Make ``frame`` available on TX queue ``k`` and notify the device (no reclaim, no wait);
    ``net.wait_tx`` reclaims it with the rest."""
    vq = net.txq[k]
    data = VirtioNetHdr().pack() + frame
    addr = net.alloc.alloc(len(data), tag=f"tx{k} big frame")
    net.qt.write(addr, data)
    vq.add([(addr, NET_HDR_SIZE), (addr + NET_HDR_SIZE, len(frame))], (), ("alloc", addr))
    vq.kick()
