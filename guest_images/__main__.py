"""``python -m guest_images build [--image guest|lab] [--cache DIR] [--force] [--json]``.

Builds (or finds cached) the test guest (default) or the vhost-vdpa lab's L1 image."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from guest_images.apt import AptError
from guest_images.builder import GUEST, BuildError, build, default_cache_dir
from guest_images.lab import LAB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guest_images")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the guest kernel + initramfs (or find it cached)")
    b.add_argument("--image", choices=("guest", "lab"), default="guest",
                   help="guest: the avocado tests' guest; lab: the vhost-vdpa lab's L1")  # fmt: skip
    b.add_argument("--cache", type=Path, default=None,
                   help=f"default: {default_cache_dir(GUEST)} or {default_cache_dir(LAB)}")  # fmt: skip
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    try:
        image = build(
            args.cache, force=args.force, log=log, spec=LAB if args.image == "lab" else GUEST
        )
    except (BuildError, AptError, OSError) as exc:
        print(f"guest_images: build failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**image.manifest, "cached": image.cached, "dir": str(image.directory)}))
        return 0
    print("cached" if image.cached else f"built in {time.monotonic() - t0:.1f} s")
    print(f"kernel: {image.kernel}")
    print(f"initrd: {image.initrd}")
    if not image.has_udpseq:
        print("warning: udpseq missing from the guest (see manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
