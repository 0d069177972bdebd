"""Scenario 3 over vhost-vdpa (the lane), with work in flight: RX buffers and TX chains the
source device holds at the switchover of an x-svq=on migration, two L2 QEMUs each with its
own VDUSE device. What QEMU does with them and what is asserted: qtests/qos/svq_inflight.py.
The migration without held chains is test_vdpa_migration.py; the vhost-user suites are
test_migration.py and the in-flight scenarios of qtests/qos/inflight_migration.py.

Hotplug meets migration (issue 15, item 3), the scenarios of qtests/qos/inflight_migration.py
that also run over vhost-user (test_migration.py): a DIMM unplug pending when the migration
starts, and device_add while it runs. Over vhost-vdpa a DIMM change reaches the device as a
VDUSE UPDATE_IOTLB whose set_map diff must be exactly the DIMM, at the IOVA QEMU's shadow
virtqueues allocated for it (not its GPA: `qtests.qos.inflight_memory.dimm_key`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from qtests.qos.inflight_migration import (
    device_add_during_migration,
    idle_dimm_hooks,
    migrate_with_unplug_pending,
)
from qtests.qos.migration import MigrationPair
from qtests.qos.svq_inflight import migrate_with_chains_held
from qtests.qos.svq_migration import start_svq_pair
from qtests.qos.testbed import Testbed

pytestmark = [pytest.mark.qemu, pytest.mark.vdpa_lane]


def test_vdpa_svq_chains_held_at_the_switchover(
    make_testbed: Callable[..., Testbed], log_dir: Path
) -> None:
    numbers = migrate_with_chains_held(start_svq_pair(make_testbed))
    print("held at the switchover (x-svq=on):", numbers)
    (log_dir / "svq-held.json").write_text(json.dumps(numbers, indent=1) + "\n")


def test_meta_complete_held_rx_on_reset_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    pair = start_svq_pair(make_testbed, faults=("complete-held-rx-on-reset",))
    with pytest.raises(AssertionError, match=r"RX frame (\d+ after the switchover|count)") as e:
        migrate_with_chains_held(pair)
    print("caught:", e.value)


# ---------------------------------------------------------------------------- hotplug x migration
#: Small guests: the migration's time in the lab is mostly QEMU scanning guest RAM under TCG.
MEMORY = "128M"
DIMM_SIZE = 32 << 20


def idle_dimm_svq_pair(
    make_testbed: Callable[..., Testbed], dst_faults: tuple[str, ...] = ()
) -> MigrationPair:
    """An x-svq=on pair with an idle DIMM plugged on the source, cold-plugged on the
    destination."""
    plug, cold_plug = idle_dimm_hooks(DIMM_SIZE)
    return start_svq_pair(
        make_testbed, dst_faults=dst_faults, memory=MEMORY, before_init=plug, customize=cold_plug
    )


def test_vdpa_migration_with_a_dimm_unplug_pending(
    make_testbed: Callable[..., Testbed], log_dir: Path
) -> None:
    facts = migrate_with_unplug_pending(idle_dimm_svq_pair(make_testbed), "dimm1")
    print("unplug pending (x-svq=on):", facts)
    (log_dir / "unplug-pending.json").write_text(json.dumps(facts, default=str, indent=1) + "\n")


def test_vdpa_device_add_during_migration(
    make_testbed: Callable[..., Testbed], log_dir: Path
) -> None:
    facts = device_add_during_migration(start_svq_pair(make_testbed, memory=MEMORY), DIMM_SIZE)
    print("device_add during migration (x-svq=on):", facts)
    (log_dir / "device-add-during-migration.json").write_text(json.dumps(facts, indent=1) + "\n")


def test_meta_vdpa_unplug_pending_catches_keep_stale_map(
    make_testbed: Callable[..., Testbed],
) -> None:
    """B answers the eject's UPDATE_IOTLB without fetching the table (``keep-stale-map``): the
    ejected DIMM stays mapped in B, as a vhost-user backend ignoring REM_MEM_REG keeps it."""
    pair = idle_dimm_svq_pair(make_testbed, dst_faults=("keep-stale-map",))
    with pytest.raises(
        AssertionError, match="B after the eject on the destination: the removed"
    ) as caught:
        migrate_with_unplug_pending(pair, "dimm1")
    print("caught:", caught.value)
