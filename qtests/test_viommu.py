"""Scenario 2: vIOMMU dynamic mapping, end to end (real QEMU 10 + the backend process).

The guest side is the qtest driver with a virtio-iommu-pci (``boot-bypass=off``) in front of
the virtio-net device (behind a pcie-root-port, ``iommu_platform=on,ats=on``; the driver does
not enable ATS, so vhost watches plain IOMMU unmaps).  Rings and buffers are reachable only
through IOVAs from a window far above RAM (0x8_0000_0000+), so a backend that treats IOVAs as
guest-physical addresses finds nothing there.  MSI-X writes go through the vIOMMU as well
(only 0xfee00000-0xfeefffff bypasses it): the driver identity-maps its MSI words write-only
(qtests/qos/virtio_iommu.py); the tests wait on used rings, and check the words fired.

What QEMU does (observed with 10.0, hw/virtio/vhost.c + virtio-iommu.c):

* vhost start: one UPDATE per used ring (``vhost_device_iotlb_miss(used, write)``); everything
  else arrives on the backend's MISS: QEMU translates (one 4 KiB granule), sends UPDATE on the
  main socket (NEED_REPLY) and only then acks the MISS with 0.  UPDATE perm is always RW
  (``address_space_get_iotlb_entry`` reports RW for RAM): the vIOMMU's permission check
  happens on the MISS only.
* MISS for an IOVA the domain does not map, or maps without the access asked: virtio-iommu
  logs "no mapping" / "permission error" once and queues a fault event; no UPDATE; the MISS
  is acked with 1.  The backend stays parked (alive); a device reset recovers.
* Guest UNMAP: QEMU sends INVALIDATE (NEED_REPLY) before the UNMAP request completes (strict).
* MISS while vhost is stopped, and ACCESS_FAIL, are acked with 1 ("Unexpected IOTLB message
  when virtio device is stopped" / "Access failure IOTLB message type not supported").

Each scenario is a plain function raising AssertionError; the meta-tests run the same function
against a backend with a fault and expect that failure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qtests.qos.frames import make_frame
from qtests.qos.iova import PAGE_SIZE
from qtests.qos.testbed import Testbed
from qtests.qos.transports import BOTH, VHOST_VDPA
from qtests.qos.viommu_scenarios import (
    WINDOW_HI,
    WINDOW_LO,
    consumed_mappings,
    covers,
    journal,
    missed_in,
    scenario_dynamic,
    scenario_iotlb_follows_guest_maps,
    scenario_permissions_vdpa,
    scenario_stale_mapping,
    stalled,
    tx_from,
)
from qtests.qos.viommu_testbed import IntelIommuTestbed, ViommuTestbed
from qtests.qos.virtio_iommu import (
    FAULT_R_MAPPING,
    MAP_F_READ,
    MAP_F_WRITE,
    FaultEvent,
    MapOp,
    UnmapOp,
)
from qtests.qos.virtio_net import NET_HDR_SIZE
from qtests.qos.waiting import WaitTimeout, poll_until
from qtests.qos.wire_peer import WirePeerTimeout

pytestmark = pytest.mark.qemu


# ----------------------------------------------------------------------------- helpers
def assert_no_backend_errors(entries: list[dict[str, Any]]) -> None:
    errors = [e for e in entries if str(e["kind"]).startswith("error.")]
    assert not errors, f"the backend reported {len(errors)} error(s), first: {errors[0]}"


class HostMap:
    """The backend's memory table: QEMU user address -> GPA."""

    def __init__(self, tb: Testbed) -> None:
        assert tb.backend is not None
        self.regions = [
            (int(r["uaddr"]), int(r["size"]), int(r["gpa"]))
            for r in tb.backend.cmd("query-mem-table")["regions"]
        ]

    def gpa(self, uaddr: int) -> int | None:
        for u, size, g in self.regions:
            if u <= uaddr < u + size:
                return g + (uaddr - u)
        return None


def assert_miss_then_update(
    entries: list[dict[str, Any]], mappings: list[tuple[int, int, int, int]], host: HostMap
) -> None:
    """Every buffer the device used was first MISSed, then UPDATEd (dma.map) - nothing maps
    it earlier in the window - and the UPDATE translates to the page the driver mapped."""
    assert mappings, "no data buffer was used through the vIOMMU"
    for iova, size, gpa, flags in mappings:
        miss = next(
            (e for e in entries if e["kind"] == "iotlb.miss" and missed_in(e, iova, size)), None
        )
        maps = [e for e in entries if e["kind"] == "dma.map" and covers(e, iova)]
        what = f"buffer IOVA {iova:#x}+{size:#x} (GPA {gpa:#x}, flags {flags})"
        assert miss is not None, f"the backend never sent a MISS for {what}"
        assert maps, f"the backend never got an UPDATE for {what}"
        assert maps[0]["seq"] > miss["seq"], (
            f"{what}: mapped at seq {maps[0]['seq']} before its MISS at seq {miss['seq']}"
        )
        m = maps[0]
        got = host.gpa(int(m["uaddr"]) + (iova - int(m["iova"])))
        assert got == gpa, f"{what}: the UPDATE points at GPA {got}, not {gpa:#x}"


def wait_entry(
    tb: Testbed,
    kind: str,
    since: int,
    match: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """The first journal entry of ``kind`` after ``since`` that ``match``es (polled)."""

    def find() -> dict[str, Any] | None:
        return next((e for e in journal(tb, since, [kind]) if match(e)), None)

    try:
        return poll_until(find, timeout, what)
    except WaitTimeout as e:
        raise AssertionError(str(e)) from e


def wait_refused(tb: Testbed, since: int, iova: int, timeout: float = 5.0) -> dict[str, Any]:
    """QEMU's non-zero ack of the backend's MISS for the page of ``iova``."""
    page = iova & ~(PAGE_SIZE - 1)
    ack = wait_entry(
        tb,
        "iotlb.miss_ack",
        since,
        lambda e: page <= int(e["iova"]) < page + PAGE_SIZE,
        f"QEMU's answer to the backend's MISS for IOVA {iova:#x}",
        timeout,
    )
    assert ack["status"] != 0, f"QEMU accepted the MISS for IOVA {iova:#x}: {ack}"
    return ack


def wait_fault(tb: ViommuTestbed, iova: int, access: str, timeout: float = 5.0) -> FaultEvent:
    """The virtio-iommu fault event (reason MAPPING) for the page of ``iova``.  ``access``:
    'write' / 'read' (a permission fault names the access), '' (no mapping at all: QEMU
    names no access)."""
    page = iova & ~(PAGE_SIZE - 1)

    def find() -> FaultEvent | None:
        tb.iommu.poll_faults()
        return next(
            (
                f
                for f in tb.iommu.faults
                if page <= f.address < page + PAGE_SIZE
                and f.reason == FAULT_R_MAPPING
                and (f.write, f.read) == (access == "write", access == "read")
            ),
            None,
        )

    try:
        return poll_until(find, timeout, f"a virtio-iommu fault event for IOVA {iova:#x}")
    except WaitTimeout as e:
        raise AssertionError(f"{e}; events so far: {[str(f) for f in tb.iommu.faults]}") from e


def assert_alive(tb: ViommuTestbed) -> None:
    """Backend and QEMU both still answer their monitors."""
    assert tb.backend is not None and tb.backend.running, "the backend process died"
    assert tb.backend.cmd("query-status") is not None
    assert tb.qmp.command("query-status")["status"] == "running"


# ----------------------------------------------------------------------------- scenarios
def scenario_byte_exact(tb: ViommuTestbed, sizes: list[int], timeout: float = 10.0) -> None:
    """TX and RX frames byte-exact through IOVAs only; the journal shows MISS -> UPDATE for
    every buffer used, each UPDATE pointing at the right guest page; no backend error."""
    assert tb.backend is not None
    host = HostMap(tb)
    tb.iommu.poll_faults()  # only faults from here on count
    mark, hmark = tb.backend.mark(), tb.dma.history_mark()
    before = tb.backend.cmd("query-iotlb")["mappings"]
    frames = [make_frame(i, size, stream=1) for i, size in enumerate(sizes)]
    try:
        tb.net.send_burst(frames, hdr_separate=True, timeout=timeout)
        got = tb.peer.recv_n(len(frames), timeout=timeout)
    except (WaitTimeout, WirePeerTimeout) as e:
        raise stalled(tb, "guest TX through the vIOMMU", e) from e
    for i, (want, have) in enumerate(zip(frames, got, strict=True)):
        assert have == want, f"TX frame {i} ({len(want)} bytes) corrupted on the wire"
    rx = [make_frame(i, size, stream=2) for i, size in enumerate(sizes)]
    for f in rx:
        tb.peer.send(f)
    try:
        received = [tb.net.recv(timeout=timeout, refill=False).data for _ in rx]
    except WaitTimeout as e:
        raise stalled(tb, "guest RX through the vIOMMU", e) from e
    for i, (want, have) in enumerate(zip(rx, received, strict=True)):
        assert have == want, f"RX frame {i} ({len(want)} bytes) corrupted in guest memory"
    tb.net.post_rx(0)
    entries = journal(tb, mark)
    assert_no_backend_errors(entries)
    used = consumed_mappings(tb, hmark)
    if not tb.strict:  # static: the pages the backend was given during this scenario
        updated = [e for e in entries if e["kind"] == "dma.map"]
        used = [m for m in used if any(covers(e, m[0]) for e in updated)]
    assert_miss_then_update(entries, used, host)
    cached = [(iova, m) for iova, *_ in used for m in before if covers(m, iova)]
    assert not cached, f"buffer IOVAs the backend could reach before the traffic: {cached[:3]}"
    faults = tb.iommu.poll_faults()
    assert not faults, f"the vIOMMU reported faults for mapped DMA: {[str(f) for f in faults]}"


def scenario_refused(tb: ViommuTestbed) -> None:
    """The vIOMMU's permissions and absence of mappings are enforced on the MISS: QEMU
    answers without an UPDATE and the device must neither write a READ-only buffer, nor read a
    WRITE-only one, nor reach an IOVA that was never mapped - and must survive all three:
    parked but alive, a device reset recovers, and after the guest maps the missing IOVA a
    new kick gets the frame out.  Needs a driver with no RX buffers posted."""
    assert tb.backend is not None and tb.machine is not None and tb.alloc is not None
    qt = tb.machine.qtest
    # RX buffer the vIOMMU maps READ-only
    p = tb.alloc.alloc(PAGE_SIZE, tag="read-only RX page")
    qt.memset(p, PAGE_SIZE, 0x11)
    iova_r = tb.dma.map_pages(p, PAGE_SIZE, MAP_F_READ)
    mark = tb.backend.mark()
    rxq = tb.net.rxq[0]
    rxq.add((), [(iova_r, PAGE_SIZE)], "read-only", premapped=True)
    rxq.kick(force=True)
    tb.peer.send(make_frame(7, 200, stream=6))
    wait_refused(tb, mark, iova_r)
    wait_fault(tb, iova_r, "write")
    assert not [e for e in journal(tb, mark, ["dma.map"]) if covers(e, iova_r)], (
        f"the backend got an UPDATE for the READ-only RX buffer {iova_r:#x}"
    )
    assert qt.read(p, PAGE_SIZE) == b"\x11" * PAGE_SIZE, "the device wrote a READ-only buffer"
    assert rxq.pending_used() == 0, "the device completed an RX chain it could not write"
    # TX buffer the vIOMMU maps WRITE-only
    t = tb.alloc.alloc(PAGE_SIZE, tag="write-only TX page")
    frame = make_frame(8, 300, stream=6)
    qt.write(t, bytes(NET_HDR_SIZE) + frame)
    iova_w = tb.dma.map_pages(t, PAGE_SIZE, MAP_F_WRITE)
    tx_from(tb, iova_w, NET_HDR_SIZE + len(frame))
    wait_refused(tb, mark, iova_w)
    wait_fault(tb, iova_w, "read")
    # not transmitted: the first frame on the wire after it is the post-reset one below
    assert not [e for e in journal(tb, mark, ["dma.map"]) if covers(e, iova_w)], (
        f"the backend got an UPDATE for the WRITE-only TX buffer {iova_w:#x}"
    )
    assert_alive(tb)
    assert_no_backend_errors(journal(tb, mark))
    # a device reset recovers both queues
    tb.reinit_net(post_rx=False)
    tb.net.post_rx(0)
    ok = make_frame(9, 100, stream=6)
    try:
        tb.net.send(ok)
        assert tb.peer.recv() == ok, (
            "the first frame on the wire after the refused TX is not the post-reset frame: "
            "the device transmitted from a WRITE-only buffer, or TX after the reset is corrupt"
        )
        tb.peer.send(ok)
        assert tb.net.recv().data == ok, "RX after the reset carried other bytes"
    except (WaitTimeout, WirePeerTimeout) as e:
        raise stalled(tb, "traffic after the device reset", e) from e
    # an IOVA never mapped: refused; the guest maps it, kicks again, and the frame goes out
    n = tb.dma.iova.alloc(PAGE_SIZE)
    frame = make_frame(10, 500, stream=6)
    qt.write(t, bytes(NET_HDR_SIZE) + frame)
    mark = tb.backend.mark()
    tx_from(tb, n, NET_HDR_SIZE + len(frame))
    wait_refused(tb, mark, n)
    wait_fault(tb, n, "")
    assert_alive(tb)
    tb.dma.map_pages(t, PAGE_SIZE, MAP_F_READ, iova=n)
    tb.net.txq[0].kick(force=True)
    try:
        assert tb.peer.recv() == frame, "the frame sent after the late map carried other bytes"
        tb.net.txq[0].wait_used(1)
        sentinel = make_frame(11, 64, stream=6)
        tb.net.send(sentinel)
        late = tb.peer.recv_until(sentinel)
        assert not late, f"{len(late)} more frames after the late map (the refused one twice?)"
    except (WaitTimeout, WirePeerTimeout) as e:
        raise stalled(tb, "TX after the guest mapped the refused IOVA and kicked again", e) from e
    assert_no_backend_errors(journal(tb, mark))


def scenario_invalidate_during_miss(tb: ViommuTestbed, scratch: int = 8) -> None:
    """INVALIDATEs that reach the backend while its MISS is outstanding neither deadlock nor
    lose the MISS.

    Forcing it: TX parks on a refused MISS for IOVA X (not mapped yet).  Then ONE kick of the
    virtio-iommu queue carries MAP X, UNMAP S1 .. UNMAP Sn; QEMU handles them all before it
    returns to its main loop.  INVALIDATE S1 makes the backend retry TX and send MISS(X);
    QEMU cannot read that MISS before it has sent INVALIDATE S2..Sn and had them answered -
    so they arrive while the MISS is outstanding.  Then the MISS is served, the frame goes
    out."""
    assert tb.backend is not None and tb.machine is not None and tb.alloc is not None
    qt = tb.machine.qtest
    pages = [tb.alloc.alloc(PAGE_SIZE, tag=f"scratch {i}") for i in range(scratch)]
    scratch_iovas = [tb.dma.map_pages(pg, PAGE_SIZE, MAP_F_READ) for pg in pages]
    t = tb.alloc.alloc(PAGE_SIZE, tag="TX page")
    frame = make_frame(11, 700, stream=7)
    qt.write(t, bytes(NET_HDR_SIZE) + frame)
    x = tb.dma.iova.alloc(PAGE_SIZE)
    mark = tb.backend.mark()
    tx_from(tb, x, NET_HDR_SIZE + len(frame))
    wait_refused(tb, mark, x)
    mark = tb.backend.mark()
    tb.dma.apply([MapOp(t, PAGE_SIZE, MAP_F_READ, iova=x)] + [UnmapOp(i) for i in scratch_iovas])
    try:
        assert tb.peer.recv() == frame, "the frame carried other bytes"
        tb.net.txq[0].wait_used(1)
    except (WaitTimeout, WirePeerTimeout) as e:
        raise stalled(tb, "TX whose MISS was outstanding during INVALIDATEs", e) from e
    entries = journal(tb, mark, ["iotlb.miss_sent", "iotlb.miss_ack", "iotlb.invalidate"])
    sent = next(
        (e for e in entries if e["kind"] == "iotlb.miss_sent" and missed_in(e, x, PAGE_SIZE)),
        None,
    )
    assert sent is not None, f"no MISS for IOVA {x:#x} after it was mapped"
    ack = next(
        (
            e
            for e in entries
            if e["kind"] == "iotlb.miss_ack"
            and e["seq"] > sent["seq"]
            and e["iova"] == sent["iova"]
        ),
        None,
    )
    assert ack is not None and ack["status"] == 0, f"the MISS for {x:#x} was not served: {ack}"
    during = [
        e
        for e in entries
        if e["kind"] == "iotlb.invalidate" and sent["seq"] < e["seq"] < ack["seq"]
    ]
    assert during, "no INVALIDATE arrived while the MISS was outstanding (forcing failed)"
    invalidated = {int(e["iova"]) for e in entries if e["kind"] == "iotlb.invalidate"}
    assert invalidated >= set(scratch_iovas), "an UNMAP was not invalidated in the backend"
    assert_no_backend_errors(journal(tb, mark))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("strict", "init_kw"),
    [
        (True, {}),
        (False, {"mrg_rxbuf": False, "rx_hdr_separate": True, "indirect": True}),
    ],
    ids=["strict-mrg", "static-nomrg-indirect"],
)
def test_traffic_only_through_iovas(
    make_vbed: Callable[..., ViommuTestbed], strict: bool, init_kw: dict[str, Any]
) -> None:
    tb = make_vbed(strict=strict).start(**init_kw)
    assert tb.backend is not None
    cfg = tb.iommu.config
    assert cfg is not None and cfg.granule == PAGE_SIZE and cfg.input_end >= WINDOW_HI - 1
    assert tb.endpoint == 0x100, f"endpoint {tb.endpoint:#x}: the NIC is 01:00.0 behind rp0"
    msi = [(r.start, r.end) for r in tb.resv if r.is_msi]
    assert msi == [(0xFEE00000, 0xFEEFFFFF)], f"PROBE reserved regions: {tb.resv}"
    # the rings the backend was given are IOVAs from the window, not GPAs
    for vq in (tb.net.rxq[0], tb.net.txq[0]):
        ring = tb.backend.vring(vq.index)
        assert (ring["desc"], ring["avail"], ring["used"]) == (
            vq.desc_dma,
            vq.avail_dma,
            vq.used_dma,
        )
        assert WINDOW_LO <= ring["desc"] < WINDOW_HI and ring["desc"] != vq.desc
    scenario_byte_exact(tb, [60, 61, 128, 512, 1000, 1514] * 4)
    # MSI-X writes are DMA through the vIOMMU too: the identity-mapped words received them
    for vq in (tb.net.rxq[0], tb.net.txq[0]):
        assert vq.interrupt is not None and vq.interrupt.fired(), f"no MSI-X for {vq.name}"


def test_dynamic_map_unmap_thousands(make_vbed: Callable[..., ViommuTestbed]) -> None:
    tb = make_vbed(strict=True).start()
    scenario_dynamic(tb, 2000)


@pytest.mark.parametrize("transport", BOTH, indirect=True)
def test_stale_mapping_never_reaches_the_old_page(make_vbed: Callable[..., ViommuTestbed]) -> None:
    tb = make_vbed().start(post_rx=False)
    scenario_stale_mapping(tb)


# ----------------------------------------------------------------------------- vhost-vdpa
@pytest.mark.vdpa_lane
@pytest.mark.parametrize("transport", [VHOST_VDPA], indirect=True)
def test_vdpa_iotlb_follows_guest_maps(make_vbed: Callable[..., ViommuTestbed]) -> None:
    """Over vhost-vdpa the guest's MAP / UNMAP requests are pushed to the device (QEMU's
    IOMMU notifier -> UPDATE_IOTLB): no MISS; the device's IOTLB is the domain."""
    tb = make_vbed(strict=False).start()
    stats = scenario_iotlb_follows_guest_maps(tb, [60, 61, 512, 1514] * 2)
    print("vIOMMU over vhost-vdpa:", stats)
    assert stats["update_iotlb_per_map"] >= 1 and stats["update_iotlb_per_unmap"] >= 1


@pytest.mark.vdpa_lane
@pytest.mark.parametrize("transport", [VHOST_VDPA], indirect=True)
def test_vdpa_permissions(make_vbed: Callable[..., ViommuTestbed]) -> None:
    tb = make_vbed(strict=False).start(post_rx=False)
    scenario_permissions_vdpa(tb)


@pytest.mark.vdpa_lane
@pytest.mark.parametrize(
    "caching_mode", [False, True], ids=["vhost-vdpa-no-caching-mode", "vhost-vdpa-caching-mode"]
)
def test_vdpa_intel_iommu_accepted(
    log_dir: Path, request: pytest.FixtureRequest, caching_mode: bool
) -> None:
    """intel-iommu in front of a vhost-vdpa NIC: QEMU 10 accepts it with and without
    caching-mode. The qtest guest does not enable DMA remapping, so the NIC's address space
    has no IOMMU region, vhost-vdpa registers no IOMMU notifier (the one place intel-iommu
    would demand caching-mode=on) and the device works on guest-physical addresses."""
    tb = IntelIommuTestbed(log_dir, transport="vhost-vdpa", caching_mode=caching_mode)
    request.addfinalizer(tb.close)
    tb.start()
    assert tb.backend is not None
    maps = tb.backend.cmd("query-iotlb")["mappings"]
    assert any(m["iova"] == 0 for m in maps), f"guest RAM at IOVA 0 (GPA) expected: {maps}"
    frame = make_frame(1, 300, stream=9)
    tb.net.send(frame, timeout=20)
    assert tb.peer.recv(timeout=20) == frame


# ----------------------------------------------------------------------------- meta-tests
def test_meta_stale_iotlb_is_caught(make_vbed: Callable[..., ViommuTestbed]) -> None:
    tb = make_vbed(faults=["stale-iotlb"]).start(post_rx=False)
    with pytest.raises(AssertionError, match="stale translation"):
        scenario_stale_mapping(tb)
    tb2 = make_vbed(name="dyn", faults=["stale-iotlb"]).start()
    with pytest.raises(AssertionError, match="stale translation"):
        scenario_dynamic(tb2, 20)


@pytest.mark.vdpa_lane
@pytest.mark.parametrize("transport", [VHOST_VDPA], indirect=True)
def test_meta_stale_iotlb_is_caught_over_vhost_vdpa(
    make_vbed: Callable[..., ViommuTestbed],
) -> None:
    """The VDUSE device keeps the entries it cached across UPDATE_IOTLB: X still reaches A."""
    tb = make_vbed(faults=["stale-iotlb"]).start(post_rx=False)
    with pytest.raises(AssertionError, match="into page A through the stale translation"):
        scenario_stale_mapping(tb)


def test_meta_translate_by_gpa_is_caught(make_vbed: Callable[..., ViommuTestbed]) -> None:
    tb = make_vbed(faults=["translate-by-gpa"]).start()
    # IOVAs read as GPAs point past the end of RAM: the device fails, nothing moves
    with pytest.raises(AssertionError, match="stalled: .*unmapped translation at 0x8"):
        scenario_byte_exact(tb, [60, 1514], timeout=2.0)


@pytest.mark.vdpa_lane
@pytest.mark.parametrize("transport", [VHOST_VDPA], indirect=True)
def test_meta_translate_by_gpa_is_caught_over_vhost_vdpa(
    make_vbed: Callable[..., ViommuTestbed],
) -> None:
    """The VDUSE device reads IOVAs as guest-physical addresses (offsets in the guest's RAM
    file): the window far above RAM reaches nothing, traffic stalls on an error there."""
    tb = make_vbed(strict=False, faults=["translate-by-gpa"]).start()
    with pytest.raises(AssertionError, match=r"stalled: .*unmapped translation at 0x8"):
        scenario_iotlb_follows_guest_maps(tb, [60, 1514], timeout=5.0)


def test_meta_no_miss_is_caught(make_vbed: Callable[..., ViommuTestbed]) -> None:
    tb = make_vbed(faults=["no-miss"]).start()
    with pytest.raises(AssertionError, match="stalled: timed out .*backend: 0 MISS sent"):
        scenario_byte_exact(tb, [60, 1514], timeout=2.0)


def test_meta_ignore_iotlb_perm_is_caught(make_vbed: Callable[..., ViommuTestbed]) -> None:
    tb = make_vbed(faults=["ignore-iotlb-perm"]).start(post_rx=False)
    # the device asks for read access to the READ-only RX page: the vIOMMU grants it
    with pytest.raises(AssertionError, match=r"QEMU accepted the MISS for IOVA 0x8") as ei:
        scenario_refused(tb)
    # and the device then wrote the frame into the page the guest mapped READ-only
    (used,) = tb.net.rxq[0].wait_used(1, 5.0)
    assert used.token == "read-only" and used.length > NET_HDR_SIZE, (used, ei.value)


def test_meta_stale_translation_cache_is_caught(make_vbed: Callable[..., ViommuTestbed]) -> None:
    """A translation the device remembers across the INVALIDATE writes the remapped IOVA's
    frame into the page the guest unmapped."""
    tb = make_vbed(faults=["stale-translation-cache"]).start(post_rx=False)
    with pytest.raises(AssertionError, match="stale translation"):
        scenario_stale_mapping(tb)
