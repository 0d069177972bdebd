"""The vhost-vdpa lab (L1) image: the bookworm-backports 6.12 kernel with the vDPA modules.

The host kernel of our machines loads no modules, so VDUSE, vhost_vdpa and virtio_vdpa run in
an L1 VM (``qtests.lab``). Its initramfs holds only busybox, the modules and ``lab_init.sh``:
everything else (python, the project's venv, QEMU, iproute2's ``vdpa``) comes from the host's
root, shared read-only over 9p. The ``-cloud-amd64`` flavour the test guest uses has no 9p, so
the lab takes the generic ``-amd64-unsigned`` kernel (same source package, same version).

    from guest_images.lab import build_lab
    image = build_lab()        # cached like the guest: image.kernel, image.initrd

CLI: ``python -m guest_images build --image lab``. Cache: ``$VDPA_LAB_CACHE`` or
``~/.cache/vdpa-qtest/lab``. Console protocol: see lab_init.sh.
"""

from __future__ import annotations

from pathlib import Path

from guest_images.apt import Log
from guest_images.builder import GuestImage, ImageSpec, build

#: Loaded by lab_init.sh in this order (each one's ``depends=`` first). vhost_vdpa registers
#: before virtio_vdpa, so a new vDPA device binds to vhost_vdpa unless a test rebinds it.
LAB_MODULES = (
    "9pnet_virtio",  # the 9p transport (not a depends= of 9p itself)
    "9p",  # netfs, 9pnet first
    "vduse",  # vhost_iotlb, vdpa first
    "vhost_vdpa",  # vhost, irqbypass first
    "virtio_vdpa",
    "virtio_net",  # failover, net_failover first: drives a device bound to virtio_vdpa
)

LAB = ImageSpec(
    name="lab",
    kernel_regex=r"linux-image-6\.12\.\d+\+deb12(\.\d+)?-amd64-unsigned",
    modules=LAB_MODULES,
    init="lab_init.sh",
    cache_env="VDPA_LAB_CACHE",
    release="vdpa-lab-release",
)

#: Console markers written by lab_init.sh (one line each).
INIT_MARKER = "VDPA-LAB-INIT"  # /init started (the kernel booted)
READY_MARKER = "VDPA-LAB-READY"  # modules loaded, host root mounted, command about to run
DONE_MARKER = "VDPA-LAB-DONE"  # "VDPA-LAB-DONE rc=N": the command finished
ERROR_MARKER = "VDPA-LAB-ERROR"  # "VDPA-LAB-ERROR: what went wrong"
FAILED_MARKER = "VDPA-LAB-FAILED"  # init gave up (after an ERROR line) and powers off

#: Files on the writable share (the runner writes COMMAND, lab_init.sh the others).
COMMAND_FILE = "command.sh"
STDOUT_FILE = "stdout"
STDERR_FILE = "stderr"
RC_FILE = "rc"
DMESG_FILE = "dmesg.txt"


def build_lab(cache_dir: Path | None = None, force: bool = False, log: Log = print) -> GuestImage:
    """The lab image for the current recipe and newest packages, built only if not cached."""
    return build(cache_dir, force=force, log=log, spec=LAB)
