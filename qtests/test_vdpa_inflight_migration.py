"""Scenario 3 over vhost-vdpa (the lane), with work in flight: RX buffers and TX chains the
source device holds at the switchover of an x-svq=on migration, two L2 QEMUs each with its
own VDUSE device. What QEMU does with them and what is asserted: qtests/qos/svq_inflight.py.
The migration without held chains is test_vdpa_migration.py; the vhost-user suites are
test_migration.py and the in-flight scenarios of qtests/qos/inflight_migration.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

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
