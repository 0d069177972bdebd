"""virtio-net driver over the qtest virtio-pci transport.

* ``virtio_net_hdr_v1`` (12 bytes, ``<BBHHHHH``: flags, gso_type, hdr_len, gso_size,
  csum_start, csum_offset, num_buffers) precedes every frame (VERSION_1 always has
  num_buffers).
* Config: mac[6] @0, status u16 @6, max_virtqueue_pairs u16 @8, mtu u16 @10.
* Queues: rx k = 2k, tx k = 2k+1, ctrl = 2 * max_virtqueue_pairs.
* Control: ``{u8 class, u8 cmd}`` + data out, ``u8 ack`` in (MQ class 4, VQ_PAIRS_SET 0).

RX buffers come from one block per RX queue (fixed-size slots, no allocator calls per frame);
TX frames are staged in a slot pool too.  `recv` joins mergeable buffers (num_buffers).
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from backends.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    VIRTIO_PCI_MODERN_BASE,
    VIRTIO_PCI_VENDOR,
    bit,
)
from backends.virtio.net import (
    MAC_OFFSET,
    MAX_VQ_PAIRS_OFFSET,
    MTU_OFFSET,
    STATUS_OFFSET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
)
from backends.virtio.net_header import HDR_LEN as NET_HDR_SIZE
from backends.virtio.net_header import VirtioNetHdr as VirtioNetHdr  # re-exported

from .alloc import GuestAllocator
from .driver_queue import DriverQueue, UsedElem
from .iova import DmaMapper
from .pci import PciBus
from .qtest import QTest
from .virtio_pci import VirtioPciDevice
from .waiting import poll_until

__all__ = [
    "NET_HDR_SIZE",
    "NetConfig",
    "RxFrame",
    "VirtioNetDriver",
    "VirtioNetError",
    "VirtioNetHdr",
    "VIRTIO_NET_PCI_DEVICE_ID",
]

VIRTIO_NET_PCI_DEVICE_ID = VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_NET  # 0x1041

DEFAULT_RX_BUF_SIZE = 2048
DEFAULT_TX_SLOT_SIZE = 2048
_CTRL_ACK_OFFSET = 0x800


class VirtioNetError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class NetConfig:
    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int

    @property
    def mac_str(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    @property
    def link_up(self) -> bool:
        return bool(self.status & VIRTIO_NET_S_LINK_UP)


@dataclass(frozen=True, slots=True)
class RxFrame:
    """A received frame: payload without header, the header, and the buffers it used."""

    data: bytes
    hdr: VirtioNetHdr
    num_buffers: int
    queue_pair: int
    lengths: tuple[int, ...]


class _SlotPool:
    """Fixed-size guest buffers carved from one allocation."""

    def __init__(self, alloc: GuestAllocator, count: int, slot_size: int, tag: str) -> None:
        self.alloc = alloc
        self.slot_size = slot_size
        self.count = count
        self.base = alloc.alloc(count * slot_size, tag=tag)
        self.free: collections.deque[int] = collections.deque(range(count))

    def addr(self, slot: int) -> int:
        return self.base + slot * self.slot_size

    def take(self) -> int | None:
        return self.free.popleft() if self.free else None

    def give(self, slot: int) -> None:
        self.free.append(slot)

    def release(self) -> None:
        self.alloc.free(self.base)


class VirtioNetDriver:
    """virtio-net on a modern virtio-pci function, driven entirely over qtest."""

    def __init__(
        self,
        dev: VirtioPciDevice,
        *,
        rx_buf_size: int = DEFAULT_RX_BUF_SIZE,
        tx_slot_size: int = DEFAULT_TX_SLOT_SIZE,
    ) -> None:
        if dev.device_type != VIRTIO_ID_NET:
            raise VirtioNetError(f"{dev.name} is virtio type {dev.device_type}, not net")
        self.dev = dev
        self.qt = dev.qt
        self.alloc = dev.alloc
        self.rx_buf_size = rx_buf_size
        self.tx_slot_size = tx_slot_size
        self.features = 0
        self.max_queue_pairs = 1
        self.queue_pairs = 0  # pairs with rings set up
        self.active_pairs = 0
        self.rxq: list[DriverQueue] = []
        self.txq: list[DriverQueue] = []
        self.ctrlq: DriverQueue | None = None
        self._rx_pools: list[_SlotPool] = []
        self._tx_pools: list[_SlotPool] = []
        self._rx_done: list[collections.deque[UsedElem]] = []
        self._rx_hdr_separate = False
        self._ctrl_buf: int | None = None
        self.rx_frames = 0
        self.tx_frames = 0

    @classmethod
    def find(
        cls,
        bus: PciBus,
        alloc: GuestAllocator,
        *,
        index: int = 0,
        device_id: int = VIRTIO_NET_PCI_DEVICE_ID,
        dma: DmaMapper | None = None,
        **kw: int,
    ) -> VirtioNetDriver:
        """The ``index``-th virtio-net PCI function (modern 1af4:1041 by default).

        ``dma``: the mapper for a device behind a vIOMMU (``iommu_platform=on``): descriptors
        and ring addresses then carry IOVAs; the driver still reads/writes by GPA."""
        pci = bus.find(VIRTIO_PCI_VENDOR, device_id, index)
        return cls(VirtioPciDevice(pci, alloc, name=f"virtio-net {pci}", dma=dma), **kw)

    # ------------------------------------------------------------------ init
    def init(
        self,
        *,
        mrg_rxbuf: bool = True,
        event_idx: bool = False,
        indirect: bool = False,
        ctrl_vq: bool = False,
        mq: bool = False,
        queue_pairs: int = 1,
        setup_pairs: int | None = None,
        queue_size: int | None = None,
        msix: bool = True,
        extra_features: int = 0,
        rx_hdr_separate: bool = False,
        post_rx: bool = True,
        packed: bool = False,
    ) -> int:
        """Bring the device to DRIVER_OK; returns the negotiated features.

        ``setup_pairs`` rings are created (default ``queue_pairs``); with MQ, ``queue_pairs``
        pairs are then activated through the control queue (VQ_PAIRS_SET).  MSI-X vector 0 is
        the config vector, queues share the remaining ones round-robin.
        """
        d = self.dev
        if self.rxq:
            raise VirtioNetError(f"{d.name}: already initialised (close() first)")
        wanted = (
            bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MTU)
        )
        wanted |= bit(VIRTIO_NET_F_MRG_RXBUF) if mrg_rxbuf else 0
        wanted |= bit(VIRTIO_F_EVENT_IDX) if event_idx else 0
        wanted |= bit(VIRTIO_F_INDIRECT_DESC) if indirect else 0
        wanted |= bit(VIRTIO_NET_F_CTRL_VQ) if (ctrl_vq or mq) else 0
        wanted |= bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ) if mq else 0
        wanted |= bit(VIRTIO_F_RING_PACKED) if packed else 0
        wanted |= extra_features
        self.features = d.negotiate(wanted)
        for name, on, fbit in (
            ("mrg_rxbuf", mrg_rxbuf, VIRTIO_NET_F_MRG_RXBUF),
            ("event_idx", event_idx, VIRTIO_F_EVENT_IDX),
            ("indirect", indirect, VIRTIO_F_INDIRECT_DESC),
            ("ctrl_vq", ctrl_vq or mq, VIRTIO_NET_F_CTRL_VQ),
            ("mq", mq, VIRTIO_NET_F_MQ),
            ("packed", packed, VIRTIO_F_RING_PACKED),
        ):
            if on and not self.has_feature(fbit):
                raise VirtioNetError(f"{d.name}: device does not offer {name} (bit {fbit})")
        self.max_queue_pairs = self.config().max_virtqueue_pairs if mq else 1
        if not 1 <= self.max_queue_pairs <= 0x8000:
            raise VirtioNetError(f"{d.name}: max_virtqueue_pairs is {self.max_queue_pairs}")
        setup_pairs = queue_pairs if setup_pairs is None else setup_pairs
        if not 1 <= queue_pairs <= setup_pairs <= self.max_queue_pairs:
            raise VirtioNetError(
                f"{d.name}: need 1 <= queue_pairs ({queue_pairs}) <= setup_pairs "
                f"({setup_pairs}) <= max_virtqueue_pairs ({self.max_queue_pairs})"
            )
        vectors = d.enable_msix() if msix else []
        if vectors:
            d.set_config_vector(0)

        def vector_for(q: int) -> int | None:
            if not vectors:
                return None
            return 1 + q % (len(vectors) - 1) if len(vectors) > 1 else 0

        self._rx_hdr_separate = rx_hdr_separate
        for k in range(setup_pairs):
            rx = d.setup_queue(2 * k, queue_size, vector=vector_for(2 * k), name=f"rx{k}")
            tx = d.setup_queue(2 * k + 1, queue_size, vector=vector_for(2 * k + 1), name=f"tx{k}")
            self.rxq.append(rx)
            self.txq.append(tx)
            self._rx_pools.append(_SlotPool(self.alloc, rx.size, self.rx_buf_size, f"rx{k} bufs"))
            self._tx_pools.append(_SlotPool(self.alloc, tx.size, self.tx_slot_size, f"tx{k} bufs"))
            self._rx_done.append(collections.deque())
        self.queue_pairs = setup_pairs
        if self.has_feature(VIRTIO_NET_F_CTRL_VQ):
            cq = 2 * self.max_queue_pairs
            self.ctrlq = d.setup_queue(
                cq, min(queue_size or 64, d.queue_max_size(cq)), vector=vector_for(cq), name="ctrl"
            )
            self._ctrl_buf = self.alloc.alloc(4096, tag="virtio-net ctrl")
        d.driver_ok()
        self.active_pairs = 1
        if post_rx:
            for k in range(setup_pairs):
                self.post_rx(k)
        if mq and queue_pairs != 1:
            self.set_queue_pairs(queue_pairs)
        return self.features

    def has_feature(self, n: int) -> bool:
        return bool(self.features >> n & 1)

    @property
    def mergeable(self) -> bool:
        return self.has_feature(VIRTIO_NET_F_MRG_RXBUF)

    # ------------------------------------------------------------------ config
    def config(self) -> NetConfig:
        """Device config, one field at a time at its natural width.

        (A wide read crossing the end of QEMU's config space returns all-ones for the whole
        access, and the size QEMU exposes depends on the offered features.)  Fields whose
        feature is absent read as: status 1 (link up), max_virtqueue_pairs 1, mtu 0.
        """
        feats = self.features or self.dev.device_features()
        d = self.dev
        for _ in range(10):
            gen = d.config_generation()
            mac = bytes(d.config_read(MAC_OFFSET + i, 1) for i in range(6))
            status = d.config_read(STATUS_OFFSET, 2) if feats >> VIRTIO_NET_F_STATUS & 1 else 1
            pairs = d.config_read(MAX_VQ_PAIRS_OFFSET, 2) if feats >> VIRTIO_NET_F_MQ & 1 else 1
            mtu = d.config_read(MTU_OFFSET, 2) if feats >> VIRTIO_NET_F_MTU & 1 else 0
            if d.config_generation() == gen:
                return NetConfig(mac, status, pairs, mtu)
        raise VirtioNetError(f"{d.name}: config generation kept changing")

    @property
    def mac(self) -> bytes:
        return self.config().mac

    # ------------------------------------------------------------------ TX
    def _tx_chain(
        self, k: int, frame: bytes, hdr: VirtioNetHdr | None, hdr_separate: bool
    ) -> tuple[tuple[int, bytes], list[tuple[int, int]], tuple[str, int]]:
        """Stage one frame in a TX slot: returns (write, out buffers, token)."""
        data = (hdr or VirtioNetHdr()).pack() + frame
        pool = self._tx_pools[k]
        slot = pool.take() if len(data) <= pool.slot_size else None
        if slot is not None:
            addr, token = pool.addr(slot), ("slot", slot)
        else:
            addr = self.alloc.alloc(len(data), tag=f"tx{k} big frame")
            token = ("alloc", addr)
        if hdr_separate:
            out = [(addr, NET_HDR_SIZE), (addr + NET_HDR_SIZE, len(frame))]
        else:
            out = [(addr, len(data))]
        return (addr, data), out, token

    def _release_tx(self, k: int, elems: Iterable[UsedElem]) -> int:
        n = 0
        for e in elems:
            kind, val = e.token
            if kind == "slot":
                self._tx_pools[k].give(val)
            else:
                self.alloc.free(val)
            n += 1
        return n

    def reclaim_tx(self, k: int = 0) -> int:
        """Consume TX completions of pair ``k``; returns how many."""
        return self._release_tx(k, self.txq[k].get_used())

    def wait_tx(self, k: int = 0, timeout: float = 5.0) -> None:
        """Wait until every TX chain of pair ``k`` has been used by the device."""
        vq = self.txq[k]
        poll_until(
            lambda: self.reclaim_tx(k) >= 0 and vq.in_flight == 0,
            timeout,
            f"TX completion on {vq.name}",
            detail=vq._state,
        )

    def send(
        self,
        frame: bytes,
        k: int = 0,
        *,
        hdr: VirtioNetHdr | None = None,
        hdr_separate: bool = True,
        indirect: bool = False,
        wait: bool = True,
        timeout: float = 5.0,
    ) -> int:
        """Transmit one frame on pair ``k``; returns the head.  ``wait``: until used."""
        return self.send_burst(
            [frame],
            k,
            hdr=hdr,
            hdr_separate=hdr_separate,
            indirect=indirect,
            wait=wait,
            timeout=timeout,
        )

    def send_burst(
        self,
        frames: Sequence[bytes],
        k: int = 0,
        *,
        hdr: VirtioNetHdr | None = None,
        hdr_separate: bool = True,
        indirect: bool = False,
        wait: bool = True,
        timeout: float = 10.0,
    ) -> int:
        """Transmit many frames: fill the ring, one data write + one kick per batch.

        Returns the head of the last chain added.
        """
        vq = self.txq[k]
        head = -1
        i = 0
        per_chain = 1 if indirect or not hdr_separate else 2
        while i < len(frames):
            self.reclaim_tx(k)
            writes, staged = [], 0
            while i < len(frames) and vq.num_free >= per_chain and self._tx_pools[k].free:
                write, out, token = self._tx_chain(k, frames[i], hdr, hdr_separate)
                writes.append(write)
                head = vq.add(out, (), token, indirect=indirect)
                staged += 1
                i += 1
            if staged:
                self.qt.write_many(writes)
                vq.kick()
                self.tx_frames += staged
            else:  # ring or pool full: wait for the device to use something
                poll_until(
                    lambda: vq.pending_used() > 0,
                    timeout,
                    f"TX ring space on {vq.name}",
                    detail=vq._state,
                )
        if wait:
            self.wait_tx(k, timeout)
        return head

    # ------------------------------------------------------------------ RX
    def post_rx(self, k: int = 0, count: int | None = None) -> int:
        """Post up to ``count`` RX buffers (default: fill the ring) and kick; returns #posted."""
        vq, pool = self.rxq[k], self._rx_pools[k]
        per = 2 if self._rx_hdr_separate and not self.mergeable else 1
        n = 0
        while (count is None or n < count) and vq.num_free >= per and pool.free:
            slot = pool.take()
            assert slot is not None
            addr = pool.addr(slot)
            if per == 2:
                inp = [(addr, NET_HDR_SIZE), (addr + NET_HDR_SIZE, pool.slot_size - NET_HDR_SIZE)]
            else:
                inp = [(addr, pool.slot_size)]
            vq.add((), inp, slot)
            n += 1
        if n:
            vq.kick()
        return n

    def _collect_rx(self, k: int) -> int:
        got = self.rxq[k].get_used()
        self._rx_done[k].extend(got)
        return len(self._rx_done[k])

    def try_recv(self, k: int = 0, *, refill: bool = True) -> RxFrame | None:
        """A received frame if one is complete now, else None."""
        done = self._rx_done[k]
        if not done and not self._collect_rx(k):
            return None
        pool = self._rx_pools[k]
        first = done[0]
        if first.length < NET_HDR_SIZE:
            raise VirtioNetError(f"rx{k}: used len {first.length} shorter than the header")
        nbufs = 1
        if self.mergeable:
            hdr = VirtioNetHdr.unpack(self.qt.read(pool.addr(first.token), NET_HDR_SIZE))
            nbufs = hdr.num_buffers
            if nbufs < 1:
                raise VirtioNetError(f"rx{k}: num_buffers is {nbufs}")
            if len(done) < nbufs and self._collect_rx(k) < nbufs:
                return None
        elems = [done.popleft() for _ in range(nbufs)]
        parts = self.qt.read_many([(pool.addr(e.token), e.length) for e in elems])
        frame = self._rx_frame(k, elems, b"".join(parts))
        if refill:
            self.post_rx(k)
        return frame

    def recv_burst(
        self, k: int = 0, max_frames: int | None = None, *, refill: bool = True
    ) -> list[RxFrame]:
        """Every frame complete now on pair ``k`` (at most ``max_frames``), in order, its
        buffers read in one pipelined qtest round trip for all (`try_recv` takes one per
        frame). A mergeable frame whose last buffers are not used yet stays for later; a bad
        used length or header raises as in `try_recv`, once the frames before it are
        returned (the next call raises)."""
        done = self._rx_done[k]
        self._collect_rx(k)
        if not done:
            return []
        pool = self._rx_pools[k]
        elems = list(done)
        raws = self.qt.read_many([(pool.addr(e.token), e.length) for e in elems])
        frames: list[RxFrame] = []
        i = 0
        while i < len(elems) and (max_frames is None or len(frames) < max_frames):
            nbufs = 1
            if elems[i].length >= NET_HDR_SIZE and self.mergeable:
                nbufs = VirtioNetHdr.unpack(raws[i][:NET_HDR_SIZE]).num_buffers
            if elems[i].length < NET_HDR_SIZE or nbufs < 1:
                if frames:
                    break  # hand over the good frames first; the next call raises
                if elems[i].length < NET_HDR_SIZE:
                    raise VirtioNetError(
                        f"rx{k}: used len {elems[i].length} shorter than the header"
                    )
                raise VirtioNetError(f"rx{k}: num_buffers is {nbufs}")
            if i + nbufs > len(elems):
                break  # a mergeable frame whose remaining buffers are not used yet
            taken = [done.popleft() for _ in range(nbufs)]
            frames.append(self._rx_frame(k, taken, b"".join(raws[i : i + nbufs])))
            i += nbufs
        if refill and frames:
            self.post_rx(k)
        return frames

    def recv_many(
        self, k: int, count: int, timeout: float = 5.0, *, refill: bool = True
    ) -> list[RxFrame]:
        """Wait for the next ``count`` frames on pair ``k``, taken in bursts (`recv_burst`)."""
        vq = self.rxq[k]
        got: list[RxFrame] = []

        def more() -> list[RxFrame] | None:
            got.extend(self.recv_burst(k, count - len(got), refill=refill))
            return got if len(got) == count else None

        return poll_until(
            more,
            timeout,
            f"{count} received frames on {vq.name}",
            detail=lambda: f"{len(got)} so far; {vq._state()}",
        )

    def _rx_frame(self, k: int, elems: Sequence[UsedElem], raw: bytes) -> RxFrame:
        """The frame in ``elems`` (their bytes joined in ``raw``); their buffers go back to
        the pool."""
        pool = self._rx_pools[k]
        for e in elems:
            pool.give(e.token)
        self.rx_frames += 1
        hdr = VirtioNetHdr.unpack(raw)
        return RxFrame(raw[NET_HDR_SIZE:], hdr, len(elems), k, tuple(e.length for e in elems))

    def recv(self, k: int = 0, timeout: float = 5.0, *, refill: bool = True) -> RxFrame:
        """Wait for the next frame on pair ``k`` (joins mergeable buffers)."""
        vq = self.rxq[k]
        return poll_until(
            lambda: self.try_recv(k, refill=refill),
            timeout,
            f"a received frame on {vq.name}",
            detail=vq._state,
        )

    def recv_any(self, timeout: float = 5.0, *, refill: bool = True) -> RxFrame:
        """Wait for the next frame on any active pair (multiqueue steering is the device's)."""
        pairs = range(max(self.active_pairs, 1))

        def check() -> RxFrame | None:
            for k in pairs:
                frame = self.try_recv(k, refill=refill)
                if frame is not None:
                    return frame
            return None

        return poll_until(check, timeout, f"a received frame on rx0..rx{pairs[-1]}")

    # ------------------------------------------------------------------ control queue
    def ctrl_command(self, cls: int, cmd: int, data: bytes = b"", timeout: float = 5.0) -> int:
        """Send one control command; returns the device's ack byte (0 = OK)."""
        if self.ctrlq is None or self._ctrl_buf is None:
            raise VirtioNetError("control queue not negotiated (init(ctrl_vq=True))")
        if len(data) > _CTRL_ACK_OFFSET - 2:
            raise VirtioNetError("control command data too large")
        buf = self._ctrl_buf
        ack = buf + _CTRL_ACK_OFFSET
        self.qt.write_many([(buf, bytes([cls, cmd]) + data), (ack, b"\xff")])
        out = [(buf, 2)] + ([(buf + 2, len(data))] if data else [])
        self.ctrlq.add(out, [(ack, 1)], "ctrl")
        self.ctrlq.kick()
        self.ctrlq.wait_used(1, timeout)
        return self.qt.readb(ack)

    def set_queue_pairs(self, n: int, timeout: float = 5.0) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET(n); raises unless the device acks OK."""
        if not self.has_feature(VIRTIO_NET_F_MQ):
            raise VirtioNetError("MQ not negotiated")
        ack = self.ctrl_command(
            VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", n), timeout
        )
        if ack != VIRTIO_NET_OK:
            raise VirtioNetError(f"device refused VQ_PAIRS_SET {n} (ack {ack})")
        self.active_pairs = n

    def set_promisc(self, on: bool) -> int:
        return self.ctrl_command(
            VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, bytes([1 if on else 0])
        )

    def rebind(self, qtest: QTest) -> None:
        """Switch to another qtest session driving the same guest (migration destination)."""
        self.dev.rebind(qtest)
        self.qt = qtest

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Reset the device and free every guest allocation the driver made."""
        big = [t[1] for vq in self.txq for t in vq.tokens_in_flight() if t[0] == "alloc"]
        try:
            self.dev.close()
        finally:
            for addr in big:
                self.alloc.free(addr)
            for pool in self._rx_pools + self._tx_pools:
                pool.release()
            self._rx_pools, self._tx_pools, self._rx_done = [], [], []
            if self._ctrl_buf is not None:
                self.alloc.free(self._ctrl_buf)
                self._ctrl_buf = None
            self.rxq, self.txq, self.ctrlq = [], [], None
