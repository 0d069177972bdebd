"""vIOMMU scenario code, as library code: shared by the qtest suite (``qtests/test_viommu.py``)
and ``make bench`` (the IOTLB MISS round trip is timed on the suite's own traffic pattern),
and the scenarios that read the same on both transports.

The guest side is the qtest driver with a virtio-iommu-pci (``boot-bypass=off``) in front of
the virtio-net device (`viommu_testbed.ViommuTestbed`). How a guest MAP / UNMAP reaches the
device differs per transport:

* vhost-user: nothing until the device needs it: the device sends a MISS, QEMU translates and
  answers with an UPDATE; a guest UNMAP becomes an INVALIDATE before the UNMAP completes.
* vhost-vdpa (VDUSE): QEMU's vhost-vdpa registers an IOMMU notifier on the virtio-iommu
  region; every guest MAP / UNMAP becomes a vhost IOTLB update, which the kernel applies to
  the VDUSE domain with ``set_map`` and tells the device as UPDATE_IOTLB before the guest's
  request completes. The device cannot ask (no MISS): an IOVA it has no entry for is an
  error until the next UPDATE_IOTLB. vhost IOTLB permissions are RO or RW only: QEMU maps a
  WRITE-only guest mapping read-write (``readonly = !(perm & IOMMU_WO)``).

Every scenario is a plain function raising AssertionError, so meta-tests run it against a
backend with a fault and expect the failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .frames import make_frame
from .iova import PAGE_SIZE
from .testbed import Testbed
from .viommu_testbed import ViommuTestbed
from .virtio_iommu import DEFAULT_IOVA_WINDOW, MAP_F_READ, MAP_F_WRITE
from .virtio_net import NET_HDR_SIZE
from .waiting import WaitTimeout, poll_until
from .wire_peer import WirePeerTimeout

WINDOW_LO, WINDOW_HI = DEFAULT_IOVA_WINDOW
IOTLB_KINDS = ["iotlb.", "dma.map", "dma.unmap", "error."]
VDPA = "vhost-vdpa"
#: vhost / VDUSE access permissions (query-iotlb names them).
PERM_RO, PERM_RW = 1, 3
PERM_NAMES = {"RO": PERM_RO, "WO": 2, "RW": PERM_RW}


def journal(tb: Testbed, since: int, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    assert tb.backend is not None
    return tb.backend.journal(kinds=kinds or IOTLB_KINDS, since=since)


def covers(e: dict[str, Any], iova: int) -> bool:
    """Does the journalled range (dma.map/unmap, iotlb.update/invalidate) contain ``iova``?"""
    return int(e["iova"]) <= iova < int(e["iova"]) + int(e["size"])


def missed_in(e: dict[str, Any], iova: int, size: int) -> bool:
    """Is the first missing IOVA of an ``iotlb.miss`` entry inside [iova, iova+size)?"""
    return iova <= int(e["iova"]) < iova + size


def stalled(tb: Testbed, what: str, e: Exception) -> AssertionError:
    """The failure of a wait for traffic, with what the backend says about it."""
    notes = ""
    if tb.backend is not None and tb.backend.running:
        entries = journal(tb, 0, ["iotlb.miss_sent", "error."])
        errors = [e for e in entries if str(e["kind"]).startswith("error.")]
        sent = len(entries) - len(errors)
        notes = f"; backend: {sent} MISS sent"
        if errors:
            last = errors[-1]
            notes += f", {len(errors)} error(s), last {last['kind']}: {last.get('detail', last)}"
    return AssertionError(f"{what} stalled: {e}{notes}")


def rx_into(tb: ViommuTestbed, iova: int, frame: bytes, timeout: float = 5.0) -> int:
    """Post one premapped RX buffer at ``iova`` (one page), send ``frame`` from the wire,
    wait for the used element; returns the length the device wrote."""
    rxq = tb.net.rxq[0]
    rxq.add((), [(iova, PAGE_SIZE)], "premapped", premapped=True)
    rxq.kick(force=True)
    tb.peer.send(frame)
    try:
        (used,) = rxq.wait_used(1, timeout)
    except WaitTimeout as e:
        raise stalled(tb, f"RX into IOVA {iova:#x}", e) from e
    return used.length


def tx_from(tb: ViommuTestbed, iova: int, length: int) -> None:
    """Post one premapped TX chain of ``length`` bytes at ``iova`` and kick."""
    txq = tb.net.txq[0]
    txq.add([(iova, length)], (), "premapped", premapped=True)
    txq.kick(force=True)


# ----------------------------------------------------------------------------- vhost-user
def is_data(iova: int, flags: int) -> bool:
    """A streaming buffer mapping (rings are mapped read+write, MSI words below the window)."""
    return WINDOW_LO <= iova < WINDOW_HI and flags != MAP_F_READ | MAP_F_WRITE


def consumed_mappings(tb: ViommuTestbed, hist_mark: int) -> list[tuple[int, int, int, int]]:
    """Data-buffer mappings the device used since ``hist_mark``: (iova, size, gpa, flags).

    Strict: the ones the driver unmapped (it unmaps a buffer when its chain is used).  Static
    (nothing is unmapped): the live ones - the caller keeps those the backend UPDATEd."""
    if tb.strict:
        return [
            (iova, size, gpa, flags)
            for op, iova, size, gpa, flags in tb.dma.history_since(hist_mark)
            if op == "unmap" and is_data(iova, flags)
        ]
    return [
        (iova, size, gpa, flags)
        for iova, (size, gpa, flags) in tb.dma.mappings().items()
        if is_data(iova, flags)
    ]


def scenario_dynamic(tb: ViommuTestbed, packets: int) -> None:
    """Map per packet, send, unmap (strict), ``packets`` times, one packet in flight: every
    packet reuses the IOVA the previous one just unmapped (LIFO), each time for another
    guest page.  Byte-exact on the wire; for every IOVA the backend got the INVALIDATE of
    use k before the MISS of use k+1 (no use without a fresh UPDATE)."""
    assert tb.backend is not None
    mark, hmark = tb.backend.mark(), tb.dma.history_mark()
    for seq in range(packets):
        frame = make_frame(seq, 60 + seq % 1400, stream=3)
        try:
            tb.net.send(frame, hdr_separate=False, timeout=5)
            got = tb.peer.recv(timeout=5)
        except (WaitTimeout, WirePeerTimeout) as e:
            raise stalled(tb, f"packet {seq} of {packets}", e) from e
        assert got == frame, f"packet {seq}: the wire carried other bytes (a stale translation)"
    uses = consumed_mappings(tb, hmark)
    assert len(uses) == packets, f"{len(uses)} buffer mappings used for {packets} packets"
    entries = journal(tb, mark, ["iotlb.miss", "iotlb.invalidate", "dma.map", "dma.unmap"])
    # per IOVA page: the journal must alternate MISS -> map ... INVALIDATE, one round per use
    by_page: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        by_page.setdefault(int(entry["iova"]) & ~0xFFF, []).append(entry)
    pages: dict[int, int] = {}
    for iova, _size, _gpa, _flags in uses:
        pages[iova & ~0xFFF] = pages.get(iova & ~0xFFF, 0) + 1
    assert len(pages) < packets, "IOVAs were never reused: the scenario proves nothing"
    for page, n_uses in pages.items():
        seen = [entry["kind"] for entry in by_page.get(page, [])]
        rounds = 0
        state = "unmapped"
        for kind in seen:
            if kind == "iotlb.miss":
                assert state == "unmapped", (
                    f"IOVA {page:#x}: MISS while mapped (round {rounds}): {seen[:12]}"
                )
                state = "missed"
            elif kind == "dma.map":
                assert state == "missed", (
                    f"IOVA {page:#x}: mapped without a MISS (round {rounds}): {seen[:12]}"
                )
                state = "mapped"
            elif kind == "iotlb.invalidate":
                assert state == "mapped", f"IOVA {page:#x}: INVALIDATE of nothing: {seen[:12]}"
                state = "unmapped"
                rounds += 1
        assert rounds == n_uses, (
            f"IOVA {page:#x}: {n_uses} uses but {rounds} MISS/UPDATE/INVALIDATE rounds "
            f"(a use without a fresh translation); journal: {seen[:12]}"
        )


# ----------------------------------------------------------------------------- vhost-vdpa
def device_pages(tb: Testbed) -> dict[int, int]:
    """The device's IOTLB as IOVA page -> vhost perm (entries may be split or merged)."""
    assert tb.backend is not None
    out: dict[int, int] = {}
    for m in tb.backend.cmd("query-iotlb")["mappings"]:
        for page in range(m["iova"], m["iova"] + m["size"], PAGE_SIZE):
            out[page] = PERM_NAMES[m["perm"]] if isinstance(m["perm"], str) else int(m["perm"])
    return out


def domain_pages(tb: ViommuTestbed) -> dict[int, int]:
    """What the guest mapped in the domain, as the device must see it over vhost-vdpa: IOVA
    page -> RO for READ-only mappings, RW for anything writable (vhost has no write-only)."""
    out: dict[int, int] = {}
    for iova, (size, _gpa, flags) in tb.dma.mappings().items():
        perm = PERM_RW if flags & MAP_F_WRITE else PERM_RO
        for page in range(iova, iova + size, PAGE_SIZE):
            out[page] = perm
    return out


def assert_iotlb_is_the_domain(tb: ViommuTestbed, what: str) -> None:
    """The device's IOTLB equals the guest's domain mappings, page by page, with perms."""
    dev, dom = device_pages(tb), domain_pages(tb)
    if dev != dom:
        extra = sorted(set(dev) - set(dom))[:4]
        missing = sorted(set(dom) - set(dev))[:4]
        perms = sorted(p for p in set(dev) & set(dom) if dev[p] != dom[p])[:4]
        raise AssertionError(
            f"{what}: the device's IOTLB is not the guest's domain: {len(dev)} pages vs "
            f"{len(dom)}; extra {[hex(p) for p in extra]}, missing {[hex(p) for p in missing]}, "
            f"other perms {[(hex(p), dev[p], dom[p]) for p in perms]}"
        )


def updates_since(tb: Testbed, since: int) -> list[dict[str, Any]]:
    assert tb.backend is not None
    return [m for m in tb.backend.journal(["vduse.msg"], since) if m["type"] == "UPDATE_IOTLB"]


def scenario_iotlb_follows_guest_maps(
    tb: ViommuTestbed, sizes: list[int], timeout: float = 20.0
) -> dict[str, Any]:
    """vhost-vdpa: rings and buffers at IOVAs (not GPAs); the device's IOTLB is the guest's
    domain (perms included) after DRIVER_OK, after traffic, after each MAP and UNMAP; each
    guest MAP / UNMAP is an UPDATE_IOTLB before the request completes; TX and RX byte-exact.
    Returns numbers for the report."""
    assert tb.backend is not None and tb.machine is not None and tb.alloc is not None
    b, qt = tb.backend, tb.machine.qtest
    for vq in (tb.net.rxq[0], tb.net.txq[0]):
        ring = b.vring(vq.index)
        assert (ring["desc"], ring["avail"], ring["used"]) == (
            vq.desc_dma,
            vq.avail_dma,
            vq.used_dma,
        ), f"{vq.name}: the device's ring addresses {ring} are not the driver's IOVAs"
        assert WINDOW_LO <= ring["desc"] < WINDOW_HI and ring["desc"] != vq.desc
    assert_iotlb_is_the_domain(tb, "after DRIVER_OK")
    frames = [make_frame(i, size, stream=1) for i, size in enumerate(sizes)]
    try:
        tb.net.send_burst(frames, hdr_separate=True, timeout=timeout)
        got = tb.peer.recv_n(len(frames), timeout=timeout)
        for i, (want, have) in enumerate(zip(frames, got, strict=True)):
            assert have == want, f"TX frame {i} ({len(want)} bytes) corrupted on the wire"
        rx = [make_frame(i, size, stream=2) for i, size in enumerate(sizes)]
        for f in rx:
            tb.peer.send(f)
        for i, want in enumerate(rx):
            have = tb.net.recv(timeout=timeout, refill=False).data
            assert have == want, f"RX frame {i} ({len(want)} bytes) corrupted in guest memory"
    except (WaitTimeout, WirePeerTimeout) as e:
        raise stalled(tb, "traffic through the vIOMMU", e) from e
    tb.net.post_rx(0)
    assert_iotlb_is_the_domain(tb, "after traffic")
    # one MAP, one UNMAP: each reaches the device before the guest's request completes
    page = tb.alloc.alloc(PAGE_SIZE, tag="probe page")
    qt.memset(page, PAGE_SIZE, 0x33)
    mark = b.mark()
    iova = tb.dma.map_pages(page, PAGE_SIZE, MAP_F_READ)
    maps = [e for e in journal(tb, mark, ["dma.map"]) if covers(e, iova)]
    assert maps and maps[0]["perm"] in (PERM_RO, "RO"), (
        f"the guest's READ-only MAP of IOVA {iova:#x} reached the device as {maps} "
        f"({len(updates_since(tb, mark))} UPDATE_IOTLB)"
    )
    n_map = len(updates_since(tb, mark))
    assert_iotlb_is_the_domain(tb, f"after the MAP of {iova:#x}")
    mark = b.mark()
    tb.dma.unmap_pages(iova)
    assert [e for e in journal(tb, mark, ["dma.unmap"]) if covers(e, iova)], (
        f"the guest's UNMAP of IOVA {iova:#x} completed before the device dropped it"
    )
    n_unmap = len(updates_since(tb, mark))
    assert_iotlb_is_the_domain(tb, f"after the UNMAP of {iova:#x}")
    assert not [e for e in journal(tb, 0, ["error."])], "the backend reported errors"
    return {"update_iotlb_per_map": n_map, "update_iotlb_per_unmap": n_unmap}


def scenario_permissions_vdpa(tb: ViommuTestbed) -> None:
    """vhost-vdpa: a READ-only mapping reaches the device read-only: an RX buffer there is
    refused (error naming the IOVA, NEEDS_RESET), the page keeps its bytes, a device reset
    recovers. A WRITE-only TX buffer is readable by the device: QEMU maps it read-write (the
    vhost IOTLB has no write-only), so the frame goes out. An IOVA never mapped is refused.
    Needs a driver with no RX buffers posted."""
    assert tb.backend is not None and tb.machine is not None and tb.alloc is not None
    b, qt = tb.backend, tb.machine.qtest
    p = tb.alloc.alloc(PAGE_SIZE, tag="read-only RX page")
    qt.memset(p, PAGE_SIZE, 0x11)
    iova_r = tb.dma.map_pages(p, PAGE_SIZE, MAP_F_READ)
    assert device_pages(tb).get(iova_r) == PERM_RO, "the READ-only page is not RO on the device"
    mark = b.mark()
    rxq = tb.net.rxq[0]
    rxq.add((), [(iova_r, PAGE_SIZE)], "read-only", premapped=True)
    rxq.kick(force=True)
    tb.peer.send(make_frame(7, 200, stream=6))
    err = _wait_error_naming(tb, mark, iova_r, "the RX buffer in a READ-only mapping")
    assert err["kind"] in ("error.translate", "error.vq"), err
    assert "perm translation" in str(err["detail"]) and "mapping perm RO" in str(err["detail"]), err
    assert qt.read(p, PAGE_SIZE) == b"\x11" * PAGE_SIZE, "the device wrote a READ-only buffer"
    assert rxq.pending_used() == 0, "the device completed an RX chain it could not write"
    tb.reinit_net(post_rx=False)
    # WRITE-only TX buffer: RW on the device, the frame goes out
    t = tb.alloc.alloc(PAGE_SIZE, tag="write-only TX page")
    frame = make_frame(8, 300, stream=6)
    qt.write(t, bytes(NET_HDR_SIZE) + frame)
    iova_w = tb.dma.map_pages(t, PAGE_SIZE, MAP_F_WRITE)
    assert device_pages(tb).get(iova_w) == PERM_RW, "QEMU 10 maps WRITE-only read-write"
    tx_from(tb, iova_w, NET_HDR_SIZE + len(frame))
    try:
        assert tb.peer.recv(timeout=20) == frame, "the WRITE-only TX frame carried other bytes"
    except WirePeerTimeout as e:
        raise stalled(tb, "TX from a WRITE-only mapping", e) from e
    tb.net.txq[0].wait_used(1, 20)
    # never mapped: refused until a reset
    n = tb.dma.iova.alloc(PAGE_SIZE)
    mark = b.mark()
    sent = b.vring(tb.net.txq[0].index)["packets"]
    tx_from(tb, n, NET_HDR_SIZE + len(frame))
    err = _wait_error_naming(tb, mark, n, "a TX descriptor at an IOVA never mapped")
    assert (err["kind"], err.get("op")) == ("error.vduse", "iotlb_miss"), err
    assert b.vring(tb.net.txq[0].index)["packets"] == sent, "TX from an IOVA never mapped"
    assert b.running
    tb.reinit_net()
    ok = make_frame(9, 100, stream=6)
    tb.net.send(ok, timeout=20)
    assert tb.peer.recv(timeout=20) == ok, "TX after the reset carried other bytes"


def _wait_error_naming(tb: Testbed, since: int, iova: int, what: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        errs = [e for e in journal(tb, since, ["error."]) if f"{iova:#x}" in str(e.get("detail"))]
        return errs[0] if errs else None

    try:
        err = poll_until(find, 20.0, f"an error.* journal entry naming {iova:#x} for {what}")
    except WaitTimeout as e:
        raise AssertionError(f"{what} was not refused: {e}") from e
    assert err is not None
    return err


# ----------------------------------------------------------------------------- both
def _check_stale_change_user(tb: ViommuTestbed, mark: int, x: int) -> None:
    kinds = [
        e["kind"]
        for e in journal(tb, mark, ["iotlb.invalidate", "iotlb.miss", "dma.map"])
        if (missed_in(e, x, PAGE_SIZE) if e["kind"] == "iotlb.miss" else covers(e, x))
    ]
    assert kinds[:3] == ["iotlb.invalidate", "iotlb.miss", "dma.map"], (
        f"IOVA {x:#x} after the unmap: {kinds} (expected INVALIDATE, then MISS, then UPDATE)"
    )


def _check_stale_change_vdpa(tb: ViommuTestbed, mark: int, x: int) -> None:
    kinds = [e["kind"] for e in journal(tb, mark, ["dma.map", "dma.unmap"]) if covers(e, x)]
    assert kinds[:2] == ["dma.unmap", "dma.map"], (
        f"IOVA {x:#x} after the unmap: {kinds} (expected the UPDATE_IOTLB diffs to unmap it, "
        "then map it again)"
    )


def scenario_stale_mapping(tb: ViommuTestbed) -> None:
    """IOVA X -> page A, RX into X, UNMAP X (the device drops X before the UNMAP completes),
    remap X -> page B, RX into X again: the frame lands in B; A keeps what the guest wrote
    into it after the unmap. Needs a driver with no RX buffers posted."""
    assert tb.backend is not None and tb.machine is not None and tb.alloc is not None
    vdpa = tb.transport == VDPA
    qt = tb.machine.qtest
    a, b = tb.alloc.alloc(PAGE_SIZE, tag="page A"), tb.alloc.alloc(PAGE_SIZE, tag="page B")
    x = tb.dma.iova.alloc(PAGE_SIZE)
    qt.memset(a, PAGE_SIZE, 0xAA)
    qt.memset(b, PAGE_SIZE, 0xBB)
    tb.dma.map_pages(a, PAGE_SIZE, MAP_F_WRITE, iova=x)
    f1 = make_frame(1, 300, stream=4)
    n = rx_into(tb, x, f1, timeout=20)
    assert n == NET_HDR_SIZE + len(f1), f"first RX wrote {n} bytes"
    assert qt.read(a + NET_HDR_SIZE, len(f1)) == f1, "the first frame did not land in page A"
    mark = tb.backend.mark()
    tb.dma.unmap_pages(x)
    dropped = ["dma.unmap"] if vdpa else ["iotlb.invalidate"]
    # what the device had dropped when the UNMAP completed (checked after the data)
    dropped_in_time = any(covers(e, x) for e in journal(tb, mark, dropped))
    qt.memset(a, PAGE_SIZE, 0x5A)  # the guest reuses page A for something else
    tb.dma.map_pages(b, PAGE_SIZE, MAP_F_WRITE, iova=x)
    f2 = make_frame(2, 400, stream=4)
    n = rx_into(tb, x, f2, timeout=20)
    assert qt.read(a, PAGE_SIZE) == b"\x5a" * PAGE_SIZE, (
        f"the device wrote into page A through the stale translation of IOVA {x:#x}"
    )
    assert n == NET_HDR_SIZE + len(f2) and qt.read(b + NET_HDR_SIZE, len(f2)) == f2, (
        "the second frame did not land in page B"
    )
    assert dropped_in_time, (
        f"the UNMAP of IOVA {x:#x} completed before the device dropped it ({dropped[0]})"
    )
    check: Callable[[ViommuTestbed, int, int], None] = (
        _check_stale_change_vdpa if vdpa else _check_stale_change_user
    )
    check(tb, mark, x)
    tb.dma.unmap_pages(x)
