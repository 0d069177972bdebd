"""Memory changes that meet chains the device holds and a running stream (issue 15, item 1).

The scenarios live in `qtests.qos.inflight_memory` (transport-independent: they take a started
testbed); this module starts testbeds for them and runs the meta-tests: the same scenario
against a backend with a fault, expecting the failure that fault must cause.

The ``vhost-vdpa`` cases run the same scenarios over VDUSE in the vdpa lane (``-m vdpa_lane``;
the lab L1 where the host has no vduse): there a DIMM change is an IOTLB batch that the
kernel hands the device as UPDATE_IOTLB of the whole range, applied as a set_map diff.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from qtests.qos.inflight_memory import plug_mid_stream, rem_with_held_chains, unplug_live_rings
from qtests.qos.testbed import Testbed
from qtests.qos.transports import VHOST_VDPA

pytestmark = pytest.mark.qemu


#: Ring layouts and queue pairs the scenarios run on: (testbed kwargs, driver init kwargs).
LAYOUTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "split": ({}, {}),
    "packed": ({"net_props": {"packed": True}}, {"packed": True}),
    "split-2qp": ({"queues": 2}, {}),
    "whole-table": ({"backend_args": ["--no-mem-slots"]}, {}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rem_mem_reg_with_held_chains(make_testbed: Callable[..., Testbed], layout: str) -> None:
    tb_kw, init_kw = LAYOUTS[layout]
    rem_with_held_chains(make_testbed(**tb_kw).start(post_rx=False, **init_kw))


@pytest.mark.parametrize("mem_slots", [True, False], ids=["add-mem-reg", "set-mem-table"])
def test_plug_in_the_middle_of_a_stream(
    make_testbed: Callable[..., Testbed], mem_slots: bool
) -> None:
    args = [] if mem_slots else ["--no-mem-slots"]
    plug_mid_stream(make_testbed(backend_args=args).start())


@pytest.mark.parametrize("layout", ["packed", "split-2qp"])
def test_plug_in_the_middle_of_a_stream_layouts(
    make_testbed: Callable[..., Testbed], layout: str
) -> None:
    tb_kw, init_kw = LAYOUTS[layout]
    tb = make_testbed(**tb_kw).start(**init_kw)
    assert tb.net.active_pairs == tb_kw.get("queues", 1)
    plug_mid_stream(tb)


def test_meta_plug_mid_stream_catches_full_replace(make_testbed: Callable[..., Testbed]) -> None:
    """A whole-table update that maps every region again moves kept memory mid-stream."""
    tb = make_testbed(faults=["mem-table-full-replace"], backend_args=["--no-mem-slots"]).start()
    with pytest.raises(AssertionError, match="after the plug mid-stream: kept memory moved"):
        plug_mid_stream(tb)


@pytest.mark.parametrize(
    ("fault", "symptom"),
    [
        # the removed DIMM stays mapped in the backend
        ("ignore-rem-mem-reg", r"after REM_MEM_REG with chains held: the removed region is "
                               r"still mapped"),
        # (without mem slots) every SET_MEM_TABLE maps every region again: new host addresses
        ("mem-table-full-replace", r"after the plug: kept memory moved"),
        # a translation into the first DIMM answers for the second: its mmap is gone
        ("stale-translation-cache", r"TX from the re-plugged DIMM"),
    ],
)  # fmt: skip
def test_meta_held_chains_scenario_catches(
    make_testbed: Callable[..., Testbed], fault: str, symptom: str
) -> None:
    args = ["--no-mem-slots"] if fault == "mem-table-full-replace" else []
    tb = make_testbed(faults=[fault], backend_args=args).start(post_rx=False)
    with pytest.raises(AssertionError, match=symptom) as caught:
        rem_with_held_chains(tb)
    print(f"{fault}: {caught.value}")


def test_unplug_of_the_dimm_holding_live_rings(make_testbed: Callable[..., Testbed]) -> None:
    unplug_live_rings(make_testbed().start())


def test_meta_unplug_live_rings_catches_ignored_rem(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(faults=["ignore-rem-mem-reg"]).start()
    with pytest.raises(AssertionError, match="the removed region is still mapped"):
        unplug_live_rings(tb)


# ---------------------------------------------------------------------------- vhost-vdpa
#: The lane's cases: the transport fixture set to vhost-vdpa (carries the vdpa_lane marker).
ON_VDPA = pytest.mark.parametrize("transport", [VHOST_VDPA], indirect=True)


#: Ring layouts over vhost-vdpa. No second queue pair: VDUSE refuses VIRTIO_NET_F_CTRL_VQ
#: (drivers/vdpa/vdpa_user/vduse_dev.c features_is_valid) and a driver turns pairs on only via the
#: control queue (virtio 1.2, 5.1.6.5.5), so pair 1 of a two-pair device is never set up
#: (qtests/test_vdpa_lane.py test_two_queue_pairs).
VDPA_LAYOUTS = ["split", "packed"]


@ON_VDPA
@pytest.mark.parametrize("layout", VDPA_LAYOUTS)
def test_unplug_with_held_chains_over_vhost_vdpa(
    make_testbed: Callable[..., Testbed], layout: str
) -> None:
    """The DIMM's UPDATE_IOTLB (its set_map diff unmaps exactly the DIMM) while the device
    holds chains popped from it: held chains complete byte-exact, kept mmaps stay put, the
    re-plugged DIMM is reached through a fresh entry."""
    tb_kw, init_kw = LAYOUTS[layout]
    rem_with_held_chains(make_testbed(**tb_kw).start(post_rx=False, **init_kw))


@ON_VDPA
def test_plug_in_the_middle_of_a_stream_over_vhost_vdpa(
    make_testbed: Callable[..., Testbed],
) -> None:
    """TX and RX stream while the DIMM's UPDATE_IOTLB lands (one pair: VDPA_LAYOUTS)."""
    plug_mid_stream(make_testbed().start())


@ON_VDPA
def test_unplug_of_the_dimm_holding_live_rings_over_vhost_vdpa(
    make_testbed: Callable[..., Testbed],
) -> None:
    unplug_live_rings(make_testbed().start())


#: How each fault shows over vhost-vdpa in the held-chains scenario.
VDPA_SYMPTOMS = {
    # the remembered translation into the first DIMM survives its UPDATE_IOTLB
    "stale-translation-cache": r"TX from the re-plugged DIMM: the backend failed: .*region closed",
    # every set_map re-maps every entry: the plug's diff is the whole table, not the DIMM
    "remap-all": r"the plug: the set_map diffs mapped \[.*0x0\+0x.* and unmapped \[0x0\+",
    # UPDATE_IOTLB answered without fetching: the DIMM never reaches the device
    "keep-stale-map": r"the plug should add one",
}


@ON_VDPA
@pytest.mark.parametrize("fault", list(VDPA_SYMPTOMS))
def test_meta_held_chains_scenario_catches_over_vhost_vdpa(
    make_testbed: Callable[..., Testbed], fault: str
) -> None:
    tb = make_testbed(faults=[fault]).start(post_rx=False)
    with pytest.raises(AssertionError, match=VDPA_SYMPTOMS[fault]) as caught:
        rem_with_held_chains(tb)
    print(f"{fault}: {caught.value}")
