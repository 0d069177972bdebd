"""The vhost-vdpa lane's ground: the kernel it runs on has VDUSE and the vDPA bus drivers.

Lane tests (``vdpa_lane``): on this host if it has the modules, else inside the lab (L1). They
are the first proof that the lab carries what the VDUSE transport and the virtio_vdpa test need.
"""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.vdpa_lane


def test_vduse_control_device_exists() -> None:
    control = Path("/dev/vduse/control")
    assert control.exists(), f"{control} missing: is the vduse module loaded?"
    assert stat.S_ISCHR(control.stat().st_mode), f"{control} is not a character device"


@pytest.mark.parametrize(
    "module", ["vdpa", "vduse", "vhost_iotlb", "vhost", "vhost_vdpa", "virtio_vdpa"]
)
def test_vdpa_module_loaded(module: str) -> None:
    assert Path(f"/sys/module/{module}").is_dir(), f"module {module} not loaded"


def test_vdpa_bus_drivers_registered() -> None:
    drivers = Path("/sys/bus/vdpa/drivers")
    assert drivers.is_dir(), "no vdpa bus: the vdpa module is not loaded"
    have = sorted(p.name for p in drivers.iterdir())
    for driver in ("vhost_vdpa", "virtio_vdpa"):
        assert driver in have, f"vdpa bus driver {driver} not registered (have {have})"


def test_vdpa_mgmtdev_lists_vduse() -> None:
    proc = subprocess.run(
        ["vdpa", "-j", "mgmtdev", "show"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"vdpa mgmtdev show failed: {proc.stderr.strip()}"
    mgmtdevs = json.loads(proc.stdout)["mgmtdev"]
    assert "vduse" in mgmtdevs, f"vduse is not a vdpa management device: {mgmtdevs}"
    assert "net" in mgmtdevs["vduse"]["supported_classes"], mgmtdevs["vduse"]
