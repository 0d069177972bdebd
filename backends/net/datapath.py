"""NetDevice: the virtio-net personality of :class:`~backends.vdpa.device.VdpaDevice`.

Queues: receiveq k = 2k, transmitq k = 2k+1 (no control queue: vhost-user-net's is emulated
by QEMU, and VDUSE forbids one).

TX (queue 2k+1, on a kick): pop chains until the ring is empty, at most ``tx_budget`` per round
when an event loop is attached (the rest continues from ``loop.call_soon``, so one busy queue
cannot starve the others). For each chain the out pieces are joined once, skipping the
virtio_net_hdr (which may be split over descriptors or share one with data); the frame goes to
the wire with ``qp = k``; the chain completes with ``written = 0``. One flush + notify per
batch (``VdpaDevice.notify_used`` honours EVENT_IDX). Kicks are suppressed while a batch runs
and re-enabled with the usual race check. A chain too short to hold the header is malformed
ring content: :class:`VqError` ``net-tx-header`` (NEEDS_RESET). Fault ``drop-tx``: chains are
consumed and counted as sent but never reach the wire.

TX hold (:meth:`NetDevice.hold_tx`, monitor ``hold-tx``): TX chains are popped and their frames
read, but neither sent nor completed - the chains stay in flight, as with a zero-copy or DMA
engine whose transmit completions are pending. Releasing the hold sends the held frames in
order and completes their chains. When the ring stops (GET_VRING_BASE: ``queue_stopped``) the
held frames are dropped here and the device rewinds their chains, so whoever starts the ring
next (the migration destination) transmits them: exactly once either way.

RX hold (:meth:`NetDevice.hold_rx`, monitor ``hold-rx``): buffers of receiveq 0 are popped and
kept unfilled (a device that prefetched buffers for frames still on their way); frames wait in
the backlog meanwhile. Releasing gives the buffers back (rewind) and RX resumes; when the ring
stops the device rewinds them, so the migration destination fills exactly those buffers.

RX (queue 2k): frames from the wire or :meth:`NetDevice.inject` go to a bounded per-pair
backlog (overflow counted as drops on the RX queue); the backlog is drained on an RX kick, on a
new frame, and when the ring (re)starts. Wire frames for a pair that is not enabled (its RX
queue not ready, or ``qp >= queue_pairs``) go to pair 0. Each frame is written as header +
frame into the writable pieces:

* with MRG_RXBUF a frame may span several chains; ``num_buffers`` (their count) is in the first
  chain's header. Too few buffers posted: the chains taken are given back (rewind), the frame
  stays in the backlog and kicks are re-enabled. A frame larger than the whole ring can hold
  is dropped (counted).
* without MRG_RXBUF a frame must fit one chain (``num_buffers = 1``); one that does not is
  dropped and counted, and the chain is given back (rewind) for the next frame - vhost-net's
  behaviour, never truncation.

A first RX chain that cannot hold the header (or an empty one under MRG_RXBUF) is malformed:
:class:`VqError` ``net-rx-buffer``. An IOTLB miss (vIOMMU) raises out of the ring with nothing
consumed: the device parks the queue and retries after the IOTLB update; the frame stays in the
backlog. Work that does not start from a kick runs through ``VdpaDevice.call_guarded``.
Dirty logging of packet data happens in ``DmaSpace.write_pieces``.

The header is 12 bytes when VERSION_1 or MRG_RXBUF is negotiated, else 10 (legacy).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from backends.loop import EventLoop
from backends.net.config import DEFAULT_MAC, NetConfig
from backends.net.wire import Wire
from backends.vdpa.access import Access, TranslationError
from backends.vdpa.faults import Faults
from backends.vdpa.memory import Piece
from backends.vdpa.virtqueue import Chain, Virtqueue, VqError
from backends.virtio.features import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    has,
    mask,
)
from backends.virtio.net import (
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
)
from backends.virtio.net_header import header_len, rx_header

if TYPE_CHECKING:
    from backends.vdpa.device import VdpaDevice

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1

#: Chains completed per TX round before yielding to the loop.
TX_BUDGET = 256
#: Frames delivered per RX round before yielding to the loop.
RX_BUDGET = 256
#: Frames held per queue pair while the guest has no RX buffers posted.
RX_BACKLOG = 256
#: The largest frame a TX chain may carry after its virtio_net_hdr: well above any real one (a
#: 64 KiB GSO frame, a 65535-byte MTU, the 70000-byte frames the wire tests send). A longer
#: chain is refused before a byte is copied (found by `make fuzz`: a descriptor of length
#: 0x7fffffff inside guest RAM made the backend copy gigabytes, stalling it for seconds).
MAX_TX_FRAME: Final = 0x40000

NET_FEATURES = mask(
    VIRTIO_F_VERSION_1,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_PACKED,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MQ,
)


@dataclass(slots=True)
class QueueStats:
    packets: int = 0
    bytes: int = 0
    drops: int = 0


class NetDevice:
    """virtio-net: config space, feature set and the TX/RX datapath over a :class:`Wire`."""

    device_id = VIRTIO_ID_NET

    def __init__(
        self,
        wire: Wire,
        queue_pairs: int = 1,
        mac: bytes | str = DEFAULT_MAC,
        mtu: int = 1500,
        faults: Faults | None = None,
        *,
        loop: EventLoop | None = None,
        backlog: int = RX_BACKLOG,
        tx_budget: int = TX_BUDGET,
        rx_budget: int = RX_BUDGET,
        withhold: int = 0,
    ) -> None:
        #: feature bits not offered (e.g. what QEMU's shadow virtqueues refuse)
        self.withhold = withhold
        if queue_pairs < 1:
            raise ValueError(f"queue_pairs must be >= 1, got {queue_pairs}")
        if backlog < 1 or tx_budget < 1 or rx_budget < 1:
            raise ValueError("backlog, tx_budget and rx_budget must be >= 1")
        self.wire = wire
        self.queue_pairs = queue_pairs
        self.config = NetConfig(
            mac=mac,  # type: ignore[arg-type]  # NetConfig parses a str MAC
            status=VIRTIO_NET_S_LINK_UP,
            max_virtqueue_pairs=queue_pairs,
            mtu=mtu,
        )
        self.backlog_limit = backlog
        self.tx_budget = tx_budget
        self.rx_budget = rx_budget
        self.stats = [QueueStats() for _ in range(2 * queue_pairs)]
        self._faults = faults
        self._dev: VdpaDevice | None = None
        self._loop: EventLoop | None = None
        self._backlog: list[collections.deque[bytes]] = [
            collections.deque() for _ in range(queue_pairs)
        ]
        self._scheduled: set[int] = set()  # vq indexes with a continuation pending
        # per pair: (avail idx, last_avail_idx) when the posted mergeable buffers were found
        # too few for the head frame; nothing to retry until the driver adds more
        self._stalled: list[tuple[int, int] | None] = [None] * queue_pairs
        self._tx_hold = False
        #: RX hold (hold_rx): chains of receiveq 0 popped and kept unfilled; None = no hold
        self._rx_held: list[Chain] | None = None
        # per TX vq: chains popped while the hold was on, oldest first, with their frames
        self._held: dict[int, list[tuple[Chain, bytes]]] = {}
        wire.set_receiver(self._on_wire_frame)
        if loop is not None:
            self.set_loop(loop)

    # -- DevicePersonality -----------------------------------------------------------------
    def device_features(self) -> int:
        return NET_FEATURES & ~self.withhold

    def config_space(self) -> bytes:
        return self.config.pack()

    def write_config(self, offset: int, data: bytes) -> None:
        """virtio 1.x config is read-only for the driver; a legacy MAC write is honoured."""
        if 0 <= offset and offset + len(data) <= 6:
            mac = bytearray(self.config.mac)
            mac[offset : offset + len(data)] = data
            self.config.mac = bytes(mac)
        else:
            log.debug("ignored config write at %d (%d bytes)", offset, len(data))

    def num_queues(self) -> int:
        return 2 * self.queue_pairs

    def attach(self, dev: VdpaDevice) -> None:
        self._dev = dev

    def queue_kicked(self, vq_index: int) -> None:
        if vq_index >= 2 * self.queue_pairs:
            return
        if vq_index & 1:
            self._tx(vq_index)
        else:
            self._rx(vq_index >> 1)

    def reset(self) -> None:
        """Device reset: drop backlogged frames (counted) and the announce request."""
        for qp, bl in enumerate(self._backlog):
            self.stats[2 * qp].drops += len(bl)
            bl.clear()
        self._scheduled.clear()
        self._stalled = [None] * self.queue_pairs
        self._held.clear()
        self._rx_held = None
        self.config.status = VIRTIO_NET_S_LINK_UP

    def device_resetting(self) -> None:
        """Reset is about to drop every ring. Held RX buffers are simply forgotten (never
        used: the driver, or QEMU's shadow virtqueue, still owns them); the fault
        'complete-held-rx-on-reset' returns them as used with nothing written instead."""
        dev = self._dev
        if dev is None or not self._rx_held or not self._fault("complete-held-rx-on-reset"):
            return
        vq = dev.vqs[0]
        for chain in self._rx_held:
            vq.push(chain, 0)
        self._rx_held = []
        dev.notify_used(0)

    def queue_stopped(self, vq_index: int) -> None:
        """The ring stops (GET_VRING_BASE): drop held TX frames; the device rewinds their
        chains (VdpaDevice.stop_vq), so they are transmitted by whoever runs the ring next."""
        held = self._held.pop(vq_index, None)
        if held:
            log.info("vq %d stopped with %d held TX chain(s): given back", vq_index, len(held))
        if vq_index == 0 and self._rx_held:
            log.info("vq 0 stopped with %d held RX chain(s): given back", len(self._rx_held))
            self._rx_held = []

    # -- RX hold -----------------------------------------------------------------------------
    @property
    def rx_held(self) -> int:
        """RX chains of receiveq 0 popped and held unfilled (hold_rx)."""
        return len(self._rx_held or ())

    def hold_rx(self, count: int) -> int:
        """Take ``count`` RX buffers of receiveq 0 and keep them unfilled (a device that
        prefetched buffers for frames still on their way); frames wait in the backlog while
        the hold lasts. ``count`` 0 releases: the chains are given back (rewound) and RX
        resumes. When the ring stops the device rewinds them (VdpaDevice.stop_vq).
        Returns how many chains are held after the call."""
        dev = self._dev
        assert dev is not None
        vq = dev.vqs[0]
        if count <= 0:
            if self._rx_held:
                vq.rewind()
            self._rx_held = None
            self._continue(0)
            return 0
        self._rx_held = list(self._rx_held or ())
        self._rx_held += vq.pop_batch(count - len(self._rx_held))
        return len(self._rx_held)

    # -- TX hold -----------------------------------------------------------------------------
    @property
    def tx_held(self) -> int:
        """TX chains popped and held (neither sent nor completed)."""
        return sum(len(h) for h in self._held.values())

    def hold_tx(self, enable: bool) -> int:
        """Hold TX completions (see the module docstring) or release them: held frames are
        sent and their chains completed when their queue next runs (now, if it is active).
        Returns how many chains were held at the call."""
        held = self.tx_held
        self._tx_hold = bool(enable)
        if not enable:
            for i in [i for i, h in self._held.items() if h]:
                self._continue(i)
        return held

    def _complete_held(self, i: int) -> None:
        dev = self._dev
        assert dev is not None
        held = self._held.pop(i, None)
        if not held:
            return
        vq = dev.vqs[i]
        st = self.stats[i]
        drop = self._fault("drop-tx")
        for chain, frame in held:
            vq.push(chain, 0)
            st.packets += 1
            st.bytes += len(frame)
            if not drop:
                self.wire.send(frame, i >> 1)
        dev.notify_used(i)

    # -- wiring ------------------------------------------------------------------------------
    def set_loop(self, loop: EventLoop) -> None:
        """Use ``loop`` for continuations of long batches and attach the wire to it."""
        self._loop = loop
        self.wire.attach(loop)

    @property
    def faults(self) -> Faults | None:
        if self._faults is not None:
            return self._faults
        return self._dev.faults if self._dev is not None else None

    def _fault(self, name: str) -> bool:
        f = self.faults
        return f is not None and f.active(name)

    def announce(self) -> None:
        """Ask the guest to announce itself (GUEST_ANNOUNCE): status bit + config interrupt."""
        self.config.status |= VIRTIO_NET_S_ANNOUNCE
        dev = self._dev
        if dev is not None and dev.on_config_change is not None:
            dev.on_config_change()

    # -- RX entry points ---------------------------------------------------------------------
    def inject(self, frame: bytes | bytearray | memoryview, qp: int = 0) -> bool:
        """Queue ``frame`` for the guest as if it came from the wire on pair ``qp`` (monitor
        ``inject-packet``). False when the backlog was full (counted as a drop)."""
        if not 0 <= qp < self.queue_pairs:
            raise ValueError(f"queue pair {qp} out of range 0..{self.queue_pairs - 1}")
        data = bytes(frame)
        if not data:
            raise ValueError("cannot inject an empty frame")
        return self._enqueue(self._route(qp), data)

    def _on_wire_frame(self, frame: bytes, qp: int) -> None:
        if frame:
            self._enqueue(self._route(qp), frame)

    def _route(self, qp: int) -> int:
        if qp == 0 or not 0 < qp < self.queue_pairs:
            return 0
        dev = self._dev
        if dev is None or not dev.vqs[2 * qp].ready:
            return 0
        return qp

    def _enqueue(self, qp: int, frame: bytes) -> bool:
        bl = self._backlog[qp]
        if len(bl) >= self.backlog_limit:
            self.stats[2 * qp].drops += 1
            return False
        bl.append(frame)
        if self._loop is not None:
            self._schedule(2 * qp)  # coalesce a burst of wire frames into one RX batch
        else:
            self._continue(2 * qp)
        return True

    # -- scheduling --------------------------------------------------------------------------
    def _schedule(self, vq_index: int) -> None:
        loop = self._loop
        if loop is None or vq_index in self._scheduled:
            return
        self._scheduled.add(vq_index)
        self._call_soon(loop, vq_index)

    def _call_soon(self, loop: EventLoop, vq_index: int) -> None:
        # apart from _schedule, which runs per frame: compiled, a function holding a lambda
        # builds the lambda's environment on every call, taken branch or not
        loop.call_soon(lambda: self._continue(vq_index))

    def _continue(self, vq_index: int) -> None:
        """Process a queue outside a kick (continuation, wire RX), the way a kick would."""
        self._scheduled.discard(vq_index)
        dev = self._dev
        if dev is None:
            return
        if dev.suspended:
            dev.kick_vq(vq_index)  # remembered and replayed on resume
        elif dev.vq_active(vq_index):
            dev.call_guarded(vq_index, self.queue_kicked, vq_index)
        # else: the ring is stopped; the device runs it when it starts again

    def _header_len(self, dev: VdpaDevice) -> tuple[int, bool]:
        f = dev.driver_features
        mrg = has(f, VIRTIO_NET_F_MRG_RXBUF)
        return header_len(has(f, VIRTIO_F_VERSION_1), mrg), mrg

    # -- TX ----------------------------------------------------------------------------------
    def _tx(self, i: int) -> None:
        dev = self._dev
        assert dev is not None
        vq = dev.vqs[i]
        qp = i >> 1
        st = self.stats[i]
        hdr_len, _ = self._header_len(dev)
        drop = self._fault("drop-tx")
        send = self.wire.send
        budget = self.tx_budget if self._loop is not None else 0
        done = 0
        hold = self._tx_hold
        if not hold and self._held.get(i):
            self._complete_held(i)
        try:
            vq.set_notification(False)
            while True:
                chains = vq.pop_batch(budget - done if budget else vq.num)
                if not chains:
                    if vq.enable_notification_and_check():
                        vq.set_notification(False)
                        continue
                    break
                for chain in chains:
                    if chain.out_len < hdr_len:
                        raise VqError(
                            "net-tx-header",
                            f"vq {i}: TX chain {chain.head} has {chain.out_len} readable "
                            f"bytes, less than the {hdr_len}-byte virtio_net_hdr",
                        )
                    if chain.out_len - hdr_len > MAX_TX_FRAME:
                        raise VqError(
                            "net-tx-length",
                            f"vq {i}: TX chain {chain.head} carries {chain.out_len - hdr_len} "
                            f"bytes after the header, more than a frame ({MAX_TX_FRAME})",
                        )
                    frame = _frame_of(chain.out, hdr_len)
                    if hold:  # popped, not completed: stays in flight
                        self._held.setdefault(i, []).append((chain, frame))
                        continue
                    vq.push(chain, 0)
                    done += 1
                    if frame:
                        st.packets += 1
                        st.bytes += len(frame)
                        if not drop:
                            send(frame, qp)
                    else:
                        st.drops += 1  # header only, no frame
                if budget and done >= budget:
                    self._schedule(i)  # kicks stay suppressed: we come back anyway
                    break
        except BaseException:
            self._held.pop(i, None)  # rewound with the rest: popped again, in order
            _give_back(vq)
            # Kicks were suppressed for the batch: ask for them again, or a queue parked on
            # a MISS that QEMU refuses (no UPDATE will come) would never hear the driver's
            # next kick.
            with contextlib.suppress(VqError, TranslationError):
                vq.set_notification(True)
            raise
        finally:
            if vq.used_pending:
                dev.notify_used(i)

    # -- RX ----------------------------------------------------------------------------------
    def _rx(self, qp: int) -> None:
        bl = self._backlog[qp]
        if not bl or (qp == 0 and self._rx_held is not None):  # hold_rx: frames wait
            return
        dev = self._dev
        assert dev is not None
        i = 2 * qp
        vq = dev.vqs[i]
        st = self.stats[i]
        hdr_len, mrg = self._header_len(dev)
        budget = self.rx_budget if self._loop is not None else 0
        write = dev.dma.write_pieces
        one_buffer = rx_header(1, hdr_len)  # the header of nearly every frame
        bad_nbuf = self._fault("rx-bad-num-buffers")
        if mrg and self._stalled[qp] is not None:
            if self._stalled[qp] == (vq.avail_idx(), vq.state.last_avail_idx):
                return  # same buffers as last time, still too few: skip the pop/rewind
            self._stalled[qp] = None
        done = 0
        pf = _Prefetch(vq)
        ahead = pf.chains
        dma = dev.dma
        try:
            while bl:
                frame = bl[0]
                need = hdr_len + len(frame)
                if ahead and ahead[0].in_len >= need:
                    # the common case, what _take_one / _take_mergeable return for it: the next
                    # chain popped ahead holds header + frame
                    chain = ahead.popleft()
                    bl.popleft()
                    done += 1
                    vq.push(chain, dma.write_pieces(chain.inp, one_buffer + frame))
                    st.packets += 1
                    st.bytes += len(frame)
                    if budget and done >= budget:
                        if bl:
                            self._schedule(i)
                        break
                    continue
                pf.want = min(len(bl), budget - done) if budget else len(bl)
                if mrg:
                    chains = self._take_mergeable(pf, need, hdr_len)
                else:
                    chains = self._take_one(pf, need, hdr_len)
                if chains is None:  # no (or not enough) buffers: wait for the driver's kick
                    if mrg and vq.inflight == 0 and vq.avail_pending():
                        self._stalled[qp] = (vq.avail_idx(), vq.state.last_avail_idx)
                    break
                bl.popleft()
                done += 1
                if not chains:
                    st.drops += 1  # too big for what the guest can ever give us
                    continue
                nbuf = len(chains) if mrg and not bad_nbuf else 1  # bad_nbuf: the fault
                data = (one_buffer if nbuf == 1 else rx_header(nbuf, hdr_len)) + frame
                if len(chains) == 1:
                    vq.push(chains[0], write(chains[0].inp, data))
                else:
                    mv = memoryview(data)
                    pos = 0
                    for c in chains:
                        n = write(c.inp, mv[pos:])
                        vq.push(c, n)
                        pos += n
                st.packets += 1
                st.bytes += len(frame)
                if budget and done >= budget:
                    if bl:
                        self._schedule(i)
                    break
            if pf.chains:  # popped ahead but not needed (not expected): give them back
                pf.rewind()
        except BaseException:
            _give_back(vq)  # a miss or a malformed chain: nothing half-taken stays popped
            raise
        finally:
            if vq.used_pending:
                dev.notify_used(i)

    @staticmethod
    def _take_one(pf: _Prefetch, need: int, hdr_len: int) -> list[Chain] | None:
        """One chain for a non-mergeable frame; [] = frame does not fit (chain given back)."""
        vq = pf.vq
        while True:
            chain = pf.pop()
            if chain is not None:
                break
            if not vq.enable_notification_and_check():
                return None
        if chain.in_len < hdr_len:
            raise VqError(
                "net-rx-buffer",
                f"vq {vq.index}: RX chain {chain.head} has {chain.in_len} writable bytes, "
                f"less than the {hdr_len}-byte virtio_net_hdr",
            )
        if chain.in_len < need:
            pf.rewind()
            return []
        return [chain]

    @staticmethod
    def _take_mergeable(pf: _Prefetch, need: int, hdr_len: int) -> list[Chain] | None:
        """Chains until ``need`` bytes fit; None = not enough posted (all given back)."""
        vq = pf.vq
        chains: list[Chain] = []
        have = 0
        while have < need:
            chain = pf.pop()
            if chain is None:
                # Ask for a kick at the current avail idx *before* giving chains back, so
                # avail_event (EVENT_IDX) is past everything we have seen; then re-check.
                seen = vq.state.last_avail_idx
                vq.set_notification(True)
                if vq.avail_idx() != seen:
                    continue
                if chains:
                    pf.rewind()
                    if len(chains) >= vq.num:  # the whole ring cannot hold this frame
                        return []
                return None
            if chain.in_len == 0 or (not chains and chain.in_len < hdr_len):
                raise VqError(
                    "net-rx-buffer",
                    f"vq {vq.index}: mergeable RX chain {chain.head} has {chain.in_len} "
                    f"writable bytes (first buffer needs >= {hdr_len})",
                )
            chains.append(chain)
            have += chain.in_len
        return chains

    # -- introspection -----------------------------------------------------------------------
    def backlog(self, qp: int = 0) -> int:
        return len(self._backlog[qp])

    def counters(self) -> dict[str, Any]:
        """Per-queue packets/bytes/drops, backlogs and the wire's counters (monitor)."""
        queues = []
        for i, s in enumerate(self.stats):
            queues.append({"vq": i, "dir": "tx" if i & 1 else "rx", "qp": i >> 1, **asdict(s)})
        return {
            "queues": queues,
            "backlog": [len(b) for b in self._backlog],
            "wire": self.wire.counters(),
        }

    def totals(self) -> dict[str, dict[str, int]]:
        tx = QueueStats()
        rx = QueueStats()
        for i, s in enumerate(self.stats):
            t = tx if i & 1 else rx
            t.packets += s.packets
            t.bytes += s.bytes
            t.drops += s.drops
        return {"tx": asdict(tx), "rx": asdict(rx)}

    def record_counters(self) -> None:
        """Journal the totals as ``net.tx`` / ``net.rx`` (counters only, never per packet)."""
        dev = self._dev
        if dev is None:
            return
        totals = self.totals()
        dev.journal.record("net.tx", **totals["tx"])
        dev.journal.record("net.rx", **totals["rx"])


class _Prefetch:
    """RX chains popped ahead with :meth:`Virtqueue.pop_batch` (one avail-index read
    for up to ``want`` frames). Every chain it holds is popped and unpushed, the newest in
    flight, so giving chains back is the queue's rewind (which also empties it)."""

    __slots__ = ("chains", "vq", "want")

    def __init__(self, vq: Virtqueue) -> None:
        self.vq = vq
        self.chains: collections.deque[Chain] = collections.deque()
        self.want = 1

    def pop(self) -> Chain | None:
        if not self.chains:
            got = self.vq.pop_batch(max(1, self.want))
            if not got:
                return None
            self.chains.extend(got)
        return self.chains.popleft()

    def rewind(self) -> None:
        self.chains.clear()
        self.vq.rewind()


def _give_back(vq: Virtqueue) -> None:
    """Rewind chains popped in this batch but not pushed (chains are pushed as soon as they
    are filled, so these are exactly the ones a miss or a malformed chain interrupted)."""
    if vq.inflight:
        vq.rewind()


class _HasOut(Protocol):
    @property
    def out(self) -> list[Piece]: ...


def _join_out(chain: _HasOut, hdr_len: int) -> bytes:
    """The driver-written bytes of ``chain`` after the first ``hdr_len``: one copy (slicing
    the region's mmap yields bytes directly; no memoryview is exported)."""
    return _frame_of(chain.out, hdr_len)


def _frame_of(out: list[Piece], hdr_len: int) -> bytes:
    """:func:`_join_out` of the pieces ``out`` (what the TX loop calls)."""
    if len(out) == 1:
        return _piece_bytes(out[0], hdr_len)
    skip = hdr_len
    parts: list[bytes] = []
    for p in out:
        if skip >= p.length:
            skip -= p.length
            continue
        parts.append(_piece_bytes(p, skip))
        skip = 0
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def _piece_bytes(p: Piece, skip: int) -> bytes:
    r = p.region
    if r.closed:
        raise TranslationError("unmapped", p.gpa, p.length, Access.READ, "region closed")
    start = r.base + p.offset
    data = r.buf[start + skip : start + p.length]
    return data if type(data) is bytes else bytes(data)
