"""Where the vhost-vdpa lane can run: directly on this host, in the lab (L1), or nowhere.

Directly: ``/dev/vduse/control`` exists and vhost_vdpa is loaded (or, as root on a kernel
with loadable modules, ``modprobe vduse vhost_vdpa`` makes it so). Inside L1 that is always the
case. Otherwise the lab: QEMU with TCG (:func:`qtests.qos.machine.find_qemu`, the project's one
way to pick the QEMU binary) and the lab image (Debian's apt). ``VDPA_LANE_MODE=direct|lab``
forces one; the default ``auto`` prefers the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from qtests.qos.machine import QemuError, find_qemu, qemu_accelerators, require_qemu

VDUSE_CONTROL = Path("/dev/vduse/control")
#: Modules the lane needs on the kernel it runs on (virtio_vdpa only for the virtio_vdpa test).
LANE_MODULES = ("vduse", "vhost_vdpa")
MODE_ENV = "VDPA_LANE_MODE"
#: Set by the lab's /init for the command it runs: the lane must run directly there.
INSIDE_ENV = "VDPA_LAB_INSIDE"

HOW_TO = (
    "the vhost-vdpa lane needs either (a) the vduse and vhost_vdpa modules: as root, "
    "`modprobe vduse vhost_vdpa` on a kernel built with CONFIG_VDPA_USER and "
    "CONFIG_VHOST_VDPA (Debian 12: the bookworm-backports 6.12 kernel), or (b) the lab: "
    "qemu-system-x86_64 >= 10.0 with TCG (Debian 12: apt-get install -t bookworm-backports "
    "qemu-system-x86) and Debian's apt to fetch the L1 kernel (scripts/setup-host.sh sets "
    "both up)"
)


def inside_lab() -> bool:
    return os.environ.get(INSIDE_ENV) == "1"


def modules_loaded() -> bool:
    return VDUSE_CONTROL.exists() and all(Path(f"/sys/module/{m}").is_dir() for m in LANE_MODULES)


def direct_problem(try_modprobe: bool = True) -> str | None:
    """None if the lane tests can run on this kernel, else why not (after trying modprobe)."""
    if modules_loaded():
        return None
    release = os.uname().release
    if not Path(f"/lib/modules/{release}").is_dir():
        return f"kernel {release} has no loadable modules (/lib/modules/{release} missing)"
    if os.geteuid() != 0:
        return "vduse/vhost_vdpa are not loaded and we are not root (modprobe vduse vhost_vdpa)"
    if not try_modprobe or shutil.which("modprobe") is None:
        return "vduse/vhost_vdpa are not loaded (modprobe vduse vhost_vdpa)"
    try:
        proc = subprocess.run(
            ["modprobe", "-a", *LANE_MODULES], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"modprobe {' '.join(LANE_MODULES)}: {exc}"
    if proc.returncode != 0 or not modules_loaded():
        return f"modprobe {' '.join(LANE_MODULES)} failed: {proc.stderr.strip() or proc.returncode}"
    return None


def lab_problem() -> str | None:
    """None if this host can boot the lab (QEMU >= 10 with TCG, apt for the image), else why."""
    try:
        require_qemu()
        qemu = find_qemu()
    except QemuError as exc:
        return str(exc)
    accel = os.environ.get("VDPA_LAB_ACCEL", "tcg")
    have = qemu_accelerators(qemu)
    if accel not in have:
        return f"{qemu} has no {accel} accelerator (it lists: {' '.join(sorted(have))})"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        from guest_images.builder import default_cache_dir
        from guest_images.lab import LAB

        if not any(default_cache_dir(LAB).glob("*/manifest.json")):
            return (
                "no apt-get/dpkg-deb to fetch the L1 kernel (Debian packages) and no cached image"
            )
    return None


def lane_mode() -> tuple[str, str]:
    """("direct", "") or ("lab", why not direct) or ("none", why neither), per VDPA_LANE_MODE."""
    wanted = os.environ.get(MODE_ENV, "auto")
    if inside_lab() or wanted == "direct":
        return "direct", ""
    direct = direct_problem() if wanted == "auto" else f"{MODE_ENV}={wanted}"
    if direct is None:
        return "direct", ""
    lab = lab_problem()
    if lab is None:
        return "lab", direct
    return "none", f"not on this host ({direct}) and not in the lab ({lab}): {HOW_TO}"
