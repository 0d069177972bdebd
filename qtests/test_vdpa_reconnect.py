"""Scenario 4 over vhost-vdpa (the lane): the VDUSE backend SIGKILLed mid-stream and restarted
with ``--vduse-reattach`` on the same device, QEMU untouched. The guarantee and how it is
checked: qtests/qos/vdpa_reattach.py. The vhost-user suites are test_reconnect.py and
test_reconnect_inflight.py (there QEMU reconnects and restores the rings itself)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from qtests.qos.testbed import Testbed
from qtests.qos.vdpa_reattach import reattach_in_running_stream, reattach_mid_stream

pytestmark = [pytest.mark.qemu, pytest.mark.vdpa_lane]


def test_vdpa_reattach_mid_stream(make_testbed: Callable[..., Testbed], log_dir: Path) -> None:
    tb = make_testbed(transport="vhost-vdpa").start()
    numbers = reattach_mid_stream(tb)
    print("re-attach over vhost-vdpa:", numbers)
    (log_dir / "reattach.json").write_text(json.dumps(numbers, indent=1) + "\n")


def test_vdpa_reattach_kill_in_a_running_tx_stream(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(transport="vhost-vdpa").start()
    print("kill in a running stream:", reattach_in_running_stream(tb))


def test_meta_reattach_from_vq_info_base_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(transport="vhost-vdpa").start()
    with pytest.raises(AssertionError, match=r"lost, doubled|used entries lost or doubled") as e:
        reattach_mid_stream(tb, faults_after=["reattach-from-vq-info-base"])
    print("caught:", e.value)
