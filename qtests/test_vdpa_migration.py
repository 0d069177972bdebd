"""Scenario 3 over vhost-vdpa (the lane): live migration and ring state of a VDUSE device.

VDUSE cannot suspend, so QEMU 10 migrates a vhost-vdpa device only through shadow
virtqueues (``x-svq=on``): the ring state is QEMU's and the device is never asked for it
(qtests/qos/svq_migration.py). Without SVQ, stop / cont resets the device and QEMU restores
the ring index from the guest ring (qtests/qos/ring_restore.py); the kernel's GET_VQ_STATE
path is reached only by a front-end of our own. The vhost-user suite is test_migration.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qtests.qos.backend_process import BackendProcess
from qtests.qos.machine import QemuLaunchError
from qtests.qos.ring_restore import get_vq_state_round_trip, stop_cont_scenario
from qtests.qos.svq_migration import Plan as SvqPlan
from qtests.qos.svq_migration import migrate_with_traffic_svq, start_svq_pair
from qtests.qos.svq_migration import tx_frame as svq_tx_frame
from qtests.qos.testbed import Testbed

pytestmark = [pytest.mark.qemu, pytest.mark.vdpa_lane]


def test_vdpa_svq_inflight_tx_rx(make_testbed: Callable[..., Testbed], log_dir: Path) -> None:
    pair = start_svq_pair(make_testbed)
    numbers = migrate_with_traffic_svq(pair, SvqPlan())
    print("migration over vhost-vdpa (x-svq=on):", numbers)
    (log_dir / "migration-svq.json").write_text(json.dumps(numbers, indent=1) + "\n")
    assert numbers["downtime_ms"] is not None
    pair.net.send(svq_tx_frame(100), timeout=30)
    assert pair.dst.peer.recv(timeout=30) == svq_tx_frame(100)


def test_vdpa_svq_refuses_packed(make_testbed: Callable[..., Testbed]) -> None:
    """Shadow virtqueues have no packed ring in QEMU 10: a device offering RING_PACKED (and
    INDIRECT_DESC) is refused at netdev creation with x-svq=on, so there is no packed
    variant of the migration."""
    tb = make_testbed(
        transport="vhost-vdpa",
        netdev_props={"x-svq": True},
        backend_args=["--withhold-feature", "INDIRECT_DESC"],
    )
    tb.start_backend()
    with pytest.raises(QemuLaunchError, match=r"SVQ Invalid device feature flags"):
        tb.start_qemu()


def test_vdpa_ring_restored_across_stop_cont(make_testbed: Callable[..., Testbed]) -> None:
    print("restored:", stop_cont_scenario(make_testbed(transport="vhost-vdpa").start()))


def test_ignore_restored_base_is_caught(make_testbed: Callable[..., Testbed]) -> None:
    tb = make_testbed(transport="vhost-vdpa", faults=["ignore-restored-base"]).start()
    with pytest.raises(AssertionError, match="first frame on the wire after cont is not"):
        stop_cont_scenario(tb)


@pytest.fixture
def vduse_run() -> Iterator[Path]:
    """A short private directory for a VDUSE backend's unix sockets (removed at the end)."""
    run = Path(tempfile.mkdtemp(prefix="lane-"))
    yield run
    shutil.rmtree(run, ignore_errors=True)


def test_vdpa_get_vq_state_round_trip(log_dir: Path, vduse_run: Path) -> None:
    backend = BackendProcess(log_dir, name="backend", run_dir=vduse_run, transport="vduse")
    try:
        rtt = get_vq_state_round_trip(backend.start(), {0: 1234, 1: 65535})
        print("GET_VQ_STATE round trip through the kernel:", rtt)
    finally:
        assert backend.stop() == 0


def test_vring_base_off_by_one_is_caught_over_vhost_vdpa(log_dir: Path, vduse_run: Path) -> None:
    backend = BackendProcess(
        log_dir, name="backend", run_dir=vduse_run, transport="vduse",
        faults=["vring-base-off-by-one"],
    )  # fmt: skip
    try:
        with pytest.raises(AssertionError, match="GET_VQ_STATE answered 1235, the front-end set"):
            get_vq_state_round_trip(backend.start(), {0: 1234})
    finally:
        backend.stop()
