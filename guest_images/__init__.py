"""Minimal Linux test guest built offline from Debian packages (kernel + busybox initramfs).

    from guest_images import build
    image = build()            # cached after the first time; image.kernel, image.initrd

CLI: ``python -m guest_images build [--cache DIR] [--force]``. Cache directory defaults to
``$VDPA_GUEST_CACHE`` or ``~/.cache/vdpa-qtest/guest``. See init.sh for the guest's kernel
command line (``vdpa.ip=``, ``vdpa.peer=`` ...) and console protocol (``VDPA-GUEST-READY``).
"""

from guest_images.builder import BuildError, GuestImage, build, default_cache_dir

READY_MARKER = "VDPA-GUEST-READY"
ERROR_MARKER = "VDPA-GUEST-ERROR"
PROMPT = "vdpa# "

__all__ = [
    "ERROR_MARKER",
    "PROMPT",
    "READY_MARKER",
    "BuildError",
    "GuestImage",
    "build",
    "default_cache_dir",
]
