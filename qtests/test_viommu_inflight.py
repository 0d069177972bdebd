"""vIOMMU changes that meet chains the device holds and a running queue (issue 15, item 2).

Scenarios: `qtests.qos.inflight_viommu` (they take a started vIOMMU testbed); this module
starts the testbeds and runs the meta-tests against a backend with a fault. The
``vhost-vdpa`` cases run the same scenarios over VDUSE in the vdpa lane (``-m vdpa_lane``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from qtests.qos.inflight_viommu import (
    held_tx_then_invalidate,
    invalidate_races_miss_in_traffic,
    unmap_ring_while_running,
)
from qtests.qos.packed_virtqueue import PackedVirtqueue
from qtests.qos.transports import VHOST_VDPA
from qtests.qos.viommu_testbed import ViommuTestbed

pytestmark = pytest.mark.qemu


def started(
    make_vbed: Callable[..., ViommuTestbed],
    *,
    packed: bool = False,
    post_rx: bool = True,
    **kw: Any,
) -> ViommuTestbed:
    tb = make_vbed(net_props={"packed": True} if packed else None, **kw)
    tb.start(post_rx=post_rx, **({"packed": True} if packed else {}))
    assert isinstance(tb.net.txq[0], PackedVirtqueue) == packed
    return tb


LAYOUTS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@LAYOUTS
def test_invalidate_of_a_held_chain(make_vbed: Callable[..., ViommuTestbed], packed: bool) -> None:
    held_tx_then_invalidate(started(make_vbed, packed=packed))


@LAYOUTS
def test_ring_unmapped_while_the_queue_runs(
    make_vbed: Callable[..., ViommuTestbed], packed: bool
) -> None:
    unmap_ring_while_running(started(make_vbed, packed=packed))


def test_meta_stale_translation_cache_is_caught(make_vbed: Callable[..., ViommuTestbed]) -> None:
    tb = started(make_vbed, faults=["stale-translation-cache"])
    with pytest.raises(AssertionError, match="page A's bytes: a stale translation"):
        held_tx_then_invalidate(tb)
    tb2 = started(make_vbed, name="ring", faults=["stale-translation-cache"])
    with pytest.raises(AssertionError, match="never asked for IOVA .* after its INVALIDATE"):
        unmap_ring_while_running(tb2)


@LAYOUTS
def test_invalidate_racing_a_miss_during_traffic(
    make_vbed: Callable[..., ViommuTestbed], packed: bool
) -> None:
    during = invalidate_races_miss_in_traffic(started(make_vbed, strict=True, packed=packed))
    print(f"INVALIDATEs while a MISS was outstanding: {during}")


def test_meta_race_in_traffic_catches_stale_translations(
    make_vbed: Callable[..., ViommuTestbed],
) -> None:
    """IOVAs come back for other buffers after their UNMAP: a remembered translation sends
    the old page's bytes."""
    tb = started(make_vbed, strict=True, faults=["stale-translation-cache"])
    with pytest.raises(
        AssertionError, match="racing MISSes: frame \\d+ of \\d+ carried other bytes|TX stalled"
    ):
        invalidate_races_miss_in_traffic(tb)


# ---------------------------------------------------------------------------- vhost-vdpa
#: The lane's cases: the transport fixture set to vhost-vdpa (carries the vdpa_lane marker).
ON_VDPA = pytest.mark.parametrize("transport", [VHOST_VDPA], indirect=True)
#: How stale-translation-cache shows over vhost-vdpa: the remembered translation leads into
#: the mmap of the entry the UPDATE_IOTLB removed, which the device closed, so the access fails
#: there instead of reaching the new page (the device never reads the old page's new bytes:
#: VDUSE gives one mmap per IOTLB entry, unlike vhost-user's one per memory region).
VDPA_STALE_HELD = (
    r"the new chain at 0x[0-9a-f]+ after the remap: the backend failed instead: .*region closed"
)
#: The ring's IOVA (and, in the race, an IOVA that came back for another page) is reached
#: without the device looking for an entry: a closed mmap, or a frame sent without one.
VDPA_STALE_RING = (
    r"the device never looked for IOVA 0x[0-9a-f]+ after its unmap \(it used a remembered"
)
#: In the race a stream buffer's IOVA comes back for another page: the remembered window
#: leads into the closed mmap (or the waiting chain goes out without its entry).
VDPA_STALE_RACE = rf"round \d+: the backend failed: .*region closed|{VDPA_STALE_RING}"


@ON_VDPA
@LAYOUTS
def test_held_chain_and_ring_unmap_over_vhost_vdpa(
    make_vbed: Callable[..., ViommuTestbed], packed: bool
) -> None:
    """Over vhost-vdpa the guest's UNMAP is pushed to the device as UPDATE_IOTLB (no
    INVALIDATE / MISS messages): a held chain completes with the bytes it read before, the
    next use of its IOVA goes through the new entry; then, on the same testbed, the TX ring's
    IOVA is unmapped while the queue runs and mapped again. (The vhost-user suite's third
    case, an INVALIDATE racing an outstanding MISS, has no counterpart: over vhost-vdpa the
    device never asks - qtests/qos/inflight_viommu.py.)

    No RX buffers are posted (neither scenario receives): over vhost-vdpa every guest MAP is
    an UPDATE_IOTLB of the whole table, which the device fetches entry by entry (a ring's
    worth of RX buffer pages costs seconds under nested TCG)."""
    tb = started(make_vbed, packed=packed, post_rx=False)
    held_tx_then_invalidate(tb)
    unmap_ring_while_running(tb)


@ON_VDPA
def test_meta_held_chain_scenario_catches_stale_translation_cache_over_vhost_vdpa(
    make_vbed: Callable[..., ViommuTestbed],
) -> None:
    """The translation the device remembered survives the UPDATE_IOTLB that dropped it."""
    tb = started(make_vbed, post_rx=False, faults=["stale-translation-cache"])
    with pytest.raises(AssertionError, match=VDPA_STALE_HELD) as caught:
        held_tx_then_invalidate(tb)
    print(f"held chain: {caught.value}")


@ON_VDPA
def test_meta_ring_unmap_scenario_catches_stale_translation_cache_over_vhost_vdpa(
    make_vbed: Callable[..., ViommuTestbed],
) -> None:
    tb = started(make_vbed, post_rx=False, faults=["stale-translation-cache"])
    with pytest.raises(AssertionError, match=VDPA_STALE_RING) as caught:
        unmap_ring_while_running(tb)
    print(f"ring: {caught.value}")


@ON_VDPA
def test_unmaps_racing_a_waiting_chain_over_vhost_vdpa(
    make_vbed: Callable[..., ViommuTestbed],
) -> None:
    """What corresponds over vhost-vdpa to an INVALIDATE racing an outstanding MISS: UNMAPs
    (UPDATE_IOTLBs) of other pages while a chain waits for its IOVA to be mapped."""
    tb = started(make_vbed, strict=True, post_rx=False)
    during = invalidate_races_miss_in_traffic(tb, rounds=3, scratch=3)
    print(f"UPDATE_IOTLBs while a chain waited for its entry: {during}")


@ON_VDPA
def test_meta_race_in_traffic_catches_stale_translations_over_vhost_vdpa(
    make_vbed: Callable[..., ViommuTestbed],
) -> None:
    """IOVAs come back for other buffers after their UNMAP: a remembered translation leads
    into the closed mmap of the old entry."""
    tb = started(make_vbed, strict=True, post_rx=False, faults=["stale-translation-cache"])
    with pytest.raises(AssertionError, match=VDPA_STALE_RACE) as caught:
        invalidate_races_miss_in_traffic(tb, rounds=3, scratch=3)
    print(f"race: {caught.value}")
