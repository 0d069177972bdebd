"""vIOMMU changes that meet work in progress: the scenarios of issue 15, item 2.

Plain functions on a started `ViommuTestbed` (the device behind a virtio-iommu, rings and
buffers reached through IOVAs only) that raise AssertionError naming the broken invariant.

What the device may and must do, from the specs: the driver gives a buffer to the device when
it makes it available, and may only unmap it after the device used it (Linux DMA API; virtio
1.2, 2.7.13 "the driver MUST NOT ... until used"). A device that reads a TX buffer early reads
legitimately; after an INVALIDATE for an IOVA (which QEMU sends, and waits for the reply to,
before the guest's UNMAP completes) it must not reach memory through the old translation
again: a later access to the same IOVA needs a fresh translation (MISS -> UPDATE), which may
point at another page.

How this backend holds chains: TX chains held by the ``hold-tx`` monitor command were read when
they were popped (like a NIC that fetched the packet into its FIFO and completes it later); RX
chains are popped only when a frame is ready and are written in the same step. So after an
INVALIDATE a held chain is only completed (its used entry, in the ring), never read again, and
every new use of the IOVA goes through a fresh translation - `held_tx_then_invalidate` shows
both from outside (the wire, the guest's pages, QEMU's fault events).

Over vhost-vdpa (VDUSE) the scenarios are the same functions; what differs is how a change
reaches the device, and there is no MISS. QEMU's vhost-vdpa registers an IOMMU notifier on
the virtio-iommu region (hw/virtio/vhost-vdpa.c ``vhost_vdpa_iommu_map_notify``): a guest MAP
becomes ``VHOST_IOTLB_UPDATE``, an UNMAP ``VHOST_IOTLB_INVALIDATE``, pushed before the guest's
request completes; the kernel (drivers/vhost/vdpa.c) applies it and calls VDUSE's ``set_map``,
which sends the device ``VDUSE_UPDATE_IOTLB [0, ULLONG_MAX]`` and waits for its answer
(drivers/vdpa/vdpa_user/vduse_dev.c ``vduse_vdpa_set_map``). So "a fresh translation" is a new
IOTLB entry the device fetched (``VDUSE_IOTLB_GET_FD``) after the one it dropped, visible as
its set_map diff (dma.unmap, then dma.map, of the IOVA); an IOVA the device finds in no entry
is its own error (``VDUSE_IOTLB_GET_FD`` answers EINVAL) and the queue waits for the next
UPDATE_IOTLB - QEMU never hears of it, so there is no virtio-iommu fault event either
(`_device_refused`). And an "INVALIDATE racing an outstanding MISS" cannot happen there: the
device never asks, every change arrives pushed and synchronous (the kernel waits for the
device's reply before the guest's UNMAP completes).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from .frames import make_frame
from .viommu_testbed import ViommuTestbed
from .virtio_iommu import FAULT_R_MAPPING, MAP_F_READ, MAP_F_WRITE, FaultEvent
from .virtio_net import NET_HDR_SIZE
from .waiting import WaitTimeout, poll_until
from .wire_peer import WirePeerTimeout

PAGE = 4096
STREAM = 0x25
SENTINEL_STREAM = 0x5F


def _tx_from(tb: ViommuTestbed, iova: int, length: int, token: object) -> None:
    txq = tb.net.txq[0]
    txq.add([(iova, length)], (), token, premapped=True)
    txq.kick(force=True)


def _journal(tb: ViommuTestbed, since: int, kinds: list[str]) -> list[dict[str, Any]]:
    assert tb.backend is not None
    return list(tb.backend.journal(kinds, since))


def _covers(e: dict[str, Any], iova: int) -> bool:
    lo = int(e["iova"])
    return lo <= iova < lo + int(e.get("size", 1) or 1)


def _vdpa(tb: ViommuTestbed) -> bool:
    return tb.transport == "vhost-vdpa"


def _dropped(tb: ViommuTestbed, since: int, iova: int) -> bool:
    """The device dropped its translation of ``iova`` since ``since``: vhost-user, an
    INVALIDATE covering it; vhost-vdpa, a set_map diff (UPDATE_IOTLB) unmapping it."""
    kinds = ["dma.unmap"] if _vdpa(tb) else ["iotlb.invalidate"]
    return any(_covers(e, iova) for e in _journal(tb, since, kinds))


def _translated_afresh(tb: ViommuTestbed, before_unmap: int, after_remap: int, x: int) -> None:
    """The use of ``x`` after its remap went through a new translation. vhost-user: the
    device sent a MISS for it after ``after_remap``. vhost-vdpa (no MISS): since
    ``before_unmap`` the device's set_map diffs unmapped the old entry and then mapped a new
    one covering ``x`` (it fetched the new entry with VDUSE_IOTLB_GET_FD)."""
    if _vdpa(tb):
        kinds = [
            e["kind"] for e in _journal(tb, before_unmap, ["dma.map", "dma.unmap"]) if _covers(e, x)
        ]
        assert kinds[:2] == ["dma.unmap", "dma.map"], (
            f"IOVA {x:#x}: the device's set_map diffs {kinds}, expected its old entry "
            "unmapped, then a new one mapped: a stale translation"
        )
    else:
        misses = [e for e in _journal(tb, after_remap, ["iotlb.miss_sent"]) if _missed(e, x)]
        assert misses, f"no MISS for IOVA {x:#x} after its INVALIDATE: a stale translation"


def _recv_unless_failed(tb: ViommuTestbed, since: int, timeout: float) -> bytes:
    """The next frame on the wire; an error the backend journalled since ``since`` (the
    device failed the chain instead) ends the wait at once, naming it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return tb.peer.recv(min(0.2, max(deadline - time.monotonic(), 0.01)))
        except WirePeerTimeout:
            errors = _journal(tb, since, ["error."])
            if errors:
                raise WirePeerTimeout(f"the backend failed instead: {errors[0]}") from None
            if time.monotonic() >= deadline:
                raise


def _device_refused(
    tb: ViommuTestbed, since: int, iova: int, size: int, *, tx_limit: int | None = None
) -> None:
    """vhost-vdpa: the device looked for an address in [iova, iova+size) and found no IOTLB
    entry (its ``error.vduse`` ``iotlb_miss`` since ``since``, naming the address). There is
    no MISS, so QEMU's virtio-iommu never sees the access and queues no fault event.
    ``tx_limit``: the TX queue's packet count the device may not exceed meanwhile (a chain
    it sends without the entry went through a translation it kept)."""
    assert tb.backend is not None
    b, txq = tb.backend, tb.net.txq[0].index
    stale = f"the device never looked for IOVA {iova:#x} after its unmap (it used a remembered "

    def found() -> list[dict[str, Any]]:
        errors = _journal(tb, since, ["error."])
        mine = [
            e
            for e in errors
            if e.get("op") == "iotlb_miss" and iova <= int(e.get("iova", -1)) < iova + size
        ]
        if errors and not mine:  # it reached the memory some other way: through a
            # translation it kept (the unmapped entry's mmap is closed)
            raise AssertionError(f"{stale}translation): {errors[0]}")
        if not mine and tx_limit is not None and (n := b.vring(txq)["packets"]) > tx_limit:
            raise AssertionError(f"{stale}translation): it transmitted {n} > {tx_limit} frames")
        return mine

    try:
        poll_until(found, 10.0, f"the device's error for IOVA {iova:#x} (in no IOTLB entry)")
    except WaitTimeout as e:
        raise AssertionError(
            f"{stale}translation): {e}; errors: {_journal(tb, since, ['error.'])}"
        ) from e


def _missed(e: dict[str, Any], iova: int) -> bool:
    return int(e["iova"]) & ~(PAGE - 1) == iova & ~(PAGE - 1)


def _refused(tb: ViommuTestbed, since: int, iova: int) -> bool:
    """QEMU answered a MISS for the page of ``iova`` with an error status since ``since``."""
    return any(
        _missed(e, iova) and e.get("status") not in (0, None)
        for e in _journal(tb, since, ["iotlb.miss_ack"])
    )


def expect_wire(tb: ViommuTestbed, frames: list[bytes], what: str, n: int) -> None:
    """``frames`` reach the wire in order, and the next frame is a sentinel the guest sends
    after them (nothing doubled)."""
    try:
        got = tb.peer.recv_n(len(frames), 10.0) if frames else []
    except WirePeerTimeout as e:
        raise AssertionError(f"{what}: {e}") from e
    assert got == frames, (
        f"{what}: frame {first_mismatch(got, frames)} of {len(frames)} carried other bytes"
    )
    sentinel = make_frame(n, 64, stream=SENTINEL_STREAM)
    try:
        tb.net.send(sentinel)
        late = tb.peer.recv_until(sentinel)
    except (WaitTimeout, WirePeerTimeout) as e:
        raise AssertionError(f"{what}: {e}") from e
    assert not late, f"{what}: {len(late)} more frames before the sentinel (doubled?)"


def first_mismatch(got: list[bytes], want: list[bytes]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), 0)


def wait_mapping_fault(
    tb: ViommuTestbed, iova: int, size: int = PAGE, timeout: float = 3.0
) -> FaultEvent:
    """QEMU's virtio-iommu fault event for an access to unmapped [iova, iova+size) (outside
    evidence that the device asked for a translation the guest had removed)."""

    def find() -> FaultEvent | None:
        tb.iommu.poll_faults()
        return next(
            (
                f
                for f in tb.iommu.faults
                if iova <= f.address < iova + size and f.reason == FAULT_R_MAPPING
            ),
            None,
        )

    try:
        found = poll_until(find, timeout, f"a virtio-iommu fault event for IOVA {iova:#x}")
    except WaitTimeout as e:
        raise AssertionError(
            f"the device never asked for IOVA {iova:#x} after its INVALIDATE (it used a "
            f"remembered translation): {e}"
        ) from e
    assert found is not None
    return found


# ---------------------------------------------------------------------------- scenarios
def held_tx_then_invalidate(tb: ViommuTestbed) -> None:
    """A TX chain the device holds (popped, read, not completed) whose IOVA the guest unmaps
    and maps to another page; then a new chain at the same IOVA.

    * the held chain completes with the bytes it read while the mapping was valid (page A's
      frame), never with what the guest wrote into page A after the unmap;
    * the new chain at that IOVA is translated afresh (MISS after the INVALIDATE) and carries
      page B's frame;
    * nothing else reaches the wire (sentinel).
    """
    assert tb.backend is not None and tb.machine is not None and tb.alloc is not None
    b, qt = tb.backend, tb.machine.qtest
    f1, f2 = make_frame(1, 700, stream=STREAM), make_frame(2, 900, stream=STREAM)
    a = tb.alloc.alloc(PAGE, tag="page A")
    pb = tb.alloc.alloc(PAGE, tag="page B")
    qt.write(a, bytes(NET_HDR_SIZE) + f1)
    qt.write(pb, bytes(NET_HDR_SIZE) + f2)
    x = tb.dma.iova.alloc(PAGE)
    tb.dma.map_pages(a, PAGE, MAP_F_READ, iova=x)
    b.cmd("hold-tx", enable=True)
    _tx_from(tb, x, NET_HDR_SIZE + len(f1), "held")
    poll_until(lambda: b.cmd("query-wire")["tx_held"] == 1, 5.0, "the device holding 1 chain")
    mark = b.mark()
    tb.dma.unmap_pages(x)
    assert _dropped(tb, mark, x), (
        f"the UNMAP of {x:#x} completed before the backend dropped its translation"
    )
    qt.memset(a, PAGE, 0x5A)  # the guest reuses page A
    tb.dma.map_pages(pb, PAGE, MAP_F_READ, iova=x)
    b.cmd("hold-tx", enable=False)
    try:
        got = tb.peer.recv(5.0)
        tb.net.txq[0].wait_used(1, 5.0)
    except (WaitTimeout, WirePeerTimeout) as e:
        raise AssertionError(f"the held chain after the INVALIDATE: {e}") from e
    assert got == f1, "the held chain completed with " + (
        "page A's bytes after the unmap" if got[:8] == b"\x5a" * 8 else "other bytes"
    )
    mark2 = b.mark()
    _tx_from(tb, x, NET_HDR_SIZE + len(f2), "after remap")
    try:
        got = _recv_unless_failed(tb, mark2, 5.0)
        tb.net.txq[0].wait_used(1, 5.0)
    except (WaitTimeout, WirePeerTimeout) as e:
        raise AssertionError(f"the new chain at {x:#x} after the remap: {e}") from e
    assert got == f2, f"the new chain at IOVA {x:#x} carried " + (
        "page A's bytes: a stale translation" if got[:8] == b"\x5a" * 8 else "other bytes"
    )
    _translated_afresh(tb, mark, mark2, x)
    expect_wire(tb, [], "after the held chain and the remap", 1)
    tb.dma.unmap_pages(x)


def unmap_ring_while_running(tb: ViommuTestbed, burst: int = 8) -> None:
    """The guest unmaps the TX ring's IOVA while the queue runs, then maps it again.

    While the ring is unmapped the device must not reach it: a frame the driver makes
    available meanwhile does not go out, and the device's translation request shows up as a
    virtio-iommu fault event in QEMU (outside evidence; over vhost-vdpa, where the device
    cannot ask, as its error naming the ring's IOVA). After the remap and a kick, every
    frame goes out exactly once, in order (sentinel)."""
    assert tb.backend is not None and tb.machine is not None
    net = tb.net
    vq = net.txq[0]
    # the descriptor ring: read for every chain in both layouts (a packed ring's driver area
    # is only the event suppression structure, which a device may not need to read at all)
    ring_iova = vq.desc_dma & ~(PAGE - 1)
    entry = next(
        (h for h in reversed(tb.dma.history) if h[0] == "map" and h[1] <= ring_iova < h[1] + h[2]),
        None,
    )
    assert entry is not None, f"no vIOMMU mapping for the descriptor ring at {ring_iova:#x}"
    _, m_iova, m_size, m_gpa, m_flags = entry
    first = [make_frame(i, 100 + 40 * i, stream=STREAM) for i in range(burst)]
    net.send_burst(first, wait=False)  # the queue runs
    got = []
    try:
        got = [tb.peer.recv(5.0) for _ in first]
    except WirePeerTimeout as e:
        raise AssertionError(f"the burst before the unmap: {e}") from e
    assert got == first, "the burst before the unmap"
    net.wait_tx(0, 5.0)
    tb.iommu.poll_faults()
    tb.iommu.faults.clear()
    # unmap the ring (the whole coherent mapping) behind the DMA layer's back, so that its
    # IOVA stays reserved (the next buffer must not be mapped there), then make a frame
    # available and kick
    unmap_mark = tb.backend.mark()
    tb.iommu.unmap(tb.dma.domain, m_iova, m_size)
    late = make_frame(100, 300, stream=STREAM)
    net.send_burst([late], wait=False)
    if _vdpa(tb):
        _device_refused(tb, unmap_mark, m_iova, m_size)
        tb.iommu.poll_faults()  # QEMU never saw the access: no MISS, no fault event
        seen = [f for f in tb.iommu.faults if m_iova <= f.address < m_iova + m_size]
        assert not seen, f"virtio-iommu fault events over vhost-vdpa: {seen}"
    else:
        wait_mapping_fault(tb, m_iova, m_size)
    # no wait for QEMU's refusal of the MISS here: the kick below may land while that MISS
    # is still outstanding, and the device must not lose it when the MISS is refused
    # (VdpaDevice.iotlb_miss_refused asks again for a queue kicked meanwhile)
    # a ring the device cannot reach completes nothing (a correct device cannot flake this)
    assert vq.pending_used() == 0, "a TX chain completed while the TX ring was unmapped"
    assert tb.backend.running, "the backend died when its ring was unmapped"
    # the ring comes back at the same IOVA; the driver kicks again
    tb.iommu.map(tb.dma.domain, m_iova, m_size, m_gpa, m_flags or (MAP_F_READ | MAP_F_WRITE))
    vq.kick(force=True)
    expect_wire(tb, [late], "TX after the ring was mapped again", 2)
    net.wait_tx(0, 5.0)


def invalidate_races_miss_in_traffic(tb: ViommuTestbed, rounds: int = 6, scratch: int = 6) -> int:
    """A TX stream through a strict vIOMMU (every buffer MAPped for its send and UNMAPped
    after: MISS -> UPDATE, then INVALIDATE, per frame) while, each round, a chain at an IOVA
    that is mapped only together with a batch of UNMAPs of other pages makes the device's
    MISS wait behind those INVALIDATEs (QEMU handles the whole batch before it reads the
    MISS). Every frame must reach the wire exactly once, byte-exact and in order (sentinel);
    the race must have happened; no backend error. Returns how many INVALIDATEs arrived while
    a MISS was outstanding.

    Over vhost-vdpa, where the device cannot ask (module doc), what corresponds: the chain at
    the unmapped IOVA fails its translation and the queue waits for the next UPDATE_IOTLB
    (the device's ``iotlb_miss`` error, expected here); the batch sends the UNMAPs first and
    the MAP of that IOVA last, so UPDATE_IOTLBs that remove other entries arrive while the
    chain waits, each one a retry that must not complete it through anything but the entry
    that finally maps it. Returns how many UPDATE_IOTLBs arrived while a chain waited."""
    from .virtio_iommu import MapOp, UnmapOp

    assert tb.backend is not None and tb.machine is not None and tb.alloc is not None
    b, qt, net = tb.backend, tb.machine.qtest, tb.net
    vdpa = _vdpa(tb)
    mark = b.mark()
    packets = int(b.vring(net.txq[0].index)["packets"])
    expected: list[bytes] = []
    waited: list[int] = []
    seq = 0
    for r in range(rounds):
        stream = [make_frame(seq + i, 200 + 131 * i, stream=STREAM) for i in range(3)]
        seq += 3
        net.send_burst(stream, wait=False)  # the driver maps each buffer (strict)
        expected += stream
        pages = [tb.alloc.alloc(PAGE, tag=f"scratch {r}.{i}") for i in range(scratch)]
        iovas = [tb.dma.map_pages(pg, PAGE, MAP_F_READ) for pg in pages]
        t = tb.alloc.alloc(PAGE, tag=f"race page {r}")
        f = make_frame(1000 + r, 300 + 50 * r, stream=STREAM)
        qt.write(t, bytes(NET_HDR_SIZE) + f)
        x = tb.dma.iova.alloc(PAGE)
        waited.append(x)
        refused_mark = b.mark()
        _tx_from(tb, x, NET_HDR_SIZE + len(f), ("alloc", t))  # the driver frees t when used
        map_x: list[MapOp | UnmapOp] = [MapOp(t, PAGE, MAP_F_READ, iova=x)]
        unmaps: list[MapOp | UnmapOp] = [UnmapOp(i) for i in iovas]
        if vdpa:
            failed = _unexpected_errors(tb, mark, waited)
            assert not failed, f"round {r}: the backend failed: {failed[0]}"
            # the chain waits for an entry: nothing beyond the stream may go out meanwhile
            _device_refused(tb, refused_mark, x, PAGE, tx_limit=packets + len(expected))
            tb.dma.apply(unmaps + map_x)
        else:
            poll_until(
                functools.partial(_refused, tb, refused_mark, x),
                5.0,
                f"QEMU refusing the MISS for the unmapped IOVA {x:#x}",
            )
            tb.dma.apply(map_x + unmaps)
        expected.append(f)
        try:
            net.wait_tx(0, 5.0)
        except WaitTimeout as err:
            raise AssertionError(f"round {r}: TX stalled: {err}") from err
        tb.dma.unmap_pages(x)
        for pg in pages:
            tb.alloc.free(pg)
    if vdpa:
        expect_wire(tb, expected, "the TX stream with unmaps racing a waiting chain", 3)
        return _updates_while_waiting(tb, mark, waited)
    expect_wire(tb, expected, "the TX stream with INVALIDATEs racing MISSes", 3)
    entries = _journal(tb, mark, ["iotlb.miss_sent", "iotlb.miss_ack", "iotlb.invalidate"])
    outstanding: set[int] = set()
    during = 0
    for e in entries:
        iova = int(e["iova"])
        if e["kind"] == "iotlb.miss_sent":
            outstanding.add(iova)
        elif e["kind"] == "iotlb.miss_ack":
            outstanding.discard(iova)
        elif outstanding:
            during += 1
    assert during, "no INVALIDATE arrived while a MISS was outstanding (the race never happened)"
    errors = b.journal(["error."], mark)
    assert not errors, f"backend errors: {errors}"
    return during


def _unexpected_errors(tb: ViommuTestbed, since: int, waited: list[int]) -> list[dict[str, Any]]:
    """vhost-vdpa race: backend errors since ``since`` other than the expected ``iotlb_miss``
    of the chains that wait at the IOVAs ``waited``."""
    return [
        e
        for e in _journal(tb, since, ["error."])
        if not (e.get("op") == "iotlb_miss" and int(e.get("iova", -1)) in waited)
    ]


def _updates_while_waiting(tb: ViommuTestbed, since: int, waited: list[int]) -> int:
    """vhost-vdpa: how many UPDATE_IOTLBs the device applied while a chain waited for an
    entry (between its ``iotlb_miss`` error and the set_map diff that mapped the IOVA); the
    only errors allowed are those misses, for the IOVAs the scenario left unmapped."""
    unexpected = _unexpected_errors(tb, since, waited)
    assert not unexpected, f"backend errors: {unexpected}"
    waiting: set[int] = set()
    during = 0
    for e in _journal(tb, since, ["error.", "dma.map", "vduse.iotlb"]):
        if e["kind"].startswith("error."):
            waiting.add(int(e["iova"]))
        elif e["kind"] == "dma.map":
            waiting -= {w for w in waiting if _covers(e, w)}
        elif waiting:
            during += 1
    assert during, "no UPDATE_IOTLB arrived while a chain waited (the race never happened)"
    return during
