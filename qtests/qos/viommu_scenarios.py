"""vIOMMU scenario code shared by the qtest suite (``qtests/test_viommu.py``) and ``make bench``
(the IOTLB MISS round trip is timed on the suite's own traffic pattern).

Each scenario is a plain function on a started `ViommuTestbed` raising AssertionError.
"""

from __future__ import annotations

from typing import Any

from qtests.qos.frames import make_frame
from qtests.qos.testbed import Testbed
from qtests.qos.viommu_testbed import ViommuTestbed
from qtests.qos.virtio_iommu import DEFAULT_IOVA_WINDOW, MAP_F_READ, MAP_F_WRITE
from qtests.qos.waiting import WaitTimeout
from qtests.qos.wire_peer import WirePeerTimeout

WINDOW_LO, WINDOW_HI = DEFAULT_IOVA_WINDOW
IOTLB_KINDS = ["iotlb.", "dma.map", "dma.unmap", "error."]


def journal(tb: Testbed, since: int, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    assert tb.backend is not None
    return tb.backend.journal(kinds=kinds or IOTLB_KINDS, since=since)


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
