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
    make_vbed: Callable[..., ViommuTestbed], *, packed: bool = False, **kw: Any
) -> ViommuTestbed:
    tb = make_vbed(net_props={"packed": True} if packed else None, **kw)
    tb.start(**({"packed": True} if packed else {}))
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
#: How stale-translation-cache shows over vhost-vdpa (filled in from the lane's runs).
VDPA_STALE_HELD = "XXX"
VDPA_STALE_RING = "XXX"


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
    device never asks - qtests/qos/inflight_viommu.py.)"""
    tb = started(make_vbed, packed=packed)
    held_tx_then_invalidate(tb)
    unmap_ring_while_running(tb)


@ON_VDPA
def test_meta_stale_translation_cache_is_caught_over_vhost_vdpa(
    make_vbed: Callable[..., ViommuTestbed],
) -> None:
    """The translation the device remembered survives the UPDATE_IOTLB that dropped it."""
    tb = started(make_vbed, faults=["stale-translation-cache"])
    with pytest.raises(AssertionError, match=VDPA_STALE_HELD) as caught:
        held_tx_then_invalidate(tb)
    print(f"held chain: {caught.value}")
    tb2 = started(make_vbed, name="ring", faults=["stale-translation-cache"])
    with pytest.raises(AssertionError, match=VDPA_STALE_RING) as caught:
        unmap_ring_while_running(tb2)
    print(f"ring: {caught.value}")
