"""``python -m qtests.fuzz``: run the fuzzers with a budget, print the figures."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qtests.fuzz", description=__doc__)
    p.add_argument(
        "which",
        nargs="*",
        default=["vhost-user", "descriptors"],
        choices=["vhost-user", "descriptors"],
    )
    p.add_argument("--messages", type=int, default=1_000_000, help="vhost-user messages to send")
    p.add_argument("--tables", type=int, default=100_000, help="descriptor tables to try")
    p.add_argument("--duration", type=float, default=3600.0, help="seconds per fuzzer at most")
    p.add_argument(
        "--ci",
        action="store_true",
        default=bool(os.environ.get("CI")),
        help="deterministic (derandomized) generation",
    )
    p.add_argument("--log-dir", default="test-logs/fuzz", help="QEMU/backend logs (descriptors)")
    args = p.parse_args(argv)
    results = []
    bad = False
    for which in args.which:
        if which == "vhost-user":
            from qtests.fuzz import vhost_user

            stats = vhost_user.run(
                args.messages,
                args.duration,
                ci=args.ci,
                progress=lambda line: print(line, flush=True),
            )
        else:
            from pathlib import Path

            from qtests.fuzz import descriptors

            stats = descriptors.run(
                args.tables,
                args.duration,
                log_dir=Path(args.log_dir),
                ci=args.ci,
                progress=lambda line: print(line, flush=True),
            )
        print("RESULT " + json.dumps(stats.as_dict()), flush=True)
        for f in stats.failures:
            print(f"  {f}", flush=True)
        results.append(stats)
        bad |= bool(stats.crashes or stats.hangs or stats.fd_leaks)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
