"""The datapath in-process: CPU time per packet of our TX and RX paths, no sockets, no peer.

A steady-state driver lives in the same process: one split ring of ``RING`` descriptors, each
pointing at its own fixed buffer, re-published as soon as the device used it. The device is
the real :class:`VdpaDevice` + :class:`NetDevice` (VERSION_1 + MRG_RXBUF, like DPDK's
virtio-user negotiates), over a shared-memory (memfd) host region like the one a front-end
hands over. TX: publish a ring's worth, kick, the device sends every frame to a null wire.
RX: queue a ring's worth of frames through ``inject``, let the event loop run the RX batch.
The driver's own work is kept small (a ring's worth of avail entries is one store) so the
figure is the device's.

Measured in CPU seconds of this process (``time.process_time``), so the figure holds on a
loaded machine where wall-clock packet rates do not; it is what the hot-path work optimises.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from dataclasses import dataclass

from backends.loop import EventLoop
from backends.net.datapath import NetDevice
from backends.net.wire import NullWire
from backends.vdpa.device import VdpaDevice
from backends.vdpa.iotlb import Perm
from backends.vdpa.memory import HostRegion
from backends.virtio.features import VIRTIO_F_VERSION_1, Status, bit
from backends.virtio.net import VIRTIO_NET_F_MRG_RXBUF
from bench.genwire import make_frame

RING = 256
HDR = 12
RX_BUF = 2048
MEM = 4 << 20
UADDR = 0x7F00_0000_0000
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
AVAIL_RUN = struct.Struct(f"<{RING}H")
VRING_DESC_F_WRITE = 2
DRIVER_OK = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)


@dataclass
class _Ring:
    desc: int
    avail: int
    used: int


@functools.lru_cache(maxsize=RING)
def _heads_from(start: int) -> tuple[int, ...]:
    """The avail ring's slots when head 0 goes to slot ``start`` (slot s holds s - start)."""
    return tuple((s - start) % RING for s in range(RING))


class InprocDatapath:
    def __init__(self, size: int) -> None:
        self.size = size
        self.frame = make_frame(size)
        fd = os.memfd_create("bench-inproc", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, MEM)
            self.region = HostRegion.from_fd(fd, 0, MEM, UADDR, 0)
        finally:
            os.close(fd)
        self.wire = NullWire()
        self.loop = EventLoop()
        self.net = NetDevice(self.wire, loop=self.loop)
        self.dev = VdpaDevice(self.net, max_queue_size=RING)
        dev = self.dev
        dev.add_host_region(self.region)
        dev.dma_map(0, MEM, UADDR, Perm.RW)
        dev.set_driver_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF))
        self.rings = [self._ring(q, 0x1000 + q * 0x4000) for q in range(2)]
        dev.set_status(DRIVER_OK)
        heap = 0x10000
        # TX buffers: header + frame, written once; RX buffers: empty, RX_BUF bytes
        self.tx_bufs = []
        for _ in range(RING):
            self.region.write_gpa(heap, bytes(HDR) + self.frame)
            self.tx_bufs.append(heap)
            heap += (HDR + size + 63) & ~63
        self.rx_bufs = []
        for _ in range(RING):
            self.rx_bufs.append(heap)
            heap += RX_BUF
        for k in range(RING):
            self._desc(0, k, self.rx_bufs[k], RX_BUF, VRING_DESC_F_WRITE)
            self._desc(1, k, self.tx_bufs[k], HDR + size, 0)
        self.avail_idx = [0, 0]

    def _ring(self, q: int, base: int) -> _Ring:
        r = _Ring(base, base + 16 * RING, base + 0x2000)
        self.dev.set_vq_num(q, RING)
        self.dev.set_vq_address(q, r.desc, r.avail, r.used)
        self.dev.set_vq_ready(q, True)
        return r

    def _desc(self, q: int, k: int, addr: int, length: int, flags: int) -> None:
        self.region.pack_gpa(DESC, self.rings[q].desc + 16 * k, addr, length, flags, 0)

    def publish_all(self, q: int) -> None:
        """The driver re-posts all RING heads (the device used them all): head k at avail
        position idx + k, written as one run starting at the ring's slot 0."""
        r = self.rings[q]
        idx = self.avail_idx[q]
        self.region.pack_gpa(AVAIL_RUN, r.avail + 4, *_heads_from(idx % RING))
        self.avail_idx[q] = (idx + RING) & 0xFFFF
        self.region.pack_gpa(U16, r.avail + 2, self.avail_idx[q])

    def unpublish(self, q: int, n: int) -> None:
        """Forget the last ``n`` publications (the device gave them back, e.g. a rewind):
        the next :meth:`publish_all` posts the same avail positions again."""
        self.avail_idx[q] = (self.avail_idx[q] - n) & 0xFFFF

    def used_idx(self, q: int) -> int:
        return U16.unpack(self.region.read_gpa(self.rings[q].used + 2, 2))[0]

    def tx_round(self) -> None:
        self.publish_all(1)
        self.dev.kick_vq(1)
        while self.used_idx(1) != self.avail_idx[1]:
            self.loop.run_once(0)  # continuations of a budgeted batch

    def rx_round(self) -> None:
        self.publish_all(0)
        before = self.net.stats[0].packets
        for _ in range(RING):
            self.net.inject(self.frame)
        while self.net.stats[0].packets - before < RING:
            self.loop.run_once(0)

    def cpu_us_per_packet(self, direction: str, budget_s: float = 1.0) -> float:
        """CPU microseconds per packet, over whole rounds for about ``budget_s``."""
        step = self.tx_round if direction == "tx" else self.rx_round
        step()  # warm-up (first translations, struct caches)
        rounds = 0
        t0 = time.process_time()
        deadline = time.monotonic() + budget_s
        while True:
            step()
            rounds += 1
            if time.monotonic() >= deadline and rounds >= 3:
                break
        cpu = time.process_time() - t0
        return cpu / (rounds * RING) * 1e6

    def close(self) -> None:
        self.wire.close()
        self.loop.close()
