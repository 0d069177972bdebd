"""The lab (L1) image recipe: its own cache and key, and an /init that speaks the protocol the
runner (qtests.lab.vm) listens for."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from guest_images import lab
from guest_images.builder import GUEST, HERE, default_cache_dir, recipe_hash


def test_lab_has_its_own_cache_and_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert recipe_hash(lab.LAB) != recipe_hash(GUEST)
    monkeypatch.delenv("VDPA_LAB_CACHE", raising=False)
    assert default_cache_dir(lab.LAB).name == "lab" != default_cache_dir(GUEST).name
    monkeypatch.setenv("VDPA_LAB_CACHE", str(tmp_path))
    assert default_cache_dir(lab.LAB) == tmp_path


def test_lab_kernel_is_the_generic_flavour_with_9p() -> None:
    regex = re.compile(lab.LAB.kernel_regex)
    assert regex.fullmatch("linux-image-6.12.95+deb12-amd64-unsigned")
    assert not regex.fullmatch("linux-image-6.12.95+deb12-cloud-amd64")  # no 9p there
    for module in ("9p", "9pnet_virtio", "vduse", "vhost_vdpa", "virtio_vdpa", "virtio_net"):
        assert module in lab.LAB_MODULES
    assert lab.LAB_MODULES.index("vhost_vdpa") < lab.LAB_MODULES.index("virtio_vdpa")


def test_lab_init_speaks_the_runners_protocol() -> None:
    script = (HERE / lab.LAB.init).read_text()
    for marker in (lab.INIT_MARKER, lab.READY_MARKER, lab.DONE_MARKER, lab.ERROR_MARKER,
                   lab.FAILED_MARKER):  # fmt: skip
        assert marker in script, marker
    for name in (lab.COMMAND_FILE, lab.STDOUT_FILE, lab.STDERR_FILE, lab.RC_FILE, lab.DMESG_FILE):
        assert f"/{name}" in script, name
    proc = subprocess.run(["sh", "-n", str(HERE / lab.LAB.init)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
